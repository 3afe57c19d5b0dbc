"""The benchmarks behind the README's performance table.

Each benchmark is a function in :data:`BENCHMARKS` that returns table rows; ``--only NAME`` runs a subset. The
rows are printed as a markdown table on stdout and written as JSON (``--json``); progress goes to stderr.

``conversion`` compares ``bitnet_convert.quantize`` (recipe a48, no calibration) with stock transformers'
``from_pretrained`` + ``save_pretrained`` on the same checkpoint: a synthetic checkpoint with the exact shapes of
bitnet-b1.58-2B-4T (bf16 master weights, like the public "-bf16" release; generated once into ``--cache-dir``)
and the built-in reference model when it exists. Every job runs in a fresh subprocess, so its peak RSS is its
own; the orchestrating process imports nothing heavier than the standard library, so the children inherit no
high-water mark from it. Wall times are measured in the child around the work (imports excluded) and, as a
second number, around the whole child process.

``kv_cache`` measures the packed KV cache's memory and decode speed, ``calibration`` the peak memory of
layer-by-layer calibration at several depths, and ``distill`` the fine-tune's step time and peak memory at two
depths (the 30-layer memory extrapolated).

Usage::

    python eval/bench.py --layers 2            # quick: a 2-layer synthetic checkpoint
    python eval/bench.py                       # the full 30-layer 2B-4T shapes (~5 GB cache, some minutes)
    python eval/bench.py --only conversion --json eval/results/bench.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_MODEL = REPO_ROOT / "eval" / "reference" / "model"
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "a48.yaml"
DEFAULT_JSON = REPO_ROOT / "eval" / "results" / "bench.json"
DEFAULT_CACHE = Path("~/.cache/bitnet-convert/bench")
INDEX_FILE = "model.safetensors.index.json"
RESULT_MARKER = "BENCH_RESULT "  # prefixes the one stdout line of a child job that carries its JSON result

#: Synthetic master weights: normal with this std, from a ``torch.Generator`` seeded with ``--seed``.
INIT_STD = 0.02
#: Upper bound on one shard of the synthetic checkpoint (whole layers per shard, like the public release).
SHARD_BYTES = 2_000_000_000
#: Bumped whenever the generated checkpoint changes for the same arguments (part of the cache key).
SYNTHETIC_FORMAT = 1

# Targets of the conversion benchmark.
PACKED_BITS = 2.0  # per ternary weight, plus one fp32 scale per linear
SCALE_BITS = 32
MAX_RSS_PER_CHECKPOINT = 1.25  # quantize peak RSS ÷ bf16 checkpoint size
MAX_WALL_RATIO = 1.5  # quantize wall time ÷ transformers load+save wall time

GB = 1e9


# ------------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the results table; ``value``/``unit``/``details`` are the machine-readable side."""

    benchmark: str
    subject: str
    metric: str
    measured: str
    target: str = ""
    passed: bool | None = None
    value: float | None = None
    unit: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "pass", False: "**FAIL**", None: ""}[self.passed]


def markdown_table(rows: list[Row]) -> str:
    header = ["benchmark", "model", "metric", "measured", "target", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.benchmark, row.subject, row.metric, row.measured, row.target, row.status]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ child processes


@dataclass
class JobResult:
    """What one child job reported (``data``), or why it failed (``error``), and its total wall time."""

    total_s: float
    data: dict[str, Any]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


#: The longest a benchmark subprocess may run (seconds, ``BENCH_JOB_TIMEOUT``): a job that hangs fails its row
#: instead of the whole benchmark.
JOB_TIMEOUT_ENV = "BENCH_JOB_TIMEOUT"
JOB_TIMEOUT_S = 3600.0


def job_timeout_s() -> float:
    raw = os.environ.get(JOB_TIMEOUT_ENV)
    if raw is None:
        return JOB_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        sys.exit(f"error: {JOB_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def run_bounded(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``command`` in a subprocess of its own process group, killed with the whole group (torchrun's workers, a
    compiler) after :func:`job_timeout_s`; then exit code 124, the output it had written, and a last stderr line
    saying so."""
    limit = job_timeout_s()
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        return subprocess.CompletedProcess(command, 124, stdout, f"{stderr}timed out after {limit:g} s "
                                                                 f"({JOB_TIMEOUT_ENV})")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_job(kind: str, spec: dict[str, Any], label: str) -> JobResult:
    """Run ``JOBS[kind](spec)`` in a fresh Python process; return its result line and total wall time.

    ``spec["threads"]``, when set, is the child's ``torch.set_num_threads`` (applied before the clock starts).
    """
    print(f"[bench] {label}: {kind} ...", file=sys.stderr, flush=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--job", kind, "--spec", json.dumps(spec)]
    loadavg = os.getloadavg()[0]
    start = time.perf_counter()
    proc = run_bounded(command)
    total = time.perf_counter() - start
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    data = json.loads(results[-1][len(RESULT_MARKER) :]) if results else {}
    data["loadavg_1min_at_start"] = loadavg
    error = data.get("error")
    if proc.returncode != 0 or not results:
        stderr_lines = [line for line in proc.stderr.splitlines() if line.strip()]
        error = f"exit code {proc.returncode}: {stderr_lines[-1] if stderr_lines else 'no output'}"
    result = JobResult(total_s=total, data=data, error=error)
    if result.ok:
        summary = f"{data['work_s']:.1f} s (process {total:.1f} s), peak RSS {data['peak_rss_bytes'] / GB:.2f} GB"
    else:
        summary = f"FAILED after {total:.1f} s: {error}"
    print(f"[bench] {label}: {kind} {summary}", file=sys.stderr, flush=True)
    return result


def child_main(kind: str, spec_json: str) -> int:
    """Entry point of a child process: run one job, print its result as one JSON line."""
    spec = json.loads(spec_json)
    try:
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        data = JOBS[kind](spec)
    except Exception as exc:  # any failure becomes a row in the parent's table
        traceback.print_exc()
        data = {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
    data["torch_threads"] = _torch_threads()
    data["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(RESULT_MARKER + json.dumps(data), flush=True)
    return 0


def _job_generate(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    write_synthetic_checkpoint(Path(spec["output"]), ShapeConfig(**spec["shape"]), spec["seed"])
    return {"work_s": time.perf_counter() - start}


def _job_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    import bitnet_convert
    from bitnet_convert.runtime.modeling import quant_linears

    start = time.perf_counter()
    conversion = bitnet_convert.quantize(
        spec["recipe"], model=spec["model"], output=spec["output"], calibration__samples=0, overwrite=True
    )
    work = time.perf_counter() - start
    report = conversion.report
    return {
        "work_s": work,
        "stage_s": report["time_s"],
        "bits_per_weight": report["packed_linears"]["bits_per_weight"],
        "packed_bytes": report["packed_linears"]["bytes"],
        "ternary_parameters": report["parameters"]["ternary"],
        "linears": len(quant_linears(conversion.model)),
        "input_bytes": report["input_bytes"],
        "output_bytes": report["output_bytes"],
        "output_files": len(report["files"]),
    }


def _job_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    for lazy in ("models.bitnet.modeling_bitnet", "integrations.bitnet", "quantizers.quantizer_bitnet"):
        importlib.import_module(f"transformers.{lazy}")  # what from_pretrained would import: keep it off the clock
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    loaded = time.perf_counter()
    model.save_pretrained(spec["output"])
    end = time.perf_counter()
    return {
        "work_s": end - start,
        "load_s": loaded - start,
        "save_s": end - loaded,
        "dtype": str(model.dtype).removeprefix("torch."),
        "linear_class": type(model.model.layers[0].self_attn.q_proj).__name__,
        "output_bytes": sum(f.stat().st_size for f in Path(spec["output"]).rglob("*") if f.is_file()),
    }


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


def _job_calibrate(spec: dict[str, Any]) -> dict[str, Any]:
    """Layer-by-layer calibration (a48) of a checkpoint on seeded random token ids (the synthetic checkpoints
    have no tokenizer; memory and time do not depend on which tokens they are)."""
    import torch

    from bitnet_convert.calibration.statistics import sequential_calibration
    from bitnet_convert.io.checkpoint import open_checkpoint
    from bitnet_convert.quant.schemes import PRESETS

    start = time.perf_counter()
    checkpoint = open_checkpoint(spec["model"])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, checkpoint.config["vocab_size"], (spec["samples"], spec["seq_len"]), generator=generator)
    result = sequential_calibration(checkpoint, PRESETS["a48"], ids, spec["batch_size"])
    return {"work_s": time.perf_counter() - start, "linears": len(result.linears), "tokens": result.tokens}


def _job_distill(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["steps"]`` fine-tune steps (a48 student, b1.58 teacher, batch 1) on seeded random token ids; the
    time of the steps after the first (which allocates the optimizer state) is the steady-state step time."""
    import tempfile

    import torch

    from bitnet_convert.io.checkpoint import open_checkpoint
    from bitnet_convert.quant.schemes import PRESETS
    from bitnet_convert.recover import distill as kd
    from bitnet_convert.recover import training
    from bitnet_convert.runtime.modeling import build_model

    start = time.perf_counter()
    checkpoint = open_checkpoint(spec["model"])
    student = build_model(checkpoint, PRESETS["a48"])
    teacher = build_model(checkpoint, PRESETS["b158"])
    generator = torch.Generator().manual_seed(0)
    stream = torch.randint(0, checkpoint.config["vocab_size"], (4 * spec["seq_len"] * spec["steps"],),
                           generator=generator)
    settings = kd.DistillSpec(steps=spec["steps"], batch_size=1, seq_len=spec["seq_len"],
                              trainable=spec["trainable"], save_every=10**9)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as state:
        record = kd.distill(student, teacher, stream, settings, seed=0, state_dir=Path(state),
                            recipe_fingerprint="bench", latent_init=training.master_latents(checkpoint),
                            on_step=lambda step, loss: stamps.append(time.perf_counter()))
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"work_s": time.perf_counter() - start, "step_s": step_s, "trained_parameters": record["trained_parameters"]}


