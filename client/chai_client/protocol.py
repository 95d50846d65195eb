"""The wire format shared with the daemon (a mirror of chaid's ``chaid/protocol.py``).

Frames are msgpack-rpc: request ``[0, id, method, params]``, response
``[1, id, error, result]``, notification ``[2, method, params]``. numpy arrays travel as
the extension type :data:`NDARRAY_EXT` (header ``[dtype, shape]`` + raw bytes). This
package must not import chaid; a test in the chaid repository checks the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

NDARRAY_EXT = 1
MAX_REQUEST_ID = 2**32 - 1
# cfg_scale meaning "the daemon model's own scale": the client leaves the parameter out.
MODEL_CFG_SCALE = "model"
ARRAY_KINDS = frozenset("biuf")
# Largest response accepted: a video of a few hundred frames at 1024x1024 as raw frames.
MAX_RESPONSE_BYTES = 2 << 30


class ErrorCode:
    """Stable error codes of the daemon (docs/protocol.md)."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"
    FORBIDDEN = "forbidden"
    BUSY = "busy"
    TOO_MANY_REQUESTS = "too_many_requests"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SHUTTING_DOWN = "shutting_down"
    NOT_FOUND = "not_found"
    STORE_ERROR = "store_error"
    INTERNAL = "internal"


@dataclass(frozen=True)
class RawArray:
    """An array from the wire when numpy is not installed: dtype string, shape, bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def _unpack_array(data: bytes) -> Any:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    offset = unpacker.tell()
    try:
        import numpy as np
    except ImportError:
        return RawArray(dtype, tuple(shape), bytes(data[offset:]))
    dt = np.dtype(dtype)
    if dt.kind not in ARRAY_KINDS:
        raise ValueError(f"refusing an array of dtype {dtype}")
    count = math.prod(shape)
    return np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == NDARRAY_EXT:
        return _unpack_array(data)
    return msgpack.ExtType(code, data)


def _default(obj: Any) -> Any:
    if hasattr(obj, "__array__") and hasattr(obj, "dtype"):
        import numpy as np

        arr = np.ascontiguousarray(obj)
        if arr.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"cannot send an array of dtype {arr.dtype}")
        header = msgpack.packb([arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(NDARRAY_EXT, header + arr.tobytes())
    raise TypeError(f"cannot send a {type(obj).__name__}")


def pack_request(msgid: int, method: str, params: dict[str, Any]) -> bytes:
    return msgpack.packb([REQUEST, msgid, method, params], default=_default, use_bin_type=True)


def make_unpacker(max_bytes: int = MAX_RESPONSE_BYTES) -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=max_bytes, ext_hook=_ext_hook,
                            strict_map_key=False)
