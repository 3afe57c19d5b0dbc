"""The per-linear precision choice of ``scheme.auto``: from the calibration report's measured output errors, promote
the linears whose 4-bit input hurts most to INT8 absmax (within a share of the linears and a mean-input-bit budget),
and optionally replace o_proj's per-token top-K by one calibrated magnitude threshold per linear.
"""

from __future__ import annotations

import math

import torch

from bitnet_convert.calibration.statistics import Calibration
from bitnet_convert.io.families import role_of
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.schemes import ActivationSpec

INT8 = ActivationSpec(method="absmax", bits=8)


def mean_input_bits(linears: dict[str, QuantLinear], specs: dict[str, ActivationSpec]) -> float:
    """Activation bits averaged over the linears, weighted by their parameter count (their share of compute)."""
    params = {n: m.in_features * m.out_features for n, m in linears.items()}
    return sum(params[n] * specs[n].input_bits for n in linears) / sum(params.values())


def choose_precision(
    calibration: Calibration,
    linears: dict[str, QuantLinear],
    max_share: float | None = 0.1,
    max_mean_bits: float | None = None,
    static_o_threshold: bool = False,
) -> tuple[dict[str, ActivationSpec], dict]:
    """Per-linear overrides from measured output errors (see :class:`bitnet_convert.recipe.AutoSpec`).

    Returns the overrides and a record of the choice: each promoted linear with its output error under the
    configured quantizer and under INT8, the thresholds, and the mean input bits before and after.
    """
    specs = {n: m.spec for n, m in linears.items()}
    before = mean_input_bits(linears, specs)

    def gain(name: str) -> float:
        errors = calibration.linears[name]["quantizers"]
        return errors["configured"]["output_relative_error"] - errors["int8_absmax"]["output_relative_error"]

    limit = len(linears) if max_share is None else math.floor(max_share * len(linears) + 1e-9)
    candidates = sorted((n for n in linears if specs[n].input_bits < 8 and gain(n) > 0), key=gain, reverse=True)
    overrides: dict[str, ActivationSpec] = {}
    promoted = []
    for name in candidates:
        if len(overrides) >= limit:
            break
        trial = {**specs, name: INT8}
        if max_mean_bits is not None and mean_input_bits(linears, trial) > max_mean_bits + 1e-9:
            continue
        specs = trial
        overrides[name] = INT8
        errors = calibration.linears[name]["quantizers"]
        promoted.append({"linear": name, "from": linears[name].spec.describe(),
                         "output_error": errors["configured"]["output_relative_error"],
                         "output_error_int8": errors["int8_absmax"]["output_relative_error"]})
    thresholds = {}
    if static_o_threshold:
        for name, module in linears.items():
            if role_of(name) != "o" or module.spec.topk is None or name in overrides:
                continue
            sample = calibration.samples[name].abs().float()
            threshold = float(torch.quantile(sample, 1.0 - module.spec.topk))
            overrides[name] = module.spec.model_copy(update={"topk": None, "threshold": threshold})
            thresholds[name] = threshold
    record = {"promoted_to_int8": promoted, "o_proj_thresholds": thresholds,
              "mean_input_bits": {"before": before, "after": mean_input_bits(linears, specs)}}
    return overrides, record
