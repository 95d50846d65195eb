"""The systemd units verify and keep a low exposure score; the example config loads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chaid.config import load_settings

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")
# The hardened unit scores 0.9-1.2 ("SAFE"/"OK"); a regression past this is a mistake.
MAX_EXPOSURE = 2.0


def _units(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart names a binary that exists here."""
    service = (SYSTEMD / "chaid.service").read_text()
    service = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", service, flags=re.M)
    (tmp_path / "chaid.service").write_text(service)
    shutil.copy(SYSTEMD / "chaid.socket", tmp_path / "chaid.socket")
    return tmp_path


@needs_analyze
def test_units_verify(tmp_path):
    units = _units(tmp_path)
    run = subprocess.run(["systemd-analyze", "verify", "chaid.socket", "chaid.service"],
                         cwd=units, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "chaid" not in run.stderr, run.stderr  # no warnings about our units


@needs_analyze
def test_service_exposure(tmp_path):
    units = _units(tmp_path)
    run = subprocess.run(["systemd-analyze", "security", "--offline=yes", "chaid.service"],
                         cwd=units, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for chaid.service: ([\d.]+)", run.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score offline: {run.stderr[:200]}")
    assert float(match.group(1)) <= MAX_EXPOSURE, run.stdout[-2000:]


def test_example_config_loads():
    settings = load_settings(SYSTEMD / "chaid.toml", env={})
    assert settings.server.socket == Path("/run/chaid/chaid.sock")
    assert settings.store.data_dir == Path("/var/lib/chaid")
    assert settings.server.socket_group == "chai"
