// Integer CPU kernels of bitnet-convert's native backend: per-token activation quantizers, ternary GEMM/GEMV on
// 2-bit packed weights with exact int32 accumulation, a sparse-input GEMV that skips the weight columns of zero
// inputs, and a bf16-weight GEMM for the embeddings/lm_head.
//
// Every operation has two paths chosen per call (`isa`: 0 = portable scalar C++, 1 = AVX2). Integer results are
// exact in both; the float steps (quantizer scaling, final scaling, the bf16 GEMM's fp32 sums) are written so that
// both paths perform the same IEEE operations in the same order, so the two paths agree bit for bit. Work is split
// over output rows (or 128-output blocks) with at::parallel_for; no reduction crosses a split, so results do not
// depend on the thread count.
//
// Weight layouts (built by bitnet_convert/native/build.py from the checkpoint's packing):
//   rows  [N, Kp/4] uint8: row n holds its Kp inputs in blocks of 128; byte i (0..31) of block b holds the weights
//         of inputs b*128 + 32*p + i in bits 2p..2p+1 (p = 0..3), stored as value + 1 in {0, 1, 2}.
//   cols  [Np/256, Kp, 64] uint8, block-major: for each block of 256 outputs, one 64-byte line per input column
//         (see ternary_gemm_sparse). Used by the sparse-input GEMV, which reads only the lines of non-zero inputs.
// Kp is K rounded up to a multiple of 128, Np is N rounded up to a multiple of 256; padding weights are 0 (stored
// 1) and padding inputs are 0.
//
// With weights stored as u = w + 1, sum_k w_k x_k = sum_k u_k x_k - sum_k x_k: the AVX2 path multiplies the
// unsigned u bytes with the signed int8 codes (vpmaddubsw, no saturation possible: |2·2·128| < 2^15) and
// subtracts the code sum once per output.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 128;  // inputs (or outputs) per packed block
constexpr float kEps = 1e-5f;    // lower bound of every scale statistic (quant/functional.py: EPS)

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define BC_X86 1
#define BC_AVX2 __attribute__((target("avx2,fma")))
#else
#define BC_X86 0
#define BC_AVX2
#endif

bool cpu_has_avx2_impl() {
#if BC_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa == 0 || isa == 1, "isa must be 0 (scalar) or 1 (avx2), got ", isa);
  TORCH_CHECK(isa == 0 || cpu_has_avx2_impl(), "isa 1 (avx2) requested but this CPU has no AVX2/FMA");
}

// ------------------------------------------------------------------------------------------ quantizers

// codes[t, k] = clamp(round_half_even(x[t, k] * s[t]), lo, hi) for k < K, 0 for K <= k < Kp; sums[t] = sum codes.
// The product is one IEEE fp32 multiply and the rounding is round-half-to-even in both paths, which is what
// quant/functional.py's round_clip does (torch.round).
void quantize_row_scalar(const float* x, int64_t K, int64_t Kp, float s, float lo, float hi, int8_t* out,
                         int32_t* sum) {
  int32_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] * s);
    v = v < lo ? lo : (v > hi ? hi : v);
    out[k] = static_cast<int8_t>(v);
    total += out[k];
  }
  for (int64_t k = K; k < Kp; ++k) out[k] = 0;
  *sum = total;
}

#if BC_X86
BC_AVX2 void quantize_row_avx2(const float* x, int64_t K, int64_t Kp, float s, float lo, float hi, int8_t* out,
                               int32_t* sum) {
  const __m256 vs = _mm256_set1_ps(s), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  int32_t total = 0;
  int64_t k = 0;
  alignas(32) int32_t lanes[8];
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_cvtps_epi32(v));
    for (int j = 0; j < 8; ++j) {
      out[k + j] = static_cast<int8_t>(lanes[j]);
      total += lanes[j];
    }
  }
  int32_t tail = 0;
  quantize_row_scalar(x + k, K - k, K - k, s, lo, hi, out + k, &tail);
  for (int64_t j = K; j < Kp; ++j) out[j] = 0;
  *sum = total + tail;
}

BC_AVX2 float absmax_avx2(const float* x, int64_t K) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = 0.0f;
  for (int j = 0; j < 8; ++j) r = lanes[j] > r ? lanes[j] : r;
  for (; k < K; ++k) r = std::fabs(x[k]) > r ? std::fabs(x[k]) : r;
  return r;
}
#endif

