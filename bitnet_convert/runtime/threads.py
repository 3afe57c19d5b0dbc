"""A thread count that follows the free cores, for the native backend's forward calls.

Why: torch's CPU kernels and ours split each op over an OpenMP team, and every op ends at a barrier where the
team's threads spin until the last one arrives. When another process keeps a core busy, one of our threads is
descheduled for a whole time slice at some barrier of nearly every op, and a decoded token, which runs hundreds of
small ops, becomes several times slower than on one thread (measured: 2B-4T shapes, 2 cores, a busy neighbour:
0.26× the quiet speed at 2 threads; see docs/native.md). Running with as many threads as there are free cores
avoids that. The free cores are read from the kernel's CPU accounting (psutil): the CPU time the whole system spent
busy over the last window, minus this process's own CPU time, is what the other processes used.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import psutil
import torch
from torch import nn

#: The shortest window over which the other processes' CPU use is measured: /proc/stat counts in 10 ms ticks, so a
#: shorter window would be mostly rounding.
WINDOW_S = 0.25
#: ``thread_policy`` choices of :func:`set_thread_policy`.
THREAD_POLICIES = ("free-cores", "fixed")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _system_busy_s() -> float:
    """CPU seconds the whole system has spent busy since boot (all states but idle and I/O wait; guest time is
    already counted in user time on Linux, so it is taken out once)."""
    times = psutil.cpu_times()
    spent = sum(times) - times.idle
    for name in ("iowait", "guest", "guest_nice"):
        spent -= getattr(times, name, 0.0)
    return spent


def _own_busy_s() -> float:
    """CPU seconds this process has spent (all its threads, user and system)."""
    times = os.times()
    return times.user + times.system


@dataclass
class FreeCoreThreads:
    """Chooses torch's intra-op thread count for each forward call: the free cores, rounded to the nearest whole
    core, at least 1 and at most the count the caller had set (``torch.get_num_threads()`` before the call).
    The measurement is renewed at most every :data:`WINDOW_S` seconds; between renewals a call reuses the last
    choice. The caller's count is restored after each call, so the setting outside the model is never changed.
    Results do not depend on the count: the native kernels split work so that each output is summed by one thread
    (tested at 1, 2 and 3 threads)."""

    cores: int = field(default_factory=usable_cores)
    #: the count chosen at the last renewal, and the other processes' cores measured then
    chosen: int | None = None
    others: float | None = None
    _sampled_at: float = field(default_factory=time.monotonic)
    _busy: float = field(default_factory=_system_busy_s)
    _own: float = field(default_factory=_own_busy_s)
    _saved: list[int] = field(default_factory=list)

    def others_cores(self) -> float | None:
        """Cores the other processes kept busy on average since the last sample, when a window has passed (the
        sample is then renewed), else ``None``."""
        now = time.monotonic()
        if now - self._sampled_at < WINDOW_S:
            return None
        busy, own = _system_busy_s(), _own_busy_s()
        others = ((busy - self._busy) - (own - self._own)) / (now - self._sampled_at)
        self._sampled_at, self._busy, self._own = now, busy, own
        return max(0.0, others)

    def threads(self, limit: int) -> int:
        """The thread count for the next call, at most ``limit``."""
        others = self.others_cores()
        if others is not None:
            self.others = others
            self.chosen = max(1, math.floor(self.cores - others + 0.5))
        return min(limit, self.chosen if self.chosen is not None else limit)

    def before(self, _module: nn.Module, _args: tuple, _kwargs: dict) -> None:
        limit = torch.get_num_threads()
        self._saved.append(limit)
        count = self.threads(limit)
        if count != limit:
            torch.set_num_threads(count)

    def after(self, _module: nn.Module, _args: tuple, _kwargs: dict, _output: object) -> None:
        if self._saved:
            limit = self._saved.pop()
            if torch.get_num_threads() != limit:
                torch.set_num_threads(limit)


def set_thread_policy(model: nn.Module, policy: str) -> None:
    """``free-cores`` (the native backend's default): each forward call of ``model`` runs on as many threads as
    there are free cores (:class:`FreeCoreThreads`); ``fixed``: on ``torch.get_num_threads()``, whatever else the
    machine runs. Raises ``ValueError`` for another policy."""
    if policy not in THREAD_POLICIES:
        raise ValueError(f"thread policy '{policy}' is unknown; expected one of {', '.join(THREAD_POLICIES)}")
    for handle in getattr(model, "_bitnet_thread_hooks", ()):
        handle.remove()
    model._bitnet_thread_hooks = ()
    if policy == "free-cores":
        governor = FreeCoreThreads()
        model._bitnet_thread_hooks = (
            model.register_forward_pre_hook(governor.before, with_kwargs=True),
            model.register_forward_hook(governor.after, with_kwargs=True, always_call=True),
        )


def thread_policy(model: nn.Module) -> str:
    """The policy :func:`set_thread_policy` last set on ``model`` (``fixed`` when none)."""
    return "free-cores" if getattr(model, "_bitnet_thread_hooks", ()) else "fixed"
