"""Evaluation of a model: perplexity on held-out text, and lm-eval tasks (local YAMLs or hub task names)."""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as tF
import yaml

from bitnet_convert.calibration.statistics import activation_stats
from bitnet_convert.errors import DataError
from bitnet_convert.evaluation.report import REPORT_FORMAT
from bitnet_convert.io.checkpoint import (
    REPO_ROOT,
    Checkpoint,
    architecture_signature,
    open_checkpoint,
    tokenizer_builtin,
    tokenizer_fingerprint,
)
from bitnet_convert.io.data import token_stream, warn_no_bos, windows
from bitnet_convert.io.load import (
    attention_of,
    backend_for_device,
    load_tokenizer,
    open_model,
    resolve_lm_head,
    resolve_scheme,
)
from bitnet_convert.progress import SILENT, Progress
from bitnet_convert.runtime.devices import module_device


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_windows: torch.Tensor,
    batch_size: int = 8,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """Token-level perplexity over windows ``[n, seq_len]`` (see :func:`bitnet_convert.io.data.windows`) on the
    device of ``model``; every token after the first of each window is predicted. Returns
    ``{"perplexity", "nll", "tokens"}``."""
    total, count = 0.0, 0
    device = module_device(model)
    for start in range(0, token_windows.shape[0], batch_size):
        batch = token_windows[start : start + batch_size].to(device)
        logits = model(batch).logits.float()
        nll = tF.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
        if on_batch is not None:
            on_batch()
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


