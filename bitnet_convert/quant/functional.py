"""Pure quantizers on tensors, one equation each.

Every function takes a float tensor and returns a tensor of the same shape and dtype holding the
*fake-quantized* values (the dequantized result of quantizing), unless it says otherwise. Scales are
computed along the last dimension ("per token") unless the function is per tensor.

The ``*_ste`` variants apply the straight-through estimator ``x + (q(x) - x).detach()`` so gradients pass
through the rounding unchanged; ``ste(x, q, lam)`` blends quantization in with a weight ``lam`` for warm-ups.

References: BitNet b1.58 (arXiv 2402.17764), BitNet a4.8 (arXiv 2411.04965), LLM-FP4 (arXiv 2310.16836).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: Lower bound on every scale statistic; the value transformers' BitNet integration uses.
EPS = 1e-5


def round_clip(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``RoundClip(x, a, b) = min(max(round(x), a), b)`` (round half to even, as torch.round)."""
    return x.round().clamp(lo, hi)


def ste(x: torch.Tensor, q: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Straight-through estimator: forward ``x + lam·(q − x)``, backward the identity."""
    if lam == 1.0:
        return x + (q - x).detach()
    return x + lam * (q - x).detach()


# --------------------------------------------------------------------------------------------- weights


#: Elements per chunk of :func:`ordered_sum` (fixed, so the order of additions is too): bounds its float64 work
#: buffer at 16 MiB whatever the tensor's size.
ORDERED_CHUNK = 1 << 22


def ordered_sum(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The sum of all elements of ``x`` (or of ``fn`` applied element-wise, e.g. ``lambda c: c.float().pow(2)``,
    chunk by chunk, so no full-size temporary is made) as a 0-d float64 tensor without gradient, added in an order
    that does not depend on the thread count: pairwise halving in float64 (``acc[:k] += acc[k:2k]``, each step an
    element-wise add) within fixed chunks of :data:`ORDERED_CHUNK` elements, then over the chunks' sums.

    ``torch.sum`` of a whole tensor splits the reduction among the threads, so its last bit follows the thread
    count; wherever a full sum decides stored bytes or reported numbers (a weight scale, a loss normaliser or
    value, a gradient-clipping norm, keep-or-revert, calibration statistics) this one is used. Pairwise in
    float64, it is also more accurate than an fp32 sum. ``x`` is never written."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    partials = [_pairwise_sum(fn(flat[i : i + ORDERED_CHUNK]) if fn is not None else flat[i : i + ORDERED_CHUNK])
                for i in range(0, n, ORDERED_CHUNK)]
    return partials[0] if len(partials) == 1 else _pairwise_sum(torch.stack(partials))


def _pairwise_sum(flat: torch.Tensor) -> torch.Tensor:
    n = flat.numel()
    m = (n + 1) // 2
    acc = flat[:m].to(torch.float64, copy=True)  # never a view of the input: the adds below write into it
    acc[: n - m] += flat[m:]
    while m > 1:
        half = (m + 1) // 2
        acc[: m - half] += acc[half:m]
        m = half
    return acc[0]


def ordered_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x.sum()`` for training: the gradient of ``x.sum()``, the value of :func:`ordered_sum` (in ``x``'s dtype),
    so a loss recorded in a report has the same bits at any thread count (``s − s.detach()`` is exactly 0)."""
    s = x.sum()
    return s - s.detach() + ordered_sum(x).to(s.dtype)


#: torch reduces a tensor of fewer elements on one thread, in one fixed order (``at::internal::GRAIN_SIZE``).
SERIAL_REDUCTION = 32768


def weight_absmean(w: torch.Tensor) -> torch.Tensor:
    """``mean(|W|)`` of a whole weight as a 1-element fp32 tensor (no gradient), the same bits for any thread count.

    Below :data:`SERIAL_REDUCTION` elements torch's own fp32 ``mean`` runs on one thread in a fixed order, so it
    is used, and the result is stock transformers' ``WeightQuant`` bit for bit; a larger weight's ``torch.mean``
    splits the sum among the threads (field report: 8 stored scales one ulp apart at 1 and 2 threads), so it is
    summed by :func:`ordered_sum` instead (within an ulp of torch's)."""
    w = w.detach()
    if w.numel() < SERIAL_REDUCTION:
        return w.float().abs().mean().reshape(1)
    return (ordered_sum(w.abs()) / w.numel()).to(torch.float32).reshape(1)


def ternary_absmean(w: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes and scale of a weight, per tensor (b1.58 Eq. 1–3).

    ``α = mean(|W|)`` (:func:`weight_absmean`: the same bits for any thread count), codes
    ``= RoundClip(W / α, −1, 1)`` as int8, so ``Q_w(W) = α · codes``. Computed in fp32 whatever the input dtype.
    Returns ``(codes, alpha)`` with ``alpha`` a 1-element fp32 tensor.
    ``scratch``: an optional flat fp32 buffer of at least ``2 · w.numel()`` elements, reused across calls when
    converting many large weights (fresh full-size temporaries cost a page fault per 4 KiB); same result.
    """
    n = w.numel()
    if scratch is None:
        wf = w.float()
        work = torch.empty_like(wf)
    else:
        wf, work = scratch[:n].view(w.shape).copy_(w), scratch[n : 2 * n].view(w.shape)
    alpha = weight_absmean(wf).clamp(min=EPS)
    torch.mul(wf, 1.0 / alpha, out=work).round_().clamp_(-1, 1)
    return work.to(torch.int8), alpha


def ternary_absmean_fake(w: torch.Tensor) -> torch.Tensor:
    """``Q_w(W) = α · RoundClip(W / α, −1, 1)`` in the dtype of ``w``."""
    wf = w.float()
    inv_alpha = 1.0 / weight_absmean(wf).clamp(min=EPS)
    return (round_clip(wf * inv_alpha, -1, 1) / inv_alpha).to(w.dtype)


def ternary_absmean_ste(w: torch.Tensor) -> torch.Tensor:
    """:func:`ternary_absmean_fake` with a straight-through gradient (b1.58 quantization-aware training)."""
    return ste(w, ternary_absmean_fake(w))


# ----------------------------------------------------------------------------------------- activations


def absmax_scale(xf: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token multiplier of absmax quantization: ``s = (2^(bits−1) − 1) / max(max|X|, EPS)``, fp32 ``[..., 1]``
    for fp32 ``xf [..., d]``. The integer codes are ``RoundClip(X · s, −2^(bits−1), 2^(bits−1) − 1)``; the native
    kernels reproduce this exact fp32 arithmetic (``qp / t`` is ``t.reciprocal() * qp`` in torch)."""
    return absmax_multiplier(xf, 2 ** (bits - 1) - 1)


def absmax_multiplier(xf: torch.Tensor, q_max: int) -> torch.Tensor:
    """``s = q_max / max(max|X|, EPS)`` per token, fp32 ``[..., 1]``: the multiplier that maps the largest |x| of
    each token onto the code ``q_max`` (``q_max / t`` is ``t.reciprocal() * q_max`` in torch, the operations the
    native kernels repeat)."""
    return q_max / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def absmean_scale(xf: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token multiplier of absmean quantization: ``s = √(2^(bits−1) − 1) / max(mean|X|, EPS)``, fp32
    ``[..., 1]`` (a4.8 Eq. 6–7 for 4 bits: ``√7/β``). The native backend calls this same function."""
    qp = 2 ** (bits - 1) - 1
    return math.sqrt(qp) / xf.abs().mean(dim=-1, keepdim=True).clamp(min=EPS)


def int8_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-token INT8 absmax (b1.58 Eq. 4): ``γ/127 · RoundClip(127/γ · X, −128, 127)``, ``γ = max|X|``."""
    xf = x.float()
    s = absmax_scale(xf, 8)
    return (round_clip(xf * s, -128, 127) / s).to(x.dtype)


def absmax_int(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric absmax to ``bits``-bit signed integers; ``bits=8`` is :func:`int8_absmax`."""
    if bits == 8:
        return int8_absmax(x)
    qp = 2 ** (bits - 1) - 1
    xf = x.float()
    s = absmax_scale(xf, bits)
    return (round_clip(xf * s, -qp - 1, qp) / s).to(x.dtype)


def absmean_int(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per-token absmean to signed integers (a4.8 Eq. 6–7).

    For 4 bits: ``β/√7 · RoundClip(√7/β · X, −8, 7)``, ``β = mean|X|``. Other widths use ``√(2^(bits−1) − 1)``
    in place of √7 (our generalisation; the paper defines only INT4).
    """
    qp = 2 ** (bits - 1) - 1
    xf = x.float()
    s = absmean_scale(xf, bits)
    return (round_clip(xf * s, -qp - 1, qp) / s).to(x.dtype)


def int4_absmean(x: torch.Tensor) -> torch.Tensor:
    """The a4.8 INT4 quantizer (Eq. 6–7): :func:`absmean_int` with 4 bits."""
    return absmean_int(x, 4)


def topk_count(d: int, ratio: float) -> int:
    """``K = round(ratio · d)``, at least 1 and at most ``d``: how many entries of a ``d``-wide token top-K keeps."""
    return max(1, min(d, round(ratio * d)))


def topk_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ``K = round(ratio · d)`` largest ``|x|`` per token (a4.8 Eq. 1, ``M = TopK(|X|)``)."""
    k = topk_count(x.shape[-1], ratio)
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def topk_sparsify(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the top ``ratio`` share of ``|x|`` per token and zero the rest."""
    return x * topk_mask(x, ratio)


#: E2M1 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} × 2 are the integers up to 12, in units of max|x| / 12.
FP4_UNITS = 12


def fp4_unit_scale(xf: torch.Tensor) -> torch.Tensor:
    """Per-token multiplier that turns :func:`fp4_e2m1_minmax` values into integers: ``s = 12 / max(max|X|, EPS)``,
    fp32 ``[..., 1]`` for fp32 ``xf [..., d]``. The native backend calls this same function."""
    return FP4_UNITS / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def fp4_e2m1_minmax(x: torch.Tensor, exp_bits: int = 2, man_bits: int = 1) -> torch.Tensor:
    """Per-token floating-point quantizer with the MinMax bias of LLM-FP4 (a4.8 §2.3, E2M1 by default).

    ``b = log2((2 − 2^−M) / max|X|) + 2^E − 1`` puts the largest representable value on ``max|X|``;
    each element's exponent is ``e = max(⌊log2|x| + b⌋, 1)`` and it is rounded on the grid of step
    ``2^(e − b − M)``, then clipped to ``±max|X|``. E2M1 gives the magnitudes ``max·{0, 1/12, …, 2/3, 1}``.
    """
    xf = x.float()
    xmax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    bias = torch.log2((2.0 - 2.0**-man_bits) / xmax) + (2**exp_bits - 1)
    exponent = torch.floor(torch.log2(xf.abs().clamp(min=torch.finfo(torch.float32).tiny)) + bias).clamp(min=1.0)
    step = torch.exp2(exponent - bias - man_bits)
    q = torch.round(xf / step) * step
    return torch.minimum(torch.maximum(q, -xmax), xmax).to(x.dtype)


def int8_absmax_ste(x: torch.Tensor) -> torch.Tensor:
    """:func:`int8_absmax` with a straight-through gradient."""
    return ste(x, int8_absmax(x))


# ----------------------------------------------------------------------------------- the INT8 lm_head


def int8_rows(w: torch.Tensor, rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 weight codes with one absmax scale per output row, for the INT8 lm_head: ``scale = max(max|W[n]|,
    1e-12) / 127`` and ``q = RoundClip(W / scale, −127, 127)``, so ``W[n] ≈ scale[n] · q[n]``. ``w`` ``[N, K]`` of
    any float dtype → ``(q int8 [N, K], scale fp32 [N])``. Computed ``rows_per_step`` rows at a time (each row on
    its own, so the result does not depend on it): the fp32 temporaries stay a slice, not four copies of a
    128,256-row table."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for n0 in range(0, w.shape[0], rows_per_step):
        wf = w[n0 : n0 + rows_per_step].detach().float()
        part = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[n0 : n0 + rows_per_step] = round_clip(wf / part[:, None], -127, 127)
        scale[n0 : n0 + rows_per_step] = part
    return q, scale


def int16_code_max(k: int) -> int:
    """The largest int16 input code of the INT8 lm_head for an input width ``k``: no int32 sum of ``k`` products
    with ``|w| ≤ 127`` can overflow (``k · 127 · q_max < 2^31``), at most 32767. The native kernel's bound."""
    return min(32767, (1 << 31) // (127 * max(k, 1)) - 1)


def int8_lm_head(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rows_per_step: int = 8192) -> torch.Tensor:
    """The INT8 lm_head in torch, the numbers of the native ``int8_gemm`` kernel: each token's input quantized per
    token to int16 codes (absmax, ``s = q_max / max(max|x|, EPS)`` with :func:`int16_code_max`), the integer sums
    computed exactly (float64 products of integers, every partial sum below 2^53), then ``y = (float)acc / s ·
    scale[n]`` in fp32 — the kernel's operations in its order. ``x`` fp32 ``[T, K]``, ``q`` int8 ``[N, K]``,
    ``scale`` fp32 ``[N]`` → fp32 ``[T, N]``, computed ``rows_per_step`` weight rows at a time (the float64 copy
    of the weight is made a slice at a time)."""
    qmax = int16_code_max(x.shape[-1])
    s = absmax_multiplier(x, qmax)
    codes = round_clip(x * s, -qmax, qmax).double()
    out = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32, device=x.device)
    for n0 in range(0, q.shape[0], rows_per_step):
        n1 = min(n0 + rows_per_step, q.shape[0])
        out[:, n0:n1] = (codes @ q[n0:n1].double().T).float() / s * scale[n0:n1]
    return out
