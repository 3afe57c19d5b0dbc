"""2-bit ternary packing: exact round trips, transformers' layout, the blocked row order and the errors."""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_convert.quant.packing import VALUES_PER_BYTE, PackingError, pack_ternary, unpack_ternary

CODE_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16]
UNPACK_DTYPES = [torch.int8, torch.int32, torch.int64, torch.float32, torch.bfloat16]


@st.composite
def ternary_tensors(draw: st.DrawFn, max_ndim: int = 3) -> torch.Tensor:
    """A tensor of shape ``[4R, ...]`` (1-D to ``max_ndim``-D) with values in {-1, 0, 1}, in a code dtype."""
    rows = 4 * draw(st.integers(1, 6))
    rest = draw(st.lists(st.integers(1, 5), min_size=0, max_size=max_ndim - 1))
    shape = (rows, *rest)
    n = 1
    for s in shape:
        n *= s
    values = draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=n, max_size=n))
    dtype = draw(st.sampled_from(CODE_DTYPES))
    return torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype)




# ---------------------------------------------------------------------------------------- round trip


@settings(max_examples=60, deadline=None)
@given(codes=ternary_tensors(), out_dtype=st.sampled_from(UNPACK_DTYPES))
def test_round_trip_exact(codes: torch.Tensor, out_dtype: torch.dtype) -> None:
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0] // VALUES_PER_BYTE, *codes.shape[1:])
    unpacked = unpack_ternary(packed, out_dtype)
    assert unpacked.dtype == out_dtype
    assert unpacked.shape == codes.shape
    assert torch.equal(unpacked, codes.to(out_dtype))


@settings(max_examples=30, deadline=None)
@given(packed=st.integers(1, 5).flatmap(lambda r: st.lists(st.integers(0, 255), min_size=r, max_size=r)))
def test_every_byte_without_the_unused_code_round_trips(packed: list[int]) -> None:
    # bit pair 0b11 (value 2) is never produced; every other byte is a valid packing of 4 ternary values
    p = torch.tensor(packed, dtype=torch.uint8)
    valid = all(((b >> (2 * i)) & 3) != 3 for b in packed for i in range(4))
    if valid:
        assert torch.equal(pack_ternary(unpack_ternary(p)), p)
    else:
        with pytest.raises(PackingError):
            pack_ternary(unpack_ternary(p))


def test_default_unpack_dtype_is_int8() -> None:
    codes = torch.tensor([[1, -1], [0, 0], [-1, 1], [1, 1]], dtype=torch.int64)
    out = unpack_ternary(pack_ternary(codes))
    assert out.dtype == torch.int8
    assert torch.equal(out, codes.to(torch.int8))


def test_non_contiguous_input() -> None:
    base = torch.tensor([[-1, 0, 1, 1, 0, -1, 1, 0], [0, 0, 1, -1, -1, 1, 0, 1]], dtype=torch.int8)
    codes = base.t()  # [8, 2], not contiguous
    assert not codes.is_contiguous()
    assert torch.equal(unpack_ternary(pack_ternary(codes)), codes)
    assert torch.equal(pack_ternary(codes), pack_ternary(codes.contiguous()))


# ------------------------------------------------------------------------------- transformers' layout


@settings(max_examples=40, deadline=None)
@given(codes=ternary_tensors(max_ndim=2))
def test_layout_equals_transformers(hf_bitnet, codes: torch.Tensor) -> None:
    codes = codes.to(torch.int8)
    theirs = hf_bitnet.pack_weights(codes.clone())  # pack_weights adds 1 to its argument in place
    ours = pack_ternary(codes)
    assert theirs.dtype == ours.dtype == torch.uint8
    assert torch.equal(ours, theirs)
    for dtype in (torch.int8, torch.float32, torch.bfloat16):
        assert torch.equal(unpack_ternary(ours, dtype), hf_bitnet.unpack_weights(ours, dtype))


