// The bf16-weight GEMM of the embeddings/lm_head: fp32 products and sums over bf16 weights (bf16 → fp32 is
// exact), without an fp32 copy of the weight.

#include "common.h"
#include "ops.h"

namespace bitnet_convert {
namespace {

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

}  // namespace

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
  // 2 tokens × 4 accumulators fill the 16 vector registers
  for_rows_by_token_pairs(N, T, [&](int64_t n, int64_t t0, int64_t tt) {
    const float* xs[2] = {xp + t0 * K, xp + (t0 + tt - 1) * K};
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
  });
  return y;
}

}  // namespace bitnet_convert
