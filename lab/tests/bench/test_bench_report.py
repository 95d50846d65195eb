"""`chaid-lab bench report`: the parts it runs land in results.json, tables.md and the plots."""

import json
import os
import subprocess
import sys

import pytest

from chaid_lab.bench.report import tables
from chaid_lab.shapes.judge import JUDGE_WEIGHTS


def test_tables_cover_every_part_given():
    report = {
        "ablation": {"rows": [{"knob": "reference", "value": "full-30", "steps": 30,
                               "judge": 0.9, "latency_ms_median": 900.0,
                               "speedup_vs_full": 1.0, "bytes_per_entry": 0}]},
        "hit_rates": {"prompts": 10, "results": [
            {"budget_entries": 5, "budget_bytes": 60000, "matching": "entity", "hit_rate": 0.5},
            {"budget_entries": 5, "budget_bytes": 60000, "matching": "prompt", "hit_rate": 0.1},
        ]},
    }
    text = tables(report)
    assert "| reference | full-30 | 30 | 0.900 | 900 | 1.00× | 0 |" in text
    assert "| 5 | 0.06 | 0.500 | 0.100 |" in text
    assert "### Methods" not in text and "### Daemon" not in text


@pytest.mark.skipif(not JUDGE_WEIGHTS.is_file(), reason="the judge's weights are not present")
def test_quick_report_writes_json_tables_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "bench", "report", "--quick", "--model", "tiny-test",
         "--parts", "steps,regime,defects,ablation,hit_rates", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "results.json").read_text())
    assert set(report["seconds"]) == {"steps", "regime", "defects", "ablation", "hit_rates"}
    assert set(report["defects"]["checks"]) == {"jump", "extra_object", "shape_change"}
    assert "Visible defects, 1 seeds per prompt" in (out / "tables.md").read_text()
    assert report["regime"]["config"]["cfg_scale"] == 7.5
    assert report["regime"]["config"]["variants"] == ["chai", "chai-kv"]
    assert (out / "regime.png").stat().st_size > 1000
    assert "### The discriminating regime: guidance 7.5" in (out / "tables.md").read_text()
    assert report["steps"]["pairs"] == 4 and "features" not in json.dumps(report["steps"])
    assert (out / "step-curve.png").stat().st_size > 1000
    assert "### The step curve" in (out / "tables.md").read_text()
    # the step curve's rows stay in the cache directory: a stopped report resumes there
    assert list((tmp_path / "cache" / "chaid").glob("report-steps-*/rows-0.jsonl"))
    assert report["machine"]["cpu_count"] >= 1
    rates = [r["hit_rate"] for r in report["hit_rates"]["results"] if r["matching"] == "entity"]
    assert rates == sorted(rates)  # a larger LRU cache never hits less on the same stream
    assert (out / "hit-rate-vs-cache-size.png").stat().st_size > 1000
    assert "### Ablation" in (out / "tables.md").read_text()
    # a run of one part keeps the other parts' measurements
    again = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "bench", "report", "--quick", "--model", "tiny-test",
         "--parts", "hit_rates", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr
    merged = json.loads((out / "results.json").read_text())
    assert merged["ablation"] == report["ablation"] and "steps" in merged
    assert "### Ablation" in (out / "tables.md").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "chaid_lab", "bench", "report", "--parts", "nope"],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode != 0 and "unknown parts" in bad.stderr
