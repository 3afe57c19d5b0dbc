"""The native backend: kernel codes equal the reference quantizers', scalar and AVX2 agree bit for bit, integer
sums are exact for any thread count, and the native model computes the reference backend's numbers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REFERENCE
from test_cli import assert_user_error, invoke
from test_field_reports import rms_norm_checkpoint

import bitnet_convert
from bitnet_convert.errors import BackendError
from bitnet_convert.evaluation.evaluate import perplexity
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.io.data import load_texts, token_stream, windows
from bitnet_convert.io.load import build_for_backend, load_tokenizer
from bitnet_convert.native import backend as native
from bitnet_convert.native import build as kernels
from bitnet_convert.quant import functional as F
from bitnet_convert.quant.kv import AttentionSpec, PackedKVCache
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.packing import pack_ternary
from bitnet_convert.quant.schemes import PRESETS, ActivationSpec

OPS = None
REPO_RECIPE = str(REFERENCE.parents[2] / "recipes" / "a48.yaml")
SPECS = {
    "int8 absmax": ActivationSpec(method="absmax", bits=8),
    "int4 absmax": ActivationSpec(method="absmax", bits=4),
    "int4 absmean": ActivationSpec(method="absmean", bits=4),
    "int6 absmean": ActivationSpec(method="absmean", bits=6),
    "fp4 e2m1": ActivationSpec(method="fp4_e2m1"),
    "top-50% int8": ActivationSpec(method="absmax", bits=8, topk=0.5),
    "top-50% fp4": ActivationSpec(method="fp4_e2m1", topk=0.5),
    "threshold int8": ActivationSpec(method="absmax", bits=8, threshold=0.3),
}


def ops():
    kernels.ensure_built()  # no skip: CI has a compiler, and a broken build must fail here
    return torch.ops.bitnet_convert


def isas() -> list[int]:
    ops()
    return [kernels.ISA_SCALAR] + ([kernels.ISA_AVX2] if torch.ops.bitnet_convert.cpu_has_avx2() else [])


def reference_codes(x: torch.Tensor, spec: ActivationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    codes, s = spec.integer_codes(x)
    return codes, s.reshape(-1)


def with_ties(row: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """``row`` with 45 entries moved onto (or one ulp beside) values whose product with the scale is exactly
    ``k + 0.5`` — round-half-to-even decides their codes. Iterated to a fixed point, since the entries change an
    absmean scale (a contraction: they are a small share of the row's mean)."""
    row = row.clone()
    n = 45
    for _ in range(12):
        s = reference_codes(row[None], spec)[1][0]
        k = torch.arange(n, dtype=torch.float32) % 7 - 3
        target = (k + 0.5) / s
        nudged = torch.stack([torch.nextafter(target, -target.sign() * math.inf), target,
                              torch.nextafter(target, target.sign() * math.inf)], dim=1).reshape(-1)[:n]
        row[1 : n + 1] = nudged
    return row


def inputs(spec: ActivationSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 300, generator=g) * torch.tensor([[0.01], [1.0], [3.0], [50.0], [1e-4], [1.0]])
    rows[1, ::3] = 0.0
    zero = torch.zeros(1, 300)
    tied = torch.full((1, 300), 0.75)  # top-K ties: every |x| equal
    tied[0, ::2] = -0.75
    return torch.cat([rows, zero, tied, with_ties(rows[1], spec)[None], with_ties(rows[3], spec)[None]])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_codes_equal_the_reference_quantizer(name):
    spec = SPECS[name]
    x = inputs(spec)
    want, s_want = reference_codes(x, spec)
    if spec.method in ("absmax", "absmean") and spec.topk is None and spec.threshold is None:
        t = x[-2:] * s_want[-2:, None]
        assert ((t - t.floor()) == 0.5).sum() >= 5  # the tie rows do exercise round-half-to-even
    for isa in isas():
        codes, s, sums = native.quantize(x, spec, isa)
        assert codes.dtype == torch.int8 and codes.shape == (x.shape[0], 384)  # 300 padded to 3 · 128
        assert torch.equal(codes[:, :300].float(), want), name
        assert not codes[:, 300:].any()
        assert torch.equal(s, s_want)
        assert torch.equal(sums, want.sum(-1).int())


def random_case(n: int, k: int, t: int, seed: int, zero_share: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(t, k, generator=g) * (torch.rand(t, k, generator=g) > zero_share)
    return w, x


@pytest.mark.parametrize(("n", "k", "t"), [(12, 20, 1), (192, 192, 3), (260, 520, 5), (64, 1000, 9)])
def test_dense_and_sparse_gemm_are_exact_integer_sums(n, k, t):
    w, x = random_case(n, k, t, seed=n + k + t)
    packed = pack_ternary(w)
    for isa in isas():
        codes, s, sums = ops().quantize_absmax(x, 8, isa)
        exact = (codes[:, :k].long() @ w.long().t()).float()  # int64: the true sums
        for divide in (False, True):  # α that multiplies, or 1/α that divides (the bitlinear convention)
            want = exact / (s[:, None] * 0.37) if divide else exact / s[:, None] * 0.37
            dense = ops().ternary_gemm(codes, sums, s, kernels.rows_layout(packed), 0.37, divide, isa)
            sparse = ops().ternary_gemm_sparse(codes, sums, s, kernels.cols_layout(packed), n, 0.37, divide, isa)
            assert torch.equal(dense, want) and torch.equal(sparse, want)


def test_scalar_and_avx2_paths_agree_bit_for_bit():
    if kernels.ISA_AVX2 not in isas():
        pytest.skip("this CPU has no AVX2: only the scalar path exists here")
    w, x = random_case(300, 700, 7, seed=1)
    x[2] *= 1e3
    packed = pack_ternary(w)
    scale = F.absmean_scale(x, 4).reshape(-1)
    wb = torch.randn(300, 704, generator=torch.Generator().manual_seed(2)).bfloat16()
    xb = torch.randn(7, 704, generator=torch.Generator().manual_seed(3))
    results = []
    for isa in (kernels.ISA_SCALAR, kernels.ISA_AVX2):
        codes, s, sums = ops().quantize_absmax(x, 8, isa)
        codes4, sums4 = ops().quantize_scaled(x, scale, -8, 7, isa)
        results.append([codes, s, sums, codes4, sums4,
                        ops().ternary_gemm(codes, sums, s, kernels.rows_layout(packed), 0.5, False, isa),
                        ops().ternary_gemm(codes[:1], sums[:1], s[:1], kernels.rows_layout(packed), 0.3, True, isa),
                        ops().ternary_gemm_sparse(codes, sums, s, kernels.cols_layout(packed), 300, 0.5, False, isa),
                        ops().bf16_gemm(xb, wb, isa), ops().bf16_gemm(xb[:1], wb, isa)])
    for scalar, avx2 in zip(*results, strict=True):
        assert torch.equal(scalar, avx2)


def test_results_do_not_depend_on_the_thread_count():
    w, x = random_case(520, 640, 6, seed=4)
    packed = pack_ternary(w)
    wb = torch.randn(520, 640, generator=torch.Generator().manual_seed(5)).bfloat16()
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            codes, s, sums = ops().quantize_absmax(x, 8, kernels.isa())
            outputs.append([ops().ternary_gemm(codes, sums, s, kernels.rows_layout(packed), 1.0, False,
                                               kernels.isa()),
                            ops().ternary_gemm_sparse(codes, sums, s, kernels.cols_layout(packed), 520, 1.0, False,
                                                      kernels.isa()),
                            ops().bf16_gemm(x, wb, kernels.isa())])
    finally:
        torch.set_num_threads(threads)
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other, strict=True))


