"""First-Block-Cache: intra-inference residual reuse between adjacent denoising steps.

At every model call the first block pair runs as usual; its output residual r = h_1 - x is
compared with the residual of the last call that ran the whole stack. When the relative
change mean|r - r_ref| / mean|r_ref| is below ``threshold``, the remaining pairs are skipped
and their cached residual (the stack's output minus h_1, from that last full call) is added
to h_1 instead. Otherwise the remaining pairs run and both residuals are refreshed.

The reference residual is only refreshed by a full call, as in ParaAttention's FBCache:
comparing with the previous (possibly skipped) call instead would let small changes add up
over many consecutive skips.

The cache is per request (:class:`FirstBlockCache`): the shared model is never patched and
a request without it runs the plain loop. One decision covers the whole model batch (both
guidance branches), so the skipped work is always a whole step's remaining blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chaid.errors import InputError
from chaid.models.stdit3 import BlockRunner, RunPair

# The intra-inference methods the pipeline knows (the bench names them "intra-<method>").
INTRA_METHODS = ("fbc",)


@dataclass(frozen=True)
class IntraCacheSettings:
    # "fbc" (First-Block-Cache), the only method so far.
    method: str = "fbc"
    # Largest relative change of the first pair's residual that still reuses the cached
    # residual of the rest: higher skips more steps and drifts further from the plain run;
    # 0 never skips (bit-identical to no cache).
    threshold: float = 0.1
    # Steps (1-based) at or before this always run in full: the first steps set the layout
    # of the video and change fastest. 1 lets step 2 reuse step 1's residual.
    warmup_steps: int = 1
    # Longest run of consecutive skipped steps (0: no limit); a bound keeps the cached
    # residual from going stale on a slowly drifting trajectory.
    max_consecutive: int = 0

    def validate(self) -> IntraCacheSettings:
        """Return self when every value is in range, else raise InputError."""
        if self.method not in INTRA_METHODS:
            raise InputError(
                f"intra cache method must be one of {INTRA_METHODS}, not {self.method!r}"
            )
        if not self.threshold >= 0.0:
            raise InputError(f"intra cache threshold must be >= 0, not {self.threshold}")
        if self.warmup_steps < 0 or self.max_consecutive < 0:
            raise InputError("intra cache warmup_steps and max_consecutive must be >= 0")
        return self


@dataclass
class FirstBlockCache:
    """The First-Block-Cache state of one request; see the module docstring.

    Use :meth:`runner` for each model call: ``guidance.velocity(z, t, plan,
    cache.runner(step))``. ``skipped`` lists the steps whose remaining pairs were skipped.
    """

    settings: IntraCacheSettings
    skipped: list[int] = field(default_factory=list)
    _ref_residual: torch.Tensor | None = field(default=None, repr=False)
    _rest_residual: torch.Tensor | None = field(default=None, repr=False)
    _run_of_skips: int = 0

    def runner(self, step: int) -> BlockRunner:
        """The block runner of the model call at 1-based ``step``."""

        def run(x: torch.Tensor, run_pair: RunPair, depth: int) -> torch.Tensor:
            # 1. the first pair, always
            h = run_pair(0, x)
            residual = h - x
            # 2. reuse the rest's residual when the first pair barely changed
            if self._can_skip(step, residual):
                self.skipped.append(step)
                self._run_of_skips += 1
                assert self._rest_residual is not None
                return h + self._rest_residual
            # 3. otherwise run the rest and refresh both residuals
            first = h
            for i in range(1, depth):
                h = run_pair(i, h)
            self._ref_residual = residual
            self._rest_residual = h - first
            self._run_of_skips = 0
            return h

        return run

    def _can_skip(self, step: int, residual: torch.Tensor) -> bool:
        s = self.settings
        ref = self._ref_residual
        if ref is None or self._rest_residual is None or step <= s.warmup_steps:
            return False
        if ref.shape != residual.shape or s.threshold <= 0.0:
            return False
        if s.max_consecutive and self._run_of_skips >= s.max_consecutive:
            return False
        change = (residual - ref).abs().float().mean() / ref.abs().float().mean().clamp_min(1e-12)
        return bool(change < s.threshold)


def make_intra_cache(settings: IntraCacheSettings) -> FirstBlockCache:
    """A fresh per-request intra cache for validated ``settings``."""
    settings.validate()
    return FirstBlockCache(settings)
