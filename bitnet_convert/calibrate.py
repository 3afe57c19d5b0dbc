"""Activation statistics of the converted model on calibration text.

a4.8's quantizers are dynamic, so nothing here changes the model: the statistics go into the conversion
report. Per role they give the share of exact zeros in the quantized linear inputs (the sparsity of the
paper's Table 2) and the relative quantization error ``‖Q(x) − x‖ / ‖x‖``; overall they give the share of
ternary weights that meet a non-zero input ("active parameters").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from bitnet_convert.modeling import quant_linears
from bitnet_convert.quant.schemes import role_of


@torch.no_grad()
def activation_stats(
    model: torch.nn.Module, batches: torch.Tensor, batch_size: int, on_batch: Callable[[], None] | None = None
) -> dict:
    """Run ``batches`` (token ids ``[n, seq_len]``) through ``model`` and measure its quantized inputs."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def hook(name: str, module):
        role = role_of(name)

        def record(_module, args):
            x = args[0].float()
            q = module._quantize_input(args[0]).float()
            zero = (q == 0).sum().item()
            entry = sums[role]
            entry["zero"] += zero
            entry["numel"] += q.numel()
            entry["err2"] += (q - x).pow(2).sum().item()
            entry["x2"] += x.pow(2).sum().item()
            weights = module.in_features * module.out_features
            sums["_active"]["active"] += weights * (1 - zero / q.numel())
            sums["_active"]["total"] += weights

        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in quant_linears(model).items()]
    try:
        for start in range(0, batches.shape[0], batch_size):
            model(batches[start : start + batch_size])
            if on_batch is not None:
                on_batch()
    finally:
        for handle in handles:
            handle.remove()
    active = sums.pop("_active", {"active": 0.0, "total": 1.0})
    roles = {
        role: {
            "zero_share": s["zero"] / s["numel"],
            "relative_error": (s["err2"] / s["x2"]) ** 0.5 if s["x2"] else 0.0,
        }
        for role, s in sums.items()
    }
    return {
        "tokens": int(batches.numel()),
        "roles": roles,
        "active_parameter_share": active["active"] / active["total"],
    }
