"""The server's counters: connections, requests by method, errors by code, work in flight.

One object owned by the daemon and handed to each connection, so a connection counts what
it sees without reaching into the daemon (the daemon imports connections, never the
reverse). Everything here runs in the trio thread: plain integers, no locks.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

# The key under which requests for methods the daemon does not know are counted, so a
# client cannot grow the table with made-up method names.
UNKNOWN_METHOD_KEY = "(unknown)"


@dataclass
class ServerStats:
    """Counters of one daemon's lifetime (the ``requests`` and ``errors`` of ``stats``)."""

    # Method names counted as themselves; any other name counts as UNKNOWN_METHOD_KEY.
    methods: frozenset[str]
    started: float = field(default_factory=time.time)
    # Connections accepted so far (admitted or refused); numbers each connection in the logs.
    connections_accepted: int = 0
    # Requests being handled now, over all connections (shutdown waits for zero).
    inflight: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def count_connection(self) -> int:
        """Count a new connection; return its number."""
        self.connections_accepted += 1
        return self.connections_accepted

    def count_request(self, method: str) -> None:
        self.requests[method if method in self.methods else UNKNOWN_METHOD_KEY] += 1

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def uptime_s(self) -> float:
        return time.time() - self.started
