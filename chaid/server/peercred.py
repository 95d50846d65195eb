"""Peer credentials (SO_PEERCRED) and the access policy built on them.

The kernel reports the pid, uid and gid of the process that connected; supplementary
groups come from SO_PEERGROUPS where the kernel has it, else from the group database for
the uid. Neither can be forged by the peer, unlike anything it sends.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from chaid.errors import ConfigError

# Linux socket option numbers; Python's socket module lacks SO_PEERGROUPS.
SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# Room for this many supplementary groups in one SO_PEERGROUPS call (NGROUPS_MAX is 65536,
# but real users have a handful; the kernel reports ERANGE if more, and we fall back).
_MAX_PEER_GROUPS = 1024


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: set[int] = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_PEER_GROUPS)
        groups.update(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        try:
            groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except (KeyError, OSError):
            pass
    return PeerCredentials(pid, uid, gid, frozenset(groups))


def resolve_uid(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {name!r} in the server settings") from None


def resolve_gid(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {name!r} in the server settings") from None


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call what. root and the daemon's own uid are always allowed and admin.

    ``allowed_*`` both empty: every peer allowed (the socket's file mode is the gate).
    ``admin_*`` both empty: only root and the daemon's uid are admins.
    """

    owner_uid: int
    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    admin_uids: frozenset[int]
    admin_gids: frozenset[int]

    @classmethod
    def from_names(cls, allowed_users: Iterable[str], allowed_groups: Iterable[str],
                   admin_users: Iterable[str], admin_groups: Iterable[str],
                   owner_uid: int | None = None) -> AccessPolicy:
        """Resolve names (or numeric ids); ConfigError for an unknown name."""
        return cls(
            os.getuid() if owner_uid is None else owner_uid,
            frozenset(map(resolve_uid, allowed_users)),
            frozenset(map(resolve_gid, allowed_groups)),
            frozenset(map(resolve_uid, admin_users)),
            frozenset(map(resolve_gid, admin_groups)),
        )

    def privileged(self, peer: PeerCredentials) -> bool:
        """root or the daemon's own user: always allowed, admin, and never rate-limited."""
        return peer.uid in (0, self.owner_uid)

    def allows(self, peer: PeerCredentials) -> bool:
        if self.privileged(peer) or not (self.allowed_uids or self.allowed_gids):
            return True
        return peer.uid in self.allowed_uids or bool(peer.groups & self.allowed_gids)

    def is_admin(self, peer: PeerCredentials) -> bool:
        if self.privileged(peer):
            return True
        return self.allows(peer) and (
            peer.uid in self.admin_uids or bool(peer.groups & self.admin_gids))


class RateLimiter:
    """A token bucket per uid: ``rate`` requests per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock=None) -> None:
        import time

        self.rate = rate
        self.burst = burst
        self.clock = clock or time.monotonic
        self._buckets: dict[int, tuple[float, float]] = {}

    def take(self, uid: int) -> float | None:
        """None if the request may go ahead, else the seconds until it could."""
        if self.rate <= 0:
            return None
        now = self.clock()
        tokens, last = self._buckets.get(uid, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[uid] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[uid] = (tokens - 1.0, now)
        return None
