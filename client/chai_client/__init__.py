"""Thin client of the chaid daemon: ``Client`` (blocking), ``AsyncClient`` (asyncio/trio).

Depends on msgpack only; numpy, if installed, is used to return raw frames as arrays.
"""

from chai_client.aio import AsyncClient
from chai_client.errors import (
    BusyError,
    CancelledError,
    ChaiError,
    ConnectionLost,
    DaemonUnavailable,
    ForbiddenError,
    InvalidParams,
    ProtocolViolation,
    RpcError,
)
from chai_client.protocol import ErrorCode
from chai_client.results import EntityMatch, GenerateResult, LookupResult, Match
from chai_client.sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BusyError",
    "CancelledError",
    "ChaiError",
    "Client",
    "ConnectionLost",
    "DaemonUnavailable",
    "EntityMatch",
    "ErrorCode",
    "ForbiddenError",
    "GenerateResult",
    "InvalidParams",
    "LookupResult",
    "Match",
    "ProtocolViolation",
    "RpcError",
]
