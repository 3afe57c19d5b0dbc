"""``runtime``: prefill/decode speed and memory of stock transformers, the reference backend and the native
backend side by side; ``kernels``: the native kernels against this machine's memory bandwidth."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import GB, REFERENCE_MODEL, REPO_ROOT, Row, run_job
from benchmarks.synthetic import ShapeConfig, checkpoint_bytes, ensure_synthetic_checkpoint

MIN_NATIVE_SPEEDUP = 10.0  # native a48 ÷ reference backend a48, decode and prefill, full 2B-4T depth
MIN_SPARSE_SPEEDUP = 1.2  # native a48 decode ÷ native b158 decode, the same lm_head, trained-sparsity checkpoint
MIN_LAYERS_SPEEDUP = 1.3  # native a48 ÷ native b158, a decoded token's time minus its lm_head (random weights)
MIN_TRAINED_LAYERS_SPEEDUP = 1.6  # the same on the trained-sparsity checkpoint
MAX_BOUND_RATIO = 1.4  # native a48 decode time ÷ (bytes the token reads ÷ read bandwidth)
MAX_REST_SHARE = 0.15  # non-linear work (all but linears and lm_head) ÷ a decoded token's time, native a48
MIN_BANDWIDTH_SHARE = 0.5  # packed-linear decode GB/s ÷ measured copy bandwidth
MIN_SPARSE_KERNEL_SHARE = 0.70  # sparse-input GEMV at 50% zeros: active-column GB/s ÷ the dense kernel's GB/s
MAX_NATIVE_RSS = 0.40  # native a48 resident memory after load ÷ bf16 checkpoint size
MIN_NEIGHBOUR_SHARE = 0.4  # native a48 decode with a busy neighbour process ÷ quiet, 2 threads
#: Decoded tokens (after a 128-token prompt) per measurement of the busy-neighbour job.
NEIGHBOUR_TOKENS = 32
RUNTIME_SUBJECTS = (  # (label, job subject, export, backend, lm_head)
    ("stock transformers b1.58", "stock", "b158", None, "stored"),
    ("reference backend a48", "load", "a48", "reference", "stored"),
    ("native b158", "load", "b158", "native", "stored"),
    ("native a48", "load", "a48", "native", "stored"),
    ("native b158, int8 lm_head", "load", "b158", "native", "int8"),
    ("native a48, int8 lm_head", "load", "a48", "native", "int8"),
)
#: The subjects run on the trained-sparsity checkpoint (the native backend's a48 against b158).
TRAINED_SUBJECTS = ("native b158", "native a48", "native b158, int8 lm_head", "native a48, int8 lm_head")
#: Decoded tokens timed part by part (linears, lm_head, the rest) after the decode measurement, native subjects.
SPLIT_TOKENS = 16
RUNTIME_PREFILL, RUNTIME_CONTEXTS, RUNTIME_NEW_TOKENS = 512, (128, 1024), 128


def bench_runtime(args: argparse.Namespace) -> list[Row]:
    """Prefill/decode speed and memory of the subjects (stock transformers b1.58, reference backend a48, native
    b158 and a48 with each lm_head) side by side on 2B-4T shapes (2 layers and ``--layers``, random weights), the
    native subjects on the ``--layers`` checkpoint with a trained model's relu² sparsity
    (:class:`~benchmarks.synthetic.TrainedSparsity`), native a48 with a busy neighbour process, and the subjects on
    the reference model; then the targets. The kernels alone are the ``kernels`` benchmark."""
    rows: list[Row] = []
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    for layers in sorted({min(2, args.layers), args.layers}):
        synthetic = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), ShapeConfig(layers=layers), args.seed)
        subject = f"synthetic 2B-4T, {layers} layers"
        measured["random"] = _runtime_subjects(args, str(synthetic), subject, rows, budget_s=args.runtime_budget)
    size = checkpoint_bytes(synthetic)
    trained = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), ShapeConfig(layers=args.layers), args.seed,
                                          sparsity="trained")
    trained_subject = f"synthetic 2B-4T, {args.layers} layers, trained relu² sparsity"
    measured["trained"] = _runtime_subjects(args, str(trained), trained_subject, rows, budget_s=args.runtime_budget,
                                            labels=TRAINED_SUBJECTS, neighbour=True)
    if (REFERENCE_MODEL / "config.json").is_file():
        _runtime_subjects(args, "builtin:reference", "reference model", rows, budget_s=args.runtime_budget)
    rows.extend(_runtime_targets(args.layers, measured["random"], size))
    rows.extend(_trained_targets(trained_subject, measured["trained"]))
    args.native_a48_decode = measured["random"].get("native a48")  # its zero shares, for the kernels benchmark
    return rows


def _runtime_subjects(args: argparse.Namespace, model: str, subject: str, rows: list[Row], budget_s: float,
                      labels: tuple[str, ...] | None = None, neighbour: bool = False) -> dict[str, dict[str, Any]]:
    """Export ``model`` as b158 and a48 (no calibration), run every subject (those of ``labels`` when given) on the
    exports, add their rows; with ``neighbour``, also native a48 with a busy neighbour process."""
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
        for label, kind, export, backend, lm_head in RUNTIME_SUBJECTS:
            if labels is not None and label not in labels:
                continue
            spec = {"subject": kind, "model": str(exports[export]), "backend": backend, "lm_head": lm_head,
                    "prefill": RUNTIME_PREFILL,
                    "contexts": list(RUNTIME_CONTEXTS), "new_tokens": RUNTIME_NEW_TOKENS, "budget_s": budget_s,
                    "threads": args.threads}
            result = run_job("runtime", spec, f"{subject}: {label}")
            name = f"{subject}: {label}"
            if not result.ok:
                rows.append(Row("runtime", name, "run", f"failed: {result.error}", passed=False))
                continue
            measured[label] = result.data
            rows.extend(_subject_rows(name, result.data, budget_s))
        if neighbour:
            rows.extend(_neighbour_rows(str(exports["a48"]), subject))
    return measured


def _subject_rows(name: str, data: dict[str, Any], budget_s: float) -> list[Row]:
    """The rows of one runtime subject: prefill, decode at each context, the time split, memory."""
    rows = [Row("runtime", name, f"prefill tok/s ({data['prefill_tokens']} tokens)", f"{data['prefill_tok_s']:.2f}",
                value=data["prefill_tok_s"], unit="tok/s", details=data)]
    if "prefill_lut_tok_s" in data:
        lut, plain = data["prefill_lut_tok_s"], data["prefill_vpmaddubsw_tok_s"]
        rows.append(Row("runtime", name, "prefill tok/s, table-lookup GEMM on ÷ off (vpmaddubsw), side by side, "
                        "best of 2 each", f"{lut:.2f} ÷ {plain:.2f} = {lut / plain:.2f}×", value=lut / plain,
                        unit="ratio"))
    for context in RUNTIME_CONTEXTS:
        speed, done = data[f"decode_{context}_tok_s"], data[f"decode_{context}_tokens"]
        note = "" if done == RUNTIME_NEW_TOKENS else f", stopped after {done} tokens ({budget_s:.0f} s budget)"
        zeros = data.get(f"decode_{context}_zero_share")
        if zeros:
            note += f"; zero input codes: o_proj {zeros.get('o', 0):.1%}, down_proj {zeros.get('down', 0):.1%}"
            if "up rows skipped" in zeros:
                note += f"; up_proj rows skipped {zeros['up rows skipped']:.1%}"
        rows.append(Row("runtime", name, f"decode tok/s after {context} tokens", f"{speed:.2f}{note}", value=speed,
                        unit="tok/s"))
    split = data.get(f"decode_{RUNTIME_CONTEXTS[0]}_split")
    if split:
        rows.append(Row("runtime", name, f"one decoded token after {RUNTIME_CONTEXTS[0]}: linears / lm_head / rest",
                        " / ".join(f"{split[k] * 1e3:.2f}" for k in ("linears", "lm_head", "rest"))
                        + f" ms of {split['token'] * 1e3:.2f} ms", value=split["token"] * 1e3, unit="ms",
                        details=split))
    rows.append(Row("runtime", name, "resident memory after load / peak",
                    f"{data['rss_after_load_bytes'] / GB:.2f} GB / {data['peak_rss_bytes'] / GB:.2f} GB",
                    value=data["rss_after_load_bytes"] / GB, unit="GB"))
    return rows


def _neighbour_rows(model: str, subject: str) -> list[Row]:
    """Native a48 decode of the export at ``model`` with a busy neighbour process (one CPU-bound Python loop)
    against the quiet figure, at 1 and 2 threads, with the thread count fixed and following the free cores (the
    default)."""
    result = run_job("neighbour", {"model": model, "tokens": NEIGHBOUR_TOKENS, "thread_counts": [1, 2]},
                     f"{subject}: native a48 with a busy neighbour")
    if not result.ok:
        return [Row("runtime", subject, "busy neighbour", f"failed: {result.error}", passed=False)]
    rows = []
    for threads, runs in result.data["runs"].items():
        quiet = runs["quiet"]
        for policy in ("fixed", "free-cores"):
            share = runs[policy] / quiet
            gated = policy == "free-cores" and threads == "2"
            rows.append(Row("runtime", f"{subject}: native a48, {threads} thread(s), thread policy {policy}",
                            "decode with a busy neighbour ÷ quiet", f"{runs[policy]:.2f} ÷ {quiet:.2f} tok/s = "
                            f"{share:.2f}", f"≥ {MIN_NEIGHBOUR_SHARE}" if gated else "",
                            share >= MIN_NEIGHBOUR_SHARE if gated else None, share, "ratio", details=runs))
    return rows


def _runtime_targets(layers: int, measured: dict[str, dict[str, Any]], size: int) -> list[Row]:
    """The targets on the deepest random-weight checkpoint; a missing subject makes its targets fail."""
    subject = f"synthetic 2B-4T, {layers} layers"
    fast, ref = measured.get("native a48"), measured.get("reference backend a48")
    rows = [_ratio_row(subject, "native a48 ÷ reference a48, decode after 128", fast and fast["decode_128_tok_s"],
                       ref and ref["decode_128_tok_s"], MIN_NATIVE_SPEEDUP),
            _ratio_row(subject, "native a48 ÷ reference a48, prefill", fast and fast["prefill_tok_s"],
                       ref and ref["prefill_tok_s"], MIN_NATIVE_SPEEDUP)]
    rows.extend(_sparsity_rows(subject, measured, whole_token=None, layers=MIN_LAYERS_SPEEDUP))
    if fast is not None:
        share = fast["rss_after_load_bytes"] / size
        rows.append(Row("runtime", subject, "native a48 resident memory ÷ bf16 checkpoint",
                        f"{fast['rss_after_load_bytes'] / GB:.2f} GB / {size / GB:.2f} GB = {share:.2f}",
                        f"≤ {MAX_NATIVE_RSS}", share <= MAX_NATIVE_RSS, share, "ratio"))
    return rows


def _trained_targets(subject: str, measured: dict[str, dict[str, Any]]) -> list[Row]:
    """The targets on the trained-sparsity checkpoint: a48 over b158 (whole token with the same lm_head, decoder
    layers), the bandwidth bound and the non-linear share."""
    rows = _sparsity_rows(subject, measured, whole_token=MIN_SPARSE_SPEEDUP, layers=MIN_TRAINED_LAYERS_SPEEDUP)
    return rows + _bound_rows(subject, measured.get("native a48"))


def _ratio_row(subject: str, metric: str, a: float | None, b: float | None, minimum: float | None,
               extra: str = "") -> Row:
    """``a ÷ b`` against ``minimum`` (no target when ``None``); "not measured" (failed) when either is missing."""
    target = "" if minimum is None else f"≥ {minimum}×"
    if a is None or b is None:
        return Row("runtime", subject, metric, "not measured", target, False)
    passed = None if minimum is None else a / b >= minimum
    return Row("runtime", subject, metric, f"{a / b:.2f}×{extra}", target, passed, a / b, "ratio")


def _sparsity_rows(subject: str, measured: dict[str, dict[str, Any]], whole_token: float | None,
                   layers: float) -> list[Row]:
    """Native a48 over native b158 after 128 tokens: the whole decoded token with the stored lm_head and with both
    int8 (target ``whole_token``), and the decoder layers alone (a token minus its lm_head; target ``layers``)."""
    fast, b158 = measured.get("native a48"), measured.get("native b158")
    zeros = (fast or {}).get("decode_128_zero_share") or {}
    fast8, b158_8 = measured.get("native a48, int8 lm_head"), measured.get("native b158, int8 lm_head")
    split, split_b = ((s or {}).get("decode_128_split") for s in (fast, b158))
    return [
        _ratio_row(subject, "native a48 ÷ native b158, decode after 128", fast and fast["decode_128_tok_s"],
                   b158 and b158["decode_128_tok_s"], whole_token,
                   f" (zero input codes: o_proj {zeros.get('o', 0):.1%}, down_proj {zeros.get('down', 0):.1%}; "
                   f"up_proj rows skipped {zeros.get('up rows skipped', 0):.1%})"),
        _ratio_row(subject, "native a48 ÷ native b158, decode after 128, both int8 lm_head",
                   fast8 and fast8["decode_128_tok_s"], b158_8 and b158_8["decode_128_tok_s"], whole_token),
        _ratio_row(subject, "native a48 ÷ native b158, decoder layers (a decoded token minus its lm_head)",
                   split_b and split_b["token"] - split_b["lm_head"], split and split["token"] - split["lm_head"],
                   layers),
    ]


def _bound_rows(subject: str, fast: dict[str, Any] | None) -> list[Row]:
    """Native a48's decoded token against its bandwidth bound (the bytes it must read ÷ the read bandwidth
    measured in the same job) and the share of non-linear work in it."""
    split, read = ((fast or {}).get(f"decode_128_{k}") for k in ("split", "bytes"))
    if not split or not read:
        return [Row("runtime", subject, "native a48 bandwidth bound", "not measured", f"≤ {MAX_BOUND_RATIO}×", False)]
    bound = sum(read.values()) / (fast["read_gb_s"] * GB)
    ratio, rest = split["token"] / bound, split["rest"] / split["token"]
    return [
        Row("runtime", subject, "native a48 decode time ÷ bandwidth bound (after 128)",
            f"{split['token'] * 1e3:.1f} ms ÷ ({sum(read.values()) / 1e6:.0f} MB ÷ {fast['read_gb_s']:.1f} GB/s = "
            f"{bound * 1e3:.1f} ms) = {ratio:.2f}× (linears {read['linears'] / 1e6:.0f} MB, lm_head "
            f"{read['lm_head'] / 1e6:.0f} MB, KV cache {read['kv_cache'] / 1e6:.0f} MB)", f"≤ {MAX_BOUND_RATIO}×",
            ratio <= MAX_BOUND_RATIO, ratio, "ratio", details={"bytes": read, "read_gb_s": fast["read_gb_s"]}),
        Row("runtime", subject, "native a48 non-linear work ÷ a decoded token", f"{rest:.0%}",
            f"≤ {MAX_REST_SHARE:.0%}", rest <= MAX_REST_SHARE, rest, "ratio"),
    ]


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
        "o_proj (sparse-input kernel, a48)": (shape.hidden, q, o_zero, True),
        "o_proj (sparse-input kernel, 50% zeros)": (shape.hidden, q, 0.5, True),
        "gate_proj/up_proj": (shape.intermediate, shape.hidden, 0.0, False),
        "down_proj (dense kernel, b158)": (shape.hidden, shape.intermediate, 0.0, False),
        "down_proj (sparse-input kernel, a48)": (shape.hidden, shape.intermediate, down_zero, True),
        "down_proj (sparse-input kernel, 50% zeros)": (shape.hidden, shape.intermediate, 0.5, True),
    }
    spec = {"shapes": shapes, "copy_bytes": 1_000_000_000, "working_set_bytes": 256_000_000, "threads": args.threads,
            "lm_head": (shape.vocab, shape.hidden),
            "chosen_rows": {"up_proj, 30% of rows (gated relu²)": (shape.intermediate, shape.hidden, 0.3)},
            "prefill_gemm": {"tokens": 512, "shapes": {"q_proj": (q, shape.hidden),
                                                       "gate_proj/up_proj": (shape.intermediate, shape.hidden)}}}
    result = run_job("kernels", spec, "kernels")
    if not result.ok:
        return [Row("kernels", "2B-4T linears", "GEMV", f"failed: {result.error}", passed=False)]
    data = result.data
    copy = data["copy_gb_s"]
    rows = [Row("kernels", "this machine", "memory bandwidth (STREAM-like copy, read + write)", f"{copy:.1f} GB/s",
                value=copy, unit="GB/s", details=data)]
    for name, linear in data["linears"].items():
        if "dense_seconds" in linear:  # chosen rows: scattered runs of Kp/4 bytes against the whole weight
            share = linear["gb_s"] / linear["dense_gb_s"]
            rows.append(Row("kernels", f"2B-4T {name} {linear['rows']}×{linear['cols']}",
                            "chosen-rows GEMV ÷ dense GEMV, GB/s read (time ratio)",
                            f"{linear['gb_s']:.1f} / {linear['dense_gb_s']:.1f} GB/s = {share:.2f} "
                            f"({linear['seconds'] / linear['dense_seconds']:.2f}× the time)", value=share,
                            unit="ratio"))
            continue
        active = f", {linear['active_share']:.0%} of columns read" if linear["sparse"] else ""
        rows.append(Row("kernels", f"2B-4T {name} {linear['rows']}×{linear['cols']}", "GEMV (1 token)",
                        f"{linear['seconds'] * 1e6:.0f} µs, {linear['gb_s']:.1f} GB/s of packed weights{active}, "
                        f"{linear['int_ops_s'] / 1e9:.0f} G int-ops/s", value=linear["gb_s"], unit="GB/s"))
    heads = data["lm_heads"]
    for name, head in heads.items():
        rows.append(Row("kernels", f"2B-4T lm_head {shape.vocab}×{shape.hidden}, {name}", "GEMV (1 token)",
                        f"{head['seconds'] * 1e3:.2f} ms, {head['gb_s']:.1f} GB/s of weights",
                        value=head["seconds"] * 1e3, unit="ms"))
    head_ratio = heads["int8"]["seconds"] / heads["bf16"]["seconds"]
    rows.append(Row("kernels", "2B-4T lm_head", "INT8 ÷ bf16 time", f"{head_ratio:.2f}", value=head_ratio))
    for name, gemm in data.get("prefill_gemms", {}).items():
        speedup = gemm["maddubs_seconds"] / gemm["lut_seconds"]
        rows.append(Row("kernels", f"2B-4T {name} {gemm['rows']}×{gemm['cols']}, {gemm['tokens']} tokens of 4-bit "
                        "codes", "prefill GEMM: table lookup ÷ vpmaddubsw speed",
                        f"{gemm['lut_gmac_s']:.0f} / {gemm['maddubs_gmac_s']:.0f} GMAC/s = {speedup:.2f}×",
                        value=speedup, unit="ratio", details=gemm))
    for role, dense in (("o_proj", "o_proj (dense kernel, b158 and a48)"),
                        ("down_proj", "down_proj (dense kernel, b158)")):
        sparse, full = data["linears"][f"{role} (sparse-input kernel, 50% zeros)"], data["linears"][dense]
        share = sparse["gb_s"] / full["gb_s"]
        rows.append(Row("kernels", f"2B-4T {role}, 50% zero inputs", "sparse-input GEMV ÷ dense GEMV, GB/s read "
                        "(time ratio)", f"{sparse['gb_s']:.1f} / {full['gb_s']:.1f} GB/s = {share:.2f} "
                        f"({sparse['seconds'] / full['seconds']:.2f}× the time)", f"≥ {MIN_SPARSE_KERNEL_SHARE}",
                        share >= MIN_SPARSE_KERNEL_SHARE, share, "ratio"))
    # the layer's linears as the native a48 model runs them by default: o_proj and down_proj on the sparse-input
    # kernel (up_proj whole here: the gated relu² path is measured by the decode figures)
    layer = [data["linears"][k] for k in ("q_proj", "k_proj/v_proj", "k_proj/v_proj",
                                           "o_proj (sparse-input kernel, a48)", "gate_proj/up_proj",
                                           "gate_proj/up_proj", "down_proj (sparse-input kernel, a48)")]
    gb_s = sum(lin["bytes_read"] for lin in layer) / sum(lin["seconds"] for lin in layer) / GB
    rows.append(Row("kernels", "2B-4T a48 decoder layer (7 linears)", "packed-linear decode throughput ÷ bandwidth",
                    f"{gb_s:.1f} / {copy:.1f} GB/s = {gb_s / copy:.2f}", f"≥ {MIN_BANDWIDTH_SHARE}",
                    gb_s / copy >= MIN_BANDWIDTH_SHARE, gb_s / copy, "ratio"))
    return rows


def bench_kernels(args: argparse.Namespace) -> list[Row]:
    """The native kernels alone (``--only kernels``, about a minute): GEMV throughput of each 2B-4T linear shape
    against this machine's copy bandwidth, the sparse-input GEMV against the dense one at 50% zero inputs (the
    o_proj/down_proj inputs take the zero shares the ``runtime`` benchmark measured when it ran first, else 50% and
    80%)."""
    return _kernel_rows(args, getattr(args, "native_a48_decode", None))


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

        model = bitnet_convert.load(spec["model"], backend=spec["backend"], lm_head=spec.get("lm_head", "stored"))
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

            result.update(_prefill_by_method(model, ids[:, : spec["prefill"]]))
        for context in spec["contexts"]:
            cache = DynamicCache()
            out = model(ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            if native:
                native_backend.record_zeros(model, True)
            token, done, seconds = _greedy_decode(model, token, cache, spec["new_tokens"], budget)
            result[f"decode_{context}_tokens"] = done
            result[f"decode_{context}_tok_s"] = done / seconds
            if native:
                shares = result[f"decode_{context}_zero_share"] = native_backend.linear_zero_shares(model)
                native_backend.record_zeros(model, False)
                result[f"decode_{context}_split"] = _decode_split(model, token, cache, SPLIT_TOKENS)
                result[f"decode_{context}_bytes"] = _decode_bytes(model, shares, cache)
    if native:
        result["read_gb_s"] = _read_bandwidth(spec.get("read_bytes", 1_000_000_000))
    result["work_s"] = time.perf_counter() - start
    return result


def _prefill_by_method(model: Any, ids: Any, rounds: int = 2) -> dict[str, float]:
    """Prefill tok/s of ``ids`` with the native linears' table-lookup GEMM turned off (every GEMM on
    vpmaddubsw) and on, side by side: ``rounds`` rounds of off then on, the best of each; empty when no linear takes
    it (8-bit inputs, no AVX2)."""
    from bitnet_convert.native.backend import NativeLinear

    linears = [m for m in model.modules() if isinstance(m, NativeLinear) and m.lut]
    if not linears:
        return {}
    speeds = {"prefill_vpmaddubsw_tok_s": 0.0, "prefill_lut_tok_s": 0.0}
    try:
        for _ in range(rounds):
            for name, lut in (("prefill_vpmaddubsw_tok_s", False), ("prefill_lut_tok_s", True)):
                for linear in linears:
                    linear.lut = lut
                began = time.perf_counter()
                model(ids, logits_to_keep=1)
                speeds[name] = max(speeds[name], ids.shape[1] / (time.perf_counter() - began))
    finally:
        for linear in linears:
            linear.lut = True
    return speeds


def _greedy_decode(model: Any, token: Any, cache: Any, count: int, budget_s: float | None = None
                   ) -> tuple[Any, int, float]:
    """Greedy decode of up to ``count`` tokens after ``token`` (``[1, 1]``) with ``cache``; with ``budget_s``, stop
    once that many seconds have passed and at least 4 tokens are done. Returns (last token, tokens decoded,
    seconds)."""
    began, done = time.perf_counter(), 0
    while done < count:
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        done += 1
        if budget_s is not None and time.perf_counter() - began > budget_s and done >= 4:
            break
    return token, done, time.perf_counter() - began


def _job_neighbour(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy decode speed of the native model at ``spec["model"]`` (``spec["tokens"]`` tokens after a 128-token
    prompt) for each thread count in ``spec["thread_counts"]``: quiet (thread policy ``free-cores``, which is ``fixed``
    on an idle machine), then with a busy neighbour process under each thread policy."""
    import subprocess
    import sys

    import torch
    from transformers import DynamicCache

    import bitnet_convert
    from bitnet_convert.runtime.threads import set_thread_policy

    model = bitnet_convert.load(spec["model"], backend="native")
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))

    def decode() -> float:
        cache = DynamicCache()
        with torch.no_grad():
            token = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            _, done, seconds = _greedy_decode(model, token, cache, spec["tokens"])
        return done / seconds

    runs: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    for threads in spec["thread_counts"]:
        torch.set_num_threads(threads)
        set_thread_policy(model, "free-cores")
        decode()  # warm-up
        runs[str(threads)] = {"quiet": decode()}
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            for policy in ("fixed", "free-cores"):
                set_thread_policy(model, policy)
                decode()  # warm-up: the policy's first window
                runs[str(threads)][policy] = decode()
        finally:
            neighbour.kill()
            neighbour.wait()
    return {"runs": runs, "work_s": time.perf_counter() - start}


