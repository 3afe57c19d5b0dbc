"""Activation specs, the named presets and the input quantizers they build."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from bitnet_convert.io.families import ROLES
from bitnet_convert.quant import functional as F
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
        (ActivationSpec(method="absmax", bits=8, threshold=0.5),
         lambda x: F.int8_absmax(torch.where(x.abs() >= 0.5, x, torch.zeros(()))))
    ],
)
def test_quantizer_matches_functional(spec: ActivationSpec, reference) -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(spec.quantizer()(x), reference(x))
    # the training path's split of the same quantizer: sparsify once, then the quantizer alone
    assert torch.equal(spec.quantize_sparsified(spec.sparsify(x)), reference(x))


def test_quantizer_does_not_modify_input() -> None:
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    PRESETS["a48"]["o"].quantizer()(x)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------ QuantLinear





















