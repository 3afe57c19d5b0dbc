"""End to end through the Python API on the built-in reference model: parity, round trip, determinism."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import yaml
from helpers import (
    REPO,
    convert,
    invoke,
    logits,
    other_tokenizer,
    sha256_of,
    tiny,
)

import bitnet_convert
from bitnet_convert.optimum_api import BitNetA48Quantizer


def test_same_recipe_gives_byte_identical_files(tmp_path):
    first = convert(tmp_path, "a48", "first")
    second = convert(tmp_path, "a48", "second")
    for name in ("model.safetensors", "config.json"):
        assert sha256_of(first.output / name) == sha256_of(second.output / name), name


@pytest.mark.parametrize(("recipe", "options"), [
    ("a48", {}),
    ("a48-qwt", {"calibration__samples": 8, "calibration__batch_size": 4}),
    ("a48-blockwise", {"calibration__samples": 8, "calibration__batch_size": 4,
                       "recovery__blockwise": {"steps": 4, "batch_size": 2, "max_grad_norm": 1e-3}}),
    ("a48-kd", {"calibration__samples": 0,
                "recovery__distill": {"steps": 2, "batch_size": 2, "seq_len": 32, "hidden_mse": 1.0,
                                      "max_grad_norm": 1e-3}}),
])
def test_the_bytes_do_not_depend_on_the_thread_count(tmp_path, recipe, options):
    """Field report: at 1 and 2 threads a48 stored 8 weight_scale tensors one ulp apart (torch.mean splits its sum
    among the threads). Every full sum that decides stored bytes or reported numbers — weight scales, QwT's solve,
    the training losses and their normalizers, gradient clipping, keep-or-revert — is computed in a
    thread-independent order."""
    threads = torch.get_num_threads()
    files = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = bitnet_convert.quantize(REPO / "recipes" / f"{recipe}.yaml", output=str(tmp_path / str(count)),
                                          **options).output
            report = json.loads((out / "conversion_report.json").read_text())
            files.append((sha256_of(out / "model.safetensors"), sha256_of(out / "config.json"), _without_times(report)))
    finally:
        torch.set_num_threads(threads)
    assert files[0][:2] == files[1][:2]
    assert files[0][2] == files[1][2]  # losses, held-out errors, statistics: every reported number but the clocks


def _without_times(value):
    """A report without what a clock or the memory gauge measured (the only numbers allowed to differ)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items()
                if not any(word in k for word in ("time", "rss", "seconds"))}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_conversion_does_not_touch_the_global_rng(tmp_path):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    convert(tmp_path, "a48")
    assert torch.equal(torch.get_rng_state(), state)






def test_b158_report_shows_less_sparsity_than_a48(tmp_path):
    a48 = convert(tmp_path, "a48").report["calibration"]
    b158 = convert(tmp_path, "b158").report["calibration"]
    assert b158["roles"]["o"]["zero_share"] < 0.2
    assert b158["sparsity"]["o"] < 0.2 < 0.45 < a48["sparsity"]["o"]
    # the relu² zeros (up, down) count for both; a48 adds o's top-50% and INT4's zeros on qkv/gate
    assert b158["active_parameter_share"] > a48["active_parameter_share"] + 0.05


def test_optimum_quantizer_entry_point(tmp_path, reference_ids):
    quantizer = BitNetA48Quantizer.from_pretrained("builtin:reference", scheme__preset="a48-fp4",
                                                   calibration__samples=0)
    conversion = quantizer.quantize(tmp_path / "via-optimum")
    assert json.loads((conversion.output / "config.json").read_text())["bitnet_convert"]["scheme"] == "a48-fp4"
    assert torch.equal(logits(bitnet_convert.load(conversion.output), reference_ids),
                       logits(conversion.model, reference_ids))




