"""The OpenAI-compatible HTTP API of ``bitnet-convert serve`` (FastAPI on uvicorn).

Endpoints, as the OpenAI API defines them, so that every client library, chat UI and agent framework works
unchanged: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template, or the one
given with ``--chat-template``), non-streaming and streaming (server-sent events of ``*.chunk`` objects, then
``data: [DONE]``); ``GET /v1/models``; ``GET /health``; ``GET /metrics`` (Prometheus text format).

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is not JSON, an unknown
field, a wrong type or value, a prompt that does not fit the context with its ``max_tokens`` (both numbers named),
a chat request to a model without a chat template; 404 for an unknown model or path; 429 with ``Retry-After`` when
the queue is full; 500 when generation fails. Fields that change what is computed and that we do not implement
(``n`` > 1, ``logprobs``, penalties, ``tools``, ...) are refused with 400, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from bitnet_convert.serve.engine import Engine, EngineStopped, Event, QueueFull, Sampling
from bitnet_convert.serve.engine import Request as Generation

log = logging.getLogger("bitnet_convert.serve")

#: Tags pydantic puts in an error's location for the member of a union that failed (not field names).
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}

Number = StrictFloat | StrictInt


class _Body(BaseModel):
    # unknown fields are refused: a field we silently dropped could change what the client believes was computed
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Generation(_Body):
    model: StrictStr
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    n: Literal[1] | None = None
    user: StrictStr | None = None
    # accepted at the values that change nothing
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None


class CompletionBody(_Generation):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] | \
        Annotated[list[StrictInt], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    logprobs: None = None
    suffix: None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)]
    name: StrictStr | None = None


class ChatBody(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None


class APIError(Exception):
    """An error answered in the OpenAI shape with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerConfig:
    """What the server serves: the model's id in the API, the context limit (prompt + completion tokens), the
    chat template (``None``: the tokenizer's)."""

    model_id: str
    context: int
    chat_template: str | None = None


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process stay apart)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("bitnet_convert_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("bitnet_convert_prompt_tokens", "Prompt tokens prefilled",
                                     registry=self.registry)
        self.completion_tokens = Counter("bitnet_convert_completion_tokens", "Completion tokens generated",
                                         registry=self.registry)
        self.first_token = Histogram("bitnet_convert_time_to_first_token_seconds",
                                     "Time from a request's arrival to its first token", registry=self.registry)
        queue = Gauge("bitnet_convert_queue_length", "Requests waiting for a place in the batch",
                      registry=self.registry)
        queue.set_function(lambda: engine.stats.waiting)
        batch = Gauge("bitnet_convert_batch_size", "Sequences decoding together", registry=self.registry)
        batch.set_function(lambda: engine.stats.active)


