"""Data-parallel work under ``torchrun``: which process this is, which windows it owns, and the reductions.

Launched as ``torchrun --nproc-per-node N bitnet-convert quantize …``, every process builds the whole model and
owns the calibration windows (or batches) ``i`` with ``i % N == rank``; statistics and gradients are summed over
the processes with ``torch.distributed`` (``gloo`` on the CPU, ``nccl`` on GPUs), so N processes compute what one
process computes on all the windows, up to the order of float additions. Only rank 0 writes files.

Why gradients are all-reduced here rather than by ``DistributedDataParallel``: what trains (latent weights, norm
weights, QwT buffers) is not the module's registered parameter set, and the losses are ratios of global sums that
each process scales itself (see :func:`sum_gradients`), which DDP's averaging would get wrong for uneven shards.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is the single-process identity.

Every wait is bounded: joining the group and each collective wait at most :func:`timeout_s` seconds
(``BITNET_CONVERT_DIST_TIMEOUT``, default 30 minutes: rank 0 writes a large export while the others wait). A process
that stopped (torchrun then ends the others) or never came is one line (:class:`DistributedError`) naming what
was waited for, not a hang or a gloo/NCCL traceback.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from bitnet_convert.errors import BitNetConvertError, RecipeError
from bitnet_convert.runtime.env import env_seconds

TIMEOUT_ENV = "BITNET_CONVERT_DIST_TIMEOUT"
#: Seconds a process waits for the others: to join the group, and at each collective (rank 0 may write a large
#: export or training state meanwhile).
TIMEOUT_S = 1800.0
#: The longest wait that may be asked for (a week): a bound is the point, and torch's timedelta overflows on inf.
MAX_WAIT_S = 7 * 24 * 3600.0


class DistributedError(BitNetConvertError):
    """Another ``torchrun`` process stopped or did not answer in time; the message says what was waited for."""


def timeout_s() -> float:
    """How long a process waits for the others (``BITNET_CONVERT_DIST_TIMEOUT`` seconds, default
    :data:`TIMEOUT_S`); :class:`~bitnet_convert.errors.RecipeError` for a value that is not a positive number."""
    try:
        return env_seconds(TIMEOUT_ENV, TIMEOUT_S, above=0, at_most=MAX_WAIT_S)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


#: Words of gloo's and the TCP store's messages for a peer that is gone or a wait that ran out.
_GONE = ("timed out", "timeout", "connection", "closed", "reset", "refused", "broken pipe", "clients joined")


@contextmanager
def _waiting_for(what: str) -> Iterator[None]:
    """A failed wait on the other processes as one :class:`DistributedError` line (gloo and the TCP store raise
    ``RuntimeError`` with a C++ location for a peer that died or a timeout); another failure of the same call
    (a backend not built in, an address in use) is one line too, saying that instead. NCCL reports a stuck
    collective itself: its watchdog ends the process after the same timeout."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if isinstance(exc, BitNetConvertError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason  # drop gloo's source location
        me = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")  # no group yet: the launcher's
        who = f"process {me} of {os.environ.get('WORLD_SIZE', '?')} (torchrun)"
        if any(word in reason.lower() for word in _GONE):
            raise DistributedError(f"{who} waited for the others to {what} and gave up ({reason}); a process that "
                                   f"stopped says why in its own output (waits are bounded by {TIMEOUT_ENV}="
                                   f"{timeout_s():g} s)") from None
        raise DistributedError(f"{who} could not {what} ({reason})") from None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """Whether this process writes files and prints (rank 0 of the group; without a group, the launcher's
    ``RANK`` 0, so a command whose group has ended still prints once)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0 if launched() else True


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher setting ``WORLD_SIZE`` > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> bool:
    """Join the launcher's process group when there is one (``gloo`` for the CPU, ``nccl`` for CUDA); returns
    whether this call created it (the caller then destroys it with :func:`shutdown`). Raises
    :class:`~bitnet_convert.errors.RecipeError` when the launcher's variables are incomplete."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RecipeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the launcher variable(s) {', '.join(missing)} "
                          "are not set: start several processes with torchrun --nproc-per-node N bitnet-convert …")
    if device.type == "cuda":  # CUDA tensors over NCCL; the CPU-side sums and objects over gloo
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    # rank 0 alone writes the output and the training states: the others may wait long at the next collective
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    with _waiting_for(f"join the process group at {address}"):
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        with _waiting_for("reach the same step (barrier)"):
            dist.barrier()


def owned(count: int) -> list[int]:
    """The indices ``0 … count−1`` this process owns (``i % world_size == rank``)."""
    return list(range(rank(), count, world_size()))


def owned_batches(rows: int, batch_size: int) -> dict[int, slice]:
    """The batches of ``batch_size`` of ``rows`` rows that this process owns (:func:`owned`), by batch index, as
    row slices."""
    return {b: slice(b * batch_size, (b + 1) * batch_size) for b in owned(-(-rows // batch_size))}


def sum_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place (one flat all-reduce per dtype and device)."""
    tensors = [t for t in tensors if t is not None]
    if world_size() == 1 or not tensors:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        with _waiting_for("sum their tensors (all-reduce)"):
            dist.all_reduce(flat)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def max_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Element-wise maximum of each tensor over the processes, in place."""
    if world_size() == 1:
        return
    for tensor in tensors:
        with _waiting_for("take the maximum of their tensors (all-reduce)"):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def sum_floats(*values: float) -> list[float]:
    """Python numbers summed over the processes (in float64)."""
    total = torch.tensor(values, dtype=torch.float64)
    sum_tensors([total])
    return total.tolist()


def sum_gradients(tensors: Iterable[torch.Tensor]) -> None:
    """Sum the ``.grad`` of each trained tensor over the processes. Each process's loss is its share of the global
    loss (its rows' part of a sum divided by the global normalizer), so the sum is the global gradient."""
    if world_size() == 1:
        return
    tensors = list(tensors)
    for tensor in tensors:  # a process whose rows did not reach a tensor still sends its (zero) share
        if tensor.grad is None:
            tensor.grad = torch.zeros_like(tensor)
    sum_tensors([t.grad for t in tensors])


def gather_objects(value: object) -> list[object]:
    """Every process's ``value``, in rank order (a list of one without ``torchrun``)."""
    if world_size() == 1:
        return [value]
    result: list[object] = [None] * world_size()
    with _waiting_for("exchange their results (all-gather)"):
        dist.all_gather_object(result, value)
    return result


def same_everywhere(value: object, what: str) -> None:
    """Check that every process sees the same ``value`` (e.g. which saved states exist); a
    :class:`~bitnet_convert.errors.RecipeError` naming ``what`` otherwise (a collective would deadlock later)."""
    values = gather_objects(value)
    if any(v != values[0] for v in values):
        raise RecipeError(f"the {world_size()} processes do not see the same {what} (rank 0: {values[0]!r}, others: "
                          f"{next(v for v in values[1:] if v != values[0])!r}); put it on a filesystem every process "
                          "shares")


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` in every process."""
    return gather_objects(value)[0]


def check_batch(name: str, batch_size: int) -> None:
    """Every process needs rows of each global batch: ``batch_size`` ≥ the number of processes."""
    if batch_size < world_size():
        raise RecipeError(f"{name}={batch_size} is smaller than the {world_size()} processes torchrun started; "
                          f"raise it to at least {world_size()} (each process takes a share of every batch)")