def perplexity_of(path: str | Path, data: str = "builtin:reference", split: str = "validation", *,
                  seq_len: int = 256, batch_size: int = 8, scheme: str | None = None,
                  txt_documents: str = "paragraphs", backend: str = "auto", device: str = "cpu",
                  lm_head: str = "auto", progress: Progress = SILENT) -> dict:
    """Token-level perplexity of the model stored at ``path`` on held-out text (``bitnet-convert perplexity``):
    :func:`perplexity` over the non-overlapping ``seq_len`` windows of ``data``/``split``
    (:func:`bitnet_convert.io.data.load_texts`), the model built by :func:`~bitnet_convert.io.load.open_model` under the
    scheme it declares or the preset ``scheme``, its lm_head as ``lm_head`` says (:func:`~bitnet_convert.io.load.load`).
    Returns ``{"perplexity", "nll", "tokens", "label", "source",
    "bos"}``: the label names the scheme (and attention), the source the data (a file has no splits), ``bos``
    whether the windows start with BOS. Raises the package's one-line errors for bad input, before any model is
    built."""
    from bitnet_convert.io.data import describe_source, load_texts, warn_builtin_data, warn_positions
    from bitnet_convert.runtime.devices import resolve_device

    device = str(resolve_device(device))
    backend = backend_for_device(backend, device)  # an unknown name or unavailable kernels fail before any work
    lm_head = resolve_lm_head(lm_head, backend)
    checkpoint = open_checkpoint(path)
    resolve_scheme(checkpoint, scheme)  # an unknown preset or an a4.8 model given a preset: refused first
    if txt_documents not in ("paragraphs", "lines"):
        raise DataError(f"--txt-documents '{txt_documents}' is unknown; expected paragraphs or lines")
    warn_builtin_data(checkpoint.path, data, "--data", "give --data FILE with its own held-out text")
    tokenizer = load_tokenizer(checkpoint.path)
    texts = load_texts(data, split, txt_documents=txt_documents)
    batches = windows(token_stream(tokenizer, texts), seq_len, tokenizer.bos_token_id,
                      describe_source("--data", data, split), "--seq-len")
    warn_positions(checkpoint.config, seq_len, f"--seq-len {seq_len}", ", so this perplexity is not the model's")
    warn_no_bos(tokenizer, checkpoint.path, "windows start mid-text, so this perplexity is not comparable with "
                "one measured on windows that start with BOS")
    opened = open_model(checkpoint, backend, scheme, lm_head=lm_head)
    opened.model.to(device)
    label = opened.label() + (f", {lm_head} lm_head" if lm_head != "stored" else "")
    with progress.stage(f"Perplexity ({label})", -(-batches.shape[0] // batch_size)) as advance:
        result = perplexity(opened.model, batches, batch_size, on_batch=advance)
    source = f"{data}:{split}" if not Path(data).expanduser().is_file() else data
    return {**result, "label": label, "source": source, "bos": tokenizer.bos_token_id is not None}


#: Task YAMLs over local data that ship with the project, by the built-in model whose tokenizer and corpus they
#: fit (the defaults for that model and its conversions).
TASKS_DIR = REPO_ROOT / "eval" / "tasks"
BUILTIN_TASKS = {
    "builtin:reference": ("reference_ppl", "reference_agreement", "reference_wordclass"),
    "builtin:reference-text": ("reference_text_ppl",),
}
REFERENCE_TASKS = BUILTIN_TASKS["builtin:reference"]
ALL_BUILTIN_TASKS = tuple(t for names in BUILTIN_TASKS.values() for t in names)
#: The default for any other model: the paper's zero-shot suite (needs the hub for the datasets).
HUB_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")


def own_builtin_tasks(checkpoint: Checkpoint) -> tuple[str, ...]:
    """The built-in tasks of the built-in model whose tokenizer the checkpoint has (that model and its
    conversions, wherever they lie; decided by the tokenizer's content, read once); ``()`` for none."""
    return BUILTIN_TASKS.get(tokenizer_builtin(checkpoint.path, BUILTIN_TASKS), ())


def default_tasks(checkpoint: Checkpoint) -> tuple[str, ...]:
    """The checkpoint's own built-in tasks (:func:`own_builtin_tasks`), else the paper's suite."""
    return own_builtin_tasks(checkpoint) or HUB_TASKS


def foreign_builtin_tasks(tasks: list[str], own: tuple[str, ...]) -> list[str]:
    """The built-in tasks among ``tasks`` that are not the checkpoint's ``own`` (:func:`own_builtin_tasks`): made
    for another built-in model's tokenizer and corpus, their scores say little about it."""
    return [t for t in tasks if t in ALL_BUILTIN_TASKS and t not in own]


@dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated: at most ``limit`` documents per task (``None``: all; lm-eval's first ones),
    ``batch_size``, ``num_fewshot`` (``None``: each task's own), ``max_length`` (context length in tokens;
    ``None``: the model's), ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``,
    :func:`bitnet_convert.runtime.devices.resolve_device`), ``seed`` (every seed lm-eval takes) and ``backend``
    (``reference``, ``native`` — integer CPU kernels, ``device`` must be ``cpu`` — or ``auto``, native when it can
    run here; see :func:`bitnet_convert.io.load.load`) and ``lm_head`` (``stored``, ``int8`` or ``auto``: int8 on
    the native backend, :func:`bitnet_convert.io.load.resolve_lm_head`)."""

    limit: int | None = None
    batch_size: int = 16
    num_fewshot: int | None = None
    max_length: int | None = None
    device: str = "cpu"
    seed: int = 0
    backend: str = "reference"
    lm_head: str = "auto"


def evaluate(path: str | Path, tasks: list[str] | None = None, settings: EvalSettings = EvalSettings(), *,
             stats_chars: int = 120_000, progress: Progress = SILENT) -> dict:
    """Evaluate the model stored at ``path`` (a conversion, or an input checkpoint as b158) as it loads from
    disk, as ``settings`` say: lm-eval results on ``tasks`` and the sparsity of its quantized inputs on the same
    documents (about ``stats_chars`` characters of them). The report's ``settings.backend`` says which backend ran.
    Returns the report ``bitnet-convert eval`` writes (``format``
    :data:`~bitnet_convert.evaluation.report.REPORT_FORMAT`).
    """
    from bitnet_convert.notes import collect

    with collect() as warnings:
        report = _evaluate(path, tasks, settings, stats_chars, progress)
    report["warnings"] = warnings
    return report


def _evaluate(path, tasks, settings: EvalSettings, stats_chars: int, progress: Progress) -> dict:
    from bitnet_convert import __version__
    from bitnet_convert.notes import warn
    from bitnet_convert.runtime.devices import resolve_device

    start = time.perf_counter()
    device = str(resolve_device(settings.device))
    backend = backend_for_device(settings.backend, device)
    settings = replace(settings, device=device, backend=backend, lm_head=resolve_lm_head(settings.lm_head, backend))
    limit, batch_size = settings.limit, settings.batch_size
    checkpoint = open_checkpoint(str(path))
    preset, roles, _ = resolve_scheme(checkpoint)
    attention = attention_of(checkpoint)
    own = own_builtin_tasks(checkpoint)
    tasks = list(tasks or own or HUB_TASKS)  # default_tasks, with the tokenizer read once for both uses
    foreign = foreign_builtin_tasks(tasks, own)
    if foreign:
        warn(f"task(s) {', '.join(foreign)} score a built-in corpus made for another model, not text of the model "
             f"'{checkpoint.path}'")
    tokenizer = load_tokenizer(checkpoint.path)
    # loads every task's data and checks max_length against it: fails before the model is built
    texts = eval_texts(tasks, limit, stats_chars, tokenizer=tokenizer, max_length=settings.max_length)
    with progress.stage("Load model", len(checkpoint.linear_names())) as advance:
        model = open_model(checkpoint, backend, lm_head=settings.lm_head, on_linear=lambda _name: advance()).model
    higher_is_better: dict = {}
    with progress.stage(f"lm-eval, {len(tasks)} task(s)"):
        results = lm_eval_results(model, tokenizer, tasks, settings, higher_is_better=higher_is_better)
    stats = None
    if texts:
        warn_no_bos(tokenizer, checkpoint.path, "the sparsity windows start mid-text")
        batches = windows(token_stream(tokenizer, texts), STATS_SEQ_LEN, tokenizer.bos_token_id,
                          "the evaluation documents", "the statistics window")
        steps = -(-batches.shape[0] // batch_size)
        with progress.stage("Sparsity on the evaluation data", steps) as advance:
            stats = activation_stats(model.to(device), batches.to(device), batch_size, on_batch=advance)
    return {
        "format": REPORT_FORMAT,
        "model": str(path),
        "scheme": preset,
        "activations": {role: spec.describe() for role, spec in roles.items()},
        "attention": attention.describe() if attention is not None else "full precision",
        "recipe": _conversion_recipe(checkpoint.path),
        "tokenizer": tokenizer_fingerprint(checkpoint.path),
        "architecture": architecture_signature(checkpoint.path),
        "tasks": tasks,
        "settings": {"limit": limit, "num_fewshot": settings.num_fewshot, "max_length": settings.max_length,
                     "batch_size": batch_size, "device": device, "seed": settings.seed, "backend": backend,
                     "lm_head": settings.lm_head},
        "results": results,
        "higher_is_better": {t: {m: bool(higher_is_better.get(t, {}).get(m, True)) for m in r}
                             for t, r in results.items()},
        "sparsity": stats,
        "versions": _versions(__version__),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "time_s": round(time.perf_counter() - start, 2),
    }


#: Window length of the activation-statistics pass over the evaluation documents.
STATS_SEQ_LEN = 256


def _conversion_recipe(directory: Path) -> dict | None:
    """The recipe a bitnet-convert output stores beside its weights (``None`` for other checkpoints)."""
    file = directory / "recipe.yaml"
    if not file.is_file():
        return None
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _versions(ours: str) -> dict[str, str]:
    import lm_eval
    import transformers

    return {"bitnet-convert": ours, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm-eval": getattr(lm_eval, "__version__", "unknown"), "python": platform.python_version()}


def task_spec(name: str) -> str | dict:
    """An lm-eval task for ``name``: a YAML file path or a built-in task name → a config dict with its data
    files made absolute (relative to the YAML); anything else is passed through as a hub task name."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DataError(f"task file '{name}' does not exist")
    elif (TASKS_DIR / f"{name}.yaml").is_file():
        path = TASKS_DIR / f"{name}.yaml"
    else:
        return name
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise DataError(f"{path}: expected an lm-eval task config with a 'task' key")
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, file in files.items():
        files[split] = str((path.parent / file).resolve())
    return config


def resolve_tasks(tasks: list[str]):
    """lm-eval task specs for ``tasks`` and a ``TaskManager`` that knows them; unknown names raise."""
    from lm_eval.tasks import TaskManager

    specs = [task_spec(t) for t in tasks]
    hub_names = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_defaults=bool(hub_names))
    unknown = [n for n in hub_names if n not in manager.all_tasks]
    if unknown:
        raise DataError(
            f"unknown task '{unknown[0]}': use a built-in task ({', '.join(ALL_BUILTIN_TASKS)}), a task "
            "YAML path, or an lm-eval task name (list them with `lm-eval ls tasks`)"
        )
    return specs, manager


def lm_eval_results(model: torch.nn.Module, tokenizer, tasks: list[str], settings: EvalSettings = EvalSettings(),
                    higher_is_better: dict | None = None) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an in-memory model as ``settings`` say (their ``backend`` is the model's
    business, not used here); returns ``{task: {metric: value}}``.

    ``higher_is_better``, when given, is filled with lm-eval's ``{task: {metric: bool}}``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs, manager = resolve_tasks(tasks)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its warnings about an in-memory model are for launchers, not for us
    try:
        lm = HFLM(pretrained=model.to(settings.device), tokenizer=tokenizer, batch_size=settings.batch_size,
                  max_length=settings.max_length, device=settings.device)
    finally:
        hf_log.setLevel(level)
    # simple_evaluate seeds random, numpy and torch globally; its tqdm bars and git probe would interleave with ours
    with _global_rng_restored(), _dataset_errors(), _quiet_lm_eval():
        output = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, limit=settings.limit, num_fewshot=settings.num_fewshot,
            bootstrap_iters=0, log_samples=False, random_seed=settings.seed, numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed, fewshot_random_seed=settings.seed,
        )
    if higher_is_better is not None:
        higher_is_better.update({t: dict(m) for t, m in output.get("higher_is_better", {}).items()})
    return {
        task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "stderr" not in k}
        for task, metrics in output["results"].items()
    }


