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
depths (the 30-layer memory extrapolated). ``serve`` runs ``bitnet-convert serve`` under 1, 2, 4 and 8 concurrent
streaming clients (aggregate decode tokens/s, time to first token).

Usage::

    python eval/bench.py --layers 2            # quick: a 2-layer synthetic checkpoint
    python eval/bench.py                       # the full 30-layer 2B-4T shapes (~5 GB cache, some minutes)
    python eval/bench.py --only conversion --json eval/results/bench.json

The benchmarks live in ``eval/benchmarks/``, one module per benchmark; this script parses the arguments, runs the
chosen benchmarks, writes the table and the JSON, and runs the child jobs (``--job KIND --spec JSON``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (importlib), not run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks import calibration, conversion, distill, kv_cache, recovery, runtime, serve, synthetic
from benchmarks.common import REPO_ROOT, RESULT_MARKER, Row, markdown_table
from benchmarks.synthetic import ShapeConfig

DEFAULT_RECIPE = REPO_ROOT / "recipes" / "a48.yaml"
DEFAULT_JSON = REPO_ROOT / "eval" / "results" / "bench.json"
DEFAULT_CACHE = Path("~/.cache/bitnet-convert/bench")

#: Every benchmark by name, in the order they run; each returns its rows of the table.
BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "conversion": conversion.bench_conversion,
    "kv_cache": kv_cache.bench_kv_cache,
    "calibration": calibration.bench_calibration,
    "distill": distill.bench_distill,
    "recovery": recovery.bench_recovery,
    "runtime": runtime.bench_runtime,
    "kernels": runtime.bench_kernels,
    "serve": serve.bench_serve,
}


Job = Callable[[dict[str, Any]], dict[str, Any]]


def _merge_jobs(*registries: dict[str, Job]) -> dict[str, Job]:
    """The union of the benchmark modules' ``JOBS``; a kind registered twice is a programming error."""
    jobs: dict[str, Job] = {}
    for registry in registries:
        clash = jobs.keys() & registry.keys()
        if clash:
            raise RuntimeError(f"child job kinds registered twice: {sorted(clash)}")
        jobs.update(registry)
    return jobs


#: Every child job by kind (``--job KIND``), from the benchmark modules that launch them.
JOBS = _merge_jobs(calibration.JOBS, distill.JOBS, recovery.JOBS, synthetic.JOBS, conversion.JOBS, kv_cache.JOBS,
                   runtime.JOBS, serve.JOBS)


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


def _torch_threads() -> int | None:
    """The child's intra-op thread count (``None`` when the job never imported torch)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