def test_native_linear_keeps_two_bits_per_weight_and_matches_quant_linear():
    w, x = random_case(200, 300, 4, seed=6)
    for spec, sparse in ((SPECS["int4 absmean"], False), (SPECS["top-50% int8"], True)):
        reference = QuantLinear.from_ternary(w, torch.tensor([0.2]), spec)
        module = native.NativeLinear(reference, sparse)
        assert module.weight.dtype == torch.uint8
        assert module.weight.numel() == (384 * 256 // 4 if sparse else 200 * 384 // 4)  # padded to 128s, 2 bits
        with torch.no_grad():
            assert torch.equal(module(x[None]), reference(x[None]))


# ---------------------------------------------------------------------------------------- whole models

ATTENTION = {"a48-kv3": AttentionSpec(q_bits=4, k_bits=3, v_bits=3, bos_bits=4, method="minmax")}


def models(preset: str):
    checkpoint = open_checkpoint(REFERENCE)
    roles = PRESETS["a48" if preset == "a48-kv3" else preset]
    return [build_for_backend(checkpoint, preset, roles, backend, attention=ATTENTION.get(preset))
            for backend in ("reference", "native")]


@pytest.fixture(scope="module")
def validation_windows() -> torch.Tensor:
    tokenizer = load_tokenizer(REFERENCE)
    return windows(token_stream(tokenizer, load_texts("builtin:reference", "validation")), 256,
                   tokenizer.bos_token_id)[:8]


@pytest.mark.parametrize("preset", ["b158", "a48", "a48-fp4", "a48-kv3"])
def test_native_model_computes_the_reference_numbers(preset, validation_windows):
    reference, fast = models(preset)
    assert any(isinstance(m, native.NativeLinear) for m in fast.modules())
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    with torch.no_grad():
        a, b = reference(validation_windows[:2]).logits, fast(validation_windows[:2]).logits
    assert (a - b).abs().max() <= 1e-4 * (a.max() - a.min())
    ppl = [perplexity(m, validation_windows, batch_size=4)["perplexity"] for m in (reference, fast)]
    assert f"{ppl[0]:.4f}" == f"{ppl[1]:.4f}"
    prompt = validation_windows[:1, :12]
    generated = []
    for model in (reference, fast):
        cache = PackedKVCache.for_model(model, ATTENTION[preset]) if preset in ATTENTION else None
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=200, min_new_tokens=200, do_sample=False, cache=cache,
                                 pad_token_id=3)
        generated.append(out[0, 12:])
    assert generated[0].numel() == 200 and torch.equal(generated[0], generated[1])


