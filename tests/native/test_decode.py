"""The one-call decode step (``native/decode.py``, ``csrc/attention.cpp``): RoPE and the cache write equal
transformers' to the bit, the attention equals SDPA's up to rounding on both kernel paths and any thread count, and a
native model decodes through it with the reference backend's greedy tokens (the module path, which prefill and
every call the step does not cover take, keeps the reference's numbers to the bit: ``test_backend.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import REFERENCE
from helpers import native_isas as isas
from helpers import native_ops as ops
from transformers import DynamicCache
from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm, apply_rotary_pos_emb

from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.io.load import build_for_backend
from bitnet_convert.native import backend as native
from bitnet_convert.native import decode
from bitnet_convert.native.cache import PreallocatedLayer
from bitnet_convert.quant.kv import AttentionSpec, PackedKVCache, PackedKVLayer, _PackedRows
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec


def _case(batch: int, heads: int, kv_heads: int, dim: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads * dim, generator=g)
    k, v = (torch.randn(batch, kv_heads * dim, generator=g) for _ in range(2))
    angle = torch.rand(batch, dim // 2, generator=g) * 6.3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    keys, values = (torch.randn(batch, kv_heads, length + 5, dim, generator=g) for _ in range(2))
    return q, k, v, cos, sin, keys, values


def _reference(q, k, v, cos, sin, keys, values, length, scale):
    """transformers' RoPE, the cache update and SDPA with grouped-query attention, on the same inputs."""
    batch, dim = q.shape[0], cos.shape[-1]
    qh, kh, vh = (t.view(batch, 1, -1, dim).transpose(1, 2) for t in (q, k, v))
    qh, kh = apply_rotary_pos_emb(qh, kh, cos[:, None], sin[:, None])
    all_keys = torch.cat([keys[:, :, :length], kh], dim=2)
    all_values = torch.cat([values[:, :, :length], vh], dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(qh, all_keys, all_values, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, -1), kh, vh


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "dim", "length"),
                         [(1, 4, 2, 16, 0), (2, 6, 2, 12, 7), (1, 20, 5, 128, 150)])
def test_decode_attention_is_rope_the_cache_write_and_sdpa(batch, heads, kv_heads, dim, length):
    q, k, v, cos, sin, keys, values = _case(batch, heads, kv_heads, dim, length)
    want, want_k, want_v = _reference(q, k, v, cos, sin, keys, values, length, dim**-0.5)
    results = []
    for isa in isas():
        for threads in (1, 2):
            key_cache, value_cache = keys.clone(), values.clone()
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                out = ops().decode_attention(q, k, v, cos, sin, key_cache, value_cache, length, dim**-0.5, isa)
            finally:
                torch.set_num_threads(before)
            # the cache holds transformers' rotated key and the value, to the bit; nothing else changed
            assert torch.equal(key_cache[:, :, length:length + 1], want_k)
            assert torch.equal(value_cache[:, :, length:length + 1], want_v)
            assert torch.equal(key_cache[:, :, :length], keys[:, :, :length])
            assert torch.equal(key_cache[:, :, length + 1:], keys[:, :, length + 1:])
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
            results.append(out)
    assert all(torch.equal(results[0], r) for r in results[1:])  # scalar = AVX2, any thread count


def test_decode_attention_refuses_bad_operands_in_one_line():
    q, k, v, cos, sin, keys, values = _case(1, 4, 2, 16, 3)
    isa = isas()[0]
    with pytest.raises(RuntimeError, match=r"length must be in \[0, capacity\): got 8 for capacity 8"):
        ops().decode_attention(q, k, v, cos, sin, keys, values, 8, 0.25, isa)
    with pytest.raises(RuntimeError, match="heads a multiple of kv_heads"):
        ops().decode_attention(q[:, :24], k, v, cos, sin, keys, values, 3, 0.25, isa)


