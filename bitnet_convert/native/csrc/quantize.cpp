// Per-token activation quantizers: fp32 rows to int8 codes, the multiplier s and the code sums (absmax here;
// absmean and FP4 E2M1 compute s in torch and use quantize_scaled), and the zero share of codes.

#include "common.h"
#include "ops.h"

namespace bitnet_convert {
namespace {

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

}  // namespace

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

// Top-K per token (a4.8 Eq. 1): y[t] keeps the k largest |x[t, j]| and zeroes the rest, for every row where that set
// is unique: the k-th largest |x| (found with nth_element) is not tied with an entry left out. Where it is tied, or
// the row holds a NaN, the set depends on torch.topk's tie-break: exact[t] is false, y[t] is left as x[t], and the
// caller takes that row from torch. Returns (y fp32 [T, K], exact bool [T]).
std::tuple<at::Tensor, at::Tensor> topk_sparsify(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, K]");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(k >= 1 && k <= K, "k must be in 1..K, got ", k);
  auto y = x.clone();
  auto exact = at::empty({T}, at::kBool);
  float* yp = y.data_ptr<float>();
  bool* ep = exact.data_ptr<bool>();
  // tokens split over the threads in chunks: each row's result is its own (the same at any thread count)
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> magnitude(K);
    for (int64_t t = begin; t < end; ++t) {
      float* row = yp + t * K;
      bool nan = false;
      for (int64_t j = 0; j < K; ++j) {
        magnitude[j] = std::fabs(row[j]);
        nan = nan || std::isnan(row[j]);
      }
      if (nan) {
        ep[t] = false;
        continue;
      }
      std::nth_element(magnitude.begin(), magnitude.begin() + (k - 1), magnitude.end(), std::greater<float>());
      const float kth = magnitude[k - 1];
      int64_t above = 0, tied = 0;
      for (int64_t j = 0; j < K; ++j) {
        const float m = std::fabs(row[j]);
        above += m > kth;
        tied += m == kth;
      }
      ep[t] = above + tied == k;
      if (!ep[t]) continue;
      for (int64_t j = 0; j < K; ++j)
        if (std::fabs(row[j]) < kth) row[j] = 0.0f;
    }
  });
  return {y, exact};
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

}  // namespace bitnet_convert
