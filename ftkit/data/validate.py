"""Check every record of a dataset before a GPU-hour is spent on it.

:func:`validate` goes through every row of every file, never stopping, and collects each problem as
``file:record:field: reason``:

* schema and ordering rules (:meth:`StepRecord.from_dict`: missing fields, wrong types, boxes
  outside 0..1000 or not ordered, steps out of order, empty steps, bad JSON lines);
* every image: the file exists, it decodes fully (``Image.load()``, which catches truncation),
  and both sides are at least ``min_size`` pixels;
* a reflection mask has the size of the image it annotates (the latest draft/refine before it).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.data.dataset import resolve
from ftkit.data.importers import Source, open_sources
from ftkit.data.registry import Registry
from ftkit.data.schema import (
    ERR_IMAGE_DECODE,
    ERR_IMAGE_MISSING,
    ERR_IMAGE_SIZE,
    ERR_MASK_SIZE,
    DraftStep,
    ImageRef,
    Problem,
    RecordError,
    RefineStep,
    ReflectStep,
    StepRecord,
)


@dataclass
class Report:
    """Outcome of :func:`validate`."""

    name: str
    total: int = 0
    good: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_records: list[tuple[str, int | str]] = field(default_factory=list)
    step_counts: Counter = field(default_factory=Counter)  # over good records
    error_kinds: Counter = field(default_factory=Counter)

    @property
    def bad(self) -> int:
        return len(self.bad_records)

    @property
    def ok(self) -> bool:
        return not self.bad_records

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v}" for k, v in sorted(self.step_counts.items())) or "none"
        lines = [f"{self.name}: {self.total} records, {self.good} good, {self.bad} bad",
                 f"  steps (good records): {steps}"]
        if self.error_kinds:
            lines.append("  problems: " + ", ".join(f"{k} {v}" for k, v in self.error_kinds.most_common()))
        return "\n".join(lines)


def check_image(ref: ImageRef, file: str, index, fld: str, min_size: int) -> tuple[list[Problem], tuple | None]:
    """Problems of one image and its (width, height) when it decodes."""
    if ref.path is not None and not ref.path.is_file():
        return [Problem(file, index, fld, f"image file not found: {ref.path}", ERR_IMAGE_MISSING)], None
    try:
        im = ref.open(mode=None)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated, permissions
        return [Problem(file, index, fld, f"image does not decode ({ref.name}): {e}", ERR_IMAGE_DECODE)], None
    w, h = im.size
    if w < min_size or h < min_size:
        return [Problem(file, index, fld, f"image is {w}x{h}, smaller than min_size {min_size}", ERR_IMAGE_SIZE)], (w, h)
    return [], (w, h)


def check_record_images(rec: StepRecord, min_size: int = 16) -> list[Problem]:
    """Decode every image of ``rec``; check sizes and mask sizes."""
    file, index = rec.source, rec.index
    problems: list[Problem] = []
    sizes: dict[str, tuple | None] = {}
    for fld, ref in rec.images():
        ps, size = check_image(ref, file, index, fld, 1 if fld.endswith(".mask") else min_size)
        problems += ps
        sizes[fld] = size
    last_image = None
    for i, s in enumerate(rec.steps):
        if isinstance(s, (DraftStep, RefineStep)):
            last_image = f"steps[{i}].image"
        elif isinstance(s, ReflectStep) and s.mask is not None and last_image is not None:
            m, im = sizes.get(f"steps[{i}].mask"), sizes.get(last_image)
            if m is not None and im is not None and m != im:
                problems.append(Problem(file, index, f"steps[{i}].mask", f"mask is {m[0]}x{m[1]} but the image it "
                                        f"annotates ({last_image}) is {im[0]}x{im[1]}", ERR_MASK_SIZE))
    return problems


def validate(source: str | os.PathLike | list[Source], *, format: str | None = None,
             registry: Registry | str | os.PathLike | list | None = None, split: str | None = None,
             min_size: int = 16, images: bool = True) -> Report:
    """Check every record of a dataset (registry name, path, or list of sources).

    Args:
        source: registry name, file/folder path, or already opened :class:`Source` objects.
        format: override the format (else the registry's, or guessed from the path).
        registry: extra registry file(s) or a :class:`Registry`.
        split: split of a registry entry.
        min_size: smallest allowed image side in pixels (masks excepted).
        images: decode images (off: schema only).

    Returns:
        A :class:`Report`; ``report.ok`` is False if any record has a problem.
    """
    if isinstance(source, list):
        sources, name = source, ", ".join(str(s.file) for s in source)
    else:
        spec = resolve(source, registry, format)
        name = spec.name
        sources = []
        for f in spec.files(None if spec.origin == "<path>" else split):
            sources += open_sources(f, spec.format, spec.fields, streaming=False)
    report = Report(name=name)
    for src in sources:
        for index, rec in src.checked():
            report.total += 1
            if isinstance(rec, RecordError):
                problems = rec.problems
            else:
                problems = check_record_images(rec, min_size) if images else []
            if problems:
                report.problems += problems
                report.bad_records.append((str(Path(src.file)), index))
                report.error_kinds.update(p.kind for p in problems)
            else:
                report.good += 1
                report.step_counts.update(s.type for s in rec.steps)
    return report
