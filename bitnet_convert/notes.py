"""Warnings about silent degradations (too little calibration text, no BOS token, all-zero weights, built-in data
on a user's model): one line each for the user, and a list in the report of the run that produced them.

They go through the standard ``logging`` logger ``bitnet_convert``; the CLI shows each as ``warning: …`` and
:func:`collect` gathers them for a report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("bitnet_convert")


def warn(message: str) -> None:
    """Tell the user about a degradation that does not stop the work (one line)."""
    logger.warning(message)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextmanager
def collect() -> Iterator[list[str]]:
    """Yield a list that receives every warning issued inside the block (each message once)."""
    handler = _Collector()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
