"""CHAI in process: the daemon's engine without the daemon.

For a program that wants videos from its own process (a notebook, a batch job) rather than
from a shared daemon::

    from chaid.local import LocalChai

    with LocalChai(data_dir="chaid-cache") as chai:       # loads the model once
        first = chai.generate("a red circle moving left over a grassy field")   # miss
        second = chai.generate("a blue square bouncing over a grassy field")    # hit
        print(second.cache, second.steps, second.video.shape)    # hit 8 (16, 64, 64, 3)

    with LocalChai(data_dir=None) as chai:                 # no cache: plain sampling
        video = chai.generate("a red circle", steps=20).video

Settings are the daemon's (``chaid.config.Settings``: a TOML file, ``CHAID_*`` variables,
or keyword overrides here). One ``LocalChai`` owns its store's writer lock, as a daemon
does, so a daemon and a ``LocalChai`` cannot share a data directory at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chaid.config import MODEL_CFG_SCALE, Settings, load_settings
from chaid.modes import CacheMode


@dataclass
class LocalResult:
    """One generated video and how it was made."""

    video: np.ndarray  # (frames, height, width, 3) uint8 RGB
    fps: int
    cache: str  # "hit", "miss" or "off"
    steps: int
    # The cached entry a hit reused (id, prompt, entity matches); None otherwise.
    matched: dict[str, Any] | None
    # The entry a miss wrote; None for hits, plain runs and videos not cached.
    entry_id: int | None
    # Why a miss was not cached (the store could not write; an undrawable prompt).
    not_cached: str | None
    # What the model could use of the prompt (see docs/protocol.md), None without a
    # vocabulary.
    understood: dict[str, Any] | None
    timings_ms: dict[str, float]


class LocalChai:
    """A loaded model and, with a ``data_dir``, the latent cache, in this process.

    Args:
        config: a TOML settings file, as ``chaid serve --config``.
        data_dir: the cache's directory; None runs without a cache (every request plain).
        model, weights, device: as the ``[model]`` settings; None keeps the file's or the
            environment's.
    """

    def __init__(self, config: str | Path | None = None, *, data_dir: str | Path | None = None,
                 model: str | None = None, weights: str | Path | None = None,
                 device: str | None = None) -> None:
        from chaid.engine.pipeline import apply_torch_threads

        self.settings: Settings = load_settings(config, overrides={
            "model": {"name": model, "weights": weights, "device": device},
            "store": {"data_dir": data_dir}})
        apply_torch_threads(self.settings)
        self._engine = None
        self._pipeline = None
        if data_dir is not None:
            from chaid.engine.chai import ChaiEngine

            self._engine = ChaiEngine.load(self.settings)
            self._pipeline = self._engine.pipeline
        else:
            from chaid.engine.pipeline import Pipeline

            self._pipeline = Pipeline.from_settings(self.settings)

    @property
    def cached(self) -> bool:
        return self._engine is not None

    def generate(self, prompt: str, *, cache: str = "auto", frames: int | None = None,
                 height: int | None = None, width: int | None = None, seed: int = 0,
                 cfg_scale: float | None | str = MODEL_CFG_SCALE,
                 steps: int | None = None) -> LocalResult:
        """One video. ``cache``: "auto" (a hit runs fast, a miss full and is cached),
        "refresh" (a full run, cached) or "off" (``steps`` plain steps, the default
        ``[sampler] steps``); without a data dir every request is "off". InputError
        (a ``chaid.errors.ChaidError``) for an invalid request."""
        from chaid.engine.pipeline import GenerationRequest

        mode = CacheMode(cache)
        if self._engine is None or mode is CacheMode.OFF:
            request = self._pipeline.resolve(GenerationRequest(
                prompt, frames=frames, height=height, width=width, seed=seed,
                cfg_scale=cfg_scale, steps=steps or self.settings.sampler.steps))
            result = self._pipeline.generate(request)
            understood = self._pipeline.understand(prompt)
            return LocalResult(result.video, result.fps, "off", result.steps, None, None, None,
                               None if understood is None else understood.as_dict(),
                               result.timings.as_dict())
        engine = self._engine
        request = engine.resolve(prompt, frames=frames, height=height, width=width,
                                 seed=seed, cfg_scale=cfg_scale, steps=steps)
        lookup, repeat = engine.look_up(request, mode)
        outcome = engine.generate(request, mode, lookup, repeat=repeat)
        inserted = engine.insert(outcome)
        return LocalResult(
            outcome.result.video, outcome.result.fps, outcome.outcome.value,
            outcome.result.steps, outcome.matched(),
            None if inserted is None else inserted.entry_id, outcome.not_cached,
            None if outcome.understood is None else outcome.understood.as_dict(),
            {**outcome.result.timings.as_dict(), **outcome.timings_ms})

    def lookup(self, prompt: str, **sizes: int) -> dict[str, Any]:
        """Would ``prompt`` hit the cache, and why (as ``chai lookup --json``)."""
        from chaid.engine.chai import lookup_as_dict

        if self._engine is None:
            raise ValueError("this LocalChai has no cache (data_dir=None)")
        request = self._engine.resolve(prompt, **sizes)
        return lookup_as_dict(self._engine.lookup(request, touch=False))

    def close(self) -> None:
        """Release the store (its writer lock; pending hit statistics are written)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> LocalChai:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
