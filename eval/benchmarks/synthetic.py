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


def write_synthetic_checkpoint(directory: Path, shape: ShapeConfig, seed: int, max_bytes: int = SHARD_BYTES,
                               sparsity: str = "random") -> None:
    """Write a bf16 master checkpoint of ``shape`` into ``directory``, one shard in memory at a time.

    Weights are N(0, INIT_STD²) from one ``torch.Generator`` seeded with ``seed``, drawn tensor by tensor in
    checkpoint order; norm weights are ones. ``sparsity="trained"`` then gives every FFN the relu² sparsity of a
    trained model (:class:`TrainedSparsity`); ``"random"`` leaves it as random weights make it (about half of the
    gate outputs negative).
    """
    import torch

    from bitnet_convert.io.export import save_shards

    if sparsity not in SPARSITIES:
        raise ValueError(f"sparsity '{sparsity}' is unknown; expected one of {', '.join(SPARSITIES)}")
    generator = torch.Generator().manual_seed(seed)
    plan = plan_shards(shape, max_bytes)
    trained = TrainedSparsity(shape, seed) if sparsity == "trained" else None

    def shard(entries: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        tensors = {name: torch.ones(dims, dtype=torch.bfloat16) if len(dims) == 1 else
                   torch.randn(dims, generator=generator, dtype=torch.bfloat16).mul_(INIT_STD)
                   for name, dims in entries}
        return tensors if trained is None else trained.shape_tensors(tensors)

    directory.mkdir(parents=True, exist_ok=True)
    save_shards((shard(entries) for entries in plan), len(plan), directory)
    (directory / "config.json").write_text(json.dumps(shape.hf_config(), indent=2) + "\n")


#: ``write_synthetic_checkpoint(sparsity=...)`` choices.
SPARSITIES = ("random", "trained")
#: Target share of the FFN's gate outputs that relu² makes zero in the ``trained`` synthetic checkpoint: about what
#: a trained BitNet has (measured on the reference model: 70.7% of up_proj outputs not needed at decode).
TRAINED_ZERO_SHARE = 0.70
#: Target share of zero down_proj input codes in the ``trained`` checkpoint (reference model: 86%).
TRAINED_DOWN_ZERO_SHARE = 0.85


class TrainedSparsity:
    """Gives random weights the relu² sparsity of a trained model, with every gate output still token-dependent.

    How: a set of hidden channels (one in ``CHANNEL_SHARE``) carries a constant positive value through the whole
    residual stream (the embedding sets it; o_proj and down_proj never write those channels: their weight rows are 0),
    every gate_proj row has a negative weight on those channels, so each gate output is its random part minus a
    shared offset, and each layer's post_attention_layernorm gain on those channels sets the offset's size: it is chosen
    so that ``TRAINED_ZERO_SHARE`` of the gate outputs of that layer are ≤ 0 on ``TOKENS`` random tokens, by
    running the layers in order (float activations, absmean-ternarized weights, as the b1.58 model computes
    them, on one thread so the bytes do not depend on the machine). The relu² zeros make most of the down_proj
    input codes zero; a raised ffn_sub_norm gain on ``OUTLIER_SHARE`` of the intermediate channels (the outlier
    features of trained models) rounds more of the small products to zero, up to ``TRAINED_DOWN_ZERO_SHARE``. The
    shares measured while decoding are in the benchmark's rows."""

    #: one hidden channel in ``CHANNEL_SHARE`` carries the offset (64 of 2B-4T's 2,560)
    CHANNEL_SHARE = 40
    TOKENS = 64
    #: the share of the intermediate channels whose ffn_sub_norm gain is raised (outlier features, as trained
    #: models have), so that more of the small relu² products round to zero codes
    OUTLIER_SHARE = 0.01
    #: the constant value of those channels in the embedding (the other entries are N(0, INIT_STD²))
    OFFSET = INIT_STD

    #: bumped whenever the algorithm changes for the same settings (part of the cache key)
    VERSION = 2  # 2: the down_proj codes of the outlier-gain search from the project's absmax quantizer

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """Everything that decides the checkpoint's bytes besides shape and seed."""
        return {"version": cls.VERSION, "channel_share": cls.CHANNEL_SHARE, "tokens": cls.TOKENS,
                "offset": cls.OFFSET, "outlier_share": cls.OUTLIER_SHARE, "zero_share": TRAINED_ZERO_SHARE,
                "down_zero_share": TRAINED_DOWN_ZERO_SHARE}

    def __init__(self, shape: ShapeConfig, seed: int) -> None:
        import torch

        self.shape = shape
        self.channels = slice(0, max(1, shape.hidden // self.CHANNEL_SHARE))
        self.tokens = torch.randint(0, shape.vocab, (self.TOKENS,), generator=torch.Generator().manual_seed(seed + 1))
        self.hidden: Any = None  # the residual stream of the tokens after the layers seen so far
        self.layer_module: Any = None
        self.rotary: Any = None

    def shape_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Change one shard's tensors in place (in checkpoint order, so layers come one after the other)."""
        from bitnet_convert.runtime.devices import one_cpu_thread

        embed = tensors.get("model.embed_tokens.weight")
        with one_cpu_thread():
            if embed is not None:
                embed[:, self.channels] = self.OFFSET
                self.hidden = embed[self.tokens].float()[None]
            for layer in sorted({int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")}):
                self._shape_layer({n.split(".", 3)[3]: t for n, t in tensors.items()
                                   if n.startswith(f"model.layers.{layer}.")})
        return tensors

    def _shape_layer(self, weights: dict[str, Any]) -> None:
        import torch

        weights["self_attn.o_proj.weight"][self.channels] = 0
        weights["mlp.down_proj.weight"][self.channels] = 0
        weights["mlp.gate_proj.weight"][:, self.channels] = -3 * INIT_STD  # ternarizes to -1
        layer = self._layer(weights)
        with torch.no_grad():
            positions = torch.arange(self.TOKENS)[None]
            cos_sin = self.rotary(self.hidden, positions)
            residual = self.hidden + layer.self_attn(layer.input_layernorm(self.hidden), attention_mask=None,
                                                     position_embeddings=cos_sin)[0]
            normed = layer.post_attention_layernorm(residual)[0]  # its gain is still 1 everywhere
            gate = layer.mlp.gate_proj.weight
            rest = normed.clone()
            rest[:, self.channels] = 0
            random_part = rest @ gate.T
            offset = normed[:, self.channels] @ gate[:, self.channels].abs().T  # > 0: the channels are positive
            gain = torch.quantile((random_part / offset).flatten().double(), TRAINED_ZERO_SHARE).item()
            weights["post_attention_layernorm.weight"][self.channels] = gain  # stored in bf16: the stored value
            layer.post_attention_layernorm.weight[self.channels] = weights["post_attention_layernorm.weight"][
                self.channels].float()
            self._outlier_gain(layer, residual, weights)
            self.hidden = residual + layer.mlp(layer.post_attention_layernorm(residual))

    def _outlier_gain(self, layer: Any, residual: Any, weights: dict[str, Any]) -> None:
        """Set the ffn_sub_norm gain of the first ``OUTLIER_SHARE`` of the intermediate channels so that
        ``TRAINED_DOWN_ZERO_SHARE`` of the down_proj input codes (8-bit absmax per token) are zero, by bisection
        over the gain (the zero share grows with it: a larger absmax rounds more small entries to 0)."""
        from bitnet_convert.quant import functional as F

        mlp = layer.mlp
        x = layer.post_attention_layernorm(residual)[0]
        product = mlp.ffn_sub_norm(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # gain 1 everywhere so far
        outliers = slice(0, max(1, round(self.OUTLIER_SHARE * product.shape[-1])))

        def zero_share(gain: float) -> float:  # of the codes of the down_proj input quantizer, 8-bit absmax
            scaled = product.clone()
            scaled[:, outliers] *= gain
            return (scaled * F.absmax_scale(scaled, 8)).round().eq(0).float().mean().item()

        low, high = 1.0, 64.0
        for _ in range(20):
            middle = (low * high) ** 0.5
            low, high = (middle, high) if zero_share(middle) < TRAINED_DOWN_ZERO_SHARE else (low, middle)
        weights["mlp.ffn_sub_norm.weight"][outliers] = high
        mlp.ffn_sub_norm.weight[outliers] = weights["mlp.ffn_sub_norm.weight"][outliers].float()

    def _layer(self, weights: dict[str, Any]) -> Any:
        """The decoder layer of transformers' BitNet with these weights, absmean-ternarized, in float."""
        from transformers import BitNetConfig
        from transformers.models.bitnet.modeling_bitnet import BitNetDecoderLayer, BitNetRotaryEmbedding

        if self.layer_module is None:
            config = {k: v for k, v in self.shape.hf_config().items() if k != "quantization_config"}
            config = BitNetConfig(**{**config, "num_hidden_layers": 1})
            config._attn_implementation = "sdpa"  # causal over the tokens
            self.layer_module = BitNetDecoderLayer(config, 0).eval()
            self.rotary = BitNetRotaryEmbedding(config)
        state = {}
        for name, tensor in weights.items():
            value = tensor.float()
            if value.dim() == 2:
                scale = value.abs().mean().clamp(min=1e-5)
                value = (value / scale).round().clamp(-1, 1) * scale
            state[name] = value
        self.layer_module.load_state_dict(state)
        return self.layer_module


def synthetic_key(shape: ShapeConfig, seed: int, sparsity: str = "random") -> str:
    """Cache directory name: depth plus a hash of everything that determines the checkpoint's bytes (the random
    checkpoints keep the names they had before ``sparsity`` existed)."""
    recipe = {"shape": asdict(shape), "seed": seed, "std": INIT_STD, "shard": SHARD_BYTES, "v": SYNTHETIC_FORMAT}
    if sparsity != "random":
        recipe["sparsity"] = sparsity
        recipe["trained"] = TrainedSparsity.settings()  # a change of how it is made makes a new checkpoint
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    kind = "" if sparsity == "random" else f"-{sparsity}"
    return f"bitnet-2b4t-{shape.layers}L{kind}-seed{seed}-{digest}"


def ensure_synthetic_checkpoint(cache_dir: Path, shape: ShapeConfig, seed: int, sparsity: str = "random") -> Path:
    """The cached synthetic checkpoint for ``shape``/``seed``/``sparsity`` (see :func:`write_synthetic_checkpoint`);
    generated (in a child process) when missing."""
    directory = cache_dir / synthetic_key(shape, seed, sparsity)
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
        result = run_job("generate", {"output": str(tmp), "shape": asdict(shape), "seed": seed,
                                      "sparsity": sparsity}, directory.name)
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
    write_synthetic_checkpoint(Path(spec["output"]), ShapeConfig(**spec["shape"]), spec["seed"],
                               sparsity=spec.get("sparsity", "random"))
    return {"work_s": time.perf_counter() - start}


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"generate": _job_generate}
