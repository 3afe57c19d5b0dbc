// The ops bitnet-convert's native backend registers under torch.ops.bitnet_convert (see ops.cpp), one kernel
// family per file.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace bitnet_convert {

// quantize.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_absmax(const at::Tensor& x, int64_t bits, int64_t isa);
std::tuple<at::Tensor, at::Tensor> quantize_scaled(const at::Tensor& x, const at::Tensor& s, int64_t lo, int64_t hi,
                                                   int64_t isa);
std::tuple<at::Tensor, at::Tensor> topk_sparsify(const at::Tensor& x, int64_t k);
double zero_share(const at::Tensor& codes, int64_t K);

// ternary_dense.cpp
at::Tensor ternary_gemm(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale, const at::Tensor& w,
                        double alpha, bool divide, int64_t isa);
at::Tensor ternary_gemm_rows(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                             const at::Tensor& w, const at::Tensor& rows, double alpha, bool divide, int64_t isa);
std::tuple<at::Tensor, at::Tensor> relu2_gated_up(const at::Tensor& gate, const at::Tensor& codes,
                                                  const at::Tensor& sums, const at::Tensor& scale, const at::Tensor& w,
                                                  double alpha, bool divide, int64_t isa);

// ternary_lut.cpp
at::Tensor ternary_gemm_lut(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                            const at::Tensor& w, double alpha, bool divide);

// ternary_sparse.cpp
at::Tensor ternary_gemm_sparse(const at::Tensor& codes, const at::Tensor& sums, const at::Tensor& scale,
                               const at::Tensor& w, int64_t N, double alpha, bool divide, int64_t isa);

// bf16_gemm.cpp
at::Tensor bf16_gemm(const at::Tensor& x, const at::Tensor& w, int64_t isa);

// norm.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_codes(
    const at::Tensor& x, const at::Tensor& weight, double eps, int64_t method, int64_t bits, int64_t topk,
    int64_t isa);

// attention.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            int64_t length, double scale, int64_t isa);
at::Tensor decode_attention_packed(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                                   at::IntArrayRef key_bits, at::IntArrayRef value_bits, int64_t length, bool minmax,
                                   int64_t head_dim, double scale, int64_t isa);

// decode_layer.cpp
at::Tensor decode_layer(const at::Tensor& x, at::TensorList norm_weights, at::ArrayRef<double> norm_eps,
                        at::IntArrayRef norm_method, at::IntArrayRef norm_bits, at::IntArrayRef norm_topk,
                        at::TensorList weights, at::ArrayRef<double> alphas, at::IntArrayRef divides,
                        at::IntArrayRef sparse, at::IntArrayRef out_features, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        int64_t length, double scaling, bool gated, int64_t isa);

// int8_gemm.cpp
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t isa);

}  // namespace bitnet_convert
