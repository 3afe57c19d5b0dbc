"""Errors a user can cause and fix. The CLI prints their message on one line and exits non-zero."""


class BitNetConvertError(Exception):
    """Base class: bad input (recipe, checkpoint, data, output directory). The message says what and where."""


class RecipeError(BitNetConvertError):
    """The recipe or an override is invalid."""


class CheckpointError(BitNetConvertError):
    """The model checkpoint is missing, unreadable or not a supported BitNet causal LM."""


class DataError(BitNetConvertError):
    """Calibration or evaluation data is missing or unreadable."""


class ResourceError(BitNetConvertError):
    """The machine ran out of a resource (memory) with these settings; the message names the knobs."""


class OutputError(BitNetConvertError):
    """The output directory cannot be written as asked."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during long work; the message says what was kept and how to go on."""


class BackendError(BitNetConvertError, ValueError):
    """A backend that cannot run as asked (unknown name, native kernels unavailable, wrong device or dtype)."""
