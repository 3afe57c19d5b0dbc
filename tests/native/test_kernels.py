"""The native kernels themselves: their activation codes equal the reference quantizers', the dense and sparse
ternary GEMMs give exact integer sums, scalar and AVX2 agree bit for bit, and no result depends on the thread count."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import native_isas as isas
from helpers import native_ops as ops
from helpers import random_case

from bitnet_convert.native import backend as native
from bitnet_convert.native import build as kernels
from bitnet_convert.native.backend import Int8Linear
from bitnet_convert.quant import functional as F
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.packing import pack_ternary
from bitnet_convert.quant.schemes import ActivationSpec

SPECS = {
    "int8 absmax": ActivationSpec(method="absmax", bits=8),
    "int4 absmax": ActivationSpec(method="absmax", bits=4),
    "int4 absmean": ActivationSpec(method="absmean", bits=4),
    "int6 absmean": ActivationSpec(method="absmean", bits=6),
    "fp4 e2m1": ActivationSpec(method="fp4_e2m1"),
    "top-50% int8": ActivationSpec(method="absmax", bits=8, topk=0.5),
    "top-50% fp4": ActivationSpec(method="fp4_e2m1", topk=0.5),
    "threshold int8": ActivationSpec(method="absmax", bits=8, threshold=0.3),
}


def reference_codes(x: torch.Tensor, spec: ActivationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    codes, s = spec.integer_codes(x)
    return codes, s.reshape(-1)


def with_ties(row: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """``row`` with 45 entries moved onto (or one ulp beside) values whose product with the scale is exactly
    ``k + 0.5`` — round-half-to-even decides their codes. Iterated to a fixed point, since the entries change an
    absmean scale (a contraction: they are a small share of the row's mean)."""
    row = row.clone()
    n = 45
    for _ in range(12):
        s = reference_codes(row[None], spec)[1][0]
        k = torch.arange(n, dtype=torch.float32) % 7 - 3
        target = (k + 0.5) / s
        nudged = torch.stack([torch.nextafter(target, -target.sign() * math.inf), target,
                              torch.nextafter(target, target.sign() * math.inf)], dim=1).reshape(-1)[:n]
        row[1 : n + 1] = nudged
    return row


def inputs(spec: ActivationSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 300, generator=g) * torch.tensor([[0.01], [1.0], [3.0], [50.0], [1e-4], [1.0]])
    rows[1, ::3] = 0.0
    zero = torch.zeros(1, 300)
    tied = torch.full((1, 300), 0.75)  # top-K ties: every |x| equal
    tied[0, ::2] = -0.75
    return torch.cat([rows, zero, tied, with_ties(rows[1], spec)[None], with_ties(rows[3], spec)[None]])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_codes_equal_the_reference_quantizer(name):
    spec = SPECS[name]
    x = inputs(spec)
    want, s_want = reference_codes(x, spec)
    if spec.method in ("absmax", "absmean") and spec.topk is None and spec.threshold is None:
        t = x[-2:] * s_want[-2:, None]
        assert ((t - t.floor()) == 0.5).sum() >= 5  # the tie rows do exercise round-half-to-even
    for isa in isas():
        codes, s, sums = native.quantize(x, spec, isa)
        assert codes.dtype == torch.int8 and codes.shape == (x.shape[0], 384)  # 300 padded to 3 · 128
        assert torch.equal(codes[:, :300].float(), want), name
        assert not codes[:, 300:].any()
        assert torch.equal(s, s_want)
        assert torch.equal(sums, want.sum(-1).int())




@pytest.mark.parametrize(("n", "k", "t"), [(12, 20, 1), (192, 192, 3), (260, 520, 5), (64, 1000, 9)])
def test_dense_and_sparse_gemm_are_exact_integer_sums(n, k, t):
    w, x = random_case(n, k, t, seed=n + k + t)
    packed = pack_ternary(w)
    for isa in isas():
        codes, s, sums = ops().quantize_absmax(x, 8, isa)
        exact = (codes[:, :k].long() @ w.long().t()).float()  # int64: the true sums
        for divide in (False, True):  # α that multiplies, or 1/α that divides (the bitlinear convention)
            want = exact / (s[:, None] * 0.37) if divide else exact / s[:, None] * 0.37
            dense = ops().ternary_gemm(codes, sums, s, kernels.rows_layout(packed), 0.37, divide, isa)
            sparse = ops().ternary_gemm_sparse(codes, sums, s, kernels.cols_layout(packed), n, 0.37, divide, isa)
            assert torch.equal(dense, want) and torch.equal(sparse, want)


def needs_avx2() -> None:
    if kernels.ISA_AVX2 not in isas():
        pytest.skip("this CPU has no AVX2: only the scalar path exists here")


@pytest.mark.parametrize(("n", "k", "t"), [(36, 20, 1), (96, 300, 7), (260, 520, 50), (68, 4000, 40)])
@pytest.mark.parametrize("bits", [4, 2])
def test_table_lookup_gemm_is_the_exact_integer_sum(n, k, t, bits):
    # rows past a 32-row tile, tokens past a 6-token pass; K = 4000 makes blocks of 12 tokens' tables (512 KB), so 40
    # tokens take four blocks, the last one short; 2-bit codes as well as 4-bit ones
    needs_avx2()
    w, x = random_case(n, k, t, seed=n + k + t + bits)
    x[0] *= 1e3
    rows = kernels.rows_layout(pack_ternary(w))
    codes, s, sums = native.quantize(x, ActivationSpec(method="absmean", bits=bits), kernels.ISA_AVX2)
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    exact = (codes[:, :k].long() @ w.long().t()).float()
    for divide in (False, True):
        want = exact / (s[:, None] * 0.37) if divide else exact / s[:, None] * 0.37
        lut = ops().ternary_gemm_lut(codes, sums, s, rows, 0.37, divide)
        assert torch.equal(lut, want)
        assert torch.equal(lut, ops().ternary_gemm(codes, sums, s, rows, 0.37, divide, kernels.ISA_SCALAR))


def test_table_lookup_gemm_sums_the_largest_products_exactly():
    # every code -8 or 7 and every weight ±1 over 8192 inputs: the int8 sums of 6 lookups reach ±96 and the int16
    # ones ±6144 before they are widened, and the totals reach ±65536
    needs_avx2()
    g = torch.Generator().manual_seed(11)
    n, k, t = 64, 8192, 7
    w = torch.where(torch.rand(n, k, generator=g) < 0.5, -1, 1).to(torch.int8)
    w[0], w[1] = 1, -1
    codes = torch.where(torch.rand(t, k, generator=g) < 0.5, -8, 7).to(torch.int8)
    codes[0], codes[1] = -8, 7
    s, sums = torch.ones(t), codes.sum(-1, dtype=torch.int32)
    rows = kernels.rows_layout(pack_ternary(w))
    exact = (codes.long() @ w.long().t()).float()
    assert exact.abs().max() == 8 * k
    assert torch.equal(ops().ternary_gemm_lut(codes, sums, s, rows, 1.0, False), exact)


def test_table_lookup_gemm_of_zero_inputs_is_the_dense_kernels():
    needs_avx2()
    codes, sums = torch.zeros(3, 0, dtype=torch.int8), torch.zeros(3, dtype=torch.int32)
    s = torch.tensor([1.0, 2.0, 0.5])
    rows = torch.zeros(8, 0, dtype=torch.uint8)
    want = ops().ternary_gemm(codes, sums, s, rows, 0.3, False, kernels.ISA_SCALAR)
    assert want.shape == (3, 8) and torch.equal(ops().ternary_gemm_lut(codes, sums, s, rows, 0.3, False), want)


def test_table_lookup_gemm_refuses_codes_wider_than_4_bits():
    needs_avx2()
    w, x = random_case(64, 256, 20, seed=3)
    codes, s, sums = ops().quantize_absmax(x, 8, kernels.ISA_AVX2)
    with pytest.raises(RuntimeError, match=r"a code of tokens 0\.\.19 is outside \[-8, 7\]"):
        ops().ternary_gemm_lut(codes, sums, s, kernels.rows_layout(pack_ternary(w)), 1.0, False)


@pytest.mark.parametrize(("spec", "lut"), [(ActivationSpec(method="absmean", bits=4), True),
                                           (ActivationSpec(method="absmax", bits=8), False),
                                           (ActivationSpec(method="fp4_e2m1"), False)])
def test_many_tokens_of_4_bit_integer_inputs_go_through_the_table_lookup(monkeypatch, spec, lut):
    needs_avx2()
    w, x = random_case(96, 256, native.LUT_MIN_TOKENS, seed=8)
    source = QuantLinear.from_ternary(w, torch.tensor([0.02]), spec)
    linear = native.NativeLinear(source, sparse=False)
    assert linear.lut is lut
    called = []
    real = native._ops

    class Counting:
        def __getattr__(self, name):
            op = getattr(real(), name)
            return lambda *args: called.append(name) or op(*args)

    codes = native.quantize(x, spec, linear.isa)
    monkeypatch.setattr(native, "_ops", lambda: Counting())
    many = linear.apply_codes(*codes)
    few = linear.apply_codes(*(c[: native.LUT_MIN_TOKENS - 1] for c in codes))
    assert called == ["ternary_gemm_lut" if lut else "ternary_gemm", "ternary_gemm"]
    assert torch.equal(many[: native.LUT_MIN_TOKENS - 1], few)


def test_scalar_and_avx2_paths_agree_bit_for_bit():
    needs_avx2()
    w, x = random_case(300, 700, 7, seed=1)
    x[2] *= 1e3
    packed = pack_ternary(w)
    scale = F.absmean_scale(x, 4).reshape(-1)
    wb = torch.randn(300, 704, generator=torch.Generator().manual_seed(2)).bfloat16()
    xb = torch.randn(7, 704, generator=torch.Generator().manual_seed(3))
    results = []
    for isa in (kernels.ISA_SCALAR, kernels.ISA_AVX2):
        codes, s, sums = ops().quantize_absmax(x, 8, isa)
        codes4, sums4 = ops().quantize_scaled(x, scale, -8, 7, isa)
        results.append([codes, s, sums, codes4, sums4,
                        ops().ternary_gemm(codes, sums, s, kernels.rows_layout(packed), 0.5, False, isa),
                        ops().ternary_gemm(codes[:1], sums[:1], s[:1], kernels.rows_layout(packed), 0.3, True, isa),
                        ops().ternary_gemm_sparse(codes, sums, s, kernels.cols_layout(packed), 300, 0.5, False, isa),
                        ops().bf16_gemm(xb, wb, isa), ops().bf16_gemm(xb[:1], wb, isa),
                        ops().int8_gemm(xb, *int8_weight(wb), isa), ops().int8_gemm(xb[:1], *int8_weight(wb), isa)])
    for scalar, avx2 in zip(*results, strict=True):
        assert torch.equal(scalar, avx2)


def test_results_do_not_depend_on_the_thread_count():
    w, x = random_case(520, 640, 6, seed=4)
    packed = pack_ternary(w)
    wb = torch.randn(520, 640, generator=torch.Generator().manual_seed(5)).bfloat16()
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            codes, s, sums = ops().quantize_absmax(x, 8, kernels.isa())
            outputs.append([ops().ternary_gemm(codes, sums, s, kernels.rows_layout(packed), 1.0, False,
                                               kernels.isa()),
                            ops().ternary_gemm_sparse(codes, sums, s, kernels.cols_layout(packed), 520, 1.0, False,
                                                      kernels.isa()),
                            # one token: its active columns split over the threads, partial sums added
                            ops().ternary_gemm_sparse(codes[:1], sums[:1], s[:1], kernels.cols_layout(packed), 520,
                                                      1.0, False, kernels.isa()),
                            ops().ternary_gemm_rows(codes, sums, s, kernels.rows_layout(packed),
                                                    torch.arange(519, -1, -3), 1.0, False, kernels.isa()),
                            ops().bf16_gemm(x, wb, kernels.isa()),
                            ops().int8_gemm(x, *int8_weight(wb), kernels.isa())])
            if kernels.isa() == kernels.ISA_AVX2:  # the table-lookup GEMM: its tiles of rows split over the threads
                codes4, s4, sums4 = native.quantize(x, ActivationSpec(method="absmean", bits=4), kernels.isa())
                outputs[-1].append(ops().ternary_gemm_lut(codes4, sums4, s4, kernels.rows_layout(packed), 1.0, False))
    finally:
        torch.set_num_threads(threads)
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other, strict=True))


