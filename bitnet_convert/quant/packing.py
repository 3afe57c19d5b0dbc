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


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (any integer dtype, values in ``[0, 2^bits − 1]``) along the last dim:
    ``[..., n]`` → uint8 ``[..., ceil(n · bits / 8)]``, code ``i`` in bits ``i·bits … i·bits + bits − 1`` of the
    row's little-endian bit string. Any ``n`` works (the last byte is zero-padded)."""
    if not 1 <= bits <= 8:
        raise PackingError(f"bits must be in 1..8, got {bits}")
    n = codes.shape[-1]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise PackingError(f"{bits}-bit packing expects codes in [0, {2**bits - 1}]")
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    bit_string = ((codes.to(torch.uint8).unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n · bits]
    n_bytes = -(-n * bits // 8)
    bit_string = torch.nn.functional.pad(bit_string, (0, 8 * n_bytes - n * bits))
    weights = torch.arange(8, device=codes.device, dtype=torch.uint8)
    return (bit_string.unflatten(-1, (n_bytes, 8)) << weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., ceil(n · bits / 8)]`` → uint8 codes ``[..., n]``."""
    if packed.dtype != torch.uint8:
        raise PackingError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != -(-n * bits // 8):
        raise PackingError(f"{packed.shape[-1]} bytes per row cannot hold {n} codes of {bits} bits")
    weights = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bit_string = ((packed.unsqueeze(-1) >> weights) & 1).flatten(-2)[..., : n * bits]
    shifts = torch.arange(bits, device=packed.device, dtype=torch.uint8)
    return (bit_string.unflatten(-1, (n, bits)) << shifts).sum(-1, dtype=torch.uint8)
