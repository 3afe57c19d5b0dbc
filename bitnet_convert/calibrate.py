"""Activation statistics of a converted model on some text (calibration data, or evaluation data).

a4.8's quantizers are dynamic, so nothing here changes the model: the statistics go into the conversion and
evaluation reports. Per recipe role they give the share of exact zeros in the quantized linear inputs and the
relative quantization error ``‖Q(x) − x‖ / ‖x‖``. Per linear kind they give the sparsity of the paper's
Table 2, and overall the share of ternary weights that do work ("active parameters").

Table 2's definitions, measured on every token:

- ``qkv``, ``o``, ``gate``, ``down``: the share of the linear's quantized input values that are exactly 0;
- ``up``: the share of up-projection *outputs* that need not be computed because ``act(gate) = 0`` there
  (relu² zeros; the GLU multiplies them away), so the inputs of up are counted as those of gate are not;
- active parameters: ``Σ params_l · (1 − sparsity_l) / Σ params_l`` over the decoder linears.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from bitnet_convert.modeling import quant_linears
from bitnet_convert.quant.schemes import role_of

#: Table 2's rows, and the linears each covers.
LINEAR_KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}


@torch.no_grad()
def activation_stats(
    model: torch.nn.Module, batches: torch.Tensor, batch_size: int, on_batch: Callable[[], None] | None = None
) -> dict:
    """Run ``batches`` (token ids ``[n, seq_len]``) through ``model`` and measure its quantized inputs.

    Returns ``{"tokens", "roles": {role: {"zero_share", "relative_error"}}, "sparsity": {kind: share},
    "active_parameter_share"}`` (see the module docstring for the definitions).
    """
    roles: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    zeros: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # linear name → [zero count, value count]
    linears = quant_linears(model)
    gates = {n: g for n in linears if n.endswith(".up_proj") and (g := _gate_of(model, n)) is not None}

    def count_input(name: str, module):
        role = role_of(name)

        def record(_module, args):
            x = args[0].float()
            q = module._quantize_input(args[0]).float()
            zero = (q == 0).sum().item()
            entry = roles[role]
            entry["zero"] += zero
            entry["numel"] += q.numel()
            entry["err2"] += (q - x).pow(2).sum().item()
            entry["x2"] += x.pow(2).sum().item()
            if name not in gates:  # up's sparsity is that of its outputs, counted below
                zeros[name][0] += zero
                zeros[name][1] += q.numel()

        return record

    def count_skipped_up(up_name: str, act: Callable[[torch.Tensor], torch.Tensor]):
        def record(_module, _args, output):
            zeros[up_name][0] += (act(output) == 0).sum().item()
            zeros[up_name][1] += output.numel()

        return record

    handles = [m.register_forward_pre_hook(count_input(n, m)) for n, m in linears.items()]
    handles += [gate.register_forward_hook(count_skipped_up(n, act)) for n, (gate, act) in gates.items()]
    try:
        for start in range(0, batches.shape[0], batch_size):
            model(batches[start : start + batch_size])
            if on_batch is not None:
                on_batch()
    finally:
        for handle in handles:
            handle.remove()
    return {
        "tokens": int(batches.numel()),
        "roles": {
            role: {
                "zero_share": s["zero"] / s["numel"],
                "relative_error": (s["err2"] / s["x2"]) ** 0.5 if s["x2"] else 0.0,
            }
            for role, s in roles.items()
        },
        **table2(linears, zeros),
    }


def table2(linears: dict[str, torch.nn.Module], zeros: dict[str, list[float]]) -> dict:
    """Sparsity per linear kind and the active-parameter share from per-linear ``[zero, count]`` tallies."""
    kind_sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    active = total = 0.0
    for name, (zero, count) in zeros.items():
        if not count:
            continue
        kind = LINEAR_KINDS.get(name.rsplit(".", 1)[-1], "other")
        kind_sums[kind][0] += zero
        kind_sums[kind][1] += count
        params = linears[name].in_features * linears[name].out_features
        active += params * (1 - zero / count)
        total += params
    order = [*dict.fromkeys(LINEAR_KINDS.values()), "other"]
    sparsity = {k: kind_sums[k][0] / kind_sums[k][1] for k in order if k in kind_sums}
    return {"sparsity": sparsity, "active_parameter_share": active / total if total else 1.0}


def _gate_of(model: torch.nn.Module, up_name: str) -> tuple[torch.nn.Module, Callable] | None:
    """The gate projection beside ``up_name`` and the activation applied to it, if the block is a GLU."""
    parent = model.get_submodule(up_name.rsplit(".", 1)[0]) if "." in up_name else model
    gate, act = getattr(parent, "gate_proj", None), getattr(parent, "act_fn", None)
    return (gate, act) if gate is not None and callable(act) else None
