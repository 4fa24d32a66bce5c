"""Deterministic text form of plans and reflections (what the model reads and writes).

Plan (caption, then one line per box, in record order)::

    a red circle left of a blue square
    <box>red circle [120,340,380,600]</box>
    <box>blue square [600,300,900,640]</box>

Reflection (verdict line, optional critique, then one line per region)::

    <verdict>revise</verdict>
    the blue square is missing
    <region>missing blue square [600,300,900,640]</region>

Rules:

* Coordinates are integers ``[x0,y0,x1,y1]`` in 0..1000 (origin top-left), x0 < x1, y0 < y1,
  written without spaces; the parser also accepts spaces after commas and inside brackets.
* A box line is ``<box>LABEL [x0,y0,x1,y1]</box>``; LABEL is non-empty and contains no newline,
  ``[``, ``]``, ``<`` or ``>``. A region line is ``<region>KIND LABEL [x0,y0,x1,y1]</region>`` with
  KIND one of missing|count|color|position|attribute|artifact and LABEL possibly empty.
* The caption / critique is every other line (before the box / region lines); it is normalised
  (:func:`normalize_text`: each line stripped, blank lines dropped) and must not contain a
  ``<box>``/``<region>``/``<verdict>`` tag. An empty caption / critique writes no line.
* The reflection's mask image is not part of the text.

``parse_plan(serialize_plan(p)) == p`` and ``parse_reflection(serialize_reflection(r)) == r`` for
every plan / reflection whose caption / critique is already normalised (and ``r.mask is None``);
surrounding whitespace and blank lines are ignored when parsing and raise :class:`ParseError` naming the line
and the reason for a malformed box, a region of unknown kind or a missing verdict.
"""

from __future__ import annotations

import re

from ftkit.data.schema import (
    BOX_MAX,
    REGION_KINDS,
    TEXT_TAGS,
    VERDICTS,
    Box,
    PlanStep,
    ReflectStep,
    Region,
    box_problem,
)
from ftkit.errors import FtkitError

_LABEL_BAD = re.compile(r"[\n\r\[\]<>]")
_BOX_LINE = re.compile(r"^<box>(?P<body>.*)</box>$")
_REGION_LINE = re.compile(r"^<region>(?P<body>.*)</region>$")
_VERDICT_LINE = re.compile(r"^<verdict>\s*(?P<v>.*?)\s*</verdict>$")
_LABEL_COORDS = re.compile(r"^(?P<label>[^\[\]<>]*?)\s*\[(?P<coords>[^\[\]]*)\]\s*$")


class ParseError(FtkitError, ValueError):
    """Malformed plan / reflection text; the message names the line (1-based) and the reason."""


def format_box(box) -> str:
    """``[x0,y0,x1,y1]`` (validated)."""
    reason = box_problem(list(box) if isinstance(box, tuple) else box)
    if reason:
        raise ValueError(reason)
    return "[" + ",".join(str(int(v)) for v in box) + "]"


def _check_label(label: str, what: str, allow_empty: bool) -> str:
    if not isinstance(label, str):
        raise ValueError(f"{what} label must be a string, got {type(label).__name__}")
    if label != label.strip():
        raise ValueError(f"{what} label {label!r} has surrounding whitespace")
    if not label and not allow_empty:
        raise ValueError(f"{what} label is empty")
    if _LABEL_BAD.search(label):
        raise ValueError(f"{what} label {label!r} contains a newline, '[', ']', '<' or '>'")
    return label


