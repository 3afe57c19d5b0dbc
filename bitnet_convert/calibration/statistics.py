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

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bitnet_convert.errors import ResourceError
from bitnet_convert.io.checkpoint import Checkpoint
from bitnet_convert.io.families import DECODER_LINEARS, Role, decoder_linear, role_of
from bitnet_convert.quant.functional import ordered_sum
from bitnet_convert.quant.kv import AttentionSpec
from bitnet_convert.quant.linear import QuantLinear
from bitnet_convert.quant.schemes import ActivationSpec
from bitnet_convert.runtime import distributed
from bitnet_convert.runtime.blocks import BlockRunner, build_layer, decoder_pass
from bitnet_convert.runtime.devices import module_device
from bitnet_convert.runtime.modeling import quant_linears, rotary_embedding


class _Sparsity:
    """Hooks that count zero inputs per role and Table 2's sparsity per linear (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokens: int) -> None:
        self.tokens = tokens
        self.roles: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.zeros: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # linear → [zero count, value count]
        self.linears = quant_linears(model)
        self.gates = {n: g for n in self.linears if (g := _gate_of(model, n)) is not None}
        self.reduced = False

    def attach(self) -> list:
        handles = [m.register_forward_pre_hook(self._count_input(n, m)) for n, m in self.linears.items()]
        handles += [gate.register_forward_hook(self._count_skipped_up(n, act)) for n, (gate, act) in self.gates.items()]
        return handles

    def _count_input(self, name: str, module):
        role = role_of(name)

        def record(_module, args):
            x = module.quantizer_input(args[0])
            q = module._quantize_input(x).float()
            x = x.float()
            zero = (q == 0).sum().item()
            entry = self.roles[role]
            entry["zero"] += zero
            entry["numel"] += q.numel()
            entry["err2"] += float(ordered_sum((q - x).pow(2)))  # thread-independent sums: the same report bytes
            entry["x2"] += float(ordered_sum(x.pow(2)))
            if name not in self.gates:  # up's sparsity is that of its outputs, counted below
                self.zeros[name][0] += zero
                self.zeros[name][1] += q.numel()

        return record

    def _count_skipped_up(self, up_name: str, act: Callable[[torch.Tensor], torch.Tensor]):
        def record(_module, _args, output):
            self.zeros[up_name][0] += (act(output) == 0).sum().item()
            self.zeros[up_name][1] += output.numel()

        return record

    def reduce(self) -> None:
        """Sum the tallies over the ``torchrun`` processes (each counted its own batches), once."""
        if distributed.world_size() == 1 or self.reduced:
            return
        self.reduced = True
        roles = sorted({role for tallies in distributed.gather_objects(sorted(self.roles)) for role in tallies})
        linears = sorted(self.linears)
        keys = ("zero", "numel", "err2", "x2")
        flat = [self.roles[r][k] for r in roles for k in keys] + [v for n in linears for v in self.zeros[n]]
        summed = distributed.sum_floats(*flat)
        for i, role in enumerate(roles):
            self.roles[role] = defaultdict(float, zip(keys, summed[4 * i : 4 * i + 4], strict=True))
        rest = summed[4 * len(roles):]
        for i, name in enumerate(linears):
            if rest[2 * i + 1]:
                self.zeros[name] = [rest[2 * i], rest[2 * i + 1]]

    def result(self) -> dict:
        self.reduce()
        return {
            "tokens": self.tokens,
            "roles": {
                role: {
                    "zero_share": s["zero"] / s["numel"],
                    "relative_error": (s["err2"] / s["x2"]) ** 0.5 if s["x2"] else 0.0,
                }
                for role, s in self.roles.items()
            },
            **table2(self.linears, self.zeros),
        }


@torch.no_grad()
def _run(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, handles: list,
         on_batch: Callable[[], None] | None, batch: list[int] | None = None, **call: object) -> None:
    """Run ``ids`` through ``model`` in batches with the forward ``handles`` attached, then remove them. Under
    ``torchrun`` a process runs the batches it owns (:func:`bitnet_convert.runtime.distributed.owned`); ``batch[0]`` is
    set to the index of the batch running (the seed of the value samples)."""
    device = module_device(model)
    try:
        for index, rows in distributed.owned_batches(ids.shape[0], batch_size).items():
            if batch is not None:
                batch[0] = index
            model(ids[rows].to(device), **call)
            if on_batch is not None:
                on_batch()
    finally:
        for handle in handles:
            handle.remove()


def activation_stats(
    model: torch.nn.Module, batches: torch.Tensor, batch_size: int, on_batch: Callable[..., None] | None = None,
    device: torch.device | None = None,
) -> dict:
    """Run ``batches`` (token ids ``[n, seq_len]``) through ``model`` and measure its quantized inputs: as whole-model
    forwards (``on_batch()`` after each batch), or with ``device`` through the decoder blocks one block at a time
    on that device (:func:`bitnet_convert.runtime.blocks.decoder_pass`; ``on_batch(label)`` after each block).

    Returns ``{"tokens", "roles": {role: {"zero_share", "relative_error"}}, "sparsity": {kind: share},
    "active_parameter_share"}`` (see the module docstring for the definitions).
    """
    sparsity = _Sparsity(model, int(batches.numel()))
    _forward(model, batches, batch_size, sparsity.attach(), on_batch, device)
    return sparsity.result()


def _forward(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, handles: list,
             on_step: Callable[..., None] | None, device: torch.device | None, batch: list[int] | None = None,
             **call: object) -> None:
    """Whole-model forwards of ``ids`` (``device`` ``None``; keyword arguments ``call``) or one decoder block at a
    time on ``device``, with the forward ``handles`` attached (removed at the end)."""
    if device is None:
        _run(model, ids, batch_size, handles, on_step, batch, **call)
        return
    try:
        decoder_pass(model, ids, batch_size, device, on_step, batch)
    finally:
        for handle in handles:
            handle.remove()


def table2(linears: dict[str, torch.nn.Module], zeros: dict[str, list[float]]) -> dict:
    """Sparsity per linear kind and the active-parameter share from per-linear ``[zero, count]`` tallies."""
    kind_sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    active = total = 0.0
    for name, (zero, count) in zeros.items():
        if not count:
            continue
        entry = decoder_linear(name)
        kind = entry.table2 if entry is not None else "other"
        kind_sums[kind][0] += zero
        kind_sums[kind][1] += count
        params = linears[name].in_features * linears[name].out_features
        active += params * (1 - zero / count)
        total += params
    order = [*dict.fromkeys(entry.table2 for entry in DECODER_LINEARS), "other"]
    sparsity = {k: kind_sums[k][0] / kind_sums[k][1] for k in order if k in kind_sums}
    return {"sparsity": sparsity, "active_parameter_share": active / total if total else 1.0}


def _gate_of(model: torch.nn.Module, up_name: str) -> tuple[torch.nn.Module, Callable] | None:
    """The gate projection beside ``up_name`` and the activation applied to it, if the role table names one for
    the linear (the GLU's up projection) and the block has it."""
    entry = decoder_linear(up_name)
    if entry is None or entry.glu_gate is None:
        return None
    parent = model.get_submodule(up_name.rsplit(".", 1)[0]) if "." in up_name else model
    gate, act = getattr(parent, entry.glu_gate, None), getattr(parent, "act_fn", None)
    return (gate, act) if gate is not None and callable(act) else None


# ------------------------------------------------------------------------------------ layer-by-layer stats

#: The quantizers every linear input is tried with (besides its configured one), by report name.
CANDIDATES: dict[str, ActivationSpec] = {
    "int4_absmean": ActivationSpec(method="absmean", bits=4),
    "int8_absmax": ActivationSpec(method="absmax", bits=8),
    "top50_int8": ActivationSpec(method="absmax", bits=8, topk=0.5),
    "fp4_e2m1": ActivationSpec(method="fp4_e2m1", bits=4),
}
#: A channel is an outlier when its largest |x| exceeds this multiple of the median channel's.
OUTLIER_FACTOR = 6.0
#: Values of each linear input kept (a seeded uniform sample) for percentiles, histograms and thresholds.
SAMPLE_SIZE = 32_768


class LinearStats:
    """Running statistics of one linear's input and of what each candidate quantizer does to it and to the
    linear's output. Sums are float64, so the order of batches changes nothing beyond rounding."""

    def __init__(self, configured: ActivationSpec, samples_per_update: int) -> None:
        self.spec = configured.describe()
        self.quantizers = {"configured": configured.quantizer(), **{k: s.quantizer() for k, s in CANDIDATES.items()}}
        self.samples_per_update = samples_per_update
        self.count = 0
        self.moments = torch.zeros(4, dtype=torch.float64)  # Σx, Σx², Σx³, Σx⁴
        self.abs_sum = 0.0
        self.absmax = 0.0
        self.zeros = 0
        self.channel_absmax: torch.Tensor | None = None
        self.errors = {k: torch.zeros(4, dtype=torch.float64) for k in self.quantizers}  # Σ‖q−x‖², Σ‖x‖², out
        self.quantized_zeros = 0
        self.sample: list[torch.Tensor] = []
        self.sample_batches: list[int] = []
        self.reduced = False  # combined over the torchrun processes (once)

    @torch.no_grad()
    def update(self, x: torch.Tensor, weight: torch.Tensor, batch: int | None = None) -> None:
        """Add a batch of inputs ``x [..., in]``; ``weight [out, in]`` is the linear's dense ternary weight;
        ``batch`` is the batch's index among the calibration batches (default: how many came before), which seeds
        the value sample, so the sample does not depend on which process ran the batch."""
        rows = x.reshape(-1, x.shape[-1]).float()
        xd = rows.double()
        self.count += rows.numel()
        # every float sum in a thread-independent order (ordered_sum): the report's bytes do not follow the threads
        self.moments += torch.stack([ordered_sum(xd.pow(p)) for p in (1, 2, 3, 4)]).cpu()
        magnitude = rows.abs()
        self.abs_sum += float(ordered_sum(magnitude))
        self.absmax = max(self.absmax, float(magnitude.max()))
        self.zeros += int((rows == 0).sum())
        channel = magnitude.amax(0)
        self.channel_absmax = channel if self.channel_absmax is None else torch.maximum(self.channel_absmax, channel)
        y = rows @ weight.t()
        x2, y2 = float(ordered_sum(xd.pow(2))), float(ordered_sum(y.double().pow(2)))
        for name, quantize in self.quantizers.items():
            q = quantize(rows)
            if name == "configured":
                self.quantized_zeros += int((q == 0).sum())
            err = float(ordered_sum((q - rows).double().pow(2)))
            out_err = float(ordered_sum((q @ weight.t() - y).double().pow(2)))
            self.errors[name] += torch.tensor([err, x2, out_err, y2], dtype=torch.float64)
        flat = rows.flatten()
        index = len(self.sample) if batch is None else batch
        if flat.numel() <= self.samples_per_update:
            self.sample.append(flat.to("cpu", copy=True))
        else:  # uniformly at random, seeded by the batch number: a stride would favour some channels
            generator = torch.Generator().manual_seed(index)
            picks = torch.randperm(flat.numel(), generator=generator)[: self.samples_per_update].to(flat.device)
            self.sample.append(flat[picks.sort().values].cpu())
        self.sample_batches.append(index)

    def reduce(self) -> None:
        """Combine the statistics of the ``torchrun`` processes (each saw its own batches): sums and maxima over
        the processes, the value samples in batch order."""
        if distributed.world_size() == 1 or self.reduced:
            return
        self.reduced = True
        sums = torch.tensor([self.count, self.abs_sum, self.zeros, self.quantized_zeros], dtype=torch.float64)
        distributed.sum_tensors([sums, self.moments, *self.errors.values()])
        self.count, self.zeros, self.quantized_zeros = int(sums[0]), int(sums[2]), int(sums[3])
        self.abs_sum = float(sums[1])
        peaks = torch.cat([torch.tensor([self.absmax], dtype=self.channel_absmax.dtype), self.channel_absmax.cpu()])
        distributed.max_tensors([peaks])
        self.absmax, self.channel_absmax = float(peaks[0]), peaks[1:]
        pairs = sorted(p for part in distributed.gather_objects(list(zip(self.sample_batches, self.sample,
                                                                         strict=True))) for p in part)
        self.sample_batches, self.sample = [b for b, _ in pairs], [t for _, t in pairs]

    def result(self) -> dict:
        """The statistics as JSON-ready numbers (after :meth:`reduce` under ``torchrun``)."""
        n = self.count
        mean, m2, m3, m4 = (self.moments / n).tolist()
        var = m2 - mean**2
        central4 = m4 - 4 * mean * m3 + 6 * mean**2 * m2 - 3 * mean**4
        sample = torch.cat(self.sample).abs()
        quantiles = torch.quantile(sample, torch.tensor([0.5, 0.99, 0.999])).tolist()
        channels = self.channel_absmax
        outliers = int((channels > OUTLIER_FACTOR * channels.median()).sum())
        quantizers = {}
        for name, sums in self.errors.items():
            err, x2, out_err, y2 = sums.tolist()
            quantizers[name] = {
                "relative_error": (err / x2) ** 0.5 if x2 else 0.0,
                "sqnr_db": 10 * math.log10(x2 / err) if err else math.inf,
                "output_relative_error": (out_err / y2) ** 0.5 if y2 else 0.0,
            }
        return {
            "spec": self.spec,
            "values": n,
            "absmax": self.absmax,
            "absmean": self.abs_sum / n,
            "percentiles_abs": {"p50": quantiles[0], "p99": quantiles[1], "p99.9": quantiles[2]},
            "kurtosis": central4 / var**2 if var > 0 else 0.0,
            "zero_share": self.zeros / n,
            "quantized_zero_share": self.quantized_zeros / n,
            "outlier_channels": outliers,
            "channels": int(channels.numel()),
            "quantizers": quantizers,
        }


@dataclass
class Calibration:
    """What a calibration pass measured: per-linear statistics (``linears``, JSON-ready) and, for plots, a
    seeded uniform sample of each linear's input values (``samples``)."""

    tokens: int
    linears: dict[str, dict]
    samples: dict[str, torch.Tensor] = field(repr=False)


@contextmanager
def out_of_memory(message: str) -> Iterator[None]:
    """Turn an out-of-memory error into a :class:`ResourceError` with ``message`` (which names the knobs)."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, MemoryError | torch.OutOfMemoryError) and not (
            "out of memory" in text or "can't allocate memory" in text
        ):
            raise
        raise ResourceError(message) from None


def memory_guard(samples: int, seq_len: int, batch_size: int):
    """:func:`out_of_memory` for calibration."""
    return out_of_memory(
        f"calibration ran out of memory with calibration.samples={samples}, calibration.seq_len={seq_len}, "
        f"calibration.batch_size={batch_size}; lower them (e.g. --set calibration.samples={max(1, samples // 2)})"
    )


def _hook_linears(modules: dict[str, QuantLinear], stats: dict[str, LinearStats], prefix: str = "",
                  batch: list[int] | None = None) -> list:
    """Forward pre-hooks feeding each linear's input to its :class:`LinearStats`; ``batch[0]`` is the index of
    the batch running."""
    def hook(name: str, module: QuantLinear):
        def record(_module, args):
            stats[prefix + name].update(module.quantizer_input(args[0]), module.dense_weight(torch.float32),
                                        None if batch is None else batch[0])

        return record

    return [m.register_forward_pre_hook(hook(n, m)) for n, m in modules.items()]


@torch.no_grad()
def hooked_calibration(
    model: torch.nn.Module, ids: torch.Tensor, batch_size: int, on_batch: Callable[[], None] | None = None
) -> Calibration:
    """Per-linear statistics from whole-model forwards (the reference for :func:`sequential_calibration`)."""
    return calibration_and_stats(model, ids, batch_size, on_batch, sparsity=False)[0]


def calibration_and_stats(
    model: torch.nn.Module, ids: torch.Tensor, batch_size: int, on_batch: Callable[..., None] | None = None,
    sparsity: bool = True, device: torch.device | None = None,
) -> tuple[Calibration, dict | None]:
    """:func:`hooked_calibration` and, with ``sparsity``, :func:`activation_stats` from the same forwards (one
    pass over the calibration tokens instead of two, for a model that does not change in between); ``device`` as
    :func:`activation_stats` takes it."""
    linears = quant_linears(model)
    samples = max(1, SAMPLE_SIZE // -(-ids.shape[0] // batch_size))
    stats = {n: LinearStats(m.spec, samples) for n, m in linears.items()}
    batch = [0]
    handles = _hook_linears(linears, stats, batch=batch)
    counter = _Sparsity(model, int(ids.numel())) if sparsity else None
    if counter is not None:
        handles += counter.attach()
    _forward(model, ids, batch_size, handles, on_batch, device, batch, use_cache=False)
    for linear_stats in stats.values():
        linear_stats.reduce()
    calibration = Calibration(int(ids.numel()), {n: s.result() for n, s in stats.items()},
                              {n: torch.cat(s.sample) for n, s in stats.items()})
    return calibration, None if counter is None else counter.result()


@torch.no_grad()
def sequential_calibration(
    checkpoint: Checkpoint,
    roles: dict[Role, ActivationSpec],
    ids: torch.Tensor,
    batch_size: int,
    attention: AttentionSpec | None = None,
    on_layer: Callable[[str], None] | None = None,
    overrides: dict[str, ActivationSpec] | None = None,
    device: torch.device | str = "cpu",
) -> Calibration:
    """Per-linear statistics of ``ids [n, seq_len]``, computed one decoder layer at a time: the layer is read
    from the checkpoint and moved to ``device``, the cached hidden states of every batch (on the CPU) go through it
    one batch at a time, its outputs become the next layer's inputs, and it is freed. Peak memory is one layer
    plus the hidden states, whatever the depth; on a GPU, one layer plus one batch. Under ``torchrun`` each
    process runs the batches it owns and the statistics are combined (:meth:`LinearStats.reduce`)."""
    config = checkpoint.transformers_config()
    embedding = checkpoint.tensor("model.embed_tokens.weight")
    owned = distributed.owned_batches(ids.shape[0], batch_size)
    hidden = [embedding[ids[rows]].float() for rows in owned.values()]
    del embedding
    runner = BlockRunner(rotary_embedding(checkpoint, config), device)
    samples = max(1, SAMPLE_SIZE // -(-ids.shape[0] // batch_size))
    result = Calibration(int(ids.numel()), {}, {})
    batch = [0]
    for index in range(config.num_hidden_layers):
        layer = build_layer(checkpoint, index, roles, attention=attention, overrides=overrides)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        prefix = f"model.layers.{index}."
        stats = {prefix + n: LinearStats(m.spec, samples) for n, m in linears.items()}
        handles = _hook_linears(linears, stats, prefix, batch)
        try:
            with runner.onload(layer):
                outputs = []
                for number, h in zip(owned, hidden, strict=True):
                    batch[0] = number
                    outputs.append(runner.run(layer, h))
                hidden = outputs
        finally:
            for handle in handles:
                handle.remove()
        for linear_stats in stats.values():
            linear_stats.reduce()
        result.linears.update({name: s.result() for name, s in stats.items()})
        result.samples.update({name: torch.cat(s.sample) for name, s in stats.items()})
        del layer, linears, stats
        if on_layer is not None:
            on_layer(f"layer {index + 1}/{config.num_hidden_layers}")
    return result
