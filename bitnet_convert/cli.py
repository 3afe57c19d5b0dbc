"""The ``bitnet-convert`` command: a thin layer over the Python API (parse, call, print)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from bitnet_convert.errors import BitNetConvertError

app = typer.Typer(
    name="bitnet-convert",
    help="Convert BitNet b1.58 models to BitNet a4.8 (4-bit activations, sparse 8-bit intermediates).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: …]" must not be read as rich markup
)
console = Console(stderr=True)
out = Console()


class _WarningLines(logging.Handler):
    """bitnet-convert's warnings (:mod:`bitnet_convert.notes`) as ``warning: …`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if _quiet():  # under torchrun, rank 0 speaks for every process
            return
        console.print(f"[bold yellow]warning:[/] {_escape(record.getMessage())}", highlight=False, soft_wrap=True)


def _quiet() -> bool:
    """Whether this process is one of several ``torchrun`` processes other than rank 0 (which prints)."""
    from bitnet_convert.runtime.distributed import is_writer

    return not is_writer()


_WARNINGS = _WarningLines(logging.WARNING)


@app.callback()
def _setup(ctx: typer.Context) -> None:
    """Console setup for the command: warnings as one line each; whole lines when stdout is not a terminal.
    Undone when the command ends, so the Python API used in the same process is unaffected."""
    logger = logging.getLogger("bitnet_convert")
    if _WARNINGS not in logger.handlers:
        logger.addHandler(_WARNINGS)
    propagate = logger.propagate
    logger.propagate = False
    # bound to this command's stderr: lm-eval's own bars are redirected during evaluation, our lines are not
    console.file = sys.stderr
    out.width = None if out.is_terminal else 10_000  # piped or logged: no table cut to 80 columns

    def undo() -> None:
        logger.removeHandler(_WARNINGS)
        logger.propagate = propagate
        console.file = None
        out.width = None

    ctx.call_on_close(undo)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class RichProgress:
    """:class:`bitnet_convert.progress.Progress` rendered with rich: one bar per stage."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[label]}", style="dim"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=_quiet(),
        )

    def __enter__(self) -> RichProgress:
        return self  # the display starts with the first stage: an error before any leaves no blank line behind

    def __exit__(self, *exc: object) -> None:
        if self.bar.live.is_started:
            self.bar.stop()

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator:
        if not self.bar.live.is_started:
            self.bar.start()
        task = self.bar.add_task(description, total=total or 1, label="")

        def advance(label: str = "") -> None:
            self.bar.update(task, advance=1, label=label)

        try:
            yield advance
        except BaseException:
            self.bar.remove_task(task)  # a failed stage leaves only the error message behind
            raise
        self.bar.update(task, completed=total or 1, label="")


def _fail(message: str, every_process: bool = False) -> None:
    if every_process or not _quiet():
        console.print(f"[bold red]error:[/] {_escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except BitNetConvertError as exc:
        from bitnet_convert.runtime.distributed import DistributedError

        # a failed wait on the others is this process's own news: the group that lets rank 0 speak is gone
        _fail(str(exc), every_process=isinstance(exc, DistributedError))
    except KeyboardInterrupt as exc:
        console.print(f"interrupted: {_escape(str(exc))}" if str(exc) else "interrupted", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(code=130) from None


def _check_device(device: str) -> str:
    """``--device`` resolved on this machine (``auto`` → ``cuda`` or ``cpu``); one line, exit 2, before any work
    when it cannot be used here (:func:`bitnet_convert.runtime.devices.resolve_device`)."""
    from bitnet_convert.runtime.devices import resolve_device

    return str(resolve_device(device))


def _check_kv_bits(kv_bits: int | None, bos_bits: int | None) -> None:
    """``--bos-bits`` of ``generate``/``serve`` needs ``--kv-bits`` (one line, exit 2)."""
    if bos_bits is not None and kv_bits is None:
        _fail("--bos-bits sets the first position's bits of a packed cache; give --kv-bits too")


BackendOption = Annotated[
    str,
    typer.Option(help="native (integer CPU kernels), reference (torch fake-quantization) or auto (native when its "
                 "kernels build here, else reference with a warning)."),
]
LmHeadOption = Annotated[
    str,
    typer.Option(help="auto (int8 on the native backend, stored on the reference one), stored (the export's "
                 "dtype) or int8 (per-row scale, half the bytes read per token; the same numbers on both backends; "
                 "its perplexity cost is in docs/native.md)."),
]
KvBitsOption = Annotated[
    int | None,
    typer.Option(min=2, max=8, help="Store K/V in a packed cache of this many bits [default: the model's "
                 "attention spec; a full-precision cache when it sets none]."),
]
BosBitsOption = Annotated[
    int | None, typer.Option(min=2, max=8, help="Bits of the first position's K/V with --kv-bits.")
]
RecipeOption = Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe YAML (recipes/a48.yaml).")]
ModelOption = Annotated[str | None, typer.Option(help="Checkpoint directory, hub id or builtin:reference.")]
CalibrationDataOption = Annotated[
    str | None, typer.Option(help="Calibration text: a .txt/.jsonl file or a hub dataset id.")
]
DeviceOption = Annotated[
    str, typer.Option(help="cpu, cuda, cuda:N or auto (cuda when available, else cpu).")
]
RecipeDeviceOption = Annotated[
    str | None,
    typer.Option(help="Where block-by-block stages and training run: cpu, cuda, cuda:N or auto (recipe key "
                 "device) [default: the recipe's, cpu].")
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override any recipe field: key.path=value (repeatable).")
]


def _recipe_from_options(recipe: Path | None, set_: list[str] | None, **fields: tuple[str, object]):
    """The recipe file with ``--set`` assignments and the named options (``dotted.key=(flag, value)``, value
    ``None`` = not given); an invalid value is reported against the flag or ``--set`` that gave it."""
    from bitnet_convert.recipe import load_recipe, parse_assignment

    overrides, origins = {}, {}
    for item in set_ or []:
        key, value = parse_assignment(item)
        overrides[key], origins[key] = value, f"--set {item}"
    for key, (flag, value) in fields.items():
        if value is not None:
            overrides[key], origins[key] = value, flag
    return load_recipe(recipe, overrides, origins)


@app.command()
def quantize(
    recipe: RecipeOption = None,
    model: ModelOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory.")] = None,
    calibration_data: CalibrationDataOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    device: RecipeDeviceOption = None,
    set_: SetOption = None,
) -> None:
    """Convert a BitNet b1.58 checkpoint as the recipe says and write the packed a4.8 model.

    Data-parallel recovery: torchrun --nproc-per-node N bitnet-convert quantize ... (rank 0 writes)."""
    from bitnet_convert.pipeline import run
    from bitnet_convert.runtime.distributed import is_writer

    with _user_errors():
        fields = {"model": ("--model", model), "output": ("--output", output and str(output)),
                  "calibration.data": ("--calibration-data", calibration_data),
                  "overwrite": ("--overwrite", True if overwrite else None), "device": ("--device", device)}
        resolved = _recipe_from_options(recipe, set_, **fields)
        with RichProgress() as progress:
            result = run(resolved, progress)
    if not is_writer():  # under torchrun, rank 0 prints the summary
        return
    report = result.report
    table = Table(title=f"Converted → {result.output}", show_header=False)
    table.add_row("input", f"{report['input_family']} family, {report['input_layout']} layout")
    table.add_row("scheme", report["scheme"])
    for role, label in report["activations"].items():
        table.add_row(f"  {role} input", label)
    if report.get("ffn_note"):
        table.add_row("  SwiGLU down_proj", report["ffn_note"])
    if report.get("attention", "full precision") != "full precision":
        table.add_row("  attention Q/K/V", report["attention"])
    table.add_row("ternary parameters", f"{report['parameters']['ternary']:,}")
    table.add_row("packed bits / weight", f"{report['packed_linears']['bits_per_weight']:.3f}")
    table.add_row("size", f"{report['input_bytes'] / 1e6:.2f} MB → {report['output_bytes'] / 1e6:.2f} MB")
    if report["calibration"]:
        table.add_row("active parameters", f"{report['calibration']['active_parameter_share']:.1%}")
    if report.get("qwt"):
        qwt = report["qwt"]
        table.add_row("QwT", f"{qwt['form']}, {len(qwt['layers'])} blocks, {qwt['added_parameters']:,} parameters")
    if report.get("blockwise"):
        blocks = report["blockwise"]["blocks"]
        before = sum(b["heldout_error_before"] for b in blocks) / len(blocks)
        after = sum(b["heldout_error_after"] for b in blocks) / len(blocks)
        resumed = report["blockwise"]["resumed_blocks"]
        table.add_row("block-wise recovery", f"{len(report['blockwise']['kept_layers'])}/{len(blocks)} blocks kept, "
                      f"held-out error {before:.4f} → {after:.4f} (mean)" + (f", {resumed} resumed" if resumed else ""))
    if report.get("distill"):
        tuned = report["distill"]
        table.add_row("distillation", f"{tuned['steps']} steps, KL {tuned['loss_first']:.4f} → "
                                      f"{tuned['loss_last10_mean']:.4f} (mean of the last 10)")
    table.add_row("device", report.get("device", "cpu") + (f", {report['processes']} processes"
                                                          if report.get("processes") else ""))
    table.add_row("time", f"{sum(report['time_s'].values()):.1f} s")
    out.print(table)


@app.command()
def calibrate(
    recipe: RecipeOption = None,
    model: ModelOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Report directory [default: <recipe output>-calibration].")
    ] = None,
    calibration_data: CalibrationDataOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report directory.")] = False,
    device: RecipeDeviceOption = None,
    set_: SetOption = None,
) -> None:
    """Measure every linear's inputs layer by layer and write calibration.json, calibration.md and plots."""
    from bitnet_convert.pipeline import calibrate as run_calibration
    from bitnet_convert.runtime.distributed import is_writer

    with _user_errors():
        resolved = _recipe_from_options(recipe, set_, model=("--model", model), device=("--device", device),
                                        **{"calibration.data": ("--calibration-data", calibration_data)})
        target = output or resolved.output.with_name(resolved.output.name + "-calibration")
        with RichProgress() as progress:
            written = run_calibration(resolved, target, overwrite, progress)
    if is_writer():
        out.print(f"calibration report → {written}/calibration.md")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="Checkpoint or converted directory (or a hub id).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a checkpoint's family, layout, scheme, tensor shapes, precisions and sizes (inputs and outputs)."""
    from bitnet_convert.io.checkpoint import open_checkpoint
    from bitnet_convert.io.load import attention_of, scheme_of

    with _user_errors():
        checkpoint = open_checkpoint(path)
        preset, roles = scheme_of(checkpoint)
        attention = attention_of(checkpoint)
        groups: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        for name in checkpoint.names():
            shape = checkpoint.shape_of(name)
            dtype = checkpoint.dtype_of(name)
            pattern = re.sub(r"\.layers\.\d+\.", ".layers.*.", checkpoint.stored_name(name))
            entry = groups[(pattern, "×".join(map(str, shape)), dtype)]
            entry[0] += 1
            entry[1] += checkpoint.nbytes_of(name)
    config = checkpoint.config
    summary = {
        "path": str(checkpoint.path),
        "family": checkpoint.family.name,
        "layout": checkpoint.layout.value,
        "scheme": preset,
        "activations": {role: spec.describe() for role, spec in roles.items()},
        "attention": attention.describe() if attention is not None else "full precision",
        "architecture": {
            k: config.get(k)
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size", "hidden_act", "tie_word_embeddings")
        },
        "files": {f.name: f.stat().st_size for f in checkpoint.files},
        "tensors": [
            {"name": p, "shape": s, "dtype": d, "count": c, "bytes": b} for (p, s, d), (c, b) in groups.items()
        ],
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    head = Table(title=str(checkpoint.path), show_header=False)
    head.add_row("family", f"{summary['family']} ({checkpoint.family.examples})")
    head.add_row("layout", summary["layout"])
    head.add_row("scheme", preset + ("" if checkpoint.a48_spec else " (unconverted input: W1.58A8)"))
    for role, label in summary["activations"].items():
        head.add_row(f"  {role} input", label)
    head.add_row("  attention Q/K/V", summary["attention"])
    for key, value in summary["architecture"].items():
        head.add_row(key, str(value))
    head.add_row("size", f"{sum(summary['files'].values()) / 1e6:.2f} MB in {len(summary['files'])} file(s)")
    out.print(head)
    tensors = Table(Column("tensor", no_wrap=True), "shape", "dtype", "count", "MB")
    for row in summary["tensors"]:
        tensors.add_row(row["name"], row["shape"], row["dtype"], str(row["count"]), f"{row['bytes'] / 1e6:.3f}")
    out.print(tensors)


@app.command()
def perplexity(
    path: Annotated[str, typer.Argument(help="Converted directory, or an input checkpoint (evaluated as b158).")],
    data: Annotated[str, typer.Option(help="builtin:reference, a .txt/.jsonl file or a hub dataset id.")] = (
        "builtin:reference"
    ),
    split: Annotated[str, typer.Option(help="Split of the data.")] = "validation",
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per window.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    scheme: Annotated[
        str | None, typer.Option(help="Evaluate an input checkpoint under this preset (b158, a48, a48-fp4).")
    ] = None,
    txt_documents: Annotated[
        str, typer.Option(help="A .txt file's documents: paragraphs (blank-line separated, newlines kept) or lines.")
    ] = "paragraphs",
    backend: BackendOption = "auto",
    device: DeviceOption = "cpu",
    lm_head: LmHeadOption = "auto",
) -> None:
    """Token-level perplexity on held-out text, over non-overlapping windows."""
    from bitnet_convert.evaluation.evaluate import perplexity_of

    with _user_errors():
        _check_device(device)
        with RichProgress() as progress:
            result = perplexity_of(path, data, split, seq_len=seq_len, batch_size=batch_size, scheme=scheme,
                                   txt_documents=txt_documents, backend=backend, device=device, lm_head=lm_head,
                                   progress=progress)
    no_bos = "" if result["bos"] else ", windows without BOS"
    out.print(f"{result['label']}\t{result['source']}\tperplexity {result['perplexity']:.4f}\t({result['tokens']} "
              f"tokens{no_bos})")


# The options of ``eval`` that take more than a line to say (typer reads them from the annotations).
_TasksOption = Annotated[
    str | None,
    typer.Option(help="Comma-separated built-in reference tasks, task YAML paths or lm-eval task names "
                 "[default: the reference tasks for the reference model, else arc/hellaswag/piqa/winogrande]."),
]
_ReportOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the JSON report here, and the Markdown beside it.")
]
_BaselineOption = Annotated[
    Path | None, typer.Option(help="Compare with this eval report (e.g. eval/baselines/b158.json).")
]
_BaselineModelOption = Annotated[
    str | None, typer.Option(help="Evaluate this model with the same settings first and compare with it.")
]
_PplLimitOption = Annotated[
    list[str] | None,
    typer.Option(help="Fail (exit 1) when a perplexity rises more than PCT percent over the baseline; "
                 "PCT or TASK[:METRIC]=PCT, repeatable."),
]
_AccLimitOption = Annotated[
    list[str] | None,
    typer.Option(help="Fail (exit 1) when an accuracy drops more than POINTS below the baseline; "
                 "POINTS or TASK[:METRIC]=POINTS, repeatable."),
]
_EvalRecipeOption = Annotated[
    Path | None,
    typer.Option("--recipe", "-r", help="Take tasks, baseline and limits from this recipe's eval section "
                 "[default: the recipe.yaml stored in a converted directory]."),
]


