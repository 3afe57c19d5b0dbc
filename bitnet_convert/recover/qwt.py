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
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

Form = Literal["full", "lowrank", "channel"]


class QwTSpec(BaseModel):
    """The recipe's ``recovery.qwt`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    form: Form = "full"
    rank: int | None = Field(None, ge=1, description="rank of the lowrank form")
    ridge: float = Field(1e-3, ge=0.0, description="λ, relative to the mean diagonal of XᵀX")
    holdout: float = Field(0.25, gt=0.0, lt=1.0, description="share of calibration batches for the keep/drop test")


class Compensation(nn.Module):
    """``comp(x, out)`` added to a decoder block's output (see the module docstring for the forms)."""

    def __init__(self, form: Form, dim: int, rank: int | None = None) -> None:
        super().__init__()
        self.form, self.dim, self.rank = form, dim, rank
        if form == "full":
            self.register_buffer("weight", torch.zeros(dim, dim))
        elif form == "lowrank":
            if rank is None:
                raise ValueError("the lowrank form needs a rank")
            self.register_buffer("down", torch.zeros(dim, rank))
            self.register_buffer("up", torch.zeros(rank, dim))
        else:
            self.register_buffer("scale", torch.zeros(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.form == "full":
            delta = x @ self.weight.to(x.dtype)
        elif self.form == "lowrank":
            delta = (x @ self.down.to(x.dtype)) @ self.up.to(x.dtype)
        else:
            delta = out * self.scale.to(out.dtype)
        return out + delta + self.bias.to(out.dtype)

    @property
    def parameters_count(self) -> int:
        return sum(b.numel() for b in self.buffers())

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds ×2 per token (the bias add counted once per channel)."""
        if self.form == "full":
            return 2 * self.dim * self.dim + self.dim
        if self.form == "lowrank":
            return 4 * self.dim * self.rank + self.dim
        return 3 * self.dim


def attach(layer: nn.Module, compensation: Compensation) -> None:
    """Make ``layer`` return ``comp(x, layer(x))``; the module is stored as ``layer.qwt``."""
    layer.qwt = compensation

    def apply(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        return module.qwt(x, output)

    layer.register_forward_hook(apply, with_kwargs=True)


# ------------------------------------------------------------------------------------------ the fit


class Accumulator:
    """Float64 sufficient statistics of one block's regression, over any number of batches."""

    def __init__(self, form: Form, dim: int) -> None:
        self.form, self.dim = form, dim
        if form == "channel":  # per channel: n, Σo, Σo², Σt, Σo·t
            self.sums = torch.zeros(5, dim, dtype=torch.float64)
        else:
            self.xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
            self.xty = torch.zeros(dim + 1, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor, out: torch.Tensor, target: torch.Tensor) -> None:
        t = target.reshape(-1, self.dim).double()
        if self.form == "channel":
            o = out.reshape(-1, self.dim).double()
            n = torch.full((self.dim,), float(o.shape[0]), dtype=torch.float64)
            self.sums += torch.stack([n, o.sum(0), o.pow(2).sum(0), t.sum(0), (o * t).sum(0)])
            return
        xs = x.reshape(-1, self.dim).double()
        xs = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += xs.T @ xs
        self.xty += xs.T @ t

    def solve(self, ridge: float, rank: int | None = None) -> Compensation:
        comp = Compensation(self.form, self.dim, rank)
        if self.form == "channel":
            n, so, so2, st, sot = self.sums
            var = so2 / n - (so / n) ** 2
            cov = sot / n - so * st / n**2
            scale = cov / (var + ridge * var.mean())
            comp.scale = scale.float()
            comp.bias = (st / n - scale * so / n).float()
            return comp
        d = self.dim
        penalty = torch.zeros(d + 1, dtype=torch.float64)
        penalty[:d] = ridge * self.xtx.diagonal()[:d].mean()
        solution = torch.linalg.solve(self.xtx + torch.diag(penalty), self.xty)  # [d + 1, d]
        if self.form == "full":
            comp.weight, comp.bias = solution[:d].float(), solution[d].float()
            return comp
        # reduced-rank regression: keep the top-r directions of the fitted values' covariance Wᵀ XᵀX W
        fitted = solution.T @ self.xtx @ solution
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
) -> tuple[Compensation | None, dict]:
    """Fit one block's compensation on the first batches and test it on the last ``holdout`` share; returns
    ``None`` when it does not lower the held-out error, with the errors either way."""
    if len(inputs) < 2:
        raise ValueError("QwT needs at least 2 calibration batches (one to fit, one to test)")
    held = max(1, round(holdout * len(inputs)))
    fit = len(inputs) - held
    dim = inputs[0].shape[-1]
    if rank is not None and rank > dim:
        raise ValueError(f"recovery.qwt.rank {rank} is larger than the hidden size {dim}")
    accumulator = Accumulator(form, dim)
    for x, out, target in zip(inputs[:fit], outputs[:fit], targets[:fit], strict=True):
        accumulator.add(x, out, target)
    comp = accumulator.solve(ridge, rank)
    before = sum(float(t.double().pow(2).sum()) for t in targets[fit:])
    after = sum(float((comp(x, out) - out - t).double().pow(2).sum())
                for x, out, t in zip(inputs[fit:], outputs[fit:], targets[fit:], strict=True))
    record = {"heldout_error_before": before, "heldout_error_after": after, "kept": after < before}
    return (comp if after < before else None), record


@torch.no_grad()
def fit_qwt(
    build_block: Callable[[int, str], nn.Module],
    num_layers: int,
    hidden: list[torch.Tensor],
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    spec: QwTSpec,
    on_layer: Callable[[str], None] | None = None,
) -> tuple[dict[int, Compensation], list[dict]]:
    """Fit compensations block by block. ``build_block(i, "converted" | "reference")`` builds decoder block
    ``i``; ``run_block(block, h)`` runs it; ``hidden`` are the embeddings of the calibration batches.
    Each block sees the outputs of the compensated blocks before it. Memory: two blocks and the activations."""
    kept: dict[int, Compensation] = {}
    records = []
    for index in range(num_layers):
        converted, reference = build_block(index, "converted"), build_block(index, "reference")
        outputs = [run_block(converted, h) for h in hidden]
        targets = [run_block(reference, h) - out for h, out in zip(hidden, outputs, strict=True)]
        del reference
        comp, record = fit_block(spec.form, hidden, outputs, targets, spec.ridge, spec.holdout, spec.rank)
        records.append({"layer": index, **record})
        if comp is not None:
            kept[index] = comp
            hidden = [comp(h, out) for h, out in zip(hidden, outputs, strict=True)]
        else:
            hidden = outputs
        for module in converted.modules():  # the unpacked-weight caches would grow the memory with depth
            if hasattr(module, "release_dense"):
                module.release_dense()
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
) -> dict:
    """Fit and attach QwT compensations to a converted in-memory ``model`` (its decoder layers are the
    converted blocks; the b1.58 reference blocks are read from ``checkpoint`` one at a time). Returns the record
    the conversion report and the export keep."""
    from bitnet_convert.modeling import build_layer, run_layer
    from bitnet_convert.quant.schemes import PRESETS

    layers = model.model.layers
    hidden = [model.model.embed_tokens(ids[s : s + batch_size]).float() for s in range(0, ids.shape[0], batch_size)]
    if len(hidden) < 2:
        raise ValueError(
            f"recovery.qwt needs at least 2 calibration batches; calibration.samples={ids.shape[0]} with "
            f"calibration.batch_size={batch_size} gives {len(hidden)}: raise calibration.samples or lower "
            "calibration.batch_size"
        )

    def build_block(index: int, which: str) -> nn.Module:
        return layers[index] if which == "converted" else build_layer(checkpoint, index, PRESETS["b158"])

    def run_block(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return run_layer(block, h, model.model.rotary_emb)

    kept, records = fit_qwt(build_block, len(layers), hidden, run_block, spec, on_layer)
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
