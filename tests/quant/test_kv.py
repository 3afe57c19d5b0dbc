"""Low-bit attention: bit packing, the K/V quantizer, fake quant in attention, the packed cache, generate, and
left-padded batches."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    REPO,
)
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

import bitnet_convert
from bitnet_convert.cli import app
from bitnet_convert.quant import kv
from bitnet_convert.quant.kv import AttentionSpec, PackedKVCache, fake_quantize, fake_quantize_kv, quantize
from bitnet_convert.quant.packing import PackingError, pack_bits, unpack_bits

PAPER = AttentionSpec(q_bits=4, k_bits=3, v_bits=3, bos_bits=4)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 13), (2, 3, 4, 128), (4, 0)])
def test_bit_packing_round_trips_over_odd_shapes(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, shape[-1]), codes.to(torch.uint8))


def test_bit_packing_layout_and_errors():
    # codes 1..8 at 3 bits: little-endian bit string 100 010 110 001 101 011 111 000 → bytes 0xD1, 0x58, 0x1F
    assert pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0xD1, 0x58, 0x1F]
    with pytest.raises(PackingError, match=r"3-bit packing expects codes in \[0, 7\]"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(PackingError, match="cannot hold"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)


@pytest.mark.parametrize("method", ["minmax", "absmax"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_kv_quantizer_levels_and_error(method, bits):
    x = torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = quantize(x, bits, method)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == torch.float16 and scale.shape == (2, 3, 17, 1)
    assert (zero is None) == (method == "absmax")
    assert all(len(torch.unique(row)) <= 2**bits for row in codes.flatten(0, 2))
    error = (fake_quantize(x, bits, method) - x).abs()
    # half a step per value (plus the float16 rounding of scale and zero)
    assert (error <= 0.5 * scale.float() * 1.01 + 1e-3).all()


def t(*rows: list[float] | float) -> torch.Tensor:
    return torch.tensor(list(rows))


def fp16(value: float) -> float:
    """The fp16 value a KV scale is stored as."""
    return torch.tensor(value).half().item()


def test_minmax_3_and_4_bits_hand_computed() -> None:
    x3 = t(-2.0, 5.0, 1.5, 0.4)
    # 3 bits: qmax = 7, lo = -2, hi = 5, s = 7/7 = 1; (x − lo)/s = [0, 7, 3.5, 2.4] → round [0, 7, 4, 2]
    # → code·s + lo = [-2, 5, 2, 0]
    assert torch.equal(fake_quantize(x3, 3, "minmax"), t(-2.0, 5.0, 2.0, 0.0))
    x4 = t(-1.0, 14.0, 2.5, 6.6)
    # 4 bits: qmax = 15, lo = -1, hi = 14, s = 1; x − lo = [0, 15, 3.5, 7.6] → [0, 15, 4, 8] → [-1, 14, 3, 7]
    assert torch.equal(fake_quantize(x4, 4, "minmax"), t(-1.0, 14.0, 3.0, 7.0))
    x2 = t(0.0, 1.0, 0.2, 0.7)
    # 3 bits, s = fp16(1/7) = 0.142822…: x/s = [0, 7.002, 1.400, 4.901] → [0, 7, 1, 5] → ·s
    assert torch.equal(fake_quantize(x2, 3, "minmax"), t(0.0, 7.0, 1.0, 5.0) * fp16(1 / 7))


def test_minmax_over_chosen_dim() -> None:
    x = t([0.0, 10.0], [7.0, 3.0], [3.4, -5.0])
    # dim=0 (per column), 3 bits:
    #   col 0: lo 0, hi 7, s 1 → [0, 7, 3.4→3] ; col 1: lo -5, hi 10, s fp16(15/7) = 2.142578125
    #   col 1 codes: (x + 5)/s = [7.001, 3.734, 0] → [7, 4, 0] → code·s − 5
    out = fake_quantize(x, 3, "minmax", dim=0)
    assert torch.equal(out[:, 0], torch.tensor([0.0, 7.0, 3.0]))
    s = fp16(15 / 7)
    assert s == 2.142578125
    assert torch.equal(out[:, 1], torch.tensor([7 * s - 5, 4 * s - 5, -5.0]))
    # a tuple of dims: one range over the whole [heads, head_dim] block of a token
    y = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[0.0, 0.1], [0.2, 7.0]]])
    out = fake_quantize(y, 3, "minmax", dim=(-2, -1))
    # token 1: lo 0, hi 7, s 1 (3 bits) → [0, 0.1→0, 0.2→0, 7]
    assert torch.equal(out[1], torch.tensor([[0.0, 0.0], [0.0, 7.0]]))
    # token 0: lo 0, hi 3, s fp16(3/7) = 0.428466796875: x/s = [0, 2.33, 4.67, 7.002] → [0, 2, 5, 7] → ·s
    assert torch.equal(out[0], torch.tensor([[0.0, 2.0], [5.0, 7.0]]) * fp16(3 / 7))
    # per token (dim=-1): token [0, 0.1]: lo 0, s fp16(0.1/7) = 0.0142822265625 → codes [0, 7] → [0, 7·s]
    assert torch.equal(fake_quantize(y, 3, "minmax", dim=-1)[1, 0], torch.tensor([0.0, 7 * fp16(0.1 / 7)]))


def test_absmax_3_and_4_bits_hand_computed() -> None:
    x4 = t(7.0, -7.0, 2.5, -0.5)
    # 4 bits: z = 8, s = 7/7 = 1; x/s + z = [15, 1, 10.5, 7.5] → round [15, 1, 10, 8] → −z → [7, -7, 2, 0]
    assert torch.equal(fake_quantize(x4, 4, "absmax"), t(7.0, -7.0, 2.0, 0.0))
    x3 = t(3.0, -3.0, 1.5, -0.5, 2.5)
    # 3 bits: z = 4, s = 3/3 = 1; x + 4 = [7, 1, 5.5, 3.5, 6.5] → [7, 1, 6, 4, 6] → −4 → [3, -3, 2, 0, 2]
    assert torch.equal(fake_quantize(x3, 3, "absmax"), t(3.0, -3.0, 2.0, 0.0, 2.0))
    # per column (dim=0), 3 bits: col 0 max 3 (s=1), col 1 max 6 (s=2)
    y = t([3.0, 6.0], [-1.4, -3.0])
    # col 0: [3, -1.4] → [3, -1]; col 1: [6, -3]/2 = [3, -1.5] → +4 [7, 2.5] → [7, 2] → −4 → [3, -2] → ·2 = [6, -4]
    assert torch.equal(fake_quantize(y, 3, "absmax", dim=0), t([3.0, 6.0], [-1.0, -4.0]))


def test_bos_position_keeps_its_own_bits():
    x = torch.randn(1, 2, 9, 32, generator=torch.Generator().manual_seed(1))
    out = fake_quantize_kv(x, 3, PAPER)
    assert torch.equal(out[..., :1, :], fake_quantize(x[..., :1, :], 4, "minmax"))
    assert torch.equal(out[..., 1:, :], fake_quantize(x[..., 1:, :], 3, "minmax"))
    assert torch.equal(fake_quantize_kv(x, 3, AttentionSpec(k_bits=3)), fake_quantize(x, 3, "minmax"))
    channel = fake_quantize_kv(x, 3, AttentionSpec(k_bits=3, key_granularity="channel"), channel=True)
    assert torch.equal(channel, fake_quantize(x, 3, "minmax", dim=-2))


@pytest.mark.parametrize("bos_bits", [4, None])
@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_left_padding_is_not_part_of_the_quantization(bos_bits, granularity):
    """The BOS slot is the first real position, and per-channel statistics skip the padding (and the BOS slot)."""
    g = torch.Generator().manual_seed(2)
    spec = AttentionSpec(k_bits=3, bos_bits=bos_bits, key_granularity=granularity)
    channel = granularity == "channel"
    x = torch.randn(1, 2, 7, 8, generator=g)
    padded = torch.cat([50 * torch.randn(1, 2, 3, 8, generator=g), x], dim=-2)
    alone = fake_quantize_kv(x, 3, spec, channel=channel)
    together = fake_quantize_kv(padded, 3, spec, channel=channel, first=torch.tensor([3]))
    assert torch.equal(together[..., 3:, :], alone)
    assert torch.equal(fake_quantize_kv(x, 3, spec, channel=channel, first=torch.tensor([0])), alone)


@pytest.fixture(scope="module")
def a48(a48_reference):
    """The a48 conversion of the reference model with the paper's low-bit attention installed."""
    model = bitnet_convert.load(a48_reference)
    kv.install(model, PAPER)
    return model


