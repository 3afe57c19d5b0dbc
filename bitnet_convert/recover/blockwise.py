"""Block-wise reconstruction: each converted decoder block is trained, on its own, to reproduce the b1.58 block.

For each decoder block in order, on the block inputs that the already-recovered converted blocks before it produce
(as QwT's fit sees them), the block's latent ternary weights and its RMSNorm weights train through the a4.8
quantizers (straight-through, as the distillation fine-tune, the top-K's gradient to its kept entries) to minimise
the normalized squared error between its output and the b1.58 block's output on the same inputs (``target:
block``) or the b1.58 model's own hidden state after the block (``target: model``); then the latents are
re-ternarized (absmean) and the block is frozen. The calibration windows are split: the first ones train, the last
``holdout`` share decides — a block whose held-out error does not fall is reverted to its converted weights (QwT's
keep/drop rule).

Memory: the converted model (packed; each block's unpacked-weight cache is dropped once the block is done), one
b1.58 block, the trained block's latents and AdamW state, and the block inputs/targets of the calibration windows —
independent of depth. Each finished block is saved to the state
directory; a run of the same recipe continues at the first unfinished block and writes the same bytes as an
uninterrupted run (batches come from a private generator seeded by the recipe seed and the block index).

Source: block-wise reconstruction as in BRECQ (arXiv 2102.05426) and the block-wise tuning of low-bit LLM
quantizers; the straight-through estimator of BitNet training (arXiv 2402.17764).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from bitnet_convert.calibration.statistics import out_of_memory
from bitnet_convert.errors import Interrupted, RecipeError
from bitnet_convert.quant.functional import ordered_sum, ordered_sum_with_grad
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recover import training
from bitnet_convert.recover.base import Context, RecoveryMethod, register
from bitnet_convert.recover.state import content_digest, load_state, read_state, save_state
from bitnet_convert.recover.training import LatentSource, TrainingSpec
from bitnet_convert.runtime import distributed
from bitnet_convert.runtime.blocks import BlockRunner, build_layer
from bitnet_convert.runtime.memory import trim_heap

if TYPE_CHECKING:
    from bitnet_convert.recipe import Recipe

BlockGroup = Literal["norms", "linears"]
#: 2: the kept blocks' trained latents, for a later stage; 3: a checksum, and a fingerprint of the model's and the
#: calibration windows' content
STATE_VERSION = 3
#: A block of at least this many ternary weights gives its freed memory back to the system after every training
#: step (2B-4T block: 69 M; the 30-layer peak 4.61 → 4.38 GB). A smaller block does not: re-faulting the step's
#: memory would cost more than it saves (+50% time on the 0.4 M-weight blocks of the reference model).
TRIM_MIN_WEIGHTS = 16_000_000


class BlockwiseSpec(TrainingSpec):
    """The recipe's ``recovery.blockwise`` section (the shared training fields: :class:`TrainingSpec`)."""

    steps: int = Field(200, ge=1, description="optimizer steps per decoder block")
    batch_size: int = Field(4, ge=1, description="calibration windows per step")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate (AdamW; 1e-3 measured best on real text)")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="per block: cosine to 0, or flat")
    trainable: list[BlockGroup] = Field(default_factory=lambda: ["norms", "linears"], min_length=1)
    holdout: float = Field(0.25, gt=0.0, lt=1.0, description="share of calibration windows that decide keep/revert")
    target: Literal["block", "model"] = Field(
        "block", description="what a block learns to output: 'block', the b1.58 block on the converted model's "
        "hidden state; 'model', the b1.58 model's own hidden state after this block (the b1.58 blocks run on their "
        "own outputs), so each block also corrects what the converted blocks before it left")
    checkpoint_dir: Path | None = Field(None, description="where finished blocks go (default <output>.blockwise)")
    keep_checkpoint: bool = Field(False, description="keep the finished blocks after a successful conversion")


def learning_rate(spec: BlockwiseSpec, step: int) -> float:
    """``lr`` flat, or cosine from ``lr`` to 0 over the block's steps."""
    return training.scheduled_lr(spec, step, spec.steps)


def block_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes in a block (packed weights, scales, norm weights), copied to the CPU."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in block.state_dict().items()}


