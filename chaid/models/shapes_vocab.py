"""What the ``tiny-shapes`` model can draw, in words: its world's vocabulary and a reader of
prompts.

The model was trained on one world: up to two coloured shapes moving over one of five
backgrounds. Its text encoder (MiniLM) embeds any text, so a prompt about a cat playing
the piano still produces a video, of whatever the nearest trained words suggest. This
module says what part of a prompt the model can use: :func:`parse` reads shape, colour,
motion and background out of a prompt by phrase lookup, and :func:`understand` reports the
phrases it knew, the words it did not and whether the prompt names anything the model
draws at all. The lab's prompt grammar (chaid_lab.shapes.prompts) writes sentences from
these same tables.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Label vocabularies. The position of a name is its integer label: append, never reorder,
# or trained judges and datasets change meaning.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple", "orange")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bouncing", "still")
BACKGROUNDS: tuple[str, ...] = ("grassy field", "ocean", "desert", "snowy field", "night sky")

# Label of the absent second object in :meth:`ParsedPrompt.labels`.
NO_OBJECT = -1
# The label keys, in order (two objects at most).
LABEL_KEYS: tuple[str, ...] = (
    "background", "num_objects", "shape", "colour", "motion", "shape_2", "colour_2", "motion_2")

# --------------------------------------------------------------------------------------------
# Words. The first word of each entry is the canonical one.

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

# Background noun phrases (article included).
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

# Size adjectives (the world draws small and large objects).
SMALL_WORDS = ("small", "little", "tiny")
LARGE_WORDS = ("large", "big")

# Words for reading beyond those the lab's grammar writes, so plain user prompts read too.
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

# Words that carry no attribute but belong to the way scenes are described: articles,
# prepositions, conjunctions, the grammar's verbs of motion and framing. They are neither
# known attributes nor unknown words.
GRAMMAR_WORDS = frozenset(
    "a an the of to in on at over across above against under with without from into onto "
    "around about off along through near next beside by towards toward while whilst as and "
    "but or whereas then there is are it its this that where which who one two both each "
    "other another some shape shapes object objects thing video clip shot scene view of "
    "wall walls edge edges field sky slowly quickly fast gently steadily across".split()
    + [w for pair in MOVING_VERBS + (ROLLING_VERB,) for w in pair]
    + list(SMALL_WORDS + LARGE_WORDS))

# Words that end one clause and start the next: attributes attach within a clause first.
CLAUSE_BREAKS = frozenset(
    {",", ";", ":", ".", "!", "?", "and", "while", "whilst", "as", "but", "whereas"}
)
_ARTICLES = ("a ", "an ", "the ")
_TOKEN = re.compile(r"[a-z]+|[,;:.!?]")
_ANY_WORD = re.compile(r"[^\W\d_]+")


def _strip_article(phrase: str) -> str:
    for article in _ARTICLES:
        if phrase.startswith(article):
            return phrase[len(article):]
    return phrase


def _words(phrase: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(phrase.lower()))


def _build_lexicon() -> dict[tuple[str, ...], tuple[str, str]]:
    """Phrase (as a word tuple) -> (kind, label), from the tables above."""
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


# --------------------------------------------------------------------------------------------
# Reading


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
        """Integer labels keyed by :data:`LABEL_KEYS`: None where the prompt does not say,
        :data:`NO_OBJECT` for a second object it does not mention."""

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


@dataclass
class _Mention:
    kind: str
    label: str
    position: int
    clause: int
    length: int = 1


def _lookup(words: tuple[str, ...]) -> tuple[str, str] | None:
    found = LEXICON.get(words)
    if found is None and len(words) == 1:
        # Plural shape nouns: "balls", "boxes".
        for cut in (1, 2):
            singular = LEXICON.get((words[0][:-cut],))
            if singular is not None and singular[0] == "shape":
                return singular
    return found


def _mentions(tokens: tuple[str, ...]) -> list[_Mention]:
    """Attribute mentions in reading order, matching the longest phrase at each word."""
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
                mentions.append(_Mention(found[0], found[1], i, clause, n))
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
    mentions = _mentions(_words(prompt))
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


@dataclass(frozen=True)
class Understanding:
    """What a model could use of a prompt (``generate`` results and ``cache.lookup`` carry it
    as ``understood``)."""

    # Each phrase the model knows, as "phrase → kind label" ("ball → shape circle").
    known: tuple[str, ...]
    # Words the model has no meaning for (grammar words excepted), in prompt order.
    unknown: tuple[str, ...]
    # Whether the prompt names a shape or a background: otherwise the model draws no object
    # or scene the prompt asked for.
    drawable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"known": list(self.known), "unknown": list(self.unknown),
                "drawable": self.drawable}


def understand(prompt: str) -> Understanding:
    """The phrases of ``prompt`` the tiny-shapes model knows, the words it does not, and
    whether it can draw anything the prompt names."""
    tokens = _words(prompt)
    mentions = _mentions(tokens)
    covered = {i for m in mentions for i in range(m.position, m.position + m.length)}
    known = tuple(dict.fromkeys(
        f"{' '.join(tokens[m.position:m.position + m.length])} → {m.kind} {m.label}"
        for m in mentions))
    unknown = [t for i, t in enumerate(tokens)
               if i not in covered and t not in GRAMMAR_WORDS and t not in CLAUSE_BREAKS]
    # Words in other scripts ("一只猫"), which the reader's a-z tokens never see.
    unknown += [w for w in _ANY_WORD.findall(prompt.lower()) if not w.isascii()]
    drawable = any(m.kind in ("shape", "background") for m in mentions)
    return Understanding(known, tuple(dict.fromkeys(unknown)), drawable)
