// Decode attention over an in-place KV cache: one new token per sequence. RoPE on its query and key, the key and
// value written into the caches at position `length`, then softmax(q · Kᵀ · scale) · V over positions 0..length,
// for every query head (grouped-query attention: query head h reads KV head h / (heads / kv_heads)).
//
// It replaces, at decode, transformers' apply_rotary_pos_emb, the cache update and SDPA (whose CPU flash kernel
// spends ~160 µs per call on one query at 2B-4T shapes, ~5 ms of a 30-layer token). RoPE is bit-identical to
// transformers' (x · cos + rotate_half(x) · sin, the same fp32 products and sum, no fused multiply-add), so the
// cache holds the reference's keys; the attention sums are ours (8 fp32 lanes with fused multiply-adds, then a fixed
// reduction order), so the output differs from SDPA's by rounding only. Scalar and AVX2 paths perform the same
// IEEE operations in the same order and agree bit for bit; each (sequence, KV head) is computed by one thread, so
// the result does not depend on the thread count.

#include "common.h"
#include "ops.h"

namespace bitnet_convert {
namespace {

// x · cos + rotate_half(x) · sin for one head of width D (rotate_half(x) = [−x[D/2:], x[:D/2]]): each output the
// fp32 sum of two rounded fp32 products, as torch computes it. Compiled without FMA (no target attribute), so the
// compiler cannot fuse the products into the sum.
void rope_head(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i] * cos[i];
    const float b = (-x[i + h]) * sin[i];
    out[i] = a + b;
  }
  for (int64_t i = h; i < D; ++i) {
    const float a = x[i] * cos[i];
    const float b = x[i - h] * sin[i];
    out[i] = a + b;
  }
}

// The fixed reduction of 8 lanes both paths use: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline float reduce8(const float* l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

// Dot product of two fp32 vectors: lane j accumulates x[8i + j] · y[8i + j] with fused multiply-adds, lanes
// reduced by reduce8, then the tail D % 8 added in order.
float dot_scalar(const float* x, const float* y, int64_t D) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) lanes[j] = std::fma(x[d + j], y[d + j], lanes[j]);
  float total = reduce8(lanes);
  for (; d < D; ++d) total = std::fma(x[d], y[d], total);
  return total;
}

// out[d] += p · v[d], one fused multiply-add per element.
void axpy_scalar(float p, const float* v, int64_t D, float* out) {
  for (int64_t d = 0; d < D; ++d) out[d] = std::fma(p, v[d], out[d]);
}

#if BC_X86
BC_AVX2 float dot_avx2(const float* x, const float* y, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float total = reduce8(lanes);
  for (; d < D; ++d) total = std::fma(x[d], y[d], total);
  return total;
}

// dot_avx2 for four query heads at once against one key row (four independent accumulator chains instead of one:
// the fused multiply-add latency is hidden); each head's numbers are dot_avx2's.
BC_AVX2 void dot4_avx2(const float* q, int64_t stride, const float* y, int64_t D, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 yy = _mm256_loadu_ps(y + d);
    for (int g = 0; g < 4; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * stride + d), yy, acc[g]);
  }
  for (int g = 0; g < 4; ++g) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[g]);
    float total = reduce8(lanes);
    for (int64_t j = d; j < D; ++j) total = std::fma(q[g * stride + j], y[j], total);
    out[g] = total;
  }
}

BC_AVX2 void axpy_avx2(float p, const float* v, int64_t D, float* out) {
  const __m256 pp = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + d), _mm256_loadu_ps(out + d)));
  for (; d < D; ++d) out[d] = std::fma(p, v[d], out[d]);
}
#endif

