"""eval/bench.py and its benchmarks (eval/benchmarks/): the synthetic checkpoint, the table, the jobs, and one tiny
end-to-end conversion benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from bitnet_convert.io.checkpoint import Layout, open_checkpoint
from bitnet_convert.native import build as kernels

# eval/bench.py and its benchmarks/ package live outside the package: import them as the script does
if str(Path(__file__).resolve().parents[1] / "eval") not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import bench
from benchmarks import common, conversion, distill, kv_cache, recovery, runtime, synthetic

TINY = synthetic.ShapeConfig(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=256)


def test_full_shape_is_the_2b4t_parameter_count_in_three_whole_layer_shards() -> None:
    shape = synthetic.ShapeConfig()
    groups = shape.layer_groups()
    params = sum(synthetic._numel(dims) for group in groups for _, dims in group)
    per_layer = 2560 * (2560 + 2 * 640 + 2560) + 3 * 6912 * 2560 + 3 * 2560 + 6912
    assert params == 128256 * 2560 + 30 * per_layer + 2560
    shards = synthetic.plan_shards(shape)
    assert len(shards) == 3
    assert all(2 * sum(synthetic._numel(d) for _, d in shard) <= synthetic.SHARD_BYTES for shard in shards)
    layer_of = {name: name.split(".")[2] for shard in shards for name, _ in shard if name.startswith("model.layers.")}
    shard_layers = [{layer_of[n] for n, _ in shard if n in layer_of} for shard in shards]
    assert all(not (a & b) for i, a in enumerate(shard_layers) for b in shard_layers[i + 1 :])


def test_synthetic_checkpoint_is_a_sharded_bf16_master_checkpoint(tmp_path: Path) -> None:
    synthetic.write_synthetic_checkpoint(tmp_path, TINY, seed=0, max_bytes=100_000)
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.layout is Layout.MASTER
    assert len(checkpoint.files) > 1
    assert len(checkpoint.linear_names()) == 7 * TINY.layers
    assert checkpoint.config["tie_word_embeddings"] is True
    assert checkpoint.config["quantization_config"]["quantization_mode"] == "online"
    assert "lm_head.weight" not in checkpoint.names()
    up = checkpoint.tensor("model.layers.1.mlp.up_proj.weight")
    assert up.dtype == torch.bfloat16 and tuple(up.shape) == (128, 64)
    assert abs(up.float().std().item() - synthetic.INIT_STD) < 0.002
    assert torch.equal(checkpoint.tensor("model.norm.weight"), torch.ones(64, dtype=torch.bfloat16))
    index = json.loads((tmp_path / synthetic.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == synthetic.checkpoint_bytes(tmp_path) - _headers(checkpoint)


def test_trained_sparsity_checkpoint_has_a_trained_models_relu2_zeros(tmp_path: Path) -> None:
    """The ``trained`` synthetic checkpoint: constant offset channels that o_proj/down_proj never write, negative
    gate weights on them, and, decoded on the native backend, about 70% of up_proj rows skipped and more zero
    down_proj codes than random weights give."""
    import bitnet_convert
    from bitnet_convert.native import backend as native

    shape = synthetic.ShapeConfig(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, vocab=256)
    shares = {}
    for sparsity in ("random", "trained"):
        synthetic.write_synthetic_checkpoint(tmp_path / sparsity, shape, seed=0, sparsity=sparsity)
        bitnet_convert.quantize(bench.DEFAULT_RECIPE, model=str(tmp_path / sparsity),
                                output=str(tmp_path / f"{sparsity}-a48"), calibration__samples=0)
        model = bitnet_convert.load(tmp_path / f"{sparsity}-a48", backend="native")
        ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cache = DynamicCache()
            model(ids[:, :16], cache=cache, use_cache=True)
            native.record_zeros(model, True)
            for token in ids[0, 16:].tolist() * 8:
                model(torch.tensor([[token]]), cache=cache, use_cache=True)
        shares[sparsity] = native.linear_zero_shares(model)
    checkpoint = open_checkpoint(tmp_path / "trained")
    offset = slice(0, 256 // synthetic.TrainedSparsity.CHANNEL_SHARE)
    assert torch.all(checkpoint.tensor("model.embed_tokens.weight")[:, offset] == synthetic.INIT_STD)
    assert torch.all(checkpoint.tensor("model.layers.1.self_attn.o_proj.weight")[offset] == 0)
    assert torch.all(checkpoint.tensor("model.layers.1.mlp.gate_proj.weight")[:, offset] < 0)
    assert 0.6 < shares["trained"]["up rows skipped"] < 0.8, shares
    assert shares["random"]["up rows skipped"] < 0.6 and shares["trained"]["down"] > shares["random"]["down"]
    with pytest.raises(ValueError, match="sparsity 'sparse' is unknown; expected one of random, trained"):
        synthetic.write_synthetic_checkpoint(tmp_path / "x", shape, seed=0, sparsity="sparse")


def _headers(checkpoint) -> int:
    """Bytes of the safetensors headers (8-byte length + JSON) of every file."""
    return sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in checkpoint.files)


def test_synthetic_weights_depend_on_the_seed_only(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.write_synthetic_checkpoint(tmp_path / name, TINY, seed=seed)
    read = {name: open_checkpoint(tmp_path / name).tensor("model.layers.0.self_attn.q_proj.weight") for name in "abc"}
    assert torch.equal(read["a"], read["b"])
    assert not torch.equal(read["a"], read["c"])
    assert synthetic.synthetic_key(TINY, 0) != synthetic.synthetic_key(TINY, 1)
    assert synthetic.synthetic_key(TINY, 0) != synthetic.synthetic_key(synthetic.ShapeConfig(layers=3, hidden=64), 0)


def _job(**data: object) -> object:
    return common.JobResult(total_s=2.0, data={"peak_rss_bytes": 1000, "torch_threads": 1, **data})


QUANTIZED = {
    "work_s": 3.0,
    "stage_s": {"open": 0.1, "quantize": 2.0},
    "bits_per_weight": 2.0 + 32 * 2 / 4000,
    "packed_bytes": 1008,
    "ternary_parameters": 4000,
    "linears": 2,
    "input_bytes": 1000,
    "output_bytes": 400,
}
STOCK = {"work_s": 1.0, "load_s": 0.5, "save_s": 0.5, "dtype": "bfloat16", "linear_class": "AutoBitLinear"}


def test_conversion_rows_compare_against_the_targets() -> None:
    rows = {r.metric: r for r in conversion.conversion_rows("m", 1000, _job(**QUANTIZED), _job(**STOCK))}
    assert rows["wall time quantize / transformers"].value == 3.0
    assert rows["wall time quantize / transformers"].passed is False  # 3.0 > 1.5
    assert rows["quantize wall time"].passed is False
    assert rows["quantize peak RSS"].passed is True  # 1000 B ≤ 1.25 × 1000 B
    assert rows["transformers peak RSS"].passed is None  # measured, no target
    assert rows["packed ternary linears"].passed is True
    assert rows["quantize output / input size"].value == 0.4
    assert "export ≈ 0.9" in rows["quantize wall time"].measured


def test_a_failed_transformers_job_becomes_a_row() -> None:
    failed = common.JobResult(total_s=1.0, data={}, error="NotImplementedError: nope")
    rows = {r.metric: r for r in conversion.conversion_rows("m", 1000, _job(**QUANTIZED), failed)}
    assert rows["transformers load+save wall time"].measured == "failed: NotImplementedError: nope"
    assert "wall time quantize / transformers" not in rows
    assert rows["quantize wall time"].passed is None
    assert rows["transformers peak RSS"].measured == "n/a (the job died)"


def test_markdown_table_escapes_pipes() -> None:
    table = common.markdown_table([common.Row("b", "m", "x", "a | b", "≤ 1", passed=False)])
    assert table.splitlines()[2] == "| b | m | x | a \\| b | ≤ 1 | **FAIL** |"


def test_conversion_benchmark_end_to_end_on_a_tiny_checkpoint(tmp_path: Path) -> None:
    synthetic.write_synthetic_checkpoint(tmp_path / "ckpt", TINY, seed=0)
    rows = conversion.compare_conversion("tiny", str(tmp_path / "ckpt"), tmp_path / "ckpt", bench.DEFAULT_RECIPE, 1)
    by_metric = {r.metric: r for r in rows}
    quantize = by_metric["quantize wall time"]
    assert quantize.details["torch_threads"] == 1
    assert quantize.details["linears"] == 7 * TINY.layers
    scale_bits = 32 * 7 * TINY.layers / quantize.details["ternary_parameters"]
    assert by_metric["packed ternary linears"].value == pytest.approx(2.0 + scale_bits)
    assert by_metric["transformers load+save wall time"].details["linear_class"] == "AutoBitLinear"
    assert by_metric["quantize peak RSS"].value > 0


def test_kv_memory_job_counts_the_bytes_of_both_caches() -> None:
    spec = {"layers": 2, "kv_heads": 5, "head_dim": 128, "tokens": 64, "kv_bits": 3, "bos_bits": 4}
    data = kv_cache._job_kv_memory(spec)
    assert data["dense_bytes"] == 2 * 2 * 5 * 64 * 128 * 2  # K and V, layers, heads, tokens, dim, bf16
    # 3-bit codes (48 B) + float16 scale and zero (4 B) per (token, head); the BOS position 4-bit (64 B + 4 B)
    assert data["packed_bytes"] == 2 * 2 * 5 * (63 * 52 + 68)
    assert data["positions"] == 64


def test_distill_job_runs_and_the_extrapolation_is_a_straight_line(tmp_path: Path) -> None:
    synthetic.write_synthetic_checkpoint(tmp_path, TINY, seed=0)
    data = distill._job_distill({"model": str(tmp_path), "steps": 3, "seq_len": 16, "trainable": ["norms", "linears"]})
    per_layer = 64 * (64 + 2 * 32 + 64) + 3 * 128 * 64  # q, k, v, o + gate, up, down
    norms = 2 * (3 * 64 + 128) + 64
    assert data["trained_parameters"] == 2 * per_layer + norms
    assert 0 < data["step_s"] < data["work_s"]
    measured = {2: {"x": 10.0}, 4: {"x": 16.0}}
    assert distill._extrapolate(measured, "x", 30) == 94.0


def test_blockwise_job_runs_one_block_at_a_time(tmp_path: Path) -> None:
    synthetic.write_synthetic_checkpoint(tmp_path, TINY, seed=0)
    data = recovery._job_blockwise({"model": str(tmp_path), "steps": 2, "samples": 4, "seq_len": 16})
    assert data["blocks"] == TINY.layers
    assert 0 < data["block_step_s"] < data["block_s"] < data["work_s"]


def test_runtime_targets_are_ratios_of_the_measured_subjects() -> None:
    fast = {"decode_128_tok_s": 12.0, "prefill_tok_s": 60.0, "rss_after_load_bytes": 1.5e9,
            "decode_128_zero_share": {"o": 0.5, "down": 0.7, "up rows skipped": 0.6},
            "decode_128_split": {"linears": 0.030, "lm_head": 0.020, "rest": 0.010, "token": 0.060},
            "decode_128_bytes": {"linears": 1.0e9, "lm_head": 0.6e9, "kv_cache": 0.1e9}, "read_gb_s": 50.0}
    measured = {"native a48": fast, "reference backend a48": {"decode_128_tok_s": 1.0, "prefill_tok_s": 10.0},
                "native b158": {"decode_128_tok_s": 10.0, "decode_128_split": {"lm_head": 0.020, "token": 0.080}},
                "native a48, int8 lm_head": {"decode_128_tok_s": 15.0},
                "native b158, int8 lm_head": {"decode_128_tok_s": 12.0}}
    rows = {row.metric: row for row in runtime._runtime_targets(30, measured, int(4.8e9))}
    assert rows["native a48 ÷ reference a48, decode after 128"].value == 12.0
    assert rows["native a48 ÷ reference a48, decode after 128"].passed
    assert rows["native a48 ÷ reference a48, prefill"].value == 6.0 and not rows[
        "native a48 ÷ reference a48, prefill"].passed
    sparse = rows["native a48 ÷ native b158, decode after 128"]
    assert sparse.value == pytest.approx(1.2) and sparse.passed is None  # the whole-token target is on trained
    assert "o_proj 50.0%, down_proj 70.0%" in sparse.measured and "up_proj rows skipped 60.0%" in sparse.measured
    assert rows["native a48 ÷ native b158, decode after 128, both int8 lm_head"].value == pytest.approx(1.25)
    layers = rows["native a48 ÷ native b158, decoder layers (a decoded token minus its lm_head)"]
    assert layers.value == pytest.approx(0.060 / 0.040) and layers.passed  # 1.5× ≥ 1.3× on random weights
    memory = rows["native a48 resident memory ÷ bf16 checkpoint"]
    assert memory.value == pytest.approx(1.5 / 4.8) and memory.passed
    trained = {row.metric: row for row in runtime._trained_targets("trained", measured)}
    assert trained["native a48 ÷ native b158, decode after 128"].passed  # 1.2× ≥ 1.2×
    assert trained["native a48 ÷ native b158, decode after 128, both int8 lm_head"].passed
    assert not trained["native a48 ÷ native b158, decoder layers (a decoded token minus its lm_head)"].passed  # < 1.6
    bound = trained["native a48 decode time ÷ bandwidth bound (after 128)"]
    assert bound.value == pytest.approx(0.060 / (1.7e9 / 50e9)) and not bound.passed  # 1.76× > 1.4×
    rest = trained["native a48 non-linear work ÷ a decoded token"]
    assert rest.value == pytest.approx(1 / 6) and not rest.passed
    missing = runtime._runtime_targets(30, {}, int(4.8e9)) + runtime._trained_targets("trained", {})
    assert [row.passed for row in missing] == [False] * 9


def test_kernels_job_measures_bandwidth_and_every_shape() -> None:
    shapes = {"dense": (256, 384, 0.0, False), "sparse": (256, 384, 0.75, True)}
    data = runtime._job_kernels({"shapes": shapes, "copy_bytes": 8_000_000, "working_set_bytes": 1_000_000,
                                 "lm_head": (300, 64), "prefill_gemm": {"tokens": 20, "shapes": {"q": (96, 256)}},
                                 "chosen_rows": {"up": (256, 384, 0.3)}})
    assert data["copy_gb_s"] > 0
    if data["isa"] == 1:  # the table-lookup GEMM (AVX2 only), checked equal to the vpmaddubsw one inside the job
        gemm = data["prefill_gemms"]["q"]
        assert gemm["tokens"] == 20 and gemm["lut_seconds"] > 0 and gemm["maddubs_gmac_s"] > 0
    assert data["lm_heads"]["bf16"]["bytes"] == 2 * data["lm_heads"]["int8"]["bytes"] == 2 * 300 * 64
    assert data["linears"]["dense"]["active_share"] == 1.0 and data["linears"]["dense"]["packed_bytes"] == 256 * 96
    assert 0.1 < data["linears"]["sparse"]["active_share"] < 0.4
    assert data["linears"]["sparse"]["bytes_read"] < data["linears"]["sparse"]["packed_bytes"]
    up = data["linears"]["up"]  # a random 30% of the rows, each 384/4 bytes
    assert 0.15 < up["active_share"] < 0.45 and up["bytes_read"] == round(up["active_share"] * 256) * 96
    assert up["seconds"] > 0 and up["dense_seconds"] > 0


def test_runtime_job_measures_every_figure_of_a_native_subject(tmp_path: Path) -> None:
    import bitnet_convert

    synthetic.write_synthetic_checkpoint(tmp_path / "ckpt", TINY, seed=0)
    bitnet_convert.quantize(bench.DEFAULT_RECIPE, model=str(tmp_path / "ckpt"), output=str(tmp_path / "a48"),
                            calibration__samples=0)
    data = runtime._job_runtime({"subject": "load", "model": str(tmp_path / "a48"), "backend": "native",
                               "prefill": 16, "contexts": [8], "new_tokens": 4, "budget_s": 60,
                               "read_bytes": 4_000_000})
    assert data["prefill_tokens"] == 16 and data["prefill_tok_s"] > 0 and data["decode_8_tokens"] == 4
    if kernels.isa() == kernels.ISA_AVX2:  # a48's q/k/v and gate/up take 4-bit inputs: the table lookup
        assert data["prefill_lut_tok_s"] > 0 and data["prefill_vpmaddubsw_tok_s"] > 0
    assert data["rss_after_load_bytes"] > 0 and data["dtype"] == "bfloat16"  # the embedding kept as exported
    zeros = data["decode_8_zero_share"]
    assert zeros["o"] == pytest.approx(0.5, abs=0.02) and 0 < zeros["down"] < 1  # top-50% o_proj; relu² down_proj
    assert 0 < zeros["up rows skipped"] < 1  # the gated relu² FFN ran
    split = data["decode_8_split"]
    assert split["linears"] > 0 and split["lm_head"] > 0 and split["rest"] > 0
    assert split["token"] == pytest.approx(split["linears"] + split["lm_head"] + split["rest"])
    read = data["decode_8_bytes"]
    assert read["lm_head"] == TINY.vocab * TINY.hidden * 2 and read["kv_cache"] > 0 and read["linears"] > 0
    assert data["read_gb_s"] > 0
    busy = runtime._job_neighbour({"model": str(tmp_path / "a48"), "tokens": 2, "thread_counts": [1]})["runs"]
    assert set(busy) == {"1"} and set(busy["1"]) == {"quiet", "fixed", "free-cores"}
    assert all(speed > 0 for speed in busy["1"].values())


def test_a_hanging_job_is_killed_with_its_children_and_fails_its_row(monkeypatch, tmp_path):
    """A job that hangs (here: a child process that sleeps, as torchrun's workers would) is killed with its whole
    process group after BENCH_JOB_TIMEOUT; what it printed is kept."""
    import time

    monkeypatch.setenv("BENCH_JOB_TIMEOUT", "2")
    pid_file = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
            "time.sleep(60)")
    proc = common.run_bounded([sys.executable, "-c", code])
    assert proc.returncode == 124 and proc.stdout == "started\n"
    assert proc.stderr.endswith("timed out after 2 s (BENCH_JOB_TIMEOUT)")
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the grandchild was killed too (gone, or a zombie awaiting its reaper)
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the job's child process outlived the timeout")
