"""Read Hugging Face b1.58 checkpoints of every family and layout, tensor by tensor.

The family (BitNet 2B-4T, Llama-architecture 1.58-bit, 1bitLLM) comes from ``config.json``
(:mod:`bitnet_convert.io.families`); tensor names are read in the transformers names of the family's classes.
Layouts (``quantization_config``; a 1bitLLM checkpoint is always ``master``):

* ``master`` — ``autobitlinear`` + ``online``: bf16/fp32 master weights, ternarized here (absmean, per tensor).
  (A config without ``quantization_config`` is a full-precision model in transformers, and is refused.)
* ``packed-autobitlinear`` — ``autobitlinear`` + ``offline``: uint8 2-bit packed weights, ``weight_scale`` = α
  (the output is *multiplied* by it). bitnet-convert's own exports use this layout.
* ``packed-bitlinear`` — ``bitlinear``: uint8 packed weights, ``weight_scale`` = 1/α (the output is *divided*).

Tensors are read one at a time with plain file reads (not memory maps, whose touched pages would count as
resident memory for as long as the file stays open), so nothing holds the whole checkpoint in memory.

Opening a checkpoint audits it against its config before any work (:func:`audit`): every ``quantization_config``
key is one bitnet-convert honours or a refusal, every tensor is one the model consumes (right shape and dtype)
or a refusal, and every tensor the config implies is present. Nothing that changes what the model computes is
silently dropped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from bitnet_convert.errors import CheckpointError
from bitnet_convert.io.families import BITNET, Family, detect, role_of
from bitnet_convert.io.jsonfile import read_json
from bitnet_convert.quant.functional import ternary_absmean
from bitnet_convert.quant.packing import unpack_ternary

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_MODELS = {
    "builtin:reference": REPO_ROOT / "eval" / "reference" / "model",
    "builtin:reference-llama": REPO_ROOT / "eval" / "reference" / "model-llama",
    "builtin:reference-1bitllm": REPO_ROOT / "eval" / "reference" / "model-1bitllm",
    # trained on real English (the King James Bible) with its own tokenizer: eval/reference/README.md
    "builtin:reference-text": REPO_ROOT / "eval" / "reference" / "model-text",
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Layout(str, Enum):
    """How the ternary linears of a checkpoint are stored."""

    MASTER = "master"
    PACKED_AUTOBITLINEAR = "packed-autobitlinear"
    PACKED_BITLINEAR = "packed-bitlinear"


@dataclass
class Checkpoint:
    """An opened checkpoint: its config, layout and a lazy map from tensor name to file."""

    path: Path
    config: dict
    layout: Layout
    weight_map: dict[str, Path]
    family: Family = BITNET
    #: tensor name (the transformers name) → the name stored in the file, where the family renames it
    stored: dict[str, str] = field(default_factory=dict)
    #: ``quantization_config.use_rms_norm``: an RMSNorm (this epsilon) on the input of every ternary linear,
    #: as transformers' ``BitLinear``/``AutoBitLinear`` apply it; ``None`` when the checkpoint has none.
    input_norm_eps: float | None = None
    _handles: dict[Path, SafetensorsFile] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    @property
    def a48_spec(self) -> dict | None:
        """The bitnet-convert specification an exported directory carries, ``None`` for an input model."""
        return self.config.get("bitnet_convert")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, file: Path) -> SafetensorsFile:
        if file not in self._handles:
            self._handles[file] = SafetensorsFile(file)
        return self._handles[file]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from disk; :class:`CheckpointError` for a float tensor holding NaN or Inf."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor '{self.stored_name(name)}' is missing from the checkpoint")
        tensor = self._handle(self.weight_map[name]).get_tensor(self.stored.get(name, name))
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{self.path}: tensor '{self.stored_name(name)}' holds NaN or Inf values (a broken "
                                  "checkpoint)")
        return tensor

    def dtype_of(self, name: str) -> str:
        """Stored dtype of a tensor as safetensors names it (``BF16``, ``U8``…), without reading its data."""
        return self._entry(name)["dtype"]

    def shape_of(self, name: str) -> list[int]:
        return list(self._entry(name)["shape"])

    def _entry(self, name: str) -> dict:
        return self._handle(self.weight_map[name]).entries[self.stored.get(name, name)]

    def stored_name(self, name: str) -> str:
        """The name a tensor has (or would have) in this checkpoint's files, for messages."""
        return self.stored.get(name) or self.family.stored(name)

    def nbytes_of(self, name: str) -> int:
        """Stored size of a tensor's data in bytes."""
        start, end = self._entry(name)["data_offsets"]
        return end - start

    def transformers_config(self):
        """The checkpoint's transformers config (``BitNetConfig``, ``LlamaConfig``) without its storage description
        (:func:`architecture_config`)."""
        return architecture_config(self.config, self.path, self.family)

    def linear_names(self) -> list[str]:
        """Module names of the ternary linears (those the role table knows), in checkpoint order."""
        modules = (name.removesuffix(".weight") for name in self.weight_map if name.endswith(".weight"))
        return [module for module in modules if role_of(module)]

    def input_norm(self, module: str) -> torch.Tensor | None:
        """Weight ``[in]`` of the RMSNorm on ``module``'s input (``use_rms_norm``); ``None`` without one. A
        missing tensor is ones, the initialisation stock transformers gives it (the audit warned about it)."""
        if self.input_norm_eps is None:
            return None
        name = f"{module}.rms_norm.weight"
        if name in self.weight_map:
            return self.tensor(name)
        return torch.ones(self.shape_of(f"{module}.weight")[1])

    def ternary(self, module: str, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ternary codes (int8 ``[out, in]``) and scale α (fp32, 1 element) of one linear, in any layout.

        ``scratch`` is passed to :func:`ternary_absmean` for master weights (see there)."""
        codes, scale, divides = self.ternary_stored(module, scratch)
        return codes, 1.0 / scale if divides else scale

    def ternary_stored(self, module: str, scratch: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Ternary codes (int8 ``[out, in]``), the scale as stored (fp32, 1 element) and whether it divides:
        ``1/α`` in the ``packed-bitlinear`` layout, else α (see :meth:`ternary`)."""
        weight = self.tensor(f"{module}.weight")
        if self.layout is Layout.MASTER:
            if not weight.is_floating_point():
                found = f"'{module}.weight' is {weight.dtype}"
                raise CheckpointError(f"{self.path}: {found}; expected float master weights")
            return (*ternary_absmean(weight, scratch), False)
        if weight.dtype != torch.uint8:
            raise CheckpointError(f"{self.path}: '{module}.weight' is {weight.dtype}, expected packed uint8 weights")
        scale = self.tensor(f"{module}.weight_scale").float().reshape(-1)[:1]
        return unpack_ternary(weight), scale, self.layout is Layout.PACKED_BITLINEAR

    def other_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor that is not part of a ternary linear (embeddings, norms, lm_head), one at a time."""
        for name in self.weight_map:
            if not _linear_part(name):
                yield name, self.tensor(name)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def tokenizer_fingerprint(path: Path) -> str | None:
    """A hash of what a checkpoint's ``tokenizer.json`` tokenizes with (model: vocabulary and merges, added tokens,
    normalizer, pre-tokenizer), independent of how the file is formatted; ``None`` without a readable one."""
    import hashlib

    file = path / "tokenizer.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    parts = {k: data.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


#: ``config.json`` keys that tell two models apart independently of family naming (a 1bitLLM input and its
#: BitNet-architecture export share them)
SIGNATURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size")


def architecture_signature(path: Path) -> str | None:
    """The shape of the model in ``path`` (:data:`SIGNATURE_KEYS` of its ``config.json``, e.g.
    ``192-512-4-6-2-1024``), so eval reports of different models with one tokenizer are not compared; ``None``
    without a readable config."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return "-".join(str(config.get(key)) for key in SIGNATURE_KEYS)


