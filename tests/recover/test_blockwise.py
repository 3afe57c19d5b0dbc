"""Block-wise recovery: each block's held-out error falls or the block is reverted; a resumed run writes the bytes
of an uninterrupted one; recipe checks."""

from __future__ import annotations

import shutil

import pytest
import torch

import bitnet_convert
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.functional import ternary_absmean
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recipe import Recipe
from bitnet_convert.recover.blockwise import BlockwiseSpec, block_state, saved_latents, train_block
from bitnet_convert.recover.training import latent_from_codes, master_latents
from bitnet_convert.runtime.blocks import BlockRunner, build_layer, run_layer
from bitnet_convert.runtime.modeling import build_model

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


def test_the_model_target_follows_the_b158_models_own_hidden_states_and_resumes(tmp_path, reference_dir):
    """``target: model``: block 0 learns the same target as with ``target: block`` (both start from the
    embeddings); later blocks learn the b1.58 model's own hidden state, which the converted blocks before them
    have drifted from, so their error before training is larger. A resumed run still advances the b1.58 chain
    through the blocks it loads: same bytes, same records."""
    def spec(target, output):
        return Recipe(model=str(reference_dir), output=tmp_path / output,
                      **{**SMALL, "recovery": {"blockwise": {**SMALL["recovery"]["blockwise"], "target": target}}})

    block = bitnet_convert.quantize(spec("block", "block")).report["blockwise"]["blocks"]
    model = bitnet_convert.quantize(spec("model", "full"))
    records = model.report["blockwise"]["blocks"]
    assert records[0] == block[0]
    for index in (1, 2, 3):
        assert records[index]["heldout_error_before"] > 2 * block[index]["heldout_error_before"]
    partial = tmp_path / "partial.blockwise"
    partial.mkdir()
    for index in (0, 1):
        shutil.copy(tmp_path / "full.blockwise" / f"block-{index:04d}.pt", partial)
    resumed = bitnet_convert.quantize(spec("model", "partial"))
    assert resumed.report["blockwise"]["resumed_blocks"] == 2
    assert resumed.report["blockwise"]["blocks"] == records
    assert (model.output / "model.safetensors").read_bytes() == (resumed.output / "model.safetensors").read_bytes()


def test_state_of_another_recipe_is_refused(tmp_path, reference_dir):
    spec = {**SMALL, "recovery": {"blockwise": {**SMALL["recovery"]["blockwise"], "steps": 3}}}
    bitnet_convert.quantize(Recipe(model=str(reference_dir), output=tmp_path / "a", **spec))
    other = {**SMALL, "recovery": {"blockwise": {**SMALL["recovery"]["blockwise"], "steps": 4,
                                                 "checkpoint_dir": str(tmp_path / "a.blockwise")}}}
    with pytest.raises(bitnet_convert.BitNetConvertError, match="block-wise state of a different recipe"):
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
    from helpers import invoke

    from bitnet_convert.io.checkpoint import REPO_ROOT

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


# ------------------------------------------------------------------ resume only from the state of these inputs


def _quantize_cli(tmp_path, *extra):
    from helpers import invoke

    from bitnet_convert.io.checkpoint import REPO_ROOT

    return invoke("quantize", "--recipe", REPO_ROOT / "recipes" / "a48-blockwise.yaml", "--output", tmp_path / "out",
                  "--overwrite", "--set", "calibration.samples=4", "--set", "calibration.seq_len=64",
                  "--set", "calibration.batch_size=2", "--set", "recovery.blockwise.steps=1",
                  "--set", "recovery.blockwise.batch_size=2", "--set", "recovery.blockwise.keep_checkpoint=true",
                  *extra)


def _calibration_text(tmp_path, start: int) -> str:
    from bitnet_convert.io.data import load_texts

    file = tmp_path / "calib.txt"
    file.write_text("\n\n".join(load_texts("builtin:reference", "calib")[start : start + 60]), encoding="utf-8")
    return str(file)


@pytest.mark.parametrize("change", ["calibration text edited", "model weights edited", "state file damaged",
                                    "state file truncated"])
