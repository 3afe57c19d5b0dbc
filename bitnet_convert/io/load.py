"""Load a converted directory (or any BitNet checkpoint) as a model with bitnet-convert's semantics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bitnet_convert.errors import BackendError, CheckpointError
from bitnet_convert.io.checkpoint import Checkpoint, open_checkpoint, resolve_model_path
from bitnet_convert.io.families import Role
from bitnet_convert.notes import warn
from bitnet_convert.quant.kv import AttentionSpec
from bitnet_convert.quant.linear import Int8Head
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec, preset_roles
from bitnet_convert.runtime.modeling import DTYPES, build_model, replace_lm_head

Backend = Literal["native", "reference", "auto"]
BACKENDS: tuple[str, ...] = ("native", "reference", "auto")
#: Files one of which a checkpoint needs for transformers to build its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def scheme_of(checkpoint: Checkpoint) -> tuple[str, dict[Role, ActivationSpec]]:
    """The scheme an exported directory declares; ``b158`` (the model's own semantics) for an input model."""
    spec = checkpoint.a48_spec
    if spec is None:
        return "b158", PRESETS["b158"]
    try:
        roles = {role: ActivationSpec.model_validate(value) for role, value in spec["activations"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: invalid 'bitnet_convert' section ({exc})") from None
    return spec.get("scheme", "custom"), roles


def attention_of(checkpoint: Checkpoint) -> AttentionSpec | None:
    """The attention quantization an exported directory declares (``None``: full-precision attention)."""
    spec = checkpoint.a48_spec
    if spec is None or spec.get("attention") is None:
        return None
    try:
        return AttentionSpec.model_validate(spec["attention"])
    except ValueError as exc:
        where = f"{checkpoint.path / 'config.json'}: invalid 'bitnet_convert.attention'"
        raise CheckpointError(f"{where} ({str(exc).splitlines()[0]})") from None


def linear_overrides(checkpoint: Checkpoint) -> dict[str, ActivationSpec]:
    """Per-linear activation specs an exported directory declares (from ``scheme.linears`` or ``auto``)."""
    spec = checkpoint.a48_spec or {}
    try:
        return {name: ActivationSpec.model_validate(value) for name, value in (spec.get("linears") or {}).items()}
    except ValueError as exc:
        where = f"{checkpoint.path / 'config.json'}: invalid 'bitnet_convert.linears'"
        raise CheckpointError(f"{where} ({str(exc).splitlines()[0]})") from None


def conversion_of(checkpoint: Checkpoint, *, scheme: bool = True) -> str | None:
    """What a bitnet-convert output computes beyond the b1.58 semantics of its ternary weights (``"scheme a48, QwT
    compensation"``), ``None`` for b1.58 semantics: an input model, or a plain ``b158`` export. ``scheme=False``
    leaves the activation scheme out (a conversion re-decides it)."""
    spec = checkpoint.a48_spec
    if spec is None:
        return None
    name, roles = scheme_of(checkpoint)
    attention = attention_of(checkpoint)
    own = name != "b158" or roles != PRESETS["b158"]  # a "b158" whose roles were changed is not b1.58
    parts = [f"scheme {name}" + ("" if name != "b158" else " with other activation specs") if scheme and own else "",
             "QwT compensation" if spec.get("qwt") else "",
             "per-linear activation specs" if linear_overrides(checkpoint) else "",
             f"attention {attention.describe()}" if attention is not None and attention.enabled else ""]
    return ", ".join(p for p in parts if p) or None


def require_b158(checkpoint: Checkpoint, what: str, recipe_scheme: str | None = None) -> None:
    """Refuse an a4.8 export where a b1.58 model is needed (a teacher, ``perplexity --scheme``) or where what it
    computes beyond b1.58 would be lost (the input of a conversion or a calibration): its QwT compensation,
    per-linear specs and low-bit attention belong to its own quantizers and cannot be carried into another
    conversion, and its original b1.58 model cannot be recovered from it. Raises
    :class:`~bitnet_convert.errors.CheckpointError` naming ``what`` (the option or recipe key) and the model it was
    converted from, when its report says.

    ``recipe_scheme``: the scheme a conversion gives the model. Then the export's own activation scheme alone is
    not refused, since the recipe decides it anyway: its ternary weights (e.g. fine-tuned ones) are converted
    again, with a warning line saying that the scheme it declared is replaced."""
    described = conversion_of(checkpoint, scheme=recipe_scheme is None)
    if described is None:
        own = conversion_of(checkpoint)
        if own is not None:
            warn(f"{what} '{checkpoint.path}' is a bitnet-convert output ({own}); its ternary weights are converted "
                 f"again with the recipe's scheme {recipe_scheme}, which replaces the scheme it declared")
        return
    origin = ""
    report = checkpoint.path / "conversion_report.json"
    if report.is_file():
        import json

        try:
            source = json.loads(report.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            source = None
        origin = f" ('{source}', as its conversion_report.json records)" if isinstance(source, str) else ""
    raise CheckpointError(f"{what} '{checkpoint.path}' is a bitnet-convert a4.8 output ({described}), not a b1.58 "
                          f"model: give the b1.58 checkpoint it was converted from{origin}")


@dataclass
class OpenedModel:
    """A model built from a checkpoint with the activation semantics it is run under (:func:`open_model`)."""

    model: PreTrainedModel
    checkpoint: Checkpoint
    #: the scheme's name (``b158`` for an input model) and the activation spec of every role
    scheme: str
    roles: dict[Role, ActivationSpec]
    #: the attention quantization the model declares (``None``: full-precision attention)
    attention: AttentionSpec | None

    def label(self) -> str:
        """How messages name what runs: the scheme, and its attention quantization when it has one."""
        if self.attention is not None and self.attention.enabled:
            return f"{self.scheme} + attention {self.attention.describe()}"
        return self.scheme


def resolve_scheme(checkpoint: Checkpoint, scheme: str | None = None
                   ) -> tuple[str, dict[Role, ActivationSpec], dict[str, ActivationSpec]]:
    """``(name, roles, per-linear overrides)`` a checkpoint runs under: what it declares (``b158`` for an input
    model), or the preset ``scheme`` resolved for this model (the SwiGLU down_proj of
    :func:`~bitnet_convert.quant.schemes.preset_roles`), which only a b1.58 model takes. Raises
    :class:`~bitnet_convert.errors.BackendError` for an unknown preset and
    :class:`~bitnet_convert.errors.CheckpointError` (:func:`require_b158`) for an a4.8 export with ``scheme``."""
    if scheme is None:
        return *scheme_of(checkpoint), linear_overrides(checkpoint)
    if scheme not in PRESETS:
        raise CheckpointError(f"--scheme '{scheme}' is unknown; expected one of {', '.join(PRESETS)}")
    require_b158(checkpoint, f"--scheme {scheme}: the model")
    return scheme, preset_roles(scheme, checkpoint.transformers_config().hidden_act), {}


def open_model(path: str | Path | Checkpoint, backend: Backend = "reference", scheme: str | None = None, *,
               dtype: str | torch.dtype = torch.float32, sparse_roles: tuple[str, ...] | None = None,
               lm_head: str = "auto", on_linear: Callable[[str], None] | None = None) -> OpenedModel:
    """Build the model stored at ``path`` (or an opened checkpoint) on ``backend``, under the scheme it declares
    or the preset ``scheme`` (:func:`resolve_scheme`); the one place ``load``, ``evaluate`` and ``perplexity``
    build a model. ``dtype``: a torch dtype or its name (``float32``…). Raises as :func:`load`."""
    backend = resolve_backend(backend)
    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    name, roles, overrides = resolve_scheme(checkpoint, scheme)
    attention = attention_of(checkpoint)
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    model = build_for_backend(checkpoint, name, roles, backend, dtype=dtype, attention=attention,
                              overrides=overrides, sparse_roles=sparse_roles, lm_head=lm_head, on_linear=on_linear)
    return OpenedModel(model, checkpoint, name, roles, attention)


def load(path: str | Path, dtype: str | torch.dtype = torch.float32, backend: Backend = "reference",
         sparse_roles: tuple[str, ...] | None = None, lm_head: str = "auto") -> PreTrainedModel:
    """The model stored in ``path`` with the activation quantizers its config declares.

    For a bitnet-convert output this is the a4.8 model, numerically identical to the one that was exported.
    For an unconverted BitNet checkpoint (any layout) it is the W1.58A8 (``b158``) model.

    ``backend``: ``reference`` (torch, fake-quantized, trainable), ``native`` (the integer CPU kernels of
    :mod:`bitnet_convert.native.backend`; inference only, fp32, CPU) or ``auto`` (native when the kernels can be built
    here, else reference with a warning). ``sparse_roles`` (native only): the roles whose linears run on the
    sparse-input kernel (default: o_proj and down_proj for a4.8 schemes on relu² models, none for ``b158``; see
    :mod:`bitnet_convert.native.backend`). ``lm_head``: ``stored`` (the export's dtype), ``int8`` (per-row
    scale; half the bytes read per token, :class:`~bitnet_convert.native.backend.Int8Linear` on the native backend,
    :class:`~bitnet_convert.quant.linear.Int8Head` with the same numbers on the reference one) or ``auto`` (the
    default: ``int8`` on the native backend, ``stored`` on the reference one; :func:`resolve_lm_head`). Raises
    :class:`~bitnet_convert.errors.CheckpointError` for a bad checkpoint,
    :class:`~bitnet_convert.errors.BackendError` for an unknown ``lm_head`` and
    :class:`~bitnet_convert.native.build.NativeUnavailable` when ``native`` cannot run here.
    """
    return open_model(path, backend, dtype=dtype, sparse_roles=sparse_roles, lm_head=lm_head).model


def backend_for_device(backend: str, device: str) -> Literal["native", "reference"]:
    """:func:`resolve_backend` for a run on ``device``: the native kernels run on the CPU only, so ``auto`` means
    reference elsewhere and ``native`` elsewhere is refused (:class:`~bitnet_convert.errors.BackendError`)."""
    if device != "cpu" and backend != "reference":
        if backend == "native":
            raise BackendError(f"--backend native runs on the CPU; got --device {device} (use --backend reference)")
        return "reference"
    return resolve_backend(backend)


def build_for_backend(
    checkpoint: Checkpoint, scheme: str, roles: dict[Role, ActivationSpec], backend: Literal["native", "reference"],
    *, dtype: torch.dtype = torch.float32, attention: AttentionSpec | None = None,
    overrides: dict[str, ActivationSpec] | None = None, sparse_roles: tuple[str, ...] | None = None,
    lm_head: str = "auto", on_linear: Callable[[str], None] | None = None,
) -> PreTrainedModel:
    """:func:`~bitnet_convert.runtime.modeling.build_model` for a resolved backend (see :func:`load`); ``scheme`` is the
    scheme's name (``b158`` runs every linear dense on the native backend)."""
    if backend == "native" and dtype != torch.float32:
        raise BackendError(f"the native backend computes in float32; got dtype {dtype}")
    lm_head = resolve_lm_head(lm_head, backend)
    model = build_model(checkpoint, roles, dtype, on_linear=on_linear, attention=attention, overrides=overrides,
                        embeddings_as_stored=backend == "native")
    if backend == "native":
        from bitnet_convert.native import backend as native

        native.convert(model, scheme, sparse_roles, lm_head)
    elif lm_head == "int8" and model.get_output_embeddings() is not None:
        replace_lm_head(model, Int8Head(model.get_output_embeddings().weight))
    return model


#: ``--lm-head`` choices: ``auto`` (the default: ``int8`` on the native backend, ``stored`` on the reference one),
#: the export's stored dtype, or INT8 with a per-row scale (both backends offer each).
LM_HEADS = ("auto", "stored", "int8")


def check_lm_head(lm_head: str) -> None:
    """Raise :class:`~bitnet_convert.errors.BackendError` (one line) unless ``lm_head`` is one of
    :data:`LM_HEADS` (both backends offer each: ``int8`` is the native kernel or its torch reference,
    :class:`~bitnet_convert.quant.linear.Int8Head`)."""
    if lm_head not in LM_HEADS:
        raise BackendError(f"--lm-head '{lm_head}' is unknown; expected one of {', '.join(LM_HEADS)}")


def resolve_lm_head(lm_head: str, backend: Literal["native", "reference"]) -> Literal["stored", "int8"]:
    """The lm_head a model gets on a resolved ``backend``: ``auto`` is ``int8`` on the native backend (half the
    bytes of a bf16 lm_head; its perplexity cost on the three reference models is 0.02% or less, under the 0.1%
    that makes it the default: docs/native.md) and ``stored`` on the reference backend, which stays the semantic
    reference (stock transformers' numbers, trainable). Raises as :func:`check_lm_head`."""
    check_lm_head(lm_head)
    if lm_head == "auto":
        return "int8" if backend == "native" else "stored"
    return lm_head  # type: ignore[return-value]


def resolve_backend(backend: str) -> Literal["native", "reference"]:
    """``native`` or ``reference`` for a requested backend; ``auto`` is native when the kernels build here (else a
    warning and the reference backend). Raises :class:`~bitnet_convert.errors.BackendError` for an unknown name
    and its subclass :class:`~bitnet_convert.native.build.NativeUnavailable` when ``native`` cannot run."""
    if backend not in BACKENDS:
        raise BackendError(f"--backend '{backend}' is unknown; expected one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return "reference"
    from bitnet_convert.native import build as kernels

    try:
        kernels.ensure_built()
    except kernels.NativeUnavailable as exc:
        if backend == "native":
            raise
        warn(f"{exc}; using the reference backend")
        return "reference"
    return "native"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored with a checkpoint (never modified by bitnet-convert)."""
    checkpoint_path = resolve_model_path(str(path))
    if not any((checkpoint_path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{checkpoint_path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                              "tokenizer files of the model into the directory")
    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint_path}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