def _job_blockwise(spec: dict[str, Any]) -> dict[str, Any]:
    """Block-wise recovery of the a48 model of a checkpoint: ``spec["steps"]`` steps per block on
    ``spec["samples"]`` windows of seeded random token ids (1 window per step); the time per block per step
    leaves out the first block (it allocates the optimizer state) and the model build."""
    import tempfile

    import torch

    from bitnet_convert.io.checkpoint import open_checkpoint
    from bitnet_convert.quant.schemes import PRESETS
    from bitnet_convert.recover.blockwise import BlockwiseSpec, recover_model
    from bitnet_convert.runtime.modeling import build_model

    start = time.perf_counter()
    checkpoint = open_checkpoint(spec["model"])
    model = build_model(checkpoint, PRESETS["a48"])
    built = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, checkpoint.config["vocab_size"], (spec["samples"], spec["seq_len"]), generator=generator)
    settings = BlockwiseSpec(steps=spec["steps"], batch_size=1, holdout=0.5)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as state:
        record = recover_model(model, checkpoint, ids, settings, seed=0, state_dir=Path(state), fingerprint="bench",
                               on_block=lambda label: stamps.append(time.perf_counter()))
    per_block = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"work_s": time.perf_counter() - start, "build_s": built - start, "block_s": per_block,
            "block_step_s": per_block / spec["steps"], "blocks": len(record["blocks"])}


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _job_runtime(spec: dict[str, Any]) -> dict[str, Any]:
    """Prefill and greedy decode speed of one subject (``spec["subject"]``: ``stock`` = transformers'
    ``from_pretrained`` with its defaults, else ``bitnet_convert.io.load`` with ``spec["backend"]``), resident memory
    after load and at the peak, and (native) the zero share of the o_proj and down_proj input codes while
    decoding. Each timed part stops early after ``spec["budget_s"]`` seconds, so the slowest subjects report
    over fewer tokens (the counts are in the result)."""
    import torch
    from transformers import DynamicCache

    start = time.perf_counter()
    if spec["subject"] == "stock":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model"])
    else:
        import bitnet_convert

        model = bitnet_convert.load(spec["model"], backend=spec["backend"])
    load_s = time.perf_counter() - start
    rss_loaded = _rss_bytes()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, max(spec["prefill"], *spec["contexts"])), generator=generator)
    budget = spec["budget_s"]
    result: dict[str, Any] = {"load_s": load_s, "rss_after_load_bytes": rss_loaded,
                              "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    with torch.no_grad():
        model(ids[:, :8], logits_to_keep=1)  # warm-up: allocators, lazy initialisation, kernel build/load
        began = time.perf_counter()
        model(ids[:, : spec["prefill"]], logits_to_keep=1)
        result["prefill_tokens"] = spec["prefill"]
        result["prefill_tok_s"] = spec["prefill"] / (time.perf_counter() - began)
        native = spec.get("backend") == "native"
        if native:
            from bitnet_convert.native import backend as native_backend
        for context in spec["contexts"]:
            cache = DynamicCache()
            out = model(ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            if native:
                native_backend.record_zeros(model, True)
            began, done = time.perf_counter(), 0
            while done < spec["new_tokens"]:
                out = model(token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                done += 1
                if time.perf_counter() - began > budget and done >= 4:
                    break
            seconds = time.perf_counter() - began
            result[f"decode_{context}_tokens"] = done
            result[f"decode_{context}_tok_s"] = done / seconds
            if native:
                result[f"decode_{context}_zero_share"] = native_backend.linear_zero_shares(model)
                native_backend.record_zeros(model, False)
    result["work_s"] = time.perf_counter() - start
    return result


def _job_kernels(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's memory bandwidth (a STREAM-like copy of ``spec["copy_bytes"]``) and the native GEMV (one
    token) of each 2B-4T linear shape, cycling through enough copies of the weight that it never sits in a
    cache: GB/s of packed weight bytes read and effective int-ops/s (2 per weight used)."""
    import torch

    from bitnet_convert.native import build as kernels
    from bitnet_convert.quant.packing import pack_ternary

    kernels.ensure_built()
    ops, isa = torch.ops.bitnet_convert, kernels.isa()
    start = time.perf_counter()
    n = spec["copy_bytes"] // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    copies = []
    for _ in range(5):
        began = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - began)
    bandwidth = 2 * n * 4 / min(copies)  # bytes read + bytes written
    del src, dst
    generator = torch.Generator().manual_seed(0)
    linears = {}
    for name, (rows, cols, zero_share, sparse) in spec["shapes"].items():
        packed = pack_ternary(torch.randint(-1, 2, (rows, cols), generator=generator, dtype=torch.int8))
        layout = kernels.cols_layout(packed) if sparse else kernels.rows_layout(packed)
        count = max(2, -(-spec["working_set_bytes"] // layout.numel()))
        weights = [layout.clone() for _ in range(count)]
        x = torch.randn(1, cols, generator=generator)
        x = x * (torch.rand(1, cols, generator=generator) >= zero_share)
        codes, s, sums = ops.quantize_absmax(x, 8, isa)
        active = float((codes[0, :cols] != 0).float().mean()) if sparse else 1.0

        def run(w, codes=codes, s=s, sums=sums, sparse=sparse, rows=rows):
            if sparse:
                return ops.ternary_gemm_sparse(codes, sums, s, w, rows, 1.0, False, isa)
            return ops.ternary_gemm(codes, sums, s, w, 1.0, False, isa)

        for w in weights:
            run(w)
        times = []
        for _ in range(3):
            began = time.perf_counter()
            for w in weights:
                run(w)
            times.append((time.perf_counter() - began) / len(weights))
        seconds = min(times)
        read = layout.numel() * active
        linears[name] = {"rows": rows, "cols": cols, "sparse": sparse, "active_share": active,
                         "packed_bytes": layout.numel(), "bytes_read": read, "seconds": seconds,
                         "gb_s": read / seconds / GB, "int_ops_s": 2 * rows * cols * active / seconds}
        del weights
    return {"work_s": time.perf_counter() - start, "copy_gb_s": bandwidth / GB, "linears": linears, "isa": isa}


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "calibrate": _job_calibrate,
    "distill": _job_distill,
    "blockwise": _job_blockwise,
    "generate": _job_generate,
    "quantize": _job_quantize,
    "transformers": _job_transformers,
    "kv_memory": _job_kv_memory,
    "decode": _job_decode,
    "runtime": _job_runtime,
    "kernels": _job_kernels,
}


# ---------------------------------------------------------------------------- synthetic 2B-4T checkpoint


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
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shards = plan_shards(shape, max_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        tensors = {}
        for name, dims in shard:
            if len(dims) == 1:
                tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.randn(dims, generator=generator, dtype=torch.bfloat16).mul_(INIT_STD)
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        (directory / file).chmod(0o644)  # safetensors writes through a private temp file (mode 0600)
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(shape.hf_config(), indent=2) + "\n")


def synthetic_key(shape: ShapeConfig, seed: int) -> str:
    """Cache directory name: depth plus a hash of everything that determines the checkpoint's bytes."""
    recipe = {"shape": asdict(shape), "seed": seed, "std": INIT_STD, "shard": SHARD_BYTES, "v": SYNTHETIC_FORMAT}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"bitnet-2b4t-{shape.layers}L-seed{seed}-{digest}"


def ensure_synthetic_checkpoint(cache_dir: Path, shape: ShapeConfig, seed: int) -> Path:
    """The cached synthetic checkpoint for ``shape``/``seed``; generated (in a child process) when missing."""
    directory = cache_dir / synthetic_key(shape, seed)
    if (directory / INDEX_FILE).is_file():
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
        tmp.rename(directory)  # complete checkpoints only: the index appears with the rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def checkpoint_bytes(directory: Path) -> int:
    """Size of a checkpoint: the sum of its safetensors files."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------- conversion


def bench_conversion(args: argparse.Namespace) -> list[Row]:
    """bitnet-convert's quantize vs stock transformers load+save: time, peak RSS, packed size."""
    shape = ShapeConfig(layers=args.layers)
    synthetic = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), shape, args.seed)
    threads = f", {_threads(args.threads)}" if args.threads else ""
    subject = f"synthetic 2B-4T, {shape.layers} layers{threads}"
    rows = compare_conversion(subject, str(synthetic), synthetic, args.recipe, args.threads)
    reference = f"reference model{threads}"
    if not (REFERENCE_MODEL / "config.json").is_file() or checkpoint_bytes(REFERENCE_MODEL) == 0:
        why = "is missing" if not REFERENCE_MODEL.is_dir() else "has no config.json / safetensors yet"
        message = f"skipped: {REFERENCE_MODEL.relative_to(REPO_ROOT)} {why} (train it with eval/reference/train.py)"
        print(f"[bench] {reference}: {message}", file=sys.stderr, flush=True)
        return [*rows, Row("conversion", reference, "all", message)]
    # The targets are about the 2B-4T shapes; at 3.5 MB the interpreter and torch dominate time and memory.
    return rows + compare_conversion(
        reference, "builtin:reference", REFERENCE_MODEL, args.recipe, args.threads, targets=False
    )


def compare_conversion(
    subject: str, model: str, directory: Path, recipe: Path, threads: int | None, targets: bool = True
) -> list[Row]:
    """Run both jobs on one checkpoint (each in its own process, outputs deleted after) and tabulate them."""
    size = checkpoint_bytes(directory)
    with tempfile.TemporaryDirectory(prefix="bitnet-bench-") as tmp:
        output = str(Path(tmp) / "quantized")
        quantize_spec = {"recipe": str(recipe), "model": model, "output": output, "threads": threads}
        quantized = run_job("quantize", quantize_spec, subject)
        shutil.rmtree(output, ignore_errors=True)
        transformers_spec = {"model": str(directory), "output": str(Path(tmp) / "transformers"), "threads": threads}
        stock = run_job("transformers", transformers_spec, subject)
    return conversion_rows(subject, size, quantized, stock, targets)


def conversion_rows(
    subject: str, size: int, quantized: JobResult, stock: JobResult, targets: bool = True
) -> list[Row]:
    """The table rows of one checkpoint's conversion comparison (targets next to the measurements)."""

    def row(metric: str, measured: str, **kwargs: Any) -> Row:
        return Row("conversion", subject, metric, measured, **kwargs)

    q, t = quantized.data, stock.data
    rows = [row("bf16 checkpoint size", f"{size / GB:.2f} GB", value=size, unit="bytes")]
    if quantized.ok:
        # The report is written during export, so its time_s stops before export ends: the rest is export.
        export = q["work_s"] - sum(q["stage_s"].values())
        stages = ", ".join(f"{k} {v:.1f}" for k, v in {**q["stage_s"], "export ≈": export}.items())
        wall = f"{q['work_s']:.1f} s ({stages}; process {quantized.total_s:.1f} s; {_threads(q['torch_threads'])})"
    else:
        wall = f"failed: {quantized.error}"
    wall_target, wall_passed = "", None
    if quantized.ok and stock.ok and targets:
        wall_target = f"≤ {MAX_WALL_RATIO} × transformers = {MAX_WALL_RATIO * t['work_s']:.1f} s"
        wall_passed = q["work_s"] <= MAX_WALL_RATIO * t["work_s"]
    rows.append(
        row(
            "quantize wall time",
            wall,
            target=wall_target,
            passed=wall_passed,
            value=q.get("work_s"),
            unit="s",
            details={"total_s": quantized.total_s, **q},
        )
    )
    if stock.ok:
        measured = (
            f"{t['work_s']:.1f} s (load {t['load_s']:.1f}, save {t['save_s']:.1f}; process {stock.total_s:.1f} s; "
            f"{_threads(t['torch_threads'])}; {t['linear_class']} {t['dtype']})"
        )
    else:
        measured = f"failed: {stock.error}"
    rows.append(
        row(
            "transformers load+save wall time",
            measured,
            value=t.get("work_s"),
            unit="s",
            details={"total_s": stock.total_s, **t},
        )
    )
    if quantized.ok and stock.ok:
        ratio = q["work_s"] / t["work_s"]
        rows.append(
            row(
                "wall time quantize / transformers",
                f"{ratio:.2f}",
                target=f"≤ {MAX_WALL_RATIO}" if targets else "",
                passed=ratio <= MAX_WALL_RATIO if targets else None,
                value=ratio,
            )
        )
    rss_limit = MAX_RSS_PER_CHECKPOINT * size / GB
    rss_target = f"≤ {MAX_RSS_PER_CHECKPOINT} × checkpoint = {rss_limit:.2f} GB" if targets else ""
    for job, label, target in ((quantized, "quantize", rss_target), (stock, "transformers", "")):
        rss = job.data.get("peak_rss_bytes")  # absent when the child was killed (e.g. out of memory)
        measured = f"{rss / GB:.2f} GB = {rss / size:.2f} × checkpoint" if rss else "n/a (the job died)"
        passed = rss <= MAX_RSS_PER_CHECKPOINT * size if target and rss else None
        rows.append(row(f"{label} peak RSS", measured, target=target, passed=passed, value=rss, unit="bytes"))
    if quantized.ok:
        bound = PACKED_BITS + SCALE_BITS * q["linears"] / q["ternary_parameters"]
        rows.append(
            row(
                "packed ternary linears",
                f"{q['bits_per_weight']:.6f} bits/weight ({q['packed_bytes'] / GB:.3f} GB)",
                target=f"≤ {PACKED_BITS} + {SCALE_BITS}·{q['linears']}/{q['ternary_parameters']:.3g} = {bound:.6f}",
                passed=q["bits_per_weight"] <= bound,
                value=q["bits_per_weight"],
                unit="bits/weight",
            )
        )
        out, inp = q["output_bytes"], q["input_bytes"]
        rows.append(
            row(
                "quantize output / input size",
                f"{out / GB:.3f} GB / {inp / GB:.3f} GB = {out / inp:.3f}",
                value=out / inp,
            )
        )
    return rows


# -------------------------------------------------------------------------------------------------- CLI

# ------------------------------------------------------------------------------------------------ KV cache

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


# --------------------------------------------------------------------------------------------- calibration

MAX_CALIBRATION_RSS = 0.5  # peak RSS ÷ bf16 checkpoint size, full 2B-4T depth
MAX_CALIBRATION_SPREAD = 0.10  # peak RSS across depths: (max − min) / min
CALIBRATION_DEPTHS = (8, 16, 30)


def bench_calibration(args: argparse.Namespace) -> list[Row]:
    """Peak RSS and wall time of layer-by-layer calibration on 2B-4T-shaped checkpoints truncated to several
    depths (2 × 256 tokens, batch 1): the peak must not grow with depth."""
    depths = sorted({min(d, args.layers) for d in CALIBRATION_DEPTHS})
    rows, peaks = [], {}
    for layers in depths:
        shape = ShapeConfig(layers=layers)
        checkpoint = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), shape, args.seed)
        size = checkpoint_bytes(checkpoint)
        subject = f"synthetic 2B-4T, {layers} layers ({size / GB:.2f} GB)"
        spec = {"model": str(checkpoint), "samples": 2, "seq_len": 256, "batch_size": 1, "threads": args.threads}
        result = run_job("calibrate", spec, subject)
        if not result.ok:
            rows.append(Row("calibration", subject, "calibrate", f"failed: {result.error}", passed=False))
            continue
        peak = result.data["peak_rss_bytes"]
        peaks[layers] = peak
        full = layers == ShapeConfig.layers
        rows.append(Row("calibration", subject, "wall time", f"{result.data['work_s']:.1f} s "
                        f"({result.data['work_s'] / layers:.2f} s/layer)", value=result.data["work_s"], unit="s",
                        details=result.data))
        rows.append(Row(
            "calibration", subject, "peak RSS (× checkpoint)", f"{peak / GB:.2f} GB ({peak / size:.2f}×)",
            f"≤ {MAX_CALIBRATION_RSS}×" if full else "", peak / size <= MAX_CALIBRATION_RSS if full else None,
            peak / size, "ratio",
        ))
    if len(peaks) > 1:
        spread = (max(peaks.values()) - min(peaks.values())) / min(peaks.values())
        rows.append(Row("calibration", f"depths {', '.join(map(str, peaks))}", "peak RSS spread (max − min) / min",
                        f"{spread:.1%}", f"≤ {MAX_CALIBRATION_SPREAD:.0%}", spread <= MAX_CALIBRATION_SPREAD,
                        spread, "ratio"))
    return rows


