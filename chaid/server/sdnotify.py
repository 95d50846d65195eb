"""systemd's notification protocol: one datagram per message to ``$NOTIFY_SOCKET``.

A few lines instead of a dependency. Without ``NOTIFY_SOCKET`` (not started by systemd)
every call is a no-op. An address starting with ``@`` is in the abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY=1, STATUS=..., STOPPING=1, WATCHDOG=1 to the service manager."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        # The watchdog interval applies to us only if WATCHDOG_PID is unset or our pid.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` lines in one datagram; failures are logged, never raised.

        Non-blocking: this runs on the event loop, and a service manager that does not read
        its queue must not stall the daemon (the message is dropped instead).
        """
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.connect(self.address)
                sock.send("\n".join(fields).encode())
        except BlockingIOError:
            log.debug("sd_notify queue full; dropped %s", fields[0])
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before the current state (starting, stopping) times
        out; another request must follow within them (systemd 236 and later; older ones
        ignore it)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


# While the daemon starts, it asks the service manager for this much more time, a third
# of it before the last request runs out, for as long as loading goes on, up to
# START_EXTEND_MAX_S in all: opening a large store can outlast the unit's
# TimeoutStartSec (re-embedding 1M entries and rebuilding their index takes minutes), and
# a load that is stuck still ends.
START_EXTEND_STEP_S = 60.0
START_EXTEND_MAX_S = 3600.0


async def extend_start_while(notifier: Notifier, step_s: float = START_EXTEND_STEP_S,
                             max_s: float = START_EXTEND_MAX_S) -> None:
    """Keep extending the start timeout (cancel the task when loading is done)."""
    if not notifier.enabled:
        return
    start = trio.current_time()
    while (elapsed := trio.current_time() - start) < max_s:
        notifier.extend_timeout(min(step_s, max_s - elapsed))
        await trio.sleep(step_s / 3)
