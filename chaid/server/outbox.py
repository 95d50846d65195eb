"""The frames of one connection waiting for its writer, bounded in bytes and in count.

A response waits for room; a notification is dropped when there is none. The bytes of the
frame being written still count until :meth:`Outbox.sent`, so a connection holds at most
``max_bytes`` plus one frame here, however slowly its client reads. A single frame larger
than the budget is admitted once the outbox is empty (a big raw video must still go out).
Whoever waits for room is bounded by the writer: it either makes progress or times out
and drops the connection, which closes the outbox and wakes every waiter.
"""

from __future__ import annotations

from collections import deque

import trio


class Outbox:
    """FIFO of encoded frames with a byte budget; one writer takes, many tasks put."""

    def __init__(self, max_bytes: int, max_frames: int) -> None:
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self._frames: deque[bytes] = deque()
        self._bytes = 0  # queued plus the frame the writer holds
        self._closed = False
        self._room = trio.lowlevel.ParkingLot()  # puts waiting for room
        self._ready = trio.lowlevel.ParkingLot()  # the writer waiting for a frame

    @property
    def pending_bytes(self) -> int:
        """Bytes queued or being written: nonzero while the client has output to read."""
        return self._bytes

    def _fits(self, size: int) -> bool:
        if self._bytes == 0:
            return True
        return (len(self._frames) < self.max_frames
                and self._bytes + size <= self.max_bytes)

    def _append(self, frame: bytes) -> None:
        self._frames.append(frame)
        self._bytes += len(frame)
        self._ready.unpark_all()

    async def put(self, frame: bytes) -> None:
        """Queue ``frame``, waiting for room behind the frames that already wait.

        Raises trio.ClosedResourceError if the outbox is or gets closed: the connection is
        going away and nobody will read the frame.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        # Waiters go first: a stream of small frames must not starve a large one.
        while self._room or not self._fits(len(frame)):
            if self._closed:
                raise trio.ClosedResourceError("the connection is closing")
            await self._room.park()
            if self._closed:
                raise trio.ClosedResourceError("the connection is closing")
            if self._fits(len(frame)):
                break
        if self._closed:
            raise trio.ClosedResourceError("the connection is closing")
        self._append(frame)
        self._room.unpark()  # the next waiter may fit too

    def put_nowait(self, frame: bytes) -> bool:
        """Queue ``frame`` if it fits now and nobody waits; False otherwise (dropped)."""
        if self._closed or self._room or not self._fits(len(frame)):
            return False
        self._append(frame)
        return True

    async def get(self) -> bytes | None:
        """The next frame for the writer, or None once closed and drained.

        The frame's bytes stay counted until :meth:`sent`.
        """
        while not self._frames:
            if self._closed:
                return None
            await self._ready.park()
        return self._frames.popleft()

    def sent(self, frame: bytes) -> None:
        """The writer is done with ``frame`` (written, or abandoned): release its bytes."""
        self._bytes -= len(frame)
        self._room.unpark()

    def close(self) -> None:
        """No more frames: ``get`` drains what is queued, then returns None; puts fail."""
        self._closed = True
        self._room.unpark_all()
        self._ready.unpark_all()
