"""Which torch device a run uses: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the recipe's ``device``, ``--device``).

Block-by-block stages (calibration, QwT, block-wise recovery) move one decoder block at a time to the device
(:class:`bitnet_convert.runtime.blocks.BlockRunner`); whole-model work (the fine-tune, eval, perplexity) moves the
model.
Under ``torchrun`` a plain ``cuda`` (or ``auto`` on a GPU machine) means each process's own GPU, ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from bitnet_convert.errors import BitNetConvertError

#: The spellings a device may take.
DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


class DeviceError(BitNetConvertError, ValueError):
    """A device this machine does not have, or a name that is not a device."""


def resolve_device(name: str, where: str = "--device") -> torch.device:
    """The ``torch.device`` for ``name`` on this machine, checked before any work.

    ``auto`` is the first (or, under ``torchrun``, the process's ``LOCAL_RANK``) CUDA device when CUDA is
    available, else the CPU. Raises :class:`DeviceError` (one line naming ``where`` and the value) for an unknown
    name, for ``cuda`` without CUDA, and for an index beyond the GPUs present."""
    text = str(name).strip().lower()
    if not DEVICE_PATTERN.match(text):
        raise DeviceError(f"{where} '{name}' is not a device; expected cpu, cuda, cuda:N or auto")
    if text == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if text == "auto" and not available:
        return torch.device("cpu")
    if not available:
        built = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise DeviceError(f"{where} '{name}': CUDA is not available on this machine ({built}); use --device cpu "
                          "or --device auto")
    count = torch.cuda.device_count()
    if ":" in text and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DeviceError(f"{where} '{name}' under torchrun would put every process on one GPU; give {where} cuda "
                          "(each process takes cuda:LOCAL_RANK)")
    index = int(text.split(":")[1]) if ":" in text else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= count:
        raise DeviceError(f"{where} '{name}': this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1})")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:N (GPU name)`` for the reports."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first parameter or buffer (the CPU for a module with neither)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run the block with one intra-op CPU thread (the caller's setting restored after it). For the few small
    LAPACK calls whose result decides stored bytes (QwT's ridge solve and eigendecomposition): MKL's LU and
    eigensolvers split their work among the threads, so their last bits follow the thread count (measured: a
    193×193 solve differs at 1 and 2 threads), while "same recipe and seed → the same bytes" must hold on any
    machine setting. Cost: the solve of a ``d``×``d`` system on one core (2B-4T, d = 2560: about a second per
    block)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
