"""Field reports (issue 11) that are not a bad-input error: checkpoint fields honoured with parity to stock
transformers, warnings about silent degradations, left-padded low-bit attention, the command line a person reads,
the export in stock transformers, and what the user's text means. Bad inputs are in ``test_bad_inputs.py``."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REFERENCE, REPO, assert_linears_match, assert_same_predictions
from test_bad_inputs import edit_tensors, quantization_config, tiny
from test_cli import assert_user_error, invoke
from transformers import AutoModelForCausalLM

import bitnet_convert
from bitnet_convert.errors import OutputError
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.io.data import load_texts
from bitnet_convert.io.export import MARKER, _lock_file, atomic_directory
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.runtime.modeling import build_model


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


# ------------------------------------------------------------------ kind 1: use_rms_norm is honoured


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


# ------------------------------------------------------------------ kind 3: stale temporaries, the lock


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


# ------------------------------------------------------------------ kind 4: warnings and report fields


def test_too_little_calibration_text_and_zero_linears_are_reported(tmp_path):
    def zero(tensors: dict) -> None:
        tensors["model.layers.1.mlp.gate_proj.weight"].zero_()

    model = edit_tensors(tiny(tmp_path), zero)
    data = tmp_path / "six.txt"
    data.write_text("\n\n".join(" ".join(f"Anna has {n} red apples and {n + 1} pears." for _ in range(6))
                                for n in range(6)))
    result = invoke("quantize", "--model", model, "--output", tmp_path / "out", "--calibration-data", data,
                    "--set", "calibration.seq_len=64", "--set", "calibration.samples=16")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    used = report["data"]["calibration"]
    assert used["data"] == str(data) and 0 < used["windows"] < 16 and used["tokens"] == used["windows"] * 64
    lines = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert any(f"holds only {used['windows']} windows" in line and "samples asks for 16" in line for line in lines)
    assert any("1 linear(s) with all-zero weights" in line and "'model.layers.1.mlp.gate_proj'" in line
               for line in lines)
    assert len(report["warnings"]) == 2 and "all-zero" in report["warnings"][0] + report["warnings"][1]


def test_zero_embeddings_are_reported_and_the_report_still_plots(tmp_path):
    model = edit_tensors(tiny(tmp_path), lambda d: d["model.embed_tokens.weight"].zero_())
    result = invoke("quantize", "--model", model, "--output", tmp_path / "out", "--set", "calibration.samples=2",
                    "--set", "calibration.seq_len=32")
    assert result.exit_code == 0, result.output
    assert "1 tensor(s) are all zero (a broken upload?): 'model.embed_tokens.weight'" in result.output
    assert (tmp_path / "out" / "calibration" / "error_heatmap.png").is_file()


def test_perplexity_names_positions_beyond_training_and_files_without_splits(tmp_path, reference_dir):
    data = tmp_path / "v.txt"
    data.write_text("\n\n".join(load_texts("builtin:reference", "validation")[:60]))
    result = invoke("perplexity", reference_dir, "--data", data, "--seq-len", "1024")
    assert result.exit_code == 0, result.output
    assert "--seq-len 1024 is longer than the model's max_position_embeddings (512)" in result.output
    assert "v.txt perplexity" in " ".join(result.output.split()) and ":validation" not in result.output


def test_a_tokenizer_without_bos_is_named_in_perplexity(tmp_path):
    model = tmp_path / "nobos"
    shutil.copytree(REFERENCE, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["bos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "v.txt"
    data.write_text("\n".join(load_texts("builtin:reference", "validation")[:30]))
    result = invoke("perplexity", model, "--data", data, "--seq-len", "64", "--txt-documents", "lines")
    assert result.exit_code == 0, result.output
    assert "warning: the tokenizer of" in result.output and "has no BOS token" in result.output
    assert "windows without BOS" in result.output


# ------------------------------------------------------------------ kind 5: a4.8 attention with left padding


@pytest.fixture(scope="module")
def kv3(tmp_path_factory):
    out = tmp_path_factory.mktemp("pad") / "kv3"
    bitnet_convert.quantize(REPO / "recipes/a48-kv3.yaml", output=str(out), calibration__samples=0)
    return bitnet_convert.load(out), bitnet_convert.load_tokenizer(out)


def test_left_padded_batch_equals_single_prompts(kv3):
    from bitnet_convert.quant.kv import PackedKVCache

    model, tokenizer = kv3
    prompts = ["Anna is a kind baker who", "Tom"]
    rows = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(r),), tokenizer.pad_token_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert (batch[i, width - len(row):] - alone).abs().max() <= 1e-4 * (alone.max() - alone.min())
        for cache in (lambda: PackedKVCache.for_model(model), lambda: None):
            padded = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache=cache(),
                                    pad_token_id=tokenizer.pad_token_id)
            for i, row in enumerate(rows):
                single = model.generate(row[None], max_new_tokens=12, do_sample=False, cache=cache(),
                                        pad_token_id=tokenizer.pad_token_id)
                assert padded[i, width:].tolist() == single[0, len(row):].tolist()


def test_left_padding_is_outside_per_channel_key_statistics_in_the_model(kv3):
    from bitnet_convert.quant.kv import AttentionSpec, install, spec_of

    model, tokenizer = kv3
    paper = spec_of(model)
    install(model, AttentionSpec(k_bits=3, v_bits=3, key_granularity="channel"))
    try:
        row = tokenizer("Anna is a kind baker who", return_tensors="pt").input_ids[0]
        ids = torch.cat([torch.full((3,), tokenizer.pad_token_id), row])[None]
        mask = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(len(row), dtype=torch.long)])[None]
        with torch.no_grad():
            padded = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0, 3:]
            alone = model(row[None]).logits[0]
        assert (padded - alone).abs().max() <= 1e-4 * (alone.max() - alone.min())
    finally:
        install(model, paper)


def test_lm_eval_batching_does_not_change_kv3_results(kv3):
    """lm-eval's two batching paths: log-likelihood batches (right padding) give the results of batch size 1,
    and its generation path (left padding through ``tok_batch_encode`` and ``generate``) the tokens of each prompt
    alone."""
    from lm_eval.models.huggingface import HFLM

    from bitnet_convert.evaluation.evaluate import EvalSettings, lm_eval_results

    model, tokenizer = kv3
    one, many = (lm_eval_results(model, tokenizer, ["reference_agreement"], EvalSettings(limit=6, batch_size=b))
                 for b in (1, 6))
    assert one == many
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["Anna is a kind baker who lives in", "Tom"]

    def generated(batch: list[str]) -> tuple[list[list[int]], torch.Tensor]:
        ids, mask = lm.tok_batch_encode(batch)
        out = lm._model_generate(ids, max_length=ids.shape[1] + 10, stop=["\n\n\n"], attention_mask=mask,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        return [row[ids.shape[1]:].tolist() for row in out.sequences], torch.stack(out.logits, dim=1)

    tokens, scores = generated(prompts)
    for i, prompt in enumerate(prompts):
        alone_tokens, alone_scores = generated([prompt])
        assert tokens[i] == alone_tokens[0]
        span = alone_scores.max() - alone_scores.min()
        assert (scores[i] - alone_scores[0]).abs().max() <= 1e-4 * span


# ------------------------------------------------------------------ kind 6: the command line a person reads


def test_help_shows_defaults_and_no_markup_loss():
    text = " ".join(invoke("calibrate", "--help").output.split())
    assert "Report directory [default: <recipe output>-calibration]" in text and "<bool>" not in text
    assert "Tokens per window. [default: 256; x>=2]" in " ".join(invoke("perplexity", "--help").output.split())


def test_inspect_prints_whole_lines_when_piped(reference_dir):
    result = invoke("inspect", reference_dir)
    assert result.exit_code == 0 and "…" not in result.output
    assert "model.layers.*.self_attn.q_proj.weight" in result.output


def test_generate_uses_the_current_cache_api(tmp_path):
    out = tmp_path / "a48"
    assert invoke("quantize", "--output", out, "--set", "calibration.samples=0").exit_code == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke("generate", out, "--prompt", "Anna is", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if "deprecated" in str(w.message)]


def test_lm_eval_prints_no_git_probe_and_no_bars_outside_a_checkout(tmp_path, capfd, monkeypatch):
    from bitnet_convert.evaluation.evaluate import EvalSettings, lm_eval_results

    monkeypatch.chdir(tmp_path)
    model = bitnet_convert.load(REFERENCE)
    lm_eval_results(model, bitnet_convert.load_tokenizer(REFERENCE), ["reference_agreement"], EvalSettings(limit=2))
    err = capfd.readouterr().err
    assert "fatal" not in err and "it/s]" not in err


def test_default_tasks_follow_the_model_not_its_location(tmp_path):
    from bitnet_convert.evaluation.evaluate import HUB_TASKS, REFERENCE_TASKS, default_tasks

    copy = tmp_path / "elsewhere"
    shutil.copytree(REFERENCE, copy)
    assert default_tasks(open_checkpoint(copy)) == REFERENCE_TASKS
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))  # re-saved: the same tokenizer
    assert default_tasks(open_checkpoint(copy)) == REFERENCE_TASKS
    other = tmp_path / "other"
    shutil.copytree(REFERENCE, other)
    assert default_tasks(open_checkpoint(other_tokenizer(other))) == HUB_TASKS


# ------------------------------------------------------------------ kind 7: the export in stock transformers


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


# ------------------------------------------------------------------ kind 8: the user's text and defaults


def test_txt_is_text_as_written(tmp_path):
    verse = "The sea is calm,\n  the moon is high.\n\n\nA second poem\nends here.\r\n \nLast."
    file = tmp_path / "verse.txt"
    file.write_bytes(verse.encode())
    assert load_texts(str(file)) == ["The sea is calm,\n  the moon is high.", "A second poem\nends here.", "Last."]
    assert load_texts(str(file), txt_documents="lines") == [
        "The sea is calm,", "the moon is high.", "A second poem", "ends here.", "Last."]
    file.write_bytes(b"\xef\xbb\xbfOne\rtwo\r\rThree")  # a byte-order mark and old Mac line ends
    assert load_texts(str(file)) == ["One\ntwo", "Three"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "x"}\n')
    assert load_texts(str(jsonl)) == ["x"]


def test_own_model_uses_the_given_data_in_every_stage(tmp_path):
    model = other_tokenizer(tiny(tmp_path))
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(f"Anna has {n} red apples,\nand Tom has {n + 2}." for n in range(120)))
    args = ["--model", model, "--calibration-data", data, "-r", REPO / "recipes/a48-kd.yaml",
            "--set", "calibration.seq_len=32", "--set", "calibration.samples=4", "--set", "recovery.distill.steps=2",
            "--set", "recovery.distill.batch_size=2", "--set", "recovery.distill.seq_len=32"]
    result = invoke("quantize", "--output", tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["data"]["calibration"]["data"] == str(data) and report["data"]["distill"]["data"] == str(data)
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["recovery"]["distill"]["data"] is None
    # without --calibration-data the built-in corpus is used, and said
    result = invoke("quantize", "--output", tmp_path / "out2", *[a for a in args if a not in ("--calibration-data",
                                                                                              data)])
    assert result.exit_code == 0, result.output
    assert "warning: calibration.data is the built-in reference corpus" in result.output
    assert "warning: recovery.distill.data is the built-in reference corpus" in result.output


def test_the_reference_models_baseline_is_not_used_for_another_model(tmp_path):
    model = other_tokenizer(tiny(tmp_path))
    report = tmp_path / "eval.json"
    result = invoke("eval", model, "-r", REPO / "recipes/a48.yaml", "--tasks", "reference_agreement", "--limit", "2",
                    "-o", report)
    assert result.exit_code == 0, result.output
    assert "warning: not comparing with the recipe's baseline eval/baselines/b158.json" in result.output
    written = json.loads(report.read_text())
    assert "comparison" not in written and "not comparing" in written["warnings"][0]


def test_cli_end_to_end_warning_format_in_a_real_process(tmp_path):
    """The installed command prints a warning as one ``warning:`` line on stderr (not a logging record)."""
    data = tmp_path / "six.txt"
    data.write_text("Anna bakes bread every day.\n" * 40)
    done = subprocess.run([sys.executable, "-m", "bitnet_convert.cli", "calibrate", "-o", str(tmp_path / "cal"),
                           "--calibration-data", str(data), "--set", "calibration.seq_len=64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("warning: calibration.data") and "samples asks for 16" in line
               for line in done.stderr.splitlines()), done.stderr


def test_recipe_error_names_the_cross_field_check_before_work(tmp_path):
    result = invoke("quantize", "-r", REPO / "recipes/a48-qwt.yaml", "--set", "calibration.samples=0",
                    "--output", tmp_path / "o")
    assert_user_error(result, "recovery.qwt: fitted on calibration data")
    assert "Open checkpoint" not in result.output

