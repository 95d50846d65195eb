"""Moving a store to another embedder: its entries' vectors recomputed from their text.

Vectors of two embedders do not compare, so a store records the embedder it was built with
and LMDB holds every entry's prompt and entity strings beside their vectors. Opened with
another embedder, the store re-embeds: one write transaction replaces every entity vector
and whole-prompt vector, each record's byte count and the store's total, and the recorded
embedder, so a crash leaves either the old store or the new one, never a mix. The latents
are untouched. The Annoy index is derived data: its files are removed and rebuilt from LMDB
at the next open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chaid.store import db as dbm
from chaid.store.analysis import Embedder
from chaid.store.index import MANIFEST_NAME

log = logging.getLogger(__name__)

# Texts embedded per call while re-embedding (static models take thousands at once).
BATCH = 4096


@dataclass(frozen=True)
class Reembedded:
    entries: int
    vectors: int
    before: str
    after: str
    seconds: float


def reembed(data_dir: Path, embedder: Embedder, *, map_bytes: int = 64 << 20,
            max_map_bytes: int = 1 << 40, durable: bool = True) -> Reembedded:
    """Recompute every vector of the store in ``data_dir`` with ``embedder`` and record it
    as the store's embedder (see the module docstring). The caller holds no handle on the
    store; this takes the writer lock like any writer."""
    t0 = time.perf_counter()
    store = dbm.LatentDB(data_dir, map_bytes=map_bytes, max_map_bytes=max_map_bytes,
                         durable=durable, embedder=None)
    try:
        meta = store.read_meta()
        before, old_dim = meta.get("embedder", "?"), meta["dim"]
        with store.read() as txn:
            records = list(store.iter_records(txn))
        texts = [e for r in records for e in r.entities] + [r.prompt for r in records]
        unique = list(dict.fromkeys(texts))
        row = {text: i for i, text in enumerate(unique)}
        vectors = np.concatenate(
            [embedder.embed_uncached(unique[i:i + BATCH]) for i in range(0, len(unique), BATCH)]
        ) if unique else np.zeros((0, embedder.dim), np.float32)
        # an entry holds one float32 vector per entity plus its prompt's
        growth = 4 * (embedder.dim - old_dim)

        def body(txn) -> int:
            # No side effects outside the transaction: LatentDB.write runs this again from
            # the start when the map has to grow.
            total = 0
            for record in records:
                for pos, (item, entity) in enumerate(zip(record.item_ids, record.entities,
                                                         strict=True)):
                    txn.put(dbm.id_key(item),
                            dbm.vector_value(record.entry_id, pos, vectors[row[entity]]),
                            db=store.vectors)
                txn.put(dbm.id_key(record.entry_id), vectors[row[record.prompt]].tobytes(),
                        db=store.prompts)
                resized = dataclasses.replace(
                    record, bytes=record.bytes + growth * (len(record.item_ids) + 1))
                txn.put(dbm.id_key(record.entry_id), resized.encode(), db=store.entries)
                total += resized.bytes
            store.put_meta(txn, "total_bytes", total)
            store.put_meta(txn, "embedder", embedder.name)
            store.put_meta(txn, "dim", embedder.dim)
            return sum(len(r.item_ids) for r in records)

        count = store.write(body)
    finally:
        store.close()
    # The index holds the old vectors: drop it, the next open rebuilds it from LMDB.
    for path in [*Path(data_dir).glob("index-*"), Path(data_dir) / MANIFEST_NAME]:
        with contextlib.suppress(OSError):
            path.unlink()
    done = Reembedded(len(records), count, before, embedder.name, time.perf_counter() - t0)
    log.warning("re-embedded the store at %s: %d entries, %d entity vectors, embedder %s → "
                "%s, in %.1f s (latents untouched)", data_dir, done.entries, done.vectors,
                done.before, done.after, done.seconds)
    return done
