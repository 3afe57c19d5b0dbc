"""The synthetic checkpoint: bf16 master weights with the exact shapes of bitnet-b1.58-2B-4T (like the public
"-bf16" release), optionally truncated in depth, generated once (in a child job) into the cache directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import GB, JobResult, Row, run_job

INDEX_FILE = "model.safetensors.index.json"  # written by save_shards next to the shards

#: Synthetic master weights: normal with this std, from a ``torch.Generator`` seeded with ``--seed``.
INIT_STD = 0.02
#: Upper bound on one shard of the synthetic checkpoint (whole layers per shard, like the public release).
SHARD_BYTES = 2_000_000_000
#: Bumped whenever the generated checkpoint changes for the same arguments (part of the cache key).
SYNTHETIC_FORMAT = 1


@dataclass(frozen=True)
class ShapeConfig:
    """The architecture of bitnet-b1.58-2B-4T (its public config.json); ``layers`` may truncate the depth."""

    layers: int = 30
    hidden: int = 2560
    intermediate: int = 6912
    heads: int = 20
    kv_heads: int = 5
    head_dim: int = 128
    vocab: int = 128256

    def layer_groups(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """Tensor names and shapes in checkpoint order, grouped so that no group is split across shards:
        the embedding, then one group per decoder layer, then the final norm (embeddings are tied)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        groups = [[("model.embed_tokens.weight", (self.vocab, self.hidden))]]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            groups.append(
                [
                    (f"{p}.input_layernorm.weight", (self.hidden,)),
                    (f"{p}.self_attn.q_proj.weight", (q, self.hidden)),
                    (f"{p}.self_attn.k_proj.weight", (kv, self.hidden)),
                    (f"{p}.self_attn.v_proj.weight", (kv, self.hidden)),
                    (f"{p}.self_attn.attn_sub_norm.weight", (q,)),
                    (f"{p}.self_attn.o_proj.weight", (self.hidden, q)),
                    (f"{p}.post_attention_layernorm.weight", (self.hidden,)),
                    (f"{p}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                    (f"{p}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                    (f"{p}.mlp.ffn_sub_norm.weight", (self.intermediate,)),
                    (f"{p}.mlp.down_proj.weight", (self.hidden, self.intermediate)),
                ]
            )
        groups.append([("model.norm.weight", (self.hidden,))])
        return groups

    def hf_config(self) -> dict[str, Any]:
        """config.json of the bf16 master release (online AutoBitLinear), with this depth."""
        return {
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "relu2",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": INIT_STD,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "tie_word_embeddings": True,
            "use_cache": True,
            "dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "online",
            },
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def plan_shards(shape: ShapeConfig, max_bytes: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedily fill shards of at most ``max_bytes`` (bf16) with whole groups; a larger group gets its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for group in shape.layer_groups():
        group_bytes = 2 * sum(_numel(s) for _, s in group)
        if shards[-1] and size + group_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    return shards


def write_synthetic_checkpoint(directory: Path, shape: ShapeConfig, seed: int, max_bytes: int = SHARD_BYTES) -> None:
    """Write a bf16 master checkpoint of ``shape`` into ``directory``, one shard in memory at a time.

    Weights are N(0, INIT_STD²) from one ``torch.Generator`` seeded with ``seed``, drawn tensor by tensor in
    checkpoint order; norm weights are ones.
    """
    import torch

    from bitnet_convert.io.export import save_shards

    generator = torch.Generator().manual_seed(seed)
    plan = plan_shards(shape, max_bytes)

    def shard(entries: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        return {name: torch.ones(dims, dtype=torch.bfloat16) if len(dims) == 1 else
                torch.randn(dims, generator=generator, dtype=torch.bfloat16).mul_(INIT_STD) for name, dims in entries}

    directory.mkdir(parents=True, exist_ok=True)
    save_shards((shard(entries) for entries in plan), len(plan), directory)
    (directory / "config.json").write_text(json.dumps(shape.hf_config(), indent=2) + "\n")


def synthetic_key(shape: ShapeConfig, seed: int) -> str:
    """Cache directory name: depth plus a hash of everything that determines the checkpoint's bytes."""
    recipe = {"shape": asdict(shape), "seed": seed, "std": INIT_STD, "shard": SHARD_BYTES, "v": SYNTHETIC_FORMAT}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"bitnet-2b4t-{shape.layers}L-seed{seed}-{digest}"


def ensure_synthetic_checkpoint(cache_dir: Path, shape: ShapeConfig, seed: int) -> Path:
    """The cached synthetic checkpoint for ``shape``/``seed``; generated (in a child process) when missing."""
    directory = cache_dir / synthetic_key(shape, seed)
    if (directory / "config.json").is_file():  # written last, and the directory appears whole with a rename
        print(f"[bench] reusing synthetic checkpoint {directory}", file=sys.stderr, flush=True)
        return directory
    cache_dir.mkdir(parents=True, exist_ok=True)
    need = 2 * sum(_numel(s) for group in shape.layer_groups() for _, s in group)
    free = shutil.disk_usage(cache_dir).free
    if free < need * 1.1:
        raise SystemExit(f"bench: generating {directory.name} needs {need / GB:.1f} GB, {free / GB:.1f} GB free")
    tmp = cache_dir / f".{directory.name}.tmp-{os.getpid()}"
    try:
        result = run_job("generate", {"output": str(tmp), "shape": asdict(shape), "seed": seed}, directory.name)
        if not result.ok:
            raise SystemExit(f"bench: generating the synthetic checkpoint failed: {result.error}")
        tmp.rename(directory)  # complete checkpoints only
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def checkpoint_bytes(directory: Path) -> int:
    """Size of a checkpoint: the sum of its safetensors files."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def jobs_by_depth(benchmark: str, args: Any, depths: tuple[int, ...], kind: str, spec: dict[str, Any],
                  subject: Callable[[int, int], str]) -> tuple[list[Row], dict[int, tuple[str, int, JobResult]]]:
    """The child job ``kind`` on the synthetic 2B-4T checkpoint truncated to each of ``depths`` (capped at
    ``args.layers``, each depth once, shallowest first), ``spec`` plus the checkpoint and ``args.threads``.
    ``subject(layers, checkpoint bytes)`` labels a depth. Returns a failed row per job that failed, and
    ``{layers: (subject, checkpoint bytes, result)}`` of those that ran."""
    failed, done = [], {}
    for layers in sorted({min(d, args.layers) for d in depths}):
        checkpoint = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), ShapeConfig(layers=layers), args.seed)
        size = checkpoint_bytes(checkpoint)
        label = subject(layers, size)
        result = run_job(kind, {**spec, "model": str(checkpoint), "threads": args.threads}, label)
        if result.ok:
            done[layers] = (label, size, result)
        else:
            failed.append(Row(benchmark, label, kind, f"failed: {result.error}", passed=False))
    return failed, done


def _job_generate(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    write_synthetic_checkpoint(Path(spec["output"]), ShapeConfig(**spec["shape"]), spec["seed"])
    return {"work_s": time.perf_counter() - start}


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"generate": _job_generate}
