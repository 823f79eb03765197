"""The procedural scorer reads back the scene of a rendered image: clean, blurred, noisy; and it says
no to wrong captions and empty images."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from qdit.eval.scenes import (
    BACKGROUNDS, COLORS, HELD_OUT_SCENES, POSITIONS, SHAPES, SIZES, TRAIN_SCENES, Scene, random_scenes, render,
)
from qdit.eval.scorer import ATTRIBUTES, Score, accuracy, read_scene, score

ACCEPTANCE = 0.98  # the scorer must not be the bottleneck of the model's measured accuracy
VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}


from tests.helpers.threads import one_thread  # noqa: E402,F401 (autouse: one intra-op thread)


def _scenes_and_seeds(n: int, seed: int) -> tuple[list[Scene], list[int]]:
    picked = random_scenes(n, split="all", seed=seed)
    rng = random.Random(seed)
    return picked, [rng.randrange(2**31) for _ in picked]


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur [B, 3, H, W]; borders replicated so the edge stays background."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = k / k.sum()
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def _scores(images: torch.Tensor, picked: list[Scene]) -> list[Score]:
    return [score(img, s.caption) for img, s in zip(images, picked)]


def _assert_accurate(scores: list[Score], what: str) -> None:
    acc = accuracy(scores)
    wrong = [(s.expected, s.found) for s in scores if not s.all_correct][:5]
    for key in ("all", *ATTRIBUTES):
        assert acc[key] >= ACCEPTANCE, f"{what}: {key} accuracy {acc[key]:.3f}; e.g. {wrong}"


def test_clean_renders_are_read_back():
    picked, seeds = _scenes_and_seeds(600, seed=0)
    assert set(picked) & set(TRAIN_SCENES) and set(picked) & set(HELD_OUT_SCENES)  # both splits
    for attribute, values in VALUES.items():  # every value of every attribute is exercised
        assert {getattr(s, attribute) for s in picked} == set(values), attribute
    scores = _scores(render(picked, seeds, size=128), picked)
    _assert_accurate(scores, "clean")
    # On clean renders the reading is the scene itself (not merely "right" on average).
    assert sum(s.found == s.expected for s in scores) >= ACCEPTANCE * len(scores)


@pytest.mark.parametrize("sigma", [1.5, 2.0, 2.5])
def test_blurred_renders_are_read_back(sigma):
    picked, seeds = _scenes_and_seeds(100, seed=int(sigma * 10))
    blurred = _gaussian_blur(render(picked, seeds, size=128), sigma)
    _assert_accurate(_scores(blurred, picked), f"blur sigma {sigma}")


def test_noisy_renders_are_read_back():
    picked, seeds = _scenes_and_seeds(150, seed=99)
    images = render(picked, seeds, size=128)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    _assert_accurate(_scores((images + 0.05 * noise).clamp(0, 1), picked), "noise std 0.05")


def test_blur_is_strong_enough_to_matter():
    # Guards the blur tests: the blur really softens the edges (else they would test clean renders).
    scene = Scene("square", "red", "large", "center", "black")
    clean = render([scene], [0], size=128)
    blurred = _gaussian_blur(clean, 2.0)
    assert (blurred - clean).abs().amax() > 0.2
    assert torch.allclose(blurred[..., 0, 0], clean[..., 0, 0])  # corners still background


def _with(scene: Scene, attribute: str, value: str) -> Scene:
    fields = {a: getattr(scene, a) for a in ATTRIBUTES}
    fields[attribute] = value
    return Scene(**fields)


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_a_wrong_caption_fails_exactly_the_changed_attribute(attribute):
    for i, scene in enumerate(random_scenes(4, split="all", seed=5)):
        image = render([scene], [i])[0]
        for other in VALUES[attribute]:
            if other == getattr(scene, attribute):
                continue
            result = score(image, _with(scene, attribute, other).caption)
            assert result.correct == {a: a != attribute for a in ATTRIBUTES}, (scene, attribute, other)
            assert not result.all_correct
            assert result.found == scene


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_blank_image_reads_as_nothing(background):
    rgb = torch.tensor(BACKGROUNDS[background], dtype=torch.float32).view(3, 1, 1) / 255
    blank = rgb.expand(3, 128, 128).clone()
    assert read_scene(blank) is None
    caption = Scene("circle", "red", "large", "center", background).caption
    result = score(blank, caption)
    assert result.found is None
    assert result.correct == {a: False for a in ATTRIBUTES}  # even the background is not credited
    assert not result.all_correct


def test_a_speck_is_not_a_shape():
    image = torch.full((3, 128, 128), 235 / 255)  # white
    image[:, 60, 60] = torch.tensor([220, 40, 40]) / 255  # one red pixel
    assert read_scene(image) is None


def test_scorer_reads_images_with_other_sizes_and_dtypes():
    scene = Scene("triangle", "blue", "small", "bottom right", "gray")
    image = render([scene], [3], size=96)[0]
    assert read_scene(image) == scene
    assert read_scene(image.to(torch.bfloat16)) == scene


def test_score_rejects_a_caption_outside_the_grammar():
    image = render([Scene("circle", "red", "large", "center", "white")], [0])[0]
    with pytest.raises(ValueError):
        score(image, "a large orange circle in the center on a white background")


def _score(**wrong: bool) -> Score:
    scene = Scene("circle", "red", "large", "center", "white")
    correct = {a: not wrong.get(a, False) for a in ATTRIBUTES}
    return Score(scene, scene, correct)


def test_accuracy_aggregates_a_hand_made_list():
    scores = [
        _score(),
        _score(),
        _score(shape=True),
        _score(shape=True, color=True),
        _score(position=True, background=True, size=True, shape=True, color=True),
    ]
    assert [s.all_correct for s in scores] == [True, True, False, False, False]
    assert accuracy(scores) == {
        "all": 2 / 5, "shape": 2 / 5, "color": 3 / 5, "size": 4 / 5, "position": 4 / 5, "background": 4 / 5}


def test_accuracy_of_nothing_is_zero_not_an_error():
    assert accuracy([]) == {"all": 0.0, **{a: 0.0 for a in ATTRIBUTES}}
