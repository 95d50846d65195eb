"""One client connection: framing, limits, dispatch, and its in-flight requests.

The connection owns its stream and closes it in ``finally``. A reader task decodes frames
with a bounded unpacker; each request runs as its own task so that ``cancel`` and ``ping``
are answered while a ``generate`` waits for the device; a writer task sends responses and
progress notifications in order. Errors of one request become an error response; errors of
the byte stream (not msgpack, over the size limit, a frame that stalls) are answered once
with a nil id and close the connection. End of stream cancels the connection's requests,
and so its queued or running generations (they stop within one denoising step).

Three bounds keep one client from holding the daemon's resources: a connection with no
request in flight and no output pending that sends nothing for ``server.idle_timeout_s`` is
closed (nil-id ``timeout``); responses wait for the writer within a byte budget (an
:class:`~chaid.server.outbox.Outbox`), so a client that never reads holds at most that
budget plus its in-flight results; and each frame must be written within
``server.write_timeout_s``, else the connection is dropped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from chaid.config import ServerSettings
from chaid.limits import RequestLimits
from chaid.protocol import (
    METHODS,
    ErrorCode,
    ProtocolError,
    Request,
    RpcError,
    make_unpacker,
    notification,
    parse_frame,
    response,
    validate_params,
)
from chaid.server.logs import fields
from chaid.server.outbox import Outbox
from chaid.server.peercred import AccessPolicy, PeerCredentials, RateLimiter
from chaid.server.stats import ServerStats

if TYPE_CHECKING:
    from chaid.engine.worker import Job

log = logging.getLogger("chaid.server")

# Bytes asked of the kernel per read; a request is far smaller, a video response is only
# ever written, never read.
RECV_CHUNK = 64 * 1024
# Frames waiting for the writer. Responses wait for room; progress notifications are
# dropped when it is full (a client that reads slowly loses progress, not results).
OUTGOING_FRAMES = 64
# Bytes waiting for the writer (plus one frame, which may be larger): what a client that
# does not read can make the daemon buffer per connection besides its in-flight results.
# A few raw tiny-shapes videos, or one MP4, fit; the kernel's socket buffer adds ~200 KB.
OUTGOING_BYTES = 4 << 20
# Methods answered by the reader itself: instant, and must never wait behind the
# per-connection in-flight limit (cancelling is how a client gets below it).
INLINE_METHODS = frozenset({"ping", "cancel"})

Handler = Callable[["Connection", Request, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Services:
    """What a connection uses of the daemon that serves it, shared by every connection."""

    server: ServerSettings
    limits: RequestLimits
    access: AccessPolicy
    rate: RateLimiter
    stats: ServerStats
    # Method name → coroutine answering it (every name of protocol.METHODS).
    handlers: Mapping[str, Handler]


class Connection:
    """State of one accepted connection; :meth:`run` serves it until it ends."""

    def __init__(self, services: Services, stream: trio.SocketStream, peer: PeerCredentials,
                 number: int) -> None:
        self.services = services
        self.stream = stream
        self.peer = peer
        self.number = number
        self.admin = services.access.is_admin(peer)
        # Generations in flight on this connection, by request id (for `cancel`).
        self.jobs: dict[int, Job] = {}
        self.inflight: set[int] = set()
        self._outbox = Outbox(OUTGOING_BYTES, OUTGOING_FRAMES)
        self._scope = trio.CancelScope()
        self.dropped_notifications = 0
        # trio time of the last bytes received or request answered (the idle clock).
        self.last_active = trio.current_time()

    # -- outgoing -----------------------------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        """Queue a frame for the writer, waiting for room in the outbox.

        The wait is bounded by the writer: it sends a frame within
        ``server.write_timeout_s`` or drops the connection, which ends the wait.
        """
        try:
            await self._outbox.put(frame)
        except trio.ClosedResourceError:
            pass  # the connection is closing; the peer will not read it

    def notify(self, method: str, params: dict[str, Any]) -> None:
        """Queue a notification without waiting; dropped if the writer is backed up."""
        if not self._outbox.put_nowait(notification(method, params)):
            self.dropped_notifications += 1

    def busy(self) -> bool:
        """True while a request is in flight or output waits for the client."""
        return bool(self.inflight or self.jobs or self._outbox.pending_bytes)

    async def _writer(self) -> None:
        timeout = self.services.server.write_timeout_s
        while (frame := await self._outbox.get()) is not None:
            try:
                with trio.move_on_after(timeout) as scope:
                    await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._scope.cancel()
                return
            finally:
                self._outbox.sent(frame)
            if scope.cancelled_caught:
                # Part of the frame may be on the wire: the stream cannot be resumed.
                log.warning("client not reading; disconnecting", extra=fields(
                    conn=self.number, uid=self.peer.uid, pid=self.peer.pid,
                    timeout_s=timeout, frame_bytes=len(frame)))
                self.services.stats.count_error(ErrorCode.TIMEOUT)
                self._scope.cancel()
                return

    # -- lifetime -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the peer leaves, the stream breaks or the daemon closes us."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    async with trio.open_nursery() as requests:
                        await self._read_loop(requests)
                        # The peer is gone or the stream is broken: nothing more will be
                        # read, so its requests (and their generations) are abandoned.
                        requests.cancel_scope.cancel()
                    self._outbox.close()  # the writer sends what is queued, then ends
        except Exception:  # a bug here must not take the daemon's accept loop down
            log.exception("connection %d failed", self.number)
        finally:
            for job in self.jobs.values():
                job.cancel("disconnect")
            await trio.aclose_forcefully(self.stream)

    def close(self) -> None:
        """Drop the connection now (daemon shutdown)."""
        self._scope.cancel()

    async def _read_loop(self, requests: trio.Nursery) -> None:
        srv = self.services.server
        unpacker = make_unpacker(srv.max_message_bytes)
        # Bytes fed, and the stream offset where the last whole frame ended: what lies
        # between is the frame in progress (the unpacker's tell() also counts the bytes of a
        # frame it has only partly parsed, so it cannot tell).
        fed = frame_start = 0
        frame_deadline = math.inf
        while True:
            buffered = fed - frame_start
            room = srv.max_message_bytes - buffered
            if room <= 0:
                await self._fail(RpcError(ErrorCode.TOO_LARGE,
                                          f"frame larger than {srv.max_message_bytes} bytes"))
                return
            # Within a frame its read deadline runs; between frames, the idle clock.
            in_frame = fed > frame_start
            deadline = frame_deadline if in_frame else self.last_active + srv.idle_timeout_s
            with trio.move_on_at(deadline) as scope:
                try:
                    # Cancel-safe: a receive that is cancelled has consumed nothing.
                    data = await self.stream.receive_some(min(RECV_CHUNK, room))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if scope.cancelled_caught:
                if in_frame:
                    await self._fail(RpcError(ErrorCode.TIMEOUT,
                                              f"a frame did not arrive whole within "
                                              f"{srv.read_timeout_s} s"))
                    return
                if self.busy():  # waiting on the daemon is not idling: restart the clock
                    self.last_active = trio.current_time()
                    continue
                if trio.current_time() < self.last_active + srv.idle_timeout_s:
                    continue  # a request was answered meanwhile
                await self._fail(RpcError(ErrorCode.TIMEOUT,
                                          f"idle for {srv.idle_timeout_s:g} s; closing the "
                                          f"connection (reconnect to send more)",
                                          {"idle_timeout_s": srv.idle_timeout_s}))
                return
            self.last_active = trio.current_time()
            if not data:
                return
            try:
                unpacker.feed(data)
            except msgpack.BufferFull:
                await self._fail(RpcError(ErrorCode.TOO_LARGE,
                                          f"frame larger than {srv.max_message_bytes} bytes"))
                return
            fed += len(data)
            while True:
                try:
                    frame = unpacker.unpack()
                except msgpack.OutOfData:
                    break
                except Exception as exc:  # FormatError, StackError, ext errors, limits
                    await self._fail(ProtocolError(ErrorCode.MALFORMED,
                                                   f"cannot decode the frame: {exc}"[:300]))
                    return
                frame_start = unpacker.tell()
                if not await self._handle(frame, requests):
                    return
            if fed > frame_start:
                if frame_deadline == math.inf:
                    frame_deadline = trio.current_time() + srv.read_timeout_s
            else:
                frame_deadline = math.inf

    async def _fail(self, error: RpcError) -> None:
        """Answer a stream-level error (nil id) before the connection closes."""
        self.services.stats.count_error(error.code)
        log.info("closing connection: %s", error.code, extra=fields(
            conn=self.number, uid=self.peer.uid, pid=self.peer.pid, error=error.message))
        await self.send(response(None, error))

    # -- requests -----------------------------------------------------------------------------

    async def _handle(self, frame: Any, requests: trio.Nursery) -> bool:
        """Dispatch one decoded frame; False when the connection should close."""
        try:
            request = parse_frame(frame)
        except RpcError as exc:
            msgid = exc.data.get("id") if isinstance(exc.data, dict) else None
            if msgid is None:  # nothing to answer by id: a stream error, which closes
                await self._fail(exc)
                return False
            self.services.stats.count_error(exc.code)
            await self.send(response(msgid, exc))
            return True
        if request.id in self.inflight:
            await self._answer_error(request, RpcError(
                ErrorCode.INVALID_PARAMS, f"request id {request.id} is already in flight"))
            return True
        if request.method in INLINE_METHODS:
            await self._dispatch(request)
            return True
        if not self.services.access.privileged(self.peer):
            wait = self.services.rate.take(self.peer.uid)
            if wait is not None:
                await self._answer_error(request, RpcError(
                    ErrorCode.TOO_MANY_REQUESTS,
                    f"uid {self.peer.uid} sends more than "
                    f"{self.services.server.rate_per_s:g} requests per second",
                    {"retry_after_s": round(wait, 3)}))
                return True
        if len(self.inflight) >= self.services.server.max_inflight_per_connection:
            await self._answer_error(request, RpcError(
                ErrorCode.TOO_MANY_REQUESTS,
                f"at most {self.services.server.max_inflight_per_connection} requests "
                f"in flight per connection"))
            return True
        self.inflight.add(request.id)
        self.services.stats.inflight += 1
        requests.start_soon(self._dispatch_tracked, request)
        return True

    async def _answer_error(self, request: Request, error: RpcError) -> None:
        self.services.stats.count_error(error.code)
        await self.send(response(request.id, error))

    async def _dispatch_tracked(self, request: Request) -> None:
        try:
            await self._dispatch(request)
        finally:
            self.inflight.discard(request.id)
            self.services.stats.inflight -= 1
            self.last_active = trio.current_time()

    async def _dispatch(self, request: Request) -> None:
        t0 = time.perf_counter()
        code = "ok"
        try:
            if METHODS.get(request.method) and not self.admin:
                raise RpcError(ErrorCode.FORBIDDEN,
                               f"{request.method} is for admins; uid {self.peer.uid} is not one")
            params = validate_params(request.method, request.params, self.services.limits)
            handler = self.services.handlers[request.method]
            result = await handler(self, request, params)
            frame = response(request.id, None, result)
        except RpcError as exc:
            code = exc.code
            frame = response(request.id, exc)
        except Exception:
            code = ErrorCode.INTERNAL
            log.exception("request %s failed", request.method)
            frame = response(request.id, RpcError(ErrorCode.INTERNAL,
                                                  "internal error; see the daemon's log"))
        if code != "ok":
            self.services.stats.count_error(code)
        self.services.stats.count_request(request.method)
        await self.send(frame)
        if request.method != "ping":
            log.info("request", extra=fields(
                conn=self.number, uid=self.peer.uid, pid=self.peer.pid, id=request.id,
                method=request.method[:64], result=code,
                ms=round((time.perf_counter() - t0) * 1e3, 1)))
