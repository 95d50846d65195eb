"""The policy engine: a byte budget and the eviction policies, as data.

Every cache write asks :meth:`PolicyEngine.plan` which entries to evict so that the new
entry fits the budget; the store then deletes those victims and writes the new entry in the
same LMDB transaction, and only after the commit tells the engine (:meth:`admit`,
:meth:`remove`). The engine's catalog is a memory copy of the access statistics of every
entry; accesses are recorded here first and written to LMDB with the next write
(:meth:`take_dirty`), so a lookup never waits for a disk write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chaid.store.errors import EntryTooLargeError, StoreError


@dataclass
class EntryStats:
    """The access statistics a policy ranks entries by."""

    entry_id: int
    namespace: tuple  # (fingerprint, latent shape): only entries of the same one can match
    created: float
    last_access: float
    hits: int
    benefit: float  # work saved by this entry's hits so far (the hit's benefit, summed)
    bytes: int


@dataclass(frozen=True)
class EvictionPolicy:
    """One policy: the entry with the lowest ``rank`` is evicted first."""

    name: str
    description: str
    rank: Callable[[EntryStats], tuple]


# Ranks end in the entry id so that equal ranks evict the older entry, deterministically.
POLICIES: dict[str, EvictionPolicy] = {
    p.name: p
    for p in (
        EvictionPolicy(
            "lru", "least recently used (a hit or the write counts as a use)",
            lambda s: (s.last_access, s.entry_id),
        ),
        EvictionPolicy(
            "lfu", "least frequently used (fewest hits), then least recently used",
            lambda s: (s.hits, s.last_access, s.entry_id),
        ),
        EvictionPolicy(
            "fifo", "first in, first out (oldest write)",
            lambda s: (s.created, s.entry_id),
        ),
        # NIRVANA's LCBFU: the work an entry has saved (hits weighted by each hit's benefit),
        # per byte it occupies; the least beneficial per byte goes first.
        EvictionPolicy(
            "lcbfu", "least computationally beneficial and frequently used, per byte",
            lambda s: (s.benefit / max(s.bytes, 1), s.last_access, s.entry_id),
        ),
    )
}


class PolicyEngine:
    """Tracks entries against a byte budget and chooses victims under one policy.

    Thread-safe: every method takes the engine's lock.
    """

    def __init__(self, policy: str, budget_bytes: int) -> None:
        if policy not in POLICIES:
            raise StoreError(f"unknown eviction policy {policy!r} (one of {', '.join(POLICIES)})")
        self.policy = POLICIES[policy]
        self.budget_bytes = budget_bytes
        self.catalog: dict[int, EntryStats] = {}
        self.total_bytes = 0
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    def load(self, stats: Iterable[EntryStats]) -> None:
        with self._lock:
            self.catalog = {s.entry_id: s for s in stats}
            self.total_bytes = sum(s.bytes for s in self.catalog.values())
            self._dirty.clear()

    def plan(self, new_bytes: int, protect: Iterable[int] = ()) -> list[int]:
        """Victims to evict, in order, so that ``new_bytes`` more fit within the budget."""
        if new_bytes > self.budget_bytes:
            raise EntryTooLargeError(
                f"an entry of {new_bytes} bytes exceeds the whole cache budget "
                f"({self.budget_bytes} bytes)"
            )
        with self._lock:
            excess = self.total_bytes + new_bytes - self.budget_bytes
            if excess <= 0:
                return []
            keep = set(protect)
            ranked = sorted(
                (s for s in self.catalog.values() if s.entry_id not in keep), key=self.policy.rank
            )
            victims: list[int] = []
            for s in ranked:
                if excess <= 0:
                    break
                victims.append(s.entry_id)
                excess -= s.bytes
            return victims

    def admit(self, stats: EntryStats) -> None:
        with self._lock:
            self.catalog[stats.entry_id] = stats
            self.total_bytes += stats.bytes

    def grow(self, entry_id: int, nbytes: int) -> None:
        """An entry now holds ``nbytes`` more (a shared entry's latents, fetched)."""
        with self._lock:
            stats = self.catalog.get(entry_id)
            if stats is not None:
                stats.bytes += nbytes
                self.total_bytes += nbytes

    def remove(self, entry_ids: Iterable[int]) -> None:
        with self._lock:
            for entry_id in entry_ids:
                stats = self.catalog.pop(entry_id, None)
                if stats is not None:
                    self.total_bytes -= stats.bytes
                self._dirty.discard(entry_id)

    def touch(self, entry_id: int, now: float, benefit: float) -> None:
        """Record a hit on ``entry_id`` (no-op for an entry evicted meanwhile)."""
        with self._lock:
            stats = self.catalog.get(entry_id)
            if stats is None:
                return
            stats.last_access = now
            stats.hits += 1
            stats.benefit += benefit
            self._dirty.add(entry_id)

    def take_dirty(self) -> list[EntryStats]:
        """Copies of the stats touched since the last call, to be written to LMDB."""
        with self._lock:
            out = [
                EntryStats(**vars(self.catalog[i])) for i in self._dirty if i in self.catalog
            ]
            self._dirty.clear()
            return out

    def access_of(self) -> dict[int, tuple[float, int, float]]:
        """entry id → (last_access, hits, benefit) as they stand now."""
        with self._lock:
            return {i: (s.last_access, s.hits, s.benefit) for i, s in self.catalog.items()}

    def has_dirty(self) -> bool:
        """Whether stats were touched since the last :meth:`take_dirty`."""
        with self._lock:
            return bool(self._dirty)

    def restore_dirty(self, entry_ids: Iterable[int]) -> None:
        """Mark stats dirty again after a write that would have saved them failed."""
        with self._lock:
            self._dirty.update(i for i in entry_ids if i in self.catalog)

    def eligible(self, entry_id: int, namespace: tuple) -> bool:
        stats = self.catalog.get(entry_id)
        return stats is not None and stats.namespace == namespace

    def __len__(self) -> int:
        return len(self.catalog)
