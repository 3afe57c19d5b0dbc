"""bitnet-convert: turn BitNet b1.58 models into BitNet a4.8 models."""

__version__ = "0.1.0"

from bitnet_convert.errors import BitNetConvertError
from bitnet_convert.io.load import load, load_tokenizer
from bitnet_convert.pipeline import quantize
from bitnet_convert.recipe import Recipe, load_recipe

__all__ = ["BitNetConvertError", "Recipe", "__version__", "load", "load_recipe", "load_tokenizer", "quantize"]
