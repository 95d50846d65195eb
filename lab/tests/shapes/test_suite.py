"""The evaluation suite: fixed items, held-out combinations, and the per-step report."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from chaid.engine.pipeline import Pipeline
from chaid.models import build_parts
from chaid_lab.shapes.heldout import is_held_out
from chaid_lab.shapes.judge import JUDGE_WEIGHTS
from chaid_lab.shapes.prompts import parse
from chaid_lab.shapes.suite import (
    HELD_OUT_EVERY,
    SUITE_SIZE,
    evaluate_steps,
    evaluation_suite,
    format_table,
)
from chaid_lab.shapes.world import labels


def test_suite_is_fixed_large_and_holds_out_combinations():
    items = evaluation_suite()
    assert len(items) == SUITE_SIZE >= 200
    assert evaluation_suite()[:10] == items[:10]  # a pure function of the seed
    held = [i for i in items if i.held_out]
    assert len(held) == SUITE_SIZE // HELD_OUT_EVERY
    # every held-out item contains a held-out pair, and no other item does
    assert all(is_held_out(i.scene) == bool(i.held_out) for i in items)
    assert len({i.held_out for i in held}) == 4  # each combination appears
    assert len({i.prompt for i in items}) == len(items)
    assert len({i.seed for i in items}) == len(items)


def test_suite_prompts_name_their_scenes():
    for item in evaluation_suite()[:60]:
        parsed = parse(item.prompt).labels()
        truth = labels(item.scene)
        assert {k: v for k, v in parsed.items() if v is not None} == {
            k: v for k, v in truth.items() if k in parsed and parsed[k] is not None
        }
        assert parsed["background"] == truth["background"]


@pytest.mark.skipif(not JUDGE_WEIGHTS.is_file(), reason="the judge's weights are not present")
def test_report_per_step_count_and_group(one_thread):
    pipeline = Pipeline(build_parts("tiny-test"), torch.device("cpu"))
    items = evaluation_suite()[:HELD_OUT_EVERY]  # the last one is held out
    report = evaluate_steps(pipeline, items, (1, 3), keep_videos=[0])
    assert report["steps"] == [1, 3]
    assert report["cfg_scale"] == pipeline.parts.spec.cfg_scale  # the model's by default
    assert {(r["steps"], r["group"]) for r in report["results"]} == {
        (k, g) for k in (1, 3) for g in ("all", "in-distribution", "held-out")
    }
    by = {(r["steps"], r["group"]): r for r in report["results"]}
    assert by[(1, "held-out")]["items"] == 1 and by[(1, "in-distribution")]["items"] == 5
    for r in report["results"]:
        assert 0.0 <= r["judge"] <= 1.0 and r["latency_ms_median"] > 0
        assert set(r["attributes"]) <= {"background", "num_objects", "shape", "colour", "motion"}
    # the renders are what the judge was trained on: they score near 1, and the untrained
    # tiny-test model's videos score far below them
    render = next(s for s in report["references"]["render"] if s["group"] == "all")
    assert render["judge"] > 0.9
    assert by[(3, "all")]["judge"] < render["judge"] - 0.2
    kept = report["videos"][0]
    assert set(kept) == {"render", 1, 3} and kept[3].dtype == np.uint8
    table = format_table(report)
    assert "held-out" in table and "render" in table


@pytest.mark.skipif(not JUDGE_WEIGHTS.is_file(), reason="the judge's weights are not present")
def test_cli_writes_json_and_rejects_bad_steps(tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "chaid_lab", "shapes", "eval", "--model", "tiny-test"]
    done = subprocess.run(
        [*cmd, "--limit", "2", "--stride", "5", "--steps", "2,1", "--cfg-scale", "3",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["steps"] == [1, 2] and report["suite"]["items"] == 2
    assert "videos" not in report and [r["index"] for r in report["rows"]] == [0, 5]
    assert report["cfg_scale"] == 3.0
    bad = subprocess.run([*cmd, "--steps", "0,x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--steps" in bad.stderr
