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

The facade owns the one write path (:meth:`LatentCache._commit`) and what must follow a
commit in memory; the parts it joins each do one thing: :mod:`~chaid.store.codec` (latent
bytes), :mod:`~chaid.store.lookup` (the matchers), :mod:`~chaid.store.maintenance` (the
derived index, consistency check and repair), :mod:`~chaid.store.db` (LMDB) and
:mod:`~chaid.store.policy` (the budget).

Thread-safety: every public method may be called from several threads at once. Writes are
serialised (LMDB allows one writer); lookups and reads run concurrently with them and with
the background index rebuild.

Namespaces: an entry records the model fingerprint and latent shape it was made with, and a
lookup only considers entries of the caller's fingerprint and shape, so entries of several
models share one store without ever being reused across them. Vectors of another embedder
are a different matter: the store records its embedder and refuses to open with another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

from chaid.store import db as dbm
from chaid.store.analysis import Analyzer, PromptAnalysis
from chaid.store.codec import checksum, decode_latent, encode_latents
from chaid.store.datafile import repair_hint
from chaid.store.db import REMOTE_KEY, SHARED_KEY, EntryRecord, LatentDB
from chaid.store.errors import (
    CorruptEntryError,
    EntryNotFoundError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
)
from chaid.store.index import EntityIndex
from chaid.store.integrity import check_trees, latent_problem
from chaid.store.lookup import Lookup
from chaid.store.maintenance import CheckReport, IndexMaintenance
from chaid.store.matching import LookupResult
from chaid.store.policy import EntryStats, PolicyEngine
from chaid.store.settings import StoreSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class InsertResult:
    entry_id: int
    bytes: int
    evicted: list[int]


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
        self.maintenance = IndexMaintenance(self.db, self.index, self.data_dir,
                                            settings.rebuild_every, background_rebuild)
        self.matchers = Lookup(self.db, self.index, self.policy, self.settings, analyzer,
                               self.dim, self._write_lock)
        self._closed = False
        self.quarantined = 0  # entries evicted since the open because their bytes were bad
        # Entries from the shared tier: its id → ours, and back.
        self._by_gid: dict[str, int] = {}
        self._gid_of: dict[int, str] = {}
        # Fetches a shared entry's latents ({step: bytes}) on its first hit; None (no shared
        # tier, or it cannot answer) makes the hit a miss. Set by the shared tier.
        self.fetch_remote: Callable[[EntryRecord], dict[int, bytes] | None] | None = None
        try:
            self._check_structure()
            self._load_catalog()
            self.maintenance.open(has_entries=len(self.policy) > 0)
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
        try:
            return cls(settings, embedder=(emb.name, emb.dim), analyzer=analyzer, **kwargs)
        except StoreMismatchError as exc:
            if not settings.reembed:
                raise StoreMismatchError(f"{exc}; or set store.reembed = true to re-embed "
                                         "its entries with this embedder") from None
            # Built with another embedder: its entries' text gives the vectors again.
            from chaid.store.reembed import reembed

            log.warning("%s; re-embedding its entries with %s", exc, emb.name)
            reembed(Path(settings.data_dir), emb, map_bytes=settings.map_bytes,
                    max_map_bytes=settings.max_map_bytes, durable=settings.durable)
            return cls(settings, embedder=(emb.name, emb.dim), analyzer=analyzer, **kwargs)

    @classmethod
    def open_existing(cls, settings: StoreSettings, **kwargs: Any) -> LatentCache:
        """Open an existing store read-write without loading any model (for offline tools
        that evict, check or compact: they never embed)."""
        if not dbm.dir_has_store(Path(settings.data_dir)):
            raise StoreError(f"no store at {settings.data_dir}")
        return cls(settings, embedder=None, **kwargs)

    def _check_structure(self) -> None:
        """Refuse a store whose trees are damaged, saying what is wrong and how to recover
        (a walk of every key; the latents' bytes are verified when read)."""
        check_trees(self.db)

    def _load_catalog(self) -> None:
        try:
            with self.db.read() as txn:
                records = list(self.db.iter_records(txn))
                stored_total = self.db.get_meta(txn, "total_bytes")
            self.policy.load(self._stats_of(r) for r in records)
            self._by_gid.clear()
            self._gid_of.clear()
            for record in records:
                self._remember_gid(record)
        except (lmdb.Error, ValueError, TypeError, KeyError) as exc:
            raise StoreCorruptError(f"the store at {self.data_dir} is damaged (an entry "
                                    f"record is unreadable: {exc!r}); "
                                    f"{repair_hint(self.data_dir)}") from exc
        if stored_total != self.policy.total_bytes:
            # Cannot happen with atomic commits; repair rather than refuse to start.
            log.warning("total_bytes %s disagrees with the entries (%s); repairing",
                        stored_total, self.policy.total_bytes)
            self.db.write(lambda txn: self.db.put_meta(txn, "total_bytes",
                                                       self.policy.total_bytes))

    @staticmethod
    def _stats_of(r: EntryRecord) -> EntryStats:
        return EntryStats(r.entry_id, (r.fingerprint, tuple(r.shape)), r.created,
                          r.last_access, r.hits, r.benefit, r.bytes)

    # -- the write path ---------------------------------------------------------------------

    def _commit(self, body: Callable[[Any], T]) -> T:
        """Run ``body(txn)`` in one write transaction, with the access statistics recorded
        by lookups since the last write saved in the same transaction.

        The caller holds the write lock. On any exception (cancellation included) nothing is
        written and those statistics stay pending for the next write.
        """
        dirty = self.policy.take_dirty()

        def run(txn) -> T:
            self._save_stats_in(txn, dirty)
            return body(txn)

        try:
            return self.db.write(run)
        except BaseException:
            self.policy.restore_dirty(s.entry_id for s in dirty)
            raise

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
        shape, arrays = encode_latents(latents, self.settings.latent_dtype)
        blobs = {step: a.tobytes() for step, a in arrays.items()}
        fields = {"prompt": analysis.prompt, "entities": list(analysis.entities),
                  "fingerprint": fingerprint, "shape": shape,
                  "dtype": self.settings.latent_dtype, "steps": sorted(blobs),
                  "checksums": {str(s): checksum(b) for s, b in blobs.items()},
                  "extra": extra or {}}
        return self._add(fields, blobs, analysis.entity_vectors, analysis.prompt_vector)

    def insert_remote(self, gid: str, fields: Mapping[str, Any], entity_vectors: Any,
                      prompt_vector: Any) -> InsertResult | None:
        """Add an entry another daemon published to the shared tier, by its record fields
        (prompt, entities, fingerprint, shape, dtype, steps, checksums, extra) and vectors.
        Its latents stay in the shared tier until its first hit fetches them
        (:attr:`fetch_remote`, see :meth:`get_latents`). None if ``gid`` is known here."""
        if gid in self._by_gid:
            return None
        fields = {k: fields[k] for k in ("prompt", "entities", "fingerprint", "shape",
                                         "dtype", "steps", "checksums")} | {
            "extra": {**dict(fields.get("extra") or {}), SHARED_KEY: gid, REMOTE_KEY: True}}
        if len(fields["entities"]) != len(entity_vectors):
            raise StoreError(f"shared entry {gid}: {len(fields['entities'])} entities, "
                             f"{len(entity_vectors)} vectors")
        return self._add(fields, {}, entity_vectors, prompt_vector)

    def _add(self, fields: dict[str, Any], blobs: Mapping[int, bytes], entity_vectors: Any,
             prompt_vector: Any) -> InsertResult:
        """Write one new entry (its latents ``blobs``, possibly none for a shared entry not
        fetched yet) under the budget; the one write path of new entries."""
        vecs = np.ascontiguousarray(entity_vectors, np.float32)
        pvec = np.ascontiguousarray(prompt_vector, np.float32)
        size = sum(len(b) for b in blobs.values()) + vecs.nbytes + pvec.nbytes
        with self._write_lock:
            victims = self.policy.plan(size)
            now = self.clock()

            def body(txn) -> tuple[EntryRecord, list[int]]:
                removed, freed = self._delete_in(txn, victims)
                entry_id = self.db.get_meta(txn, "next_entry")
                first_item = self.db.get_meta(txn, "next_item")
                item_ids = list(range(first_item, first_item + len(fields["entities"])))
                record = EntryRecord(entry_id=entry_id, item_ids=item_ids, created=now,
                                     last_access=now, bytes=size, **fields)
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

            record, removed = self._commit(body)
            # The commit is done: now the memory copies follow it.
            self._forget(removed)
            self.policy.admit(self._stats_of(record))
            self.index.add(record.item_ids, record.entry_id, vecs)
            self.matchers.add_prompt_vector(record.entry_id, pvec)
            self._remember_gid(record)
        self.maintenance.rebuild_if_due()
        return InsertResult(record.entry_id, size, removed)

    def _remember_gid(self, record: EntryRecord) -> None:
        gid = record.extra.get(SHARED_KEY)
        if gid is not None:
            self._by_gid[gid] = record.entry_id
            self._gid_of[record.entry_id] = gid

    def entry_for(self, gid: str) -> int | None:
        """The local id of the shared entry ``gid``, if it is here."""
        return self._by_gid.get(gid)

    def evict(self, entry_ids: Sequence[int]) -> list[int]:
        """Remove entries (latents, vectors and record in one transaction); return those
        that existed."""
        with self._write_lock:

            def body(txn) -> list[int]:
                removed, freed = self._delete_in(txn, entry_ids)
                total = self.db.get_meta(txn, "total_bytes")
                self.db.put_meta(txn, "total_bytes", total - freed)
                return removed

            removed = self._commit(body)
            self._forget(removed)
        return removed

    def clear(self) -> list[int]:
        """Evict every entry."""
        return self.evict(list(self.policy.catalog))

    def flush(self) -> None:
        """Write the access statistics recorded by lookups since the last write."""
        with self._write_lock:
            if self.policy.has_dirty():
                self._commit(lambda txn: None)

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
        for entry_id in removed:
            gid = self._gid_of.pop(entry_id, None)
            if gid is not None:
                self._by_gid.pop(gid, None)
        self.policy.remove(removed)
        self.index.remove_entries(removed)
        self.matchers.forget(removed)

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
        """Find the cached entry that best serves ``prompt`` (see :mod:`chaid.store.lookup`).

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
        if matching not in ("entity", "prompt"):
            raise StoreError(f"matching must be 'entity' or 'prompt', not {matching!r}")
        try:
            if matching == "entity":
                result = self.matchers.entities(analysis, namespace, timings)
            else:
                result = self.matchers.prompt(analysis, namespace)
        except lmdb.Error as exc:  # a page damaged since the open
            raise StoreError(f"the store could not be read: {exc}") from exc
        t2 = time.perf_counter()
        timings.update(analyse=(t1 - t0) * 1e3, search=(t2 - t1) * 1e3, total=(t2 - t0) * 1e3)
        result.timings_ms = timings
        if result.hit and touch:
            self.policy.touch(result.entry_id, self.clock(),
                              result.score if benefit is None else benefit)
        return result

    def get_latents(self, entry_id: int) -> dict[int, np.ndarray]:
        """The stored latents of an entry, ``{step: array}`` in the stored dtype (copies);
        int8 entries are read back as float32.

        Every latent's length, dtype and checksum are verified first: an entry that fails
        (or cannot be read) raises :class:`CorruptEntryError` and is never served; the
        caller quarantines it (:meth:`quarantine`).
        """
        try:
            record, raws = self._stored(entry_id)
        except (lmdb.Error, ValueError, TypeError) as exc:
            raise CorruptEntryError(entry_id, f"unreadable ({exc!r})") from exc
        if record.extra.get(REMOTE_KEY):
            raws = self._fetch(record)
        out = {}
        for step, raw in raws.items():
            if raw is None:
                raise CorruptEntryError(entry_id, f"latent of step {step} missing")
            problem = latent_problem(record, step, raw)
            if problem:
                raise CorruptEntryError(entry_id, problem)
            out[step] = decode_latent(raw, record.dtype, tuple(record.shape))
        return out

    def _fetch(self, record: EntryRecord) -> dict[int, bytes]:
        """A shared entry's latents from the shared tier, checked, and kept here from now on
        (under the budget) when the store can take them. EntryNotFoundError (the caller
        runs a miss) when the tier cannot give them: it is down, or the entry is gone there
        (then the entry goes here too); CorruptEntryError when they fail their checks."""
        fetched = self.fetch_remote(record) if self.fetch_remote is not None else None
        if fetched is None:
            raise EntryNotFoundError(f"the latents of shared entry {record.entry_id} "
                                     f"({record.extra.get(SHARED_KEY)}) are not available")
        raws = {step: fetched.get(step) for step in record.steps}
        for step, raw in raws.items():
            problem = "missing" if raw is None else latent_problem(record, step, raw)
            if problem:
                raise CorruptEntryError(record.entry_id,
                                        f"shared latent of step {step}: {problem}")
        try:
            self._keep_fetched(record, raws)
        except StoreError as exc:  # served all the same; fetched again next time
            log.warning("shared entry %d not kept locally: %s", record.entry_id, exc)
        return raws

    def _keep_fetched(self, record: EntryRecord, raws: dict[int, bytes]) -> None:
        size = sum(len(b) for b in raws.values())
        with self._write_lock:
            victims = self.policy.plan(size, protect=[record.entry_id])

            def body(txn) -> tuple[list[int], bool]:
                current = self.db.get_record(txn, record.entry_id)
                if current is None or not current.extra.get(REMOTE_KEY):
                    return [], False  # evicted, or fetched by another thread, meanwhile
                removed, freed = self._delete_in(txn, victims)
                for step, blob in raws.items():
                    txn.put(dbm.latent_key(record.entry_id, step), blob, db=self.db.latents)
                current.extra.pop(REMOTE_KEY)
                current.bytes += size
                txn.put(dbm.id_key(record.entry_id), current.encode(), db=self.db.entries)
                total = self.db.get_meta(txn, "total_bytes") - freed + size
                self.db.put_meta(txn, "total_bytes", total)
                return removed, True

            removed, kept = self._commit(body)
            self._forget(removed)
            if kept:
                self.policy.grow(record.entry_id, size)

    def _stored(self, entry_id: int) -> tuple[EntryRecord, dict[int, bytes | None]]:
        """An entry's record and its latents' stored bytes (None where missing), read in
        one transaction; EntryNotFoundError without a record."""
        with self.db.read() as txn:
            record = self.db.get_record(txn, entry_id)
            if record is None:
                raise EntryNotFoundError(f"no cache entry {entry_id}")
            raws = {step: txn.get(dbm.latent_key(entry_id, step), db=self.db.latents)
                    for step in record.steps}
        return record, raws

    def raw_latents(self, entry_id: int) -> tuple[EntryRecord, dict[int, bytes]]:
        """An entry's record and stored latent bytes, ``{step: bytes}``, unchecked (for
        publishing: the receiver checks them against the record). EntryNotFoundError if
        it has none here."""
        record, raws = self._stored(entry_id)
        if record.extra.get(REMOTE_KEY) or any(raw is None for raw in raws.values()):
            raise EntryNotFoundError(f"no local latents of cache entry {entry_id}")
        return record, {step: bytes(raw) for step, raw in raws.items()}

    def vectors_of(self, record: EntryRecord) -> tuple[np.ndarray, np.ndarray]:
        """An entry's entity vectors (n, dim) and prompt vector (dim,)."""
        with self.db.read() as txn:
            raws = [txn.get(dbm.id_key(item), db=self.db.vectors) for item in record.item_ids]
            pvec = txn.get(dbm.id_key(record.entry_id), db=self.db.prompts)
        if pvec is None or any(raw is None for raw in raws):
            raise EntryNotFoundError(f"cache entry {record.entry_id} was evicted")
        vecs = [dbm.parse_vector(raw)[2] for raw in raws]
        return (np.array(vecs, np.float32).reshape(len(vecs), self.dim),
                np.frombuffer(pvec, np.float32).copy())

    def quarantine(self, entry_id: int, problem: str) -> bool:
        """Evict an entry whose stored bytes are bad, log it and count it (``stats``);
        whether it was removed. A store too damaged to write keeps it, still never served
        once its checks fail."""
        log.error("cache entry %d is damaged (%s); evicting it", entry_id, problem)
        self.quarantined += 1
        try:
            return bool(self.evict([entry_id]))
        except (StoreError, lmdb.Error) as exc:
            log.error("could not evict damaged cache entry %d: %s", entry_id, exc)
            return False

    def get_record(self, entry_id: int) -> EntryRecord:
        with self.db.read() as txn:
            record = self.db.get_record(txn, entry_id)
        if record is None:
            raise EntryNotFoundError(f"no cache entry {entry_id}")
        return record

    def records(self) -> Iterator[EntryRecord]:
        """Every entry's record, with its hits and last access as the cache counts them now
        (a hit's statistics reach LMDB with the next write, not at once)."""
        live = self.policy.access_of()
        with self.db.read() as txn:
            for record in self.db.iter_records(txn):
                if record.entry_id in live:
                    record.last_access, record.hits, record.benefit = live[record.entry_id]
                yield record

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
            "quarantined": self.quarantined,
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

    # -- maintenance ------------------------------------------------------------------------

    def rebuild_index(self) -> None:
        """Rebuild the Annoy index from LMDB now, in this thread."""
        self.maintenance.rebuild()

    def wait_for_rebuild(self) -> None:
        self.maintenance.wait()

    def check(self, repair: bool = False, verify_latents: bool = True) -> CheckReport:
        """Verify the store's consistency (see :meth:`IndexMaintenance.check`); ``repair``
        fixes what is derived and never deletes a consistent entry."""
        return self.maintenance.check(self.settings.budget_bytes, self._write_lock,
                                      self._load_catalog, repair=repair,
                                      verify_latents=verify_latents)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Finish a running rebuild, write pending access statistics, close LMDB."""
        if self._closed:
            return
        self._closed = True
        self.maintenance.close()
        try:
            self.flush()
        finally:
            self.db.close()

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
