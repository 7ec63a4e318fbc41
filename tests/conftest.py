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


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_DEDUP_LOGS": "0"}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster per test session (2 CPUs), stopped by its handle, never `ray stop`."""
    import tempfile

    os.environ.update(RAY_ENV)
    import ray

    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # socket paths must stay short
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="ERROR",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    yield ray
    ray.shutdown()
