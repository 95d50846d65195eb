"""The product serves without the lab: ``chaid serve`` with chaid_lab (and the client)
made unimportable in its process, then a real client generates a miss and a hit."""

from __future__ import annotations

import textwrap

import pytest
from daemonkit import REPO, Daemon

from chai_client import Client

pytestmark = pytest.mark.integration

# Loaded by the daemon's interpreter at start-up (site imports sitecustomize): any import
# of the lab or the client fails there, as it would on a production install without them.
BLOCKER = textwrap.dedent('''
    import importlib.abc
    import sys

    BLOCKED = ("chaid_lab", "chai_client")


    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{name} is not installed here", name=name)
            return None


    sys.meta_path.insert(0, _NotInstalled())
''')


def test_serves_a_miss_and_a_hit_without_the_lab(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    daemon = Daemon(tmp_path / "d", command=["env", f"PYTHONPATH={site}:{REPO}"])
    daemon.start()
    try:
        with Client(daemon.socket) as client:
            miss = client.generate("a red circle moving left over a grassy field")
            hit = client.generate("a blue square bouncing over a grassy field")
            stats = client.stats()
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert (miss.cache, miss.steps) == ("miss", 30)
    assert (hit.cache, hit.steps) == ("hit", 8)
    assert stats["generations"]["hit"] == 1 and stats["generations"]["miss"] == 1
    log = daemon.log()
    assert "not installed here" not in log and "Traceback" not in log


def test_the_blocker_blocks(tmp_path):
    """The same interpreter set-up really refuses the lab (so the test above means it)."""
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    run = subprocess.run([sys.executable, "-c", "import chaid_lab"], capture_output=True,
                         text=True, env={"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert run.returncode != 0 and "chaid_lab is not installed here" in run.stderr