def test_native_backend_honours_the_input_rms_norm(tmp_path):
    source = rms_norm_checkpoint(tmp_path)
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = bitnet_convert.load(source)(ids).logits
        b = bitnet_convert.load(source, backend="native")(ids).logits
    assert (a - b).abs().max() <= 1e-4 * (a.max() - a.min())


@pytest.mark.parametrize("case", ["fp16 export, tied embeddings", "fp16 export, untied", "hidden_size 100",
                                  "hidden_size 100, fp16 export"])
def test_every_export_dtype_and_shape_runs_on_the_default_backend(tmp_path, case):
    """Field reports: an fp16 export of a tied model stopped in the lm_head (fp32 input, fp16 weight), and a hidden
    size the bf16 lm_head kernel does not take (not a multiple of 8) stopped with 'K must be a multiple of 8'.
    Both now run on the native backend and give the reference backend's logits."""
    from conftest import write_tiny_checkpoint

    shape = {"hidden_size": 100, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 52} \
        if "100" in case else {}
    source = write_tiny_checkpoint(tmp_path / "in", tie_word_embeddings="untied" not in case, **shape)
    if "untied" in case:
        from safetensors.torch import load_file, save_file

        tensors = load_file(source / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].flip(0).contiguous()
        save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    dtype = "float16" if "fp16" in case else "auto"
    out = bitnet_convert.quantize(REPO_RECIPE, model=str(source), output=str(tmp_path / "out"),
                                  calibration__samples=0, export__dtype=dtype).output
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model = bitnet_convert.load(out, backend="auto")
    assert any(isinstance(m, native.NativeLinear) for m in model.modules())
    with torch.no_grad():
        a = bitnet_convert.load(out)(ids).logits
        b = model(ids).logits
    assert (a - b).abs().max() <= 1e-4 * (a.max() - a.min())


def test_the_bf16_kernel_refuses_a_width_it_does_not_take():
    with pytest.raises(ValueError, match=r"in_features a multiple of 8; got torch.bfloat16 \[4, 100\]"):
        native.Bf16Linear(torch.zeros(4, 100, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------- selection and fallback


def test_auto_falls_back_with_a_warning_and_native_refuses_when_the_kernels_cannot_build(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_state", {"error": "native backend unavailable: no C++ compiler (c++ not found)"})
    with caplog.at_level("WARNING", logger="bitnet_convert"):
        model = bitnet_convert.load(REFERENCE, backend="auto")
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert "no C++ compiler (c++ not found); using the reference backend" in caplog.text
    with pytest.raises(kernels.NativeUnavailable, match="no C" r"\+\+ compiler"):
        bitnet_convert.load(REFERENCE, backend="native")
    assert_user_error(invoke("perplexity", REFERENCE, "--backend", "native"), "no C++ compiler")


def test_no_compiler_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached build to fall back on
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(kernels.NativeUnavailable, match=r"^native backend unavailable: no C\+\+ compiler \("):
        kernels._build_and_load()


def test_bad_backend_arguments_are_one_line(monkeypatch):
    assert_user_error(invoke("perplexity", REFERENCE, "--backend", "fast"), "--backend 'fast'", "native, reference")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the check can tell
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for command in (["generate", REFERENCE, "-p", "x"], ["perplexity", REFERENCE]):
        assert_user_error(invoke(*command, "--backend", "native", "--device", "cuda"),
                          "--backend native runs on the CPU; got --device cuda:0")
    with pytest.raises(BackendError, match="float32"):
        bitnet_convert.load(REFERENCE, dtype="bfloat16", backend="native")


def test_generate_streams_with_the_native_backend():
    result = invoke("generate", REFERENCE, "-p", "The weather in", "--max-new-tokens", "8", "--backend", "native")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("The weather in") or "8 tokens in" in result.output
    assert "8 tokens in" in result.output


def test_sibling_linears_share_the_input_codes_and_in_place_changes_are_seen():
    w, x = random_case(64, 256, 3, seed=7)
    spec = SPECS["int4 absmean"]
    first = native.NativeLinear(QuantLinear.from_ternary(w, torch.tensor([0.5]), spec), False)
    second = QuantLinear.from_ternary(-w, torch.tensor([0.5]), spec)
    with torch.no_grad():
        y = first(x)
        assert torch.equal(native.NativeLinear(second, True)(x), -y)  # q/k/v-style reuse of the same input
        x.mul_(3.0)  # the same tensor, new values: its codes are recomputed
        assert torch.equal(first(x), QuantLinear.from_ternary(w, torch.tensor([0.5]), spec)(x))


def test_a_cached_build_loads_without_a_compiler(tmp_path):
    import os
    import subprocess
    import sys

    ops()  # the build exists in the cache
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "PATH": os.path.dirname(sys.executable)}
    code = "import bitnet_convert.native.build as k; k.ensure_built(); print('isa', k.isa())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("isa "), result.stderr[-2000:]
