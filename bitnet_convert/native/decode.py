"""One decoder layer per call at decode: the native backend's forward of a BitNet decoder layer for one new token.

transformers' ``BitNetDecoderLayer`` runs a decoded token through a dozen module calls and some hundred small
torch ops (norms, quantizer statistics, views, RoPE, the cache update, SDPA's dispatch), and SDPA's CPU flash
kernel takes ~160 µs for one query at 2B-4T shapes: together about a third of a 30-layer token on the native
kernels. :func:`decode_layer_forward` does the same work in a few kernel calls per layer:

* each RMSNorm and the quantizer of the linear it feeds are one call (``rms_norm_codes``, ``csrc/norm.cpp``): the
  reductions are torch's own ops called from C++ and the elementwise steps the same fp32 operations, so the codes
  are the module path's to the bit (q/k/v share one call, and so do gate/up);
* the linears run on those codes (:meth:`~bitnet_convert.native.backend.NativeLinear.apply_codes`), the relu² FFN
  on its gated kernel when the model has it;
* RoPE, the KV cache write and attention are one call (``decode_attention``, ``csrc/attention.cpp``) that reads
  the keys and values in place from the :class:`~bitnet_convert.native.cache.PreallocatedLayer` buffers;
* with that in-place cache and a relu² FFN, the whole sequence is one op (``decode_layer``,
  ``csrc/decode_layer.cpp``) that calls the same C++ functions in the same order (:func:`layer_rows` makes the
  calls one by one from Python; the two give the same numbers, tested).

What it computes equals the layer's own forward except for the attention sums: RoPE is transformers' to the bit (the
cache holds the keys the module path would store), while the attention output is our kernel's softmax(q·Kᵀ·scale)·V,
which differs from SDPA's by fp32 rounding (tested: the reference backend's greedy tokens, the logits within 1e-4 of
their range at nine steps in ten and within 0.5% at every step).

With the packed low-bit KV cache (:class:`~bitnet_convert.quant.kv.PackedKVCache`, ``a48-kv3``), RoPE and the Q
quantizer are transformers' and :func:`~bitnet_convert.quant.kv.lowbit_sdpa`'s own torch code, the new K/V go into
the cache's growing buffers, and ``decode_attention_packed`` dequantizes each cached row as it reads it (the values
:func:`~bitnet_convert.quant.kv.dequantize` gives): the cache is never unpacked as a whole, where the module path
unpacks all of it at every token.

It runs when a call is a decode step it covers — one token per sequence, SDPA or the low-bit attention function
with no attention mask (no padding), the in-place cache of a ``DynamicCache`` with full-precision attention or a
packed low-bit cache without left padding, and a BitNet layer on the native kernels (``attn_sub_norm``,
``ffn_sub_norm``) — and hands every other call (prefill, padded batches, Q/K/V fake-quantized over a full-precision
cache, eager attention, Llama-layout families) to the layer's own forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ReLUSquaredActivation
from transformers.models.bitnet.modeling_bitnet import apply_rotary_pos_emb

from bitnet_convert.native import backend as native
from bitnet_convert.native import build as kernels
from bitnet_convert.native.cache import PreallocatedLayer, switch_layers
from bitnet_convert.quant import functional as F
from bitnet_convert.quant import kv
from bitnet_convert.quant.kv import AttentionSpec, PackedKVLayer
from bitnet_convert.runtime.threads import run_with_policy

#: Input quantizer methods the fused RMSNorm + quantizer kernel call computes (``rms_norm_codes``), by kernel code.
FUSED_METHODS = {"absmax": 0, "absmean": 1}


def _ops():
    return torch.ops.bitnet_convert


def _fused_norm(norm: nn.Module, linear: native.NativeLinear, dtype: torch.dtype) -> tuple[int, int, int] | None:
    """``(method code, bits, top-K count or 0)`` when ``rms_norm_codes`` computes ``norm`` and ``linear``'s input
    quantizer for a ``dtype`` input in one call (absmax or absmean, no static threshold, no input RMSNorm of the
    linear's own), else ``None``."""
    spec = linear.spec
    method = FUSED_METHODS.get(spec.method)
    if method is None or spec.threshold is not None or linear.rms_norm is not None or norm.weight.dtype != dtype:
        return None
    k = F.topk_count(linear.in_features, spec.topk) if spec.topk is not None and spec.topk < 1.0 else 0
    return method, spec.bits, k


def _norm_codes(norm: nn.Module, x: torch.Tensor, linear: native.NativeLinear) -> tuple[torch.Tensor, ...]:
    """``linear``'s integer input ``(codes, s, sums)`` for ``norm(x)``, fp32 ``x [T, K]``: one kernel call for an
    absmax or absmean input (top-K included: a token whose top-K is tied, or holds a NaN, takes torch's top-K in
    the kernel call), else the norm in torch and the linear's own quantizer."""
    fused = _fused_norm(norm, linear, x.dtype)
    if fused is None:
        return native.quantize(norm(x), linear.spec, linear.isa)
    method, bits, k = fused
    codes, s, sums, _, _ = _ops().rms_norm_codes(x, norm.weight, norm.variance_epsilon, method, bits, k,
                                                 linear.isa)
    return codes, s, sums


def covers(layer: nn.Module) -> bool:
    """Whether ``layer`` has the BitNet decoder layout this step computes: input and post-attention norms,
    ``self_attn`` with q/k/v/o projections on the native kernels (q/k/v with one input quantizer) and
    ``attn_sub_norm`` before o_proj, and an ``mlp`` with gate/up (one input quantizer), ``ffn_sub_norm`` and
    down_proj on the native kernels; no linear with an input RMSNorm of its own (``use_rms_norm``)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None),
             getattr(attn, "attn_sub_norm", None), getattr(mlp, "ffn_sub_norm", None))
    if not all(n is not None and hasattr(n, "variance_epsilon") and hasattr(n, "weight") for n in norms):
        return False
    qkv = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    gate_up = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj")]
    linears = [*qkv, getattr(attn, "o_proj", None), *gate_up, getattr(mlp, "down_proj", None)]
    return (all(isinstance(m, native.NativeLinear) and m.rms_norm is None for m in linears)
            and all(m.spec == qkv[0].spec for m in qkv) and all(m.spec == gate_up[0].spec for m in gate_up)
            and hasattr(mlp, "act_fn") and all(hasattr(attn, name) for name in ("head_dim", "scaling", "layer_idx")))


def _cache_layer(cache: object, index: int, spec: AttentionSpec | None) -> PreallocatedLayer | PackedKVLayer | None:
    """The layer of ``cache`` the step reads in place: an initialized in-place fp32 layer when attention is full
    precision, or a packed low-bit layer without left padding (its K/V quantized by the cache itself, Q by ``spec``
    when it sets ``q_bits``) when the spec quantizes per token; ``None`` for anything else (the module path)."""
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers) or not layers[index].is_initialized:
        return None
    layer = layers[index]
    if type(layer) is PreallocatedLayer and spec is None:
        return layer
    if (isinstance(layer, PackedKVLayer) and layer.bos_index is None and layer.method in ("minmax", "absmax")
            and (spec is None or spec.key_granularity == "token")):
        return layer
    return None


def _attention_spec(attn: nn.Module) -> tuple[bool, AttentionSpec | None]:
    """Whether the step computes ``attn``'s attention function (SDPA or the low-bit one), and the low-bit spec of
    its Q/K/V (``None`` under SDPA). The module path quantizes Q/K/V only under the low-bit attention function;
    eager or flex attention (and any other) keep the module path."""
    implementation = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    spec = getattr(attn, "lowbit_attention", None) if implementation == kv.ATTN_IMPLEMENTATION else None
    return implementation in ("sdpa", kv.ATTN_IMPLEMENTATION), spec


def decode_layer_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, cache: object = None, use_cache: bool = False,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs
                         ) -> torch.Tensor:
    """``BitNetDecoderLayer.forward`` for one decoded token per sequence (see the module docstring); any other call
    goes to the layer's own forward. ``hidden_states`` fp32 ``[B, 1, hidden]`` → ``[B, 1, hidden]``."""
    attn = layer.self_attn
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    supported, spec = _attention_spec(attn)
    slot = _cache_layer(cache, attn.layer_idx, spec) if cache is not None else None
    if (slot is None or not supported or attention_mask is not None
            or position_embeddings is None or hidden_states.dim() != 3
            or hidden_states.shape[1] != 1 or hidden_states.dtype != torch.float32
            or kwargs.get("output_attentions")):
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
    batch = hidden_states.shape[0]
    x = hidden_states.reshape(batch, -1)
    plan = _layer_plan(layer) if type(slot) is PreallocatedLayer and batch <= native.GATED_MAX_TOKENS else None
    if plan is not None and not any(linear.record_zeros for linear in plan.linears):
        # the whole layer in one kernel call (decode_layer): the calls layer_rows makes, in the same order
        cos, sin = _rope_rows(position_embeddings, batch)
        length = slot.reserve(x.new_empty(batch, plan.kv_heads, 1, attn.head_dim))
        out = _ops().decode_layer(x, *plan.arguments, cos, sin, slot._key_buffer, slot._value_buffer, length,
                                  attn.scaling, plan.gated, plan.linears[0].isa)
        slot.advance(1)
        return out.view(batch, 1, -1)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _attention(attn, slot, spec, q, k, v, position_embeddings)

    return layer_rows(layer, x, attend).view(batch, 1, -1)


@dataclass(frozen=True)
class _LayerPlan:
    """The operands of ``decode_layer`` for one decoder layer (norms, then linears q, k, v, o, gate, up, down)."""

    linears: tuple[native.NativeLinear, ...]
    arguments: tuple
    kv_heads: int
    gated: bool  # up_proj on the rows relu²(gate) keeps (else every row, then relu² in torch)


def _layer_plan(layer: nn.Module) -> _LayerPlan | None:
    """The layer's :class:`_LayerPlan` when ``decode_layer`` computes it (every norm fused with its linear's
    quantizer, no bias, a relu² FFN: gated, with up_proj on the dense layout, or transformers' relu² activation),
    else ``None``; made once per layer (the modules a converted model holds do not change)."""
    if "_decode_plan" in vars(layer):
        return vars(layer)["_decode_plan"]
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    norms = ((layer.input_layernorm, attn.q_proj), (attn.attn_sub_norm, attn.o_proj),
             (layer.post_attention_layernorm, mlp.gate_proj), (mlp.ffn_sub_norm, mlp.down_proj))
    fused = [_fused_norm(norm, linear, torch.float32) for norm, linear in norms]
    plan = None
    gated = native.is_gated(mlp) and not mlp.up_proj.sparse
    if (all(f is not None for f in fused) and all(linear.bias is None for linear in linears)
            and (gated or isinstance(getattr(mlp, "act_fn", None), ReLUSquaredActivation))):
        arguments = ([norm.weight for norm, _ in norms], [float(norm.variance_epsilon) for norm, _ in norms],
                     [f[0] for f in fused], [f[1] for f in fused], [f[2] for f in fused],
                     [linear.weight for linear in linears], [linear.alpha for linear in linears],
                     [int(linear.divides) for linear in linears], [int(linear.sparse) for linear in linears],
                     [linear.out_features for linear in linears])
        plan = _LayerPlan(linears, arguments, attn.k_proj.out_features // attn.head_dim, gated)
    layer._decode_plan = plan
    return plan


def layer_rows(layer: nn.Module, x: torch.Tensor, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The decoder layer's computation for rows ``x`` fp32 ``[B, hidden]`` (one decoded token each), the attention
    being ``attend(q, k, v)`` (fp32 ``[B, heads · head_dim]`` and ``[B, kv_heads · head_dim]`` twice →
    ``[B, heads · head_dim]``), which reads and extends the KV cache. Each row's result depends on that row only:
    norms, quantizers and the linears' integer sums are per row (the batched step of the server,
    :func:`decode_batch`, relies on it)."""
    attn, mlp = layer.self_attn, layer.mlp
    batch = x.shape[0]
    codes = _norm_codes(layer.input_layernorm, x, attn.q_proj)
    q, k, v = (proj.apply_codes(*codes) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = attend(q, k, v)
    x = x + attn.o_proj.apply_codes(*_norm_codes(attn.attn_sub_norm, out, attn.o_proj))
    codes = _norm_codes(layer.post_attention_layernorm, x, mlp.gate_proj)
    gate = mlp.gate_proj.apply_codes(*codes)
    if native.is_gated(mlp) and batch <= native.GATED_MAX_TOKENS:
        product = native.gated_product(mlp.up_proj, gate, *codes)
    else:
        product = mlp.act_fn(gate) * mlp.up_proj.apply_codes(*codes)
    return x + mlp.down_proj.apply_codes(*_norm_codes(mlp.ffn_sub_norm, product, mlp.down_proj))


def _rope_rows(position_embeddings: tuple[torch.Tensor, torch.Tensor], batch: int) -> list[torch.Tensor]:
    """RoPE's cos and sin as the attention kernels take them: fp32 ``[batch, head_dim]`` from ``[B or 1, 1,
    head_dim]`` (the model's position ids have batch 1 when the caller gave none)."""
    return [t.reshape(t.shape[0], -1).float().expand(batch, -1).contiguous() for t in position_embeddings]


def _attention(attn: nn.Module, slot: PreallocatedLayer | PackedKVLayer, spec: AttentionSpec | None,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE, the KV cache write and attention for rows ``q``/``k``/``v`` (fp32 ``[B, width]``) over ``slot``, the
    cache layer of those ``B`` sequences (all at the same length), in one kernel call."""
    if isinstance(slot, PackedKVLayer):
        return _packed_attention(attn, slot, spec, q, k, v, position_embeddings)
    batch = q.shape[0]
    cos, sin = _rope_rows(position_embeddings, batch)
    length = slot.reserve(k.view(batch, -1, 1, attn.head_dim))
    out = _ops().decode_attention(q, k, v, cos, sin, slot._key_buffer, slot._value_buffer, length,
                                  attn.scaling, kernels.isa())
    slot.advance(1)
    return out


def _packed_attention(attn: nn.Module, slot: PackedKVLayer, spec: AttentionSpec | None, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
                      ) -> torch.Tensor:
    """Attention of one decoded token over a packed low-bit KV cache: RoPE by transformers' own function, Q
    fake-quantized as :func:`~bitnet_convert.quant.kv.lowbit_sdpa` does, the new K/V quantized and appended by the
    cache (:meth:`~bitnet_convert.quant.kv.PackedKVLayer.store`), then one kernel call that dequantizes each cached
    row as it reads it (``decode_attention_packed``): the cache is never unpacked as a whole. ``q``/``k``/``v``
    fp32 ``[B, heads · head_dim]`` → ``[B, heads · head_dim]``."""
    batch, dim = q.shape[0], attn.head_dim
    queries, keys = (t.view(batch, 1, -1, dim).transpose(1, 2) for t in (q, k))
    queries, keys = apply_rotary_pos_emb(queries, keys, *position_embeddings)
    if spec is not None and spec.q_bits is not None:
        queries = kv.fake_quantize(queries, spec.q_bits, spec.method)
    slot.store(keys, v.view(batch, 1, -1, dim).transpose(1, 2))
    empty = torch.empty(0, dtype=torch.float16)

    def flat(index: int) -> list[torch.Tensor]:
        return [empty if t is None else t for part in slot.parts for t in part[index].buffers()]

    return _ops().decode_attention_packed(
        queries.transpose(1, 2).reshape(batch, -1).contiguous(), flat(0), flat(1),
        [part[0].bits for part in slot.parts], [part[1].bits for part in slot.parts], slot.length,
        slot.method == "minmax", dim, attn.scaling, kernels.isa())


def install(model: nn.Module) -> int:
    """Give every decoder layer of ``model`` that :func:`covers` the one-call decode step; returns how many."""
    count = 0
    for module in model.modules():
        if covers(module):
            module.forward = types.MethodType(decode_layer_forward, module)
            count += 1
    return count


def _decoder(model: nn.Module) -> nn.Module | None:
    """The decoder stack (embeddings, rotary embedding, layers, final norm) of a causal LM, or ``None``."""
    decoder = getattr(model, "model", None)
    needed = ("embed_tokens", "rotary_emb", "layers", "norm")
    return decoder if decoder is not None and all(hasattr(decoder, name) for name in needed) else None


def row_exact_head(model: nn.Module) -> bool:
    """Whether ``model``'s lm_head computes each row the same whatever other rows it is given: the native INT8 and
    bf16 kernels (a fixed summation order per row). torch's fp32 matmul may round a row differently in a larger
    batch, so a model with it decodes each sequence alone."""
    return isinstance(getattr(model, "lm_head", None), (native.Int8Linear, native.Bf16Linear))


def batch_slots(model: nn.Module, caches: Sequence[object]) -> list[list[PreallocatedLayer | PackedKVLayer]] | None:
    """Per decoder layer, the cache layer of each sequence that :func:`decode_batch` reads in place, or ``None``
    when the step cannot run them: a layer the step does not cover (see :func:`covers`), an attention function it
    does not compute, a cache layer it cannot read (not filled by a prefill, left padding, per-channel keys), or an
    lm_head whose rows depend on the batch (:func:`row_exact_head`)."""
    decoder = _decoder(model)
    if decoder is None or not row_exact_head(model):
        return None
    slots = []
    for layer in decoder.layers[: model.config.num_hidden_layers]:
        if not covers(layer) or layer._forward_pre_hooks:
            return None
        supported, spec = _attention_spec(layer.self_attn)
        row = [_cache_layer(cache, layer.self_attn.layer_idx, spec) for cache in caches]
        if not supported or any(slot is None for slot in row):
            return None
        slots.append(row)
    return slots


def decode_batch(model: nn.Module, tokens: torch.Tensor, caches: Sequence[object]) -> torch.Tensor | None:
    """One decode step for ``B`` independent sequences, each with its own KV cache (continuous batching): token
    ``tokens[i]`` (long ``[B]``) is appended to sequence ``i`` at position ``caches[i].get_seq_length()``. The
    linears run on all ``B`` rows at once (the native kernels read each weight row once for up to four tokens);
    RoPE and attention run per sequence over its cache, in place. Returns the next-token logits, fp32
    ``[B, vocab]``.

    Each row equals what the model computes for that sequence alone through its own forward with the one-call decode
    step (:func:`decode_layer_forward`): every operation is per row (the norms' and quantizers' reductions, the
    linears' integer sums, the lm_head kernels' fixed summation order, attention per sequence). Runs on the model's
    thread policy (:mod:`bitnet_convert.runtime.threads`). Returns ``None`` when :func:`batch_slots` does (the
    caller then runs each sequence through the model's forward)."""
    for cache in caches:  # a cache the prefill filled holds DynamicLayers it created after the model's pre-hook ran
        switch_layers(cache)
    slots = batch_slots(model, caches)
    if slots is None:
        return None
    return run_with_policy(model, _decode_batch, model, tokens, caches, slots)


def _after_hooks(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (``[B, hidden]``) after the layer's forward hooks (QwT compensation,
    :func:`bitnet_convert.quant.compensation.attach`), each row on its own as ``[1, 1, hidden]``: the shapes the
    hooks see when a sequence decodes alone, so their matmuls round the same way."""
    # the hooks as nn.Module.__call__ runs them (its registries: with or without the call's keyword arguments)
    hooks = layer._forward_hooks
    if not hooks:
        return out
    rows = []
    for i in range(x.shape[0]):
        args, row = (x[i:i + 1].view(1, 1, -1),), out[i:i + 1].view(1, 1, -1)
        for key, hook in hooks.items():
            result = hook(layer, args, {}, row) if key in layer._forward_hooks_with_kwargs else hook(layer, args, row)
            row = row if result is None else result
        rows.append(row.view(1, -1))
    return torch.cat(rows)


def _decode_batch(model: nn.Module, tokens: torch.Tensor, caches: Sequence[object],
                  slots: list[list[PreallocatedLayer | PackedKVLayer]]) -> torch.Tensor:
    decoder, batch = _decoder(model), tokens.shape[0]
    positions = torch.tensor([cache.get_seq_length() for cache in caches], device=tokens.device).view(batch, 1)
    hidden = decoder.embed_tokens(tokens.view(batch, 1))
    cos, sin = decoder.rotary_emb(hidden, position_ids=positions)
    x = hidden.reshape(batch, -1).float()
    for layer, row in zip(decoder.layers[: model.config.num_hidden_layers], slots, strict=True):
        attn = layer.self_attn
        spec = _attention_spec(attn)[1]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn=attn, spec=spec, row=row
                   ) -> torch.Tensor:
            return torch.cat([_attention(attn, slot, spec, q[i:i + 1], k[i:i + 1], v[i:i + 1],
                                         (cos[i:i + 1], sin[i:i + 1])) for i, slot in enumerate(row)])

        x = _after_hooks(layer, x, layer_rows(layer, x, attend))
    return model.lm_head(decoder.norm(x.view(batch, 1, -1)))[:, -1].float()
