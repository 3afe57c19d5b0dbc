"""Shared fixtures. Every test runs offline on the built-in reference model or on tiny generated checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
from helpers import REFERENCE, REPO, write_tiny_checkpoint


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert (REFERENCE / "model.safetensors").is_file(), f"the built-in reference model is missing: {REFERENCE}"
    return REFERENCE


@pytest.fixture(scope="session")
def a48_reference(tmp_path_factory) -> Path:
    """The reference model converted with recipes/a48.yaml (no calibration pass), once per test session: the
    output directory, which tests only read (load it for a model of their own)."""
    import bitnet_convert

    out = tmp_path_factory.mktemp("a48") / "a48"  # a short path: reports print it in 80-column titles
    return bitnet_convert.quantize(REPO / "recipes/a48.yaml", output=str(out), calibration__samples=0).output


@pytest.fixture()
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny")


@pytest.fixture(scope="session")
def reference_ids(reference_dir: Path) -> torch.Tensor:
    """Two windows of 64 validation tokens of the reference corpus."""
    from bitnet_convert.io.data import load_texts, token_stream, windows
    from bitnet_convert.io.load import load_tokenizer

    tokenizer = load_tokenizer(reference_dir)
    stream = token_stream(tokenizer, load_texts("builtin:reference", "validation")[:40])
    return windows(stream, 64, tokenizer.bos_token_id)[:2]


@pytest.fixture(scope="module")
def hf_bitnet():
    assert os.environ.get("TORCH_COMPILE_DISABLE") == "1", "set TORCH_COMPILE_DISABLE=1 before importing transformers"
    from transformers.integrations import bitnet

    return bitnet
