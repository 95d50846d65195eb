"""The wire protocol: msgpack-rpc frames over a Unix stream socket.

Frames (msgpack arrays, one after another on the stream):

* request ``[0, id, method, params]``: ``id`` an unsigned 32-bit integer chosen by the
  client, ``method`` a string, ``params`` a map;
* response ``[1, id, error, result]``: ``error`` is nil or ``{code, message, data}``;
* notification ``[2, method, params]``: sent by the daemon (``progress``).

numpy arrays travel as the msgpack extension type :data:`NDARRAY_EXT`: the payload is a
msgpack array ``[dtype, shape]`` followed by the raw C-ordered bytes. Only plain numeric
dtypes are accepted; nothing is ever pickled.

This module is mirrored by ``chai_client/protocol.py`` (the client never imports chaid);
a test checks that the two agree on codes, limits and the extension type. Error codes are
stable strings: clients branch on them, people read the message (docs/protocol.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from chaid.checks import check_choice, check_int, check_number
from chaid.config import MODEL_CFG_SCALE
from chaid.limits import MAX_CFG_SCALE, MAX_SEED, MIN_SIDE, RequestLimits
from chaid.modes import CacheMode

PROTOCOL_VERSION = 1

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

# msgpack extension type code of a numpy array.
NDARRAY_EXT = 1
# Largest request id: msgpack-rpc's msgid is a 32-bit unsigned integer.
MAX_REQUEST_ID = 2**32 - 1
# Deepest nesting a request may have; real requests are two levels deep.
MAX_DEPTH = 8
# Dtype kinds an array may have: bool, signed, unsigned, float. No objects, strings, voids.
ARRAY_KINDS = frozenset("biuf")
# Largest rank of an array on the wire (video frames are 4-d, latents 4- or 5-d).
MAX_ARRAY_DIMS = 8


class ErrorCode:
    """Stable error codes (docs/protocol.md). Never renumbered or reworded."""

    MALFORMED = "malformed"  # not msgpack, or not a msgpack-rpc frame
    TOO_LARGE = "too_large"  # a frame over server.max_message_bytes
    TIMEOUT = "timeout"  # a frame began and did not arrive whole in time
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"  # missing, unknown, wrongly typed or out-of-range params
    FORBIDDEN = "forbidden"  # the peer's uid/gid may not call this method
    BUSY = "busy"  # the queue is full (or too many connections): retry later
    TOO_MANY_REQUESTS = "too_many_requests"  # this connection has too many in flight
    TOO_MANY_CONNECTIONS = "too_many_connections"  # this user holds its share of connections
    CANCELLED = "cancelled"  # the client cancelled the request
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SHUTTING_DOWN = "shutting_down"  # the daemon is stopping; no new work is accepted
    NOT_FOUND = "not_found"  # no such cache entry or request id
    STORE_ERROR = "store_error"  # the cache refused (full disk, entry too large)
    INTERNAL = "internal"  # a bug: the daemon logged the details

    ALL = frozenset(
        {
            MALFORMED,
            TOO_LARGE,
            TIMEOUT,
            UNKNOWN_METHOD,
            INVALID_PARAMS,
            FORBIDDEN,
            BUSY,
            TOO_MANY_REQUESTS,
            TOO_MANY_CONNECTIONS,
            CANCELLED,
            DEADLINE_EXCEEDED,
            SHUTTING_DOWN,
            NOT_FOUND,
            STORE_ERROR,
            INTERNAL,
        }
    )


class RpcError(Exception):
    """An error answered to the client as ``{code, message, data}``."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


class ProtocolError(RpcError):
    """The byte stream itself is broken: answered once, then the connection is closed."""


# -- numpy extension type ------------------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def pack_array(array: np.ndarray) -> msgpack.ExtType:
    """A numpy array as the NDARRAY ext type (header + raw bytes, C order)."""
    if array.dtype.kind not in ARRAY_KINDS:
        raise TypeError(f"arrays of dtype {array.dtype} are not sent over the wire")
    array = np.ascontiguousarray(array)
    header = msgpack.packb([array.dtype.str, list(array.shape)])
    return msgpack.ExtType(NDARRAY_EXT, header + array.tobytes())


