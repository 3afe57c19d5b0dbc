"""The kernels' first build as a user meets it: killed half-way, damaged, or running in another process. Each case
starts real processes on a cold cache (its own ``XDG_CACHE_HOME``) and bounds every wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock
from helpers import REFERENCE

from bitnet_convert.native import build as kernels

BUILD = "import bitnet_convert.native.build as k; k.ensure_built(); print('isa', k.isa())"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(cache), **extra}


def _build_dir(cache: Path) -> Path:
    return cache / "bitnet-convert" / "kernels" / f"bitnet_convert_kernels_{kernels.build_key()}"


def _build_in_subprocess(cache: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BUILD], env=_env(cache), capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_a_build_killed_half_way_is_built_again_and_a_damaged_library_too(tmp_path):
    directory = _build_dir(tmp_path)
    first = subprocess.Popen([sys.executable, "-c", BUILD], env=_env(tmp_path), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (directory / "build.ninja").is_file():  # cpp_extension writes it just before the compiler runs
            assert first.poll() is None and time.monotonic() < deadline, "the first build never started compiling"
            time.sleep(0.05)
        time.sleep(1.0)  # the compiler is running
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the whole process group, as Ctrl-C in a terminal or a CI timeout
        except ProcessLookupError:
            pass
        first.wait()
    assert (directory / "lock").exists()  # what made every later run wait forever

    second = _build_in_subprocess(tmp_path)  # must finish (the timeout fails the test instead of hanging CI)
    assert second.returncode == 0 and second.stdout.startswith("isa "), second.stderr[-2000:]
    assert not (directory / "lock").exists()

    library = directory / f"{directory.name}.so"
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])  # a half-written library
    third = _build_in_subprocess(tmp_path)
    assert third.returncode == 0 and third.stdout.startswith("isa "), third.stderr[-2000:]
    assert kernels._verified(library)


def test_a_live_build_is_waited_for_with_a_bound_and_a_line(tmp_path):
    directory = _build_dir(tmp_path)
    directory.parent.mkdir(parents=True)
    with FileLock(directory.with_name(directory.name + ".lock")):  # another process is building
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "bitnet_convert.cli", "perplexity", str(REFERENCE), "--backend", "native"],
            env=_env(tmp_path, BITNET_CONVERT_BUILD_WAIT="1"), capture_output=True, text=True, timeout=120,
            check=False)
        waited = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("warning: another process is building the native kernels in ")
    assert "waiting for it (at most 1 s, BITNET_CONVERT_BUILD_WAIT)" in lines[0]
    assert lines[-1].startswith("error: native backend unavailable: another process has been building the kernels")
    assert "Traceback" not in result.stderr and waited < 60


def test_a_bad_build_wait_is_one_line(monkeypatch, tmp_path):
    import pytest

    for value in ("soon", "-5", "nan", "inf"):  # inf would be a wait without a bound again
        monkeypatch.setenv("BITNET_CONVERT_BUILD_WAIT", value)
        with pytest.raises(kernels.NativeUnavailable, match=rf"^BITNET_CONVERT_BUILD_WAIT='{value}': expected a "
                                                            "number of seconds from 0 to 86400$"):
            kernels.build_wait_s()
    monkeypatch.setenv("BITNET_CONVERT_BUILD_WAIT", "")
    assert kernels.build_wait_s() == kernels.BUILD_WAIT_S
