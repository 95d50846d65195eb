"""Integrity of the LMDB environment: a walk of its trees, the checks of one entry, and
salvage of a damaged environment into a new one.

LMDB keeps no checksums of its own pages: a damaged page makes some reads fail with
``MDB_CORRUPTED`` (or return wrong bytes) long after the store opened. So a store is
checked in three layers:

1. :func:`chaid.store.datafile.check_data_file` reads the two meta pages with plain file
   reads before LMDB maps anything, and refuses a file shorter than its newest commit.
2. :func:`walk` visits every key of every database (branch and leaf pages, not the
   latents' bytes), so a damaged tree is found when the store opens, not by a request.
3. Every latent's checksum, length and dtype are verified when it is read
   (:meth:`chaid.store.cache.LatentCache.get_latents`); a bad entry is quarantined.

:func:`salvage` copies every entry that reads back intact into a new environment, keeps
the damaged file beside it, and swaps the new file in with one rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from chaid.store import db as dbm
from chaid.store.codec import checksum, stored_length
from chaid.store.datafile import FileState, inspect_data_file, older_snapshot, repair_hint
from chaid.store.errors import StoreCorruptError, StoreError
from chaid.store.pagewalk import walk_in_child

log = logging.getLogger(__name__)

SALVAGE_DIRNAME = ".salvage"


def walk(db: dbm.LatentDB) -> list[str]:
    """Visit every key of every database (the trees' branch and leaf pages) in a child
    process; the problems found, one line each. Latents' bytes are not read here (their
    checksums are verified on read and by ``chaid cache check``)."""
    names = ["meta", *db._dbs()]
    return walk_in_child(str(db.data_dir / dbm.LMDB_DIRNAME), names, dbm.MAX_DBS)


def check_trees(db: dbm.LatentDB) -> None:
    """StoreCorruptError, saying what is wrong and how to recover, unless a walk of every
    tree (:func:`walk`) finds nothing wrong."""
    problems = walk(db)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreCorruptError(f"the store at {db.data_dir} is damaged: {problems[0]}{more}; "
                                f"{repair_hint(db.data_dir)}")


def open_reader(data_dir: Path) -> dbm.LatentDB:
    """The store read-only (safe beside a running daemon) once :func:`check_trees` passed: a
    damaged page is a StoreCorruptError with the repair command, not LMDB aborting this
    process halfway through a listing."""
    db = dbm.LatentDB(data_dir, readonly=True)
    try:
        check_trees(db)
    except BaseException:
        db.close()
        raise
    return db


def entry_problems(txn, db: dbm.LatentDB, record: dbm.EntryRecord,
                   verify_latents: bool = True) -> list[str]:
    """What is wrong with one entry's latents, vectors and prompt vector (empty: intact)."""
    rid = record.entry_id
    out: list[str] = []
    # A shared entry not fetched yet has its latents in the shared tier only.
    for step in () if record.extra.get(dbm.REMOTE_KEY) else record.steps:
        try:
            raw = txn.get(dbm.latent_key(rid, step), db=db.latents)
        except lmdb.Error as exc:
            out.append(f"entry {rid}: latent of step {step} unreadable ({exc})")
            continue
        if raw is None:
            out.append(f"entry {rid}: latent of step {step} missing")
        elif verify_latents:
            problem = latent_problem(record, step, raw)
            if problem:
                out.append(f"entry {rid}: {problem}")
    for pos, item in enumerate(record.item_ids):
        try:
            raw = txn.get(dbm.id_key(item), db=db.vectors)
            ok = raw is not None and dbm.parse_vector(raw)[:2] == (rid, pos)
        except (lmdb.Error, struct.error):
            ok = False
        if not ok:
            out.append(f"entry {rid}: entity vector {item} missing or foreign")
    try:
        missing = txn.get(dbm.id_key(rid), db=db.prompts) is None
    except lmdb.Error:
        missing = True
    if missing:
        out.append(f"entry {rid}: prompt vector missing")
    return out


