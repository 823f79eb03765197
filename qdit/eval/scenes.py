"""Procedural captioned scenes: one coloured shape on a plain background, rendered from its caption.

A scene is five attributes (shape, colour, size, position on a 3x3 grid, background). Every
combination has one caption ("a large red circle at the top left on a white background"); a fixed
quarter of the combinations is held out of training, so the evaluation asks for captions the model
never saw. Rendering is deterministic by seed (the seed jitters centre and size), batched in torch
(the training loop renders on the GPU), anti-aliased from signed distances.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
COLORS = {  # RGB in [0, 255]; far from each other and from every background
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 205, 40),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (20, 20, 20), "gray": (128, 128, 128)}
SIZES = {"small": 0.10, "large": 0.18}  # shape "radius" (circumradius-like) as a fraction of the side
# Grid positions: caption phrase and centre (x, y) as fractions of the side (y grows downwards).
POSITIONS = {
    "top left": ("at the top left", (0.25, 0.25)), "top": ("at the top", (0.5, 0.25)),
    "top right": ("at the top right", (0.75, 0.25)), "left": ("on the left", (0.25, 0.5)),
    "center": ("in the center", (0.5, 0.5)), "right": ("on the right", (0.75, 0.5)),
    "bottom left": ("at the bottom left", (0.25, 0.75)), "bottom": ("at the bottom", (0.5, 0.75)),
    "bottom right": ("at the bottom right", (0.75, 0.75)),
}
CENTER_JITTER = 0.04  # fraction of the side
SIZE_JITTER = 0.08  # relative
HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 1234
IMAGE_SIZE = 128


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.color} {self.shape} {POSITIONS[self.position][0]} "
                f"on a {self.background} background")


ALL_SCENES: tuple[Scene, ...] = tuple(
    Scene(*combo) for combo in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS))


def _split() -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    order = list(ALL_SCENES)
    random.Random(SPLIT_SEED).shuffle(order)
    n_held = round(len(order) * HELD_OUT_FRACTION)
    held = set(order[:n_held])
    return (tuple(s for s in ALL_SCENES if s not in held), tuple(s for s in ALL_SCENES if s in held))


TRAIN_SCENES, HELD_OUT_SCENES = _split()

_PHRASE_TO_POSITION = {phrase: name for name, (phrase, _) in POSITIONS.items()}
_CAPTION = re.compile(
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) (?P<position>(?:at|on|in) the [\w ]+?) "
    r"on a (?P<background>\w+) background$")


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; ValueError for anything outside the grammar."""
    m = _CAPTION.match(caption.strip())
    if m is None:
        raise ValueError(f"not a scene caption: {caption!r} (expected e.g. {ALL_SCENES[0].caption!r})")
    position = _PHRASE_TO_POSITION.get(m["position"])
    scene = Scene(m["shape"], m["color"], m["size"], position or "", m["background"])
    if (scene.shape not in SHAPES or scene.color not in COLORS or scene.size not in SIZES or position is None
            or scene.background not in BACKGROUNDS):
        raise ValueError(f"caption {caption!r} names an attribute outside the grammar")
    return scene


def held_out_prompts(n: int) -> list[str]:
    """n held-out captions in a fixed shuffled order (so any n mixes every attribute), cycling if n
    exceeds their number."""
    order = list(HELD_OUT_SCENES)
    random.Random(SPLIT_SEED + 1).shuffle(order)
    return [order[i % len(order)].caption for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def scene_geometry(scenes: list[Scene], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scene: centre (x, y) and radius as fractions of the side, jittered by the scene's seed."""
    centers, radii = [], []
    for scene, seed in zip(scenes, seeds):
        rng = random.Random(seed)
        cx, cy = POSITIONS[scene.position][1]
        centers.append((cx + rng.uniform(-CENTER_JITTER, CENTER_JITTER),
                        cy + rng.uniform(-CENTER_JITTER, CENTER_JITTER)))
        radii.append(SIZES[scene.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)))
    return torch.tensor(centers, dtype=torch.float32), torch.tensor(radii, dtype=torch.float32)


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) to a shape of "radius" r centred at the origin."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":  # half-side r * 0.9 so its area is close to the circle's
        return torch.maximum(dx.abs(), dy.abs()) - 0.9 * r
    # Equilateral triangle pointing up, circumradius 1.2 r, centroid at the origin.
    R = 1.2 * r
    k = math.sqrt(3.0)
    x, y = dx.abs() / R, -dy / R  # y up
    # Distance to the three edges of the unit-circumradius triangle (apex at y=1, base at y=-1/2).
    edge_side = (k * x + y - 1.0) / 2.0
    edge_base = -y - 0.5
    return torch.maximum(edge_side, edge_base) * R


def render(scenes: list[Scene], seeds: list[int], *, size: int = IMAGE_SIZE, device="cpu") -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1] (float32), one per (scene, seed); vectorized over the batch."""
    centers, radii = scene_geometry(scenes, seeds)
    centers, radii = centers.to(device).view(-1, 2, 1, 1), radii.to(device).view(-1, 1, 1)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = xs - centers[:, 0], ys - centers[:, 1]
    shape_index = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device).view(-1, 1, 1)
    sd = torch.stack([_signed_distance(shape, dx, dy, radii) for shape in SHAPES]).gather(
        0, shape_index.unsqueeze(0).expand(1, -1, size, size))[0]
    alpha = (0.5 - sd * size).clamp(0, 1).unsqueeze(1)  # one-pixel anti-aliased edge
    fg = torch.tensor([COLORS[s.color] for s in scenes], device=device, dtype=torch.float32).view(-1, 3, 1, 1) / 255
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], device=device,
                      dtype=torch.float32).view(-1, 3, 1, 1) / 255
    return bg + (fg - bg) * alpha


def random_scenes(n: int, *, split: str = "train", seed: int = 0) -> list[Scene]:
    pool = {"train": TRAIN_SCENES, "held_out": HELD_OUT_SCENES, "all": ALL_SCENES}.get(split)
    if pool is None:
        raise ValueError(f"unknown split {split!r}; choose train, held_out or all")
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]
