"""Fixtures of the store tests: real models loaded once per session."""

from __future__ import annotations

import json

import pytest
from storekit import VBENCH

from chaid.store.analysis import Analyzer
from chaid.store.settings import StoreSettings


@pytest.fixture(scope="session")
def analyzer() -> Analyzer:
    return Analyzer.from_settings(StoreSettings())


@pytest.fixture(scope="session")
def vbench_prompts() -> list[str]:
    if not VBENCH.exists():
        pytest.skip("the VBench prompt list is not beside the repository")
    return [p["prompt_en"] for p in json.loads(VBENCH.read_text())]
