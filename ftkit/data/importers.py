"""Readers that turn public data layouts into :class:`~ftkit.data.schema.StepRecord`.

Every reader loads through Hugging Face ``datasets`` (``load_dataset("text" | "json" | "parquet" |
"webdataset", data_files=..., streaming=...)``) and keeps images encoded: rows are read as Arrow
(map-style) or with ``decode(False)`` (streaming), and every image becomes a lazy
:class:`~ftkit.data.schema.ImageRef`. Conversion happens per row, on access, and goes through
:meth:`StepRecord.from_dict`, so every format is validated by the same rules.

Formats (``fields`` remaps the column names on the left to your own):

``ftkit``
    ftkit's record (see :mod:`ftkit.data.schema`) as ``.jsonl`` (read line by line through the
    ``text`` builder so that one malformed line is reported as a bad record instead of aborting the
    load; a row index is the 0-based line number, blank lines are skipped) or ``.parquet`` (nested
    fields as structs or JSON strings). ``fields`` maps record keys (id, task, prompt, input_image,
    meta, steps, supervise) to column names.
``genref`` (ReflectionFlow's GenRef)
    A webdataset ``.tar`` (or a directory of them), or a directory of per-sample folders, each with
    ``prompt.txt``, ``bad_image.<ext>``, ``reflection.txt``, ``good_image.<ext>`` and optionally
    ``subset.txt``. Record: prompt, draft(bad image, context), reflect(revise, critique =
    reflection), refine(good image, regenerate), ``supervise: [reflect, refine]``,
    ``meta.subset``.
``got`` (GoT reasoning chains)
    ``.json`` (a list) or ``.jsonl`` with columns ``prompt``, ``chain`` and ``image`` (path relative
    to the file, or bytes), optional ``id``. The chain marks objects as
    ``<|obj_start|>NAME<|obj_end|><|box_start|>(x0,y0),(x1,y1)<|box_end|>`` with coordinates in
    [0, 1000). Record: plan(caption = chain with the tags removed and names kept, boxes), draft(image).
``bagel-t2i`` (BAGEL's T2I parquet)
    Columns ``image`` (encoded bytes) and ``captions`` (JSON object of captions). Record: prompt
    (the first caption in key order; all captions in ``meta.captions``) and draft(image).
``bagel-edit`` (BAGEL's edit parquet)
    Columns ``image_list`` (N encoded images) and ``instruction_list`` (N-1 lists of alternative
    instructions). One ``edit`` record per consecutive pair k: input image k, prompt = the first
    instruction of step k, draft = image k+1. Its index is ``ROW.k``.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftkit.data.schema import ERR_JSON, ERR_MISSING, ERR_TYPE, ERR_VALUE, RecordError, StepRecord

log = logging.getLogger("ftkit.data")

FORMATS = ("ftkit", "genref", "got", "bagel-t2i", "bagel-edit")

DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "ftkit": {k: k for k in ("id", "task", "prompt", "input_image", "meta", "steps", "supervise")},
    "genref": {"prompt": "prompt.txt", "bad_image": "bad_image", "reflection": "reflection.txt",
               "good_image": "good_image", "subset": "subset.txt"},
    "got": {"id": "id", "prompt": "prompt", "chain": "chain", "image": "image"},
    "bagel-t2i": {"image": "image", "captions": "captions"},
    "bagel-edit": {"images": "image_list", "instructions": "instruction_list"},
}
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")

_GOT_OBJ = re.compile(
    r"<\|obj_start\|>(?P<name>.*?)<\|obj_end\|>\s*"
    r"<\|box_start\|>\s*\(\s*(?P<x0>-?\d+)\s*,\s*(?P<y0>-?\d+)\s*\)\s*,\s*\(\s*(?P<x1>-?\d+)\s*,\s*(?P<y1>-?\d+)\s*\)\s*"
    r"<\|box_end\|>",
    re.S,
)
_GOT_TAG = re.compile(r"<\|(obj_start|obj_end|box_start|box_end)\|>")


def ftkit_records_file(folder: Path) -> Path | None:
    """``records.jsonl`` / ``records.parquet`` inside an ftkit dataset folder (what ``ftkit data shapes`` writes)."""
    for name in ("records.jsonl", "records.parquet"):
        if (folder / name).is_file():
            return folder / name
    return None


def guess_format(path: str | Path) -> str:
    """Format of a path with no registry entry: a folder holding ``records.jsonl`` / ``records.parquet``
    -> ftkit, ``.tar`` or a folder of samples -> genref, otherwise ftkit. Raises ``FileNotFoundError``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir() and ftkit_records_file(p) is not None:
        return "ftkit"
    if p.suffix == ".tar" or p.is_dir():
        return "genref"
    return "ftkit"


