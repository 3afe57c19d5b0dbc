"""The in-place KV cache of the native backend (``native/cache.py``): a ``PreallocatedLayer`` holds exactly what
transformers' ``DynamicLayer`` holds through growth, crops, batch selection and reset; a native model switches the
layers of the ``DynamicCache`` it is given and leaves other caches alone."""

from __future__ import annotations

import torch
from helpers import REFERENCE
from transformers.cache_utils import DynamicCache, DynamicLayer

import bitnet_convert
from bitnet_convert.native import cache as native_cache
from bitnet_convert.native.cache import PreallocatedLayer


def _states(tokens: int, seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, tokens, 8, generator=g), torch.randn(batch, 3, tokens, 8, generator=g)


def test_preallocated_layer_holds_what_the_dynamic_layer_holds(monkeypatch):
    monkeypatch.setattr(native_cache, "MIN_CAPACITY", 4)  # grow several times in a short test
    plain, fast = DynamicLayer(), PreallocatedLayer()

    def both(call, *args):
        a, b = getattr(plain, call)(*args), getattr(fast, call)(*args)
        assert torch.equal(plain.keys, fast.keys) and torch.equal(plain.values, fast.values)
        assert plain.get_seq_length() == fast.get_seq_length()
        return a, b

    both("update", *_states(3, 0))
    buffer = fast._key_buffer
    both("update", *_states(1, 1))
    assert fast._key_buffer is buffer and fast.keys.data_ptr() == buffer.data_ptr()  # appended in place
    for step in range(2, 12):  # past the capacity: the buffer doubles
        (k_plain, v_plain), (k_fast, v_fast) = both("update", *_states(1, step))
        assert torch.equal(k_plain, k_fast) and torch.equal(v_plain, v_fast)
    assert fast._key_buffer.shape[-2] == 16 and fast.get_seq_length() == 14
    both("crop", -5)
    both("update", *_states(2, 20))  # writes over the cropped positions
    both("batch_select_indices", torch.tensor([1]))
    both("update", *_states(1, 21, batch=1))
    both("batch_repeat_interleave", 2)
    both("update", *_states(1, 22))
    for layer in (plain, fast):  # a batch prefix taken as a plain slice: a view of the buffer, not the buffer
        layer.keys, layer.values = layer.keys[:1], layer.values[:1]
    both("update", *_states(1, 24, batch=1))
    plain.reset()
    fast.reset()
    assert fast.get_seq_length() == 0 and fast._key_buffer is None
    both("update", *_states(2, 23))


def test_a_native_model_switches_the_dynamic_cache_it_is_given():
    model = bitnet_convert.load(REFERENCE, backend="native")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :4], cache=cache, use_cache=True)
        model(ids[:, 4:], cache=cache, use_cache=True)
        assert cache.layers and all(type(layer) is PreallocatedLayer for layer in cache.layers)
        assert cache.get_seq_length() == 5
        reference = bitnet_convert.load(REFERENCE)
        plain = DynamicCache()
        reference(ids[:, :4], cache=plain, use_cache=True)
        reference(ids[:, 4:], cache=plain, use_cache=True)
    assert all(type(layer) is DynamicLayer for layer in plain.layers)
    assert torch.equal(cache.layers[0].keys, plain.layers[0].keys)
