"""Recovery as plug-ins: a recovery method is one :class:`RecoveryMethod` registered in :data:`METHODS` by its own
module (``recover/qwt.py``, ``recover/blockwise.py``, ``recover/distill.py``; :mod:`bitnet_convert.recover` imports
them in their default order). The recipe's ``recovery`` section, its ``order`` and its checks are generated from the
registry (:mod:`bitnet_convert.recipe`), and :func:`bitnet_convert.pipeline.run` runs the recipe's methods in its
order through :meth:`Context.run`: each fits on data, changes the converted model and returns its report section.

Each method that keeps state between runs (block-wise recovery's finished blocks, the fine-tune's training state)
names it by a fingerprint of what decides its result (:func:`recipe_fingerprint`): the recipe up to and including this
method, without where things are written or how they are shown, and the content of what it trained on (the
model's files, the calibration windows, the fine-tune's text and teacher). A rerun of the same recipe on the same
inputs resumes; a state of another recipe or of other inputs is refused with one line
(:mod:`bitnet_convert.recover.state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from bitnet_convert.io.checkpoint import Checkpoint
from bitnet_convert.progress import SILENT, Progress
from bitnet_convert.recover.state import files_digest, tensor_digest
from bitnet_convert.recover.state import fingerprint as state_fingerprint
from bitnet_convert.recover.training import LatentSource
from bitnet_convert.runtime import distributed
from bitnet_convert.runtime.modeling import DTYPES

if TYPE_CHECKING:
    from bitnet_convert.recipe import Recipe

#: What the warnings of the calibration and training windows say.
OWN_TEXT = "give your own text (--calibration-data FILE, or --set {0}=FILE)"
NO_BOS = "calibration and training windows start mid-text, unlike windows that start with BOS"


@dataclass(frozen=True)
class RecoveryMethod:
    """A recovery method: ``key`` (its ``recovery.<key>`` recipe section and report section), ``spec`` (the
    pydantic model of that section), ``run(context, spec)`` (changes ``context.model``, returns the report section)
    and ``summary`` (one clause for the recipe section's documentation). ``position``: where it runs among the
    methods unless the recipe's ``recovery.order`` says otherwise (ascending).

    ``trains``: it trains with gradients (the recipe's compute dtype must be float32). ``check_recovery(recovery)``
    and ``check_recipe(recipe)``: its conditions on the recipe's ``recovery`` section and on the whole recipe
    (``ValueError`` with the message). ``keeps_state``: it keeps state between runs in
    ``recovery.<key>.checkpoint_dir`` (default ``<output>.<key>``), removed by ``remove_state(directory)`` after a
    successful conversion unless ``keep_checkpoint``; ``latents(directory)``: the float weights it trained, for a
    later method to continue from."""

    key: str
    spec: type[BaseModel]
    run: Callable[[Context, Any], dict]
    summary: str
    position: int
    trains: bool = False
    check_recovery: Callable[[Any], None] | None = None
    check_recipe: Callable[[Recipe], None] | None = None
    keeps_state: bool = False
    remove_state: Callable[[Path], None] | None = None
    latents: Callable[[Path], LatentSource] | None = None

    def state_dir(self, recipe: Recipe) -> Path | None:
        """Where it keeps state between runs (``None``: it keeps none)."""
        if not self.keeps_state:
            return None
        spec = getattr(recipe.recovery, self.key)
        return spec.checkpoint_dir or recipe.output.with_name(f"{recipe.output.name}.{self.key}")

    def cleanup(self, recipe: Recipe) -> None:
        """After a successful conversion: drop the kept state unless the recipe asks to keep it."""
        spec = getattr(recipe.recovery, self.key)
        if self.keeps_state and not spec.keep_checkpoint and distributed.is_writer():
            self.remove_state(self.state_dir(recipe))


#: Every recovery method by its recipe key, in the order they run unless ``recovery.order`` says otherwise (by
#: :attr:`RecoveryMethod.position`).
METHODS: dict[str, RecoveryMethod] = {}


def register(method: RecoveryMethod) -> RecoveryMethod:
    """Add ``method`` to :data:`METHODS` (``ValueError`` for a key that is taken)."""
    if method.key in METHODS:
        raise ValueError(f"recovery method {method.key!r} is already registered")
    ordered = sorted([*METHODS.values(), method], key=lambda m: m.position)
    METHODS.clear()
    METHODS.update((m.key, m) for m in ordered)
    return method


@dataclass
class Context:
    """What every method gets: the converted ``model`` (changed in place, on the CPU between methods), its input
    ``checkpoint`` (the b1.58 reference), the ``recipe``, the calibration windows ``calibration``
    (``[windows, seq]`` token ids, or ``None``), the ``device`` to work on, the progress sink, and ``data_used``
    (each method adds the text it read)."""

    model: torch.nn.Module
    checkpoint: Checkpoint
    recipe: Recipe
    calibration: torch.Tensor | None
    device: torch.device
    progress: Progress = SILENT
    data_used: dict = field(default_factory=dict)
    #: the trained float weights of the methods run so far, most recent first (each ``name → latent or None``)
    latent_sources: list[LatentSource] = field(default_factory=list)
    _model_digest: str | None = field(default=None, repr=False)

    def run(self, method: RecoveryMethod) -> dict:
        """Run ``method`` as the recipe sets it; its trained weights become a source for the methods after it."""
        section = method.run(self, getattr(self.recipe.recovery, method.key))
        round_to_export(self)  # the next method (and the export) sees the model that is written
        if method.latents is not None:
            self.latent_sources.insert(0, method.latents(method.state_dir(self.recipe)))
        return section

    def input_digests(self, **more: str) -> dict[str, str]:
        """Digests of what the methods train on: the input model's files (config and weights) and the calibration
        windows (token ids: the text's content, its tokenization and the sampling), plus ``more``."""
        if self._model_digest is None:
            self._model_digest = files_digest([self.checkpoint.path / "config.json", *self.checkpoint.files])
        windows = "none" if self.calibration is None else tensor_digest(self.calibration)
        return {"model": self._model_digest, "calibration_windows": windows, **more}

    def memory_guard(self):
        """An out-of-memory error as one line naming the calibration knobs."""
        from bitnet_convert.calibration.statistics import memory_guard

        spec = self.recipe.calibration
        return memory_guard(spec.samples, spec.seq_len, spec.batch_size)

    def state_dir(self, key: str) -> Path | None:
        """Where method ``key`` keeps its state for this recipe."""
        return METHODS[key].state_dir(self.recipe)

    def fingerprint(self, key: str, inputs: dict[str, str] | None = None) -> str:
        """:func:`recipe_fingerprint` of method ``key`` on ``inputs`` (default: :meth:`input_digests`)."""
        return recipe_fingerprint(self.recipe, key, self.input_digests() if inputs is None else inputs)


def recipe_fingerprint(recipe: Recipe, key: str, inputs: dict[str, str]) -> str:
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
    """Before any work: each recovery method's state directory is a directory or can be created
    (:class:`~bitnet_convert.errors.OutputError` naming ``recovery.<key>.checkpoint_dir`` otherwise)."""
    from bitnet_convert.errors import OutputError
    from bitnet_convert.io.export import check_creatable

    for key in recipe.recovery.order_of_stages():
        path, label = METHODS[key].state_dir(recipe), f"recovery.{key}.checkpoint_dir"
        if path is None:
            continue
        if path.exists() and not path.is_dir():
            raise OutputError(f"{label} '{path}' exists and is not a directory")
        check_creatable(path, label)


def round_to_export(context: Context) -> None:
    """After each recovery stage: the float parameters (norms, embeddings) rounded to the export dtype, so the
    next stage fits or trains on the model that is written, and the model in memory (its report statistics,
    :attr:`~bitnet_convert.pipeline.Conversion.model`) is the one written. Packed linears and compensations are
    buffers, exported as they are."""
    from bitnet_convert.io.export import export_dtype_name

    export_dtype = DTYPES[export_dtype_name(context.checkpoint, context.recipe.export.dtype)]
    with torch.no_grad():
        for tensor in context.model.parameters():
            tensor.copy_(tensor.to(export_dtype))
