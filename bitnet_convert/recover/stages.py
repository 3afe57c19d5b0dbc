"""The recovery stages: one kind of step that fits on data, changes the converted model, and returns its report
section. :func:`bitnet_convert.pipeline.run` runs the recipe's ``recovery`` stages in the order the recipe lists
them; a new method is one more :class:`Stage` in :data:`STAGES`.

Each stage that keeps state between runs (block-wise recovery's finished blocks, the fine-tune's training state)
names it by a fingerprint of what decides its result (:func:`fingerprint`): the recipe up to and including this
stage, without where things are written or how they are shown, and the content of what it trained on (the model's
files, the calibration windows, the fine-tune's text and teacher). A rerun of the same recipe on the same inputs
resumes; a state of another recipe or of other inputs is refused with one line (:mod:`bitnet_convert.recover.state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitnet_convert import distributed
from bitnet_convert.blocks import on_device
from bitnet_convert.calibrate import out_of_memory
from bitnet_convert.checkpoint import Checkpoint
from bitnet_convert.data import checked_token_stream, warn_builtin_data, warn_no_bos, warn_positions
from bitnet_convert.errors import RecipeError
from bitnet_convert.load import load_tokenizer
from bitnet_convert.modeling import DTYPES
from bitnet_convert.progress import SILENT, Progress
from bitnet_convert.recipe import Recipe
from bitnet_convert.recover import blockwise, qwt
from bitnet_convert.recover import distill as kd
from bitnet_convert.recover.state import files_digest, tensor_digest
from bitnet_convert.recover.state import fingerprint as state_fingerprint
from bitnet_convert.recover.training import LatentSource, master_latents

#: What the warnings of the calibration and training windows say.
OWN_TEXT = "give your own text (--calibration-data FILE, or --set {0}=FILE)"
NO_BOS = "calibration and training windows start mid-text, unlike windows that start with BOS"


@dataclass
class Context:
    """What every stage gets: the converted ``model`` (changed in place, on the CPU between stages), its input
    ``checkpoint`` (the b1.58 reference), the ``recipe``, the calibration windows ``calibration``
    (``[windows, seq]`` token ids, or ``None``), the ``device`` to work on, the progress sink, and ``data_used``
    (each stage adds the text it read)."""

    model: torch.nn.Module
    checkpoint: Checkpoint
    recipe: Recipe
    calibration: torch.Tensor | None
    device: torch.device
    progress: Progress = SILENT
    data_used: dict = field(default_factory=dict)
    #: the trained float weights of the stages run so far, most recent first (each ``name → latent or None``)
    latent_sources: list[LatentSource] = field(default_factory=list)
    _model_digest: str | None = field(default=None, repr=False)

    def run(self, stage: Stage) -> dict:
        """Run ``stage`` as the recipe sets it; its trained weights become a source for the stages after it."""
        section = stage.run(self, getattr(self.recipe.recovery, stage.key))
        round_to_export(self)  # the next stage (and the export) sees the model that is written
        if stage.latents is not None:
            self.latent_sources.insert(0, stage.latents(stage.state_dir(self.recipe)))
        return section

    def input_digests(self, **more: str) -> dict[str, str]:
        """Digests of what the stages train on: the input model's files (config and weights) and the calibration
        windows (token ids: the text's content, its tokenization and the sampling), plus ``more``."""
        if self._model_digest is None:
            self._model_digest = files_digest([self.checkpoint.path / "config.json", *self.checkpoint.files])
        windows = "none" if self.calibration is None else tensor_digest(self.calibration)
        return {"model": self._model_digest, "calibration_windows": windows, **more}

    def memory_guard(self):
        """An out-of-memory error as one line naming the calibration knobs."""
        from bitnet_convert.calibrate import memory_guard

        spec = self.recipe.calibration
        return memory_guard(spec.samples, spec.seq_len, spec.batch_size)


@dataclass(frozen=True)
class Stage:
    """A recovery method: ``key`` (its ``recovery.<key>`` recipe section and report section), ``run(context,
    spec)`` (changes ``context.model``, returns the report section), where it keeps state between runs, and where
    a later stage finds the float weights it trained."""

    key: str
    run: Callable[[Context, Any], dict]
    state_dir: Callable[[Recipe], Path] | None = None
    remove_state: Callable[[Path], None] | None = None
    #: the trained float weights it left in its state directory, for a later stage to continue from
    latents: Callable[[Path], LatentSource] | None = None

    def cleanup(self, recipe: Recipe) -> None:
        """After a successful conversion: drop the kept state unless the recipe asks to keep it."""
        spec = getattr(recipe.recovery, self.key)
        if self.state_dir is not None and not spec.keep_checkpoint and distributed.is_writer():
            self.remove_state(self.state_dir(recipe))


def fingerprint(recipe: Recipe, key: str, inputs: dict[str, str]) -> str:
    """A hash of what decides stage ``key``'s result: the recipe with only the recovery stages up to and including
    ``key`` (in the recipe's order), without output locations, how the result is written or evaluated, the report
    switch, or where and how often state is kept; and ``inputs``, the digests of the content it trained on
    (:meth:`Context.input_digests`)."""
    data = recipe.model_dump(mode="json", exclude={"output", "overwrite", "eval", "export"})
    data["calibration"].pop("report")
    order = recipe.recovery.order_of_stages()
    upto = order[: order.index(key) + 1]
    data["recovery"] = {k: {f: v for f, v in data["recovery"][k].items()
                            if f not in ("checkpoint_dir", "keep_checkpoint", "save_every")} for k in upto}
    data["recovery_order"] = list(upto)
    data["inputs"] = inputs
    return state_fingerprint(data)


def check_state_dirs(recipe: Recipe) -> None:
    """Before any work: each recovery stage's state directory is a directory or can be created
    (:class:`~bitnet_convert.errors.OutputError` naming ``recovery.<key>.checkpoint_dir`` otherwise)."""
    from bitnet_convert.errors import OutputError
    from bitnet_convert.export import check_creatable

    for key in recipe.recovery.order_of_stages():
        stage = STAGES[key]
        if stage.state_dir is None:
            continue
        path, label = stage.state_dir(recipe), f"recovery.{key}.checkpoint_dir"
        if path.exists() and not path.is_dir():
            raise OutputError(f"{label} '{path}' exists and is not a directory")
        check_creatable(path, label)


def _state_dir(key: str) -> Callable[[Recipe], Path]:
    def where(recipe: Recipe) -> Path:
        spec = getattr(recipe.recovery, key)
        return spec.checkpoint_dir or recipe.output.with_name(f"{recipe.output.name}.{key}")

    return where


# ------------------------------------------------------------------------------------------------ QwT


def run_qwt(context: Context, spec: qwt.QwTSpec) -> dict:
    """Closed-form QwT compensation, block by block on the calibration windows."""
    layers = len(context.model.model.layers)
    with context.memory_guard(), context.progress.stage("QwT compensation", layers) as advance:
        try:
            return qwt.fit_model(context.model, context.checkpoint, context.calibration,
                                 context.recipe.calibration.batch_size, spec, on_layer=advance,
                                 device=context.device)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None


# ----------------------------------------------------------------------------------------- block-wise


def run_blockwise(context: Context, spec: blockwise.BlockwiseSpec) -> dict:
    """Block-wise reconstruction on the calibration windows, one block at a time on the device."""
    recipe = context.recipe
    blocks = len(context.model.model.layers)
    guard = out_of_memory(
        f"block-wise recovery ran out of memory with recovery.blockwise.batch_size={spec.batch_size}, "
        f"calibration.batch_size={recipe.calibration.batch_size}, calibration.seq_len={recipe.calibration.seq_len}; "
        f"lower them (e.g. --set recovery.blockwise.batch_size={max(1, spec.batch_size // 2)})")
    with guard, context.progress.stage("Block-wise recovery", blocks) as advance:
        try:
            return blockwise.recover_model(
                context.model, context.checkpoint, context.calibration, spec, seed=recipe.seed,
                state_dir=_state_dir("blockwise")(recipe),
                fingerprint=fingerprint(recipe, "blockwise", context.input_digests()),
                on_block=advance, device=context.device, batch_size=recipe.calibration.batch_size,
                latent_sources=context.latent_sources)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None


# ------------------------------------------------------------------------------------------ fine-tune


def run_distill(context: Context, spec: kd.DistillSpec) -> dict:
    """Distill the b1.58 teacher into the converted model (the whole model on the device for the duration)."""
    recipe, checkpoint, model = context.recipe, context.checkpoint, context.model
    teacher = kd.teacher_checkpoint(checkpoint, spec)
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
        teacher_model = kd.build_teacher(teacher, DTYPES[recipe.dtype])
    guard = out_of_memory(
        f"the fine-tune ran out of memory with recovery.distill.batch_size={spec.batch_size}, "
        f"recovery.distill.seq_len={spec.seq_len}, trainable={spec.trainable}; lower them "
        f"(e.g. --set recovery.distill.batch_size={max(1, spec.batch_size // 2)})"
    )
    stage = context.progress.stage(f"Distillation ({spec.steps} steps)", spec.steps)
    try:
        with guard, stage as advance, on_device(model, context.device):
            teacher_model.to(context.device)  # not back afterwards: it is dropped
            record = kd.distill(model, teacher_model, stream, spec, seed=recipe.seed,
                                state_dir=_state_dir("distill")(recipe),
                                recipe_fingerprint=fingerprint(recipe, "distill", inputs),
                                bos_id=tokenizer.bos_token_id,
                                latent_init=master_latents(checkpoint, context.latent_sources),
                                on_step=lambda step, loss: advance("resumed" if loss != loss else f"loss {loss:.4f}"))
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    finally:
        del teacher_model
    return record


def round_to_export(context: Context) -> None:
    """After each recovery stage: the float parameters (norms, embeddings) rounded to the export dtype, so the
    next stage fits or trains on the model that is written, and the model in memory (its report statistics,
    :attr:`~bitnet_convert.pipeline.Conversion.model`) is the one written. Packed linears and compensations are
    buffers, exported as they are."""
    from bitnet_convert.export import export_dtype_name

    export_dtype = DTYPES[export_dtype_name(context.checkpoint, context.recipe.export.dtype)]
    with torch.no_grad():
        for tensor in context.model.parameters():
            tensor.copy_(tensor.to(export_dtype))


#: Every recovery method by its recipe key.
STAGES: dict[str, Stage] = {
    "qwt": Stage("qwt", run_qwt),
    "blockwise": Stage("blockwise", run_blockwise, _state_dir("blockwise"), blockwise.remove_state,
                       blockwise.saved_latents),
    "distill": Stage("distill", run_distill, _state_dir("distill"), kd.remove_state, kd.saved_latents),
}