# ------------------------------------------------------------------------------------------- fine-tune

DISTILL_DEPTHS = (2, 4)
DISTILL_GROUPS = (("norms", "linears"), ("norms",))


def bench_distill(args: argparse.Namespace, groups: tuple[tuple[str, ...], ...] = DISTILL_GROUPS) -> list[Row]:
    """Step time and peak RSS of the distillation fine-tune (1 × 256 tokens per step) on 2B-4T-shaped checkpoints
    of two depths, for two trainable sets; the full 30-layer peak RSS is extrapolated linearly from the two
    depths (labelled as such: the whole model does not fit this machine when its weights train)."""
    rows = []
    for trainable in groups:
        measured = {}
        for layers in sorted({min(d, args.layers) for d in DISTILL_DEPTHS}):
            shape = ShapeConfig(layers=layers)
            checkpoint = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), shape, args.seed)
            subject = f"synthetic 2B-4T, {layers} layers, trainable {'+'.join(trainable)}"
            spec = {"model": str(checkpoint), "steps": 4, "seq_len": 256, "trainable": list(trainable),
                    "threads": args.threads}
            result = run_job("distill", spec, subject)
            if not result.ok:
                rows.append(Row("fine-tune", subject, "failed", f"failed: {result.error}", passed=False))
                continue
            measured[layers] = result.data
            rows.append(Row("fine-tune", subject, "step time (1 × 256 tokens)", f"{result.data['step_s']:.2f} s",
                            value=result.data["step_s"], unit="s", details=result.data))
            peak = result.data["peak_rss_bytes"]
            rows.append(Row("fine-tune", subject, "peak RSS", f"{peak / GB:.2f} GB", value=peak / GB, unit="GB"))
        if len(measured) == 2:  # memory grows linearly with depth; step times are too noisy to extrapolate
            full = ShapeConfig.layers
            peak = _extrapolate(measured, "peak_rss_bytes", full) / GB
            subject = (f"2B-4T, {full} layers, trainable {'+'.join(trainable)} (extrapolated from "
                       f"{' and '.join(map(str, sorted(measured)))} layers)")
            rows.append(Row("fine-tune", subject, "peak RSS", f"{peak:.1f} GB", value=peak, unit="GB"))
    return rows


