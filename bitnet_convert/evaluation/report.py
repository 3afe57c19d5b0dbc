"""Evaluation reports: reading one back, comparing with a baseline, the accuracy gate, Markdown.

A report is the JSON ``bitnet-convert eval`` writes (see :func:`bitnet_convert.evaluation.evaluate.evaluate`).
Everything here is pure: it takes report dicts and returns numbers, failure lines or text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bitnet_convert.errors import DataError
from bitnet_convert.io.jsonfile import read_json

REPORT_FORMAT = "bitnet-convert-eval/1"
#: Settings that must match for two reports to be comparable.
COMPARABLE_SETTINGS = ("limit", "num_fewshot", "max_length")


def load_report(path: str | Path) -> dict:
    """Read an evaluation report written by ``bitnet-convert eval --output``."""
    report = read_json(Path(path), DataError, f"baseline report '{path}' does not exist", str(path))
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT or not isinstance(
        report.get("results"), dict
    ):
        raise DataError(f"{path}: not a bitnet-convert eval report (expected \"format\": \"{REPORT_FORMAT}\")")
    return report


def check_comparable(report: dict, baseline: dict, source: str) -> None:
    """Raise unless ``baseline`` measured the same tasks and metrics with the same settings as ``report``."""
    ours, theirs = sorted(report["results"]), sorted(baseline["results"])
    if ours != theirs:
        raise DataError(
            f"{source}: baseline was measured on tasks {', '.join(theirs)}, this run on {', '.join(ours)}; "
            "evaluate both with the same --tasks"
        )
    for task in ours:
        missing = sorted(set(report["results"][task]) - set(baseline["results"][task]))
        if missing:
            raise DataError(f"{source}: baseline has no '{missing[0]}' for task {task}")
    for key in COMPARABLE_SETTINGS:
        a, b = report["settings"].get(key), baseline.get("settings", {}).get(key)
        if a != b:
            raise DataError(f"{source}: baseline was measured with {key}={b}, this run with {key}={a}; use the same")


def compare(report: dict, baseline: dict) -> dict:
    """Per task and metric: ``{"value", "baseline", "delta", "recovery"}``; recovery is converted / baseline for
    metrics where higher is better and baseline / converted otherwise, so 1.0 is full recovery either way."""
    table: dict[str, dict[str, dict]] = {}
    for task, metrics in report["results"].items():
        for metric, value in metrics.items():
            base = baseline["results"][task][metric]
            higher = report["higher_is_better"].get(task, {}).get(metric, True)
            ratio = (value / base if higher else base / value) if base and value else math.nan
            table.setdefault(task, {})[metric] = {
                "value": value, "baseline": base, "delta": value - base, "recovery": ratio,
            }
    return table


@dataclass
class Thresholds:
    """Gate limits, global (key ``*``) or per ``task`` or ``task:metric``.

    ``max_ppl_increase``: percent, for metrics whose name contains ``perplexity``.
    ``max_acc_drop``: points (×100), for the other higher-is-better metrics with values in [0, 1].
    """

    max_ppl_increase: dict[str, float] = field(default_factory=dict)
    max_acc_drop: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.max_ppl_increase or self.max_acc_drop)

    @staticmethod
    def _pick(limits: dict[str, float], task: str, metric: str) -> float | None:
        for key in (f"{task}:{metric}", task, "*"):
            if key in limits:
                return limits[key]
        return None

    def for_metric(self, task: str, metric: str, higher_is_better: bool, value: float) -> tuple[str, float] | None:
        """``("ppl", pct)`` or ``("acc", points)`` when a limit applies to this metric, else ``None``."""
        if "perplexity" in metric and not higher_is_better:
            limit = self._pick(self.max_ppl_increase, task, metric)
            return None if limit is None else ("ppl", limit)
        if higher_is_better and 0.0 <= value <= 1.0:
            limit = self._pick(self.max_acc_drop, task, metric)
            return None if limit is None else ("acc", limit)
        return None


def parse_threshold(items: list[str] | float | dict | None, option: str) -> dict[str, float]:
    """``["1.5", "reference_ppl:word_perplexity=3"]`` (CLI) or ``1.5`` / ``{"*": 1.5, ...}`` (recipe) → limits."""
    if items is None:
        return {}
    if isinstance(items, int | float):
        items = [str(items)]
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    limits: dict[str, float] = {}
    for item in items:
        key, sep, raw = str(item).rpartition("=")
        key = key.strip() if sep else "*"
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{option} '{item}': expected a number, or TASK[:METRIC]=NUMBER") from None
        if not math.isfinite(value) or value < 0:
            raise DataError(f"{option} '{item}': the limit must be a number ≥ 0")
        limits[key] = value
    return limits


def gate(report: dict, comparison: dict, thresholds: Thresholds) -> list[str]:
    """One line per metric that crossed its limit (empty when the gate passes)."""
    failures = []
    for task, metrics in comparison.items():
        for metric, row in metrics.items():
            higher = report["higher_is_better"].get(task, {}).get(metric, True)
            rule = thresholds.for_metric(task, metric, higher, row["value"])
            if rule is None:
                continue
            kind, limit = rule
            if kind == "ppl":
                change = 100.0 * (row["value"] / row["baseline"] - 1.0)
                if round(change, 9) > limit:  # a drop of exactly the limit passes
                    failures.append(
                        f"{task} {metric} {row['value']:.4f} vs {row['baseline']:.4f} (+{change:.2f}% > {limit:g}%)"
                    )
            else:
                drop = 100.0 * (row["baseline"] - row["value"])
                if round(drop, 9) > limit:
                    failures.append(
                        f"{task} {metric} {row['value']:.4f} vs {row['baseline']:.4f} "
                        f"(−{drop:.2f} points > {limit:g})"
                    )
    return failures


def markdown(report: dict) -> str:
    """The report as Markdown: a results table (with baseline, delta and recovery when compared) and the
    sparsity of the quantized linear inputs on the evaluation data."""
    lines = [f"# Evaluation of `{report['model']}` ({report['scheme']})", ""]
    comparison = report.get("comparison")
    if comparison:
        lines += [f"Baseline: `{report['baseline']['model']}` ({report['baseline']['scheme']}).", ""]
        lines += ["| task | metric | value | baseline | delta | recovery |", "|---|---|---|---|---|---|"]
        for task, metrics in comparison.items():
            for metric, row in metrics.items():
                lines.append(
                    f"| {task} | {metric} | {row['value']:.4f} | {row['baseline']:.4f} | {row['delta']:+.4f} "
                    f"| {row['recovery']:.4f} |"
                )
    else:
        lines += ["| task | metric | value |", "|---|---|---|"]
        for task, metrics in report["results"].items():
            for metric, value in metrics.items():
                lines.append(f"| {task} | {metric} | {value:.4f} |")
    gate_result = report.get("gate")
    if gate_result is not None:
        verdict = "passed" if not gate_result["failures"] else "**failed**: " + "; ".join(gate_result["failures"])
        lines += ["", f"Gate {verdict}."]
    stats = report.get("sparsity")
    if stats:
        lines += [
            "",
            f"Sparsity on the evaluation data ({stats['tokens']:,} tokens; share of zero inputs per linear, for "
            "`up` the share of outputs skipped where act(gate) = 0):",
            "",
            "| " + " | ".join(stats["sparsity"]) + " | active parameters |",
            "|" + "---|" * (len(stats["sparsity"]) + 1),
            "| " + " | ".join(f"{v:.1%}" for v in stats["sparsity"].values())
            + f" | {stats['active_parameter_share']:.1%} |",
        ]
    settings = report["settings"]
    lines += [
        "",
        f"Tasks {', '.join(report['tasks'])}; limit {settings['limit']}, num_fewshot {settings['num_fewshot']}, "
        f"seed {settings['seed']}; {report['time_s']:.1f} s on {settings['device']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"
