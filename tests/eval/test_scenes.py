"""Procedural captioned scenes: the train/held-out split, captions and their parser, rendering."""

from __future__ import annotations

import math

import pytest
import torch

from qdit.eval import scenes
from qdit.eval.scenes import (
    ALL_SCENES, BACKGROUNDS, COLORS, HELD_OUT_FRACTION, HELD_OUT_SCENES, POSITIONS, SHAPES, SIZES, TRAIN_SCENES,
    Scene, held_out_prompts, parse_caption, random_scenes, render, scene_geometry,
)

VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}


def _rgb(palette: dict, name: str) -> torch.Tensor:
    return torch.tensor(palette[name], dtype=torch.float32) / 255


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------

def test_all_scenes_is_every_combination_once():
    assert len(ALL_SCENES) == 3 * 5 * 2 * 9 * 3
    assert len(set(ALL_SCENES)) == len(ALL_SCENES)
    assert len({s.caption for s in ALL_SCENES}) == len(ALL_SCENES)


def test_split_is_disjoint_and_covers_all_scenes():
    train, held = set(TRAIN_SCENES), set(HELD_OUT_SCENES)
    assert not train & held
    assert train | held == set(ALL_SCENES)
    assert len(TRAIN_SCENES) + len(HELD_OUT_SCENES) == len(ALL_SCENES)  # no duplicates inside a split


def test_held_out_fraction():
    assert len(HELD_OUT_SCENES) / len(ALL_SCENES) == pytest.approx(HELD_OUT_FRACTION, abs=1 / len(ALL_SCENES))


def test_every_attribute_value_is_seen_in_training():
    # Held-out captions are new combinations of known words, never a word the model has not seen.
    for attribute, values in VALUES.items():
        assert {getattr(s, attribute) for s in TRAIN_SCENES} == set(values), attribute


def test_split_is_fixed_across_calls():
    assert scenes._split() == (TRAIN_SCENES, HELD_OUT_SCENES)


# ---------------------------------------------------------------------------------------------
# Held-out prompts
# ---------------------------------------------------------------------------------------------

def test_held_out_prompts_are_deterministic_and_held_out_only():
    prompts = held_out_prompts(100)
    assert prompts == held_out_prompts(100)
    assert held_out_prompts(10) == prompts[:10]  # a prefix of the same fixed order
    held_captions = {s.caption for s in HELD_OUT_SCENES}
    assert set(prompts) <= held_captions


def test_held_out_prompts_first_40_mix_every_value_of_every_attribute():
    found = [parse_caption(p) for p in held_out_prompts(40)]
    for attribute, values in VALUES.items():
        assert {getattr(s, attribute) for s in found} == set(values), attribute


def test_held_out_prompts_are_shuffled_not_in_declaration_order():
    # ALL_SCENES order varies the background fastest: an unshuffled prefix would have one shape only.
    assert held_out_prompts(len(HELD_OUT_SCENES)) != [s.caption for s in HELD_OUT_SCENES]


def test_held_out_prompts_cycle_after_every_held_out_caption_once():
    n = len(HELD_OUT_SCENES)
    prompts = held_out_prompts(2 * n + 3)
    assert sorted(prompts[:n]) == sorted(s.caption for s in HELD_OUT_SCENES)
    assert prompts[n:2 * n] == prompts[:n]
    assert prompts[2 * n:] == prompts[:3]
    assert held_out_prompts(0) == []


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def test_caption_wording():
    scene = Scene("circle", "red", "large", "top left", "white")
    assert scene.caption == "a large red circle at the top left on a white background"
    assert Scene("square", "blue", "small", "center", "black").caption == \
        "a small blue square in the center on a black background"
    assert Scene("triangle", "green", "small", "right", "gray").caption == \
        "a small green triangle on the right on a gray background"


def test_parse_caption_round_trips_every_scene():
    for scene in ALL_SCENES:
        assert parse_caption(scene.caption) == scene


