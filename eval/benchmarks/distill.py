"""``distill``: the distillation fine-tune's step time and peak memory at two depths (the 30-layer memory
extrapolated)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import GB, Row, run_job
from benchmarks.synthetic import ShapeConfig, ensure_synthetic_checkpoint

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


def _extrapolate(measured: dict[int, dict[str, Any]], key: str, layers: int) -> float:
    """The straight line through the two (depth, ``key``) points of ``measured``, at ``layers``."""
    (a, da), (b, db) = sorted(measured.items())
    return da[key] + (db[key] - da[key]) / (b - a) * (layers - a)


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


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"distill": _job_distill}