// Attention of the `group` query heads q[g·D .. ] that share one KV head, over L cached positions: scores,
// softmax with the maximum subtracted, the weighted sum of the values divided by the sum of the weights.
// key_row(t, buffer) and value_row(t, buffer) give position t's row of D floats (a pointer into the cache, or the
// buffer filled with the dequantized row); each row is fetched once for the whole group. `scores` has room for
// group · L floats.
template <class KeyRow, class ValueRow>
void attend_group(const float* q, const KeyRow& key_row, const ValueRow& value_row, int64_t L, int64_t D,
                  int64_t group, float scale, int64_t isa, float* scores, float* out) {
  std::vector<float> row(static_cast<size_t>(D));
  for (int64_t t = 0; t < L; ++t) {
    const float* keys = key_row(t, row.data());
    int64_t g = 0;
#if BC_X86
    if (isa == 1)
      for (; g + 4 <= group; g += 4) {
        float dots[4];
        dot4_avx2(q + g * D, D, keys, D, dots);
        for (int j = 0; j < 4; ++j) scores[(g + j) * L + t] = dots[j] * scale;
      }
#endif
    for (; g < group; ++g) {
#if BC_X86
      const float dot = isa == 1 ? dot_avx2(q + g * D, keys, D) : dot_scalar(q + g * D, keys, D);
#else
      const float dot = dot_scalar(q + g * D, keys, D);
#endif
      scores[g * L + t] = dot * scale;
    }
  }
  std::vector<float> total(static_cast<size_t>(group), 0.0f);
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * L;
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < L; ++t) best = sg[t] > best ? sg[t] : best;
    for (int64_t t = 0; t < L; ++t) {
      sg[t] = std::exp(sg[t] - best);
      total[g] += sg[t];
    }
  }
  std::fill(out, out + group * D, 0.0f);
  for (int64_t t = 0; t < L; ++t) {
    const float* values = value_row(t, row.data());
    for (int64_t g = 0; g < group; ++g) {
#if BC_X86
      if (isa == 1) axpy_avx2(scores[g * L + t], values, D, out + g * D);
      else
#endif
        axpy_scalar(scores[g * L + t], values, D, out + g * D);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = out[g * D + d] / total[g];
}

// attend_group for every (sequence b, KV head g) pair, one pair per task (each output computed by one thread):
// q fp32 [B, KVH · group · D] → fp32 [B, KVH · group · D]. rows(b, g) returns the pair's (key_row, value_row).
template <class Rows>
at::Tensor attend_all(const float* q, int64_t B, int64_t KVH, int64_t group, int64_t D, int64_t L, float scale,
                      int64_t isa, const Rows& rows) {
  const int64_t H = KVH * group;
  auto out = at::empty({B, H * D}, at::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(group * L));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, g = i % KVH;
      const auto [key_row, value_row] = rows(b, g);
      attend_group(q + (b * H + g * group) * D, key_row, value_row, L, D, group, scale, isa, scores.data(),
                   op + (b * H + g * group) * D);
    }
  });
  return out;
}

// One part of a packed low-bit cache (quant/kv.py _PackedRows): codes uint8 [B, KVH, capacity, ceil(D·bits/8)]
// (code i of a row in bits i·bits .. i·bits + bits − 1 of its little-endian bit string), a float16 scale and
// (minmax) a float16 zero [B, KVH, capacity, 1].
struct PackedPart {
  const uint8_t* codes;
  const at::Half* scale;
  const at::Half* zero;  // nullptr: absmax
  int64_t bits, bytes, capacity;

  // Row r of (sequence b, KV head g) dequantized as quant/kv.py dequantize computes it: c · s + z (minmax) or
  // (c − 2^(bits−1)) · s (absmax), each step rounded to fp32 (no fused multiply-add: no FMA target here).
  void row(int64_t b, int64_t g, int64_t KVH, int64_t r, int64_t D, float* out) const {
    const int64_t index = (b * KVH + g) * capacity + r;
    const uint8_t* p = codes + index * bytes;
    const float s = static_cast<float>(scale[index]);
    const float z = zero != nullptr ? static_cast<float>(zero[index]) : 0.0f;
    const float half = static_cast<float>(int64_t{1} << (bits - 1));
    const uint32_t mask = (uint32_t{1} << bits) - 1;
    for (int64_t i = 0; i < D; ++i) {
      const int64_t bit = i * bits, byte = bit >> 3;
      const uint32_t window = p[byte] | (byte + 1 < bytes ? static_cast<uint32_t>(p[byte + 1]) << 8 : 0u);
      const float c = static_cast<float>((window >> (bit & 7)) & mask);
      if (zero != nullptr) {
        const float scaled = c * s;
        out[i] = scaled + z;
      } else {
        const float centred = c - half;
        out[i] = centred * s;
      }
    }
  }
};