def latent_problem(record: dbm.EntryRecord, step: int, raw: bytes) -> str | None:
    """Why the stored bytes of one latent cannot be served (None: they can)."""
    try:
        expected = stored_length(record.dtype, tuple(record.shape))
    except (StoreError, TypeError, ValueError) as exc:
        return f"latent of step {step} has an unusable dtype or shape ({exc})"
    if len(raw) != expected:
        return f"latent of step {step} has {len(raw)} bytes, not {expected}"
    if checksum(raw) != record.checksums.get(str(step)):
        return f"latent of step {step} checksum mismatch"
    return None


# -- salvage --------------------------------------------------------------------------------


class NothingToSalvage(StoreError):
    """The damaged file's meta or catalog pages are lost: no entry can be found in it."""


@dataclass
class SalvageReport:
    """What a salvage kept, what it lost and why, and where the damaged file went."""

    salvaged: int = 0
    lost: dict[int, str] = field(default_factory=dict)
    kept_at: str = ""
    total_bytes: int = 0
    # Set when no entry could be found: the damaged file was moved aside and the next
    # open starts an empty store.
    unreadable: str = ""
    # Entries read from the previous commit's snapshot, the newest one having lost them
    # (or its catalog): their state is the one before the last commit.
    from_previous: int = 0

    def summary(self) -> str:
        if self.unreadable:
            return (f"nothing could be salvaged ({self.unreadable}); the damaged file is kept "
                    f"at {self.kept_at} and the store starts empty")
        lost = ", ".join(f"{k} ({v})" for k, v in sorted(self.lost.items())[:10])
        more = len(self.lost) - min(len(self.lost), 10)
        text = (f"salvaged {self.salvaged} of {self.salvaged + len(self.lost)} entries into a "
                f"new store; the damaged file is kept at {self.kept_at}")
        if self.from_previous:
            text += (f"; {self.from_previous} of them from the commit before the last one "
                     "(the last commit's pages were lost)")
        if self.lost:
            text += f"; lost: {lost}" + (f" and {more} more" if more else "")
        return text


def salvage(data_dir: Path, *, durable: bool = True) -> SalvageReport:
    """Copy every entry of a damaged store that reads back intact (record, every latent's
    checksum, vectors, prompt vector) into a new environment, then swap it in.

    The daemon must be stopped (the writer lock is held throughout). The original
    ``data.mdb`` stays where it was until the new file is complete and synced; then it is
    hard-linked to ``lmdb/data.mdb.damaged-<time>`` and the new file renamed over it, so an
    interruption at any point leaves either the damaged store or the salvaged one, never
    neither. The index is rebuilt at the next open.
    """
    data_dir = Path(data_dir)
    lmdb_dir = data_dir / dbm.LMDB_DIRNAME
    src_file = lmdb_dir / "data.mdb"
    if not src_file.exists():
        raise StoreError(f"no store at {data_dir}")
    lock = dbm.take_writer_lock(data_dir / dbm.WRITER_LOCK_NAME)
    work = data_dir / SALVAGE_DIRNAME
    try:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        state = inspect_data_file(src_file)  # damaged meta pages: nothing can be read
        if state is None:
            raise StoreError(f"{src_file} is empty: there is nothing to salvage")
        report = SalvageReport()
        kept = lmdb_dir / f"data.mdb.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        report.kept_at = str(kept)
        target = _Target(work / "new")
        unreadable = ""
        # The newest commit first; what it lost (a truncated file loses the last commit's
        # pages first), from the commit before it.
        for previous in (False, True):
            try:
                with _readable_copy(src_file, state, work, previous) as src:
                    _copy_intact(src, target, report, previous)
            except NothingToSalvage as exc:
                unreadable = unreadable or str(exc)
            if not report.lost and target.db is not None:
                break
        target.close(report.total_bytes)
        if target.db is None:
            report.unreadable = unreadable
            os.replace(src_file, kept)
        else:
            new_file = work / "new" / dbm.LMDB_DIRNAME / "data.mdb"
            if durable:
                with open(new_file, "rb+") as f:
                    os.fsync(f.fileno())
            os.link(src_file, kept)
            os.replace(new_file, src_file)
        _fsync_dir(lmdb_dir)
        from chaid.store.index import MANIFEST_NAME

        with contextlib.suppress(FileNotFoundError):  # rebuilt from the new LMDB at open
            (data_dir / MANIFEST_NAME).unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.close()
    log.info("%s", report.summary())
    return report


