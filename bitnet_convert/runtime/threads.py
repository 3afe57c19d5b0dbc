"""A thread count that follows the free cores, for the native backend's forward calls.

Why: torch's CPU kernels and ours split each op over an OpenMP team, and every op ends at a barrier where the
team's threads spin until the last one arrives. When another process keeps a core busy, one of our threads is
descheduled for a whole time slice at some barrier of nearly every op, and a decoded token, which runs hundreds of
small ops, becomes slower than on one thread (measured on 2 cores with one busy Python loop beside it: 2 threads
kept 0.26–0.33 of their quiet decode speed, 4- and 30-layer 2B-4T shapes; see docs/native.md). Running with as
many threads as there are free cores avoids that. The free cores are read from the kernel's CPU accounting
(psutil): the CPU time the CPUs this process may run on spent busy over the last window, minus this process's own
CPU time, is what the other processes used.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn

#: The shortest window over which the other processes' CPU use is measured: /proc/stat counts in 10 ms ticks, so a
#: shorter window would be mostly rounding.
WINDOW_S = 0.25
#: ``thread_policy`` choices of :func:`set_thread_policy`.
THREAD_POLICIES = ("free-cores", "fixed")


def _usable_cpus() -> list[int] | None:
    """The CPU numbers this process may run on, or ``None`` where the OS does not say (then: every CPU)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else the CPU count)."""
    cpus = _usable_cpus()
    return len(cpus) if cpus is not None else os.cpu_count() or 1


def _system_busy_s() -> float:
    """CPU seconds the CPUs this process may run on have spent busy since boot (all states but idle and I/O wait;
    guest time is already counted in user time on Linux, so it is taken out once). Only those CPUs: in a container
    pinned to 2 of a host's 64 CPUs, the other 62 are not free cores for this process."""
    per_cpu = psutil.cpu_times(percpu=True)
    cpus = _usable_cpus()
    allowed = None if cpus is None else set(cpus)
    spent = 0.0
    for index, times in enumerate(per_cpu):
        if allowed is not None and index not in allowed:
            continue
        spent += sum(times) - times.idle
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

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` on :meth:`threads` threads; the caller's count is restored however the
        call ends (``finally``: also on Ctrl-C, which a forward hook would not see)."""
        limit = torch.get_num_threads()
        count = self.threads(limit)
        if count != limit:
            torch.set_num_threads(count)
        try:
            return function(*args, **kwargs)
        finally:
            if count != limit:
                torch.set_num_threads(limit)


class FreeCoreForward:
    """A model's forward run by a :class:`FreeCoreThreads` (set as the model's ``forward``). It shows the wrapped
    forward's signature, which transformers' ``generate`` inspects to choose its keyword arguments."""

    def __init__(self, governor: FreeCoreThreads, inner: Callable[..., Any], previous: Any) -> None:
        self.governor, self.inner, self.previous = governor, inner, previous

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.governor.run(self.inner, *args, **kwargs)


def set_thread_policy(model: nn.Module, policy: str) -> None:
    """``free-cores`` (the native backend's default): each forward call of ``model`` runs on as many threads as
    there are free cores (:class:`FreeCoreThreads`); ``fixed``: on ``torch.get_num_threads()``, whatever else the
    machine runs. Raises ``ValueError`` for another policy."""
    if policy not in THREAD_POLICIES:
        raise ValueError(f"thread policy '{policy}' is unknown; expected one of {', '.join(THREAD_POLICIES)}")
    installed = vars(model).get("forward")
    if isinstance(installed, FreeCoreForward):  # back to the forward the model had before
        del vars(model)["forward"]
        if installed.previous is not None:
            model.forward = installed.previous
    if policy == "free-cores":
        previous = vars(model).get("forward")  # an instance-level forward someone set, else None (the class's)
        model.forward = FreeCoreForward(FreeCoreThreads(), model.forward, previous)


def run_with_policy(model: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on the thread count ``model``'s policy chooses for its forward calls (for work on the
    model that does not go through its forward, such as the server's batched decode step)."""
    installed = vars(model).get("forward")
    if isinstance(installed, FreeCoreForward):
        return installed.governor.run(function, *args)
    return function(*args)


def thread_policy(model: nn.Module) -> str:
    """The policy :func:`set_thread_policy` last set on ``model`` (``fixed`` when none)."""
    return "free-cores" if isinstance(vars(model).get("forward"), FreeCoreForward) else "fixed"