float absmax_scalar(const float* x, int64_t K) {
  float r = 0.0f;
  for (int64_t k = 0; k < K; ++k) r = std::fabs(x[k]) > r ? std::fabs(x[k]) : r;
  return r;
}

int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// Per-token absmax to signed `bits`-bit codes (b1.58 Eq. 4 for 8 bits): s = (1 / max(max|x|, eps)) · qp, exactly
// the fp32 operations of torch's `qp / t` (Tensor.__rtruediv__ is reciprocal() * other). A NaN maximum propagates
// (max is order-independent, so both paths agree). Returns (codes [T, Kp] int8, s [T] fp32, code sums [T] int32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_absmax(const at::Tensor& x, int64_t bits, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, K]");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in 2..8");
  const int64_t T = x.size(0), K = x.size(1), Kp = padded(K);
  const float qp = static_cast<float>((1 << (bits - 1)) - 1);
  auto codes = at::empty({T, Kp}, at::kChar);
  auto scale = at::empty({T}, at::kFloat);
  auto sums = at::empty({T}, at::kInt);
  const float* xp = x.data_ptr<float>();
  int8_t* cp = codes.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* up = sums.data_ptr<int32_t>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * K;
#if BC_X86
      float gamma = isa == 1 ? absmax_avx2(row, K) : absmax_scalar(row, K);
#else
      float gamma = absmax_scalar(row, K);
#endif
      for (int64_t k = 0; k < K; ++k)  // NaN is not ordered: make a NaN row's scale NaN, as torch.amax does
        if (std::isnan(row[k])) gamma = row[k];
      const float clamped = gamma < kEps ? kEps : gamma;
      const float s = (1.0f / clamped) * qp;
      sp[t] = s;
#if BC_X86
      if (isa == 1) {
        quantize_row_avx2(row, K, Kp, s, -qp - 1.0f, qp, cp + t * Kp, up + t);
        continue;
      }
#endif
      quantize_row_scalar(row, K, Kp, s, -qp - 1.0f, qp, cp + t * Kp, up + t);
    }
  });
  return {codes, scale, sums};
}

// codes = clamp(round(x · s[t]), lo, hi) with a per-token multiplier computed by the caller (absmean, FP4).
std::tuple<at::Tensor, at::Tensor> quantize_scaled(const at::Tensor& x, const at::Tensor& s, int64_t lo, int64_t hi,
                                                   int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, K]");
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0) && s.scalar_type() == at::kFloat && s.is_contiguous(),
              "s must be contiguous fp32 [T]");
  TORCH_CHECK(lo >= -128 && hi <= 127 && lo < hi, "codes must fit int8");
  const int64_t T = x.size(0), K = x.size(1), Kp = padded(K);
  auto codes = at::empty({T, Kp}, at::kChar);
  auto sums = at::empty({T}, at::kInt);
  const float* xp = x.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  int8_t* cp = codes.data_ptr<int8_t>();
  int32_t* up = sums.data_ptr<int32_t>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
#if BC_X86
      if (isa == 1) {
        quantize_row_avx2(xp + t * K, K, Kp, sp[t], float(lo), float(hi), cp + t * Kp, up + t);
        continue;
      }
#endif
      quantize_row_scalar(xp + t * K, K, Kp, sp[t], float(lo), float(hi), cp + t * Kp, up + t);
    }
  });
  return {codes, sums};
}

// ------------------------------------------------------------------------------- dense ternary GEMM

// Final scaling shared by every path: y = (float)acc / s · alpha, or with `divide` (a scale stored as 1/alpha, the
// bitlinear convention) y = (float)acc / (s · scale) as transformers' BitLinear computes it. |acc| <= Kp · 128 < 2^24,
// so the conversion is exact; the float operations are the reference QuantLinear's, in its order.
inline float finish(int32_t acc, float s, float scale, bool divide) {
  return divide ? static_cast<float>(acc) / (s * scale) : static_cast<float>(acc) / s * scale;
}

int32_t dot_row_scalar(const uint8_t* w, const int8_t* x, int64_t Kp) {
  int32_t acc = 0;
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
    const uint8_t* wb = w + b * 32;
    const int8_t* xb = x + b * kBlock;
    for (int p = 0; p < 4; ++p)
      for (int i = 0; i < 32; ++i) acc += static_cast<int32_t>((wb[i] >> (2 * p)) & 3) * xb[32 * p + i];
  }
  return acc;
}

