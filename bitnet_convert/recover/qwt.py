"""QwT (Quantization without Tears): a closed-form linear compensation per decoder block.

``out = block_a48(x) + comp(x)``, fitted block by block on the hidden states the already-compensated earlier
blocks produce, with target ``block_b158(x) − block_a48(x)`` (the b1.58 block is the reference). ``XᵀX`` and
``XᵀY`` are accumulated in float64 over the calibration batches; ``[W; b] = (XᵀX + λ·mean(diag XᵀX)·I)⁻¹ XᵀY``
(the bias row is not penalized). A compensation is kept only where it lowers the error on held-out batches.

Forms: ``full`` (``x·W + b``, d² + d parameters), ``lowrank`` (reduced-rank regression: the full solution
projected on the top-``rank`` directions of its fitted values, ``(x·D)·U + b``, 2·d·r + d parameters) and
``channel`` (QwT-v2 style: ``out·s + b`` per channel of the block's own output, 2·d parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet_convert.errors import RecipeError
from bitnet_convert.quant.compensation import Compensation, Form, attach
from bitnet_convert.quant.functional import ordered_sum
from bitnet_convert.quant.schemes import PRESETS
from bitnet_convert.recover.base import Context, RecoveryMethod, register
from bitnet_convert.runtime import distributed
from bitnet_convert.runtime.blocks import BlockRunner, build_layer
from bitnet_convert.runtime.devices import one_cpu_thread

if TYPE_CHECKING:
    from bitnet_convert.recipe import Recipe


class QwTSpec(BaseModel):
    """The recipe's ``recovery.qwt`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    form: Form = "full"
    rank: int | None = Field(None, ge=1, description="rank of the lowrank form")
    ridge: float = Field(1e-3, ge=0.0, description="λ, relative to the mean diagonal of XᵀX")
    holdout: float = Field(0.25, gt=0.0, lt=1.0, description="share of calibration batches for the keep/drop test")


# ------------------------------------------------------------------------------------------ the fit


class Accumulator:
    """Float64 sufficient statistics of one block's regression, over any number of batches, on ``device``."""

    def __init__(self, form: Form, dim: int, device: torch.device | str = "cpu") -> None:
        self.form, self.dim, self.device = form, dim, torch.device(device)
        if form == "channel":  # per channel: n, Σo, Σo², Σt, Σo·t
            self.sums = torch.zeros(5, dim, dtype=torch.float64, device=self.device)
        else:
            self.xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=self.device)
            self.xty = torch.zeros(dim + 1, dim, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor, out: torch.Tensor, target: torch.Tensor) -> None:
        t = target.reshape(-1, self.dim).to(self.device, torch.float64)
        if self.form == "channel":
            o = out.reshape(-1, self.dim).to(self.device, torch.float64)
            n = torch.full((self.dim,), float(o.shape[0]), dtype=torch.float64, device=self.device)
            self.sums += torch.stack([n, o.sum(0), o.pow(2).sum(0), t.sum(0), (o * t).sum(0)])
            return
        xs = x.reshape(-1, self.dim).to(self.device, torch.float64)
        xs = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=torch.float64, device=self.device)], dim=1)
        self.xtx += xs.T @ xs
        self.xty += xs.T @ t

    def reduce(self) -> None:
        """Sum the statistics over the ``torchrun`` processes (each added its own batches)."""
        distributed.sum_tensors([self.sums] if self.form == "channel" else [self.xtx, self.xty])

    def solve(self, ridge: float, rank: int | None = None) -> Compensation:
        """The ridge solution as a :class:`Compensation` on the CPU (see the module docstring)."""
        comp = Compensation(self.form, self.dim, rank)
        if self.form == "channel":
            n, so, so2, st, sot = self.sums.cpu()
            var = so2 / n - (so / n) ** 2
            cov = sot / n - so * st / n**2
            scale = cov / (var + ridge * var.mean())
            comp.scale = scale.float()
            comp.bias = (st / n - scale * so / n).float()
            return comp
        d = self.dim
        xtx, xty = self.xtx.cpu(), self.xty.cpu()
        penalty = torch.zeros(d + 1, dtype=torch.float64)
        penalty[:d] = ridge * xtx.diagonal()[:d].mean()
        with one_cpu_thread():  # the same bits for any thread count
            solution = torch.linalg.solve(xtx + torch.diag(penalty), xty)  # [d + 1, d]
        if self.form == "full":
            comp.weight, comp.bias = solution[:d].float(), solution[d].float()
            return comp
        # reduced-rank regression: keep the top-r directions of the fitted values' covariance Wᵀ XᵀX W
        with one_cpu_thread():
            fitted = solution.T @ xtx @ solution
            _, vectors = torch.linalg.eigh(fitted)
        top = vectors[:, -rank:]  # [d, r], eigenvalues ascending
        comp.down, comp.up = (solution[:d] @ top).float(), top.T.float()
        comp.bias = (solution[d] @ top @ top.T).float()
        return comp


