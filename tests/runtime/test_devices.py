"""``--device`` / the recipe's ``device``: resolved once, handed to every stage, and refused in one line when this
machine cannot use it (CUDA mocked away, so the test means the same on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import bitnet_convert
from bitnet_convert import pipeline
from bitnet_convert.cli import app
from bitnet_convert.recipe import Recipe
from bitnet_convert.recover import distill
from bitnet_convert.runtime import blocks
from bitnet_convert.runtime.devices import DeviceError, resolve_device
from tests.test_cli import REPO, assert_user_error, leftovers

#: every recovery stage, a few steps each, on 8 windows of 64 tokens
ALL_STAGES = {"calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
              "recovery": {"qwt": {"form": "channel"},
                           "blockwise": {"steps": 2, "batch_size": 2},
                           "distill": {"steps": 2, "batch_size": 2, "seq_len": 64}}}


@pytest.fixture()
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_device_names(no_cuda, monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # no GPU: auto is the CPU
    with pytest.raises(DeviceError, match=r"^--device 'cuda': CUDA is not available on this machine"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"^--device 'gpu' is not a device; expected cpu, cuda, cuda:N or auto$"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun, plain cuda is the process's own GPU
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:2': this machine has 2 CUDA device\(s\) \(cuda:0 … cuda:1\)$"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match=r"'cuda:1' under torchrun would put every process on one GPU"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("command", [
    ["quantize", "--recipe", "recipes/a48.yaml"],
    ["calibrate", "--recipe", "recipes/a48.yaml"],
    ["perplexity", "eval/reference/model"],
    ["eval", "eval/reference/model"],
    ["generate", "eval/reference/model", "--prompt", "The"],
])
def test_unavailable_cuda_is_one_line_and_nothing_written(no_cuda, tmp_path, command):
    result = CliRunner().invoke(app, [*command[:1], *(str(REPO / c) if c.startswith(("recipes/", "eval/")) else c
                                                      for c in command[1:]),
                                      *(["--output", str(tmp_path / "out")] if command[0] in ("quantize", "calibrate")
                                        else []), "--device", "cuda"])
    assert_user_error(result, "'cuda': CUDA is not available on this machine", "use --device cpu")
    assert leftovers(tmp_path) == []


def test_recipe_device_is_checked(tmp_path):
    result = CliRunner().invoke(app, ["quantize", "--recipe", str(REPO / "recipes/a48.yaml"), "--set", "device=tpu",
                                      "--output", str(tmp_path / "out")])
    assert_user_error(result, "device: expected cpu, cuda, cuda:N or auto", "'tpu'")


def test_every_stage_works_on_the_given_device(tmp_path, reference_dir, monkeypatch):
    """The resolved device reaches each stage: the statistics passes, QwT and block-wise recovery (each block
    onloaded) and the fine-tune (the whole model). ``cpu:0`` stands in for a GPU: a device of its own, that this
    machine has."""
    marker = torch.device("cpu", 0)
    monkeypatch.setattr(pipeline, "resolve_device", lambda name, where: marker)
    seen: list[tuple[str, torch.device]] = []
    runner_init = blocks.BlockRunner.__init__

    def record_runner(self, rotary, device="cpu", batch_size=None):
        seen.append(("blocks", torch.device(device)))
        runner_init(self, rotary, device, batch_size)

    def record_whole(where):
        def on(model, device):
            seen.append((where, device))
            return blocks.on_device(model, device)
        return on

    monkeypatch.setattr(blocks.BlockRunner, "__init__", record_runner)
    monkeypatch.setattr(distill, "on_device", record_whole("fine-tune"))
    conversion = bitnet_convert.quantize(Recipe(model=str(reference_dir), output=tmp_path / "out", **ALL_STAGES))
    assert {where for where, _ in seen} == {"blocks", "fine-tune"}
    assert all(device == marker for _, device in seen), seen
    # block by block: the calibration report's pass, QwT, block-wise recovery, the final statistics pass
    assert sum(where == "blocks" for where, _ in seen) == 4
    assert conversion.report["device"] == "cpu:0"
    assert set(conversion.report) >= {"qwt", "blockwise", "distill"}


def test_device_cpu_gives_the_default_bytes(tmp_path, reference_dir):
    """``--device cpu`` and ``auto`` on a machine without a GPU are the default: the same bytes."""
    small = {"calibration": {"samples": 4, "seq_len": 64, "batch_size": 2},
             "recovery": {"blockwise": {"steps": 2, "batch_size": 2}}}
    default = bitnet_convert.quantize(Recipe(model=str(reference_dir), output=tmp_path / "a", **small))
    result = CliRunner().invoke(app, ["quantize", "--model", str(reference_dir), "--output", str(tmp_path / "b"),
                                      "--device", "cpu", "--set", "calibration.samples=4",
                                      "--set", "calibration.seq_len=64", "--set", "calibration.batch_size=2",
                                      "--set", "recovery.blockwise={steps: 2, batch_size: 2}"])
    assert result.exit_code == 0, result.output
    assert (default.output / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    result = CliRunner().invoke(app, ["perplexity", str(tmp_path / "b"), "--device", "auto", "--seq-len", "64"])
    assert result.exit_code == 0 and "perplexity" in result.output, result.output
