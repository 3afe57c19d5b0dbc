"""Every shipped recipe on one model as a new user runs it, and the validation perplexity of each reloaded export.

For each recipe: ``bitnet-convert quantize --recipe recipes/<recipe>.yaml --model MODEL --calibration-data DATA
--output OUT/<recipe>`` in its own process (wall time and that process's peak RSS, from a wrapper that waits for
it: ``resource.getrusage(RUSAGE_CHILDREN)``), then ``bitnet-convert perplexity OUT/<recipe> --data VALIDATION``
(the package's :func:`~bitnet_convert.evaluation.evaluate.perplexity_of`, the same defaults). ``b158`` is the
unconverted baseline every other row is compared with. Prints a Markdown table and writes ``--json``.

Usage (the real-text reference model, README "Results on real text")::

    python eval/reference/recovery_table.py --model builtin:reference-text \\
        --calibration-data eval/reference/data-text/train.txt --validation builtin:reference-text \\
        --out /tmp/recovery-text --json /tmp/recovery-text.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("b158", "a48", "a48-qwt", "a48-blockwise", "a48-blockwise-kd", "a48-kd", "a48-qwt-kd", "a48-kv3-kd")
# runs one command and prints its peak RSS in KiB (ru_maxrss of the waited-for child) as the last line
_WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def quantize(recipe: str, model: str, data: str, output: Path) -> dict[str, float]:
    """Convert ``model`` with ``recipes/<recipe>.yaml``: wall seconds and peak RSS (GB) of the command."""
    command = [sys.executable, "-m", "bitnet_convert.cli", "quantize", "--recipe", str(REPO / "recipes" /
               f"{recipe}.yaml"), "--model", model, "--calibration-data", data, "--output", str(output),
               "--overwrite"]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"error: {recipe}: quantize failed:\n{done.stderr[-2000:]}")
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_gb": peak_kib * 1024 / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration-data", required=True)
    parser.add_argument("--validation", required=True, help="perplexity data (its validation split)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from bitnet_convert.evaluation.evaluate import perplexity_of

    rows = {}
    for recipe in args.recipes:
        output = args.out / recipe
        measured = quantize(recipe, args.model, args.calibration_data, output)
        measured["perplexity"] = perplexity_of(output, args.validation, "validation")["perplexity"]
        rows[recipe] = measured
        print(f"{recipe}: {json.dumps(measured)}", flush=True)
    base = rows.get("b158", {}).get("perplexity")
    print("\n| recipe | perplexity | vs b158 | wall time | peak RSS |\n|---|---|---|---|---|")
    for recipe, row in rows.items():
        versus = f"{row['perplexity'] / base - 1:+.2%}" if base and recipe != "b158" else "—"
        print(f"| `{recipe}` | {row['perplexity']:.4f} | {versus} | {row['seconds']:.0f} s | "
              f"{row['peak_rss_gb']:.2f} GB |")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": args.model, "calibration_data": args.calibration_data,
                                         "validation": args.validation, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