#if BC_X86
BC_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// sum_k u[n, k] · x[t, k] for one row n and TT tokens (TT = 1..4), int16 partial sums widened every 8 blocks
// (8 blocks · 4 planes · 512 < 2^15).
template <int TT>
BC_AVX2 void dot_rows_avx2(const uint8_t* w, const int8_t* const* x, int64_t Kp, int32_t* out) {
  const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i acc32[TT];
  for (int t = 0; t < TT; ++t) acc32[t] = _mm256_setzero_si256();
  const int64_t nb = Kp / kBlock;
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t b1 = b0 + 8 < nb ? b0 + 8 : nb;
    __m256i acc16[TT];
    for (int t = 0; t < TT; ++t) acc16[t] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32));
      const __m256i u0 = _mm256_and_si256(wv, m3);
      const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), m3);
      const __m256i u2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m3);
      const __m256i u3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), m3);
      for (int t = 0; t < TT; ++t) {
        const int8_t* xb = x[t] + b * kBlock;
        __m256i s0 = _mm256_maddubs_epi16(u0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
        __m256i s1 = _mm256_maddubs_epi16(u1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32)));
        __m256i s2 = _mm256_maddubs_epi16(u2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64)));
        __m256i s3 = _mm256_maddubs_epi16(u3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 96)));
        acc16[t] = _mm256_add_epi16(acc16[t], _mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3)));
      }
    }
    for (int t = 0; t < TT; ++t) acc32[t] = _mm256_add_epi32(acc32[t], _mm256_madd_epi16(acc16[t], ones));
  }
  for (int t = 0; t < TT; ++t) out[t] = hsum_epi32(acc32[t]);
}
#endif

void check_codes(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous() &&
                  codes.size(1) % kBlock == 0,
              "codes must be contiguous int8 [T, Kp] with Kp % 128 == 0");
  TORCH_CHECK(sums.scalar_type() == at::kInt && sums.numel() == codes.size(0) && sums.is_contiguous(),
              "sums must be int32 [T]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == codes.size(0) && scale.is_contiguous(),
              "scale must be fp32 [T]");
}

// y[t, n] = ((sum_k T[n, k] · codes[t, k]) / scale[t]) · alpha with T the ternary weight in the `rows` layout
// (with `divide`: / (scale[t] · alpha), see finish()).
at::Tensor ternary_gemm(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                        const at::Tensor& w, double alpha_d, bool divide, int64_t isa) {
  check_isa(isa);
  check_codes(codes, sums, scale);
  const int64_t T = codes.size(0), Kp = codes.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 4 == Kp,
              "w must be contiguous uint8 [N, Kp/4] matching the codes");
  const float alpha = static_cast<float>(alpha_d);
  auto y = at::empty({T, N}, at::kFloat);
  const int8_t* cp = codes.data_ptr<int8_t>();
  const int32_t* up = sums.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // 64 rows of weights (<= 64 · Kp/4 bytes) stay in L2 while a 4-token tile of codes sits in L1
  constexpr int64_t kRowTile = 64;
  const int64_t grain = T == 1 ? 64 : 16;
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kRowTile) {
      const int64_t r1 = r0 + kRowTile < end ? r0 + kRowTile : end;
      for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t tt = T - t0 < 4 ? T - t0 : 4;
        const int8_t* xs[4];
        for (int64_t j = 0; j < 4; ++j) xs[j] = cp + (t0 + (j < tt ? j : 0)) * Kp;
        for (int64_t n = r0; n < r1; ++n) {
          const uint8_t* wr = wp + n * (Kp / 4);
          int32_t acc[4];
#if BC_X86
          if (isa == 1) {
            if (tt == 4) dot_rows_avx2<4>(wr, xs, Kp, acc);
            else if (tt == 3) dot_rows_avx2<3>(wr, xs, Kp, acc);
            else if (tt == 2) dot_rows_avx2<2>(wr, xs, Kp, acc);
            else dot_rows_avx2<1>(wr, xs, Kp, acc);
          } else
#endif
          {
            for (int64_t j = 0; j < tt; ++j) acc[j] = dot_row_scalar(wr, xs[j], Kp);
          }
          for (int64_t j = 0; j < tt; ++j)
            yp[(t0 + j) * N + n] = finish(acc[j] - up[t0 + j], sp[t0 + j], alpha, divide);
        }
      }
    }
  });
  return y;
}