@app.command("eval")
def eval_(
    path: Annotated[str, typer.Argument(help="Converted directory, or an input checkpoint (evaluated as b158).")],
    tasks: _TasksOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many documents per task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    num_fewshot: Annotated[int | None, typer.Option(min=0)] = None,
    max_length: Annotated[int | None, typer.Option(min=2, help="Context length (default: the model's).")] = None,
    device: DeviceOption = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    output: _ReportOption = None,
    baseline: _BaselineOption = None,
    baseline_model: _BaselineModelOption = None,
    max_ppl_increase: _PplLimitOption = None,
    max_acc_drop: _AccLimitOption = None,
    recipe: _EvalRecipeOption = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Ignore the baseline and limits of the recipe.")
                           ] = False,
    backend: BackendOption = "auto",
    lm_head: LmHeadOption = "auto",
) -> None:
    """Evaluate the exported (reloaded) model with lm-eval, compare with a baseline, gate on regressions.

    Prints a table; --output writes REPORT.json and REPORT.md. Exit code 1 when a gate limit is crossed.
    """
    from bitnet_convert.evaluation.evaluate import EvalSettings
    from bitnet_convert.evaluation.gate import Comparison, evaluate_and_compare
    from bitnet_convert.evaluation.report import markdown
    from bitnet_convert.io.checkpoint import resolve_model_path

    with _user_errors():
        device = _check_device(device)
        if baseline is not None and baseline_model is not None:
            _fail("give --baseline REPORT.json or --baseline-model DIR, not both")
        if output is not None:
            _check_report_path(output, [resolve_model_path(m) for m in (path, baseline_model) if m is not None])
        comparison = Comparison(tasks, recipe, baseline, baseline_model, max_ppl_increase, max_acc_drop, no_baseline)
        settings = EvalSettings(limit, batch_size, num_fewshot, max_length, device, seed, backend, lm_head)
        with RichProgress() as progress:
            report = evaluate_and_compare(path, comparison, settings, progress, on_skip=_skip_recipe_baseline)
    _print_report(report)
    if output is not None:
        with _user_errors():
            _write_atomic(output, json.dumps(report, indent=2) + "\n")
            _write_atomic(output.with_suffix(".md"), markdown(report))
    failures = report.get("gate", {}).get("failures")
    if failures:
        console.print(f"[bold red]gate failed:[/] {_escape('; '.join(failures))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    limits = report.get("gate") or {}
    if limits.get("max_ppl_increase") or limits.get("max_acc_drop"):
        out.print("gate passed")


def _skip_recipe_baseline(reason: str) -> None:
    console.print(f"note: not comparing with the recipe's baseline: {_escape(reason)}", highlight=False,
                  soft_wrap=True)


@app.command()
def generate(
    path: Annotated[str, typer.Argument(help="Converted directory, or an input checkpoint (run as b158).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    kv_bits: KvBitsOption = None,
    bos_bits: BosBitsOption = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0.01)] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.01, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampler (the global RNG is left as it was).")] = 0,
    device: DeviceOption = "cpu",
    backend: BackendOption = "auto",
    lm_head: LmHeadOption = "auto",
) -> None:
    """Continue a prompt with the converted model, streaming tokens; K/V in a packed low-bit cache."""
    import time

    import torch
    from transformers import TextStreamer

    from bitnet_convert.io.load import backend_for_device, load, load_tokenizer
    from bitnet_convert.quant.kv import PackedKVCache, cache_nbytes, generation_cache

    with _user_errors():
        device = _check_device(device)
        _check_kv_bits(kv_bits, bos_bits)
        model = load(path, backend=backend_for_device(backend, device), lm_head=lm_head).to(device)
        tokenizer = load_tokenizer(path)
    cache, note = generation_cache(model, kv_bits, bos_bits)
    if note:
        console.print(f"note: {note}")
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)

    class Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.print(text, end="" if not stream_end else "\n", highlight=False, soft_wrap=True)

    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        result = model.generate(ids, max_new_tokens=max_new_tokens, cache=cache,
                                streamer=Stream(tokenizer, skip_special_tokens=True),
                                pad_token_id=tokenizer.pad_token_id, **options)
    seconds = time.perf_counter() - start
    sys.stdout.flush()  # the streamed text, before the summary on stderr
    new = result.shape[1] - ids.shape[1]
    kind = (f"packed {cache.k_bits}-bit K/V" + (f", BOS {cache.bos_bits}-bit" if cache.bos_bits else "")
            if isinstance(cache, PackedKVCache) else "full-precision K/V")
    size = cache_nbytes(cache)
    console.print(f"{new} tokens in {seconds:.2f} s ({new / seconds:.1f} tokens/s); cache: {kind}, "
                  f"{size:,} bytes for {cache.get_seq_length()} positions", highlight=False, soft_wrap=True)


