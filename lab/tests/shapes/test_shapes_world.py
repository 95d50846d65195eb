"""The Shapes world: determinism, looks that match the names, motion, shapes, sampling, speed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from chaid_lab.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    LABEL_KEYS,
    MOTIONS,
    NO_OBJECT,
    PALETTE,
    SHAPES,
    Lighting,
    Scene,
    SceneDistribution,
    ShapeObject,
    labels,
    object_size_px,
    render,
    render_with_masks,
    sample_scene,
    trajectory,
)

# Each named colour as a person would check it: (channel, lower, upper) bounds on the mean
# interior RGB in [0, 1]. Independent of PALETTE, so a palette edit cannot hide a bad colour.
COLOUR_LOOKS: dict[str, list[tuple[int, float, float]]] = {
    "red": [(0, 0.6, 1.0), (1, 0.0, 0.25), (2, 0.0, 0.25)],
    "green": [(0, 0.0, 0.35), (1, 0.5, 1.0), (2, 0.0, 0.35)],
    "blue": [(0, 0.0, 0.3), (1, 0.0, 0.45), (2, 0.65, 1.0)],
    "yellow": [(0, 0.7, 1.0), (1, 0.6, 1.0), (2, 0.0, 0.3)],
    "white": [(0, 0.8, 1.0), (1, 0.8, 1.0), (2, 0.8, 1.0)],
    "purple": [(0, 0.35, 0.75), (1, 0.0, 0.3), (2, 0.5, 1.0)],
    "orange": [(0, 0.75, 1.0), (1, 0.3, 0.65), (2, 0.0, 0.2)],
}


def still_scene(
    shape: str = "circle",
    colour: str = "red",
    background: str = "desert",
    *,
    motion: str = "still",
    size: float = 0.4,
    seed: int = 0,
    lighting: Lighting | None = None,
) -> Scene:
    obj = ShapeObject(shape, colour, motion, size=size, x=0.5, y=0.5, speed=0.8)
    return Scene(background, (obj,), texture_seed=seed, lighting=lighting or Lighting())


def random_lighting(rng: np.random.Generator) -> Lighting:
    """Lighting at the edges of the sampled range, where colours are most at risk."""
    return Lighting(
        brightness=float(rng.choice([0.88, 1.12])),
        gradient=0.15,
        angle=float(rng.uniform(0, 2 * math.pi)),
        warmth=float(rng.choice([-0.05, 0.05])),
    )


def interior_mean(scene: Scene, size: int = 64) -> np.ndarray:
    """Mean RGB in [0, 1] of the first frame's pixels well inside the first object."""
    video, masks = render_with_masks(scene, 1, size, size)
    obj = scene.objects[0]
    cx, cy = trajectory(obj, 1, size, size)
    yy, xx = np.mgrid[0:size, 0:size]
    near = np.hypot(xx - cx[0], yy - cy[0]) <= 0.15 * object_size_px(obj, size, size)
    inside = near & (masks[0, 0] >= 0.999)
    assert inside.sum() >= 9
    return video[0][inside].mean(axis=0) / 255.0


def background_pixels(scene: Scene, frames: int = 4, size: int = 64) -> np.ndarray:
    video, masks = render_with_masks(scene, frames, size, size)
    free = masks.sum(axis=1) == 0  # (F, H, W)
    return video[free].astype(np.float64) / 255.0  # (N, 3)


def centroids(masks: np.ndarray, index: int = 0) -> np.ndarray:
    """(F, 2) coverage-weighted (x, y) centre of object `index` in each frame."""
    cover = masks[:, index]
    yy, xx = np.mgrid[0 : cover.shape[1], 0 : cover.shape[2]]
    total = cover.sum(axis=(1, 2))
    x = (cover * xx).sum(axis=(1, 2)) / total
    y = (cover * yy).sum(axis=(1, 2)) / total
    return np.stack([x, y], axis=1)


# --------------------------------------------------------------------------------------------
# Determinism and output format


def test_same_scene_renders_identical_frames() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        scene = sample_scene(rng)
        np.testing.assert_array_equal(render(scene, 8, 32, 32), render(scene, 8, 32, 32))


