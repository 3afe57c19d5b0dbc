// RMSNorm followed by the per-token quantizer of the linear it feeds, in one call: the decode step's replacement
// for some fifteen small torch ops per norm (transformers' RMSNorm, then the quantizer's reductions and scaling).
// The sums (of x², of |x|) are torch's own at::sum, called from here, and every other step is the same fp32
// operation as in torch (no fused multiply-add), so the codes are the module path's to the bit: the reference
// backend's.

#include "common.h"
#include "ops.h"

namespace bitnet_convert {

// EPS of quant/functional.py as the Python float torch receives (the clamp compares in fp32 either way).
constexpr double kEpsScalar = 1e-5;

namespace {

// torch's mean over the last dimension of a [T, K] tensor: its own sum (a cascade whose order we do not repeat),
// then the division by K in fp32, as at::mean computes it.
at::Tensor row_sums(const at::Tensor& values) { return at::sum(values, {-1}).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_codes(
    const at::Tensor& x, const at::Tensor& weight, double eps, int64_t method, int64_t bits, int64_t topk,
    int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, K]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "weight must be contiguous fp32 [K]");
  TORCH_CHECK(method == 0 || method == 1, "method must be 0 (absmax) or 1 (absmean), got ", method);
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in 2..8");
  const int64_t T = x.size(0), K = x.size(1);
  const float kf = static_cast<float>(K);
  // transformers' RMSNorm: weight · (x · rsqrt(mean(x²) + eps)). x² is x · x (torch's pow with exponent 2), the
  // sum is torch's, and mean + eps and rsqrt (1 / sqrt, both correctly rounded) are the same fp32 operations.
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < T * K; ++i) yp[i] = xp[i] * xp[i];
  const at::Tensor squares = row_sums(y);
  const float* sq = squares.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t t = 0; t < T; ++t) {
    const float r = 1.0f / std::sqrt(sq[t] / kf + e);
    for (int64_t k = 0; k < K; ++k) {
      const float scaled = xp[t * K + k] * r;
      yp[t * K + k] = wp[k] * scaled;
    }
  }
  at::Tensor z = y, exact;
  if (topk > 0) {
    std::tie(z, exact) = topk_sparsify(y, topk);
    const at::Tensor tied = exact.logical_not().nonzero().flatten();
    if (tied.numel() > 0) {
      // a token whose K-th largest |y| is tied with an entry left out (or that holds a NaN): its kept set is
      // torch's top-K's, computed as quant/functional.py topk_mask does (the same ops, so the same tie-break)
      const at::Tensor rows = y.index_select(0, tied);
      const at::Tensor kept = std::get<1>(rows.abs().topk(topk, -1, /*largest=*/true, /*sorted=*/false));
      const at::Tensor mask = at::zeros_like(rows, rows.options().dtype(at::kBool)).scatter_(-1, kept, true);
      z.index_copy_(0, tied, rows * mask);
    }
  } else {
    exact = at::ones({T}, at::kBool);
  }
  if (method == 0) {
    auto [codes, s, sums] = quantize_absmax(z, bits, isa);
    return {codes, s, sums, y, exact};
  }
  // absmean (quant/functional.py absmean_scale): s = √qp / max(mean|z|, EPS), computed as torch does
  // (`scalar / t` is `t.reciprocal() * scalar`, the scalar in fp32; the clamp keeps a NaN); rounding in the kernel
  const int64_t qp = (int64_t{1} << (bits - 1)) - 1;
  const float root = static_cast<float>(std::sqrt(static_cast<double>(qp)));
  const float eps_mean = static_cast<float>(kEpsScalar);
  auto magnitudes = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  float* mp = magnitudes.data_ptr<float>();
  for (int64_t i = 0; i < T * K; ++i) mp[i] = std::fabs(zp[i]);
  const at::Tensor abs_sums = row_sums(magnitudes);
  auto s = at::empty({T}, at::kFloat);
  for (int64_t t = 0; t < T; ++t) {
    float mean = abs_sums.data_ptr<float>()[t] / kf;
    mean = std::isnan(mean) ? mean : (mean < eps_mean ? eps_mean : mean);
    s.data_ptr<float>()[t] = (1.0f / mean) * root;
  }
  auto [codes, sums] = quantize_scaled(z, s, -qp - 1, qp, isa);
  return {codes, s, sums, y, exact};
}

}  // namespace bitnet_convert