def uses_reference_tokenizer(path: Path) -> bool:
    """Whether the checkpoint in ``path`` tokenizes as the built-in reference model does: the reference model, its
    conversions, and models of its family — those the built-in corpus, tasks and baselines fit. Decided by the
    tokenizer's content (:func:`tokenizer_fingerprint`), not by where the directory lies."""
    return shares_tokenizer(path, "builtin:reference")


def shares_tokenizer(path: Path, builtin: str) -> bool:
    """Whether the checkpoint in ``path`` tokenizes as the built-in model ``builtin`` (a :data:`BUILTIN_MODELS`
    name) does, by the tokenizer's content (:func:`tokenizer_fingerprint`)."""
    return tokenizer_builtin(path, (builtin,)) == builtin


def tokenizer_builtin(path: Path, builtins: Iterable[str]) -> str | None:
    """The first of ``builtins`` (:data:`BUILTIN_MODELS` names) whose tokenizer the checkpoint in ``path`` has, by
    content (one read of its ``tokenizer.json``, :func:`tokenizer_fingerprint`); ``None`` for none of them."""
    ours = tokenizer_fingerprint(path)
    if ours is None:
        return None
    return next((b for b in builtins if _builtin_fingerprint(b) == ours), None)


@functools.cache
def _builtin_fingerprint(builtin: str) -> str | None:
    """A built-in model's tokenizer fingerprint, read once per process (the files ship with the package)."""
    return tokenizer_fingerprint(BUILTIN_MODELS[builtin])


