"""Shapes world: a seeded generator of compositional scenes whose every label is exact.

A scene is a few flat-coloured shapes on a plain background. Its prompt follows one of GenEval's
six categories, with GenEval's metadata (``tag``, ``include``, ``exclude``):

==============  ==============================================  ====================================
tag             prompt                                          include / exclude
==============  ==============================================  ====================================
single_object   a photo of a square                             [{class, count: 1}]
two_object      a photo of a circle and a triangle              [{class A, 1}, {class B, 1}]
counting        a photo of three squares                        [{class, N}] / [{class, N + 1}]
colors          a photo of a blue circle                        [{class, 1, color}]
position        a photo of a triangle left of a square          [{B, 1}, {A, 1, position: [rel, 0]}]
color_attr      a photo of a red square and a green circle      [{A, 1, color}, {B, 1, color}]
==============  ==============================================  ====================================

Where a category names no colour, the object's colour is drawn at random. Each record (see
:func:`make_record`) carries an exact plan (a caption naming colours, sizes and places, and one box
per object), a draft, a reflection and, where the draft is wrong, a refinement:

* ``ok``: the draft is correct; the reflection says ``verdict: ok`` with no regions; no refine step.
* typed errors (``meta.error``), each chosen only where GenEval's rules make it a violation:
  ``color`` (one object has another colour: colors, color_attr), ``missing`` (one object is absent:
  every tag except counting), ``count`` (fewer objects than asked: counting), ``extra`` (one or two
  more objects than asked: counting, the only tag whose metadata has an ``exclude``), ``position``
  (the subject moved to the opposite relation, the target kept in place where that leaves room:
  position), ``attribute`` (the two colours are swapped: color_attr). The reflection names every
  violation with its region (``kind`` = ``missing`` | ``count`` | ``color`` | ``position`` |
  ``attribute``; a position error names each moved object where it is and where it belongs: the
  subject, and the target too where it had to move) and the refinement (``mode: regenerate``) is the
  planned scene, which differs from the draft only inside the regions.
* ``partial`` (process-driven generation, tags with two or more objects): the draft shows the first
  ``k`` planned objects only (``partial: true``); the reflection names the rest (kind ``missing``)
  and the refinement (``mode: inpaint``: nothing outside those regions changes) adds them.

Rendering is exact: every pixel is either the background colour or one of :data:`COLORS` (shapes are
rasterised by 4x4 supersampling thresholded at half coverage, no antialiasing), shapes are 12-24 px
at 64x64 (scaled with the image size) and at least 2 px apart, so that colour segmentation
(:mod:`ftkit.data.geneval`) recovers them exactly. Position layouts satisfy their relation with a
clear margin (GenEval's rule still holds with 2.5x its 0.1 threshold).

Boxes are ``[x0, y0, x1, y1]`` integers in [0, 1000], origin top-left: the object's tight pixel box
(``x1``/``y1`` exclusive) scaled by ``1000 / size`` and rounded.

Determinism: record ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` alone, so the same
seed gives byte-identical ``records.jsonl`` and PNGs, and a longer set extends a shorter one.

Command line (``ftkit data shapes``, or ``python -m ftkit.data.shapes``)::

    ftkit data shapes --out DIR --n N --seed S [--size 64] [--error-rate 0.7] [--partial-rate 0.15]
                      [--overwrite] [--no-progress]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ftkit.data.tasks import TASKS, split_tasks
from ftkit.data.world import (  # noqa: F401  (re-exported: the shapes world's public names)
    BACKGROUNDS,
    CLASSES,
    COLORS,
    PLURALS,
    relative_position,
    shape_mask,
)

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ERRORS: tuple[str, ...] = ("color", "missing", "count", "extra", "position", "attribute")
ERRORS_BY_TAG: dict[str, tuple[str, ...]] = {
    "single_object": ("missing",),
    "two_object": ("missing",),
    "counting": ("count", "extra"),
    "colors": ("color", "missing"),
    "position": ("position", "missing"),
    "color_attr": ("color", "attribute", "missing"),
}
PARTIAL_TAGS: tuple[str, ...] = ("two_object", "counting", "position", "color_attr")
KINDS: tuple[str, ...] = ("ok", "partial", *ERRORS)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven")

# object side as a fraction of the image side, per tag (64 px: 16-24, 12-22, 12-17)
_SIDE = {
    "single_object": (0.25, 0.375),
    "colors": (0.25, 0.375),
    "two_object": (0.19, 0.34),
    "position": (0.19, 0.34),
    "color_attr": (0.19, 0.34),
    "counting": (0.19, 0.27),
}
_GAP = 2  # px between objects' cells (at any size), so same-coloured objects never touch
_POSITION_MARGIN = 0.25  # layouts must satisfy their relation with this threshold (GenEval: 0.1)


# ----------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Shape:
    """One object: class, colour name and its ``d x d`` cell with top-left pixel ``(x, y)``."""

    cls: str
    color: str
    x: int
    y: int
    d: int

    @property
    def label(self) -> str:
        return f"{self.color} {self.cls}"

    def scaled(self, factor: float) -> Shape:
        """The same object on an image ``factor`` times larger."""
        if factor == 1:
            return self
        return replace(
            self, x=round(self.x * factor), y=round(self.y * factor), d=max(1, round(self.d * factor))
        )

    def box_px(self) -> tuple[int, int, int, int]:
        """Tight pixel box ``(x0, y0, x1, y1)`` of the rasterised shape, ``x1``/``y1`` exclusive."""
        m = shape_mask(self.cls, self.d)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        return (
            self.x + int(cols[0]),
            self.y + int(rows[0]),
            self.x + int(cols[-1]) + 1,
            self.y + int(rows[-1]) + 1,
        )


def norm_box(box_px: tuple[int, int, int, int], size: int) -> list[int]:
    """Pixel box (exclusive ends) on a ``size x size`` image -> ``[x0, y0, x1, y1]`` ints in [0, 1000]."""
    return [min(1000, max(0, round(c * 1000 / size))) for c in box_px]


@dataclass
class Scene:
    """A correct scene: its prompt, GenEval metadata and the objects that satisfy it.

    ``objects`` are in plan order (the order of ``include``; for position: target first).
    Coordinates are pixels on a ``size x size`` image.
    """

    tag: str
    prompt: str
    include: list[dict]
    exclude: list[dict]
    objects: list[Shape]
    background: str
    size: int
    relation: str | None = None  # position tag: objects[1] is `relation` objects[0]


def render(scene: Scene, size: int | None = None, objects: list[Shape] | None = None) -> Image.Image:
    """Draw ``objects`` (default: ``scene.objects``) on the scene's background, as an RGB image.

    Args:
        scene: gives the background and the coordinate frame (``scene.size``).
        size: output side in pixels (default ``scene.size``); coordinates are scaled by
            ``size / scene.size``.
        objects: what to draw (drafts draw a modified list).
    """
    size = scene.size if size is None else int(size)
    factor = size / scene.size
    arr = np.empty((size, size, 3), dtype=np.uint8)
    arr[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects if objects is None else objects:
        o = obj.scaled(factor)
        m = shape_mask(o.cls, o.d)
        y1, x1 = min(size, o.y + o.d), min(size, o.x + o.d)
        if o.x < 0 or o.y < 0 or y1 <= o.y or x1 <= o.x:
            raise ValueError(f"render: object {o} lies outside the {size}x{size} image")
        arr[o.y : y1, o.x : x1][m[: y1 - o.y, : x1 - o.x]] = COLORS[o.color]
    return Image.fromarray(arr, mode="RGB")


def render_plan(plan, size: int = 64) -> Image.Image:
    """A plan (:class:`ftkit.data.schema.PlanStep`) drawn as the shapes world would draw it: each box, label
    ``"COLOR CLASS"``, box ``[x0, y0, x1, y1]`` in 0..1000 (a scene's plan box is its shape's tight box),
    becomes its shape with the cell side whose tight box fits the box best, placed on it; the background is
    the one the caption names (``On a light grey background``), else white. A scene's own plan gives back
    the scene's image.

    What a plan *says*, as a picture the evaluator can judge: a plan whose picture fails the prompt is a
    planning error, whatever the image drawn from it shows.

    Raises:
        ValueError: a label that is not a known colour and class (names the label).
    """
    objects = []
    for b in plan.boxes:
        label, box = b.label, b.box
        words = label.split()
        if len(words) != 2 or words[0] not in COLORS or words[1] not in CLASSES:
            raise ValueError(f"plan box {label!r}: not 'COLOR CLASS' of the shapes world")
        color, cls = words
        x0, y0, x1, y1 = (round(c * size / 1000) for c in box)
        want = max(1, x1 - x0, y1 - y0)
        tight = {d: Shape(cls, color, 0, 0, d).box_px() for d in range(max(1, want - 2), min(size, want + 3) + 1)}
        d = min(tight, key=lambda d: abs(max(tight[d][2] - tight[d][0], tight[d][3] - tight[d][1]) - want))
        c0, r0 = tight[d][:2]  # the mask's first column and row inside its cell
        objects.append(Shape(cls, color, min(max(0, x0 - c0), size - d), min(max(0, y0 - r0), size - d), d))
    background = next((g for g in BACKGROUNDS if f"on a {g} background" in plan.caption.lower()), "white")
    return render(Scene("", "", [], [], objects, background, size))


# ------------------------------------------------------------------------------------------- layout
def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _side(rng: np.random.Generator, tag: str, size: int) -> int:
    lo, hi = _SIDE[tag]
    return int(rng.integers(max(4, round(lo * size)), max(5, round(hi * size)) + 1))


def _apart(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    (ax, ay, ad), (bx, by, bd) = a, b
    return ax + ad + gap <= bx or bx + bd + gap <= ax or ay + ad + gap <= by or by + bd + gap <= ay


def _place(
    rng: np.random.Generator, sides: list[int], size: int, taken: list[Shape] = (), tries: int = 300
) -> list[tuple[int, int]] | None:
    """Top-left corners for cells of the given sides, inside the image (1 px margin) and at least
    ``_GAP`` px from every other cell (rejection sampling); ``None`` if a cell does not fit."""
    cells = [(o.x, o.y, o.d) for o in taken]
    out = []
    for d in sides:
        hi = size - 1 - d
        if hi < 1:
            return None
        for _ in range(tries):
            x, y = int(rng.integers(1, hi + 1)), int(rng.integers(1, hi + 1))
            if all(_apart((x, y, d), c, _GAP) for c in cells):
                break
        else:
            return None
        cells.append((x, y, d))
        out.append((x, y))
    return out


def _relation_holds(a: Shape, b: Shape, rel: str, threshold: float = _POSITION_MARGIN) -> bool:
    return rel in relative_position(a.box_px(), b.box_px(), threshold=threshold)


def _place_pair(
    rng: np.random.Generator, target: Shape, subject: Shape, rel: str, size: int, tries: int = 2000
):
    """Place ``target`` and ``subject`` so that ``subject`` is ``rel`` ``target`` with a clear margin."""
    for _ in range(tries):
        pos = _place(rng, [target.d, subject.d], size, tries=1)
        if pos is None:
            continue
        t = replace(target, x=pos[0][0], y=pos[0][1])
        s = replace(subject, x=pos[1][0], y=pos[1][1])
        if _relation_holds(s, t, rel):
            return t, s
    return None


def _place_subject(
    rng: np.random.Generator, target: Shape, subject: Shape, rel: str, size: int, tries: int = 200
) -> Shape | None:
    """``subject`` moved so that it is ``rel`` the fixed ``target`` with a clear margin (``None``: no room)."""
    for _ in range(tries):
        pos = _place(rng, [subject.d], size, taken=[target], tries=1)
        if pos is None:
            continue
        s = replace(subject, x=pos[0][0], y=pos[0][1])
        if _relation_holds(s, target, rel):
            return s
    return None


# ------------------------------------------------------------------------------------------- scenes
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(n: int, cls: str) -> str:
    return _a(cls) if n == 1 else f"{NUMBERS[n] if n < len(NUMBERS) else n} {PLURALS[cls]}"


def generate_scene(rng: np.random.Generator, tag: str, size: int = 64) -> Scene:
    """Draw a correct scene for GenEval category ``tag`` on a ``size x size`` image.

    Raises:
        ValueError: unknown tag or a size that is not a multiple of 16 in [32, 1024].
        RuntimeError: no layout found (cannot happen at the supported sizes).
    """
    _check_size(size)
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; known: {', '.join(TAGS)}")
    background = _pick(rng, tuple(BACKGROUNDS))
    colors, classes = tuple(COLORS), CLASSES
    relation = None
    exclude: list[dict] = []
    for _ in range(100):
        if tag == "single_object":
            c = _pick(rng, classes)
            objs = [Shape(c, _pick(rng, colors), 0, 0, _side(rng, tag, size))]
            include = [{"class": c, "count": 1}]
            prompt = f"a photo of {_a(c)}"
        elif tag == "two_object":
            a, b = (classes[i] for i in rng.choice(len(classes), 2, replace=False))
            objs = [Shape(k, _pick(rng, colors), 0, 0, _side(rng, tag, size)) for k in (a, b)]
            include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
            prompt = f"a photo of {_a(a)} and {_a(b)}"
        elif tag == "counting":
            c, n = _pick(rng, classes), int(rng.integers(2, 5))
            objs = [Shape(c, _pick(rng, colors), 0, 0, _side(rng, tag, size)) for _ in range(n)]
            include, exclude = [{"class": c, "count": n}], [{"class": c, "count": n + 1}]
            prompt = f"a photo of {_count_phrase(n, c)}"
        elif tag == "colors":
            c, col = _pick(rng, classes), _pick(rng, colors)
            objs = [Shape(c, col, 0, 0, _side(rng, tag, size))]
            include = [{"class": c, "count": 1, "color": col}]
            prompt = f"a photo of {_a(f'{col} {c}')}"
        elif tag == "position":
            target, subject = (classes[i] for i in rng.choice(len(classes), 2, replace=False))
            relation = _pick(rng, RELATIONS)
            objs = [Shape(k, _pick(rng, colors), 0, 0, _side(rng, tag, size)) for k in (target, subject)]
            include = [
                {"class": target, "count": 1},
                {"class": subject, "count": 1, "position": [relation, 0]},
            ]
            prompt = f"a photo of {_a(subject)} {relation} {_a(target)}"
        else:  # color_attr
            a, b = (classes[i] for i in rng.choice(len(classes), 2, replace=False))
            ca, cb = (colors[i] for i in rng.choice(len(colors), 2, replace=False))
            objs = [Shape(a, ca, 0, 0, _side(rng, tag, size)), Shape(b, cb, 0, 0, _side(rng, tag, size))]
            include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
            prompt = f"a photo of {_a(f'{ca} {a}')} and {_a(f'{cb} {b}')}"
        if relation is not None:
            pair = _place_pair(rng, objs[0], objs[1], relation, size)
            if pair is None:
                continue
            objs = list(pair)
        else:
            pos = _place(rng, [o.d for o in objs], size)
            if pos is None:
                continue
            objs = [replace(o, x=x, y=y) for o, (x, y) in zip(objs, pos)]
        return Scene(tag, prompt, include, exclude, objs, background, size, relation)
    raise RuntimeError(f"generate_scene: no layout found for tag {tag!r} at size {size}")


def _size_word(obj: Shape, size: int) -> str:
    f = obj.d / size
    return "small" if f < 0.22 else "medium-sized" if f < 0.3 else "large"


def _place_word(obj: Shape, size: int) -> str:
    cx, cy = obj.x + obj.d / 2, obj.y + obj.d / 2
    col = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else "center"
    row = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else "middle"
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def caption(scene: Scene) -> str:
    """Detailed caption of the planned scene: background, then every object's size, colour, class
    and place (a 3x3 grid), in plan order; position scenes add the relation."""
    parts = [
        _a(f"{_size_word(o, scene.size)} {o.color} {o.cls} {_place_word(o, scene.size)}")
        for o in scene.objects
    ]
    text = f"On a {scene.background} background, {_join(parts)}."
    if scene.relation is not None:
        t, s = scene.objects
        text += f" The {s.cls} is {scene.relation} the {t.cls}."
    return text


# ------------------------------------------------------------------------------------------- drafts
@dataclass
class Draft:
    """A draft of a scene: what it shows, whether it is partial, and the reflection on it."""

    objects: list[Shape]
    error: str | None  # None (correct), "partial", or one of ERRORS
    critique: str
    regions: list[dict] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return self.error == "partial"


def _region(obj: Shape, box_obj: Shape, kind: str, size: int) -> dict:
    """Region on ``box_obj``'s box, labelled with the planned object ``obj``."""
    return {"box": norm_box(box_obj.box_px(), size), "label": obj.label, "kind": kind}


