"""Activation specs, the role table, the named presets and the quantized linear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF
from pydantic import ValidationError

from bitnet_convert.io.families import DECODER_LINEARS, FAMILIES, ROLES, role_of
from bitnet_convert.quant import functional as F
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.packing import pack_ternary
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec

INT8 = ActivationSpec(method="absmax", bits=8)
INT4 = ActivationSpec(method="absmean", bits=4)
FP4 = ActivationSpec(method="fp4_e2m1", bits=4)
NONE = ActivationSpec(method="none")

# ------------------------------------------------------------------------------------ ActivationSpec


def test_defaults_are_int8_absmax_dense() -> None:
    spec = ActivationSpec()
    assert (spec.method, spec.bits, spec.topk) == ("absmax", 8, None)
    assert spec == INT8


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 16])
def test_bits_out_of_range_rejected(bits: int) -> None:
    with pytest.raises(ValidationError, match="bits"):
        ActivationSpec(method="absmax", bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits_in_range_accepted(bits: int) -> None:
    assert ActivationSpec(method="absmax", bits=bits).bits == bits


@pytest.mark.parametrize("topk", [0, 0.0, -0.5, 1.5, 1.0001])
def test_topk_out_of_range_rejected(topk: float) -> None:
    with pytest.raises(ValidationError, match="topk"):
        ActivationSpec(method="absmax", bits=8, topk=topk)


@pytest.mark.parametrize("topk", [0.01, 0.5, 1.0])
def test_topk_in_range_accepted(topk: float) -> None:
    assert ActivationSpec(topk=topk).topk == topk


@pytest.mark.parametrize("bits", [8, 3, 2])
def test_fp4_needs_four_bits(bits: int) -> None:
    with pytest.raises(ValidationError, match=f"fp4_e2m1.*bits={bits}"):
        ActivationSpec(method="fp4_e2m1", bits=bits)


@pytest.mark.parametrize(("method", "bits"), [("absmax", 8), ("absmean", 4), ("fp4_e2m1", 4), ("none", 8)])
def test_default_bits_follow_the_method(method: str, bits: int) -> None:
    assert ActivationSpec(method=method).bits == bits


@pytest.mark.parametrize("extra", [{"granularity": "token"}, {"bit": 4}, {"top_k": 0.5}])
def test_extra_keys_rejected(extra: dict) -> None:
    with pytest.raises(ValidationError, match=next(iter(extra))):
        ActivationSpec(method="absmean", bits=4, **extra)


def test_unknown_method_rejected() -> None:
    with pytest.raises(ValidationError, match="method"):
        ActivationSpec(method="absmin", bits=4)


def test_spec_is_frozen_and_hashable() -> None:
    spec = ActivationSpec(method="absmean", bits=4)
    with pytest.raises(ValidationError):
        spec.bits = 3
    assert hash(spec) == hash(ActivationSpec(method="absmean", bits=4))
    assert ActivationSpec.model_validate({"method": "absmean", "bits": 4}) == spec


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        (INT8, "INT8 absmax"),
        (INT4, "INT4 absmean"),
        (FP4, "FP4 E2M1"),
        (NONE, "full precision"),
        (ActivationSpec(method="absmax", bits=8, topk=0.5), "top-50% INT8 absmax"),
        (ActivationSpec(method="absmax", bits=8, topk=1.0), "INT8 absmax"),
    ],
)
def test_describe(spec: ActivationSpec, label: str) -> None:
    assert spec.describe() == label


# --------------------------------------------------------------------------------------------- presets


def test_presets_exist_and_cover_every_role() -> None:
    assert {"b158", "a48", "a48-fp4"} <= set(PRESETS)
    assert ROLES == ("qkv", "o", "gate_up", "down")
    for name in ("b158", "a48", "a48-fp4"):
        assert set(PRESETS[name]) == set(ROLES), name


def test_preset_b158_is_int8_everywhere() -> None:
    assert PRESETS["b158"] == {role: ActivationSpec(method="absmax", bits=8, topk=None) for role in ROLES}


def test_preset_a48_is_the_papers_hybrid() -> None:
    # a4.8 §2: QKV and gate/up INT4 absmean; o_proj top-50% then INT8 absmax; down_proj INT8 absmax (no top-K)
    assert PRESETS["a48"] == {
        "qkv": ActivationSpec(method="absmean", bits=4, topk=None),
        "o": ActivationSpec(method="absmax", bits=8, topk=0.5),
        "gate_up": ActivationSpec(method="absmean", bits=4, topk=None),
        "down": ActivationSpec(method="absmax", bits=8, topk=None),
    }


def test_preset_a48_fp4() -> None:
    # a4.8 §2.3: every input but down_proj's in FP4 E2M1; down stays INT8; o keeps top-50% (our reading)
    assert PRESETS["a48-fp4"] == {
        "qkv": ActivationSpec(method="fp4_e2m1", bits=4, topk=None),
        "o": ActivationSpec(method="fp4_e2m1", bits=4, topk=0.5),
        "gate_up": ActivationSpec(method="fp4_e2m1", bits=4, topk=None),
        "down": ActivationSpec(method="absmax", bits=8, topk=None),
    }


# ------------------------------------------------------------------------------------------- role_of


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.layers.0.self_attn.q_proj", "qkv"),
        ("model.layers.0.self_attn.k_proj", "qkv"),
        ("model.layers.0.self_attn.v_proj", "qkv"),
        ("model.layers.29.self_attn.o_proj", "o"),
        ("model.layers.3.mlp.gate_proj", "gate_up"),
        ("model.layers.3.mlp.up_proj", "gate_up"),
        ("model.layers.3.mlp.down_proj", "down"),
        ("q_proj", "qkv"),
        ("down_proj", "down"),
        ("lm_head", None),
        ("model.embed_tokens", None),
        ("embed_tokens", None),
        ("model.norm", None),
        ("model.layers.0.input_layernorm", None),
        ("model.layers.0.self_attn.attn_sub_norm", None),
        ("model.layers.0.mlp.ffn_sub_norm", None),
        ("model.layers.0.mlp", None),
        ("model.layers.0.self_attn.q_proj.weight", None),
        ("model.layers.0.self_attn.q_proj_extra", None),
        ("", None),
    ],
)
def test_role_of(name: str, role: str | None) -> None:
    assert role_of(name) == role


def test_role_table_is_exactly_the_seven_linears() -> None:
    for family in FAMILIES:
        assert family.linears == DECODER_LINEARS, family.name
    assert [entry.path for entry in DECODER_LINEARS] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert {entry.name: entry.table2 for entry in DECODER_LINEARS} == {
        "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
        "down_proj": "down"}
    assert [entry.name for entry in DECODER_LINEARS if entry.glu_gate] == ["up_proj"]
    assert {entry.name: entry.role for entry in DECODER_LINEARS} == {
        "q_proj": "qkv",
        "k_proj": "qkv",
        "v_proj": "qkv",
        "o_proj": "o",
        "gate_proj": "gate_up",
        "up_proj": "gate_up",
        "down_proj": "down",
    }


# ------------------------------------------------------------------------------------- spec.quantizer


def test_a48_o_proj_quantizer_sparsifies_half_then_int8() -> None:
    q = PRESETS["a48"]["o"].quantizer()
    x = torch.tensor(
        [
            [1.0, -127.0, 3.0, 40.5, -2.0, 20.25, 0.5, -10.5],
            [0.25, 0.5, -0.75, 1.0, 0.0, 0.125, -0.375, 0.0625],
        ]
    )
    # token 0: top-4 of |x| = 127, 40.5, 20.25, 10.5 → [0, -127, 0, 40.5, 0, 20.25, 0, -10.5]
    #   INT8 absmax of that: γ = 127, s = 1 → round half to even [0, -127, 0, 40, 0, 20, 0, -10]
    # token 1: top-4 of |x| = 1, 0.75, 0.5, 0.375 → [0, 0.5, -0.75, 1, 0, 0, -0.375, 0]
    #   γ = 1, s = 127 → x·s = [0, 63.5, -95.25, 127, 0, 0, -47.625, 0] → [0, 64, -95, 127, 0, 0, -48, 0] / 127
    out = q(x)
    assert torch.equal(out[0], torch.tensor([0.0, -127.0, 0.0, 40.0, 0.0, 20.0, 0.0, -10.0]))
    assert torch.equal(out[1], torch.tensor([0.0, 64.0, -95.0, 127.0, 0.0, 0.0, -48.0, 0.0]) / 127.0)
    assert torch.equal((out == 0).sum(dim=-1), torch.tensor([4, 4]))


def test_a48_o_proj_quantizer_on_random_tokens() -> None:
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    out = PRESETS["a48"]["o"].quantizer()(x)
    assert torch.equal((out == 0).sum(dim=-1), torch.full((6,), 32))  # exactly half of each token zeroed
    assert torch.equal(out, F.int8_absmax(F.topk_sparsify(x, 0.5)))


@pytest.mark.parametrize(
    ("spec", "reference"),
    [
        (INT8, F.int8_absmax),
        (INT4, F.int4_absmean),
        (FP4, F.fp4_e2m1_minmax),
        (NONE, lambda x: x),
        (ActivationSpec(method="absmax", bits=4), lambda x: F.absmax_int(x, 4)),
        (ActivationSpec(method="absmean", bits=3), lambda x: F.absmean_int(x, 3)),
        (ActivationSpec(method="absmax", bits=8, topk=1.0), F.int8_absmax),  # topk 1.0 = no sparsification
        (ActivationSpec(method="absmean", bits=4, topk=0.25), lambda x: F.int4_absmean(F.topk_sparsify(x, 0.25))),
        (ActivationSpec(method="fp4_e2m1", bits=4, topk=0.5), lambda x: F.fp4_e2m1_minmax(F.topk_sparsify(x, 0.5))),
        (ActivationSpec(method="none", topk=0.5), lambda x: F.topk_sparsify(x, 0.5)),
    ],
)
def test_quantizer_matches_functional(spec: ActivationSpec, reference) -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(spec.quantizer()(x), reference(x))


def test_quantizer_does_not_modify_input() -> None:
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    PRESETS["a48"]["o"].quantizer()(x)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------ QuantLinear

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