RECOVERY_DEPTHS = (8, 30)
MAX_BLOCKWISE_RSS_GB = 6.0  # block-wise recovery peak RSS, 30-layer 2B-4T shapes, CPU
MAX_BLOCKWISE_GROWTH = 0.10  # peak RSS 30 layers ÷ 8 layers − 1


def bench_recovery(args: argparse.Namespace) -> list[Row]:
    """Block-wise recovery on the 2B-4T shapes at two depths: peak RSS (target ≤ 6 GB at 30 layers, and flat in
    depth: one block at a time) and seconds per block per step (1 × 256 tokens); beside it, the end-to-end
    fine-tune's peak RSS (measured at 2 and 4 layers, extrapolated to 30: it does not fit this machine); then
    data-parallel recovery under ``torchrun`` with 2 processes against 1 on the reference model (on a 2-core
    machine the figure of interest is the overhead, not a speedup)."""
    rows = _blockwise_rows(args)
    rows += [row for row in bench_distill(args, groups=(("norms", "linears"),))
             if row.metric == "peak RSS" or row.metric.startswith("failed")]
    rows += _ddp_rows(args)
    return rows


DDP_RECIPE = {"calibration": {"samples": 16, "seq_len": 256, "batch_size": 4},
              "recovery": {"blockwise": {"steps": 40, "batch_size": 4},
                           "distill": {"steps": 20, "batch_size": 4, "seq_len": 256}}}


