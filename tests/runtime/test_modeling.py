"""The model builder (``runtime/modeling.py``): the b1.58 model built from a checkpoint computes what stock
transformers' BitNet computes (whole model and each linear), and the a4.8 scheme changes it."""

from __future__ import annotations

import torch
from helpers import (
    assert_linears_match,
    assert_same_predictions,
    logits,
)
from transformers import AutoModelForCausalLM

from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.runtime.modeling import build_model


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


def test_a48_changes_the_model_and_b158_does_not(reference_dir, reference_ids):
    checkpoint = open_checkpoint(reference_dir)
    base = logits(build_model(checkpoint, PRESETS["b158"]), reference_ids)
    a48 = logits(build_model(checkpoint, PRESETS["a48"]), reference_ids)
    assert (a48 - base).abs().max().item() > 1e-2
