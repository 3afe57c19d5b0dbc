"""Write a converted model: packed safetensors in transformers' BitNet layout, config, tokenizer, report.

The output is a ``packed-autobitlinear`` checkpoint (uint8 weights, ``weight_scale`` = α that multiplies), or with
``export.layout: bitlinear`` a ``packed-bitlinear`` one (``weight_scale`` = 1/α that divides), which stock
transformers loads as W1.58A8; the a4.8 activation spec travels in ``config.json`` under
``bitnet_convert``. Everything is written into a temporary sibling directory that is renamed into place at
the end, so a failure never leaves a half-written output and never touches an existing one.

Safety of the user's files: an output that is, contains or lies inside one of the run's inputs is refused (with or
without ``--overwrite``); one process at a time writes an output (a ``filelock`` lock); temporaries carry a marker
file, so the next run on the same output removes what a killed run left (and only that).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from bitnet_convert import __version__
from bitnet_convert.errors import OutputError
from bitnet_convert.io.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from bitnet_convert.io.families import Role
from bitnet_convert.quant.kv import AttentionSpec
from bitnet_convert.quant.schemes import ActivationSpec
from bitnet_convert.runtime.modeling import DTYPES, quant_linears

if TYPE_CHECKING:
    from bitnet_convert.recipe import Recipe

FORMAT_VERSION = 1
QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
#: ``export.layout: bitlinear``: packed codes with ``weight_scale`` = 1/α, which transformers' ``BitLinear``
#: divides by; stock transformers loads it with any ``dtype`` (its offline ``AutoBitLinear`` path does not cast).
BITLINEAR_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear"}
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


#: File inside every temporary directory of ours; a directory named like one without it is never touched.
MARKER = ".bitnet-convert-partial"


#: Files by which an existing directory is recognised as an earlier output of ours (``--overwrite`` replaces
#: only those): a conversion, or a calibration report.
OUTPUT_FILES = ("conversion_report.json", "calibration.json")


def check_output(output: Path, overwrite: bool, inputs: Iterable[Path | str] = ()) -> None:
    """Fail early (before any work) when ``output`` cannot be created, may not be replaced, or overlaps an input.

    ``inputs``: the run's input files and directories (model, teacher, data files); an output equal to one of
    them, inside one or containing one is refused even with ``overwrite``, since replacing it would delete the
    input. ``overwrite`` replaces only an earlier output of ours (:data:`OUTPUT_FILES`), never another directory
    of the user's; the working directory is never an output. Raises :class:`OutputError`."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output '{output}' exists and is not a directory")
    cwd = Path.cwd().resolve()
    if output.resolve() == cwd or output.resolve() in cwd.parents:
        raise OutputError(f"output '{output}' is or contains the working directory, which cannot be replaced; "
                          "choose a new directory name")
    check_creatable(output, "output")
    target = output.resolve()
    for given in inputs:
        source = Path(given).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        relation = ("is" if source == target else "contains" if target in source.parents
                    else "lies inside" if source in target.parents else None)
        if relation is not None:
            raise OutputError(f"output '{output}' {relation} the input '{given}'; writing it would destroy that "
                              "input: choose another output directory")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise OutputError(f"output directory '{output}' already exists; pass --overwrite to replace it")
        if not any((output / name).is_file() for name in OUTPUT_FILES):
            raise OutputError(f"output directory '{output}' is not an earlier bitnet-convert output (it has no "
                              f"{' or '.join(OUTPUT_FILES)}); --overwrite replaces only those: choose another "
                              "output")


def check_creatable(path: Path, label: str) -> None:
    """:class:`OutputError` unless ``path`` can be created: its nearest existing ancestor is a writable
    directory (``label`` names the option in the message)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{label} '{path}' cannot be created: '{parent}' is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{label} '{path}' cannot be created: no write permission in '{parent}'")
            return


def free_space(directory: Path) -> str:
    """The free space of ``directory``'s filesystem, for messages about failed writes."""
    try:
        return f"{shutil.disk_usage(directory).free / 1e6:,.1f} MB"
    except OSError:
        return "unknown space"


