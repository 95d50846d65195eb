"""The blocking client: one connection, one call at a time.

The connection opens on the first call and is reused. If it has broken since the last call
(the daemon restarted), the next call reconnects once before sending. If it breaks after a
request was sent, the call raises ConnectionLost: the daemon may or may not have done the
work. Interrupting a call (KeyboardInterrupt, an exception from ``on_progress``) closes the
connection, which makes the daemon cancel the request at its next denoising step.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
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
from chai_client.errors import ConnectionLost, DaemonUnavailable, RpcError
from chai_client.protocol import MAX_REQUEST_ID, MODEL_CFG_SCALE, make_unpacker, pack_request
from chai_client.results import GenerateResult, LookupResult

# Bytes read per recv: large, since a video response can be megabytes.
RECV_CHUNK = 1 << 20


class Client:
    """A blocking client of the daemon at ``socket_path`` ($CHAI_SOCKET by default).

    ``timeout`` bounds each socket operation in seconds (None: wait as long as the daemon
    works; a generation's deadline is better set with ``deadline_s``). Use one Client per
    thread, or share one: calls are serialised by a lock.
    """

    def __init__(self, socket_path: str | Path | None = None, timeout: float | None = None):
        self.socket_path = Path(socket_path) if socket_path else default_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- connection ---------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"cannot connect to {self.socket_path}: "
                                    f"{exc.strerror or exc}") from None
        self._unpacker = make_unpacker()
        return sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stale(self) -> bool:
        """Whether the open connection was closed by the daemon since the last call.

        Between calls the daemon owes nothing, so anything readable (a connection-level
        error such as the idle timeout, or end of stream) means the connection is gone.
        """
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _send(self, data: bytes) -> None:
        if self._sock is not None and self._stale():
            self.close()
        if self._sock is not None:
            try:
                self._sock.sendall(data)
                return
            except OSError:  # broken since the last call: reconnect once
                self.close()
        self._sock = self._connect()
        try:
            self._sock.sendall(data)
        except OSError as exc:
            refusal = self._refusal()
            self.close()
            if refusal is not None:
                raise refusal from None
            raise ConnectionLost(f"connection lost while sending: {exc}") from None

    def _refusal(self) -> RpcError | None:
        """The error frame a daemon sent before closing a connection it refused (too many
        connections), if it is already here: sending failed because the daemon closed."""
        try:
            self._sock.setblocking(False)
            data = self._sock.recv(RECV_CHUNK)
        except OSError:
            return None
        self._unpacker.feed(data)
        for frame in self._unpacker:
            try:
                CallState(-1, None).accept(frame)
            except RpcError as exc:
                return exc
            return None
        return None

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_progress: ProgressCallback | None = None) -> Any:
        """Send one request and wait for its response; RpcError if the daemon refuses."""
        with self._lock:
            try:
                return self._call_once(method, params, on_progress)
            except RpcError as exc:
                # An idle-timeout refusal means the daemon closed the connection without
                # reading the request (it fires only on an idle connection): send it anew.
                if getattr(exc, "fatal", False) and exc.code == "timeout":
                    return self._call_once(method, params, on_progress)
                raise

    def _call_once(self, method: str, params: dict[str, Any] | None,
                   on_progress: ProgressCallback | None) -> Any:
        msgid = next(self._ids) % (MAX_REQUEST_ID + 1)
        state = CallState(msgid, on_progress)
        self._send(pack_request(msgid, method, params or {}))
        try:
            while True:
                for frame in self._unpacker:
                    done, result = state.accept(frame)
                    if done:
                        return result
                try:
                    data = self._sock.recv(RECV_CHUNK)
                except OSError as exc:
                    raise ConnectionLost(f"connection lost: {exc}") from None
                if not data:
                    raise ConnectionLost("the daemon closed the connection")
                self._unpacker.feed(data)
        except RpcError as exc:
            if getattr(exc, "fatal", False):  # the daemon closes the stream after it
                self.close()
            raise
        except BaseException:
            # Whatever stopped us (an error, Ctrl-C), the stream may hold the rest of
            # this call: start afresh next time. Closing also cancels the request.
            self.close()
            raise

    # -- methods ------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def generate(
        self, prompt: str, *, frames: int | None = None, height: int | None = None,
        width: int | None = None, seed: int = 0, cfg_scale: float | str | None = MODEL_CFG_SCALE,
        cache: str = "auto", steps: int | None = None, format: str = "mp4",
        deadline_s: float | None = None, on_progress: ProgressCallback | None = None,
        priority: int = 0,
    ) -> GenerateResult:
        """Generate a video. ``cache``: "auto" (hit → fast, miss → full and cache),
        "refresh" (force a miss) or "off" (``steps`` plain steps, cache untouched).
        ``on_progress(step, steps)`` is called before each denoising step. ``priority``
        (0-9) orders this client's own queued requests; clients take turns whatever
        their priorities."""
        params = generate_params(prompt, frames=frames, height=height, width=width,
                                 seed=seed, cfg_scale=cfg_scale, cache=cache, steps=steps,
                                 format=format, progress=on_progress is not None,
                                 deadline_s=deadline_s, priority=priority)
        t0 = time.perf_counter()
        result = self.call("generate", params, on_progress)
        return GenerateResult.from_wire(result, (time.perf_counter() - t0) * 1e3)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def lookup(self, prompt: str, *, frames: int | None = None, height: int | None = None,
               width: int | None = None) -> LookupResult:
        """Would this prompt hit, which entry, and why (changes nothing)."""
        return LookupResult.from_wire(
            self.call("cache.lookup", size_params(prompt, frames, height, width)))

    def cache_list(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.call("cache.list", {"limit": limit})["entries"]

    def cache_evict(self, entry_ids: list[int]) -> dict[str, Any]:
        return self.call("cache.evict", {"entry_ids": list(entry_ids)})

    def cache_clear(self) -> int:
        return self.call("cache.clear")["evicted"]

    def cache_warm(self, prompt: str, **sizes: Any) -> dict[str, Any]:
        """Run a full generation only to cache its latents (admin)."""
        return self.call("cache.warm", {"prompt": prompt, **sizes})
