"""A short distillation fine-tune: the b1.58 model teaches the converted a4.8 model.

The student runs in training mode, so every quantizer passes its gradient straight through
(``x + λ·(q(x) − x).detach()``: the input quantizers, the ternarization of the latent weights, the Q/K/V
quantizers of low-bit attention); a top-K passes it to the entries it keeps only (``topk_gradient: kept``, its
own gradient; ``all``: to every entry), so that training can concentrate an input on the entries the top-K keeps
(docs/recovery.md, "Recovery on real text"). The loss is the KL divergence from the teacher's next-token
distribution to the student's (at ``temperature`` τ, scaled by τ²), plus ``hidden_mse`` × the mean over layers
of the normalized squared error of the hidden states.

What trains is chosen by ``trainable``: ``norms`` (every RMSNorm weight), ``linears`` (a float latent weight per
ternary linear, re-ternarized with absmean at the end; it starts from the master weight when the checkpoint has
one, else from the codes scaled so that the absmean ternarization gives back the same codes and α), ``qwt``
(the QwT compensations) and ``embeddings`` (tied with the output layer in BitNet).

Training state (trained tensors, optimizer, losses) is saved every ``save_every`` steps into a checkpoint
directory; a run with the same recipe resumes from it and ends with exactly the tensors an uninterrupted run
ends with. Batches are random windows of the training text drawn by a private generator from the seed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as tF
from pydantic import Field
from torch import nn

from bitnet_convert.calibration.statistics import out_of_memory
from bitnet_convert.errors import Interrupted, RecipeError
from bitnet_convert.io.data import checked_token_stream, warn_builtin_data, warn_no_bos, warn_positions
from bitnet_convert.io.load import load_tokenizer
from bitnet_convert.quant.functional import ordered_sum, ordered_sum_with_grad
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.recover.base import NO_BOS, OWN_TEXT, Context, RecoveryMethod, register
from bitnet_convert.recover.state import files_digest, load_state, read_state, save_state, tensor_digest
from bitnet_convert.recover.training import (
    LatentSource,
    TrainingSpec,
    autocast,
    finish,
    master_latents,
    optimizer_step,
    scheduled_lr,
    set_ste_lambda,
    set_topk_gradient,
    to_cpu,
    trainable_tensors,
)
from bitnet_convert.runtime import distributed
from bitnet_convert.runtime.blocks import on_device
from bitnet_convert.runtime.devices import module_device
from bitnet_convert.runtime.modeling import DTYPES

Group = Literal["norms", "linears", "qwt", "embeddings"]
STATE_FILE = "state.pt"
STATE_VERSION = 2  # 2: a checksum, and a fingerprint of the model's and the data's content


class DistillSpec(TrainingSpec):
    """The recipe's ``recovery.distill`` section (the shared training fields: :class:`TrainingSpec`)."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after the warm-up: cosine to 0, or flat")
    seq_len: int = Field(256, ge=2)
    lr_warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up from 0")
    temperature: float = Field(1.0, gt=0.0)
    hidden_mse: float = Field(0.0, ge=0.0, description="weight of the hidden-state loss (0: logits only)")
    ste_warmup_steps: int = Field(0, ge=0, description="λ of the quantizers rises 0 → 1 over these steps")
    trainable: list[Group] = Field(default_factory=lambda: ["norms", "linears"], min_length=1)
    data: str | None = Field(None, description="training text, like calibration.data; null: the calibration data")
    split: str | None = Field(None, description="split of data; null: calibration.split")
    text_field: str = "text"
    txt_documents: Literal["paragraphs", "lines"] | None = Field(None, description="null: calibration's")
    teacher: str | None = Field(None, description="b1.58 teacher checkpoint; default: the input model as b1.58")
    save_every: int = Field(50, ge=1, description="write the resumable training state every N steps")
    checkpoint_dir: Path | None = Field(None, description="where the training state goes (default <output>.distill)")
    keep_checkpoint: bool = Field(False, description="keep the training state after a successful conversion")


# ------------------------------------------------------------------------------------------- schedules


