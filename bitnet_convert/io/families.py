"""The b1.58 checkpoint families bitnet-convert reads, one row each.

Every family-specific fact lives in :data:`FAMILIES` (ARCHITECTURE.md: no ``if "llama" in name`` in the stages):
which ``config.json`` it is recognised by, which transformers classes build it, how its stored tensor names map
to those classes' names, and what an export of it looks like (the FFN activation, which decides the SwiGLU presets,
is the config's ``hidden_act``). The stages build the model from the family's transformers classes and never
execute a checkpoint's remote code.

* ``bitnet`` (microsoft/bitnet-b1.58-2B-4T, -bf16): ``model_type: bitnet``, ``BitNetForCausalLM`` (relu² GLU,
  sub-norms); ``quantization_config`` says packed or masters.
* ``llama`` (Falcon3-*-1.58bit, Falcon-E, HF1BitLLM Llama3-8B-1.58): ``model_type: llama``, ``LlamaForCausalLM``
  (SwiGLU, no sub-norms) with ``quant_method: bitnet``; packed (``bitlinear`` when ``linear_class`` is absent) or
  masters.
* ``1bitllm`` (1bitLLM/bitnet_b1_58-*): ``BitnetForCausalLM`` (lower-case n, custom code), ``weight_bits: 1``,
  ``input_bits: 8``, float latent masters and no ``quantization_config``; built as ``BitNetForCausalLM`` with
  ``hidden_act: silu``.

The 1bitLLM graph (published ``modeling_bitnet.py``): ``o_proj(inner_attn_ln(attention))`` and
``down_proj(ffn_layernorm(silu(gate_proj(x)) · up_proj(x)))``, RMSNorms with ``rms_norm_eps``, every decoder linear
``F.linear(Q_INT8(x), Q_w(W))`` with per-tensor absmean ternary weights and per-token absmax INT8 activations. That
is transformers' ``BitNetForCausalLM`` with SiLU and its sub-norms renamed, so it is built from that class and its
exports are BitNet-architecture checkpoints stock transformers loads without remote code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal, get_args

from bitnet_convert.errors import CheckpointError

#: A role groups the linears whose inputs have the same origin in a decoder layer; a scheme maps every role to one
#: activation spec (``bitnet_convert.quant.schemes``).
Role = Literal["qkv", "o", "gate_up", "down"]
ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True)
class DecoderLinear:
    """One ternary linear of a decoder layer, the row of the role table that decides how it is treated.

    ``path``: its module path inside a layer (transformers' names, after the family's renames). ``role``: which
    activation spec of the scheme quantizes its input. ``table2``: the row of a4.8's Table 2 that counts its
    sparsity (``gate`` and ``up`` apart). ``shape``: which config values set its weight's shape (``attention``:
    hidden size and query heads, ``kv``: key/value heads, ``mlp``: intermediate size), for messages. ``glu_gate``:
    for the GLU's up projection, its gate sibling, whose activated output zeroes up's outputs (Table 2's ``up``).
    """

    path: str
    role: Role
    table2: str
    shape: Literal["attention", "kv", "mlp"]
    glu_gate: str | None = None

    @property
    def name(self) -> str:
        """The last component of :attr:`path` (``q_proj``)."""
        return self.path.rsplit(".", 1)[-1]


#: The decoder linears of a transformers Llama/BitNet layer, in execution order (every family reads as one).
DECODER_LINEARS: tuple[DecoderLinear, ...] = (
    DecoderLinear("self_attn.q_proj", "qkv", "qkv", "attention"),
    DecoderLinear("self_attn.k_proj", "qkv", "qkv", "kv"),
    DecoderLinear("self_attn.v_proj", "qkv", "qkv", "kv"),
    DecoderLinear("self_attn.o_proj", "o", "o", "attention"),
    DecoderLinear("mlp.gate_proj", "gate_up", "gate", "mlp"),
    DecoderLinear("mlp.up_proj", "gate_up", "up", "mlp", glu_gate="gate_proj"),
    DecoderLinear("mlp.down_proj", "down", "down", "mlp"),
)


@dataclass(frozen=True)
class Family:
    """One checkpoint family: how it is recognised, built and exported (see the module docstring)."""

    name: str
    #: how messages name a model of this family ("a BitNet model")
    label: str
    #: who publishes checkpoints of this family (for messages and the README)
    examples: str
    #: ``architectures`` entries of ``config.json`` that name this family
    architectures: tuple[str, ...]
    #: the ``model_type`` its configs carry (used when ``architectures`` is absent)
    model_type: str
    #: transformers model module and class-name prefix: ``bitnet``/``BitNet`` → ``BitNetForCausalLM``, …
    module: str
    prefix: str
    #: stored tensor-name part → the transformers module's name for it (applied to every tensor name on reading)
    renames: dict[str, str] = field(default_factory=dict)
    #: ``quantization_config`` (``bitnet``) or ``bits`` (``weight_bits``/``input_bits`` keys, latent masters)
    quantization: str = "config"
    #: ``config.json`` keys of the family's own code that the transformers config does not take
    own_keys: tuple[str, ...] = ()
    #: the packed layout (``linear_class``) its exports use unless the recipe names one. ``bitlinear`` (1/α that
    #: divides) for the new families: stock transformers loads it with any dtype (its offline ``autobitlinear`` path
    #: leaves bf16/fp16 norms uncast under ``dtype=float32``) and llama.cpp's converter reads that convention.
    export_layout: str = "autobitlinear"
    #: what an export's ``config.json`` says (``None``: the input's own ``model_type`` and ``architectures``)
    export_model_type: str | None = None
    export_architectures: tuple[str, ...] | None = None
    #: the role table: every ternary linear of a decoder layer and how it is treated
    linears: tuple[DecoderLinear, ...] = DECODER_LINEARS

    def _class(self, suffix: str):
        module = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(module, f"{self.prefix}{suffix}")

    @property
    def config_class(self):
        module = importlib.import_module(f"transformers.models.{self.module}.configuration_{self.module}")
        return getattr(module, f"{self.prefix}Config")

    @property
    def model_class(self):
        return self._class("ForCausalLM")

    @property
    def layer_class(self):
        return self._class("DecoderLayer")

    @property
    def rotary_class(self):
        return self._class("RotaryEmbedding")

    def canonical(self, stored: str) -> str:
        """The transformers name of a stored tensor name."""
        for old, new in self.renames.items():
            stored = stored.replace(f".{old}.", f".{new}.")
        return stored

    def stored(self, name: str) -> str:
        """The stored name of a transformers tensor name (inverse of :meth:`canonical`)."""
        for old, new in self.renames.items():
            name = name.replace(f".{new}.", f".{old}.")
        return name


BITNET = Family(
    name="bitnet", label="BitNet", examples="microsoft/bitnet-b1.58-2B-4T, -bf16", architectures=("BitNetForCausalLM",),
    model_type="bitnet", module="bitnet", prefix="BitNet",
)
LLAMA = Family(
    name="llama", label="Llama", examples="tiiuae Falcon3-*-1.58bit, Falcon-E (onebitllms), HF1BitLLM Llama3-8B-1.58",
    architectures=("LlamaForCausalLM",), model_type="llama", module="llama", prefix="Llama",
    export_layout="bitlinear",
)
ONEBITLLM = Family(
    name="1bitllm", label="1bitLLM", examples="1bitLLM/bitnet_b1_58-large, -xl, -3B",
    architectures=("BitnetForCausalLM",), model_type="llama", module="bitnet", prefix="BitNet",
    renames={"inner_attn_ln": "attn_sub_norm", "ffn_layernorm": "ffn_sub_norm"},
    quantization="bits", own_keys=("weight_bits", "input_bits", "auto_map"), export_layout="bitlinear",
    export_model_type="bitnet", export_architectures=("BitNetForCausalLM",),
)
FAMILIES: tuple[Family, ...] = (BITNET, LLAMA, ONEBITLLM)
#: Every family's role-table rows by linear name (``q_proj``); a name means the same linear in every family.
_LINEAR_BY_NAME: dict[str, DecoderLinear] = {entry.name: entry for f in FAMILIES for entry in f.linears}


def decoder_linear(module_name: str) -> DecoderLinear | None:
    """The role-table row of a linear given its dotted module name (``model.layers.3.mlp.up_proj``), ``None`` when
    it is not a ternary decoder linear."""
    return _LINEAR_BY_NAME.get(module_name.rsplit(".", 1)[-1])


def role_of(module_name: str) -> Role | None:
    """Role of a linear given its dotted module name, ``None`` when it is not a quantized linear."""
    entry = decoder_linear(module_name)
    return entry.role if entry is not None else None


def supported() -> str:
    """One line listing what is supported, for refusals."""
    return "; ".join(f"{', '.join(f.architectures)} (model_type '{f.model_type}': {f.examples})" for f in FAMILIES)


def detect(config: dict, where: str) -> Family:
    """The family of a ``config.json`` (``where`` names it in errors): by ``architectures`` when given, else by
    ``model_type``. Raises :class:`CheckpointError` naming both and listing the supported ones otherwise."""
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and
                                          all(isinstance(a, str) for a in architectures)):
        raise CheckpointError(f"{where}: architectures must be a list of class names (got {architectures!r})")
    for family in FAMILIES:
        if architectures and set(architectures) & set(family.architectures):
            if family.quantization == "config" and model_type != family.model_type:
                break
            return family
    else:
        if not architectures:
            for family in FAMILIES:
                if family.model_type == model_type and family.quantization == "config":
                    return family
    raise CheckpointError(f"{where}: model_type '{model_type}' / architectures {architectures} is not a b1.58 "
                          f"causal LM bitnet-convert reads; supported: {supported()}")
