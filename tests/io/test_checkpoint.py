"""Checkpoint reading: the three HF BitNet layouts, sharding, fields that change what the model computes
(``use_rms_norm``, ``modules_to_not_convert``), and the errors for what is not a b1.58 LM."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import (
    REPO,
    assert_linears_match,
    assert_same_predictions,
    logits,
    quantization_config,
    rms_norm_checkpoint,
    tiny,
    write_packed,
)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import bitnet_convert
from bitnet_convert.errors import CheckpointError
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.runtime.modeling import build_model


def test_packed_bitlinear_linears_match_stock_transformers(tmp_path, reference_dir):
    path = write_packed(reference_dir, tmp_path / "bitlinear", "bitlinear")
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(stock.model.layers[0].mlp.up_proj).__name__ == "BitLinear"
    assert_linears_match(build_model(open_checkpoint(path), PRESETS["b158"]), stock)


def test_sharded_input_reads_like_single_file(tmp_path, tiny_checkpoint):
    from safetensors import safe_open

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copyfile(tiny_checkpoint / "config.json", sharded / "config.json")
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.arange(10).view(1, 10)
    a = logits(build_model(open_checkpoint(tiny_checkpoint), PRESETS["a48"]), ids)
    b = logits(build_model(open_checkpoint(sharded), PRESETS["a48"]), ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("model_type, architectures", [
    ("gpt2", ["GPT2LMHeadModel"]), ("mistral", None), ("bitnet", ["LlamaForCausalLM"]),
    ("llama", ["BitNetForCausalLM"]),
])
def test_unknown_architecture_is_refused(tiny_checkpoint, model_type, architectures):
    """An architecture no family has, or a model_type that contradicts the architecture, is refused in one line
    naming both and listing every supported family."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(model_type=model_type, architectures=architectures)
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    pattern = (rf"model_type '{model_type}' / architectures {re.escape(str(architectures))} is not a b1.58 causal LM "
               r"bitnet-convert reads; supported: BitNetForCausalLM .*LlamaForCausalLM .*BitnetForCausalLM ")
    with pytest.raises(CheckpointError, match=pattern):
        open_checkpoint(tiny_checkpoint)


def test_bitnet_tensors_under_a_llama_config_are_refused(tiny_checkpoint):
    """A BitNet checkpoint relabelled as Llama holds sub-norms a Llama model has no place for: refused by name."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.ffn_sub_norm.weight' is not part of a "
                                              r"Llama model"):
        open_checkpoint(tiny_checkpoint)


def test_other_quant_method_is_rejected(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq"}
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method is 'gptq'"):
        open_checkpoint(tiny_checkpoint)


def test_corrupted_safetensors(tiny_checkpoint):
    file = tiny_checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        open_checkpoint(tiny_checkpoint)


def test_missing_path_and_offline_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="could not be fetched from the hub"):
        open_checkpoint("some-org/some-model-that-is-not-cached")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        open_checkpoint(tmp_path / "empty")


def test_out_features_not_divisible_by_four(tmp_path):
    from helpers import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "odd", intermediate_size=46)
    with pytest.raises(CheckpointError, match="out_features=46, not divisible by 4"):
        build_model(open_checkpoint(path), PRESETS["a48"])


def test_use_rms_norm_matches_stock_transformers_online_and_packed(tmp_path):
    source = rms_norm_checkpoint(tmp_path)
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = bitnet_convert.load(source)
    stock = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert stock.model.layers[0].mlp.up_proj.rms_norm is not None
    assert_linears_match(ours, stock)  # every linear, RMSNorm included, to fp32 rounding
    conversion = bitnet_convert.quantize(REPO / "recipes/b158.yaml", model=str(source), output=str(tmp_path / "b158"),
                                         calibration__samples=0, export__dtype="float32")
    exported = json.loads((conversion.output / "config.json").read_text())["quantization_config"]
    assert exported["use_rms_norm"] is True and exported["rms_norm_eps"] == 1e-5
    stock_packed = AutoModelForCausalLM.from_pretrained(conversion.output, dtype=torch.float32)
    # the same predictor (stock sums dequantized floats, we sum exact integers; rounding flips a few codes)
    assert_same_predictions(logits(stock_packed, ids), logits(conversion.model, ids), ids)
    assert torch.equal(logits(bitnet_convert.load(conversion.output), ids), logits(conversion.model, ids))
    # the a4.8 quantizers see the normalized input: the RMSNorm changes what is measured and computed
    a48 = bitnet_convert.quantize(REPO / "recipes/a48.yaml", model=str(source), output=str(tmp_path / "a48"),
                                  calibration__samples=0)
    plain = build_model(open_checkpoint(tiny(tmp_path / "plain")), PRESETS["a48"])
    assert (logits(a48.model, ids) - logits(plain, ids)).abs().max() > 0.1


def test_use_rms_norm_without_tensors_uses_ones_as_transformers_does(tmp_path, caplog):
    source = rms_norm_checkpoint(tmp_path, with_tensors=False)
    with caplog.at_level("WARNING", logger="bitnet_convert"):
        ours = bitnet_convert.load(source)
    assert "use_rms_norm is true but 14 linear(s) have no rms_norm.weight" in caplog.text
    assert_linears_match(ours, AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32))


def test_lm_head_named_in_modules_to_not_convert_is_accepted(tmp_path):
    source = quantization_config(tiny(tmp_path), modules_to_not_convert=["lm_head"])
    assert open_checkpoint(source).input_norm_eps is None
