"""Plain helpers shared by the test modules (fixtures are in ``conftest.py``): the repository paths, tiny generated
checkpoints and edits of them, the command-line runner and its one-line error check, and parity assertions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import bitnet_convert
from bitnet_convert.cli import app
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.quant.packing import pack_ternary

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


runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, one ``error:`` line naming the problem (after any finished progress bars), no traceback."""
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and isinstance(result.exception, SystemExit), text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and text.endswith(errors[0]), text
    for fragment in fragments:
        assert fragment in errors[0], text


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def tiny(tmp: Path, **changes) -> Path:
    """A tiny b1.58 checkpoint with the reference tokenizer (so calibration text tokenizes into its vocabulary)."""
    directory = write_tiny_checkpoint(tmp / "model", vocab_size=1024, **changes)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / name, directory / name)
    return directory


def edit_config(directory: Path, **changes) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def edit_tensors(directory: Path, edit: Callable[[dict], None]) -> Path:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def quantization_config(directory: Path, **changes) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def other_tokenizer(model: Path) -> Path:
    """Make the checkpoint's tokenizer one of another family: one more special token (never produced by text)."""
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    top = max(t["id"] for t in tokenizer["added_tokens"])
    top = max(top, *tokenizer["model"]["vocab"].values())
    tokenizer["added_tokens"].append({"id": top + 1, "content": "<other_family>", "single_word": False,
                                      "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    return model


def rms_norm_checkpoint(tmp: Path, with_tensors: bool = True) -> Path:
    directory = quantization_config(tiny(tmp), use_rms_norm=True, rms_norm_eps=1e-5)
    if with_tensors:
        g = torch.Generator().manual_seed(5)

        def add(tensors: dict) -> None:
            for name in [n for n in tensors if n.endswith("_proj.weight")]:
                width = tensors[name].shape[1]
                weight = (1 + 0.3 * torch.randn(width, generator=g)).to(torch.bfloat16)
                tensors[name.removesuffix("weight") + "rms_norm.weight"] = weight

        edit_tensors(directory, add)
    return directory


def native_ops():
    """The native kernels' ``torch.ops`` namespace, built on first use (no skip: CI has a compiler, and a broken
    build must fail the test that needs it)."""
    from bitnet_convert.native import build

    build.ensure_built()
    return torch.ops.bitnet_convert


def native_isas() -> list[int]:
    """The kernel paths this CPU runs: scalar, and AVX2 when it has it."""
    from bitnet_convert.native import build

    return [build.ISA_SCALAR] + ([build.ISA_AVX2] if native_ops().cpu_has_avx2() else [])


def convert(tmp_path: Path, preset: str, name: str | None = None, **overrides):
    """The reference model converted with ``recipes/<preset>.yaml`` into ``tmp_path/<name or preset>`` (4 windows
    of 64 calibration tokens)."""
    return bitnet_convert.quantize(
        REPO / "recipes" / f"{preset}.yaml", output=str(tmp_path / (name or preset)), calibration__samples=4,
        calibration__seq_len=64, **overrides,
    )


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


def random_case(n: int, k: int, t: int, seed: int, zero_share: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(t, k, generator=g) * (torch.rand(t, k, generator=g) > zero_share)
    return w, x


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


#: Prompts of the reference corpus's kind, for the server tests.
PROMPTS = ["Anna is a kind baker who lives in Oakfield.", "The river", "Once upon a time there was a small dog that",
           "Tom"]


def generate_texts(model, tokenizer, prompts, max_new_tokens, kv_bits=None):
    """What ``generate`` (greedy) continues each prompt with, alone."""
    from bitnet_convert.quant.kv import generation_cache

    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        cache, _ = generation_cache(model, kv_bits)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, cache=cache, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts
