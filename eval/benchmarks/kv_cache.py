"""``kv_cache``: the packed KV cache's memory against a bf16 DynamicCache, and decode speed with each cache."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import REFERENCE_MODEL, Row, run_job
from benchmarks.synthetic import ShapeConfig

MAX_KV_RATIO = 0.22  # packed 3-bit cache ÷ bf16 cache at 4k tokens, scales included
KV_TOKENS = (1024, 4096, 16384)


def bench_kv_cache(args: argparse.Namespace) -> list[Row]:
    """Bytes of the packed 3-bit KV cache vs a bf16 DynamicCache (2B-4T attention shapes), and decode speed of
    the reference model with each cache."""
    shape = ShapeConfig(layers=args.layers)
    rows = []
    for tokens in KV_TOKENS:
        spec = {"layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "tokens": tokens,
                "kv_bits": 3, "bos_bits": 4, "threads": args.threads}
        subject = f"2B-4T attention, {shape.layers} layers, {tokens} tokens"
        result = run_job("kv_memory", spec, subject)
        if not result.ok:
            rows.append(Row("kv_cache", subject, "cache bytes", f"failed: {result.error}", passed=False))
            continue
        data = result.data
        ratio = data["packed_bytes"] / data["dense_bytes"]
        target = f"≤ {MAX_KV_RATIO}" if tokens == 4096 else ""
        rows.append(Row(
            "kv_cache", subject, "packed 3-bit (BOS 4-bit) / bf16 DynamicCache",
            f"{data['packed_bytes'] / 1e6:.1f} MB / {data['dense_bytes'] / 1e6:.1f} MB = {ratio:.3f} "
            f"({data['packed_bytes'] / tokens:,.0f} vs {data['dense_bytes'] / tokens:,.0f} B/token)",
            target, ratio <= MAX_KV_RATIO if target else None, ratio, "ratio", data,
        ))
    if not (REFERENCE_MODEL / "config.json").is_file():
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "a48"
        prepared = run_job("quantize", {"recipe": str(args.recipe), "model": "builtin:reference",
                                        "output": str(converted), "threads": args.threads}, "reference model")
        if not prepared.ok:
            return [*rows, Row("kv_cache", "reference model", "decode", f"failed: {prepared.error}", passed=False)]
        spec = {"model": str(converted), "prompt": "Anna is a kind baker who lives in Oakfield.",
                "new_tokens": 200, "threads": args.threads}
        result = run_job("decode", spec, "reference model decode")
    if not result.ok:
        return [*rows, Row("kv_cache", "reference model", "decode", f"failed: {result.error}", passed=False)]
    speeds = result.data["tokens_per_s"]
    base = next(iter(speeds.values()))
    for name, speed in speeds.items():
        rows.append(Row("kv_cache", f"reference a48, greedy 200 tokens: {name}", "decode tokens/s",
                        f"{speed:.1f} ({speed / base:.2f}×)", value=speed, unit="tokens/s", details=result.data))
    return rows


def _job_kv_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill a bf16 DynamicCache and a packed cache with the same random post-RoPE K/V of 2B-4T's attention shape
    and count the bytes of each cache object's tensors."""
    import torch
    from transformers import DynamicCache

    from bitnet_convert.quant.kv import PackedKVCache, cache_nbytes

    start = time.perf_counter()
    layers, heads, head_dim, tokens = spec["layers"], spec["kv_heads"], spec["head_dim"], spec["tokens"]
    generator = torch.Generator().manual_seed(0)
    dense = DynamicCache()
    packed = PackedKVCache(layers, spec["kv_bits"], spec["kv_bits"], spec["bos_bits"])
    for layer in range(layers):
        k = torch.randn(1, heads, tokens, head_dim, generator=generator).to(torch.bfloat16)
        v = torch.randn(1, heads, tokens, head_dim, generator=generator).to(torch.bfloat16)
        dense.update(k, v, layer)
        packed.update(k, v, layer)
    return {"work_s": time.perf_counter() - start, "dense_bytes": cache_nbytes(dense), "packed_bytes": packed.nbytes,
            "tokens": tokens, "positions": packed.get_seq_length()}


def _job_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding on the reference model (a48) with each cache, side by side, after one warm-up each."""
    import torch
    from transformers import DynamicCache

    import bitnet_convert
    from bitnet_convert.quant import kv

    model = bitnet_convert.load(spec["model"])
    tokenizer = bitnet_convert.load_tokenizer(spec["model"])
    ids = tokenizer(spec["prompt"], return_tensors="pt").input_ids
    caches = {
        "DynamicCache, full-precision attention": (None, DynamicCache),
        "DynamicCache + fake-quant Q4 K3 V3 in attention": (kv.AttentionSpec(q_bits=4, k_bits=3, v_bits=3, bos_bits=4),
                                                             DynamicCache),
        "PackedKVCache 3-bit (BOS 4) + Q4": (kv.AttentionSpec(q_bits=4, k_bits=3, v_bits=3, bos_bits=4),
                                             lambda: kv.PackedKVCache.for_model(model)),
    }
    start = time.perf_counter()
    rows, outputs = {}, {}
    for name, (attention, make_cache) in caches.items():
        kv.install(model, attention)
        for _attempt in range(2):  # the first run warms up allocators and caches
            cache = make_cache()
            began = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                                     do_sample=False, cache=cache, pad_token_id=tokenizer.pad_token_id)
            seconds = time.perf_counter() - began
        rows[name] = spec["new_tokens"] / seconds
        outputs[name] = out[0].tolist()
    names = list(caches)
    return {"work_s": time.perf_counter() - start, "tokens_per_s": rows,
            "packed_equals_fake_quant": outputs[names[1]] == outputs[names[2]]}


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"kv_memory": _job_kv_memory, "decode": _job_decode}
