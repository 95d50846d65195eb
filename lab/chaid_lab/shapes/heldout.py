"""Attribute combinations the Shapes DiT never sees in training.

Generalisation is measured on prompts that combine familiar words in unfamiliar ways: the
training distribution redraws any scene containing one of these pairs, and the evaluation
suite reports them separately. Each attribute alone stays common in training.
"""

from __future__ import annotations

from dataclasses import replace

from chaid_lab.shapes.world import DEFAULT_DISTRIBUTION, Scene, SceneDistribution

# (shape, colour) pairs never drawn for any object.
HELD_OUT_OBJECTS: frozenset[tuple[str, str]] = frozenset(
    {("triangle", "purple"), ("circle", "green")}
)
# (colour, background) pairs never drawn for any object.
HELD_OUT_COLOUR_BACKGROUNDS: frozenset[tuple[str, str]] = frozenset(
    {("yellow", "ocean"), ("white", "night sky")}
)


def is_held_out(scene: Scene) -> bool:
    """Whether the scene contains a held-out combination."""
    return any(
        (o.shape, o.colour) in HELD_OUT_OBJECTS
        or (o.colour, scene.background) in HELD_OUT_COLOUR_BACKGROUNDS
        for o in scene.objects
    )


# The distribution the DiT is trained on: the default one without the held-out pairs.
TRAINING_DISTRIBUTION: SceneDistribution = replace(DEFAULT_DISTRIBUTION, exclude=is_held_out)
