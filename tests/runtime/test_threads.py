"""The thread count that follows the free cores (``runtime/threads.py``): it measures a real busy neighbour
process, chooses fewer threads while it runs, sets the count only inside the model's forward call (restored after
it, also when the call raises or is interrupted), keeps the forward's signature, and is what the native backend
uses unless told ``fixed``."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from bitnet_convert.runtime import threads
from bitnet_convert.runtime.threads import FreeCoreThreads, set_thread_policy, thread_policy


class CountRecorder(nn.Module):
    """Records torch's thread count inside its forward; raises when given a negative input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        if x.item() < 0:
            raise RuntimeError("asked to fail")
        return x


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_a_busy_neighbour_process_is_measured_and_takes_a_core():
    governor = FreeCoreThreads(cores=2)
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # the neighbour is running
        governor.others_cores()  # a window that began before it started is not the one measured
        time.sleep(threads.WINDOW_S + 0.3)
        count = governor.threads(2)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert governor.others >= 0.7 and count == governor.chosen == 1
    assert governor.threads(4) == 1  # the choice holds until the next window
    assert governor.others_cores() is None  # no window has passed since


def test_the_count_is_set_inside_the_call_only_and_restored_however_it_ends(two_threads):
    recorder = CountRecorder()
    set_thread_policy(recorder, "free-cores")
    governor = vars(recorder)["forward"].governor
    governor.chosen, governor._sampled_at = 1, time.monotonic() + 3600  # no renewal in this test
    recorder(torch.tensor(1.0))
    assert recorder.seen == [1] and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="asked to fail"):
        recorder(torch.tensor(-1.0))
    assert recorder.seen == [1, 1] and torch.get_num_threads() == 2
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: not an Exception, which a forward hook would miss
        governor.run(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # the caller's count is the limit: never more threads than it asks for
    governor.chosen = 2
    recorder(torch.tensor(1.0))
    assert recorder.seen[-1] == 1 and torch.get_num_threads() == 1


def test_the_policy_is_set_and_removed_and_an_unknown_one_is_refused(two_threads):
    recorder = CountRecorder()
    assert thread_policy(recorder) == "fixed"
    set_thread_policy(recorder, "free-cores")
    set_thread_policy(recorder, "free-cores")  # set twice: one wrapper, around the model's own forward
    assert thread_policy(recorder) == "free-cores"
    assert vars(recorder)["forward"].inner == recorder.__class__.forward.__get__(recorder)
    assert list(inspect.signature(recorder.forward).parameters) == ["x"]  # what generate() inspects
    set_thread_policy(recorder, "fixed")
    assert thread_policy(recorder) == "fixed" and "forward" not in vars(recorder)
    with pytest.raises(ValueError, match="thread policy 'busy' is unknown; expected one of free-cores, fixed"):
        set_thread_policy(recorder, "busy")
