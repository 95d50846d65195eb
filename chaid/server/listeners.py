"""Listening sockets: adopted from systemd (socket activation) or bound by the daemon.

systemd passes sockets as fds 3..3+LISTEN_FDS-1 when ``LISTEN_PID`` is our pid; those are
never unlinked by us (systemd owns the path). Otherwise the daemon binds its own path with
a restrictive umask, then sets the configured mode and group before listening, so there is
no moment at which the socket is more open than configured.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import trio

from chaid.errors import ChaidError

log = logging.getLogger(__name__)

# First fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
# Pending connections the kernel queues before accept; clients retry on ECONNREFUSED
# beyond it. The default of trio (and SOMAXCONN) is fine for a local daemon.
BACKLOG = 128
# Longest path a sockaddr_un holds (108 bytes including the terminating NUL on Linux).
MAX_SOCKET_PATH = 107


class ListenerError(ChaidError):
    """The socket cannot be bound or adopted (path in use, bad permissions, bad fd)."""


@dataclass
class BoundSocket:
    sock: trio.socket.SocketType
    path: Path | None  # the path we bound and must unlink at exit; None if inherited
    name: str
    # (st_dev, st_ino) of the socket file we created: we unlink only that file, never a
    # socket that another daemon bound at the same path since.
    file_id: tuple[int, int] | None = None


def inherited_sockets(env: dict[str, str] | None = None) -> list[BoundSocket]:
    """Sockets passed by systemd, or [] when none are meant for this process.

    The LISTEN_* variables are removed from the environment so that child processes do not
    think the sockets are theirs.
    """
    env_map = os.environ if env is None else env
    if env_map.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(env_map.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ListenerError(f"LISTEN_FDS={env_map.get('LISTEN_FDS')!r} is not a number") from None
    names = env_map.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env_map.pop(key, None)
    out = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ListenerError(f"inherited fd {fd} is not a socket: {exc}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"inherited fd {fd} is not a Unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(BACKLOG)
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        out.append(BoundSocket(trio.socket.from_stdlib_socket(sock), None, name))
    return out


def _resolve_group(group: str | None) -> int:
    if group is None:
        return -1
    if group.isdigit():
        return int(group)
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenerError(f"unknown socket group {group!r}") from None


def _clear_stale(path: Path) -> None:
    """Remove a socket file left by a daemon that died; refuse to touch a live one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise ListenerError(f"cannot probe the existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ListenerError(f"{path} is in use by a running daemon")


def socket_activated(env: dict[str, str] | None = None) -> bool:
    """Whether systemd passed this process its sockets (without adopting them)."""
    env_map = os.environ if env is None else env
    return env_map.get("LISTEN_PID") == str(os.getpid())


def check_socket_path(path: Path) -> None:
    """Refuse, before anything slow, a socket path the daemon could not bind: too long, in
    use by a running daemon, or not a socket. A stale socket file is removed. The bind
    after start-up checks again (another daemon may take the path meanwhile)."""
    path = Path(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ListenerError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    _clear_stale(path)


def bind_socket(path: Path, mode: int, group: str | None) -> BoundSocket:
    """Bind and listen on ``path`` with file mode ``mode`` and group ``group``."""
    path = Path(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ListenerError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    gid = _resolve_group(group)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ListenerError(f"cannot create {path.parent}: {exc.strerror}") from None
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # The file is created owner-only, then opened up to `mode` once its group is right.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenerError(f"{path} is in use") from None
        raise ListenerError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        st = path.lstat()
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        raise ListenerError(f"cannot set up {path}: {exc.strerror}") from None
    return BoundSocket(trio.socket.from_stdlib_socket(sock), path, str(path),
                       (st.st_dev, st.st_ino))


def release(bound: BoundSocket) -> None:
    """Close a listener; unlink its path only if we bound it and the file is still ours."""
    bound.sock.close()
    if bound.path is None:
        return
    try:
        st = bound.path.lstat()
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == bound.file_id:
        bound.path.unlink(missing_ok=True)
