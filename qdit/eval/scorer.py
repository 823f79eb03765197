"""Does an image show what its caption says? A procedural check, attribute by attribute.

Background: the palette colour nearest the median border pixel. Foreground: pixels far from that
background colour. Colour: palette colour nearest the foreground's median. Shape: two moments of the
soft coverage map of the largest foreground region (vertical skew: triangle; cross moment: square vs
circle). Size: the radius implied by the covered area for that shape. Position: the 3x3 grid cell of
the coverage centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qdit.eval.scenes import BACKGROUNDS, COLORS, POSITIONS, SIZES, Scene, parse_caption

ATTRIBUTES = ("shape", "color", "size", "position", "background")
FOREGROUND_DISTANCE = 0.25  # RGB distance (0..1 per channel) from the background colour
TRIANGLE_SKEW = -0.12  # clean renders: triangle -0.58..-0.50, others within +-0.01
SQUARE_CROSS = 0.79  # clean renders: circle 0.66..0.67, square 1.0, blurred (sigma 2.5 px) 0.73 / 0.96
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


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected region of a boolean mask [H, W] (labels spread by max-pooling)."""
    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(h, w))
    while True:
        spread = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    values, counts = labels[mask].unique(return_counts=True)
    return labels == values[counts.argmax()]


def read_scene(image: torch.Tensor) -> Scene | None:
    """The scene an image [3, H, W] in [0, 1] shows, or None if no shape stands out from the background."""
    image = image.float().clamp(0, 1)
    _, h, w = image.shape
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    background = _nearest(border.median(dim=1).values, BACKGROUNDS)
    bg = torch.tensor(BACKGROUNDS[background], dtype=torch.float32).view(3, 1, 1) / 255
    mask = (image - bg).norm(dim=0) > FOREGROUND_DISTANCE
    if int(mask.sum()) < 4:
        return None
    color = _nearest(image[:, mask].median(dim=1).values, COLORS)
    # Soft coverage: where each pixel lies between the background and the shape's colour. Blurred
    # or rounded edges then weigh what they cover instead of flipping a hard threshold.
    towards = torch.tensor(COLORS[color], dtype=torch.float32).view(3, 1, 1) / 255 - bg
    coverage = (((image - bg) * towards).sum(0) / (towards * towards).sum()).clamp(0, 1)
    solid = coverage > 0.5
    if int(solid.sum()) < 4:
        return None
    # Only the main shape and its soft rim: stray specks elsewhere would swing the moments.
    near = F.max_pool2d(_largest_component(solid).float()[None, None], 5, 1, 2)[0, 0] > 0
    coverage = coverage * near
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5,
                            torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
    mass = coverage.sum()
    cx, cy = (coverage * xs).sum() / mass, (coverage * ys).sum() / mass
    dx, dy = xs - cx, ys - cy
    var_x, var_y = (coverage * dx * dx).sum() / mass, (coverage * dy * dy).sum() / mass
    shape = _classify_shape(
        skew_y=float((coverage * dy ** 3).sum() / mass / var_y ** 1.5),
        cross=float((coverage * dx * dx * dy * dy).sum() / mass / (var_x * var_y)))
    radius = math.sqrt(float(mass) / (h * w) / _AREA_PER_R2[shape])
    size = "small" if radius < _SIZE_THRESHOLD else "large"
    column = min(int(float(cx) / w * 3), 2)
    row = min(int(float(cy) / h * 3), 2)
    position = next(name for name, (_, (px, py)) in POSITIONS.items()
                    if min(int(px * 3), 2) == column and min(int(py * 3), 2) == row)
    return Scene(shape, color, size, position, background)


def _classify_shape(*, skew_y: float, cross: float) -> str:
    """Shape from two moment ratios of the coverage map, both unchanged by scale and mild blur.

    skew_y: an upward triangle's mass grows towards its base (about -0.56; circle and square 0).
    cross: E[x^2 y^2] / (E[x^2] E[y^2]) is 1 for a square (x and y independent) and 2/3 for a disc.
    """
    if skew_y < TRIANGLE_SKEW:
        return "triangle"
    return "square" if cross > SQUARE_CROSS else "circle"


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
