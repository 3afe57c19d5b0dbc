"""The distillation fine-tune: straight-through training forward, losses, schedules, resume, pipeline, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO

import bitnet_convert
from bitnet_convert.errors import RecipeError
from bitnet_convert.io.checkpoint import open_checkpoint
from bitnet_convert.io.data import load_texts, token_stream
from bitnet_convert.io.load import load_tokenizer
from bitnet_convert.quant import functional as F
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recover import distill as kd
from bitnet_convert.recover import training
from bitnet_convert.runtime.modeling import build_model

SMALL = {"steps": 4, "batch_size": 2, "seq_len": 32, "save_every": 2}


def test_latent_from_codes_gives_back_the_codes_and_scale():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (24, 40), generator=generator, dtype=torch.int8)
    alpha = torch.tensor([0.0371])
    again, alpha_again = F.ternary_absmean(training.latent_from_codes(codes, alpha))
    assert torch.equal(again, codes)
    assert torch.allclose(alpha_again, alpha, rtol=1e-6, atol=0)


def test_training_forward_is_straight_through():
    generator = torch.Generator().manual_seed(1)
    master = torch.randn(16, 32, generator=generator) * 0.05
    codes, alpha = F.ternary_absmean(master)
    linear = QuantLinear.from_ternary(codes, alpha, PRESETS["a48"]["o"])
    x = torch.randn(3, 5, 32, generator=generator)
    expected = linear(x)
    linear.latent = master.clone().requires_grad_(True)
    linear.train()
    xq = linear._quantize_input(x)
    wq = F.ternary_absmean_fake(master)
    kept = F.topk_mask(x, 0.5).float()
    assert linear.topk_gradient == "kept"  # the default
    for mode, mask in (("all", torch.ones_like(kept)), ("kept", kept)):
        linear.topk_gradient = mode
        linear.latent.grad = None
        xs = x.clone().requires_grad_(True)
        y = linear(xs)
        assert torch.allclose(y, expected, rtol=1e-5, atol=1e-6)  # same numbers as the packed forward
        y.pow(2).sum().backward()
        # the gradient of a float linear evaluated at the quantized point; the rounding is straight-through, the
        # top-K passes it to every channel ("all") or to the kept ones only ("kept": its own gradient)
        grad_y = 2 * y.detach()
        assert torch.allclose(xs.grad, (grad_y @ wq) * mask, rtol=1e-5, atol=1e-6)
        assert torch.allclose(linear.latent.grad, (grad_y.reshape(-1, 16).T @ xq.reshape(-1, 32)), rtol=1e-4,
                              atol=1e-5)
        assert (xs.grad != 0).float().mean() == pytest.approx(mask.mean().item(), abs=0.02)
    assert kept.mean() == 0.5
    # a warm-up λ blends values and gradients alike: (1 − λ)·x + λ·q, gradient (1 − λ) + λ·mask
    linear.ste_lambda = 0.25
    xs = x.clone().requires_grad_(True)
    y = linear(xs)
    blended = 0.75 * master + 0.25 * wq  # the weight blends too
    assert torch.allclose(y, (0.75 * x + 0.25 * xq) @ blended.T, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert torch.allclose(xs.grad, (0.75 + 0.25 * kept) * blended.sum(0), rtol=1e-5, atol=1e-6)
    # λ = 0 is the float linear
    linear.ste_lambda = 0.0
    assert torch.allclose(linear(x), x @ master.T, rtol=1e-5, atol=1e-6)


def test_losses_and_schedules():
    generator = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 11, generator=generator), torch.randn(2, 3, 11, generator=generator)
    assert kd.kd_loss(t, t).abs() < 1e-6
    p_t = t.softmax(-1)
    manual = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(kd.kd_loss(s, t), manual, rtol=1e-5)
    assert torch.allclose(kd.kd_loss(s, t, 2.0), 4 * kd.kd_loss(s / 2, t / 2), rtol=1e-5)
    hidden = (s, s + 1, s * 2)
    assert kd.hidden_loss(hidden, hidden) == 0
    assert torch.allclose(kd.hidden_loss((s, t, t), (s, 2 * t, 2 * t)), torch.tensor(0.25))
    spec = kd.DistillSpec(steps=10, lr=1.0, lr_warmup_steps=1, ste_warmup_steps=3)
    lrs = [kd.learning_rate(spec, step) for step in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and all(a > b for a, b in itertools.pairwise(lrs[1:]))
    assert 0 < lrs[-1] < 0.05
    assert [kd.ste_lambda(spec, step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert kd.learning_rate(kd.DistillSpec(steps=10, lr=1.0, schedule="constant"), 9) == 1.0


def _models(reference_dir: Path):
    checkpoint = open_checkpoint(reference_dir)
    student = build_model(checkpoint, PRESETS["a48"])
    teacher = build_model(checkpoint, PRESETS["b158"])
    tokenizer = load_tokenizer(reference_dir)
    stream = token_stream(tokenizer, load_texts("builtin:reference", "calib")[:60])
    return checkpoint, student, teacher, stream, tokenizer.bos_token_id


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_resumed_fine_tune_equals_an_uninterrupted_one(reference_dir, tmp_path):
    spec = kd.DistillSpec(**SMALL, hidden_mse=0.5, ste_warmup_steps=2, lr=1e-3,
                          trainable=["norms", "linears", "embeddings"])
    checkpoint, student, teacher, stream, bos = _models(reference_dir)
    common = {"seed": 3, "recipe_fingerprint": "abc", "bos_id": bos, "latent_init": training.master_latents(checkpoint)}
    whole = kd.distill(student, teacher, stream, spec, state_dir=tmp_path / "whole", **common)
    uninterrupted = _state(student)

    _, student, teacher, _, _ = _models(reference_dir)

    def crash(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match=r"fine-tune stopped at step 3 of 4; the state of step 2 is in "
                                                r"'.*cut'; run the same recipe again to resume from it"):
        kd.distill(student, teacher, stream, spec, state_dir=tmp_path / "cut", on_step=crash, **common)
    assert torch.load(tmp_path / "cut" / kd.STATE_FILE, weights_only=True)["step"] == 2
    _, student, teacher, _, _ = _models(reference_dir)
    seen = []
    resumed = kd.distill(student, teacher, stream, spec, state_dir=tmp_path / "cut",
                         on_step=lambda step, loss: seen.append((step, loss == loss)), **common)
    assert resumed["resumed_from_step"] == 2 and resumed["losses"] == whole["losses"]
    assert seen == [(1, False), (2, False), (3, True), (4, True)]  # skipped steps reported without a loss
    after = _state(student)
    assert after.keys() == uninterrupted.keys()
    assert all(torch.equal(after[k], uninterrupted[k]) for k in after)
    assert any(not torch.equal(after[k], v) for k, v in _state(_models(reference_dir)[1]).items())
    # the state of another recipe is never resumed
    assert teacher.model.embed_tokens.weight is not student.model.embed_tokens.weight  # trained: never shared
    with pytest.raises(ValueError, match="fine-tune state of a different recipe, model or data"):
        kd.distill(student, teacher, stream, spec, state_dir=tmp_path / "cut", **{**common, "recipe_fingerprint": "x"})


def test_fine_tune_lowers_the_divergence_from_the_teacher(reference_dir, tmp_path, reference_ids):
    _, student, teacher, stream, bos = _models(reference_dir)
    with torch.no_grad():
        target = teacher(reference_ids).logits
        before = float(kd.kd_loss(student(reference_ids).logits, target))
    spec = kd.DistillSpec(steps=6, batch_size=4, seq_len=64, lr=1e-3, trainable=["norms"])
    rng = torch.get_rng_state()
    record = kd.distill(student, teacher, stream, spec, seed=0, state_dir=tmp_path / "s", recipe_fingerprint="a",
                        bos_id=bos)
    assert torch.equal(torch.get_rng_state(), rng)  # the user's global RNG is left alone
    # the frozen embedding (tied with the output layer) is held once, by both models
    assert teacher.model.embed_tokens.weight is student.model.embed_tokens.weight is teacher.lm_head.weight
    with torch.no_grad():
        after = float(kd.kd_loss(student(reference_ids).logits, target))
    assert after < 0.9 * before
    assert record["trained_parameters"] == sum(p.numel() for n, p in student.named_parameters()
                                               if n.endswith("norm.weight"))
    assert not student.training and not any(p.requires_grad for p in student.parameters())


def test_quantize_with_qwt_and_kd_round_trips_and_is_deterministic(tmp_path, reference_ids):
    options = {"recovery__qwt": {"form": "lowrank", "rank": 8},
               "recovery__distill": {**SMALL, "trainable": ["norms", "linears", "qwt"]},
               "calibration__samples": 4, "calibration__batch_size": 2, "calibration__report": False}
    first = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a"), **options)
    record = first.report["distill"]
    assert record["steps"] == 4 and len(record["losses"]) == 4 and record["trainable"] == ["norms", "linears", "qwt"]
    assert not (tmp_path / "a.distill").exists()  # the training state goes once the output is written
    loaded = bitnet_convert.load(first.output)
    with torch.no_grad():
        assert torch.equal(loaded(reference_ids).logits, first.model(reference_ids).logits)
    qwt = first.report["qwt"]["layers"]
    assert qwt
    fitted = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "q"),
                                     **{k: v for k, v in options.items() if k != "recovery__distill"})
    assert not torch.equal(fitted.model.model.layers[qwt[0]].qwt.up, loaded.model.layers[qwt[0]].qwt.up)
    second = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "b"), **options)
    assert (first.output / "model.safetensors").read_bytes() == (second.output / "model.safetensors").read_bytes()


def test_kd_without_a_teacher_is_a_clear_error(tmp_path):
    recipe = REPO / "recipes/a48.yaml"
    converted = bitnet_convert.quantize(recipe, output=str(tmp_path / "a48"), calibration__samples=0).output
    with pytest.raises(RecipeError, match=r"no b1\.58 teacher for the fine-tune: the input model '.*a48' is a "
                                          r"bitnet-convert a4\.8 output \(scheme a48\), not a b1\.58 model: give the "
                                          r"b1\.58 checkpoint it was converted from \('builtin:reference', as its "
                                          r"conversion_report\.json records\) as recovery\.distill\.teacher"):
        bitnet_convert.quantize(recipe, model=str(converted), output=str(tmp_path / "x"), recovery__distill=SMALL)
    with pytest.raises(RecipeError, match=r"recovery\.distill\.teacher '.*a48' is a bitnet-convert a4\.8 output"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "x"),
                                recovery__distill={**SMALL, "teacher": str(converted)})
    with pytest.raises(RecipeError, match=r"recovery\.distill\.teacher: .*nowhere"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "x"),
                                recovery__distill={**SMALL, "teacher": str(tmp_path / "nowhere")})
    with pytest.raises(RecipeError, match="trainable names 'qwt' but the model has no QwT compensation"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "x"), calibration__samples=0,
                                recovery__distill={**SMALL, "trainable": ["qwt"]})
    with pytest.raises(RecipeError, match=r"recovery\.distill\.trainable\.0: Input should be 'norms'"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "x"), recovery__distill={"trainable": ["heads"]})
    with pytest.raises(RecipeError, match=r"recovery\.distill trains in float32; set dtype: float32 \(got dtype: "
                                          r"bfloat16\)"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "x"), recovery__distill={}, dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a48"]  # nothing written by the failures


def test_kd_with_a_teacher_given_explicitly(tmp_path, tiny_checkpoint):
    recipe = REPO / "recipes/a48.yaml"
    with pytest.raises(RecipeError, match=r"recovery\.distill\.teacher '.*tiny': vocab_size 96 differs from the "
                                          r"student's 1024"):
        bitnet_convert.quantize(recipe, output=str(tmp_path / "x"),
                                recovery__distill={**SMALL, "teacher": str(tiny_checkpoint)})
    # a b1.58 export is a valid teacher, also for a student read from an a4.8 export
    teacher = bitnet_convert.quantize(REPO / "recipes/b158.yaml", output=str(tmp_path / "b158"),
                                      calibration__samples=0).output
    student = bitnet_convert.quantize(recipe, output=str(tmp_path / "a48"), calibration__samples=0).output
    result = bitnet_convert.quantize(recipe, model=str(student), output=str(tmp_path / "y"), calibration__samples=0,
                                     recovery__distill={**SMALL, "teacher": str(teacher)})
    assert len(result.report["distill"]["losses"]) == 4
    assert json.loads((result.output / "config.json").read_text())["bitnet_convert"]["scheme"] == "a48"


def test_cli_reports_a_missing_teacher_on_one_line(tmp_path):
    from tests.test_cli import assert_user_error, invoke, leftovers

    converted = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a48"),
                                        calibration__samples=0).output
    result = invoke("quantize", "--recipe", REPO / "recipes/a48-kd.yaml", "--model", converted,
                    "--output", tmp_path / "kd")
    assert_user_error(result, "no b1.58 teacher for the fine-tune", "recovery.distill.teacher")
    assert leftovers(tmp_path) == ["a48"]


def test_cli_says_where_an_interrupted_fine_tune_left_its_state(monkeypatch):
    from bitnet_convert import pipeline
    from bitnet_convert.errors import Interrupted
    from tests.test_cli import invoke

    def stop(*args, **kwargs):
        raise Interrupted("fine-tune stopped at step 7 of 300; the state of step 5 is in 'out/x.distill'")

    monkeypatch.setattr(pipeline, "run", stop)
    result = invoke("quantize", "--recipe", REPO / "recipes/a48-kd.yaml")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.output.strip().endswith("interrupted: fine-tune stopped at step 7 of 300; the state of step 5 is "
                                          "in 'out/x.distill'")


def test_out_of_memory_during_the_fine_tune_names_the_knobs(tmp_path, monkeypatch):
    from tests.test_cli import assert_user_error, invoke, leftovers

    def exhausted(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(kd, "kd_loss", exhausted)
    result = invoke("quantize", "--recipe", REPO / "recipes/a48-kd.yaml", "--output", tmp_path / "kd",
                    "--set", "calibration.samples=0")
    assert_user_error(result, "the fine-tune ran out of memory with recovery.distill.batch_size=8, "
                              "recovery.distill.seq_len=256", "--set recovery.distill.batch_size=4")
    assert leftovers(tmp_path) == []


def test_a_later_stage_starts_from_the_weights_an_earlier_stage_trained(reference_dir):
    """The fine-tune after block-wise recovery (or any order of stages) starts each latent from the master weight
    only where the linear is still the master's ternarization; a linear an earlier stage changed starts from its
    own codes and scale."""
    from bitnet_convert.recover.training import master_latents

    checkpoint = open_checkpoint(reference_dir)
    model = build_model(checkpoint, PRESETS["a48"])
    init = master_latents(checkpoint)
    name = "model.layers.1.mlp.down_proj"
    untouched = model.get_submodule("model.layers.1.mlp.up_proj")
    assert torch.equal(init("model.layers.1.mlp.up_proj", untouched),
                       checkpoint.tensor("model.layers.1.mlp.up_proj.weight").float())
    trained = model.get_submodule(name)
    codes = trained.ternary().clone()
    codes[0] = -codes[0]  # what a trained block looks like: other codes, another scale
    trained.set_ternary(codes, trained.alpha() * 1.01)
    latent = init(name, trained)
    assert torch.equal(latent, training.latent_from_codes(codes, trained.alpha()))
    assert torch.equal(F.ternary_absmean(latent)[0], codes)


def test_bfloat16_autocast_fine_tune(tmp_path):
    """``recovery.distill.dtype: bfloat16`` runs the forwards under autocast: it trains (another computation than
    float32, the same from the first loss to within bf16's precision), and the export is the packed model."""
    options = {"calibration__samples": 0, "recovery__distill": {**SMALL, "save_every": 4}}
    fp32 = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a"), **options)
    options["recovery__distill"] = {**options["recovery__distill"], "dtype": "bfloat16"}
    bf16 = bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "b"), **options)
    one, other = fp32.report["distill"]["losses"], bf16.report["distill"]["losses"]
    assert one != other and other[0] == pytest.approx(one[0], rel=0.1)
    assert bf16.report["packed_linears"]["bits_per_weight"] == fp32.report["packed_linears"]["bits_per_weight"]


def test_a_fine_tune_state_trained_on_other_text_is_refused(tmp_path):
    """The fine-tune's state is tied to the content of its text (recovery.distill.data), not only its name."""
    from bitnet_convert.io.data import load_texts

    text = tmp_path / "text.txt"
    paragraphs = load_texts("builtin:reference", "calib")
    text.write_text("\n\n".join(paragraphs[:80]), encoding="utf-8")
    options = {"recovery__distill": {**SMALL, "data": str(text), "keep_checkpoint": True},
               "calibration__samples": 0, "overwrite": True}
    bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a"), **options)
    text.write_text("\n\n".join(paragraphs[80:160]), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"a\.distill/state\.pt: fine-tune state of a different recipe, model or "
                                          "data"):
        bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(tmp_path / "a"), **options)
