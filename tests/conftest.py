"""Shared fixtures: tiny offline beacon checkpoints, written once per session and reused."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from beacon_apps.beacon.tiny import write_tiny_model

# Tiny models are all per-op overhead: one intra-op thread is faster, and 10x faster when other
# processes share the cores (OpenMP workers spin waiting for each other). BEACON_TEST_THREADS=N
# overrides it.
torch.set_num_threads(int(os.environ.get("BEACON_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """A factory `tiny_model_dir(family="qwen2", seed=0, **beacon_fields) -> Path`.

    Each distinct (family, seed, beacon fields) is written once per test session with
    `write_tiny_model` and the same folder is returned afterwards. Treat the folders as
    read-only: copy one before changing it.
    """
    cache: dict[str, Path] = {}

    def make(family: str = "qwen2", seed: int = 0, **beacon: Any) -> Path:
        key = json.dumps([family, seed, beacon], sort_keys=True)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = write_tiny_model(directory, family=family, seed=seed, **beacon)
        return cache[key]

    return make