@app.command()
def serve(
    path: Annotated[str, typer.Argument(help="Converted directory, or an input checkpoint (run as b158).")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together (continuous batching).")] = 8,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait for a place in the batch; more get 429.")
    ] = 64,
    context: Annotated[
        int | None,
        typer.Option(min=1, help="Prompt + completion tokens per request [default: the model's "
                     "max_position_embeddings].")
    ] = None,
    kv_bits: KvBitsOption = None,
    bos_bits: BosBitsOption = None,
    model_name: Annotated[
        str | None, typer.Option(help="The model's id in the API [default: the directory's name].")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Threads of the model's work, fixed [default: torch's count, lowered while other "
                     "processes keep cores busy (native backend)]."),
    ] = None,
    chat_template: Annotated[
        Path | None, typer.Option(help="A Jinja chat template file for /v1/chat/completions [default: the "
                                  "tokenizer's].")
    ] = None,
    device: DeviceOption = "cpu",
    backend: BackendOption = "auto",
    lm_head: LmHeadOption = "auto",
) -> None:
    """Serve the model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health,
    /metrics), concurrent requests decoded together."""
    import socket

    import torch
    import uvicorn

    from bitnet_convert.io.load import backend_for_device, load, load_tokenizer
    from bitnet_convert.runtime.threads import set_thread_policy
    from bitnet_convert.serve.api import ServerConfig, create_app
    from bitnet_convert.serve.engine import Engine

    with _user_errors():
        device = _check_device(device)
        _check_kv_bits(kv_bits, bos_bits)
        try:  # bound first, so that a taken port is a one-line error before the model loads, and --port 0 can
            # print the port it got
            sock = socket.create_server((host, port))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
            _fail(f"cannot listen on {host}:{port} ({reason})")
        template = None
        if chat_template is not None:
            try:
                template = chat_template.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                _fail(f"--chat-template '{chat_template}' could not be read as UTF-8 text ({exc})")
        model = load(path, backend=backend_for_device(backend, device), lm_head=lm_head).to(device).eval()
        tokenizer = load_tokenizer(path)
    if template is not None:  # a template that cannot render a plain conversation is an error now, not per request
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False,
                                          add_generation_prompt=True)
        except Exception as exc:
            _fail(f"--chat-template '{chat_template}' does not render a conversation: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}")
    if threads is not None:
        torch.set_num_threads(threads)
        set_thread_policy(model, "fixed")
    limit = getattr(model.config, "max_position_embeddings", None)
    if context is not None and limit is not None and context > limit:
        _fail(f"--context {context} is beyond the model's max_position_embeddings ({limit})")
    name = model_name or Path(path.rstrip("/")).name or path
    config = ServerConfig(model_id=name, context=context or limit or 2048, chat_template=template)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, kv_bits=kv_bits,
                    bos_bits=bos_bits).start()
    requests = logging.getLogger("bitnet_convert.serve")
    lines = logging.StreamHandler(sys.stderr)
    lines.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    requests.addHandler(lines)
    requests.setLevel(logging.INFO)
    bound = sock.getsockname()[1]
    console.print(f"serving '{name}' ({model.config.num_hidden_layers} layers) on http://{host}:{bound}/v1 with up to "
                  f"{max_batch} sequences per batch and a context of {config.context} tokens", highlight=False,
                  soft_wrap=True)
    try:
        # Ctrl-C: requests in flight get GRACE_S to finish, then their connections close and the engine stops
        server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="info",
                                               timeout_graceful_shutdown=GRACE_S))
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
        requests.removeHandler(lines)


