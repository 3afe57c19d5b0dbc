// The dense ternary GEMM/GEMV over the `rows` layout (see ops.cpp): every output row, or a chosen subset of rows
// (the up_proj rows that relu²(gate) keeps at decode).

#include "common.h"
#include "ops.h"

namespace bitnet_convert {
namespace {

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

}  // namespace

namespace {

// y[t, j] for output rows rows[j] (j < R; rows == nullptr: row j), the input of the weights in the `rows` layout.
at::Tensor gemm_rows(const QuantizedInput& in, const at::Tensor& w, const int64_t* rows, int64_t R, double alpha_d,
                     bool divide, int64_t isa) {
  const int64_t T = in.T, Kp = in.Kp;
  const float alpha = static_cast<float>(alpha_d);
  auto y = at::empty({T, R}, at::kFloat);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // 64 rows of weights (<= 64 · Kp/4 bytes) stay in L2 while a 4-token tile of codes sits in L1
  constexpr int64_t kRowTile = 64;
  constexpr int64_t kAhead = 8;
  const int64_t grain = T == 1 ? 64 : 16;
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kRowTile) {
      const int64_t r1 = r0 + kRowTile < end ? r0 + kRowTile : end;
      for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t tt = T - t0 < 4 ? T - t0 : 4;
        const int8_t* xs[4];
        for (int64_t j = 0; j < 4; ++j) xs[j] = in.codes + (t0 + (j < tt ? j : 0)) * Kp;
        for (int64_t r = r0; r < r1; ++r) {
          const uint8_t* wr = wp + (rows ? rows[r] : r) * (Kp / 4);
          // chosen rows are scattered runs of Kp/4 bytes, which the hardware prefetcher does not follow: fetch the
          // row kAhead rows on while this one is computed (first token tile only: later tiles find them cached),
          // into L2 (prefetcht1): an L1 prefetch holds one of the few L1 miss buffers per line and limits the lines
          // in flight (measured on 2B-4T up_proj shapes, cold weights, 30% of the rows: 0.66-0.71 of the dense
          // kernel's time with 8 rows ahead into L2, 0.88-1.04 with 4 rows ahead into L1)
          if (rows && t0 == 0 && r + kAhead < end)
            for (int64_t line = 0; line < Kp / 4; line += 64)
              __builtin_prefetch(wp + rows[r + kAhead] * (Kp / 4) + line, 0, 2);
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
            yp[(t0 + j) * R + r] = finish(acc[j] - in.sums[t0 + j], in.scale[t0 + j], alpha, divide);
        }
      }
    }
  });
  return y;
}

void check_rows_layout(const at::Tensor& w, int64_t Kp) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 4 == Kp,
              "w must be contiguous uint8 [N, Kp/4] matching the codes");
}

}  // namespace

// y[t, n] = ((sum_k T[n, k] · codes[t, k]) / scale[t]) · alpha with T the ternary weight in the `rows` layout
// (with `divide`: / (scale[t] · alpha), see finish()).
at::Tensor ternary_gemm(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                        const at::Tensor& w, double alpha, bool divide, int64_t isa) {
  check_isa(isa);
  const QuantizedInput in(codes, sums, scale);
  check_rows_layout(w, in.Kp);
  return gemm_rows(in, w, nullptr, w.size(0), alpha, divide, isa);
}

// The gated relu² FFN's product at decode (transformers' BitNetMLP: relu²(gate_proj(x)) · up_proj(x)) with up_proj
// computed only where it is needed: act[t, i] = relu(gate[t, i])² (one fp32 multiply, as torch.square; relu keeps
// NaN, as torch.relu does); the rows i with act[t, i] != 0 for some token t are the only up_proj rows read; the
// product is act · up there and 0 elsewhere — the same IEEE multiplies as the dense path, so equal to it bit for
// bit. gate fp32 [T, I]; the up_proj input codes as for ternary_gemm and its weight w in the `rows` layout
// [I, Kp/4]. Returns (product fp32 [T, I], rows int64 [R]: the up_proj rows computed, ascending).
std::tuple<at::Tensor, at::Tensor> relu2_gated_up(const at::Tensor& gate, const at::Tensor& codes,
                                                  const at::Tensor& sums, const at::Tensor& scale, const at::Tensor& w,
                                                  double alpha, bool divide, int64_t isa) {
  check_isa(isa);
  const QuantizedInput in(codes, sums, scale);
  check_rows_layout(w, in.Kp);
  TORCH_CHECK(gate.dim() == 2 && gate.scalar_type() == at::kFloat && gate.is_contiguous() && gate.size(0) == in.T &&
                  gate.size(1) == w.size(0),
              "gate must be contiguous fp32 [T, N] for the codes' T and the weight's N");
  const int64_t T = in.T, I = gate.size(1);
  auto act = at::empty({T, I}, at::kFloat);
  const float* gp = gate.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  std::vector<int64_t> chosen;
  chosen.reserve(I);
  for (int64_t i = 0; i < I; ++i) {
    bool active = false;
    for (int64_t t = 0; t < T; ++t) {
      const float g = gp[t * I + i];
      const float r = g <= 0.0f ? 0.0f : g;  // NaN stays NaN
      ap[t * I + i] = r * r;
      active = active || ap[t * I + i] != 0.0f;
    }
    if (active) chosen.push_back(i);
  }
  const int64_t R = static_cast<int64_t>(chosen.size());
  auto rows = at::empty({R}, at::kLong);
  std::copy(chosen.begin(), chosen.end(), rows.data_ptr<int64_t>());
  const at::Tensor up = gemm_rows(in, w, chosen.data(), R, alpha, divide, isa);
  auto product = at::zeros({T, I}, at::kFloat);
  const float* upp = up.data_ptr<float>();
  float* pp = product.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < R; ++j) pp[t * I + chosen[j]] = ap[t * I + chosen[j]] * upp[t * R + j];
  return {product, rows};
}

// y[t, j] = ternary_gemm's y[t, rows[j]]: only the chosen output rows are read and computed (int64 [R], each in
// [0, N)).
at::Tensor ternary_gemm_rows(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                             const at::Tensor& w, const at::Tensor& rows, double alpha, bool divide, int64_t isa) {
  check_isa(isa);
  const QuantizedInput in(codes, sums, scale);
  check_rows_layout(w, in.Kp);
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows must be int64 [R]");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < rows.numel(); ++j)
    TORCH_CHECK(rp[j] >= 0 && rp[j] < w.size(0), "rows[", j, "] = ", rp[j], " is outside [0, ", w.size(0), ")");
  return gemm_rows(in, w, rp, rows.numel(), alpha, divide, isa);
}

}  // namespace bitnet_convert