def test_packed_cache_holds_exactly_the_fake_quantized_kv(a48, reference_ids):
    ids = reference_ids[:1, :40]
    raw = DynamicCache()  # on the fake-quant path the cache keeps K/V unquantized; attention quantizes them
    with torch.no_grad():
        a48(ids, cache=raw, use_cache=True)
    cache = PackedKVCache.for_model(a48)
    with torch.no_grad():
        a48(ids[:, :25], cache=cache, use_cache=True)
        a48(ids[:, 25:], cache=cache, use_cache=True)  # a second chunk appends
    for layer, packed in zip(raw.layers, cache.layers, strict=True):
        keys, values = packed.update(packed_empty(keys_like=layer.keys), packed_empty(keys_like=layer.values))
        assert torch.equal(keys, fake_quantize_kv(layer.keys, 3, PAPER))
        assert torch.equal(values, fake_quantize_kv(layer.values, 3, PAPER))
    assert cache.get_seq_length() == 40


def packed_empty(keys_like: torch.Tensor) -> torch.Tensor:
    """A zero-length update: reads the cache without adding positions."""
    return keys_like[..., :0, :]


def test_prefill_logits_and_greedy_tokens_match_fake_quant(a48, reference_ids):
    ids = reference_ids[:1, :48]
    with torch.no_grad():
        fake = a48(ids).logits
        packed = a48(ids, cache=PackedKVCache.for_model(a48), use_cache=True).logits
    assert torch.equal(fake, packed)
    prompt = ids[:, :12]
    with torch.no_grad():
        a = a48.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        b = a48.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                         cache=PackedKVCache.for_model(a48))
    assert torch.equal(a, b)


