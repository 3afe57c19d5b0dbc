"""Low-bit attention (a4.8 §3.1): Q, K and V quantized after RoPE, and a packed low-bit KV cache.

The quantizer works per (token, head) over ``head_dim`` by default, with no calibration data:

* ``minmax`` (default): unsigned codes ``c = RoundClip((x − min) / s, 0, 2^b − 1)``, ``s = (max − min) / (2^b − 1)``,
  ``x̂ = c · s + min``;
* ``absmax``: symmetric, ``s = max|x| / (2^(b−1) − 1)``, ``c = RoundClip(x / s + 2^(b−1), 0, 2^b − 1)``,
  ``x̂ = (c − 2^(b−1)) · s``.

``s`` and ``min`` are rounded to float16 — the precision the packed cache stores them in — so fake quantization
(what evaluation measures, :func:`install`) and the packed cache (what ``generate`` uses, :class:`PackedKVCache`)
give bit-identical K/V. The first position of a sequence (the BOS token) can keep more bits (``bos_bits``).
Keys can instead be quantized per channel over the sequence (``key_granularity: channel``, as KIVI does); the
statistics then change as tokens arrive, so that option exists for evaluation only, not for the packed cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bitnet_convert.quant.functional import round_clip, ste
from bitnet_convert.quant.packing import pack_bits, unpack_bits

#: The attention implementation name under which :func:`lowbit_sdpa` is registered with transformers.
ATTN_IMPLEMENTATION = "bitnet_convert_lowbit_sdpa"
#: Smallest stored scale: keeps float16 scales normal and the division finite for constant rows.
MIN_SCALE = 2.0**-14
#: Attribute set on K/V tensors that a :class:`PackedKVCache` already quantized (attention must not do it again).
_QUANTIZED = "_bitnet_convert_kv_quantized"



class AttentionSpec(BaseModel):
    """Which attention tensors are quantized, and how (``null`` bits = full precision)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    q_bits: int | None = Field(None, ge=2, le=8, description="query bits, per (token, head)")
    k_bits: int | None = Field(None, ge=2, le=8, description="key bits")
    v_bits: int | None = Field(None, ge=2, le=8, description="value bits")
    bos_bits: int | None = Field(None, ge=2, le=8, description="K/V bits of the first position; null = k/v bits")
    method: Literal["minmax", "absmax"] = "minmax"
    key_granularity: Literal["token", "channel"] = Field(
        "token", description="token: per (token, head) over head_dim; channel: per (head, channel) over tokens"
    )

    @property
    def enabled(self) -> bool:
        return any(b is not None for b in (self.q_bits, self.k_bits, self.v_bits))

    def describe(self) -> str:
        if not self.enabled:
            return "full precision"
        parts = [f"{name.upper()} {bits}-bit" for name, bits in (("q", self.q_bits), ("k", self.k_bits),
                                                                  ("v", self.v_bits)) if bits is not None]
        if self.bos_bits is not None and (self.k_bits or self.v_bits):
            parts.append(f"BOS K/V {self.bos_bits}-bit")
        extra = ", keys per channel" if self.key_granularity == "channel" else ""
        return f"{', '.join(parts)} ({self.method}{extra})"


# --------------------------------------------------------------------------------------------- quantizer


