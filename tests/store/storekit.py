"""Helpers of the store tests: toy settings, deterministic analyses and latents."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from chaid.store.analysis import PromptAnalysis
from chaid.store.settings import StoreSettings

# Dimension of the synthetic vectors of tests that exercise storage, not language.
TOY_DIM = 16
TOY_EMBEDDER = ("toy-embedder", TOY_DIM)


def toy_settings(tmp_path: Path, **overrides) -> StoreSettings:
    base = dict(data_dir=tmp_path / "store", budget_bytes=1 << 30, rebuild_every=50,
                map_bytes=1 << 20, index_trees=4, search_k=200, entity_threshold=0.5)
    base.update(overrides)
    return StoreSettings(**base)


def seeded_rng(text: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8],
                                                "big"))


def toy_analysis(prompt: str, entities: int = 2, dim: int = TOY_DIM) -> PromptAnalysis:
    """An analysis with deterministic random unit vectors derived from the prompt text."""
    rng = seeded_rng(prompt)
    vecs = rng.standard_normal((entities + 1, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    names = tuple(f"{prompt}/e{i}" for i in range(entities))
    return PromptAnalysis(prompt, names, vecs[:-1], vecs[-1])


def toy_latents(prompt: str, shape=(4, 3, 8, 8), steps=(2, 3, 4)) -> dict[int, np.ndarray]:
    rng = seeded_rng("latents:" + prompt)
    return {s: rng.standard_normal(shape).astype(np.float32) for s in steps}


def crash_settings(data_dir: Path) -> StoreSettings:
    """Settings of the crash test: a budget of ~8 entries, frequent background rebuilds."""
    return StoreSettings(data_dir=data_dir, budget_bytes=8 * 4 * 8 * 32 * 32 * 3 * 2 + 4096,
                         rebuild_every=6, map_bytes=1 << 20, index_trees=4, search_k=200,
                         entity_threshold=0.5, policy="fifo")
