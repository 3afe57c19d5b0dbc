"""The command line: the quick start end to end, inspect, generate, help a person can read, warnings in a real
process, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import openai
import pytest
import yaml
from helpers import (
    PROMPTS,
    REFERENCE,
    REPO,
    assert_user_error,
    invoke,
    leftovers,
)


def test_quantize_reference_end_to_end(tmp_path):
    out = tmp_path / "a48"
    result = invoke("quantize", "--recipe", REPO / "recipes/a48.yaml", "--output", out,
                    "--set", "calibration.samples=2", "--set", "calibration.seq_len=64")
    assert result.exit_code == 0, result.output
    assert "Quantize linears" in result.output and "packed bits / weight" in result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "conversion_report.json"} <= set(
        leftovers(out)
    )
    assert leftovers(tmp_path) == ["a48"]  # no temporary directories left behind


def test_cli_flags_override_the_recipe(tmp_path):
    from helpers import write_tiny_checkpoint

    tiny_checkpoint = write_tiny_checkpoint(tmp_path / "tiny", vocab_size=2048)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Anna has {n} red apples."}) for n in range(50)))
    ref_tokenizer = REPO / "eval/reference/model"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_checkpoint / name).write_bytes((ref_tokenizer / name).read_bytes())
    out = tmp_path / "out"
    result = invoke("quantize", "--recipe", REPO / "recipes/a48.yaml", "--model", tiny_checkpoint, "--output", out,
                    "--calibration-data", data, "--set", "calibration.seq_len=16", "--set", "calibration.samples=3",
                    "--set", "scheme.roles.down.bits=6", "--set", "scheme.attention.k_bits=3")
    assert result.exit_code == 0, result.output
    assert "attention Q/K/V" in result.output and "K 3-bit" in result.output
    stored = yaml.safe_load((out / "recipe.yaml").read_text())
    assert stored["model"] == str(tiny_checkpoint) and stored["calibration"]["data"] == str(data)
    assert stored["scheme"]["roles"]["down"]["bits"] == 6
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["activations"]["down"] == "INT6 absmax" and report["calibration"]["tokens"] == 48


def test_inspect_input_and_output(tmp_path, reference_dir):
    result = invoke("inspect", reference_dir, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["layout"] == "master" and info["scheme"] == "b158"
    out = tmp_path / "a48"
    assert invoke("quantize", "--recipe", REPO / "recipes/a48.yaml", "--output", out,
                  "--set", "calibration.samples=0").exit_code == 0
    info = json.loads(invoke("inspect", out, "--json").output)
    assert info["layout"] == "packed-autobitlinear" and info["scheme"] == "a48"
    rows = {row["name"]: row for row in info["tensors"]}
    q = rows["model.layers.*.self_attn.q_proj.weight"]
    assert q["dtype"] == "U8" and q["count"] == info["architecture"]["num_hidden_layers"]
    table = invoke("inspect", out)
    assert table.exit_code == 0 and "packed-autobitlinear" in table.output and "INT4 absmean" in table.output


def write_recipe(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"modle": "x"}, ["unknown key 'modle'"]),
        ({"calibration": {"samples": "many"}}, ["calibration.samples", "integer", "'many'"]),
        ({"scheme": {"roles": {"qkv": {"method": "absmean", "bits": 9}}}}, ["scheme.roles.qkv.bits", "8", "9"]),
        ({"scheme": {"preset": "a47"}}, ["scheme.preset", "'a47'"]),
        ({"model": "does/not/exist/here"}, ["model path 'does/not/exist/here' does not exist"]),
    ],
)
def test_bad_recipe_values(tmp_path, body, fragments):
    out = tmp_path / "out"
    result = invoke("quantize", "--recipe", write_recipe(tmp_path, {**body}), "--output", out)
    assert_user_error(result, *fragments)
    assert not out.exists()


def test_bits_out_of_range_via_set(tmp_path):
    result = invoke("quantize", "--output", tmp_path / "o", "--set", "scheme.roles.o.bits=1")
    assert_user_error(result, "scheme.roles.o.bits", "greater than or equal to 2")


def test_missing_recipe_file(tmp_path):
    assert_user_error(invoke("quantize", "--recipe", tmp_path / "none.yaml"), "recipe file", "does not exist")


def test_non_bitnet_checkpoint(tmp_path, tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["model_type"] = "llama"
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_user_error(invoke("quantize", "--model", tiny_checkpoint, "--output", out), "not a b1.58 causal LM")
    assert not out.exists()


def test_corrupted_safetensors(tmp_path, tiny_checkpoint):
    file = tiny_checkpoint / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"}" * 32  # break the JSON header
    file.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_user_error(invoke("quantize", "--model", tiny_checkpoint, "--output", out), "model.safetensors",
                      "not a readable safetensors file")
    assert not out.exists()


def test_out_features_not_divisible_by_four(tmp_path):
    from helpers import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "odd", intermediate_size=50)
    out = tmp_path / "out"
    result = invoke("quantize", "--model", model, "--output", out, "--set", "calibration.samples=0")
    assert_user_error(result, "gate_proj", "out_features=50", "divisible by 4")
    assert not out.exists() and leftovers(tmp_path) == ["odd"]


def test_existing_output_needs_overwrite(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "conversion_report.json").write_text("{}")  # an earlier output, which --overwrite may replace
    args = ["quantize", "--model", tiny_checkpoint, "--output", out, "--set", "calibration.samples=0"]
    assert_user_error(invoke(*args), "already exists", "--overwrite")
    assert leftovers(out) == ["conversion_report.json", "keep.txt"]
    assert invoke(*args, "--overwrite").exit_code == 0
    assert "keep.txt" not in leftovers(out) and "model.safetensors" in leftovers(out)
    assert leftovers(tmp_path) == ["out", "tiny"]


def test_console_script_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bitnet_convert.cli", "quantize", "--model", str(tmp_path / "missing"),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model path '{tmp_path / 'missing'}' does not exist "
                                                "(expected a checkpoint directory or a hub id)"]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_perplexity_command_matches_the_api(tmp_path, reference_dir, a48_reference):
    import re

    import bitnet_convert
    from bitnet_convert.evaluation.evaluate import perplexity
    from bitnet_convert.io.data import load_texts, token_stream, windows

    texts = tmp_path / "held_out.txt"
    texts.write_text("\n".join(load_texts("builtin:reference", "validation")[:12]))
    result = invoke("perplexity", reference_dir, "--data", texts, "--seq-len", "128", "--scheme", "a48")
    assert result.exit_code == 0, result.output
    shown = float(re.search(r"perplexity (\d+\.\d+)", result.output).group(1))
    model = bitnet_convert.load(a48_reference, lm_head="int8")  # the CLI's native default, the same numbers
    tokenizer = bitnet_convert.load_tokenizer(reference_dir)
    ids = windows(token_stream(tokenizer, load_texts(str(texts))), 128, tokenizer.bos_token_id)
    assert shown == pytest.approx(perplexity(model, ids)["perplexity"], abs=1e-4)
    assert_user_error(invoke("perplexity", reference_dir, "--scheme", "a47"), "--scheme 'a47' is unknown")


@pytest.mark.parametrize(("args", "message"), [
    (["quantize", "--device", "mps"], "--device 'mps': expected cpu, cuda, cuda:N or auto"),
    (["calibrate", "--device", "tpu"], "--device 'tpu': expected cpu, cuda, cuda:N or auto"),
    (["quantize", "--set", "calibration.sample=2"], "--set calibration.sample=2: unknown key 'calibration.sample'"),
    (["quantize", "--set", "calibration.samples=abc"], "--set calibration.samples=abc: calibration.samples: Input "
                                                        "should be a valid integer"),
    (["quantize", "--set", "seed.x=3"], "--set seed.x=3: cannot set 'seed.x': 'seed' is not a section"),
    (["quantize", "--model", " "], "--model ' ': must name a checkpoint directory"),
    (["quantize", "--set", "recovery.qwt.form=full", "--set", "calibration.samples=1"],
     "with --set recovery.qwt.form=full, --set calibration.samples=1: recovery.qwt: fits on some calibration"),
    (["quantize", "--set", "recovery.order=[qwt]"],
     "a48.yaml with --set recovery.order=[qwt]: recovery: recovery.order names 'qwt' but recovery.qwt is not set"),
])
def test_a_bad_value_from_the_command_line_names_the_flag_not_the_recipe_file(args, message):
    """Field report: `quantize -r recipes/a48.yaml --device mps` blamed recipes/a48.yaml for a value it did not
    hold. A flag's or --set's value is reported against the flag; a check across keys names every source."""
    result = invoke(*args[:1], "-r", REPO / "recipes" / "a48.yaml", *args[1:])
    assert_user_error(result, message)
    if "with --set" not in message:
        assert "a48.yaml" not in result.output


def test_a_bad_value_in_the_recipe_file_still_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("device: mps\n")
    assert_user_error(invoke("quantize", "-r", recipe), f"{recipe}: device: expected cpu, cuda, cuda:N or auto "
                                                        "(got 'mps')")
    recipe.write_text("device: cuda\n")
    assert_user_error(invoke("quantize", "-r", recipe), f"{recipe}: device 'cuda': CUDA is not available")
    assert_user_error(invoke("quantize", "-r", recipe, "--device", "cuda"), "--device 'cuda': CUDA is not available")


def test_a_bad_keyword_of_the_python_api_names_the_keyword():
    import bitnet_convert
    from bitnet_convert.errors import RecipeError

    with pytest.raises(RecipeError, match=r"^keyword device 'mps': expected cpu, cuda"):
        bitnet_convert.quantize(REPO / "recipes" / "a48.yaml", device="mps")


def test_help_shows_defaults_and_no_markup_loss():
    text = " ".join(invoke("calibrate", "--help").output.split())
    assert "Report directory [default: <recipe output>-calibration]" in text and "<bool>" not in text
    assert "Tokens per window. [default: 256; x>=2]" in " ".join(invoke("perplexity", "--help").output.split())


def test_inspect_prints_whole_lines_when_piped(reference_dir):
    result = invoke("inspect", reference_dir)
    assert result.exit_code == 0 and "…" not in result.output
    assert "model.layers.*.self_attn.q_proj.weight" in result.output


def test_generate_uses_the_current_cache_api(tmp_path):
    out = tmp_path / "a48"
    assert invoke("quantize", "--output", out, "--set", "calibration.samples=0").exit_code == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke("generate", out, "--prompt", "Anna is", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if "deprecated" in str(w.message)]


def test_cli_end_to_end_warning_format_in_a_real_process(tmp_path):
    """The installed command prints a warning as one ``warning:`` line on stderr (not a logging record)."""
    data = tmp_path / "six.txt"
    data.write_text("Anna bakes bread every day.\n" * 40)
    done = subprocess.run([sys.executable, "-m", "bitnet_convert.cli", "calibrate", "-o", str(tmp_path / "cal"),
                           "--calibration-data", str(data), "--set", "calibration.seq_len=64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("warning: calibration.data") and "samples asks for 16" in line
               for line in done.stderr.splitlines()), done.stderr


# bitnet-convert serve as a user runs it: a second process, the openai client, and generate for the tokens it must
# match (the server itself: tests/serve/)
SERVE_COMMAND = [sys.executable, "-m", "bitnet_convert.cli"]


def test_serve_answers_generate_greedy_text_and_stops_on_ctrl_c():
    server = subprocess.Popen([*SERVE_COMMAND, "serve", str(REFERENCE), "--port", "0", "--max-batch", "2"],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        seen = []
        while (line := server.stderr.readline()) and "serving" not in line:
            seen.append(line)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, "".join(seen) + line
        client = openai.OpenAI(base_url=match.group(0), api_key="none", max_retries=0, timeout=120)
        answer = client.completions.create(model="model", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        generated = subprocess.run([*SERVE_COMMAND, "generate", str(REFERENCE), "--prompt", PROMPTS[0],
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
        result = subprocess.run([*SERVE_COMMAND, "serve", str(REFERENCE), "--port", str(port)], capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"]
    assert "Traceback" not in result.stderr and time.monotonic() - start < 60


def test_a_chat_template_that_does_not_render_is_a_one_line_error(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }", encoding="utf-8")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    result = subprocess.run([*SERVE_COMMAND, "serve", str(REFERENCE), "--port", str(port), "--chat-template",
                             str(template)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --chat-template '{template}' does not render a "
                                                   "conversation: TemplateSyntaxError"), result.stderr
