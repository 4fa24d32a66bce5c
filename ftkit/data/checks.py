"""The checks every record goes through, in ``ftkit data validate`` and when a dataset loads for
training (one home, so that both count the same bad records):

* reading and schema (:meth:`Source.checked`: encoding, JSON, fields, ordering rules, paths that
  leave the dataset folder);
* every image: the file exists, its header is below ``PIL.Image.MAX_IMAGE_PIXELS``, it decodes
  fully (``Image.load()``, which catches truncation), and both sides are at least ``min_size``;
* a reflection mask has the size of the image it annotates (the latest draft/refine before it);
* record ids are unique within a dataset (the second occurrence is the bad one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ftkit.data.importers import Source
from ftkit.data.schema import (
    ERR_DUPLICATE,
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

MIN_IMAGE_SIZE = 16


def check_image(ref: ImageRef, file: str, index, fld: str, min_size: int) -> tuple[list[Problem], tuple | None]:
    """Problems of one image and its (width, height) when it decodes."""
    if ref.path is not None and not ref.path.is_file():
        return [Problem(file, index, fld, f"image file not found: {ref.path}", ERR_IMAGE_MISSING)], None
    try:
        im = ref.open(mode=None)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated, too large; permissions
        return [Problem(file, index, fld, f"image does not decode ({ref.name}): {e}", ERR_IMAGE_DECODE)], None
    w, h = im.size
    if w < min_size or h < min_size:
        return [Problem(file, index, fld, f"image is {w}x{h}, smaller than min_size {min_size}", ERR_IMAGE_SIZE)], (w, h)
    return [], (w, h)


def check_record_images(rec: StepRecord, min_size: int = MIN_IMAGE_SIZE) -> list[Problem]:
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


def check_sources(sources: Sequence[Source], *, images: bool = True, min_size: int = MIN_IMAGE_SIZE
                  ) -> Iterator[tuple[int, int, StepRecord | RecordError]]:
    """Every row of every source, checked: ``(source number, row position, record or RecordError)``.
    The RecordError carries every problem of the record in ``.problems``. Never stops early."""
    seen: dict[str, tuple[int, int, str]] = {}  # record id -> (source, row, location) of its first occurrence
    for s, src in enumerate(sources):
        for j, (_, rec) in enumerate(src.checked()):
            if isinstance(rec, RecordError):
                yield s, j, rec
                continue
            problems = check_record_images(rec, min_size) if images else []
            first = seen.setdefault(rec.id, (s, j, f"{rec.source}:{rec.index}"))
            if first[:2] != (s, j):
                problems.append(Problem(rec.source, rec.index, "id", f"duplicate id {rec.id!r} (first at {first[2]})",
                                        ERR_DUPLICATE))
            yield s, j, (RecordError.from_problems(problems) if problems else rec)
