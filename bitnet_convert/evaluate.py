"""Perplexity of a model on held-out text (lm-eval based evaluation builds on this in its own issue)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as tF


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_windows: torch.Tensor,
    batch_size: int = 8,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """Token-level perplexity over windows ``[n, seq_len]`` (see :func:`bitnet_convert.data.windows`); every
    token after the first of each window is predicted. Returns ``{"perplexity", "nll", "tokens"}``."""
    total, count = 0.0, 0
    for start in range(0, token_windows.shape[0], batch_size):
        batch = token_windows[start : start + batch_size]
        logits = model(batch).logits.float()
        nll = tF.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
        if on_batch is not None:
            on_batch()
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}
