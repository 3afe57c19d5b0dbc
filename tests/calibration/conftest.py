"""Fixtures of the calibration tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def calibration_ids(reference_ids) -> torch.Tensor:
    """The reference validation windows, at most 6 of at most 128 tokens."""
    return reference_ids[:6, :128]
