// The sparse-input ternary GEMV over the `cols` layout (see ops.cpp): for each token, only the weight columns of
// its non-zero input codes are read, each one contiguous run of Np/4 bytes, so the bytes read from memory are the
// active share of the weight. Used where a4.8 makes inputs sparse: the top-K input of o_proj (50% zeros) and the
// relu² input of down_proj (70–90%).

#include "common.h"
#include "ops.h"

namespace bitnet_convert {
namespace {

// Active inputs of one token: column indices with a non-zero code, padded to an even count with a zero-code entry
// (column 0) so that they go in pairs. `pair[j]` packs the codes of columns col[2j] and col[2j + 1] as the int16 the
// AVX2 path broadcasts (low byte: col[2j]).
struct Active {
  std::vector<int32_t> col;
  std::vector<int8_t> val;
  std::vector<int16_t> pair;
  size_t pairs() const { return pair.size(); }
};

#if BC_X86
// The non-zero codes of x[0, Kp) 32 at a time: a compare and a bit mask per 32 codes, then one entry per set bit.
// Returns the count written to col/val; *done = Kp.
BC_AVX2 size_t active_avx2(const int8_t* x, int64_t Kp, int32_t* col, int8_t* val, int64_t* done) {
  size_t n = 0;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k = 0; k < Kp; k += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
    uint32_t mask = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zero)));
    while (mask) {
      const int i = __builtin_ctz(mask);
      col[n] = static_cast<int32_t>(k + i);
      val[n] = x[k + i];
      ++n;
      mask &= mask - 1;
    }
  }
  *done = Kp;
  return n;
}
#endif

// The active columns of the codes x [Kp] into `a` (its buffers reused from call to call). Either path lists the
// same columns in the same order.
void active_columns(const int8_t* x, int64_t Kp, int64_t isa, Active& a) {
  a.col.resize(Kp + 1);
  a.val.resize(Kp + 1);
  size_t n = 0;
  int64_t k = 0;
#if BC_X86
  if (isa == 1) n = active_avx2(x, Kp, a.col.data(), a.val.data(), &k);
#endif
  for (; k < Kp; ++k) {  // branch-free: the zero pattern is random
    a.col[n] = static_cast<int32_t>(k);
    a.val[n] = x[k];
    n += x[k] != 0;
  }
  if (n % 2) {
    a.col[n] = 0;
    a.val[n] = 0;
    ++n;
  }
  a.col.resize(n);
  a.val.resize(n);
  a.pair.resize(n / 2);
  for (size_t j = 0; j < n / 2; ++j)
    a.pair[j] = static_cast<int16_t>(static_cast<uint8_t>(a.val[2 * j]) |
                                     (static_cast<uint16_t>(static_cast<uint8_t>(a.val[2 * j + 1])) << 8));
}

// Pairs of active columns per group, whose columns (Np/4 bytes each) stay in L1 while it is computed; its int16
// sums cannot overflow (16 pairs · 2 products · 2 (largest u) · 128 < 2^15).
constexpr size_t kGroup = 16;

// acc[o] (o < Np) += sum over the active columns of pairs [j0, j1) of u[o, col] · x[col].
void group_scalar(const uint8_t* w, int64_t Np, const Active& a, size_t j0, size_t j1, int32_t* acc) {
  for (size_t j = 2 * j0; j < 2 * j1; ++j) {
    const uint8_t* column = w + static_cast<int64_t>(a.col[j]) * (Np / 4);
    const int32_t v = a.val[j];
    for (int64_t c = 0; c < Np / kBlock; ++c)
      for (int p = 0; p < 4; ++p)
        for (int i = 0; i < 32; ++i)
          acc[kBlock * c + 32 * p + i] += static_cast<int32_t>((column[32 * c + i] >> (2 * p)) & 3) * v;
  }
}

