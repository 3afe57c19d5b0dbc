"""Every b1.58 family on its committed reference checkpoint: a Llama-architecture SwiGLU model in the packed
``bitlinear`` layout (Falcon3-1.58bit style) and a 1bitLLM model (float16 latent masters, renamed sub-norms).

b158 equals the family's own forward (stock transformers for Llama; a reimplementation of 1bitLLM's published
forward, whose code we never run), exports reload in stock transformers and in ``bitnet_convert.io.load``, and the
stages (calibration, QwT, distillation, packed KV cache, native kernels) run on both.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, assert_same_predictions, assert_user_error, invoke
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import bitnet_convert
from bitnet_convert.evaluation.evaluate import perplexity
from bitnet_convert.io import families
from bitnet_convert.io.checkpoint import BUILTIN_MODELS, architecture_signature, open_checkpoint
from bitnet_convert.io.data import load_texts, token_stream, windows
from bitnet_convert.io.families import DECODER_LINEARS, role_of
from bitnet_convert.io.load import build_for_backend, load_tokenizer
from bitnet_convert.quant.kv import AttentionSpec, PackedKVCache
from bitnet_convert.quant.schemes import PRESETS, SWIGLU_DEFAULT, SWIGLU_DOWN, preset_roles
from bitnet_convert.recipe import Recipe
from bitnet_convert.runtime.modeling import build_model

LLAMA = BUILTIN_MODELS["builtin:reference-llama"]
ONEBITLLM = BUILTIN_MODELS["builtin:reference-1bitllm"]
FAMILIES = {"llama": LLAMA, "1bitllm": ONEBITLLM}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    tokenizer = load_tokenizer(LLAMA)
    stream = token_stream(tokenizer, load_texts("builtin:reference", "validation")[:60])
    return windows(stream, 128, tokenizer.bos_token_id)[:4]


def published_1bitllm_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """1bitLLM's published forward (``modeling_bitnet.py`` + ``utils_quant.py`` of 1bitLLM/bitnet_b1_58-*),
    reimplemented here in plain torch from its description, on the stored tensors in fp32: Llama decoder
    layers (RMSNorm, RoPE, GQA causal attention, SiLU GLU) with ``inner_attn_ln`` before o_proj and
    ``ffn_layernorm`` before down_proj; every decoder linear ``F.linear(Q_INT8(x), Q_w(W))`` with per-token absmax
    ``127/max|x|`` activations and per-tensor absmean ternary weights."""
    config = json.loads((path / "config.json").read_text())
    t = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    heads, kv_heads, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    hd = config["hidden_size"] // heads

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def linear(x, name):
        s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        xq = (x * s).round().clamp(-128, 127) / s
        w = t[f"{name}.weight"]
        ws = 1 / w.abs().mean().clamp(min=1e-5)
        return F.linear(xq, (w * ws).round().clamp(-1, 1) / ws)

    b, n = ids.shape
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(n).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):
        half = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + half * sin

    mask = torch.full((n, n), float("-inf")).triu(1)
    h = t["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, t[p + "input_layernorm.weight"])
        q = rope(linear(x, p + "self_attn.q_proj").view(b, n, heads, hd).transpose(1, 2))
        k = rope(linear(x, p + "self_attn.k_proj").view(b, n, kv_heads, hd).transpose(1, 2))
        v = linear(x, p + "self_attn.v_proj").view(b, n, kv_heads, hd).transpose(1, 2)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        a = rms(attn.transpose(1, 2).reshape(b, n, -1), t[p + "self_attn.inner_attn_ln.weight"])
        h = h + linear(a, p + "self_attn.o_proj")
        x = rms(h, t[p + "post_attention_layernorm.weight"])
        m = F.silu(linear(x, p + "mlp.gate_proj")) * linear(x, p + "mlp.up_proj")
        h = h + linear(rms(m, t[p + "mlp.ffn_layernorm.weight"]), p + "mlp.down_proj")
    return rms(h, t["model.norm.weight"]) @ t["lm_head.weight"].T


def own_forward_logits(family: str, ids: torch.Tensor) -> torch.Tensor:
    """The family's own b1.58 forward: stock transformers (Llama) or the published 1bitLLM forward."""
    if family == "1bitllm":
        return published_1bitllm_logits(ONEBITLLM, ids)
    stock = AutoModelForCausalLM.from_pretrained(LLAMA, dtype=torch.float32)
    with torch.no_grad():
        return stock(ids).logits


