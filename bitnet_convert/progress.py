"""Progress reporting that the pipeline calls and the CLI renders (silent by default)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    """A stage-by-stage progress sink. The base class reports nothing; the CLI subclasses it with rich."""

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """Enter a stage of ``total`` steps; yields ``advance(label="")`` to call after each step."""
        yield lambda label="": None


SILENT = Progress()
