// Shared by every kernel file of bitnet-convert's native backend: constants, the ISA switch, the final scaling and
// the checks of the quantized-input operands. See ops.cpp for the list of ops and the conventions they share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define BC_X86 1
#define BC_AVX2 __attribute__((target("avx2,fma")))
#else
#define BC_X86 0
#define BC_AVX2
#endif

namespace bitnet_convert {

constexpr int64_t kBlock = 128;  // inputs (or outputs) per packed block
constexpr float kEps = 1e-5f;    // lower bound of every scale statistic (quant/functional.py: EPS)

bool cpu_has_avx2();
void check_isa(int64_t isa);

inline int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// Final scaling shared by every path: y = (float)acc / s · alpha, or with `divide` (a scale stored as 1/alpha, the
// bitlinear convention) y = (float)acc / (s · scale) as transformers' BitLinear computes it. |acc| <= Kp · 128 < 2^24,
// so the conversion is exact; the float operations are the reference QuantLinear's, in its order.
inline float finish(int32_t acc, float s, float scale, bool divide) {
  return divide ? static_cast<float>(acc) / (s * scale) : static_cast<float>(acc) / s * scale;
}

// The quantized input of a ternary GEMM: codes int8 [T, Kp] (Kp % 128 == 0), their sums int32 [T] and the
// per-token multiplier s fp32 [T] (x̂ = codes / s), checked and as raw pointers.
struct QuantizedInput {
  int64_t T, Kp;
  const int8_t* codes;
  const int32_t* sums;
  const float* scale;
  QuantizedInput(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale);
};

// Calls tile(n, t0, tt) for every output row n < N and every tile of tt <= 2 tokens starting at t0 < T: the loop
// order of the float-input GEMMs of the lm_head (bf16_gemm.cpp, int8_gemm.cpp), whose per-row work keeps two
// tokens' accumulators in registers. Rows go to the threads in tiles of 16 (256 at one token); each output is
// computed by one thread, so the results do not depend on the thread count.
template <class Tile>
void for_rows_by_token_pairs(int64_t N, int64_t T, const Tile& tile) {
  constexpr int64_t kRowTile = 16;
  at::parallel_for(0, N, T == 1 ? 256 : kRowTile, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kRowTile) {
      const int64_t r1 = r0 + kRowTile < end ? r0 + kRowTile : end;
      for (int64_t t0 = 0; t0 < T; t0 += 2) {
        const int64_t tt = T - t0 < 2 ? T - t0 : 2;
        for (int64_t n = r0; n < r1; ++n) tile(n, t0, tt);
      }
    }
  });
}

#if BC_X86
BC_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

}  // namespace bitnet_convert
