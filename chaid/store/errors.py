"""Errors of the latent store. Each one reads as a single line to the user."""

from __future__ import annotations

from chaid.errors import ChaidError


class StoreError(ChaidError):
    """The store cannot do what was asked (base of every store error)."""


class StoreVersionError(StoreError):
    """The data directory holds a store of another schema version."""


class StoreMismatchError(StoreError):
    """The store was built with another embedder (its vectors would be meaningless here)."""


class StoreCorruptError(StoreError):
    """The store's files are damaged (truncated, unreadable pages); the message says what
    is wrong and how to recover."""

    # EX_DATAERR: restarting cannot help (the systemd unit does not restart on it).
    exit_status = 65


class CorruptEntryError(StoreError):
    """One entry's stored bytes fail their checks (checksum, length, dtype); it is
    quarantined and the request runs as a miss."""

    def __init__(self, entry_id: int, problem: str) -> None:
        super().__init__(f"cache entry {entry_id} is damaged: {problem}")
        self.entry_id = entry_id
        self.problem = problem


class StoreFullError(StoreError):
    """The store reached its map-size ceiling or the disk is full; nothing was written."""


class StoreBusyError(StoreError):
    """Another process holds the store open for writing (is the daemon running?)."""


class EntryNotFoundError(StoreError, KeyError):
    """No entry has the given id (never written, or evicted)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the one-line message
        return str(self.args[0]) if self.args else "entry not found"


class EntryTooLargeError(StoreError, ValueError):
    """One entry is larger than the whole byte budget; it can never be cached."""


class AnalyzerError(StoreError):
    """The spaCy or sentence-transformers model named in the settings cannot be loaded."""