def test_the_in_place_cache_hands_its_buffers_to_the_decode_step():
    """``reserve`` makes room (growing, and copying what a crop left) and ``advance`` counts the written tokens:
    after them the layer holds what ``update`` would have stored."""
    g = torch.Generator().manual_seed(1)
    a, b = PreallocatedLayer(), PreallocatedLayer()
    first = torch.randn(1, 2, 300, 8, generator=g)
    a.update(first, first + 1)
    b.update(first, first + 1)
    new = torch.randn(1, 2, 1, 8, generator=g)
    length = b.reserve(new)
    assert length == 300 and b._key_buffer.shape[2] >= 301 and b._key_buffer.is_contiguous()
    b._key_buffer[:, :, length:length + 1], b._value_buffer[:, :, length:length + 1] = new, new + 1
    b.advance(1)
    a.update(new, new + 1)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    b.crop(-291)  # 10 tokens left: the next token goes after them
    assert b.reserve(new) == 10 and torch.equal(b._key_buffer[:, :, :10], first[:, :, :10])
    b.batch_repeat_interleave(2)  # the views are no longer of the buffer: a new one of batch 2 holding them
    assert b.reserve(new.repeat(2, 1, 1, 1)) == 10 and b._key_buffer.shape[0] == 2
    assert torch.equal(b._key_buffer[:, :, :10], first[:, :, :10].repeat_interleave(2, dim=0))


@pytest.fixture
def op_calls(monkeypatch) -> list[str]:
    """The names of the kernel ops the decode step calls, in order (its ``_ops`` namespace wrapped)."""
    calls: list[str] = []
    real = decode._ops

    class Counting:
        def __getattr__(self, name):
            op = getattr(real(), name)
            return lambda *args: calls.append(name) or op(*args)

    monkeypatch.setattr(decode, "_ops", lambda: Counting())
    return calls


