"""Offline operations behind ``chaid cache``: statistics, one entry, compaction."""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path
from typing import Any

from chaid.store import db as dbm
from chaid.store.codec import checksum
from chaid.store.db import LatentDB
from chaid.store.errors import EntryNotFoundError, StoreError
from chaid.store.index import MANIFEST_NAME
from chaid.store.integrity import open_reader


def store_stats(data_dir: Path) -> dict[str, Any]:
    """Counts and sizes of a store, read-only (safe beside a running daemon)."""
    db = open_reader(data_dir)
    try:
        meta = db.read_meta()
        per_ns: collections.Counter[str] = collections.Counter()
        hits = 0
        with db.read() as txn:
            for r in db.iter_records(txn):
                per_ns[f"{r.fingerprint} {'x'.join(map(str, r.shape))}"] += 1
                hits += r.hits
        stat = db.stat()
    finally:
        db.close()
    manifest_path = Path(data_dir) / MANIFEST_NAME
    index: dict[str, Any] = {"present": manifest_path.exists()}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            index.update(generation=manifest["generation"], items=manifest["items"],
                         bytes=manifest["annoy"]["bytes"])
        except (ValueError, KeyError) as exc:
            index["error"] = str(exc)
    return {
        "data_dir": str(data_dir),
        "schema_version": meta.get("schema_version"),
        "embedder": meta.get("embedder"),
        "entries": stat["records"]["entries"],
        "entity_vectors": stat["records"]["vectors"],
        "latents": stat["records"]["latents"],
        "total_bytes": meta.get("total_bytes"),
        "recorded_hits": hits,
        "file_bytes": stat["file_bytes"],
        "map_size": stat["map_size"],
        "namespaces": dict(per_ns),
        "index": index,
    }


def show_entry(data_dir: Path, entry_id: int) -> dict[str, Any]:
    """One entry's record plus its latents' sizes and whether their checksums hold."""
    db = open_reader(data_dir)
    try:
        with db.read() as txn:
            record = db.get_record(txn, entry_id)
            if record is None:
                raise EntryNotFoundError(f"no cache entry {entry_id}")
            latents = {}
            for step in record.steps:
                raw = txn.get(dbm.latent_key(entry_id, step), db=db.latents)
                latents[step] = ("missing" if raw is None else
                                 f"{len(raw)} bytes, checksum "
                                 f"{'ok' if checksum(raw) == record.checksums[str(step)] else 'BAD'}")
    finally:
        db.close()
    out = dict(vars(record))
    out["latents"] = latents
    return out


def compact(data_dir: Path) -> tuple[int, int]:
    """Rewrite the LMDB file without its free pages; return its size before and after.

    Holds the writer lock throughout (so the daemon must be stopped), writes the compacted
    copy beside the original and renames it over ``data.mdb`` only when complete.
    """
    data_dir = Path(data_dir)
    if not dbm.dir_has_store(data_dir):
        raise StoreError(f"no store at {data_dir}")
    lock = dbm.take_writer_lock(data_dir / dbm.WRITER_LOCK_NAME)
    try:
        lmdb_dir = data_dir / dbm.LMDB_DIRNAME
        before = (lmdb_dir / "data.mdb").stat().st_size
        tmp = data_dir / "lmdb.compact"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        db = LatentDB(data_dir, readonly=True)
        try:
            db.copy_compact(tmp)
        finally:
            db.close()
        with open(tmp / "data.mdb", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp / "data.mdb", lmdb_dir / "data.mdb")
        shutil.rmtree(tmp, ignore_errors=True)
        after = (lmdb_dir / "data.mdb").stat().st_size
    finally:
        lock.close()
    return before, after
