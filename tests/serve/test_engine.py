"""The continuous-batching engine of ``bitnet-convert serve``: batch-invariant tokens, sampling, stop strings,
cancellation, the queue bound."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import PROMPTS, REPO, generate_texts

from bitnet_convert.io.load import load, load_tokenizer
from bitnet_convert.serve import engine as engine_module
from bitnet_convert.serve.engine import Engine, EngineStopped, QueueFull, Request, Sampling, sample, sendable


class Collector:
    """A request's sink: the streamed pieces and the last event."""

    def __init__(self) -> None:
        self.pieces, self.last, self.done = [], None, threading.Event()

    def __call__(self, event) -> None:
        self.pieces.append(event.text)
        if event.finish is not None:
            self.last = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def run_all(engine, tokenizer, prompts, sampling):
    sinks = [Collector() for _ in prompts]
    for index, (prompt, sink) in enumerate(zip(prompts, sinks, strict=True)):
        engine.submit(Request(str(index), tokenizer(prompt).input_ids, sampling, sink))
    for sink in sinks:
        assert sink.done.wait(120), "the engine did not finish a request"
    return sinks


@pytest.fixture(scope="module")
def native_model(reference_dir):
    return load(reference_dir, backend="native"), load_tokenizer(reference_dir)


@pytest.fixture(scope="module")
def a48_qwt(tmp_path_factory):
    import bitnet_convert

    return bitnet_convert.quantize(REPO / "recipes/a48-qwt.yaml", output=str(tmp_path_factory.mktemp("qwt") / "qwt"),
                                   calibration__samples=8, calibration__batch_size=4, calibration__seq_len=64).output


@pytest.mark.parametrize("case", ["native", "native-a48-kv3", "native-a48-qwt", "reference"])
def test_a_batch_gives_each_prompt_the_tokens_generate_gives_it(case, native_model, reference_dir, a48_reference,
                                                                request):
    """Four prompts through an engine of batch 3 (the fourth joins when one leaves): each gets generate's greedy
    text. On the native backend the sequences share decode steps (more rows than steps); QwT's compensation (a
    forward hook of each layer) is applied per row."""
    kv_bits = 3 if case.endswith("kv3") else None
    if case == "native":
        model, tokenizer = native_model
    else:
        path = request.getfixturevalue("a48_qwt") if "qwt" in case else a48_reference if "a48" in case \
            else reference_dir
        model, tokenizer = load(path, backend="native" if "native" in case else "reference"), load_tokenizer(path)
    expected = generate_texts(model, tokenizer, PROMPTS, 40, kv_bits)
    engine = Engine(model, tokenizer, max_batch=3, kv_bits=kv_bits).start()
    try:
        sinks = run_all(engine, tokenizer, PROMPTS, Sampling(max_tokens=40, temperature=0))
    finally:
        engine.stop()
    assert [s.text for s in sinks] == expected
    assert all(s.last.finish in ("length", "stop") for s in sinks)
    assert engine.stats.batched_rows > engine.stats.steps  # several sequences per step
    assert engine.stats.peak_active == 3


def test_a_seeded_request_samples_the_same_text_whatever_runs_beside_it(native_model):
    model, tokenizer = native_model
    seeded = Sampling(max_tokens=24, temperature=0.9, top_p=0.9, seed=7)
    state = torch.get_rng_state()
    engine = Engine(model, tokenizer, max_batch=4).start()
    try:
        alone = run_all(engine, tokenizer, PROMPTS[:1], seeded)[0].text
        beside = run_all(engine, tokenizer, PROMPTS[:1] * 3, seeded)
        other = run_all(engine, tokenizer, PROMPTS[:1], Sampling(max_tokens=24, temperature=0.9, seed=8))[0].text
    finally:
        engine.stop()
    assert [s.text for s in beside] == [alone] * 3
    assert other != alone
    assert torch.equal(torch.get_rng_state(), state)  # the user's global RNG is left as it was


def test_a_stop_string_cuts_the_text_and_is_never_streamed_in_part(native_model):
    """The greedy continuation of PROMPTS[0] has "Millwood"; with stop "Millwood" the text ends before it, and
    no streamed piece holds its start ("Mill")."""
    model, tokenizer = native_model
    full = generate_texts(model, tokenizer, PROMPTS[:1], 40)[0]
    assert "Millwood" in full
    engine = Engine(model, tokenizer).start()
    try:
        sink = run_all(engine, tokenizer, PROMPTS[:1], Sampling(max_tokens=40, temperature=0, stop=("Millwood",)))[0]
    finally:
        engine.stop()
    assert sink.text == full[: full.index("Millwood")]
    assert sink.last.finish == "stop"
    assert not any("Mill" in piece for piece in sink.pieces)


