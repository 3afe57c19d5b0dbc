"""A KV cache that appends in place: the native backend's replacement for the concatenation in transformers'
``DynamicLayer``.

transformers' ``DynamicLayer.update`` appends a token's keys and values with ``torch.cat``, which copies the whole
cache of the layer at every decoded token: at 2B-4T shapes (5 KV heads × 128) and a 1,024-token context that is
5.2 MB copied per layer and token, ~157 MB per token over 30 layers. :class:`PreallocatedLayer` keeps keys and
values in buffers with room to grow (the capacity doubles when full, so each entry is copied O(1) times on
average) and returns views of the filled part; everything else of ``DynamicLayer`` (cropping, batch selection,
``get_seq_length``) keeps working on those views. The values are the same tensors, so attention computes the same
numbers. A native model switches the plain ``DynamicLayer``s of the cache it is called with
(:func:`preallocate_caches`); other caches (the packed low-bit KV cache, static caches) are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

#: The smallest capacity (tokens) a buffer is given.
MIN_CAPACITY = 256


class PreallocatedLayer(DynamicLayer):
    """``DynamicLayer`` whose ``keys``/``values`` (``[batch, kv_heads, length, head_dim]``) are views of contiguous
    buffers ``[batch, kv_heads, capacity, head_dim]``; :meth:`update` writes the new tokens after the filled part.
    The native decode step writes into the buffers itself (:meth:`reserve`, then :meth:`advance`)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.reserve(key_states)
        new = key_states.shape[-2]
        self._key_buffer[:, :, length:length + new] = key_states
        self._value_buffer[:, :, length:length + new] = value_states
        self.advance(new)
        return self.keys, self.values

    def reserve(self, like: torch.Tensor) -> int:
        """Make room in the buffers for ``like.shape[-2]`` more tokens of ``like``'s batch, heads, width and dtype
        (a new buffer holding the filled part when the current one is full or is not this cache's: a crop's or a
        batch selection's result replaced the views). Returns the filled length, where the new tokens go."""
        self._key_buffer = _room(self.keys, getattr(self, "_key_buffer", None), like)
        self._value_buffer = _room(self.values, getattr(self, "_value_buffer", None), like)
        return _length(self.keys)

    def advance(self, new: int) -> None:
        """Count ``new`` more tokens (written into the buffers after the filled part) as filled."""
        length = _length(self.keys) + new
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def _length(current: torch.Tensor) -> int:
    return current.shape[-2] if current is not None and current.dim() == 4 else 0


def _room(current: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """The buffer ``current`` (the filled part) is a view of, with room for ``new``'s tokens: ``buffer`` itself when
    ``current`` is its start and it has the room, else a new one (capacity doubled, at least :data:`MIN_CAPACITY`)
    that holds a copy of ``current``."""
    length = _length(current)
    ours = (buffer is not None and length > 0 and current.data_ptr() == buffer.data_ptr()
            and current.stride() == buffer.stride() and current.shape[:2] == buffer.shape[:2] == new.shape[:2]
            and buffer.shape[-1] == new.shape[-1] and buffer.dtype == new.dtype
            # a buffer made under torch.inference_mode cannot be written outside it
            and (torch.is_inference_mode_enabled() or not buffer.is_inference()))
    need = length + new.shape[-2]
    if ours and need <= buffer.shape[-2]:
        return buffer
    capacity = max(need, 2 * buffer.shape[-2] if ours else 0, MIN_CAPACITY)
    grown = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
    if length:
        grown[:, :, :length] = current
    return grown


def switch_layers(cache: object) -> None:
    """Make the plain ``DynamicLayer``s of ``cache`` (when it is a ``DynamicCache``) :class:`PreallocatedLayer`s,
    keeping their contents."""
    if isinstance(cache, DynamicCache):
        for layer in getattr(cache, "layers", ()):
            if type(layer) is DynamicLayer:
                layer.__class__ = PreallocatedLayer  # the same state; only update() and reset() change


def preallocate_caches(model: nn.Module) -> None:
    """Make ``model`` switch the ``DynamicLayer``s of the ``DynamicCache`` it is called with (``cache=`` or
    ``past_key_values=``) to :class:`PreallocatedLayer` before each forward call."""

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                switch_layers(kwargs[key])

    model.register_forward_pre_hook(before, with_kwargs=True)
