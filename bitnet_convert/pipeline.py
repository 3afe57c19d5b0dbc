"""The conversion, start to end: checkpoint → quantized model → calibration statistics → export.

Each step is one call; :func:`run` is the whole pipeline in one screen.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitnet_convert import __version__
from bitnet_convert.calibration.auto import choose_precision
from bitnet_convert.calibration.report import write_report
from bitnet_convert.calibration.statistics import (
    activation_stats,
    calibration_and_stats,
    memory_guard,
    sequential_calibration,
)
from bitnet_convert.errors import BitNetConvertError, DataError, OutputError, RecipeError
from bitnet_convert.io.checkpoint import BUILTIN_MODELS, Checkpoint, open_checkpoint
from bitnet_convert.io.data import (
    BUILTIN_DATA,
    checked_token_stream,
    describe_source,
    sample_windows,
    warn_builtin_data,
    warn_no_bos,
    warn_positions,
)
from bitnet_convert.io.export import (
    atomic_directory,
    check_output,
    export,
    export_dtype_name,
    export_layout,
    output_lock,
    scale_convention,
)
from bitnet_convert.io.families import Role
from bitnet_convert.io.load import load_tokenizer, require_b158
from bitnet_convert.notes import collect, warn
from bitnet_convert.progress import SILENT, Progress
from bitnet_convert.quant.schemes import ActivationSpec, swiglu_note
from bitnet_convert.recipe import Recipe, load_recipe
from bitnet_convert.recover import distill as kd
from bitnet_convert.recover.base import METHODS, NO_BOS, OWN_TEXT, Context, check_state_dirs
from bitnet_convert.runtime import distributed
from bitnet_convert.runtime.devices import device_name, resolve_device
from bitnet_convert.runtime.modeling import DTYPES, build_model, quant_linears, set_input_spec


@dataclass
class Conversion:
    """What :func:`run` produced: the output directory, the report written there, and the model in memory."""

    output: Path
    report: dict
    model: torch.nn.Module = field(repr=False)


def quantize(recipe: str | Path | Recipe | None = None, *, progress: Progress = SILENT, **overrides: Any) -> Conversion:
    """Convert a model as ``recipe`` says. Keyword overrides name recipe fields, ``__`` for nesting:
    ``quantize("recipes/a48.yaml", model="path/to/ckpt", output="out", calibration__samples=4)``."""
    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    origins = {key.replace("__", "."): f"keyword {key}" for key in overrides}
    if isinstance(recipe, Recipe):
        source = recipe.source
        recipe = load_recipe(None, {**recipe.model_dump(mode="json"), **dotted}, origins)
        recipe._source = source
    else:
        recipe = load_recipe(recipe, dotted, origins)
    return run(recipe, progress)


def run(recipe: Recipe, progress: Progress = SILENT) -> Conversion:
    """Run the conversion ``recipe`` describes and write its output directory.

    The output is checked (creatable, not overlapping an input, ``overwrite``) and locked before any work;
    warnings about silent degradations are shown as they happen and listed in the report (``warnings``). Under
    ``torchrun`` every process converts and recovers (data-parallel, :mod:`bitnet_convert.runtime.distributed`) and
    rank 0 alone checks, locks and writes the output; the others show no progress and return once it is written."""
    with _session(recipe, recipe.output, recipe.overwrite) as (device, warnings):
        return _run(recipe, progress if distributed.is_writer() else SILENT, warnings, device)


@contextmanager
def _session(recipe: Recipe, output: Path, overwrite: bool) -> Iterator[tuple[torch.device, list[str]]]:
    """The recipe's device, the ``torchrun`` process group when launched under it, the output checked and locked
    (by rank 0, its errors raised everywhere), and the warnings collected: ``(device, warnings)``."""
    device = resolve_device(recipe.device, recipe.origin("device"))
    created = distributed.init(device)
    try:
        with ExitStack() as stack:
            def claim() -> None:
                check_output(output, overwrite, input_paths(recipe))
                stack.enter_context(output_lock(output))
                check_output(output, overwrite)  # again: taking the lock may have restored a killed run's

            on_writer(claim)
            yield device, stack.enter_context(collect())
    finally:
        if created:
            distributed.shutdown()


def on_writer(check: Callable[[], None]) -> None:
    """Run ``check`` in rank 0 alone (it reads and locks where the output goes) and raise its user error in every
    process, so that no process waits at a collective for one that stopped (one process: just ``check()``)."""
    failure = None
    if distributed.is_writer():
        try:
            check()
        except BitNetConvertError as exc:
            failure = exc
    message = distributed.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise OutputError(message)


def input_paths(recipe: Recipe) -> list[str]:
    """The local files and directories a conversion reads (the output may not overlap any of them)."""
    distill = recipe.recovery.distill
    given = [recipe.model, recipe.calibration.data, recipe.distill_data()[0],
             distill.teacher if distill is not None else None, recipe.source]
    return [str(g) for g in given if g is not None and str(g) not in BUILTIN_MODELS and str(g) not in BUILTIN_DATA]


@dataclass
class _Run:
    """One conversion's state as its steps fill it in (:func:`_run`)."""

    recipe: Recipe
    progress: Progress
    warnings: list[str]
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    data_used: dict[str, dict] = field(default_factory=dict)
    #: the recovery stages' report sections, by stage
    sections: dict[str, dict] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    calibration: torch.Tensor | None = None
    model: torch.nn.Module | None = None
    roles: dict[Role, ActivationSpec] = field(default_factory=dict)
    #: which down_proj treatment a48 chose for a SwiGLU model, said in the report and by the CLI
    ffn_note: str | None = None
    #: the calibration report's per-linear details, the final model's activation statistics
    details: Any = None
    stats: dict | None = None
    #: per-linear activation specs (the recipe's, then the auto precision choice's) and the record of that choice
    overrides: dict[str, ActivationSpec] = field(default_factory=dict)
    choice: dict | None = None

    def guarded(self):
        """An out-of-memory error in a calibration pass names the knobs."""
        spec = self.recipe.calibration
        return memory_guard(spec.samples, spec.seq_len, spec.batch_size)


