"""The async client, for asyncio and trio applications alike.

Each call opens its own connection to the daemon (a Unix socket connect costs tens of
microseconds), so calls may run concurrently from many tasks, a broken connection never
outlives the call that saw it, and cancelling the awaiting task (asyncio ``Task.cancel``,
a trio cancel scope or timeout) closes the connection, which makes the daemon cancel the
request at its next denoising step. The event loop is detected at call time; trio is
imported only when the caller runs under trio.
"""

from __future__ import annotations

import itertools
import socket
import sys
import time
from pathlib import Path
from typing import Any

from chai_client._calls import (
    CallState,
    ProgressCallback,
    default_socket,
    generate_params,
    size_params,
)
from chai_client.errors import ConnectionLost, DaemonUnavailable
from chai_client.protocol import MAX_REQUEST_ID, MODEL_CFG_SCALE, make_unpacker, pack_request
from chai_client.results import GenerateResult, LookupResult

RECV_CHUNK = 1 << 20


def _running_under_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _broken(exc: Exception) -> bool:
    """The stream broke (either library's way of saying so)."""
    return isinstance(exc, OSError) or type(exc).__name__ in (
        "BrokenResourceError", "ClosedResourceError")


class _AsyncioStream:
    """A non-blocking socket driven by the running asyncio loop.

    Not asyncio's stream classes: when a send fails because the daemon refused the
    connection and closed it, their transport discards whatever the daemon had already
    written, so the refusal's reason would be lost. A plain socket keeps those bytes
    readable after the failed send.
    """

    def __init__(self, sock: socket.socket) -> None:
        import asyncio

        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, path: str) -> _AsyncioStream:
        import asyncio

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send_all(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def receive_some(self) -> bytes:
        return await self.loop.sock_recv(self.sock, RECV_CHUNK)

    async def aclose(self) -> None:
        self.sock.close()


class _TrioStream:
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    @classmethod
    async def connect(cls, path: str) -> _TrioStream:
        import trio

        return cls(await trio.open_unix_socket(path))

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_some(self) -> bytes:
        return await self.stream.receive_some(RECV_CHUNK)

    async def aclose(self) -> None:
        import trio

        await trio.aclose_forcefully(self.stream)


class AsyncClient:
    """Async counterpart of :class:`chai_client.Client` (same methods, awaited)."""

    def __init__(self, socket_path: str | Path | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket()
        self._ids = itertools.count(1)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def aclose(self) -> None:
        """Nothing to release (each call owns its connection); kept for symmetry."""

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   on_progress: ProgressCallback | None = None) -> Any:
        """Send one request on a fresh connection and await its response."""
        backend = _TrioStream if _running_under_trio() else _AsyncioStream
        try:
            stream = await backend.connect(str(self.socket_path))
        except OSError as exc:
            raise DaemonUnavailable(f"cannot connect to {self.socket_path}: "
                                    f"{exc.strerror or exc}") from None
        try:
            msgid = next(self._ids) % (MAX_REQUEST_ID + 1)
            state = CallState(msgid, on_progress)
            unpacker = make_unpacker()
            lost = "the daemon closed the connection"
            try:
                await stream.send_all(pack_request(msgid, method, params or {}))
            except Exception as exc:  # OSError, trio.BrokenResourceError
                if not _broken(exc):
                    raise
                # The daemon may have refused the connection first: read its reason.
                lost = f"connection lost while sending: {exc}"
            while True:
                for frame in unpacker:
                    done, result = state.accept(frame)
                    if done:
                        return result
                try:
                    data = await stream.receive_some()
                except Exception as exc:  # OSError, trio.BrokenResourceError
                    if _broken(exc):
                        raise ConnectionLost(f"connection lost: {exc}") from None
                    raise
                if not data:
                    raise ConnectionLost(lost)
                unpacker.feed(data)
        finally:
            await stream.aclose()

    async def ping(self) -> dict[str, Any]:
        return await self.call("ping")

    async def generate(
        self, prompt: str, *, frames: int | None = None, height: int | None = None,
        width: int | None = None, seed: int = 0, cfg_scale: float | str | None = MODEL_CFG_SCALE,
        cache: str = "auto", steps: int | None = None, format: str = "mp4",
        deadline_s: float | None = None, on_progress: ProgressCallback | None = None,
        priority: int = 0,
    ) -> GenerateResult:
        params = generate_params(prompt, frames=frames, height=height, width=width,
                                 seed=seed, cfg_scale=cfg_scale, cache=cache, steps=steps,
                                 format=format, progress=on_progress is not None,
                                 deadline_s=deadline_s, priority=priority)
        t0 = time.perf_counter()
        result = await self.call("generate", params, on_progress)
        return GenerateResult.from_wire(result, (time.perf_counter() - t0) * 1e3)

    async def stats(self) -> dict[str, Any]:
        return await self.call("stats")

    async def lookup(self, prompt: str, *, frames: int | None = None,
                     height: int | None = None, width: int | None = None) -> LookupResult:
        return LookupResult.from_wire(
            await self.call("cache.lookup", size_params(prompt, frames, height, width)))

    async def cache_list(self, limit: int = 100) -> list[dict[str, Any]]:
        return (await self.call("cache.list", {"limit": limit}))["entries"]

    async def cache_evict(self, entry_ids: list[int]) -> dict[str, Any]:
        return await self.call("cache.evict", {"entry_ids": list(entry_ids)})

    async def cache_clear(self) -> int:
        return (await self.call("cache.clear"))["evicted"]

    async def cache_warm(self, prompt: str, **sizes: Any) -> dict[str, Any]:
        return await self.call("cache.warm", {"prompt": prompt, **sizes})