def test_transformers_docstring_example(hf_bitnet) -> None:
    # the example in transformers' unpack_weights docstring, which our unpacking must reproduce
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = torch.tensor([[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=torch.int8)
    assert torch.equal(unpack_ternary(packed), expected)
    assert torch.equal(pack_ternary(expected), packed)


# ------------------------------------------------------------------------------ the blocked row order


def test_hand_written_blocked_order_2d() -> None:
    # out = 8 → R = 2; packed row r holds rows r, r+2, r+4, r+6 in bit pairs 0-1, 2-3, 4-5, 6-7; stored value+1
    codes = torch.tensor(
        [[1, -1], [0, -1], [-1, -1], [1, -1], [0, 1], [-1, 1], [1, 1], [1, 1]],
        dtype=torch.int8,
    )
    # column 0, value+1 per row: [2, 1, 0, 2, 1, 0, 2, 2]
    #   packed row 0 ← rows 0, 2, 4, 6 = 2, 0, 1, 2 → 2 | 0<<2 | 1<<4 | 2<<6 = 0b10_01_00_10 = 146
    #   packed row 1 ← rows 1, 3, 5, 7 = 1, 2, 0, 2 → 1 | 2<<2 | 0<<4 | 2<<6 = 0b10_00_10_01 = 137
    # column 1, value+1 per row: [0, 0, 0, 0, 2, 2, 2, 2]
    #   packed row 0 ← 0, 0, 2, 2 → 0b10_10_00_00 = 160; packed row 1 ← 0, 0, 2, 2 → 160
    expected = torch.tensor([[0b10_01_00_10, 0b10_10_00_00], [0b10_00_10_01, 0b10_10_00_00]], dtype=torch.uint8)
    assert expected.tolist() == [[146, 160], [137, 160]]
    assert torch.equal(pack_ternary(codes), expected)
    assert torch.equal(unpack_ternary(expected), codes)


def test_hand_written_1d() -> None:
    # out = 4 → R = 1; value+1 = [0, 1, 2, 2] → 0 | 1<<2 | 2<<4 | 2<<6 = 0b10_10_01_00 = 164
    codes = torch.tensor([-1, 0, 1, 1], dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.shape == (1,)
    assert packed.tolist() == [0b10_10_01_00] == [164]
    assert torch.equal(unpack_ternary(packed), codes)


@pytest.mark.parametrize("row", range(16))
def test_single_nonzero_row_lands_in_its_block(row: int) -> None:
    # out = 16 → R = 4. All zeros (stored as 1 → every byte 0b01_01_01_01 = 85) except one row set to +1
    # (stored as 2): row i sits in packed row i mod R, bit pair i div R, so that byte gains 1 << 2·(i div R).
    codes = torch.zeros(16, 3, dtype=torch.int8)
    codes[row, 1] = 1
    expected = torch.full((4, 3), 0b01_01_01_01, dtype=torch.uint8)
    expected[row % 4, 1] += 1 << (2 * (row // 4))
    assert torch.equal(pack_ternary(codes), expected)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("out", [1, 2, 3, 5, 6, 10])
def test_out_features_not_divisible_by_4(out: int) -> None:
    with pytest.raises(PackingError, match=f"out_features={out}\\b"):
        pack_ternary(torch.zeros(out, 4, dtype=torch.int8))


def test_packing_error_is_a_value_error() -> None:
    assert issubclass(PackingError, ValueError)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([0, 2, 0, 0], dtype=torch.int8),
        torch.tensor([0, -2, 0, 0], dtype=torch.int8),
        torch.tensor([127, 0, 0, 0], dtype=torch.int8),
        torch.tensor([0, 0, 0, 65537], dtype=torch.int32),  # would wrap to 1 in int16
        torch.tensor([0.5, 0.0, 1.0, -1.0]),  # would truncate to 0 in an integer cast
        torch.tensor([0.0, 1.7, 0.0, 0.0]),
        torch.tensor([0.0, -1.5, 0.0, 0.0]),
        torch.tensor([0.0, float("nan"), 0.0, 0.0]),
    ],
    ids=["2", "-2", "127", "int32-65537", "0.5", "1.7", "-1.5", "nan"],
)
def test_values_outside_ternary_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(PackingError, match=r"\{-1, 0, 1\}"):
        pack_ternary(bad)
    with pytest.raises(PackingError):
        pack_ternary(bad.reshape(4, 1).repeat(1, 3))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.float32])
def test_unpack_rejects_non_uint8(dtype: torch.dtype) -> None:
    with pytest.raises(PackingError, match="uint8"):
        unpack_ternary(torch.zeros(2, 3, dtype=dtype))


def test_arguments_not_modified() -> None:
    codes = torch.tensor([[1, -1, 0], [0, 0, 1], [-1, 1, 1], [1, 0, -1]], dtype=torch.int8)
    before = codes.clone()
    version = codes._version
    packed = pack_ternary(codes)
    assert torch.equal(codes, before)
    assert codes._version == version
    packed_before = packed.clone()
    unpack_ternary(packed, torch.float32)
    assert torch.equal(packed, packed_before)
    # the packed result does not alias the input's storage
    packed += 1
    assert torch.equal(codes, before)
