"""The shapes world's vocabulary and geometry, shared by its generator (``shapes``) and its judge
(``geneval``): object classes, the colour palette, backgrounds, the rasterised shape masks and
GenEval's relative-position rule. A leaf module: it imports nothing from ftkit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "ring": "rings",
}
# Saturated colours, pairwise >= 99 apart in RGB (yellow-orange is the closest pair).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "orange": (255, 128, 0),
    "yellow": (235, 225, 0),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "purple": (140, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "light grey": (225, 225, 225)}
_CROSS_ARM = 0.36  # width of a cross's arms, as a fraction of its side
_RING_INNER = 0.25  # inner radius of a ring, as a fraction of its side (outer: 0.5)
_SUPERSAMPLE = 4
POSITION_THRESHOLD = 0.1


@lru_cache(maxsize=4096)
def shape_mask(cls: str, w: int, h: int | None = None) -> np.ndarray:
    """Boolean ``[h, w]`` mask of shape ``cls`` inscribed in a ``w x h`` box (``h`` defaults to ``w``).

    A pixel is inside when at least half of its 4x4 sub-pixel centres are inside the ideal shape
    (normalised coordinates ``u, v`` in [0, 1], ``v`` down): circle ``(u-.5)^2 + (v-.5)^2 <= .25``;
    square: all; triangle (apex up) ``|u-.5| <= v/2``; cross ``|u-.5| <= a/2 or |v-.5| <= a/2`` with
    arm width ``a = 0.36``; ring ``1/16 <= (u-.5)^2 + (v-.5)^2 <= 1/4``. The result is read-only
    (cached). (A diamond was tried and dropped: blurred, it is read as a cross or a circle.)

    Raises:
        ValueError: unknown ``cls`` or a side < 1.
    """
    h = w if h is None else h
    if cls not in CLASSES:
        raise ValueError(f"unknown shape class {cls!r}; known: {', '.join(CLASSES)}")
    if w < 1 or h < 1:
        raise ValueError(f"shape_mask: box must be at least 1x1, got {w}x{h}")
    s = _SUPERSAMPLE
    u = (np.arange(w * s) + 0.5) / (w * s)
    v = (np.arange(h * s) + 0.5) / (h * s)
    uu, vv = np.meshgrid(u, v)
    if cls == "circle":
        inside = (uu - 0.5) ** 2 + (vv - 0.5) ** 2 <= 0.25
    elif cls == "square":
        inside = np.ones_like(uu, dtype=bool)
    elif cls == "triangle":
        inside = np.abs(uu - 0.5) <= vv / 2
    elif cls == "cross":
        inside = (np.abs(uu - 0.5) <= _CROSS_ARM / 2) | (np.abs(vv - 0.5) <= _CROSS_ARM / 2)
    else:  # ring
        r2 = (uu - 0.5) ** 2 + (vv - 0.5) ** 2
        inside = (r2 <= 0.25) & (r2 >= _RING_INNER**2)
    mask = inside.reshape(h, s, w, s).mean(axis=(1, 3)) >= 0.5
    mask.setflags(write=False)
    return mask


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B by GenEval's rule (see the module docstring).

    Args:
        box_a, box_b: ``(x0, y0, x1, y1)``, same units.
        threshold: margin as a fraction of the two boxes' combined size (GenEval: 0.1).

    Returns:
        A subset of ``{"left of", "right of", "above", "below"}`` (empty when the centres are
        within the margin on both axes).
    """
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dim_a, dim_b = a[2:] - a[:2], b[2:] - b[:2]
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels
