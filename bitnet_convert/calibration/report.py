"""The human side of calibration: ``calibration.json``, ``calibration.md`` and three PNG plots.

* ``error_heatmap.png`` — per layer (rows) and linear (columns), the relative output error each quantizer
  causes, ``‖W·Q(x) − W·x‖ / ‖W·x‖``; one panel per quantizer, one colour scale for all.
* ``worst_histograms.png`` — input histograms (log counts) of the linears whose configured quantizer hurts most.
* ``sparsity.png`` — share of exact zeros in each linear's input, before and after its configured quantizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from bitnet_convert.calibration.statistics import CANDIDATES, Calibration
from bitnet_convert.io.families import DECODER_LINEARS

#: The linears of a layer in the role table's order (a plot's columns).
LINEAR_ORDER = tuple(entry.name for entry in DECODER_LINEARS)
QUANTIZER_ORDER = ("configured", *CANDIDATES)
WORST = 4


def _layer_and_linear(name: str) -> tuple[int, str]:
    match = re.search(r"layers\.(\d+)\.(?:\w+\.)?(\w+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name)


def worst_linears(calibration: Calibration, n: int = WORST) -> list[str]:
    """The ``n`` linears with the largest output error under their configured quantizer."""
    def error(name: str) -> float:
        return calibration.linears[name]["quantizers"]["configured"]["output_relative_error"]

    return sorted(calibration.linears, key=error, reverse=True)[:n]


def write_report(calibration: Calibration, directory: Path, meta: dict) -> list[Path]:
    """Write ``calibration.json``, ``calibration.md`` and the PNGs into ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {**meta, "tokens": calibration.tokens, "linears": calibration.linears}
    files = [directory / "calibration.json"]
    files[0].write_text(json.dumps(data, indent=2) + "\n")
    files += _plots(calibration, directory)
    files.append(directory / "calibration.md")
    files[-1].write_text(markdown(calibration, meta))
    return files


def markdown(calibration: Calibration, meta: dict) -> str:
    """Summary tables: the worst linears, and each quantizer's mean output error per linear kind."""
    lines = [f"# Calibration of `{meta.get('model', '?')}` ({meta.get('scheme', '?')})", "",
             f"{calibration.tokens:,} tokens; statistics per linear input in `calibration.json`.", "",
             "![output error per layer, linear and quantizer](error_heatmap.png)", "",
             f"## The {WORST} linears the configured quantizers hurt most", "",
             "| linear | input | configured error (output) | INT8 error (output) | absmax | kurtosis | "
             "outlier channels | zeros in / after Q |", "|---|---|---|---|---|---|---|---|"]
    for name in worst_linears(calibration):
        s = calibration.linears[name]
        q = s["quantizers"]
        lines.append(
            f"| {name} | {s.get('spec', '')} | {q['configured']['output_relative_error']:.4f} | "
            f"{q['int8_absmax']['output_relative_error']:.4f} | {s['absmax']:.2f} | {s['kurtosis']:.1f} | "
            f"{s['outlier_channels']}/{s['channels']} | {s['zero_share']:.1%} / {s['quantized_zero_share']:.1%} |"
        )
    lines += ["", "![input histograms of the worst linears](worst_histograms.png)", "",
              "## Mean output error per linear kind and quantizer", "",
              "| linear | " + " | ".join(QUANTIZER_ORDER) + " |", "|---|" + "---|" * len(QUANTIZER_ORDER)]
    for kind in LINEAR_ORDER:
        names = [n for n in calibration.linears if _layer_and_linear(n)[1] == kind]
        if not names:
            continue
        means = [sum(calibration.linears[n]["quantizers"][q]["output_relative_error"] for n in names) / len(names)
                 for q in QUANTIZER_ORDER]
        lines.append(f"| {kind} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    lines += ["", "![share of zero inputs per layer and linear](sparsity.png)", ""]
    return "\n".join(lines)


def _plots(calibration: Calibration, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "bitnet-convert"})
    layers = sorted({_layer_and_linear(n)[0] for n in calibration.linears})
    kinds = [k for k in LINEAR_ORDER if any(_layer_and_linear(n)[1] == k for n in calibration.linears)]
    grid = _Grid(layers, kinds, {_layer_and_linear(n): n for n in calibration.linears})
    paths = []
    for name, draw in (("error_heatmap.png", _error_heatmap), ("worst_histograms.png", _worst_histograms),
                       ("sparsity.png", _sparsity)):
        fig = draw(calibration, grid)
        paths.append(directory / name)
        fig.savefig(paths[-1], dpi=110, metadata={"Software": None})
        plt.close(fig)
    return paths


