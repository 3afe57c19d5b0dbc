// The ternary GEMM for many tokens of 4-bit inputs (prefill of the a4.8 q/k/v and gate/up linears) by table lookup:
// two ternary weights of one output row and the two codes they multiply give one of 9 sums, so for each token and
// each pair of inputs a 16-entry table of those sums is made once, and vpshufb looks up 32 output rows' sums in one
// instruction (64 multiply-adds), where vpmaddubsw does 32. The idea is the one of T-MAC (Wei et al., "T-MAC: CPU
// Renaissance via Table Lookup for Low-Bit LLM Deployment on Edge", arXiv 2407.00088) and bitnet.cpp's TL kernels
// (table lookup over groups of low-bit weights); the layout, tables and loops here are ours. Integer sums are exact,
// so the result equals ternary_gemm's (and the scalar path's) bit for bit.
//
// The weights stay in the `rows` layout (ops.cpp): byte i of block b of a row holds the weights of inputs
// 128b + i, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7 (stored as w + 1), so its low nibble indexes the pair of
// inputs (128b + i, 128b + 32 + i) and its high nibble the pair (128b + 64 + i, 128b + 96 + i): a table index
// ua | ub << 2 with no repacking. Each call transposes the weight's bytes in tiles of 32 rows (tile-major, then byte
// position, then row), so that one 32-byte load gives the same byte position of 32 rows; that costs one pass over
// the packed weight, small beside the lookups of many tokens (and no second copy of the weight is kept).

#include "common.h"
#include "ops.h"

#include <atomic>

namespace bitnet_convert {
namespace {

constexpr int64_t kTileRows = 32;   // output rows per lookup (32 byte lanes)
constexpr int64_t kTableBytes = 512 * 1024;  // tables made and used together: half of a 1 MB L2 (2B-4T: 24 tokens)
constexpr int kTokenTile = 6;  // tokens per pass over a tile's weights (their tables and sums in L1)
constexpr uint8_t kZeroWeights = 0x55;  // four weights w = 0 (u = 1): the rows that pad the last tile

// pair_table()[(a & 15) | (b & 15) << 4][ua | ub << 2] = (ua - 1) · a + (ub - 1) · b for codes a, b in [-8, 7] and
// ua, ub in {0, 1, 2} (the entries with a 3, which no weight stores, are 0): |entry| <= 16.
const int8_t* pair_table() {
  static const std::vector<int8_t> table = [] {
    std::vector<int8_t> t(256 * 16, 0);
    for (int a = -8; a < 8; ++a)
      for (int b = -8; b < 8; ++b)
        for (int ua = 0; ua < 3; ++ua)
          for (int ub = 0; ub < 3; ++ub)
            t[((a & 15) | (b & 15) << 4) * 16 + (ua | ub << 2)] = static_cast<int8_t>((ua - 1) * a + (ub - 1) * b);
    return t;
  }();
  return table.data();
}

#if BC_X86
// The tables of one token: tables[u · 32 + h · 16 + 0..15] for byte position u = 32b + i of a row and half h (the
// low nibble's pair of inputs for h = 0, the high nibble's for h = 1). Returns false if a code is outside [-8, 7].
BC_AVX2 bool token_tables(const int8_t* x, int64_t Kp, int8_t* tables) {
  const int8_t* pairs = pair_table();
  const __m256i m4 = _mm256_set1_epi8(15), least = _mm256_set1_epi8(-8), most = _mm256_set1_epi8(7);
  __m256i bad = _mm256_setzero_si256();
  alignas(32) uint8_t index[64];
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + kBlock * b + 64 * h));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + kBlock * b + 64 * h + 32));
      bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi8(least, _mm256_min_epi8(a, c)),
                                                 _mm256_cmpgt_epi8(_mm256_max_epi8(a, c), most)));
      const __m256i idx = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_slli_epi16(_mm256_and_si256(c, m4), 4));
      _mm256_store_si256(reinterpret_cast<__m256i*>(index + 32 * h), idx);
    }
    int8_t* out = tables + b * 32 * 32;
    for (int i = 0; i < 32; ++i)
      for (int h = 0; h < 2; ++h)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * 32 + h * 16),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(pairs + 16 * index[32 * h + i])));
  }
  return _mm256_testz_si256(bad, bad);
}