def test_parse_caption_ignores_surrounding_whitespace():
    scene = ALL_SCENES[17]
    assert parse_caption(f"  {scene.caption}\n") == scene


@pytest.mark.parametrize("caption", [
    "a large orange circle at the top left on a white background",  # unknown colour
    "a large red hexagon at the top left on a white background",  # unknown shape
    "a huge red circle at the top left on a white background",  # unknown size
    "a large red circle at the middle on a white background",  # unknown position
    "a large red circle in the top left on a white background",  # known place, wrong preposition
    "a large red circle at the top left on a pink background",  # unknown background
])
def test_parse_caption_rejects_words_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="outside the grammar") as info:
        parse_caption(caption)
    assert caption in str(info.value)  # the message quotes what it rejected


@pytest.mark.parametrize("caption", [
    "",
    "hello world",
    "a large red circle at the top left",  # no background
    "a large red circle at the top left on a white background.",  # trailing period
    "A large red circle at the top left on a white background",  # capitalised
    "a red circle at the top left on a white background",  # size missing
])
def test_parse_caption_rejects_garbage_with_an_example(caption):
    with pytest.raises(ValueError, match="not a scene caption") as info:
        parse_caption(caption)
    assert ALL_SCENES[0].caption in str(info.value)  # shows what a caption looks like


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def test_render_shape_dtype_and_range():
    picked = random_scenes(6, split="all", seed=2)
    images = render(picked, list(range(6)), size=48)
    assert images.shape == (6, 3, 48, 48) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert render(picked[:1], [0]).shape == (1, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


def test_render_is_deterministic_for_the_same_seeds():
    picked = random_scenes(8, split="all", seed=3)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    assert torch.equal(render(picked, seeds, size=64), render(picked, seeds, size=64))
    # An image depends on its own (scene, seed) only, not on the rest of the batch.
    assert torch.equal(render(picked, seeds, size=64)[3], render(picked[3:4], seeds[3:4], size=64)[0])


def test_render_differs_for_different_seeds():
    picked = random_scenes(8, split="all", seed=4)
    a = render(picked, list(range(8)), size=64)
    b = render(picked, list(range(100, 108)), size=64)
    for i in range(8):  # the seed jitters centre and size, so each image changes
        assert not torch.equal(a[i], b[i]), picked[i]


def test_geometry_jitter_stays_within_bounds():
    picked = [s for s in ALL_SCENES[::7]]
    centers, radii = scene_geometry(picked, list(range(len(picked))))
    grid = torch.tensor([POSITIONS[s.position][1] for s in picked])
    nominal = torch.tensor([SIZES[s.size] for s in picked])
    assert ((centers - grid).abs() <= scenes.CENTER_JITTER + 1e-6).all()
    assert ((radii / nominal - 1).abs() <= scenes.SIZE_JITTER + 1e-6).all()
    assert (centers - grid).abs().max() > scenes.CENTER_JITTER / 4  # it does jitter


def test_corners_are_background_for_every_scene():
    # Every scene (even a large one in a corner cell) leaves the image corners untouched.
    images = render(list(ALL_SCENES), [i * 7919 for i in range(len(ALL_SCENES))], size=64)
    for scene, image in zip(ALL_SCENES, images):
        bg = _rgb(BACKGROUNDS, scene.background)
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert torch.allclose(image[:, y, x], bg, atol=1e-6), (scene, y, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_centre_of_a_large_shape_has_its_colour(shape):
    size = 128
    for i, (color, background) in enumerate(zip(COLORS, [*BACKGROUNDS, *BACKGROUNDS])):
        scene = Scene(shape, color, "large", "center", background)
        seed = 40 + i
        image = render([scene], [seed], size=size)[0]
        (cx, cy), = scene_geometry([scene], [seed])[0].tolist()
        x, y = int(cx * size), int(cy * size)
        patch = image[:, y - 2:y + 3, x - 2:x + 3]  # 5x5 pixels around the centroid: well inside
        assert torch.allclose(patch, _rgb(COLORS, color).view(3, 1, 1).expand_as(patch), atol=1e-6), scene


def test_large_shapes_cover_more_than_small_ones_and_sit_in_their_cell():
    size = 96
    for scene_small in ALL_SCENES[::11]:
        if scene_small.size != "small":
            continue
        scene_large = Scene(scene_small.shape, scene_small.color, "large", scene_small.position,
                            scene_small.background)
        imgs = render([scene_small, scene_large], [5, 5], size=size)
        bg = _rgb(BACKGROUNDS, scene_small.background).view(3, 1, 1)
        covered = [(img - bg).abs().sum(0) > 0.05 for img in imgs]
        assert covered[1].sum() > 2 * covered[0].sum(), scene_small  # radius 0.18 vs 0.10
        ys, xs = covered[0].nonzero(as_tuple=True)
        gx, gy = POSITIONS[scene_small.position][1]
        assert abs((xs.float().mean() + 0.5) / size - gx) < 1 / 6, scene_small
        assert abs((ys.float().mean() + 0.5) / size - gy) < 1 / 6, scene_small


AREA_PER_R2 = {"circle": math.pi, "square": (2 * 0.9) ** 2, "triangle": 3 * math.sqrt(3) / 4 * 1.2 ** 2}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size_name", SIZES)
def test_soft_coverage_matches_the_shape_area(shape, size_name):
    # The anti-aliased edge is one pixel wide and centred on the outline, so summed coverage is the
    # exact area (the scorer infers the size from it).
    size = 128
    scene = Scene(shape, "yellow", size_name, "center", "gray")
    image = render([scene], [9], size=size)[0]
    fg, bg = _rgb(COLORS, "yellow").view(3, 1, 1), _rgb(BACKGROUNDS, "gray").view(3, 1, 1)
    coverage = ((image - bg) / (fg - bg)).mean(0)
    r = float(scene_geometry([scene], [9])[1][0])
    assert float(coverage.sum()) / size**2 == pytest.approx(AREA_PER_R2[shape] * r * r, rel=0.02)


def test_triangle_points_up():
    image = render([Scene("triangle", "red", "large", "center", "black")], [0], size=96)[0]
    covered = (image - _rgb(BACKGROUNDS, "black").view(3, 1, 1)).abs().sum(0) > 0.05
    widths = covered.sum(1)
    rows = widths.nonzero().flatten()
    top, bottom = int(rows[0]), int(rows[-1])
    assert widths[top + 2] < widths[bottom - 2]  # narrow apex above a wide base (y grows downwards)


# ---------------------------------------------------------------------------------------------
# Random scenes
# ---------------------------------------------------------------------------------------------

def test_random_scenes_respect_the_split():
    assert set(random_scenes(300, split="train", seed=1)) <= set(TRAIN_SCENES)
    assert set(random_scenes(300, split="held_out", seed=1)) <= set(HELD_OUT_SCENES)
    mixed = set(random_scenes(300, split="all", seed=1))
    assert mixed & set(TRAIN_SCENES) and mixed & set(HELD_OUT_SCENES)
    assert random_scenes(5) == random_scenes(5, split="train", seed=0)  # the defaults


def test_random_scenes_are_deterministic_by_seed():
    assert random_scenes(50, split="all", seed=7) == random_scenes(50, split="all", seed=7)
    assert random_scenes(50, split="all", seed=7) != random_scenes(50, split="all", seed=8)
    assert len(random_scenes(50, split="held_out", seed=7)) == 50


@pytest.mark.parametrize("split", ["test", "held-out", "", "TRAIN"])
def test_random_scenes_unknown_split_raises(split):
    with pytest.raises(ValueError, match="unknown split"):
        random_scenes(3, split=split)
