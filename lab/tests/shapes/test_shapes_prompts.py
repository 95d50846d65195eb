"""The Shapes prompt grammar: round trips, variety, canonical form, user prompts."""

from __future__ import annotations

import numpy as np
import pytest

from chaid_lab.shapes.prompts import (
    BACKGROUND_PHRASES,
    COLOUR_WORDS,
    SHAPE_WORDS,
    ParsedObject,
    ParsedPrompt,
    canonical,
    describe,
    parse,
    scene_for_prompt,
)
from chaid_lab.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    NO_OBJECT,
    SHAPES,
    Scene,
    SceneDistribution,
    ShapeObject,
    labels,
    sample_scene,
)


def expected(scene: Scene) -> ParsedPrompt:
    return ParsedPrompt(
        objects=tuple(ParsedObject(o.shape, o.colour, o.motion) for o in scene.objects),
        background=scene.background,
    )


def test_parse_recovers_every_attribute_of_described_scenes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3000):
        scene = sample_scene(rng, SceneDistribution(two_object_prob=0.5))
        prompt = describe(scene, rng)
        assert parse(prompt) == expected(scene), prompt


def test_parse_recovers_canonical_prompts_and_labels() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = sample_scene(rng)
        parsed = parse(canonical(scene))
        assert parsed == expected(scene), canonical(scene)
        assert parsed.labels() == labels(scene)


def test_canonical_form() -> None:
    scene = Scene("grassy field", (ShapeObject("circle", "red", "left"),))
    assert canonical(scene) == "a red circle moving left over a grassy field"
    pair = Scene("night sky", (ShapeObject("triangle", "orange", "still"),
                               ShapeObject("square", "blue", "bouncing")))
    assert canonical(pair) == (
        "an orange triangle standing still and a blue square bouncing around "
        "against the night sky"
    )
    # Only the attributes matter, not size, position, texture or lighting.
    rng = np.random.default_rng(2)
    triples = [("circle", "red", "left")]
    variants = {canonical(sample_scene(rng, background="ocean", objects=triples))
                for _ in range(10)}
    assert len(variants) == 1


def test_describe_is_seeded() -> None:
    scene = sample_scene(np.random.default_rng(3))
    first = [describe(scene, np.random.default_rng(seed)) for seed in range(20)]
    again = [describe(scene, np.random.default_rng(seed)) for seed in range(20)]
    assert first == again
    assert len(set(first)) > 10


@pytest.mark.parametrize("two_objects", [False, True])
def test_one_scene_has_many_prompts(two_objects: bool) -> None:
    rng = np.random.default_rng(4)
    distribution = SceneDistribution(two_object_prob=float(two_objects))
    scene = sample_scene(rng, distribution)
    prompts = [describe(scene, rng) for _ in range(300)]
    assert len(set(prompts)) > 200
    # Prompts about the same scene share entities without being equal.
    assert all(parse(p) == expected(scene) for p in prompts)


def test_every_synonym_is_used() -> None:
    rng = np.random.default_rng(5)
    text = " | ".join(describe(sample_scene(rng), rng) for _ in range(4000))
    for table in (SHAPE_WORDS, COLOUR_WORDS, BACKGROUND_PHRASES):
        for words in table.values():
            for word in words:
                assert word in text, word


@pytest.mark.parametrize(
    ("prompt", "objects", "background"),
    [
        ("a red circle moving left over a grassy field", [("circle", "red", "left")],
         "grassy field"),
        ("A Crimson BALL rolling to the LEFT across a meadow!", [("circle", "red", "left")],
         "grassy field"),
        ("over a meadow, a crimson circle drifts left", [("circle", "red", "left")],
         "grassy field"),
        ("a blue square sits still on the sand dunes", [("square", "blue", "still")], "desert"),
        ("blue boxes at rest on the beach", [("square", "blue", "still")], "desert"),
        ("a yellow triangle falls through the starry sky", [("triangle", "yellow", "down")],
         "night sky"),
        ("a white ball bouncing on the snow and a green box moving right",
         [("circle", "white", "bouncing"), ("square", "green", "right")], "snowy field"),
        ("a purple pyramid rising above the sea", [("triangle", "purple", "up")], "ocean"),
        ("a green pasture with an amber orb", [("circle", "orange", None)], "grassy field"),
        ("the deep blue sea", [(None, None, None)], "ocean"),
        ("something violet drifting right", [(None, "purple", "right")], None),
        ("a cube", [("square", None, None)], None),
        ("hello world", [(None, None, None)], None),
        ("", [(None, None, None)], None),
    ],
)
def test_parse_user_prompts(
    prompt: str, objects: list[tuple[str | None, ...]], background: str | None
) -> None:
    parsed = parse(prompt)
    assert parsed.objects == tuple(ParsedObject(*o) for o in objects)
    assert parsed.background == background


def test_unknown_attributes_label_as_none() -> None:
    assert parse("a teal hexagon spinning on the moon").labels() == {
        "background": None, "num_objects": 1, "shape": None, "colour": None, "motion": None,
        "shape_2": NO_OBJECT, "colour_2": NO_OBJECT, "motion_2": NO_OBJECT,
    }


def test_parse_never_raises() -> None:
    rng = np.random.default_rng(6)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ,;:.!?-'") + ["red ", "ball ", "and ", "left "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 40))))
        assert isinstance(parse(text), ParsedPrompt)


def test_scene_for_prompt_shows_what_the_prompt_names() -> None:
    rng = np.random.default_rng(7)
    scene = scene_for_prompt("a red circle moving left over a grassy field", rng)
    assert expected(scene) == parse("a red circle moving left over a grassy field")
    for _ in range(50):
        scene = scene_for_prompt("something blue over the ocean", rng)
        assert scene.background == "ocean" and scene.objects[0].colour == "blue"
        assert scene.objects[0].shape in SHAPES and scene.objects[0].motion in MOTIONS
    open_scene = scene_for_prompt("", rng)
    assert open_scene.background in BACKGROUNDS and open_scene.objects[0].colour in COLOURS