std::vector<PackedPart> packed_parts(at::TensorList parts, at::IntArrayRef bits, int64_t B, int64_t KVH, int64_t D,
                                     bool minmax, const char* name) {
  TORCH_CHECK(parts.size() == 3 * bits.size() && (bits.size() == 1 || bits.size() == 2), name,
              " must be 1 or 2 parts of (codes, scale, zero) with one bit width each");
  std::vector<PackedPart> out;
  for (size_t i = 0; i < bits.size(); ++i) {
    const at::Tensor &codes = parts[3 * i], &scale = parts[3 * i + 1], &zero = parts[3 * i + 2];
    const int64_t b = bits[i], bytes = (D * b + 7) / 8;
    TORCH_CHECK(b >= 2 && b <= 8, name, ": bits must be in 2..8");
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 4 && codes.size(0) == B &&
                    codes.size(1) == KVH && codes.size(3) == bytes,
                name, ": codes must be contiguous uint8 [B, kv_heads, capacity, ceil(head_dim · bits / 8)]");
    const int64_t capacity = codes.size(2);
    TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == B * KVH * capacity,
                name, ": scale must be contiguous float16 [B, kv_heads, capacity, 1]");
    TORCH_CHECK(!minmax || (zero.scalar_type() == at::kHalf && zero.is_contiguous() &&
                            zero.numel() == B * KVH * capacity),
                name, ": zero must be contiguous float16 [B, kv_heads, capacity, 1] for minmax");
    out.push_back({codes.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(),
                   minmax ? zero.data_ptr<at::Half>() : nullptr, b, bytes, capacity});
  }
  return out;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            int64_t length, double scale, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.scalar_type() == at::kFloat && key_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == at::kFloat &&
                  value_cache.is_contiguous(),
              "key_cache and value_cache must be contiguous fp32 [B, kv_heads, capacity, head_dim] of one shape");
  const int64_t B = key_cache.size(0), KVH = key_cache.size(1), cap = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(length >= 0 && length < cap, "length must be in [0, capacity): got ", length, " for capacity ", cap);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even (RoPE), got ", D);
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == B,
                "q, k, v, cos and sin must be contiguous fp32 [B, ...] with B = ", B);
  TORCH_CHECK(k.size(1) == KVH * D && v.size(1) == KVH * D, "k and v must be [B, kv_heads · head_dim]");
  TORCH_CHECK(cos.size(1) == D && sin.size(1) == D, "cos and sin must be [B, head_dim]");
  TORCH_CHECK(q.size(1) % (KVH * D) == 0, "q must be [B, heads · head_dim] with heads a multiple of kv_heads");
  const int64_t H = q.size(1) / D, group = H / KVH, L = length + 1;

  // RoPE on the new key (into the cache) and value copied, then RoPE on the queries: one thread, D · (H + KVH)
  // elements.
  auto rotated = at::empty({B, H * D}, at::kFloat);
  float* kc = key_cache.data_ptr<float>();
  float* vc = value_cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* cb = cos.data_ptr<float>() + b * D;
    const float* sb = sin.data_ptr<float>() + b * D;
    for (int64_t g = 0; g < KVH; ++g) {
      const int64_t slot = ((b * KVH + g) * cap + length) * D;
      rope_head(k.data_ptr<float>() + (b * KVH + g) * D, cb, sb, D, kc + slot);
      std::memcpy(vc + slot, v.data_ptr<float>() + (b * KVH + g) * D, sizeof(float) * D);
    }
    for (int64_t h = 0; h < H; ++h)
      rope_head(q.data_ptr<float>() + (b * H + h) * D, cb, sb, D, rotated.data_ptr<float>() + (b * H + h) * D);
  }
  return attend_all(rotated.data_ptr<float>(), B, KVH, group, D, L, static_cast<float>(scale), isa,
                    [&](int64_t b, int64_t g) {
                      const float* keys = kc + (b * KVH + g) * cap * D;
                      const float* values = vc + (b * KVH + g) * cap * D;
                      return std::make_pair([keys, D](int64_t t, float*) { return keys + t * D; },
                                            [values, D](int64_t t, float*) { return values + t * D; });
                    });
}

at::Tensor decode_attention_packed(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                                   at::IntArrayRef key_bits, at::IntArrayRef value_bits, int64_t length, bool minmax,
                                   int64_t head_dim, double scale, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(!keys.empty() && keys[0].dim() == 4, "keys must hold 4-D packed codes");
  const int64_t B = keys[0].size(0), KVH = keys[0].size(1), D = head_dim;
  TORCH_CHECK(D > 0 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 2 && q.size(0) == B &&
                  q.size(1) % (KVH * D) == 0,
              "q must be contiguous fp32 [B, heads · head_dim] with heads a multiple of kv_heads");
  TORCH_CHECK(length >= 1, "length must be at least 1, got ", length);
  const int64_t H = q.size(1) / D, group = H / KVH;
  const auto kparts = packed_parts(keys, key_bits, B, KVH, D, minmax, "keys");
  const auto vparts = packed_parts(values, value_bits, B, KVH, D, minmax, "values");
  TORCH_CHECK(kparts.size() == vparts.size(), "keys and values must have the same parts");
  const bool bos = kparts.size() == 2;  // part 0 holds position 0, part 1 positions 1 .. length − 1
  TORCH_CHECK(kparts.back().capacity >= length - (bos ? 1 : 0) && vparts.back().capacity >= length - (bos ? 1 : 0),
              "the packed parts hold fewer positions than length ", length);
  // position 0 from the BOS part when there is one, the others from the last part; each row dequantized into
  // the caller's buffer
  auto fetch = [&](const std::vector<PackedPart>& parts, int64_t b, int64_t g) {
    const PackedPart* first = &parts.front();
    const PackedPart* rest = &parts.back();
    return [first, rest, bos, b, g, KVH, D](int64_t t, float* buffer) -> const float* {
      if (bos && t == 0) first->row(b, g, KVH, 0, D, buffer);
      else rest->row(b, g, KVH, bos ? t - 1 : t, D, buffer);
      return buffer;
    };
  };
  return attend_all(q.data_ptr<float>(), B, KVH, group, D, length, static_cast<float>(scale), isa,
                    [&](int64_t b, int64_t g) { return std::make_pair(fetch(kparts, b, g), fetch(vparts, b, g)); });
}

}  // namespace bitnet_convert
