"""Evaluation of a model: perplexity on held-out text, and lm-eval tasks (local YAMLs or hub task names)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as tF
import yaml

from bitnet_convert.checkpoint import REPO_ROOT
from bitnet_convert.errors import DataError


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_windows: torch.Tensor,
    batch_size: int = 8,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """Token-level perplexity over windows ``[n, seq_len]`` (see :func:`bitnet_convert.data.windows`); every
    token after the first of each window is predicted. Returns ``{"perplexity", "nll", "tokens"}``."""
    total, count = 0.0, 0
    for start in range(0, token_windows.shape[0], batch_size):
        batch = token_windows[start : start + batch_size]
        logits = model(batch).logits.float()
        nll = tF.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
        if on_batch is not None:
            on_batch()
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


#: Task YAMLs over local data that ship with the project (the defaults for the built-in reference model).
TASKS_DIR = REPO_ROOT / "eval" / "tasks"
REFERENCE_TASKS = ("reference_ppl", "reference_agreement")


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


def lm_eval_results(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an in-memory model; returns ``{task: {metric: value}}``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs = [task_spec(t) for t in tasks]
    hub_names = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_defaults=bool(hub_names))
    unknown = [n for n in hub_names if n not in manager.all_tasks]
    if unknown:
        raise DataError(
            f"unknown task '{unknown[0]}': use a built-in task ({', '.join(REFERENCE_TASKS)}), a task YAML path, "
            "or an lm-eval task name (list them with `lm-eval ls tasks`)"
        )
    lm = HFLM(pretrained=model.to(device), tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=device)
    with _global_rng_restored():  # simple_evaluate seeds random, numpy and torch globally
        output = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return {
        task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "stderr" not in k}
        for task, metrics in output["results"].items()
    }


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