def test_beam_search_with_the_packed_cache_matches_fake_quant(a48, reference_ids):
    prompt = reference_ids[:2, :10]
    options = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "num_beams": 3,
               "num_return_sequences": 2}
    with torch.no_grad():
        fake = a48.generate(prompt, **options)
        packed = a48.generate(prompt, cache=PackedKVCache.for_model(a48), **options)
    assert fake.shape == (4, 26) and torch.equal(fake, packed)
    # the batch operations move codes, scales and zeros together
    cache = PackedKVCache.for_model(a48)
    with torch.no_grad():
        a48(reference_ids[:2, :9], cache=cache, use_cache=True)
    layer = cache.layers[0]
    empty = torch.zeros(2, 2, 0, 32)
    before = layer.update(empty, empty)[0]
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.update(empty.flip(0), empty)[0], before.flip(0))
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.update(torch.zeros(4, 2, 0, 32), torch.zeros(4, 2, 0, 32))[0],
                       before.flip(0).repeat_interleave(2, dim=0))


def test_packed_cache_is_at_most_022_of_bf16_at_4k_tokens():
    layers, heads, head_dim, tokens = 2, 5, 128, 4096  # 2B-4T's attention per layer (it has 30 layers)
    dense, packed = DynamicCache(), PackedKVCache(layers, 3, 3, 4)
    for layer in range(layers):
        k = torch.randn(1, heads, tokens, head_dim).to(torch.bfloat16)
        dense.update(k, k, layer)
        packed.update(k, k, layer)
    dense_bytes = sum(t.numel() * t.element_size() for lay in dense.layers for t in (lay.keys, lay.values))
    # per (token, head): 128 · 3 / 8 = 48 bytes of codes + float16 scale and zero = 52 bytes, vs 256 in bf16
    assert packed.nbytes == 2 * layers * heads * ((tokens - 1) * 52 + 64 + 4)
    assert packed.nbytes / dense_bytes <= 0.22


def test_attention_spec_is_exported_and_restored(tmp_path, reference_ids):
    out = bitnet_convert.quantize(
        REPO / "recipes/a48-kv3.yaml", output=str(tmp_path / "kv3"), calibration__samples=0
    )
    config = json.loads((out.output / "config.json").read_text())
    assert config["bitnet_convert"]["attention"]["k_bits"] == 3
    loaded = bitnet_convert.load(out.output)
    assert kv.spec_of(loaded) == PAPER and loaded.config._attn_implementation == kv.ATTN_IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(loaded(reference_ids[:2]).logits, out.model(reference_ids[:2]).logits)
    assert out.report["attention"] == PAPER.describe()


