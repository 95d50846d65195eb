"""NIRVANA-VID: whole-prompt latent substitution, the cross-inference baseline CHAI beats.

A full run of the ``steps``-step schedule also captures z_k (the latent fed at 1-based step
k) at ``capture_steps`` (5, 10, 15, 20, 25 of 30, as NIRVANA stores). A new prompt whose
whole-prompt cosine to a cached prompt is high enough starts from that prompt's stored z_K
at step K of the *same* schedule and runs steps K..N: N - K + 1 model calls instead of N.
The more similar the prompts, the later K (the less of the new prompt's own denoising is
left to steer the video away from the cached one).

The similarity → K map is a table of bands (:attr:`NirvanaSettings.bands`): the first band
whose lower bound the cosine reaches gives K. The defaults space the five stored steps over
cosines 0.75..0.95 of the store's MiniLM prompt vectors, the range in which Shapes prompts
that share most of their wording fall; below the lowest band it is a miss (a full run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from chaid.engine.pipeline import GenerationRequest
from chaid.errors import InputError


@dataclass(frozen=True)
class NirvanaSettings:
    # Steps of a full run (the schedule a substituted run continues).
    steps: int = 30
    # 1-based steps whose input latent a full run stores; more steps give finer choices of
    # K at more bytes per entry.
    capture_steps: tuple[int, ...] = (5, 10, 15, 20, 25)
    # (lowest whole-prompt cosine, start step K), most similar first: a higher cosine skips
    # more steps. Lower bounds trade hit rate against how far the cached video leaks in.
    bands: tuple[tuple[float, int], ...] = (
        (0.95, 25),
        (0.90, 20),
        (0.85, 15),
        (0.80, 10),
        (0.75, 5),
    )

    @property
    def min_similarity(self) -> float:
        """The lowest cosine that is a hit (the store's prompt threshold should be this)."""
        return min(low for low, _ in self.bands)

    def validate(self) -> NirvanaSettings:
        """Return self when the bands are ordered and name captured steps, else InputError."""
        if any(not 1 < k <= self.steps for k in self.capture_steps):
            raise InputError(f"capture_steps must be in 2..{self.steps}")
        lows = [low for low, _ in self.bands]
        if not self.bands or lows != sorted(lows, reverse=True):
            raise InputError("bands must be non-empty and ordered by falling similarity")
        if any(k not in self.capture_steps for _, k in self.bands):
            raise InputError("every band's start step must be a captured step")
        return self

    def start_step(self, similarity: float) -> int | None:
        """The step K a run starts at for a cached prompt of this cosine; None: a miss."""
        for low, k in self.bands:
            if similarity >= low:
                return k
        return None


def substituted_request(
    request: GenerationRequest,
    latents: Mapping[int, torch.Tensor],
    similarity: float,
    settings: NirvanaSettings,
) -> GenerationRequest | None:
    """``request`` as a NIRVANA hit on a cached entry, or None if the similarity misses.

    ``latents`` maps captured steps to z_k (C, T, H, W). The returned request runs the
    settings' full schedule from step K with the stored z_K; a hit whose entry lacks z_K
    raises InputError.
    """
    k = settings.start_step(similarity)
    if k is None:
        return None
    if k not in latents:
        raise InputError(f"the NIRVANA entry has no latent for step {k}")
    return dataclasses.replace(
        request,
        steps=settings.steps,
        start_step=k,
        start_latent=torch.as_tensor(latents[k]).float(),
        cache_latents=None,
        capture_steps=(),
    )
