"""End to end through the Python API on the built-in reference model: parity, round trip, determinism."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_linears_match, assert_same_predictions
from transformers import AutoModelForCausalLM

import bitnet_convert
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.optimum_api import BitNetA48Quantizer
from bitnet_convert.quant.functional import ternary_absmean
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recipe import load_recipe
from bitnet_convert.runtime.modeling import build_model, quant_linears


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def convert(tmp_path: Path, preset: str, name: str | None = None, **overrides):
    return bitnet_convert.quantize(
        REPO / "recipes" / f"{preset}.yaml", output=str(tmp_path / (name or preset)), calibration__samples=4,
        calibration__seq_len=64, **overrides,
    )


def test_b158_matches_stock_transformers_online(reference_dir, reference_ids):
    """Whole-model agreement with transformers' online (master-weight) model. Logits cannot agree to 1e-4:
    transformers' own online and offline (packed) layouts of the same weights differ by ~0.08 in fp32, because
    ``x·(T/s)`` and ``(x·T)·α`` round differently and the next INT8 RoundClip turns 1e-7 differences into whole
    quantization steps. Ours computes the packed way (bit-identical to the stock packed load, below), matches
    every online linear to fp32 rounding (next test), and predicts like the online model (here)."""
    ours = build_model(open_checkpoint(reference_dir), PRESETS["b158"])
    stock = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    layer = stock.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "AutoBitLinear" and layer.online_quant
    assert_same_predictions(logits(ours, reference_ids), logits(stock, reference_ids), reference_ids)


def test_b158_linears_match_stock_online_linears_in_fp32(reference_dir):
    ours = build_model(open_checkpoint(reference_dir), PRESETS["b158"])
    assert_linears_match(ours, AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32))


def test_export_loads_in_stock_transformers_as_b158(tmp_path, reference_ids):
    conversion = convert(tmp_path, "b158", export__dtype="float32")
    stock = AutoModelForCausalLM.from_pretrained(conversion.output, dtype=torch.float32)
    layer = stock.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "AutoBitLinear" and not layer.online_quant
    ours = quant_linears(conversion.model)["model.layers.1.mlp.down_proj"]
    assert torch.equal(layer.weight.to(torch.int8), ours.ternary())
    assert_same_predictions(logits(stock, reference_ids), logits(conversion.model, reference_ids), reference_ids)


@pytest.mark.parametrize("preset", ["a48", "a48-fp4", "b158"])
def test_load_gives_bit_identical_logits(tmp_path, reference_ids, preset):
    conversion = convert(tmp_path, preset)
    reloaded = bitnet_convert.load(conversion.output)
    assert torch.equal(logits(reloaded, reference_ids), logits(conversion.model, reference_ids))
    assert {n: m.spec for n, m in quant_linears(reloaded).items()} == {
        n: m.spec for n, m in quant_linears(conversion.model).items()
    }


def test_packed_values_unpack_to_the_ternarized_master(tmp_path, reference_dir):
    conversion = convert(tmp_path, "a48")
    source = open_checkpoint(reference_dir)
    exported = open_checkpoint(conversion.output)
    assert exported.layout.value == "packed-autobitlinear"
    for name in source.linear_names():
        codes, alpha = ternary_absmean(source.tensor(f"{name}.weight"))
        got_codes, got_alpha = exported.ternary(name)
        assert torch.equal(got_codes, codes), name
        assert torch.equal(got_alpha, alpha), name


def test_a48_changes_the_model_and_b158_does_not(reference_dir, reference_ids):
    checkpoint = open_checkpoint(reference_dir)
    base = logits(build_model(checkpoint, PRESETS["b158"]), reference_ids)
    a48 = logits(build_model(checkpoint, PRESETS["a48"]), reference_ids)
    assert (a48 - base).abs().max().item() > 1e-2


def test_same_recipe_gives_byte_identical_files(tmp_path):
    first = convert(tmp_path, "a48", "first")
    second = convert(tmp_path, "a48", "second")
    for name in ("model.safetensors", "config.json"):
        assert _sha(first.output / name) == _sha(second.output / name), name


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
            files.append((_sha(out / "model.safetensors"), _sha(out / "config.json"), _without_times(report)))
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


def test_sharded_export_round_trips(tmp_path, reference_ids):
    whole = convert(tmp_path, "a48", "whole")
    sharded = convert(tmp_path, "a48", "sharded", export__max_shard_size=300_000)
    index = json.loads((sharded.output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (sharded.output / "model.safetensors").exists()
    assert all((sharded.output / s).stat().st_size <= 300_000 + 200_000 for s in shards)
    assert torch.equal(logits(bitnet_convert.load(sharded.output), reference_ids), logits(whole.model, reference_ids))


def test_output_carries_tokenizer_recipe_and_report(tmp_path, reference_dir):
    conversion = convert(tmp_path, "a48")
    out = conversion.output
    assert _sha(out / "tokenizer.json") == _sha(reference_dir / "tokenizer.json")
    stored = load_recipe(out / "recipe.yaml")
    assert stored.scheme.preset == "a48" and stored.calibration.samples == 4 and stored.output == out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quantization_mode"] == "offline"
    o_spec = {"method": "absmax", "bits": 8, "topk": 0.5, "threshold": None}
    assert config["bitnet_convert"]["activations"]["o"] == o_spec
    report = json.loads((out / "conversion_report.json").read_text())
    assert report == conversion.report
    linears = quant_linears(conversion.model).values()
    assert report["parameters"]["ternary"] == sum(m.in_features * m.out_features for m in linears)
    assert 2.0 <= report["packed_linears"]["bits_per_weight"] <= 2.01
    assert report["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    roles = report["calibration"]["roles"]
    assert roles["o"]["zero_share"] >= 0.5  # top-50% sparsification
    assert roles["down"]["zero_share"] > 0.5  # relu² GLU: mostly zeros
    assert 0.0 < report["calibration"]["active_parameter_share"] < 0.8


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


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
