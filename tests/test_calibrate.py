"""Layer-by-layer calibration: the same statistics as a whole-model pass, a readable report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

import bitnet_convert
from bitnet_convert.calibration.auto import choose_precision
from bitnet_convert.calibration.report import write_report
from bitnet_convert.calibration.statistics import (
    CANDIDATES,
    LinearStats,
    activation_stats,
    calibration_and_stats,
    hooked_calibration,
    sequential_calibration,
)
from bitnet_convert.cli import app
from bitnet_convert.errors import CheckpointError, RecipeError
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec
from bitnet_convert.recipe import load_recipe
from bitnet_convert.runtime.modeling import build_model, quant_linears


@pytest.fixture(scope="module")
def calibration_ids(reference_ids) -> torch.Tensor:
    return reference_ids[:6, :128]


def _flatten(stats: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float):
            flat[prefix + key] = float(value)
    return flat


@pytest.mark.parametrize("preset", ["a48", "b158"])
def test_sequential_calibration_equals_a_whole_model_pass(reference_dir, calibration_ids, preset):
    checkpoint = open_checkpoint(reference_dir)
    sequential = sequential_calibration(checkpoint, PRESETS[preset], calibration_ids, batch_size=4)
    whole = hooked_calibration(build_model(checkpoint, PRESETS[preset]), calibration_ids, batch_size=4)
    assert sequential.linears.keys() == whole.linears.keys() and len(sequential.linears) == 28
    for name in whole.linears:
        ours, reference = _flatten(sequential.linears[name]), _flatten(whole.linears[name])
        assert ours.keys() == reference.keys()
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{name} {key}"
        assert torch.allclose(sequential.samples[name], whole.samples[name], rtol=1e-5, atol=1e-6)


def test_linear_stats_by_hand():
    stats = LinearStats(ActivationSpec(method="absmax", bits=8), samples_per_update=100)
    x = torch.tensor([[0.0, 1.0, -2.0, 100.0], [0.0, 1.0, 2.0, -1.0]])
    stats.update(x, torch.eye(4))
    result = stats.result()
    assert result["zero_share"] == 2 / 8 and result["absmax"] == 100.0
    assert result["absmean"] == pytest.approx(107 / 8)
    values = x.flatten().double()
    central = values - values.mean()
    assert result["kurtosis"] == pytest.approx(float(central.pow(4).mean() / central.pow(2).mean() ** 2))
    assert result["outlier_channels"] == 1 and result["channels"] == 4  # channel 3: 100 > 6 × median 1.5
    int8 = result["quantizers"]["int8_absmax"]
    assert int8 == result["quantizers"]["configured"]
    assert int8["sqnr_db"] == pytest.approx(-20 * math.log10(int8["relative_error"]))
    assert set(result["quantizers"]) == {"configured", *CANDIDATES}


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


def test_auto_promotes_the_most_sensitive_4bit_linears_within_budget(reference_dir, calibration_ids):
    checkpoint = open_checkpoint(reference_dir)
    model = build_model(checkpoint, PRESETS["a48"])
    calibration = hooked_calibration(model, calibration_ids, batch_size=4)
    linears = quant_linears(model)
    overrides, record = choose_precision(calibration, linears, max_share=0.1)
    assert len(overrides) == 2  # ⌊0.1 × 28⌋
    gains = {n: s["quantizers"]["configured"]["output_relative_error"] - s["quantizers"]["int8_absmax"][
        "output_relative_error"] for n, s in calibration.linears.items() if linears[n].spec.bits < 8}
    assert set(overrides) == set(sorted(gains, key=gains.get, reverse=True)[:2])
    assert all(spec == ActivationSpec(method="absmax", bits=8) for spec in overrides.values())
    assert record["mean_input_bits"]["after"] > record["mean_input_bits"]["before"]
    # a bits budget binds before the share does
    before = record["mean_input_bits"]["before"]
    tight, tight_record = choose_precision(calibration, linears, max_share=None, max_mean_bits=before + 0.2)
    assert tight and tight_record["mean_input_bits"]["after"] <= before + 0.2
    assert choose_precision(calibration, linears, max_share=None, max_mean_bits=before)[0] == {}


def test_static_o_threshold_keeps_about_the_top_k_share(reference_dir, calibration_ids):
    checkpoint = open_checkpoint(reference_dir)
    model = build_model(checkpoint, PRESETS["a48"])
    calibration = hooked_calibration(model, calibration_ids, batch_size=4)
    overrides, record = choose_precision(calibration, quant_linears(model), max_share=None, max_mean_bits=2.0,
                                         static_o_threshold=True)
    assert set(overrides) == {f"model.layers.{i}.self_attn.o_proj" for i in range(4)}
    for name, spec in overrides.items():
        assert spec.topk is None and spec.threshold == record["o_proj_thresholds"][name] > 0
    static = build_model(checkpoint, PRESETS["a48"], overrides=overrides)
    zeros = hooked_calibration(static, calibration_ids, batch_size=4).linears
    for name in overrides:
        assert zeros[name]["quantized_zero_share"] == pytest.approx(0.5, abs=0.05)


def test_auto_is_exported_and_restored(tmp_path, reference_ids):
    conversion = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "auto"),
                                         scheme__auto={"max_share": 0.1}, calibration__samples=4)
    promoted = [p["linear"] for p in conversion.report["auto"]["promoted_to_int8"]]
    assert len(promoted) == 2
    config = json.loads((conversion.output / "config.json").read_text())
    assert sorted(config["bitnet_convert"]["linears"]) == sorted(promoted)
    loaded = bitnet_convert.load(conversion.output)
    for name, module in quant_linears(loaded).items():
        expected = "INT8 absmax" if name in promoted else quant_linears(conversion.model)[name].spec.describe()
        assert module.spec.describe() == expected
    with torch.no_grad():
        assert torch.equal(loaded(reference_ids[:2]).logits, conversion.model(reference_ids[:2]).logits)


def test_bad_precision_settings_are_clear_errors(tmp_path, reference_dir):
    with pytest.raises(RecipeError, match=r"scheme.auto: .*calibration.samples must be > 0"):
        bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "x"), scheme__auto={},
                                calibration__samples=0)
    with pytest.raises(CheckpointError, match=r"no ternary linear named 'model\.layers\.9\.mlp\.up_proj'"):
        build_model(open_checkpoint(reference_dir), PRESETS["a48"],
                    overrides={"model.layers.9.mlp.up_proj": ActivationSpec()})
    with pytest.raises(RecipeError, match="give topk or threshold, not both"):
        load_recipe(None, {"scheme.roles.o": {"topk": 0.5, "threshold": 0.1}})
    assert not (tmp_path / "x").exists()


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


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_during_calibration_names_the_knobs(tmp_path, monkeypatch, error):
    def exhausted(self, x, weight, batch=None):
        raise error

    monkeypatch.setattr(LinearStats, "update", exhausted)
    target = tmp_path / "report"
    result = CliRunner().invoke(app, ["calibrate", "--recipe", str(REPO / "recipes/a48.yaml"), "--output",
                                      str(target), "--set", "calibration.samples=2"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "calibration ran out of memory with calibration.samples=2, calibration.seq_len=256" in result.output
    assert not target.exists()


def test_one_pass_gives_the_report_and_the_statistics_of_two(reference_dir, calibration_ids):
    model = build_model(open_checkpoint(reference_dir), PRESETS["a48"])
    details, stats = calibration_and_stats(model, calibration_ids, batch_size=4)
    assert stats == activation_stats(model, calibration_ids, batch_size=4)
    separate = hooked_calibration(model, calibration_ids, batch_size=4)
    assert details.linears == separate.linears and details.tokens == separate.tokens
    assert all(torch.equal(details.samples[n], separate.samples[n]) for n in separate.samples)


def test_quantize_runs_one_calibration_pass_unless_the_model_changes_after_it(tmp_path, reference_dir):
    from bitnet_convert.pipeline import _calibration_windows

    options = {"calibration__samples": 4, "calibration__batch_size": 2}
    recipe = load_recipe(REPO / "recipes/a48.yaml", {"calibration.samples": 4})
    ids = _calibration_windows(recipe, open_checkpoint(reference_dir))
    plain = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a"), **options)
    assert "calibrate" not in plain.report["time_s"] and "calibration_report" in plain.report["time_s"]
    assert (plain.output / "calibration" / "calibration.json").is_file()
    # the conversion's statistics pass runs one block at a time (on the recipe's device)
    assert plain.report["calibration"] == activation_stats(plain.model, ids, 2, device=torch.device("cpu"))
    tuned = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "b"),
                                    recovery__qwt={"form": "channel"}, **options)
    assert {"calibration_report", "qwt", "calibrate"} <= set(tuned.report["time_s"])
    # the statistics describe the model as exported: after the compensation, not before it
    assert tuned.report["calibration"] == activation_stats(tuned.model, ids, 2, device=torch.device("cpu"))
    assert tuned.report["calibration"] != plain.report["calibration"]


def test_block_by_block_statistics_equal_whole_model_forwards(reference_dir, calibration_ids):
    """The conversion's statistics pass (one decoder block at a time) measures what whole-model forwards measure,
    up to float rounding (a block run on its own sums in another order)."""
    model = build_model(open_checkpoint(reference_dir), PRESETS["a48"])
    whole = activation_stats(model, calibration_ids, 4)
    blocks = activation_stats(model, calibration_ids, 4, device=torch.device("cpu"))
    assert whole["tokens"] == blocks["tokens"]
    assert whole["sparsity"] == pytest.approx(blocks["sparsity"], abs=1e-4)
    for role, values in whole["roles"].items():
        assert values == pytest.approx(blocks["roles"][role], rel=1e-4, abs=1e-6)


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