def eval_texts(tasks: list[str], limit: int | None = None, max_chars: int = 120_000, *, tokenizer=None,
               max_length: int | None = None) -> list[str]:
    """The text each task scores, one string per document, for activation statistics on the evaluation data:
    the document of a rolling-loglikelihood task, else context + the gold continuation. At most ``limit``
    documents per task (lm-eval's first ``limit``), about ``max_chars`` characters in all, shared evenly.

    With ``tokenizer`` and ``max_length``, a context length lm-eval cannot run with (an answer longer than it, or
    no room before a generation) is a :class:`DataError` naming ``--max-length`` and the length needed."""
    specs, manager = resolve_tasks(tasks)
    with _dataset_errors():
        found = list(manager.load(specs)["tasks"].values())
    if tokenizer is not None and max_length is not None:
        for task in found:
            _check_max_length(task, tokenizer, max_length, limit)
    texts: list[str] = []
    for task in found:
        budget = max_chars // max(len(found), 1)
        for i, doc in enumerate(task.eval_docs):
            if (limit is not None and i >= limit) or budget <= 0:
                break
            text = _scored_text(task, doc)
            if text:
                texts.append(text)
                budget -= len(text)
    return texts


def _check_max_length(task, tokenizer, max_length: int, limit: int | None) -> None:
    """lm-eval asserts that every answer (continuation) fits in ``max_length`` tokens and needs room for the
    prompt before ``max_gen_toks`` generated tokens; check both on the documents it will use."""
    name = getattr(task.config, "task", "?")
    if task.OUTPUT_TYPE == "generate_until":
        gen = int((task.config.generation_kwargs or {}).get("max_gen_toks", 256))
        if max_length <= gen:
            raise DataError(f"--max-length {max_length} leaves no room for the prompt of task '{name}', which "
                            f"generates up to {gen} tokens; use --max-length > {gen}")
        return
    if task.OUTPUT_TYPE not in ("multiple_choice", "loglikelihood"):
        return
    longest = 0
    for i, doc in enumerate(task.eval_docs):
        if limit is not None and i >= limit:
            break
        try:
            context = task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else [target]
        except (TypeError, IndexError, KeyError, ValueError):
            continue
        context = context if isinstance(context, str) else ""
        delimiter = task.config.target_delimiter or ""
        for choice in choices:
            # lm-eval's split: trailing spaces of the context move to the continuation; the continuation's tokens
            # are those of context + continuation after the context's
            spaces = len(context) - len(context.rstrip())
            body, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + delimiter
            whole = tokenizer(body + continuation + str(choice), add_special_tokens=False)["input_ids"]
            head = tokenizer(body, add_special_tokens=False)["input_ids"] if body else []
            longest = max(longest, len(whole) - len(head))
    if longest > max_length:
        raise DataError(f"--max-length {max_length} is shorter than the longest answer of task '{name}' "
                        f"({longest} tokens); use --max-length ≥ {longest}")


