"""Settings read from environment variables (the bounded waits: ``BITNET_CONVERT_BUILD_WAIT``,
``BITNET_CONVERT_DIST_TIMEOUT``, the benchmarks' ``BENCH_JOB_TIMEOUT``)."""

from __future__ import annotations

import math
import os


def env_seconds(name: str, default: float, *, above: float | None = None, at_least: float | None = None,
                at_most: float | None = None) -> float:
    """Seconds from environment variable ``name``: ``default`` when unset or empty, else a number within the bounds
    (``above``: exclusive lower bound, ``at_least``: inclusive, ``at_most``: inclusive upper; a bound is the point
    of these settings, so ``inf`` and ``nan`` never pass). Raises ``ValueError`` whose message names the variable,
    the value given and the range expected."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    fits = math.isfinite(value) and (above is None or value > above) and (at_least is None or value >= at_least) \
        and (at_most is None or value <= at_most)
    if not fits:
        raise ValueError(f"{name}={raw!r}: expected {_range(above, at_least, at_most)}")
    return value


def _range(above: float | None, at_least: float | None, at_most: float | None) -> str:
    low = f"from {at_least:g}" if at_least is not None else f"above {above:g}" if above is not None else ""
    if at_most is None:
        return "a positive number of seconds" if above == 0 and at_least is None else f"a number of seconds {low}"
    return f"a number of seconds {low} to {at_most:g}" if at_least is not None else \
        f"a number of seconds {low} and at most {at_most:g}"
