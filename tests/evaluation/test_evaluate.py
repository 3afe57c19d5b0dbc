"""lm-eval evaluation of reloaded models on the offline reference tasks, perplexity and its warnings, and which
tasks and baseline a model gets."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    REFERENCE,
    REPO,
    invoke,
    other_tokenizer,
    tiny,
)
from typer.testing import CliRunner

import bitnet_convert
from bitnet_convert.cli import app
from bitnet_convert.errors import DataError
from bitnet_convert.evaluation.evaluate import TASKS_DIR, EvalSettings, lm_eval_results, task_spec
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.io.data import load_texts


def test_builtin_task_specs_point_at_committed_data():
    spec = task_spec("reference_agreement")
    data = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.parent == TASKS_DIR / "data" and data.is_file()
    assert spec["output_type"] == "multiple_choice"
    assert task_spec("hellaswag") == "hellaswag"  # hub tasks pass through
    with pytest.raises(DataError, match="does not exist"):
        task_spec("missing.yaml")


@pytest.fixture(scope="module")
def converted(a48_reference) -> Path:
    """The reference model converted with recipes/a48.yaml (its eval section names the b158 baseline)."""
    return a48_reference


def _eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result.exit_code, result.output


def test_eval_command_on_input_and_converted_model(tmp_path, reference_dir, converted):
    reports = {}
    for name, model in (("b158", reference_dir), ("a48", converted)):
        report = tmp_path / f"{name}.json"
        code, output = _eval(model, "--limit", "60", "--output", report)
        assert code == 0, output
        reports[name] = json.loads(report.read_text())
        assert report.with_suffix(".md").read_text().startswith(f"# Evaluation of `{model}` ({name})")
    # the recipe's baseline was measured without a limit: skipped with a note, not an error
    assert "note: not comparing with the recipe's baseline" in output and "limit=60" in output
    b158, a48 = reports["b158"], reports["a48"]
    assert b158["scheme"] == "b158" and a48["scheme"] == "a48" and a48["recipe"]["scheme"]["preset"] == "a48"
    assert set(b158["versions"]) >= {"bitnet-convert", "torch", "transformers", "lm-eval"}
    assert b158["results"]["reference_agreement"]["acc"] >= 0.9  # chance is 0.5
    assert b158["results"]["reference_wordclass"]["acc"] >= 0.9  # chance is 0.25
    ppl = [r["results"]["reference_ppl"]["word_perplexity"] for r in (b158, a48)]
    assert 1.0 < ppl[0] < ppl[1] < 50
    # sparsity measured on the evaluation documents: the paper's pattern
    assert a48["sparsity"]["sparsity"]["o"] == pytest.approx(0.5, abs=0.01)
    assert b158["sparsity"]["sparsity"]["o"] < 0.1
    assert a48["sparsity"]["active_parameter_share"] < b158["sparsity"]["active_parameter_share"]


def test_gate_fails_on_a_degraded_conversion_and_passes_on_a_good_one(tmp_path, reference_dir, converted):
    two_bits = {"method": "absmean", "bits": 2}
    degraded = bitnet_convert.quantize(
        REPO / "recipes/a48.yaml", output=str(tmp_path / "a2"), calibration__samples=0,
        scheme__roles={"qkv": two_bits, "gate_up": two_bits},
    ).output
    limits = ("--max-ppl-increase", "10", "--max-acc-drop", "5", "--limit", "40")
    report = tmp_path / "degraded.json"
    code, output = _eval(degraded, "--baseline-model", reference_dir, *limits, "--output", report)
    assert code == 1, output
    failure = output[output.index("gate failed:"):]
    assert failure.startswith("gate failed: reference_ppl word_perplexity ") and "% > 10%)" in failure
    assert json.loads(report.read_text())["gate"]["failures"]  # the report is written before the exit
    code, output = _eval(converted, "--baseline-model", reference_dir, *limits)
    assert code == 0 and "gate passed" in output, output


def test_recipe_gate_passes_against_the_committed_baseline(converted):
    code, output = _eval(converted)  # baseline and limits from the converted directory's recipe.yaml
    assert code == 0, output
    assert "vs eval/reference/model (b158)" in output and "gate passed" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tasks", "reference_agreement", "--baseline", "eval/baselines/b158.json"),
         "baseline was measured on tasks reference_ppl, reference_agreement, reference_wordclass, this run asks for "
         "reference_agreement"),
        (("--max-acc-drop", "1", "--no-baseline"), "the gate limits need a baseline"),
        (("--baseline", "eval/baselines/b158.json", "--baseline-model", "x"), "not both"),
        (("--baseline", "missing.json"), "baseline report 'missing.json' does not exist"),
        (("--baseline", "eval/baselines/b158.json", "--max-ppl-increase", "much"), "expected a number"),
    ],
)
def test_bad_baselines_and_limits_are_clear_errors(converted, args, message, monkeypatch):
    monkeypatch.chdir(REPO)
    code, output = _eval(converted, *args)
    assert code == 2 and message in output and "Traceback" not in output, output


def test_a_directory_that_is_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, output = _eval(tmp_path)
    assert code == 2 and "no config.json" in output and "Traceback" not in output


def test_unknown_task_is_a_clear_error(reference_dir):
    result = CliRunner().invoke(app, ["eval", str(reference_dir), "--tasks", "no_such_task"])
    assert result.exit_code == 2
    assert "unknown task 'no_such_task'" in result.output and "lm-eval ls tasks" in result.output


def test_lm_eval_leaves_the_global_rng_alone(reference_dir):
    model = bitnet_convert.load(reference_dir)
    random.seed(7)
    torch.manual_seed(7)
    state = (random.getstate(), torch.get_rng_state())
    results = lm_eval_results(model, bitnet_convert.load_tokenizer(reference_dir), ["reference_agreement"],
                              EvalSettings(limit=8))
    assert set(results["reference_agreement"]) == {"acc", "acc_norm"}
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])


def test_a_hub_task_without_the_hub_is_a_clear_error(converted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = _eval(converted, "--tasks", "arc_easy", "--limit", "2", "--no-baseline")
    assert code == 2 and "dataset could not be loaded (HF_HUB_OFFLINE is set)" in output, output
    assert "Traceback" not in output


def test_perplexity_names_positions_beyond_training_and_files_without_splits(tmp_path, reference_dir):
    data = tmp_path / "v.txt"
    data.write_text("\n\n".join(load_texts("builtin:reference", "validation")[:60]))
    result = invoke("perplexity", reference_dir, "--data", data, "--seq-len", "1024")
    assert result.exit_code == 0, result.output
    assert "--seq-len 1024 is longer than the model's max_position_embeddings (512)" in result.output
    assert "v.txt perplexity" in " ".join(result.output.split()) and ":validation" not in result.output


def test_a_tokenizer_without_bos_is_named_in_perplexity(tmp_path):
    model = tmp_path / "nobos"
    shutil.copytree(REFERENCE, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["bos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "v.txt"
    data.write_text("\n".join(load_texts("builtin:reference", "validation")[:30]))
    result = invoke("perplexity", model, "--data", data, "--seq-len", "64", "--txt-documents", "lines")
    assert result.exit_code == 0, result.output
    assert "warning: the tokenizer of" in result.output and "has no BOS token" in result.output
    assert "windows without BOS" in result.output


def test_lm_eval_prints_no_git_probe_and_no_bars_outside_a_checkout(tmp_path, capfd, monkeypatch):
    from bitnet_convert.evaluation.evaluate import EvalSettings, lm_eval_results

    monkeypatch.chdir(tmp_path)
    model = bitnet_convert.load(REFERENCE)
    lm_eval_results(model, bitnet_convert.load_tokenizer(REFERENCE), ["reference_agreement"], EvalSettings(limit=2))
    err = capfd.readouterr().err
    assert "fatal" not in err and "it/s]" not in err


def test_default_tasks_follow_the_model_not_its_location(tmp_path):
    from bitnet_convert.evaluation.evaluate import HUB_TASKS, REFERENCE_TASKS, default_tasks

    copy = tmp_path / "elsewhere"
    shutil.copytree(REFERENCE, copy)
    assert default_tasks(open_checkpoint(copy)) == REFERENCE_TASKS
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))  # re-saved: the same tokenizer
    assert default_tasks(open_checkpoint(copy)) == REFERENCE_TASKS
    other = tmp_path / "other"
    shutil.copytree(REFERENCE, other)
    assert default_tasks(open_checkpoint(other_tokenizer(other))) == HUB_TASKS


def test_the_real_text_model_gets_its_own_builtin_task_and_a_warning_for_the_others():
    from bitnet_convert.evaluation.evaluate import (
        REFERENCE_TASKS,
        default_tasks,
        foreign_builtin_tasks,
        own_builtin_tasks,
    )
    from bitnet_convert.io.checkpoint import BUILTIN_MODELS

    text = open_checkpoint(str(BUILTIN_MODELS["builtin:reference-text"]))
    assert default_tasks(text) == ("reference_text_ppl",)  # offline: no hub task is picked for it
    own = own_builtin_tasks(text)
    assert foreign_builtin_tasks(["reference_text_ppl", "reference_ppl", "arc_easy"], own) == ["reference_ppl"]
    synthetic = own_builtin_tasks(open_checkpoint(REFERENCE))
    assert foreign_builtin_tasks([*REFERENCE_TASKS, "reference_text_ppl"], synthetic) == ["reference_text_ppl"]
    config = task_spec("reference_text_ppl")
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    chapters = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    assert len(chapters) == 93 and chapters[0].startswith("Ruth, chapter 1\n1:1 Now it came to pass")
    test_split = BUILTIN_MODELS["builtin:reference-text"].parent / "data-text" / "test.txt"
    assert "\n\n".join(chapters) + "\n" == test_split.read_text()  # every test chapter, nothing else


def test_the_reference_models_baseline_is_not_used_for_another_model(tmp_path):
    model = other_tokenizer(tiny(tmp_path))
    report = tmp_path / "eval.json"
    result = invoke("eval", model, "-r", REPO / "recipes/a48.yaml", "--tasks", "reference_agreement", "--limit", "2",
                    "-o", report)
    assert result.exit_code == 0, result.output
    assert "warning: not comparing with the recipe's baseline eval/baselines/b158.json" in result.output
    written = json.loads(report.read_text())
    assert "comparison" not in written and "not comparing" in written["warnings"][0]
