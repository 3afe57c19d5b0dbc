"""Load a converted directory (or any BitNet checkpoint) as a model with bitnet-convert's semantics."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BitNetForCausalLM, PreTrainedTokenizerBase

from bitnet_convert.checkpoint import Checkpoint, open_checkpoint, resolve_model_path
from bitnet_convert.errors import CheckpointError
from bitnet_convert.modeling import build_model
from bitnet_convert.quant.kv import AttentionSpec
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec, Role

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def load(path: str | Path, dtype: str | torch.dtype = torch.float32) -> BitNetForCausalLM:
    """The model stored in ``path`` with the activation quantizers its config declares.

    For a bitnet-convert output this is the a4.8 model, numerically identical to the one that was exported.
    For an unconverted BitNet checkpoint (any layout) it is the W1.58A8 (``b158``) model.
    """
    checkpoint = open_checkpoint(path)
    _, roles = scheme_of(checkpoint)
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    return build_model(checkpoint, roles, dtype, attention=attention_of(checkpoint),
                       overrides=linear_overrides(checkpoint))


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
