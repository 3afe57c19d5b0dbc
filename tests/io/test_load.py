"""Loading an output (``io/load.py``): every checkpoint layout loads and agrees, an export reloads with bit-identical
logits, and a sharded export round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_same_predictions,
    convert,
    logits,
    write_packed,
)

import bitnet_convert
from bitnet_convert.io.checkpoint import Layout, open_checkpoint
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.runtime.modeling import build_model, quant_linears


@pytest.mark.parametrize("preset", ["a48", "a48-fp4", "b158"])
def test_load_gives_bit_identical_logits(tmp_path, reference_ids, preset):
    conversion = convert(tmp_path, preset)
    reloaded = bitnet_convert.load(conversion.output)
    assert torch.equal(logits(reloaded, reference_ids), logits(conversion.model, reference_ids))
    assert {n: m.spec for n, m in quant_linears(reloaded).items()} == {
        n: m.spec for n, m in quant_linears(conversion.model).items()
    }


def test_sharded_export_round_trips(tmp_path, reference_ids):
    whole = convert(tmp_path, "a48", "whole")
    sharded = convert(tmp_path, "a48", "sharded", export__max_shard_size=300_000)
    index = json.loads((sharded.output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (sharded.output / "model.safetensors").exists()
    assert all((sharded.output / s).stat().st_size <= 300_000 + 200_000 for s in shards)
    assert torch.equal(logits(bitnet_convert.load(sharded.output), reference_ids), logits(whole.model, reference_ids))




def test_all_three_layouts_load_and_agree(tmp_path, reference_dir, reference_ids):
    auto = write_packed(reference_dir, tmp_path / "auto", "autobitlinear")
    bitlinear = write_packed(reference_dir, tmp_path / "bitlinear", "bitlinear")
    checkpoints = [open_checkpoint(p) for p in (reference_dir, auto, bitlinear)]
    assert [c.layout for c in checkpoints] == [Layout.MASTER, Layout.PACKED_AUTOBITLINEAR, Layout.PACKED_BITLINEAR]
    master = checkpoints[0]
    for name in master.linear_names():
        codes, alpha = master.ternary(name)
        for other in checkpoints[1:]:
            other_codes, other_alpha = other.ternary(name)
            assert torch.equal(other_codes, codes)
            torch.testing.assert_close(other_alpha, alpha, rtol=1e-6, atol=0)
    outputs = [logits(build_model(c, PRESETS["a48"]), reference_ids) for c in checkpoints]
    assert torch.equal(outputs[0], outputs[1])
    # bitlinear stores 1/α: α comes back within an ulp, and the activation quantizers' RoundClip turns such
    # differences into a few whole quantization steps downstream — the models agree as predictors.
    assert_same_predictions(outputs[2], outputs[0], reference_ids)