def unpack_array(data: bytes) -> np.ndarray:
    """Rebuild an array from NDARRAY ext bytes, zero-copy (read-only); ValueError if bad."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) or 1)
    unpacker.feed(data)
    try:
        header = unpacker.unpack()
    except (msgpack.OutOfData, ValueError) as exc:
        raise ValueError("array header is not msgpack") from exc
    if not (isinstance(header, list) and len(header) == 2):
        raise ValueError("array header must be [dtype, shape]")
    dtype_str, shape = header
    if not isinstance(dtype_str, str) or not isinstance(shape, list):
        raise ValueError("array header must be [dtype, shape]")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError:
        raise ValueError(f"unknown array dtype {dtype_str!r}") from None
    if dtype.kind not in ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"arrays of dtype {dtype_str!r} are not accepted")
    if len(shape) > MAX_ARRAY_DIMS or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape
    ):
        raise ValueError("array shape must be a short list of non-negative integers")
    offset = unpacker.tell()
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"array of {shape} {dtype_str} needs {count * dtype.itemsize} bytes, "
            f"got {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == NDARRAY_EXT:
        return unpack_array(data)
    raise ValueError(f"unknown msgpack extension type {code}")


def packb(obj: Any) -> bytes:
    """Serialise one frame (numpy arrays become the ext type)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def make_unpacker(max_message_bytes: int) -> msgpack.Unpacker:
    """A streaming unpacker for one connection that refuses anything larger than a frame.

    ``feed`` raises BufferFull once more than ``max_message_bytes`` are buffered; string,
    binary, array, map and ext headers that claim more than that are refused without
    allocating. After any error other than OutOfData the unpacker is unusable.
    """
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_buffer_size=max_message_bytes,
        max_str_len=max_message_bytes,
        max_bin_len=max_message_bytes,
        max_array_len=max_message_bytes,
        max_map_len=max_message_bytes,
        max_ext_len=max_message_bytes,
        ext_hook=_ext_hook,
    )