def learning_rate(spec: DistillSpec, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): a linear warm-up over ``lr_warmup_steps``, then
    :func:`~bitnet_convert.recover.training.scheduled_lr`."""
    if step < spec.lr_warmup_steps:
        return spec.lr * (step + 1) / (spec.lr_warmup_steps + 1)
    return scheduled_lr(spec, step - spec.lr_warmup_steps, spec.steps - spec.lr_warmup_steps)


def ste_lambda(spec: DistillSpec, step: int) -> float:
    """How much of the quantization the forward of step ``step`` applies (1 after the warm-up)."""
    if step >= spec.ste_warmup_steps:
        return 1.0
    return (step + 1) / (spec.ste_warmup_steps + 1)


# ------------------------------------------------------------------------------------------ the losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))``, summed over the vocabulary and averaged over tokens."""
    vocab = student_logits.shape[-1]
    log_s = tF.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_t = tF.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    pointwise = tF.kl_div(log_s, log_t, log_target=True, reduction="none")  # "batchmean": the sum over the rows
    return ordered_sum_with_grad(pointwise) / log_s.shape[0] * temperature**2


def hidden_norms(teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``‖h_t‖²`` of each decoder layer's output (fp32 ``[layers]``, summed in a thread-independent order)."""
    return torch.stack([ordered_sum(t.float().pow(2)) for t in teacher[1:]]).float()


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                norms: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the decoder layers' outputs of ``‖h_s − h_t‖² / ‖h_t‖²``; ``norms`` (``[layers]``) replaces the
    denominators (the global ``‖h_t‖²`` of a batch split over processes)."""
    if norms is None:
        norms = hidden_norms(teacher)
    terms = [ordered_sum_with_grad((s.float() - t.float()).pow(2)) / n.clamp(min=1e-12)
             for s, t, n in zip(student[1:], teacher[1:], norms, strict=True)]
    return torch.stack(terms).mean()


def share_embeddings(teacher: nn.Module, student: nn.Module) -> int:
    """Let the teacher use the student's embedding and output matrices where the two models' are equal: the
    largest tensors of a small-hidden-size LLM (1.3 GB in fp32 for 2B-4T, tied) are then held once. Only for a
    frozen student embedding (the teacher must not move). Returns how many matrices are shared."""
    shared = 0
    for path in ("model.embed_tokens", "lm_head"):
        mine, theirs = student.get_submodule(path).weight, teacher.get_submodule(path).weight
        if mine is theirs:
            shared += 1
        elif mine.shape == theirs.shape and mine.dtype == theirs.dtype and torch.equal(mine, theirs):
            teacher.get_submodule(path).weight = mine
            shared += 1
    return shared


# ---------------------------------------------------------------------------------------- the batches


def batch_offsets(stream_len: int, spec: DistillSpec, seed: int, body: int) -> torch.Tensor:
    """Start offsets ``[steps, batch]`` of every training window, drawn up front by a private generator."""
    if stream_len <= body:
        raise ValueError(f"recovery.distill: only {stream_len} tokens of training text; need more than "
                         f"seq_len={spec.seq_len}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, stream_len - body, (spec.steps, spec.batch_size), generator=generator)


def batch(stream: torch.Tensor, offsets: torch.Tensor, body: int, bos_id: int | None) -> torch.Tensor:
    rows = torch.stack([stream[o : o + body] for o in offsets.tolist()])
    if bos_id is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=rows.dtype), rows], dim=1)


# ---------------------------------------------------------------------------------------- the state


def remove_state(directory: Path) -> None:
    if (directory / STATE_FILE).is_file():
        (directory / STATE_FILE).unlink()
        if directory.is_dir() and not any(directory.iterdir()):
            shutil.rmtree(directory)


# ----------------------------------------------------------------------------------------- the loop


def distill(
    student: nn.Module,
    teacher: nn.Module,
    stream: torch.Tensor,
    spec: DistillSpec,
    *,
    seed: int,
    state_dir: Path,
    recipe_fingerprint: str,
    bos_id: int | None = None,
    latent_init: Callable[[str, QuantLinear], torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune ``student`` towards ``teacher`` on windows of the token ``stream``, in place.

    ``on_step(step, loss)`` is called after each optimizer step (1-based; also for the steps a resumed run
    skips, with ``nan``). Returns the record the conversion report keeps."""
    start_time = time.perf_counter()
    device = module_device(student)
    distributed.check_batch("recovery.distill.batch_size", spec.batch_size)
    mine = distributed.owned(spec.batch_size)  # this process's rows of every global batch
    body = spec.seq_len - (bos_id is not None)
    offsets = batch_offsets(stream.numel(), spec, seed, body)
    tensors = trainable_tensors(student, spec.trainable, latent_init)
    optimizer = torch.optim.AdamW(list(tensors.values()), lr=spec.lr, weight_decay=spec.weight_decay)
    teacher.eval().requires_grad_(False)
    if "embeddings" not in spec.trainable:
        share_embeddings(teacher, student)
    start, losses = _resume(state_dir, recipe_fingerprint, tensors, optimizer)
    saved = start
    try:
        for step in range(start):
            if on_step is not None:
                on_step(step + 1, float("nan"))
        student.train()
        set_topk_gradient(student, spec.topk_gradient)
        for step in range(start, spec.steps):
            ids = batch(stream, offsets[step][mine], body, bos_id).to(device)
            set_ste_lambda(student, ste_lambda(spec, step))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(spec, step)
            loss = _step_loss(student, teacher, ids, spec, len(mine) / spec.batch_size)
            loss.backward()
            losses.append(optimizer_step(optimizer, tensors, spec.max_grad_norm, loss))
            done = step + 1
            if (done % spec.save_every == 0 or done == spec.steps) and distributed.is_writer():
                state = {"version": STATE_VERSION, "fingerprint": recipe_fingerprint, "step": done, "losses": losses,
                         "tensors": {n: t.detach().cpu() for n, t in tensors.items()},
                         "optimizer": to_cpu(optimizer.state_dict())}
                save_state(state_dir, state, STATE_FILE, "distill")
                saved = done
            if on_step is not None:
                on_step(done, losses[-1])
    except KeyboardInterrupt:
        kept = (f"the state of step {saved} is in '{state_dir}'; run the same recipe again to resume from it"
                if saved else "no state saved yet")
        raise Interrupted(f"fine-tune stopped at step {len(losses)} of {spec.steps}; {kept}") from None
    finally:
        finish(student, tensors)
    return _record(spec, start, tensors, losses, time.perf_counter() - start_time)


def _resume(state_dir: Path, recipe_fingerprint: str, tensors: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    """Load the saved training state of this recipe, if any, into ``tensors`` and ``optimizer``; returns the step
    it reached and the losses so far (``0, []`` without one). Every process must find the same state."""
    state = load_state(state_dir, recipe_fingerprint, STATE_FILE, STATE_VERSION, "fine-tune", "distill")
    distributed.same_everywhere(None if state is None else state["step"], f"fine-tune state in '{state_dir}'")
    if state is None:
        return 0, []
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(state["tensors"][name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], list(state["losses"])


def _step_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, spec: DistillSpec,
               share: float) -> torch.Tensor:
    """This process's share of the global batch's loss: its rows' mean over the global batch (``share`` = its rows
    over the global batch size), and the hidden-state errors over the global norms (the sum over processes is the
    one-process loss)."""
    hidden = spec.hidden_mse > 0
    with autocast(spec, ids.device):
        with torch.no_grad():
            target = teacher(input_ids=ids, output_hidden_states=hidden)
        output = student(input_ids=ids, output_hidden_states=hidden)
    loss = kd_loss(output.logits, target.logits, spec.temperature) * share
    if hidden:
        norms = hidden_norms(target.hidden_states)
        distributed.sum_tensors([norms])
        loss = loss + spec.hidden_mse * hidden_loss(output.hidden_states, target.hidden_states, norms)
    return loss


def _record(spec: DistillSpec, start: int, tensors: dict[str, torch.Tensor], losses: list[float],
            seconds: float) -> dict:
    """The conversion report's record of the fine-tune."""
    tail = losses[-min(10, len(losses)):]
    return {
        "steps": spec.steps,
        "resumed_from_step": start,
        "trainable": list(spec.trainable),
        "trained_parameters": sum(t.numel() for t in tensors.values()),
        "tokens": spec.steps * spec.batch_size * spec.seq_len,
        "loss_first": losses[0] if losses else None,
        "loss_last10_mean": sum(tail) / len(tail) if tail else None,
        "losses": [round(v, 6) for v in losses],
        "time_s": round(seconds, 3),
    }


# ------------------------------------------------------------------------------- teacher and student


def teacher_checkpoint(checkpoint, spec: DistillSpec):
    """The checkpoint of the b1.58 teacher: ``spec.teacher`` when set, else the input ``checkpoint`` itself (built
    with b1.58 semantics, W1.58A8). An a4.8 conversion cannot teach: its b1.58 model is not recoverable from it
    (compensations, trained weights). Cheap: reads configs only."""
    from bitnet_convert.errors import CheckpointError, RecipeError
    from bitnet_convert.io.checkpoint import open_checkpoint
    from bitnet_convert.io.load import require_b158

    source = checkpoint
    if spec.teacher is not None:
        try:
            source = open_checkpoint(spec.teacher)
        except CheckpointError as exc:
            raise RecipeError(f"recovery.distill.teacher: {exc}") from None
    where = "recovery.distill.teacher" if spec.teacher is not None else "the input model"
    try:
        require_b158(source, where)
    except CheckpointError as exc:
        raise RecipeError(f"no b1.58 teacher for the fine-tune: {exc} as recovery.distill.teacher") from None
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if source.config.get(key) != checkpoint.config.get(key):
            raise RecipeError(f"recovery.distill.teacher '{spec.teacher}': {key} {source.config.get(key)} differs "
                              f"from the student's {checkpoint.config.get(key)}")
    return source


def build_teacher(checkpoint, dtype: torch.dtype) -> nn.Module:
    """The teacher model of :func:`teacher_checkpoint`'s result, with b1.58 semantics."""
    from bitnet_convert.quant.schemes import PRESETS
    from bitnet_convert.runtime.modeling import build_model

    return build_model(checkpoint, PRESETS["b158"], dtype)


def saved_latents(state_dir: Path) -> LatentSource:
    """The latent weights the fine-tune's final state (``state_dir``) holds, by linear name."""
    def source(name: str) -> torch.Tensor | None:
        if "state" not in cache:
            file = state_dir / STATE_FILE
            cache["state"] = read_state(file, "fine-tune") if file.is_file() else {}
        return cache["state"].get("tensors", {}).get(f"{name}.latent")

    cache: dict = {}
    return source


# ---------------------------------------------------------------------------------------- the plug-in


def run_distill(context: Context, spec: DistillSpec) -> dict:
    """Distill the b1.58 teacher into the converted model (the whole model on the device for the duration)."""
    recipe, checkpoint, model = context.recipe, context.checkpoint, context.model
    teacher = teacher_checkpoint(checkpoint, spec)
    tokenizer = load_tokenizer(checkpoint.path)
    data, split, text_field, txt_documents = recipe.distill_data()
    warn_builtin_data(checkpoint.path, data, "recovery.distill.data", OWN_TEXT.format("recovery.distill.data"))
    stream = checked_token_stream(checkpoint, tokenizer, data, split, text_field, txt_documents)
    context.data_used["distill"] = {"data": data, "split": split, "tokens": int(stream.numel())}
    warn_no_bos(tokenizer, checkpoint.path, NO_BOS)
    warn_positions(checkpoint.config, spec.seq_len, f"recovery.distill.seq_len={spec.seq_len}")
    inputs = context.input_digests(distill_text=tensor_digest(stream), teacher=(
        context.input_digests()["model"] if teacher is checkpoint
        else files_digest([teacher.path / "config.json", *teacher.files])))
    with context.progress.stage("Load the b1.58 teacher"):
        teacher_model = build_teacher(teacher, DTYPES[recipe.dtype])
    guard = out_of_memory(
        f"the fine-tune ran out of memory with recovery.distill.batch_size={spec.batch_size}, "
        f"recovery.distill.seq_len={spec.seq_len}, trainable={spec.trainable}; lower them "
        f"(e.g. --set recovery.distill.batch_size={max(1, spec.batch_size // 2)})"
    )
    stage = context.progress.stage(f"Distillation ({spec.steps} steps)", spec.steps)
    try:
        with guard, stage as advance, on_device(model, context.device):
            teacher_model.to(context.device)  # not back afterwards: it is dropped
            record = distill(model, teacher_model, stream, spec, seed=recipe.seed,
                             state_dir=context.state_dir("distill"),
                             recipe_fingerprint=context.fingerprint("distill", inputs),
                             bos_id=tokenizer.bos_token_id,
                             latent_init=master_latents(checkpoint, context.latent_sources),
                             on_step=lambda step, loss: advance("resumed" if loss != loss else f"loss {loss:.4f}"))
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    finally:
        del teacher_model
    return record


def _check_recovery(recovery) -> None:
    order = recovery.order_of_stages()
    if "qwt" in recovery.distill.trainable and "qwt" in order and order.index("qwt") > order.index("distill"):
        raise ValueError("recovery.distill.trainable names 'qwt' but recovery.order runs qwt after distill")


register(RecoveryMethod(
    "distill", DistillSpec, run_distill, "a short fine-tune of the converted model towards the b1.58 model (logit "
    "distillation)", position=30, trains=True, check_recovery=_check_recovery, keeps_state=True,
    remove_state=remove_state, latents=saved_latents))
