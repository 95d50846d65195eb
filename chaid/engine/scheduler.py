"""The queue in front of the device: fair between clients, bounded, priority within a client.

Several applications share one daemon; a queue in arrival order lets one of them, sending
many requests at once, delay every other one behind all of its own. :class:`FairQueue`
serves clients in turn instead:

* users (the peer's uid) take turns, one job each;
* within a user, that user's connections take turns (several apps of one user, or one
  user's parallel workers, are several clients too);
* within a connection, the job with the highest ``priority`` goes first, then the oldest.
  A priority only reorders a client's own jobs, so it cannot starve anyone else.

The queue holds at most ``capacity`` jobs in all; a job beyond it is refused at once
(:class:`QueueFull`, answered ``busy``), never parked.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

import trio


class QueueFull(Exception):
    """The queue holds its capacity of jobs already."""


class Queueable(Protocol):
    # (user, connection): who the job is for.
    client: tuple[Hashable, Hashable]
    priority: int


J = TypeVar("J", bound=Queueable)


class FairQueue(Generic[J]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # user → connection → heap of (-priority, seq, job); users and connections in turn
        # order (the front is next).
        self._users: OrderedDict[Hashable, OrderedDict[Hashable, list]] = OrderedDict()
        self._seq = itertools.count()
        self._len = 0
        self._closed = False
        self._waiting = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return self._len

    def put_nowait(self, job: J) -> None:
        """Queue ``job``; QueueFull when ``capacity`` jobs wait, RuntimeError once closed."""
        if self._closed:
            raise RuntimeError("the queue is closed")
        if self._len >= self.capacity:
            raise QueueFull
        user, conn = job.client
        conns = self._users.setdefault(user, OrderedDict())
        heapq.heappush(conns.setdefault(conn, []), (-job.priority, next(self._seq), job))
        self._len += 1
        self._waiting.unpark()

    def get_nowait(self) -> J:
        """The next job in turn; trio.WouldBlock when none waits."""
        if not self._len:
            raise trio.WouldBlock
        user, conns = next(iter(self._users.items()))
        conn, heap = next(iter(conns.items()))
        _, _, job = heapq.heappop(heap)
        self._len -= 1
        # This connection and this user go to the back of their turns (or leave them).
        del conns[conn]
        if heap:
            conns[conn] = heap
        del self._users[user]
        if conns:
            self._users[user] = conns
        return job

    async def get(self) -> J | None:
        """The next job in turn, waiting for one; None once closed and empty."""
        while True:
            try:
                return self.get_nowait()
            except trio.WouldBlock:
                if self._closed:
                    return None
                await self._waiting.park()

    def close(self) -> None:
        """Accept no more jobs; :meth:`get` returns None once the queued ones are taken."""
        self._closed = True
        self._waiting.unpark_all()

    def depths(self) -> list[dict]:
        """Queued jobs per client, in turn order: ``[{user, connection, queued}]``."""
        return [{"user": user, "connection": conn, "queued": len(heap)}
                for user, conns in self._users.items() for conn, heap in conns.items()]
