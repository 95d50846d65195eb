"""Exact repeats: a request identical to one already served gets that request's video
without denoising.

Several applications sharing a daemon often send the same request (same prompt, seed,
size, rate, guidance and mode on the same model). What is kept per request is its final
latent in float32 (a few hundred kB at OpenSora's 240p, kilobytes on tiny-shapes), not the
encoded video: decoding it again gives the very frames the first request got, in either
response format, for the cost of the VAE decode alone. (An MP4 would be smaller for long
videos but lossy, so a ``frames`` response could not be rebuilt from it.)

Latents live in a bounded in-memory LRU (``store.repeat_bytes``) and, with a shared tier,
in Redis for every daemon of the fleet (``SharedTier.put_repeat``/``get_repeat``, with a
time to live). ``refresh`` requests always run, and their result replaces the stored one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from chaid.modes import CacheMode

if TYPE_CHECKING:
    from chaid.engine.pipeline import GenerationRequest
    from chaid.store.shared import SharedTier


def repeat_key(request: GenerationRequest, mode: CacheMode, fingerprint: str,
               settings: dict[str, Any]) -> str:
    """What makes two requests identical: the resolved request (prompt, seed, frames,
    height, width, fps, guidance; steps for ``off``), cached or not, the model fingerprint
    and the settings that change the video (``settings``: the CHAI modes, numerics)."""
    cached = mode is not CacheMode.OFF
    fields = {"prompt": request.prompt, "seed": request.seed, "frames": request.frames,
              "height": request.height, "width": request.width, "fps": request.fps,
              "cfg_scale": request.cfg_scale, "cached": cached,
              "steps": None if cached else request.steps, "fingerprint": fingerprint,
              "settings": settings}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()
                          ).hexdigest()[:40]


def settings_of(pipeline: Any) -> dict[str, Any]:
    """The pipeline's settings that change a request's video: the CHAI modes (not the
    kernel, which computes the same attention), the numerics, and the sampler's temporal
    guidance and noise share."""
    return {"chai": {k: v for k, v in asdict(pipeline.chai).items() if k != "kernel"},
            "numerics": str(pipeline.parts.numerics),
            "sampler": pipeline.sampler}


class RepeatStore:
    """Final latents by request key: in memory (LRU, ``budget_bytes``) and, given a shared
    tier, in Redis."""

    def __init__(self, budget_bytes: int, shared: SharedTier | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.shared = shared
        self._latents: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.counts = {"local": 0, "shared": 0, "stored": 0}

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The final latent stored for ``key`` (of ``shape``), or None."""
        with self._lock:
            latent = self._latents.get(key)
            if latent is not None:
                self._latents.move_to_end(key)
                self.counts["local"] += 1
                return latent
        if self.shared is None:
            return None
        blob = self.shared.get_repeat(key)
        if blob is None or len(blob) != 4 * int(np.prod(shape)):
            return None
        latent = torch.from_numpy(np.frombuffer(blob, "<f4").reshape(shape).copy())
        self._keep(key, latent)
        self.counts["shared"] += 1
        return latent

    def put(self, key: str, latent: torch.Tensor) -> None:
        """Store a request's final latent (here, and in the shared tier in the background)."""
        latent = latent.detach().float().cpu().contiguous()
        self._keep(key, latent)
        self.counts["stored"] += 1
        if self.shared is not None:
            self.shared.put_repeat(key, latent.numpy().astype("<f4").tobytes())

    def _keep(self, key: str, latent: torch.Tensor) -> None:
        size = latent.numel() * 4
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._latents.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * 4
            self._latents[key] = latent
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, dropped = self._latents.popitem(last=False)
                self._bytes -= dropped.numel() * 4

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._latents), "bytes": self._bytes,
                    "budget_bytes": self.budget_bytes, "served_local": self.counts["local"],
                    "served_shared": self.counts["shared"], "stored": self.counts["stored"]}
