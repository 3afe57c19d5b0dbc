"""The recipe: one validated document that says everything a conversion does.

Every CLI flag is an override of a field here (``--set key.path=value`` for any of them), and the output
directory stores the resolved recipe (``recipe.yaml``), so an output can be reproduced from itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from bitnet_convert.errors import RecipeError
from bitnet_convert.io.data import TxtDocuments
from bitnet_convert.io.families import ROLES, Role
from bitnet_convert.quant.kv import AttentionSpec
from bitnet_convert.quant.schemes import ActivationSpec, preset_roles
from bitnet_convert.recover.base import METHODS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoSpec(_Strict):
    """Per-linear precision chosen from calibration (beyond the paper), on top of the preset:

    the linears whose 4-bit input hurts their output most (measured output error of the configured quantizer
    minus that of INT8) move to INT8, as long as at most ``max_share`` of all linears move and the
    parameter-weighted mean input bits stays ≤ ``max_mean_bits`` (either may be null). ``static_o_threshold``
    replaces o_proj's per-token top-K by one calibrated magnitude threshold per layer (no sort at inference).
    """

    max_share: float | None = Field(0.1, ge=0.0, le=1.0)
    max_mean_bits: float | None = Field(None, ge=2.0, le=8.0)
    static_o_threshold: bool = False


class SchemeSpec(_Strict):
    """A named preset, optionally with per-role overrides of its activation quantizers, and the quantization
    of Q/K/V inside attention (``attention``; off unless bits are set)."""

    preset: Literal["b158", "a48", "a48-fp4", "a48-swiglu-int8", "a48-swiglu-topk", "a48-swiglu-int4"] = "a48"
    roles: dict[Role, ActivationSpec] = Field(default_factory=dict)
    linears: dict[str, ActivationSpec] = Field(
        default_factory=dict, description="per-linear overrides by module name (model.layers.3.mlp.up_proj)"
    )
    auto: AutoSpec | None = None
    attention: AttentionSpec = Field(default_factory=AttentionSpec)

    def resolved(self, hidden_act: str = "relu2") -> dict[Role, ActivationSpec]:
        """The activation spec of every role for a model whose FFN activation is ``hidden_act``: the preset's
        (:func:`~bitnet_convert.quant.schemes.preset_roles`), replaced where ``roles`` names one."""
        preset = preset_roles(self.preset, hidden_act)
        return {role: self.roles.get(role, preset[role]) for role in ROLES}


class CalibrationSpec(_Strict):
    """Text the conversion runs through the model to measure activation statistics for the report.

    ``data``: ``builtin:reference``, a local ``.txt`` (text as written; documents separated by blank lines, or
    one per line with ``txt_documents: lines``) or ``.jsonl`` file (``text_field`` of each record), or a Hugging
    Face dataset id (needs the hub). Tokenized with the model's own tokenizer. ``samples: 0`` skips the stage.
    ``report``: also write the per-linear statistics and plots into ``<output>/calibration/``
    (``calibration.json``, ``calibration.md``, PNGs).
    """

    data: str = "builtin:reference"
    split: str = "calib"
    text_field: str = "text"
    txt_documents: TxtDocuments = Field("paragraphs", description="a .txt file: paragraphs (blank-line separated, "
                                        "newlines kept) or lines (one document per line)")
    samples: int = Field(16, ge=0)
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(4, ge=1)
    report: bool = True


class ExportSpec(_Strict):
    """How the output is written."""

    max_shard_size: int = Field(2_000_000_000, ge=1, description="largest safetensors file in bytes")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of embeddings and norms; auto = the input checkpoint's dtype"
    )
    layout: Literal["autobitlinear", "bitlinear"] | None = Field(
        None, validation_alias=AliasChoices("layout", "linear_class"),
        description="packed layout (also spelled linear_class): autobitlinear (weight_scale = α, bit-identical in "
        "stock transformers) or bitlinear (weight_scale = 1/α, loads in stock transformers with any dtype; what "
        "llama.cpp's converter reads); null = the input family's convention (bitlinear for Llama-architecture "
        "inputs, autobitlinear otherwise)"
    )


Limit = float | dict[str, float]


class EvalSpec(_Strict):
    """What ``bitnet-convert eval`` does with this recipe's output; its command-line flags override each field.

    ``tasks``: lm-eval tasks (default: the built-in reference tasks for the reference model, else the paper's
    zero-shot suite). ``baseline``: an eval report to compare with, e.g. ``eval/baselines/b158.json``.
    ``max_ppl_increase`` (percent) and ``max_acc_drop`` (points): the gate against the baseline, one number for
    every metric or a mapping from ``"*"``, a task or ``"task:metric"`` to a limit.
    """

    tasks: list[str] | None = None
    baseline: str | None = None
    max_ppl_increase: Limit | None = None
    max_acc_drop: Limit | None = None

    @field_validator("max_ppl_increase", "max_acc_drop")
    @classmethod
    def _non_negative(cls, value: Limit | None) -> Limit | None:
        values = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(v < 0 for v in values):
            raise ValueError("limits must be ≥ 0")
        return value


#: The recovery methods a recipe may set under ``recovery`` (:data:`bitnet_convert.recover.base.METHODS`), in the
#: order they run unless ``recovery.order`` says otherwise.
RECOVERY_STAGES: tuple[str, ...] = tuple(METHODS)
Stage = Literal[RECOVERY_STAGES]  # type: ignore[valid-type]  # the registry's keys


class _RecoveryBase(_Strict):
    """What every ``recovery`` section does, whatever methods are registered (:func:`_recovery_spec` adds one
    field per method)."""

    @model_validator(mode="after")
    def _order_names_the_stages(self) -> _RecoveryBase:
        enabled = [k for k in RECOVERY_STAGES if getattr(self, k) is not None]
        if self.order is not None:
            for key in self.order:
                if getattr(self, key) is None:
                    raise ValueError(f"recovery.order names '{key}' but recovery.{key} is not set")
            if len(set(self.order)) != len(self.order):
                raise ValueError(f"recovery.order names a stage twice: {self.order}")
            missing = [k for k in enabled if k not in self.order]
            if missing:
                raise ValueError(f"recovery.order must list every stage the recipe sets; it leaves out '{missing[0]}'")
        for key in enabled:
            if METHODS[key].check_recovery is not None:
                METHODS[key].check_recovery(self)
        return self

    def order_of_stages(self) -> tuple[str, ...]:
        """The stages the recipe sets, in the order they run."""
        if self.order is not None:
            return tuple(self.order)
        return tuple(k for k in RECOVERY_STAGES if getattr(self, k) is not None)


def _recovery_spec() -> type[_RecoveryBase]:
    """The recipe's ``recovery`` section: one optional field per registered method, and ``order``."""
    methods = "; ".join(f"``{key}``, {method.summary}" for key, method in METHODS.items())
    doc = (f"Accuracy recovery after conversion: {methods}. They run in that order, or in the order ``order`` "
           "lists them (it must name every stage the recipe sets, once).")
    fields = {key: (method.spec | None, None) for key, method in METHODS.items()}
    order = Field(None, description=f"the stages in the order they run (default: {', '.join(METHODS)})")
    return create_model("RecoverySpec", __base__=_RecoveryBase, __doc__=doc, __module__=__name__, **fields,
                        order=(list[Stage] | None, order))