def test_generate_command_streams_with_the_packed_cache(tmp_path):
    out = bitnet_convert.quantize(REPO / "recipes/a48-kv3.yaml", output=str(tmp_path / "kv3"),
                                  calibration__samples=0).output
    result = CliRunner().invoke(app, ["generate", str(out), "--prompt", "Anna is a kind baker", "--max-new-tokens",
                                      "12"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Anna is a kind baker")
    assert "cache: packed 3-bit K/V, BOS 4-bit" in result.output and "12 tokens in" in result.output


@pytest.mark.parametrize(
    ("setting", "message"),
    [("scheme.attention.k_bits=9", "scheme.attention.k_bits: Input should be less than or equal to 8 (got 9)"),
     ("scheme.attention.v_bits=1", "scheme.attention.v_bits: Input should be greater than or equal to 2 (got 1)"),
     ("scheme.attention.method=log", "scheme.attention.method:")],
)
def test_bad_attention_settings_are_clear_errors(tmp_path, setting, message):
    result = CliRunner().invoke(app, ["quantize", "--recipe", str(REPO / "recipes/a48.yaml"), "--output",
                                      str(tmp_path / "x"), "--set", setting])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_kv_bits_out_of_range_and_unsupported_models_are_clear_errors():
    result = CliRunner().invoke(app, ["generate", "builtin:reference", "--prompt", "x", "--kv-bits", "9"])
    assert result.exit_code == 2 and "--kv-bits" in result.output
    with pytest.raises(ValueError, match=r"k_bits must be in 2\.\.8, got 1"):
        PackedKVCache(2, k_bits=1)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="no attention modules with q_proj/k_proj/v_proj"):
        kv.install(gpt2, PAPER)
    with pytest.raises(ValueError, match="key_granularity 'channel' is for evaluation"):
        PackedKVCache.for_model(gpt2, AttentionSpec(k_bits=3, v_bits=3, key_granularity="channel"))


@pytest.fixture(scope="module")
def kv3(tmp_path_factory):
    out = tmp_path_factory.mktemp("pad") / "kv3"
    bitnet_convert.quantize(REPO / "recipes/a48-kv3.yaml", output=str(out), calibration__samples=0)
    return bitnet_convert.load(out), bitnet_convert.load_tokenizer(out)


def test_left_padded_batch_equals_single_prompts(kv3):
    from bitnet_convert.quant.kv import PackedKVCache

    model, tokenizer = kv3
    prompts = ["Anna is a kind baker who", "Tom"]
    rows = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), tokenizer.pad_token_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert (batch[i, width - len(row):] - alone).abs().max() <= 1e-4 * (alone.max() - alone.min())
        for cache in (lambda: PackedKVCache.for_model(model), lambda: None):
            padded = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache=cache(),
                                    pad_token_id=tokenizer.pad_token_id)
            for i, row in enumerate(rows):
                single = model.generate(row[None], max_new_tokens=12, do_sample=False, cache=cache(),
                                        pad_token_id=tokenizer.pad_token_id)
                assert padded[i, width:].tolist() == single[0, len(row):].tolist()


def test_left_padding_is_outside_per_channel_key_statistics_in_the_model(kv3):
    from bitnet_convert.quant.kv import AttentionSpec, install, spec_of

    model, tokenizer = kv3
    paper = spec_of(model)
    install(model, AttentionSpec(k_bits=3, v_bits=3, key_granularity="channel"))
    try:
        row = tokenizer("Anna is a kind baker who", return_tensors="pt").input_ids[0]
        ids = torch.cat([torch.full((3,), tokenizer.pad_token_id), row])[None]
        mask = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(len(row), dtype=torch.long)])[None]
        with torch.no_grad():
            padded = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0, 3:]
            alone = model(row[None]).logits[0]
        assert (padded - alone).abs().max() <= 1e-4 * (alone.max() - alone.min())
    finally:
        install(model, paper)


def test_lm_eval_batching_does_not_change_kv3_results(kv3):
    """lm-eval's two batching paths: log-likelihood batches (right padding) give the results of batch size 1,
    and its generation path (left padding through ``tok_batch_encode`` and ``generate``) the tokens of each prompt
    alone."""
    from lm_eval.models.huggingface import HFLM

    from bitnet_convert.evaluation.evaluate import EvalSettings, lm_eval_results

    model, tokenizer = kv3
    one, many = (lm_eval_results(model, tokenizer, ["reference_agreement"], EvalSettings(limit=6, batch_size=b))
                 for b in (1, 6))
    assert one == many
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["Anna is a kind baker who lives in", "Tom"]

    def generated(batch: list[str]) -> tuple[list[list[int]], torch.Tensor]:
        ids, mask = lm.tok_batch_encode(batch)
        out = lm._model_generate(ids, max_length=ids.shape[1] + 10, stop=["\n\n\n"], attention_mask=mask,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        return [row[ids.shape[1]:].tolist() for row in out.sequences], torch.stack(out.logits, dim=1)

    tokens, scores = generated(prompts)
    for i, prompt in enumerate(prompts):
        alone_tokens, alone_scores = generated([prompt])
        assert tokens[i] == alone_tokens[0]
        span = alone_scores.max() - alone_scores.min()
        assert (scores[i] - alone_scores[0]).abs().max() <= 1e-4 * span
