"""ftkit's step-wise multimodal chain-of-thought record.

One record (one JSONL line, or one Parquet row with the same columns)::

    {"id": "shapes-000001", "task": "t2i" | "edit", "prompt": "a photo of two red circles",
     "input_image": null | IMAGE,
     "meta": {...},                                    # free dict (e.g. GenEval metadata)
     "steps": [
       {"type": "plan", "caption": "...", "boxes": [{"label": "red circle", "box": [x0, y0, x1, y1]}]},
       {"type": "draft", "image": IMAGE, "partial": false},
       {"type": "reflect", "verdict": "ok" | "revise", "critique": "...",
        "regions": [{"box": [..], "label": "red circle", "kind": "missing"}], "mask": null | IMAGE},
       {"type": "refine", "image": IMAGE, "mode": "regenerate" | "inpaint" | "edit"}],
     "supervise": ["plan", "draft", "reflect", "refine"],   # optional, default: every type present
     "rejected": null | {"type": "reflect", ...}}           # optional: a preference pair (below)

``IMAGE`` is a path (relative to the record file's directory, or absolute), ``{"bytes_b64": ...}``
(JSONL) or ``{"bytes": ..., "path": null}`` (Parquet, the ``datasets`` Image layout). Boxes are
integers ``[x0, y0, x1, y1]`` in 0..1000 with x0 < x1 and y0 < y1, origin top-left.

Ordering rules checked by :meth:`StepRecord.from_dict`:

* ``steps`` is a non-empty list; ``task == "edit"`` needs ``input_image``; ``t2i`` must not have one.
* a ``reflect`` needs a generated image (``draft`` or ``refine``) before it;
* a ``refine`` needs a ``reflect`` with verdict ``revise`` before it, with no image step between
  them (a ``plan`` may sit between); an ``inpaint`` refine needs regions or a mask in that reflect;
* ``supervise`` names only step types present in the record.
* ``rejected`` (a reflect step) makes the record a preference pair for DPO: the record's last step is the
  chosen reflection, ``rejected`` the dispreferred one on the same context; the last step must be a reflect.

Parquet stores ``steps`` as a list of structs with the union of all step keys: keys that do not
belong to a step type are accepted when their value is ``None``; any other unknown key is an error.

Every problem is reported as :class:`RecordError` ``file:index:field: reason``; ``from_dict``
collects all problems of a record and raises the first one, carrying the full list in
``RecordError.problems``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ftkit.errors import FtkitError

STEP_TYPES = ("plan", "draft", "reflect", "refine")
TASKS = ("t2i", "edit")
VERDICTS = ("ok", "revise")
REGION_KINDS = ("missing", "count", "color", "position", "attribute", "artifact")
REFINE_MODES = ("regenerate", "inpaint", "edit")
# the tags that delimit serialized plans and reflections (ftkit.data.serialize): never inside free text
TEXT_TAGS = ("<box>", "</box>", "<region>", "</region>", "<verdict>", "</verdict>")
BOX_MAX = 1000

# error kinds (summary buckets of validate.Report)
ERR_JSON = "json"
ERR_MISSING = "missing_field"
ERR_TYPE = "type"
ERR_VALUE = "value"
ERR_BOX = "box"
ERR_ORDER = "order"
ERR_UNKNOWN = "unknown_field"
ERR_IMAGE_MISSING = "image_missing"
ERR_IMAGE_DECODE = "image_decode"
ERR_IMAGE_SIZE = "image_size"
ERR_MASK_SIZE = "mask_size"
ERR_ENCODING = "encoding"
ERR_OUTSIDE = "outside_path"
ERR_DUPLICATE = "duplicate_id"
ERR_TOO_LONG = "too_long"


@dataclass(frozen=True)
class Problem:
    """One problem of one record: ``file:index:field: reason``."""

    file: str
    index: int | str
    field: str
    reason: str
    kind: str = ERR_VALUE

    def __str__(self) -> str:
        return f"{self.file}:{self.index}:{self.field}: {self.reason}"


class RecordError(FtkitError, ValueError):
    """A record is invalid. ``str(err)`` is ``file:index:field: reason`` of the first problem;
    ``err.problems`` lists every problem found in the record."""

    def __init__(self, file: str, index: int | str, field: str, reason: str, kind: str = ERR_VALUE,
                 problems: list[Problem] | None = None):
        self.file, self.index, self.field, self.reason, self.kind = str(file), index, field, reason, kind
        self.problems = problems or [Problem(self.file, index, field, reason, kind)]
        super().__init__(f"{self.file}:{index}:{field}: {reason}")

    @classmethod
    def from_problems(cls, problems: list[Problem]) -> RecordError:
        p = problems[0]
        return cls(p.file, p.index, p.field, p.reason, p.kind, problems=list(problems))


# ----------------------------------------------------------------------------------------------
# images


class ImageRef:
    """A lazily decoded image: a file path or encoded bytes (PNG/JPEG/...). Nothing is read until
    :meth:`open` (or :attr:`size`) is called.

    Args:
        path: absolute (resolved) path of the image file, or None.
        data: encoded image bytes, or None. Exactly one of ``path`` / ``data`` is set.
        name: how the image was written in the record (for messages and re-serialisation).
    """

    __slots__ = ("path", "data", "name")

    def __init__(self, path: str | os.PathLike | None = None, data: bytes | None = None, name: str | None = None):
        if (path is None) == (data is None):
            raise ValueError("ImageRef needs exactly one of path or data")
        self.path = None if path is None else Path(path)
        self.data = data
        self.name = name if name is not None else (str(path) if path is not None else f"<{len(data)} bytes>")

    @classmethod
    def from_value(cls, value: Any, base_dir: str | os.PathLike | None = None) -> ImageRef:
        """Build from a record value: ``str`` path, ``{"bytes_b64": str}``, ``{"bytes": b, "path": p}``,
        raw ``bytes``, a PIL image, or an ImageRef. Raises ``TypeError``/``ValueError`` with a reason."""
        if isinstance(value, ImageRef):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return cls(data=bytes(value))
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("empty image path")
            p = Path(value)
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            return cls(path=p, name=value)
        if isinstance(value, dict):
            if value.get("bytes_b64") is not None:
                b = value["bytes_b64"]
                if not isinstance(b, str):
                    raise TypeError(f"bytes_b64 must be a base64 string, got {type(b).__name__}")
                try:
                    return cls(data=base64.b64decode(b, validate=True))
                except (binascii.Error, ValueError) as e:
                    raise ValueError(f"bytes_b64 is not valid base64 ({e})") from None
            if value.get("bytes") is not None:
                b = value["bytes"]
                if not isinstance(b, (bytes, bytearray, memoryview)):
                    raise TypeError(f"image bytes must be bytes, got {type(b).__name__}")
                return cls(data=bytes(b), name=value.get("path") or None)
            if value.get("path") is not None:
                return cls.from_value(value["path"], base_dir)
            raise ValueError("image object needs 'bytes_b64', 'bytes' or 'path'")
        try:  # a PIL image (importers building records in memory, tests)
            from PIL import Image

            if isinstance(value, Image.Image):
                buf = io.BytesIO()
                value.save(buf, format="PNG")
                return cls(data=buf.getvalue(), name="<PIL image>")
        except ImportError:  # pragma: no cover - pillow is a dependency
            pass
        raise TypeError(f"image must be a path string or an object with bytes, got {type(value).__name__}")

    def exists(self) -> bool:
        return self.data is not None or (self.path is not None and self.path.is_file())

    def _open(self):
        """``Image.open`` (header only) with errors that name this image, not a ``BytesIO`` object;
        refuses a header larger than PIL's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb) before
        anything is decoded."""
        from PIL import Image, UnidentifiedImageError

        src = io.BytesIO(self.data) if self.data is not None else self.path
        try:
            with warnings.catch_warnings():  # the size is checked below, with a message that names the image
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(src)
        except UnidentifiedImageError:
            raise OSError(f"cannot identify image file {self.name}") from None
        except Image.DecompressionBombError as e:
            raise OSError(f"image is too large to decode: {e}") from None
        w, h = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and w * h > limit:
            im.close()
            raise OSError(f"image header says {w}x{h} = {w * h} pixels, more than the {limit} allowed "
                          "(PIL.Image.MAX_IMAGE_PIXELS)")
        return im

    def open(self, mode: str = "RGB"):
        """Decode fully (``Image.load()``) and convert to ``mode``. Raises ``FileNotFoundError`` for a
        missing file and ``OSError`` for undecodable data or a header above ``Image.MAX_IMAGE_PIXELS``."""
        with self._open() as im:
            im.load()
            return im.convert(mode) if mode else im.copy()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the header (no full decode)."""
        with self._open() as im:
            return im.size

    def to_json(self, base_dir: str | os.PathLike | None = None, embed: bool = False) -> Any:
        """JSONL form: a path (relative to ``base_dir`` when possible) or ``{"bytes_b64": ...}``."""
        if self.data is not None or embed:
            data = self.data if self.data is not None else self.path.read_bytes()
            return {"bytes_b64": base64.b64encode(data).decode("ascii")}
        if base_dir is not None:
            try:
                return os.path.relpath(self.path, base_dir)
            except ValueError:  # other drive on Windows
                return str(self.path)
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageRef):
            return NotImplemented
        return self.path == other.path and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.path, self.data))

    def __repr__(self) -> str:
        return f"ImageRef({self.name!r})"