def test_a_cancelled_request_leaves_at_the_next_step_and_the_others_keep_their_tokens(native_model):
    model, tokenizer = native_model
    expected = generate_texts(model, tokenizer, PROMPTS[1:2], 60)[0]
    engine = Engine(model, tokenizer).start()
    try:
        dropped, kept = Collector(), Collector()
        long = Request("long", tokenizer(PROMPTS[0]).input_ids, Sampling(max_tokens=400, temperature=0), dropped)
        engine.submit(long)
        engine.submit(Request("kept", tokenizer(PROMPTS[1]).input_ids, Sampling(max_tokens=60, temperature=0), kept))
        deadline = time.monotonic() + 60
        while len(dropped.pieces) < 3:
            assert time.monotonic() < deadline and not dropped.done.is_set(), dropped.pieces
            time.sleep(0.005)
        long.cancel()
        assert dropped.done.wait(5) and dropped.last.finish == "cancelled"
        assert long._cache is None  # its KV cache is freed with it
        assert kept.done.wait(60)
    finally:
        engine.stop()
    assert len(long.tokens) < 400
    assert kept.text == expected


def test_a_full_queue_refuses_with_queue_full(native_model):
    """``max_queue`` requests may wait beyond the free places of the batch; one more is refused (the engine is
    not started, so nothing leaves the queue)."""
    model, tokenizer = native_model
    engine = Engine(model, tokenizer, max_batch=2, max_queue=1)
    make = lambda i: Request(str(i), [5, 6], Sampling(max_tokens=1), lambda e: None)  # noqa: E731
    for i in range(3):
        engine.submit(make(i))
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        engine.submit(make(3))


def test_sampling_keeps_the_nucleus_and_greedy_takes_the_first_maximum():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, Sampling(max_tokens=1, top_p=0.7), generator) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.7 ≤ 0.5 + 0.3
    drawn = {sample(logits, Sampling(max_tokens=1, top_p=1.0), generator) for _ in range(300)}
    assert drawn == {0, 1, 2, 3}
    tied = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert sample(tied, Sampling(max_tokens=1, temperature=0), None) == 1


@pytest.mark.parametrize(("text", "stops", "ready"), [
    ("abc\n#", ("###", "\n###"), 3),  # the longest possible start counts, whatever the order of the stops
    ("abc\n#", ("\n###", "###"), 3),
    ("xa\ufffd", ("aé",), 1),  # an incomplete character is held, and the "a" before it may start "aé"
    ("hello", (), 5),
    ("hel", ("lo",), 2),
    ("abc", ("xyz",), 3),
    ("ab\ufffd\ufffd", (), 2),
])
def test_sendable_holds_back_an_incomplete_character_and_the_start_of_a_stop_string(text, stops, ready):
    assert sendable(text, stops) == ready


def test_a_failure_picking_a_token_fails_that_request_only(native_model, monkeypatch):
    """A request whose sampling raises finishes with an error (once); the request beside it keeps its tokens."""
    model, tokenizer = native_model
    expected = generate_texts(model, tokenizer, PROMPTS[1:2], 20)[0]
    real = engine_module.sample

    def failing(logits, sampling, generator):
        if sampling.seed == 13:
            raise RuntimeError("sampling failed")
        return real(logits, sampling, generator)

    monkeypatch.setattr(engine_module, "sample", failing)
    finished = []
    engine = Engine(model, tokenizer, on_finish=finished.append).start()
    try:
        bad, good = Collector(), Collector()
        engine.submit(Request("bad", tokenizer(PROMPTS[0]).input_ids, Sampling(max_tokens=20, seed=13), bad))
        engine.submit(Request("good", tokenizer(PROMPTS[1]).input_ids, Sampling(max_tokens=20, temperature=0), good))
        assert bad.done.wait(60) and good.done.wait(60)
    finally:
        engine.stop()
    assert (bad.last.finish, bad.last.error) == ("error", "RuntimeError: sampling failed")
    assert good.text == expected and good.last.finish in ("length", "stop")
    assert sorted(r.id for r in finished) == ["bad", "good"]  # each finished once


def test_a_stopped_engine_refuses_requests(native_model):
    model, tokenizer = native_model
    engine = Engine(model, tokenizer).start()
    engine.stop()
    assert not engine.alive
    with pytest.raises(EngineStopped, match="stopping"):
        engine.submit(Request("late", [5, 6], Sampling(max_tokens=1), lambda e: None))
