"""The Shapes world: coloured shapes moving over named backgrounds, rendered procedurally.

A :class:`Scene` names what a video shows (a background and one or two objects, each with a
shape, a colour and a motion) and fixes how it looks (object size, start position, speed,
background texture seed, lighting). :func:`render` turns a scene into frames with numpy
alone; the same scene always gives the same bytes, at any resolution and frame count.

Positions are resolution-free: an object's start and travel are fractions of the span its
centre can occupy while the whole object stays in frame, and time runs from 0 at the first
frame to 1 at the last, so a scene shows the same motion at 32x32 and at 240x426, over 8
frames or 16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from chaid.models.shapes_vocab import (
    BACKGROUNDS,
    COLOURS,
    LABEL_KEYS,
    MOTIONS,
    NO_OBJECT,
    SHAPES,
)

# The label vocabularies and their keys are the product's (what the tiny-shapes model was
# trained to draw): chaid/models/shapes_vocab.py.

# Fill colour (linear 0..1 RGB) of each named colour: saturated enough that the name holds
# under the lighting range of SceneDistribution, far apart enough for nearest-colour decoding.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.78, 0.16),
    "blue": (0.12, 0.28, 0.98),
    "yellow": (0.98, 0.88, 0.08),
    "white": (0.98, 0.98, 0.98),
    "purple": (0.56, 0.14, 0.78),
    "orange": (0.98, 0.50, 0.04),
}


@dataclass(frozen=True)
class ShapeGeometry:
    # Half extents of the bounding box in units of the object's size, (x, y); they decide
    # how far the centre may go while the object stays in frame.
    half_extent: tuple[float, float]
    # Length of the defining dimension (diameter, side) in units of the object's size:
    # chosen so the three shapes look about equally big.
    scale: float


SHAPE_GEOMETRY: dict[str, ShapeGeometry] = {
    "circle": ShapeGeometry(half_extent=(0.5, 0.5), scale=1.0),
    "square": ShapeGeometry(half_extent=(0.45, 0.45), scale=0.9),
    "triangle": ShapeGeometry(half_extent=(0.575, 0.575 * math.sqrt(3) / 2), scale=1.15),
}

# Outline width as a fraction of the object's size, and its floor in pixels: a thin ring that
# keeps an object visible on a background of its own colour (white on snow, green on grass).
OUTLINE_FRACTION = 0.07
OUTLINE_MIN_PX = 0.8
# Light falls on objects from the upper left: brightness runs from 1 + depth/2 there to
# 1 - depth/2 at the lower right, a hint of volume that leaves the mean colour unchanged.
SHADING_DEPTH = 0.16


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    motion: str
    # Size relative to min(height, width); bigger objects are easier to judge, but leave
    # less room to move.
    size: float = 0.35
    # Start position as a fraction of the feasible span of the centre, x left to right and
    # y top to bottom. For left/right/up/down it is a fraction of the starts from which the
    # whole travel stays in frame, so every value is valid.
    x: float = 0.5
    y: float = 0.5
    # Travel over the clip as a fraction of the feasible span: 0.5..1 reads as a clear
    # motion; for "bouncing" it is the path length, >1 guarantees a reflection.
    speed: float = 0.7
    # Direction of travel in radians (0 = right, pi/2 = down); only "bouncing" uses it.
    heading: float = math.pi / 4

    def __post_init__(self) -> None:
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOURS)
        _check_name("motion", self.motion, MOTIONS)
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"size must be in (0, 1], not {self.size}")


@dataclass(frozen=True)
class Lighting:
    # Overall gain; the palette stays recognisable within about 0.8..1.2.
    brightness: float = 1.0
    # Strength of a linear light falloff across the frame (0 = even light).
    gradient: float = 0.0
    # Direction the light falls off towards, radians (0 = darker to the right).
    angle: float = 0.0
    # Colour temperature: >0 warmer (more red, less blue), <0 cooler.
    warmth: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    # Seeds the background texture (grass blades, dunes, waves, stars) and nothing else.
    texture_seed: int = 0
    lighting: Lighting = field(default_factory=Lighting)

    def __post_init__(self) -> None:
        _check_name("background", self.background, BACKGROUNDS)
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, not {len(self.objects)}")


def _check_name(kind: str, name: str, vocabulary: tuple[str, ...]) -> None:
    if name not in vocabulary:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {vocabulary}")


def labels(scene: Scene) -> dict[str, int]:
    """Integer labels of a scene, keyed by :data:`LABEL_KEYS`.

    The first object's labels are ``shape``, ``colour``, ``motion``; the second's carry a
    ``_2`` suffix and are :data:`NO_OBJECT` when the scene has one object.
    """
    out = {"background": BACKGROUNDS.index(scene.background), "num_objects": len(scene.objects)}
    for suffix, index in (("", 0), ("_2", 1)):
        obj = scene.objects[index] if index < len(scene.objects) else None
        out["shape" + suffix] = SHAPES.index(obj.shape) if obj else NO_OBJECT
        out["colour" + suffix] = COLOURS.index(obj.colour) if obj else NO_OBJECT
        out["motion" + suffix] = MOTIONS.index(obj.motion) if obj else NO_OBJECT
    return {key: out[key] for key in LABEL_KEYS}


# --------------------------------------------------------------------------------------------
# Motion


def _fold(u: np.ndarray) -> np.ndarray:
    """Reflect positions into [0, 1] as a ball bouncing between two walls would."""
    v = np.mod(u, 2.0)
    return np.where(v > 1.0, 2.0 - v, v)


def _normalised_path(obj: ShapeObject, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre positions in [0, 1]^2 of the feasible span at times t in [0, 1]."""
    travel = min(max(obj.speed, 0.0), 1.0)
    x = np.full_like(t, obj.x)
    y = np.full_like(t, obj.y)
    if obj.motion == "left":
        x = travel + obj.x * (1.0 - travel) - travel * t
    elif obj.motion == "right":
        x = obj.x * (1.0 - travel) + travel * t
    elif obj.motion == "up":
        y = travel + obj.y * (1.0 - travel) - travel * t
    elif obj.motion == "down":
        y = obj.y * (1.0 - travel) + travel * t
    elif obj.motion == "bouncing":
        x = _fold(obj.x + obj.speed * math.cos(obj.heading) * t)
        y = _fold(obj.y + obj.speed * math.sin(obj.heading) * t)
    return x, y