# ----------------------------------------------------------------------------------------------
# steps


@dataclass
class Box:
    label: str
    box: tuple[int, int, int, int]


@dataclass
class Region:
    box: tuple[int, int, int, int]
    label: str = ""
    kind: str = "missing"


@dataclass
class PlanStep:
    caption: str = ""
    boxes: list[Box] = field(default_factory=list)
    type: Literal["plan"] = "plan"


@dataclass
class DraftStep:
    image: ImageRef
    partial: bool = False
    type: Literal["draft"] = "draft"


@dataclass
class ReflectStep:
    verdict: str = "revise"
    critique: str = ""
    regions: list[Region] = field(default_factory=list)
    mask: ImageRef | None = None
    type: Literal["reflect"] = "reflect"


@dataclass
class RefineStep:
    image: ImageRef
    mode: str = "regenerate"
    type: Literal["refine"] = "refine"


AnyStep = PlanStep | DraftStep | ReflectStep | RefineStep

_STEP_KEYS = {
    "plan": {"type", "caption", "boxes"},
    "draft": {"type", "image", "partial"},
    "reflect": {"type", "verdict", "critique", "regions", "mask"},
    "refine": {"type", "image", "mode"},
}
_RECORD_KEYS = {"id", "task", "prompt", "input_image", "meta", "steps", "supervise", "rejected"}