// ----------------------------------------------------------------------- sparse-input ternary GEMM

// Active inputs of one token: column indices with a non-zero code, padded to an even count with a zero-code entry
// so the AVX2 path can take them in pairs.
// `pair[j]` packs the codes of columns col[2j] and col[2j + 1] as the int16 the AVX2 path broadcasts.
struct Active {
  std::vector<int32_t> col;
  std::vector<int8_t> val;
  std::vector<int16_t> pair;
};

Active active_columns(const int8_t* x, int64_t Kp) {
  Active a;
  a.col.resize(Kp + 1);
  a.val.resize(Kp + 1);
  size_t n = 0;
  for (int64_t k = 0; k < Kp; ++k) {  // branch-free: the zero pattern is random
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
  return a;
}

// The `cols` layout, block-major: [Np/256][Kp][64] uint8. For output block c (256 outputs) and input column k, one
// 64-byte cache line holds the column's 256 weights: bytes 32h + i (h = 0, 1; i = 0..31) hold outputs
// 256c + 128h + 32p + i in bits 2p..2p+1. A column whose code is zero is never read, so the bytes read from memory
// are the active share of the weight, line for line.
constexpr int64_t kColBlock = 256;
constexpr int64_t kLine = 64;

// acc[o] (o < 256, output block c) = sum over active k of u[o, k] · x[k].
void sparse_block_scalar(const uint8_t* w, int64_t Kp, int64_t c, const Active& a, int32_t* acc) {
  for (int o = 0; o < kColBlock; ++o) acc[o] = 0;
  const uint8_t* region = w + c * Kp * kLine;
  for (size_t j = 0; j < a.col.size(); ++j) {
    const uint8_t* line = region + static_cast<int64_t>(a.col[j]) * kLine;
    const int32_t v = a.val[j];
    for (int h = 0; h < 2; ++h)
      for (int p = 0; p < 4; ++p)
        for (int i = 0; i < 32; ++i)
          acc[128 * h + 32 * p + i] += static_cast<int32_t>((line[32 * h + i] >> (2 * p)) & 3) * v;
  }
}

#if BC_X86
// Output block c, one 128-output half at a time so that the 8 int16 accumulators stay in registers: the u bytes
// of a pair of active columns are interleaved (vpunpck{l,h}bw) and multiplied with the pair of codes
// (vpmaddubsw), 16 sums of two products per instruction, widened to int32 every 32 pairs (32 · 2 · 2 · 128 <
// 2^15). vpunpcklbw interleaves bytes 0–7 and 16–23, vpunpckhbw 8–15 and 24–31. The first half prefetches the
// lines of the pairs ahead; the second finds them in cache.
BC_AVX2 void sparse_block_avx2(const uint8_t* w, int64_t Kp, int64_t c, const Active& a, int32_t* acc) {
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int o = 0; o < kColBlock; ++o) acc[o] = 0;
  const uint8_t* region = w + c * Kp * kLine;
  const size_t pairs = a.col.size() / 2;
  constexpr size_t kAhead = 24;
  for (int h = 0; h < 2; ++h) {
    for (size_t j0 = 0; j0 < pairs; j0 += 32) {
      const size_t j1 = j0 + 32 < pairs ? j0 + 32 : pairs;
      __m256i lo[4], hi[4];
      for (int p = 0; p < 4; ++p) lo[p] = hi[p] = _mm256_setzero_si256();
      for (size_t j = j0; j < j1; ++j) {
        if (h == 0 && j + kAhead < pairs) {
          _mm_prefetch(reinterpret_cast<const char*>(region + static_cast<int64_t>(a.col[2 * (j + kAhead)]) * kLine),
                       _MM_HINT_T1);
          _mm_prefetch(
              reinterpret_cast<const char*>(region + static_cast<int64_t>(a.col[2 * (j + kAhead) + 1]) * kLine),
              _MM_HINT_T1);
        }
        const uint8_t* la = region + static_cast<int64_t>(a.col[2 * j]) * kLine + 32 * h;
        const uint8_t* lb = region + static_cast<int64_t>(a.col[2 * j + 1]) * kLine + 32 * h;
        const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(la));
        const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lb));
        const __m256i xv = _mm256_set1_epi16(a.pair[j]);
        for (int p = 0; p < 4; ++p) {
          const __m256i ua = _mm256_and_si256(_mm256_srli_epi16(va, 2 * p), m3);
          const __m256i ub = _mm256_and_si256(_mm256_srli_epi16(vb, 2 * p), m3);
          lo[p] = _mm256_add_epi16(lo[p], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(ua, ub), xv));
          hi[p] = _mm256_add_epi16(hi[p], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(ua, ub), xv));
        }
      }
      // lo[p] lanes 0–7 → outputs 32p + 0..7, lanes 8–15 → 32p + 16..23; hi[p]: 32p + 8..15 and 32p + 24..31
      for (int p = 0; p < 4; ++p) {
        const __m256i parts[2] = {lo[p], hi[p]};
        for (int k = 0; k < 2; ++k)
          for (int half = 0; half < 2; ++half) {
            const __m128i v16 = half ? _mm256_extracti128_si256(parts[k], 1) : _mm256_castsi256_si128(parts[k]);
            int32_t* dst = acc + 128 * h + 32 * p + 16 * half + 8 * k;
            const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_add_epi32(d, _mm256_cvtepi16_epi32(v16)));
          }
      }
    }
  }
}
#endif

