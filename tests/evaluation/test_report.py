"""Evaluation reports: Table 2 sparsity by hand, baseline comparison, the gate, committed baselines."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO
from torch import nn
from transformers.activations import ACT2FN

from bitnet_convert.calibration.statistics import activation_stats
from bitnet_convert.errors import DataError
from bitnet_convert.evaluation.report import (
    Thresholds,
    check_comparable,
    compare,
    gate,
    load_report,
    markdown,
    parse_threshold,
)
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.schemes import ActivationSpec
from bitnet_convert.recipe import load_recipe

BASELINES = REPO / "eval" / "baselines"


class _TinyBlock(nn.Module):
    """Token ids index fixed input vectors; o_proj sees them top-50% + INT8, the GLU sees them unquantized."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = inputs
        exact = ActivationSpec(method="none")
        eye, one = torch.eye(4, dtype=torch.int8), torch.ones(1)
        self.o_proj = QuantLinear.from_ternary(eye, one, ActivationSpec(method="absmax", bits=8, topk=0.5))
        self.mlp = nn.Module()
        gate = torch.tensor([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.int8)
        self.mlp.gate_proj = QuantLinear.from_ternary(gate, one, exact)
        self.mlp.up_proj = QuantLinear.from_ternary(eye, one, exact)
        self.mlp.down_proj = QuantLinear.from_ternary(eye, one, exact)
        self.mlp.act_fn = ACT2FN["relu2"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.inputs[ids]
        mlp = self.mlp
        return self.o_proj(x) + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def test_sparsity_and_active_parameters_match_a_hand_count():
    inputs = torch.tensor([[3.0, 0.0, -1.0, 0.2], [1.0, 2.0, 3.0, 4.0]])
    stats = activation_stats(_TinyBlock(inputs), torch.tensor([[0, 1]]), batch_size=1)
    # o: top-2 of 4 kept per token → 2 + 2 zeros of 8. gate: the one exact 0 of token 0 → 1 of 8.
    # gate outputs [3, −3, 0, 0.2] and [1, −1, 2, 4]: relu² is 0 at 2 + 1 places → up skips 3 of 8.
    # down input relu²(g)·x = [27, 0, 0, 0.008] and [1, 0, 12, 64] → 2 + 1 zeros of 8.
    assert stats["sparsity"] == {"o": 0.5, "gate": 0.125, "up": 0.375, "down": 0.375}
    assert stats["active_parameter_share"] == pytest.approx((0.5 + 0.875 + 0.625 + 0.625) / 4)
    assert stats["roles"]["o"]["zero_share"] == 0.5
    assert stats["roles"]["gate_up"]["zero_share"] == 0.125  # the inputs of gate and up (the same tensor)
    assert stats["tokens"] == 2


@pytest.fixture(scope="module")
def baselines() -> dict[str, dict]:
    return {file.stem: load_report(file) for file in sorted(BASELINES.glob("*.json"))}


def test_committed_baselines_show_the_papers_sparsity_pattern(baselines):
    b158, a48 = baselines["b158"]["sparsity"], baselines["a48"]["sparsity"]
    assert a48["sparsity"]["o"] == pytest.approx(0.5, abs=0.01) and b158["sparsity"]["o"] < 0.05
    assert a48["sparsity"]["qkv"] > 0.05 > b158["sparsity"]["qkv"]  # INT4 rounds small inputs to 0
    assert a48["sparsity"]["down"] > 0.8 and a48["sparsity"]["up"] > 0.6  # relu² GLU
    assert a48["active_parameter_share"] < b158["active_parameter_share"] - 0.05
    for report in baselines.values():
        assert report["results"]["reference_agreement"]["acc"] > 0.9  # chance 0.5
        assert report["results"]["reference_wordclass"]["acc"] > 0.9  # chance 0.25


def test_committed_baselines_pass_their_recipes_gates(baselines):
    assert {f"{f.stem}.json" for f in (REPO / "recipes").glob("*.yaml")} == {f"{name}.json" for name in baselines}
    for name in sorted(set(baselines) - {"b158"}):
        spec = load_recipe(REPO / "recipes" / f"{name}.yaml").eval
        assert Path(spec.baseline) == Path("eval/baselines/b158.json")
        limits = Thresholds(parse_threshold(spec.max_ppl_increase, "x"), parse_threshold(spec.max_acc_drop, "x"))
        report = baselines[name]
        assert gate(report, compare(report, baselines["b158"]), limits) == [], name


def test_committed_baselines_show_the_recovery(baselines):
    def word(name: str) -> float:
        return baselines[name]["results"]["reference_ppl"]["word_perplexity"]

    assert word("b158") < word("a48-kd") < word("a48-qwt") < word("a48")
    assert word("a48-kd") < 1.01 * word("b158") and word("a48-qwt-kd") < 1.01 * word("b158")
    assert word("a48-kv3-kd") < word("a48-kv3")
    assert baselines["a48-kv3-kd"]["attention"] == baselines["a48-kv3"]["attention"]
    assert baselines["a48-qwt"]["recipe"]["recovery"]["qwt"]["form"] == "full"
    assert baselines["a48-kd"]["recipe"]["recovery"]["distill"]["steps"] == 300


def test_comparison_orients_recovery_so_higher_is_better(baselines):
    comparison = compare(baselines["a48"], baselines["b158"])
    ppl = comparison["reference_ppl"]["word_perplexity"]
    assert ppl["delta"] > 0 and ppl["recovery"] == pytest.approx(ppl["baseline"] / ppl["value"]) and ppl["recovery"] < 1
    acc = comparison["reference_agreement"]["acc"]
    assert acc["recovery"] == pytest.approx(acc["value"] / acc["baseline"])


def test_gate_names_each_metric_that_crossed_its_limit(baselines):
    report, base = baselines["a48"], baselines["b158"]
    comparison = compare(report, base)
    word = comparison["reference_ppl"]["word_perplexity"]
    increase = 100 * (word["value"] / word["baseline"] - 1)
    failures = gate(report, comparison, Thresholds({"*": increase - 0.01}, {}))
    assert len(failures) == 1 and failures[0].startswith("reference_ppl word_perplexity ")
    assert f"(+{increase:.2f}% > {increase - 0.01:g}%)" in failures[0]
    assert gate(report, comparison, Thresholds({"*": increase + 0.01}, {})) == []
    # a per-metric limit wins over the global one
    per_metric = Thresholds({"*": 0.0, "reference_ppl:word_perplexity": 50, "reference_ppl": 50}, {})
    assert gate(report, comparison, per_metric) == []
    worse = copy.deepcopy(report)
    worse["results"]["reference_agreement"]["acc"] = 0.95
    failures = gate(worse, compare(worse, base), Thresholds({}, {"reference_agreement": 2.0}))
    assert failures == ["reference_agreement acc 0.9500 vs 1.0000 (−5.00 points > 2)"]


def test_threshold_parsing():
    assert parse_threshold(["1.5", "reference_ppl:word_perplexity=3"], "--max-ppl-increase") == {
        "*": 1.5, "reference_ppl:word_perplexity": 3.0,
    }
    from_recipe = parse_threshold({"*": 1, "reference_agreement": 0.5}, "max_acc_drop")
    assert from_recipe == {"*": 1.0, "reference_agreement": 0.5}
    assert parse_threshold(2, "x") == {"*": 2.0} and parse_threshold(None, "x") == {}
    with pytest.raises(DataError, match="--max-acc-drop 'lots': expected a number"):
        parse_threshold(["lots"], "--max-acc-drop")
    with pytest.raises(DataError, match="must be a number ≥ 0"):
        parse_threshold(["-1"], "--max-acc-drop")


def test_a_baseline_from_other_tasks_or_settings_is_refused(baselines, tmp_path):
    report = baselines["a48"]
    other = copy.deepcopy(baselines["b158"])
    del other["results"]["reference_wordclass"]
    with pytest.raises(DataError, match="baseline was measured on tasks reference_agreement, reference_ppl, this run"):
        check_comparable(report, other, "b.json")
    limited = copy.deepcopy(baselines["b158"])
    limited["settings"]["limit"] = 10
    with pytest.raises(DataError, match="limit=10, this run with limit=None"):
        check_comparable(report, limited, "b.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {}}))
    with pytest.raises(DataError, match="not a bitnet-convert eval report"):
        load_report(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_report(tmp_path / "missing.json")


def test_markdown_has_the_comparison_the_gate_and_the_sparsity(baselines):
    report = copy.deepcopy(baselines["a48"])
    report["baseline"] = {"model": "eval/reference/model", "scheme": "b158"}
    report["comparison"] = compare(report, baselines["b158"])
    report["gate"] = {"failures": ["reference_ppl word_perplexity 10.6 vs 10.2 (+3.81% > 3%)"]}
    text = markdown(report)
    assert "| task | metric | value | baseline | delta | recovery |" in text
    assert "| reference_ppl | word_perplexity |" in text
    assert "Gate **failed**: reference_ppl word_perplexity" in text
    assert "| qkv | o | gate | up | down | active parameters |" in text