class _Checker:
    """Accumulates problems of one record."""

    def __init__(self, file: str, index: int | str, root: Path | None = None):
        self.file, self.index, self.root = file, index, root
        self.problems: list[Problem] = []

    def add(self, fld: str, reason: str, kind: str = ERR_VALUE) -> None:
        self.problems.append(Problem(self.file, self.index, fld, reason, kind))

    def string(self, d: dict, key: str, fld: str, *, required: bool = True, nonempty: bool = False,
               default: str = "") -> str | None:
        v = d.get(key)
        if v is None:
            if required:
                self.add(fld, "missing required field", ERR_MISSING)
                return None
            return default
        if not isinstance(v, str):
            self.add(fld, f"must be a string, got {type(v).__name__}", ERR_TYPE)
            return None
        if nonempty and not v.strip():
            self.add(fld, "must be a non-empty string")
            return None
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a JSON escape such as "\ud800"
            self.add(fld, f"not valid Unicode text (lone surrogate {v[e.start]!r} at character {e.start})",
                     ERR_ENCODING)
            return None
        return v

    def choice(self, d: dict, key: str, fld: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
        v = d.get(key)
        if v is None:
            if default is None:
                self.add(fld, f"missing required field (one of {', '.join(choices)})", ERR_MISSING)
            return default
        if not isinstance(v, str):
            self.add(fld, f"must be a string, got {type(v).__name__}", ERR_TYPE)
            return None
        if v not in choices:
            self.add(fld, f"{v!r} is not one of {', '.join(choices)}")
            return None
        return v

    def box(self, v: Any, fld: str) -> tuple[int, int, int, int] | None:
        reason = box_problem(v)
        if reason is not None:
            kind = ERR_TYPE if not isinstance(v, (list, tuple)) else ERR_BOX
            self.add(fld, reason, kind)
            return None
        return tuple(int(x) for x in v)  # type: ignore[return-value]

    def image(self, v: Any, fld: str, base_dir: Path | None, *, required: bool = True) -> ImageRef | None:
        if v is None:
            if required:
                self.add(fld, "missing required image", ERR_MISSING)
            return None
        try:
            ref = ImageRef.from_value(v, base_dir)
        except TypeError as e:
            self.add(fld, str(e), ERR_TYPE)
            return None
        except ValueError as e:
            self.add(fld, str(e))
            return None
        reason = outside_reason(ref.path, self.root) if ref.path is not None else None
        if reason:
            self.add(fld, reason, ERR_OUTSIDE)
            return None
        return ref

    def listof(self, d: dict, key: str, fld: str) -> list:
        v = d.get(key)
        if v is None:
            return []
        if isinstance(v, str):  # Parquet may carry nested fields as JSON strings
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                self.add(fld, f"string is not a JSON list ({e.msg})", ERR_TYPE)
                return []
        if not isinstance(v, (list, tuple)):
            self.add(fld, f"must be a list, got {type(v).__name__}", ERR_TYPE)
            return []
        return list(v)

    def unknown(self, d: dict, allowed: set[str], fld: str) -> None:
        for k, v in d.items():
            if k not in allowed and v is not None:
                self.add(f"{fld}{k}" if fld else k, f"unknown field (allowed: {', '.join(sorted(allowed))})",
                         ERR_UNKNOWN)


def outside_reason(path: Path, root: Path | None) -> str | None:
    """Why ``path`` may not be read from a dataset whose folder is ``root`` (None: any path may), or None.

    ``path`` is resolved (``..`` and symlinks followed): it must land inside ``root``."""
    if root is None:
        return None
    target = Path(os.path.realpath(path))
    if target.is_relative_to(os.path.realpath(root)):
        return None
    how = "is a symlink to" if os.path.islink(path) else "resolves to"
    return (f"path {str(path)!r} {how} {str(target)!r}, outside the dataset folder {str(root)!r} "
            "(set `allow_outside_paths: true` in the registry entry to allow it)")


def box_problem(v: Any) -> str | None:
    """Why ``v`` is not a valid box (int [x0, y0, x1, y1] in 0..1000, x0<x1, y0<y1), or None."""
    if not isinstance(v, (list, tuple)):
        return f"box must be a list [x0, y0, x1, y1], got {type(v).__name__}"
    if len(v) != 4:
        return f"box must have 4 integers [x0, y0, x1, y1], got {len(v)} values"
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return f"box values must be integers, got {list(v)!r}"
    x0, y0, x1, y1 = v
    if not all(0 <= x <= BOX_MAX for x in v):
        return f"box {list(v)} is outside 0..{BOX_MAX}"
    if not (x0 < x1 and y0 < y1):
        return f"box {list(v)} needs x0 < x1 and y0 < y1"
    return None


def _no_tags(ck: _Checker, text: str | None, fld: str) -> None:
    if text and any(t in text for t in TEXT_TAGS):
        ck.add(fld, "must not contain <box>/<region>/<verdict> tags (they delimit the serialized plan and "
                    "reflection text)")


def _parse_steps(ck: _Checker, raw: list, base_dir: Path | None) -> list[AnyStep]:
    steps: list[AnyStep] = []
    for i, s in enumerate(raw):
        f = f"steps[{i}]"
        if not isinstance(s, dict):
            ck.add(f, f"step must be an object, got {type(s).__name__}", ERR_TYPE)
            steps.append(None)  # type: ignore[arg-type]
            continue
        t = ck.choice(s, "type", f"{f}.type", STEP_TYPES)
        if t is None:
            steps.append(None)  # type: ignore[arg-type]
            continue
        ck.unknown(s, _STEP_KEYS[t], f"{f}.")
        n0 = len(ck.problems)
        if t == "plan":
            caption = ck.string(s, "caption", f"{f}.caption", required=False)
            _no_tags(ck, caption, f"{f}.caption")
            boxes = []
            for j, b in enumerate(ck.listof(s, "boxes", f"{f}.boxes")):
                bf = f"{f}.boxes[{j}]"
                if not isinstance(b, dict):
                    ck.add(bf, f"must be an object {{label, box}}, got {type(b).__name__}", ERR_TYPE)
                    continue
                ck.unknown(b, {"label", "box"}, f"{bf}.")
                label = ck.string(b, "label", f"{bf}.label", nonempty=True)
                box = None
                if b.get("box") is None:
                    ck.add(f"{bf}.box", "missing required field", ERR_MISSING)
                else:
                    box = ck.box(b["box"], f"{bf}.box")
                if label is not None and box is not None:
                    boxes.append(Box(label, box))
            if len(ck.problems) == n0:
                steps.append(PlanStep(caption or "", boxes))
        elif t in ("draft", "refine"):
            img = ck.image(s.get("image"), f"{f}.image", base_dir)
            if t == "draft":
                partial = s.get("partial", False)
                if partial is None:
                    partial = False
                if not isinstance(partial, bool):
                    ck.add(f"{f}.partial", f"must be true or false, got {partial!r}", ERR_TYPE)
                if len(ck.problems) == n0:
                    steps.append(DraftStep(img, partial))
            else:
                mode = ck.choice(s, "mode", f"{f}.mode", REFINE_MODES, default="regenerate")
                if len(ck.problems) == n0:
                    steps.append(RefineStep(img, mode))
        else:  # reflect
            verdict = ck.choice(s, "verdict", f"{f}.verdict", VERDICTS)
            critique = ck.string(s, "critique", f"{f}.critique", required=False)
            _no_tags(ck, critique, f"{f}.critique")
            regions = []
            for j, r in enumerate(ck.listof(s, "regions", f"{f}.regions")):
                rf = f"{f}.regions[{j}]"
                if not isinstance(r, dict):
                    ck.add(rf, f"must be an object {{box, label, kind}}, got {type(r).__name__}", ERR_TYPE)
                    continue
                ck.unknown(r, {"box", "label", "kind"}, f"{rf}.")
                if r.get("box") is None:
                    ck.add(f"{rf}.box", "missing required field", ERR_MISSING)
                    box = None
                else:
                    box = ck.box(r["box"], f"{rf}.box")
                label = ck.string(r, "label", f"{rf}.label", required=False)
                kind = ck.choice(r, "kind", f"{rf}.kind", REGION_KINDS)
                if box is not None and label is not None and kind is not None:
                    regions.append(Region(box, label, kind))
            mask = ck.image(s.get("mask"), f"{f}.mask", base_dir, required=False)
            if len(ck.problems) == n0:
                steps.append(ReflectStep(verdict, critique or "", regions, mask))
        if len(ck.problems) != n0:
            steps.append(None)  # type: ignore[arg-type]  # keep indices aligned for order checks
    return steps


def _check_order(ck: _Checker, steps: list[AnyStep | None]) -> None:
    last_image = None  # index of the latest draft/refine
    last_reflect = None  # index of the latest reflect
    image_after_reflect = False
    for i, s in enumerate(steps):
        if s is None:
            return  # the step itself is broken: order checks would only add noise
        if isinstance(s, ReflectStep):
            if last_image is None:
                ck.add(f"steps[{i}]", "reflect needs a draft or refine image before it", ERR_ORDER)
            last_reflect, image_after_reflect = i, False
        elif isinstance(s, RefineStep):
            if last_reflect is None or image_after_reflect:
                ck.add(f"steps[{i}]", "refine must follow a reflect (verdict 'revise') on the previous image",
                       ERR_ORDER)
            elif steps[last_reflect].verdict != "revise":
                ck.add(f"steps[{i}]", f"refine follows steps[{last_reflect}] whose verdict is 'ok' (needs 'revise')",
                       ERR_ORDER)
            elif s.mode == "inpaint" and not (steps[last_reflect].regions or steps[last_reflect].mask):
                ck.add(f"steps[{i}].mode", f"inpaint needs regions or a mask in steps[{last_reflect}]", ERR_ORDER)
            last_image, image_after_reflect = i, True
        elif isinstance(s, DraftStep):
            last_image, image_after_reflect = i, True


def step_to_dict(step: AnyStep, base_dir: str | os.PathLike | None = None, embed_images: bool = False) -> dict:
    """A step's JSONL form (the inverse of the schema's step parsing); images as paths relative to
    ``base_dir`` or embedded base64, as :meth:`ImageRef.to_json`."""

    def img(r: ImageRef | None):
        return None if r is None else r.to_json(base_dir, embed_images)

    if isinstance(step, PlanStep):
        return {"type": "plan", "caption": step.caption, "boxes": [{"label": b.label, "box": list(b.box)} for b in step.boxes]}
    if isinstance(step, DraftStep):
        return {"type": "draft", "image": img(step.image), "partial": step.partial}
    if isinstance(step, ReflectStep):
        return {"type": "reflect", "verdict": step.verdict, "critique": step.critique,
                "regions": [{"box": list(r.box), "label": r.label, "kind": r.kind} for r in step.regions],
                "mask": img(step.mask)}
    return {"type": "refine", "image": img(step.image), "mode": step.mode}


@dataclass
class StepRecord:
    """One validated record (see the module docstring). ``source``/``index`` locate it for messages."""

    id: str
    task: str
    prompt: str
    steps: list[AnyStep]
    input_image: ImageRef | None = None
    meta: dict = field(default_factory=dict)
    supervise: tuple[str, ...] | None = None
    rejected: ReflectStep | None = None  # a preference pair's dispreferred reflection (the last step is chosen)
    source: str = ""
    index: int | str = -1

    @property
    def supervised(self) -> frozenset[str]:
        """Step types that carry loss: ``supervise`` or every type present."""
        if self.supervise is not None:
            return frozenset(self.supervise)
        return frozenset(s.type for s in self.steps)

    def images(self) -> list[tuple[str, ImageRef]]:
        """Every image of the record as (field, ref), in record order."""
        out = []
        if self.input_image is not None:
            out.append(("input_image", self.input_image))
        for i, s in enumerate(self.steps):
            if isinstance(s, (DraftStep, RefineStep)):
                out.append((f"steps[{i}].image", s.image))
            elif isinstance(s, ReflectStep) and s.mask is not None:
                out.append((f"steps[{i}].mask", s.mask))
        if self.rejected is not None and self.rejected.mask is not None:
            out.append(("rejected.mask", self.rejected.mask))
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str | os.PathLike = "<memory>", index: int | str = 0,
                  base_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> StepRecord:
        """Validate and convert a raw record.

        Args:
            d: the raw record (a dict as decoded from JSON or a Parquet row).
            source: file the record comes from (messages; relative image paths resolve against its
                directory unless ``base_dir`` is given).
            index: record index within ``source`` (messages).
            base_dir: directory that relative image paths are relative to.
            root: the dataset folder: an image path that resolves outside it (``..``, absolute, a
                symlink) is a problem (kind ``outside_path``). None: any path is allowed.

        Raises:
            RecordError: ``source:index:field: reason``, with every problem in ``.problems``.
        """
        source = str(source)
        if base_dir is None and source and not source.startswith("<"):
            base_dir = Path(source).parent
        base = Path(base_dir) if base_dir is not None else None
        ck = _Checker(source, index, None if root is None else Path(root))
        if not isinstance(d, dict):
            raise RecordError(source, index, "<record>", f"record must be an object, got {type(d).__name__}", ERR_TYPE)
        ck.unknown(d, _RECORD_KEYS, "")
        rid = d.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if rid is None:
            ck.add("id", "missing required field", ERR_MISSING)
        elif not isinstance(rid, str) or not rid:
            ck.add("id", f"must be a non-empty string, got {rid!r}", ERR_TYPE)
        task = ck.choice(d, "task", "task", TASKS)
        prompt = ck.string(d, "prompt", "prompt", nonempty=True)
        input_image = ck.image(d.get("input_image"), "input_image", base, required=False)
        if task == "edit" and d.get("input_image") is None:
            ck.add("input_image", "task 'edit' needs an input_image", ERR_MISSING)
        if task == "t2i" and d.get("input_image") is not None:
            ck.add("input_image", "task 't2i' must not have an input_image (use task 'edit')", ERR_ORDER)
        meta = d.get("meta")
        if meta is None:
            meta = {}
        elif isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError as e:
                ck.add("meta", f"string is not JSON ({e.msg})", ERR_TYPE)
                meta = {}
        if not isinstance(meta, dict):
            ck.add("meta", f"must be an object, got {type(meta).__name__}", ERR_TYPE)
            meta = {}
        if d.get("steps") is None:
            ck.add("steps", "missing required field", ERR_MISSING)
            raw_steps = []
        else:
            raw_steps = ck.listof(d, "steps", "steps")
            if not raw_steps and not any(p.field == "steps" for p in ck.problems):
                ck.add("steps", "record has no steps (needs at least one)", ERR_VALUE)
        steps = _parse_steps(ck, raw_steps, base)
        _check_order(ck, steps)
        supervise = None
        if d.get("supervise") is not None:
            sup = ck.listof(d, "supervise", "supervise")
            present = {s.type for s in steps if s is not None}
            bad = [x for x in sup if x not in STEP_TYPES]
            if bad:
                ck.add("supervise", f"unknown step types {bad} (allowed: {', '.join(STEP_TYPES)})")
            elif not sup:
                ck.add("supervise", "must name at least one step type")
            else:
                missing = [x for x in sup if x not in present]
                if missing and all(s is not None for s in steps):
                    ck.add("supervise", f"names {missing} but the record has no such step")
                supervise = tuple(dict.fromkeys(sup))
        rejected = None
        if d.get("rejected") is not None:
            raw = d["rejected"]
            if isinstance(raw, dict) and raw.get("type", "reflect") != "reflect":
                ck.add("rejected.type", f"must be 'reflect', got {raw.get('type')!r}")
            else:
                n0 = len(ck.problems)
                parsed = _parse_steps(ck, [{"type": "reflect", **raw} if isinstance(raw, dict) else raw], base)
                ck.problems[n0:] = [replace(p, field=p.field.replace("steps[0]", "rejected", 1))
                                    for p in ck.problems[n0:]]
                rejected = parsed[0] if parsed and isinstance(parsed[0], ReflectStep) else None
                if steps and steps[-1] is not None and not isinstance(steps[-1], ReflectStep):
                    ck.add("rejected", "a preference pair needs a reflect as its last step (the chosen one)", ERR_ORDER)
        if ck.problems:
            raise RecordError.from_problems(ck.problems)
        return cls(id=rid, task=task, prompt=prompt, steps=steps, input_image=input_image, meta=meta,
                   supervise=supervise, rejected=rejected, source=source, index=index)

    def to_dict(self, base_dir: str | os.PathLike | None = None, embed_images: bool = False) -> dict:
        """The JSONL form (inverse of :meth:`from_dict`); images as paths relative to ``base_dir`` or
        embedded base64 (``embed_images`` or images held as bytes)."""

        def img(r: ImageRef | None):
            return None if r is None else r.to_json(base_dir, embed_images)

        steps = [step_to_dict(s, base_dir, embed_images) for s in self.steps]
        out = {"id": self.id, "task": self.task, "prompt": self.prompt, "input_image": img(self.input_image),
               "meta": self.meta, "steps": steps}
        if self.supervise is not None:
            out["supervise"] = list(self.supervise)
        if self.rejected is not None:
            out["rejected"] = step_to_dict(self.rejected, base_dir, embed_images)
        return out
