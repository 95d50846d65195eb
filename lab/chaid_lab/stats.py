"""Paired comparisons: is method A better than method B on the same prompts and seeds?

Every quality comparison in the lab is paired: both methods generate the same prompt from
the same seed, so their per-prompt difference removes the prompt's own difficulty. The
mean of those differences gets a 95% bootstrap confidence interval (scipy's BCa bootstrap
over prompts), and a difference is called a win or a loss only when the interval excludes
0; otherwise it is a tie, however large the mean looks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# Resamples of the bootstrap: enough that the interval's ends move by well under 0.001 of a
# judge score from one run to the next.
N_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``a - b`` over pairs with its confidence interval and verdict."""

    mean: float
    low: float
    high: float
    n: int
    # "win" (interval above 0: a is better when higher is better), "loss" or "tie".
    verdict: str
    # Whether a larger value is better for the metric compared (PSNR yes, distance no).
    higher_is_better: bool = True

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self, digits: int = 4) -> dict:
        out = asdict(self)
        for key in ("mean", "low", "high"):
            out[key] = round(out[key], digits)
        out["half_width"] = round(self.half_width, digits)
        return out

    def describe(self, digits: int = 3) -> str:
        return (f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"{self.verdict}")


def format_diff(d: dict | None, digits: int = 3, markdown: bool = False) -> str:
    """A :meth:`PairedDiff.as_dict` as ``+m [low, high] verdict`` (``-`` for none); in
    Markdown, a win or a loss is bold and a tie says nothing."""
    if not d:
        return "–" if markdown else "-"
    text = f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"
    if markdown:
        return text + {"win": " **win**", "loss": " **loss**"}.get(d["verdict"], "")
    return f"{text} {d['verdict']}"


def paired_difference(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True,
                      seed: int = 0, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES) -> PairedDiff:
    """The mean of ``a[i] - b[i]`` with a bootstrap confidence interval over the pairs.

    Pairs where either value is NaN are left out. With fewer than two pairs the interval is
    unbounded; with all differences equal it is that one value.
    """
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    d = (x - y)[~(np.isnan(x) | np.isnan(y))]
    n = int(d.size)
    if n == 0:
        return PairedDiff(math.nan, math.nan, math.nan, 0, "tie", higher_is_better)
    mean = float(d.mean())
    if n < 2:
        low, high = -math.inf, math.inf
    elif np.all(d == d[0]):
        low = high = mean
    else:
        low, high = _interval(d, seed, confidence, n_resamples)
    if low > 0:
        verdict = "win" if higher_is_better else "loss"
    elif high < 0:
        verdict = "loss" if higher_is_better else "win"
    else:
        verdict = "tie"
    return PairedDiff(mean, low, high, n, verdict, higher_is_better)


def _interval(d: np.ndarray, seed: int, confidence: float, n_resamples: int
              ) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    for method in ("BCa", "percentile"):  # BCa can fail on very skewed, tied samples
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((d,), np.mean, confidence_level=confidence,
                                  n_resamples=n_resamples, method=method, random_state=rng)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high
    return -math.inf, math.inf


def pairs_for_half_width(differences: Sequence[float], target: float,
                         confidence: float = CONFIDENCE) -> int:
    """Pairs needed for a confidence interval of half-width ``target`` on the mean, from
    the spread of a pilot sample of differences (normal approximation)."""
    d = np.asarray(differences, np.float64)
    d = d[~np.isnan(d)]
    if d.size < 2:
        raise ValueError("a pilot needs at least two differences")
    z = stats.norm.ppf(0.5 + confidence / 2)
    return max(2, math.ceil((z * float(d.std(ddof=1)) / target) ** 2))
