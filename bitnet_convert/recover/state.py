"""Training states kept between runs (block-wise recovery's finished blocks, the fine-tune's steps): written
atomically, verified on load, and tied to what they were trained on.

A state file holds ``version``, ``fingerprint`` (see :func:`fingerprint`: the recipe *and* the content of the
model and data it trained on), the state itself, and ``checksum``: a SHA-256 of all of it, tensors by their
bytes (:func:`content_digest`). ``torch.load`` does not verify the CRCs of its zip records (a flipped byte in a
tensor loads as a wrong value), so the checksum is ours. A state that does not match is refused with one line,
never resumed from: another recipe or other inputs (the fingerprint), another format (the version), a damaged or
truncated file (the checksum or the loader).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from bitnet_convert.errors import OutputError


def content_digest(value: Any, digest: Any | None = None) -> str:
    """SHA-256 (hex) of a nested value of dicts (keys sorted by their text), lists, tuples, tensors (dtype, shape
    and bytes, on the CPU) and JSON scalars: equal exactly when the values are."""
    top = digest is None
    digest = hashlib.sha256() if top else digest
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {list(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # no copy
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=str):
            digest.update(f"{type(key).__name__} {key!s};".encode())
            content_digest(value[key], digest)
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            content_digest(item, digest)
    else:
        digest.update(f"{type(value).__name__} {json.dumps(value, default=str)};".encode())
    return digest.hexdigest() if top else ""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex, 16 digits) of a tensor's dtype, shape and values (e.g. the calibration windows)."""
    return content_digest(tensor)[:16]


_FILE_DIGESTS: dict[tuple, str] = {}


def files_digest(paths: list[Path]) -> str:
    """SHA-256 (hex, 16 digits) of the contents of ``paths`` (a checkpoint's config and weight files), in their
    order; each file read once per process while its size and modification time stay the same."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _FILE_DIGESTS:
            with path.open("rb") as file:
                _FILE_DIGESTS[key] = hashlib.file_digest(file, "sha256").hexdigest()
        digest.update(f"{path.name} {_FILE_DIGESTS[key]};".encode())
    return digest.hexdigest()[:16]


def fingerprint(data: dict) -> str:
    """A short hash of what decides a training result (recipe fields, input digests)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_state(directory: Path, state: dict, name: str, section: str) -> None:
    """Write ``state`` with its checksum as ``directory/name``, atomically (a temporary file renamed into place).
    A write that fails (no permission, disk full, a directory in the way) is one
    :class:`~bitnet_convert.errors.OutputError` naming the file and ``recovery.<section>.checkpoint_dir``; the
    temporary file is removed."""
    from bitnet_convert.io.export import atomic_file, free_space

    file = directory / name
    try:
        with atomic_file(file) as tmp:
            torch.save({**state, "checksum": content_digest(state)}, tmp)
    except (OSError, RuntimeError) as exc:  # torch's zip writer raises RuntimeError for a failed write
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the write failed"
        raise OutputError(f"cannot write the training state '{file}' ({reason}; {free_space(directory)} free "
                          f"there); free space or choose "
                          f"another directory with recovery.{section}.checkpoint_dir") from None


def read_state(file: Path, what: str) -> dict:
    """The verified content of state file ``file`` (without its checksum); ``ValueError`` naming the file for a
    file that cannot be read or whose checksum does not match (damaged, truncated, or written by a version
    without checksums)."""
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"{file}: unreadable {what} state ({type(exc).__name__}); delete it to start over") from None
    checksum = state.pop("checksum", None) if isinstance(state, dict) else None
    if checksum is None or checksum != content_digest(state):
        raise ValueError(f"{file}: damaged {what} state (its checksum does not match its content); delete it to "
                         "start over")
    return state


def _remove_orphaned_temporaries(directory: Path, name: str) -> None:
    """Delete ``.NAME.tmp-PID`` files that a killed :func:`save_state` left (their process is gone)."""
    for tmp in directory.glob(f".{name}.tmp-*") if directory.is_dir() else ():
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


def load_state(directory: Path, expected: str, name: str, version: int, what: str, section: str) -> dict | None:
    """The saved state ``directory/name`` (``None`` when there is none), verified (:func:`read_state`). A state
    trained on another recipe or other inputs (``fingerprint`` ≠ ``expected``) or of another ``version`` is a
    ``ValueError``, never silently resumed. ``what`` and ``section`` (``recovery.<section>``) name the stage in the
    messages."""
    file = directory / name
    _remove_orphaned_temporaries(directory, name)
    if not file.is_file():
        return None
    state = read_state(file, what)
    if state.get("version") != version or state.get("fingerprint") != expected:
        raise ValueError(f"{file}: {what} state of a different recipe, model or data (the recipe, or the content "
                         f"of the model or of the text it trained on, changed); delete '{directory}' to start over, "
                         f"or set recovery.{section}.checkpoint_dir")
    return state
