"""``conversion``: ``bitnet_convert.quantize`` (recipe a48, no calibration) against stock transformers'
``from_pretrained`` + ``save_pretrained`` on the same checkpoint: time, peak RSS, packed size."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import GB, REFERENCE_MODEL, REPO_ROOT, JobResult, Row, run_job, threads_label
from benchmarks.synthetic import ShapeConfig, checkpoint_bytes, ensure_synthetic_checkpoint

# Targets of the conversion benchmark.
PACKED_BITS = 2.0  # per ternary weight, plus one fp32 scale per linear
SCALE_BITS = 32
MAX_RSS_PER_CHECKPOINT = 1.25  # quantize peak RSS ÷ bf16 checkpoint size
MAX_WALL_RATIO = 1.5  # quantize wall time ÷ transformers load+save wall time


def bench_conversion(args: argparse.Namespace) -> list[Row]:
    """bitnet-convert's quantize vs stock transformers load+save: time, peak RSS, packed size."""
    shape = ShapeConfig(layers=args.layers)
    synthetic = ensure_synthetic_checkpoint(args.cache_dir.expanduser(), shape, args.seed)
    threads = f", {threads_label(args.threads)}" if args.threads else ""
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

    rows = [row("bf16 checkpoint size", f"{size / GB:.2f} GB", value=size, unit="bytes")]
    rows += _wall_time_rows(row, quantized, stock, targets)
    rows += _peak_rss_rows(row, size, quantized, stock, targets)
    if quantized.ok:
        rows += _packed_rows(row, quantized.data)
    return rows


def _wall_time_rows(row: Callable[..., Row], quantized: JobResult, stock: JobResult, targets: bool) -> list[Row]:
    """Wall time of each job, then their ratio (when both succeeded)."""
    q, t = quantized.data, stock.data
    rows = []
    if quantized.ok:
        # The report is written during export, so its time_s stops before export ends: the rest is export.
        export = q["work_s"] - sum(q["stage_s"].values())
        stages = ", ".join(f"{k} {v:.1f}" for k, v in {**q["stage_s"], "export ≈": export}.items())
        wall = (f"{q['work_s']:.1f} s ({stages}; process {quantized.total_s:.1f} s; "
                f"{threads_label(q['torch_threads'])})")
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
            f"{threads_label(t['torch_threads'])}; {t['linear_class']} {t['dtype']})"
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
    return rows


def _peak_rss_rows(
    row: Callable[..., Row], size: int, quantized: JobResult, stock: JobResult, targets: bool
) -> list[Row]:
    """Peak RSS of each job against the checkpoint size (the target is on quantize only)."""
    rows = []
    rss_limit = MAX_RSS_PER_CHECKPOINT * size / GB
    rss_target = f"≤ {MAX_RSS_PER_CHECKPOINT} × checkpoint = {rss_limit:.2f} GB" if targets else ""
    for job, label, target in ((quantized, "quantize", rss_target), (stock, "transformers", "")):
        rss = job.data.get("peak_rss_bytes")  # absent when the child was killed (e.g. out of memory)
        measured = f"{rss / GB:.2f} GB = {rss / size:.2f} × checkpoint" if rss else "n/a (the job died)"
        passed = rss <= MAX_RSS_PER_CHECKPOINT * size if target and rss else None
        rows.append(row(f"{label} peak RSS", measured, target=target, passed=passed, value=rss, unit="bytes"))
    return rows


def _packed_rows(row: Callable[..., Row], q: dict[str, Any]) -> list[Row]:
    """Bits per packed ternary weight against the bound, and the output / input size (a successful quantize)."""
    bound = PACKED_BITS + SCALE_BITS * q["linears"] / q["ternary_parameters"]
    out, inp = q["output_bytes"], q["input_bytes"]
    return [
        row(
            "packed ternary linears",
            f"{q['bits_per_weight']:.6f} bits/weight ({q['packed_bytes'] / GB:.3f} GB)",
            target=f"≤ {PACKED_BITS} + {SCALE_BITS}·{q['linears']}/{q['ternary_parameters']:.3g} = {bound:.6f}",
            passed=q["bits_per_weight"] <= bound,
            value=q["bits_per_weight"],
            unit="bits/weight",
        ),
        row(
            "quantize output / input size",
            f"{out / GB:.3f} GB / {inp / GB:.3f} GB = {out / inp:.3f}",
            value=out / inp,
        ),
    ]


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


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "quantize": _job_quantize,
    "transformers": _job_transformers,
}
