"""Index maintenance and repair: keeping the derived state in step with LMDB.

LMDB is the source of truth; the Annoy index is derived from its entity vectors. This
module opens the index (loading its files and reconciling them with LMDB, or rebuilding
them), rebuilds it in the background every ``store.rebuild_every`` new vectors, and checks
the whole store for consistency, repairing what is derived (never a consistent entry).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from chaid.store import db as dbm
from chaid.store.db import EntryRecord, LatentDB
from chaid.store.index import MANIFEST_NAME, EntityIndex, IndexCorrupt
from chaid.store.integrity import entry_problems, walk

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """Outcome of a consistency check: an empty ``problems`` list means consistent."""

    entries: int = 0
    total_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    # A damaged tree or unreadable records: only a salvage (chaid cache check --repair)
    # gets the intact entries back.
    damaged: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


class IndexMaintenance:
    """Opens, rebuilds and checks the entity index of one store (and checks the store).

    ``background`` rebuilds run in a thread of their own while lookups keep searching the
    old index plus the in-memory delta; without it a rebuild runs in the caller's thread.
    """

    def __init__(self, db: LatentDB, index: EntityIndex, data_dir: Path,
                 rebuild_every: int, background: bool) -> None:
        self.db = db
        self.index = index
        self.data_dir = data_dir
        self.rebuild_every = rebuild_every
        self.background = background
        self._rebuild_lock = threading.Lock()
        self._rebuild_thread: threading.Thread | None = None
        self._closed = False

    def open(self, has_entries: bool) -> None:
        """Load the index files and reconcile them with LMDB, or rebuild them."""
        try:
            self.index.load()
        except IndexCorrupt as exc:
            if (self.data_dir / MANIFEST_NAME).exists() or has_entries:
                log.warning("entity index unusable (%s); rebuilding from LMDB", exc)
            self.rebuild()
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
        self.rebuild_if_due()

    def rebuild(self) -> None:
        """Rebuild the Annoy index from LMDB now, in this thread."""
        with self._rebuild_lock:
            with self.db.read() as txn:
                next_item = self.db.get_meta(txn, "next_item")
                rows = [
                    (dbm.key_id(k), *dbm.parse_vector(v))
                    for k, v in txn.cursor(db=self.db.vectors)
                ]
            self.index.build(rows, next_item)

    def rebuild_if_due(self) -> None:
        """Rebuild once the delta holds ``rebuild_every`` vectors: in the background unless
        one is running already (or inline when background rebuilds are off)."""
        if self.index.delta_size < self.rebuild_every:
            return
        if not self.background:
            self.rebuild()
            return
        if self._rebuild_thread is not None and self._rebuild_thread.is_alive():
            return
        if self._closed:
            return

        def run() -> None:
            try:
                self.rebuild()
            except Exception:  # the delta keeps serving; the next trigger retries
                log.exception("background index rebuild failed")

        self._rebuild_thread = threading.Thread(target=run, name="chaid-index-rebuild",
                                                daemon=True)
        self._rebuild_thread.start()

    def wait(self) -> None:
        """Until a running background rebuild has finished."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join()

    def close(self) -> None:
        """Start no more rebuilds; finish a running one."""
        self._closed = True
        self.wait()

    # -- consistency ------------------------------------------------------------------------

    def check(self, budget_bytes: int, write_lock: threading.Lock,
              reload_catalog: Callable[[], None], *, repair: bool = False,
              verify_latents: bool = True) -> CheckReport:
        """Verify that LMDB is self-consistent and that the index agrees with it.

        Checks: every record's latents exist with their checksums, its vectors and prompt
        vector exist and point back at it; no orphan latents, vectors or prompt vectors;
        the stored total equals the sum of entry sizes and is within ``budget_bytes``; the
        index returns exactly LMDB's items. ``repair`` deletes orphans, fixes the total,
        reloads the catalog (``reload_catalog``) and rebuilds the index, under
        ``write_lock``; it never deletes a consistent entry.
        """
        self.wait()
        report = CheckReport()
        report.problems.extend(walk(self.db))
        if report.problems:  # a damaged tree: only a salvage helps (chaid cache check --repair)
            report.damaged = True
            return report
        orphans: dict[str, list[bytes]] = {"latents": [], "vectors": [], "prompts": []}
        damaged: list[EntryRecord] = []
        try:
            with self.db.read() as txn:
                ids: set[int] = set()
                items: set[int] = set()
                for record in self.db.iter_records(txn):
                    ids.add(record.entry_id)
                    items.update(record.item_ids)
                    report.entries += 1
                    report.total_bytes += record.bytes
                    problems = entry_problems(txn, self.db, record, verify_latents)
                    if problems:
                        report.problems.extend(problems)
                        damaged.append(record)
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
        except (lmdb.Error, ValueError, TypeError) as exc:
            report.problems.append(f"the store is damaged ({exc!r})")
            report.damaged = True
            return report
        for name, keys in orphans.items():
            if keys:
                report.problems.append(f"{len(keys)} orphan {name} records")
        if stored_total != report.total_bytes:
            report.problems.append(f"stored total {stored_total} != sum {report.total_bytes}")
        if report.total_bytes > budget_bytes:
            report.problems.append(f"{report.total_bytes} bytes exceed the budget "
                                   f"{budget_bytes}")
        index_items = self.index.live_items()
        if index_items != items:
            report.problems.append(
                f"index disagrees with LMDB: {len(index_items - items)} stale items, "
                f"{len(items - index_items)} missing items")
        if repair and report.problems:
            self._repair(orphans, damaged, report, write_lock, reload_catalog)
        return report

    def _repair(self, orphans: dict[str, list[bytes]], damaged: list[EntryRecord],
                report: CheckReport, write_lock: threading.Lock,
                reload_catalog: Callable[[], None]) -> None:
        dbs = {"latents": self.db.latents, "vectors": self.db.vectors,
               "prompts": self.db.prompts}
        total = report.total_bytes - sum(r.bytes for r in damaged)

        def body(txn) -> None:
            for name, keys in orphans.items():
                for key in keys:
                    txn.delete(key, db=dbs[name])
            for record in damaged:  # what is left of them: their latents cannot be served
                for step in record.steps:
                    txn.delete(dbm.latent_key(record.entry_id, step), db=self.db.latents)
                for item in record.item_ids:
                    raw = txn.get(dbm.id_key(item), db=self.db.vectors)
                    if raw is not None and dbm.parse_vector(raw)[0] == record.entry_id:
                        txn.delete(dbm.id_key(item), db=self.db.vectors)
                txn.delete(dbm.id_key(record.entry_id), db=self.db.prompts)
                txn.delete(dbm.id_key(record.entry_id), db=self.db.entries)
            self.db.put_meta(txn, "total_bytes", total)

        with write_lock:
            self.db.write(body)
        reload_catalog()
        self.rebuild()
        if damaged:
            report.repaired.append(f"evicted {len(damaged)} damaged entries "
                                   f"({', '.join(str(r.entry_id) for r in damaged[:10])}"
                                   f"{' …' if len(damaged) > 10 else ''})")
        report.repaired.append("deleted orphans, recomputed the total, rebuilt the index")
