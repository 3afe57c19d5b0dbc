"""A corpus of broken checkpoints, recipes, data files and output locations fed through the command line.

For every case: exit code 2, exactly one ``error:`` line that names the file/key/value, no traceback, nothing left in
or beside the output location, and an existing output (and the input) untouched. The cases come from field reports
(issue 11) grouped by kind: checkpoint fields that would be dropped, tracebacks where a one-line error belongs, and
the user's files at risk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    REFERENCE,
    REPO,
    assert_user_error,
    edit_config,
    edit_tensors,
    invoke,
    quantization_config,
    tiny,
    write_tiny_checkpoint,
)
from safetensors.torch import load_file, save_file


def sharded_with_wrong_index(tmp: Path) -> Path:
    directory = tiny(tmp)
    tensors = load_file(directory / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, directory / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, directory / "model-00002-of-00002.safetensors")
    (directory / "model.safetensors").unlink()
    weight_map = {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"  # the shard that does not hold it
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def sharded_with_unlisted_tensor(tmp: Path) -> Path:
    directory = sharded_with_wrong_index(tmp)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = "model-00001-of-00002.safetensors"  # right shard now
    del index["weight_map"]["model.norm.weight"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def packed_with_float_weights(tmp: Path) -> Path:
    directory = tiny(tmp)
    return quantization_config(directory, quantization_mode="offline")


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def recipe(tmp: Path, text: str) -> str:
    return write(tmp / "recipe.yaml", text.encode())


Case = Callable[[Path], tuple[list[str], list[str]]]
M = "--model"

#: name → builder(tmp) returning (extra command-line arguments, fragments the error line must contain)
CASES: dict[str, Case] = {
    # kind 1: a checkpoint or config field that changes the model's function is refused, never dropped
    "unknown quantization_config key": lambda t: (
        [M, str(quantization_config(tiny(t), weight_bits=1))], ["config.json", "quantization_config.weight_bits"]),
    "use_rms_norm not a bool": lambda t: (
        [M, str(quantization_config(tiny(t), use_rms_norm="yes"))], ["quantization_config.use_rms_norm", "'yes'"]),
    "rms_norm tensors without use_rms_norm": lambda t: (
        [M, str(edit_tensors(tiny(t), lambda d: d.update(
            {"model.layers.0.mlp.up_proj.rms_norm.weight": torch.ones(32, dtype=torch.bfloat16)})))],
        ["model.layers.0.mlp.up_proj.rms_norm.weight", "use_rms_norm"]),
    "modules_to_not_convert keeps a decoder linear": lambda t: (
        [M, str(quantization_config(tiny(t), modules_to_not_convert=["lm_head", "down_proj"]))],
        ["modules_to_not_convert", "model.layers.0.mlp.down_proj"]),
    "modules_to_not_convert without lm_head": lambda t: (
        [M, str(quantization_config(tiny(t), modules_to_not_convert=[]))], ["modules_to_not_convert", "lm_head"]),
    "unknown quantization_mode": lambda t: (
        [M, str(quantization_config(tiny(t), quantization_mode="fast"))], ["quantization_mode", "'fast'"]),
    "attention_bias": lambda t: ([M, str(edit_config(tiny(t), attention_bias=True))], ["attention_bias=True"]),
    "bias tensor": lambda t: (
        [M, str(edit_tensors(tiny(t), lambda d: d.update({"model.layers.1.self_attn.o_proj.bias": torch.zeros(32)})))],
        ["model.layers.1.self_attn.o_proj.bias", "biased"]),
    "extra tensor": lambda t: (
        [M, str(edit_tensors(tiny(t), lambda d: d.update({"model.layers.0.self_attn.rotary_emb.inv_freq":
                                                          torch.ones(4)})))],
        ["model.layers.0.self_attn.rotary_emb.inv_freq", "not part of a BitNet model"]),
    "tied lm_head that differs": lambda t: (
        [M, str(edit_tensors(tiny(t), lambda d: d.update({"lm_head.weight": torch.ones(1024, 32,
                                                                                       dtype=torch.bfloat16)})))],
        ["tie_word_embeddings", "lm_head.weight"]),
    "config value of the wrong type": lambda t: (
        [M, str(edit_config(tiny(t), hidden_size="32"))], ["config.json", "hidden_size", "expected int"]),
    "unknown activation": lambda t: (
        [M, str(edit_config(tiny(t), hidden_act="swish2"))], ["config.json", "unknown value 'swish2'"]),
    # kind 2: what was a traceback
    "index maps a tensor to the wrong shard": lambda t: (
        [M, str(sharded_with_wrong_index(t))], ["model.safetensors.index.json", "model-00002-of-00002", "maps tensor"]),
    "shard holds a tensor the index does not list": lambda t: (
        [M, str(sharded_with_unlisted_tensor(t))], ["holds tensor 'model.norm.weight'", "does not list"]),
    "NaN in a norm": lambda t: (
        [M, str(edit_tensors(tiny(t), lambda d: d["model.norm.weight"].__setitem__(3, float("nan"))))],
        ["model.norm.weight", "NaN or Inf"]),
    "integer norm": lambda t: (
        [M, str(edit_tensors(tiny(t), lambda d: d.update({"model.norm.weight": torch.ones(32, dtype=torch.int64)})))],
        ["model.norm.weight", "I64", "float"]),
    "num_key_value_heads disagrees with the tensors": lambda t: (
        [M, str(edit_config(tiny(t), num_key_value_heads=4))], ["k_proj.weight", "num_key_value_heads=4"]),
    "q_proj stored with the wrong shape": lambda t: (
        [M, str(edit_tensors(tiny(t), lambda d: d.update({"model.layers.0.self_attn.q_proj.weight":
                                                          torch.zeros(36, 32, dtype=torch.bfloat16)})))],
        ["model.layers.0.self_attn.q_proj.weight", "[36, 32]", "[32, 32]"]),
    "hidden_size disagrees with the tensors": lambda t: (
        [M, str(edit_config(tiny(t), hidden_size=64))], ["has shape", "hidden_size=64"]),
    "a layer missing": lambda t: (
        [M, str(edit_config(tiny(t), num_hidden_layers=3))], ["model.layers.2.", "missing", "num_hidden_layers=3"]),
    "no tokenizer files": lambda t: (
        [M, str(write_tiny_checkpoint(t / "bare", vocab_size=1024))], ["bare: no tokenizer", "tokenizer.json"]),
    "packed layout with float weights": lambda t: (
        [M, str(packed_with_float_weights(t))], ["_proj.weight' is BF16", "packed U8"]),
    "jsonl with a non-UTF-8 byte": lambda t: (
        [M, str(tiny(t)), "--calibration-data", write(t / "c.jsonl", b'{"text": "caf\xe9"}\n')],
        ["c.jsonl", "not UTF-8 text", "at byte 13"]),
    "binary file named .jsonl": lambda t: (
        [M, str(tiny(t)), "--calibration-data", write(t / "b.jsonl", bytes(range(256)))],
        ["b.jsonl", "not UTF-8 text"]),
    "calibration text shorter than seq_len": lambda t: (
        [M, str(tiny(t)), "--calibration-data", write(t / "short.txt", b"Anna bakes.\n")],
        ["short.txt", "calibration.seq_len=256", "lower calibration.seq_len"]),
    "calibration data is a directory": lambda t: (
        [M, str(tiny(t)), "--calibration-data", str((t / "dir.txt").mkdir() or t / "dir.txt")],
        ["dir.txt", "is a directory"]),
    "qwt without calibration": lambda t: (
        [M, str(tiny(t)), "-r", str(REPO / "recipes/a48-qwt.yaml"), "--set", "calibration.samples=0"],
        ["recovery.qwt", "calibration.samples must be > 0"]),
    "auto without calibration": lambda t: (
        [M, str(tiny(t)), "-r", str(REPO / "recipes/a48-auto.yaml"), "--set", "calibration.samples=0"],
        ["scheme.auto", "calibration.samples must be > 0"]),
    "recipe YAML syntax error": lambda t: (
        ["-r", recipe(t, "scheme:\n  preset: a48\n calibration: [\n")], ["recipe.yaml:3:", "not valid YAML"]),
    "recipe is a directory": lambda t: (["-r", str(t)], [str(t), "is a directory", "YAML file"]),
    "recipe key given twice": lambda t: (
        ["-r", recipe(t, "model: builtin:reference\nseed: 1\nmodel: other\n")],
        ["recipe.yaml:3:1", "'model' given twice"]),
    "qwt with one calibration batch": lambda t: (
        [M, str(tiny(t)), "-r", str(REPO / "recipes/a48-qwt.yaml"), "--set", "calibration.samples=2"],
        ["recovery.qwt", "calibration.batch_size=4 gives 1"]),
    "no quantization_config": lambda t: (
        [M, str(edit_config(tiny(t), quantization_config=None))], ["no quantization_config", "full-precision"]),
    # kind 3: the user's files at risk (the output location itself)
    "output below an existing file": lambda t: (
        ["--output", str(Path(write(t / "afile", b"x")) / "sub" / "out")], ["afile", "is a file"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, name):
    outs = tmp_path / "outs"
    existing = outs / "existing"
    existing.mkdir(parents=True)
    (existing / "sentinel.txt").write_text("keep me")
    (existing / "conversion_report.json").write_text("{}")  # an earlier output: --overwrite may replace it
    args, fragments = CASES[name](tmp_path)
    if "--output" not in args:
        args += ["--output", str(existing), "--overwrite"]
    model = Path(args[args.index(M) + 1]) if M in args else None
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} if model is not None else {}
    result = invoke("quantize", *args, "--set", "calibration.seq_len=256")
    assert_user_error(result, *fragments)
    assert sorted(p.name for p in outs.iterdir()) == ["existing"], name  # nothing beside the output
    assert sorted(p.name for p in existing.iterdir()) == ["conversion_report.json", "sentinel.txt"]
    assert (existing / "sentinel.txt").read_text() == "keep me"
    assert {p: p.read_bytes() for p in before} == before  # the input is untouched


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_output_overlapping_the_input_is_refused_even_with_overwrite(tmp_path, where):
    model = tiny(tmp_path / "in")
    output = {"equal": model, "inside": model / "a48", "containing": model.parent}[where]
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    result = invoke("quantize", "--model", model, "--output", output, "--overwrite", "--set", "calibration.samples=0")
    assert_user_error(result, str(output), "the input", "choose another output")
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["model"]


def test_output_containing_the_calibration_data_is_refused(tmp_path):
    data = tmp_path / "work" / "train.txt"
    data.parent.mkdir()
    data.write_text("Anna bakes bread.\n\nTom reads.\n")
    result = invoke("quantize", "--output", data.parent, "--overwrite", "--calibration-data", data)
    assert_user_error(result, "contains the input", "train.txt")
    assert data.read_text() == "Anna bakes bread.\n\nTom reads.\n"


def test_output_containing_the_recipe_is_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    recipe_file = work / "mine.yaml"
    recipe_file.write_text((REPO / "recipes/a48.yaml").read_text())
    result = invoke("quantize", "-r", recipe_file, "--output", work, "--overwrite")
    assert_user_error(result, "contains the input", "mine.yaml")
    assert recipe_file.read_text() == (REPO / "recipes/a48.yaml").read_text()


def test_generate_arguments_fail_before_loading(monkeypatch):
    import importlib

    load = importlib.import_module("bitnet_convert.io.load")  # the module, not the function the package exports
    monkeypatch.setattr(load, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert_user_error(invoke("generate", REFERENCE, "--prompt", "x", "--bos-bits", "4"), "--bos-bits", "--kv-bits")
    assert_user_error(invoke("generate", REFERENCE, "--prompt", "x", "--device", "nodevice"), "--device 'nodevice'")


def test_overwrite_replaces_only_an_earlier_output(tmp_path, monkeypatch):
    mine = tmp_path / "mydocs"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = invoke("quantize", "--output", mine, "--overwrite", "--set", "calibration.samples=0")
    assert_user_error(result, "mydocs", "not an earlier bitnet-convert output")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    monkeypatch.chdir(mine)
    result = invoke("quantize", "--output", ".", "--overwrite", "--set", "calibration.samples=0")
    assert_user_error(result, "is or contains the working directory")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


EVAL_CASES: dict[str, Callable[[Path], tuple[list[str], list[str]]]] = {
    "max-length below the longest answer": lambda t: (
        ["--max-length", "3", "--limit", "2"], ["--max-length 3", "reference_agreement", "≥ 10"]),
    "unknown task": lambda t: (["--tasks", "reference_ppl,no_such_task", "-r", str(REPO / "recipes/a48.yaml")],
                               ["unknown task 'no_such_task'"]),
    "report below an existing file": lambda t: (
        ["-o", str(Path(write(t / "afile", b"x")) / "eval.json")], ["afile", "is a file"]),
    "report path is a directory": lambda t: (["-o", str(t)], [str(t), "is a directory"]),
    "unusable device": lambda t: (["--device", "nodevice"], ["--device 'nodevice' is not a device", "cuda:N"]),
    "report would replace the model's config": lambda t: (
        ["-o", str(REFERENCE / "config.json")], ["config.json", "would replace a file of the model"]),
}


@pytest.mark.parametrize("name", sorted(EVAL_CASES))
def test_bad_eval_arguments_fail_before_any_work(tmp_path, name, monkeypatch):
    import bitnet_convert.evaluation.evaluate as evaluate

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(evaluate, "open_model", no_model)
    args, fragments = EVAL_CASES[name](tmp_path)
    result = invoke("eval", REFERENCE, *args)
    assert_user_error(result, *fragments)
    assert "note:" not in result.output  # the argument error comes first, before any baseline handling
