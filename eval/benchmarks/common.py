"""What every benchmark shares: the rows of the results table, and child jobs (a fresh Python process per job,
bounded in time) with what they report.

A job runs as ``python eval/bench.py --job KIND --spec JSON``: the child re-runs the script, which dispatches
``KIND`` to the ``_job_*`` function that a benchmark module registered in its ``JOBS``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_MODEL = REPO_ROOT / "eval" / "reference" / "model"
#: The script every child job runs (``--job KIND --spec JSON``).
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"
RESULT_MARKER = "BENCH_RESULT "  # prefixes the one stdout line of a child job that carries its JSON result

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
    from bitnet_convert.runtime.env import env_seconds

    try:
        return env_seconds(JOB_TIMEOUT_ENV, JOB_TIMEOUT_S, above=0)
    except ValueError as exc:
        sys.exit(f"error: {exc}")


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
    """Run ``JOBS[kind](spec)`` (the jobs of eval/bench.py) in a fresh Python process; return its result line and
    total wall time.

    ``spec["threads"]``, when set, is the child's ``torch.set_num_threads`` (applied before the clock starts).
    """
    print(f"[bench] {label}: {kind} ...", file=sys.stderr, flush=True)
    command = [sys.executable, str(BENCH_SCRIPT), "--job", kind, "--spec", json.dumps(spec)]
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


def threads_label(count: int | None) -> str:
    """``1 thread``, ``4 threads``."""
    return f"{count} thread{'' if count == 1 else 's'}"

