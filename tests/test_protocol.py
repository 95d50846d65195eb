"""The wire protocol without a daemon: frames, parameters, the array type, the client mirror."""

from __future__ import annotations

import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaid import protocol
from chaid.limits import RequestLimits
from chaid.protocol import ErrorCode, RpcError, parse_frame, validate_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
from chai_client import protocol as client_protocol  # noqa: E402

LIMITS = RequestLimits()


def test_request_frames():
    req = parse_frame([0, 7, "ping", {}])
    assert (req.id, req.method, req.params) == (7, "ping", {})
    assert parse_frame([0, 7, "ping", None]).params == {}
    for bad in ([], [0], [1, 2, None, None], [2, "x", {}], [0, -1, "p", {}],
                [0, 2**32, "p", {}], [0, True, "p", {}], [0, 1, "p", {}, 5], "x", None,
                [np.zeros(2), 1, "p", {}], [np.zeros(()), 1, "p", {}], [0.0, 1, "p", {}],
                [0, np.zeros(2), "p", {}]):
        with pytest.raises(RpcError) as err:
            parse_frame(bad)
        assert err.value.code == ErrorCode.MALFORMED
    with pytest.raises(RpcError) as err:
        parse_frame([0, 3, 5, {}])
    assert err.value.data == {"id": 3}
    with pytest.raises(RpcError) as err:
        parse_frame([0, 3, "ping", [1, 2]])
    assert err.value.code == ErrorCode.INVALID_PARAMS
    deep: list = []
    for _ in range(20):
        deep = [deep]
    with pytest.raises(RpcError):
        parse_frame([0, 3, "ping", {"x": deep}])


def test_generate_params_defaults_and_bounds():
    p = validate_params("generate", {"prompt": "a fox"}, LIMITS)
    assert p["cache"] == "auto" and p["format"] == "mp4" and p["seed"] == 0
    assert p["frames"] is None and p["cfg_scale"] == protocol.MODEL_CFG_SCALE
    assert validate_params("generate", {"prompt": "a", "cfg_scale": None}, LIMITS)[
        "cfg_scale"] is None
    bad = [
        {"prompt": ""}, {"prompt": "   "}, {"prompt": "a\x00b"}, {"prompt": b"bytes"},
        {"prompt": "a", "frames": 0}, {"prompt": "a", "frames": True},
        {"prompt": "a", "width": 4096}, {"prompt": "a", "cfg_scale": float("inf")},
        {"prompt": "a", "cache": "maybe"}, {"prompt": "a", "progress": 1},
        {"prompt": "a", "deadline_s": 0}, {"prompt": "a", "deadline_s": 10**9},
        {"prompt": "a", "steps": 3}, {"prompt": "a", "output": "/tmp/x"},
    ]
    for params in bad:
        with pytest.raises(RpcError) as err:
            validate_params("generate", params, LIMITS)
        assert err.value.code == ErrorCode.INVALID_PARAMS, params
    with pytest.raises(RpcError) as err:
        validate_params("shutdown", {}, LIMITS)
    assert err.value.code == ErrorCode.UNKNOWN_METHOD


def test_every_method_has_params_and_admin_flag():
    assert set(protocol.METHODS) == set(protocol.PARAMS)
    assert {m for m, admin in protocol.METHODS.items() if admin} == {
        "cache.evict", "cache.clear", "cache.warm"}


def test_array_ext_roundtrip_and_refusals():
    video = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    data = protocol.packb({"video": video})
    unpacker = protocol.make_unpacker(1 << 20)
    unpacker.feed(data)
    back = unpacker.unpack()["video"]
    assert back.dtype == np.uint8 and np.array_equal(back, video)
    assert not back.flags.writeable  # zero-copy view of the frame
    with pytest.raises(TypeError):
        protocol.packb(np.array(["a"], dtype=object))
    for header, payload in [(["|O", [1]], b"\0" * 8), (["<f4", [4]], b"\0" * 3),
                            (["<U3", [1]], b"\0" * 12), (["<f4", [-1]], b""),
                            (["nope", [1]], b"\0")]:
        with pytest.raises(ValueError):
            protocol.unpack_array(msgpack.packb(header) + payload)


