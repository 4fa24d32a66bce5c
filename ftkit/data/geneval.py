"""GenEval's rules, with a pluggable detector (colour segmentation for the shapes world by default).

GenEval (Ghosh et al. 2023) scores a text-to-image model on prompts in six categories. Each prompt
carries metadata ``{"tag", "include": [{"class", "count", "color"?, "position": [relation, index]?}],
"exclude": [{"class", "count"}]?}``. :func:`evaluate_image` applies GenEval's decision rule to the
detections of one image:

* detections are grouped by class and sorted by score (highest first);
* for each ``include`` entry, the ``count`` best detections of its class must exist; when a
  ``color`` is given all of them must have that colour; when a ``position`` ``[relation, j]`` is
  given, each of them must stand in ``relation`` to every object matched by include entry ``j``;
* for each ``exclude`` entry, fewer than ``count`` detections of its class may exist (counting
  prompts ask for N and exclude N + 1, so the count must be exact).

Relative position (:func:`relative_position`, GenEval's ``POSITION_THRESHOLD = 0.1``): with box centres
``c_a, c_b`` and sizes ``(w, h)``, ``o = c_a - c_b``; ``r = sign(o) * max(|o| - 0.1 (dim_a + dim_b), 0)``
per axis; if ``r = 0`` no relation holds, else ``(dx, dy) = r / ||o||`` and the relations are
``left of`` (dx < -0.5), ``right of`` (dx > 0.5), ``above`` (dy < -0.5), ``below`` (dy > 0.5),
image y pointing down.

A tag's score is the mean pass rate over its images; ``overall`` is the mean of the tag scores
(GenEval's six tags when all are present).

Detector interface
------------------
Anything with ``detect(image: np.ndarray[H, W, 3] uint8) -> list[Detection]`` is a
:class:`Detector`. ``Detection(cls, color, box, score)``: ``cls`` is the class name used in the
metadata, ``box`` is ``(x0, y0, x1, y1)`` in pixels (any consistent unit works: only ratios
matter), ``score`` ranks detections of a class, ``color`` is a colour name or ``None``. When a
detector returns ``color=None`` and a prompt names a colour, :func:`evaluate_image` calls
``color_fn(image, detection) -> str``.

The default, :class:`ColorShapeDetector`, segments the shapes world: every pixel is unmixed into
background + coverage x palette colour (:meth:`ColorShapeDetector.segment`) and takes the best-fitting
colour where its coverage is at least one half, else counts as background;
8-connected components of one colour with at least ``min_area`` pixels are objects; each is
classified by matching its mask against every shape class inscribed in the component's bounding box
(intersection over union; fill ratio and aspect ratio are thereby compared too), the best class
with IoU >= ``min_iou`` wins and the IoU is the score.

GenEval's own detector can be plugged in on a GPU machine that has its weights (not run here):
wrap mmdetection's Mask2Former (``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``) in a class whose
``detect`` calls ``inference_detector`` and keeps boxes with score >= 0.3 (0.9 for counting prompts,
at most 16 per class, dropping a box that overlaps a better one of its class), and return
``color=None``; pass as ``color_fn`` GenEval's CLIP ViT-L/14 zero-shot classifier of the masked crop
over ``"a photo of a {color} {class}"``. COCO class names then appear in the metadata instead of
shapes.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ftkit.data.world import CLASSES, COLORS, POSITION_THRESHOLD, relative_position, shape_mask  # noqa: F401

GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, colour name (or None), pixel box ``(x0, y0, x1, y1)``, score."""

    cls: str
    color: str | None
    box: tuple[float, float, float, float]
    score: float = 1.0


