"""The entity index: an Annoy forest over entity vectors, derived from LMDB.

Three parts answer a query together:

* the **built** index: an immutable Annoy file (angular metric) plus the arrays that map an
  Annoy position to (item id, entry id, entity position), loaded by mmap;
* the **delta**: vectors written since the built index was made, searched exactly with one
  matrix product (a few thousand rows take well under a millisecond);
* the **tombstones**: entries evicted since the build, filtered out of its results.

The files are ``index-<generation>.annoy`` and ``index-<generation>.ids.npz`` under the data
directory, and ``index.json``, the manifest naming the current generation with the sizes and
BLAKE2 digests of both files. A rebuild writes a new generation beside the old one and
replaces the manifest atomically (``os.replace``) last, so a crash at any point leaves a
manifest naming a complete pair. A missing, truncated or corrupt pair (size or digest
mismatch, unreadable arrays) is detected at open and rebuilt from LMDB.

Thread-safety: searches run concurrently with each other and with a rebuild; the parts are
swapped under a lock and never mutated in place (Annoy indexes are never changed after
``build``). A superseded Annoy object stays alive while a search still holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

log = logging.getLogger(__name__)

MANIFEST_NAME = "index.json"
# Version of the files' layout; a manifest of another version is rebuilt, not read.
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Neighbor:
    """One cached entity near a query vector."""

    entry_id: int
    entity_pos: int  # position of the entity in its entry's entity list
    cosine: float


@dataclass(frozen=True)
class _Built:
    annoy: AnnoyIndex | None
    item_ids: np.ndarray  # (N,) uint64, Annoy position -> item id
    entry_ids: np.ndarray  # (N,) uint64
    entity_pos: np.ndarray  # (N,) uint16
    generation: int
    next_item: int  # LMDB's next item id when the build's snapshot was taken

    @classmethod
    def empty(cls) -> _Built:
        z = np.zeros(0, np.uint64)
        return cls(None, z, z, np.zeros(0, np.uint16), 0, 0)


@dataclass(frozen=True)
class _Delta:
    vectors: np.ndarray  # (M, D) float32, unit rows
    item_ids: np.ndarray  # (M,) uint64
    entry_ids: np.ndarray  # (M,) uint64
    entity_pos: np.ndarray  # (M,) uint16


class IndexCorrupt(Exception):
    """The index files on disk cannot be trusted (internal: triggers a rebuild)."""


class EntityIndex:
    """Nearest cached entities for a query vector (cosine), over built + delta - tombstones."""

    def __init__(self, directory: Path, dim: int, trees: int, search_k: int) -> None:
        self.directory = Path(directory)
        self.dim = dim
        self.trees = trees
        self.search_k = search_k
        self._built = _Built.empty()
        self._delta = self._empty_delta()
        self._tombstones: frozenset[int] = frozenset()
        self._buffers: tuple[np.ndarray, ...] | None = None  # the delta's growable storage
        self._lock = threading.Lock()

    # -- queries ----------------------------------------------------------------------------

    def search(self, vector: np.ndarray, k: int, search_k: int | None = None) -> list[Neighbor]:
        """Up to ``k`` nearest live entities to the unit ``vector``, best first."""
        with self._lock:
            built, delta, dead = self._built, self._delta, self._tombstones
        found: list[Neighbor] = []
        if built.annoy is not None:
            # Tombstoned items take result slots; ask for more when there are some.
            want = k + min(len(dead) * 4, 4 * k) if dead else k
            positions, dists = built.annoy.get_nns_by_vector(
                vector, want, search_k=search_k or self.search_k, include_distances=True
            )
            for pos, dist in zip(positions, dists, strict=True):
                entry_id = int(built.entry_ids[pos])
                if entry_id in dead:
                    continue
                # Annoy's angular distance is sqrt(2 - 2 cos) between unit vectors.
                found.append(Neighbor(entry_id, int(built.entity_pos[pos]), 1.0 - dist * dist / 2))
        if len(delta.item_ids):
            cos = delta.vectors @ vector  # (M,)
            top = np.argsort(-cos)[:k]
            found.extend(
                Neighbor(int(delta.entry_ids[i]), int(delta.entity_pos[i]), float(cos[i]))
                for i in top
            )
        found.sort(key=lambda n: -n.cosine)
        return found[:k]

    def built_vector(self, pos: int) -> np.ndarray:
        """The vector at Annoy position ``pos`` of the built index (for checks and recall)."""
        return np.asarray(self._built.annoy.get_item_vector(pos), np.float32)

    # -- updates after a commit -------------------------------------------------------------

    def add(self, item_ids: list[int], entry_id: int, vectors: np.ndarray) -> None:
        """Append one committed entry's entity vectors to the delta.

        The delta's buffers grow by doubling; rows are written past the published length,
        which searches never read, then the longer views are published (no copy per add).
        """
        n = len(item_ids)
        if not n:
            return
        with self._lock:
            d = self._delta
            count = len(d.item_ids)
            buf = self._buffers
            if buf is None or count + n > len(buf[1]):
                cap = max(64, 2 * (count + n))
                buf = (np.zeros((cap, self.dim), np.float32), np.zeros(cap, np.uint64),
                       np.zeros(cap, np.uint64), np.zeros(cap, np.uint16))
                for dst, src in zip(buf, (d.vectors, d.item_ids, d.entry_ids, d.entity_pos),
                                    strict=True):
                    dst[:count] = src
                self._buffers = buf
            end = count + n
            buf[0][count:end] = vectors
            buf[1][count:end] = item_ids
            buf[2][count:end] = entry_id
            buf[3][count:end] = np.arange(n, dtype=np.uint16)
            self._delta = _Delta(buf[0][:end], buf[1][:end], buf[2][:end], buf[3][:end])

    def remove_entries(self, entry_ids: Iterable[int]) -> None:
        """Forget evicted entries: drop their delta rows, tombstone their built items."""
        gone = set(entry_ids)
        if not gone:
            return
        with self._lock:
            d = self._delta
            keep = ~np.isin(d.entry_ids, np.fromiter(gone, np.uint64))
            self._buffers = None  # readers may hold views of the old buffers
            self._delta = _Delta(d.vectors[keep], d.item_ids[keep], d.entry_ids[keep],
                                 d.entity_pos[keep])
            self._tombstones = self._tombstones | gone

    @property
    def delta_size(self) -> int:
        return len(self._delta.item_ids)

    @property
    def built_size(self) -> int:
        return len(self._built.item_ids)

    @property
    def tombstones(self) -> frozenset[int]:
        return self._tombstones

    @property
    def generation(self) -> int:
        return self._built.generation

    def live_items(self) -> set[int]:
        """Item ids a search can return (built minus tombstoned entries, plus the delta)."""
        with self._lock:
            built, delta, dead = self._built, self._delta, self._tombstones
        alive = ~np.isin(built.entry_ids, np.fromiter(dead, np.uint64, len(dead)))
        return {int(i) for i in built.item_ids[alive]} | {int(i) for i in delta.item_ids}

    # -- building, loading ------------------------------------------------------------------

    def build(
        self,
        items: Iterable[tuple[int, int, int, np.ndarray]],
        next_item: int,
    ) -> None:
        """Build a new generation from ``(item id, entry id, entity pos, vector)`` items.

        ``items`` is a snapshot of LMDB's vectors taken when LMDB's next item id was
        ``next_item``. The new files are written and the manifest swapped before the
        in-memory parts are replaced; entries evicted and vectors added after the snapshot
        stay tombstoned and in the delta.
        """
        annoy = AnnoyIndex(self.dim, "angular")
        item_ids: list[int] = []
        entry_ids: list[int] = []
        positions: list[int] = []
        for pos, (item_id, entry_id, entity_pos, vector) in enumerate(items):
            annoy.add_item(pos, vector)
            item_ids.append(item_id)
            entry_ids.append(entry_id)
            positions.append(entity_pos)
        generation = self._next_generation()
        annoy_path, ids_path = self._paths(generation)
        arrays = {
            "item_ids": np.asarray(item_ids, np.uint64),
            "entry_ids": np.asarray(entry_ids, np.uint64),
            "entity_pos": np.asarray(positions, np.uint16),
        }
        if item_ids:
            annoy.build(self.trees, n_jobs=1)
            _write_atomically(annoy_path, lambda tmp: annoy.save(str(tmp)))
            annoy.unload()
            loaded: AnnoyIndex | None = AnnoyIndex(self.dim, "angular")
            loaded.load(str(annoy_path))
        else:
            _write_atomically(annoy_path, lambda tmp: tmp.write_bytes(b""))
            loaded = None
        _write_atomically(ids_path, lambda tmp: _save_npz(tmp, arrays))
        manifest = {
            "format": INDEX_FORMAT,
            "generation": generation,
            "dim": self.dim,
            "trees": self.trees,
            "items": len(item_ids),
            "next_item": next_item,
            "annoy": _file_facts(annoy_path),
            "ids": _file_facts(ids_path),
        }
        _write_atomically(
            self.directory / MANIFEST_NAME, lambda tmp: tmp.write_text(json.dumps(manifest))
        )
        built = _Built(loaded, arrays["item_ids"], arrays["entry_ids"], arrays["entity_pos"],
                       generation, next_item)
        self._swap(built)
        self._remove_stale_files(keep=generation)

    def load(self) -> int:
        """Load the generation named by the manifest; return LMDB's next item id at its build.

        Raises IndexCorrupt when the files are missing, of another format or dimension,
        truncated, or do not match their recorded digests.
        """
        path = self.directory / MANIFEST_NAME
        try:
            manifest = json.loads(path.read_text())
            generation = int(manifest["generation"])
            if manifest["format"] != INDEX_FORMAT or manifest["dim"] != self.dim:
                raise IndexCorrupt("index of another format or dimension")
            annoy_path, ids_path = self._paths(generation)
            for file, facts in ((annoy_path, manifest["annoy"]), (ids_path, manifest["ids"])):
                if _file_facts(file) != facts:
                    raise IndexCorrupt(f"{file.name} does not match its manifest")
            with np.load(ids_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in ("item_ids", "entry_ids", "entity_pos")}
            count = int(manifest["items"])
            if any(len(a) != count for a in arrays.values()):
                raise IndexCorrupt("index arrays disagree with the manifest")
            annoy = None
            if count:
                annoy = AnnoyIndex(self.dim, "angular")
                annoy.load(str(annoy_path))
                if annoy.get_n_items() != count:
                    raise IndexCorrupt("Annoy file holds another number of items")
        except IndexCorrupt:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexCorrupt(str(exc)) from exc
        built = _Built(annoy, arrays["item_ids"].astype(np.uint64),
                       arrays["entry_ids"].astype(np.uint64),
                       arrays["entity_pos"].astype(np.uint16), generation,
                       int(manifest["next_item"]))
        with self._lock:
            self._built = built
            self._buffers = None  # readers may hold views of the old buffers
            self._delta = self._empty_delta()
            self._tombstones = frozenset()
        self._remove_stale_files(keep=generation)
        return built.next_item

    def reconcile(self, live: dict[int, int], delta_rows: Iterable[tuple[int, int, int,
                                                                            np.ndarray]]) -> None:
        """Make a loaded index agree with LMDB.

        ``live`` maps each item id in LMDB to its entry id; ``delta_rows`` are the LMDB items
        absent from the built index. Built items whose entry is gone are tombstoned.
        """
        with self._lock:
            built = self._built
            present = np.fromiter(live.keys(), np.uint64, len(live))
            gone = ~np.isin(built.item_ids, present)
            self._tombstones = frozenset(int(e) for e in built.entry_ids[gone])
            self._buffers = None  # readers may hold views of the old buffers
            rows = list(delta_rows)
            if rows:
                self._delta = _Delta(
                    np.stack([r[3] for r in rows]).astype(np.float32),
                    np.asarray([r[0] for r in rows], np.uint64),
                    np.asarray([r[1] for r in rows], np.uint64),
                    np.asarray([r[2] for r in rows], np.uint16),
                )
            else:
                self._delta = self._empty_delta()

    def built_item_ids(self) -> np.ndarray:
        return self._built.item_ids

    def _swap(self, built: _Built) -> None:
        with self._lock:
            d = self._delta
            keep = d.item_ids >= np.uint64(built.next_item)
            self._buffers = None  # readers may hold views of the old buffers
            self._delta = _Delta(d.vectors[keep], d.item_ids[keep], d.entry_ids[keep],
                                 d.entity_pos[keep])
            in_built = set(int(e) for e in np.unique(built.entry_ids))
            self._tombstones = frozenset(e for e in self._tombstones if e in in_built)
            self._built = built

    def _next_generation(self) -> int:
        highest = self._built.generation
        for path in self.directory.glob("index-*.*"):
            with contextlib.suppress(ValueError):
                highest = max(highest, int(path.name.split("-")[1].split(".")[0]))
        return highest + 1

    def _paths(self, generation: int) -> tuple[Path, Path]:
        return (self.directory / f"index-{generation}.annoy",
                self.directory / f"index-{generation}.ids.npz")

    def _remove_stale_files(self, keep: int) -> None:
        keep_names = {p.name for p in self._paths(keep)}
        for path in self.directory.glob("index-*"):
            if path.name not in keep_names:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _empty_delta(self) -> _Delta:
        return _Delta(np.zeros((0, self.dim), np.float32), np.zeros(0, np.uint64),
                      np.zeros(0, np.uint64), np.zeros(0, np.uint16))


def _file_facts(path: Path) -> dict[str, object]:
    """Size and BLAKE2b digest of a file: what the manifest checks at load."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "blake2b").hexdigest()
    return {"bytes": path.stat().st_size, "blake2b": digest}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary name, fsync, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
