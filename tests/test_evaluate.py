"""lm-eval evaluation of reloaded models on the offline reference tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bitnet_convert
from bitnet_convert.cli import app
from bitnet_convert.errors import DataError
from bitnet_convert.evaluate import TASKS_DIR, lm_eval_results, task_spec

REPO = Path(__file__).resolve().parents[1]


def test_builtin_task_specs_point_at_committed_data():
    spec = task_spec("reference_agreement")
    data = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.parent == TASKS_DIR / "data" and data.is_file()
    assert spec["output_type"] == "multiple_choice"
    assert task_spec("hellaswag") == "hellaswag"  # hub tasks pass through
    with pytest.raises(DataError, match="does not exist"):
        task_spec("missing.yaml")


def test_eval_command_on_input_and_converted_model(tmp_path, reference_dir):
    runner = CliRunner()
    converted = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a48"),
                                        calibration__samples=0).output
    reports = {}
    for name, model in (("b158", reference_dir), ("a48", converted)):
        report = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval", str(model), "--limit", "60", "--output", str(report)])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(report.read_text())
    assert reports["b158"]["scheme"] == "b158" and reports["a48"]["scheme"] == "a48"
    b158, a48 = reports["b158"]["results"], reports["a48"]["results"]
    assert b158["reference_agreement"]["acc"] >= 0.9  # chance is 0.5
    assert 1.0 < b158["reference_ppl"]["word_perplexity"] < a48["reference_ppl"]["word_perplexity"] < 50


def test_unknown_task_is_a_clear_error(reference_dir):
    result = CliRunner().invoke(app, ["eval", str(reference_dir), "--tasks", "no_such_task"])
    assert result.exit_code == 2
    assert "unknown task 'no_such_task'" in result.output and "lm-eval ls tasks" in result.output


def test_lm_eval_leaves_the_global_rng_alone(reference_dir):
    model = bitnet_convert.load(reference_dir)
    random.seed(7)
    torch.manual_seed(7)
    state = (random.getstate(), torch.get_rng_state())
    results = lm_eval_results(model, bitnet_convert.load_tokenizer(reference_dir), ["reference_agreement"], limit=8)
    assert set(results["reference_agreement"]) == {"acc", "acc_norm"}
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