def test_client_leaves_out_the_guidance_scale_unless_given():
    from chai_client._calls import generate_params

    common = dict(frames=None, height=None, width=None, seed=0, cache="auto", steps=None,
                  format="mp4", progress=False, deadline_s=None)
    default = generate_params("a fox", cfg_scale=client_protocol.MODEL_CFG_SCALE, **common)
    assert "cfg_scale" not in default
    assert validate_params("generate", default, LIMITS)["cfg_scale"] == protocol.MODEL_CFG_SCALE
    assert generate_params("a fox", cfg_scale=None, **common)["cfg_scale"] is None
    assert generate_params("a fox", cfg_scale=4.0, **common)["cfg_scale"] == 4.0


def test_client_mirror_agrees_with_the_daemon():
    daemon_codes = {v for k, v in vars(ErrorCode).items() if k.isupper() and k != "ALL"}
    client_codes = {v for k, v in vars(client_protocol.ErrorCode).items() if k.isupper()}
    assert daemon_codes == client_codes == ErrorCode.ALL
    for name in ("PROTOCOL_VERSION", "REQUEST", "RESPONSE", "NOTIFICATION", "NDARRAY_EXT",
                 "MAX_REQUEST_ID", "ARRAY_KINDS", "MODEL_CFG_SCALE"):
        assert getattr(protocol, name) == getattr(client_protocol, name), name
    frames = np.zeros((1, 2, 2, 3), np.uint8)
    unpacker = client_protocol.make_unpacker()
    unpacker.feed(protocol.packb([1, 3, None, {"video": frames}]))
    assert np.array_equal(unpacker.unpack()[3]["video"], frames)
    frame = msgpack.unpackb(client_protocol.pack_request(9, "ping", {}), raw=False)
    assert parse_frame(frame).id == 9


# -- fuzz -------------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**64 + 1, 2**64 - 1),
                     st.floats(allow_nan=True), st.text(max_size=50), st.binary(max_size=50))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20)
_param_names = st.sampled_from(["prompt", "frames", "height", "width", "seed", "cfg_scale",
                                "steps", "cache", "format", "progress", "deadline_s",
                                "request_id", "entry_ids", "limit", "other"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.one_of(st.sampled_from(sorted(protocol.METHODS)), st.text(max_size=20)),
       params=st.dictionaries(st.one_of(_param_names, st.binary(max_size=5)), _values,
                              max_size=6))
def test_fuzz_validation_only_raises_rpc_errors(method, params):
    try:
        out = validate_params(method, parse_frame([0, 1, method, params]).params, LIMITS)
    except RpcError as exc:
        assert exc.code in ErrorCode.ALL and exc.message
        return
    assert set(out) == set(protocol.PARAMS[method])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzz_bytes_decode_or_refuse(data):
    """Random bytes through the daemon's decoder and frame parser: a frame, a refusal or
    a need for more bytes; never another exception type escaping the parser."""
    unpacker = protocol.make_unpacker(256)
    try:
        unpacker.feed(data)
    except msgpack.BufferFull:
        return
    while True:
        try:
            frame = unpacker.unpack()
        except msgpack.OutOfData:
            return
        except Exception:  # the connection answers "malformed" and closes
            return
        try:
            req = parse_frame(frame)
            validate_params(req.method, req.params, LIMITS)
        except RpcError:
            pass


@pytest.mark.parametrize("loop", ["asyncio", "trio", "blocking"])
def test_client_reads_a_refusal_after_its_send_broke(tmp_path, loop):
    """A daemon at its connection cap writes one error frame and closes without reading.

    The request here is larger than the socket buffers, so the client's send fails with a
    broken pipe; the refusal already delivered must still be read and raised as BusyError.
    """
    import asyncio
    import socket
    import threading

    import trio

    from chai_client import AsyncClient, Client
    from chai_client.errors import BusyError

    path = str(tmp_path / "refuse.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    frame = protocol.response(None, RpcError(ErrorCode.BUSY, "too many connections (1)",
                                             {"max_connections": 1}))

    def refuse_once() -> None:
        conn, _ = listener.accept()
        conn.sendall(frame)
        conn.close()

    server = threading.Thread(target=refuse_once, daemon=True)
    server.start()
    call = AsyncClient(path).call
    big = {"pad": "x" * (8 << 20)}
    try:
        with pytest.raises(BusyError) as err:
            if loop == "asyncio":
                asyncio.run(call("ping", big))
            elif loop == "trio":
                trio.run(call, "ping", big)
            else:
                with Client(path, timeout=10) as client:
                    client.call("ping", big)
    finally:
        server.join(5)
        listener.close()
    assert err.value.data == {"max_connections": 1}