RecoverySpec = _recovery_spec()


class Recipe(_Strict):
    """A conversion: which model, which scheme, where the result goes."""

    model: str = Field("builtin:reference", description="checkpoint directory, hub id, or builtin:reference")
    output: Path = Path("out/a48-reference")
    overwrite: bool = False
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="compute dtype")
    device: str = Field("cpu", description="where block-by-block stages and training run: cpu, cuda, cuda:N or "
                        "auto (cuda when available); the same recipe on the same device gives the same bytes")
    scheme: SchemeSpec = Field(default_factory=SchemeSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    #: the file this recipe was read from (an input the output must not overwrite); not part of the recipe
    _source: Path | None = PrivateAttr(None)
    #: where each overridden key came from (a flag, ``--set key``, or ``FILE: key``), for messages
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> Path | None:
        return self._source

    def origin(self, key: str) -> str:
        """How to name ``key`` in a message about its value: the flag that set it (``--device``), ``--set key``,
        or ``FILE: key`` (``key`` alone for a default)."""
        origin = self._origins.get(key)
        if origin is None:
            return f"{self._source}: {key}" if self._source is not None else key
        return f"--set {key}" if origin.startswith("--set ") else origin

    def __eq__(self, other: object) -> bool:  # the same recipe, wherever it was read from
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        from bitnet_convert.runtime.devices import DEVICE_PATTERN

        if not DEVICE_PATTERN.match(value.strip().lower()):
            raise ValueError("expected cpu, cuda, cuda:N or auto")
        return value.strip().lower()

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a checkpoint directory, a hub id or builtin:reference")
        return value

    @model_validator(mode="after")
    def _fine_tune_in_float32(self) -> Recipe:
        for name in (key for key, method in METHODS.items() if method.trains):
            if getattr(self.recovery, name) is not None and self.dtype != "float32":
                raise ValueError(f"recovery.{name} trains in float32; set dtype: float32 (got dtype: {self.dtype}); "
                                 f"recovery.{name}.dtype: bfloat16 trains under bfloat16 autocast")
        return self

    @model_validator(mode="after")
    def _calibration_data_where_needed(self) -> Recipe:
        for key in self.recovery.order_of_stages():
            if METHODS[key].check_recipe is not None:
                METHODS[key].check_recipe(self)
        if self.calibration.samples == 0 and self.scheme.auto is not None:
            raise ValueError("scheme.auto: chosen from calibration data; calibration.samples must be > 0")
        return self

    def distill_data(self) -> tuple[str, str, str, TxtDocuments]:
        """``(data, split, text_field, txt_documents)`` of the fine-tune: its own where set, else the calibration
        data's (the user's text, not the built-in corpus, unless the user gave nothing)."""
        spec, cal = self.recovery.distill, self.calibration
        if spec is None or spec.data is None:
            return cal.data, cal.split, cal.text_field, cal.txt_documents
        return spec.data, spec.split or cal.split, spec.text_field, spec.txt_documents or cal.txt_documents

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                origins: dict[str, str] | None = None) -> Recipe:
    """Read a recipe file (or start from the defaults), apply dotted-key overrides, validate.

    ``overrides`` maps dotted paths (``scheme.preset``, ``calibration.samples``) to values. ``origins`` says where
    an override came from, by the same dotted path: a flag (``--device``) or the text of a ``--set`` (``--set
    calibration.samples=2``); an invalid value is then reported against it, not against the recipe file (which
    did not hold it). Raises :class:`~bitnet_convert.errors.RecipeError` (one line)."""
    data: dict[str, Any] = {}
    source = "recipe"
    origins = origins or {}
    if path is not None:
        source = str(path)
        file = Path(path)
        if file.is_dir():
            raise RecipeError(f"recipe '{path}' is a directory; expected a YAML file such as recipes/a48.yaml")
        if not file.is_file():
            raise RecipeError(f"recipe file '{path}' does not exist")
        loaded = parse_yaml(file, RecipeError)
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"{path}: expected a mapping of recipe keys at the top level")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value, _origin_text(origins, key, value) or source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(exc, source, overrides or {}, origins)) from None
    recipe._source = Path(path) if path is not None else None
    recipe._origins = {key: origin for key, origin in origins.items() if key in (overrides or {})}
    return recipe


