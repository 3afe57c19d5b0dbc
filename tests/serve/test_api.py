"""The OpenAI-compatible server against real clients: uvicorn on a loopback port, the official ``openai`` package
and raw HTTP (httpx) for what a client library would not send."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx2 as httpx
import openai
import pytest
import uvicorn
from helpers import PROMPTS, generate_texts

from bitnet_convert.io.load import load, load_tokenizer
from bitnet_convert.serve.api import ServerConfig, create_app
from bitnet_convert.serve.engine import Engine, Request, Sampling

#: A small chat template (the reference tokenizer has none): role lines, then the assistant's turn.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@contextlib.contextmanager
def serving(app):
    """``app`` on uvicorn in a thread, on a free loopback port; yields the base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def model(reference_dir):
    return load(reference_dir, backend="native"), load_tokenizer(reference_dir)


@pytest.fixture(scope="module")
def server(model):
    """(base URL, engine) of a server with batch 4 and the test chat template."""
    engine = Engine(*model, max_batch=4).start()
    try:
        with serving(create_app(engine, ServerConfig("reference", context=512, chat_template=TEMPLATE))) as url:
            yield url, engine
    finally:
        engine.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def test_completion_has_generate_greedy_text_and_usage(client, model):
    tokenizer = model[1]
    expected = generate_texts(*model, PROMPTS[:1], 30)[0]
    answer = client.completions.create(model="reference", prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                       frequency_penalty=0.0, presence_penalty=0.0)
    assert answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer(PROMPTS[0]).input_ids)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        prompt_tokens, 30, prompt_tokens + 30)
    assert [m.id for m in client.models.list().data] == ["reference"]
    assert client.models.retrieve("reference").id == "reference"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_streaming_chunks_add_up_to_the_completion(client):
    whole = client.completions.create(model="reference", prompt=PROMPTS[2], max_tokens=25, temperature=0)
    chunks = list(client.completions.create(model="reference", prompt=PROMPTS[2], max_tokens=25, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 25


def test_chat_uses_the_template_streamed_or_not(client, model):
    tokenizer = model[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Anna?", "name": "ann"}]
    prompt = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer = client.chat.completions.create(model="reference", messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="reference", messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seed_reproduces_a_sampled_completion_and_stop_cuts_it(client):
    def draw(seed):
        return client.completions.create(model="reference", prompt=PROMPTS[1], max_tokens=20, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)
    full = client.completions.create(model="reference", prompt=PROMPTS[0], max_tokens=30, temperature=0)
    word = full.choices[0].text.split()[2]
    cut = client.completions.create(model="reference", prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                    stop=[word, "zzz"])
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(word)]
    assert cut.choices[0].finish_reason == "stop"


def _stream_text(url, prompt, max_tokens, barrier=None):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    if barrier is not None:
        barrier.wait()
    stream = client.completions.create(model="reference", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True)
    return "".join(c.choices[0].text for c in stream if c.choices)


def test_four_clients_at_once_get_what_each_gets_alone(server):
    url, engine = server
    alone = [_stream_text(url, p, 30) for p in PROMPTS]
    engine.stats.peak_active = 0
    barrier, results = threading.Barrier(4), [None] * 4

    def run(i):
        results[i] = _stream_text(url, PROMPTS[i], 30, barrier)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    assert engine.stats.peak_active >= 2  # they were decoded together


def test_a_client_that_drops_mid_stream_frees_its_place_and_disturbs_no_one(server):
    url, engine = server
    expected = _stream_text(url, PROMPTS[3], 60)
    finished, log_line = [], engine.on_finish
    engine.on_finish = lambda request: (finished.append(request), log_line(request))
    other = {}
    thread = threading.Thread(target=lambda: other.update(text=_stream_text(url, PROMPTS[3], 60)))
    body = {"model": "reference", "prompt": PROMPTS[0], "max_tokens": 450, "temperature": 0, "stream": True}
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            thread.start()
            while engine.stats.active < 2 and thread.is_alive():
                time.sleep(0.002)
        closed = time.monotonic()
        while not any(r.finish == "cancelled" for r in finished):  # dropped at the engine's next step
            assert time.monotonic() < closed + 2, "the dropped request still holds its place in the batch"
            time.sleep(0.002)
        thread.join(60)
    finally:
        engine.on_finish = log_line
    dropped = next(r for r in finished if r.finish == "cancelled")
    assert len(dropped.tokens) < 450 and dropped._cache is None
    assert other["text"] == expected


BAD = [
    (b'{"model": "reference", "prompt": ', 400, "not valid JSON"),
    (b'{"model": "reference", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    (b'[1, 2]', 400, "body"),
    (json.dumps({"model": "reference", "prompt": "a", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "reference", "prompt": "a", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "reference", "prompt": "a", "max_tokens": 10**9}).encode(), 400,
     "max_tokens (1000000000) exceed the context of 512"),
    (json.dumps({"model": "reference", "prompt": "a", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "reference", "prompt": "a", "best_fit": 1}).encode(), 400, "unknown or unsupported field"),
    (json.dumps({"model": "reference", "prompt": "a", "n": 2}).encode(), 400, "n:"),
    (json.dumps({"model": "reference", "prompt": [10**7]}).encode(), 400, "outside the vocabulary"),
    (json.dumps({"model": "reference"}).encode(), 400, "prompt"),
    (json.dumps({"model": "gpt-4", "prompt": "a"}).encode(), 404, "not served here"),
]
BAD_CHAT = [
    (json.dumps({"model": "reference", "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "reference", "messages": [{"role": "user"}]}).encode(), 400, "content"),
    (json.dumps({"model": "reference", "messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"model": "reference", "messages": [{"role": "user", "content": "x"}], "tools": []}).encode(),
     400, "unknown or unsupported field 'tools'"),
]


def test_malformed_requests_get_openai_errors_and_the_server_stays_healthy(server):
    url = server[0]
    with httpx.Client(base_url=url, timeout=30) as http:
        for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
            for body, status, fragment in cases:
                response = http.post(path, content=body, headers={"content-type": "application/json"})
                assert response.status_code == status, (body, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert fragment in error["message"], (body, error)
        assert http.get("/nowhere").json()["error"]["type"] == "not_found_error"
        form = http.post("/v1/completions", content=b"model=reference&prompt=a",
                         headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"]
        assert http.get("/health").json()["status"] == "ok"
        ok = http.post("/v1/completions", json={"model": "reference", "prompt": "a", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        metrics = http.get("/metrics").text
    assert 'bitnet_convert_requests_total{endpoint="/v1/completions",status="400"}' in metrics
    for name in ("bitnet_convert_queue_length", "bitnet_convert_batch_size", "bitnet_convert_completion_tokens_total",
                 "bitnet_convert_prompt_tokens_total", "bitnet_convert_time_to_first_token_seconds_count"):
        assert name in metrics


def test_chat_without_a_template_a_full_queue_and_a_stopped_engine_are_refused(model):
    """A tokenizer without a chat template: chat is a 400 naming the option. An engine that does not run (not
    started) with batch 1, no queue and one request waiting: the next is a 429 with Retry-After. A stopped engine:
    503, and /health says so."""
    engine = Engine(*model, max_batch=1, max_queue=0)
    with serving(create_app(engine, ServerConfig("reference", context=512))) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        chat = http.post("/v1/chat/completions",
                         json={"model": "reference", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "--chat-template" in chat.json()["error"]["message"]
        engine.submit(Request("waiting", [5, 6], Sampling(max_tokens=1), lambda event: None))
        busy = http.post("/v1/completions", json={"model": "reference", "prompt": "a"})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
        engine.start().stop()
        stopped = http.post("/v1/completions", json={"model": "reference", "prompt": "a"})
        assert stopped.status_code == 503 and stopped.json()["error"]["code"] == "unavailable"
        assert http.get("/health").status_code == 503


def test_a_non_streaming_client_that_goes_away_frees_its_place(server):
    """The request of a client that closes its connection before the answer is cancelled, not decoded to its end."""
    url, engine = server
    finished, log_line = [], engine.on_finish
    engine.on_finish = lambda request: (finished.append(request), log_line(request))
    body = {"model": "reference", "prompt": PROMPTS[0], "max_tokens": 450, "temperature": 0}
    try:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.3) as http:
            http.post(url + "/v1/completions", json=body)
        gone = time.monotonic()
        while not finished:
            assert time.monotonic() < gone + 10, "the request of the client that went away is still decoding"
            time.sleep(0.01)
    finally:
        engine.on_finish = log_line
    assert finished[0].finish == "cancelled" and len(finished[0].tokens) < 450