def _ddp_rows(args: argparse.Namespace) -> list[Row]:
    """The same recipe (block-wise recovery and a fine-tune on the reference model) as 1 process with 2 threads
    and as ``torchrun --nproc-per-node 2`` with 1 thread each: stage times, and the overhead ratio."""
    import yaml

    rows, times = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"model": "builtin:reference", **DDP_RECIPE}, sort_keys=False))
        for processes in (1, 2):
            output = Path(tmp) / f"out{processes}"
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                      if processes == 2 else [sys.executable])
            command = [*launch, "-m", "bitnet_convert.cli", "quantize", "--recipe", str(recipe), "-o", str(output)]
            env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes), "HF_HUB_OFFLINE": "1"}
            subject = f"reference model, {processes} process(es) × {2 // processes} thread(s)"
            print(f"[bench] {subject}: quantize with block-wise recovery and fine-tune ...", file=sys.stderr,
                  flush=True)
            proc = run_bounded(command, env)
            if proc.returncode != 0:
                error = ([line for line in proc.stderr.splitlines() if line.strip()] or ["no output"])[-1]
                rows.append(Row("recovery", subject, "data-parallel", f"failed: {error}", passed=False))
                continue
            report = json.loads((output / "conversion_report.json").read_text())
            times[processes] = {k: report["time_s"][k] for k in ("blockwise", "distill")}
            rows.append(Row("recovery", subject, "block-wise / fine-tune time",
                            f"{times[processes]['blockwise']:.1f} s / {times[processes]['distill']:.1f} s",
                            value=sum(times[processes].values()), unit="s", details=report["time_s"]))
            rows.append(Row("recovery", subject, "peak RSS (rank 0)", f"{report['peak_rss_bytes'] / GB:.2f} GB",
                            value=report["peak_rss_bytes"] / GB, unit="GB"))
    if len(times) == 2:
        ratio = sum(times[2].values()) / sum(times[1].values())
        rows.append(Row("recovery", "reference model, 2 processes ÷ 1 process (same 2 cores)", "time ratio",
                        f"{ratio:.2f}×", value=ratio))
    return rows


def _blockwise_rows(args: argparse.Namespace) -> list[Row]:
    """Block-wise recovery peak RSS and seconds per block per step at the depths of :data:`RECOVERY_DEPTHS`."""
    rows, peaks = [], {}
    for layers in sorted({min(d, args.layers) for d in RECOVERY_DEPTHS}):
        checkpoint = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), ShapeConfig(layers=layers), args.seed)
        subject = f"synthetic 2B-4T, {layers} layers, block-wise (2 steps per block, 4 windows of 256)"
        spec = {"model": str(checkpoint), "steps": 2, "samples": 4, "seq_len": 256, "threads": args.threads}
        result = run_job("blockwise", spec, subject)
        if not result.ok:
            rows.append(Row("recovery", subject, "block-wise", f"failed: {result.error}", passed=False))
            continue
        peak = result.data["peak_rss_bytes"] / GB
        peaks[layers] = peak
        rows.append(Row("recovery", subject, "seconds per block per step", f"{result.data['block_step_s']:.1f} s",
                        value=result.data["block_step_s"], unit="s", details=result.data))
        full = layers == ShapeConfig.layers
        rows.append(Row("recovery", subject, "peak RSS", f"{peak:.2f} GB",
                        target=f"≤ {MAX_BLOCKWISE_RSS_GB:.0f} GB" if full else "",
                        passed=peak <= MAX_BLOCKWISE_RSS_GB if full else None, value=peak, unit="GB"))
    if len(peaks) == 2:
        (a, pa), (b, pb) = sorted(peaks.items())
        growth = pb / pa - 1
        rows.append(Row("recovery", f"block-wise peak RSS, {b} vs {a} layers", "growth", f"{growth:+.1%}",
                        target=f"≤ {MAX_BLOCKWISE_GROWTH:.0%}", passed=growth <= MAX_BLOCKWISE_GROWTH,
                        value=growth))
    return rows


def _extrapolate(measured: dict[int, dict[str, Any]], key: str, layers: int) -> float:
    """The straight line through the two (depth, ``key``) points of ``measured``, at ``layers``."""
    (a, da), (b, db) = sorted(measured.items())
    return da[key] + (db[key] - da[key]) / (b - a) * (layers - a)


# ------------------------------------------------------------------------------------------- runtime