def _origin_text(origins: dict[str, str], key: str, value: Any) -> str | None:
    """How the user wrote override ``key``: ``--device 'mps'``, or ``--set k=v`` as given; ``None`` when it has no
    origin (the recipe file's own value)."""
    origin = origins.get(key)
    if origin is None:
        return None
    return origin if origin.startswith("--set ") else f"{origin} {value!r}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently, and no
    maintained YAML library here offers the check without a new dependency)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(file: Path, error: type[Exception]) -> Any:
    """The YAML document in ``file``; ``error`` naming the file, line and column of a syntax error (or the byte
    of a non-UTF-8 file)."""
    from bitnet_convert.errors import DataError
    from bitnet_convert.io.data import read_text

    try:
        text = read_text(file)
    except DataError as exc:
        raise error(str(exc)) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)
        problem = exc.problem or exc.context or "syntax error"
        raise error(f"{where}: not valid YAML ({problem})") from None
    except yaml.YAMLError as exc:
        raise error(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key.path=value`` → ``("key.path", value)``, the value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set '{text}': expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: cannot set '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _describe(exc: ValidationError, source: str, overrides: dict[str, Any], origins: dict[str, str]) -> str:
    """First validation error as one line: ``where: key.path: problem (got value)``, where ``where`` is the flag
    or ``--set`` that gave the value (then a flag's own value is not repeated), else the recipe file."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "recipe"
    more = f"; and {len(exc.errors()) - 1} more" if len(exc.errors()) > 1 else ""
    message = err["msg"].removeprefix("Value error, ")
    given = [k for k in overrides if k in origins and loc[: len(k.split("."))] == k.split(".")] if loc else []
    if not loc:  # a check across keys: its message names them, and any of the sources may hold them
        named = [_origin_text(origins, k, v) for k, v in overrides.items() if k in origins]
        return f"{source}{' with ' + ', '.join(named) if named else ''}: {message}{more}"
    if err["type"] == "extra_forbidden":
        problem = f"unknown key '{key}'"
    else:
        got = err.get("input")
        problem = f"{key}: {message}" + ("" if isinstance(got, dict) else f" (got {got!r})")
    if given:  # the value at loc came wholly from a flag or --set (at or above loc)
        origin = max(given, key=len)
        text = _origin_text(origins, origin, overrides[origin])
        if not text.startswith("--set ") and origin == key and err["type"] != "extra_forbidden":
            return f"{text}: {message}{more}"  # --device 'mps': expected cpu, cuda, cuda:N or auto
        return f"{text}: {problem}{more}"
    inside = [_origin_text(origins, k, v) for k, v in overrides.items()
              if k in origins and k.split(".")[: len(loc)] == loc]  # a section the file and flags both filled
    return f"{source}{' with ' + ', '.join(inside) if inside else ''}: {problem}{more}"