@dataclass
class _Grid:
    """The layers and linear kinds a plot's rows and columns show, and the linear at each ``(layer, kind)``."""

    layers: list[int]
    kinds: list[str]
    index: dict[tuple[int, str], str]


def _error_heatmap(calibration: Calibration, grid: _Grid):
    """The output error of every quantizer per decoder layer (rows) and linear (columns), one panel each."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds = grid.layers, grid.kinds
    grids = {q: np.full((len(layers), len(kinds)), np.nan) for q in QUANTIZER_ORDER}
    for (layer, kind), name in grid.index.items():
        if kind in kinds and layer in layers:
            for q in QUANTIZER_ORDER:
                grids[q][layers.index(layer), kinds.index(kind)] = (
                    calibration.linears[name]["quantizers"][q]["output_relative_error"])
    # a log scale over the finite, positive errors (a broken model can give 0 or NaN everywhere)
    values = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids.values()])
    vmax = float(values.max()) if values.size else 1e-6
    vmin = max(float(values.min()) if values.size else 0.0, vmax * 1e-4, 1e-6)
    vmax = max(vmax, vmin * 10)
    norm = matplotlib.colors.LogNorm(vmin=vmin, vmax=vmax)
    height = max(2.8, 1.4 + 0.25 * len(layers))
    fig, axes = plt.subplots(1, len(QUANTIZER_ORDER), figsize=(2.9 * len(QUANTIZER_ORDER) + 1.2, height),
                             sharey=True, constrained_layout=True)
    for ax, q in zip(axes, QUANTIZER_ORDER, strict=True):
        image = ax.imshow(np.clip(grids[q], vmin, None), aspect="auto", cmap="magma_r", norm=norm,
                          interpolation="nearest")
        ax.set_title(q)
        ax.set_xticks(range(len(kinds)), [k.removesuffix("_proj") for k in kinds], rotation=45)
        ax.set_xlabel("linear")
    axes[0].set_yticks(range(len(layers)), [str(i) for i in layers])
    axes[0].set_ylabel("decoder layer")
    fig.colorbar(image, ax=axes, label="relative output error (log scale)", shrink=0.95)
    fig.suptitle("Output error ‖W·Q(x) − W·x‖ / ‖W·x‖ of each quantizer, per decoder layer and linear")
    return fig


def _worst_histograms(calibration: Calibration, grid: _Grid):
    """Input histograms of the linears whose configured quantizer hurts most."""
    import matplotlib.pyplot as plt

    worst = worst_linears(calibration)
    fig, axes = plt.subplots(1, len(worst), figsize=(3.4 * len(worst), 3.0), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], worst, strict=True):
        values = calibration.samples[name].float().numpy()
        ax.hist(values, bins=80, color="tab:blue", log=True)
        s = calibration.linears[name]
        error = s["quantizers"]["configured"]["output_relative_error"]
        ax.set_title(f"{name.removeprefix('model.')}\noutput error {error:.3f}, kurtosis {s['kurtosis']:.0f}",
                     fontsize=8)
        ax.set_xlabel("input value x")
        ax.set_ylabel("count (log)")
    fig.suptitle("Input distributions of the linears the configured quantizers hurt most")
    return fig


def _sparsity(calibration: Calibration, grid: _Grid):
    """The zero share in each linear's input and after its configured quantizer, per kind and layer."""
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds, index = grid.layers, grid.kinds, grid.index
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True, constrained_layout=True)
    width = 0.8 / max(len(layers), 1)
    for ax, key, title in ((axes[0], "zero_share", "zeros in the input"),
                           (axes[1], "quantized_zero_share", "zeros after the configured quantizer")):
        for i, layer in enumerate(layers):
            shares = [calibration.linears[index[(layer, k)]][key] if (layer, k) in index else 0.0 for k in kinds]
            ax.bar(np.arange(len(kinds)) + i * width - 0.4 + width / 2, shares, width, label=f"layer {layer}")
        ax.set_xticks(range(len(kinds)), [k.removesuffix("_proj") for k in kinds])
        ax.set_title(title)
        ax.set_xlabel("linear")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of zero values")
    axes[1].legend(fontsize=7, ncol=max(1, len(layers) // 8), loc="upper left")
    fig.suptitle("Share of exact zeros in each linear's input, per decoder layer")
    return fig