@pytest.mark.parametrize("tokens", [1, 4])
def test_sparse_gemv_and_chosen_rows_on_edge_cases(tokens):
    """Tokens with no, one, 5% and all non-zero codes (several accumulation groups of column pairs, an odd count),
    alone and together; and the dense kernel over a chosen subset of rows (repeats, any order, none)."""
    g = torch.Generator().manual_seed(7)
    n, k = 300, 1100
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(4, k, generator=g)
    x[0] = 0
    x[1, :] = 0
    x[1, 777] = -2.5
    x[2] *= torch.rand(k, generator=g) < 0.05
    packed = pack_ternary(w)
    rows = torch.tensor([5, 0, 299, 17, 17, 123])
    for isa in isas():
        for first in range(0, 4, tokens):
            codes, s, sums = ops().quantize_absmax(x[first:first + tokens].contiguous(), 8, isa)
            exact = (codes[:, :k].long() @ w.long().t()).float() / s[:, None] * 0.25
            sparse = ops().ternary_gemm_sparse(codes, sums, s, kernels.cols_layout(packed), n, 0.25, False, isa)
            assert torch.equal(sparse, exact)
            chosen = ops().ternary_gemm_rows(codes, sums, s, kernels.rows_layout(packed), rows, 0.25, False, isa)
            assert torch.equal(chosen, exact[:, rows])
            none = ops().ternary_gemm_rows(codes, sums, s, kernels.rows_layout(packed), rows[:0], 0.25, False, isa)
            assert none.shape == (tokens, 0)
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 300 is outside \[0, 300\)"):
        ops().ternary_gemm_rows(codes, sums, s, kernels.rows_layout(packed), torch.tensor([0, 300]), 1.0, False,
                                kernels.isa())