// 16 rows of 16 bytes (src, row stride `stride`) to 16 columns (dst, column stride `dstride`): four rounds of
// unpacks (8-, 16-, 32-, 64-bit) leave column c in register bitreverse4(c).
BC_AVX2 inline void transpose16(const uint8_t* src, int64_t stride, uint8_t* dst, int64_t dstride) {
  __m128i r[16], a[16], b[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * stride));
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      b[4 * i + j] = _mm_unpacklo_epi16(a[4 * i + j], a[4 * i + 2 + j]);
      b[4 * i + 2 + j] = _mm_unpackhi_epi16(a[4 * i + j], a[4 * i + 2 + j]);
    }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      a[8 * i + j] = _mm_unpacklo_epi32(b[8 * i + j], b[8 * i + 4 + j]);
      a[8 * i + 4 + j] = _mm_unpackhi_epi32(b[8 * i + j], b[8 * i + 4 + j]);
    }
  for (int j = 0; j < 8; ++j) {
    b[j] = _mm_unpacklo_epi64(a[j], a[8 + j]);
    b[8 + j] = _mm_unpackhi_epi64(a[j], a[8 + j]);
  }
  static constexpr int kRegister[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  for (int c = 0; c < 16; ++c) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * dstride), b[kRegister[c]]);
}

// Rows [32 · tile, 32 · tile + 32) of the rows-layout weight w [N, U] (U = Kp/4 bytes per row) as [U][32] bytes;
// rows at or past N are zero weights.
BC_AVX2 void transpose_tile(const uint8_t* w, int64_t N, int64_t U, int64_t tile, uint8_t* out) {
  const int64_t r0 = tile * kTileRows;
  if (r0 + kTileRows <= N) {
    for (int64_t u0 = 0; u0 < U; u0 += 16)
      for (int h = 0; h < 2; ++h) transpose16(w + (r0 + 16 * h) * U + u0, U, out + u0 * kTileRows + 16 * h, kTileRows);
    return;
  }
  for (int64_t u = 0; u < U; ++u)
    for (int64_t r = 0; r < kTileRows; ++r) out[u * kTileRows + r] = r0 + r < N ? w[(r0 + r) * U + u] : kZeroWeights;
}

// out[t · 32 + r] = sum_k w[row r, k] · x[t, k] for the TT tokens whose tables start at `tables` (token stride
// U · 32) over the transposed tile `wt` [U][32]. int8 sums of 6 lookups (<= 96), widened to int16 every 3 byte
// positions, to int32 every 64 such steps (64 · 96 < 2^15).
template <int TT>
BC_AVX2 void lut_tile(const uint8_t* wt, const int8_t* tables, int64_t U, int32_t* out) {
  const __m256i m4 = _mm256_set1_epi8(15);
  __m256i acc16[TT][2], acc32[TT][4];
  for (int t = 0; t < TT; ++t) {
    acc16[t][0] = acc16[t][1] = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) acc32[t][k] = _mm256_setzero_si256();
  }
  const int64_t stride = U * 32;
  for (int64_t q0 = 0, step = 0; q0 < U; q0 += 3, ++step) {
    const int64_t q1 = q0 + 3 < U ? q0 + 3 : U;
    __m256i a8[TT];
    for (int t = 0; t < TT; ++t) a8[t] = _mm256_setzero_si256();
    for (int64_t q = q0; q < q1; ++q) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + q * kTileRows));
      const __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
      for (int t = 0; t < TT; ++t) {
        const int8_t* tb = tables + t * stride + q * 32;
        const __m256i t0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb)));
        const __m256i t1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb + 16)));
        a8[t] = _mm256_add_epi8(a8[t], _mm256_add_epi8(_mm256_shuffle_epi8(t0, lo), _mm256_shuffle_epi8(t1, hi)));
      }
    }
    for (int t = 0; t < TT; ++t) {
      acc16[t][0] = _mm256_add_epi16(acc16[t][0], _mm256_cvtepi8_epi16(_mm256_castsi256_si128(a8[t])));
      acc16[t][1] = _mm256_add_epi16(acc16[t][1], _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a8[t], 1)));
    }
    if (step % 64 == 63 || q1 == U)
      for (int t = 0; t < TT; ++t)
        for (int h = 0; h < 2; ++h) {
          acc32[t][2 * h] =
              _mm256_add_epi32(acc32[t][2 * h], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc16[t][h])));
          acc32[t][2 * h + 1] =
              _mm256_add_epi32(acc32[t][2 * h + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc16[t][h], 1)));
          acc16[t][h] = _mm256_setzero_si256();
        }
  }
  for (int t = 0; t < TT; ++t)
    for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * 32 + 8 * k), acc32[t][k]);
}

