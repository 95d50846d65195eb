"""``chaid-lab bench cache`` through the real command line, on VBench prompts."""

from __future__ import annotations

import json

import pytest

from chaid_lab.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_bench_cache_report(vbench_prompts, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(vbench_prompts[::8]))
    out_json = tmp_path / "bench.json"
    code, out, _ = run(capsys, "bench", "cache", "--prompts", str(prompts), "--json",
                       str(out_json), "--budgets", "5,50", "--policies", "lru,fifo",
                       "--sizes", "200,400", "--latency-queries", "20",
                       "--payload-bytes", "20000")
    report = json.loads(out_json.read_text())
    assert code == 0 and len(report["results"]) == 2 * 2 * 2
    for row in report["results"]:
        assert row["matching"] in ("entity", "prompt") and row["policy"] in ("lru", "fifo")
        assert 0.0 <= row["hit_rate"] <= 1.0 and row["budget_bytes"] > 0
    by = {(r["matching"], r["budget_entries"]): r["hit_rate"] for r in report["results"]
          if r["policy"] == "lru"}
    assert by[("entity", 50)] >= by[("entity", 5)]
    assert report["lookup_ms"]["entries"] == 400 and report["lookup_ms"]["p50"] > 0
    assert [row["entries"] for row in report["latency"]] == [200, 400]
    stages = report["latency"][-1]["stages_ms_cold"]
    assert stages["total"]["p50"] > 0 and stages["entities"]["ran"] == 1.0
    assert report["embedder"] == "minilm-static" and report["embedder_precision"] == "static"