def object_size_px(obj: ShapeObject, height: int, width: int) -> float:
    """The object's size in pixels at this resolution."""
    return obj.size * min(height, width)


def trajectory(
    obj: ShapeObject, frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (cx, cy), each shape (frames,), of the object's bounding-box centre.

    Pixel centres sit at integer coordinates; the box stays inside the frame whenever the
    object fits in it.
    """
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    u, v = _normalised_path(obj, t)
    size_px = object_size_px(obj, height, width)
    half_x, half_y = (h * size_px for h in SHAPE_GEOMETRY[obj.shape].half_extent)
    # The centre may range over [half, extent - half] in continuous coordinates whose pixel
    # centres are at i + 0.5; shift by -0.5 to index pixels.
    lo_x, hi_x = half_x, max(half_x, width - half_x)
    lo_y, hi_y = half_y, max(half_y, height - half_y)
    cx = lo_x + u * (hi_x - lo_x) - 0.5
    cy = lo_y + v * (hi_y - lo_y) - 0.5
    return cx.astype(np.float32), cy.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Shapes: signed distance in pixels (negative inside), vectorised over frames.


def _sdf_circle(dx: np.ndarray, dy: np.ndarray, side: float) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy) - side / 2


def _sdf_square(dx: np.ndarray, dy: np.ndarray, side: float) -> np.ndarray:
    qx = np.abs(dx) - side / 2
    qy = np.abs(dy) - side / 2
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _sdf_triangle(dx: np.ndarray, dy: np.ndarray, side: float) -> np.ndarray:
    # Equilateral triangle pointing up (Inigo Quilez's exact distance). dx, dy are relative
    # to the bounding-box centre with y down; the formula wants the centroid and y up.
    k = math.sqrt(3.0)
    r = side / 2
    height = side * k / 2
    px = np.abs(dx) - r
    py = -(dy - height / 6) + r / k
    fold = px + k * py > 0
    px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * r, 0.0)
    return -np.sqrt(px * px + py * py) * np.sign(py)


SHAPE_SDF: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "circle": _sdf_circle,
    "square": _sdf_square,
    "triangle": _sdf_triangle,
}


# --------------------------------------------------------------------------------------------
# Backgrounds. A painter takes the texture rng, times t (F,) in [0, 1] and normalised pixel
# coordinates yy (H, 1), xx (1, W) in [0, 1], and returns float32 RGB of shape (F or 1, H, W, 3).

Painter = Callable[[np.random.Generator, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _value_noise(
    rng: np.random.Generator, height: int, width: int, cells_y: int, cells_x: int
) -> np.ndarray:
    """Smooth noise in [0, 1] of shape (height, width): a random lattice, smoothstep-blended."""
    cells_y, cells_x = max(1, cells_y), max(1, cells_x)
    lattice = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    gy = np.linspace(0.0, cells_y, height, dtype=np.float32)
    gx = np.linspace(0.0, cells_x, width, dtype=np.float32)
    iy = np.minimum(gy.astype(np.int64), cells_y - 1)
    ix = np.minimum(gx.astype(np.int64), cells_x - 1)
    fy = gy - iy.astype(np.float32)
    fx = gx - ix.astype(np.float32)
    fy = (fy * fy * (3 - 2 * fy))[:, None]
    fx = (fx * fx * (3 - 2 * fx))[None, :]
    rows0, rows1 = lattice[iy], lattice[iy + 1]
    top = rows0[:, ix] * (1 - fx) + rows0[:, ix + 1] * fx
    bottom = rows1[:, ix] * (1 - fx) + rows1[:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _mix(a: Sequence[float], b: Sequence[float], amount: np.ndarray) -> np.ndarray:
    """Blend two RGB colours by amount (any shape) into amount.shape + (3,)."""
    a_ = np.asarray(a, dtype=np.float32)
    b_ = np.asarray(b, dtype=np.float32)
    return a_ + (b_ - a_) * amount[..., None]


def _grassy_field(
    rng: np.random.Generator, t: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    h, w = yy.shape[0], xx.shape[1]
    patches = _value_noise(rng, h, w, 3, 4)
    # Blades: noise that varies per column but slowly down the rows gives vertical streaks.
    blades = _value_noise(rng, h, w, max(2, h // 5), w)
    shade = 0.45 * patches + 0.55 * blades
    # A touch of perspective: the far field (top) is a little lighter and yellower.
    shade = shade * (0.8 + 0.2 * yy) + 0.15 * (1 - yy)
    rgb = _mix((0.12, 0.36, 0.08), (0.42, 0.72, 0.22), np.clip(shade, 0, 1))
    return rgb[None]


# Wavelengths the ocean's crests travel over a clip: clearly moving, and short of a whole
# period so the last frame never repeats the first.
WAVE_TRAVEL = 0.75


def _ocean(rng: np.random.Generator, t: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    h, w = yy.shape[0], xx.shape[1]
    warp = _value_noise(rng, h, w, 3, 4)
    foam_noise = _value_noise(rng, h, w, max(2, h // 6), max(2, w // 3))
    rows = 5.0 + 3.0 * rng.random()
    # Crests travel towards the viewer (down the frame) by WAVE_TRAVEL wavelengths per clip;
    # sin(a - b) = sin(a)cos(b) - cos(a)sin(b) keeps the per-frame work to a multiply-add.
    crest = 2 * math.pi * (rows * yy + 0.6 * warp) + 2 * math.pi * rng.random()
    shift = (2 * math.pi * WAVE_TRAVEL) * t
    wave = (
        np.sin(crest)[None] * np.cos(shift)[:, None, None]
        - np.cos(crest)[None] * np.sin(shift)[:, None, None]
    )  # (F, H, W)
    # Depth blends deep into light water and stays within [0, 1] without clipping, so the
    # blend is linear in the wave: a static base plus the wave times a colour step.
    deep = np.array([0.02, 0.14, 0.42], dtype=np.float32)
    step = np.array([0.06, 0.28, 0.36], dtype=np.float32)
    base = deep + step * (0.275 + 0.3 * warp + 0.15 * yy)[..., None]
    rgb = base[None] + wave[..., None] * (0.275 * step)
    # White foam on the highest crests.
    foam = 0.7 * np.clip((wave - 0.8) * 5.0, 0.0, 1.0) * (foam_noise > 0.55)[None]
    return rgb + (np.float32(0.8) - rgb) * foam[..., None]


def _desert(rng: np.random.Generator, t: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    h, w = yy.shape[0], xx.shape[1]
    ridges = 2.0 + 2.0 * rng.random()
    swing = 0.08 + 0.08 * rng.random()
    phase = 2 * math.pi * rng.random()
    dunes = np.sin(2 * math.pi * (ridges * yy + swing * np.sin(2 * math.pi * xx * 1.3 + phase)))
    # Wind-facing slopes are lit, lee slopes in shadow; a fine grain of sand on top.
    grain = rng.random((h, w), dtype=np.float32)
    shade = 0.5 + 0.35 * dunes + 0.15 * (grain - 0.5) + 0.2 * (_value_noise(rng, h, w, 2, 3) - 0.5)
    rgb = _mix((0.72, 0.55, 0.32), (0.95, 0.82, 0.58), np.clip(shade, 0, 1))
    return rgb[None]


def _snowy_field(
    rng: np.random.Generator, t: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    h, w = yy.shape[0], xx.shape[1]
    drifts = _value_noise(rng, h, w, 2, 4)
    # Blue-grey shadows in the hollows between drifts.
    rgb = _mix((0.80, 0.85, 0.94), (0.97, 0.98, 1.0), np.clip(0.35 + 0.9 * drifts, 0, 1))
    speckle = rng.random((h, w), dtype=np.float32)
    rgb = np.where((speckle < 0.04)[..., None], np.float32(0.72) * rgb, rgb)
    rgb = np.where((speckle > 0.985)[..., None], np.float32(1.0), rgb)
    return rgb[None]


def _night_sky(
    rng: np.random.Generator, t: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    h, w = yy.shape[0], xx.shape[1]
    glow = _value_noise(rng, h, w, 2, 3)
    # Black at the zenith, deep blue towards the horizon, with a faint milky haze.
    rgb = _mix((0.005, 0.01, 0.04), (0.05, 0.08, 0.24), np.clip(yy * 0.8 + 0.35 * glow, 0, 1))
    frames = np.repeat(rgb[None], len(t), axis=0)
    count = max(3, int(0.012 * h * w))
    sy = rng.integers(0, h, count)
    sx = rng.integers(0, w, count)
    brightness = 0.5 + 0.5 * rng.random(count, dtype=np.float32)
    rate = 1.0 + 2.0 * rng.random(count, dtype=np.float32)
    phase = 2 * math.pi * rng.random(count, dtype=np.float32)
    twinkle = 0.7 + 0.3 * np.sin(2 * math.pi * rate[None] * t[:, None] + phase[None])
    star = (brightness[None] * twinkle).astype(np.float32)[..., None]  # (F, count, 1)
    tint = np.array([0.95, 0.95, 1.0], dtype=np.float32)
    frames[:, sy, sx, :] = np.maximum(frames[:, sy, sx, :], star * tint)
    return frames


@dataclass(frozen=True)
class BackgroundStyle:
    painter: Painter
    # Outline drawn around objects: dark on bright grounds, a pale rim on the dark sky.
    outline: tuple[float, float, float]


BACKGROUND_STYLES: dict[str, BackgroundStyle] = {
    "grassy field": BackgroundStyle(_grassy_field, outline=(0.04, 0.05, 0.03)),
    "ocean": BackgroundStyle(_ocean, outline=(0.02, 0.03, 0.06)),
    "desert": BackgroundStyle(_desert, outline=(0.10, 0.06, 0.03)),
    "snowy field": BackgroundStyle(_snowy_field, outline=(0.08, 0.09, 0.12)),
    "night sky": BackgroundStyle(_night_sky, outline=(0.70, 0.72, 0.80)),
}


# --------------------------------------------------------------------------------------------
# Rendering


def _lighting_gain(lighting: Lighting, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Per-pixel, per-channel gain (H, W, 3) of the scene's light."""
    ramp = (xx - 0.5) * math.cos(lighting.angle) + (yy - 0.5) * math.sin(lighting.angle)
    gain = lighting.brightness * (1.0 - lighting.gradient * 2.0 * ramp)
    tint = np.array(
        [1.0 + lighting.warmth, 1.0, 1.0 - lighting.warmth], dtype=np.float32
    )
    return gain[..., None].astype(np.float32) * tint


def _object_window(
    centre: np.ndarray, half: float, extent: int
) -> tuple[np.ndarray, int]:
    """Per-frame start (F,) and common length of a pixel window that holds the object."""
    length = min(extent, int(math.ceil(2 * half)) + 3)
    start = np.floor(centre - half).astype(np.int64) - 1
    return np.clip(start, 0, extent - length), length


def _quantise(rgb: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] to uint8, rounding to nearest."""
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _render(
    scene: Scene, frames: int, height: int, width: int, want_masks: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    if frames < 1 or height < 2 or width < 2:
        raise ValueError(f"need frames >= 1 and at least 2x2 pixels, not {frames}x{height}x{width}")
    style = BACKGROUND_STYLES[scene.background]
    rng = np.random.default_rng(scene.texture_seed)
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32) if frames > 1 else np.zeros(1, np.float32)
    yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]

    # 1. Lit background, quantised once; static textures are broadcast over time.
    gain = _lighting_gain(scene.lighting, yy, xx)  # (H, W, 3)
    background = _quantise(style.painter(rng, t, yy, xx) * gain)
    video = np.broadcast_to(background, (frames, height, width, 3)).copy()

    # 2. Objects in order, each with an outline ring and a little shading, composited in a
    # window around the object: an object covers a small part of the frame.
    outline_rgb = np.asarray(style.outline, dtype=np.float32)
    frame_index = np.arange(frames)[:, None, None]  # (F, 1, 1)
    coverages = []
    for obj in scene.objects:
        cx, cy = trajectory(obj, frames, height, width)
        size_px = object_size_px(obj, height, width)
        half_x, half_y = (h * size_px for h in SHAPE_GEOMETRY[obj.shape].half_extent)
        x0, window_w = _object_window(cx, half_x, width)
        y0, window_h = _object_window(cy, half_y, height)
        rows = y0[:, None] + np.arange(window_h)  # (F, h)
        cols = x0[:, None] + np.arange(window_w)  # (F, w)
        dy = (rows - cy[:, None]).astype(np.float32)[:, :, None]  # (F, h, 1)
        dx = (cols - cx[:, None]).astype(np.float32)[:, None, :]  # (F, 1, w)
        dist = SHAPE_SDF[obj.shape](dx, dy, size_px * SHAPE_GEOMETRY[obj.shape].scale)  # (F, h, w)
        outline_px = max(OUTLINE_MIN_PX, OUTLINE_FRACTION * size_px)
        outer = np.clip(0.5 - dist, 0.0, 1.0)
        inner = np.clip(0.5 - dist - outline_px, 0.0, 1.0)
        shade = 1.0 - SHADING_DEPTH * np.clip((dx + dy) / (2 * size_px), -0.5, 0.5)
        fill = np.asarray(PALETTE[obj.colour], dtype=np.float32) * shade[..., None]
        where = (frame_index, rows[:, :, None], cols[:, None, :])
        light = gain[rows[:, :, None], cols[:, None, :]]  # (F, h, w, 3)
        ink = outline_rgb * (outer - inner)[..., None] + fill * inner[..., None]
        patch = video[where].astype(np.float32) * (1.0 / 255.0)
        video[where] = _quantise(patch * (1.0 - outer)[..., None] + ink * light)
        coverages.append((where, outer))

    if not want_masks:
        return video, None

    # 4. Visible coverage: an object drawn later hides the ones before it.
    masks = np.zeros((frames, len(coverages), height, width), dtype=np.float32)
    for index, (where, outer) in enumerate(coverages):
        masks[:, index][where] = outer
    hidden = np.zeros((frames, height, width), dtype=np.float32)
    for index in range(len(coverages) - 1, -1, -1):
        coverage = masks[:, index].copy()
        masks[:, index] *= 1.0 - hidden
        hidden = 1.0 - (1.0 - hidden) * (1.0 - coverage)
    return video, masks


def render_with_masks(
    scene: Scene, frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene and report where each object is visible.

    Returns ``(video, masks)``: video is uint8 of shape (frames, height, width, 3); masks is
    float32 of shape (frames, n_objects, height, width), the antialiased coverage of each
    object (outline included) after occlusion by objects drawn later. Deterministic: the same
    arguments give identical arrays. Raises ValueError for fewer than 1 frame or 2x2 pixels.
    """
    video, masks = _render(scene, frames, height, width, want_masks=True)
    assert masks is not None
    return video, masks


def render(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
    """Render a scene as uint8 RGB frames of shape (frames, height, width, 3).

    Deterministic in its arguments; any resolution of at least 2x2 pixels works.
    """
    return _render(scene, frames, height, width, want_masks=False)[0]


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SceneDistribution:
    # Share of scenes with two objects: richer prompts, harder to learn and to judge.
    two_object_prob: float = 0.3
    # Relative weights over SHAPES / COLOURS / MOTIONS / BACKGROUNDS; None is uniform.
    shape_weights: tuple[float, ...] | None = None
    colour_weights: tuple[float, ...] | None = None
    motion_weights: tuple[float, ...] | None = None
    background_weights: tuple[float, ...] | None = None
    # Object size ranges (fraction of min(H, W)) alone and in pairs: pairs are smaller so
    # they fit side by side; below ~0.2 an object is a few pixels at 32x32.
    single_size: tuple[float, float] = (0.3, 0.42)
    pair_size: tuple[float, float] = (0.22, 0.3)
    # Travel of left/right/up/down motions as a fraction of the span: at least half the
    # frame, so the direction is unmistakable.
    travel: tuple[float, float] = (0.5, 1.0)
    # Path length of bouncing motion; with the heading range below, >= 1.45 makes the larger
    # axis travel at least 1, which guarantees a reflection in the clip.
    bounce_travel: tuple[float, float] = (1.45, 2.0)
    # Scale of the lighting variation: 0 gives even, neutral light; 1 the default range.
    lighting_variation: float = 1.0
    # Scenes for which this returns True are redrawn (held-out attribute combinations).
    exclude: Callable[[Scene], bool] | None = None


DEFAULT_DISTRIBUTION = SceneDistribution()
# Latest time (fraction of the clip) of the first reflection of a sampled bouncing object.
BOUNCE_BY = 0.6
# Redraws before sample_scene gives up on an `exclude` that rejects (almost) everything.
MAX_REDRAWS = 1000


def _choice(
    rng: np.random.Generator, names: tuple[str, ...], weights: tuple[float, ...] | None
) -> str:
    if weights is None:
        return names[int(rng.integers(len(names)))]
    p = np.asarray(weights, dtype=np.float64)
    if p.shape != (len(names),) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"weights for {names} must be {len(names)} non-negative numbers")
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _vary_object(
    rng: np.random.Generator,
    dist: SceneDistribution,
    attributes: tuple[str, str, str],
    slot: int,
    pair: bool,
) -> ShapeObject:
    """An object with the given (shape, colour, motion) and random size, start, speed."""
    shape, colour, motion = attributes
    size = _uniform(rng, dist.pair_size if pair else dist.single_size)
    x, y = float(rng.random()), float(rng.random())
    if pair:
        # Keep a pair apart: the first object in the top half, the second in the bottom one,
        # or left/right halves when moving vertically.
        band = (0.0, 0.35) if slot == 0 else (0.65, 1.0)
        if motion in ("up", "down"):
            x = _uniform(rng, band)
        else:
            y = _uniform(rng, band)
    speed = _uniform(rng, dist.bounce_travel if motion == "bouncing" else dist.travel)
    # Bouncing heads diagonally (20..70 degrees off an axis, any quadrant) so both axes move.
    heading = math.radians(float(rng.uniform(20.0, 70.0)) + 90.0 * int(rng.integers(4)))
    if motion == "bouncing":
        x, y = _early_bounce_start(rng, x, y, speed, heading)
    return ShapeObject(shape, colour, motion, size=size, x=x, y=y, speed=speed, heading=heading)


def _early_bounce_start(
    rng: np.random.Generator, x: float, y: float, speed: float, heading: float
) -> tuple[float, float]:
    """Move the start along the faster axis so the first reflection comes by 60% of the
    clip: a bounce late in the clip would look like a straight motion at 8 frames."""
    vx, vy = speed * math.cos(heading), speed * math.sin(heading)
    velocity = vx if abs(vx) >= abs(vy) else vy
    gap = float(rng.uniform(0.05, min(1.0, BOUNCE_BY * abs(velocity))))
    start = 1.0 - gap if velocity > 0 else gap
    return (start, y) if abs(vx) >= abs(vy) else (x, start)


def _vary_lighting(rng: np.random.Generator, scale: float) -> Lighting:
    return Lighting(
        brightness=1.0 + scale * float(rng.uniform(-0.12, 0.12)),
        gradient=scale * float(rng.uniform(0.0, 0.15)),
        angle=float(rng.uniform(0.0, 2 * math.pi)),
        warmth=scale * float(rng.uniform(-0.05, 0.05)),
    )


def sample_scene(
    rng: np.random.Generator,
    distribution: SceneDistribution = DEFAULT_DISTRIBUTION,
    *,
    background: str | None = None,
    objects: Sequence[tuple[str, str, str]] | None = None,
) -> Scene:
    """Draw a scene from the distribution, seeded by rng alone.

    ``background`` and ``objects`` (a sequence of one or two (shape, colour, motion)
    triples) fix those attributes; everything else (the other attributes, size, position,
    speed, texture, lighting) is drawn. Two drawn objects always differ in shape or colour,
    so a prompt can tell them apart. Raises ValueError for unknown names, and RuntimeError
    when ``distribution.exclude`` rejects MAX_REDRAWS draws in a row or the weights leave
    no two objects that differ.
    """
    dist = distribution
    for _ in range(MAX_REDRAWS):
        bg = background or _choice(rng, BACKGROUNDS, dist.background_weights)
        if objects is not None:
            chosen: list[tuple[str, str, str]] = [(o[0], o[1], o[2]) for o in objects]
        else:
            count = 2 if rng.random() < dist.two_object_prob else 1
            chosen = []
            for _ in range(MAX_REDRAWS):
                triple = (
                    _choice(rng, SHAPES, dist.shape_weights),
                    _choice(rng, COLOURS, dist.colour_weights),
                    _choice(rng, MOTIONS, dist.motion_weights),
                )
                if all(triple[:2] != other[:2] for other in chosen):
                    chosen.append(triple)
                if len(chosen) == count:
                    break
            else:
                raise RuntimeError("the distribution cannot draw two objects that differ")
        pair = len(chosen) == 2
        scene = Scene(
            background=bg,
            objects=tuple(
                _vary_object(rng, dist, triple, slot, pair)
                for slot, triple in enumerate(chosen)
            ),
            texture_seed=int(rng.integers(2**31)),
            lighting=_vary_lighting(rng, dist.lighting_variation),
        )
        if dist.exclude is None or not dist.exclude(scene):
            return scene
    raise RuntimeError(f"distribution.exclude rejected {MAX_REDRAWS} scenes in a row")
