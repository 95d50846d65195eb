"""One shared daemon for the tests that do not stop it (module scope: startups are costly)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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


@pytest.fixture(scope="module")
def shared_daemon():
    # Not under pytest's tmp_path: its parents are 0700, and the peer-credential tests
    # connect as other users.
    workdir = Path(tempfile.mkdtemp(prefix="chaid-test-"))
    os.chmod(workdir, 0o755)
    daemon = Daemon(workdir, config=SHARED_CONFIG).start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        log = daemon.log()
        shutil.rmtree(workdir, ignore_errors=True)
        assert code == 0, log
        assert "Traceback" not in log, log
