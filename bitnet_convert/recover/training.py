"""The training machinery that block-wise reconstruction and the distillation fine-tune share: the spec fields
they have in common, the learning-rate schedule, the trainable tensors (float latent weights re-ternarized at the
end), one optimizer step (gradients summed over ``torchrun`` processes, clipped in a thread-independent order),
autocast, and where a latent weight starts (an earlier stage's trained weight, the master weight, or the codes).

Sources: the straight-through estimator and absmean ternarization of BitNet b1.58 training (arXiv 2402.17764);
gradient clipping as ``torch.nn.utils.clip_grad_norm_``; AdamW (``torch.optim.AdamW``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet_convert.quant.functional import ordered_sum, ternary_absmean
from bitnet_convert.quant.linear import QuantLinear, TopKGradient
from bitnet_convert.runtime import distributed


class TrainingSpec(BaseModel):
    """The fields every trained recovery stage's recipe section has (``recovery.blockwise``, ``recovery.distill``);
    each stage's spec adds its own and sets its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(1, ge=1, description="optimizer steps")
    batch_size: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0.0, description="peak learning rate (AdamW)")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="cosine to 0, or flat")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; null for none")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="compute dtype of the training forwards (bfloat16: autocast; float32 is the reference)")
    topk_gradient: TopKGradient = Field(
        "kept", description="where the gradient of a top-K sparsified input goes: 'kept', to the kept entries only "
        "(the top-K's own gradient; the rounding stays straight-through), or 'all' (plain straight-through)")


def scheduled_lr(spec: TrainingSpec, step: int, steps: int) -> float:
    """``spec.lr`` flat (``schedule: constant``) or cosine from ``spec.lr`` to 0 over ``steps`` steps, at optimizer
    step ``step`` (0-based)."""
    if spec.schedule == "constant":
        return spec.lr
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


def autocast(spec: TrainingSpec, device: torch.device):
    """The training forward's autocast context for ``spec.dtype`` (``float32``: none; ``bfloat16``: autocast)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")


def set_ste_lambda(model: nn.Module, lam: float) -> None:
    """Set λ of the straight-through blend ``x + λ·(q(x) − x)`` in every quantized linear and low-bit attention."""
    for module in model.modules():
        if isinstance(module, QuantLinear) or hasattr(module, "lowbit_attention"):
            module.ste_lambda = lam


def set_topk_gradient(model: nn.Module, mode: TopKGradient) -> None:
    """Set where the gradient of a sparsified input goes (``kept`` or ``all``) in every quantized linear."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.topk_gradient = mode


def trainable_tensors(
    model: nn.Module, groups: list[str], latent_init: Callable[[str, QuantLinear], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors to optimize by name, in a fixed order; marks them ``requires_grad``. ``linears`` sets a float
    latent weight on every :class:`QuantLinear`, from ``latent_init(name, module)`` (default: codes scaled as
    :func:`latent_from_codes` does)."""
    tensors: dict[str, torch.Tensor] = {}
    if "embeddings" in groups:
        tensors["model.embed_tokens.weight"] = model.model.embed_tokens.weight
    if "norms" in groups:
        tensors.update((n, p) for n, p in model.named_parameters() if n.endswith("norm.weight"))
    if "linears" in groups:
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                init = latent_init(name, module) if latent_init else latent_from_codes(module.ternary(),
                                                                                        module.alpha())
                module.latent = init.detach().to(module.weight.device, torch.float32, copy=True)
                tensors[f"{name}.latent"] = module.latent
    if "qwt" in groups:
        comps = [(n, m) for n, m in model.named_modules() if n.endswith(".qwt")]
        if not comps:
            raise ValueError("recovery.distill.trainable names 'qwt' but the model has no QwT compensation "
                             "(set recovery.qwt, or drop 'qwt' from trainable)")
        for name, comp in comps:
            tensors.update((f"{name}.{b}", t) for b, t in comp.named_buffers())
    for tensor in tensors.values():
        tensor.requires_grad_(True)
    return tensors


def optimizer_step(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], max_grad_norm: float | None,
                   loss: torch.Tensor) -> float:
    """One step on the gradients ``backward`` left on ``tensors``: summed over the ``torchrun`` processes (each
    loss is its process's share of the global loss), clipped to ``max_grad_norm``, applied, cleared. Returns the
    global loss (the sum of the shares)."""
    distributed.sum_gradients(tensors.values())
    if max_grad_norm is not None:
        clip_grad_norm(list(tensors.values()), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return distributed.sum_floats(float(loss.detach()))[0]


def clip_grad_norm(tensors: list[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients of ``tensors`` so that their global L2 norm is at most ``max_norm``; returns the norm
    before. What ``torch.nn.utils.clip_grad_norm_`` does (coefficient ``max_norm / (norm + 1e-6)``, at most 1), with
    the squares summed by :func:`~bitnet_convert.quant.functional.ordered_sum`: torch's norm is a full reduction
    split among the threads, and the coefficient would carry its thread-dependent last bit into the weights."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float(ordered_sum(g, lambda chunk: chunk.float().pow(2))) for g in grads))
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return total


def latent_from_codes(codes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """A float weight whose absmean ternarization gives ``codes`` and (up to rounding) ``alpha`` back:
    ``codes · α / p`` with ``p`` the share of non-zero codes (so ``mean|W| = α`` and ``|W|/α = 1/p ≥ 1``)."""
    share = (ordered_sum(codes.ne(0)) / max(codes.numel(), 1)).float().clamp(min=1e-12)  # exact count
    return codes.float() * (alpha.float().reshape(()) / share)


def finish(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Re-ternarize the latent weights into the packed buffers, freeze everything, back to eval mode."""
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.latent is not None:
            codes, alpha = ternary_absmean(module.latent.detach())
            module.set_ternary(codes, alpha)
            module.latent = None
    for tensor in tensors.values():
        tensor.requires_grad_(False)
    set_ste_lambda(model, 1.0)
    set_topk_gradient(model, "kept")
    model.eval()


def to_cpu(value):
    """An optimizer state dict with its tensors on the CPU (a state file loads on any machine)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


LatentSource = Callable[[str], "torch.Tensor | None"]


def master_latents(checkpoint, sources: list[LatentSource] | tuple = ()) -> Callable[[str, QuantLinear],
                                                                                     torch.Tensor] | None:
    """Where each trained latent weight starts: the float weight an earlier stage trained for this linear
    (``sources``: ``name → latent or None``, most recent first; e.g. :func:`saved_latents`), else the master weight
    of a master-layout checkpoint, whichever the linear's current codes and scale are the absmean ternarization of;
    else its own codes (:func:`latent_from_codes`). So a stage continues from the previous one's weights, and a
    linear no stage changed starts from its master. ``None`` (start from the codes) with neither sources nor
    masters."""
    from bitnet_convert.io.checkpoint import Layout

    candidates = list(sources)
    if checkpoint.layout is Layout.MASTER:
        candidates.append(lambda name: checkpoint.tensor(f"{name}.weight"))
    if not candidates:
        return None

    def init(name: str, module: QuantLinear) -> torch.Tensor:
        current, alpha = module.ternary().cpu(), module.alpha().cpu()
        for source in candidates:
            latent = source(name)
            if latent is None:
                continue
            latent = latent.float()
            codes, scale = ternary_absmean(latent)
            if torch.equal(codes, current) and torch.equal(scale, alpha):
                return latent
        return latent_from_codes(current, alpha)

    return init
