"""2-bit packing of ternary weights in the layout of transformers' BitNet integration.

Four ternary values share one uint8 along dim 0 (the output features), stored as ``value + 1`` ∈ {0, 1, 2}.
With ``R = out_features / 4``, packed row ``r`` holds original rows ``r, r + R, r + 2R, r + 3R`` in bit pairs
0–1, 2–3, 4–5 and 6–7 (blocked, not interleaved). These functions never modify their arguments.
"""

from __future__ import annotations

import torch

VALUES_PER_BYTE = 4


class PackingError(ValueError):
    """A tensor cannot be packed (wrong values or a shape that does not divide)."""


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int ternary codes of shape ``[out, ...]`` into uint8 ``[out / 4, ...]``."""
    out = codes.shape[0]
    if out % VALUES_PER_BYTE:
        raise PackingError(f"out_features={out} is not divisible by {VALUES_PER_BYTE}; 2-bit packing needs that")
    if codes.dtype != torch.int8:
        if codes.numel() and not ((codes == -1) | (codes == 0) | (codes == 1)).all():
            raise PackingError("ternary packing expects values in {-1, 0, 1}")
        codes = codes.to(torch.int8)
    shifted = (codes + 1).view(torch.uint8)  # {-1, 0, 1} → {0, 1, 2}; any other int8 lands on 3..255
    if shifted.numel() and int(shifted.max()) > 2:
        raise PackingError("ternary packing expects values in {-1, 0, 1}")
    rows = out // VALUES_PER_BYTE
    packed = shifted[:rows].clone()
    for i in range(1, VALUES_PER_BYTE):
        packed |= shifted[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: uint8 ``[R, ...]`` → ternary values ``[4R, ...]`` in ``dtype``."""
    if packed.dtype != torch.uint8:
        raise PackingError(f"packed ternary weights must be uint8, got {packed.dtype}")
    parts = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    return (torch.cat(parts, dim=0).to(torch.int8) - 1).to(dtype)