def _scored_text(task, doc) -> str:
    """What the model reads for the gold answer of ``doc`` (empty when the task's layout is not understood)."""
    try:
        if task.OUTPUT_TYPE == "loglikelihood_rolling":
            return str(task.doc_to_target(doc))
        context = task.doc_to_text(doc)
        context = context if isinstance(context, str) else ""
        if task.OUTPUT_TYPE != "multiple_choice":
            return context
        choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
        gold = choices[target] if isinstance(target, int) else str(target)
        return context + (task.config.target_delimiter or "") + str(gold)
    except (TypeError, IndexError, KeyError, ValueError):  # a task with its own conventions: skip the document
        return ""


@contextmanager
def _dataset_errors() -> Iterator[None]:
    """A task whose dataset cannot be fetched or read becomes one clear error instead of a traceback."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        yield
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError) as exc:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"a task's dataset could not be loaded{offline}: {first}") from None


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's own console output during an evaluation the CLI already shows progress for: its tqdm bars (which
    write to ``sys.stderr``; the CLI's console and log handlers hold the real stream and still print) go to a
    buffer, and its version probe (``git describe`` in the working directory, which prints ``fatal: not a git
    repository`` outside a checkout) is skipped — the report records versions itself. ``create=True``: should
    lm-eval rename the probe, the patch does nothing rather than fail."""
    import io
    from contextlib import redirect_stderr
    from unittest import mock

    probe = mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None, create=True)
    with redirect_stderr(io.StringIO()), probe:
        yield


@contextmanager
def _global_rng_restored() -> Iterator[None]:
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
