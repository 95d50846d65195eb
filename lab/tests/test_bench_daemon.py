"""`chaid-lab bench daemon`: a real daemon serves the stream to concurrent clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from daemonkit import BASE_ENV, REPO

pytestmark = pytest.mark.integration


def test_bench_daemon_reports_every_level(tmp_path):
    out = tmp_path / "daemon.json"
    run = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "bench", "daemon", "--model", "tiny-test",
         "--clients", "3,1", "--warm", "2", "--serve", "4", "--batches", "2,1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, **BASE_ENV, "PYTHONPATH": f"{REPO}:{REPO / 'lab'}"})
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert [lv["clients"] for lv in report["levels"]] == [1, 3]
    for lv in [report["in_process"], *report["levels"]]:
        assert lv["throughput_rps"] > 0 and 0.0 <= lv["hit_rate"] <= 1.0
        assert 0 < lv["latency_ms"]["p50"] <= lv["latency_ms"]["p99"]
    # one client is served in order, like the in-process reference: the same hits
    assert report["levels"][0]["hit_rate"] == report["in_process"]["hit_rate"]
    assert "in-proc" in run.stdout
    curve = report["batch_curve"]["rows"]
    assert [r["batch"] for r in curve] == [1, 2] and curve[0]["gain"] == 1.0
    assert all(r["ms_per_step"] > 0 and r["gain"] > 0 for r in curve)
    assert "B=2" in run.stdout
    for lv in report["levels"]:  # a pinger ran beside the generating clients
        assert lv["ping_ms"]["count"] >= 1 and lv["ping_ms"]["p99"] > 0
        assert 0.0 < lv["slowest_share"] <= 1.0
    assert report["levels"][0]["slowest_share"] == 1.0  # one client serves everything


def test_bench_daemon_rejects_bad_levels(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "bench", "daemon", "--clients", "0,x"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, **BASE_ENV, "PYTHONPATH": f"{REPO}:{REPO / 'lab'}"})
    assert run.returncode != 0 and "--clients" in run.stderr


def test_bench_batches_alone(tmp_path):
    out = tmp_path / "curve.json"
    run = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "bench", "batches", "--model", "tiny-test",
         "--device", "cpu", "--batches", "2,1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, **BASE_ENV, "PYTHONPATH": f"{REPO}:{REPO / 'lab'}"})
    assert run.returncode == 0, run.stdout + run.stderr
    curve = json.loads(out.read_text())
    assert curve["device"] == "cpu" and [r["batch"] for r in curve["rows"]] == [1, 2]
    assert curve["rows"][0]["hits_gain"] == 1.0 and curve["rows"][1]["hits_ms"] > 0
    assert "B=2" in run.stdout and "in-proc" not in run.stdout
