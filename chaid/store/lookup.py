"""Lookup: which cached entry serves a prompt, and why.

Two matchers over one store. ``entity`` (the daemon's): each entity of the new prompt asks
the Annoy index for its nearest cached entities; :mod:`chaid.store.matching` scores the
eligible entries and breaks ties by whole-prompt cosine. ``prompt`` (NIRVANA-style, for the
benchmark's comparison): the best whole-prompt cosine above ``store.prompt_threshold``.

A lookup only reads: LMDB in read transactions, the index, and the eviction policy's
catalog for eligibility. The prompt vectors of the ``prompt`` matcher are loaded on first
use and kept in step with writes by the facade (:meth:`Lookup.add_prompt_vector`,
:meth:`Lookup.forget`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np

from chaid.store import db as dbm
from chaid.store.analysis import Analyzer, PromptAnalysis
from chaid.store.db import LatentDB
from chaid.store.index import EntityIndex, Neighbor
from chaid.store.matching import EntityMatch, LookupResult, collect_candidates, pick_winner
from chaid.store.policy import PolicyEngine
from chaid.store.settings import StoreSettings

# An entry's namespace: (model fingerprint, latent shape). Only entries of the caller's
# namespace are eligible.
Namespace = tuple[str, tuple[int, ...]]


class Lookup:
    """The two matchers of one store (see the module docstring)."""

    def __init__(self, db: LatentDB, index: EntityIndex, policy: PolicyEngine,
                 settings: StoreSettings, analyzer: Analyzer | None, dim: int,
                 write_lock: threading.Lock) -> None:
        self.db = db
        self.index = index
        self.policy = policy
        self.settings = settings
        self.analyzer = analyzer
        self.dim = dim
        # The facade's write lock: the prompt vectors load from LMDB with no write half done,
        # so a concurrent insert cannot commit between the load and its own update.
        self._write_lock = write_lock
        self._prompt_vectors: dict[int, np.ndarray] | None = None
        self._prompt_matrix: tuple[np.ndarray, np.ndarray] | None = None

    # -- the matchers -----------------------------------------------------------------------

    def entities(self, analysis: PromptAnalysis, namespace: Namespace,
                 timings: dict[str, float]) -> LookupResult:
        threshold = self.settings.threshold
        result = LookupResult(hit=False, matching="entity", entities=analysis.entities,
                              threshold=threshold)
        neighbors: list[list[Neighbor]] = [
            self.index.search(v, self.settings.neighbors) for v in analysis.entity_vectors
        ]
        candidates = collect_candidates(
            ([(n.entry_id, n.entity_pos, n.cosine) for n in ns] for ns in neighbors),
            threshold,
            lambda e: self.policy.eligible(e, namespace),
        )
        result.candidates = len(candidates)
        t0 = time.perf_counter()
        while candidates:
            winner, prompt_cos = pick_winner(
                candidates, lambda ids: self._prompt_cosines(ids, analysis, timings))
            with self.db.read() as txn:
                record = self.db.get_record(txn, winner.entry_id)
            if record is None:  # evicted since the search: try the next best
                del candidates[winner.entry_id]
                continue
            result.hit = True
            result.entry_id = record.entry_id
            result.score = winner.score
            result.prompt_cosine = prompt_cos
            result.cached_prompt = record.prompt
            result.matches = [
                EntityMatch(analysis.entities[q], record.entities[c], cos)
                for q, (cos, c) in sorted(winner.best.items())
            ]
            break
        timings["pick"] = (time.perf_counter() - t0) * 1e3
        return result

    def prompt(self, analysis: PromptAnalysis, namespace: Namespace) -> LookupResult:
        threshold = self.settings.prompt_threshold
        result = LookupResult(hit=False, matching="prompt", entities=analysis.entities,
                              threshold=threshold)
        ids, matrix = self._prompt_index()
        if not len(ids):
            return result
        cos = matrix @ analysis.prompt_vector
        for pos in np.argsort(-cos):
            if cos[pos] < threshold:
                break
            entry_id = int(ids[pos])
            if not self.policy.eligible(entry_id, namespace):
                continue
            result.candidates += 1
            with self.db.read() as txn:
                record = self.db.get_record(txn, entry_id)
            if record is None:
                continue
            result.hit = True
            result.entry_id = entry_id
            result.score = result.prompt_cosine = float(cos[pos])
            result.cached_prompt = record.prompt
            break
        return result

    # -- prompt vectors ---------------------------------------------------------------------

    def add_prompt_vector(self, entry_id: int, vector: np.ndarray) -> None:
        """A committed entry's prompt vector (the caller holds the write lock)."""
        if self._prompt_vectors is not None:
            self._prompt_vectors[entry_id] = vector
            self._prompt_matrix = None

    def forget(self, entry_ids: Iterable[int]) -> None:
        """Entries removed by a committed write (the caller holds the write lock)."""
        if self._prompt_vectors is not None:
            for entry_id in entry_ids:
                self._prompt_vectors.pop(entry_id, None)
            self._prompt_matrix = None

    def _prompt_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Entry ids and prompt vectors of every entry, loaded on first use, then kept."""
        with self._write_lock:
            if self._prompt_vectors is None:
                with self.db.read() as txn:
                    self._prompt_vectors = {
                        dbm.key_id(k): np.frombuffer(v, np.float32).copy()
                        for k, v in txn.cursor(db=self.db.prompts)
                    }
            if self._prompt_matrix is None:
                ids = np.fromiter(self._prompt_vectors, np.int64, len(self._prompt_vectors))
                matrix = (np.stack(list(self._prompt_vectors.values())) if len(ids)
                          else np.zeros((0, self.dim), np.float32))
                self._prompt_matrix = (ids, matrix)
            return self._prompt_matrix

    def _prompt_cosines(self, entry_ids: list[int], analysis: PromptAnalysis,
                        timings: dict[str, float]) -> dict[int, float]:
        vector = analysis.prompt_vector
        if vector is None:
            if self.analyzer is None:
                return {}
            t0 = time.perf_counter()
            vector = self.analyzer.prompt_vector(analysis.prompt)
            timings["embed_prompt"] = (time.perf_counter() - t0) * 1e3
        out = {}
        with self.db.read() as txn:
            for entry_id in entry_ids:
                raw = txn.get(dbm.id_key(entry_id), db=self.db.prompts)
                if raw is not None:
                    out[entry_id] = float(np.frombuffer(raw, np.float32) @ vector)
        return out