@contextlib.contextmanager
def _readable_copy(src_file: Path, state: FileState, work: Path,
                   previous: bool = False) -> Iterator[lmdb.Environment]:
    """The damaged environment, opened read-only without touching its lock file: at its
    newest commit, or at the one before (``previous``, on a copy). A truncated file is
    copied and padded with zero pages to its recorded length first, so reading a lost page
    fails with MDB_CORRUPTED instead of a SIGBUS."""
    path = src_file.parent
    copy = work / "source"
    if state.truncated or previous:
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        shutil.copyfile(src_file, copy / "data.mdb")
        if previous:
            older = older_snapshot(copy / "data.mdb")
            state = FileState(state.size, state.page_size, max(state.last_page,
                                                               older.last_page), older.txnid)
        if state.truncated:
            os.truncate(copy / "data.mdb", state.needed)
        path = copy
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=dbm.MAX_DBS, subdir=True,
                    map_size=max(state.needed, state.size))
    try:
        yield env
    finally:
        env.close()
        if path == copy:
            shutil.rmtree(copy, ignore_errors=True)


class _Target:
    """The new store a salvage fills: opened with the first readable snapshot's embedder,
    its counters the largest any snapshot names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: dbm.LatentDB | None = None
        self.meta: dict = {}
        self.next_entry = 1
        self.next_item = 0

    def open(self, meta: dict) -> dbm.LatentDB:
        if self.db is None:
            self.path.mkdir()
            self.db = dbm.LatentDB(self.path, embedder=(meta["embedder"], meta["dim"]),
                                   durable=False)
            self.meta = meta
        elif (meta["embedder"], meta["dim"]) != (self.meta["embedder"], self.meta["dim"]):
            raise NothingToSalvage("its previous commit names another embedder")
        self.next_entry = max(self.next_entry, meta.get("next_entry", 1))
        self.next_item = max(self.next_item, meta.get("next_item", 0))
        return self.db

    def close(self, total_bytes: int) -> None:
        """Write the counters and the entries' ``total_bytes``, sync, close."""
        if self.db is None:
            return
        values = {"next_entry": self.next_entry, "next_item": self.next_item,
                  "total_bytes": total_bytes, "created": self.meta.get("created", time.time())}
        self.db.write(lambda out: [self.db.put_meta(out, k, v) for k, v in values.items()])
        self.db.env.sync(True)
        self.db.close()


