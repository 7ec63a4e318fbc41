"""Shared fixtures: tiny checkpoints built once per test session (nothing downloads)."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_path(tiny_root):
    """tiny_path(family) -> folder of a tiny checkpoint, built on first use."""
    from vlrlhf.models.tiny import build_tiny_model

    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_model(family, tiny_root / family)
        return built[family]

    return get
