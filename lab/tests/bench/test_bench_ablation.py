"""The CHAI ablation: its variants, the stored-dtype round trips and a one-pair report."""

import json
import subprocess
import sys

import pytest
import torch

from chaid.config import ChaiSettings
from chaid_lab.bench.ablation import entry_bytes, stored_round_trip, variants
from chaid_lab.shapes.judge import JUDGE_WEIGHTS


def test_each_variant_changes_one_setting_of_the_defaults():
    base = ChaiSettings()
    for v in variants(base):
        if v.chai is None:
            continue
        changed = [f for f in base.__dataclass_fields__ if getattr(v.chai, f) != getattr(base, f)]
        assert len(changed) + (v.dtype != "float16") <= 1, (v, changed)
    knobs = {v.knob for v in variants(base)}
    assert knobs == {"reference", "fast_steps", "cache_steps", "cache_blocks", "kv_source",
                     "stored_dtype"}


def test_stored_round_trips_lose_what_their_width_loses():
    z = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.5
    assert torch.equal(stored_round_trip(z, "float32"), z)
    e16 = (stored_round_trip(z, "float16") - z).abs().max().item()
    e8 = (stored_round_trip(z, "int8") - z).abs().max().item()
    assert 0 < e16 < 1e-2 and e16 < e8
    # int8 error is at most half a step of each (channel, frame)'s scale
    scale = z.abs().amax(dim=(2, 3), keepdim=True) / 127
    assert ((stored_round_trip(z, "int8") - z).abs() <= scale / 2 + 1e-6).all()
    with pytest.raises(ValueError):
        stored_round_trip(z, "int4")


def test_entry_bytes_follow_dtype_and_steps():
    by = {(v.knob, v.value): v for v in variants()}
    numel = 4 * 8 * 8 * 8
    assert entry_bytes(by[("stored_dtype", "float32")], numel, 4, 8) == 3 * numel * 4
    assert entry_bytes(by[("stored_dtype", "float16")], numel, 4, 8) == 3 * numel * 2
    assert entry_bytes(by[("stored_dtype", "int8")], numel, 4, 8) == 3 * (numel + 4 * 8 * 4)
    assert entry_bytes(by[("cache_steps", "{2}")], numel, 4, 8) == numel * 2
    assert entry_bytes(by[("reference", "full-30")], numel, 4, 8) == 0


@pytest.mark.skipif(not JUDGE_WEIGHTS.is_file(), reason="the judge's weights are not present")
def test_cli_reports_every_variant(tmp_path):
    out = tmp_path / "ablation.json"
    done = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "bench", "ablation", "--model", "tiny-test",
         "--pairs", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert len(report["rows"]) == len(variants())
    full = report["rows"][0]
    assert full["value"] == "full-30" and full["speedup_vs_full"] == 1.0
    assert all(0.0 <= r["judge"] <= 1.0 and r["latency_ms_median"] > 0 for r in report["rows"])
    assert "cache_blocks" in done.stdout
    # a single pair gives unbounded intervals: every comparison is a tie
    by = {(r["knob"], r["value"]): r for r in report["rows"]}
    assert full["vs_full_judge"] is None and full["psnr"] is None
    chai8 = by[("fast_steps", "8")]
    assert chai8["vs_plain_judge"]["verdict"] == "tie" and chai8["vs_plain_judge"]["n"] == 1
    assert by[("reference", "plain-8")]["vs_full_judge"]["n"] == 1
    assert "vs_plain_judge" not in by[("reference", "plain-8")]
