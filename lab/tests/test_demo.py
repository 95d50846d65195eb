"""`chaid-lab demo` (what `make demo` runs) with the test model: a miss, hits, a miss, exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from daemonkit import BASE_ENV, REPO

pytestmark = pytest.mark.integration


def test_demo_session(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "demo", "--model", "tiny-test", "--out",
         str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, **BASE_ENV, "PYTHONPATH": f"{REPO}:{REPO / 'lab'}"})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(run.stdout[run.stdout.index("["):run.stdout.rindex("]") + 1])
    assert [r["cache"] for r in rows] == ["miss", "hit", "hit", "miss"]
    assert [r["steps"] for r in rows] == [30, 8, 8, 30]
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 4
    assert "exit status 0" in run.stdout
