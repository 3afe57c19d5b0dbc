"""Every shipped recipe's output: it loads back as the model that was converted, and fed back as the input of a
conversion it either converts (its ternary weights, the recipe deciding the scheme) or is refused in one line —
never converted with part of what it computes silently dropped (field report: a QwT export lost its
compensation). Also: the packed values, the files beside the weights, the output directory's temporaries and lock,
and the exports in stock transformers."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
import yaml
from helpers import (
    REPO,
    assert_same_predictions,
    assert_user_error,
    convert,
    invoke,
    logits,
    run_with_a_file_size_limit,
    sha256_of,
)
from transformers import AutoModelForCausalLM

import bitnet_convert
from bitnet_convert.errors import OutputError
from bitnet_convert.io.checkpoint import REPO_ROOT, open_checkpoint
from bitnet_convert.io.export import MARKER, _lock_file, atomic_directory
from bitnet_convert.quant.functional import ternary_absmean
from bitnet_convert.recipe import load_recipe
from bitnet_convert.runtime.modeling import quant_linears

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


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    result = run_with_a_file_size_limit("quantize", "-r", REPO_ROOT / "recipes" / "a48.yaml", "-o", tmp_path / "out",
                                        "--set", "calibration.samples=0")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: output '{tmp_path / 'out'}' could not be written (File too large; ") and \
        "MB free there" in last and "model.safetensors" in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_the_output_are_removed_and_only_ours(tmp_path):
    output = tmp_path / "a48"
    stale = tmp_path / ".a48.tmp-deadbeef"
    stale.mkdir()
    (stale / MARKER).write_text("x")
    (stale / "model.safetensors").write_bytes(b"0" * 100)
    foreign = tmp_path / ".a48.tmp-notours"  # same name pattern, no marker: not ours, kept
    foreign.mkdir()
    other = tmp_path / ".b.tmp-deadbeef"  # another output's temporary: kept
    other.mkdir()
    (other / MARKER).write_text("x")
    result = invoke("quantize", "--output", output, "--set", "calibration.samples=0")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a48.tmp-notours", ".b.tmp-deadbeef", "a48"]
    assert not (output / MARKER).exists()


def test_a_run_killed_between_its_renames_is_recovered(tmp_path):
    from bitnet_convert.io.export import remove_stale_temporaries

    output = tmp_path / "a48"
    previous = tmp_path / ".a48.old-0123abcd"  # killed after moving the previous output aside
    previous.mkdir()
    (previous / "config.json").write_text("previous")
    (previous / MARKER).write_text("x")
    new = tmp_path / ".a48.tmp-4567cdef"
    new.mkdir()
    (new / MARKER).write_text("x")
    assert sorted(p.name for p in remove_stale_temporaries(output)) == [".a48.tmp-4567cdef"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a48"] and (output / "config.json").read_text() == "previous"
    # killed after the new output was put in place, before it was unmarked: it is complete and kept
    (output / MARKER).write_text("x")
    previous.mkdir()
    (previous / MARKER).write_text("x")
    assert [p.name for p in remove_stale_temporaries(output)] == [".a48.old-0123abcd"]
    assert [p.name for p in output.iterdir()] == ["config.json"]


def _hold_lock(path: str, ready, release) -> None:
    from filelock import FileLock

    with FileLock(path):
        ready.set()
        release.wait(30)


def test_a_second_process_cannot_write_the_same_output(tmp_path):
    output = tmp_path / "a48"
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(_lock_file(output)), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        result = invoke("quantize", "--output", output, "--overwrite", "--set", "calibration.samples=0")
        assert_user_error(result, str(output), "another bitnet-convert process")
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        release.set()
        holder.join(30)


def test_overwrite_is_checked_again_at_the_final_rename(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        with atomic_directory(output, overwrite=False) as tmp:
            (tmp / "new.txt").write_text("new")
            output.mkdir()  # someone else created it meanwhile
            (output / "theirs.txt").write_text("theirs")
    assert [p.name for p in output.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bf16_export_in_stock_transformers(tmp_path):
    """Default and matching dtypes load and compute the b1.58 model. Upstream (transformers' offline BitNet
    loader) does not cast checkpoint tensors named ``*weight`` when the requested dtype differs from the file's,
    so ``dtype=torch.float32`` leaves the norms in bf16; ``.to(torch.float32)`` after loading is the fix. When this
    test starts failing on the pinned line, upstream fixed it: update the README."""
    ids = torch.randint(4, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    conversion = bitnet_convert.quantize(REPO / "recipes/b158.yaml", output=str(tmp_path / "b158"),
                                         calibration__samples=0)
    for dtype in (None, torch.bfloat16):
        stock = AutoModelForCausalLM.from_pretrained(conversion.output, **({"dtype": dtype} if dtype else {}))
        assert stock(ids).logits.dtype == torch.bfloat16
    stock = AutoModelForCausalLM.from_pretrained(conversion.output, dtype=torch.float32)
    assert stock.model.norm.weight.dtype == torch.bfloat16  # the upstream behaviour, pinned
    stock = stock.to(torch.float32)
    assert_same_predictions(logits(stock, ids), logits(conversion.model, ids), ids)


def test_bitlinear_export_loads_in_stock_transformers_with_any_dtype(tmp_path, reference_ids):
    """``export.layout: bitlinear`` (scale = 1/α, transformers' BitLinear divides by it): stock transformers loads it
    with float32, bfloat16 and the default dtype; in float32 it computes the exported model bit for bit (the
    converted model divides by the stored 1/α as ``BitLinear`` does), and so does ``bitnet_convert.io.load``."""
    conversion = bitnet_convert.quantize(REPO / "recipes/b158.yaml", output=str(tmp_path / "b158"),
                                         calibration__samples=0, export__layout="bitlinear")
    config = json.loads((conversion.output / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "bitnet", "linear_class": "bitlinear"}
    assert open_checkpoint(conversion.output).layout.value == "packed-bitlinear"
    ours = logits(conversion.model, reference_ids)
    assert torch.equal(logits(bitnet_convert.load(conversion.output), reference_ids), ours)
    for dtype in (torch.float32, torch.bfloat16, None):
        stock = AutoModelForCausalLM.from_pretrained(conversion.output, **({"dtype": dtype} if dtype else {}))
        assert type(stock.model.layers[0].mlp.down_proj).__name__ == "BitLinear"
        out = logits(stock, reference_ids)
        assert out.dtype == (dtype or torch.bfloat16)
        if dtype is torch.float32:
            assert torch.equal(out, ours)





def test_export_loads_in_stock_transformers_as_b158(tmp_path, reference_ids):
    conversion = convert(tmp_path, "b158", export__dtype="float32")
    stock = AutoModelForCausalLM.from_pretrained(conversion.output, dtype=torch.float32)
    layer = stock.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "AutoBitLinear" and not layer.online_quant
    ours = quant_linears(conversion.model)["model.layers.1.mlp.down_proj"]
    assert torch.equal(layer.weight.to(torch.int8), ours.ternary())
    assert_same_predictions(logits(stock, reference_ids), logits(conversion.model, reference_ids), reference_ids)


def test_packed_values_unpack_to_the_ternarized_master(tmp_path, reference_dir):
    conversion = convert(tmp_path, "a48")
    source = open_checkpoint(reference_dir)
    exported = open_checkpoint(conversion.output)
    assert exported.layout.value == "packed-autobitlinear"
    for name in source.linear_names():
        codes, alpha = ternary_absmean(source.tensor(f"{name}.weight"))
        got_codes, got_alpha = exported.ternary(name)
        assert torch.equal(got_codes, codes), name
        assert torch.equal(got_alpha, alpha), name


def test_output_carries_tokenizer_recipe_and_report(tmp_path, reference_dir):
    conversion = convert(tmp_path, "a48")
    out = conversion.output
    assert sha256_of(out / "tokenizer.json") == sha256_of(reference_dir / "tokenizer.json")
    stored = load_recipe(out / "recipe.yaml")
    assert stored.scheme.preset == "a48" and stored.calibration.samples == 4 and stored.output == out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quantization_mode"] == "offline"
    o_spec = {"method": "absmax", "bits": 8, "topk": 0.5, "threshold": None}
    assert config["bitnet_convert"]["activations"]["o"] == o_spec
    report = json.loads((out / "conversion_report.json").read_text())
    assert report == conversion.report
    linears = quant_linears(conversion.model).values()
    assert report["parameters"]["ternary"] == sum(m.in_features * m.out_features for m in linears)
    assert 2.0 <= report["packed_linears"]["bits_per_weight"] <= 2.01
    assert report["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    roles = report["calibration"]["roles"]
    assert roles["o"]["zero_share"] >= 0.5  # top-50% sparsification
    assert roles["down"]["zero_share"] > 0.5  # relu² GLU: mostly zeros
    assert 0.0 < report["calibration"]["active_parameter_share"] < 0.8