def train_block(
    block: nn.Module,
    runner: BlockRunner,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    spec: BlockwiseSpec,
    *,
    seed: int,
    latent_init: Callable[[str, QuantLinear], torch.Tensor] | None = None,
    windows: list[int] | None = None,
    total: int | None = None,
    trained_latents: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Train one converted ``block`` (in place, on ``runner``'s device) so that it maps ``inputs`` to ``targets``
    (``[windows, seq, hidden]`` fp32 on the CPU; the last ``holdout`` share held out); revert it when the
    held-out error does not fall. ``latent_init(name, module)`` starts each latent weight (default: from the
    codes, as the fine-tune does). Returns the block's record (errors before/after, kept, losses).

    Under ``torchrun`` each process passes the windows it owns: ``windows`` are their indices among all
    ``total`` windows (default: all of them, in order). Every step draws the same global batch in each process;
    a process computes its rows' share of the loss (``Σ‖o − t‖²`` of its rows over the global ``Σ‖t‖²``) and the
    gradients are summed (:func:`bitnet_convert.runtime.distributed.sum_gradients`), so the step is the one-process
    step up to the order of float additions. ``trained_latents`` receives the trained float weights by linear name
    (on the CPU) when the block is kept, for a later stage to continue from."""
    windows = list(range(inputs.shape[0])) if windows is None else windows
    total = inputs.shape[0] if total is None else total
    held = max(1, round(spec.holdout * total))
    fit = total - held
    if fit < 1:
        raise ValueError(f"recovery.blockwise needs at least 2 calibration windows (got {total}): raise "
                         "calibration.samples")
    position = {window: row for row, window in enumerate(windows)}
    tested = torch.tensor([row for window, row in position.items() if window >= fit], dtype=torch.long)
    before, saved = _held_out_error(runner, block, inputs, targets, tested), block_state(block)
    divides = {name: m.scale_divides for name, m in block.named_modules() if isinstance(m, QuantLinear)}
    tensors = training.trainable_tensors(block, list(spec.trainable), latent_init)
    optimizer = torch.optim.AdamW(list(tensors.values()), lr=spec.lr, weight_decay=spec.weight_decay)
    generator, state = torch.Generator().manual_seed(seed), (optimizer, tensors, _is_large(block))
    block.train()
    training.set_topk_gradient(block, spec.topk_gradient)
    try:
        losses = [_train_step(block, runner, inputs, targets, spec, step, state,
                              [position[w] for w in torch.randperm(fit, generator=generator)[: spec.batch_size].tolist()
                               if w in position])
                  for step in range(spec.steps)]
        latents = {name: m.latent.detach().to("cpu", copy=True) for name, m in block.named_modules()
                   if isinstance(m, QuantLinear) and m.latent is not None}
    finally:
        training.finish(block, tensors)
    after = _held_out_error(runner, block, inputs, targets, tested)
    kept = after < before
    if not kept:  # back to the converted block, its scale convention included (re-ternarizing set α)
        block.load_state_dict(saved)
        for name, module in block.named_modules():
            if isinstance(module, QuantLinear):
                module.scale_divides = divides[name]
        after = before
    elif trained_latents is not None:
        trained_latents.update(latents)
    return {"heldout_error_before": before, "heldout_error_after": after, "kept": kept,
            "loss_first": losses[0], "loss_last": losses[-1]}


def _is_large(block: nn.Module) -> bool:
    """Whether ``block`` has at least :data:`TRIM_MIN_WEIGHTS` linear weights."""
    return sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, QuantLinear)) >= (
        TRIM_MIN_WEIGHTS)


def _held_out_error(runner: BlockRunner, block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    tested: torch.Tensor) -> float:
    """``Σ‖block(x) − t‖² / Σ‖t‖²`` over the held-out rows ``tested`` of every process, summed in float64 in a
    thread-independent order."""
    with torch.no_grad():
        if len(tested):
            out = runner.run(block, inputs[tested]).double()
            num = float(ordered_sum((out - targets[tested].double()).pow(2)))
            den = float(ordered_sum(targets[tested].double().pow(2)))
        else:
            num = den = 0.0
        num, den = distributed.sum_floats(num, den)
        return num / max(den, 1e-12)


def _train_step(block: nn.Module, runner: BlockRunner, inputs: torch.Tensor, targets: torch.Tensor,
                spec: BlockwiseSpec, step: int, state: tuple[torch.optim.Optimizer, dict[str, torch.Tensor], bool],
                rows: list[int]) -> float:
    """One optimizer step on this process's ``rows`` of the step's global batch; returns the global loss.
    ``state``: the optimizer, its tensors by name, and whether the block is large (:func:`_is_large`), when the
    step gives its freed memory back to the system."""
    optimizer, tensors, large = state
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(spec, step)
    picked = torch.tensor(rows, dtype=torch.long)
    target = targets[picked].to(runner.device)
    norm = ordered_sum(target.pow(2)).float().reshape(1)  # the same bits for any thread count
    distributed.sum_tensors([norm])
    if len(picked):
        with training.autocast(spec, runner.device):
            output = runner.forward(block, inputs[picked])
        loss = ordered_sum_with_grad((output.float() - target).pow(2)) / norm.clamp(min=1e-12)[0]
        loss.backward()
    else:
        loss = torch.zeros((), device=runner.device)
    global_loss = training.optimizer_step(optimizer, tensors, spec.max_grad_norm, loss)
    if large:  # freed activations and gradients back to the system (the heap fragments otherwise)
        del loss, target
        output = None
        trim_heap()
    return global_loss


# ------------------------------------------------------------------------------------------ the model


def _block_file(index: int) -> str:
    """The state file of finished block ``index`` inside the state directory."""
    return f"block-{index:04d}.pt"


def saved_latents(state_dir: Path) -> LatentSource:
    """The trained float weights of the kept blocks in ``state_dir``, by full linear name (one block file read at a
    time)."""
    def source(name: str) -> torch.Tensor | None:
        parts = name.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        index = int(parts[2])
        if cache.get("index") != index:
            file = state_dir / _block_file(index)
            state = read_state(file, "block-wise") if file.is_file() else {}
            cache.update(index=index, latents=state.get("latents", {}))
        return cache["latents"].get(".".join(parts[3:]))

    cache: dict = {}
    return source


def _check_place(saved: dict, index: int, previous: str, state_dir: Path) -> None:
    """A saved block belongs here: it is block ``index``'s (not another block's file renamed), and it was trained
    after the block before it as that block is now (else its inputs came from another version of it). A
    ``ValueError`` (one line) otherwise."""
    file = state_dir / _block_file(index)
    if saved.get("index") != index:
        raise ValueError(f"{file}: the block-wise state of block {saved.get('index')}, not of block {index}; delete "
                         f"'{state_dir}' to start over")
    if saved.get("after") != previous:
        raise ValueError(f"{file}: block {index} was trained after another version of block {index - 1} (whose "
                         f"state changed since); delete '{state_dir}' to start over")


def remove_state(directory: Path) -> None:
    if directory.is_dir():
        shutil.rmtree(directory)


@dataclass
class _BlockJob:
    """What every block's training shares in :func:`recover_model`."""

    checkpoint: object
    runner: BlockRunner
    spec: BlockwiseSpec
    seed: int
    state_dir: Path
    fingerprint: str
    masters: Callable[[str, QuantLinear], torch.Tensor] | None
    windows: list[int]
    total: int


def _restore(block: nn.Module, saved: dict) -> dict:
    """Load a finished block's saved state (its tensors and scale conventions); returns its record."""
    block.load_state_dict(saved["tensors"])
    for name, module in block.named_modules():
        if isinstance(module, QuantLinear):
            module.scale_divides = saved["divides"][name]
    return saved["record"]


def _reference_output(job: _BlockJob, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """The b1.58 block ``index`` (read from the checkpoint alone) on ``hidden``."""
    reference = build_layer(job.checkpoint, index, PRESETS["b158"])
    with job.runner.onload(reference):
        return job.runner.run(reference, hidden)


def _train_and_save(block: nn.Module, index: int, previous: str, hidden: torch.Tensor, targets: torch.Tensor,
                    job: _BlockJob) -> dict:
    """Train converted block ``index`` to map its inputs ``hidden`` to ``targets`` and save it (rank 0) with
    the digest ``previous`` of the block before; returns its record."""
    prefix = f"model.layers.{index}."

    def from_masters(name: str, module: QuantLinear) -> torch.Tensor:
        return job.masters(prefix + name, module)

    latents: dict[str, torch.Tensor] = {}
    with job.runner.onload(block):
        record = train_block(block, job.runner, hidden, targets, job.spec, seed=job.seed * 100_003 + index,
                             latent_init=from_masters if job.masters is not None else None,
                             windows=job.windows, total=job.total, trained_latents=latents)
    divides = {n: m.scale_divides for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    if distributed.is_writer():
        save_state(job.state_dir, {"version": STATE_VERSION, "fingerprint": job.fingerprint,
                                   "tensors": block_state(block), "divides": divides, "record": record,
                                   "latents": latents, "index": index, "after": previous},
                   _block_file(index), "blockwise")
    return record


def recover_model(
    model: nn.Module,
    checkpoint,
    ids: torch.Tensor,
    spec: BlockwiseSpec,
    *,
    seed: int,
    state_dir: Path,
    fingerprint: str,
    on_block: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    latent_sources: list[LatentSource] | tuple = (),
) -> dict:
    """Block-wise recovery of a converted in-memory ``model`` (in place) on the calibration windows ``ids``
    ``[windows, seq]``: the b1.58 blocks are read from ``checkpoint`` one at a time, and each block trains on
    ``device`` (its inputs and targets stay on the CPU; ``batch_size`` windows at a time go through a block
    outside training). Finished blocks are saved in ``state_dir`` (a resumed run loads them instead of
    training; under ``torchrun`` rank 0 writes them), with the trained float weights of the kept blocks, which
    :func:`saved_latents` reads for a later stage. Each latent starts from ``latent_sources`` (an earlier stage's
    trained weights) or the master weights, as :func:`~bitnet_convert.recover.distill.master_latents` decides.
    Returns the conversion report's record."""
    start = time.perf_counter()
    layers = model.model.layers
    runner = BlockRunner(model.model.rotary_emb, device, batch_size)
    masters = training.master_latents(checkpoint, latent_sources)
    windows = distributed.owned(ids.shape[0])
    distributed.check_batch("recovery.blockwise.batch_size", spec.batch_size)
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids[windows]).float()
    teacher = hidden if spec.target == "model" else None  # the b1.58 model's own hidden state (target: model)
    job = _BlockJob(checkpoint, runner, spec, seed, state_dir, fingerprint, masters, windows, ids.shape[0])
    records, resumed = [], 0
    previous = "embeddings"  # the digest of the block before (block 0 follows the embeddings)
    try:
        for index, block in enumerate(layers):
            saved = load_state(state_dir, fingerprint, _block_file(index), STATE_VERSION, "block-wise", "blockwise")
            distributed.same_everywhere(saved is not None, f"block-wise state '{state_dir / _block_file(index)}'")
            if teacher is not None:  # advanced on resumed blocks too: the next block's targets need it
                teacher = _reference_output(job, index, teacher)
            if saved is not None:
                _check_place(saved, index, previous, state_dir)
                record = _restore(block, saved)
                resumed += 1
            else:
                targets = teacher if teacher is not None else _reference_output(job, index, hidden)
                record = _train_and_save(block, index, previous, hidden, targets, job)
                del targets
            records.append({"layer": index, **record})
            previous = content_digest(block.state_dict())  # what the next block's inputs come from (no copy)
            with runner.onload(block):
                hidden = runner.run(block, hidden)
            if on_block is not None:
                on_block(f"block {index + 1}/{len(layers)}" + (" (resumed)" if saved is not None else ""))
    except KeyboardInterrupt:
        done = len(records)
        raise Interrupted(f"block-wise recovery stopped after {done} of {len(layers)} blocks; the finished ones are "
                          f"in '{state_dir}': run the same recipe again to continue") from None
    return {"steps_per_block": spec.steps, "trainable": list(spec.trainable), "windows": int(ids.shape[0]),
            "kept_layers": [r["layer"] for r in records if r["kept"]], "resumed_blocks": resumed, "blocks": records,
            "time_s": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------- the plug-in


def run_blockwise(context: Context, spec: BlockwiseSpec) -> dict:
    """Block-wise reconstruction on the calibration windows, one block at a time on the device."""
    recipe = context.recipe
    blocks = len(context.model.model.layers)
    guard = out_of_memory(
        f"block-wise recovery ran out of memory with recovery.blockwise.batch_size={spec.batch_size}, "
        f"calibration.batch_size={recipe.calibration.batch_size}, calibration.seq_len={recipe.calibration.seq_len}; "
        f"lower them (e.g. --set recovery.blockwise.batch_size={max(1, spec.batch_size // 2)})")
    with guard, context.progress.stage("Block-wise recovery", blocks) as advance:
        try:
            return recover_model(
                context.model, context.checkpoint, context.calibration, spec, seed=recipe.seed,
                state_dir=context.state_dir("blockwise"),
                fingerprint=context.fingerprint("blockwise"),
                on_block=advance, device=context.device, batch_size=recipe.calibration.batch_size,
                latent_sources=context.latent_sources)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None


def _check_recipe(recipe: Recipe) -> None:
    if recipe.calibration.samples == 1:
        raise ValueError("recovery.blockwise: trains on some calibration windows and tests on others, so it "
                         "needs calibration.samples >= 2")
    if recipe.calibration.samples == 0:
        raise ValueError("recovery.blockwise: trained on calibration data; calibration.samples must be > 0")


register(RecoveryMethod(
    "blockwise", BlockwiseSpec, run_blockwise, "each decoder block trained on its own to reproduce the b1.58 block "
    "(block-wise reconstruction)", position=20, trains=True, check_recipe=_check_recipe, keeps_state=True,
    remove_state=remove_state, latents=saved_latents))