def _decode_split(model: Any, token: Any, cache: Any, tokens: int) -> dict[str, float]:
    """Seconds per decoded token in the native linears' GEMV/GEMM kernels, in the lm_head, and the rest (norms
    and the activation quantizers — one fused call per norm in the decode step —, attention, RoPE, the KV cache,
    Python and module calls), over ``tokens`` more greedy tokens with the kernels of each layer called one at a
    time (timed), then ``tokens`` more on the usual path (the token's time)."""
    from bitnet_convert.native import backend as native_backend

    spent = {"linears": 0.0, "lm_head": 0.0}
    head = model.get_output_embeddings()

    def timed(function, key):
        def run(*args, **kwargs):
            began = time.perf_counter()
            out = function(*args, **kwargs)
            spent[key] += time.perf_counter() - began
            return out
        return run

    linears = [m for m in model.modules() if isinstance(m, native_backend.NativeLinear)]
    for module in linears:
        module.apply_codes = timed(module.apply_codes, "linears")
    head.forward = timed(head.forward, "lm_head")
    gated_up = native_backend.relu2_gated_up  # up_proj of the gated relu² FFN (its relu² is a few µs of it)
    native_backend.relu2_gated_up = timed(gated_up, "linears")
    # the decode step runs a whole layer in one kernel call (decode_layer), where no Python wrapper can time the
    # linears: they are timed on the same kernels called one at a time (the layer's plan switched off), and the
    # token on the usual path; the rest is the usual token's time minus the linears and the lm_head
    layers = [m for m in model.modules() if "_decode_plan" in vars(m) or hasattr(m, "self_attn")]
    try:
        for layer in layers:
            layer._decode_plan = None
        token, done, _ = _greedy_decode(model, token, cache, tokens)
    finally:
        native_backend.relu2_gated_up = gated_up
        for module in linears:
            vars(module).pop("apply_codes", None)
        vars(head).pop("forward", None)
        for layer in layers:
            vars(layer).pop("_decode_plan", None)
    split = {key: value / done for key, value in spent.items()}
    _, done, seconds = _greedy_decode(model, token, cache, tokens)
    total = seconds / done
    return {**split, "rest": total - sum(split.values()), "token": total}


