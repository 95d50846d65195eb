"""``chaid-lab bench quality``: a small run through the CLI writes the report schema."""

import json
import subprocess
import sys
from pathlib import Path

NAMES = {"full-30", "plain-8", "nirvana-vid", "intra-fbc", "chai-8", "chai-8+intra"}
KEYS = {"name", "workload", "steps", "latency_ms_median", "speedup_vs_full", "judge", "hit_rate"}


def test_quick_bench_writes_the_schema(tmp_path: Path):
    out = tmp_path / "quality.json"
    cmd = [
        sys.executable,
        "-m",
        "chaid_lab",
        "bench",
        "quality",
        "--quick",
        "--model",
        "tiny-test",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--pairs",
        "1",
        "--warm",
        "1",
        "--serve",
        "2",
        "--json",
        str(out),
        "--work-dir",
        str(tmp_path / "stores"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["methods"]
    assert {(r["name"], r["workload"]) for r in rows} == {
        (n, w) for n in NAMES for w in ("all-hit", "stream")
    }
    for r in rows:
        assert KEYS <= set(r)
        assert r["latency_ms_median"] > 0 and r["speedup_vs_full"] > 0
    by = {(r["name"], r["workload"]): r for r in rows}
    assert by[("full-30", "stream")]["speedup_vs_full"] == 1.0
    assert by[("chai-8", "all-hit")]["hit_rate"] == 1.0  # served from the pair's entry
    assert by[("full-30", "all-hit")]["hit_rate"] is None
    # paired comparisons: every method against full-30, CHAI against plain-8 on the same seeds
    chai = by[("chai-8", "all-hit")]  # every request a hit: each has a PSNR to full-30
    assert chai["psnr_vs_full"] > 0 and chai["vs_plain_psnr"]["n"] == 1
    # a miss runs full-30 itself: the stream compares only the hits' PSNR
    stream = by[("chai-8", "stream")]
    assert stream["psnr_vs_full"] is None or stream["vs_plain_psnr"]["n"] <= 2
    if chai["judge"] is not None:
        diff = stream["vs_full_judge"]
        assert diff["low"] <= diff["mean"] <= diff["high"] and diff["n"] == 2
        assert diff["verdict"] in ("win", "loss", "tie")
        assert by[("plain-8", "stream")].get("vs_plain_judge") is None
    assert "psnr_vs_full" not in by[("full-30", "stream")]
    assert "chai-8" in proc.stdout
