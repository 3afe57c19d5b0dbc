"""One decoder layer per call at decode: the native backend's forward of a BitNet decoder layer for one new token.

transformers' ``BitNetDecoderLayer`` runs a decoded token through six module calls and some sixty small torch ops
(norms, views, RoPE, the cache update, SDPA's dispatch), and SDPA's CPU flash kernel takes ~160 µs for one query at
2B-4T shapes: together about a third of a 30-layer token on the native kernels. :func:`decode_layer_forward` does
the same work with the layer's submodules called directly (no module-call machinery), and RoPE, the KV cache write
and attention in one kernel call (``decode_attention``, ``csrc/attention.cpp``) that reads the keys and values in
place from the :class:`~bitnet_convert.native.cache.PreallocatedLayer` buffers.

What it computes equals the layer's own forward except for the attention sums: RMSNorm, the linears, RoPE and the
residuals are the same operations on the same values (the cache holds bit for bit the keys the module path would
store), while the attention output is our kernel's softmax(q·Kᵀ·scale)·V, which differs from SDPA's by fp32
rounding (tested: logits within 1e-4 of their range, the same greedy tokens as the reference backend).

It runs when a call is a decode step it covers — one token per sequence, no attention mask (no padding), the
in-place cache of a ``DynamicCache``, full-precision attention (no Q/K/V quantizer, no packed low-bit cache) and a
BitNet layer (``attn_sub_norm``, ``ffn_sub_norm``) — and hands every other call (prefill, padded batches, the
packed cache, Llama-layout families) to the layer's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from bitnet_convert.native import build as kernels
from bitnet_convert.native.cache import PreallocatedLayer


def _ops():
    return torch.ops.bitnet_convert


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``BitNetRMSNorm`` / ``LlamaRMSNorm`` on fp32 ``x``: the same torch operations in its order."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon))


def covers(layer: nn.Module) -> bool:
    """Whether ``layer`` has the BitNet decoder layout this step computes: input and post-attention norms,
    ``self_attn`` with q/k/v/o projections, ``attn_sub_norm`` before o_proj, and an ``mlp`` with ``ffn_sub_norm``."""
    attn = getattr(layer, "self_attn", None)
    parts = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None),
             getattr(attn, "attn_sub_norm", None), getattr(getattr(layer, "mlp", None), "ffn_sub_norm", None))
    return (attn is not None and all(p is not None and hasattr(p, "variance_epsilon") for p in parts)
            and all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")))


def _cache_layer(cache: object, index: int) -> PreallocatedLayer | None:
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers):
        return None
    layer = layers[index]
    return layer if type(layer) is PreallocatedLayer and layer.is_initialized else None


def decode_layer_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, cache: object = None, use_cache: bool = False,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs
                         ) -> torch.Tensor:
    """``BitNetDecoderLayer.forward`` for one decoded token per sequence (see the module docstring); any other call
    goes to the layer's own forward. ``hidden_states`` fp32 ``[B, 1, hidden]`` → ``[B, 1, hidden]``."""
    attn = layer.self_attn
    cache = cache if cache is not None else kwargs.get("past_key_values")
    slot = _cache_layer(cache, attn.layer_idx) if cache is not None else None
    if (slot is None or attention_mask is not None or position_embeddings is None or hidden_states.dim() != 3
            or hidden_states.shape[1] != 1 or hidden_states.dtype != torch.float32
            or getattr(attn, "lowbit_attention", None) is not None or kwargs.get("output_attentions")):
        kwargs.pop("past_key_values", None)
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
    batch = hidden_states.shape[0]
    x = hidden_states.reshape(batch, -1)
    h = _rms_norm(layer.input_layernorm, x)
    q, k, v = attn.q_proj.forward(h), attn.k_proj.forward(h), attn.v_proj.forward(h)
    # [B or 1, 1, head_dim]: the model's position ids have batch 1 when the caller gave none
    cos, sin = (t.reshape(t.shape[0], -1).float().expand(batch, -1).contiguous() for t in position_embeddings)
    length = slot.reserve(k.view(batch, -1, 1, attn.head_dim))
    out = _ops().decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, slot._key_buffer,
                                  slot._value_buffer, length, attn.scaling, kernels.isa())
    slot.advance(1)
    x = x + attn.o_proj.forward(_rms_norm(attn.attn_sub_norm, out))
    x = x + layer.mlp.forward(_rms_norm(layer.post_attention_layernorm, x))
    return x.view(batch, 1, -1)


def install(model: nn.Module) -> int:
    """Give every decoder layer of ``model`` that :func:`covers` the one-call decode step; returns how many."""
    count = 0
    for module in model.modules():
        if covers(module):
            module.forward = types.MethodType(decode_layer_forward, module)
            count += 1
    return count
