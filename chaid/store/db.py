"""The LMDB environment: layout, schema, codecs and the one write-transaction helper.

LMDB is the source of truth of the cache. Named databases:

``meta``     schema version, embedder name and dimension, id counters, total bytes
``entries``  entry id -> JSON record (prompt, entities, item ids, fingerprint, latent shape
             and dtype, steps, checksums, created, last access, hits, benefit, bytes)
``latents``  entry id + step -> the latent's raw bytes (C order, the record's dtype)
``vectors``  item id -> entry id + entity position + float32 entity vector
``prompts``  entry id -> float32 whole-prompt vector (tie-breaks, whole-prompt matching)

Ids are big-endian unsigned integers so keys sort by id. Every write happens inside
:meth:`LatentDB.write`, which begins and commits the transaction within one call on the
calling thread (LMDB ties a write transaction to its thread) and grows the map on demand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

from chaid.store.datafile import check_data_file, repair_hint
from chaid.store.errors import (
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreMismatchError,
    StoreVersionError,
)

log = logging.getLogger(__name__)

# Bump when the layout or the record format changes; older stores are refused, not guessed at.
SCHEMA_VERSION = 1
# Named databases plus headroom for later versions.
MAX_DBS = 8
# Readers beyond the daemon's threads: tools opened read-only beside it.
_MAX_READERS = 126
_ID = struct.Struct(">Q")
_LATENT_KEY = struct.Struct(">QI")
_VECTOR_HEAD = struct.Struct(">QH")
LMDB_DIRNAME = "lmdb"
WRITER_LOCK_NAME = "writer.lock"

T = TypeVar("T")


def id_key(value: int) -> bytes:
    return _ID.pack(value)


def key_id(key: bytes) -> int:
    return _ID.unpack(key)[0]


def latent_key(entry_id: int, step: int) -> bytes:
    return _LATENT_KEY.pack(entry_id, step)


def vector_value(entry_id: int, entity_pos: int, vector: np.ndarray) -> bytes:
    return _VECTOR_HEAD.pack(entry_id, entity_pos) + np.asarray(vector, np.float32).tobytes()


def parse_vector(value: bytes) -> tuple[int, int, np.ndarray]:
    entry_id, pos = _VECTOR_HEAD.unpack_from(value)
    return entry_id, pos, np.frombuffer(value, np.float32, offset=_VECTOR_HEAD.size).copy()


# Keys of EntryRecord.extra for entries of the shared tier (chaid/store/shared.py): the
# entry's id there, and whether its latents are still only there.
SHARED_KEY = "shared"
REMOTE_KEY = "remote"


@dataclass
class EntryRecord:
    """What the store knows about one cached entry (the ``entries`` value, as JSON)."""

    entry_id: int
    prompt: str
    entities: list[str]
    item_ids: list[int]
    fingerprint: str
    shape: list[int]
    dtype: str
    steps: list[int]
    checksums: dict[str, str]
    created: float
    last_access: float
    hits: int = 0
    benefit: float = 0.0
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> EntryRecord:
        return cls(**json.loads(raw))


class ReadersOrResize:
    """Any number of read transactions at once, or one map resize with none.

    LMDB forbids ``mdb_env_set_mapsize`` while a transaction of this process is open;
    readers on other threads would see their transaction invalidated (or the process
    crash). Reads take the shared side, a growth the exclusive side. A waiting resize holds
    back new readers (so a steady stream of reads cannot starve it) but not a thread that
    already reads (so reads may nest).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._waiting = 0
        self._resizing = False
        self._depth = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        with self._cond:
            if not depth:
                while self._resizing or self._waiting:
                    self._cond.wait()
            self._readers += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._depth, "n", 0):
            raise RuntimeError("a map resize inside a read transaction of the same thread")
        with self._cond:
            self._waiting += 1
            try:
                while self._resizing or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._resizing = True
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class LatentDB:
    """One LMDB environment under ``data_dir/lmdb``.

    A read-write open takes an exclusive ``flock`` on ``data_dir/writer.lock`` for the
    object's lifetime, so a second writer (another daemon, ``chaid cache evict`` beside a
    running daemon) fails fast with :class:`StoreBusyError` instead of racing. Read-only
    opens take no lock and never create anything.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        readonly: bool = False,
        map_bytes: int = 64 << 20,
        max_map_bytes: int = 1 << 40,
        durable: bool = True,
        embedder: tuple[str, int] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.readonly = readonly
        self.max_map_bytes = max_map_bytes
        self._write_lock = threading.Lock()
        self._resize = ReadersOrResize()
        self._lock_file = None
        path = self.data_dir / LMDB_DIRNAME
        if readonly:
            if not (path / "data.mdb").exists():
                raise StoreError(f"no store at {self.data_dir}")
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
                self._lock_file = take_writer_lock(self.data_dir / WRITER_LOCK_NAME)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the store in {self.data_dir}: {exc.strerror or exc} (the "
                    "daemon's user needs write access to store.data_dir)") from None
        try:
            # Before LMDB maps the file: a truncated one would kill the process with SIGBUS.
            check_data_file(self.data_dir, path / "data.mdb")
        except BaseException:
            self._release_lock()
            raise
        try:
            self.env = lmdb.open(
                str(path),
                map_size=map_bytes,
                max_dbs=MAX_DBS,
                max_readers=_MAX_READERS,
                readonly=readonly,
                sync=durable,
                metasync=durable,
                # Several threads of one process read at once; no thread owns a reader slot.
                lock=True,
                readahead=False,
                meminit=False,
            )
            # Reader slots of processes that died (kill -9) would pin old pages forever.
            self.env.reader_check()
            self.meta = self.env.open_db(b"meta", create=not readonly)
            self.entries = self.env.open_db(b"entries", create=not readonly)
            self.latents = self.env.open_db(b"latents", create=not readonly)
            self.vectors = self.env.open_db(b"vectors", create=not readonly)
            self.prompts = self.env.open_db(b"prompts", create=not readonly)
        except (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError,
                lmdb.PanicError) as exc:
            self._release_lock()
            raise StoreCorruptError(f"the store at {self.data_dir} is damaged ({exc}); "
                                    f"{repair_hint(self.data_dir)}") from exc
        except lmdb.Error as exc:
            self._release_lock()
            raise StoreError(f"cannot open the store at {self.data_dir}: {exc}") from exc
        try:
            self._check_schema(embedder)
        except BaseException:
            self.close()
            raise

    # -- schema -----------------------------------------------------------------------------

    def _check_schema(self, embedder: tuple[str, int] | None) -> None:
        try:
            meta = self.read_meta()
        except (lmdb.Error, ValueError) as exc:
            raise StoreCorruptError(f"the store at {self.data_dir} is damaged (its meta "
                                    f"database is unreadable: {exc}); "
                                    f"{repair_hint(self.data_dir)}") from exc
        if "schema_version" not in meta:
            if self.readonly:
                raise StoreError(f"{self.data_dir} holds an empty or unfinished store")
            if embedder is None:
                raise StoreError("a new store needs the embedder's name and dimension")
            initial = {
                "schema_version": SCHEMA_VERSION,
                "embedder": embedder[0],
                "dim": embedder[1],
                "created": time.time(),
                "next_entry": 1,
                "next_item": 0,
                "total_bytes": 0,
            }
            self.write(lambda txn: [self.put_meta(txn, k, v) for k, v in initial.items()])
            return
        if meta["schema_version"] != SCHEMA_VERSION:
            raise StoreVersionError(
                f"{self.data_dir} holds a store of schema version {meta['schema_version']}; "
                f"this chaid reads version {SCHEMA_VERSION} (move it aside or clear it)"
            )
        if embedder is not None and (meta["embedder"], meta["dim"]) != tuple(embedder):
            raise StoreMismatchError(
                f"{self.data_dir} was built with the embedder {meta['embedder']} "
                f"({meta['dim']}-d), not {embedder[0]} ({embedder[1]}-d); its vectors do not "
                "compare (use another data directory or clear this one)"
            )

    # -- transactions -----------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (copies values out; valid until the block ends). It holds off
        map growth in this process until it ends (see ReadersOrResize)."""
        for attempt in (1, 2):
            # The transaction begins and ends under one hold of the shared side: a growth
            # never runs while it is open.
            with self._resize.shared():
                try:
                    txn = self.env.begin()
                except lmdb.MapResizedError:
                    if attempt == 2:
                        raise
                    txn = None
                if txn is not None:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            # Another process grew the map: adopt its size (no reader of ours is open),
            # then begin again.
            with self._resize.exclusive():
                self.env.set_mapsize(0)

    def write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``body(txn)`` in one write transaction and commit it; return its result.

        The transaction begins and ends inside this call, on this thread. Any exception
        (KeyboardInterrupt included) aborts it, leaving the store as it was. When the map
        is full the transaction is aborted, the map doubled (up to ``max_map_bytes``) and
        ``body`` run again from the start, so ``body`` must not have side effects outside
        the transaction. A full disk or the ceiling raises :class:`StoreFullError`.
        """
        if self.readonly:
            raise StoreError("the store is open read-only")
        with self._write_lock:
            while True:
                txn = self.env.begin(write=True)
                try:
                    result = body(txn)
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    txn.abort()
                    self._grow()
                except lmdb.Error as exc:
                    txn.abort()
                    if _is_disk_full(exc, self.data_dir):
                        raise StoreFullError(
                            f"the disk under {self.data_dir} is full "
                            f"({_free_bytes(self.data_dir)} bytes free); nothing was written"
                        ) from exc
                    raise StoreError(f"store write failed: {exc}") from exc
                except BaseException:
                    txn.abort()
                    raise

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        if size >= self.max_map_bytes:
            raise StoreFullError(
                f"the store reached its size ceiling ({self.max_map_bytes} bytes); "
                "nothing was written (raise store.max_map_bytes or lower the budget)"
            )
        new_size = min(size * 2, self.max_map_bytes)
        log.info("growing the LMDB map from %d to %d bytes", size, new_size)
        try:
            with self._resize.exclusive():  # no read transaction of this process is open
                self.env.set_mapsize(new_size)
        except lmdb.Error as exc:
            raise StoreFullError(f"cannot grow the store's map to {new_size}: {exc}") from exc

    # -- meta -------------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any]:
        with self.read() as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=self.meta)}

    def get_meta(self, txn: lmdb.Transaction, key: str) -> Any:
        raw = txn.get(key.encode(), db=self.meta)
        return None if raw is None else json.loads(raw)

    def put_meta(self, txn: lmdb.Transaction, key: str, value: Any) -> None:
        txn.put(key.encode(), json.dumps(value).encode(), db=self.meta)

    # -- records ----------------------------------------------------------------------------

    def get_record(self, txn: lmdb.Transaction, entry_id: int) -> EntryRecord | None:
        raw = txn.get(id_key(entry_id), db=self.entries)
        return None if raw is None else EntryRecord.decode(raw)

    def iter_records(self, txn: lmdb.Transaction) -> Iterator[EntryRecord]:
        for _, raw in txn.cursor(db=self.entries):
            yield EntryRecord.decode(raw)

    def delete_entry(self, txn: lmdb.Transaction, record: EntryRecord) -> None:
        """Remove an entry's latents, vectors, prompt vector and record (inside ``txn``)."""
        for step in record.steps:
            txn.delete(latent_key(record.entry_id, step), db=self.latents)
        for item in record.item_ids:
            txn.delete(id_key(item), db=self.vectors)
        txn.delete(id_key(record.entry_id), db=self.prompts)
        txn.delete(id_key(record.entry_id), db=self.entries)

    def stat(self) -> dict[str, Any]:
        info = self.env.info()
        with self.read() as txn:
            counts = {name: txn.stat(db)["entries"] for name, db in self._dbs().items()}
        return {"map_size": info["map_size"], "last_txnid": info["last_txnid"],
                "records": counts, "file_bytes": self._file_bytes()}

    def _dbs(self) -> dict[str, Any]:
        return {"entries": self.entries, "latents": self.latents, "vectors": self.vectors,
                "prompts": self.prompts}

    def _file_bytes(self) -> int:
        path = self.data_dir / LMDB_DIRNAME / "data.mdb"
        return path.stat().st_size if path.exists() else 0

    def copy_compact(self, target_dir: Path) -> None:
        """Write a compacted copy of the environment into the empty ``target_dir``."""
        self.env.copy(str(target_dir), compact=True)

    def close(self) -> None:
        with contextlib.suppress(lmdb.Error):
            self.env.close()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None


def take_writer_lock(path: Path):
    handle = open(path, "a+")  # noqa: SIM115 -- held open for the store's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreBusyError(
            f"the store at {path.parent} is open for writing by another process "
            "(stop the daemon, or use a read-only command)"
        ) from None
    return handle


# Below this many free bytes an I/O error of a write is taken for a full disk.
_NEARLY_FULL_BYTES = 64 << 20


def _is_disk_full(exc: lmdb.Error, data_dir: Path) -> bool:
    if isinstance(exc, lmdb.DiskError) or "No space left" in str(exc) or (
            getattr(exc, "errno", None) == errno.ENOSPC):
        return True
    # Some filesystems (tmpfs among them) fail LMDB's page writes with EIO, not ENOSPC,
    # when they run out of space.
    return "Input/output error" in str(exc) and _free_bytes(data_dir) < _NEARLY_FULL_BYTES


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def dir_has_store(data_dir: Path) -> bool:
    return (Path(data_dir) / LMDB_DIRNAME / "data.mdb").exists()