def test_a_state_of_other_inputs_or_a_damaged_one_is_refused(tmp_path, reference_dir, change):
    """Field report: killed after block 0, the calibration file edited, the same command resumed block 0 (trained
    on the old text) with exit 0. The fingerprint covers the content of the model and the calibration windows,
    and each state file carries a checksum: a mismatch is one line and exit 2, never a resume."""
    from helpers import assert_user_error

    model = tmp_path / "model"
    shutil.copytree(reference_dir, model)
    data = _calibration_text(tmp_path, 0)
    first = _quantize_cli(tmp_path, "--model", model, "--calibration-data", data)
    assert first.exit_code == 0, first.output
    state = tmp_path / "out.blockwise"
    for index in (1, 2, 3):  # as if killed after block 0
        (state / f"block-{index:04d}.pt").unlink()
    block0 = state / "block-0000.pt"
    if change == "calibration text edited":
        _calibration_text(tmp_path, 60)
    elif change == "model weights edited":
        from safetensors.torch import load_file, save_file

        tensors = load_file(model / "model.safetensors")
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    elif change == "state file damaged":
        raw = bytearray(block0.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # inside the tensor data: torch.load still reads it
        block0.write_bytes(bytes(raw))
    else:
        block0.write_bytes(block0.read_bytes()[: block0.stat().st_size // 2])
    again = _quantize_cli(tmp_path, "--model", model, "--calibration-data", data)
    expected = {"calibration text edited": "block-wise state of a different recipe, model or data",
                "model weights edited": "block-wise state of a different recipe, model or data",
                "state file damaged": "damaged block-wise state (its checksum does not match its content)",
                "state file truncated": "unreadable block-wise state"}[change]
    assert_user_error(again, str(block0), expected)


def test_an_unwritable_state_directory_is_one_line_before_any_work(tmp_path, reference_dir):
    """Field report: block 0 trained, then a torch serialization traceback. The state directory is checked with
    the output, before any work; a write that fails later is one line too."""
    from helpers import assert_user_error

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _quantize_cli(tmp_path, "--set", f"recovery.blockwise.checkpoint_dir={blocker / 'state'}")
    assert_user_error(result, f"recovery.blockwise.checkpoint_dir '{blocker / 'state'}' cannot be created",
                      "is a file, not a directory")
    assert "Block-wise recovery" not in result.output and not (tmp_path / "out").exists()
    result = _quantize_cli(tmp_path, "--set", f"recovery.blockwise.checkpoint_dir={blocker}")
    assert_user_error(result, f"recovery.blockwise.checkpoint_dir '{blocker}' exists and is not a directory")

    state = tmp_path / "out.blockwise"
    (state / "block-0001.pt").mkdir(parents=True)  # block 1's file cannot be written: a directory is in the way
    result = _quantize_cli(tmp_path)
    assert_user_error(result, f"cannot write the training state '{state / 'block-0001.pt'}'",
                      "recovery.blockwise.checkpoint_dir")
    assert not [p for p in state.iterdir() if p.name.startswith(".")] and not (tmp_path / "out").exists()


def test_a_state_that_cannot_be_written_is_one_line(tmp_path):
    """A full disk while block 0's state is saved (here: a file-size limit): one line naming the file and the
    recipe key, no traceback, no temporary left."""
    from helpers import run_with_a_file_size_limit

    from bitnet_convert.io.checkpoint import REPO_ROOT

    result = run_with_a_file_size_limit(
        "quantize", "-r", REPO_ROOT / "recipes" / "a48-blockwise.yaml", "-o", tmp_path / "out",
        "--set", "calibration.samples=4", "--set", "calibration.seq_len=64", "--set", "calibration.batch_size=2",
        "--set", "calibration.report=false", "--set", "recovery.blockwise.steps=1",
        "--set", "recovery.blockwise.batch_size=2")
    assert result.returncode == 2, result.stderr[-3000:]
    state = tmp_path / "out.blockwise"
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write the training state '{state / 'block-0000.pt'}' (the write failed; "
        + result.stderr.split("(the write failed; ")[1].split(")")[0]
        + "); free space or choose another directory with recovery.blockwise.checkpoint_dir")
    assert "MB free there" in result.stderr and "Traceback" not in result.stderr
    assert not [p for p in state.iterdir() if p.name.startswith(".")] and not (tmp_path / "out").exists()


def test_a_killed_save_leaves_no_temporary_behind_on_the_next_run(tmp_path):
    from bitnet_convert.recover.state import load_state, save_state

    save_state(tmp_path, {"version": 1, "fingerprint": "f"}, "block-0000.pt", "blockwise")
    orphan = tmp_path / ".block-0001.pt.tmp-999999999"  # no such process
    orphan.write_bytes(b"half")
    live = tmp_path / f".block-0001.pt.tmp-{__import__('os').getpid()}"  # this process: still writing
    live.write_bytes(b"half")
    assert load_state(tmp_path, "f", "block-0001.pt", 1, "block-wise", "blockwise") is None
    assert not orphan.exists() and live.exists()
    assert load_state(tmp_path, "f", "block-0000.pt", 1, "block-wise", "blockwise") == {"version": 1,
                                                                                         "fingerprint": "f"}


@pytest.mark.parametrize("change", ["another block's file renamed", "an earlier block trained again differently"])
def test_a_block_file_out_of_place_is_refused(tmp_path, reference_dir, change):
    """A saved block is block i's own, trained after block i-1 as it is now: a file copied over another block's,
    or a later block whose predecessor changed, is refused in one line (it resumed with exit 0)."""
    from helpers import assert_user_error

    first = _quantize_cli(tmp_path, "--model", reference_dir)
    assert first.exit_code == 0, first.output
    state = tmp_path / "out.blockwise"
    if change == "another block's file renamed":
        shutil.copy(state / "block-0002.pt", state / "block-0001.pt")
        expected = (state / "block-0001.pt", "the block-wise state of block 2, not of block 1")
    else:  # block 1 retrained with other settings into the same directory, block 2 kept from before
        from bitnet_convert.recover.state import read_state, save_state

        saved = read_state(state / "block-0001.pt", "block-wise")
        saved["tensors"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in saved["tensors"].items()}
        save_state(state, saved, "block-0001.pt", "blockwise")
        expected = (state / "block-0002.pt", "block 2 was trained after another version of block 1")
    again = _quantize_cli(tmp_path, "--model", reference_dir)
    assert_user_error(again, f"{expected[0]}: ", expected[1])
