"""Module-scoped daemons for the tests that do not stop them (startups are costly)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemonkit import Daemon  # noqa: E402

# Settings of the shared daemon: a short read deadline so the slow-loris test is quick,
# a socket anyone may open (peer credentials do the gating: root, its owner, and the
# user "nobody" are allowed; nobody is not an admin and may send 5 requests at once).
SHARED_CONFIG = """
[server]
queue_size = 16
read_timeout_s = 1.0
socket_mode = "0666"
allowed_users = ["nobody"]
grace_period_s = 5.0
rate_per_s = 1.0
rate_burst = 5
"""

# Settings of the connection-limits daemon (tests/server/test_limits.py): every limit small
# enough to reach in a second, and timeouts of seconds instead of minutes. "nobody" and
# "bin" (uid 2) are two ordinary users for the per-user cap and for prompt privacy.
LIMITS_CONFIG = """
[server]
socket_mode = "0666"
share_prompts = false
allowed_users = ["nobody", "2"]
max_connections = 10
max_connections_per_user = 3
max_inflight_per_connection = 4
idle_timeout_s = 2.0
write_timeout_s = 4.0
grace_period_s = 2.0
"""


@contextmanager
def module_daemon(config: str) -> Iterator[Daemon]:
    """A started daemon with ``config``; stopped at exit, which must be clean."""
    # Not under pytest's tmp_path: its parents are 0700, and the peer-credential tests
    # connect as other users.
    workdir = Path(tempfile.mkdtemp(prefix="chaid-test-"))
    os.chmod(workdir, 0o755)
    daemon = Daemon(workdir, config=config).start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        log = daemon.log()
        shutil.rmtree(workdir, ignore_errors=True)
        assert code == 0, log
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def shared_daemon():
    with module_daemon(SHARED_CONFIG) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def limits_daemon():
    with module_daemon(LIMITS_CONFIG) as daemon:
        yield daemon
