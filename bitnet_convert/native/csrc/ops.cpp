// Integer CPU kernels of bitnet-convert's native backend: per-token activation quantizers and top-K (quantize.cpp),
// ternary GEMM/GEMV on 2-bit packed weights with exact int32 accumulation, over all output rows or a chosen subset
// of them, and the gated relu² FFN product that computes only the up_proj rows relu² keeps (ternary_dense.cpp), the
// same GEMM by table lookup for many tokens of 4-bit inputs (ternary_lut.cpp), a
// sparse-input GEMV that reads only the weight columns of non-zero inputs (ternary_sparse.cpp), a bf16-weight GEMM
// for the embeddings/lm_head (bf16_gemm.cpp), an INT8-weight GEMM for the lm_head (int8_gemm.cpp), and for the
// decode step RMSNorm fused with the next linear's quantizer (norm.cpp) and attention over an in-place KV cache
// (attention.cpp). This file
// registers them under torch.ops.bitnet_convert and holds what they share.
//
// Every operation has two paths chosen per call (`isa`: 0 = portable scalar C++, 1 = AVX2). Integer results are
// exact in both; the float steps (quantizer scaling, final scaling, the bf16 GEMM's fp32 sums) are written so that
// both paths perform the same IEEE operations in the same order, so the two paths agree bit for bit. Work is split
// with at::parallel_for; a float reduction never crosses a split (integer partial sums may: they are exact), so
// results do not depend on the thread count.
//
// Weight layouts (built by bitnet_convert/native/build.py from the checkpoint's packing):
//   rows  [N, Kp/4] uint8: row n holds its Kp inputs in blocks of 128; byte i (0..31) of block b holds the weights
//         of inputs b*128 + 32*p + i in bits 2p..2p+1 (p = 0..3), stored as value + 1 in {0, 1, 2}.
//   cols  [Kp, Np/4] uint8, column-contiguous: column k holds its Np outputs in chunks of 128; byte i of chunk c
//         holds the weights of outputs c*128 + 32*p + i in bits 2p..2p+1. The sparse-input GEMV reads only the
//         columns of non-zero inputs, each one contiguous run of Np/4 bytes.
// Kp is K rounded up to a multiple of 128, Np is N rounded up to a multiple of 128; padding weights are 0 (stored
// 1) and padding inputs are 0.
//
// With weights stored as u = w + 1, sum_k w_k x_k = sum_k u_k x_k - sum_k x_k: the AVX2 paths multiply the
// unsigned u bytes with the signed int8 codes (vpmaddubsw, no saturation possible: |2·2·128| < 2^15) and
// subtract the code sum once per output.

#include <torch/library.h>

#include "common.h"
#include "ops.h"

namespace bitnet_convert {

bool cpu_has_avx2() {
#if BC_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa == 0 || isa == 1, "isa must be 0 (scalar) or 1 (avx2), got ", isa);
  TORCH_CHECK(isa == 0 || cpu_has_avx2(), "isa 1 (avx2) requested but this CPU has no AVX2/FMA");
}

QuantizedInput::QuantizedInput(const at::Tensor& c, const at::Tensor& u, const at::Tensor& s) {
  TORCH_CHECK(c.dim() == 2 && c.scalar_type() == at::kChar && c.is_contiguous() && c.size(1) % kBlock == 0,
              "codes must be contiguous int8 [T, Kp] with Kp % 128 == 0");
  TORCH_CHECK(u.scalar_type() == at::kInt && u.numel() == c.size(0) && u.is_contiguous(), "sums must be int32 [T]");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == c.size(0) && s.is_contiguous(), "scale must be fp32 [T]");
  T = c.size(0);
  Kp = c.size(1);
  codes = c.data_ptr<int8_t>();
  sums = u.data_ptr<int32_t>();
  scale = s.data_ptr<float>();
}

}  // namespace bitnet_convert

TORCH_LIBRARY(bitnet_convert, m) {
  using namespace bitnet_convert;
  m.def("cpu_has_avx2() -> bool", &cpu_has_avx2);
  m.def("quantize_absmax(Tensor x, int bits, int isa) -> (Tensor, Tensor, Tensor)", &quantize_absmax);
  m.def("quantize_scaled(Tensor x, Tensor s, int lo, int hi, int isa) -> (Tensor, Tensor)", &quantize_scaled);
  m.def("ternary_gemm(Tensor codes, Tensor sums, Tensor scale, Tensor w, float alpha, bool divide, int isa) -> Tensor",
        &ternary_gemm);
  m.def("ternary_gemm_lut(Tensor codes, Tensor sums, Tensor scale, Tensor w, float alpha, bool divide) -> Tensor",
        &ternary_gemm_lut);
  m.def("ternary_gemm_rows(Tensor codes, Tensor sums, Tensor scale, Tensor w, Tensor rows, float alpha, bool divide, "
        "int isa) -> Tensor",
        &ternary_gemm_rows);
  m.def("ternary_gemm_sparse(Tensor codes, Tensor sums, Tensor scale, Tensor w, int n, float alpha, bool divide, "
        "int isa) -> Tensor",
        &ternary_gemm_sparse);
  m.def("relu2_gated_up(Tensor gate, Tensor codes, Tensor sums, Tensor scale, Tensor w, float alpha, bool divide, "
        "int isa) -> (Tensor, Tensor)",
        &relu2_gated_up);
  m.def("topk_sparsify(Tensor x, int k) -> (Tensor, Tensor)", &topk_sparsify);
  m.def("zero_share(Tensor codes, int k) -> float", &zero_share);
  m.def("bf16_gemm(Tensor x, Tensor w, int isa) -> Tensor", &bf16_gemm);
  m.def("int8_gemm(Tensor x, Tensor w, Tensor scale, int isa) -> Tensor", &int8_gemm);
  m.def("rms_norm_codes(Tensor x, Tensor weight, float eps, int method, int bits, int topk, int isa) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)",
        &rms_norm_codes);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) key_cache, "
        "Tensor(b!) value_cache, int length, float scale, int isa) -> Tensor",
        &decode_attention);
  m.def("decode_attention_packed(Tensor q, Tensor[] keys, Tensor[] values, int[] key_bits, int[] value_bits, "
        "int length, bool minmax, int head_dim, float scale, int isa) -> Tensor",
        &decode_attention_packed);
  m.def("decode_layer(Tensor x, Tensor[] norm_weights, float[] norm_eps, int[] norm_method, int[] norm_bits, "
        "int[] norm_topk, Tensor[] weights, float[] alphas, int[] divides, int[] sparse, int[] out_features, "
        "Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, int length, float scaling, bool gated, "
        "int isa) "
        "-> Tensor",
        &decode_layer);
}