def resolve_model_path(model: str) -> Path:
    """A local directory for ``model``: a built-in name, a local path, or a hub id (downloaded when online)."""
    if model in BUILTIN_MODELS:
        path = BUILTIN_MODELS[model]
        if not path.is_dir():
            raise CheckpointError(f"built-in model '{model}' needs a source checkout: {path} does not exist")
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model path '{model}' is a file; expected a checkpoint directory with config.json")
        return path
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise CheckpointError(f"model path '{model}' does not exist (expected a checkpoint directory or a hub id)")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the hub raises many types; all mean "could not fetch"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise CheckpointError(
            f"model '{repo_id}' is not a local directory and could not be fetched from the hub{hint}: "
            f"{_first_line(exc)}"
        ) from None


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Open a b1.58 causal-LM checkpoint: read config.json, detect the family and layout, index the tensors (by
    their transformers names, :attr:`Checkpoint.stored` keeping the stored ones where the family renames)."""
    path = resolve_model_path(str(model))
    config = _read_config(path)
    family = detect(config, str(path / "config.json"))
    layout = detect_layout(path, config, family)
    eps = _input_norm_eps(path, config, family)
    stored_map = _weight_map(path)
    weight_map = {family.canonical(name): file for name, file in stored_map.items()}
    stored = {family.canonical(name): name for name in stored_map if family.canonical(name) != name}
    clash = sorted(set(stored) & set(stored_map))
    if clash:
        raise CheckpointError(f"{path}: holds both '{clash[0]}' and '{stored[clash[0]]}' (the same {family.label} "
                              "tensor under two names)")
    checkpoint = Checkpoint(path=path, config=config, layout=layout, weight_map=weight_map, family=family,
                            stored=stored, input_norm_eps=eps)
    if not checkpoint.linear_names():
        raise CheckpointError(f"{path}: no q/k/v/o/gate/up/down projection weights found; not a b1.58 checkpoint")
    for file in checkpoint.files:
        handle = checkpoint._handle(file)  # validates every header up front
        for name in sorted(n for n, f in stored_map.items() if f == file and n not in handle.entries):
            raise CheckpointError(f"{path / INDEX_FILE}: maps tensor '{name}' to shard '{file.name}', which does "
                                  "not hold it")
    for file in checkpoint.files:
        for name in sorted(set(checkpoint._handle(file).entries) - set(stored_map)):
            raise CheckpointError(f"{path / INDEX_FILE}: shard '{file.name}' holds tensor '{name}', which the index "
                                  "does not list (it would be dropped)")
    audit(checkpoint)
    return checkpoint


# ------------------------------------------------------------------------------------------------ audit

#: ``quantization_config`` keys and what bitnet-convert does with them; any other key is refused.
QUANTIZATION_KEYS = {
    "quant_method": "must be 'bitnet'",
    "linear_class": "the storage layout",
    "quantization_mode": "the storage layout",
    "modules_to_not_convert": "may name lm_head (kept in full precision), never a decoder linear",
    "use_rms_norm": "an RMSNorm on every ternary linear's input, applied as transformers does",
    "rms_norm_eps": "the epsilon of that RMSNorm",
    "is_bitnet_config": "a marker of onebitllms' Falcon-E configs; changes nothing transformers computes",
}
#: Architecture keys whose non-default value bitnet-convert cannot compute (biased projections).
REFUSED_ARCHITECTURE = {"attention_bias": False, "mlp_bias": False}


def architecture_config(config: dict, path: Path | None = None, family: Family = BITNET):
    """The transformers config (``BitNetConfig``, ``LlamaConfig``) of a checkpoint's ``config.json`` without its
    storage description and the family's own keys (one-line :class:`CheckpointError` when transformers rejects
    a value)."""
    dropped = ("quantization_config", "bitnet_convert", "model_type", "architectures", *family.own_keys)
    raw = {k: v for k, v in config.items() if k not in dropped}
    try:
        return family.config_class.from_dict(raw)
    except Exception as exc:  # transformers/huggingface_hub validate with many exception types; all mean "invalid"
        where = path / "config.json" if path is not None else "config.json"
        raise CheckpointError(f"{where}: not a valid {family.config_class.__name__} ({_reason(exc)})") from None


def _linear_part(name: str) -> str | None:
    """For a tensor of a ternary linear, what it is (``weight``, ``weight_scale``, ``bias``, ``rms_norm.weight``
    or another suffix); ``None`` for a tensor outside the ternary linears."""
    parts = name.split(".")
    for cut in (len(parts) - 1, len(parts) - 2):
        if cut > 0 and role_of(".".join(parts[:cut])):
            return ".".join(parts[cut:])
    return None


def audit(checkpoint: Checkpoint) -> None:
    """Check every tensor against what ``config.json`` implies, before any work: shapes and dtypes, tensors the
    model would not consume (refused: they would change what it computes, or mean another architecture) and
    tensors the config needs but the checkpoint lacks. Raises :class:`CheckpointError` naming the first problem."""
    path, config = checkpoint.path, checkpoint.config
    for key, default in REFUSED_ARCHITECTURE.items():
        if config.get(key, default) != default:
            raise CheckpointError(f"{path / 'config.json'}: {key}={config[key]!r} is not supported (biased "
                                  f"projections are not ternary BitLinear layers); supported: {key}={default!r}")
    shapes = _Shapes(checkpoint)
    for name in checkpoint.names():
        want = _expected_shape(checkpoint, shapes, name)
        shape = checkpoint.shape_of(name)
        if want is not None and shape != want:
            part = _linear_part(name)
            implied = "packed [out_features/4, in_features] " if part == "weight" and shapes.packed else ""
            raise CheckpointError(f"{path}: tensor '{checkpoint.stored_name(name)}' has shape {shape}; config.json "
                                  f"({shapes.fields_of(name)}) implies {implied}{want}")
    _check_complete(checkpoint, shapes)


class _Shapes:
    """What a checkpoint's ``config.json`` implies: every tensor's shape (from the family's model built on the meta
    device), whether weights are packed, and the config values that set each shape (for messages)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        file = checkpoint.path / "config.json"
        arch = architecture_config(checkpoint.config, checkpoint.path, checkpoint.family)
        try:
            with torch.device("meta"):
                skeleton = checkpoint.family.model_class(arch)
        except Exception as exc:  # any failure of transformers' constructors on this config
            raise CheckpointError(f"{file}: cannot build the model this config describes ({_reason(exc)})") from None
        self.expected = {name: list(t.shape) for name, t in skeleton.state_dict().items()}
        self.packed = checkpoint.layout is not Layout.MASTER
        self.tied = arch.tie_word_embeddings
        self.size = (f"hidden_size={arch.hidden_size}, intermediate_size={arch.intermediate_size}, "
                     f"num_hidden_layers={arch.num_hidden_layers}")
        self.hidden = f"hidden_size={arch.hidden_size}"
        head_dim = getattr(arch, "head_dim", None) or arch.hidden_size // arch.num_attention_heads
        fields = {
            "attention": f"hidden_size={arch.hidden_size}, num_attention_heads={arch.num_attention_heads}, "
                         f"head_dim={head_dim}",
            "kv": f"hidden_size={arch.hidden_size}, num_key_value_heads={arch.num_key_value_heads}, "
                  f"head_dim={head_dim}",
            "mlp": f"hidden_size={arch.hidden_size}, intermediate_size={arch.intermediate_size}",
            "embed": f"vocab_size={arch.vocab_size}, hidden_size={arch.hidden_size}",
        }
        fields.update({entry.name: fields[entry.shape] for entry in checkpoint.family.linears})
        fields.update(lm_head=fields["embed"], embed_tokens=fields["embed"], ffn_sub_norm=fields["mlp"])
        self.fields = fields

    def fields_of(self, name: str) -> str:
        """The config values that set the shape of tensor ``name``."""
        for part in reversed(name.split(".")):
            if part in self.fields:
                return self.fields[part]
        return self.hidden