def _openai_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(_endpoint(request), str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        # the location without pydantic's tags of union members ("prompt.str", "messages.0.content.list[...]")
        where = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or p.isidentifier())
                 and p not in _TYPE_TAGS]
        kind = first.get("type", "")
        if kind == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        elif not where and isinstance(first.get("input"), (bytes, str)):
            message = "the request body must be a JSON object sent with Content-Type: application/json"
        elif kind == "extra_forbidden":
            message = f"unknown or unsupported field '{'.'.join(where)}'"
        else:
            message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
            if "input" in first and kind != "missing":
                message += f" (got {json.dumps(first['input'], default=str)[:80]})"
        param = None if kind == "json_invalid" or not where else where[0]
        return await api_error(request, APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = "the request body could not be read as UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return await api_error(request, APIError(exc.status_code, message, type_, headers=exc.headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return await api_error(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app over a started ``engine``. Raises nothing itself; requests get the errors the module
    docstring lists."""
    app = FastAPI(title="bitnet-convert", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    engine.on_finish = request_log(metrics)
    tokenizer = engine.tokenizer
    _openai_error_handlers(app, metrics)
    created = int(time.time())

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "queue": engine.stats.waiting,
                             "batch": engine.stats.active}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": created,
                                            "owned_by": "bitnet-convert"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(model_id, config)
        return {"id": config.model_id, "object": "model", "created": created, "owned_by": "bitnet-convert"}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        _check_model(body.model, config)
        if isinstance(body.prompt, str) or isinstance(body.prompt[0], str):
            with engine.tokenizer_lock:
                prompt = tokenizer(body.prompt if isinstance(body.prompt, str) else body.prompt[0]).input_ids
        else:
            prompt = list(body.prompt)
            vocab = engine.model.config.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
        return await _generate(request, body, prompt, body.max_tokens or 16, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Response:
        _check_model(body.model, config)
        template = config.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, f"model '{config.model_id}' has no chat template (its tokenizer sets none); use "
                           "/v1/completions, or start the server with --chat-template FILE", param="messages",
                           code="no_chat_template")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        with engine.tokenizer_lock:
            try:
                text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                     add_generation_prompt=True)
            except Exception as exc:  # a template may raise on a conversation it does not accept
                raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
            prompt = tokenizer(text, add_special_tokens=False).input_ids
        limit = body.max_completion_tokens or body.max_tokens
        return await _generate(request, body, prompt, limit, "chat.completion")

    async def _generate(request: Request, body: _Generation, prompt: list[int], max_tokens: int | None,
                        kind: str) -> Response:
        if not prompt:
            raise APIError(400, "the prompt has no tokens", param="prompt" if kind == "text_completion"
                           else "messages")
        room = config.context - len(prompt)
        if max_tokens is None:  # chat: up to the end of the context, as OpenAI's default
            max_tokens = room
        if max_tokens > room or room < 1:
            param = "max_tokens" if kind == "text_completion" or body.max_completion_tokens is None \
                else "max_completion_tokens"
            raise APIError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) exceed the "
                           f"context of {config.context} tokens", param=param, code="context_length_exceeded")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        sampling = Sampling(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                            stop=tuple(s for s in stops if s))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        generation = Generation(f"{prefix}-{uuid.uuid4().hex[:24]}", prompt, sampling,
                                lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            engine.submit(generation)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry in a second", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped as exc:
            raise APIError(503, str(exc), "server_error", code="unavailable") from None
        metrics.prompt_tokens.inc(len(prompt))
        chat_kind = kind == "chat.completion"
        stamp = int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            metrics.requests.labels(_endpoint(request), "200").inc()
            return StreamingResponse(_stream(generation, events, body.model, stamp, chat_kind, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, last = await _collect(request, generation, events)
        if last.finish == "error":
            raise APIError(500, f"generation failed: {last.error}", "server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish}
        if chat_kind:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        metrics.requests.labels(_endpoint(request), "200").inc()
        return JSONResponse({"id": generation.id, "object": kind, "created": stamp, "model": body.model,
                             "choices": [choice], "usage": _usage(generation)})

    async def _collect(request: Request, generation: Generation, events: asyncio.Queue[Event]
                       ) -> tuple[str, Event]:
        async def watch() -> None:  # a client that went away frees its place in the batch
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            generation.cancel()

        watcher = asyncio.create_task(watch())
        parts = []
        try:
            while True:
                event = await events.get()
                parts.append(event.text)
                if event.finish is not None:
                    return "".join(parts), event
        finally:
            watcher.cancel()

    async def _stream(generation: Generation, events: asyncio.Queue[Event], model: str, stamp: int, chat_kind: bool,
                      usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat_kind else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat_kind:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": generation.id, "object": kind, "created": stamp, "model": model, "choices": [choice]}
            if usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat_kind:
                yield chunk("", None, role=True)
            while True:
                event = await events.get()
                if event.finish == "error":
                    error = APIError(500, f"generation failed: {event.error}", "server_error")
                    yield f"data: {json.dumps({'error': json.loads(error.response().body)['error']})}\n\n"
                    break
                if event.text or event.finish is not None:
                    yield chunk(event.text if event.text or not chat_kind else None, event.finish)
                if event.finish is not None:
                    break
            if usage:
                tail = {"id": generation.id, "object": kind, "created": stamp, "model": model, "choices": [],
                        "usage": _usage(generation)}
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream (the response task is cancelled)
            generation.cancel()

    return app


def _endpoint(request: Request) -> str:
    """The route a request matched, as a metrics label (any unknown path is one label: a client cannot grow the
    metrics without bound)."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _check_model(name: str, config: ServerConfig) -> None:
    if name != config.model_id:
        raise APIError(404, f"model '{name}' is not served here; this server serves '{config.model_id}' "
                       "(GET /v1/models)", param="model", code="model_not_found")


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = len(generation.prompt), len(generation.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def request_log(metrics: Metrics) -> Any:
    """The engine's ``on_finish``: one log line per request (id, prompt and completion tokens, time to first
    token, decode tokens/s, finish reason) and the token metrics."""

    def finished(generation: Generation) -> None:
        completion = len(generation.tokens)
        metrics.completion_tokens.inc(completion)
        first = generation.first_token_at
        if first is not None:
            metrics.first_token.observe(first - generation.created)
        decoding = (generation.finished_at or first or 0) - (first or 0)
        rate = f"{(completion - 1) / decoding:.1f} tokens/s" if completion > 1 and decoding > 0 else "- tokens/s"
        ttft = f"{first - generation.created:.3f} s" if first is not None else "-"
        log.info("%s: %d prompt + %d completion tokens, first token %s, %s, finish %s", generation.id,
                 len(generation.prompt), completion, ttft, rate, generation.finish)

    return finished
