"""``QuantLinear`` (``quant/linear.py``): the forward equals the hand formula for every role and input quantizer,
its buffers stay ternary and packed, and ``from_ternary`` refuses what it cannot hold."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF

from bitnet_convert.io.families import ROLES
from bitnet_convert.quant import functional as F
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.packing import pack_ternary
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec

INT8 = ActivationSpec(method="absmax", bits=8)


INT4 = ActivationSpec(method="absmean", bits=4)


NONE = ActivationSpec(method="none")


CODES = torch.tensor([[1, 0, -1], [0, 1, 1], [-1, -1, 0], [1, 1, 1]], dtype=torch.int8)


def test_quant_linear_hand_computed_full_precision_input() -> None:
    layer = QuantLinear.from_ternary(CODES, torch.tensor(0.5), NONE)
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    # row 0: [1 − 3, 2 + 3, −1 − 2, 1 + 2 + 3] · 0.5 = [-1, 2.5, -1.5, 3]
    # row 1: [-1 − 0, 0.5 + 0, 1 − 0.5, -1 + 0.5 + 0] · 0.5 = [-0.5, 0.25, 0.25, -0.25]
    assert torch.equal(layer(x), torch.tensor([[-1.0, 2.5, -1.5, 3.0], [-0.5, 0.25, 0.25, -0.25]]))


def test_quant_linear_hand_computed_with_bias() -> None:
    layer = QuantLinear.from_ternary(CODES, torch.tensor([2.0]), NONE, bias=torch.tensor([0.5, -1.0, 0.0, 0.25]))
    x = torch.tensor([1.0, 2.0, 3.0])
    # [-2, 5, -3, 6] · 2 + bias = [-4 + 0.5, 10 − 1, -6, 12 + 0.25]
    assert torch.equal(layer(x), torch.tensor([-3.5, 9.0, -6.0, 12.25]))


@pytest.mark.parametrize("role", ROLES)
def test_quant_linear_forward_equals_hand_formula(role: str) -> None:
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-1, 2, (12, 20), generator=gen, dtype=torch.int8)
    alpha = torch.tensor([0.37])
    spec = PRESETS["a48"][role]
    layer = QuantLinear.from_ternary(codes, alpha, spec)
    x = torch.randn(2, 5, 20, generator=gen)
    xq = spec.quantizer()(x)
    # inference sums the integer codes exactly, then scales once: ((codes · Tᵀ) / s) · α
    integer, s = spec.integer_codes(x)
    assert torch.equal(integer / s, xq)
    expected = tF.linear(integer, codes.float()) / s * alpha
    assert torch.equal(layer(x), expected)
    # and the same by explicit sums, y[..., o] = α · Σ_i xq[..., i] · T[o, i]
    by_hand = (xq.unsqueeze(-2) * codes.float()).sum(dim=-1) * 0.37
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-5)


def test_quant_linear_int4_input_hand_computed() -> None:
    layer = QuantLinear.from_ternary(CODES, torch.tensor(1.0), INT4)
    x = torch.tensor([1.0, -1.0, 1.0])
    # INT4 absmean: β = 1, s = √7 → x·s = ±2.65 → ±3 → x̂ = [3, -3, 3]/√7
    # T·x̂ = [3 − 3, -3 + 3, -3 + 3, 3 − 3 + 3] / √7 = [0, 0, 0, 3/√7]
    torch.testing.assert_close(layer(x), torch.tensor([0.0, 0.0, 0.0, 3 / math.sqrt(7)]), rtol=1e-6, atol=1e-7)


def test_quant_linear_buffers_and_ternary() -> None:
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(-1, 2, (8, 6), generator=gen, dtype=torch.int8)
    layer = QuantLinear.from_ternary(codes.to(torch.int64), torch.tensor(0.25, dtype=torch.float64), INT8)
    assert (layer.in_features, layer.out_features) == (6, 8)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (2, 6)
    assert torch.equal(layer.weight, pack_ternary(codes))
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.tolist() == [0.25]
    assert layer.bias is None
    assert set(layer.state_dict()) == {"weight", "weight_scale"}
    t = layer.ternary()
    assert t.dtype == torch.int8
    assert torch.equal(t, codes)
    assert "in_features=6, out_features=8, input=INT8 absmax" in repr(layer)


def test_quant_linear_bf16_input_gives_bf16_output() -> None:
    layer = QuantLinear.from_ternary(CODES, torch.tensor(0.5), INT8)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    integer, s = INT8.integer_codes(x)
    expected = tF.linear(integer.bfloat16(), CODES.to(torch.bfloat16)) / s.bfloat16() * torch.tensor(0.5).bfloat16()
    assert torch.equal(y, expected)
    torch.testing.assert_close(y.float(), tF.linear(F.int8_absmax(x.float()), CODES.float()) * 0.5, rtol=1e-2,
                               atol=1e-2)


def test_quant_linear_sees_new_weights() -> None:
    layer = QuantLinear.from_ternary(CODES, torch.tensor(1.0), NONE)
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(layer(x), torch.tensor([-2.0, 5.0, -3.0, 6.0]))
    layer.weight = pack_ternary(-CODES)  # replaced buffer
    assert torch.equal(layer(x), torch.tensor([2.0, -5.0, 3.0, -6.0]))
    layer.weight.copy_(pack_ternary(torch.zeros_like(CODES)))  # modified in place
    assert torch.equal(layer(x), torch.zeros(4))


def test_from_ternary_does_not_alias_its_arguments() -> None:
    alpha = torch.tensor([0.5])
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0])
    layer = QuantLinear.from_ternary(CODES, alpha, NONE, bias=bias)
    alpha += 1
    bias += 1
    assert layer.weight_scale.tolist() == [0.5]
    assert layer.bias.tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("out", [1, 2, 3, 6, 10])
def test_from_ternary_rejects_out_features_not_divisible_by_4(out: int) -> None:
    with pytest.raises(ValueError, match=f"out_features={out}\\b"):
        QuantLinear.from_ternary(torch.zeros(out, 3, dtype=torch.int8), torch.tensor(1.0), INT8)
    with pytest.raises(ValueError, match=f"out_features={out}\\b"):
        QuantLinear(3, out, INT8)


def test_from_ternary_rejects_non_ternary_codes() -> None:
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        QuantLinear.from_ternary(torch.full((4, 3), 2, dtype=torch.int8), torch.tensor(1.0), INT8)