def fit_block(
    form: Form,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    ridge: float,
    holdout: float,
    rank: int | None = None,
    *,
    batches: list[int] | None = None,
    total: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Compensation | None, dict]:
    """Fit one block's compensation on the first batches and test it on the last ``holdout`` share; returns
    ``None`` when it does not lower the held-out error, with the errors either way.

    Under ``torchrun`` each process passes the batches it owns: ``batches`` are their indices among all
    ``total`` batches (default: ``inputs`` are all of them, in order); sums are combined over the processes."""
    batches = list(range(len(inputs))) if batches is None else batches
    total = len(inputs) if total is None else total
    if total < 2:
        raise ValueError("QwT needs at least 2 calibration batches (one to fit, one to test)")
    held = max(1, round(holdout * total))
    fit = total - held
    dim = inputs[0].shape[-1]
    if rank is not None and rank > dim:
        raise ValueError(f"recovery.qwt.rank {rank} is larger than the hidden size {dim}")
    accumulator = Accumulator(form, dim, device)
    rows = list(zip(batches, inputs, outputs, targets, strict=True))
    for _, x, out, target in (r for r in rows if r[0] < fit):
        accumulator.add(x, out, target)
    accumulator.reduce()
    comp = accumulator.solve(ridge, rank)
    tested = [r for r in rows if r[0] >= fit]
    # keep-or-drop decides stored bytes: sums in a thread-independent order
    before = sum(float(ordered_sum(t.double().pow(2))) for _, _, _, t in tested)
    after = sum(float(ordered_sum((comp(x, out) - out - t).double().pow(2))) for _, x, out, t in tested)
    before, after = distributed.sum_floats(before, after)
    record = {"heldout_error_before": before, "heldout_error_after": after, "kept": after < before}
    return (comp if after < before else None), record


@torch.no_grad()
def fit_qwt(
    build_block: Callable[[int, str], nn.Module],
    num_layers: int,
    hidden: list[torch.Tensor],
    runner: BlockRunner,
    spec: QwTSpec,
    on_layer: Callable[[str], None] | None = None,
    *,
    batches: list[int] | None = None,
    total: int | None = None,
) -> tuple[dict[int, Compensation], list[dict]]:
    """Fit compensations block by block. ``build_block(i, "converted" | "reference")`` builds decoder block
    ``i`` (on the CPU); ``runner`` runs it on its device; ``hidden`` are the embeddings of the calibration batches
    (this process's ``batches`` of ``total`` under ``torchrun``). Each block sees the outputs of the compensated
    blocks before it. Memory: two blocks and the activations."""
    kept: dict[int, Compensation] = {}
    records = []
    for index in range(num_layers):
        converted = build_block(index, "converted")
        with runner.onload(converted):
            outputs = [runner.run(converted, h) for h in hidden]
        reference = build_block(index, "reference")
        with runner.onload(reference):
            targets = [runner.run(reference, h) - out for h, out in zip(hidden, outputs, strict=True)]
        del reference
        comp, record = fit_block(spec.form, hidden, outputs, targets, spec.ridge, spec.holdout, spec.rank,
                                 batches=batches, total=total, device=runner.device)
        records.append({"layer": index, **record})
        if comp is not None:
            kept[index] = comp
            hidden = [comp(h, out) for h, out in zip(hidden, outputs, strict=True)]
        else:
            hidden = outputs
        del converted
        if on_layer is not None:
            on_layer(f"layer {index + 1}/{num_layers}")
    return kept, records


@torch.no_grad()
def fit_model(
    model: nn.Module,
    checkpoint,
    ids: torch.Tensor,
    batch_size: int,
    spec: QwTSpec,
    on_layer: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Fit and attach QwT compensations to a converted in-memory ``model`` (its decoder layers are the
    converted blocks; the b1.58 reference blocks are read from ``checkpoint`` one at a time), one block at a time
    on ``device``. Returns the record the conversion report and the export keep."""
    layers = model.model.layers
    total = -(-ids.shape[0] // batch_size)
    if total < 2:
        raise ValueError(
            f"recovery.qwt needs at least 2 calibration batches; calibration.samples={ids.shape[0]} with "
            f"calibration.batch_size={batch_size} gives {total}: raise calibration.samples or lower "
            "calibration.batch_size"
        )
    owned = distributed.owned_batches(ids.shape[0], batch_size)
    hidden = [model.model.embed_tokens(ids[rows]).float() for rows in owned.values()]

    def build_block(index: int, which: str) -> nn.Module:
        return layers[index] if which == "converted" else build_layer(checkpoint, index, PRESETS["b158"])

    runner = BlockRunner(model.model.rotary_emb, device)
    kept, records = fit_qwt(build_block, len(layers), hidden, runner, spec, on_layer, batches=list(owned),
                            total=total)
    for index, comp in kept.items():
        attach(layers[index], comp)
    return {
        "form": spec.form,
        "rank": spec.rank,
        "ridge": spec.ridge,
        "layers": sorted(kept),
        "added_parameters": sum(c.parameters_count for c in kept.values()),
        "flops_per_token": sum(c.flops_per_token for c in kept.values()),
        "blocks": records,
    }


# ---------------------------------------------------------------------------------------- the plug-in


def run_qwt(context: Context, spec: QwTSpec) -> dict:
    """Closed-form QwT compensation, block by block on the calibration windows."""
    layers = len(context.model.model.layers)
    with context.memory_guard(), context.progress.stage("QwT compensation", layers) as advance:
        try:
            return fit_model(context.model, context.checkpoint, context.calibration,
                             context.recipe.calibration.batch_size, spec, on_layer=advance,
                             device=context.device)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None


def _check_recipe(recipe: Recipe) -> None:
    cal = recipe.calibration
    if 0 < cal.samples <= cal.batch_size:
        raise ValueError(f"recovery.qwt: fits on some calibration batches and tests on others, so it needs at "
                         f"least 2; calibration.samples={cal.samples} with calibration.batch_size="
                         f"{cal.batch_size} gives 1: raise samples or lower batch_size")
    if cal.samples == 0:
        raise ValueError("recovery.qwt: fitted on calibration data; calibration.samples must be > 0")


register(RecoveryMethod("qwt", QwTSpec, run_qwt, "closed-form compensation per decoder block", position=10,
                        check_recipe=_check_recipe))