def _hf(builder: str, file: Path, streaming: bool):
    import datasets

    ds = datasets.load_dataset(builder, data_files=[str(file)], split="train", streaming=streaming)
    if not streaming:
        return ds.with_format("arrow")
    return ds.decode(False) if ds.features else ds  # unknown features (text, json): nothing to decode


class Source:
    """The rows of one file (or sample folder), converted to records on access.

    ``len(src)`` and ``src.row(i)`` exist for map-style (non-streaming) sources; iteration yields
    ``(index, raw_row)`` in file order for both. ``src.convert(index, raw)`` returns a StepRecord
    or raises :class:`RecordError` ``file:index:field: reason``.
    """

    format = "?"

    def __init__(self, file: str | Path, fields: dict[str, str] | None = None, streaming: bool = False):
        self.file = Path(file)
        self.streaming = streaming
        unknown = set(fields or {}) - set(DEFAULT_FIELDS[self.format])
        if unknown:
            raise ValueError(f"{file}: fields {sorted(unknown)} are not fields of format {self.format!r} "
                             f"(fields: {', '.join(DEFAULT_FIELDS[self.format])})")
        self.fields = {**DEFAULT_FIELDS[self.format], **(fields or {})}

    # map-style ------------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, i: int) -> tuple[int | str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int | str, Any]]:
        for i in range(len(self)):
            yield self.row(i)

    # conversion -----------------------------------------------------------------------------
    def convert(self, index: int | str, raw: Any) -> StepRecord:
        raise NotImplementedError

    def record(self, i: int) -> StepRecord:
        return self.convert(*self.row(i))

    def checked(self) -> Iterator[tuple[int | str, StepRecord | RecordError]]:
        """Every row as ``(index, record)`` or ``(index, RecordError)``, never stopping."""
        for index, raw in self:
            try:
                yield index, self.convert(index, raw)
            except RecordError as e:
                yield index, e

    def _err(self, index, field: str, reason: str, kind: str = ERR_VALUE) -> RecordError:
        return RecordError(str(self.file), index, field, reason, kind)

    def _col(self, raw: dict, key: str, index, required: bool = True):
        col = self.fields[key]
        if col not in raw or raw[col] is None:
            if required:
                cols = ", ".join(k for k in raw if not k.startswith("__"))
                raise self._err(index, col, f"missing required column (columns: {cols}); map it with `fields: "
                                f"{{{key}: YOUR_COLUMN}}`", ERR_MISSING)
            return None
        return raw[col]

    def _text(self, raw: dict, key: str, index, required: bool = True) -> str | None:
        v = self._col(raw, key, index, required)
        if v is None:
            return None
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if not isinstance(v, str):
            raise self._err(index, self.fields[key], f"must be text, got {type(v).__name__}", ERR_TYPE)
        return v.strip()


class _HFSource(Source):
    builder = "json"

    def __init__(self, file, fields=None, streaming=False):
        super().__init__(file, fields, streaming)
        self.ds = _hf(self.builder, self.file, streaming)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"{self.file}: a streaming source has no length")
        return self.ds.num_rows

    def row(self, i: int):
        if self.streaming:
            raise TypeError(f"{self.file}: a streaming source has no random access")
        return i, self.ds[i].to_pylist()[0]

    def __iter__(self):
        if self.streaming:
            yield from enumerate(self.ds)
            return
        i = 0
        for batch in self.ds.iter(batch_size=256):
            for r in batch.to_pylist():
                yield i, r
                i += 1


# ---------------------------------------------------------------------------------------------
# ftkit


