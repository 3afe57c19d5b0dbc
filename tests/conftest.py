"""Shared fixtures. Every test runs offline on the built-in reference model or on tiny generated checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "eval" / "reference" / "model"
MASTER_QC = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


def tiny_config(**changes) -> dict:
    """config.json of a small random BitNet model (2 layers, GQA, relu², tied embeddings)."""
    config = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "relu2",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "quantization_config": dict(MASTER_QC),
    }
    config.update(changes)
    return config


def write_tiny_checkpoint(directory: Path, seed: int = 0, **changes) -> Path:
    """A random bf16-master BitNet checkpoint in ``directory`` (deterministic for a seed)."""
    config = tiny_config(**changes)
    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": (1 + rand(h).float()).to(torch.bfloat16),
                p + "post_attention_layernorm.weight": (1 + rand(h).float()).to(torch.bfloat16),
                p + "self_attn.attn_sub_norm.weight": (1 + rand(h).float()).to(torch.bfloat16),
                p + "mlp.ffn_sub_norm.weight": (1 + rand(i).float()).to(torch.bfloat16),
            }
        )
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert (REFERENCE / "model.safetensors").is_file(), f"the built-in reference model is missing: {REFERENCE}"
    return REFERENCE


@pytest.fixture(scope="session")
def a48_reference(tmp_path_factory) -> Path:
    """The reference model converted with recipes/a48.yaml (no calibration pass), once per test session: the
    output directory, which tests only read (load it for a model of their own)."""
    import bitnet_convert

    out = tmp_path_factory.mktemp("a48") / "a48"  # a short path: reports print it in 80-column titles
    return bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(out), calibration__samples=0).output


@pytest.fixture()
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny")


@pytest.fixture(scope="session")
def reference_ids(reference_dir: Path) -> torch.Tensor:
    """Two windows of 64 validation tokens of the reference corpus."""
    from bitnet_convert.io.data import load_texts, token_stream, windows
    from bitnet_convert.io.load import load_tokenizer

    tokenizer = load_tokenizer(reference_dir)
    stream = token_stream(tokenizer, load_texts("builtin:reference", "validation")[:40])
    return windows(stream, 64, tokenizer.bos_token_id)[:2]


def assert_linears_match(ours: torch.nn.Module, stock: torch.nn.Module) -> None:
    """Every QuantLinear of ``ours`` gives the output of ``stock``'s same-named linear, to fp32 rounding."""
    from bitnet_convert.runtime.modeling import quant_linears

    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    for name, module in quant_linears(ours).items():
        inputs = x[:, : module.in_features]
        with torch.no_grad():
            expected = stock.get_submodule(name)(inputs)
            torch.testing.assert_close(module(inputs), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def assert_same_predictions(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, nll_rtol: float = 2e-3) -> None:
    """Two models' logits on ``ids`` give the same next-token loss (relative ``nll_rtol``) and ≥ 98% the same
    argmax — agreement as predictors, where fp32 rounding flips of activation quantizers rule out 1e-4."""
    nll_a, nll_b = (
        torch.nn.functional.cross_entropy(x[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item() for x in (a, b)
    )
    assert abs(nll_a - nll_b) <= nll_rtol * nll_b
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.98
