"""The baseline and gate policy of ``bitnet-convert eval``: which report a run is compared with, under which
limits, and what happens when the recipe's default baseline cannot be compared with this run.

A baseline named on the command line (``--baseline``, ``--baseline-model``) must match the run; the recipe's
``eval.baseline`` is a default, skipped with a note when it is missing here, was measured on another model, or on
other tasks or settings. The limits come from the command line, else from the recipe when its baseline is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bitnet_convert.errors import DataError
from bitnet_convert.evaluation.evaluate import EvalSettings, evaluate
from bitnet_convert.evaluation.report import Thresholds, check_comparable, compare, gate, load_report, parse_threshold
from bitnet_convert.io.checkpoint import (
    REPO_ROOT,
    architecture_signature,
    resolve_model_path,
    tokenizer_fingerprint,
    uses_reference_tokenizer,
)
from bitnet_convert.io.load import backend_for_device
from bitnet_convert.notes import collect, warn
from bitnet_convert.progress import Progress


@dataclass
class Comparison:
    """What ``bitnet-convert eval`` was asked to compare with, as given on its command line (``None``: not given).

    ``tasks``: comma-separated task names; ``recipe``: the recipe whose ``eval`` section gives the defaults
    (default: the ``recipe.yaml`` stored in the evaluated directory); ``baseline``: a report file;
    ``baseline_model``: a model evaluated first with the same settings; ``max_ppl_increase`` (percent) and
    ``max_acc_drop`` (points): ``PCT`` or ``TASK[:METRIC]=PCT`` items; ``no_baseline``: ignore the recipe's
    baseline and limits."""

    tasks: str | None = None
    recipe: Path | None = None
    baseline: Path | None = None
    baseline_model: str | None = None
    max_ppl_increase: list[str] | None = None
    max_acc_drop: list[str] | None = None
    no_baseline: bool = False


@dataclass
class _Plan:
    names: list[str] | None
    baseline: Path | None
    base: dict | None
    implicit: bool
    thresholds: Thresholds


def evaluate_and_compare(path: str, asked: Comparison, settings: EvalSettings, progress: Progress,
                         on_skip: Callable[[str], None] = warn) -> dict:
    """Evaluate the model at ``path`` (:func:`bitnet_convert.evaluation.evaluate.evaluate` with ``settings``),
    compare it with the baseline ``asked`` resolves to, and apply the gate. Returns the report with ``baseline``,
    ``comparison`` and ``gate`` (``failures``: one line per crossed limit) when it was compared, and the run's
    ``warnings``. The backend is resolved once here, for ``settings.device``. ``on_skip`` receives the reason
    whenever the recipe's baseline is skipped. Raises :class:`~bitnet_convert.errors.DataError` for a named
    baseline that cannot be compared, before any model is built where it can be known then."""
    with collect() as notes:
        # once, here: a fallback warning is given once and recorded in this report
        settings = replace(settings, backend=backend_for_device(settings.backend, settings.device))
        plan = _plan(path, asked, on_skip)
        base, names = plan.base, plan.names
        if asked.baseline_model is not None:
            base = evaluate(asked.baseline_model, names, settings, progress=progress)
            names = base["tasks"]
        report = evaluate(path, names or (base["tasks"] if base else None), settings, progress=progress)
        if base is not None:
            try:
                check_comparable(report, base, str(plan.baseline or asked.baseline_model))
            except DataError as exc:
                if not plan.implicit:
                    raise
                on_skip(str(exc))
                base = None
        if base is not None:
            report["baseline"] = {k: base.get(k) for k in ("model", "scheme", "results", "sparsity")}
            report["comparison"] = compare(report, base)
            report["gate"] = {"max_ppl_increase": plan.thresholds.max_ppl_increase,
                              "max_acc_drop": plan.thresholds.max_acc_drop,
                              "failures": gate(report, report["comparison"], plan.thresholds)}
    report["warnings"] = list(notes)
    return report


def _plan(path: str, asked: Comparison, on_skip: Callable[[str], None]) -> _Plan:
    """The tasks, the baseline report and the limits of a run (see the module docstring)."""
    from bitnet_convert.evaluation.evaluate import resolve_tasks
    from bitnet_convert.recipe import load_recipe

    model = resolve_model_path(path)
    stored = model / "recipe.yaml"
    spec = load_recipe(asked.recipe if asked.recipe is not None else stored if stored.is_file() else None).eval
    names = [t.strip() for t in asked.tasks.split(",") if t.strip()] if asked.tasks else spec.tasks
    if names:
        resolve_tasks(names)  # an unknown name fails here, before any model or data is loaded
    baseline = asked.baseline
    implicit = baseline is None and asked.baseline_model is None and spec.baseline is not None and not asked.no_baseline
    if implicit:
        baseline = Path(spec.baseline)
        if not baseline.is_absolute() and not baseline.exists() and (REPO_ROOT / baseline).is_file():
            baseline = REPO_ROOT / baseline  # a shipped baseline, named relative to the checkout
        if not baseline.exists():
            warn(f"not comparing with the recipe's baseline {spec.baseline}: no such file here")
            baseline, implicit = None, False
    thresholds = Thresholds(
        _limits(asked.max_ppl_increase, spec.max_ppl_increase if implicit else None, "--max-ppl-increase"),
        _limits(asked.max_acc_drop, spec.max_acc_drop if implicit else None, "--max-acc-drop"),
    )
    if thresholds and baseline is None and asked.baseline_model is None:
        raise DataError("the gate limits need a baseline: add --baseline REPORT.json or --baseline-model DIR")
    base = load_report(baseline) if baseline is not None else None
    if base is not None and implicit and of_another_model(base, model):
        warn(f"not comparing with the recipe's baseline {baseline}: it was measured on another model "
             f"({base.get('model')}), not on '{path}' (give --baseline or --baseline-model for this model)")
        base = None
    if base is not None and names and sorted(base.get("tasks", [])) != sorted(names):
        mismatch = (f"{baseline}: baseline was measured on tasks {', '.join(base.get('tasks', []))}, this run "
                    f"asks for {', '.join(names)}; evaluate both with the same --tasks")
        if not implicit:
            raise DataError(mismatch)
        on_skip(mismatch)
        base = None
    return _Plan(names, baseline, base, implicit, thresholds)


def _limits(cli: list[str] | None, from_recipe, option: str) -> dict[str, float]:
    """Limits from the command line when given there, else from the recipe."""
    return parse_threshold(cli, option) if cli else parse_threshold(from_recipe, option)


def of_another_model(report: dict, model: Path) -> bool:
    """Whether an eval report was measured on another model than ``model`` (or its conversions): another tokenizer
    (the fingerprint the report records) or another shape (the architecture signature the report records, else
    that of the model directory it names, when that exists here); for a report with neither, by whether it names
    the built-in reference model."""
    if report.get("tokenizer") and report["tokenizer"] != tokenizer_fingerprint(model):
        return True
    shape = report.get("architecture")
    if shape is None and report.get("model"):
        named = Path(str(report["model"]))
        for where in (named, REPO_ROOT / named):
            if (where / "config.json").is_file():
                shape = architecture_signature(where)
                break
    if shape is not None and shape != architecture_signature(model):
        return True
    if report.get("tokenizer"):
        return False
    named = str(report.get("model", "")).rstrip("/")
    recipe = report.get("recipe") or {}
    of_reference = named == "builtin:reference" or named.endswith("eval/reference/model") or (
        recipe.get("model") == "builtin:reference")
    return of_reference and not uses_reference_tokenizer(model)