class FtkitJsonlSource(_HFSource):
    """ftkit JSONL, one record per line (row index = 0-based line number; blank lines skipped)."""

    format = "ftkit"
    builder = "text"

    def __init__(self, file, fields=None, streaming=False):
        super().__init__(file, fields, streaming)
        if not streaming:
            col = self.ds.data.column("text")
            self._lines = [i for i, t in enumerate(col.to_pylist()) if t and t.strip()]

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"{self.file}: a streaming source has no length")
        return len(self._lines)

    def row(self, i: int):
        line = self._lines[i]
        return line, self.ds[line].to_pylist()[0]

    def __iter__(self):
        for i, r in super().__iter__():
            if r["text"] and r["text"].strip():
                yield i, r

    def convert(self, index, raw) -> StepRecord:
        try:
            d = json.loads(raw["text"])
        except json.JSONDecodeError as e:
            raise self._err(index, "<json>", f"line is not valid JSON ({e.msg} at column {e.colno})", ERR_JSON) from None
        return _ftkit_record(self, d, index)


class FtkitParquetSource(_HFSource):
    format = "ftkit"
    builder = "parquet"

    def convert(self, index, raw) -> StepRecord:
        return _ftkit_record(self, raw, index)


def _ftkit_record(src: Source, d: Any, index) -> StepRecord:
    if isinstance(d, dict) and any(k != v for k, v in src.fields.items()):
        d = dict(d)
        for key, col in src.fields.items():
            if key != col and col in d:
                d[key] = d.pop(col)
    return StepRecord.from_dict(d, source=src.file, index=index)


# ---------------------------------------------------------------------------------------------
# GenRef


def _find_image_key(raw: dict, stem: str) -> str | None:
    for ext in _IMAGE_EXTS:
        if raw.get(f"{stem}.{ext}") is not None:
            return f"{stem}.{ext}"
    return None


def _genref_record(src: Source, raw: dict, index, base_dir: Path | None) -> StepRecord:
    prompt = src._text(raw, "prompt", index)
    critique = src._text(raw, "reflection", index)
    subset = src._text(raw, "subset", index, required=False)
    images = {}
    for key in ("bad_image", "good_image"):
        k = _find_image_key(raw, src.fields[key])
        if k is None:
            raise src._err(index, src.fields[key], f"missing image ({src.fields[key]}.{{{','.join(_IMAGE_EXTS)}}})",
                           ERR_MISSING)
        images[key] = raw[k]
    key = raw.get("__key__") or str(index)
    d = {
        "id": f"genref-{key}", "task": "t2i", "prompt": prompt,
        "meta": {"subset": subset} if subset else {},
        "steps": [
            {"type": "draft", "image": images["bad_image"]},
            {"type": "reflect", "verdict": "revise", "critique": critique},
            {"type": "refine", "image": images["good_image"], "mode": "regenerate"},
        ],
        "supervise": ["reflect", "refine"],
    }
    return StepRecord.from_dict(d, source=src.file, index=index, base_dir=base_dir)


class GenRefTarSource(_HFSource):
    """A GenRef webdataset shard (``KEY.prompt.txt``, ``KEY.bad_image.jpg``, ...).

    ``datasets``' webdataset builder refuses a shard whose samples do not all have the same members;
    such a shard is then read with :mod:`tarfile` (samples grouped by key, in archive order) so that
    the incomplete samples are reported as bad records and the others are kept.
    """

    format = "genref"
    builder = "webdataset"

    def __init__(self, file, fields=None, streaming=False):
        try:
            super().__init__(file, fields, streaming)
            self._samples = None
        except ValueError as e:
            if "WebDataset" not in str(e):
                raise
            Source.__init__(self, file, fields, streaming)
            log.warning("%s: %s; reading it with tarfile instead", file, e)
            self._samples = _tar_samples(self.file)
            self.streaming = False

    def __len__(self) -> int:
        return super().__len__() if self._samples is None else len(self._samples)

    def row(self, i: int):
        if self._samples is None:
            return super().row(i)
        key, members = self._samples[i]
        raw: dict[str, Any] = {"__key__": key}
        with tarfile.open(self.file) as tf:
            for suffix, name in members.items():
                data = tf.extractfile(name).read()
                raw[suffix] = data.decode("utf-8", errors="replace") if suffix.endswith(".txt") else {"bytes": data}
        return i, raw

    def __iter__(self):
        if self._samples is None:
            yield from super().__iter__()
        else:
            for i in range(len(self._samples)):
                yield self.row(i)

    def convert(self, index, raw) -> StepRecord:
        return _genref_record(self, raw, index, None)


