"""QwT closed-form compensation: the fit, the keep/drop test, the forms, export and reload."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO

import bitnet_convert
from bitnet_convert.errors import RecipeError
from bitnet_convert.recipe import load_recipe
from bitnet_convert.recover.qwt import fit_block


def _batches(n: int, d: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 32, d, generator=generator) for _ in range(n)]


def test_closed_form_recovers_a_known_linear_distortion():
    d = 12
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(d, d, generator=generator) * 0.3, torch.randn(d, generator=generator)
    inputs, outputs = _batches(4, d, 1), _batches(4, d, 2)
    targets = [x @ weight + bias for x in inputs]
    comp, record = fit_block("full", inputs, outputs, targets, ridge=0.0, holdout=0.25)
    assert record["kept"] and record["heldout_error_after"] < 1e-8 * record["heldout_error_before"]
    assert torch.allclose(comp.weight, weight, atol=1e-4) and torch.allclose(comp.bias, bias, atol=1e-4)
    # channel form: the target is a per-channel affine map of the block's own output
    scale = torch.randn(d, generator=generator)
    comp, record = fit_block("channel", inputs, outputs, [o * scale + bias for o in outputs], 0.0, 0.25)
    assert torch.allclose(comp.scale, scale, atol=1e-5) and record["heldout_error_after"] < 1e-8


def test_a_compensation_that_does_not_help_is_dropped():
    d = 8
    inputs, outputs, noise = _batches(4, d, 3), _batches(4, d, 4), _batches(4, d, 5)
    comp, record = fit_block("full", inputs, outputs, noise, ridge=0.0, holdout=0.5)
    assert comp is None and not record["kept"]
    assert record["heldout_error_after"] >= record["heldout_error_before"]


def test_lowrank_at_full_rank_equals_full():
    d = 10
    generator = torch.Generator().manual_seed(6)
    inputs, outputs = _batches(4, d, 7), _batches(4, d, 8)
    weight, bias = torch.randn(d, d, generator=generator), torch.randn(d, generator=generator)
    noise = _batches(4, d, 9)
    targets = [x @ weight + bias + 0.1 * e for x, e in zip(inputs, noise, strict=True)]
    full, _ = fit_block("full", inputs, outputs, targets, 1e-3, 0.25)
    low, _ = fit_block("lowrank", inputs, outputs, targets, 1e-3, 0.25, rank=d)
    x, out = inputs[0], outputs[0]
    assert torch.allclose(full(x, out), low(x, out), atol=1e-5)
    with pytest.raises(ValueError, match="rank 11 is larger than the hidden size 10"):
        fit_block("lowrank", inputs, outputs, targets, 1e-3, 0.25, rank=11)


def test_compensation_is_exported_and_restored_exactly(tmp_path, reference_ids):
    conversion = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "qwt"),
                                         recovery__qwt={"form": "lowrank", "rank": 16},
                                         calibration__samples=4, calibration__batch_size=2)
    qwt = conversion.report["qwt"]
    assert qwt["layers"] and qwt["added_parameters"] == len(qwt["layers"]) * (2 * 192 * 16 + 192)
    config = json.loads((conversion.output / "config.json").read_text())
    assert config["bitnet_convert"]["qwt"] == {"form": "lowrank", "rank": 16, "layers": qwt["layers"]}
    loaded = bitnet_convert.load(conversion.output)
    for index in qwt["layers"]:
        assert torch.equal(loaded.model.layers[index].qwt.down, conversion.model.model.layers[index].qwt.down)
    with torch.no_grad():
        assert torch.equal(loaded(reference_ids[:2]).logits, conversion.model(reference_ids[:2]).logits)
        plain = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "plain"),
                                        calibration__samples=0).model
        assert not torch.equal(plain(reference_ids[:2]).logits, conversion.model(reference_ids[:2]).logits)


def test_bad_qwt_settings_are_clear_errors(tmp_path):
    recipe = REPO / "recipes/a48.yaml"
    with pytest.raises(RecipeError, match=r"recovery\.qwt\.rank 999 is larger than the hidden size 192"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "a"), recovery__qwt={"form": "lowrank", "rank": 999},
                                calibration__samples=2, calibration__batch_size=1)
    with pytest.raises(RecipeError, match=r"recovery.qwt.ridge: Input should be greater than or equal to 0"):
        load_recipe(recipe, {"recovery.qwt.ridge": -1})
    with pytest.raises(RecipeError, match=r"recovery\.qwt: fitted on calibration data"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "b"), recovery__qwt={}, calibration__samples=0)
    with pytest.raises(RecipeError, match=r"recovery\.qwt: fits on some calibration batches .* needs at least 2"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "c"), recovery__qwt={}, calibration__samples=2)
    assert not any(tmp_path.iterdir())
