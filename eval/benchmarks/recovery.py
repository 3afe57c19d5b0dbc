"""``recovery``: block-wise recovery's peak memory and time per block at two depths, the end-to-end fine-tune's
memory beside it, and data-parallel recovery under ``torchrun``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import GB, Row, run_bounded
from benchmarks.distill import bench_distill
from benchmarks.synthetic import ShapeConfig, jobs_by_depth

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
    rows, done = jobs_by_depth(
        "recovery", args, RECOVERY_DEPTHS, "blockwise", {"steps": 2, "samples": 4, "seq_len": 256},
        lambda layers, _size: f"synthetic 2B-4T, {layers} layers, block-wise (2 steps per block, 4 windows of 256)")
    peaks = {}
    for layers, (subject, _size, result) in done.items():
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


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"blockwise": _job_blockwise}