def _copy_intact(env: lmdb.Environment, target: _Target, report: SalvageReport,
                 previous: bool) -> None:
    """Copy every intact entry of ``env`` (record, latents, vectors, prompt vector) into
    ``target``, a batch of entries per transaction. From the ``previous``
    commit, only entries the newest one lost are taken (an entry the last commit removed
    stays removed), or every entry when the newest commit could not be read at all."""
    names = ("meta", "entries", "latents", "vectors", "prompts")
    try:
        handles = {n: env.open_db(n.encode(), create=False) for n in names}
    except lmdb.Error as exc:
        raise NothingToSalvage(f"its catalog of databases is unreadable ({exc})") from None
    view = _HandleView(handles)
    with env.begin() as txn:
        meta = _read_meta(txn, handles["meta"])
        ids = _entry_ids(txn, handles["entries"], meta.get("next_entry"))
    if previous and target.db is not None:
        ids = [i for i in ids if i in report.lost]
    new = target.open(meta)
    txn = env.begin()
    try:
        for start in range(0, len(ids), _SALVAGE_BATCH):
            chunk = []
            for entry_id in ids[start:start + _SALVAGE_BATCH]:
                record = _intact_record(txn, view, entry_id, report)
                if record is not None:
                    chunk.append(record)
                    report.lost.pop(entry_id, None)
                    target.next_entry = max(target.next_entry, entry_id + 1)
                    target.next_item = max([target.next_item,
                                            *(i + 1 for i in record.item_ids)])
                elif entry_id in report.lost:
                    # LMDB fails every later read of a transaction that met a damaged page.
                    txn.abort()
                    txn = env.begin()
            if chunk:
                new.write(lambda out, src=txn, chunk=chunk: _put_entries(src, out, view, new,
                                                                          chunk))
            report.salvaged += len(chunk)
            report.total_bytes += sum(r.bytes for r in chunk)
            if previous:
                report.from_previous += len(chunk)
    finally:
        txn.abort()


_SALVAGE_BATCH = 64


def _read_meta(txn, handle) -> dict:
    meta: dict = {}
    for key in ("schema_version", "embedder", "dim", "created", "next_entry", "next_item"):
        with contextlib.suppress(lmdb.Error, ValueError):
            raw = txn.get(key.encode(), db=handle)
            if raw is not None:
                meta[key] = json.loads(raw)
    if meta.get("schema_version") != dbm.SCHEMA_VERSION or "embedder" not in meta \
            or "dim" not in meta:
        raise NothingToSalvage("its meta database is unreadable or of another version")
    return meta


def _intact_record(txn, view: _HandleView, entry_id: int,
                   report: SalvageReport) -> dbm.EntryRecord | None:
    try:
        raw = txn.get(dbm.id_key(entry_id), db=view.entries)
        if raw is None:
            return None  # never written, or evicted
        record = dbm.EntryRecord.decode(raw)
    except (lmdb.Error, ValueError, TypeError) as exc:
        report.lost[entry_id] = f"record unreadable: {exc}"
        return None
    problems = entry_problems(txn, view, record)
    if problems:
        report.lost[entry_id] = problems[0].split(": ", 1)[1]
        return None
    return record


def _put_entries(src, out, view: _HandleView, new: dbm.LatentDB,
                 records: list[dbm.EntryRecord]) -> None:
    for record in records:
        rid = record.entry_id
        for step in record.steps:
            key = dbm.latent_key(rid, step)
            out.put(key, src.get(key, db=view.latents), db=new.latents)
        for item in record.item_ids:
            out.put(dbm.id_key(item), src.get(dbm.id_key(item), db=view.vectors),
                    db=new.vectors)
        out.put(dbm.id_key(rid), src.get(dbm.id_key(rid), db=view.prompts), db=new.prompts)
        out.put(dbm.id_key(rid), record.encode(), db=new.entries)


def _entry_ids(txn, entries, next_entry: int | None) -> list[int]:
    """Entry ids to try: every id below the meta's counter (each probed from the root, so
    one damaged leaf loses only its own keys), else whatever a cursor reaches."""
    if isinstance(next_entry, int) and 0 < next_entry < 1 << 40:
        return list(range(1, next_entry))
    ids = []
    with contextlib.suppress(lmdb.Error):
        for key in txn.cursor(db=entries).iternext(values=False):
            ids.append(dbm.key_id(key))
    return ids


class _HandleView:
    """The database handles of a raw environment under LatentDB's attribute names."""

    def __init__(self, handles: dict) -> None:
        self.entries = handles["entries"]
        self.latents = handles["latents"]
        self.vectors = handles["vectors"]
        self.prompts = handles["prompts"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
