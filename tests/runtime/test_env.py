"""Seconds from environment variables: the default when unset or empty, else a finite number within the bounds,
or one line naming the variable, the value and the range."""

from __future__ import annotations

import pytest

from bitnet_convert.runtime.env import env_seconds

BUILD = {"at_least": 0, "at_most": 86400}
DIST = {"above": 0, "at_most": 604800}
BENCH = {"above": 0}


@pytest.mark.parametrize(("raw", "bounds", "expected"), [
    (None, DIST, 7.0), ("", DIST, 7.0), ("  ", BENCH, 7.0), ("5", BUILD, 5.0), ("0", BUILD, 0.0),
    ("86400", BUILD, 86400.0), (" 2.5 ", DIST, 2.5), ("1e6", BENCH, 1e6),
])
def test_accepted_values(monkeypatch, raw, bounds, expected):
    if raw is None:
        monkeypatch.delenv("X_WAIT", raising=False)
    else:
        monkeypatch.setenv("X_WAIT", raw)
    assert env_seconds("X_WAIT", 7.0, **bounds) == expected


@pytest.mark.parametrize(("raw", "bounds", "message"), [
    ("-1", BUILD, "X_WAIT='-1': expected a number of seconds from 0 to 86400"),
    ("86401", BUILD, "X_WAIT='86401': expected a number of seconds from 0 to 86400"),
    ("0", DIST, "X_WAIT='0': expected a number of seconds above 0 and at most 604800"),
    ("inf", DIST, "X_WAIT='inf': expected a number of seconds above 0 and at most 604800"),
    ("nan", BUILD, "X_WAIT='nan': expected a number of seconds from 0 to 86400"),
    ("soon", BENCH, "X_WAIT='soon': expected a positive number of seconds"),
    ("inf", BENCH, "X_WAIT='inf': expected a positive number of seconds"),
    ("-0.5", BENCH, "X_WAIT='-0.5': expected a positive number of seconds"),
])
def test_refused_values(monkeypatch, raw, bounds, message):
    monkeypatch.setenv("X_WAIT", raw)
    with pytest.raises(ValueError) as info:
        env_seconds("X_WAIT", 7.0, **bounds)
    assert str(info.value) == message
