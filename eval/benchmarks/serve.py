"""``serve``: ``bitnet-convert serve`` under concurrent streaming clients: aggregate decode tokens/s and time to
first token at 1, 2, 4 and 8 clients, on a48 exports of the 2-layer 2B-4T synthetic checkpoint (with the default
INT8 lm_head and with the stored bf16 one) and the reference model.

The server is the real command in its own process (``--port 0``, the native backend, ``--max-batch 8``, its
thread count fixed at ``--threads`` or every core, since the clients run on the same machine); the
clients are threads of the job's process, each with the official ``openai`` client, all released at once by a
barrier, each asking for :data:`SERVE_TOKENS` tokens (greedy, distinct prompts); each client count runs
:data:`REPEATS` times and the run of median aggregate speed is reported. The synthetic checkpoint has no tokenizer:
the export gets one word per token id (:func:`_write_word_tokenizer`). Aggregate tokens/s is the sum of
the completion tokens (``usage``) over the wall time from the first request to the last token; time to first token
is measured per client from its request to its first streamed text.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REFERENCE_MODEL, REPO_ROOT, Row, run_job
from benchmarks.synthetic import ShapeConfig, ensure_synthetic_checkpoint

CLIENTS = (1, 2, 4, 8)
SERVE_TOKENS = 96
REPEATS = 3  # each client count runs this many times; the run of median aggregate tokens/s is reported
MIN_AGGREGATE_SPEEDUP = 2.5  # aggregate decode tokens/s at 4 clients ÷ 1 client, 2B-4T shapes
MAX_FIRST_TOKEN_RATIO = 2.0  # mean time to first token at 4 clients ÷ 1 client, 2B-4T shapes
PROMPTS = ("Anna is a kind baker who lives in Oakfield.", "The river", "Once upon a time there was a small dog that",
           "Tom", "The weather in Millwood", "A potter", "Every morning the farmer", "She opened the door and")


def bench_serve(args: argparse.Namespace) -> list[Row]:
    """The server on the a48 export of each subject, at each client count; the targets on the 2B-4T shapes with the
    default lm_head."""
    subjects = [("synthetic 2B-4T, 2 layers, a48",
                 str(ensure_synthetic_checkpoint(args.cache_dir.expanduser(), ShapeConfig(layers=2), args.seed)),
                 ("auto", "stored"))]
    if (REFERENCE_MODEL / "config.json").is_file():
        subjects.append(("reference model, a48", "builtin:reference", ("auto",)))
    rows: list[Row] = []
    for subject, model, heads in subjects:
        with tempfile.TemporaryDirectory() as tmp:
            export = Path(tmp) / "a48"
            prepared = run_job("quantize", {"recipe": str(REPO_ROOT / "recipes" / "a48.yaml"), "model": model,
                                            "output": str(export), "threads": args.threads}, f"{subject}: export")
            if not prepared.ok:
                rows.append(Row("serve", subject, "export", f"failed: {prepared.error}", passed=False))
                continue
            if not any((export / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
                _write_word_tokenizer(export)
            for head in heads:
                label = subject if head == "auto" else f"{subject}, {head} lm_head"
                result = run_job("serve", {"model": str(export), "clients": list(CLIENTS), "tokens": SERVE_TOKENS,
                                           "lm_head": head, "threads": args.threads}, f"{label}: serve")
                rows.extend(_serve_rows(label, result, targets=head == "auto" and model != "builtin:reference"))
    return rows


def _serve_rows(subject: str, result: Any, targets: bool) -> list[Row]:
    """The rows of one server run: aggregate tokens/s and time to first token per client count; with ``targets``,
    the 4-client ratios against their targets."""
    if not result.ok:
        return [Row("serve", subject, "serve", f"failed: {result.error}", passed=False)]
    rows = []
    runs = {int(n): run for n, run in result.data["runs"].items()}
    for n, run in runs.items():
        name = f"{subject}: {n} client{'s' if n > 1 else ''}"
        rows.append(Row("serve", name, "aggregate decode tokens/s",
                        f"{run['tokens_per_s']:.1f} ({run['tokens']} tokens in {run['wall_s']:.2f} s)",
                        value=run["tokens_per_s"], unit="tokens/s", details=run))
        rows.append(Row("serve", name, "time to first token",
                        f"mean {run['first_token_mean_s'] * 1e3:.0f} ms, max {run['first_token_max_s'] * 1e3:.0f} ms",
                        value=run["first_token_mean_s"], unit="s"))
    if targets and 1 in runs and 4 in runs:
        speedup = runs[4]["tokens_per_s"] / runs[1]["tokens_per_s"]
        rows.append(Row("serve", subject, "aggregate tokens/s, 4 clients ÷ 1", f"{speedup:.2f}×",
                        f"≥ {MIN_AGGREGATE_SPEEDUP}×", speedup >= MIN_AGGREGATE_SPEEDUP, speedup, "ratio"))
        ratio = runs[4]["first_token_mean_s"] / runs[1]["first_token_mean_s"]
        rows.append(Row("serve", subject, "time to first token, 4 clients ÷ 1", f"{ratio:.2f}×",
                        f"≤ {MAX_FIRST_TOKEN_RATIO}×", ratio <= MAX_FIRST_TOKEN_RATIO, ratio, "ratio"))
    return rows


def _write_word_tokenizer(directory: Path) -> None:
    """A tokenizer for a synthetic checkpoint (which has none): one word ``<i>`` per token id of the model's
    vocabulary, split on whitespace, so that the server can stream any token the random weights pick as text."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = json.loads((directory / "config.json").read_text())
    words = {f"<{i}>": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {name: f"<{config[key]}>" for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"))
               if isinstance(config.get(key), int)}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<0>", **special).save_pretrained(directory)


def _job_serve(spec: dict[str, Any]) -> dict[str, Any]:
    """Start ``bitnet-convert serve`` on the export, warm it up, then run each client count once."""
    import openai

    # the clients share this machine's cores with the server: with a thread count that follows the free cores, the
    # server would give way to the benchmark's own clients, so its count is fixed (--threads, else every core)
    threads = spec.get("threads") or os.cpu_count() or 1
    command = [sys.executable, "-m", "bitnet_convert.cli", "serve", spec["model"], "--port", "0", "--max-batch", "8",
               "--backend", "native", "--lm-head", spec.get("lm_head", "auto"), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    start = time.perf_counter()
    try:
        url = _wait_for_url(server)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        _stream(client, PROMPTS[0], spec["tokens"])  # warm-up: first calls, allocator
        runs = {n: _median([_concurrent(url, n, spec["tokens"]) for _ in range(REPEATS)]) for n in spec["clients"]}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"work_s": time.perf_counter() - start, "runs": runs}


def _wait_for_url(server: subprocess.Popen) -> str:
    lines = []
    while line := server.stderr.readline():
        lines.append(line)
        match = re.search(r"http://[\d.]+:\d+/v1", line)
        if match:
            # keep reading the server's log so that its pipe never fills
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            return match.group(0)
    raise RuntimeError("the server exited: " + "".join(lines[-3:]).strip())


def _stream(client: Any, prompt: str, tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    first, count = None, 0
    stream = client.completions.create(model="a48", prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return {"start": start, "first": first or time.perf_counter(), "end": time.perf_counter(), "tokens": count}


def _concurrent(url: str, clients: int, tokens: int) -> dict[str, Any]:
    import openai

    barrier, results = threading.Barrier(clients), [None] * clients

    def one(index: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        barrier.wait()
        results[index] = _stream(client, PROMPTS[index % len(PROMPTS)], tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(r is None for r in results):
        raise RuntimeError(f"a client of {clients} failed")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["tokens"] for r in results)
    firsts = [r["first"] - r["start"] for r in results]
    return {"clients": clients, "tokens": total, "wall_s": wall, "tokens_per_s": total / wall,
            "first_token_mean_s": sum(firsts) / clients, "first_token_max_s": max(firsts)}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "tokens_per_s_all": [run["tokens_per_s"] for run in runs]}


JOBS = {"serve": _job_serve}
