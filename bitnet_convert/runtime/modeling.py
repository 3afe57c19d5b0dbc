"""Build a b1.58 causal LM whose linears are :class:`QuantLinear` s, streaming from a checkpoint.

The model is the transformers class of the checkpoint's family (:mod:`bitnet_convert.io.families`):
``BitNetForCausalLM`` or ``LlamaForCausalLM``.

The model skeleton is created on the meta device; every ternary linear is read, ternarized (or unpacked) and
packed one at a time, and the remaining tensors (embeddings, norms) are assigned as they are read, so the
peak memory is the packed model plus one linear in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel

from bitnet_convert.errors import CheckpointError
from bitnet_convert.io.checkpoint import Checkpoint, Layout
from bitnet_convert.io.families import Role, role_of
from bitnet_convert.notes import warn
from bitnet_convert.quant import kv
from bitnet_convert.quant.compensation import Compensation, attach
from bitnet_convert.quant.kv import AttentionSpec
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.packing import VALUES_PER_BYTE
from bitnet_convert.quant.schemes import ActivationSpec
from bitnet_convert.runtime.memory import trim_heap

#: The float dtypes a model computes in or is exported in, by the names recipes and options use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rotary_embedding(checkpoint: Checkpoint, config: PretrainedConfig | None = None) -> torch.nn.Module:
    """The family's rotary position embedding module for ``config`` (default: the checkpoint's)."""
    return checkpoint.family.rotary_class(config or checkpoint.transformers_config())


def build_model(
    checkpoint: Checkpoint,
    roles: dict[Role, ActivationSpec],
    dtype: torch.dtype = torch.float32,
    on_linear: Callable[[str], None] | None = None,
    attention: AttentionSpec | None = None,
    overrides: dict[str, ActivationSpec] | None = None,
    embeddings_as_stored: bool = False,
) -> PreTrainedModel:
    """The family's causal LM (``BitNetForCausalLM``, ``LlamaForCausalLM``) with every decoder linear replaced by
    a :class:`QuantLinear` of ``roles``.

    ``dtype`` is the compute dtype of the non-ternary tensors. ``on_linear(name)`` is called after each
    linear (progress reporting). ``attention`` quantizes Q/K/V inside attention (:mod:`bitnet_convert.quant.kv`).
    ``overrides`` gives single linears (by module name) their own activation spec. ``embeddings_as_stored`` keeps
    the embedding and lm_head tables in the checkpoint's dtype (the native backend converts them itself).
    """
    config = checkpoint.transformers_config()
    with torch.device("meta"):
        model = checkpoint.family.model_class(config)
    unknown = sorted(set(overrides or {}) - set(checkpoint.linear_names()))
    if unknown:
        raise CheckpointError(f"{checkpoint.path}: no ternary linear named '{unknown[0]}' (per-linear override)")
    _set_linears(checkpoint, model, checkpoint.linear_names(), roles, dtype, overrides, on_linear=on_linear)
    _warn_zero_linears(checkpoint, quant_linears(model))
    qwt = (checkpoint.a48_spec or {}).get("qwt") or {}
    for index in qwt.get("layers", []):
        attach(model.model.layers[index], Compensation(qwt["form"], config.hidden_size, qwt.get("rank")))
    kept = ("model.embed_tokens.weight", "lm_head.weight") if embeddings_as_stored else ()
    state = {name: tensor if name in kept else tensor.to(dtype) for name, tensor in checkpoint.other_tensors()}
    _warn_zero(checkpoint, [name for name, tensor in state.items() if not tensor.any()], "tensor(s) are all zero")
    if config.tie_word_embeddings and "lm_head.weight" in state:
        if not torch.equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"]):
            raise CheckpointError(f"{checkpoint.path}: tie_word_embeddings is true but tensor 'lm_head.weight' differs "
                                  "from 'model.embed_tokens.weight' (set tie_word_embeddings: false to use both)")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{checkpoint.path}: unexpected tensor "
                              f"'{checkpoint.stored_name(result.unexpected_keys[0])}' for a {config.model_type} model")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = rotary_embedding(checkpoint, config)
    _require_loaded(checkpoint, model)
    model.requires_grad_(False)
    kv.install(model, attention)
    return model.eval()


def build_layer(
    checkpoint: Checkpoint,
    index: int,
    roles: dict[Role, ActivationSpec],
    dtype: torch.dtype = torch.float32,
    attention: AttentionSpec | None = None,
    overrides: dict[str, ActivationSpec] | None = None,
) -> torch.nn.Module:
    """Decoder layer ``index`` alone, read from the checkpoint as :func:`build_model` reads it (for layer-by-layer
    work such as calibration, QwT and block-wise recovery); in eval mode, without gradients."""
    config = checkpoint.transformers_config()
    # SDPA applies the causal mask itself when it gets none, which a layer run on its own needs
    config._attn_implementation = kv.ATTN_IMPLEMENTATION if attention is not None and attention.enabled else "sdpa"
    with torch.device("meta"):
        layer = checkpoint.family.layer_class(config, index)
    prefix = f"model.layers.{index}."
    names = [n for n in checkpoint.linear_names() if n.startswith(prefix)]
    _set_linears(checkpoint, layer, names, roles, dtype, overrides, prefix=prefix)
    _warn_zero_linears(checkpoint, {name: layer.get_submodule(name.removeprefix(prefix)) for name in names})
    linear = set(names)
    state = {
        n.removeprefix(prefix): checkpoint.tensor(n).to(dtype)
        for n in checkpoint.names()
        if n.startswith(prefix) and n.rsplit(".", 1)[0] not in linear
    }
    layer.load_state_dict(state, strict=False, assign=True)
    _require_loaded(checkpoint, layer, prefix)
    if attention is not None and attention.enabled:
        layer.self_attn.lowbit_attention = attention
    layer.requires_grad_(False)
    return layer.eval()


def _set_linears(checkpoint: Checkpoint, module: torch.nn.Module, names: list[str], roles: dict[Role, ActivationSpec],
                 dtype: torch.dtype, overrides: dict[str, ActivationSpec] | None, prefix: str = "",
                 on_linear: Callable[[str], None] | None = None) -> None:
    """Put the :class:`QuantLinear` of every linear in ``names`` (full module names) into ``module`` (the model, or
    the layer whose names start with ``prefix``), one at a time."""
    scratch = _scratch(checkpoint, names)
    for name in names:
        linear = load_linear(checkpoint, name, roles, scratch, (overrides or {}).get(name), dtype)
        module.set_submodule(name.removeprefix(prefix), linear)
        trim_heap()  # the linear's temporaries, freed, back to the system (they fragment the heap otherwise)
        if on_linear is not None:
            on_linear(name)


def _require_loaded(checkpoint: Checkpoint, module: torch.nn.Module, prefix: str = "") -> None:
    """A tensor the checkpoint did not provide is still on the meta device: one line naming it."""
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: tensor '{checkpoint.stored_name(prefix + missing[0])}' is missing "
                              "from the checkpoint")


def load_linear(
    checkpoint: Checkpoint, name: str, roles: dict[Role, ActivationSpec], scratch: torch.Tensor | None,
    spec: ActivationSpec | None = None, dtype: torch.dtype = torch.float32,
) -> QuantLinear:
    """The :class:`QuantLinear` of linear ``name``, ternarized (master layout) or unpacked from the checkpoint."""
    packed = checkpoint.layout is not Layout.MASTER
    out_features = checkpoint.shape_of(f"{name}.weight")[0] * (VALUES_PER_BYTE if packed else 1)
    if out_features % VALUES_PER_BYTE:
        raise CheckpointError(
            f"{checkpoint.path}: '{name}.weight' has out_features={out_features}, not divisible by "
            f"{VALUES_PER_BYTE}; 2-bit packing needs out_features % 4 == 0"
        )
    codes, scale, divides = checkpoint.ternary_stored(name, scratch)
    module = QuantLinear.from_ternary(codes, scale, spec or roles[role_of(name)], divides=divides)
    norm = checkpoint.input_norm(name)
    if norm is not None:
        module.set_input_norm(norm.to(dtype), checkpoint.input_norm_eps)
    return module


def _warn_zero_linears(checkpoint: Checkpoint, linears: dict[str, QuantLinear]) -> None:
    """One warning line naming the linears whose weights are all zero (a known way public re-uploads break)."""
    all_zero_byte = 0b01010101  # four ternary zeros, each stored as value + 1
    zero = [name for name, module in linears.items()
            if not module.alpha().item() or bool((module.weight == all_zero_byte).all())]
    _warn_zero(checkpoint, zero, "linear(s) with all-zero weights, whose output is always 0")


def _warn_zero(checkpoint: Checkpoint, names: list[str], what: str) -> None:
    """One warning line for all the all-zero ``names`` (the first three named), a known way re-uploads break."""
    if names:
        shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warn(f"{checkpoint.path}: {len(names)} {what} (a broken upload?): {shown}")


def _scratch(checkpoint: Checkpoint, names: list[str]) -> torch.Tensor | None:
    """A reusable fp32 buffer for ternarizing the largest of ``names`` (``None`` for packed inputs)."""
    if checkpoint.layout is not Layout.MASTER:
        return None
    largest = max((math.prod(checkpoint.shape_of(f"{n}.weight")) for n in names), default=0)
    return torch.empty(2 * largest, dtype=torch.float32)


def set_input_spec(module: QuantLinear, spec: ActivationSpec) -> None:
    """Change how a linear's input is quantized."""
    module.spec = spec
    module._quantize_input = spec.quantizer()


def quant_linears(model: torch.nn.Module) -> dict[str, QuantLinear]:
    """Every ternary linear of a model by module name: :class:`QuantLinear` s, and the native backend's
    ``NativeLinear`` s (same ``in_features``, ``out_features``, ``spec``, ``quantizer_input``)."""
    from bitnet_convert.native.backend import NativeLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, NativeLinear))}


def replace_lm_head(model: PreTrainedModel, head: torch.nn.Module) -> None:
    """Make ``head`` the model's lm_head and untie it from the input embeddings in the in-memory config: a head
    with its own table (the INT8 lm_head) is no longer the embedding table, and a later ``model.tie_weights()``
    (lm-eval's ``HFLM`` calls it) would otherwise put the embedding parameter back in place of its weight."""
    model.set_output_embeddings(head)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
