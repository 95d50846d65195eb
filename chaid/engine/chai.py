"""CHAI orchestration: lookup → outcome → sample → decode → cache write.

:class:`ChaiEngine` joins the generation pipeline and the latent store. Its methods are
synchronous and are called from worker threads: ``lookup`` only uses the CPU (spaCy,
MiniLM, the index) and may run beside a generation; ``generate`` uses the device and must be
called by one thread at a time per device (the daemon's device worker guarantees it);
``insert`` writes the store.

Which run a request gets, and with how many steps, is :mod:`chaid.modes`' rule (the table
there; docs/architecture.md follows one request through it): in ``auto`` a hit runs fast
with Cache Attention on the entry's latents, a miss runs full and its latents z_k at
``chai.cache_steps`` are written; ``refresh`` forces a miss; ``off`` runs plain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from chaid.config import MODEL_CFG_SCALE, Settings
from chaid.engine.pipeline import (
    GenerationRequest,
    GenerationResult,
    Pipeline,
    worker_devices,
)
from chaid.engine.repeats import RepeatStore, repeat_key, settings_of
from chaid.models import ModelParts
from chaid.models.shapes_vocab import Understanding
from chaid.models.weights import hash_weights_file
from chaid.modes import CacheMode, Outcome, decide, needs_lookup
from chaid.store.analysis import Analyzer
from chaid.store.cache import InsertResult, LatentCache
from chaid.store.errors import CorruptEntryError, EntryNotFoundError, StoreError
from chaid.store.matching import LookupResult
from chaid.store.shared import SharedTier

log = logging.getLogger(__name__)

def model_fingerprint(parts: ModelParts, weights: str | None) -> str:
    """Names the latent space of a model: cached latents are only reused by the same one.

    The preset name, its text encoder and VAE, and a digest of the DiT weights file (the
    whole file: any retraining changes the latents), or of the DiT config when the weights
    are a seeded initialisation.
    """
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{parts.spec.name}|{parts.text_encoder.name}|{type(parts.vae).__name__}|"
                  .encode())
    if weights is None:
        digest.update(f"init-seed-0|{parts.dit.cfg!r}".encode())
    else:
        hash_weights_file(digest, weights)
    return f"{parts.spec.name}-{digest.hexdigest()}"


@dataclass
class ChaiOutcome:
    """What one generation did, beside its video."""

    result: GenerationResult
    outcome: Outcome
    request: GenerationRequest  # resolved: every size filled in
    lookup: LookupResult | None = None
    inserted: InsertResult | None = None
    # Why a miss's latents were not cached (the store could not write them); the video is
    # returned all the same.
    not_cached: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # What the model could use of the prompt (None: a model without a vocabulary).
    understood: Understanding | None = None

    def matched(self) -> dict[str, Any] | None:
        """The matched entry and entity pairs with their cosines (None unless a hit)."""
        lk = self.lookup
        if self.outcome is not Outcome.HIT or lk is None:
            return None
        return {
            "entry_id": lk.entry_id,
            "prompt": lk.cached_prompt,
            "score": round(lk.score, 4),
            "entities": [
                {"query": m.query_entity, "cached": m.cached_entity, "cosine": round(m.cosine, 4)}
                for m in lk.matches
            ],
        }


@dataclass
class Planned:
    """A request whose run is decided (:meth:`ChaiEngine.plan`) but not yet made."""

    request: GenerationRequest  # as asked, resolved
    mode: CacheMode
    outcome: Outcome
    run: GenerationRequest  # the request set up for its run (Pipeline.for_run)
    lookup: LookupResult | None
    understood: Understanding | None
    timings: dict[str, float]


def lookup_as_dict(lk: LookupResult) -> dict[str, Any]:
    """A lookup result for the wire (plain types, rounded scores)."""
    return {
        "hit": lk.hit,
        "entry_id": lk.entry_id,
        "cached_prompt": lk.cached_prompt,
        "score": round(lk.score, 4),
        "prompt_cosine": None if lk.prompt_cosine is None else round(lk.prompt_cosine, 4),
        "entities": list(lk.entities),
        "matches": [
            {"query": m.query_entity, "cached": m.cached_entity, "cosine": round(m.cosine, 4)}
            for m in lk.matches
        ],
        "candidates": lk.candidates,
        "threshold": lk.threshold,
        "timings_ms": {k: round(v, 2) for k, v in lk.timings_ms.items()},
    }


def _on_device(settings: Settings, device: str) -> Settings:
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model,
                                                                   device=device))


class ChaiEngine:
    """A warm pipeline plus the latent store; see the module docstring for the modes."""

    def __init__(self, pipeline: Pipeline, store: LatentCache, fingerprint: str,
                 default_steps: int = 30) -> None:
        self.pipeline = pipeline
        self.store = store
        self.fingerprint = fingerprint
        self.default_steps = default_steps
        self.store_write_failures = 0  # misses whose latents the store could not write
        # The fleet's shared tier (store.shared_url), or None; the first engine owns it.
        self.shared: SharedTier | None = None
        # Final latents of served requests, for exact repeats (None: off).
        self.repeats: RepeatStore | None = None

    @classmethod
    def load(cls, settings: Settings) -> ChaiEngine:
        """Open the store (consistency check and index rebuild happen in its open), then the
        models. Raises ChaidError subclasses (store, weights, config)."""
        analyzer = Analyzer.from_settings(settings.store)
        store = LatentCache.open(settings.store, analyzer=analyzer)
        try:
            pipeline = Pipeline.from_settings(settings)
            spec = pipeline.parts.spec
            weights = settings.model.weights
            if weights is None and spec.dit_weights is not None and spec.dit_weights.is_file():
                weights = spec.dit_weights
            fingerprint = model_fingerprint(pipeline.parts, None if weights is None
                                            else str(weights))
        except BaseException:
            store.close()
            raise
        log.info("model %s on %s, fingerprint %s, %d cached entries", spec.name,
                 pipeline.device, fingerprint, len(store))
        engine = cls(pipeline, store, fingerprint, settings.sampler.steps)
        if settings.store.shared_url:
            engine.shared = SharedTier(settings.store.shared_url, store,
                                       namespace=settings.store.shared_namespace,
                                       cluster=settings.store.shared_cluster,
                                       budget_bytes=settings.store.shared_budget_bytes
                                       ).start()
        if settings.store.repeat_bytes:
            engine.repeats = RepeatStore(settings.store.repeat_bytes, engine.shared)
        return engine

    @classmethod
    def load_workers(cls, settings: Settings) -> list[ChaiEngine]:
        """One engine per worker device (:func:`worker_devices`): the first opens the store
        and loads the model, each other one loads its own replica of the model and shares
        the store and the fingerprint."""
        devices = worker_devices(settings)
        first = cls.load(_on_device(settings, devices[0]))
        engines = [first]
        try:
            for device in devices[1:]:
                engines.append(first.replica(_on_device(settings, device)))
        except BaseException:
            first.close()
            raise
        if len(engines) > 1:
            log.info("%d workers: %s", len(engines),
                     ", ".join(str(e.pipeline.device) for e in engines))
        return engines

    def replica(self, settings: Settings) -> ChaiEngine:
        """Another engine for ``settings.model.device``: its own model, this one's store."""
        replica = ChaiEngine(Pipeline.from_settings(settings), self.store, self.fingerprint,
                             self.default_steps)
        replica.shared, replica.repeats = self.shared, self.repeats
        return replica

    def close(self) -> None:
        if self.shared is not None:
            self.shared.stop()
        self.store.close()

    # -- requests ---------------------------------------------------------------------------

    def resolve(self, prompt: str, *, frames: int | None = None, height: int | None = None,
                width: int | None = None, seed: int = 0,
                cfg_scale: float | str | None = MODEL_CFG_SCALE,
                steps: int | None = None) -> GenerationRequest:
        """A validated request with the preset's defaults filled in; InputError if invalid
        (e.g. a size the VAE cannot encode)."""
        return self.pipeline.resolve(GenerationRequest(
            prompt, frames=frames, height=height, width=width, seed=seed,
            cfg_scale=cfg_scale, steps=steps or self.default_steps))

    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        return tuple(self.pipeline.parts.vae.latent_shape(request.frames, request.height,
                                                          request.width))

    def lookup(self, request: GenerationRequest, touch: bool = True) -> LookupResult:
        """Which cached entry would serve this request, and why (CPU only)."""
        return self.store.lookup(request.prompt, self.fingerprint, self.latent_shape(request),
                                 touch=touch)

    def find_repeat(self, request: GenerationRequest, mode: CacheMode) -> torch.Tensor | None:
        """The final latent of an identical request served before (here or, with a shared
        tier, by any daemon), or None; ``refresh`` always runs."""
        if self.repeats is None or CacheMode(mode) is CacheMode.REFRESH:
            return None
        return self.repeats.get(self._repeat_key(request, mode), self.latent_shape(request))

    def _repeat_key(self, request: GenerationRequest, mode: CacheMode) -> str:
        return repeat_key(request, CacheMode(mode), self.fingerprint,
                          settings_of(self.pipeline))

    def lookup_or_miss(self, request: GenerationRequest) -> LookupResult | None:
        """:meth:`lookup` for a generate: a store that cannot be read makes it a miss
        (logged) rather than a failed request."""
        try:
            return self.lookup(request)
        except StoreError as exc:
            log.error("cache lookup failed (%s); running a miss", exc)
            return None

    def look_up(self, request: GenerationRequest, mode: CacheMode,
                timings: dict[str, float] | None = None,
                ) -> tuple[LookupResult | None, torch.Tensor | None]:
        """What a generate needs to know first (CPU only): the final latent of an exact
        repeat (:meth:`find_repeat`), else the cache lookup when ``mode`` makes one
        (:meth:`lookup_or_miss`); (lookup, repeat), either or both None. ``timings``, when
        given, receives ``repeat_ms`` (the repeat probe) and, when a lookup ran,
        ``lookup_ms``."""
        t0 = time.perf_counter()
        repeat = self.find_repeat(request, mode)
        t1 = time.perf_counter()
        if timings is not None:
            timings["repeat_ms"] = (t1 - t0) * 1e3
        if repeat is not None or not needs_lookup(mode):
            return None, repeat
        lookup = self.lookup_or_miss(request)
        if timings is not None:
            timings["lookup_ms"] = (time.perf_counter() - t1) * 1e3
        return lookup, None

    def generate(
        self,
        request: GenerationRequest,
        mode: CacheMode,
        lookup: LookupResult | None = None,
        on_step: Callable[[int, float, torch.Tensor], None] | None = None,
        repeat: torch.Tensor | None = None,
    ) -> ChaiOutcome:
        """Run one resolved request on the device.

        ``mode``: AUTO with a ``lookup`` already made (hit → fast, miss → full), REFRESH
        (full) or OFF (plain, ``request.steps`` steps). Whatever ``on_step`` raises stops
        the run and propagates; nothing is written to the cache then. Writing a miss's
        latents is left to :meth:`insert` so the device is free meanwhile. ``repeat`` (from
        :meth:`find_repeat`) replays an identical request's final latent instead.
        """
        if repeat is not None:
            return self.replay(request, repeat)
        planned = self.plan(request, mode, lookup)
        return self.complete(planned, self.pipeline.generate(planned.run, on_step))

    def replay(self, request: GenerationRequest, repeat: torch.Tensor) -> ChaiOutcome:
        """The outcome of an exact repeat: the stored final latent decoded."""
        return ChaiOutcome(self.pipeline.replay(request, repeat), Outcome.REPEAT, request,
                           understood=self.pipeline.understand(request.prompt))

    def plan(self, request: GenerationRequest, mode: CacheMode,
             lookup: LookupResult | None = None) -> Planned:
        """Which run ``request`` gets (:meth:`generate`'s rule), with a hit's cached latents
        read; nothing runs on the device. An entry evicted or damaged since the lookup
        makes the request a miss (a damaged one is quarantined, never served)."""
        understood = self.pipeline.understand(request.prompt)
        timings: dict[str, float] = {}
        outcome = decide(mode, lookup is not None and lookup.hit)
        cached = None
        if outcome is Outcome.HIT and self.pipeline.hit_attends:
            t0 = time.perf_counter()
            try:
                stored = self.store.get_latents(lookup.entry_id)
                cached = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in
                          stored.items()}
            except EntryNotFoundError:  # evicted since the lookup: run as a miss
                log.info("entry %s was evicted after the lookup; running a miss",
                         lookup.entry_id)
                outcome = Outcome.MISS
            except CorruptEntryError as exc:  # never served: quarantined, run as a miss
                self.store.quarantine(exc.entry_id, exc.problem)
                outcome = Outcome.MISS
            timings["read_ms"] = (time.perf_counter() - t0) * 1e3
        if understood is not None and not understood.drawable:
            log.warning("%s cannot draw anything %r names (unknown: %s)",
                        self.pipeline.parts.spec.name, request.prompt[:80],
                        ", ".join(understood.unknown[:8]) or "-")
        return Planned(request, CacheMode(mode), outcome,
                       self.pipeline.for_run(request, outcome.run, cached), lookup,
                       understood, timings)

    def complete(self, planned: Planned, result: GenerationResult) -> ChaiOutcome:
        """The outcome of a planned request's finished run (its final latent kept for
        exact repeats)."""
        if self.repeats is not None:
            self.repeats.put(self._repeat_key(planned.request, planned.mode), result.latent)
        return ChaiOutcome(result, planned.outcome, planned.run, planned.lookup,
                           timings_ms=planned.timings, understood=planned.understood)

    def insert(self, outcome: ChaiOutcome, owner_uid: int | None = None
               ) -> InsertResult | None:
        """Write a miss's captured latents to the cache (no-op for hits and plain runs);
        ``owner_uid``, the uid that asked, is kept in the entry (``server.share_prompts``)."""
        if not outcome.outcome.writes_cache or not outcome.result.captured:
            return None
        req = outcome.request
        understood = outcome.understood
        if understood is not None and not understood.drawable \
                and not self.pipeline.chai.cache_undrawable:
            outcome.not_cached = (f"{self.pipeline.parts.spec.name} cannot draw anything this "
                                  f"prompt names, so its video is not cached "
                                  f"(chai.cache_undrawable)")
            return None
        t0 = time.perf_counter()
        try:
            inserted = self.store.insert(
                req.prompt, outcome.result.captured, self.fingerprint,
                extra={"frames": req.frames, "height": req.height, "width": req.width,
                       "seed": req.seed, "steps": outcome.result.steps,
                       "owner_uid": owner_uid},
            )
        except StoreError as exc:  # a full disk, a damaged page: the video still goes back
            log.error("the latents of %r were not cached: %s", req.prompt[:80], exc)
            outcome.not_cached = str(exc)
            self.store_write_failures += 1
            return None
        outcome.inserted = inserted
        outcome.timings_ms["insert_ms"] = (time.perf_counter() - t0) * 1e3
        if self.shared is not None:
            self.shared.publish(inserted.entry_id)  # in the background: never waited on
        return inserted