#: Seconds ``serve`` lets requests in flight finish after Ctrl-C.
GRACE_S = 5


def _print_report(report: dict) -> None:
    comparison = report.get("comparison")
    columns = [Column("task", no_wrap=True), Column("metric", no_wrap=True), "value"]
    columns += ["baseline", "delta", "recovery"] if comparison else []
    title = f"{report['model']} ({report['scheme']})"
    if comparison:
        title += f" vs {report['baseline']['model']} ({report['baseline']['scheme']})"
    table = Table(*columns, title=title)
    for task, metrics in report["results"].items():
        for metric, value in metrics.items():
            row = [task, metric, f"{value:.4f}"]
            if comparison:
                c = comparison[task][metric]
                row += [f"{c['baseline']:.4f}", f"{c['delta']:+.4f}", f"{c['recovery']:.4f}"]
            table.add_row(*row)
    out.print(table)
    stats = report.get("sparsity")
    if stats:
        shares = ", ".join(f"{kind} {share:.1%}" for kind, share in stats["sparsity"].items())
        out.print(f"zero inputs on the evaluation data ({stats['tokens']:,} tokens): {shares}; "
                  f"active parameters {stats['active_parameter_share']:.1%}")


def _check_report_path(output: Path, models: list[Path]) -> None:
    """Fail before any work when the report (and its Markdown sibling) cannot be written at ``output``, or would
    replace a file of an evaluated model."""
    from bitnet_convert.errors import OutputError
    from bitnet_convert.io.export import check_creatable, is_checkpoint_file

    for target in (output, output.with_suffix(".md")):
        if target.is_dir():
            raise OutputError(f"--output '{target}' is a directory; expected a report file name such as eval.json")
        for model in models:
            if target.exists() and target.resolve().parent == model.resolve() and is_checkpoint_file(target):
                raise OutputError(f"--output '{target}' would replace a file of the model '{model}'; choose "
                                  "another report name")
    check_creatable(output, "--output")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`~bitnet_convert.io.export.atomic_file`): a failure leaves no
    partial file, and is one line."""
    from bitnet_convert.errors import OutputError
    from bitnet_convert.io.export import atomic_file

    try:
        with atomic_file(path) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise OutputError(f"report '{path}' could not be written ({exc.strerror or exc})") from None


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
