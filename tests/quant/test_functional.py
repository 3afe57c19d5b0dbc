"""Hand-computed checks of every quantizer in ``bitnet_convert.quant.functional``.

Expected values are written out in the tests with the arithmetic in a comment; inputs are chosen so that
scales are exact in binary floating point wherever possible, which lets most checks compare bit for bit.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from bitnet_convert.quant import functional as F
from bitnet_convert.quant import kv


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float32)


# --------------------------------------------------------------------------------------------- helpers


def test_round_clip_rounds_half_to_even_then_clips() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.7, -9.2])
    # round half to even: 0.5→0, 1.5→2, 2.5→2, -0.5→-0, -1.5→-2; 3.7→4→clip 3; -9.2→-9→clip -4
    assert torch.equal(F.round_clip(x, -4, 3), torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, 3.0, -4.0]))


# --------------------------------------------------------------------------------------------- ternary


def test_ternary_absmean_hand_computed_dyadic() -> None:
    w = t([0.25, -1.0, 0.125], [1.5, -0.125, 0.0])
    # α = (0.25 + 1 + 0.125 + 1.5 + 0.125 + 0) / 6 = 3 / 6 = 0.5
    # W/α = [0.5, -2, 0.25, 3, -0.25, 0] → round (half to even) [0, -2, 0, 3, -0, 0] → clip [0, -1, 0, 1, 0, 0]
    codes, alpha = F.ternary_absmean(w)
    assert codes.dtype == torch.int8
    assert torch.equal(codes, torch.tensor([[0, -1, 0], [1, 0, 0]], dtype=torch.int8))
    assert alpha.dtype == torch.float32 and alpha.shape == (1,)
    assert alpha.item() == 0.5
    # Q_w(W) = α · codes
    assert torch.equal(F.ternary_absmean_fake(w), t([0.0, -0.5, 0.0], [0.5, 0.0, 0.0]))


def test_ternary_absmean_hand_computed_non_dyadic() -> None:
    w = t([0.5, -1.0, 0.1], [2.0, -0.3, 0.0])
    # α = (0.5 + 1 + 0.1 + 2 + 0.3 + 0) / 6 = 3.9 / 6 = 0.65
    # W/α = [0.769, -1.538, 0.154, 3.077, -0.462, 0] → round [1, -2, 0, 3, 0, 0] → clip [1, -1, 0, 1, 0, 0]
    codes, alpha = F.ternary_absmean(w)
    assert torch.equal(codes, torch.tensor([[1, -1, 0], [1, 0, 0]], dtype=torch.int8))
    assert alpha.item() == pytest.approx(0.65, rel=1e-6)
    torch.testing.assert_close(F.ternary_absmean_fake(w), t([0.65, -0.65, 0.0], [0.65, 0.0, 0.0]), rtol=1e-6, atol=0)


def test_ternary_fake_equals_alpha_times_codes_on_random() -> None:
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    codes, alpha = F.ternary_absmean(w)
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    torch.testing.assert_close(F.ternary_absmean_fake(w), alpha * codes.float(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------- INT8


def test_int8_absmax_two_tokens_hand_computed() -> None:
    x = t([127.0, -127.0, 2.5, -3.5, 0.5], [0.0, 1.0, -0.5, 0.25, -1.0])
    # token 0: γ = 127, s = 127/127 = 1; x·s = [127, -127, 2.5, -3.5, 0.5]
    #          → round half to even [127, -127, 2, -4, 0] → /s the same
    # token 1: γ = 1, s = 127; x·s = [0, 127, -63.5, 31.75, -127] → round [0, 127, -64, 32, -127] → /127
    out = F.int8_absmax(x)
    assert torch.equal(out[0], torch.tensor([127.0, -127.0, 2.0, -4.0, 0.0]))
    assert torch.equal(out[1], torch.tensor([0.0, 127.0, -64.0, 32.0, -127.0]) / 127.0)


def test_int8_absmax_symmetric_rule_never_reaches_minus_128() -> None:
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(1)) * 5
    x[:, 0] = -x.abs().amax(dim=-1) * 1.0  # every token's extreme is negative
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True)
    codes = (F.int8_absmax(x) * s).round()
    assert codes.min().item() == -127.0  # the negative extreme maps to -127, not -128
    assert codes.max().item() <= 127.0
    assert not (codes == -128).any()


def test_absmax_int_other_widths_hand_computed() -> None:
    x = t([-3.0, 1.5, 0.5, 2.9])
    # 3 bits: qp = 3, γ = 3, s = 1 → round [-3, 2, 0, 3] (1.5 → 2, 0.5 → 0 half to even)
    assert torch.equal(F.absmax_int(x, 3), t([-3.0, 2.0, 0.0, 3.0]))
    # 8 bits delegates to int8_absmax
    y = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(F.absmax_int(y, 8), F.int8_absmax(y))


# --------------------------------------------------------------------------------------------- INT4


def test_int4_absmean_hand_computed_with_clipping() -> None:
    x = t([10.0, -10.0, 2.0, -1.0, 0.5, -0.5, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    # token 0: β = (10+10+2+1+0.5+0.5)/8 = 3, s = √7/3 ≈ 0.8819
    #   x·s = [8.819, -8.819, 1.764, -0.882, 0.441, -0.441, 0, 0] → round [9, -9, 2, -1, 0, 0, 0, 0]
    #   → clip to [-8, 7]: [7, -8, 2, -1, 0, 0, 0, 0]; value = code · β/√7 = code · 3/√7
    # token 1: β = 4/8 = 0.5, s = 2√7 ≈ 5.29; x·s = ±5.29 → ±5; value = ±5 · 0.5/√7
    out = F.int4_absmean(x)
    codes0 = torch.tensor([7.0, -8.0, 2.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    codes1 = torch.tensor([5.0, -5.0, 5.0, -5.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(out[0], codes0 * 3.0 / math.sqrt(7), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1], codes1 * 0.5 / math.sqrt(7), rtol=1e-6, atol=0)
    # the clipped extremes: 7·3/√7 = 3√7 ≈ 7.937 and -8·3/√7 ≈ -9.071, both smaller than |x| = 10
    assert out[0, 0].item() == pytest.approx(3 * math.sqrt(7), rel=1e-6)
    assert out[0, 1].item() == pytest.approx(-24 / math.sqrt(7), rel=1e-6)
    assert torch.equal(F.absmean_int(x, 4), out)


def test_int4_absmean_codes_stay_in_range_on_random() -> None:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) ** 3  # heavy tails → clipping
    beta = x.abs().mean(dim=-1, keepdim=True)
    codes = (F.int4_absmean(x) * math.sqrt(7) / beta).round()
    assert codes.min().item() == -8.0 and codes.max().item() == 7.0
    torch.testing.assert_close(F.int4_absmean(x) * math.sqrt(7) / beta, codes, rtol=0, atol=1e-4)


def test_absmean_int_generalised_width() -> None:
    x = t([1.0, -1.0, 1.0, -1.0])
    # 3 bits: qp = 3, β = 1, s = √3 ≈ 1.732 → round ±2 → value ±2/√3
    torch.testing.assert_close(F.absmean_int(x, 3), t([1.0, -1.0, 1.0, -1.0]) * 2 / math.sqrt(3), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------- top-K


def test_topk_sparsify_half_per_token() -> None:
    x = t([0.1, -3.0, 2.0, 0.5], [5.0, 1.0, -6.0, 0.0])
    # d = 4, K = round(0.5·4) = 2; token 0 keeps |-3|, |2|; token 1 keeps |5|, |-6|
    assert torch.equal(F.topk_sparsify(x, 0.5), t([0.0, -3.0, 2.0, 0.0], [5.0, 0.0, -6.0, 0.0]))
    assert torch.equal(F.topk_mask(x, 0.5), torch.tensor([[False, True, True, False], [True, False, True, False]]))


def test_topk_ratio_one_is_identity() -> None:
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    assert F.topk_mask(x, 1.0).all()
    assert torch.equal(F.topk_sparsify(x, 1.0), x)


@pytest.mark.parametrize(
    ("row", "ratio", "expected"),
    [
        # d = 3, K = round(0.5·3) = round(1.5) = 2 → keeps -4 and 3
        ([1.0, -4.0, 3.0], 0.5, [0.0, -4.0, 3.0]),
        # d = 4, K = round(0.3·4) = round(1.2) = 1 → keeps -9
        ([2.0, -9.0, 3.0, 1.0], 0.3, [0.0, -9.0, 0.0, 0.0]),
        # d = 4, K = round(0.6·4) = round(2.4) = 2
        ([2.0, -9.0, 3.0, 1.0], 0.6, [0.0, -9.0, 3.0, 0.0]),
        # d = 1, K = round(0.1) = 0 → at least one channel is kept
        ([-2.5], 0.1, [-2.5]),
        # d = 2, K = round(0.75·2) = round(1.5) = 2 → all kept
        ([0.1, -0.2], 0.75, [0.1, -0.2]),
    ],
)
def test_topk_small_d(row: list[float], ratio: float, expected: list[float]) -> None:
    assert torch.equal(F.topk_sparsify(t(row), ratio), t(expected))


def test_topk_keeps_exactly_k_on_random() -> None:
    x = torch.randn(5, 10, 40, generator=torch.Generator().manual_seed(5))
    for ratio, k in [(0.5, 20), (0.25, 10), (0.1, 4), (0.9, 36)]:
        mask = F.topk_mask(x, ratio)
        assert torch.equal(mask.sum(dim=-1), torch.full((5, 10), k))
        # every kept |x| is ≥ every dropped |x| in the same token
        kept_min = torch.where(mask, x.abs(), torch.inf).amin(dim=-1)
        dropped_max = torch.where(mask, -torch.inf, x.abs()).amax(dim=-1)
        assert (kept_min >= dropped_max).all()


# --------------------------------------------------------------------------------------------- FP4


def test_fp4_full_grid_is_fixed_point() -> None:
    # max|X| = 6 → b = log2(1.5/6) + 3 = 1; the E2M1 magnitudes are 6·{0, 1/12, 1/6, 1/4, 1/3, 1/2, 2/3, 1}
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = t(grid + [-g for g in grid[1:]])
    assert torch.equal(F.fp4_e2m1_minmax(x), x)
    # the same grid scaled to another max: 12·{…} and 0.75·{…} (all exact in binary)
    for scale in (2.0, 0.125):
        assert torch.equal(F.fp4_e2m1_minmax(x * scale), x * scale)


def test_fp4_grid_fractions_of_max() -> None:
    fractions = [0.0, 1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0]
    x = t(fractions)  # max = 1
    torch.testing.assert_close(F.fp4_e2m1_minmax(x), x, rtol=1e-6, atol=0)
    # and 7·fractions with max = 7 (non-power-of-two max)
    torch.testing.assert_close(F.fp4_e2m1_minmax(x * 7), x * 7, rtol=1e-6, atol=0)


def test_fp4_rounds_in_between_values() -> None:
    # max = 6 → b = 1, e = max(⌊log2|x| + 1⌋, 1), step = 2^(e − 1 − 1)
    x = t([6.0, 5.0, 5.2, 4.9, 3.5, 3.4, 2.6, 2.4, 1.3, 1.2, 0.75, 0.7, 0.3, 0.25, 0.2, -5.2])
    expected = t(
        [
            6.0,  # on the grid
            4.0,  # e = 3, step 2: 5/2 = 2.5 → 2 (half to even) → 4
            6.0,  # 5.2/2 = 2.6 → 3 → 6
            4.0,  # 4.9/2 = 2.45 → 2 → 4
            4.0,  # e = 2, step 1: 3.5 → 4 (half to even)
            3.0,  # 3.4 → 3
            3.0,  # e = 2, step 1: 2.6 → 3
            2.0,  # 2.4 → 2
            1.5,  # e = 1, step 0.5: 1.3/0.5 = 2.6 → 3 → 1.5
            1.0,  # 1.2/0.5 = 2.4 → 2 → 1.0
            1.0,  # e = max(0, 1) = 1, step 0.5: 0.75/0.5 = 1.5 → 2 → 1.0
            0.5,  # 0.7/0.5 = 1.4 → 1 → 0.5
            0.5,  # 0.3/0.5 = 0.6 → 1 → 0.5
            0.0,  # 0.25/0.5 = 0.5 → 0 (half to even)
            0.0,  # 0.2/0.5 = 0.4 → 0
            -6.0,  # sign symmetric
        ]
    )
    assert torch.equal(F.fp4_e2m1_minmax(x), expected)


def test_fp4_output_on_grid_and_bounded_on_random() -> None:
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    out = F.fp4_e2m1_minmax(x)
    xmax = x.abs().amax(dim=-1, keepdim=True)
    ratios = out.abs() / xmax  # must be one of the 8 fractions
    grid = torch.tensor([0.0, 1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1.0])
    dist = (ratios.unsqueeze(-1) - grid).abs().amin(dim=-1)
    assert dist.max().item() < 1e-6
    assert (out.abs() <= xmax).all()
    assert torch.equal(out.sign() * (out != 0), x.sign() * (out != 0))


# -------------------------------------------------------------------------------- dtype / zeros / tokens

PER_TOKEN = {
    "int8_absmax": F.int8_absmax,
    "absmax_int4": lambda x: F.absmax_int(x, 4),
    "int4_absmean": F.int4_absmean,
    "topk_sparsify": lambda x: F.topk_sparsify(x, 0.5),
    "fp4_e2m1_minmax": F.fp4_e2m1_minmax,
    "kv_minmax3": lambda x: kv.fake_quantize(x, 3, "minmax"),
    "kv_absmax4": lambda x: kv.fake_quantize(x, 4, "absmax"),
}
ALL = {**PER_TOKEN, "ternary_absmean_fake": F.ternary_absmean_fake}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtype_equals_input_dtype(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    out = ALL[name](x)
    assert out.dtype == dtype
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_input_gives_zero_not_nan(name: str) -> None:
    out = ALL[name](torch.zeros(2, 8))
    assert torch.equal(out, torch.zeros(2, 8))


def test_zero_weight_ternary_codes_and_alpha() -> None:
    codes, alpha = F.ternary_absmean(torch.zeros(4, 4))
    assert torch.equal(codes, torch.zeros(4, 4, dtype=torch.int8))
    assert alpha.item() == pytest.approx(F.EPS)


@pytest.mark.parametrize("name", sorted(PER_TOKEN))
def test_per_token_independence(name: str) -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(8))
    y = x.clone()
    y[2] = y[2] * 50 + 3  # a different token, with a very different scale
    a, b = PER_TOKEN[name](x), PER_TOKEN[name](y)
    keep = [0, 1, 3]
    assert torch.equal(a[keep], b[keep])
    assert not torch.equal(a[2], b[2])


def test_zero_token_beside_nonzero_token() -> None:
    x = t([0.0, 0.0, 0.0], [1.0, -2.0, 0.5])
    for f in PER_TOKEN.values():
        out = f(x)
        assert torch.equal(out[0], torch.zeros(3))
        assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- STE


def test_ternary_absmean_ste_forward_and_identity_gradient() -> None:
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(8, 12, generator=gen).requires_grad_(True)
    upstream = torch.randn(8, 12, generator=gen)
    out = F.ternary_absmean_ste(w)
    torch.testing.assert_close(out.detach(), F.ternary_absmean_fake(w.detach()), rtol=0, atol=1e-6)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_ternary_absmean_ste_forward_exact_on_dyadic_values() -> None:
    w = t([0.25, -1.0, 0.125], [1.5, -0.125, 0.0]).requires_grad_(True)
    assert torch.equal(F.ternary_absmean_ste(w).detach(), t([0.0, -0.5, 0.0], [0.5, 0.0, 0.0]))


def test_int8_absmax_ste_forward_and_identity_gradient() -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 16, generator=gen).requires_grad_(True)
    upstream = torch.randn(4, 16, generator=gen)
    out = F.int8_absmax_ste(x)
    torch.testing.assert_close(out.detach(), F.int8_absmax(x.detach()), rtol=0, atol=1e-6)
    assert not torch.equal(out.detach(), x.detach())  # it did quantize
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_ste_identity_gradient_and_q_gets_none(lam: float) -> None:
    x = t([1.0, 2.0, -4.0]).requires_grad_(True)
    q = t([0.0, 3.0, -4.5]).requires_grad_(True)
    upstream = t([0.3, -7.0, 2.0])
    F.ste(x, q, lam).backward(upstream)
    assert torch.equal(x.grad, upstream)
    assert q.grad is None  # q is detached inside


def test_ste_blended_forward() -> None:
    x = t([1.0, 2.0, -4.0])
    q = t([0.0, 3.0, -4.5])
    # x + λ(q − x): λ = 0.5 → [1 − 0.5, 2 + 0.5, −4 − 0.25] = [0.5, 2.5, −4.25]
    assert torch.equal(F.ste(x, q, 0.5), t([0.5, 2.5, -4.25]))
    # λ = 1 → q; λ = 0 → x; λ = 0.25 → [0.75, 2.25, −4.125]
    assert torch.equal(F.ste(x, q, 1.0), q)
    assert torch.equal(F.ste(x, q, 0.0), x)
    assert torch.equal(F.ste(x, q, 0.25), t([0.75, 2.25, -4.125]))


# -------------------------------------------------------------------------------- transformers parity




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ternary_fake_matches_transformers_weightquant(hf_bitnet, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(64, 48, generator=gen) * 0.02 * (seed + 1)).to(dtype)
    ours = F.ternary_absmean_fake(w)
    theirs = hf_bitnet.WeightQuant.apply(w.clone())
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_absmax_matches_transformers_actquant(hf_bitnet, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 7, 96, generator=gen) * 3 ** (seed - 1)).to(dtype)
    x[0, 0] = 0  # an all-zero token too
    ours = F.int8_absmax(x)
    theirs = hf_bitnet.ActQuant.apply(x.clone())
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_ternary_absmean_with_a_reused_scratch_buffer_gives_the_same_result() -> None:
    g = torch.Generator().manual_seed(5)
    scratch = torch.full((2 * 64 * 48,), float("nan"))
    for shape in [(64, 48), (16, 8), (4, 4)]:
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        codes, alpha = F.ternary_absmean(w, scratch)
        expected_codes, expected_alpha = F.ternary_absmean(w)
        assert torch.equal(codes, expected_codes) and torch.equal(alpha, expected_alpha)
