"""Generation modes: what a request asks of the cache, what the cache did, how the model ran.

One vocabulary of three enums, and the rules that join them. Every other module imports
these; none compares mode strings of its own.

======================  ======================  =============================================
request (CacheMode)     outcome (Outcome)       run (RunKind) and its steps
======================  ======================  =============================================
``auto``, lookup hit    ``hit``                 ``fast``: ``chai.fast_steps`` with Cache
                                                Attention on the entry's latents (without,
                                                when :func:`hit_attends` says no)
``auto``, lookup miss   ``miss``                ``full``: ``chai.full_steps``; its latents at
                                                ``chai.cache_steps`` are written to the cache
``refresh``             ``miss``                ``full`` (no lookup: forces a new entry)
``off``                 ``off``                 ``plain``: the request's own steps, no cache
``auto`` or ``off``,    ``repeat``              ``replay``: no steps; the final latent of the
served before                                   identical request, decoded again
======================  ======================  =============================================

The values are the wire protocol's strings (docs/protocol.md); the enums are ``str``
subclasses, so they compare equal to those strings and serialise as them.
"""

from __future__ import annotations

import enum

from chaid.config import ChaiSettings


class CacheMode(enum.StrEnum):
    """What a request asks of the cache (the ``cache`` parameter of ``generate``)."""

    AUTO = "auto"  # look up; a hit runs fast, a miss runs full and is cached
    REFRESH = "refresh"  # no lookup: a full run whose latents are cached (forces a miss)
    OFF = "off"  # neither lookup nor write: a plain run of the request's steps


class RunKind(enum.StrEnum):
    """How the denoiser ran."""

    FAST = "fast"  # few steps, Cache Attention on cached latents where the hit uses it
    FULL = "full"  # all steps, latents captured for the cache
    PLAIN = "plain"  # the requested steps, nothing cached or reused
    REPLAY = "replay"  # no denoising: an identical request's final latent, decoded again


class Outcome(enum.StrEnum):
    """What the cache did for a request (the ``cache`` field of a result)."""

    HIT = "hit"
    MISS = "miss"
    OFF = "off"
    # An identical request was served before: its final latent is decoded again.
    REPEAT = "repeat"

    @property
    def run(self) -> RunKind:
        """The run this outcome gets: a hit runs fast, a miss full, no cache plain."""
        return _RUN_OF[self]

    @property
    def writes_cache(self) -> bool:
        """Only a miss's (full) run writes the cache."""
        return self is Outcome.MISS


_RUN_OF = {Outcome.HIT: RunKind.FAST, Outcome.MISS: RunKind.FULL, Outcome.OFF: RunKind.PLAIN,
           Outcome.REPEAT: RunKind.REPLAY}


def decide(mode: CacheMode, hit: bool) -> Outcome:
    """The outcome of a request in ``mode`` whose lookup found an entry (``hit``) or not.

    ``hit`` is only consulted in ``auto`` mode: ``refresh`` and ``off`` make no lookup. A
    plain string is taken as the mode it names (ValueError for any other).
    """
    mode = CacheMode(mode)
    if mode is CacheMode.OFF:
        return Outcome.OFF
    if mode is CacheMode.AUTO and hit:
        return Outcome.HIT
    return Outcome.MISS


def needs_lookup(mode: CacheMode) -> bool:
    """Only ``auto`` looks the prompt up before it runs."""
    return CacheMode(mode) is CacheMode.AUTO


def steps_for(run: RunKind, chai: ChaiSettings, requested: int) -> int:
    """Denoising steps of a run: the CHAI modes' own for fast and full, else ``requested``."""
    if run is RunKind.FAST:
        return chai.fast_steps
    if run is RunKind.FULL:
        return chai.full_steps
    if run is RunKind.REPLAY:
        return 0
    return requested


def hit_attends(chai: ChaiSettings, model_default: bool) -> bool:
    """Whether a hit's fast steps run Cache Attention: ``chai.cache_attention`` "on" or
    "off", or for "auto" the model preset's ``cache_attention``."""
    if chai.cache_attention == "auto":
        return model_default
    return chai.cache_attention == "on"