def quantize(x: torch.Tensor, bits: int, method: str, dim: int = -1):
    """``(codes uint8, scale fp16, zero fp16 | None)`` of ``x`` with statistics over ``dim``."""
    xf = x.float()
    qmax = 2**bits - 1
    if method == "minmax":
        lo = xf.amin(dim=dim, keepdim=True).half()
        hi = xf.amax(dim=dim, keepdim=True)
        scale = ((hi - lo.float()) / qmax).clamp(min=MIN_SCALE).half()
        codes = round_clip((xf - lo.float()) / scale.float(), 0, qmax)
        return codes.to(torch.uint8), scale, lo
    half = 2 ** (bits - 1)
    scale = (xf.abs().amax(dim=dim, keepdim=True) / (half - 1)).clamp(min=MIN_SCALE).half()
    codes = round_clip(xf / scale.float() + half, 0, qmax)
    return codes.to(torch.uint8), scale, None


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize` (up to the rounding), in ``dtype``."""
    if zero is not None:
        return (codes.float() * scale.float() + zero.float()).to(dtype)
    return ((codes.float() - 2 ** (bits - 1)) * scale.float()).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, method: str, dim: int = -1) -> torch.Tensor:
    """``dequantize(quantize(x))``: what attention sees of a quantized tensor."""
    return dequantize(*quantize(x, bits, method, dim), bits, x.dtype)


def fake_quantize_kv(x: torch.Tensor, bits: int, spec: AttentionSpec, channel: bool = False,
                     first: torch.Tensor | None = None) -> torch.Tensor:
    """K or V ``[batch, heads, seq, head_dim]`` as the cache would hold it: the first real position of each row at
    ``bos_bits``. ``first`` (long ``[batch]``) is that position per row — after the left padding of a padded batch;
    ``None``: position 0 of every row."""
    dim = -2 if channel else -1
    bos = spec.bos_bits
    padded = first is not None and bool(first.any())
    original = x
    if channel and padded:
        # per-channel statistics over each row's real positions after its first: the left padding and the first
        # position take the values of the position after it (copies change neither min nor max)
        n = x.shape[-2]
        start = first if bos is not None else first - 1
        donor = x.gather(-2, _position_index((start + 1).clamp(max=n - 1), x))
        covered = torch.arange(n, device=x.device)[None, :] <= start.to(x.device)[:, None]
        x = torch.where(covered[:, None, :, None], donor, x)
    if bos is None or (bos == bits and not channel):
        return fake_quantize(x, bits, spec.method, dim)
    if padded:
        index = _position_index(first, x)
        out = fake_quantize(x, bits, spec.method, dim)
        return out.scatter(-2, index, fake_quantize(original.gather(-2, index), bos, spec.method, -1))
    first_row = fake_quantize(x[..., :1, :], bos, spec.method, -1)
    if x.shape[-2] == 1:
        return first_row
    return torch.cat([first_row, fake_quantize(x[..., 1:, :], bits, spec.method, dim)], dim=-2)


def _position_index(first: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather/scatter index ``[batch, heads, 1, head_dim]`` of position ``first[b]`` in each row of ``x``."""
    return first.to(x.device).view(-1, 1, 1, 1).expand(x.shape[0], x.shape[1], 1, x.shape[-1])


def first_real_positions(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per row, the first key position that is not padding (long ``[batch]``), from a 2-D padding mask
    ``[batch, keys]`` or a 4-D attention mask ``[batch, 1, queries, keys]`` (bool: True = attend; float: 0 =
    attend); ``None`` when there is no mask (no padding)."""
    if attention_mask is None:
        return None
    mask = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0, -1, :]
    visible = mask if mask.dtype == torch.bool else (
        mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask != 0)
    return visible.int().argmax(dim=-1)


# ------------------------------------------------------------------------------------- attention hook


def lowbit_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention with Q/K/V fake-quantized as ``module.lowbit_attention`` says. K/V coming from
    a :class:`PackedKVCache` are already quantized and pass through unchanged."""
    spec: AttentionSpec | None = getattr(module, "lowbit_attention", None)
    if spec is not None:
        # in training mode (distillation) gradients pass straight through the quantizers
        lam = getattr(module, "ste_lambda", 1.0)

        def through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            return ste(x, q, lam) if module.training else q

        if spec.q_bits is not None:
            query = through(query, fake_quantize(query, spec.q_bits, spec.method))
        if not getattr(key, _QUANTIZED, False):
            # the BOS slot is the first real token of each row, after any left padding; per-channel key statistics
            # skip that padding too
            uses_first = spec.bos_bits is not None or spec.key_granularity == "channel"
            first = first_real_positions(attention_mask) if uses_first else None
            if first is not None and first.numel() != key.shape[0]:
                first = None
            if spec.k_bits is not None:
                channel = spec.key_granularity == "channel"
                key = through(key, fake_quantize_kv(key, spec.k_bits, spec, channel=channel, first=first))
            if spec.v_bits is not None:
                value = through(value, fake_quantize_kv(value, spec.v_bits, spec, first=first))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, lowbit_sdpa)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder (those with q/k/v projections and a layer index)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and hasattr(m, "q_proj")]


def install(model: torch.nn.Module, spec: AttentionSpec | None) -> None:
    """Quantize attention in ``model`` as ``spec`` says (``None`` or nothing enabled: plain SDPA), and let a
    :class:`PackedKVCache` passed to the model's forward learn each row's first real position from the padding
    mask."""
    modules = attention_modules(model)
    if spec is not None and spec.enabled and not modules:
        raise ValueError("the model has no attention modules with q_proj/k_proj/v_proj and a layer_idx")
    for module in modules:
        module.lowbit_attention = spec if spec is not None and spec.enabled else None
    model.set_attn_implementation(ATTN_IMPLEMENTATION if spec is not None and spec.enabled else "sdpa")
    if not getattr(model, "_bitnet_convert_padding_hook", False):
        model.register_forward_pre_hook(_tell_cache_the_padding, with_kwargs=True)
        model._bitnet_convert_padding_hook = True


def _tell_cache_the_padding(_module, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, PackedKVCache) and cache.get_seq_length() == 0:
        mask = kwargs.get("attention_mask")
        cache.set_first_positions(first_real_positions(mask) if mask is not None and mask.dim() == 2 else None)


def spec_of(model: torch.nn.Module) -> AttentionSpec | None:
    """The attention spec installed in ``model`` (``None`` when attention is full precision)."""
    for module in attention_modules(model):
        return getattr(module, "lowbit_attention", None)
    return None


# ------------------------------------------------------------------------------------------ the cache


#: The smallest capacity (positions) a packed cache buffer grows to; full buffers double.
MIN_CAPACITY = 256


class _Growing:
    """A ``[batch, heads, seq, width]`` tensor that grows along ``seq`` in place: a buffer with room (capacity
    doubling, so each position is copied O(1) times on average) and the filled length."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.length = 0

    @property
    def view(self) -> torch.Tensor | None:
        """The filled part, a view of the buffer (``None`` before the first append)."""
        return None if self.buffer is None else self.buffer[:, :, : self.length]

    def append(self, x: torch.Tensor) -> None:
        need = self.length + x.shape[-2]
        # a buffer made under torch.inference_mode cannot be written outside it: copied into a new one then
        frozen = self.buffer is not None and self.buffer.is_inference() and not torch.is_inference_mode_enabled()
        if self.buffer is None or need > self.buffer.shape[-2] or frozen:
            # the first allocation is exact (the BOS part holds one position for good); growth doubles
            capacity = need if self.buffer is None else max(need, 2 * self.buffer.shape[-2], MIN_CAPACITY)
            grown = x.new_empty(*x.shape[:2], capacity, x.shape[-1])
            if self.length:
                grown[:, :, : self.length] = self.view
            self.buffer = grown
        self.buffer[:, :, self.length : need] = x
        self.length = need

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.buffer is not None:
            self.buffer = fn(self.view).contiguous()  # the filled part alone; the next append makes room


class _PackedRows:
    """A growing ``[batch, heads, seq, head_dim]`` tensor stored as packed codes + float16 scale (and zero), each in
    a buffer that grows in place (:class:`_Growing`): appending a position copies that position only."""

    def __init__(self, bits: int, method: str) -> None:
        self.bits, self.method = bits, method
        self._codes, self._scale, self._zero = _Growing(), _Growing(), _Growing()
        self.head_dim = 0

    @property
    def codes(self) -> torch.Tensor | None:
        """Packed codes uint8 ``[batch, heads, seq, ceil(head_dim · bits / 8)]`` (a view of the buffer)."""
        return self._codes.view

    @property
    def scale(self) -> torch.Tensor | None:
        """float16 ``[batch, heads, seq, 1]``."""
        return self._scale.view

    @property
    def zero(self) -> torch.Tensor | None:
        """float16 ``[batch, heads, seq, 1]`` (``minmax``; ``None`` for ``absmax``)."""
        return self._zero.view

    def buffers(self) -> tuple[torch.Tensor | None, ...]:
        """The contiguous buffers ``(codes, scale, zero)`` the filled part is the start of (zero ``None`` for
        ``absmax``): what the native decode attention reads in place."""
        return self._codes.buffer, self._scale.buffer, self._zero.buffer

    def append(self, x: torch.Tensor) -> None:
        codes, scale, zero = quantize(x, self.bits, self.method)
        self.head_dim = x.shape[-1]
        self._codes.append(pack_bits(codes, self.bits))
        self._scale.append(scale)
        if zero is not None:
            self._zero.append(zero)

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_bits(self.codes, self.bits, self.head_dim)
        return dequantize(codes, self.scale, self.zero, self.bits, dtype)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation (beam reordering, selection, repetition) to every stored tensor."""
        for part in (self._codes, self._scale, self._zero):
            part.map_batch(fn)

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part (the buffers' spare capacity, at most as much again, is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


class PackedKVLayer(DynamicLayer):
    """One layer's K/V as packed ``k_bits``/``v_bits`` codes with a float16 scale (and zero) per (token, head);
    the first position at ``bos_bits``. ``update`` returns the dequantized K/V of every cached position."""

    is_croppable = False

    def __init__(self, k_bits: int, v_bits: int, bos_bits: int | None = None, method: str = "minmax") -> None:
        super().__init__()
        self.k_bits, self.v_bits, self.bos_bits, self.method = k_bits, v_bits, bos_bits, method
        self.length = 0
        #: first real position per row (left padding), set before the prefill; ``None``: position 0
        self.first: torch.Tensor | None = None
        #: where the BOS slot of each row sits when it is not position 0 (stored beside the main codes)
        self.bos_index: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.parts: list[tuple[_PackedRows, _PackedRows]] = []
        if self.bos_bits is not None:
            self.parts.append((_PackedRows(self.bos_bits, self.method), _PackedRows(self.bos_bits, self.method)))
        self.parts.append((_PackedRows(self.k_bits, self.method), _PackedRows(self.v_bits, self.method)))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.store(key_states, value_states)
        if self.bos_index is not None:  # every position in the main codes, the BOS slots written over them
            (bos_k, bos_v), (main_k, main_v) = self.parts
            index = _position_index(self.bos_index, key_states)
            keys = main_k.read(self.dtype).scatter(-2, index, bos_k.read(self.dtype))
            values = main_v.read(self.dtype).scatter(-2, index, bos_v.read(self.dtype))
        else:
            stored = [(k, v) for k, v in self.parts if k.codes is not None]
            keys = torch.cat([k.read(self.dtype) for k, _ in stored], dim=-2)
            values = torch.cat([v.read(self.dtype) for _, v in stored], dim=-2)
        setattr(keys, _QUANTIZED, True)
        setattr(values, _QUANTIZED, True)
        return keys, values

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantize and append K/V ``[batch, kv_heads, n, head_dim]`` (the first position into the ``bos_bits``
        part) without reading the cache back: :meth:`update` without its return value, for the native decode
        attention, which reads the packed codes in place."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = 0
        if self.bos_bits is not None and self.length == 0:
            first = self.first if self.first is not None and self.first.numel() == key_states.shape[0] else None
            if first is not None and first.any():  # left padding: the BOS slot is each row's first real token
                self.bos_index = first.to(key_states.device)
                index = _position_index(self.bos_index, key_states)
                self.parts[0][0].append(key_states.gather(-2, index))
                self.parts[0][1].append(value_states.gather(-2, index))
            else:
                self.bos_index = None
                self.parts[0][0].append(key_states[..., :1, :])
                self.parts[0][1].append(value_states[..., :1, :])
                start = 1
        if key_states.shape[-2] > start:
            self.parts[-1][0].append(key_states[..., start:, :])
            self.parts[-1][1].append(value_states[..., start:, :])
        self.length += key_states.shape[-2]

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.is_initialized = False
        self.first = self.bos_index = None

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            for rows in self.parts:
                for part in rows:
                    part.map_batch(fn)
            if self.bos_index is not None:
                self.bos_index = fn(self.bos_index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch (codes, scales and zeros move together)."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(k.nbytes + v.nbytes for k, v in self.parts)


def cache_nbytes(cache: Cache) -> int:
    """Bytes a KV cache holds: packed codes + scales for a :class:`PackedKVCache`, K/V tensors otherwise."""
    if isinstance(cache, PackedKVCache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


class PackedKVCache(Cache):
    """A transformers ``Cache`` of :class:`PackedKVLayer` s, one per decoder layer; pass it to
    ``model.generate(..., cache=cache)``. :meth:`for_model` takes the bits from the model's spec."""

    def __init__(self, num_layers: int, k_bits: int = 3, v_bits: int = 3, bos_bits: int | None = 4,
                 method: str = "minmax") -> None:
        for name, bits in (("k_bits", k_bits), ("v_bits", v_bits), ("bos_bits", bos_bits)):
            if bits is not None and not 2 <= bits <= 8:
                raise ValueError(f"{name} must be in 2..8, got {bits}")
        super().__init__(layers=[PackedKVLayer(k_bits, v_bits, bos_bits, method) for _ in range(num_layers)])
        self.k_bits, self.v_bits, self.bos_bits, self.method = k_bits, v_bits, bos_bits, method

    @classmethod
    def for_model(cls, model: torch.nn.Module, spec: AttentionSpec | None = None) -> PackedKVCache:
        """A cache with ``spec``'s K/V bits (default: the spec installed in ``model``)."""
        spec = spec or spec_of(model)
        if spec is None or spec.k_bits is None or spec.v_bits is None:
            raise ValueError("the model's attention spec sets no k_bits/v_bits; give them (e.g. --kv-bits 3)")
        if spec.key_granularity != "token":
            raise ValueError("the packed KV cache stores keys per token; key_granularity 'channel' is for evaluation")
        return cls(len(attention_modules(model)), spec.k_bits, spec.v_bits, spec.bos_bits, spec.method)

    def set_first_positions(self, first: torch.Tensor | None) -> None:
        """Before the prefill: each row's first real (not padding) position, long ``[batch]`` (``None``: 0), the
        slot that keeps ``bos_bits``. The model's forward calls this from its padding mask (:func:`install`)."""
        for layer in self.layers:
            layer.first = first

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and zeros of every layer."""
        return sum(layer.nbytes for layer in self.layers)


def generation_cache(model: torch.nn.Module, kv_bits: int | None = None, bos_bits: int | None = None
                     ) -> tuple[PackedKVCache | DynamicCache, str | None]:
    """The KV cache ``generate`` decodes with, and a note for the user when it cannot be the packed one asked for.

    ``kv_bits``: a packed cache of that many bits for K and V (``bos_bits`` for the first position), whatever the
    model declares; ``None``: the packed cache of the model's attention spec when it quantizes K and V per token,
    else a full-precision :class:`~transformers.DynamicCache` (per-channel keys cannot be packed per position: the
    note says so)."""
    spec = spec_of(model)
    if kv_bits is not None:
        method = spec.method if spec else "minmax"
        return PackedKVCache(len(attention_modules(model)), kv_bits, kv_bits, bos_bits, method), None
    if spec is not None and spec.k_bits is not None and spec.v_bits is not None and spec.key_granularity == "token":
        return PackedKVCache.for_model(model, spec), None
    if spec is not None and spec.key_granularity == "channel":
        return DynamicCache(), ("keys are quantized per channel, which a packed cache cannot store; K/V are kept in "
                                "full precision and fake-quantized at every step")
    return DynamicCache(), None