#if BC_X86
// One 128-output chunk at a time, its 8 int16 accumulators in registers over the group's pairs: the u bytes of a
// pair of columns are interleaved (vpunpck{l,h}bw: bytes 0–7 and 16–23, 8–15 and 24–31), each 2-bit plane masked
// out and multiplied with the pair of codes (vpmaddubsw: 16 sums of two products per instruction), then widened to
// int32 into acc. While a group is computed, the columns of the group that follows (pairs from `next`) are
// prefetched into L2 (prefetcht1, which keeps the L1 miss buffers free: 85% zero inputs, cold 2B-4T down_proj
// weights, 0.26-0.28 of the dense kernel's time against 0.42-0.50 with prefetcht0), one line per column at each even
// chunk, so the next group streams in meanwhile.
BC_AVX2 void group_avx2(const uint8_t* w, int64_t Np, const Active& a, size_t j0, size_t j1, size_t next,
                        int32_t* acc) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const int64_t stride = Np / 4;
  const size_t ahead = next < a.pairs() ? (a.pairs() - next < j1 - j0 ? a.pairs() - next : j1 - j0) : 0;
  for (int64_t c = 0; c < Np / kBlock; ++c) {
    __m256i lo[4], hi[4];
    for (int p = 0; p < 4; ++p) lo[p] = hi[p] = _mm256_setzero_si256();
    for (size_t j = j0; j < j1; ++j) {
      const uint8_t* la = w + static_cast<int64_t>(a.col[2 * j]) * stride + 32 * c;
      const uint8_t* lb = w + static_cast<int64_t>(a.col[2 * j + 1]) * stride + 32 * c;
      if (j - j0 < ahead)  // one line of the next group per step: line c/2 of its column 2(j - j0) + c % 2
        __builtin_prefetch(w + a.col[2 * (next + j - j0) + (c & 1)] * stride + 64 * (c / 2), 0, 2);
      const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(la));
      const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lb));
      const __m256i il = _mm256_unpacklo_epi8(va, vb), ih = _mm256_unpackhi_epi8(va, vb);
      const __m256i xv = _mm256_set1_epi16(a.pair[j]);
      for (int p = 0; p < 4; ++p) {
        lo[p] = _mm256_add_epi16(lo[p], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(il, 2 * p), m3), xv));
        hi[p] = _mm256_add_epi16(hi[p], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(ih, 2 * p), m3), xv));
      }
    }
    // lo[p] lanes 0–7 → outputs 32p + 0..7, lanes 8–15 → 32p + 16..23; hi[p]: 32p + 8..15 and 32p + 24..31
    for (int p = 0; p < 4; ++p) {
      const __m256i parts[2] = {lo[p], hi[p]};
      for (int k = 0; k < 2; ++k)
        for (int half = 0; half < 2; ++half) {
          const __m128i v16 = half ? _mm256_extracti128_si256(parts[k], 1) : _mm256_castsi256_si128(parts[k]);
          int32_t* dst = acc + kBlock * c + 32 * p + 16 * half + 8 * k;
          const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_add_epi32(d, _mm256_cvtepi16_epi32(v16)));
        }
    }
  }
}
#endif

void accumulate(const uint8_t* w, int64_t Np, const Active& a, size_t j0, size_t j1, int32_t* acc, int64_t isa) {
  // the first group has no group before it to prefetch it: start its first lines now
  for (size_t j = 2 * j0; j < 2 * std::min(j1, j0 + kGroup); ++j)
    __builtin_prefetch(w + static_cast<int64_t>(a.col[j]) * (Np / 4), 0, 3);
  for (size_t g = j0; g < j1; g += kGroup) {
    const size_t g1 = g + kGroup < j1 ? g + kGroup : j1;
#if BC_X86
    if (isa == 1) {
      group_avx2(w, Np, a, g, g1, g1 < j1 ? g1 : a.pairs(), acc);
      continue;
    }
#endif
    group_scalar(w, Np, a, g, g1, acc);
  }
}

}  // namespace

// y[t, n] as ternary_gemm, with T in the `cols` layout [Kp, Np/4]; reads only the columns of non-zero codes.
// Few tokens (decode): each token's active columns are split over the threads, whose int32 partial sums are added
// (exact: the result does not depend on the split). Many tokens (prefill): one token per thread.
at::Tensor ternary_gemm_sparse(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                               const at::Tensor& w, int64_t N, double alpha_d, bool divide, int64_t isa) {
  check_isa(isa);
  const QuantizedInput in(codes, sums, scale);
  const int64_t T = in.T, Kp = in.Kp;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) == Kp &&
                  (w.size(1) * 4) % kBlock == 0 && N <= w.size(1) * 4,
              "w must be contiguous uint8 [Kp, Np/4] matching the codes");
  const int64_t Np = w.size(1) * 4;
  const float alpha = static_cast<float>(alpha_d);
  auto y = at::empty({T, N}, at::kFloat);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // Reused by the calling thread (no allocation per call once the sizes are reached). A named reference: inside
  // the parallel lambdas, the thread_local itself would name each worker thread's own instance.
  thread_local std::vector<Active> reused;
  std::vector<Active>& active = reused;
  if (static_cast<int64_t>(active.size()) < T) active.resize(T);
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) active_columns(in.codes + t * Kp, Kp, isa, active[t]);
  });
  auto write = [&](int64_t t, const int32_t* acc) {
    for (int64_t o = 0; o < N; ++o) yp[t * N + o] = finish(acc[o] - in.sums[t], in.scale[t], alpha, divide);
  };
  const int64_t threads = at::get_num_threads();
  if (T >= 2 * threads) {
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> acc(Np);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0);
        accumulate(wp, Np, active[t], 0, active[t].pairs(), acc.data(), isa);
        write(t, acc.data());
      }
    });
    return y;
  }
  std::vector<int32_t> partial(static_cast<size_t>(threads) * Np);
  std::vector<int32_t> total(Np);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(partial.begin(), partial.end(), 0);
    const int64_t groups = static_cast<int64_t>((active[t].pairs() + kGroup - 1) / kGroup);
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      int32_t* acc = partial.data() + static_cast<int64_t>(at::get_thread_num()) * Np;
      accumulate(wp, Np, active[t], begin * kGroup, std::min<size_t>(end * kGroup, active[t].pairs()), acc, isa);
    });
    std::fill(total.begin(), total.end(), 0);
    for (int64_t th = 0; th < threads; ++th)
      for (int64_t o = 0; o < Np; ++o) total[o] += partial[th * Np + o];
    write(t, total.data());
  }
  return y;
}

}  // namespace bitnet_convert
