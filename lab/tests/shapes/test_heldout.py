import numpy as np

from chaid_lab.shapes.heldout import (
    HELD_OUT_COLOUR_BACKGROUNDS,
    HELD_OUT_OBJECTS,
    TRAINING_DISTRIBUTION,
    is_held_out,
)
from chaid_lab.shapes.world import sample_scene


def test_training_never_draws_a_held_out_pair_but_keeps_every_attribute():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, TRAINING_DISTRIBUTION) for _ in range(3000)]
    assert not any(is_held_out(s) for s in scenes)
    objects = [o for s in scenes for o in s.objects]
    for shape, colour in HELD_OUT_OBJECTS:
        assert any(o.shape == shape for o in objects) and any(o.colour == colour for o in objects)
    for colour, background in HELD_OUT_COLOUR_BACKGROUNDS:
        assert any(s.background == background for s in scenes)
        assert any(o.colour == colour for o in objects)


def test_held_out_pairs_are_recognised():
    rng = np.random.default_rng(2)
    for shape, colour in HELD_OUT_OBJECTS:
        assert is_held_out(sample_scene(rng, objects=[(shape, colour, "left")]))
    for colour, background in HELD_OUT_COLOUR_BACKGROUNDS:
        assert is_held_out(
            sample_scene(rng, background=background, objects=[("square", colour, "up")])
        )
