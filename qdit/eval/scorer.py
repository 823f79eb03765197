"""Does an image show what its caption says? A procedural check, attribute by attribute.

Background: the palette colour nearest the median border pixel. Foreground: pixels far from that
background colour. Colour: palette colour nearest the foreground's median. Shape: how much of its
bounding box the foreground fills (square 1.0, circle pi/4, triangle 1/2). Size: the radius implied
by the area for that shape. Position: the 3x3 grid cell of the foreground's centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qdit.eval.scenes import BACKGROUNDS, COLORS, POSITIONS, SIZES, Scene, parse_caption

ATTRIBUTES = ("shape", "color", "size", "position", "background")
FOREGROUND_DISTANCE = 0.25  # RGB distance (0..1 per channel) from the background colour
# Area of each shape over its radius squared (see scenes._signed_distance).
_AREA_PER_R2 = {"circle": math.pi, "square": 4 * 0.9 ** 2, "triangle": 3 * math.sqrt(3) / 4 * 1.2 ** 2}
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])


@dataclass(frozen=True)
class Score:
    expected: Scene
    found: Scene | None  # None: no foreground at all
    correct: dict[str, bool]

    @property
    def all_correct(self) -> bool:
        return all(self.correct.values())


def _nearest(rgb: torch.Tensor, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    colors = torch.tensor([palette[n] for n in names], dtype=torch.float32) / 255
    return names[int(((colors - rgb) ** 2).sum(1).argmin())]


def read_scene(image: torch.Tensor) -> Scene | None:
    """The scene an image [3, H, W] in [0, 1] shows, or None if no shape stands out from the background."""
    image = image.float().clamp(0, 1)
    _, h, w = image.shape
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    background = _nearest(border.median(dim=1).values, BACKGROUNDS)
    bg = torch.tensor(BACKGROUNDS[background], dtype=torch.float32).view(3, 1, 1) / 255
    mask = (image - bg).norm(dim=0) > FOREGROUND_DISTANCE
    area = int(mask.sum())
    if area < 4:
        return None
    color = _nearest(image[:, mask].median(dim=1).values, COLORS)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    box = (int(xs.max() - xs.min()) + 1) * (int(ys.max() - ys.min()) + 1)
    fill = area / box
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    radius = math.sqrt(area / (h * w) / _AREA_PER_R2[shape])
    size = "small" if radius < _SIZE_THRESHOLD else "large"
    cx, cy = (xs.float().mean().item() + 0.5) / w, (ys.float().mean().item() + 0.5) / h
    column = min(int(cx * 3), 2)
    row = min(int(cy * 3), 2)
    position = next(name for name, (_, (px, py)) in POSITIONS.items()
                    if min(int(px * 3), 2) == column and min(int(py * 3), 2) == row)
    return Scene(shape, color, size, position, background)


def score(image: torch.Tensor, caption: str) -> Score:
    expected = parse_caption(caption)
    found = read_scene(image)
    correct = {a: found is not None and getattr(found, a) == getattr(expected, a) for a in ATTRIBUTES}
    return Score(expected, found, correct)


def accuracy(scores: list[Score]) -> dict[str, float]:
    """Fraction of images with every attribute right ("all"), and per attribute."""
    n = max(len(scores), 1)
    result = {"all": sum(s.all_correct for s in scores) / n}
    for a in ATTRIBUTES:
        result[a] = sum(s.correct[a] for s in scores) / n
    return result