def test_same_seed_samples_same_scenes() -> None:
    first = [sample_scene(np.random.default_rng(3)) for _ in range(3)]
    again = [sample_scene(np.random.default_rng(3)) for _ in range(3)]
    assert first == again
    assert sample_scene(np.random.default_rng(3)) != sample_scene(np.random.default_rng(4))


def test_texture_seed_changes_background_only() -> None:
    a = render_with_masks(still_scene(background="grassy field", seed=1), 2, 32, 32)
    b = render_with_masks(still_scene(background="grassy field", seed=2), 2, 32, 32)
    assert not np.array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(("frames", "height", "width"), [(1, 2, 2), (8, 32, 32), (16, 64, 64),
                                                         (3, 240, 426), (5, 48, 20)])
def test_render_shape_and_dtype(frames: int, height: int, width: int) -> None:
    rng = np.random.default_rng(frames * height)
    for _ in range(3):
        scene = sample_scene(rng)
        video, masks = render_with_masks(scene, frames, height, width)
        assert video.shape == (frames, height, width, 3) and video.dtype == np.uint8
        assert masks.shape == (frames, len(scene.objects), height, width)
        assert masks.dtype == np.float32 and masks.min() >= 0 and masks.max() <= 1


def test_render_rejects_empty_output() -> None:
    with pytest.raises(ValueError):
        render(still_scene(), 0, 32, 32)


def test_scene_validates_names_and_object_count() -> None:
    with pytest.raises(ValueError, match="colour"):
        ShapeObject("circle", "teal", "left")
    with pytest.raises(ValueError, match="background"):
        Scene("moon", (ShapeObject("circle", "red", "left"),))
    with pytest.raises(ValueError, match="one or two"):
        Scene("ocean", ())


# --------------------------------------------------------------------------------------------
# Looks match names


