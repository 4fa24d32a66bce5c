"""Contact sheet of a few records: one row per record with the prompt and plan text, the input
image (edit), every draft with the plan's boxes drawn, every reflection's regions drawn on the image
it annotates (with the critique), and every refinement."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ftkit.data.schema import DraftStep, PlanStep, RecordError, RefineStep, ReflectStep, StepRecord
from ftkit.data.serialize import serialize_plan
from ftkit.files import atomic_write

_COLORS = ["#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55"]
_KIND_COLORS = {"missing": "#ff3b30", "count": "#ff9500", "color": "#af52de", "position": "#007aff",
                "attribute": "#34c759", "artifact": "#ffcc00"}


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _draw_boxes(im, boxes, colors, labels=None):
    from PIL import ImageDraw

    d = ImageDraw.Draw(im)
    w, h = im.size
    for j, b in enumerate(boxes):
        x0, y0, x1, y1 = b
        c = colors[j % len(colors)] if isinstance(colors, list) else colors
        d.rectangle([x0 * w / 1000, y0 * h / 1000, x1 * w / 1000 - 1, y1 * h / 1000 - 1], outline=c, width=2)
        if labels:
            d.text((x0 * w / 1000 + 3, y0 * h / 1000 + 2), labels[j], fill=c, font=_font())
    return im


def _text_panel(text: str, width: int, height: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    chars = max(10, width // 7)
    lines = []
    for para in text.splitlines():
        lines += textwrap.wrap(para, chars) or [""]
    max_lines = height // 13
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["..."]
    d.multiline_text((4, 4), "\n".join(lines), fill="black", font=_font(), spacing=2)
    return im


def _panel(im, title: str, cell: int):
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (cell, cell + 16), "white")
    out.paste(im.convert("RGB").resize((cell, cell)), (0, 16))
    ImageDraw.Draw(out).text((3, 2), title, fill="black", font=_font())
    return out


def _error_panel(msg: str, cell: int):
    return _panel(_text_panel(msg, cell, cell), "error", cell)


def record_panels(rec: StepRecord, cell: int = 192) -> list:
    """The panels (PIL images) of one record's row."""
    plan = next((s for s in rec.steps if isinstance(s, PlanStep)), None)
    text = f"[{rec.task}] {rec.id}\n{rec.prompt}"
    if plan is not None:
        text += "\n\nplan:\n" + serialize_plan(plan)
    panels = [_panel(_text_panel(text, cell, cell), "prompt / plan", cell)]
    if rec.input_image is not None:
        panels.append(_panel(rec.input_image.open(), "input", cell))
    last = None
    for s in rec.steps:
        if isinstance(s, (DraftStep, RefineStep)):
            im = s.image.open().resize((cell, cell))
            if isinstance(s, DraftStep) and plan is not None and plan.boxes:
                im = _draw_boxes(im, [b.box for b in plan.boxes], _COLORS, [b.label for b in plan.boxes])
            title = ("draft" + (" (partial)" if s.partial else "")) if isinstance(s, DraftStep) else f"refine ({s.mode})"
            panels.append(_panel(im, title, cell))
            last = s.image
        elif isinstance(s, ReflectStep):
            base = last.open().resize((cell, cell)) if last is not None else _text_panel("", cell, cell)
            if s.mask is not None:
                from PIL import Image

                m = s.mask.open("L").resize((cell, cell))
                base = Image.composite(Image.new("RGB", (cell, cell), "#ff3b30"), base, m.point(lambda v: 96 if v > 127 else 0))
            base = _draw_boxes(base, [r.box for r in s.regions], [_KIND_COLORS[r.kind] for r in s.regions],
                               [f"{r.kind}: {r.label}" for r in s.regions])
            panels.append(_panel(base, f"reflect: {s.verdict}", cell))
            if s.critique:
                panels.append(_panel(_text_panel(s.critique, cell, cell), "critique", cell))
    return panels


def contact_sheet(records: Sequence[StepRecord], out: str | os.PathLike, cell: int = 192) -> Path:
    """Write a PNG contact sheet of ``records`` to ``out`` (via a temporary name); return the path.

    A record whose images do not decode gets an error panel instead of failing the sheet."""
    from PIL import Image

    rows = []
    for rec in records:
        try:
            rows.append(record_panels(rec, cell))
        except (OSError, ValueError, RecordError) as e:
            rows.append([_error_panel(f"{rec.source}:{rec.index}: {e}", cell)])
    if not rows:
        raise ValueError("contact_sheet needs at least one record")
    ph = cell + 16
    width = max(len(r) for r in rows) * cell
    sheet = Image.new("RGB", (width, ph * len(rows)), "#dddddd")
    for y, row in enumerate(rows):
        for x, p in enumerate(row):
            sheet.paste(p, (x * cell, y * ph))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: sheet.save(fh, format="PNG"))
    return out