def _mention(scene: Scene, obj: Shape) -> str:
    """How the prompt refers to ``obj`` (with its colour only where the prompt names one)."""
    named = scene.tag in ("colors", "color_attr")
    return f"{obj.color} {obj.cls}" if named else obj.cls


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def make_draft(rng: np.random.Generator, scene: Scene, kind: str) -> Draft | None:
    """Derive a draft of kind ``kind`` ("ok", "partial" or one of :data:`ERRORS`) from a correct
    scene, with its reflection. Returns ``None`` when the draft does not fit (extra objects that
    find no room); the caller draws a new scene.

    Raises:
        ValueError: ``kind`` unknown or not applicable to the scene's tag.
    """
    tag, S, objs = scene.tag, scene.size, list(scene.objects)
    if kind not in KINDS:
        raise ValueError(f"unknown draft kind {kind!r}; known: {', '.join(KINDS)}")
    if kind in ERRORS and kind not in ERRORS_BY_TAG[tag]:
        raise ValueError(f"error {kind!r} does not break tag {tag!r} (applicable: {ERRORS_BY_TAG[tag]})")
    if kind == "partial" and tag not in PARTIAL_TAGS:
        raise ValueError(f"partial drafts need two or more objects; tag {tag!r} has one")
    prompt_tail = scene.prompt.removeprefix("a photo of ")

    if kind == "ok":
        return Draft(objs, None, f"The image matches the prompt: it shows {prompt_tail}.")

    if kind == "partial":
        k = int(rng.integers(1, len(objs)))
        drawn, rest = objs[:k], objs[k:]
        if tag == "counting":
            c, r = objs[0].cls, len(rest)
            critique = (
                f"So far the image shows {_count_phrase(k, c)}; the prompt asks for {NUMBERS[len(objs)]}, "
                f"so {NUMBERS[r]} more {c if r == 1 else PLURALS[c]} still {'has' if r == 1 else 'have'} "
                "to be drawn."
            )
        else:
            critique = (
                f"So far the image shows {_join([_a(_mention(scene, o)) for o in drawn])}; still missing: "
                f"{_join([_a(_mention(scene, o)) for o in rest])}."
            )
        return Draft(drawn, "partial", critique, [_region(o, o, "missing", S) for o in rest])

    if kind == "missing":
        i = int(rng.integers(len(objs)))
        gone = objs.pop(i)
        critique = f"There is no {_mention(scene, gone)} in the image, but the prompt asks for {prompt_tail}."
        return Draft(objs, kind, critique, [_region(gone, gone, "missing", S)])

    if kind == "count":  # fewer than asked
        n = len(objs)
        k = int(rng.integers(1, n))
        keep = sorted(int(i) for i in rng.choice(n, k, replace=False))
        gone = [o for i, o in enumerate(objs) if i not in keep]
        c = objs[0].cls
        critique = f"There {_be(k)} {_count_phrase(k, c)} but the prompt asks for {NUMBERS[n]}."
        return Draft([objs[i] for i in keep], kind, critique, [_region(o, o, "count", S) for o in gone])

    if kind == "extra":  # more than asked
        n, m = len(objs), int(rng.integers(1, 3))
        c = objs[0].cls
        extra = [Shape(c, _pick(rng, tuple(COLORS)), 0, 0, _side(rng, tag, S)) for _ in range(m)]
        pos = _place(rng, [o.d for o in extra], S, taken=objs)
        if pos is None:
            return None
        extra = [replace(o, x=x, y=y) for o, (x, y) in zip(extra, pos)]
        critique = f"There are {NUMBERS[n + m]} {PLURALS[c]} but the prompt asks for {NUMBERS[n]}."
        return Draft(objs + extra, kind, critique, [_region(o, o, "count", S) for o in extra])

    if kind == "color":
        i = int(rng.integers(len(objs)))
        want = objs[i]
        wrong = _pick(rng, tuple(c for c in COLORS if c != want.color))
        objs[i] = replace(want, color=wrong)
        critique = f"The {want.cls} is {wrong} but the prompt asks for {_a(f'{want.color} {want.cls}')}."
        return Draft(objs, kind, critique, [_region(want, objs[i], "color", S)])

    if kind == "attribute":  # swap the colours of the two objects
        a, b = objs
        objs = [replace(a, color=b.color), replace(b, color=a.color)]
        critique = (
            f"The colours are swapped: the {a.cls} is {b.color} and the {b.cls} is {a.color}, but the prompt "
            f"asks for {_a(f'{a.color} {a.cls}')} and {_a(f'{b.color} {b.cls}')}."
        )
        return Draft(
            objs, kind, critique, [_region(a, objs[0], "attribute", S), _region(b, objs[1], "attribute", S)]
        )

    # position: the subject moved to the opposite relation, the target where the scene has it; where the
    # target leaves no room for that, both objects moved. Regions: each moved object where it is (to clear)
    # and where it belongs (to draw), so that the refinement differs from the draft only inside them.
    target, subject = objs
    wrong_rel = OPPOSITE[scene.relation]
    s = _place_subject(rng, target, subject, wrong_rel, S)
    if s is not None:
        t, moved = target, [(subject, s)]
    else:
        pair = _place_pair(rng, target, subject, wrong_rel, S)
        if pair is None:
            return None
        t, s = pair
        moved = [(subject, s), (target, t)]
    actual = sorted(relative_position(s.box_px(), t.box_px()))
    critique = (
        f"The {s.cls} is {' and '.join(actual)} the {t.cls} but the prompt asks for it to be "
        f"{scene.relation} the {t.cls}."
    )
    regions = [_region(want, box, "position", S) for want, now in moved for box in (now, want)]
    return Draft([t, s], kind, critique, regions)


