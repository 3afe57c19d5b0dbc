// The INT8-weight GEMM of the lm_head (an explicit option of the native backend): weights int8 with one fp32 scale
// per output row (absmax), each token's fp32 input quantized per token to int16 codes, exact int32 sums (AVX2
// vpmaddwd, 16 products per instruction), then y = (float)acc / s_x · scale_row. Half the bytes of a bf16 lm_head.

#include "common.h"
#include "ops.h"

namespace bitnet_convert {
namespace {

// The largest int16 code such that no int32 sum of K products with |w| <= 127 can overflow in either path (the
// scalar one adds all K products into one int32): K · 127 · q_max < 2^31.
int32_t int16_code_max(int64_t K) {
  const int64_t bound = (int64_t{1} << 31) / (127 * (K > 0 ? K : 1)) - 1;
  return static_cast<int32_t>(bound < 32767 ? bound : 32767);
}

int32_t dot_int8_scalar(const int8_t* w, const int16_t* x, int64_t K) {
  int32_t acc = 0;
  for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(w[k]) * x[k];
  return acc;
}

#if BC_X86
// sum_k w[n, k] · x[t, k] for one row and TT tokens (TT = 1, 2): 16 weights widened to int16 once, multiplied with
// each token's codes (vpmaddwd) into int32 lanes; the tail k % 16 in scalar code (exact: integer sums).
template <int TT>
BC_AVX2 void dot_int8_avx2(const int8_t* w, const int16_t* const* x, int64_t K, int32_t* out) {
  __m256i acc[TT][2];
  for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int h = 0; h < 2; ++h) {
      const __m256i w16 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * h)));
      for (int t = 0; t < TT; ++t)
        acc[t][h] = _mm256_add_epi32(
            acc[t][h], _mm256_madd_epi16(w16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[t] + k + 16 * h))));
    }
  for (int t = 0; t < TT; ++t) {
    int32_t total = hsum_epi32(_mm256_add_epi32(acc[t][0], acc[t][1]));
    for (int64_t j = k; j < K; ++j) total += static_cast<int32_t>(w[j]) * x[t][j];
    out[t] = total;
  }
}
#endif

}  // namespace

// y[t, n] = (sum_k w[n, k] · q[t, k]) / s[t] · scale[n] with q = round_half_even(x · s) clamped to ±q_max, s[t] =
// q_max / max(max|x[t]|, eps) (q_max from int16_code_max(K)). x fp32 [T, K], w int8 [N, K], scale fp32 [N].
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "w must be contiguous int8 [N, K] matching x");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.size(0) == w.size(0) &&
                  scale.is_contiguous(),
              "scale must be contiguous fp32 [N]");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  const float qmax = static_cast<float>(int16_code_max(K));
  std::vector<int16_t> codes(static_cast<size_t>(T * K), 0);
  std::vector<float> sx(static_cast<size_t>(T));
  const float* xp = x.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float gamma = 0.0f;
    for (int64_t k = 0; k < K; ++k) gamma = std::fabs(xp[t * K + k]) > gamma ? std::fabs(xp[t * K + k]) : gamma;
    for (int64_t k = 0; k < K; ++k)  // NaN is not ordered: a NaN row's scale is NaN
      if (std::isnan(xp[t * K + k])) gamma = xp[t * K + k];
    const float s = (1.0f / (gamma < kEps ? kEps : gamma)) * qmax;
    sx[t] = s;
    if (!std::isfinite(gamma)) {  // a NaN or an infinity in the row: every output NaN, as the torch reference
      sx[t] = std::numeric_limits<float>::quiet_NaN();  // (a NaN code) gives; the codes stay 0 (a NaN cast to
      continue;                                          // int16 is undefined)
    }
    for (int64_t k = 0; k < K; ++k) {
      float v = std::nearbyint(xp[t * K + k] * s);
      v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
      codes[t * K + k] = static_cast<int16_t>(v);
    }
  }
  auto y = at::empty({T, N}, at::kFloat);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* scp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows_by_token_pairs(N, T, [&](int64_t n, int64_t t0, int64_t tt) {
    const int16_t* xs[2] = {codes.data() + t0 * K, codes.data() + (t0 + tt - 1) * K};
    int32_t acc[2];
#if BC_X86
    if (isa == 1) {
      if (tt == 2) dot_int8_avx2<2>(wp + n * K, xs, K, acc);
      else dot_int8_avx2<1>(wp + n * K, xs, K, acc);
    } else
#endif
    {
      for (int64_t j = 0; j < tt; ++j) acc[j] = dot_int8_scalar(wp + n * K, xs[j], K);
    }
    for (int64_t j = 0; j < tt; ++j) yp[(t0 + j) * N + n] = static_cast<float>(acc[j]) / sx[t0 + j] * scp[n];
  });
  return y;
}

}  // namespace bitnet_convert
