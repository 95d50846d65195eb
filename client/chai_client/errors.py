"""Errors raised by the client. ``RpcError.code`` is one of the daemon's stable codes."""

from __future__ import annotations

from typing import Any


class ChaiError(Exception):
    """Base of every error of this package."""


class DaemonUnavailable(ChaiError):
    """No daemon answers at the socket path (not running, wrong path, no permission)."""


class ConnectionLost(ChaiError):
    """The connection broke after the request was sent; its outcome is unknown."""


class ProtocolViolation(ChaiError):
    """The daemon sent something that is not a valid response."""


class RpcError(ChaiError):
    """The daemon answered with an error ``{code, message, data}``."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def from_wire(cls, error: Any) -> RpcError:
        if not isinstance(error, dict):
            return cls("internal", f"malformed error from the daemon: {error!r}"[:200])
        code = str(error.get("code", "internal"))
        kind = _BY_CODE.get(code, cls)
        return kind(code, str(error.get("message", "")), error.get("data"))


class BusyError(RpcError):
    """The daemon is at a limit (queue, requests or connections): retry later."""


class CancelledError(RpcError):
    """The request was cancelled (by this client, a disconnect or the daemon stopping)."""


class ForbiddenError(RpcError):
    """This user may not call the method."""


class InvalidParams(RpcError):
    """A parameter was missing, unknown, of the wrong type or out of range."""


_BY_CODE: dict[str, type[RpcError]] = {
    "busy": BusyError,
    "too_many_requests": BusyError,
    "too_many_connections": BusyError,
    "cancelled": CancelledError,
    "shutting_down": CancelledError,
    "deadline_exceeded": CancelledError,
    "forbidden": ForbiddenError,
    "invalid_params": InvalidParams,
}
