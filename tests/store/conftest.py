"""Fixtures of the store tests: real models loaded once per session."""

from __future__ import annotations

import pytest

from chaid.store.analysis import Analyzer
from chaid.store.settings import StoreSettings


@pytest.fixture(scope="session")
def analyzer() -> Analyzer:
    # One torch thread: two spinning threads on a shared 2-core machine are ~40x slower.
    return Analyzer.from_settings(StoreSettings(embedder_threads=1))


@pytest.fixture(scope="session")
def minilm_analyzer() -> Analyzer:
    """The MiniLM transformer embedder (store.embedder = "minilm"), for its own fast paths."""
    return Analyzer.from_settings(StoreSettings(embedder="minilm", embedder_threads=1))