def test_no_import_cycle_between_modules():
    """The package's module-level imports form no cycle (the model builder does not reach back into recovery, the
    block runner sits between them)."""
    import ast

    package = REPO / "bitnet_convert"
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions run later
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bitnet_convert"):
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
        graph[name] = {e for e in edges if e in modules and e != "bitnet_convert"}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            assert state.get(nxt) != 1, " → ".join([*path, name, nxt])
            if nxt not in state:
                visit(nxt, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "bitnet_convert.runtime.blocks" in graph["bitnet_convert.recover.qwt"]
    assert not any(e.startswith("bitnet_convert.recover") for e in graph["bitnet_convert.runtime.modeling"])


def test_recovery_stages_run_in_the_recipe_order(tmp_path, reference_dir, monkeypatch):
    """``recovery`` stages run in the order ``recovery.order`` gives (default: qwt, blockwise, distill), and the
    stored recipe keeps it; an order that does not name the stages set, once each, is refused."""
    from bitnet_convert import pipeline
    from bitnet_convert.recover.base import METHODS

    ran = []
    for key, method in METHODS.items():
        section = {"stage": key, "form": "channel", "rank": None, "layers": []}  # what the export reads of QwT's
        monkeypatch.setitem(METHODS, key, dataclasses.replace(
            method, run=lambda context, spec, key=key, section=section: ran.append(key) or section))
    recipe = pipeline.load_recipe(None, {"model": str(reference_dir), "output": str(tmp_path / "out"),
                                         "calibration": {"samples": 4, "seq_len": 32, "batch_size": 2},
                                         "recovery": {"qwt": {}, "blockwise": {"steps": 1}, "distill": {"steps": 1},
                                                      "order": ["distill", "blockwise", "qwt"]}})
    conversion = pipeline.run(recipe)
    assert ran == ["distill", "blockwise", "qwt"]
    assert [conversion.report[k]["stage"] for k in ("distill", "blockwise", "qwt")] == ["distill", "blockwise", "qwt"]
    stored = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert stored["recovery"]["order"] == ["distill", "blockwise", "qwt"]
    assert pipeline.load_recipe(None, {"recovery": {"distill": {}, "qwt": {}}}).recovery.order_of_stages() == (
        "qwt", "distill")
    bad = {"recovery.order names 'blockwise' but recovery.blockwise is not set": ["distill", "blockwise", "qwt"],
           "recovery.order must list every stage the recipe sets; it leaves out 'qwt'": ["distill"],
           "recovery.order names a stage twice": ["qwt", "distill", "qwt"],
           "recovery.distill.trainable names 'qwt' but recovery.order runs qwt after distill": ["distill", "qwt"]}
    for message, order in bad.items():
        with pytest.raises(pipeline.RecipeError, match=re.escape(message)):
            pipeline.load_recipe(None, {"recovery": {"qwt": {}, "distill": {"trainable": ["norms", "qwt"]},
                                                     "order": order}})


def test_own_model_uses_the_given_data_in_every_stage(tmp_path):
    model = other_tokenizer(tiny(tmp_path))
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(f"Anna has {n} red apples,\nand Tom has {n + 2}." for n in range(120)))
    args = ["--model", model, "--calibration-data", data, "-r", REPO / "recipes/a48-kd.yaml",
            "--set", "calibration.seq_len=32", "--set", "calibration.samples=4", "--set", "recovery.distill.steps=2",
            "--set", "recovery.distill.batch_size=2", "--set", "recovery.distill.seq_len=32"]
    result = invoke("quantize", "--output", tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["data"]["calibration"]["data"] == str(data) and report["data"]["distill"]["data"] == str(data)
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["recovery"]["distill"]["data"] is None
    # without --calibration-data the built-in corpus is used, and said
    result = invoke("quantize", "--output", tmp_path / "out2", *[a for a in args if a not in ("--calibration-data",
                                                                                              data)])
    assert result.exit_code == 0, result.output
    assert "warning: calibration.data is the built-in reference corpus" in result.output
    assert "warning: recovery.distill.data is the built-in reference corpus" in result.output