def _decode_bytes(model: Any, shares: dict[str, float], cache: Any) -> dict[str, float]:
    """Bytes one decoded token must read: the packed weights of the linears (the sparse-input ones only the
    columns of non-zero inputs, up_proj only the rows relu² keeps, at the measured shares), the lm_head, and the
    KV cache at its current length."""
    import torch

    from bitnet_convert.io.families import role_of
    from bitnet_convert.native import backend as native_backend

    linears = 0.0
    for name, module in model.named_modules():
        if isinstance(module, native_backend.NativeLinear):
            share = 1.0 - shares.get(role_of(name), 0.0) if module.sparse else 1.0
            if name.endswith("up_proj") and "up rows skipped" in shares:
                share = 1.0 - shares["up rows skipped"]
            linears += module.weight.numel() * module.weight.element_size() * share
    head = model.get_output_embeddings().weight
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
             if isinstance(t, torch.Tensor))
    return {"linears": linears, "lm_head": float(head.numel() * head.element_size()), "kv_cache": float(kv)}


def _read_bandwidth(nbytes: int) -> float:
    """This machine's read bandwidth in GB/s: the best of three sums over ``nbytes`` of fp32 (torch's threads)."""
    import torch

    data = torch.ones(nbytes // 4)
    return data.numel() * 4 / _best_seconds(data.sum, 3) / GB


def _best_seconds(function: Callable[[], Any], repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``function``, after one untimed warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return min(times)


def _job_kernels(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's memory bandwidth (a STREAM-like copy of ``spec["copy_bytes"]``) and the native GEMV (one
    token) of each 2B-4T linear shape, cycling through enough copies of the weight that it never sits in a
    cache: GB/s of packed weight bytes read and effective int-ops/s (2 per weight used)."""
    import torch

    from bitnet_convert.native import build as kernels

    kernels.ensure_built()
    ops, isa = torch.ops.bitnet_convert, kernels.isa()
    start = time.perf_counter()
    n = spec["copy_bytes"] // 4
    src, dst = torch.ones(n), torch.empty(n)
    bandwidth = 2 * n * 4 / _best_seconds(lambda src=src, dst=dst: dst.copy_(src), 5)  # bytes read + bytes written
    del src, dst
    generator = torch.Generator().manual_seed(0)
    linears = {}
    for name, (rows, cols, zero_share, sparse) in spec["shapes"].items():
        packed = _random_packed(rows, cols, generator)
        layout = kernels.cols_layout(packed) if sparse else kernels.rows_layout(packed)
        weights = _cold_copies(layout, spec["working_set_bytes"])
        x = torch.randn(1, cols, generator=generator)
        x = x * (torch.rand(1, cols, generator=generator) >= zero_share)
        codes, s, sums = ops.quantize_absmax(x, 8, isa)
        active = float((codes[0, :cols] != 0).float().mean()) if sparse else 1.0

        def run(w, codes=codes, s=s, sums=sums, sparse=sparse, rows=rows):
            if sparse:
                return ops.ternary_gemm_sparse(codes, sums, s, w, rows, 1.0, False, isa)
            return ops.ternary_gemm(codes, sums, s, w, 1.0, False, isa)

        seconds = _best_seconds(lambda weights=weights, run=run: [run(w) for w in weights], 3) / len(weights)
        read = layout.numel() * active
        linears[name] = {"rows": rows, "cols": cols, "sparse": sparse, "active_share": active,
                         "packed_bytes": layout.numel(), "bytes_read": read, "seconds": seconds,
                         "gb_s": read / seconds / GB, "int_ops_s": 2 * rows * cols * active / seconds}
        del weights
    for name, (rows, cols, keep) in spec.get("chosen_rows", {}).items():
        layout = kernels.rows_layout(_random_packed(rows, cols, generator))
        weights = _cold_copies(layout, spec["working_set_bytes"])
        chosen = torch.nonzero(torch.rand(rows, generator=generator) < keep).flatten()
        codes, s, sums = ops.quantize_absmax(torch.randn(1, cols, generator=generator), 8, isa)
        dense = _best_seconds(lambda weights=weights, c=codes, s=s, u=sums: [
            ops.ternary_gemm(c, u, s, w, 1.0, False, isa) for w in weights], 3) / len(weights)
        subset = _best_seconds(lambda weights=weights, c=codes, s=s, u=sums, r=chosen: [
            ops.ternary_gemm_rows(c, u, s, w, r, 1.0, False, isa) for w in weights], 3) / len(weights)
        read = chosen.numel() * layout.shape[1]
        linears[name] = {"rows": rows, "cols": cols, "sparse": False, "active_share": chosen.numel() / rows,
                         "packed_bytes": layout.numel(), "bytes_read": read, "seconds": subset,
                         "gb_s": read / subset / GB, "int_ops_s": 2 * chosen.numel() * cols / subset,
                         "dense_seconds": dense, "dense_gb_s": layout.numel() / dense / GB}
        del weights
    heads = _lm_head_gemvs(ops, isa, spec["lm_head"], generator)
    prefill = _prefill_gemms(ops, isa, spec["prefill_gemm"], generator) if isa == kernels.ISA_AVX2 else {}
    return {"work_s": time.perf_counter() - start, "copy_gb_s": bandwidth / GB, "linears": linears, "isa": isa,
            "lm_heads": heads, "prefill_gemms": prefill}


def _random_packed(rows: int, cols: int, generator: Any) -> Any:
    """A random ternary weight ``[rows, cols]`` (values -1, 0, 1 from ``generator``) in transformers' 2-bit
    packing."""
    import torch

    from bitnet_convert.quant.packing import pack_ternary

    return pack_ternary(torch.randint(-1, 2, (rows, cols), generator=generator, dtype=torch.int8))


def _cold_copies(layout: Any, working_set_bytes: int) -> list[Any]:
    """Enough copies of ``layout`` (at least 2) to fill ``working_set_bytes``: cycling through them, a GEMV never
    finds its weight in a cache."""
    return [layout.clone() for _ in range(max(2, -(-working_set_bytes // layout.numel())))]


def _prefill_gemms(ops: Any, isa: int, spec: dict[str, Any], generator: Any) -> dict[str, dict[str, float]]:
    """The prefill GEMM of ``spec["tokens"]`` tokens of 4-bit codes (a4.8's q/k/v and gate/up inputs) through each
    ``spec["shapes"]`` weight, by vpmaddubsw (``ternary_gemm``) and by table lookup (``ternary_gemm_lut``): seconds
    (best of 3, weights warm: prefill is compute-bound) and GMAC/s; the two results are checked equal."""
    import torch

    from bitnet_convert.native import build as kernels

    tokens = spec["tokens"]
    gemms = {}
    for name, (rows, cols) in spec["shapes"].items():
        weight = kernels.rows_layout(_random_packed(rows, cols, generator))
        codes = torch.randint(-8, 8, (tokens, weight.shape[1] * 4), generator=generator, dtype=torch.int8)
        s, sums = torch.ones(tokens), codes.sum(-1, dtype=torch.int32)
        runs = {"maddubs": lambda w=weight, c=codes, s=s, u=sums: ops.ternary_gemm(c, u, s, w, 1.0, False, isa),
                "lut": lambda w=weight, c=codes, s=s, u=sums: ops.ternary_gemm_lut(c, u, s, w, 1.0, False)}
        if not torch.equal(runs["maddubs"](), runs["lut"]()):
            raise AssertionError(f"the table-lookup GEMM differs from the vpmaddubsw one on {name}")
        seconds = {method: _best_seconds(run, 3) for method, run in runs.items()}
        gemms[name] = {"tokens": tokens, "rows": rows, "cols": cols, **{f"{m}_seconds": t for m, t in seconds.items()},
                       **{f"{m}_gmac_s": rows * cols * tokens / t / 1e9 for m, t in seconds.items()}}
    return gemms


def _lm_head_gemvs(ops: Any, isa: int, shape: tuple[int, int], generator: Any) -> dict[str, dict[str, float]]:
    """One token through a ``shape`` lm_head as bf16 (the stored dtype) and as INT8 with per-row scales (the
    ``--lm-head int8`` option): seconds (best of 3) and GB/s of weight bytes read."""
    import torch

    from bitnet_convert.native.backend import Int8Linear

    weight = (torch.randn(*shape, generator=generator) * 0.02).bfloat16()
    int8 = Int8Linear(weight)
    x = torch.randn(1, shape[1], generator=generator)
    runs = {"bf16": (lambda: ops.bf16_gemm(x, weight, isa), weight.numel() * 2),
            "int8": (lambda: ops.int8_gemm(x, int8.weight, int8.scale, isa), int8.weight.numel())}
    heads = {}
    for name, (run, nbytes) in runs.items():
        seconds = _best_seconds(run, 3)
        heads[name] = {"seconds": seconds, "gb_s": nbytes / seconds / GB, "bytes": nbytes}
    return heads


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"runtime": _job_runtime, "kernels": _job_kernels,
                                                                  "neighbour": _job_neighbour}
