"""A prompt grammar for the Shapes world: scenes to English, and English back to labels.

:func:`describe` writes a scene as one of many English sentences (synonyms for every
attribute, several sentence templates), so prompts about the same entities share words
without being equal. :func:`canonical` gives one fixed sentence per attribute combination.
:func:`parse` reads shape, colour, motion and background labels back out of a prompt by
synonym lookup; it understands every sentence :func:`describe` writes and plain user prompts
such as "a red circle moving left over a grassy field", and ignores words it does not know.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chaid_lab.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_DISTRIBUTION,
    LABEL_KEYS,
    MOTIONS,
    NO_OBJECT,
    SHAPES,
    Scene,
    SceneDistribution,
    ShapeObject,
    sample_scene,
)

# --------------------------------------------------------------------------------------------
# Vocabulary. The first word of each entry is the canonical one.

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc", "sphere", "orb", "dot"),
    "square": ("square", "box", "block", "cube", "tile"),
    "triangle": ("triangle", "pyramid", "wedge", "arrowhead"),
}

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "ruby", "cherry red"),
    "green": ("green", "emerald", "jade", "leaf green"),
    "blue": ("blue", "azure", "cobalt", "sapphire", "royal blue"),
    "yellow": ("yellow", "golden", "lemon", "canary yellow"),
    "white": ("white", "ivory", "pearl white", "milky white"),
    "purple": ("purple", "violet", "lilac", "plum", "amethyst"),
    "orange": ("orange", "amber", "tangerine"),
}

# Motion phrases as (participle, present tense) pairs, for "a ball rolling left" and
# "a ball rolls left". Directional motions combine a verb with a direction; some verbs carry
# their direction themselves ("rising").
MOVING_VERBS: tuple[tuple[str, str], ...] = (
    ("moving", "moves"),
    ("drifting", "drifts"),
    ("sliding", "slides"),
    ("gliding", "glides"),
    ("travelling", "travels"),
    ("heading", "heads"),
)
# Verbs that only suit some shapes and directions: a square does not roll.
ROLLING_VERB = ("rolling", "rolls")
ROLLING_SHAPES = ("circle",)
ROLLING_MOTIONS = ("left", "right")

DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "to the left", "leftward", "towards the left"),
    "right": ("right", "to the right", "rightward", "towards the right"),
    "up": ("up", "upward", "upwards", "towards the top"),
    "down": ("down", "downward", "downwards", "towards the bottom"),
}

DIRECTED_VERBS: dict[str, tuple[tuple[str, str], ...]] = {
    "up": (("rising", "rises"), ("climbing", "climbs"), ("ascending", "ascends"),
           ("floating up", "floats up")),
    "down": (("falling", "falls"), ("sinking", "sinks"), ("dropping", "drops"),
             ("descending", "descends")),
    "bouncing": (("bouncing around", "bounces around"),
                 ("bouncing off the edges", "bounces off the edges"),
                 ("ricocheting around", "ricochets around"),
                 ("bouncing from wall to wall", "bounces from wall to wall"),
                 ("bouncing about", "bounces about"),
                 ("rebounding off the walls", "rebounds off the walls"),
                 ("ricocheting off the edges", "ricochets off the edges")),
    "still": (("standing still", "stands still"), ("sitting still", "sits still"),
              ("resting motionless", "rests motionless"), ("staying put", "stays put"),
              ("holding still", "holds still"), ("not moving", "does not move"),
              ("hovering in place", "hovers in place")),
}

# Background noun phrases (article included) and the prepositions that read well with them.
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grassy field": ("a grassy field", "a meadow", "the lawn", "a green pasture",
                     "a field of grass", "the grassland"),
    "ocean": ("the ocean", "the sea", "the open water", "the waves", "the deep blue sea"),
    "desert": ("a desert", "the sand dunes", "the desert sands", "a sandy desert", "the dunes"),
    "snowy field": ("a snowy field", "a snowfield", "the snow", "a snow-covered field",
                    "a snowy plain"),
    "night sky": ("the night sky", "a starry sky", "a starlit sky", "the dark night sky",
                  "a midnight sky"),
}
BACKGROUND_PREPOSITIONS: dict[str, tuple[str, ...]] = {
    "grassy field": ("over", "across", "on"),
    "ocean": ("over", "across", "above"),
    "desert": ("over", "across", "on"),
    "snowy field": ("over", "across", "on"),
    "night sky": ("across", "against", "in"),
}

# Size adjectives, used now and then for objects near the ends of the size range.
SMALL_WORDS = ("small", "little", "tiny")
LARGE_WORDS = ("large", "big")
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


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedObject:
    shape: str | None = None
    colour: str | None = None
    motion: str | None = None


@dataclass(frozen=True)
class ParsedPrompt:
    # Objects in the order the prompt names them; one all-None object when it names none.
    objects: tuple[ParsedObject, ...]
    background: str | None = None

    def labels(self) -> dict[str, int | None]:
        """Integer labels keyed like :func:`chaid_lab.shapes.world.labels`: None where the prompt
        does not say, :data:`NO_OBJECT` for a second object it does not mention."""

        def index(vocabulary: tuple[str, ...], name: str | None) -> int | None:
            return None if name is None else vocabulary.index(name)

        out: dict[str, int | None] = {
            "background": index(BACKGROUNDS, self.background),
            "num_objects": len(self.objects),
        }
        for suffix, slot in (("", 0), ("_2", 1)):
            if slot < len(self.objects):
                obj = self.objects[slot]
                out["shape" + suffix] = index(SHAPES, obj.shape)
                out["colour" + suffix] = index(COLOURS, obj.colour)
                out["motion" + suffix] = index(MOTIONS, obj.motion)
            else:
                out["shape" + suffix] = out["colour" + suffix] = out["motion" + suffix] = NO_OBJECT
        return {key: out[key] for key in LABEL_KEYS}


# Words for parsing beyond those the grammar writes, so plain user prompts read too.
EXTRA_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("disk",),
    "square": ("rectangle", "crate"),
    "triangle": ("three sided shape",),
}
EXTRA_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "yellow": ("gold",),
    "white": ("pearl", "milky"),
    "purple": ("indigo",),
}
EXTRA_MOTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("leftwards", "westward"),
    "right": ("rightwards", "eastward"),
    "up": ("top", "rise", "rising", "rises", "climbing", "climbs", "ascending", "ascends"),
    "down": ("bottom", "fall", "falling", "falls", "sinking", "sinks", "dropping", "drops",
             "descending", "descends"),
    "bouncing": ("bouncing", "bounces", "bounce", "bouncy", "ricocheting", "ricochets",
                 "rebounding", "rebounds"),
    "still": ("still", "motionless", "stationary", "unmoving", "static", "stays put",
              "staying put", "not moving", "does not move", "doesn t move", "in place",
              "at rest"),
}
EXTRA_BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "grassy field": ("grass", "grassy", "meadow", "lawn", "pasture", "green meadow"),
    "ocean": ("ocean", "sea", "open sea", "water", "waves"),
    "desert": ("desert", "sand", "sandy", "dunes", "sand dune", "beach"),
    "snowy field": ("snow", "snowy", "snowfield", "snow field", "winter field"),
    "night sky": ("night", "stars", "starry", "starlit", "starry night"),
}

# Words that end one clause and start the next: attributes attach within a clause first.
CLAUSE_BREAKS = frozenset(
    {",", ";", ":", ".", "!", "?", "and", "while", "whilst", "as", "but", "whereas"}
)
_ARTICLES = ("a ", "an ", "the ")
_TOKEN = re.compile(r"[a-z]+|[,;:.!?]")


def _strip_article(phrase: str) -> str:
    for article in _ARTICLES:
        if phrase.startswith(article):
            return phrase[len(article):]
    return phrase


def _words(phrase: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(phrase.lower()))


def _build_lexicon() -> dict[tuple[str, ...], tuple[str, str]]:
    """Phrase (as a word tuple) -> (kind, label), from the grammar's tables and the extras."""
    lexicon: dict[tuple[str, ...], tuple[str, str]] = {}

    def add(kind: str, label: str, phrases: Sequence[str]) -> None:
        for phrase in phrases:
            words = _words(_strip_article(phrase))
            if lexicon.setdefault(words, (kind, label)) != (kind, label):
                raise ValueError(f"{phrase!r} means both {lexicon[words]} and {(kind, label)}")

    for label in SHAPES:
        add("shape", label, SHAPE_WORDS[label] + EXTRA_SHAPE_WORDS.get(label, ()))
    for label in COLOURS:
        add("colour", label, COLOUR_WORDS[label] + EXTRA_COLOUR_WORDS.get(label, ()))
    for label in MOTIONS:
        add("motion", label, DIRECTION_WORDS.get(label, ()) + EXTRA_MOTION_WORDS.get(label, ()))
        add("motion", label, [phrase for pair in DIRECTED_VERBS.get(label, ()) for phrase in pair])
    for label in BACKGROUNDS:
        add("background", label, (label,) + BACKGROUND_PHRASES[label])
        add("background", label, EXTRA_BACKGROUND_WORDS.get(label, ()))
    return lexicon