def normalize_text(text: str) -> str:
    """Each line stripped, blank lines dropped (how captions and critiques are written)."""
    return "\n".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _check_free_text(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if any(t in text for t in TEXT_TAGS):
        raise ValueError(f"{what} must not contain <box>/<region>/<verdict> tags: {text!r}")
    return normalize_text(text)


def serialize_plan(plan: PlanStep) -> str:
    """Plan text (see module docstring). Raises ``ValueError`` for a label or caption it cannot write."""
    lines = []
    caption = _check_free_text(plan.caption, "caption")
    if caption:
        lines.append(caption)
    for b in plan.boxes:
        lines.append(f"<box>{_check_label(b.label, 'box', False)} {format_box(b.box)}</box>")
    return "\n".join(lines)


def serialize_reflection(reflect: ReflectStep) -> str:
    """Reflection text (see module docstring). Raises ``ValueError`` for unwritable content."""
    if reflect.verdict not in VERDICTS:
        raise ValueError(f"verdict {reflect.verdict!r} is not one of {VERDICTS}")
    lines = [f"<verdict>{reflect.verdict}</verdict>"]
    critique = _check_free_text(reflect.critique, "critique")
    if critique:
        lines.append(critique)
    for r in reflect.regions:
        if r.kind not in REGION_KINDS:
            raise ValueError(f"region kind {r.kind!r} is not one of {REGION_KINDS}")
        label = _check_label(r.label, "region", True)
        mid = f"{r.kind} {label}" if label else r.kind
        lines.append(f"<region>{mid} {format_box(r.box)}</region>")
    return "\n".join(lines)


def _parse_coords(coords: str, lineno: int) -> tuple[int, int, int, int]:
    parts = [p.strip() for p in coords.split(",")]
    if len(parts) != 4:
        raise ParseError(f"line {lineno}: box needs 4 integers [x0,y0,x1,y1], got [{coords}]")
    vals = []
    for p in parts:
        if not re.fullmatch(r"\d{1,4}", p):
            raise ParseError(f"line {lineno}: box value {p!r} is not an integer in 0..{BOX_MAX}")
        vals.append(int(p))
    reason = box_problem(vals)
    if reason:
        raise ParseError(f"line {lineno}: {reason}")
    return tuple(vals)  # type: ignore[return-value]


def _split_label_box(body: str, lineno: int, what: str) -> tuple[str, tuple[int, int, int, int]]:
    m = _LABEL_COORDS.match(body.strip())
    if not m:
        raise ParseError(f"line {lineno}: malformed {what} {body!r} (expected 'LABEL [x0,y0,x1,y1]')")
    return m.group("label").strip(), _parse_coords(m.group("coords"), lineno)


def _lines(text: str) -> list[tuple[int, str]]:
    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}")
    return [(i + 1, ln.strip()) for i, ln in enumerate(text.strip().splitlines()) if ln.strip()]


def parse_plan(text: str) -> PlanStep:
    """Inverse of :func:`serialize_plan`. Raises :class:`ParseError` (line number and reason)."""
    caption, boxes = [], []
    for lineno, ln in _lines(text):
        if "<box>" in ln or "</box>" in ln:
            m = _BOX_LINE.match(ln)
            if not m:
                raise ParseError(f"line {lineno}: malformed box line {ln!r} (expected '<box>LABEL [x0,y0,x1,y1]</box>')")
            label, box = _split_label_box(m.group("body"), lineno, "box")
            if not label:
                raise ParseError(f"line {lineno}: box has an empty label")
            boxes.append(Box(label, box))
        elif boxes:
            raise ParseError(f"line {lineno}: caption text after the box lines: {ln!r}")
        elif any(t in ln for t in TEXT_TAGS):
            raise ParseError(f"line {lineno}: a stray tag in the caption: {ln!r}")
        else:
            caption.append(ln)
    return PlanStep(caption="\n".join(caption), boxes=boxes)


def parse_reflection(text: str) -> ReflectStep:
    """Inverse of :func:`serialize_reflection`. Raises :class:`ParseError` (line number and reason)."""
    lines = _lines(text)
    if not lines:
        raise ParseError("empty reflection (expected '<verdict>ok|revise</verdict>')")
    lineno, first = lines[0]
    m = _VERDICT_LINE.match(first)
    if not m:
        raise ParseError(f"line {lineno}: reflection must start with '<verdict>ok|revise</verdict>', got {first!r}")
    verdict = m.group("v")
    if verdict not in VERDICTS:
        raise ParseError(f"line {lineno}: verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    critique, regions = [], []
    for lineno, ln in lines[1:]:
        if "<region>" in ln or "</region>" in ln:
            m = _REGION_LINE.match(ln)
            if not m:
                raise ParseError(f"line {lineno}: malformed region line {ln!r} "
                                 "(expected '<region>KIND LABEL [x0,y0,x1,y1]</region>')")
            body = m.group("body").strip()
            kind, _, rest = body.partition(" ")
            if kind.startswith("["):
                raise ParseError(f"line {lineno}: region has no kind (one of {', '.join(REGION_KINDS)})")
            if kind not in REGION_KINDS:
                raise ParseError(f"line {lineno}: region kind {kind!r} is not one of {', '.join(REGION_KINDS)}")
            label, box = _split_label_box(rest, lineno, "region")
            regions.append(Region(box=box, label=label, kind=kind))
        elif "<verdict>" in ln:
            raise ParseError(f"line {lineno}: second verdict line {ln!r}")
        elif regions:
            raise ParseError(f"line {lineno}: critique text after the region lines: {ln!r}")
        elif any(t in ln for t in TEXT_TAGS):
            raise ParseError(f"line {lineno}: a stray tag in the critique: {ln!r}")
        else:
            critique.append(ln)
    return ReflectStep(verdict=verdict, critique="\n".join(critique), regions=regions)
