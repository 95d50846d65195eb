"""The cache facade: LMDB store + entity index + policy engine + lookup.

Usage from the engine (each call synchronous; from trio wrap it in
``trio.to_thread.run_sync``)::

    cache = LatentCache.open(settings, analyzer=Analyzer.from_settings(settings))
    result = cache.lookup(prompt, fingerprint, latent_shape)       # explainable
    if result.hit:
        latents = cache.get_latents(result.entry_id)                # {step: ndarray}
    else:
        cache.insert(prompt, {2: z2, 3: z3, 4: z4}, fingerprint)    # evicts under budget
    cache.close()

Thread-safety: every public method may be called from several threads at once. Writes are
serialised (LMDB allows one writer); lookups and reads run concurrently with them and with
the background index rebuild.

Namespaces: an entry records the model fingerprint and latent shape it was made with, and a
lookup only considers entries of the caller's fingerprint and shape, so entries of several
models share one store without ever being reused across them. Vectors of another embedder
are a different matter: the store records its embedder and refuses to open with another.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chaid.store import db as dbm
from chaid.store.analysis import Analyzer, PromptAnalysis
from chaid.store.db import EntryRecord, LatentDB
from chaid.store.errors import EntryNotFoundError, StoreError
from chaid.store.index import MANIFEST_NAME, EntityIndex, IndexCorrupt, Neighbor
from chaid.store.matching import EntityMatch, LookupResult, collect_candidates, pick_winner
from chaid.store.policy import EntryStats, PolicyEngine
from chaid.store.settings import StoreSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InsertResult:
    entry_id: int
    bytes: int
    evicted: list[int]


@dataclass
class CheckReport:
    """Outcome of :meth:`LatentCache.check`: an empty ``problems`` list means consistent."""

    entries: int = 0
    total_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def as_numpy(latent: Any) -> np.ndarray:
    """A latent as a C-ordered numpy array; accepts numpy arrays and torch tensors (any
    device, bfloat16 included) without importing torch."""
    if isinstance(latent, np.ndarray):
        return np.ascontiguousarray(latent)
    if hasattr(latent, "detach"):  # a torch tensor
        t = latent.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return np.ascontiguousarray(t.numpy())
    raise StoreError(f"a latent must be a numpy array or a torch tensor, not {type(latent)}")


def quantise_int8(x: np.ndarray) -> np.ndarray:
    """A latent as packed int8 bytes (uint8 view): fp32 scales, then the int8 values.

    Symmetric quantisation with one scale per slice of the two leading axes (a latent
    (C, T, H, W) gets one per channel and frame): latents vary far more across channels
    than within one frame of one channel. Every value is within half a step of its scale.
    """
    x = np.asarray(x, np.float32)
    if x.ndim < 3:
        raise StoreError(f"int8 storage needs latents of 3 or more axes, not {x.shape}")
    axes = tuple(range(2, x.ndim))
    scale = np.maximum(np.abs(x).max(axis=axes, keepdims=True), 1e-8) / 127.0
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return np.concatenate([scale.astype(np.float32).ravel().view(np.uint8),
                           q.ravel().view(np.uint8)])


def dequantise_int8(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 latent of :func:`quantise_int8`'s bytes."""
    n_scales = shape[0] * shape[1]
    expected = 4 * n_scales + int(np.prod(shape))
    if len(raw) != expected:
        raise StoreError(f"int8 latent of shape {list(shape)} has {len(raw)} bytes,"
                         f" not {expected}")
    scale = np.frombuffer(raw, np.float32, count=n_scales).reshape(
        shape[:2] + (1,) * (len(shape) - 2))
    q = np.frombuffer(raw, np.int8, offset=4 * n_scales).reshape(shape)
    return q.astype(np.float32) * scale


