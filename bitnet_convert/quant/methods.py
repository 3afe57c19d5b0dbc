"""The activation quantizers, one registry entry each (a config plus its handlers, as torchao registers its
quantization configs): everything the rest of the package knows about a method is read from :data:`METHODS`.

An entry gives the method's fake quantizer (what the reference backend and training compute), its per-token
integer codes (what the exact inference path and the native kernels multiply with the ternary weight), its label,
its default and allowed widths, and its native path (how the kernels receive its codes). Adding a method is one
:func:`register` call here plus its tests; :class:`~bitnet_convert.quant.schemes.ActivationSpec` accepts its name,
and the schemes, the native backend and the calibration report use it without further edits (``docs/extending.md``).

References: BitNet b1.58 (arXiv 2402.17764) Eq. 4, BitNet a4.8 (arXiv 2411.04965) Eq. 6–7 and §2.3 (LLM-FP4's
MinMax E2M1, arXiv 2310.16836).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bitnet_convert.quant import functional as F

#: ``(codes, s)``: fp32 integer-valued codes ``[..., d]`` and fp32 multiplier ``[..., 1]``, ``x̂ = codes / s``.
Codes = tuple[torch.Tensor, torch.Tensor]
#: ``(codes int8 [T, Kp], s fp32 [T], sums int32 [T])`` as the native kernels take them.
NativeCodes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One activation quantization method and its handlers.

    ``fake(x, bits)``: the fake-quantized input (same shape and dtype as ``x``). ``codes(xf, bits)``: the per-token
    integer codes of an fp32 input (:data:`Codes`), ``None`` for a method without them (full precision).
    ``native(ops, x, bits, isa)``: the codes as the kernels want them (:data:`NativeCodes`) from fp32 ``x [T, K]``
    and the ``torch.ops.bitnet_convert`` namespace; ``None`` where the method stays on the reference path.
    ``label(bits)``: the short human label. ``default_bits``: the width when a recipe gives none; ``only_bits``: the
    one width the format has (``None``: any of 2..8). ``input_bits``: the width counted for the mean input bits of
    the auto precision choice (``None``: the spec's ``bits``). ``signed_int_codes``: the codes are integers in
    ``[−2^(bits−1), 2^(bits−1) − 1]`` (the native backend's table-lookup GEMM takes such codes at 4 bits or fewer).
    """

    name: str
    fake: Callable[[torch.Tensor, int], torch.Tensor]
    label: Callable[[int], str]
    codes: Callable[[torch.Tensor, int], Codes] | None = None
    native: Callable[[Any, torch.Tensor, int, int], NativeCodes] | None = None
    default_bits: int = 8
    only_bits: int | None = None
    input_bits: int | None = None
    signed_int_codes: bool = False


#: The registered methods by name, in the order recipes and messages list them.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS`. Raises ``ValueError`` when the name is taken."""
    if method.name in METHODS:
        raise ValueError(f"activation method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The method called ``name``. Raises ``ValueError`` listing the registered ones for an unknown name."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown activation method {name!r}; expected one of {', '.join(METHODS)}") from None


# ----------------------------------------------------------------------------------------------- handlers


def _signed_codes(scale: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[torch.Tensor, int], Codes]:
    """Codes ``RoundClip(x · s, −2^(bits−1), 2^(bits−1) − 1)`` with the per-token multiplier ``scale(xf, bits)``:
    those of :func:`~bitnet_convert.quant.functional.absmax_int` / :func:`~bitnet_convert.quant.functional.absmean_int`.
    """

    def codes(xf: torch.Tensor, bits: int) -> Codes:
        qp = 2 ** (bits - 1) - 1
        s = scale(xf, bits)
        return F.round_clip(xf * s, -qp - 1, qp), s

    return codes


def _fp4_codes(xf: torch.Tensor, bits: int) -> Codes:
    """The E2M1 value of :func:`~bitnet_convert.quant.functional.fp4_e2m1_minmax` in units of ``max|x| / 12`` (the
    E2M1 grid ×2: integers in [−12, 12]), ``s = 12 / max|x|``."""
    s = F.fp4_unit_scale(xf)
    return F.round_clip(F.fp4_e2m1_minmax(xf) * s, -F.FP4_UNITS, F.FP4_UNITS), s


def _absmax_native(ops: Any, x: torch.Tensor, bits: int, isa: int) -> NativeCodes:
    """Wholly in the kernel: a maximum is exact in any order, and the kernel repeats torch's fp32 operations."""
    return ops.quantize_absmax(x.contiguous(), bits, isa)


def _absmean_native(ops: Any, x: torch.Tensor, bits: int, isa: int) -> NativeCodes:
    """``s`` from the same torch function as the reference (a mean the kernel could not sum bit for bit), rounding
    in the kernel."""
    qp = 2 ** (bits - 1) - 1
    s = F.absmean_scale(x, bits).reshape(-1).contiguous()
    codes, sums = ops.quantize_scaled(x.contiguous(), s, -qp - 1, qp, isa)
    return codes, s, sums


def _fp4_native(ops: Any, x: torch.Tensor, bits: int, isa: int) -> NativeCodes:
    """The E2M1 values and ``s`` from the reference functions, the integer rounding in the kernel."""
    s = F.fp4_unit_scale(x).reshape(-1).contiguous()
    codes, sums = ops.quantize_scaled(F.fp4_e2m1_minmax(x).contiguous(), s, -F.FP4_UNITS, F.FP4_UNITS, isa)
    return codes, s, sums


ABSMAX = register(Method("absmax", fake=F.absmax_int, label=lambda bits: f"INT{bits} absmax",
                         codes=_signed_codes(F.absmax_scale), native=_absmax_native, signed_int_codes=True))
ABSMEAN = register(Method("absmean", fake=F.absmean_int, label=lambda bits: f"INT{bits} absmean",
                          codes=_signed_codes(F.absmean_scale), native=_absmean_native, default_bits=4,
                          signed_int_codes=True))
FP4_E2M1 = register(Method("fp4_e2m1", fake=lambda x, bits: F.fp4_e2m1_minmax(x), label=lambda bits: "FP4 E2M1",
                           codes=_fp4_codes, native=_fp4_native, default_bits=4, only_bits=4))
NONE = register(Method("none", fake=lambda x, bits: x, label=lambda bits: "full precision", input_bits=16))
