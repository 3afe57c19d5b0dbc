// One BitNet decoder layer for B decoded tokens in one call: the decode step's sequence of kernel calls
// (native/decode.py, layer_rows) run from C++, so that a layer costs one Python call and one dispatch instead of
// twelve. The same functions in the same order: the result is the Python sequence's to the bit.

#include "common.h"
#include "ops.h"

namespace bitnet_convert {

namespace {

// The linears of a layer, in the order the op takes them.
enum Linear { kQ, kK, kV, kO, kGate, kUp, kDown, kLinears };
// The norms, each feeding the linears after it: input (q/k/v), attn_sub (o), post_attention (gate/up), ffn_sub (down).
enum Norm { kInput, kAttnSub, kPostAttention, kFfnSub, kNorms };

struct Codes {
  at::Tensor codes, s, sums;
};

}  // namespace

at::Tensor decode_layer(const at::Tensor& x, at::TensorList norm_weights, at::ArrayRef<double> norm_eps,
                        at::IntArrayRef norm_method, at::IntArrayRef norm_bits, at::IntArrayRef norm_topk,
                        at::TensorList weights, at::ArrayRef<double> alphas, at::IntArrayRef divides,
                        at::IntArrayRef sparse, at::IntArrayRef out_features, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        int64_t length, double scaling, bool gated, int64_t isa) {
  TORCH_CHECK(norm_weights.size() == kNorms && norm_eps.size() == kNorms && norm_method.size() == kNorms &&
                  norm_bits.size() == kNorms && norm_topk.size() == kNorms,
              "decode_layer takes 4 norms (input, attn_sub, post_attention, ffn_sub)");
  TORCH_CHECK(weights.size() == kLinears && alphas.size() == kLinears && divides.size() == kLinears &&
                  sparse.size() == kLinears && out_features.size() == kLinears,
              "decode_layer takes 7 linears (q, k, v, o, gate, up, down)");
  auto codes = [&](const at::Tensor& input, int norm) {
    auto result = rms_norm_codes(input, norm_weights[norm], norm_eps[norm], norm_method[norm], norm_bits[norm],
                                 norm_topk[norm], isa);
    return Codes{std::get<0>(result), std::get<1>(result), std::get<2>(result)};
  };
  auto linear = [&](const Codes& in, int i) {
    return sparse[i] ? ternary_gemm_sparse(in.codes, in.sums, in.s, weights[i], out_features[i], alphas[i],
                                           divides[i] != 0, isa)
                     : ternary_gemm(in.codes, in.sums, in.s, weights[i], alphas[i], divides[i] != 0, isa);
  };
  const Codes qkv = codes(x, kInput);
  const at::Tensor out = decode_attention(linear(qkv, kQ), linear(qkv, kK), linear(qkv, kV), cos, sin, key_cache,
                                          value_cache, length, scaling, isa);
  const at::Tensor h = x + linear(codes(out, kAttnSub), kO);
  const Codes gate_up = codes(h, kPostAttention);
  const at::Tensor gate = linear(gate_up, kGate);
  at::Tensor product;
  if (gated) {  // up_proj on the rows relu²(gate) keeps (the a4.8 relu² FFN)
    TORCH_CHECK(!sparse[kUp], "decode_layer: the gated relu² kernel takes up_proj on the dense row layout");
    product = std::get<0>(relu2_gated_up(gate, gate_up.codes, gate_up.sums, gate_up.s, weights[kUp], alphas[kUp],
                                         divides[kUp] != 0, isa));
  } else {  // every up_proj row, then transformers' ReLUSquaredActivation (relu, then square) times up
    product = at::square(at::relu(gate)) * linear(gate_up, kUp);
  }
  return h + linear(codes(product, kFfnSub), kDown);
}

}  // namespace bitnet_convert