def _greedy(model, prompt: torch.Tensor, steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    tokens, logits = [], []
    with torch.no_grad():
        cache = DynamicCache()
        out = model(prompt, cache=cache, use_cache=True).logits[:, -1:]
        for _ in range(steps):
            token = out.argmax(-1)
            tokens.append(token.reshape(-1).tolist())
            out = model(token, cache=cache, use_cache=True).logits[:, -1:]
            logits.append(out)
    return tokens, logits


@pytest.mark.parametrize("preset", ["a48", "b158"])
def test_a_native_model_decodes_through_the_step_with_the_reference_tokens(preset, op_calls):
    """Every decoded token of every layer is one ``decode_layer`` call, for one sequence and for a batch of two,
    and computes what the same kernels called one by one from Python compute (``layer_rows``: four fused norm +
    quantizer calls, one attention call), bit for bit; the tokens are the reference backend's, and the logits
    within 1e-4 of their range at nine steps in ten and within 0.5% at every step."""
    checkpoint = open_checkpoint(REFERENCE)
    reference, fast, stepwise = (build_for_backend(checkpoint, preset, PRESETS[preset], backend, lm_head="int8")
                                 for backend in ("reference", "native", "native"))
    layers = fast.config.num_hidden_layers
    assert sum(decode.covers(m) for m in fast.modules()) == layers
    for layer in stepwise.model.layers:
        layer._decode_plan = None  # the kernels one call at a time, from Python
    prompt = torch.randint(4, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    for ids in (prompt[:1], prompt):
        op_calls.clear()
        want, want_logits = _greedy(reference, ids, 24)
        got, got_logits = _greedy(fast, ids, 24)
        assert op_calls == ["decode_layer"] * 24 * layers
        op_calls.clear()
        _, stepwise_logits = _greedy(stepwise, ids, 24)
        # four fused norm + quantizer calls and one attention call per layer and token
        assert op_calls.count("decode_attention") == 24 * layers and op_calls.count("rms_norm_codes") == 4 * 24 * layers
        assert len(op_calls) == 5 * 24 * layers
        assert all(torch.equal(a, b) for a, b in zip(got_logits, stepwise_logits, strict=True))
        assert got == want
        # the attention sums differ from SDPA's by rounding; where that moves a quantizer input across a rounding
        # edge, one code changes and the logits move by ~0.1% of their range: rare, and small
        error = [((a - b).abs().max() / (a.max() - a.min())).item()
                 for a, b in zip(want_logits, got_logits, strict=True)]
        assert sum(e <= 1e-4 for e in error) >= 0.9 * len(error) and max(error) <= 5e-3, error


@pytest.mark.parametrize("spec", [ActivationSpec(method="absmax", bits=8), ActivationSpec(method="absmean", bits=4),
                                  ActivationSpec(method="absmax", bits=8, topk=0.5)], ids=str)
def test_rms_norm_codes_are_the_norm_then_the_quantizer_to_the_bit(spec):
    """One call for RMSNorm and the next linear's quantizer gives the codes, multipliers and code sums of
    transformers' RMSNorm followed by the native quantizer (the module path), on both kernel paths; a token with a
    tied top-K is flagged and takes torch's own top-K inside the call, so its codes are the module path's too."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 300, generator=g) * 4
    x[2] = torch.arange(300.0) % 7  # ties at the K-th largest |x|
    norm = BitNetRMSNorm(300, eps=1e-6)
    norm.weight.data = 2.0 ** (torch.arange(300) % 3 - 1.0)  # powers of two: the ties of row 2 stay ties
    for isa in isas():
        with torch.no_grad():
            normed = norm(x)
            want = native.quantize(normed, spec, isa)
        k = round(0.5 * 300) if spec.topk else 0
        codes, s, sums, got_normed, exact = ops().rms_norm_codes(x, norm.weight.data, 1e-6,
                                                                 decode.FUSED_METHODS[spec.method], spec.bits, k, isa)
        assert torch.equal(got_normed, normed)
        assert exact.tolist() == ([True, True, False] if spec.topk else [True] * 3)
        for a, b in zip((codes, s, sums), want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(("bits", "bos_bits", "method", "dim"), [(3, 4, "minmax", 16), (3, None, "absmax", 12),
                                                                 (4, 8, "minmax", 128)])
def test_decode_attention_reads_the_packed_cache_in_place(bits, bos_bits, method, dim):
    """Attention over a packed low-bit cache, each row dequantized as it is read: SDPA's output on the cache's
    dequantized K/V up to rounding, the same on both kernel paths and at any thread count."""
    g = torch.Generator().manual_seed(bits + dim)
    batch, heads, kv_heads, length = 2, 6, 2, 40
    layer = PackedKVLayer(bits, bits, bos_bits, method)
    layer.store(*(torch.randn(batch, kv_heads, length - 1, dim, generator=g) for _ in range(2)))
    layer.store(*(torch.randn(batch, kv_heads, 1, dim, generator=g) for _ in range(2)))  # the decoded token
    q = torch.randn(batch, heads, 1, dim, generator=g)
    keys, values = (torch.cat([p[i].read(torch.float32) for p in layer.parts], dim=2) for i in (0, 1))
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=0.3, enable_gqa=True)
    want = want.transpose(1, 2).reshape(batch, -1)
    empty = torch.empty(0, dtype=torch.float16)
    parts = [[empty if t is None else t for p in layer.parts for t in p[i].buffers()] for i in (0, 1)]
    widths = [p[0].bits for p in layer.parts]
    results = []
    for isa in isas():
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                out = ops().decode_attention_packed(q.transpose(1, 2).reshape(batch, -1).contiguous(), *parts,
                                                    widths, widths, length, method == "minmax", dim, 0.3, isa)
            finally:
                torch.set_num_threads(before)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
            results.append(out)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_a48_kv3_decodes_over_the_packed_cache_with_the_reference_tokens(op_calls, monkeypatch):
    """``a48-kv3`` (Q 4-bit, K/V 3-bit packed, BOS 4-bit) decodes through the step: one packed attention call per
    layer and token, never the whole cache unpacked, and the reference backend's greedy tokens."""
    checkpoint = open_checkpoint(REFERENCE)
    attention = AttentionSpec(q_bits=4, k_bits=3, v_bits=3, bos_bits=4, method="minmax")
    reference, fast = (build_for_backend(checkpoint, "a48", PRESETS["a48"], backend, attention=attention,
                                         lm_head="int8") for backend in ("reference", "native"))
    unpacked = []
    read = _PackedRows.read
    monkeypatch.setattr(_PackedRows, "read", lambda self, dtype: unpacked.append(1) or read(self, dtype))
    prompt = torch.randint(4, 1000, (1, 10), generator=torch.Generator().manual_seed(5))
    tokens = []
    for model in (reference, fast):
        cache = PackedKVCache.for_model(model)
        with torch.no_grad():
            tokens.append(model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, cache=cache,
                                         pad_token_id=3)[0, 10:])
        if model is reference:
            unpacked.clear()
    layers = fast.config.num_hidden_layers
    assert op_calls.count("decode_attention_packed") == 39 * layers and "decode_attention" not in op_calls
    assert len(unpacked) == 4 * layers  # the prefill's read of the bos and main parts of K and V, nothing after
    assert torch.equal(tokens[0], tokens[1])


def test_a_cache_filled_under_inference_mode_decodes_outside_it():
    """A native model runs under ``torch.inference_mode`` (its inference tensors have no version counter, so the
    q/k/v linears quantize them each), and a prefill there leaves inference tensors in the caches: decoding on under
    ``torch.no_grad`` copies them into new buffers instead of failing on an in-place write (fp32 and packed)."""
    checkpoint = open_checkpoint(REFERENCE)
    attention = AttentionSpec(q_bits=4, k_bits=3, v_bits=3, bos_bits=4, method="minmax")
    model = build_for_backend(checkpoint, "a48", PRESETS["a48"], "native", attention=attention)
    prompt = torch.randint(4, 1000, (1, 10), generator=torch.Generator().manual_seed(7))
    for cache in (DynamicCache(), PackedKVCache.for_model(model)):
        with torch.inference_mode():
            token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with torch.no_grad():
            for _ in range(3):
                token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == 13


@pytest.mark.parametrize("case", ["b158", "a48-kv3", "a48-qwt"])
def test_decode_batch_gives_each_sequence_its_own_forward_logits_to_the_bit(case):
    """The server's batched step (three sequences of different lengths, each with its own cache, one step) gives
    each row the logits of that sequence's own forward, bit for bit, at every step: fp32 caches, packed 3-bit ones,
    and a QwT compensation hook on each layer (applied per row)."""
    import copy

    from bitnet_convert.quant.compensation import Compensation, attach

    checkpoint = open_checkpoint(REFERENCE)
    preset = case.split("-")[0]
    attention = AttentionSpec(q_bits=4, k_bits=3, v_bits=3, bos_bits=4, method="minmax") if "kv3" in case else None
    model = build_for_backend(checkpoint, preset, PRESETS[preset], "native", attention=attention)
    generator = torch.Generator().manual_seed(11)
    if "qwt" in case:
        for layer in model.model.layers:
            compensation = Compensation("full", model.config.hidden_size)
            compensation.weight.normal_(0, 0.02, generator=generator)
            attach(layer, compensation)
    prompts = [torch.randint(4, 1000, (1, n), generator=generator) for n in (5, 9, 2)]
    caches, tokens = [], []
    with torch.no_grad():
        for prompt in prompts:
            cache = PackedKVCache.for_model(model) if attention else DynamicCache()
            tokens.append(int(model(prompt, cache=cache, use_cache=True).logits[0, -1].argmax()))
            caches.append(cache)
        for _ in range(6):
            alone = [model(torch.tensor([[t]]), cache=copy.deepcopy(c), use_cache=True).logits[0, -1]
                     for t, c in zip(tokens, caches, strict=True)]
            batched = decode.decode_batch(model, torch.tensor(tokens), caches)
            assert batched is not None and batched.shape == (3, model.config.vocab_size)
            for row, want in zip(batched, alone, strict=True):
                assert torch.equal(row, want)
            tokens = batched.argmax(-1).tolist()
    assert [c.get_seq_length() for c in caches] == [11, 15, 8]
