"""Layer-by-layer calibration: the same statistics as a whole-model pass, a readable report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitnet_convert.calibrate import CANDIDATES, LinearStats, hooked_calibration, sequential_calibration
from bitnet_convert.calibration_report import write_report
from bitnet_convert.checkpoint import open_checkpoint
from bitnet_convert.modeling import build_model
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec


@pytest.fixture(scope="module")
def calibration_ids(reference_ids) -> torch.Tensor:
    return reference_ids[:6, :128]


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


def test_report_writes_json_markdown_and_plots(reference_dir, calibration_ids, tmp_path):
    checkpoint = open_checkpoint(reference_dir)
    calibration = sequential_calibration(checkpoint, PRESETS["a48"], calibration_ids[:2], batch_size=2)
    files = write_report(calibration, tmp_path, {"model": "builtin:reference", "scheme": "a48"})
    assert {f.name for f in files} == {"calibration.json", "calibration.md", "error_heatmap.png",
                                       "worst_histograms.png", "sparsity.png"}
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["tokens"] == calibration_ids[:2].numel() and len(data["linears"]) == 28
    text = (tmp_path / "calibration.md").read_text()
    assert "| linear | configured | int4_absmean | int8_absmax | top50_int8 | fp4_e2m1 |" in text
    assert "o_proj" in text.split("hurt most")[1].split("\n\n")[1]  # top-50% on o_proj is among the worst
