"""``calibration``: peak memory and time of layer-by-layer calibration at several depths."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import GB, Row
from benchmarks.synthetic import ShapeConfig, jobs_by_depth

MAX_CALIBRATION_RSS = 0.5  # peak RSS ÷ bf16 checkpoint size, full 2B-4T depth
MAX_CALIBRATION_SPREAD = 0.10  # peak RSS across depths: (max − min) / min
CALIBRATION_DEPTHS = (8, 16, 30)


def bench_calibration(args: argparse.Namespace) -> list[Row]:
    """Peak RSS and wall time of layer-by-layer calibration on 2B-4T-shaped checkpoints truncated to several
    depths (2 × 256 tokens, batch 1): the peak must not grow with depth."""
    rows, done = jobs_by_depth(
        "calibration", args, CALIBRATION_DEPTHS, "calibrate", {"samples": 2, "seq_len": 256, "batch_size": 1},
        lambda layers, size: f"synthetic 2B-4T, {layers} layers ({size / GB:.2f} GB)")
    peaks = {}
    for layers, (subject, size, result) in done.items():
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


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"calibrate": _job_calibrate}