# ------------------------------------------------------------------------------------------ records
def _check_size(size: int) -> None:
    if not isinstance(size, int) or size % 16 or not 32 <= size <= 1024:
        raise ValueError(f"size must be a multiple of 16 in [32, 1024], got {size!r}")


def _check_rates(error_rate: float, partial_rate: float) -> None:
    if not (0 <= error_rate <= 1 and 0 <= partial_rate <= 1 and error_rate + partial_rate <= 1 + 1e-9):
        raise ValueError(
            f"need 0 <= error_rate, partial_rate and error_rate + partial_rate <= 1; "
            f"got error_rate={error_rate}, partial_rate={partial_rate}"
        )


def draw_kind(rng: np.random.Generator, tag: str, error_rate: float = 0.7, partial_rate: float = 0.15) -> str:
    """Draw the draft kind of one record: ``partial`` with probability ``partial_rate`` (tags with one
    object take a typed error instead), a typed error (uniform over :data:`ERRORS_BY_TAG`) with
    probability ``error_rate``, else ``ok``."""
    u = rng.random()
    if u < partial_rate + error_rate:
        if u < partial_rate and tag in PARTIAL_TAGS:
            return "partial"
        return _pick(rng, ERRORS_BY_TAG[tag])
    return "ok"


def make_record(
    index: int,
    seed: int,
    size: int = 64,
    *,
    tag: str | None = None,
    kind: str | None = None,
    error_rate: float = 0.7,
    partial_rate: float = 0.15,
) -> tuple[dict, dict[str, Image.Image]]:
    """Build record ``index`` (1-based) of the set with seed ``seed``.

    Args:
        index: record number; the id is ``shapes-{index:06d}`` and the RNG is
            ``default_rng([seed, index])``.
        seed: the set's seed (stored in ``meta.seed``).
        size: image side in pixels (multiple of 16, 32..1024).
        tag: GenEval category; default ``TAGS[(index - 1) % 6]`` (a balanced set).
        kind: "ok", "partial" or a typed error; default drawn by :func:`draw_kind` from the rates.

    Returns:
        ``(record, images)``: the JSON-ready record (image paths relative to the set's folder) and
        ``{relative path: PIL image}`` for its images.

    Raises:
        ValueError: bad index, size, rates, tag or kind (or a kind the tag does not admit).
    """
    if index < 1:
        raise ValueError(f"index must be >= 1, got {index}")
    _check_size(size)
    _check_rates(error_rate, partial_rate)
    rng = np.random.default_rng([seed, index])
    tag = TAGS[(index - 1) % len(TAGS)] if tag is None else tag
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; known: {', '.join(TAGS)}")
    kind = draw_kind(rng, tag, error_rate, partial_rate) if kind is None else kind
    for _ in range(100):
        scene = generate_scene(rng, tag, size)
        draft = make_draft(rng, scene, kind)
        if draft is not None:
            break
    else:
        raise RuntimeError(f"make_record: could not build a {kind!r} draft for tag {tag!r} at size {size}")

    rid = f"shapes-{index:06d}"
    draft_path, refine_path = f"images/{rid}_draft.png", f"images/{rid}_refine.png"
    images = {draft_path: render(scene, objects=draft.objects)}
    steps: list[dict] = [
        {
            "type": "plan",
            "caption": caption(scene),
            "boxes": [{"label": o.label, "box": norm_box(o.box_px(), size)} for o in scene.objects],
        },
        {"type": "draft", "image": draft_path, "partial": draft.partial},
        {
            "type": "reflect",
            "verdict": "ok" if draft.error is None else "revise",
            "critique": draft.critique,
            "regions": draft.regions,
            "mask": None,
        },
    ]
    if draft.error is not None:
        images[refine_path] = render(scene)
        steps.append(
            {"type": "refine", "image": refine_path, "mode": "inpaint" if draft.partial else "regenerate"}
        )
    record = {
        "id": rid,
        "task": "t2i",
        "prompt": scene.prompt,
        "input_image": None,
        "meta": {
            "tag": tag,
            "include": scene.include,
            "exclude": scene.exclude,
            "seed": seed,
            "size": size,
            "error": draft.error,
        },
        "steps": steps,
    }
    return record, images


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def generate(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 64,
    *,
    error_rate: float = 0.7,
    partial_rate: float = 0.15,
    overwrite: bool = False,
    progress: bool = True,
    tasks: tuple[str, ...] | list[str] | None = None,
) -> dict:
    """Write ``n`` records to ``out/records.jsonl`` and their PNGs to ``out/images/``.

    ``tasks``: write each record as FoX's separate tasks instead (:func:`ftkit.data.tasks.split_tasks`:
    ``plan-act``, ``reflect``, ``correct``, ``mcot``), sharing its images.

    Everything is written to a temporary folder beside ``out`` and renamed into place when complete.

    Returns:
        A summary: ``{"n", "images", "bytes", "tags": {tag: count}, "kinds": {kind: count}, "out"}``
        (``kinds`` counts ``meta.error``, ``"ok"`` for correct drafts).

    Raises:
        ValueError: ``n < 1``, bad size or rates.
        FileExistsError: ``out`` exists and is not an empty folder, and ``overwrite`` is false.
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_size(size)
    _check_rates(error_rate, partial_rate)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tags, kinds, total_bytes, n_images = Counter(), Counter(), 0, 0
    try:
        (tmp / "images").mkdir()
        with open(tmp / "records.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for i in tqdm(range(1, n + 1), desc="shapes", unit="rec", disable=not progress):
                rec, images = make_record(i, seed, size, error_rate=error_rate, partial_rate=partial_rate)
                for rel, img in images.items():
                    data = _png_bytes(img)
                    (tmp / rel).write_bytes(data)
                    total_bytes += len(data)
                    n_images += 1
                for r in split_tasks(rec, tasks) if tasks else [rec]:
                    line = json.dumps(r, ensure_ascii=False)
                    f.write(line + "\n")
                    total_bytes += len(line) + 1
                tags[rec["meta"]["tag"]] += 1
                kinds[rec["meta"]["error"] or "ok"] += 1
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {
        "out": str(out),
        "n": n,
        "tasks": list(tasks or []),
        "images": n_images,
        "bytes": total_bytes,
        "tags": {t: tags[t] for t in TAGS if tags[t]},
        "kinds": {k: kinds[k] for k in KINDS if kinds[k]},
    }


def main(argv: list[str] | None = None) -> int:
    """``ftkit data shapes``: generate a shapes-world set. Returns the exit status."""
    p = argparse.ArgumentParser(prog="ftkit data shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (records.jsonl + images/)")
    p.add_argument("--n", type=int, default=200, help="number of records (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed; same seed => same bytes (default 0)")
    p.add_argument("--size", type=int, default=64, help="image side, multiple of 16 (default 64)")
    p.add_argument("--error-rate", type=float, default=0.7, help="share of drafts with a typed error")
    p.add_argument("--partial-rate", type=float, default=0.15, help="share of partial drafts")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                   help="write each record as FoX's separate tasks (plan-act reflect correct mcot)")
    args = p.parse_args(argv)
    try:
        s = generate(
            args.out,
            args.n,
            args.seed,
            args.size,
            error_rate=args.error_rate,
            partial_rate=args.partial_rate,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            tasks=args.tasks,
        )
    except (ValueError, FileExistsError) as e:
        print(f"ftkit data shapes: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {s['n']} records{' as tasks ' + '/'.join(s['tasks']) if s['tasks'] else ''} and {s['images']} images ({s['bytes'] / 1e6:.2f} MB) to {s['out']} "
        f"(seed {args.seed}, {args.size}x{args.size})"
    )
    print("  tags:  " + ", ".join(f"{k} {v}" for k, v in s["tags"].items()))
    print("  drafts: " + ", ".join(f"{k} {v}" for k, v in s["kinds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
