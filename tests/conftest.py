"""Shared fixtures: the path to ../shared, and one torch thread for small models.

Helpers that tests import live in modules of their own (modelkit, storekit, daemonkit):
several directories have a conftest.py, so ``import conftest`` would depend on the order
pytest loads them in.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present beside the repository")
    return SHARED


@pytest.fixture
def one_thread():
    """Small tensors: one thread avoids OpenMP start-up and spinning on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
