"""A prompt grammar for the Shapes world: scenes to English, and English back to labels.

:func:`describe` writes a scene as one of many English sentences (synonyms for every
attribute, several sentence templates), so prompts about the same entities share words
without being equal. :func:`canonical` gives one fixed sentence per attribute combination.
:func:`parse` reads shape, colour, motion and background labels back out of a prompt by
synonym lookup; it understands every sentence :func:`describe` writes and plain user prompts
such as "a red circle moving left over a grassy field", and ignores words it does not know.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chaid.models.shapes_vocab import (
    BACKGROUND_PHRASES,
    COLOUR_WORDS,
    DIRECTED_VERBS,
    DIRECTION_WORDS,
    LARGE_WORDS,
    MOVING_VERBS,
    ROLLING_MOTIONS,
    ROLLING_SHAPES,
    ROLLING_VERB,
    SHAPE_WORDS,
    SMALL_WORDS,
    ParsedObject,
    ParsedPrompt,
    parse,
)
from chaid_lab.shapes.world import (
    COLOURS,
    DEFAULT_DISTRIBUTION,
    MOTIONS,
    SHAPES,
    Scene,
    SceneDistribution,
    ShapeObject,
    sample_scene,
)

__all__ = ["ParsedObject", "ParsedPrompt", "canonical", "describe", "parse",
           "scene_for_prompt"]

# The vocabulary, the reader (parse) and its word tables are the product's
# (chaid/models/shapes_vocab.py: what the tiny-shapes model understands); this module adds
# the sentences the lab writes with them.

# The prepositions that read well with each background.
BACKGROUND_PREPOSITIONS: dict[str, tuple[str, ...]] = {
    "grassy field": ("over", "across", "on"),
    "ocean": ("over", "across", "above"),
    "desert": ("over", "across", "on"),
    "snowy field": ("over", "across", "on"),
    "night sky": ("across", "against", "in"),
}

# Size adjectives, used now and then for objects near the ends of the size range.
SMALL_SIZE = 0.26
LARGE_SIZE = 0.38
# Chance that an object of extreme size gets a size adjective: often enough to tie words to
# sizes, rarely enough that most prompts are about the four labelled attributes.
SIZE_WORD_PROB = 0.4

CANONICAL_MOTION: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "bouncing": "bouncing around",
    "still": "standing still",
}
CANONICAL_BACKGROUND: dict[str, str] = {
    "grassy field": "over a grassy field",
    "ocean": "over the ocean",
    "desert": "over a desert",
    "snowy field": "over a snowy field",
    "night sky": "against the night sky",
}

# Sentence templates. {o}: object phrase, {v}: participle motion, {p}: present-tense motion,
# {at}: preposition, {bg}: background phrase; suffixes 1 and 2 name the two objects.
SINGLE_TEMPLATES: tuple[str, ...] = (
    "{o} {v} {at} {bg}",
    "{at} {bg}, {o} {p}",
    "{o} {p} {at} {bg}",
    "{bg} with {o} {v}",
    "{v} {at} {bg}, {o}",
    "a video of {o} {v} {at} {bg}",
    "there is {o} {v} {at} {bg}",
    "{o}, {v} {at} {bg}",
    "a shot of {bg} where {o} {p}",
    "{bg}: {o} {v}",
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "{o1} {v1} and {o2} {v2} {at} {bg}",
    "{at} {bg}, {o1} {p1} while {o2} {p2}",
    "{o1} {p1} {at} {bg} as {o2} {p2}",
    "{bg} with {o1} {v1} and {o2} {v2}",
    "a video of {o1} {v1} {at} {bg} next to {o2} {v2}",
    "{at} {bg}: {o1} {v1}, {o2} {v2}",
    "two shapes {at} {bg}: {o1} {p1} and {o2} {p2}",
)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _motion_phrases(obj: ShapeObject) -> list[tuple[str, str]]:
    """Every (participle, present) phrase that describes the object's motion."""
    phrases = list(DIRECTED_VERBS.get(obj.motion, ()))
    if obj.motion in DIRECTION_WORDS:
        verbs = list(MOVING_VERBS)
        if obj.shape in ROLLING_SHAPES and obj.motion in ROLLING_MOTIONS:
            verbs.append(ROLLING_VERB)
        phrases += [
            (f"{ing} {way}", f"{present} {way}")
            for ing, present in verbs
            for way in DIRECTION_WORDS[obj.motion]
        ]
    return phrases


def _object_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    words = [_pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])]
    if obj.size <= SMALL_SIZE and rng.random() < SIZE_WORD_PROB:
        words.insert(0, _pick(rng, SMALL_WORDS))
    elif obj.size >= LARGE_SIZE and rng.random() < SIZE_WORD_PROB:
        words.insert(0, _pick(rng, LARGE_WORDS))
    return _with_article(" ".join(words))


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """One English sentence for the scene, chosen by rng (same rng state, same sentence).

    Every attribute of every object and the background are named, with synonyms drawn at
    random; :func:`parse` recovers them all.
    """
    fields = {
        "at": _pick(rng, BACKGROUND_PREPOSITIONS[scene.background]),
        "bg": _pick(rng, BACKGROUND_PHRASES[scene.background]),
    }
    suffixes = ("",) if len(scene.objects) == 1 else ("1", "2")
    for suffix, obj in zip(suffixes, scene.objects, strict=True):
        phrases = _motion_phrases(obj)
        participle, present = phrases[int(rng.integers(len(phrases)))]
        fields["o" + suffix] = _object_phrase(obj, rng)
        fields["v" + suffix] = participle
        fields["p" + suffix] = present
    templates = SINGLE_TEMPLATES if len(scene.objects) == 1 else PAIR_TEMPLATES
    return _pick(rng, templates).format(**fields)


def canonical(scene: Scene) -> str:
    """The one fixed sentence for the scene's attributes, with canonical words throughout:
    "a red circle moving left over a grassy field"."""
    parts = [
        f"{_with_article(f'{obj.colour} {obj.shape}')} {CANONICAL_MOTION[obj.motion]}"
        for obj in scene.objects
    ]
    return f"{' and '.join(parts)} {CANONICAL_BACKGROUND[scene.background]}"


def scene_for_prompt(
    prompt: str,
    rng: np.random.Generator,
    distribution: SceneDistribution = DEFAULT_DISTRIBUTION,
) -> Scene:
    """A scene that shows what the prompt names, drawing whatever it leaves open.

    Attributes the prompt does not name, sizes, positions, texture and lighting come from
    rng and the distribution; a prompt naming more than two objects keeps the first two.
    """
    parsed = parse(prompt)
    triples = [
        (
            obj.shape or SHAPES[int(rng.integers(len(SHAPES)))],
            obj.colour or COLOURS[int(rng.integers(len(COLOURS)))],
            obj.motion or MOTIONS[int(rng.integers(len(MOTIONS)))],
        )
        for obj in parsed.objects[:2]
    ]
    return sample_scene(rng, distribution, background=parsed.background, objects=triples)