@pytest.mark.parametrize("colour", COLOURS)
def test_object_colour_looks_like_its_name(colour: str) -> None:
    rng = np.random.default_rng(COLOURS.index(colour))
    palette = np.array([PALETTE[c] for c in COLOURS])
    for background in BACKGROUNDS:
        for shape in SHAPES:
            for lighting in (Lighting(), random_lighting(rng)):
                mean = interior_mean(still_scene(shape, colour, background, lighting=lighting))
                for channel, low, high in COLOUR_LOOKS[colour]:
                    assert low <= mean[channel] <= high, (colour, background, lighting, mean)
                nearest = COLOURS[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
                assert nearest == colour, (colour, background, lighting, mean)


def test_background_statistics_match_names() -> None:
    rng = np.random.default_rng(11)
    for background in BACKGROUNDS:
        for seed in range(4):
            scene = still_scene(background=background, seed=seed, lighting=random_lighting(rng))
            pixels = background_pixels(scene)
            r, g, b = pixels.mean(axis=0)
            luminance = pixels @ np.array([0.299, 0.587, 0.114])
            context = (background, seed, (r, g, b))
            # Textured, not flat.
            assert luminance.std() > 0.015, context
            if background == "grassy field":
                assert g > r + 0.15 and g > b + 0.25, context
            elif background == "ocean":
                assert b > r + 0.3 and b > g + 0.1, context
            elif background == "desert":
                assert r > g > b and r > 0.65 and r - b > 0.2, context
            elif background == "snowy field":
                assert min(r, g, b) > 0.75 and (luminance > 0.7).mean() > 0.9, context
            elif background == "night sky":
                assert max(r, g, b) < 0.2 and b >= r and np.median(luminance) < 0.12, context


def test_ocean_waves_move_and_stars_twinkle() -> None:
    for background in ("ocean", "night sky"):
        video = render(still_scene(background=background), 8, 32, 32).astype(int)
        for later in (video[4], video[-1]):
            change = np.abs(video[0] - later)
            assert change.max() >= 20 and change.mean() > 0.2, background


def test_every_colour_stands_out_on_every_background() -> None:
    """The object's fill or its outline differs clearly from the ground around it."""
    size = 64
    for background in BACKGROUNDS:
        for colour in COLOURS:
            scene = still_scene("circle", colour, background, size=0.4)
            frame = render(scene, 1, size, size)[0].astype(np.float64) / 255.0
            cx, cy = trajectory(scene.objects[0], 1, size, size)
            radius = 0.5 * object_size_px(scene.objects[0], size, size)
            yy, xx = np.mgrid[0:size, 0:size]
            dist = np.hypot(xx - cx[0], yy - cy[0])
            ring = frame[(dist > radius + 2) & (dist < radius + 5)].mean(axis=0)
            fill = frame[dist < radius * 0.5].mean(axis=0)
            outline = frame[(dist > radius - 1.3) & (dist < radius - 0.5)].mean(axis=0)
            contrast = max(np.linalg.norm(fill - ring), np.linalg.norm(outline - ring))
            assert contrast > 0.3, (background, colour, fill, outline, ring)


# --------------------------------------------------------------------------------------------
# Motion


def moving_scenes(motion: str, count: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [
        sample_scene(rng, background=str(rng.choice(BACKGROUNDS)),
                     objects=[(str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), motion)])
        for _ in range(count)
    ]


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_linear_motion_goes_the_named_way(motion: str) -> None:
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[motion]
    for scene in moving_scenes(motion, 12, MOTIONS.index(motion)):
        for frames, height, width in ((16, 32, 32), (8, 40, 64)):
            centre = centroids(render_with_masks(scene, frames, height, width)[1])
            step = np.diff(centre[:, axis]) * sign
            extent = (width, height)[axis]
            assert (step > 0).all(), (scene, centre)
            assert step.sum() > 0.2 * extent, (scene, centre)
            assert np.ptp(centre[:, 1 - axis]) < 0.5, (scene, centre)


def test_still_objects_stay_put() -> None:
    for scene in moving_scenes("still", 10, 5):
        centre = centroids(render_with_masks(scene, 16, 32, 32)[1])
        assert np.ptp(centre, axis=0).max() < 1e-3


@pytest.mark.parametrize("frames", [8, 16])
def test_bouncing_turns_around_and_stays_in_frame(frames: int) -> None:
    for scene in moving_scenes("bouncing", 25, frames):
        video, masks = render_with_masks(scene, frames, 32, 32)
        velocity = np.diff(centroids(masks), axis=0)
        turned = [(np.sign(velocity[:, a]) != np.sign(velocity[0, a])).any() for a in (0, 1)]
        assert any(turned), (scene, velocity)
        assert (np.hypot(velocity[:, 0], velocity[:, 1]) > 0.5).all(), (scene, velocity)


def test_objects_stay_in_frame() -> None:
    """The frame edge never cuts an object: its visible area is the same in every frame."""
    rng = np.random.default_rng(2)
    for _ in range(60):
        scene = sample_scene(rng, SceneDistribution(two_object_prob=0.0))
        _, masks = render_with_masks(scene, 8, 32, 48)
        area = masks[:, 0].sum(axis=(1, 2))
        assert area.min() > 0.97 * area.max(), (scene, area)


def test_pixels_alone_show_the_motion() -> None:
    """Without masks: the red pixels on a desert move the named way."""
    for motion, axis, sign in (("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)):
        video = render(still_scene("square", "red", "desert", motion=motion, size=0.3), 8, 48, 48)
        rgb = video.astype(int)
        red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
        coords = [np.argwhere(frame).mean(axis=0)[::-1] for frame in red]  # (x, y)
        assert (coords[-1][axis] - coords[0][axis]) * sign > 10, motion


# --------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize(("size", "resolution"), [(0.4, 64), (0.3, 32)])
def test_shapes_fill_their_boxes_differently(size: float, resolution: int) -> None:
    fill = {}
    for shape in SHAPES:
        _, masks = render_with_masks(still_scene(shape, size=size), 1, resolution, resolution)
        solid = masks[0, 0] >= 0.5
        rows, cols = np.nonzero(solid)
        box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        fill[shape] = solid.sum() / box
    assert abs(fill["square"] - 1.0) < 0.05, fill
    assert abs(fill["circle"] - math.pi / 4) < 0.08, fill
    assert abs(fill["triangle"] - 0.5) < 0.1, fill


def test_triangle_points_up() -> None:
    _, masks = render_with_masks(still_scene("triangle"), 1, 64, 64)
    solid = masks[0, 0] >= 0.5
    widths = solid.sum(axis=1)
    rows = np.nonzero(widths)[0]
    assert widths[rows[0]] < widths[rows[-1]] / 4


# --------------------------------------------------------------------------------------------
# Sampling and labels


def test_distribution_controls_the_sample() -> None:
    rng = np.random.default_rng(0)
    singles = SceneDistribution(two_object_prob=0.0)
    pairs = SceneDistribution(two_object_prob=1.0)
    assert all(len(sample_scene(rng, singles).objects) == 1 for _ in range(50))
    assert all(len(sample_scene(rng, pairs).objects) == 2 for _ in range(50))
    only_up = SceneDistribution(motion_weights=tuple(float(m == "up") for m in MOTIONS))
    assert {o.motion for _ in range(50) for o in sample_scene(rng, only_up).objects} == {"up"}
    no_red_ocean = SceneDistribution(
        exclude=lambda s: s.background == "ocean" and any(o.colour == "red" for o in s.objects)
    )
    for _ in range(200):
        scene = sample_scene(rng, no_red_ocean)
        assert not (scene.background == "ocean" and scene.objects[0].colour == "red")
    with pytest.raises(RuntimeError):
        sample_scene(rng, SceneDistribution(exclude=lambda s: True))
    one_kind = SceneDistribution(
        two_object_prob=1.0,
        shape_weights=(1.0, 0.0, 0.0),
        colour_weights=(1.0,) + (0.0,) * (len(COLOURS) - 1),
    )
    with pytest.raises(RuntimeError, match="differ"):
        sample_scene(rng, one_kind)


def test_sample_covers_every_label_and_pairs_differ() -> None:
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(600)]
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.motion for o in objects} == set(MOTIONS)
    share = np.mean([len(s.objects) == 2 for s in scenes])
    assert 0.2 < share < 0.4
    for scene in scenes:
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert (a.shape, a.colour) != (b.shape, b.colour)


def test_fixed_attributes_are_kept() -> None:
    rng = np.random.default_rng(4)
    triples = [("triangle", "white", "bouncing"), ("circle", "white", "left")]
    scene = sample_scene(rng, background="snowy field", objects=triples)
    assert scene.background == "snowy field"
    assert [(o.shape, o.colour, o.motion) for o in scene.objects] == triples


def test_labels_encode_the_vocabularies() -> None:
    scene = Scene("night sky", (ShapeObject("triangle", "purple", "down"),))
    assert labels(scene) == {
        "background": BACKGROUNDS.index("night sky"), "num_objects": 1,
        "shape": SHAPES.index("triangle"), "colour": COLOURS.index("purple"),
        "motion": MOTIONS.index("down"),
        "shape_2": NO_OBJECT, "colour_2": NO_OBJECT, "motion_2": NO_OBJECT,
    }
    pair = sample_scene(np.random.default_rng(0), objects=[("circle", "red", "left"),
                                                          ("square", "blue", "up")])
    encoded = labels(pair)
    assert tuple(encoded) == LABEL_KEYS
    assert (encoded["shape_2"], encoded["colour_2"], encoded["motion_2"]) == (1, 2, 2)


# --------------------------------------------------------------------------------------------
# Speed


def test_render_speed() -> None:
    """Training renders millions of frames: report the cost per clip (loose bound only)."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(100)]
    report = []
    for frames, height, width, count in ((8, 32, 32, 100), (16, 64, 64, 100), (16, 240, 426, 4)):
        render(scenes[0], frames, height, width)
        start = time.perf_counter()
        for scene in scenes[:count]:
            render(scene, frames, height, width)
        per_clip = (time.perf_counter() - start) / count
        report.append(f"{frames}x{height}x{width}: {per_clip * 1e3:.2f} ms/clip")
        if height <= 64:
            assert per_clip < 0.05
    print("render speed: " + "; ".join(report))
