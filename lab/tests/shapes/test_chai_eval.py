"""The CHAI evaluation: entity-sharing pairs and a report with every method."""

import pytest
import torch

from chaid.engine.pipeline import Pipeline
from chaid.models import build_parts
from chaid_lab.shapes.chai_eval import METHODS, entity_sharing_pairs, evaluate, format_table
from chaid_lab.shapes.judge import JUDGE_WEIGHTS
from chaid_lab.shapes.prompts import parse


def test_pairs_share_the_scene_or_the_object():
    pairs = entity_sharing_pairs(20, seed=3)
    assert [p.shared for p in pairs[:4]] == ["scene", "object", "scene", "object"]
    for p in pairs:
        a, b = parse(p.cached), parse(p.prompt)
        if p.shared == "scene":
            assert a.background == b.background
            assert (a.objects[0].shape, a.objects[0].colour) != (
                b.objects[0].shape,
                b.objects[0].colour,
            )
        else:
            assert a.background != b.background
            assert (a.objects[0].shape, a.objects[0].colour) == (
                b.objects[0].shape,
                b.objects[0].colour,
            )
    assert entity_sharing_pairs(5, seed=3) == pairs[:5]


@pytest.mark.skipif(not JUDGE_WEIGHTS.is_file(), reason="the judge's weights are not present")
def test_report_has_every_method_with_scores_and_speedups():
    pipeline = Pipeline(build_parts("tiny-test"), torch.device("cpu"))
    report = evaluate(pipeline, entity_sharing_pairs(1), seed=0)
    assert set(report["methods"]) == set(METHODS) and report["pairs"] == 1
    for stats in report["methods"].values():
        assert 0.0 <= stats["judge"] <= 1.0 and stats["latency_ms_median"] > 0
    assert report["methods"]["full-30"]["speedup_vs_full"] == 1.0
    assert "chai-8" in format_table(report)