@runtime_checkable
class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Objects in an ``[H, W, 3]`` uint8 RGB image."""
        ...


# ------------------------------------------------------------------------------ default detector
def _components(labels: np.ndarray, min_area: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """8-connected components of equal non-negative label: ``(label, ys, xs)`` per component."""
    H, W = labels.shape
    seen = labels < 0
    out = []
    lab = labels.tolist()
    seen_l = seen.tolist()
    for y0, x0 in zip(*np.nonzero(~seen)):
        y0, x0 = int(y0), int(x0)
        if seen_l[y0][x0]:
            continue
        c = lab[y0][x0]
        seen_l[y0][x0] = True
        q, ys, xs = deque([(y0, x0)]), [], []
        while q:
            y, x = q.popleft()
            ys.append(y)
            xs.append(x)
            for ny in (y - 1, y, y + 1):
                if 0 <= ny < H:
                    row, srow = lab[ny], seen_l[ny]
                    for nx in (x - 1, x, x + 1):
                        if 0 <= nx < W and not srow[nx] and row[nx] == c:
                            srow[nx] = True
                            q.append((ny, nx))
        if len(ys) >= min_area:
            out.append((c, np.asarray(ys), np.asarray(xs)))
    return out


class ColorShapeDetector:
    """Shapes-world detector: nearest-palette-colour segmentation + shape matching (module docstring).

    Args:
        palette: ``{colour name: (r, g, b)}`` (default: the shapes world's :data:`~ftkit.data.world.COLORS`).
        classes: shape classes to match (default: the shapes world's).
        tolerance: largest RGB distance of a pixel from its background-colour blend for it to count
            as that colour.
        min_area: smallest component in pixels, as a fraction of the image area (0.003: 12 px at 64x64).
        min_iou: smallest IoU with the best shape template for a component to be an object.
        min_border_agreement / min_background: a shapes-world scene has a plain background; when fewer
            than this fraction of the border pixels (resp. of all pixels) lie within ``tolerance`` of the
            background colour, the image is not a scene (noise, clutter) and nothing is detected, so
            texture cannot pass as objects.
        max_unexplained: largest fraction of pixels that are neither background nor a blend of the
            background with one palette colour (residual > ``tolerance``); above it, not a scene.
        max_components: most colour components of at least ``min_area`` a scene may have; a
            shapes-world scene has at most 6 objects, a texture (stripes, checkers, speckle) has many.
        min_side: smallest side of an object's box as a fraction of the image side (shapes are drawn
            with sides >= 0.19 of the image).
        max_aspect: largest ratio of the longer to the shorter side of an object's box (shapes are
            drawn in square cells: a stripe is not a square).
        min_solid: smallest fraction of an object's pixels with full coverage (``a >= 0.8``, see
            :meth:`segment`); shapes are flat-coloured, so only their rim is blended, while a
            colour gradient or a blurred blob ramps through its whole area.
    """

    def __init__(
        self,
        palette: Mapping[str, tuple[int, int, int]] | None = None,
        classes: Iterable[str] | None = None,
        tolerance: float = 60.0,
        min_area: float = 0.003,
        min_iou: float = 0.6,
        min_border_agreement: float = 0.8,
        min_background: float = 0.35,
        max_unexplained: float = 0.1,
        max_components: int = 6,
        min_side: float = 0.1,
        max_aspect: float = 1.5,
        min_solid: float = 0.5,
    ):
        palette = COLORS if palette is None else palette
        self.names = list(palette)
        self.rgb = np.asarray([palette[c] for c in self.names], dtype=np.int32)
        self.classes = tuple(CLASSES if classes is None else classes)
        self._mask = shape_mask
        self.tolerance, self.min_area, self.min_iou = float(tolerance), float(min_area), float(min_iou)
        self.min_border_agreement, self.min_background = float(min_border_agreement), float(min_background)
        self.max_unexplained, self.max_components = float(max_unexplained), int(max_components)
        self.min_side, self.max_aspect, self.min_solid = float(min_side), float(max_aspect), float(min_solid)

    def is_scene(self, image: np.ndarray) -> bool:
        """Plain background: most border pixels and enough of the image match the border's median colour."""
        img = np.asarray(image, dtype=np.float64)[..., :3]
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.median(border, axis=0)
        agree = float(np.mean(np.linalg.norm(border - bg, axis=-1) <= self.tolerance))
        background = float(np.mean(np.linalg.norm(img - bg, axis=-1) <= self.tolerance))
        return agree >= self.min_border_agreement and background >= self.min_background

    def segment(self, image: np.ndarray) -> np.ndarray:
        """``[H, W]`` int array: palette index of each pixel, -1 for background / unknown.

        The background ``b`` is the median of the border pixels. A pixel ``p`` is read as a blend
        ``b + a (c - b)`` of the background with each palette colour ``c``: ``a`` is the least-squares
        coverage (clipped to [0, 1]) and ``r = |p - b - a (c - b)|`` the residual. The pixel takes the
        colour with the smallest residual when ``a >= 0.5`` and ``r <= tolerance``: the same
        half-coverage rule the renderer uses, so blurred or antialiased edges keep the shape's size.
        """
        idx, a, r = self._unmix(image)
        return np.where((a >= 0.5) & (r <= self.tolerance), idx, -1)

    def _unmix(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel: best palette index, its coverage ``a`` and residual ``r`` (see :meth:`segment`)."""
        img = np.asarray(image, dtype=np.float64)[..., :3]
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.median(border, axis=0)
        v = self.rgb.astype(np.float64) - bg  # [K, 3]
        q = img - bg  # [H, W, 3]
        vv = np.maximum((v * v).sum(-1), 1e-9)  # [K]
        alpha = np.clip(q @ v.T / vv, 0.0, 1.0)  # [H, W, K]
        resid = np.linalg.norm(q[:, :, None, :] - alpha[..., None] * v, axis=-1)  # [H, W, K]
        idx = resid.argmin(-1)
        a = np.take_along_axis(alpha, idx[..., None], -1)[..., 0]
        r = np.take_along_axis(resid, idx[..., None], -1)[..., 0]
        return idx, a, r

    def classify(self, mask: np.ndarray) -> tuple[str | None, float]:
        """Best shape class for a cropped component mask and its IoU (``None`` below ``min_iou``)."""
        h, w = mask.shape
        best, best_iou = None, 0.0
        for cls in self.classes:
            t = self._mask(cls, w, h)
            iou = float((t & mask).sum() / (t | mask).sum())
            if iou > best_iou:
                best, best_iou = cls, iou
        return (best, best_iou) if best_iou >= self.min_iou else (None, best_iou)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Objects of a shapes-world scene; ``[]`` for anything that is not one.

        Not a scene (nothing detected): no plain background (:meth:`is_scene`), more than
        ``max_unexplained`` of the pixels unexplained by background + palette blends, or more than
        ``max_components`` colour components. A component is an object only when it does not touch the
        image border (the renderer keeps a margin; texture runs off the edge), its box is at least
        ``min_side`` of the image, at most ``max_aspect`` elongated, at least ``min_solid`` of its
        pixels are fully covered, and its mask matches a shape template (``min_iou``)."""
        if not self.is_scene(image):
            return []
        idx, a, r = self._unmix(image)
        explained = (r <= self.tolerance) | (a < 0.25)
        if float(np.mean(~explained)) > self.max_unexplained:
            return []
        labels = np.where((a >= 0.5) & (r <= self.tolerance), idx, -1)
        H, W = labels.shape
        comps = _components(labels, max(4, round(self.min_area * H * W)))
        if len(comps) > self.max_components:
            return []
        dets = []
        for c, ys, xs in comps:
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            h, w = int(y1 - y0), int(x1 - x0)
            if (
                min(y0, x0) == 0
                or y1 == H
                or x1 == W
                or min(h / H, w / W) < self.min_side
                or max(h, w) > self.max_aspect * min(h, w)
                or float(np.mean(a[ys, xs] >= 0.8)) < self.min_solid
            ):
                continue
            crop = np.zeros((h, w), dtype=bool)
            crop[ys - y0, xs - x0] = True
            cls, score = self.classify(crop)
            if cls is not None:
                dets.append(
                    Detection(cls, self.names[c], (float(x0), float(y0), float(x1), float(y1)), score)
                )
        return dets


CONFOUNDER_KINDS: tuple[str, ...] = ("uniform", "gaussian", "blurred", "stripes", "checker", "gradient")


def confounders(n: int, seed: int = 0, sizes: Sequence[int] = (32, 64, 128)) -> Iterator[tuple[str, np.ndarray]]:
    """``n`` images that hold no object, for checking that a detector finds nothing: ``(kind, [S, S, 3]
    uint8)``, kinds cycling through :data:`CONFOUNDER_KINDS`, side ``S`` drawn from ``sizes``, all from
    ``default_rng(seed)`` (deterministic).

    * ``uniform``: per-pixel uniform noise in a random range; ``gaussian``: a random colour plus
      Gaussian noise (sigma 5-90, so near-plain images too);
    * ``blurred``: uniform noise blurred (radius 0.7 px to S/6), standardised and scaled around a
      random colour (colour blobs);
    * ``stripes``: two random colours at a random angle, period 3 px to S/2 and duty; ``checker``: a
      checkerboard of a random colour on another, cells 2 px to S/3, filled 20-100%;
    * ``gradient``: linear (random direction) or radial (random centre and radius) blend of two colours.
    """
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    for i in range(n):
        kind = CONFOUNDER_KINDS[i % len(CONFOUNDER_KINDS)]
        s = int(sizes[int(rng.integers(len(sizes)))])
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if kind == "uniform":
            lo = rng.uniform(0, 200)
            arr = lo + rng.uniform(30, 255 - lo) * rng.random((s, s, 3))
        elif kind == "gaussian":
            arr = c1 + rng.normal(0, rng.uniform(5, 90), (s, s, 3))
        elif kind == "blurred":
            noise = Image.fromarray((rng.random((s, s, 3)) * 255).astype(np.uint8))
            b = np.asarray(noise.filter(ImageFilter.GaussianBlur(rng.uniform(0.7, s / 6))), dtype=np.float64)
            arr = c1 + rng.uniform(20, 150) * (b - b.mean()) / (b.std() + 1e-6)
        elif kind == "stripes":
            th, period, duty = rng.uniform(0, np.pi), rng.uniform(3, s / 2), rng.uniform(0.1, 0.9)
            ph = (xx * np.cos(th) + yy * np.sin(th)) / period
            arr = np.where(((ph - np.floor(ph)) < duty)[..., None], c2, c1)
        elif kind == "checker":
            c, duty = int(rng.integers(2, max(3, s // 3))), rng.uniform(0.2, 1.0)
            on = (((yy // c) + (xx // c)) % 2 == 0) & ((yy % c) < duty * c) & ((xx % c) < duty * c)
            arr = np.where(on[..., None], c2, c1)
        else:
            if rng.random() < 0.5:
                th = rng.uniform(0, 2 * np.pi)
                u = ((xx - s / 2) * np.cos(th) + (yy - s / 2) * np.sin(th)) / s + 0.5
            else:
                cx, cy = rng.uniform(0, s, 2)
                u = np.hypot(xx - cx, yy - cy) / rng.uniform(s / 4, s)
            u = np.clip(u, 0, 1)[..., None]
            arr = (1 - u) * c1 + u * c2
        yield kind, np.clip(arr, 0, 255).astype(np.uint8)


_DEFAULT: ColorShapeDetector | None = None


def default_detector() -> ColorShapeDetector:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ColorShapeDetector()
    return _DEFAULT


# --------------------------------------------------------------------------------------- rules
def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got array of shape {arr.shape}")
    return arr[..., :3]


def _check_meta(meta: Mapping) -> None:
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    if not isinstance(meta.get("include"), list) or not meta["include"]:
        raise ValueError("meta.include: must be a non-empty list of {class, count, ...}")
    for field, entries in (("include", meta["include"]), ("exclude", meta.get("exclude") or [])):
        for i, req in enumerate(entries):
            if not isinstance(req, Mapping) or not isinstance(req.get("class"), str):
                raise ValueError(f"meta.{field}[{i}].class: missing or not a string")
            if not isinstance(req.get("count"), int) or req["count"] < 1:
                raise ValueError(f"meta.{field}[{i}].count: must be an int >= 1, got {req.get('count')!r}")
            pos = req.get("position")
            if field == "include" and pos is not None:
                if not (isinstance(pos, list | tuple) and len(pos) == 2 and isinstance(pos[1], int)):
                    raise ValueError(f"meta.include[{i}].position: must be [relation, index], got {pos!r}")
                if not 0 <= pos[1] < i:
                    raise ValueError(f"meta.include[{i}].position: index {pos[1]} must name an earlier entry")


@dataclass
class Judgement:
    """:func:`judge_image`'s verdict: ``passed``, ``reason`` (violated rules, one per line), every
    detection, the detections that broke a rule (wrong colour, wrong place, one too many) and the
    classes of objects that were asked for and not found."""

    passed: bool
    reason: str
    detections: list[Detection]
    failed: list[Detection]
    missing: list[str]


def evaluate_image(
    image: Image.Image | np.ndarray,
    meta: Mapping,
    detector: Detector | None = None,
    color_fn: Callable[[np.ndarray, Detection], str] | None = None,
) -> tuple[bool, str]:
    """``(passed, reason)`` of :func:`judge_image`."""
    j = judge_image(image, meta, detector, color_fn)
    return j.passed, j.reason


def judge_image(
    image: Image.Image | np.ndarray,
    meta: Mapping,
    detector: Detector | None = None,
    color_fn: Callable[[np.ndarray, Detection], str] | None = None,
) -> Judgement:
    """Decide whether ``image`` satisfies the prompt metadata ``meta`` by GenEval's rules.

    Args:
        image: RGB image (PIL or ``[H, W, 3]`` array).
        meta: GenEval metadata (``include``, optional ``exclude``).
        detector: default :class:`ColorShapeDetector`.
        color_fn: colour of a detection whose ``color`` is None (needed only then).

    Returns:
        a :class:`Judgement` (``reason`` lists every violated rule, one per line, "" when passed).

    Raises:
        ValueError: malformed ``meta`` (names the field) or image; a detection without colour for a
            prompt that names one and no ``color_fn``.
    """
    _check_meta(meta)
    arr = _to_array(image)
    dets = (default_detector() if detector is None else detector).detect(arr)
    objects: dict[str, list[Detection]] = {}
    for d in sorted(dets, key=lambda d: -d.score):
        objects.setdefault(d.cls, []).append(d)

    def color_of(d: Detection) -> str:
        if d.color is not None:
            return d.color
        if color_fn is None:
            raise ValueError(f"detection {d} has no colour and no color_fn was given")
        return color_fn(arr, d)

    correct, reasons, groups, failed, missing = True, [], [], [], []
    for req in meta["include"]:
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])[:n]
        matched = True
        if len(found) < n:
            matched = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
            missing += [cls] * (n - len(found))
        else:
            if req.get("color") is not None:
                colors = [color_of(d) for d in found]
                k = colors.count(req["color"])
                if k < n:
                    matched = False
                    failed += [d for d, c in zip(found, colors) if c != req["color"]]
                    others = ", ".join(f"{colors.count(c)} {c}" for c in sorted(set(colors)))
                    reasons.append(
                        f"expected {req['color']} {cls}>={n}, found {k} {req['color']}; and {others}"
                    )
            if req.get("position") is not None and matched:
                rel, j = req["position"]
                if groups[j] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                    missing.append(meta["include"][j]["class"])
                else:
                    for d in found:
                        for t in groups[j]:
                            true_rels = relative_position(d.box, t.box)
                            if rel not in true_rels:
                                matched = False
                                failed.append(d)
                                reasons.append(
                                    f"expected {cls} {rel} target, found {' and '.join(sorted(true_rels)) or 'no relation to'} target"
                                )
                                break
                        if not matched:
                            break
        correct &= matched
        groups.append(found if matched else None)
    for req in meta.get("exclude") or []:
        cls, n = req["class"], req["count"]
        if len(objects.get(cls, [])) >= n:
            correct = False
            reasons.append(f"expected {cls}<{n}, found {len(objects[cls])}")
            failed += objects[cls][n - 1 :]
    return Judgement(bool(correct), "\n".join(reasons), list(dets), failed, missing)


def _record_image(rec: Mapping, which: str, root: Path, where: str) -> Path:
    steps = rec.get("steps")
    if not isinstance(steps, list):
        raise ValueError(f"{where}: steps: missing or not a list")
    images = [(s.get("type"), s.get("image")) for s in steps if isinstance(s, Mapping) and s.get("image")]
    if which == "draft":
        images = [im for im in images if im[0] == "draft"]
    elif which != "final":
        raise ValueError(f"which must be 'final' or 'draft', got {which!r}")
    if not images:
        raise ValueError(f"{where}: steps: no {'draft ' if which == 'draft' else ''}image step")
    path = Path(images[0 if which == "draft" else -1][1])
    return path if path.is_absolute() else root / path


def evaluate(
    items: Iterable,
    detector: Detector | None = None,
    *,
    root: str | Path | None = None,
    which: str = "final",
    color_fn: Callable[[np.ndarray, Detection], str] | None = None,
) -> dict[str, float]:
    """Per-tag GenEval scores over ``items``.

    Args:
        items: ``(image, meta)`` pairs, or ftkit records (dicts with ``meta`` and ``steps``) whose
            image is read from ``root`` (the folder of ``records.jsonl``).
        which: for records: ``"final"`` (the last image step: the refinement if any, else the
            draft) or ``"draft"`` (the first draft).

    Returns:
        ``{tag: mean pass rate, ..., "overall": mean over tags}``, tags in GenEval's order first.

    Raises:
        ValueError: an item is neither form, or bad meta / record (message names the item index).
    """
    root = Path(".") if root is None else Path(root)
    passes: dict[str, list[bool]] = {}
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            where = f"item {i} ({item.get('id', '?')})"
            meta = item.get("meta")
            with Image.open(_record_image(item, which, root, where)) as im:
                image = im.convert("RGB")
        elif isinstance(item, tuple | list) and len(item) == 2:
            where, (image, meta) = f"item {i}", item
        else:
            raise ValueError(
                f"item {i}: expected a record dict or an (image, meta) pair, got {type(item).__name__}"
            )
        if not isinstance(meta, Mapping) or not isinstance(meta.get("tag"), str):
            raise ValueError(f"{where}: meta.tag: missing or not a string")
        try:
            ok, _ = evaluate_image(image, meta, detector, color_fn)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        passes.setdefault(meta["tag"], []).append(ok)
    if not passes:
        raise ValueError("evaluate: no items")
    order = [t for t in GENEVAL_TAGS if t in passes] + sorted(t for t in passes if t not in GENEVAL_TAGS)
    scores = {t: float(np.mean(passes[t])) for t in order}
    scores["overall"] = float(np.mean(list(scores.values())))
    return scores


def read_records(path: str | Path) -> list[dict]:
    """Records of a ``records.jsonl`` (or of the folder holding one).

    Raises:
        ValueError: a line that is not a JSON object (names file and line).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    from ftkit.data.importers import json_objects

    return [rec for _, rec in json_objects(path)]


def format_table(scores: Mapping[str, float] | Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per score dict (``{row name: scores}``, or a single ``scores``),
    one column per tag plus ``overall``."""
    rows = dict(scores) if all(isinstance(v, Mapping) for v in scores.values()) else {"score": scores}
    cols = []
    for s in rows.values():
        cols += [c for c in s if c != "overall" and c not in cols]
    cols.append("overall")
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[c]:.3f}" if c in s else "-" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m ftkit.data.geneval DIR``: score a shapes-world set's drafts and final images."""
    p = argparse.ArgumentParser(prog="python -m ftkit.data.geneval", description=main.__doc__)
    p.add_argument("dir", help="folder with records.jsonl (images relative to it)")
    p.add_argument("--which", choices=["final", "draft", "both"], default="both")
    args = p.parse_args(argv)
    try:
        recs = read_records(args.dir)
        whiches = ["draft", "final"] if args.which == "both" else [args.which]
        table = {w: evaluate(recs, root=args.dir, which=w) for w in whiches}
    except (OSError, ValueError) as e:
        print(f"geneval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
