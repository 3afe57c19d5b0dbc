"""The quantized linear: a packed ternary weight, its scale, and the quantizer of its input.

``y = (Q_act(x) · Tᵀ) · α`` with ``T`` ∈ {−1, 0, 1} stored 2-bit packed (transformers' layout) and ``α`` the
absmean scale — the arithmetic of transformers' offline ``AutoBitLinear``, so a ``b158`` module and stock
transformers give the same numbers up to fp32 rounding. Inference computes it as ``((codes · Tᵀ) / s) · α`` with
the integer codes and multiplier ``s`` of the input (``x̂ = codes / s``): the integer product is exact in fp32, so
the result does not depend on the order of summation and the native kernels reproduce it bit for bit.
State-dict names match that layout: ``weight`` (uint8) and ``weight_scale`` (fp32). ``weight_scale`` multiplies
(``α``, transformers' ``AutoBitLinear``) unless ``scale_divides`` is set: a linear read from a ``bitlinear``-layout
checkpoint keeps the stored ``1/α`` and computes ``(codes · Tᵀ) / (s · weight_scale)``, the exact arithmetic of
transformers' ``BitLinear`` (``y / (input_scale · weight_scale)``), so b158 on such a checkpoint gives stock
transformers' logits bit for bit. A checkpoint
with ``quantization_config.use_rms_norm`` puts an RMSNorm on the input before the quantizer (``rms_norm.weight``),
as transformers' BitNet linears do.

A new module is in eval mode. In training mode (``module.train()``, used by the distillation fine-tune) the
forward is quantization-aware: straight-through estimators through the input quantizer (top-K included) and,
when a float ``latent`` weight is set, through its absmean ternarization; ``ste_lambda`` < 1 blends
quantization in during a warm-up. The top-K (or threshold) sparsification of an input passes its gradient to the
kept entries only (``topk_gradient = "kept"``, the sparsification's own gradient; the rounding after it stays
straight-through) or, with ``"all"``, to every entry (plain straight-through, as Q-Sparse, arXiv 2407.10969).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as tF
from torch import nn

from bitnet_convert.quant import functional as F
from bitnet_convert.quant.packing import VALUES_PER_BYTE, pack_ternary, unpack_ternary
from bitnet_convert.quant.schemes import ActivationSpec

TopKGradient = Literal["kept", "all"]


class QuantLinear(nn.Module):
    """Ternary-weight linear with a quantized input (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, spec: ActivationSpec, bias: bool = False) -> None:
        super().__init__()
        if out_features % VALUES_PER_BYTE:
            raise ValueError(f"out_features={out_features} is not divisible by {VALUES_PER_BYTE}")
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self._quantize_input = spec.quantizer()
        self.register_buffer("weight", torch.zeros(out_features // VALUES_PER_BYTE, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._dense: tuple[tuple, torch.Tensor] | None = None
        #: float master weight trained with a straight-through ternarization (plain attribute, not saved)
        self.latent: torch.Tensor | None = None
        #: λ of the straight-through blend ``x + λ·(q(x) − x)`` in training mode
        self.ste_lambda = 1.0
        #: where the gradient of a sparsified input goes in training: "kept" entries only, or "all" of them
        self.topk_gradient: TopKGradient = "kept"
        #: optional RMSNorm on the input (``use_rms_norm``), applied before the quantizer
        self.rms_norm: nn.Module | None = None
        #: ``weight_scale`` is ``1/α`` and divides (transformers' ``BitLinear``), not ``α`` that multiplies
        self.scale_divides = False
        self.train(False)  # an inference module until a fine-tune asks for the training forward

    @classmethod
    def from_ternary(
        cls, codes: torch.Tensor, alpha: torch.Tensor, spec: ActivationSpec, bias: torch.Tensor | None = None,
        divides: bool = False,
    ) -> QuantLinear:
        """Build from int ternary codes ``[out, in]`` and the scale ``α`` (1 element), or with ``divides`` the
        stored ``1/α`` of the ``bitlinear`` convention (kept as is; see the module docstring)."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, spec, bias=bias is not None)
        module.set_ternary(codes, alpha)
        module.scale_divides = divides
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def set_input_norm(self, weight: torch.Tensor, eps: float) -> None:
        """Put an RMSNorm (``weight [in_features]``, ``eps``) on the input, before the quantizer: transformers'
        ``BitNetQuantConfig.use_rms_norm`` (``LlamaRMSNorm`` in ``BitLinear``/``AutoBitLinear``)."""
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = LlamaRMSNorm(self.in_features, eps=eps)
        norm.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.rms_norm = norm.train(self.training)

    def quantizer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the input quantizer sees of the module input ``x``: ``x`` after the optional input RMSNorm."""
        return x if self.rms_norm is None else self.rms_norm(x)

    def ternary(self) -> torch.Tensor:
        """The unpacked ternary codes as int8 ``[out, in]``."""
        return unpack_ternary(self.weight)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Unpacked ternary weight in ``dtype`` (cached until the packed buffer changes)."""
        key = (dtype, self.weight.device, id(self.weight), self.weight._version)
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, unpack_ternary(self.weight, dtype))
        return self._dense[1]

    def release_dense(self) -> None:
        """Drop the cached unpacked weight (4 bytes per weight in fp32, 16× the packed buffer), e.g. after a
        block-by-block pass that will not run this linear again soon."""
        self._dense = None

    def set_ternary(self, codes: torch.Tensor, alpha: torch.Tensor) -> None:
        """Replace the packed weight and its scale ``α`` (which multiplies from now on)."""
        self.weight = pack_ternary(codes).to(self.weight.device)
        self.weight_scale = alpha.detach().to(torch.float32).reshape(1).clone()
        self.scale_divides = False

    def alpha(self) -> torch.Tensor:
        """The weight scale ``α`` (fp32, 1 element) whatever the convention: ``1 / weight_scale`` when it divides."""
        return 1.0 / self.weight_scale if self.scale_divides else self.weight_scale

    def set_scale_convention(self, divides: bool) -> None:
        """Store the scale as ``1/α`` that divides (``True``, transformers' ``BitLinear``) or as ``α`` that
        multiplies; the value becomes the fp32 reciprocal of the other form (a change of the output by about an
        ulp), so a checkpoint written in either layout reloads to exactly this module."""
        if divides != self.scale_divides:
            self.weight_scale = 1.0 / self.weight_scale
            self.scale_divides = divides

    def _scaled(self, y: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """``y`` (integer sums over codes, or a float product) times ``α``, divided by the input multiplier ``s``."""
        w = self.weight_scale.to(y.dtype)
        if s is None:
            return y / w if self.scale_divides else y * w
        s = s.to(y.dtype)
        return y / (s * w) if self.scale_divides else y / s * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantizer_input(x)
        if self.training:
            return self._forward_train(x)
        quantized = self.spec.integer_codes(x)
        if quantized is None:  # full-precision input
            y = self._scaled(tF.linear(x, self.dense_weight(x.dtype)))
        else:  # integer codes times ternary weights: exact in fp32 (sums < 2^24), then one scaling per output
            codes, s = quantized
            y = self._scaled(tF.linear(codes.to(x.dtype), self.dense_weight(x.dtype)), s)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def _train_input(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized input of a training forward: ``x + λ·(q(x) − x)`` in value; its gradient is the identity
        (``topk_gradient = "all"``) or, for a sparsified input, ``(1 − λ) + λ·mask`` (``"kept"``: the top-K's
        own gradient, zero for the dropped entries, times the straight-through rounding)."""
        lam = self.ste_lambda
        if self.topk_gradient == "all" or not self.spec.sparsifies:
            return F.ste(x, self._quantize_input(x), lam)
        sparse = self.spec.sparsify(x)  # its gradient is the sparsification's mask (one top-K per forward)
        kept = F.ste(sparse, self.spec.quantize_sparsified(sparse.detach()))  # value: the quantized input
        return kept if lam == 1.0 else (1.0 - lam) * x + lam * kept

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.ste_lambda
        xq = self._train_input(x)
        if self.latent is None:  # frozen weight: the cached dense codes, no weight-sized temporary kept for backward
            y = self._scaled(tF.linear(xq, self.dense_weight(x.dtype)))
        else:
            self._dense = None  # the packed weight is not used while a latent trains
            y = tF.linear(xq, F.ste(self.latent, F.ternary_absmean_fake(self.latent), lam).to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input={self.spec.describe()}"


class Int8Head(nn.Module):
    """The INT8 lm_head on the reference backend (``lm_head="int8"``): the weight as int8 codes with one absmax
    scale per row (:func:`~bitnet_convert.quant.functional.int8_rows`), computed in torch as the native backend's
    INT8 kernel computes it (:func:`~bitnet_convert.quant.functional.int8_lm_head`), so that both backends give the
    same numbers. Input ``[..., K]``, output ``[..., N]`` in the input's dtype (computed in fp32). Inference only."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = F.int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        return F.int8_lm_head(flat, self.weight, self.scale).reshape(*x.shape[:-1], -1).to(x.dtype)
