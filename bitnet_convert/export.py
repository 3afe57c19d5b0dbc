"""Write a converted model: packed safetensors in transformers' BitNet layout, config, tokenizer, report.

The output is a ``packed-autobitlinear`` checkpoint (uint8 weights, ``weight_scale`` = α that multiplies), which
stock transformers loads as W1.58A8; the a4.8 activation spec travels in ``config.json`` under
``bitnet_convert``. Everything is written into a temporary sibling directory that is renamed into place at
the end, so a failure never leaves a half-written output and never touches an existing one.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitnet_convert import __version__
from bitnet_convert.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from bitnet_convert.errors import OutputError
from bitnet_convert.modeling import quant_linears
from bitnet_convert.quant.kv import AttentionSpec
from bitnet_convert.quant.schemes import ActivationSpec, Role

FORMAT_VERSION = 1
QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
#: Files copied verbatim from the input checkpoint (tokenizer and generation defaults).
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_output(output: Path, overwrite: bool) -> None:
    """Fail early when ``output`` exists and may not be replaced, or is not a directory."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output '{output}' exists and is not a directory")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"output directory '{output}' already exists; pass --overwrite to replace it")


@contextmanager
def atomic_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``output`` only when the block succeeds."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if output.exists():
            old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            output.rename(old)
        tmp.rename(output)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def export_tensors(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors to save, in a fixed order: packed linears as stored, everything else cast to ``dtype``."""
    packed = {f"{name}.{key}" for name in quant_linears(model) for key in ("weight", "weight_scale", "bias")}
    tied = model.config.tie_word_embeddings
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        keep = name in packed or ".qwt." in name  # fitted compensations stay float32: an exact round trip
        tensors[name] = tensor if keep else tensor.to(dtype)
        tensors[name] = tensors[name].detach().contiguous()
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int) -> list[Path]:
    """Save as one ``model.safetensors`` or as shards + index when larger than ``max_shard_size`` bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], directory / SINGLE_FILE)
        return [directory / SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, file)
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file.name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file(tensors, file, metadata={"format": "pt"})
    file.chmod(0o644)  # safetensors writes through a private temp file (mode 0600)


def output_config(
    source: Checkpoint, roles: dict[Role, ActivationSpec], preset: str, dtype: str,
    attention: AttentionSpec | None = None,
    overrides: dict[str, ActivationSpec] | None = None,
    qwt: dict | None = None,
) -> dict:
    """The input's config with the packed-storage ``quantization_config`` and the a4.8 spec."""
    config = {k: v for k, v in source.config.items() if k not in ("quantization_config", "bitnet_convert")}
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    config["bitnet_convert"] = {
        "format_version": FORMAT_VERSION,
        "version": __version__,
        "scheme": preset,
        "activations": {role: spec.model_dump() for role, spec in roles.items()},
        "attention": (attention or AttentionSpec()).model_dump(),
        "linears": {name: spec.model_dump() for name, spec in sorted((overrides or {}).items())},
    }
    if qwt is not None:
        config["bitnet_convert"]["qwt"] = qwt
    return config


def export_dtype_name(source: Checkpoint, requested: str) -> str:
    """``auto`` → the dtype the input checkpoint declares (bfloat16 when it declares none)."""
    if requested != "auto":
        return requested
    declared = source.config.get("dtype") or source.config.get("torch_dtype") or "bfloat16"
    return declared if declared in _DTYPES else "bfloat16"


def export(
    model: torch.nn.Module,
    source: Checkpoint,
    output: Path,
    *,
    roles: dict[Role, ActivationSpec],
    preset: str,
    recipe_yaml: str,
    dtype: str = "auto",
    max_shard_size: int = 2_000_000_000,
    overwrite: bool = False,
    report: Callable[[list[Path]], dict] | None = None,
    attention: AttentionSpec | None = None,
    extra: Callable[[Path], None] | None = None,
    overrides: dict[str, ActivationSpec] | None = None,
    qwt: dict | None = None,
) -> Path:
    """Write ``model`` to ``output`` atomically; ``report(files)`` returns the conversion report to store;
    ``extra(directory)`` writes more files into the output before it is moved into place."""
    dtype_name = export_dtype_name(source, dtype)
    with atomic_directory(output, overwrite) as tmp:
        files = write_safetensors(export_tensors(model, _DTYPES[dtype_name]), tmp, max_shard_size)
        config = output_config(source, roles, preset, dtype_name, attention, overrides, qwt)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (source.path / name).is_file():
                shutil.copyfile(source.path / name, tmp / name)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        if report is not None:
            (tmp / "conversion_report.json").write_text(json.dumps(report(files), indent=2) + "\n")
        if extra is not None:
            extra(tmp)
    return output

