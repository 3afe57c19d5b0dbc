"""Calibration statistics (``calibration/statistics.py``): layer by layer, block by block and in one pass they equal
the whole-model pass and the hand count; an out-of-memory error names the knobs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    REPO,
)
from typer.testing import CliRunner

import bitnet_convert
from bitnet_convert.calibration.statistics import (
    CANDIDATES,
    LinearStats,
    activation_stats,
    calibration_and_stats,
    hooked_calibration,
    sequential_calibration,
)
from bitnet_convert.cli import app
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec
from bitnet_convert.recipe import load_recipe
from bitnet_convert.runtime.modeling import build_model


def _flatten(stats: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float):
            flat[prefix + key] = float(value)
    return flat


@pytest.mark.parametrize("preset", ["a48", "b158"])
def test_sequential_calibration_equals_a_whole_model_pass(reference_dir, calibration_ids, preset):
    checkpoint = open_checkpoint(reference_dir)
    sequential = sequential_calibration(checkpoint, PRESETS[preset], calibration_ids, batch_size=4)
    whole = hooked_calibration(build_model(checkpoint, PRESETS[preset]), calibration_ids, batch_size=4)
    assert sequential.linears.keys() == whole.linears.keys() and len(sequential.linears) == 28
    for name in whole.linears:
        ours, reference = _flatten(sequential.linears[name]), _flatten(whole.linears[name])
        assert ours.keys() == reference.keys()
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{name} {key}"
        assert torch.allclose(sequential.samples[name], whole.samples[name], rtol=1e-5, atol=1e-6)


def test_linear_stats_by_hand():
    stats = LinearStats(ActivationSpec(method="absmax", bits=8), samples_per_update=100)
    x = torch.tensor([[0.0, 1.0, -2.0, 100.0], [0.0, 1.0, 2.0, -1.0]])
    stats.update(x, torch.eye(4))
    result = stats.result()
    assert result["zero_share"] == 2 / 8 and result["absmax"] == 100.0
    assert result["absmean"] == pytest.approx(107 / 8)
    values = x.flatten().double()
    central = values - values.mean()
    assert result["kurtosis"] == pytest.approx(float(central.pow(4).mean() / central.pow(2).mean() ** 2))
    assert result["outlier_channels"] == 1 and result["channels"] == 4  # channel 3: 100 > 6 × median 1.5
    int8 = result["quantizers"]["int8_absmax"]
    assert int8 == result["quantizers"]["configured"]
    assert int8["sqnr_db"] == pytest.approx(-20 * math.log10(int8["relative_error"]))
    assert set(result["quantizers"]) == {"configured", *CANDIDATES}














@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_during_calibration_names_the_knobs(tmp_path, monkeypatch, error):
    def exhausted(self, x, weight, batch=None):
        raise error

    monkeypatch.setattr(LinearStats, "update", exhausted)
    target = tmp_path / "report"
    result = CliRunner().invoke(app, ["calibrate", "--recipe", str(REPO / "recipes/a48.yaml"), "--output",
                                      str(target), "--set", "calibration.samples=2"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "calibration ran out of memory with calibration.samples=2, calibration.seq_len=256" in result.output
    assert not target.exists()


def test_one_pass_gives_the_report_and_the_statistics_of_two(reference_dir, calibration_ids):
    model = build_model(open_checkpoint(reference_dir), PRESETS["a48"])
    details, stats = calibration_and_stats(model, calibration_ids, batch_size=4)
    assert stats == activation_stats(model, calibration_ids, batch_size=4)
    separate = hooked_calibration(model, calibration_ids, batch_size=4)
    assert details.linears == separate.linears and details.tokens == separate.tokens
    assert all(torch.equal(details.samples[n], separate.samples[n]) for n in separate.samples)


def test_quantize_runs_one_calibration_pass_unless_the_model_changes_after_it(tmp_path, reference_dir):
    from bitnet_convert.pipeline import _calibration_windows

    options = {"calibration__samples": 4, "calibration__batch_size": 2}
    recipe = load_recipe(REPO / "recipes/a48.yaml", {"calibration.samples": 4})
    ids = _calibration_windows(recipe, open_checkpoint(reference_dir))
    plain = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a"), **options)
    assert "calibrate" not in plain.report["time_s"] and "calibration_report" in plain.report["time_s"]
    assert (plain.output / "calibration" / "calibration.json").is_file()
    # the conversion's statistics pass runs one block at a time (on the recipe's device)
    assert plain.report["calibration"] == activation_stats(plain.model, ids, 2, device=torch.device("cpu"))
    tuned = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "b"),
                                    recovery__qwt={"form": "channel"}, **options)
    assert {"calibration_report", "qwt", "calibrate"} <= set(tuned.report["time_s"])
    # the statistics describe the model as exported: after the compensation, not before it
    assert tuned.report["calibration"] == activation_stats(tuned.model, ids, 2, device=torch.device("cpu"))
    assert tuned.report["calibration"] != plain.report["calibration"]


def test_block_by_block_statistics_equal_whole_model_forwards(reference_dir, calibration_ids):
    """The conversion's statistics pass (one decoder block at a time) measures what whole-model forwards measure,
    up to float rounding (a block run on its own sums in another order)."""
    model = build_model(open_checkpoint(reference_dir), PRESETS["a48"])
    whole = activation_stats(model, calibration_ids, 4)
    blocks = activation_stats(model, calibration_ids, 4, device=torch.device("cpu"))
    assert whole["tokens"] == blocks["tokens"]
    assert whole["sparsity"] == pytest.approx(blocks["sparsity"], abs=1e-4)
    for role, values in whole["roles"].items():
        assert values == pytest.approx(blocks["roles"][role], rel=1e-4, abs=1e-6)