// y[t, n] as ternary_gemm, with T in the `cols` layout [Np/256, Kp, 64]; reads only the columns of non-zero codes.
at::Tensor ternary_gemm_sparse(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                               const at::Tensor& w, int64_t N, double alpha_d, bool divide, int64_t isa) {
  check_isa(isa);
  check_codes(codes, sums, scale);
  const int64_t T = codes.size(0), Kp = codes.size(1);
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) == Kp &&
                  w.size(2) == kLine && N <= w.size(0) * kColBlock,
              "w must be contiguous uint8 [Np/256, Kp, 64] matching the codes");
  const int64_t blocks = w.size(0);
  const float alpha = static_cast<float>(alpha_d);
  auto y = at::empty({T, N}, at::kFloat);
  const int8_t* cp = codes.data_ptr<int8_t>();
  const int32_t* up = sums.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  std::vector<Active> active(T);
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) active[t] = active_columns(cp + t * Kp, Kp);
  });
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    int32_t acc[kColBlock];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t o0 = c * kColBlock, o1 = o0 + kColBlock < N ? o0 + kColBlock : N;
      for (int64_t t = 0; t < T; ++t) {
#if BC_X86
        if (isa == 1) sparse_block_avx2(wp, Kp, c, active[t], acc);
        else
#endif
          sparse_block_scalar(wp, Kp, c, active[t], acc);
        for (int64_t o = o0; o < o1; ++o) yp[t * N + o] = finish(acc[o - o0] - up[t], sp[t], alpha, divide);
      }
    }
  });
  return y;
}

// Share of zero codes over the first K columns (diagnostics for the benchmark).
double zero_share(const at::Tensor& codes, int64_t K) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(), "int8 [T, Kp]");
  const int8_t* cp = codes.data_ptr<int8_t>();
  int64_t zeros = 0;
  for (int64_t t = 0; t < codes.size(0); ++t)
    for (int64_t k = 0; k < K; ++k) zeros += cp[t * codes.size(1) + k] == 0;
  return codes.size(0) ? double(zeros) / double(codes.size(0) * K) : 0.0;
}

// ------------------------------------------------------------------------------------ bf16 GEMM

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One output: four accumulators of eight fp32 lanes (accumulator j takes k = 32i + 8j + lane, so four fused
// multiply-add chains run at once instead of waiting on one), the tail k % 32 into accumulator 0, then
// ((acc0 + acc1) + (acc2 + acc3)) and the same pairwise lane reduction as the AVX2 path, so both paths round
// identically. K % 8 == 0.
float dot_bf16_scalar(const uint16_t* w, const float* x, int64_t K) {
  float lane[4][8] = {};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 8; ++l)
        lane[j][l] = std::fma(bf16_to_float(w[k + 8 * j + l]), x[k + 8 * j + l], lane[j][l]);
  for (; k < K; k += 8)
    for (int l = 0; l < 8; ++l) lane[0][l] = std::fma(bf16_to_float(w[k + l]), x[k + l], lane[0][l]);
  float v[8];
  for (int l = 0; l < 8; ++l) v[l] = (lane[0][l] + lane[1][l]) + (lane[2][l] + lane[3][l]);
  const float a0 = v[0] + v[4], a1 = v[1] + v[5], a2 = v[2] + v[6], a3 = v[3] + v[7];
  const float b0 = a0 + a2, b1 = a1 + a3;
  return b0 + b1;
}