BC_AVX2 void lut_tokens(int tt, const uint8_t* wt, const int8_t* tables, int64_t U, int32_t* out) {
  switch (tt) {
    case 6: return lut_tile<6>(wt, tables, U, out);
    case 5: return lut_tile<5>(wt, tables, U, out);
    case 4: return lut_tile<4>(wt, tables, U, out);
    case 3: return lut_tile<3>(wt, tables, U, out);
    case 2: return lut_tile<2>(wt, tables, U, out);
    default: return lut_tile<1>(wt, tables, U, out);
  }
}
#endif

}  // namespace

// y[t, n] = ((sum_k T[n, k] · codes[t, k]) / scale[t]) · alpha (with `divide`: / (scale[t] · alpha)), as
// ternary_gemm computes it, for codes in [-8, 7] (integer inputs of 4 bits or fewer), by table lookup (AVX2 only):
// equal to ternary_gemm's result and to the scalar path's bit for bit. codes int8 [T, Kp] (Kp % 128 == 0), sums int32
// [T] (checked, not used: the lookup sums the weights' signed values directly, so the result equals ternary_gemm's
// for any codes, where ternary_gemm needs sums to be the code sums), scale fp32 [T], w uint8 in the `rows` layout
// [N, Kp/4]. Returns fp32 [T, N]. Raises if the CPU has no AVX2 or a code is outside [-8, 7].
at::Tensor ternary_gemm_lut(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                            const at::Tensor& w, double alpha_d, bool divide) {
  TORCH_CHECK(cpu_has_avx2(), "ternary_gemm_lut needs a CPU with AVX2 (use ternary_gemm)");
  const QuantizedInput in(codes, sums, scale);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 4 == in.Kp,
              "w must be contiguous uint8 [N, Kp/4] matching the codes");
  const int64_t T = in.T, Kp = in.Kp, N = w.size(0), U = Kp / 4;
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  const float alpha = static_cast<float>(alpha_d);
  auto y = at::empty({T, N}, at::kFloat);
  if (U == 0) {  // no inputs: every sum is 0 (ternary_gemm's result for codes of zero width)
    float* yp = y.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) yp[t * N + n] = finish(0, in.scale[t], alpha, divide);
    return y;
  }
#if BC_X86
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  auto transposed = at::empty({tiles * U * kTileRows}, at::kByte);
  uint8_t* wt = transposed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) transpose_tile(wp, N, U, tile, wt + tile * U * kTileRows);
  });
  // tokens per block of tables: a multiple of the pass, the blocks' tables within kTableBytes (measured on 2B-4T
  // shapes, 2 threads: 24 and 48 tokens alike, 96 tokens (1.9 MB) 20-50% slower)
  const int64_t fit = std::max<int64_t>(1, kTableBytes / (U * 32) / kTokenTile) * kTokenTile;
  const int64_t block = T < fit ? T : fit;
  auto tables = at::empty({block * U * 32}, at::kChar);
  int8_t* tp = tables.data_ptr<int8_t>();
  for (int64_t t0 = 0; t0 < T; t0 += block) {
    const int64_t tb = T - t0 < block ? T - t0 : block;
    std::atomic<bool> in_range{true};
    at::parallel_for(0, tb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        if (!token_tables(in.codes + (t0 + t) * Kp, Kp, tp + t * U * 32)) in_range = false;
    });
    TORCH_CHECK(in_range.load(), "ternary_gemm_lut: a code of tokens ", t0, "..", t0 + tb - 1,
                " is outside [-8, 7] (the table-lookup GEMM takes 4-bit or narrower integer inputs)");
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      int32_t acc[kTokenTile * kTileRows];
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t rows = N - tile * kTileRows < kTileRows ? N - tile * kTileRows : kTileRows;
        for (int64_t t = 0; t < tb; t += kTokenTile) {
          const int tt = static_cast<int>(tb - t < kTokenTile ? tb - t : kTokenTile);
          lut_tokens(tt, wt + tile * U * kTileRows, tp + t * U * 32, U, acc);
          for (int j = 0; j < tt; ++j) {
            const int64_t token = t0 + t + j;
            for (int64_t r = 0; r < rows; ++r)
              yp[token * N + tile * kTileRows + r] =
                  finish(acc[j * kTileRows + r], in.scale[token], alpha, divide);
          }
        }
      }
    });
  }
#else
  TORCH_CHECK(false, "ternary_gemm_lut needs an x86 CPU with AVX2");
#endif
  return y;
}

}  // namespace bitnet_convert