def _tar_samples(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Group a webdataset tar's members by key (the basename up to its first dot)."""
    groups: dict[str, dict[str, str]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            key, dot, suffix = base.partition(".")
            if dot:
                groups.setdefault(f"{d}/{key}" if d else key, {})[suffix] = m.name
    return list(groups.items())


class GenRefFolderSource(Source):
    """A folder of per-sample folders, each holding the GenRef files."""

    format = "genref"

    def __init__(self, folder, fields=None, streaming=False):
        super().__init__(folder, fields, streaming)
        self.samples = sorted(d for d in self.file.iterdir() if d.is_dir())
        if not self.samples:
            raise FileNotFoundError(f"{folder}: no sample folders (each with prompt.txt, bad_image.jpg, ...)")

    def __len__(self) -> int:
        return len(self.samples)

    def row(self, i: int):
        d = self.samples[i]
        raw: dict[str, Any] = {"__key__": d.name}
        for f in d.iterdir():
            if f.suffix.lstrip(".").lower() in _IMAGE_EXTS:
                raw[f.name] = f.name  # a path, relative to the sample folder (read lazily)
            elif f.suffix == ".txt":
                raw[f.name] = f.read_text(encoding="utf-8", errors="replace")
        return d.name, raw

    def convert(self, index, raw) -> StepRecord:
        return _genref_record(self, raw, index, self.file / str(index))


# ---------------------------------------------------------------------------------------------
# GoT


def parse_got_chain(chain: str) -> tuple[str, list[dict]]:
    """GoT chain -> (caption, boxes). The caption keeps object names and drops tags and
    coordinates; boxes are ``{"label", "box"}`` with GoT's [0, 1000) coordinates as ints.
    Raises ``ValueError`` for a stray tag (an object without a well-formed box)."""
    boxes = []

    def repl(m: re.Match) -> str:
        boxes.append({"label": m.group("name").strip(),
                      "box": [int(m.group(k)) for k in ("x0", "y0", "x1", "y1")]})
        return m.group("name")

    caption = _GOT_OBJ.sub(repl, chain)
    stray = _GOT_TAG.search(caption)
    if stray:
        ctx = caption[max(0, stray.start() - 30): stray.end() + 30]
        raise ValueError(f"malformed object/box tags near {ctx!r}")
    caption = re.sub(r"[ \t]+", " ", caption).strip()
    return caption, boxes


class GotSource(_HFSource):
    format = "got"
    builder = "json"

    def convert(self, index, raw) -> StepRecord:
        prompt = self._text(raw, "prompt", index)
        chain = self._text(raw, "chain", index)
        try:
            caption, boxes = parse_got_chain(chain)
        except ValueError as e:
            raise self._err(index, self.fields["chain"], str(e)) from None
        image = self._col(raw, "image", index)
        rid = raw.get(self.fields["id"])
        d = {"id": str(rid) if rid is not None else f"{self.file.stem}-{index}", "task": "t2i", "prompt": prompt,
             "steps": [{"type": "plan", "caption": caption, "boxes": boxes}, {"type": "draft", "image": image}]}
        rec = StepRecord.from_dict(d, source=self.file, index=index)
        return rec


# ---------------------------------------------------------------------------------------------
# BAGEL parquet


def _captions(v: Any) -> list[str]:
    if isinstance(v, (bytes, str)):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return [v.decode() if isinstance(v, bytes) else v]
    if isinstance(v, dict):
        def order(k):
            return (0, int(k), "") if str(k).isdigit() else (1, 0, str(k))
        return [str(v[k]) for k in sorted(v, key=order)]
    if isinstance(v, list):
        return [str(x) for x in v]
    raise TypeError(f"captions must be a JSON object, list or string, got {type(v).__name__}")


class BagelT2ISource(_HFSource):
    format = "bagel-t2i"
    builder = "parquet"

    def convert(self, index, raw) -> StepRecord:
        image = self._col(raw, "image", index)
        try:
            caps = [c.strip() for c in _captions(self._col(raw, "captions", index)) if c.strip()]
        except TypeError as e:
            raise self._err(index, self.fields["captions"], str(e), ERR_TYPE) from None
        if not caps:
            raise self._err(index, self.fields["captions"], "no non-empty caption")
        d = {"id": f"{self.file.stem}-{index}", "task": "t2i", "prompt": caps[0], "meta": {"captions": caps},
             "steps": [{"type": "draft", "image": image}]}
        return StepRecord.from_dict(d, source=self.file, index=index)


class BagelEditSource(_HFSource):
    format = "bagel-edit"
    builder = "parquet"

    def __init__(self, file, fields=None, streaming=False):
        super().__init__(file, fields, streaming)
        if not streaming:
            col = self.fields["instructions"]
            if col not in self.ds.column_names:
                raise ValueError(f"{file}: no column {col!r} (columns: {', '.join(self.ds.column_names)}); "
                                 f"map it with `fields: {{instructions: YOUR_COLUMN}}`")
            counts = self.ds.data.column(col).to_pylist()
            self._pairs = [(r, k) for r, ins in enumerate(counts) for k in range(max(1, len(ins or [])))]

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"{self.file}: a streaming source has no length")
        return len(self._pairs)

    def row(self, i: int):
        r, k = self._pairs[i]
        return f"{r}.{k}", self.ds[r].to_pylist()[0]

    def __iter__(self):
        for r, raw in super().__iter__():
            ins = raw.get(self.fields["instructions"]) or [None]
            for k in range(max(1, len(ins))):
                yield f"{r}.{k}", raw

    def convert(self, index, raw) -> StepRecord:
        k = int(str(index).split(".")[1])
        images = self._col(raw, "images", index)
        instructions = self._col(raw, "instructions", index)
        if not isinstance(images, list) or not isinstance(instructions, list):
            raise self._err(index, self.fields["images"], "image_list and instruction_list must be lists", ERR_TYPE)
        if len(images) != len(instructions) + 1:
            raise self._err(index, self.fields["images"], f"{len(images)} images for {len(instructions)} "
                            "instructions (needs one image more than instructions)")
        ins = instructions[k]
        text = ins[0] if isinstance(ins, list) and ins else ins
        if not isinstance(text, str) or not text.strip():
            raise self._err(index, f"{self.fields['instructions']}[{k}]", "needs a non-empty instruction")
        d = {"id": f"{self.file.stem}-{index}", "task": "edit", "prompt": text.strip(), "input_image": images[k],
             "meta": {"instructions": list(ins) if isinstance(ins, list) else [ins]},
             "steps": [{"type": "draft", "image": images[k + 1]}]}
        return StepRecord.from_dict(d, source=self.file, index=index)


# ---------------------------------------------------------------------------------------------


def open_sources(path: str | Path, format: str | None = None, fields: dict[str, str] | None = None,
                 streaming: bool = False) -> list[Source]:
    """The :class:`Source` objects for one path (a directory of GenRef shards gives several).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, or a file type the format does not read.
    """
    p = Path(path)
    fmt = format or guess_format(p)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    suffix = p.suffix.lower()
    if fmt == "ftkit":
        if p.is_dir() and ftkit_records_file(p) is not None:
            p = ftkit_records_file(p)
            suffix = p.suffix.lower()
        if suffix == ".jsonl":
            return [FtkitJsonlSource(p, fields, streaming)]
        if suffix == ".parquet":
            return [FtkitParquetSource(p, fields, streaming)]
        raise ValueError(f"{p}: ftkit records are .jsonl or .parquet files")
    if fmt == "genref":
        if p.is_dir():
            tars = sorted(p.glob("*.tar"))
            if tars:
                return [GenRefTarSource(t, fields, streaming) for t in tars]
            return [GenRefFolderSource(p, fields, streaming)]
        if suffix == ".tar":
            return [GenRefTarSource(p, fields, streaming)]
        raise ValueError(f"{p}: GenRef data is a webdataset .tar or a folder of sample folders")
    if fmt == "got":
        if suffix in (".json", ".jsonl"):
            return [GotSource(p, fields, streaming)]
        raise ValueError(f"{p}: GoT chains are .json or .jsonl files")
    if suffix != ".parquet":
        raise ValueError(f"{p}: format {fmt!r} reads .parquet files")
    return [BagelT2ISource(p, fields, streaming) if fmt == "bagel-t2i" else BagelEditSource(p, fields, streaming)]
