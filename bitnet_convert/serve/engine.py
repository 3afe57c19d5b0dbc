"""Continuous batching for ``bitnet-convert serve``: one thread runs every active sequence through the model.

Each request is a sequence with its own KV cache (the cache ``generate`` would use: full precision, or the packed
low-bit one of ``--kv-bits``/the model's attention spec). The engine thread loops over steps: it admits waiting
requests while there is room in the batch (each prefilled alone through the model's forward, which fills its cache
and gives its first token), then runs one decode step for all active sequences together: on the native backend
:func:`~bitnet_convert.native.decode.decode_batch` (the linears read each weight row once for the whole batch,
attention per sequence over its own cache); elsewhere (the reference backend, a layout the step does not cover)
each sequence's own forward. A request that finishes or is cancelled (its client went away) leaves before the next
step, and its cache is freed with it.

Why our own scheduler: the serving engines that batch continuously (vLLM, TGI, llama.cpp's server) each bring their
own model runtime; none runs a4.8 activations, which is what this one schedules.

Greedy output does not depend on the batch: every operation of the step is per row (see ``decode_batch``), so a
prompt gets the tokens ``generate`` gives it, alone or beside others (tested). Sampling draws from a generator of
the request's own (``seed``), so a seeded request is reproducible whatever else runs.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from bitnet_convert.native import decode
from bitnet_convert.quant.kv import generation_cache
from bitnet_convert.runtime.threads import run_with_policy

log = logging.getLogger("bitnet_convert.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests: the server answers 429 with a retry hint."""


class EngineStopped(Exception):
    """The engine is stopping or its thread is gone: the server answers 503."""


@dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens. ``temperature`` 0: greedy (the arg-max, as ``generate`` without
    ``--sample``); else softmax(logits / temperature) restricted to the smallest set of tokens whose probability
    reaches ``top_p`` (nucleus sampling), drawn with a generator seeded by ``seed`` (a random one when ``None``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What the engine tells a request's consumer: new ``text`` (may be empty), and on the last event the
    ``finish`` reason (``stop``, ``length``, ``cancelled``, or ``error`` with ``error`` set)."""

    text: str
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, sampling, and ``sink`` (called from the engine thread with each
    :class:`Event`). The engine fills in the rest."""

    id: str
    prompt: list[int]
    sampling: Sampling
    sink: Callable[[Event], None]
    created: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish: str | None = None
    text: str = ""  # the completion so far, cut at a stop string
    _sent: int = 0  # characters of ``text`` already sent
    _cache: object = None
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this request before its next step (its client went away)."""
        self.cancelled.set()


@dataclass
class Stats:
    """Counters the server's ``/metrics`` reads (updated by the engine thread)."""

    waiting: int = 0
    active: int = 0
    peak_active: int = 0
    steps: int = 0
    batched_rows: int = 0


class Engine:
    """Runs requests on ``model`` (eval mode, on CPU or its device) in one background thread.

    ``max_batch`` sequences decode together; up to ``max_queue`` more wait. ``kv_bits``/``bos_bits`` choose the
    KV cache as ``generate`` does (:func:`~bitnet_convert.quant.kv.generation_cache`). ``on_finish`` is called from
    the engine thread with each finished request (logging, metrics)."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 8,
                 max_queue: int = 64, kv_bits: int | None = None, bos_bits: int | None = None,
                 on_finish: Callable[[Request], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be ≥ 1 and max_queue ≥ 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.kv_bits, self.bos_bits = kv_bits, bos_bits
        self.on_finish = on_finish
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.stats = Stats()
        #: held around every use of the tokenizer: a fast tokenizer's encode (which may reset its truncation and
        #: padding) and decode from two threads at once can fail ("Already borrowed")
        self.tokenizer_lock = threading.Lock()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="bitnet-convert-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the loop (requests still running end with ``cancelled``) and join the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests (started, not stopping, its thread running)."""
        return self._thread.is_alive() and not self._stopping

    def submit(self, request: Request) -> None:
        """Queue ``request``; it joins the batch at the next step with room. Raises :class:`QueueFull`, and
        :class:`EngineStopped` when the engine is stopping or its thread is gone (a request would never be run)."""
        with self._wake:
            if self._stopping or (self._thread.ident is not None and not self._thread.is_alive()):
                raise EngineStopped("the server is stopping")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._active)):
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    # the engine thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._step()
            except Exception as exc:  # a failed step fails its requests, never the server
                log.exception("decode step failed")
                for request in self._active:
                    self._finish(request, "error", f"{type(exc).__name__}: {exc}")
                self._active = []
        with self._wake:
            left, self._waiting = [*self._active, *self._waiting], collections.deque()
        self._active = []
        for request in left:
            self._finish(request, "cancelled")

    def _step(self) -> None:
        self._active = [r for r in self._active if not self._dropped(r)]
        # prefill first: requests that arrived while the last joiners were prefilled join before the next decode
        # step (a burst of clients gets its first tokens without waiting for decode steps in between), up to
        # max_batch admissions per step, so that a stream of requests that finish at once cannot starve the batch
        admitted = 0
        while admitted < self.max_batch and (joining := self._admit()):
            admitted += len(joining)
            try:
                first = self._prefill(joining)
            except Exception as exc:  # the joiners fail; the active sequences go on
                log.exception("prefill failed")
                for request in joining:
                    self._finish(request, "error", f"{type(exc).__name__}: {exc}")
                continue
            self._active += [r for r, row in zip(joining, first, strict=True) if self._take(r, row)]
        self.stats.active = len(self._active)
        self.stats.peak_active = max(self.stats.peak_active, self.stats.active)
        if not self._active:
            return
        rows = self._decode([r.tokens[-1] for r in self._active], [r._cache for r in self._active])
        self.stats.steps += 1
        self.stats.batched_rows += len(self._active)
        self._active = [r for r, row in zip(self._active, rows, strict=True) if self._take(r, row)]
        self.stats.active = len(self._active)

    def _admit(self) -> list[Request]:
        """Take waiting requests (not cancelled) while the batch has room."""
        while True:
            taken = []
            with self._wake:
                while self._waiting and len(self._active) + len(taken) < self.max_batch:
                    taken.append(self._waiting.popleft())
                self.stats.waiting = len(self._waiting)
            joining = [r for r in taken if not self._dropped(r)]
            if joining or not taken:
                return joining

    def _dropped(self, request: Request) -> bool:
        if request.cancelled.is_set():
            self._finish(request, "cancelled")
            return True
        return False

    @torch.no_grad()
    def _prefill(self, requests: list[Request]) -> list[torch.Tensor]:
        """Each request's prompt through the model alone (its cache filled), then the lm_head once for all their
        last positions (one pass over the head's weights for the joiners together) when the head is a native
        kernel, whose rows do not depend on the batch (each equals its own forward's); else each request through
        the model's own forward. Returns each request's first-token logits, fp32 ``[vocab]``."""
        for request in requests:
            request._cache = generation_cache(self.model, self.kv_bits, self.bos_bits)[0]
            seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
            request._generator = torch.Generator().manual_seed(seed)
        decoder, head = getattr(self.model, "model", None), getattr(self.model, "lm_head", None)
        if decoder is None or not decode.row_exact_head(self.model):
            # not a decoder + head causal LM, or a head whose rows depend on the batch: each its own forward
            return [self._forward(r.prompt, r._cache)[0, -1].float() for r in requests]

        def last_hidden(prompt: list[int], cache: object) -> torch.Tensor:
            ids = torch.tensor([prompt], device=self.device)
            return decoder(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0, -1:]

        last = torch.cat([run_with_policy(self.model, last_hidden, r.prompt, r._cache) for r in requests])
        return list(run_with_policy(self.model, head, last[:, None]).float()[:, -1])

    def _forward(self, tokens: list[int], cache: object) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.device)
        return self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits

    @torch.no_grad()
    def _decode(self, tokens: list[int], caches: list[object]) -> list[torch.Tensor]:
        ids = torch.tensor(tokens, device=self.device)
        logits = decode.decode_batch(self.model, ids, caches) if len(caches) else None
        if logits is not None:
            return list(logits)
        # not covered by the batched step: each sequence through the model's own forward, one after another
        return [self._forward(tokens[i:i + 1], cache)[0, -1].float() for i, cache in enumerate(caches)]

    def _take(self, request: Request, logits: torch.Tensor) -> bool:
        """Pick the next token of ``request`` from its logits fp32 ``[vocab]``, send the text it completes;
        ``False`` when the request has finished (a failure here finishes this request with an error, no other)."""
        try:
            return self._next(request, logits)
        except Exception as exc:
            log.exception("%s failed", request.id)
            return self._finish(request, "error", f"{type(exc).__name__}: {exc}")

    def _next(self, request: Request, logits: torch.Tensor) -> bool:
        # sampled on the CPU, where the request's generator is
        token = sample(logits.float().cpu(), request.sampling, request._generator)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.tokens.append(token)
        if token in self.eos:
            return self._finish(request, "stop")
        with self.tokenizer_lock:
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in request.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            request.text = text[:cut]
            return self._finish(request, "stop")
        request.text = text
        if len(request.tokens) >= request.sampling.max_tokens:
            return self._finish(request, "length")
        ready = sendable(text, request.sampling.stop)
        if ready > request._sent:
            request.sink(Event(text[request._sent:ready]))
            request._sent = ready
        return True

    def _finish(self, request: Request, reason: str, error: str | None = None) -> bool:
        """End ``request`` (once: a second call does nothing): free its cache, send the rest of its text and the
        finish event, report it. Returns ``False`` (it has left the batch)."""
        if request.finish is not None:
            return False
        request.finish, request.finished_at = reason, time.perf_counter()
        request._cache = request._generator = None  # frees the KV cache now
        rest = request.text[request._sent:] if reason in ("stop", "length") else ""
        request._sent = len(request.text)
        for call in (lambda: request.sink(Event(rest, finish=reason, error=error)),
                     lambda: self.on_finish(request) if self.on_finish is not None else None):
            try:  # a consumer that fails (its event loop closed at shutdown) must not stop the engine
                call()
            except Exception:
                log.exception("finishing %s failed", request.id)
        return False


def sendable(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` (a completion so far, no stop string in it) can be sent now: all of it but a trailing
    incomplete UTF-8 character (U+FFFD from the tokenizer's decode) and the longest end of the rest that is the
    start of one of ``stops`` (it may still complete into that stop string, which is cut)."""
    end = len(text.rstrip("\ufffd"))
    hold = max((n for stop in stops for n in range(1, len(stop)) if text[:end].endswith(stop[:n])), default=0)
    return end - hold


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from fp32 ``logits [vocab]``: the arg-max when ``sampling.temperature`` is 0 (the first on a
    tie, as ``torch.argmax`` and ``generate`` pick), else a draw from the nucleus (``top_p``) of
    softmax(logits / temperature) with ``generator``."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=0) - ordered  # probability of the tokens ranked above each
        ordered[before >= sampling.top_p] = 0.0  # the top token always stays (before = 0 < top_p)
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    if not math.isfinite(float(probs.sum())) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))
