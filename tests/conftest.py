"""Shared fixtures: tiny random models of every supported architecture, and the real embedded models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.archs import ARCHS, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct, real weights, fp32, eval mode: (model, tokenizer)."""
    import steerlab as sl

    return sl.load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2, real weights: (model, tokenizer)."""
    import steerlab as sl

    return sl.load("minilm-l6")


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    """A tiny random model of ``arch`` in eval mode (seeded)."""
    return tiny_model(arch)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
