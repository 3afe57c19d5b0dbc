"""QwT compensation modules: a linear correction added to a decoder block's output.

``out = block(x) + comp(x, block(x))``. Forms: ``full`` (``x·W + b``, d² + d parameters), ``lowrank``
(``(x·D)·U + b``, 2·d·r + d parameters) and ``channel`` (QwT-v2 style: ``out·s + b`` per channel of the block's
own output, 2·d parameters). The fit lives in :mod:`bitnet_convert.recover.qwt`; this module is what a model holds
(the model builder and the loader import it, so it depends on torch alone).

Source: Quantization without Tears (arXiv 2411.13918); the channel form follows its v2.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Form = Literal["full", "lowrank", "channel"]


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