def _expected_shape(checkpoint: Checkpoint, shapes: _Shapes, name: str) -> list[int] | None:
    """The shape tensor ``name`` must have (``None``: checked elsewhere, a QwT compensation of an export); raises
    :class:`CheckpointError` for a tensor the model would not consume or of the wrong dtype."""
    where = f"{checkpoint.path}: tensor '{checkpoint.stored_name(name)}'"
    shape, dtype = checkpoint.shape_of(name), checkpoint.dtype_of(name)
    part = _linear_part(name)
    module = name.removesuffix("." + part) if part else None
    if part == "bias":
        raise CheckpointError(f"{where}: biased ternary linears are not supported (no bias in a BitNet linear)")
    if part == "rms_norm.weight":
        if checkpoint.input_norm_eps is None:
            raise CheckpointError(f"{where} is an input RMSNorm, but config.json's quantization_config does not "
                                  "set use_rms_norm: true (set it, or remove the tensor)")
        return [shapes.expected[f"{module}.weight"][1]]
    if part == "weight_scale":
        if not shapes.packed:
            raise CheckpointError(f"{where}: a weight_scale belongs to a packed layout, but quantization_config "
                                  f"describes '{checkpoint.layout.value}' (float master weights)")
        if math.prod(shape) != 1:
            raise CheckpointError(f"{where} has shape {shape}; expected one per-tensor scale")
        return [1] if len(shape) == 1 else shape
    if part == "weight":
        return _expected_weight(checkpoint, shapes, name, where, dtype)
    if part is not None:
        raise CheckpointError(f"{where} is not part of a ternary linear bitnet-convert can compute "
                              "(expected weight, weight_scale or rms_norm.weight)")
    if name in shapes.expected:
        if not dtype.startswith(("F", "BF")):
            raise CheckpointError(f"{where} is {dtype}; expected a float tensor (F32, BF16 or F16)")
        return shapes.expected[name]
    qwt_layers = set(((checkpoint.a48_spec or {}).get("qwt") or {}).get("layers", []))
    if ".qwt." in name and any(name.startswith(f"model.layers.{i}.qwt.") for i in qwt_layers):
        return None  # a compensation of an export; its shapes are checked when it is loaded
    raise CheckpointError(f"{where} is not part of a {checkpoint.family.label} model with {shapes.size} (an extra "
                          "tensor bitnet-convert would not use)")


