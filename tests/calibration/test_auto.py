"""Automatic precision (``calibration/auto.py``): the most sensitive 4-bit linears promoted within the budget, the
static o_proj threshold, the choice exported and restored, and clear errors for bad settings."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    REPO,
)

import bitnet_convert
from bitnet_convert.calibration.auto import choose_precision
from bitnet_convert.calibration.statistics import (
    hooked_calibration,
)
from bitnet_convert.errors import CheckpointError, RecipeError
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec
from bitnet_convert.recipe import load_recipe
from bitnet_convert.runtime.modeling import build_model, quant_linears


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
