"""Parameters of each method and the decoding of one call's frames (shared by both clients)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chai_client.errors import ProtocolViolation, RpcError
from chai_client.protocol import MODEL_CFG_SCALE, NOTIFICATION, RESPONSE

# The path chaid.socket listens on; $CHAI_SOCKET overrides it.
DEFAULT_SOCKET = "/run/chaid/chaid.sock"

ProgressCallback = Callable[[int, int], None]


def default_socket() -> Path:
    return Path(os.environ.get("CHAI_SOCKET") or DEFAULT_SOCKET)


def generate_params(
    prompt: str, *, frames: int | None, height: int | None, width: int | None, seed: int,
    cfg_scale: float | str | None, cache: str, steps: int | None, format: str, progress: bool,
    deadline_s: float | None, priority: int = 0,
) -> dict[str, Any]:
    params: dict[str, Any] = {"prompt": prompt, "seed": seed, "cache": cache,
                              "format": format, "progress": progress}
    if priority:  # left out: 0, which older daemons also take
        params["priority"] = priority
    for name, value in (("frames", frames), ("height", height), ("width", width),
                        ("steps", steps), ("deadline_s", deadline_s)):
        if value is not None:
            params[name] = value
    if cfg_scale != MODEL_CFG_SCALE:  # left out: the daemon uses the model's own scale
        params["cfg_scale"] = cfg_scale
    return params


def size_params(prompt: str, frames: int | None, height: int | None,
                width: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {"prompt": prompt}
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if value is not None:
            params[name] = value
    return params


class CallState:
    """Follows the frames of one call: progress notifications, then its response."""

    def __init__(self, msgid: int, on_progress: ProgressCallback | None) -> None:
        self.msgid = msgid
        self.on_progress = on_progress

    def accept(self, frame: Any) -> tuple[bool, Any]:
        """(True, result) when ``frame`` is this call's response; raises RpcError for an
        error response; (False, None) for anything else (progress is delivered)."""
        if not isinstance(frame, list | tuple) or not frame:
            raise ProtocolViolation(f"unexpected frame {frame!r}"[:200])
        if frame[0] == NOTIFICATION and len(frame) == 3:
            _, method, params = frame
            if (method == "progress" and isinstance(params, dict)
                    and params.get("request_id") == self.msgid and self.on_progress):
                self.on_progress(int(params["step"]), int(params["steps"]))
            return False, None
        if frame[0] == RESPONSE and len(frame) == 4:
            _, msgid, error, result = frame
            if msgid is None and error is not None:  # the daemon refused the stream
                exc = RpcError.from_wire(error)
                exc.fatal = True  # it closes the connection after this frame
                raise exc
            if msgid != self.msgid:
                return False, None
            if error is not None:
                raise RpcError.from_wire(error)
            return True, result
        raise ProtocolViolation(f"unexpected frame {frame!r}"[:200])
