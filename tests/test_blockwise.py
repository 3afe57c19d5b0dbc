"""Block-wise recovery: each block's held-out error falls or the block is reverted; a resumed run writes the bytes
of an uninterrupted one; recipe checks."""

from __future__ import annotations

import shutil

import pytest
import torch

import bitnet_convert
from bitnet_convert.blocks import BlockRunner, build_layer, run_layer
from bitnet_convert.checkpoint import open_checkpoint
from bitnet_convert.modeling import build_model
from bitnet_convert.quant.functional import ternary_absmean
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recipe import Recipe
from bitnet_convert.recover.blockwise import BlockwiseSpec, block_state, saved_latents, train_block
from bitnet_convert.recover.distill import latent_from_codes, master_latents

SMALL = {"calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
         "recovery": {"blockwise": {"steps": 6, "batch_size": 2, "lr": 1e-3, "keep_checkpoint": True}}}


@pytest.fixture(scope="module")
def first_block(reference_dir):
    """Block 0 of the reference model as a48 and as b158, its inputs (8 windows of 64 tokens) and b158 targets."""
    checkpoint = open_checkpoint(reference_dir)
    model = build_model(checkpoint, PRESETS["a48"])
    ids = torch.randint(4, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids).float()
        targets = run_layer(build_layer(checkpoint, 0, PRESETS["b158"]), hidden, model.model.rotary_emb)
    return model, hidden, targets


def _train(model, hidden, targets, **spec):
    block = model.model.layers[0]
    saved = block_state(block)
    record = train_block(block, BlockRunner(model.model.rotary_emb), hidden, targets,
                         BlockwiseSpec(**spec), seed=0,
                         latent_init=lambda name, m: latent_from_codes(m.ternary(), m.alpha()))
    after = block_state(block)
    block.load_state_dict(saved)  # the module-scoped fixture stays the converted block
    return record, saved, after


def test_training_lowers_the_held_out_error(first_block):
    record, saved, after = _train(*first_block, steps=20, batch_size=2, lr=1e-3)
    assert record["kept"] and record["heldout_error_after"] < record["heldout_error_before"]
    assert any(not torch.equal(saved[k], after[k]) for k in saved)


def test_a_block_whose_error_rises_is_reverted(first_block):
    """A learning rate that wrecks the block: its held-out error would rise, so the converted block comes back."""
    record, saved, after = _train(*first_block, steps=3, batch_size=2, lr=5.0, max_grad_norm=None)
    assert not record["kept"] and record["heldout_error_after"] == record["heldout_error_before"]
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_resume_writes_the_bytes_of_an_uninterrupted_run(tmp_path, reference_dir):
    """A run killed after two blocks (their saved states kept, the rest gone) continues at block 2 and exports the
    same bytes; the report records the blocks it resumed."""
    full = bitnet_convert.quantize(Recipe(model=str(reference_dir), output=tmp_path / "full", **SMALL))
    state = tmp_path / "full.blockwise"
    assert sorted(p.name for p in state.iterdir()) == [f"block-{i:04d}.pt" for i in range(4)]
    partial = tmp_path / "partial.blockwise"
    partial.mkdir()
    for index in (0, 1):
        shutil.copy(state / f"block-{index:04d}.pt", partial)
    resumed = bitnet_convert.quantize(Recipe(model=str(reference_dir), output=tmp_path / "partial", **SMALL))
    assert resumed.report["blockwise"]["resumed_blocks"] == 2
    assert full.report["blockwise"]["resumed_blocks"] == 0
    assert (full.output / "model.safetensors").read_bytes() == (resumed.output / "model.safetensors").read_bytes()
    assert resumed.report["blockwise"]["blocks"] == full.report["blockwise"]["blocks"]
    # a later stage continues from the kept blocks' trained float weights: their absmean codes are the model's
    kept = full.report["blockwise"]["kept_layers"]
    assert kept
    source, init = saved_latents(state), master_latents(open_checkpoint(reference_dir), [saved_latents(state)])
    for index in range(4):
        name = f"model.layers.{index}.mlp.down_proj"
        module = full.model.get_submodule(name)
        if index in kept:
            assert torch.equal(ternary_absmean(source(name))[0], module.ternary())
            assert torch.equal(init(name, module), source(name))
        else:
            assert source(name) is None


def test_state_of_another_recipe_is_refused(tmp_path, reference_dir):
    spec = {**SMALL, "recovery": {"blockwise": {**SMALL["recovery"]["blockwise"], "steps": 3}}}
    bitnet_convert.quantize(Recipe(model=str(reference_dir), output=tmp_path / "a", **spec))
    other = {**SMALL, "recovery": {"blockwise": {**SMALL["recovery"]["blockwise"], "steps": 4,
                                                 "checkpoint_dir": str(tmp_path / "a.blockwise")}}}
    with pytest.raises(bitnet_convert.BitNetConvertError, match="block-wise state from a different recipe"):
        bitnet_convert.quantize(Recipe(model=str(reference_dir), output=tmp_path / "b", **other))


@pytest.mark.parametrize(("changes", "message"), [
    ({"calibration": {"samples": 0}}, "recovery.blockwise: trained on calibration data"),
    ({"calibration": {"samples": 1}}, "needs calibration.samples >= 2"),
    ({"dtype": "bfloat16"}, "recovery.blockwise trains in float32"),
])
def test_recipe_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        Recipe(recovery={"blockwise": {}}, **changes)


def test_the_recipe_runs_from_the_command_line_and_cleans_up(tmp_path):
    from test_cli import invoke

    from bitnet_convert.checkpoint import REPO_ROOT

    out = tmp_path / "bw"
    result = invoke("quantize", "--recipe", REPO_ROOT / "recipes" / "a48-blockwise.yaml", "--output", out,
                    "--set", "calibration.samples=8", "--set", "calibration.seq_len=64",
                    "--set", "recovery.blockwise.steps=2")
    assert result.exit_code == 0, result.output
    assert "block-wise recovery" in result.output and "blocks kept" in result.output
    assert not (tmp_path / "bw.blockwise").exists()  # the finished blocks go once the export is written


def test_bfloat16_autocast_trains_too(first_block):
    """``dtype: bfloat16`` runs the training forward under autocast (here on the CPU): it still lowers the
    held-out error, and it is a different computation from the float32 reference."""
    record, _, after = _train(*first_block, steps=20, batch_size=2, lr=1e-3, dtype="bfloat16")
    reference, _, after32 = _train(*first_block, steps=20, batch_size=2, lr=1e-3)
    assert record["kept"] and record["heldout_error_after"] < record["heldout_error_before"]
    assert record["loss_first"] != reference["loss_first"]
    assert any(not torch.equal(after[k], after32[k]) for k in after)
