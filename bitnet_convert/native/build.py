"""Native CPU kernels: build on first use, run-time ISA choice, weight repacking.

The C++ sources (``csrc/``: one file per kernel family and ``ops.cpp``, which registers them) are compiled with
``torch.utils.cpp_extension`` the first time a native op is needed and cached in
``$XDG_CACHE_HOME/bitnet-convert/kernels/<key>`` (default ``~/.cache``), where the key hashes the sources and
headers, torch's version, the Python version and the machine; a changed source or a different machine builds
anew. Concurrent first uses wait for one build, under a ``filelock`` lock the OS releases when its holder dies (a
build killed half-way is started again, never waited on), for at most ``BITNET_CONVERT_BUILD_WAIT`` seconds; a
finished build records its library's SHA-256, and a library that does not match it (a killed build's) is rebuilt.
The ops register under ``torch.ops.bitnet_convert``.

Each op takes an ``isa``: ``ISA_SCALAR`` (portable C++) or ``ISA_AVX2``; :func:`isa` picks AVX2 when the CPU has
AVX2 and FMA, unless ``BITNET_CONVERT_ISA=scalar``. Both paths give bit-identical results (tested).

Without a C++ compiler (or when the build fails) :func:`ensure_built` raises :class:`NativeUnavailable` with one
line saying why; ``backend="auto"`` then falls back to the reference backend with a warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bitnet_convert.errors import BackendError
from bitnet_convert.notes import warn
from bitnet_convert.quant.packing import unpack_ternary
from bitnet_convert.runtime.env import env_seconds

CSRC = Path(__file__).parent / "csrc"
#: The translation units of the build, and every file the build key hashes (headers included).
SOURCES = sorted(CSRC.glob("*.cpp"))
BUILD_INPUTS = sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")])
#: Inputs (or outputs) per packed block of the kernels' layouts; K and N are padded to a multiple of it.
BLOCK = 128
#: The bf16-weight GEMM (lm_head) reads 8 inputs per vector step: its K must be a multiple of this (see
#: :class:`bitnet_convert.native.backend.Bf16Linear`, which falls back to fp32 otherwise).
BF16_GEMM_K_MULTIPLE = 8
ISA_SCALAR, ISA_AVX2 = 0, 1
ISA_ENV = "BITNET_CONVERT_ISA"
#: How long a process waits for another one that is building the kernels (seconds; a cold build takes ~11 s on
#: two cores, so ten minutes means the other build is stuck, not slow); ``BITNET_CONVERT_BUILD_WAIT`` overrides.
BUILD_WAIT_S = 600.0
BUILD_WAIT_ENV = "BITNET_CONVERT_BUILD_WAIT"
# at::parallel_for is an inline template: without -fopenmp it compiles to a serial loop. The loader reuses the
# libgomp.so.1 torch already loaded (same soname), so there is one OpenMP runtime. Apple's clang has no -fopenmp.
OPENMP = [] if platform.system() == "Darwin" else ["-fopenmp"]
CFLAGS = ["-O3", "-std=c++17", *OPENMP]

_state: dict[str, object] = {}


class NativeUnavailable(BackendError):
    """The native backend cannot run here (no compiler, failed build, unsupported platform)."""


def cache_root() -> Path:
    """Where built kernels are cached (per machine: ``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitnet-convert" / "kernels"


def build_key() -> str:
    """Hash of everything a build depends on: sources and headers, flags, torch and Python versions, machine."""
    digest = hashlib.sha256()
    for path in BUILD_INPUTS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (" ".join(CFLAGS), torch.__version__, sys.version, platform.machine(), platform.platform()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _compiler() -> str | None:
    name = os.environ.get("CXX", "c++")
    return shutil.which(name) or (shutil.which("g++") if "CXX" not in os.environ else None)


def ensure_built() -> float:
    """Build (once per machine and source) and load the kernels; returns the seconds spent (0 when cached/loaded).

    Raises :class:`NativeUnavailable` with a one-line reason when no C++ compiler is found or the build fails (the
    compiler output is kept in ``build.log`` of the build directory).
    """
    if "loaded" in _state:
        return 0.0
    if "error" in _state:
        raise NativeUnavailable(str(_state["error"]))
    start = time.perf_counter()
    try:
        _build_and_load()
    except NativeUnavailable as exc:
        _state["error"] = str(exc)
        raise
    _state["loaded"] = True
    return time.perf_counter() - start


def _build_and_load() -> None:
    if platform.system() == "Windows":
        raise NativeUnavailable("native backend unavailable: the kernels build on Linux and macOS only")
    name = f"bitnet_convert_kernels_{build_key()}"
    directory = cache_root() / name
    library = directory / f"{name}.so"
    build_wait_s()  # a bad value is an error now, not when another build happens to run
    if _verified(library):  # a finished build needs neither compiler, ninja nor the lock
        _load(library)
        return
    if _compiler() is None:
        raise NativeUnavailable(f"native backend unavailable: no C++ compiler ({os.environ.get('CXX', 'c++')} not "
                                "found on PATH; install g++ or clang++, or set CXX)")
    _add_ninja_to_path()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeUnavailable(f"native backend unavailable: cannot create {directory.parent} ({exc.strerror})")\
            from None
    with _build_lock(directory):
        if not _verified(library):  # another process may have finished the build while this one waited
            _build(name, directory, library)
    _load(library)


def build_wait_s() -> float:
    """How long a process waits for another one building the kernels (``BITNET_CONVERT_BUILD_WAIT``, seconds)."""
    try:
        return env_seconds(BUILD_WAIT_ENV, BUILD_WAIT_S, at_least=0, at_most=86400)  # inf would wait forever again
    except ValueError as exc:
        raise NativeUnavailable(str(exc)) from None


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold the build lock of ``directory`` (one build at a time per machine and key).

    ``filelock`` takes an OS lock (``flock``/``LockFileEx``) that the kernel releases when its holder dies, so a
    build killed half-way (Ctrl-C, an OOM kill, a CI timeout) never leaves a lock to wait on — unlike
    cpp_extension's own ``lock`` file, which stays behind and makes every later ``load`` wait forever (it is
    removed before each build, under this lock). A live builder is waited for at most :func:`build_wait_s`
    seconds, with a line saying so."""
    from filelock import FileLock, Timeout

    lock = FileLock(directory.with_name(directory.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        wait = build_wait_s()
        warn(f"another process is building the native kernels in {directory}; waiting for it (at most {wait:g} s, "
             f"{BUILD_WAIT_ENV})")
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            raise NativeUnavailable(f"native backend unavailable: another process has been building the kernels in "
                                    f"{directory} for more than {wait:g} s ({BUILD_WAIT_ENV})") from None
    except (OSError, NotImplementedError) as exc:  # filelock 3.x on a file system without flock: NotImplementedError
        reason = getattr(exc, "strerror", None) or str(exc) or "the file system does not support file locks"
        raise NativeUnavailable(f"native backend unavailable: cannot take the build lock in {directory.parent} "
                                f"({reason}; set XDG_CACHE_HOME to a local directory)") from None
    try:
        yield
    finally:
        lock.release()


def _build(name: str, directory: Path, library: Path) -> None:
    """Compile the kernels into ``directory`` from scratch (call with the build lock held) and record the
    library's SHA-256 beside it; whatever an earlier build left there (cpp_extension's stale ``lock`` file, a
    half-written object or library) is removed first."""
    from torch.utils import cpp_extension

    try:
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    except OSError as exc:
        raise NativeUnavailable(f"native backend unavailable: cannot create {directory} ({exc.strerror})") from None
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=OPENMP,
                           build_directory=str(directory), is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError, SystemExit) as exc:
        log = directory / "build.log"
        log.write_text(str(exc))
        raise NativeUnavailable(f"native backend unavailable: building the kernels failed (compiler output in {log})")\
            from None
    _checksum_file(library).write_text(_sha256(library) + "\n")  # last: its presence means a complete build
    _state["loaded_path"] = str(library)  # cpp_extension.load has loaded it


def _checksum_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _verified(library: Path) -> bool:
    """Whether ``library`` is a complete build: its SHA-256 equals the one recorded when its build finished (a
    library truncated or damaged by a killed build, or without the record, is built again)."""
    try:
        return library.is_file() and _checksum_file(library).read_text().strip() == _sha256(library)
    except OSError:
        return False


def _load(library: Path) -> None:
    """Load the ops of a verified ``library`` (once per process); a library the loader still refuses (another
    machine's, a changed system library) is one line."""
    if _state.get("loaded_path") == str(library):
        return
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as exc:
        raise NativeUnavailable(f"native backend unavailable: cannot load {library} ({str(exc).splitlines()[0]}); "
                                f"delete {library.parent} to build it again") from None
    _state["loaded_path"] = str(library)


def _add_ninja_to_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the ``ninja`` package's binary is there only in an activated venv."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        raise NativeUnavailable("native backend unavailable: ninja not found (pip install ninja)") from None
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def isa() -> int:
    """The instruction set the ops use: AVX2 when the CPU has it, unless ``BITNET_CONVERT_ISA=scalar``."""
    ensure_built()
    wanted = os.environ.get(ISA_ENV, "auto").lower()
    if wanted not in ("auto", "avx2", "scalar"):
        raise NativeUnavailable(f"{ISA_ENV}={wanted!r}: expected auto, avx2 or scalar")
    has_avx2 = bool(torch.ops.bitnet_convert.cpu_has_avx2())
    if wanted == "avx2" and not has_avx2:
        raise NativeUnavailable(f"{ISA_ENV}=avx2 but this CPU has no AVX2/FMA")
    return ISA_AVX2 if has_avx2 and wanted != "scalar" else ISA_SCALAR


def padded(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`BLOCK`."""
    return -(-n // BLOCK) * BLOCK


def _interleave(u: torch.Tensor) -> torch.Tensor:
    """uint8 values ``[R, C]`` (C % 128 == 0, values 0..2) → ``[R, C/4]``: byte ``i`` of each 128-block holds
    elements ``32p + i`` in bits ``2p..2p+1``."""
    rows, cols = u.shape
    planes = u.view(rows, cols // BLOCK, 4, 32)
    out = planes[:, :, 0].clone()
    for p in range(1, 4):
        out |= planes[:, :, p] << (2 * p)
    return out.reshape(rows, cols // 4)


def rows_layout(packed: torch.Tensor) -> torch.Tensor:
    """The dense kernels' layout from transformers' packing: uint8 ``[N/4, K]`` → ``[N, Kp/4]`` (see the C++
    file). Memory stays 2 bits per weight plus padding to a multiple of 128 inputs."""
    u = (unpack_ternary(packed) + 1).view(torch.uint8)  # [N, K], value + 1
    n, k = u.shape
    full = torch.ones(n, padded(k), dtype=torch.uint8)
    full[:, :k] = u
    return _interleave(full)


def cols_layout(packed: torch.Tensor) -> torch.Tensor:
    """The sparse-input kernel's layout: uint8 ``[N/4, K]`` → ``[Kp, Np/4]``, column-contiguous (input ``k``'s
    weights for all outputs in one run of ``Np/4`` bytes, outputs in blocks of 128 as the rows layout holds inputs;
    see ``csrc/ops.cpp``). Memory stays 2 bits per weight plus padding to multiples of 128."""
    u = (unpack_ternary(packed) + 1).view(torch.uint8)
    n, k = u.shape
    full = torch.ones(padded(k), padded(n), dtype=torch.uint8)
    full[:k, :n] = u.t()
    return _interleave(full)