def test_topk_kernel_keeps_a_unique_top_k_and_leaves_ties_to_torch():
    """``topk_sparsify`` equals torch's top-K on every row whose kept set is unique (ties inside the kept set
    included) and flags, untouched, a row whose K-th largest |x| ties with an entry left out, or that holds a NaN."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g)
    x[1, :4] = torch.tensor([9.0, -9.0, 8.0, 8.0])  # ties among the kept entries only
    x[2, :] = 0.0
    x[2, :21] = torch.linspace(1, 2, 21)  # K = 20 of 40: the 20th largest ties with nothing
    x[3, :] = 0.5  # the 20th largest |x| ties with entries left out
    x[4, 7] = math.nan
    x[5, :] = 0.0  # all tied
    y, exact = ops().topk_sparsify(x, 20)
    assert exact.tolist() == [True, True, True, False, False, False]
    assert torch.equal(y[exact], F.topk_sparsify(x[exact], 0.5))
    torch.testing.assert_close(y[~exact], x[~exact], rtol=0, atol=0, equal_nan=True)
    assert (y[0] != 0).sum() == 20 and torch.equal(y[2, :21].ne(0), torch.arange(21) >= 1)
    spec = ActivationSpec(method="absmax", bits=8, topk=0.5)
    assert torch.equal(native._sparsify(spec, x).isnan(), spec.sparsify(x).isnan())
    assert torch.equal(native._sparsify(spec, x).nan_to_num(), spec.sparsify(x).nan_to_num())


@pytest.mark.parametrize("tokens", [1, 3])
def test_relu2_gated_up_is_the_dense_product_computed_on_the_kept_rows(tokens):
    """``relu2_gated_up`` gives relu²(gate) · up with up_proj computed only on the rows some token keeps, equal to
    torch's dense product bit for bit (a NaN gate kept as NaN), scalar and AVX2 alike."""
    g = torch.Generator().manual_seed(11)
    n, k = 200, 300
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(tokens, k, generator=g)
    gate = torch.randn(tokens, n, generator=g) - 1.5
    gate[0, 5] = math.nan
    gate[:, 7] = -0.0
    layout = kernels.rows_layout(pack_ternary(w))
    act = torch.square(torch.relu(gate))
    kept = act.ne(0).any(0).nonzero().flatten()
    for isa in isas():
        codes, s, sums = ops().quantize_absmax(x, 8, isa)
        up = ops().ternary_gemm(codes, sums, s, layout, 0.3, False, isa)
        want = torch.zeros(tokens, n)
        want[:, kept] = act[:, kept] * up[:, kept]
        product, rows = ops().relu2_gated_up(gate, codes, sums, s, layout, 0.3, False, isa)
        assert torch.equal(rows, kept) and 5 in rows.tolist() and 7 not in rows.tolist()
        torch.testing.assert_close(product, want, rtol=0, atol=0, equal_nan=True)
        assert 0 < rows.numel() < 0.5 * n  # most rows skipped: the gate is mostly negative


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 codes and per-row absmax scales of a weight ``[N, K]``, made by the native INT8 lm_head."""
    head = Int8Linear(w)
    return head.weight, head.scale


@pytest.mark.parametrize(("n", "k", "t"), [(5, 3, 1), (40, 100, 3), (33, 2560, 2)])
def test_int8_gemm_is_the_exact_integer_formula(n, k, t):
    """Per-token int16 codes of x (absmax, the largest code that keeps every int32 sum exact), exact integer sums
    with the INT8 weight, then ``acc / s · scale``: the kernel's numbers are this formula's to the bit."""
    g = torch.Generator().manual_seed(n + k)
    w, scale = int8_weight(torch.randn(n, k, generator=g))
    x = torch.randn(t, k, generator=g) * 3
    qmax = min(32767, 2**31 // (127 * k) - 1)
    s = (1.0 / x.abs().amax(dim=1).clamp(min=1e-5)) * qmax
    codes = torch.round(x * s[:, None]).clamp(-qmax, qmax)
    want = (codes.long() @ w.long().t()).float() / s[:, None] * scale
    for isa in isas():
        assert torch.equal(ops().int8_gemm(x, w, scale, isa), want)
    assert torch.equal(F.int8_lm_head(x, w, scale, rows_per_step=16), want)  # the reference backend's INT8 lm_head


def test_int8_gemm_turns_a_row_with_a_nan_or_an_infinity_into_nan():
    """A token whose input holds a NaN or ±inf gets NaN logits from the kernel, as from the torch reference (the
    codes of such a row are not integers), and the other tokens keep their numbers."""
    g = torch.Generator().manual_seed(4)
    w, scale = int8_weight(torch.randn(24, 300, generator=g))
    x = torch.randn(4, 300, generator=g)
    x[1, 7], x[2, 0], x[3, 299] = float("nan"), float("inf"), -float("inf")
    want = F.int8_lm_head(x, w, scale)
    assert want[1:].isnan().all() and not want[0].isnan().any()
    for isa in isas():
        got = ops().int8_gemm(x, w, scale, isa)
        assert got[1:].isnan().all()
        assert torch.equal(got[0], want[0])


def test_the_bf16_kernel_refuses_a_width_it_does_not_take():
    with pytest.raises(ValueError, match=r"in_features a multiple of 8; got torch.bfloat16 \[4, 100\]"):
        native.Bf16Linear(torch.zeros(4, 100, dtype=torch.bfloat16))