MIN_NATIVE_SPEEDUP = 10.0  # native a48 ÷ reference backend a48, decode and prefill, full 2B-4T depth
MIN_SPARSE_SPEEDUP = 1.15  # native a48 decode ÷ native b158 decode
MIN_BANDWIDTH_SHARE = 0.5  # packed-linear decode GB/s ÷ measured copy bandwidth
MAX_NATIVE_RSS = 0.40  # native a48 resident memory after load ÷ bf16 checkpoint size
RUNTIME_SUBJECTS = (  # (label, job subject, export, backend)
    ("stock transformers b1.58", "stock", "b158", None),
    ("reference backend a48", "load", "a48", "reference"),
    ("native b158", "load", "b158", "native"),
    ("native a48", "load", "a48", "native"),
)
RUNTIME_PREFILL, RUNTIME_CONTEXTS, RUNTIME_NEW_TOKENS = 512, (128, 1024), 128


def bench_runtime(args: argparse.Namespace) -> list[Row]:
    """Prefill/decode speed and memory of the four subjects (stock transformers b1.58, reference backend a48,
    native b158, native a48) side by side on 2B-4T shapes (2 layers and ``--layers``) and on the reference model;
    then the kernels against this machine's memory bandwidth."""
    rows: list[Row] = []
    targets: list[tuple[int, dict[str, dict[str, Any]], int]] = []
    for layers in sorted({min(2, args.layers), args.layers}):
        shape = ShapeConfig(layers=layers)
        synthetic = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), shape, args.seed)
        subject = f"synthetic 2B-4T, {layers} layers"
        measured = _runtime_subjects(args, str(synthetic), subject, rows, budget_s=args.runtime_budget)
        targets.append((layers, measured, checkpoint_bytes(synthetic)))
    if (REFERENCE_MODEL / "config.json").is_file():
        _runtime_subjects(args, "builtin:reference", "reference model", rows, budget_s=args.runtime_budget)
    layers, measured, size = targets[-1]
    rows.extend(_runtime_targets(layers, measured, size))
    rows.extend(_kernel_rows(args, measured.get("native a48")))
    return rows


def _runtime_subjects(args: argparse.Namespace, model: str, subject: str, rows: list[Row],
                      budget_s: float) -> dict[str, dict[str, Any]]:
    """Export ``model`` as b158 and a48 (no calibration), run every subject on the exports, add their rows."""
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exports = {}
        for recipe in ("b158", "a48"):
            exports[recipe] = Path(tmp) / recipe
            prepared = run_job("quantize", {"recipe": str(REPO_ROOT / "recipes" / f"{recipe}.yaml"), "model": model,
                                            "output": str(exports[recipe]), "threads": args.threads},
                               f"{subject}: export {recipe}")
            if not prepared.ok:
                rows.append(Row("runtime", subject, f"export {recipe}", f"failed: {prepared.error}", passed=False))
                return measured
        for label, kind, export, backend in RUNTIME_SUBJECTS:
            spec = {"subject": kind, "model": str(exports[export]), "backend": backend, "prefill": RUNTIME_PREFILL,
                    "contexts": list(RUNTIME_CONTEXTS), "new_tokens": RUNTIME_NEW_TOKENS, "budget_s": budget_s,
                    "threads": args.threads}
            result = run_job("runtime", spec, f"{subject}: {label}")
            name = f"{subject}: {label}"
            if not result.ok:
                rows.append(Row("runtime", name, "run", f"failed: {result.error}", passed=False))
                continue
            data = measured[label] = result.data
            rows.append(Row("runtime", name, f"prefill tok/s ({data['prefill_tokens']} tokens)",
                            f"{data['prefill_tok_s']:.2f}", value=data["prefill_tok_s"], unit="tok/s", details=data))
            for context in RUNTIME_CONTEXTS:
                speed, done = data[f"decode_{context}_tok_s"], data[f"decode_{context}_tokens"]
                note = "" if done == RUNTIME_NEW_TOKENS else f", stopped after {done} tokens ({budget_s:.0f} s budget)"
                zeros = data.get(f"decode_{context}_zero_share")
                if zeros:
                    note += f"; zero input codes: o_proj {zeros.get('o', 0):.1%}, down_proj {zeros.get('down', 0):.1%}"
                rows.append(Row("runtime", name, f"decode tok/s after {context} tokens", f"{speed:.2f}{note}",
                                value=speed, unit="tok/s"))
            rows.append(Row("runtime", name, "resident memory after load / peak",
                            f"{data['rss_after_load_bytes'] / GB:.2f} GB / {data['peak_rss_bytes'] / GB:.2f} GB",
                            value=data["rss_after_load_bytes"] / GB, unit="GB"))
    return measured


def _runtime_targets(layers: int, measured: dict[str, dict[str, Any]], size: int) -> list[Row]:
    """The ratio targets on the deepest synthetic checkpoint; a missing subject makes its targets fail."""
    subject = f"synthetic 2B-4T, {layers} layers"
    fast, ref, b158 = (measured.get(k) for k in ("native a48", "reference backend a48", "native b158"))
    rows = []

    def ratio_row(metric: str, a: float | None, b: float | None, minimum: float, extra: str = "") -> None:
        if a is None or b is None:
            rows.append(Row("runtime", subject, metric, "not measured", f"≥ {minimum}×", False))
            return
        rows.append(Row("runtime", subject, metric, f"{a / b:.2f}×{extra}", f"≥ {minimum}×", a / b >= minimum,
                        a / b, "ratio"))

    ratio_row("native a48 ÷ reference a48, decode after 128", fast and fast["decode_128_tok_s"],
              ref and ref["decode_128_tok_s"], MIN_NATIVE_SPEEDUP)
    ratio_row("native a48 ÷ reference a48, prefill", fast and fast["prefill_tok_s"], ref and ref["prefill_tok_s"],
              MIN_NATIVE_SPEEDUP)
    zeros = (fast or {}).get("decode_128_zero_share") or {}
    ratio_row("native a48 ÷ native b158, decode after 128", fast and fast["decode_128_tok_s"],
              b158 and b158["decode_128_tok_s"], MIN_SPARSE_SPEEDUP,
              f" (zero input codes: o_proj {zeros.get('o', 0):.1%}, down_proj {zeros.get('down', 0):.1%})")
    if fast is not None:
        share = fast["rss_after_load_bytes"] / size
        rows.append(Row("runtime", subject, "native a48 resident memory ÷ bf16 checkpoint",
                        f"{fast['rss_after_load_bytes'] / GB:.2f} GB / {size / GB:.2f} GB = {share:.2f}",
                        f"≤ {MAX_NATIVE_RSS}", share <= MAX_NATIVE_RSS, share, "ratio"))
    return rows


