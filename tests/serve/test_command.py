"""``bitnet-convert serve`` as a user runs it: a second process, the ``openai`` client, and ``bitnet-convert
generate`` for the tokens it must match."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import openai
from helpers import PROMPTS, REFERENCE

COMMAND = [sys.executable, "-m", "bitnet_convert.cli"]


def test_serve_answers_generate_greedy_text_and_stops_on_ctrl_c():
    server = subprocess.Popen([*COMMAND, "serve", str(REFERENCE), "--port", "0", "--max-batch", "2"],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        seen = []
        while (line := server.stderr.readline()) and "serving" not in line:
            seen.append(line)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, "".join(seen) + line
        client = openai.OpenAI(base_url=match.group(0), api_key="none", max_retries=0, timeout=120)
        answer = client.completions.create(model="model", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        generated = subprocess.run([*COMMAND, "generate", str(REFERENCE), "--prompt", PROMPTS[0],
                                    "--max-new-tokens", "24"], capture_output=True, text=True, check=True)
        assert generated.stdout == PROMPTS[0] + answer.choices[0].text + "\n"
        server.send_signal(signal.SIGINT)  # uvicorn shuts down, then re-raises the signal: 130, as Ctrl-C gives
        assert server.wait(30) == 130
        log = server.stderr.read()
        assert "Finished server process" in log and "Traceback" not in log, log
        assert re.search(r"cmpl-\w+: \d+ prompt \+ 24 completion tokens, first token [\d.]+ s, [\d.]+ tokens/s, "
                         r"finish length", log), log
    finally:
        if server.poll() is None:
            server.kill()


def test_a_taken_port_is_a_one_line_error_before_the_model_loads():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        start = time.monotonic()
        result = subprocess.run([*COMMAND, "serve", str(REFERENCE), "--port", str(port)], capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"]
    assert "Traceback" not in result.stderr and time.monotonic() - start < 60