#if BC_X86
BC_AVX2 inline float hsum_ps(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // a_l = lane_l + lane_{l+4}
  __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));                                  // b_0 = a0 + a2, b_1 = a1 + a3
  __m128 c = _mm_add_ss(b, _mm_shuffle_ps(b, b, 0x55));                           // b0 + b1
  return _mm_cvtss_f32(c);
}

BC_AVX2 inline __m256 bf16x8(const uint16_t* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <int TT>
BC_AVX2 void dot_bf16_avx2(const uint16_t* w, const float* const* x, int64_t K, float* out) {
  __m256 acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < 4; ++j) acc[t][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int j = 0; j < 4; ++j) {
      const __m256 wf = bf16x8(w + k + 8 * j);
      for (int t = 0; t < TT; ++t) acc[t][j] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x[t] + k + 8 * j), acc[t][j]);
    }
  for (; k < K; k += 8) {
    const __m256 wf = bf16x8(w + k);
    for (int t = 0; t < TT; ++t) acc[t][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x[t] + k), acc[t][0]);
  }
  for (int t = 0; t < TT; ++t)
    out[t] = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
}
#endif

// y[t, n] = sum_k W[n, k] · x[t, k] with W bf16 [N, K] (read as raw int16 bits), x fp32 [T, K]; fp32 products
// and sums (bf16 → fp32 is exact). For the lm_head of a bf16 export: no fp32 copy of the weight is made.
at::Tensor bf16_gemm(const at::Tensor& x, const at::Tensor& w, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be contiguous bf16 [N, K]");
  TORCH_CHECK(x.size(1) % 8 == 0, "K must be a multiple of 8");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({T, N}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  constexpr int64_t kRowTile = 16;
  at::parallel_for(0, N, T == 1 ? 256 : kRowTile, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kRowTile) {
      const int64_t r1 = r0 + kRowTile < end ? r0 + kRowTile : end;
      for (int64_t t0 = 0; t0 < T; t0 += 2) {  // 2 tokens × 4 accumulators fill the 16 vector registers
        const int64_t tt = T - t0 < 2 ? T - t0 : 2;
        const float* xs[2];
        for (int64_t j = 0; j < 2; ++j) xs[j] = xp + (t0 + (j < tt ? j : 0)) * K;
        for (int64_t n = r0; n < r1; ++n) {
          float out[2];
#if BC_X86
          if (isa == 1) {
            if (tt == 2) dot_bf16_avx2<2>(wp + n * K, xs, K, out);
            else dot_bf16_avx2<1>(wp + n * K, xs, K, out);
          } else
#endif
          {
            for (int64_t j = 0; j < tt; ++j) out[j] = dot_bf16_scalar(wp + n * K, xs[j], K);
          }
          for (int64_t j = 0; j < tt; ++j) yp[(t0 + j) * N + n] = out[j];
        }
      }
    }
  });
  return y;
}

bool cpu_has_avx2() { return cpu_has_avx2_impl(); }

}  // namespace

TORCH_LIBRARY(bitnet_convert, m) {
  m.def("cpu_has_avx2() -> bool", &cpu_has_avx2);
  m.def("quantize_absmax(Tensor x, int bits, int isa) -> (Tensor, Tensor, Tensor)", &quantize_absmax);
  m.def("quantize_scaled(Tensor x, Tensor s, int lo, int hi, int isa) -> (Tensor, Tensor)", &quantize_scaled);
  m.def("ternary_gemm(Tensor codes, Tensor sums, Tensor scale, Tensor w, float alpha, bool divide, int isa) -> Tensor",
        &ternary_gemm);
  m.def("ternary_gemm_sparse(Tensor codes, Tensor sums, Tensor scale, Tensor w, int n, float alpha, bool divide, "
        "int isa) -> Tensor",
        &ternary_gemm_sparse);
  m.def("zero_share(Tensor codes, int k) -> float", &zero_share);
  m.def("bf16_gemm(Tensor x, Tensor w, int isa) -> Tensor", &bf16_gemm);
}