def _checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class LatentCache:
    """The persistent cross-inference latent cache of one data directory."""

    def __init__(
        self,
        settings: StoreSettings,
        *,
        embedder: tuple[str, int] | None,
        analyzer: Analyzer | None = None,
        clock: Callable[[], float] = time.time,
        background_rebuild: bool = True,
    ) -> None:
        self.settings = settings.validate()
        self.analyzer = analyzer
        self.clock = clock
        self.background_rebuild = background_rebuild
        self.data_dir = Path(settings.data_dir)
        self.db = LatentDB(
            self.data_dir,
            map_bytes=settings.map_bytes,
            max_map_bytes=settings.max_map_bytes,
            durable=settings.durable,
            embedder=embedder,
        )
        # None: an existing store's own embedder (offline tools, which never embed).
        self.dim = embedder[1] if embedder else self.db.read_meta()["dim"]
        self.policy = PolicyEngine(settings.policy, settings.budget_bytes)
        self.index = EntityIndex(self.data_dir, self.dim, settings.index_trees, settings.search_k)
        self._write_lock = threading.Lock()  # plan + write + apply of one write, atomically
        self._rebuild_lock = threading.Lock()
        self._rebuild_thread: threading.Thread | None = None
        self._prompt_vectors: dict[int, np.ndarray] | None = None
        self._prompt_matrix: tuple[np.ndarray, np.ndarray] | None = None
        self._closed = False
        try:
            self._load_catalog()
            self._open_index()
        except BaseException:
            self.db.close()
            raise

    @classmethod
    def open(cls, settings: StoreSettings, analyzer: Analyzer | None = None,
             **kwargs: Any) -> LatentCache:
        """Open (or create) the cache; the analyzer's embedder names the vector space."""
        if analyzer is None:
            analyzer = Analyzer.from_settings(settings)
        emb = analyzer.embedder
        return cls(settings, embedder=(emb.name, emb.dim), analyzer=analyzer, **kwargs)

    @classmethod
    def open_existing(cls, settings: StoreSettings, **kwargs: Any) -> LatentCache:
        """Open an existing store read-write without loading any model (for offline tools
        that evict, check or compact: they never embed)."""
        if not dbm.dir_has_store(Path(settings.data_dir)):
            raise StoreError(f"no store at {settings.data_dir}")
        return cls(settings, embedder=None, **kwargs)

    # -- opening ----------------------------------------------------------------------------

    def _load_catalog(self) -> None:
        with self.db.read() as txn:
            self.policy.load(self._stats_of(r) for r in self.db.iter_records(txn))
            stored_total = self.db.get_meta(txn, "total_bytes")
        if stored_total != self.policy.total_bytes:
            # Cannot happen with atomic commits; repair rather than refuse to start.
            log.warning("total_bytes %s disagrees with the entries (%s); repairing",
                        stored_total, self.policy.total_bytes)
            self.db.write(lambda txn: self.db.put_meta(txn, "total_bytes",
                                                       self.policy.total_bytes))

    def _open_index(self) -> None:
        """Load the index files and reconcile them with LMDB, or rebuild them."""
        try:
            self.index.load()
        except IndexCorrupt as exc:
            if (self.data_dir / MANIFEST_NAME).exists() or len(self.policy):
                log.warning("entity index unusable (%s); rebuilding from LMDB", exc)
            self.rebuild_index()
            return
        built = set(int(i) for i in self.index.built_item_ids())
        live: dict[int, int] = {}
        missing: list[tuple[int, int, int, np.ndarray]] = []
        with self.db.read() as txn:
            for key, value in txn.cursor(db=self.db.vectors):
                item_id = dbm.key_id(key)
                entry_id = dbm.key_id(value[:8])
                live[item_id] = entry_id
                if item_id not in built:
                    missing.append((item_id, *dbm.parse_vector(value)))
        self.index.reconcile(live, missing)
        if self.index.delta_size >= self.settings.rebuild_every:
            self._maybe_rebuild()

    @staticmethod
    def _stats_of(r: EntryRecord) -> EntryStats:
        return EntryStats(r.entry_id, (r.fingerprint, tuple(r.shape)), r.created,
                          r.last_access, r.hits, r.benefit, r.bytes)

    # -- writes -----------------------------------------------------------------------------

    def insert(
        self,
        prompt: str | PromptAnalysis,
        latents: Mapping[int, Any],
        fingerprint: str,
        *,
        extra: dict[str, Any] | None = None,
    ) -> InsertResult:
        """Cache the latents of a full run, evicting under the budget first.

        ``latents`` maps a denoising step (1-based) to the latent fed to the model at that
        step; all must share one shape. They are stored in ``settings.latent_dtype``. On
        return the entry is committed, the budget holds, and the entry is searchable.
        Raises EntryTooLargeError when the entry alone exceeds the budget, StoreFullError
        when the disk or the map ceiling is reached (nothing is written in either case).
        """
        analysis = self._analysis(prompt)
        shape, arrays = self._prepare_latents(latents)
        vecs = np.ascontiguousarray(analysis.entity_vectors, np.float32)
        pvec = np.ascontiguousarray(analysis.prompt_vector, np.float32)
        size = sum(a.nbytes for a in arrays.values()) + vecs.nbytes + pvec.nbytes
        blobs = {step: a.tobytes() for step, a in arrays.items()}
        with self._write_lock:
            victims = self.policy.plan(size)
            dirty = self.policy.take_dirty()
            now = self.clock()

            def body(txn) -> tuple[EntryRecord, list[int]]:
                removed, freed = self._delete_in(txn, victims)
                self._save_stats_in(txn, dirty)
                entry_id = self.db.get_meta(txn, "next_entry")
                first_item = self.db.get_meta(txn, "next_item")
                item_ids = list(range(first_item, first_item + len(analysis.entities)))
                record = EntryRecord(
                    entry_id=entry_id, prompt=analysis.prompt,
                    entities=list(analysis.entities), item_ids=item_ids,
                    fingerprint=fingerprint, shape=shape, dtype=self.settings.latent_dtype,
                    steps=sorted(blobs), checksums={str(s): _checksum(b) for s, b in
                                                    blobs.items()},
                    created=now, last_access=now, bytes=size, extra=extra or {},
                )
                for step, blob in blobs.items():
                    txn.put(dbm.latent_key(entry_id, step), blob, db=self.db.latents)
                for pos, (item, vec) in enumerate(zip(item_ids, vecs, strict=True)):
                    txn.put(dbm.id_key(item), dbm.vector_value(entry_id, pos, vec),
                            db=self.db.vectors)
                txn.put(dbm.id_key(entry_id), pvec.tobytes(), db=self.db.prompts)
                txn.put(dbm.id_key(entry_id), record.encode(), db=self.db.entries)
                total = self.db.get_meta(txn, "total_bytes") - freed + size
                if total > self.settings.budget_bytes:  # the plan was wrong: write nothing
                    raise StoreError(f"internal: write would leave {total} bytes over budget")
                self.db.put_meta(txn, "total_bytes", total)
                self.db.put_meta(txn, "next_entry", entry_id + 1)
                self.db.put_meta(txn, "next_item", first_item + len(item_ids))
                return record, removed

            try:
                record, removed = self.db.write(body)
            except BaseException:
                self.policy.restore_dirty(s.entry_id for s in dirty)
                raise
            # The commit is done: now the memory copies follow it.
            self._forget(removed)
            self.policy.admit(self._stats_of(record))
            self.index.add(record.item_ids, record.entry_id, vecs)
            if self._prompt_vectors is not None:
                self._prompt_vectors[record.entry_id] = pvec
                self._prompt_matrix = None
        if self.index.delta_size >= self.settings.rebuild_every:
            self._maybe_rebuild()
        return InsertResult(record.entry_id, size, removed)

    def evict(self, entry_ids: Sequence[int]) -> list[int]:
        """Remove entries (latents, vectors and record in one transaction); return those
        that existed."""
        with self._write_lock:
            dirty = self.policy.take_dirty()

            def body(txn) -> list[int]:
                removed, freed = self._delete_in(txn, entry_ids)
                self._save_stats_in(txn, dirty)
                total = self.db.get_meta(txn, "total_bytes")
                self.db.put_meta(txn, "total_bytes", total - freed)
                return removed

            try:
                removed = self.db.write(body)
            except BaseException:
                self.policy.restore_dirty(s.entry_id for s in dirty)
                raise
            self._forget(removed)
        return removed

    def clear(self) -> list[int]:
        """Evict every entry."""
        return self.evict(list(self.policy.catalog))

    def flush(self) -> None:
        """Write the access statistics recorded by lookups since the last write."""
        with self._write_lock:
            dirty = self.policy.take_dirty()
            if not dirty:
                return
            try:
                self.db.write(lambda txn: self._save_stats_in(txn, dirty))
            except BaseException:
                self.policy.restore_dirty(s.entry_id for s in dirty)
                raise

    def _delete_in(self, txn, entry_ids: Sequence[int]) -> tuple[list[int], int]:
        removed: list[int] = []
        freed = 0
        for entry_id in entry_ids:
            record = self.db.get_record(txn, entry_id)
            if record is None:
                continue
            self.db.delete_entry(txn, record)
            removed.append(entry_id)
            freed += record.bytes
        return removed, freed

    def _save_stats_in(self, txn, dirty: list[EntryStats]) -> None:
        for stats in dirty:
            record = self.db.get_record(txn, stats.entry_id)
            if record is None:
                continue
            record.last_access, record.hits, record.benefit = (
                stats.last_access, stats.hits, stats.benefit)
            txn.put(dbm.id_key(stats.entry_id), record.encode(), db=self.db.entries)

    def _forget(self, removed: list[int]) -> None:
        if not removed:
            return
        self.policy.remove(removed)
        self.index.remove_entries(removed)
        if self._prompt_vectors is not None:
            for entry_id in removed:
                self._prompt_vectors.pop(entry_id, None)
            self._prompt_matrix = None

    def _prepare_latents(self, latents: Mapping[int, Any]
                         ) -> tuple[list[int], dict[int, np.ndarray]]:
        """The latents' common shape and their stored form (``settings.latent_dtype``; int8
        latents are packed bytes, see :func:`quantise_int8`)."""
        if not latents:
            raise StoreError("an entry needs at least one latent")
        raw = {int(step): as_numpy(x) for step, x in latents.items()}
        shapes = {a.shape for a in raw.values()}
        if len(shapes) != 1:
            raise StoreError(f"the latents of one entry must share one shape, not {shapes}")
        if any(step < 0 for step in raw):
            raise StoreError("latent steps must be non-negative integers")
        if self.settings.latent_dtype == "int8":
            arrays = {s: quantise_int8(a) for s, a in raw.items()}
        else:
            dtype = np.dtype(self.settings.latent_dtype)
            arrays = {s: np.ascontiguousarray(a.astype(dtype, copy=False))
                      for s, a in raw.items()}
        return list(shapes.pop()), arrays

    # -- reads ------------------------------------------------------------------------------

    def lookup(
        self,
        prompt: str | PromptAnalysis,
        fingerprint: str,
        latent_shape: Sequence[int],
        *,
        matching: str = "entity",
        touch: bool = True,
        benefit: float | None = None,
    ) -> LookupResult:
        """Find the cached entry that best serves ``prompt`` (see :mod:`chaid.store.matching`).

        Only entries with the same fingerprint and latent shape are eligible. ``touch``
        records a hit for the eviction policy (a dry run passes False); ``benefit`` is the
        work the hit saves, for LCBFU (default: the match score).
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        # Entity matching needs the prompt's own vector only to break a tie: computed then,
        # unless the model runs for a new entity anyway.
        analysis = self._analysis(prompt, with_prompt_vector=matching != "entity",
                                  timings=timings)
        t1 = time.perf_counter()
        namespace = (fingerprint, tuple(int(n) for n in latent_shape))
        if matching == "entity":
            result = self._lookup_entities(analysis, namespace, timings)
        elif matching == "prompt":
            result = self._lookup_prompt(analysis, namespace)
        else:
            raise StoreError(f"matching must be 'entity' or 'prompt', not {matching!r}")
        t2 = time.perf_counter()
        timings.update(analyse=(t1 - t0) * 1e3, search=(t2 - t1) * 1e3, total=(t2 - t0) * 1e3)
        result.timings_ms = timings
        if result.hit and touch:
            self.policy.touch(result.entry_id, self.clock(),
                              result.score if benefit is None else benefit)
        return result

    def _lookup_entities(self, analysis: PromptAnalysis, namespace: tuple,
                         timings: dict[str, float]) -> LookupResult:
        threshold = self.settings.entity_threshold
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

    def _lookup_prompt(self, analysis: PromptAnalysis, namespace: tuple) -> LookupResult:
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

    def get_latents(self, entry_id: int) -> dict[int, np.ndarray]:
        """The stored latents of an entry, ``{step: array}`` in the stored dtype (copies);
        int8 entries are read back as float32."""
        with self.db.read() as txn:
            record = self.db.get_record(txn, entry_id)
            if record is None:
                raise EntryNotFoundError(f"no cache entry {entry_id}")
            out = {}
            for step in record.steps:
                raw = txn.get(dbm.latent_key(entry_id, step), db=self.db.latents)
                if raw is None:
                    raise StoreError(f"entry {entry_id} lacks its latent of step {step}")
                if record.dtype == "int8":
                    out[step] = dequantise_int8(raw, tuple(record.shape))
                else:
                    out[step] = np.frombuffer(raw, np.dtype(record.dtype)).reshape(
                        record.shape).copy()
            return out

    def get_record(self, entry_id: int) -> EntryRecord:
        with self.db.read() as txn:
            record = self.db.get_record(txn, entry_id)
        if record is None:
            raise EntryNotFoundError(f"no cache entry {entry_id}")
        return record

    def records(self) -> Iterator[EntryRecord]:
        with self.db.read() as txn:
            yield from self.db.iter_records(txn)

    def __len__(self) -> int:
        return len(self.policy)

    @property
    def total_bytes(self) -> int:
        return self.policy.total_bytes

    def stats(self) -> dict[str, Any]:
        meta = self.db.read_meta()
        return {
            "data_dir": str(self.data_dir),
            "entries": len(self.policy),
            "total_bytes": self.policy.total_bytes,
            "budget_bytes": self.settings.budget_bytes,
            "policy": self.settings.policy,
            "embedder": meta.get("embedder"),
            "schema_version": meta.get("schema_version"),
            "index": {"generation": self.index.generation, "built_items": self.index.built_size,
                      "delta_items": self.index.delta_size,
                      "tombstoned_entries": len(self.index.tombstones)},
            "lmdb": self.db.stat(),
        }

    def _analysis(self, prompt: str | PromptAnalysis, with_prompt_vector: bool = True,
                  timings: dict[str, float] | None = None) -> PromptAnalysis:
        if isinstance(prompt, PromptAnalysis):
            if with_prompt_vector and prompt.prompt_vector is None:
                if self.analyzer is None:
                    raise StoreError("this analysis lacks its prompt vector")
                return PromptAnalysis(prompt.prompt, prompt.entities, prompt.entity_vectors,
                                      self.analyzer.prompt_vector(prompt.prompt))
            return prompt
        if self.analyzer is None:
            raise StoreError("this cache has no analyzer: pass a PromptAnalysis")
        return self.analyzer.analyse(prompt, with_prompt_vector, timings)

    # -- index maintenance ------------------------------------------------------------------

    def rebuild_index(self) -> None:
        """Rebuild the Annoy index from LMDB now, in this thread."""
        with self._rebuild_lock:
            with self.db.read() as txn:
                next_item = self.db.get_meta(txn, "next_item")
                rows = [
                    (dbm.key_id(k), *dbm.parse_vector(v))
                    for k, v in txn.cursor(db=self.db.vectors)
                ]
            self.index.build(rows, next_item)

    def _maybe_rebuild(self) -> None:
        """Start a background rebuild unless one is running (or run it inline when
        background rebuilds are off)."""
        if not self.background_rebuild:
            self.rebuild_index()
            return
        if self._rebuild_thread is not None and self._rebuild_thread.is_alive():
            return
        if self._closed:
            return

        def run() -> None:
            try:
                self.rebuild_index()
            except Exception:  # the delta keeps serving; the next trigger retries
                log.exception("background index rebuild failed")

        self._rebuild_thread = threading.Thread(target=run, name="chaid-index-rebuild",
                                                daemon=True)
        self._rebuild_thread.start()

    def wait_for_rebuild(self) -> None:
        thread = self._rebuild_thread
        if thread is not None:
            thread.join()

    # -- consistency ------------------------------------------------------------------------

    def check(self, repair: bool = False, verify_latents: bool = True) -> CheckReport:
        """Verify that LMDB is self-consistent and that the index agrees with it.

        Checks: every record's latents exist with their checksums, its vectors and prompt
        vector exist and point back at it; no orphan latents, vectors or prompt vectors;
        the stored total equals the sum of entry sizes and is within the budget; the index
        returns exactly LMDB's items. ``repair`` deletes orphans, fixes the total and
        rebuilds the index (never deletes a consistent entry).
        """
        self.wait_for_rebuild()
        report = CheckReport()
        orphans: dict[str, list[bytes]] = {"latents": [], "vectors": [], "prompts": []}
        with self.db.read() as txn:
            ids: set[int] = set()
            items: set[int] = set()
            for record in self.db.iter_records(txn):
                ids.add(record.entry_id)
                items.update(record.item_ids)
                report.entries += 1
                report.total_bytes += record.bytes
                self._check_record(txn, record, report, verify_latents)
            for key in txn.cursor(db=self.db.latents).iternext(values=False):
                if int.from_bytes(key[:8], "big") not in ids:
                    orphans["latents"].append(key)
            for key, value in txn.cursor(db=self.db.vectors):
                if dbm.key_id(key) not in items or dbm.parse_vector(value)[0] not in ids:
                    orphans["vectors"].append(key)
            for key in txn.cursor(db=self.db.prompts).iternext(values=False):
                if dbm.key_id(key) not in ids:
                    orphans["prompts"].append(key)
            stored_total = self.db.get_meta(txn, "total_bytes")
        for name, keys in orphans.items():
            if keys:
                report.problems.append(f"{len(keys)} orphan {name} records")
        if stored_total != report.total_bytes:
            report.problems.append(f"stored total {stored_total} != sum {report.total_bytes}")
        if report.total_bytes > self.settings.budget_bytes:
            report.problems.append(f"{report.total_bytes} bytes exceed the budget "
                                   f"{self.settings.budget_bytes}")
        index_items = self.index.live_items()
        if index_items != items:
            report.problems.append(
                f"index disagrees with LMDB: {len(index_items - items)} stale items, "
                f"{len(items - index_items)} missing items")
        if repair and report.problems:
            self._repair(orphans, report)
        return report

    def _check_record(self, txn, record: EntryRecord, report: CheckReport,
                      verify_latents: bool) -> None:
        rid = record.entry_id
        for step in record.steps:
            raw = txn.get(dbm.latent_key(rid, step), db=self.db.latents)
            if raw is None:
                report.problems.append(f"entry {rid}: latent of step {step} missing")
            elif verify_latents and _checksum(raw) != record.checksums.get(str(step)):
                report.problems.append(f"entry {rid}: latent of step {step} checksum mismatch")
        for pos, item in enumerate(record.item_ids):
            raw = txn.get(dbm.id_key(item), db=self.db.vectors)
            if raw is None or dbm.parse_vector(raw)[:2] != (rid, pos):
                report.problems.append(f"entry {rid}: entity vector {item} missing or foreign")
        if txn.get(dbm.id_key(rid), db=self.db.prompts) is None:
            report.problems.append(f"entry {rid}: prompt vector missing")

    def _repair(self, orphans: dict[str, list[bytes]], report: CheckReport) -> None:
        dbs = {"latents": self.db.latents, "vectors": self.db.vectors,
               "prompts": self.db.prompts}

        def body(txn) -> None:
            for name, keys in orphans.items():
                for key in keys:
                    txn.delete(key, db=dbs[name])
            self.db.put_meta(txn, "total_bytes", report.total_bytes)

        with self._write_lock:
            self.db.write(body)
        self._load_catalog()
        self.rebuild_index()
        report.repaired.append("deleted orphans, recomputed the total, rebuilt the index")

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Finish a running rebuild, write pending access statistics, close LMDB."""
        if self._closed:
            return
        self._closed = True
        self.wait_for_rebuild()
        try:
            self.flush()
        finally:
            self.db.close()

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