def test_b158_on_packed_bitlinear_llama_is_stock_transformers_bit_for_bit(ids):
    """The Falcon3-style checkpoint (scale = 1/α that divides): b158 computes exactly transformers' ``BitLinear``
    arithmetic, so the logits are stock transformers' bit for bit (max difference 0)."""
    checkpoint = open_checkpoint(LLAMA)
    assert (checkpoint.family.name, checkpoint.layout.value) == ("llama", "packed-bitlinear")
    ours = build_model(checkpoint, PRESETS["b158"])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, own_forward_logits("llama", ids))


def test_b158_on_1bitllm_is_its_published_forward(ids):
    """1bitLLM dequantizes before its float matmul and we sum integer codes exactly, so the two differ by fp32
    rounding (≤ 1e-4 of the logit range; measured 7e-6 on 16 random tokens) until a rounding flip changes one INT8
    code somewhere and, through attention, the logits after it (on text, within the first 16 tokens of one of
    these windows): over whole windows they are the same predictor (perplexity within 1e-4 relative here; the same
    to 4 decimals on the whole validation split, README)."""
    checkpoint = open_checkpoint(ONEBITLLM)
    assert (checkpoint.family.name, checkpoint.layout.value) == ("1bitllm", "master")
    ours = build_model(checkpoint, PRESETS["b158"])
    short = torch.randint(4, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(short).logits, own_forward_logits("1bitllm", short)
        assert (a - b).abs().max() <= 1e-4 * (b.max() - b.min())
        a, b = ours(ids).logits, own_forward_logits("1bitllm", ids)
    assert_same_predictions(a, b, ids)
    nll = [F.cross_entropy(x[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item() for x in (a, b)]
    assert abs(math.exp(nll[0]) - math.exp(nll[1])) <= 1e-4 * math.exp(nll[1])  # 508 tokens; whole split: README


def test_the_published_1bitllm_forward_is_transformers_bitnet_with_silu_and_renamed_sub_norms(ids):
    """The reimplementation is a real check: changing the activation or dropping a sub-norm changes the logits."""
    checkpoint = open_checkpoint(ONEBITLLM)
    assert checkpoint.stored["model.layers.0.self_attn.attn_sub_norm.weight"] == \
        "model.layers.0.self_attn.inner_attn_ln.weight"
    model = build_model(checkpoint, PRESETS["b158"])
    assert model.config.hidden_act == "silu" and model.config.tie_word_embeddings is False
    with torch.no_grad():
        base = model(ids[:1]).logits
        model.model.layers[0].self_attn.attn_sub_norm.weight.mul_(2.0)
        assert (model(ids[:1]).logits - base).abs().max() > 1e-2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_reloads_in_stock_transformers_and_bit_identically_in_load(family, ids, tmp_path):
    """b158 and a48 exports: ``bitnet_convert.io.load`` gives the in-memory model's logits bit for bit; stock
    transformers loads the b158 export (Llama stays Llama, 1bitLLM becomes BitNet) and computes them bit for bit."""
    outputs = {}
    for preset in ("b158", "a48"):
        out = tmp_path / preset
        conversion = bitnet_convert.quantize(Recipe(model=str(FAMILIES[family]), output=out,
                                                    scheme={"preset": preset}, calibration={"samples": 0}))
        with torch.no_grad():
            expected = conversion.model(ids).logits
            assert torch.equal(bitnet_convert.load(out)(ids).logits, expected)
        outputs[preset] = (out, expected)
    out, expected = outputs["b158"]
    config = json.loads((out / "config.json").read_text())
    want = {"llama": ("llama", "bitlinear"), "1bitllm": ("bitnet", "bitlinear")}[family]
    assert (config["model_type"], config["quantization_config"]["linear_class"]) == want
    assert "weight_bits" not in config
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(stock).__name__ == {"llama": "LlamaForCausalLM", "1bitllm": "BitNetForCausalLM"}[family]
    with torch.no_grad():  # the family's default export layout is bitlinear: BitLinear's own arithmetic
        assert torch.equal(stock(ids).logits, expected)


def test_both_scale_conventions_agree_with_stock_transformers(ids, tmp_path):
    """The Llama reference model exported in each layout reloads in ``load`` bit-identically to the converted
    model; stock transformers computes the ``bitlinear`` one (scale divides) bit for bit and the
    ``autobitlinear`` one (scale multiplies, dequantized float sums) as the same predictor. (float32 export:
    transformers' offline ``autobitlinear`` loader leaves bf16 norms uncast under ``dtype=float32``.)"""
    for layout in ("autobitlinear", "bitlinear"):
        out = tmp_path / layout
        conversion = bitnet_convert.quantize(Recipe(model=str(LLAMA), output=out, scheme={"preset": "b158"},
                                                    calibration={"samples": 0},
                                                    export={"linear_class": layout, "dtype": "float32"}))
        assert json.loads((out / "config.json").read_text())["quantization_config"]["linear_class"] == layout
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            ours, theirs = conversion.model(ids).logits, stock(ids).logits
            assert torch.equal(bitnet_convert.load(out)(ids).logits, ours)
        if layout == "bitlinear":
            assert torch.equal(theirs, ours)
        else:
            assert_same_predictions(theirs, ours, ids)


def test_a48_on_swiglu_takes_the_measured_down_proj_treatment():
    """a48 keeps the paper's INT8 down_proj only for relu²; a SwiGLU model gets the measured default, and says so."""
    assert preset_roles("a48", "relu2")["down"] == PRESETS["a48"]["down"]
    assert preset_roles("a48", "silu")["down"] == SWIGLU_DOWN[SWIGLU_DEFAULT]
    assert preset_roles("b158", "silu") == PRESETS["b158"]
    for name, spec in SWIGLU_DOWN.items():
        assert PRESETS[f"a48-swiglu-{name}"] == {**PRESETS["a48"], "down": spec}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantize_with_only_the_model_flag(family, tmp_path, monkeypatch):
    """``bitnet-convert quantize --model DIR`` and nothing else converts a checkpoint of each family (a48, the
    built-in calibration text); the summary names the family and the SwiGLU down_proj choice."""
    monkeypatch.chdir(tmp_path)
    result = invoke("quantize", "--model", FAMILIES[family])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "a48-reference" / "conversion_report.json").read_text())
    assert report["input_family"] == family
    assert report["activations"]["down"] == SWIGLU_DOWN[SWIGLU_DEFAULT].describe()
    assert "SwiGLU" in report["ffn_note"] and f"{family} family" in result.output
    assert "SwiGLU down_proj" in result.output


def test_stages_run_on_each_family(tmp_path, ids):
    """Calibration statistics, QwT, a short distillation and the packed 3-bit KV cache on the Llama model, and
    the native kernels (exact against the reference backend) on both new families."""
    out = tmp_path / "kd"
    recipe = Recipe(model=str(LLAMA), output=out,
                    scheme={"preset": "a48", "attention": {"k_bits": 3, "v_bits": 3, "q_bits": 4}},
                    calibration={"samples": 8, "seq_len": 64, "batch_size": 2},
                    recovery={"qwt": {}, "distill": {"steps": 2, "batch_size": 2, "seq_len": 64}})
    conversion = bitnet_convert.quantize(recipe)
    report = conversion.report
    assert report["qwt"]["layers"] and report["distill"]["steps"] == 2
    assert report["calibration"]["active_parameter_share"] < 1.0
    model = bitnet_convert.load(out)
    cache = PackedKVCache.for_model(model, AttentionSpec(q_bits=4, k_bits=3, v_bits=3))
    with torch.no_grad():  # the packed 3-bit cache and the fake-quantized attention give the same greedy tokens
        packed = model.generate(ids[:1, :12], max_new_tokens=16, do_sample=False, cache=cache, pad_token_id=3)
        fake = model.generate(ids[:1, :12], max_new_tokens=16, do_sample=False, pad_token_id=3)
    assert packed.shape[1] == 28 and cache.nbytes > 0 and torch.equal(packed, fake)
    for path in FAMILIES.values():
        checkpoint = open_checkpoint(path)
        roles = preset_roles("a48", "silu")
        reference, fast = (build_for_backend(checkpoint, "a48", roles, backend, lm_head="int8")
                           for backend in ("reference", "native"))
        with torch.no_grad():
            a, b = reference(ids[:2]).logits, fast(ids[:2]).logits
        assert (a - b).abs().max() <= 1e-4 * (a.max() - a.min())
        ppl = [perplexity(m, ids, batch_size=2)["perplexity"] for m in (reference, fast)]
        assert f"{ppl[0]:.4f}" == f"{ppl[1]:.4f}"


def test_eval_runs_on_a_llama_conversion_without_the_bitnet_baseline(tmp_path):
    """``bitnet-convert eval`` on a Llama a48 export: the built-in tasks (same tokenizer), the paper's sparsity
    pattern on the evaluation documents, and the recipe's BitNet baseline skipped as another model's."""
    out = tmp_path / "a48"
    bitnet_convert.quantize(REPO / "recipes/a48.yaml", model=str(LLAMA), output=str(out), calibration__samples=0)
    report = tmp_path / "eval.json"
    result = invoke("eval", out, "--limit", "20", "--output", report)
    assert result.exit_code == 0, result.output
    assert "measured on another model" in result.output
    data = json.loads(report.read_text())
    assert data["architecture"] == architecture_signature(LLAMA) and data["settings"]["backend"] == "native"
    assert data["results"]["reference_agreement"]["acc"] >= 0.9
    assert data["sparsity"]["sparsity"]["o"] == pytest.approx(0.5, abs=0.01)


def test_the_reference_baseline_is_not_compared_with_another_model_of_the_same_tokenizer(reference_dir):
    """The committed eval baselines were measured on the BitNet reference model; the other reference models share
    its tokenizer, so ``eval`` tells them apart by shape (the report's architecture signature, or that of the
    model directory a baseline names) and does not compare them with it."""
    from bitnet_convert.evaluation.gate import of_another_model
    from bitnet_convert.evaluation.report import load_report

    baseline = load_report(REPO / "eval" / "baselines" / "b158.json")
    assert not of_another_model(baseline, reference_dir)
    assert of_another_model(baseline, LLAMA) and of_another_model(baseline, ONEBITLLM)
    assert not of_another_model({**baseline, "architecture": architecture_signature(LLAMA)}, LLAMA)


def test_inspect_names_the_family_and_the_stored_tensor_names():
    result = invoke("inspect", ONEBITLLM, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["family"], info["layout"]) == ("1bitllm", "master")
    names = {t["name"] for t in info["tensors"]}
    assert "model.layers.*.self_attn.inner_attn_ln.weight" in names and not any("sub_norm" in n for n in names)


def test_falcon_e_config_marker_changes_nothing(tmp_path, ids):
    """onebitllms' Falcon-E configs carry ``is_bitnet_config: true`` (top level and in quantization_config): read,
    same model."""
    model = copy_of(LLAMA, tmp_path)
    qc = json.loads((LLAMA / "config.json").read_text())["quantization_config"]
    edit_config(model, is_bitnet_config=True, quantization_config={**qc, "is_bitnet_config": True})
    with torch.no_grad():
        a = build_model(open_checkpoint(model), PRESETS["b158"])(ids[:1]).logits
        b = build_model(open_checkpoint(LLAMA), PRESETS["b158"])(ids[:1]).logits
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- bad input


def copy_of(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


BAD = {
    "1bitllm missing sub-norm": (ONEBITLLM, lambda p: drop_tensor(p, "model.layers.1.mlp.ffn_layernorm.weight"),
                                 ["tensor 'model.layers.1.mlp.ffn_layernorm.weight' is missing"]),
    "llama unknown linear_class": (LLAMA, lambda p: edit_config(p, quantization_config={
        "quant_method": "bitnet", "linear_class": "ternarylinear"}), ["linear_class 'ternarylinear' is unknown"]),
    "llama gptq": (LLAMA, lambda p: edit_config(p, quantization_config={"quant_method": "gptq", "bits": 4}),
                   ["quant_method is 'gptq', expected 'bitnet'"]),
    "1bitllm gptq": (ONEBITLLM, lambda p: edit_config(p, quantization_config={"quant_method": "gptq"}),
                     ["1bitLLM (BitnetForCausalLM) config with a quantization_config (quant_method 'gptq')"]),
    "1bitllm weight_bits": (ONEBITLLM, lambda p: edit_config(p, weight_bits=2),
                            ["weight_bits=2 is not supported", "weight_bits=1, input_bits=8"]),
    "1bitllm input_bits": (ONEBITLLM, lambda p: edit_config(p, input_bits=4), ["input_bits=4 is not supported"]),
    "llama full precision": (LLAMA, lambda p: edit_config(p, quantization_config=None),
                             ["no quantization_config", "full-precision"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_family_input_is_one_line(case, tmp_path):
    source, corrupt, fragments = BAD[case]
    model = copy_of(source, tmp_path)
    corrupt(model)
    out = tmp_path / "out"
    assert_user_error(invoke("quantize", "--model", model, "--output", out, "--set", "calibration.samples=0"),
                      *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.layers.0.self_attn.q_proj", "qkv"),
        ("model.layers.0.self_attn.k_proj", "qkv"),
        ("model.layers.0.self_attn.v_proj", "qkv"),
        ("model.layers.29.self_attn.o_proj", "o"),
        ("model.layers.3.mlp.gate_proj", "gate_up"),
        ("model.layers.3.mlp.up_proj", "gate_up"),
        ("model.layers.3.mlp.down_proj", "down"),
        ("q_proj", "qkv"),
        ("down_proj", "down"),
        ("lm_head", None),
        ("model.embed_tokens", None),
        ("embed_tokens", None),
        ("model.norm", None),
        ("model.layers.0.input_layernorm", None),
        ("model.layers.0.self_attn.attn_sub_norm", None),
        ("model.layers.0.mlp.ffn_sub_norm", None),
        ("model.layers.0.mlp", None),
        ("model.layers.0.self_attn.q_proj.weight", None),
        ("model.layers.0.self_attn.q_proj_extra", None),
        ("", None),
    ],
)
def test_role_of(name: str, role: str | None) -> None:
    assert role_of(name) == role


def test_role_table_is_exactly_the_seven_linears() -> None:
    for family in families.FAMILIES:
        assert family.linears == DECODER_LINEARS, family.name
    assert [entry.path for entry in DECODER_LINEARS] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert {entry.name: entry.table2 for entry in DECODER_LINEARS} == {
        "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
        "down_proj": "down"}
    assert [entry.name for entry in DECODER_LINEARS if entry.glu_gate] == ["up_proj"]
    assert {entry.name: entry.role for entry in DECODER_LINEARS} == {
        "q_proj": "qkv",
        "k_proj": "qkv",
        "v_proj": "qkv",
        "o_proj": "o",
        "gate_proj": "gate_up",
        "up_proj": "gate_up",
        "down_proj": "down",
    }
