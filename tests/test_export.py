"""Every shipped recipe's output: it loads back as the model that was converted, and fed back as the input of a
conversion it either converts (its ternary weights, the recipe deciding the scheme) or is refused in one line —
never converted with part of what it computes silently dropped (field report: a QwT export lost its
compensation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from test_cli import assert_user_error, invoke

import bitnet_convert
from bitnet_convert.io.checkpoint import REPO_ROOT

RECIPES = sorted(p.stem for p in (REPO_ROOT / "recipes").glob("*.yaml"))
#: Small settings for each section a recipe has (a section it lacks is not added).
SMALL = {"calibration": {"samples": 8, "batch_size": 4},
         "recovery.blockwise": {"steps": 1, "batch_size": 2},
         "recovery.distill": {"steps": 1, "batch_size": 2, "seq_len": 32}}
#: What each output computes beyond b1.58 that another conversion cannot carry (refused as input), by recipe.
REFUSED = {"a48-qwt": "QwT compensation", "a48-qwt-kd": "QwT compensation", "a48-auto": "per-linear activation specs",
           "a48-kv3": "attention ", "a48-kv3-kd": "attention "}


def _small(name: str) -> dict:
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / f"{name}.yaml").read_text())
    overrides = {}
    for section, values in SMALL.items():
        node = recipe
        for part in section.split("."):
            node = (node or {}).get(part)
        if node is not None:
            overrides.update({f"{section}.{k}".replace(".", "__"): v for k, v in values.items()})
    return overrides


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("recipes")
    return {name: bitnet_convert.quantize(REPO_ROOT / "recipes" / f"{name}.yaml", output=str(root / name),
                                          **_small(name)) for name in RECIPES}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_output_loads_back_and_converts_or_is_refused(outputs, name, tmp_path):
    assert len(RECIPES) >= 11
    conversion = outputs[name]
    ids = torch.randint(4, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(bitnet_convert.load(conversion.output)(ids).logits, conversion.model(ids).logits)
    again = invoke("quantize", "-r", REPO_ROOT / "recipes" / "a48.yaml", "--model", conversion.output,
                   "--output", tmp_path / "again", "--set", "calibration.samples=0")
    if name in REFUSED:
        assert_user_error(again, f"--model '{conversion.output}' is a bitnet-convert a4.8 output (", REFUSED[name],
                          "not a b1.58 model: give the b1.58 checkpoint it was converted from ('builtin:reference', "
                          "as its conversion_report.json records)")
        assert not (tmp_path / "again").exists()
        return
    assert again.exit_code == 0, again.output
    if name != "b158":  # its own scheme is replaced, and the user is told
        assert "warning: --model" in again.output and "which replaces the scheme it declared" in again.output
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["bitnet_convert"]["scheme"] == "a48"
    assert not config["bitnet_convert"].get("qwt")
    source = bitnet_convert.load(conversion.output)
    reloaded = bitnet_convert.load(tmp_path / "again")
    for module_name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        # the ternary weights are carried as they are
        assert torch.equal(source.get_submodule(module_name).ternary(), reloaded.get_submodule(module_name).ternary())


LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
sys.argv = ["bitnet-convert", *sys.argv[1:]]
from bitnet_convert.cli import main
main()
"""


def run_with_a_file_size_limit(*args) -> subprocess.CompletedProcess:
    """The CLI in a process whose files cannot grow past 200 kB: every larger write fails as on a full disk."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_COMPILE_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", LIMITED, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    result = run_with_a_file_size_limit("quantize", "-r", REPO_ROOT / "recipes" / "a48.yaml", "-o", tmp_path / "out",
                                        "--set", "calibration.samples=0")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: output '{tmp_path / 'out'}' could not be written (File too large; ") and \
        "MB free there" in last and "model.safetensors" in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
