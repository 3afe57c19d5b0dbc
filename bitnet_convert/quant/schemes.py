"""Activation specs and the named schemes (b158, a48, a48-fp4, the SwiGLU down_proj variants).

A *role* groups the linears whose inputs have the same origin in a BitNet block; a scheme maps every role to
one :class:`ActivationSpec`. Which linear has which role is decided by the role table of
:mod:`bitnet_convert.io.families` and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bitnet_convert.io.families import Role
from bitnet_convert.quant import functional as F
from bitnet_convert.quant.methods import METHODS


class ActivationSpec(BaseModel):
    """How the input of a linear is quantized: optional top-K sparsification, then a per-token quantizer.

    ``method``: a name registered in :data:`~bitnet_convert.quant.methods.METHODS`: ``absmax`` (signed integers,
    b1.58 Eq. 4 at 8 bits), ``absmean`` (a4.8 Eq. 6–7 at 4 bits), ``fp4_e2m1`` (a4.8 §2.3, 4 bits only) or ``none``
    (full precision).
    ``topk``: share of channels kept per token before quantizing (a4.8 Eq. 1); ``null`` for no sparsification.
    ``threshold``: a static alternative to ``topk``: inputs with ``|x| < threshold`` become 0 (one number per
    linear, calibrated, no per-token sort).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal[tuple(METHODS)] = "absmax"  # type: ignore[valid-type]  # the registry's names
    bits: int = Field(8, ge=2, le=8, description="integer width, 2..8 (default: 4 for absmean and fp4_e2m1, else 8)")
    topk: float | None = Field(None, gt=0.0, le=1.0, description="share of |x| kept per token, in (0, 1]")
    threshold: float | None = Field(None, ge=0.0, description="zero the inputs with |x| below this (static top-K)")

    @model_validator(mode="before")
    @classmethod
    def _default_bits(cls, data: object) -> object:
        name = data.get("method") if isinstance(data, dict) and "bits" not in data else None
        method = METHODS.get(name) if isinstance(name, str) else None
        return {**data, "bits": method.default_bits} if method is not None else data

    @model_validator(mode="after")
    def _width_of_the_format(self) -> ActivationSpec:
        only = METHODS[self.method].only_bits
        if only is not None and self.bits != only:
            raise ValueError(f"method {self.method} is a {only}-bit format; got bits={self.bits}")
        if self.topk is not None and self.threshold is not None:
            raise ValueError("give topk or threshold, not both")
        return self

    def quantizer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fake-quant function this spec describes (sparsify first, then quantize)."""
        base = METHODS[self.method].fake
        bits, sparsify = self.bits, self.sparsify

        def quantize(x: torch.Tensor) -> torch.Tensor:
            return base(sparsify(x), bits)

        return quantize

    def quantize_sparsified(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token fake quantizer alone, for an ``x`` that :meth:`sparsify` has already sparsified
        (:meth:`quantizer` is this after :meth:`sparsify`): same shape and dtype as ``x``."""
        return METHODS[self.method].fake(x, self.bits)

    def integer_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-token integer codes and multiplier of the sparsified input: ``(codes, s)`` with ``x̂ = codes / s``,
        fp32 ``codes [..., d]`` (integer-valued) and fp32 ``s [..., 1]`` for float ``x [..., d]`` (the method's
        registered ``codes`` handler); ``None`` for a method without integer codes (``none``).

        An integer product ``codes · T`` of ternary ``T`` is exact in fp32 while its sums stay below 2^24, so
        ``(codes · T) / s`` does not depend on the order of summation: the reference and native backends compute
        the same numbers with it."""
        codes = METHODS[self.method].codes
        return None if codes is None else codes(self.sparsify(x).float(), self.bits)

    @property
    def input_bits(self) -> int:
        """The width of the quantized input (16 for a full-precision one), for mean-input-bit budgets."""
        return METHODS[self.method].input_bits or self.bits

    @property
    def sparsifies(self) -> bool:
        """Whether :meth:`sparsify` zeroes inputs (a top-K below 1, or a threshold)."""
        return (self.topk is not None and self.topk < 1.0) or self.threshold is not None

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        """The sparsification step alone: top-K per token (a4.8 Eq. 1) or the static threshold; ``x`` itself
        when the spec has neither. Shared by the reference quantizer and the native backend."""
        if self.topk is not None and self.topk < 1.0:
            return F.topk_sparsify(x, self.topk)
        if self.threshold is not None:
            return torch.where(x.abs() >= self.threshold, x, torch.zeros((), dtype=x.dtype))
        return x

    def describe(self) -> str:
        """Short human label, e.g. ``INT4 absmean`` or ``top-50% INT8 absmax``."""
        label = METHODS[self.method].label(self.bits)
        if self.threshold is not None:
            return f"|x| ≥ {self.threshold:.4g}, {label}"
        return f"top-{self.topk:.0%} {label}" if self.topk is not None and self.topk < 1.0 else label


_INT8 = ActivationSpec(method="absmax", bits=8)
_INT4 = ActivationSpec(method="absmean", bits=4)
_FP4 = ActivationSpec(method="fp4_e2m1", bits=4)

#: The named schemes. ``b158`` is W1.58A8 (the input model's own semantics); ``a48`` the paper's hybrid
#: (Table in §2); ``a48-fp4`` its FP4 variant — every input but down_proj's in FP4 E2M1, o_proj keeping its
#: top-50% sparsification (the paper is silent on o_proj there; this is our reading).
PRESETS: dict[str, dict[Role, ActivationSpec]] = {
    "b158": {"qkv": _INT8, "o": _INT8, "gate_up": _INT8, "down": _INT8},
    "a48": {
        "qkv": _INT4,
        "o": ActivationSpec(method="absmax", bits=8, topk=0.5),
        "gate_up": _INT4,
        "down": _INT8,
    },
    "a48-fp4": {
        "qkv": _FP4,
        "o": ActivationSpec(method="fp4_e2m1", bits=4, topk=0.5),
        "gate_up": _FP4,
        "down": _INT8,
    },
}

#: FFN activations whose GLU output (the down_proj input) is sparse by construction. The a4.8 paper's down_proj
#: treatment (INT8, no top-K) relies on relu² making that input mostly zeros (METHOD.md); a SwiGLU model's is dense.
SPARSE_GLU: tuple[str, ...] = ("relu2",)

#: down_proj input treatments for GLUs that are not relu² (SwiGLU), each also a preset ``a48-swiglu-<name>``
#: (a48 with that down_proj input); measured on the SwiGLU reference model in the README ("SwiGLU down_proj").
SWIGLU_DOWN: dict[str, ActivationSpec] = {
    "int8": _INT8,
    "topk": ActivationSpec(method="absmax", bits=8, topk=0.5),
    "int4": _INT4,
}
#: The measured best of :data:`SWIGLU_DOWN`: what ``a48`` and ``a48-fp4`` give a SwiGLU model's down_proj.
SWIGLU_DEFAULT = "int8"
PRESETS.update({f"a48-swiglu-{name}": {**PRESETS["a48"], "down": spec} for name, spec in SWIGLU_DOWN.items()})


def preset_roles(preset: str, hidden_act: str = "relu2") -> dict[Role, ActivationSpec]:
    """The activation spec of every role of ``preset`` for a model whose FFN activation is ``hidden_act``: the
    preset as written, except that ``a48`` and ``a48-fp4`` give a non-relu² (SwiGLU) model's down_proj the
    :data:`SWIGLU_DEFAULT` treatment. Raises ``KeyError`` for an unknown preset."""
    roles = dict(PRESETS[preset])
    if _takes_swiglu_default(preset, hidden_act):
        roles["down"] = SWIGLU_DOWN[SWIGLU_DEFAULT]
    return roles


def _takes_swiglu_default(preset: str, hidden_act: str) -> bool:
    """Whether ``preset`` gives a model with FFN activation ``hidden_act`` the :data:`SWIGLU_DEFAULT` down_proj."""
    return preset in ("a48", "a48-fp4") and hidden_act not in SPARSE_GLU


def swiglu_note(preset: str, hidden_act: str) -> str | None:
    """One line saying which down_proj treatment ``preset`` chose for a non-relu² model; ``None`` otherwise."""
    if not _takes_swiglu_default(preset, hidden_act):
        return None
    spec = SWIGLU_DOWN[SWIGLU_DEFAULT]
    return (f"{preset} on a {hidden_act} GLU (SwiGLU) model: down_proj input {spec.describe()} "
            f"(= a48-swiglu-{SWIGLU_DEFAULT}, the best measured; the paper's treatment assumes relu²'s sparse input)")