# -- frames --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: dict[str, Any]


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of lists and maps, counting stops just past ``limit``."""
    if limit < 0:
        return 1
    if isinstance(obj, list | tuple):
        return 1 + max((depth(x, limit - 1) for x in obj), default=0)
    if isinstance(obj, dict):
        return 1 + max((depth(v, limit - 1) for v in obj.values()), default=0)
    return 0


def parse_frame(frame: Any) -> Request:
    """Check one decoded frame is a msgpack-rpc request; RpcError(MALFORMED) if not.

    The error's ``data`` carries the request id when one could be read, so that the answer
    can name the request it refuses.
    """
    if not isinstance(frame, list) or not frame:
        raise RpcError(ErrorCode.MALFORMED, "a frame must be a msgpack-rpc array")
    kind = frame[0]
    # Type first: an array compared with == is an array, whose truth value raises.
    if isinstance(kind, bool) or not isinstance(kind, int) or kind != REQUEST:
        raise RpcError(ErrorCode.MALFORMED, "only requests [0, id, method, params] are accepted")
    if len(frame) != 4:
        raise RpcError(ErrorCode.MALFORMED, "a request has exactly 4 elements")
    _, msgid, method, params = frame
    if isinstance(msgid, bool) or not isinstance(msgid, int) or not 0 <= msgid <= MAX_REQUEST_ID:
        raise RpcError(ErrorCode.MALFORMED, "a request id must be an unsigned 32-bit integer")
    if not isinstance(method, str):
        raise RpcError(ErrorCode.MALFORMED, "a method name must be a string", {"id": msgid})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(ErrorCode.INVALID_PARAMS, "params must be a map", {"id": msgid})
    if not all(isinstance(k, str) for k in params):
        raise RpcError(ErrorCode.INVALID_PARAMS, "parameter names must be strings",
                       {"id": msgid})
    if depth(params) > MAX_DEPTH:
        raise RpcError(ErrorCode.INVALID_PARAMS, "params are nested too deeply", {"id": msgid})
    return Request(msgid, method, params)


def response(msgid: int | None, error: RpcError | None = None, result: Any = None) -> bytes:
    return packb([RESPONSE, msgid, error.to_wire() if error else None, result])


def notification(method: str, params: Mapping[str, Any]) -> bytes:
    return packb([NOTIFICATION, method, dict(params)])


# -- parameters ----------------------------------------------------------------------------

# Methods and whether they need an admin peer.
METHODS: dict[str, bool] = {
    "ping": False,
    "generate": False,
    "cancel": False,
    "stats": False,
    "cache.lookup": False,
    "cache.list": False,
    "cache.evict": True,
    "cache.clear": True,
    "cache.warm": True,
}

CACHE_MODES = tuple(mode.value for mode in CacheMode)
VIDEO_FORMATS = ("mp4", "frames")
# Highest priority a generate may ask for (0, the default, is the lowest).
MAX_PRIORITY = 9
# Largest number of entries one cache.list or cache.evict names; bounds response sizes.
MAX_LIST = 10_000
# Largest entry id: ids are LMDB keys of 8 bytes, signed for msgpack's sake.
MAX_ENTRY_ID = 2**63 - 1


Check = Callable[[str, Any, RequestLimits], Any]


def _invalid(message: str) -> RpcError:
    return RpcError(ErrorCode.INVALID_PARAMS, message)


def _int_in(low: int, high: Callable[[RequestLimits], int] | int) -> Check:
    def check(name: str, value: Any, limits: RequestLimits) -> int:
        return check_int(name, value, low, high(limits) if callable(high) else high, _invalid)

    return check


def _number_in(low: float, high: Callable[[RequestLimits], float] | float, *,
               open_low=False) -> Check:
    def check(name: str, value: Any, limits: RequestLimits) -> float:
        return check_number(name, value, low, high(limits) if callable(high) else high,
                            open_low=open_low, error=_invalid)

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(name: str, value: Any, limits: RequestLimits) -> str:
        return check_choice(name, value, options, _invalid)

    return check


def _prompt(name: str, value: Any, limits: RequestLimits) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string, not {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise _invalid(f"{name} is {len(value)} characters; the limit is "
                       f"{limits.max_prompt_chars}")
    if not value.strip():
        raise _invalid(f"{name} must not be empty")
    if any(ord(c) < 32 and c not in "\t\n" for c in value):
        raise _invalid(f"{name} must not contain control characters")
    return value


def _bool(name: str, value: Any, limits: RequestLimits) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be true or false, not {type(value).__name__}")
    return value


def _optional(check: Check) -> Check:
    def wrapped(name: str, value: Any, limits: RequestLimits) -> Any:
        return None if value is None else check(name, value, limits)

    return wrapped


def _id_list(name: str, value: Any, limits: RequestLimits) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > MAX_LIST:
        raise _invalid(f"{name} must be a non-empty list of at most {MAX_LIST} entry ids")
    return [check_int(f"{name}[]", v, 0, MAX_ENTRY_ID, _invalid) for v in value]


@dataclass(frozen=True)
class Param:
    check: Check
    required: bool = False
    default: Any = None


# The prompt and video size, shared by every method that takes a prompt.
_PROMPT_AND_SIZE: dict[str, Param] = {
    "prompt": Param(_prompt, required=True),
    "frames": Param(_optional(_int_in(1, lambda lim: lim.max_frames))),
    "height": Param(_optional(_int_in(MIN_SIDE, lambda lim: lim.max_side))),
    "width": Param(_optional(_int_in(MIN_SIDE, lambda lim: lim.max_side))),
}
# Noise seed and guidance, shared by the methods that generate.
_SAMPLING: dict[str, Param] = {
    "seed": Param(_int_in(0, MAX_SEED), default=0),
    # Left out: the model's own scale (the engine resolves MODEL_CFG_SCALE).
    "cfg_scale": Param(_optional(_number_in(0.0, MAX_CFG_SCALE)), default=MODEL_CFG_SCALE),
}
_DEADLINE: dict[str, Param] = {
    "deadline_s": Param(_optional(_number_in(0.0, lambda lim: lim.max_deadline_s,
                                             open_low=True))),
}

# Each method's parameters: name → (check, required, default). Unknown names are an error,
# so a misspelt option never silently falls back to a default.
PARAMS: dict[str, dict[str, Param]] = {
    "ping": {},
    "generate": {
        **_PROMPT_AND_SIZE,
        **_SAMPLING,
        # Only with cache="off": with the cache, the steps are the CHAI modes' (full/fast).
        "steps": Param(_optional(_int_in(1, lambda lim: lim.max_steps))),
        "cache": Param(_choice(CACHE_MODES), default=CacheMode.AUTO.value),
        "format": Param(_choice(VIDEO_FORMATS), default="mp4"),
        "progress": Param(_bool, default=False),
        # Order among this client's own queued requests (higher first); clients take turns
        # whatever their priorities (chaid/engine/scheduler.py).
        "priority": Param(_int_in(0, MAX_PRIORITY), default=0),
        **_DEADLINE,
    },
    "cancel": {"request_id": Param(_int_in(0, MAX_REQUEST_ID), required=True)},
    "stats": {},
    "cache.lookup": {
        **_PROMPT_AND_SIZE,
    },
    "cache.list": {
        "limit": Param(_int_in(0, MAX_LIST), default=100),
    },
    "cache.evict": {"entry_ids": Param(_id_list, required=True)},
    "cache.clear": {},
    "cache.warm": {
        **_PROMPT_AND_SIZE,
        **_SAMPLING,
        **_DEADLINE,
    },
}


def validate_params(method: str, params: Mapping[str, Any], limits: RequestLimits) -> dict[str, Any]:
    """Checked parameters of a method with defaults filled in.

    Raises RpcError UNKNOWN_METHOD for a method not in :data:`METHODS`, INVALID_PARAMS for
    an unknown, missing, mistyped or out-of-range parameter (the message names it).
    """
    spec = PARAMS.get(method)
    if spec is None:
        raise RpcError(ErrorCode.UNKNOWN_METHOD, f"unknown method {method[:64]!r}",
                       {"methods": sorted(METHODS)})
    unknown = sorted(k for k in params if k not in spec)
    if unknown:
        raise _invalid(f"unknown parameter(s) for {method}: {', '.join(map(str, unknown))[:200]}"
                       f" (known: {', '.join(spec) or 'none'})")
    out: dict[str, Any] = {}
    for name, param in spec.items():
        if name not in params:
            if param.required:
                raise _invalid(f"{method} needs the parameter {name!r}")
            out[name] = param.default
            continue
        out[name] = param.check(name, params[name], limits)
    if method == "generate" and out["steps"] is not None and out["cache"] != CacheMode.OFF:
        raise _invalid("steps may be given only with cache='off' (a hit runs the fast mode's "
                       "steps and a miss the full mode's)")
    return out
