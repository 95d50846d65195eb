"""What tiny-shapes understands of a prompt (chaid/models/shapes_vocab.py)."""

from __future__ import annotations

import pytest

from chaid.models import get_spec
from chaid.models.shapes_vocab import parse, understand


@pytest.mark.parametrize("prompt, known, unknown, drawable", [
    ("a red circle moving left over a grassy field",
     ["red → colour red", "circle → shape circle", "left → motion left",
      "grassy field → background grassy field"], [], True),
    ("a purple square standing still on a snowy field",
     ["purple → colour purple", "square → shape square", "standing still → motion still",
      "snowy field → background snowy field"], [], True),
    ("a cat playing piano", [], ["cat", "playing", "piano"], False),
    ("a kitten playing a keyboard", [], ["kitten", "playing", "keyboard"], False),
    ("a red fox in a snowy forest", ["red → colour red", "snowy → background snowy field"],
     ["fox", "forest"], True),
    ("一只猫在弹钢琴", [], ["一只猫在弹钢琴"], False),
    ("", [], [], False),
])
def test_understanding(prompt, known, unknown, drawable):
    got = understand(prompt)
    assert list(got.known) == known and list(got.unknown) == unknown
    assert got.drawable is drawable
    assert got.as_dict() == {"known": known, "unknown": unknown, "drawable": drawable}


def test_only_the_model_with_a_vocabulary_reports_one():
    assert get_spec("tiny-shapes").understand is understand
    assert get_spec("opensora-1.2").understand is None  # T5 reads anything
    assert parse("a red ball and a blue box over the sea").labels()["num_objects"] == 2