def _kernel_rows(args: argparse.Namespace, native_a48: dict[str, Any] | None) -> list[Row]:
    """Per-linear GEMV throughput next to the copy bandwidth; the o_proj/down_proj inputs take the zero shares
    the native a48 model measured while decoding (50% and 80% when it was not measured)."""
    zeros = ((native_a48 or {}).get("decode_128_zero_share")) or {}
    o_zero, down_zero = zeros.get("o", 0.5), zeros.get("down", 0.8)
    shape = ShapeConfig()
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    shapes = {
        "q_proj": (q, shape.hidden, 0.0, False),
        "k_proj/v_proj": (kv, shape.hidden, 0.0, False),
        "o_proj (dense kernel, b158 and a48)": (shape.hidden, q, 0.0, False),
        "o_proj (sparse-input kernel, opt-in)": (shape.hidden, q, o_zero, True),
        "gate_proj/up_proj": (shape.intermediate, shape.hidden, 0.0, False),
        "down_proj (dense kernel, b158)": (shape.hidden, shape.intermediate, 0.0, False),
        "down_proj (sparse-input kernel, a48)": (shape.hidden, shape.intermediate, down_zero, True),
    }
    spec = {"shapes": shapes, "copy_bytes": 1_000_000_000, "working_set_bytes": 256_000_000, "threads": args.threads}
    result = run_job("kernels", spec, "kernels")
    if not result.ok:
        return [Row("kernels", "2B-4T linears", "GEMV", f"failed: {result.error}", passed=False)]
    data = result.data
    copy = data["copy_gb_s"]
    rows = [Row("kernels", "this machine", "memory bandwidth (STREAM-like copy, read + write)", f"{copy:.1f} GB/s",
                value=copy, unit="GB/s", details=data)]
    for name, linear in data["linears"].items():
        active = f", {linear['active_share']:.0%} of columns read" if linear["sparse"] else ""
        rows.append(Row("kernels", f"2B-4T {name} {linear['rows']}×{linear['cols']}", "GEMV (1 token)",
                        f"{linear['seconds'] * 1e6:.0f} µs, {linear['gb_s']:.1f} GB/s of packed weights{active}, "
                        f"{linear['int_ops_s'] / 1e9:.0f} G int-ops/s", value=linear["gb_s"], unit="GB/s"))
    # the layer as the native a48 model runs it by default: o_proj dense, down_proj on the sparse-input kernel
    layer = [data["linears"][k] for k in ("q_proj", "k_proj/v_proj", "k_proj/v_proj",
                                           "o_proj (dense kernel, b158 and a48)", "gate_proj/up_proj",
                                           "gate_proj/up_proj", "down_proj (sparse-input kernel, a48)")]
    gb_s = sum(lin["bytes_read"] for lin in layer) / sum(lin["seconds"] for lin in layer) / GB
    rows.append(Row("kernels", "2B-4T a48 decoder layer (7 linears)", "packed-linear decode throughput ÷ bandwidth",
                    f"{gb_s:.1f} / {copy:.1f} GB/s = {gb_s / copy:.2f}", f"≥ {MIN_BANDWIDTH_SHARE}",
                    gb_s / copy >= MIN_BANDWIDTH_SHARE, gb_s / copy, "ratio"))
    return rows


#: Every benchmark by name, in the order they run; each returns its rows of the table.
BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "conversion": bench_conversion,
    "kv_cache": bench_kv_cache,
    "calibration": bench_calibration,
    "distill": bench_distill,
    "recovery": bench_recovery,
    "runtime": bench_runtime,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only this benchmark")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results as JSON")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="synthetic checkpoints are kept here")
    parser.add_argument("--layers", type=int, default=ShapeConfig.layers, help="depth of the synthetic checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe of the quantize job")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of every job (default: torch's)")
    parser.add_argument("--runtime-budget", type=float, default=120.0,
                        help="runtime: seconds after which a decode measurement stops early (slow subjects)")
    parser.add_argument("--job", choices=list(JOBS), help=argparse.SUPPRESS)  # internal: run one child job
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("bitnet-convert", "torch", "transformers", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "versions": versions,
        "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TORCH_COMPILE_DISABLE", "OMP_NUM_THREADS")},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job:
        return child_main(args.job, args.spec)
    names = args.only or list(BENCHMARKS)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rows = [row for name in names for row in BENCHMARKS[name](args)]
    print(markdown_table(rows))
    results = {
        "started": started,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "settings": {
            "benchmarks": names,
            "layers": args.layers,
            "seed": args.seed,
            "threads": args.threads,
            "recipe": str(args.recipe),
            "cache_dir": str(args.cache_dir),
        },
        "environment": environment(),
        "rows": [{**asdict(row), "status": row.status.strip("*").lower()} for row in rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[bench] wrote {args.json}", file=sys.stderr)
    return 0


def _threads(count: int | None) -> str:
    return f"{count} thread{'' if count == 1 else 's'}"


def _torch_threads() -> int | None:
    """The child's intra-op thread count (``None`` when the job never imported torch)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
