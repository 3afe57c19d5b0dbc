"""The entry point optimum users know: ``from_pretrained(path)`` then ``quantize(save_dir)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer

from bitnet_convert.pipeline import Conversion, quantize
from bitnet_convert.recipe import Recipe, load_recipe


class BitNetA48Quantizer(OptimumQuantizer):
    """Converts a BitNet b1.58 checkpoint to a4.8 (or another preset) through the bitnet-convert pipeline.

    >>> quantizer = BitNetA48Quantizer.from_pretrained("microsoft/bitnet-b1.58-2B-4T-bf16")
    >>> quantizer.quantize("out/bitnet-a48")
    """

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | Path,
        file_name: str | None = None,
        *,
        recipe: str | Path | None = None,
        **overrides: Any,
    ) -> BitNetA48Quantizer:
        """``model_or_path``: checkpoint directory or hub id; ``recipe``: a recipe file (defaults: a48);
        keyword overrides name recipe fields with ``__`` for nesting (``scheme__preset="a48-fp4"``).
        ``file_name`` is accepted for optimum compatibility; checkpoints are found by their index."""
        dotted = {key.replace("__", "."): value for key, value in overrides.items()}
        return cls(load_recipe(recipe, {**dotted, "model": str(model_or_path)}))

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **overrides: Any) -> Conversion:
        """Run the conversion and write it to ``save_dir``; returns the :class:`Conversion`."""
        return quantize(self.recipe, output=str(save_dir), **overrides)
