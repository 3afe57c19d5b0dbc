"""The calibration report (``calibration/report.py``): JSON, markdown and plots, the ``calibrate`` command, warnings
about too little text and zero tensors, and the same report at any thread count."""

from __future__ import annotations

import json

import torch
from helpers import (
    REPO,
    edit_tensors,
    invoke,
    tiny,
)
from typer.testing import CliRunner

from bitnet_convert.calibration.report import write_report
from bitnet_convert.calibration.statistics import (
    sequential_calibration,
)
from bitnet_convert.cli import app
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recipe import load_recipe


def test_report_writes_json_markdown_and_plots(reference_dir, calibration_ids, tmp_path):
    checkpoint = open_checkpoint(reference_dir)
    calibration = sequential_calibration(checkpoint, PRESETS["a48"], calibration_ids[:2], batch_size=2)
    files = write_report(calibration, tmp_path, {"model": "builtin:reference", "scheme": "a48"})
    assert {f.name for f in files} == {"calibration.json", "calibration.md", "error_heatmap.png",
                                       "worst_histograms.png", "sparsity.png"}
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["tokens"] == calibration_ids[:2].numel() and len(data["linears"]) == 28
    text = (tmp_path / "calibration.md").read_text()
    assert "| linear | configured | int4_absmean | int8_absmax | top50_int8 | fp4_e2m1 |" in text
    assert "o_proj" in text.split("hurt most")[1].split("\n\n")[1]  # top-50% on o_proj is among the worst


def test_calibrate_command_writes_the_report_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    target = tmp_path / "report"
    args = ["calibrate", "--recipe", str(REPO / "recipes/a48.yaml"), "--output", str(target),
            "--set", "calibration.samples=2", "--set", "calibration.seq_len=64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((target / "calibration.json").read_text())["mode"] == "layer by layer"
    assert (target / "error_heatmap.png").is_file() and (target / "calibration.md").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output


def test_the_calibration_report_does_not_depend_on_the_thread_count(tmp_path):
    """Every float sum of the statistics is added in a thread-independent order: the report's bytes are the same
    at 1 and 2 threads (they differed in the 16th digit of the output errors)."""
    from bitnet_convert.pipeline import calibrate

    threads = torch.get_num_threads()
    reports = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            recipe = load_recipe(REPO / "recipes" / "a48.yaml", {"calibration.samples": 8})
            out = calibrate(recipe, tmp_path / str(count))
            reports.append((out / "calibration.json").read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert reports[0] == reports[1]


def test_too_little_calibration_text_and_zero_linears_are_reported(tmp_path):
    def zero(tensors: dict) -> None:
        tensors["model.layers.1.mlp.gate_proj.weight"].zero_()

    model = edit_tensors(tiny(tmp_path), zero)
    data = tmp_path / "six.txt"
    data.write_text("\n\n".join(" ".join(f"Anna has {n} red apples and {n + 1} pears." for _ in range(6))
                                for n in range(6)))
    result = invoke("quantize", "--model", model, "--output", tmp_path / "out", "--calibration-data", data,
                    "--set", "calibration.seq_len=64", "--set", "calibration.samples=16")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    used = report["data"]["calibration"]
    assert used["data"] == str(data) and 0 < used["windows"] < 16 and used["tokens"] == used["windows"] * 64
    lines = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert any(f"holds only {used['windows']} windows" in line and "samples asks for 16" in line for line in lines)
    assert any("1 linear(s) with all-zero weights" in line and "'model.layers.1.mlp.gate_proj'" in line
               for line in lines)
    assert len(report["warnings"]) == 2 and "all-zero" in report["warnings"][0] + report["warnings"][1]


def test_zero_embeddings_are_reported_and_the_report_still_plots(tmp_path):
    model = edit_tensors(tiny(tmp_path), lambda d: d["model.embed_tokens.weight"].zero_())
    result = invoke("quantize", "--model", model, "--output", tmp_path / "out", "--set", "calibration.samples=2",
                    "--set", "calibration.seq_len=32")
    assert result.exit_code == 0, result.output
    assert "1 tensor(s) are all zero (a broken upload?): 'model.embed_tokens.weight'" in result.output
    assert (tmp_path / "out" / "calibration" / "error_heatmap.png").is_file()