def _expected_weight(checkpoint: Checkpoint, shapes: _Shapes, name: str, where: str, dtype: str) -> list[int]:
    """The shape of a ternary linear's weight: packed ``[out/4, in]`` U8 or float master ``[out, in]``."""
    out_features, in_features = shapes.expected[name] if name in shapes.expected else (None, None)
    if out_features is None:
        raise CheckpointError(f"{where} is not part of a {checkpoint.family.label} model with {shapes.size}")
    if shapes.packed and dtype != "U8":
        raise CheckpointError(f"{where} is {dtype}; the '{checkpoint.layout.value}' layout stores packed U8")
    if not shapes.packed and not dtype.startswith(("F", "BF")):
        raise CheckpointError(f"{where} is {dtype}; the 'master' layout stores float weights "
                              "(packed weights need quantization_config.quantization_mode: offline)")
    return [out_features // 4, in_features] if shapes.packed else [out_features, in_features]


def _check_complete(checkpoint: Checkpoint, shapes: _Shapes) -> None:
    """Every tensor the config needs is there: the model's, each packed linear's scale; an input RMSNorm that is
    missing gets weight 1 with a warning."""
    path = checkpoint.path
    present = set(checkpoint.names())
    for name in shapes.expected:
        if name in present or (shapes.tied and name == "lm_head.weight"):
            continue
        raise CheckpointError(f"{path}: tensor '{checkpoint.stored_name(name)}' is missing from the checkpoint "
                              f"(config.json: {shapes.size})")
    if shapes.packed:
        for module in checkpoint.linear_names():
            if f"{module}.weight_scale" not in present:
                raise CheckpointError(f"{path}: tensor '{module}.weight_scale' is missing (the packed layout stores "
                                      "one scale per linear)")
    if checkpoint.input_norm_eps is not None:
        absent = [m for m in checkpoint.linear_names() if f"{m}.rms_norm.weight" not in present]
        if absent:
            from bitnet_convert.notes import warn

            warn(f"{path}: quantization_config.use_rms_norm is true but {len(absent)} linear(s) have no "
                 f"rms_norm.weight (first: '{absent[0]}'); they get weight 1, as stock transformers initialises them")


def _input_norm_eps(path: Path, config: dict, family: Family) -> float | None:
    """Check every ``quantization_config`` key (:data:`QUANTIZATION_KEYS`); the epsilon of ``use_rms_norm``."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    qc = config.get("quantization_config") or {}
    file = path / "config.json"
    unknown = sorted(set(qc) - set(QUANTIZATION_KEYS))
    if unknown:
        raise CheckpointError(f"{file}: quantization_config.{unknown[0]} is not supported (bitnet-convert reads "
                              f"{', '.join(QUANTIZATION_KEYS)}; an unknown key might change what the model computes)")
    skip = qc.get("modules_to_not_convert")
    if skip is not None:
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise CheckpointError(f"{file}: quantization_config.modules_to_not_convert must be a list of names")
        layers = config.get("num_hidden_layers")
        linears = [f"model.layers.{i}.{entry.path}" for i in range(layers if isinstance(layers, int) else 1)
                   for entry in family.linears]
        kept = [m for m in linears if not should_convert_module(m, skip)]
        if kept:
            raise CheckpointError(f"{file}: quantization_config.modules_to_not_convert keeps '{kept[0]}' in full "
                                  "precision; bitnet-convert converts every decoder linear (remove it from the list)")
        if should_convert_module("lm_head", skip):
            raise CheckpointError(f"{file}: quantization_config.modules_to_not_convert {skip} does not name lm_head, "
                                  "so transformers ternarizes lm_head; bitnet-convert keeps lm_head in full precision "
                                  "(add 'lm_head' to the list)")
    use = qc.get("use_rms_norm", False)
    if not isinstance(use, bool):
        raise CheckpointError(f"{file}: quantization_config.use_rms_norm must be true or false (got {use!r})")
    eps = qc.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise CheckpointError(f"{file}: quantization_config.rms_norm_eps must be a positive number (got {eps!r})")
    return float(eps) if use else None


def detect_layout(path: Path, config: dict, family: Family = BITNET) -> Layout:
    """The layout named by ``quantization_config`` (see the module docstring), or by the 1bitLLM keys
    (``weight_bits: 1``, ``input_bits: 8``: float latent masters); a clear error otherwise."""
    if family.quantization == "bits":
        return _bits_layout(path, config)
    qc = config.get("quantization_config") or {}
    if not qc:  # stock transformers builds plain nn.Linear layers: a full-precision model, not a b1.58 one
        raise CheckpointError(
            f"{path / 'config.json'}: no quantization_config, so transformers runs this model with full-precision "
            "linears, not as b1.58; if its weights are b1.58 master weights, add \"quantization_config\": "
            "{\"quant_method\": \"bitnet\", \"linear_class\": \"autobitlinear\", \"quantization_mode\": \"online\"}"
        )
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config must be a JSON object")
    if qc.get("quant_method") != "bitnet":
        raise CheckpointError(
            f"{path / 'config.json'}: quantization_config.quant_method is '{qc.get('quant_method')}', expected 'bitnet'"
        )
    linear_class = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline")
    if mode not in ("offline", "online"):
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.quantization_mode '{mode}' is unknown "
                              "(expected 'offline' or 'online')")
    if linear_class == "bitlinear":
        return Layout.PACKED_BITLINEAR
    if linear_class == "autobitlinear":
        return Layout.MASTER if mode == "online" else Layout.PACKED_AUTOBITLINEAR
    raise CheckpointError(
        f"{path / 'config.json'}: quantization_config.linear_class '{linear_class}' is unknown "
        "(expected 'autobitlinear' or 'bitlinear')"
    )


#: The 1bitLLM config keys and the values whose computation its published code (and bitnet-convert) implements.
ONEBITLLM_BITS = {"weight_bits": 1, "input_bits": 8}


def _bits_layout(path: Path, config: dict) -> Layout:
    """A 1bitLLM config: ``weight_bits: 1`` (ternary absmean, despite the name) and ``input_bits: 8`` (INT8
    absmax), float latent masters, no ``quantization_config``."""
    file = path / "config.json"
    qc = config.get("quantization_config")
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CheckpointError(f"{file}: a 1bitLLM (BitnetForCausalLM) config with a quantization_config "
                              f"(quant_method {method!r}): its latent weights are already the b1.58 model; remove "
                              "quantization_config or convert the original checkpoint")
    for key, want in ONEBITLLM_BITS.items():
        value = config.get(key, want)
        if value != want or isinstance(value, bool):
            raise CheckpointError(f"{file}: {key}={value!r} is not supported; 1bitLLM b1.58 checkpoints have "
                                  f"{', '.join(f'{k}={v}' for k, v in ONEBITLLM_BITS.items())} (ternary weights, "
                                  "INT8 activations)")
    return Layout.MASTER


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    config = read_json(file, CheckpointError, f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config


def _weight_map(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({_first_line(exc)})") from None
        files = {name: path / file for name, file in mapping.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index}: shard file {missing[0]} is missing")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")
    return dict.fromkeys(SafetensorsFile(single).entries, single)


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """A safetensors file read with ``pread``: the header is parsed and checked on open, tensors on demand.

    Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, the data.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if size < 8 or length > size - 8:
                    raise ValueError(f"header length {length} exceeds the file size {size}")
                header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            header.pop("__metadata__", None)
            self.data_start = 8 + length
            for name, entry in header.items():
                self._check(name, entry, size - self.data_start)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
        self.entries: dict[str, dict] = header

    @staticmethod
    def _check(name: str, entry: dict, data_size: int) -> None:
        dtype = _ST_DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * dtype.itemsize
        if not 0 <= start <= end <= data_size or end - start != nbytes:
            raise ValueError(f"tensor '{name}' has data offsets {start}..{end} outside or inconsistent with the file")

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        tensor = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        with self.path.open("rb") as f:
            f.seek(self.data_start + start)
            read = f.readinto(buffer)
        if read != end - start:
            raise CheckpointError(f"{self.path}: tensor '{name}' is truncated ({read} of {end - start} bytes)")
        return tensor


def _reason(exc: BaseException) -> str:
    """One line for an exception raised on a bad config value (a KeyError is an unknown name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, KeyError) and len(lines) == 1 and re.fullmatch(r"'[\w.-]+'", lines[0]):
        return f"unknown value {lines[0]}"
    return " ".join(lines[:2]) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