def _run(recipe: Recipe, progress: Progress, warnings: list[str], device: torch.device) -> Conversion:
    run = _Run(recipe, progress, warnings, device, overrides=dict(recipe.scheme.linears))
    _open(run)
    _quantize(run)
    _calibration_report(run)
    _auto_precision(run)
    context = Context(run.model, run.checkpoint, recipe, run.calibration, device, progress, run.data_used)
    for key in recipe.recovery.order_of_stages():  # the recovery stages, in the recipe's order
        with _timed(run.timings, key):
            run.sections[key] = context.run(METHODS[key])
    _final_statistics(run)
    _write_output(run)
    # the other processes return the report rank 0 wrote
    written = distributed.broadcast_object(json_report(recipe.output) if distributed.is_writer() else None)
    return Conversion(output=recipe.output, report=written, model=run.model)


def _open(run: _Run) -> None:
    """Open the checkpoint and check everything that can fail before any work: the input, the output, the
    training states, the calibration data, the teacher."""
    recipe = run.recipe
    with _timed(run.timings, "open"), run.progress.stage("Open checkpoint"):
        checkpoint = run.checkpoint = open_checkpoint(recipe.model)
        require_b158(checkpoint, recipe.origin("model"), recipe.scheme.preset)
        on_writer(lambda: check_output(recipe.output, recipe.overwrite, [checkpoint.path]))
        on_writer(lambda: check_state_dirs(recipe))
        run.calibration = _calibration_windows(recipe, checkpoint, run.data_used)
        if recipe.recovery.distill is not None:  # a teacher that cannot teach fails before any work
            kd.teacher_checkpoint(checkpoint, recipe.recovery.distill)
    if run.calibration is not None:
        _check_batches(recipe.calibration, -(-run.calibration.shape[0] // recipe.calibration.batch_size))


def _quantize(run: _Run) -> None:
    """Build the quantized model under the recipe's scheme resolved for this model."""
    recipe, checkpoint = run.recipe, run.checkpoint
    hidden_act = checkpoint.transformers_config().hidden_act
    run.roles = recipe.scheme.resolved(hidden_act)
    run.ffn_note = swiglu_note(recipe.scheme.preset, hidden_act) if "down" not in recipe.scheme.roles else None
    stage = run.progress.stage("Quantize linears", len(checkpoint.linear_names()))
    with _timed(run.timings, "quantize"), stage as advance:
        run.model = build_model(checkpoint, run.roles, DTYPES[recipe.dtype], on_linear=advance,
                                attention=recipe.scheme.attention, overrides=recipe.scheme.linears)


def _changes_after_report(recipe: Recipe) -> bool:
    """Whether anything changes the model after the calibration report (else the report's pass also gives the
    final model's statistics)."""
    return recipe.scheme.auto is not None or bool(recipe.recovery.order_of_stages())


def _calibration_report(run: _Run) -> None:
    """The per-linear calibration report (and, when nothing changes the model after it, the final statistics),
    one decoder block at a time on the device."""
    recipe, spec = run.recipe, run.recipe.calibration
    if run.calibration is None or not (spec.report or recipe.scheme.auto is not None):
        return
    changes = _changes_after_report(recipe)
    stage = run.progress.stage("Calibration report" + ("" if changes else " and statistics"),
                               len(run.model.model.layers))
    with run.guarded(), _timed(run.timings, "calibration_report"), stage as step:
        run.details, run.stats = calibration_and_stats(run.model, run.calibration, spec.batch_size, step,
                                                       sparsity=not changes, device=run.device)


def _auto_precision(run: _Run) -> None:
    """``scheme.auto``: promote the linears the calibration report finds worst (:func:`choose_precision`)."""
    auto = run.recipe.scheme.auto
    if auto is None:
        return
    linears = quant_linears(run.model)
    chosen, run.choice = choose_precision(run.details, linears, auto.max_share, auto.max_mean_bits,
                                          auto.static_o_threshold)
    for name, linear_spec in chosen.items():
        set_input_spec(linears[name], linear_spec)
    run.overrides.update(chosen)


def _final_statistics(run: _Run) -> None:
    """The final model's activation statistics on the calibration windows, unless the report's pass gave them."""
    if run.calibration is None or run.stats is not None:
        return
    spec = run.recipe.calibration
    stage = run.progress.stage("Calibration statistics", len(run.model.model.layers))
    with run.guarded(), _timed(run.timings, "calibrate"), stage as advance:
        run.stats = activation_stats(run.model, run.calibration, spec.batch_size, on_batch=advance,
                                     device=run.device)


def _write_output(run: _Run) -> None:
    """Export (rank 0 alone) with the conversion report and the calibration report, then clean the stages up."""
    recipe, checkpoint = run.recipe, run.checkpoint
    scale_convention(run.model, export_layout(recipe, checkpoint))
    if not distributed.is_writer():
        return
    qwt = run.sections.get("qwt")
    with _timed(run.timings, "export"), run.progress.stage("Export"):
        export(run.model, checkpoint, recipe, roles=run.roles, overrides=run.overrides,
               qwt=None if qwt is None else {k: qwt[k] for k in ("form", "rank", "layers")},
               report=lambda files: _conversion_report(run, files),
               extra=(lambda directory: _write_calibration(run, directory)) if recipe.calibration.report else None,
               inputs=input_paths(recipe))
    for key in recipe.recovery.order_of_stages():
        METHODS[key].cleanup(recipe)


def _write_calibration(run: _Run, directory: Path) -> None:
    if run.details is not None:
        write_report(run.details, directory / "calibration", _calibration_meta(run.recipe, "whole model"))


def _conversion_report(run: _Run, files: list[Path]) -> dict:
    result = conversion_report(run.model, run.checkpoint, run.recipe, files, run.timings, run.stats, run.roles)
    result["device"] = device_name(run.device)
    if distributed.world_size() > 1:
        result["processes"] = distributed.world_size()
    if run.ffn_note is not None:
        result["ffn_note"] = run.ffn_note
    if run.choice is not None:
        result["auto"] = run.choice
    result.update(run.sections)
    result["data"] = run.data_used
    result["warnings"] = list(run.warnings)
    return result


def _check_batches(spec, batches: int) -> None:
    """Under ``torchrun`` each process runs whole calibration batches: there must be one for each."""
    if batches < distributed.world_size():
        raise RecipeError(f"calibration: {batches} batch(es) of calibration.batch_size={spec.batch_size} for "
                          f"{distributed.world_size()} processes; each process needs one: raise calibration.samples "
                          "or lower calibration.batch_size")


def calibrate(recipe: Recipe, output: Path, overwrite: bool = False, progress: Progress = SILENT) -> Path:
    """Calibrate ``recipe``'s model layer by layer (peak memory: one layer + the calibration activations) and
    write ``calibration.json``, ``calibration.md`` and the plots into ``output`` (atomically). The report records
    the data used (``data``) and the run's warnings (``warnings``)."""
    with _session(recipe, output, overwrite) as (device, warnings):
        return _calibrate(recipe, output, overwrite, progress if distributed.is_writer() else SILENT, warnings,
                          device)


def _calibrate(recipe: Recipe, output: Path, overwrite: bool, progress: Progress, warnings: list[str],
               device: torch.device) -> Path:
    data_used: dict[str, dict] = {}
    with progress.stage("Open checkpoint"):
        checkpoint = open_checkpoint(recipe.model)
        require_b158(checkpoint, recipe.origin("model"), recipe.scheme.preset)
        on_writer(lambda: check_output(output, overwrite, [checkpoint.path]))
        ids = _calibration_windows(recipe, checkpoint, data_used)
    if ids is None:
        raise DataError("calibration.samples is 0: there is nothing to calibrate on")
    spec = recipe.calibration
    _check_batches(spec, -(-ids.shape[0] // spec.batch_size))
    layers = checkpoint.transformers_config().num_hidden_layers
    stage = progress.stage("Calibrate, layer by layer", layers)
    with memory_guard(spec.samples, spec.seq_len, spec.batch_size), stage as advance:
        roles = recipe.scheme.resolved(checkpoint.transformers_config().hidden_act)
        result = sequential_calibration(checkpoint, roles, ids, spec.batch_size,
                                        attention=recipe.scheme.attention, on_layer=advance,
                                        overrides=recipe.scheme.linears, device=device)
    if distributed.is_writer():
        with progress.stage("Write report"), atomic_directory(output, overwrite, input_paths(recipe)) as tmp:
            write_report(result, tmp, {**_calibration_meta(recipe, "layer by layer"), "data": data_used,
                                       "device": device_name(device), "warnings": list(warnings)})
    distributed.barrier()
    return output


def _calibration_meta(recipe: Recipe, mode: str) -> dict:
    spec = recipe.calibration
    return {"model": recipe.model, "scheme": recipe.scheme.preset, "mode": mode, "data": spec.data,
            "split": spec.split, "samples": spec.samples, "seq_len": spec.seq_len, "seed": recipe.seed,
            "bitnet_convert_version": __version__}


def _calibration_windows(recipe: Recipe, checkpoint: Checkpoint, data_used: dict | None = None) -> torch.Tensor | None:
    spec = recipe.calibration
    if spec.samples == 0:
        return None
    tokenizer = load_tokenizer(checkpoint.path)
    warn_builtin_data(checkpoint.path, spec.data, "calibration.data", OWN_TEXT.format("calibration.data"))
    stream = checked_token_stream(checkpoint, tokenizer, spec.data, spec.split, spec.text_field, spec.txt_documents)
    source = describe_source("calibration.data", spec.data, spec.split)
    warn_positions(checkpoint.config, spec.seq_len, f"calibration.seq_len={spec.seq_len}")
    ids = sample_windows(stream, spec.samples, spec.seq_len, recipe.seed, tokenizer.bos_token_id, source,
                         "calibration.seq_len")
    if ids.shape[0] < spec.samples:
        warn(f"{source} holds only {ids.shape[0]} windows of {spec.seq_len} tokens ({ids.numel():,} tokens); "
             f"calibration.samples asks for {spec.samples}: calibrating on {ids.shape[0]}")
    warn_no_bos(tokenizer, checkpoint.path, NO_BOS)
    if data_used is not None:
        data_used["calibration"] = {"data": spec.data, "split": spec.split, "windows": int(ids.shape[0]),
                                    "tokens": int(ids.numel())}
    return ids


def conversion_report(
    model: torch.nn.Module,
    checkpoint: Checkpoint,
    recipe: Recipe,
    files: list[Path],
    timings: dict[str, float],
    stats: dict | None,
    roles: dict[Role, ActivationSpec],
) -> dict:
    """The input's family and layout, the activation spec per role (``roles``), parameters per precision, bits
    per weight of the packed linears, sizes, time and peak memory."""
    linears = quant_linears(model)
    ternary = sum(m.in_features * m.out_features for m in linears.values())
    packed_bytes = sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in linears.values())
    high_precision = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return {
        "bitnet_convert_version": __version__,
        "model": recipe.model,
        "input_family": checkpoint.family.name,
        "input_layout": checkpoint.layout.value,
        "scheme": recipe.scheme.preset,
        "activations": {role: spec.describe() for role, spec in roles.items()},
        "attention": recipe.scheme.attention.describe(),
        "parameters": {
            "ternary": ternary,
            "high_precision": high_precision,
            "high_precision_dtype": export_dtype_name(checkpoint, recipe.export.dtype),
        },
        "packed_linears": {"bytes": packed_bytes, "bits_per_weight": 8 * packed_bytes / ternary},
        "files": {file.name: file.stat().st_size for file in files},
        "output_bytes": sum(file.stat().st_size for file in files),
        "input_bytes": checkpoint.size_bytes(),
        "time_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "calibration": stats,
    }


def json_report(output: Path) -> dict:
    return json.loads((output / "conversion_report.json").read_text())


class _timed:
    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = time.perf_counter() - self.start