LEXICON = _build_lexicon()
LONGEST_PHRASE = max(len(words) for words in LEXICON)


@dataclass
class _Mention:
    kind: str
    label: str
    position: int
    clause: int


def _lookup(words: tuple[str, ...]) -> tuple[str, str] | None:
    found = LEXICON.get(words)
    if found is None and len(words) == 1:
        # Plural shape nouns: "balls", "boxes".
        for cut in (1, 2):
            singular = LEXICON.get((words[0][:-cut],))
            if singular is not None and singular[0] == "shape":
                return singular
    return found


def _mentions(prompt: str) -> list[_Mention]:
    """Attribute mentions in reading order, matching the longest phrase at each word."""
    tokens = _words(prompt)
    mentions: list[_Mention] = []
    clause = 0
    i = 0
    while i < len(tokens):
        if tokens[i] in CLAUSE_BREAKS:
            clause += 1
            i += 1
            continue
        for n in range(min(LONGEST_PHRASE, len(tokens) - i), 0, -1):
            found = _lookup(tokens[i:i + n])
            if found is not None:
                mentions.append(_Mention(found[0], found[1], i, clause))
                i += n
                break
        else:
            i += 1
    return mentions


def _attach(
    mention: _Mention, shapes: list[_Mention], slots: list[dict[str, str]], prefer_after: bool
) -> None:
    """Give the mention's label to the nearest object in its clause (on the preferred side
    first), else to the nearest object that still lacks this kind of attribute."""
    same_clause = [k for k, s in enumerate(shapes) if s.clause == mention.clause]
    after = [k for k in same_clause if shapes[k].position > mention.position]
    before = [k for k in same_clause if shapes[k].position < mention.position][::-1]
    candidates = (after + before) if prefer_after else (before + after)
    if not candidates:
        free = [k for k in range(len(slots)) if mention.kind not in slots[k]]
        # Prefer the nearest object after the mention ("drifting left, a red ball").
        free.sort(key=lambda k: (shapes[k].position < mention.position,
                                 abs(shapes[k].position - mention.position)))
        candidates = free
    for k in candidates[:1]:
        slots[k].setdefault(mention.kind, mention.label)


def parse(prompt: str) -> ParsedPrompt:
    """Read the attribute labels a prompt names.

    Every shape noun starts an object. A colour belongs to the shape it precedes, a motion to
    the shape before it in the same clause; an attribute in a clause without a shape goes to
    the nearest object still lacking one. Words outside the vocabulary are ignored; an
    attribute the prompt does not name is None. Never raises for any string.
    """
    mentions = _mentions(prompt)
    shapes = [m for m in mentions if m.kind == "shape"]
    if not shapes:
        # Attributes without a shape noun ("something red moving left") describe one object.
        shapes = [_Mention("shape", "", -1, -1)]
    slots: list[dict[str, str]] = [{} for _ in shapes]
    background = None
    for mention in mentions:
        if mention.kind == "background":
            background = background or mention.label
        elif mention.kind in ("colour", "motion"):
            _attach(mention, shapes, slots, prefer_after=mention.kind == "colour")
    objects = tuple(
        ParsedObject(shape=s.label or None, colour=slot.get("colour"), motion=slot.get("motion"))
        for s, slot in zip(shapes, slots, strict=True)
    )
    return ParsedPrompt(objects=objects, background=background)


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