def is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` is one of the files a checkpoint or a conversion consists of (never to be overwritten by
    a report)."""
    name = path.name
    return (name in (*COPIED_FILES, "config.json", "recipe.yaml", "conversion_report.json", INDEX_FILE)
            or name.endswith(".safetensors"))


def _lock_file(output: Path) -> Path:
    """Where the lock of ``output`` lives: the user cache, keyed by the output's absolute path, so nothing is left
    beside the output."""
    key = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitnet-convert" / "locks"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache directory: the system's temporary directory is shared by every user
        import tempfile

        cache = Path(tempfile.gettempdir()) / "bitnet-convert-locks"
        cache.mkdir(exist_ok=True)
    return cache / f"{key}.lock"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold the lock of ``output`` (re-entrant in one process); another process holding it is an
    :class:`OutputError` at once. A well-kept library (``filelock``) does the locking. The first holder recovers
    what a killed run on the same output left behind (:func:`remove_stale_temporaries`)."""
    from filelock import FileLock, Timeout

    try:
        lock = FileLock(_lock_file(output), is_singleton=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputError(f"output '{output}' is being written by another bitnet-convert process; wait for it to "
                          "finish or choose another output") from None
    except OSError as exc:
        raise OutputError(f"output '{output}': cannot take its lock ({exc.strerror or exc}: {exc.filename})") from None
    try:
        if lock.lock_counter == 1:
            remove_stale_temporaries(output)
        yield
    finally:
        lock.release()


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}")


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Recover from a killed run on ``output`` (call with the output's lock held); returns what was removed.

    Only directories of ours are touched: named ``.NAME.tmp-XXXXXXXX`` or ``.NAME.old-XXXXXXXX`` and holding
    :data:`MARKER`. An output that still holds the marker is complete (the marker goes after the final rename):
    it is unmarked. No output but a marked ``.old-*``: the run was killed between its two renames, and the
    previous output is restored. Every other marked temporary is deleted."""
    parent = output.parent
    if not parent.is_dir():
        return []
    ours = []
    for path in parent.glob(f".{glob.escape(output.name)}.*"):
        found = _TEMPORARY.fullmatch(path.name)
        if found and found["name"] == output.name and path.is_dir() and not path.is_symlink() and (
                path / MARKER).is_file():
            ours.append(path)
    if output.is_dir() and (output / MARKER).is_file():
        (output / MARKER).unlink()
    olds = sorted((p for p in ours if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if not output.exists() and olds:
        olds[-1].rename(output)
        (output / MARKER).unlink()
        ours.remove(olds[-1])
    for path in ours:
        shutil.rmtree(path)
    return ours


def _marked(directory: Path) -> None:
    (directory / MARKER).write_text("a partial bitnet-convert output; the next run on this output removes it\n")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (``.NAME.tmp-PID``, its directory created) to write ``path``'s content to;
    when the block ends it replaces ``path`` in one rename, and on any failure it is removed, so ``path`` is never
    half-written (:func:`atomic_directory` does the same for a whole output directory)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(output: Path, overwrite: bool, inputs: Iterable[Path | str] = ()) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``output`` only when the block succeeds (under the output's
    lock; ``overwrite`` is checked again at the final rename). An ``OSError`` while writing is an
    :class:`OutputError` naming the output; a kill at any point leaves what :func:`remove_stale_temporaries`
    recovers."""
    check_output(output, overwrite, inputs)
    with output_lock(output):
        tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
                _marked(tmp)
                yield tmp
            except OSError as exc:
                raise OutputError(f"output '{output}' could not be written ({exc.strerror or exc}"
                                  f"{f': {exc.filename}' if exc.filename else ''})") from None
            check_output(output, overwrite)
            old = None
            marked = False
            try:
                if output.exists():
                    _marked(output)
                    marked = True
                    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
                    output.rename(old)
                tmp.rename(output)
                (output / MARKER).unlink()
            except OSError as exc:
                if old is not None and not output.exists():
                    old.rename(output)
                if marked and output.is_dir():
                    (output / MARKER).unlink(missing_ok=True)
                raise OutputError(f"output '{output}' could not be put in place ({exc.strerror or exc})") from None
            if old is not None:
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def scale_convention(model: torch.nn.Module, layout: str) -> None:
    """Put every linear of ``model`` in ``layout``'s scale convention before it is exported: ``bitlinear`` stores
    ``1/α`` that divides, ``autobitlinear`` ``α`` that multiplies (:meth:`QuantLinear.set_scale_convention`). A
    linear already in that convention (e.g. read from a checkpoint of that layout) is untouched; another one
    changes by about an ulp, so the exported file reloads to exactly the model in memory."""
    for module in quant_linears(model).values():
        module.set_scale_convention(layout == "bitlinear")


def export_tensors(
    model: torch.nn.Module, dtype: torch.dtype, layout: str = "autobitlinear"
) -> dict[str, torch.Tensor]:
    """The tensors to save, in a fixed order: packed linears as they are (``weight_scale`` in ``layout``'s
    convention, see :func:`scale_convention`), everything else cast to ``dtype``. Raises ``ValueError`` for a
    linear in the other convention."""
    linears = quant_linears(model)
    wrong = [name for name, m in linears.items() if m.scale_divides != (layout == "bitlinear")]
    if wrong:
        raise ValueError(f"linear '{wrong[0]}' is not in the {layout} scale convention; call scale_convention first")
    packed = {f"{name}.{key}" for name in linears for key in ("weight", "weight_scale", "bias")}
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
    return save_shards(shards, len(shards), directory)


def save_shards(shards: Iterable[dict[str, torch.Tensor]], count: int, directory: Path) -> list[Path]:
    """Save ``count`` shards, taken from ``shards`` one at a time (a generator keeps one shard in memory), as one
    ``model.safetensors`` (``count`` 1) or as ``model-IIIII-of-NNNNN.safetensors`` files plus the index
    transformers reads (``metadata.total_size`` in bytes, ``weight_map``). Returns the files written; a failed
    write is an ``OSError`` naming the file."""
    if count == 1:
        _save(next(iter(shards)), directory / SINGLE_FILE)
        return [directory / SINGLE_FILE]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, start=1):
        file = directory / f"model-{i:05d}-of-{count:05d}.safetensors"
        _save(shard, file)
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file.name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write one safetensors file; a failed write (disk full, a file-size limit) is an ``OSError`` naming the file
    (safetensors raises its own ``SafetensorError`` with the OS error in its text)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, file, metadata={"format": "pt"})
    except SafetensorError as exc:
        reason = str(exc).split("I/O error: ")[-1].split(" (os error")[0]
        raise OSError(None, f"{reason}; {free_space(file.parent)} free there", str(file)) from None
    file.chmod(0o644)  # safetensors writes through a private temp file (mode 0600)


def output_config(
    source: Checkpoint, roles: dict[Role, ActivationSpec], preset: str, dtype: str,
    attention: AttentionSpec | None = None,
    overrides: dict[str, ActivationSpec] | None = None,
    qwt: dict | None = None,
    layout: str = "autobitlinear",
) -> dict:
    """The input's config with the packed-storage ``quantization_config`` and the a4.8 spec; a family built from
    another transformers class than its own (1bitLLM) gets that class's ``model_type`` and ``architectures``."""
    family = source.family
    dropped = ("quantization_config", "bitnet_convert", *family.own_keys)
    config = {k: v for k, v in source.config.items() if k not in dropped}
    if family.export_model_type is not None:  # e.g. 1bitLLM: exported as the transformers class it is built from
        config.update(model_type=family.export_model_type, architectures=list(family.export_architectures))
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config["quantization_config"] = dict(BITLINEAR_CONFIG if layout == "bitlinear" else QUANTIZATION_CONFIG)
    if source.input_norm_eps is not None:  # exported as rms_norm.weight beside each linear
        config["quantization_config"].update(use_rms_norm=True, rms_norm_eps=source.input_norm_eps)
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
    return declared if declared in DTYPES else "bfloat16"


def export_layout(recipe: Recipe, source: Checkpoint) -> str:
    """The packed layout an export writes: the recipe's ``export.layout``, else the family's."""
    return recipe.export.layout or source.family.export_layout


def export(
    model: torch.nn.Module,
    source: Checkpoint,
    recipe: Recipe,
    *,
    roles: dict[Role, ActivationSpec],
    overrides: dict[str, ActivationSpec] | None = None,
    qwt: dict | None = None,
    report: Callable[[list[Path]], dict] | None = None,
    extra: Callable[[Path], None] | None = None,
    inputs: Iterable[Path | str] = (),
) -> Path:
    """Write ``model`` to ``recipe.output`` atomically, as the recipe's ``export`` section says (dtype, shard size,
    layout: :func:`export_layout`) with its scheme's description (``roles`` resolved for this model, per-linear
    ``overrides``, the ``qwt`` compensation's form, the attention spec) in ``config.json`` and the recipe beside it;
    ``report(files)`` returns the conversion report to store; ``extra(directory)`` writes more files into the output
    before it is moved into place. ``inputs`` are the paths the output must not overlap (see :func:`check_output`);
    the source checkpoint is always one. Returns the output directory."""
    output, dtype, layout = recipe.output, recipe.export.dtype, export_layout(recipe, source)
    preset, attention = recipe.scheme.preset, recipe.scheme.attention
    dtype_name = export_dtype_name(source, dtype)
    with atomic_directory(output, recipe.overwrite, [source.path, *inputs]) as tmp:
        files = write_safetensors(export_tensors(model, DTYPES[dtype_name], layout), tmp, recipe.export.max_shard_size)
        config = output_config(source, roles, preset, dtype_name, attention, overrides, qwt, layout)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (source.path / name).is_file():
                shutil.copyfile(source.path / name, tmp / name)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        if report is not None:
            (tmp / "conversion_report.json").write_text(json.dumps(report(files), indent=2) + "\n")
        if extra is not None:
            extra(tmp)
    return output


