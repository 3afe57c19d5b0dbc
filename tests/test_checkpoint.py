"""Checkpoint reading: the three HF BitNet layouts, sharding, and the errors for what is not a b1.58 LM."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_linears_match, assert_same_predictions
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bitnet_convert.errors import CheckpointError
from bitnet_convert.io.checkpoint import Layout, open_checkpoint
from bitnet_convert.quant.packing import pack_ternary
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.runtime.modeling import build_model


def write_packed(source: Path, target: Path, linear_class: str) -> Path:
    """Re-store a master checkpoint packed: ``autobitlinear`` (scale = α) or ``bitlinear`` (scale = 1/α)."""
    checkpoint = open_checkpoint(source)
    tensors = dict(checkpoint.other_tensors())
    for name in checkpoint.linear_names():
        codes, alpha = checkpoint.ternary(name)
        tensors[f"{name}.weight"] = pack_ternary(codes)
        tensors[f"{name}.weight_scale"] = alpha if linear_class == "autobitlinear" else 1.0 / alpha
    target.mkdir(parents=True)
    save_file(tensors, target / "model.safetensors")
    config = dict(checkpoint.config)
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                     "quantization_mode": "offline"}
    (target / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
    return target


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_all_three_layouts_load_and_agree(tmp_path, reference_dir, reference_ids):
    auto = write_packed(reference_dir, tmp_path / "auto", "autobitlinear")
    bitlinear = write_packed(reference_dir, tmp_path / "bitlinear", "bitlinear")
    checkpoints = [open_checkpoint(p) for p in (reference_dir, auto, bitlinear)]
    assert [c.layout for c in checkpoints] == [Layout.MASTER, Layout.PACKED_AUTOBITLINEAR, Layout.PACKED_BITLINEAR]
    master = checkpoints[0]
    for name in master.linear_names():
        codes, alpha = master.ternary(name)
        for other in checkpoints[1:]:
            other_codes, other_alpha = other.ternary(name)
            assert torch.equal(other_codes, codes)
            torch.testing.assert_close(other_alpha, alpha, rtol=1e-6, atol=0)
    outputs = [logits(build_model(c, PRESETS["a48"]), reference_ids) for c in checkpoints]
    assert torch.equal(outputs[0], outputs[1])
    # bitlinear stores 1/α: α comes back within an ulp, and the activation quantizers' RoundClip turns such
    # differences into a few whole quantization steps downstream — the models agree as predictors.
    assert_same_predictions(outputs[2], outputs[0], reference_ids)


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
    from conftest import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "odd", intermediate_size=46)
    with pytest.raises(CheckpointError, match="out_features=46, not divisible by 4"):
        build_model(open_checkpoint(path), PRESETS["a48"])
