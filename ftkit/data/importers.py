"""Readers that turn public data layouts into :class:`~ftkit.data.schema.StepRecord`.

Parquet is read through Hugging Face ``datasets`` (``load_dataset("parquet", data_files=...,
streaming=...)``, rows as Arrow or with ``decode(False)``). JSON lines are read here, line by line
as bytes, each line decoded on its own: one line that is not UTF-8, not JSON or nested too deeply is
one bad record (``file:line N:...``), never a failed load, and nothing is cached (a changed file is
read again). Webdataset tars are indexed with :mod:`tarfile` (member offsets) and read on access.
Images stay encoded: every image becomes a lazy :class:`~ftkit.data.schema.ImageRef`. Conversion
happens per row, on access, and goes through :meth:`StepRecord.from_dict`, so every format is
validated by the same rules.

Locations (the ``index`` of a record in messages): ``line N`` (1-based) in JSON lines, the sample's
key in tars (``__key__``) and GenRef folders (folder name), the ``id`` of a GoT chain (``line N`` /
``item N`` without one), the 0-based row number in Parquet (``ROW.k`` for bagel-edit pairs).

Paths: an image path or GenRef file that resolves outside the dataset folder (``..``, absolute, a
symlink) is a bad record (kind ``outside_path``) unless the source is opened with
``allow_outside=True`` (registry ``allow_outside_paths: true``). Links inside tars are never read.

Formats (``fields`` remaps the column names on the left to your own):

``ftkit``
    ftkit's record (see :mod:`ftkit.data.schema`) as ``.jsonl`` (blank lines skipped, a UTF-8 BOM
    accepted) or ``.parquet`` (nested fields as structs or JSON strings). ``fields`` maps record keys (id, task, prompt, input_image,
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

import codecs
import json
import logging
import os
import re
import tarfile
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftkit.data.schema import (
    ERR_ENCODING,
    ERR_JSON,
    ERR_MISSING,
    ERR_OUTSIDE,
    ERR_TYPE,
    ERR_VALUE,
    Problem,
    RecordError,
    StepRecord,
    outside_reason,
)
from ftkit.errors import FtkitError

log = logging.getLogger("ftkit.data")

FORMATS = ("ftkit", "genref", "got", "bagel-t2i", "bagel-edit")


class UnreadableFileError(FtkitError, ValueError):
    """A data file as a whole cannot be read (not Parquet, not a tar, ...): names the file."""

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
    """``datasets.load_dataset`` of one file. Its cache is keyed by the file's mtime only, so a file
    rewritten with the same mtime would be served stale: the split is named after a fingerprint of
    (size, mtime, ctime, inode) -- ctime changes on every write and cannot be set back -- which
    is part of the cache key."""
    import hashlib

    import datasets

    st = file.stat()
    fp = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}".encode()).hexdigest()[:16]
    split = f"f{fp}"
    try:
        ds = datasets.load_dataset(builder, data_files={split: [str(file)]}, split=split, streaming=streaming)
    except Exception as e:  # datasets wraps reader errors in DatasetGenerationError: name the file, once
        cause = e.__cause__ or e
        why = " ".join(str(cause).split())
        raise UnreadableFileError(f"{file}: cannot be read as {builder} ({type(cause).__name__}: {why})") from None
    if not streaming:
        return ds.with_format("arrow")
    return ds.decode(False) if ds.features else ds  # unknown features: nothing to decode


class Source:
    """The rows of one file (or sample folder), converted to records on access.

    ``len(src)`` and ``src.row(i)`` exist for map-style (non-streaming) sources; iteration yields
    ``(index, raw_row)`` in file order for both. ``src.convert(index, raw)`` returns a StepRecord
    or raises :class:`RecordError` ``file:index:field: reason``. ``root`` is the dataset folder that
    paths must stay inside (None: any path).
    """

    format = "?"

    def __init__(self, file: str | Path, fields: dict[str, str] | None = None, streaming: bool = False,
                 root: str | Path | None = None):
        self.file = Path(file)
        self.streaming = streaming
        self.root = None if root is None else Path(root)
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
        """Every row as ``(index, record)`` or ``(index, RecordError)``, in row order, never stopping.
        The index is the record's own location (a GoT chain's id once it is read)."""
        for index, raw in self:
            try:
                rec = self.convert(index, raw)
                yield rec.index, rec
            except RecordError as e:
                yield e.index, e
            except RecursionError:  # a structure nested deeper than Python's stack
                yield index, self._err(index, "<record>", "nested too deeply to read", ERR_JSON)

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

    def _decode(self, data: bytes, index, fld: str) -> str:
        """UTF-8 (a leading BOM dropped), or a RecordError naming the first bad byte."""
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise self._err(index, fld, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                            ERR_ENCODING) from None

    def _json(self, data: bytes, index) -> Any:
        """One JSON document from the bytes of one line."""
        text = self._decode(data, index, "<line>")
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise self._err(index, "<json>", f"not valid JSON ({e.msg} at column {e.colno})", ERR_JSON) from None
        except RecursionError:
            raise self._err(index, "<json>", "JSON nested too deeply to parse", ERR_JSON) from None
        except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
            raise self._err(index, "<json>", f"not readable JSON ({e})", ERR_JSON) from None

    def _text(self, raw: dict, key: str, index, required: bool = True) -> str | None:
        v = self._col(raw, key, index, required)
        if v is None:
            return None
        if isinstance(v, (bytes, bytearray)):
            v = self._decode(bytes(v), index, self.fields[key])
        if not isinstance(v, str):
            raise self._err(index, self.fields[key], f"must be text, got {type(v).__name__}", ERR_TYPE)
        return v.strip()


class _HFSource(Source):
    builder = "parquet"

    def __init__(self, file, fields=None, streaming=False, root=None):
        super().__init__(file, fields, streaming, root)
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


def _lines(file: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(line number (1-based), byte offset, bytes)`` of every non-blank line; a UTF-8 BOM at the
    start of the file is not part of line 1. Lines are bytes: decoding is per line."""
    offset = 0
    with open(file, "rb") as fh:
        for n, line in enumerate(fh, 1):
            start = offset
            offset += len(line)
            if n == 1 and line.startswith(codecs.BOM_UTF8):
                line, start = line[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            if line.strip():
                yield n, start, line.rstrip(b"\r\n")


def json_objects(file: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSON-lines file (a UTF-8 BOM is accepted).

    Raises:
        ValueError: ``file:N: ...`` for a line that is not UTF-8, not JSON or not a JSON object.
    """
    for n, _, data in _lines(Path(file)):
        try:
            obj = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{file}:{n}: not a JSON object")
        yield n, obj


class _JsonLinesSource(Source):
    """One JSON document per line (``index``: ``line N``). Map-style keeps only each line's number,
    offset and length, and reads a line on access."""

    def __init__(self, file, fields=None, streaming=False, root=None):
        super().__init__(file, fields, streaming, root)
        self._no, self._off, self._len = array("q"), array("q"), array("q")
        if not streaming:
            for n, off, data in _lines(self.file):
                self._no.append(n)
                self._off.append(off)
                self._len.append(len(data))

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"{self.file}: a streaming source has no length")
        return len(self._no)

    def row(self, i: int):
        if self.streaming:
            raise TypeError(f"{self.file}: a streaming source has no random access")
        with open(self.file, "rb") as fh:
            fh.seek(self._off[i])
            return f"line {self._no[i]}", fh.read(self._len[i])

    def __iter__(self):
        for n, _, data in _lines(self.file):
            yield f"line {n}", data


class FtkitJsonlSource(_JsonLinesSource):
    """ftkit JSONL, one record per line."""

    format = "ftkit"

    def convert(self, index, raw) -> StepRecord:
        return _ftkit_record(self, self._json(raw, index), index)


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
    return StepRecord.from_dict(d, source=src.file, index=index, root=src.root)


# ---------------------------------------------------------------------------------------------
# GenRef


def _find_image_key(raw: dict, stem: str) -> str | None:
    for ext in _IMAGE_EXTS:
        if raw.get(f"{stem}.{ext}") is not None:
            return f"{stem}.{ext}"
    return None


def _genref_record(src: Source, raw: dict, index, base_dir: Path | None) -> StepRecord:
    refused = raw.get("__refused__") or {}
    if refused:  # members / files that may not be read (links, paths outside the dataset folder)
        raise RecordError.from_problems([Problem(str(src.file), index, name, why, kind)
                                         for name, (why, kind) in refused.items()])
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
    d = {
        "id": f"genref-{raw.get('__key__') or index}", "task": "t2i", "prompt": prompt,
        "meta": {"subset": subset} if subset else {},
        "steps": [
            {"type": "draft", "image": images["bad_image"]},
            {"type": "reflect", "verdict": "revise", "critique": critique},
            {"type": "refine", "image": images["good_image"], "mode": "regenerate"},
        ],
        "supervise": ["reflect", "refine"],
    }
    return StepRecord.from_dict(d, source=src.file, index=index, base_dir=base_dir, root=src.root)


class GenRefTarSource(Source):
    """A GenRef webdataset shard (``KEY.prompt.txt``, ``KEY.bad_image.jpg``, ...); ``index`` is the key.

    The tar is indexed once with :mod:`tarfile` (each member's data offset and size, samples grouped
    by key in archive order) and members are read on access. Samples with missing members are bad
    records, the others are kept. Links (symbolic or hard) are never followed: a sample with one is
    a bad record.
    """

    format = "genref"

    def __init__(self, file, fields=None, streaming=False, root=None):
        super().__init__(file, fields, streaming, root)
        self._samples = _tar_samples(self.file)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"{self.file}: a streaming source has no length")
        return len(self._samples)

    def row(self, i: int):
        key, members = self._samples[i]
        raw: dict[str, Any] = {"__key__": key}
        with open(self.file, "rb") as fh:
            for suffix, (name, offset, size, link) in members.items():
                if link is not None:
                    why = (f"tar member {name} is a link to {link!r} (not read)", ERR_OUTSIDE)
                    if link.startswith("<"):
                        why = (f"tar member {name}: {link[1:-1]}", ERR_VALUE)
                    raw.setdefault("__refused__", {})[suffix] = why
                    continue
                fh.seek(offset)
                data = fh.read(size)
                if len(data) < size:
                    raw.setdefault("__refused__", {})[suffix] = (f"tar member {name} is truncated ({len(data)} of "
                                                                 f"{size} bytes)", ERR_VALUE)
                    continue
                raw[suffix] = data if suffix.endswith(".txt") else {"bytes": data, "path": f"{self.file.name}:{name}"}
        return key, raw

    def __iter__(self):
        for i in range(len(self._samples)):
            yield self.row(i)

    def convert(self, index, raw) -> StepRecord:
        return _genref_record(self, raw, index, None)


def _tar_samples(path: Path) -> list[tuple[str, dict[str, tuple[str, int, int, str | None]]]]:
    """Group a webdataset tar's members by key (the path up to the first dot of the basename):
    ``[(key, {suffix: (member name, data offset, size, link target or None)})]`` in archive order."""
    groups: dict[str, dict[str, tuple[str, int, int, str | None]]] = {}
    try:
        tf = tarfile.open(path, "r:")  # uncompressed: members are read at their data offsets
    except (tarfile.TarError, OSError) as e:
        raise UnreadableFileError(f"{path}: cannot be read as an uncompressed tar archive ({' '.join(str(e).split())})"
                                  ) from None
    with tf:
        try:
            for m in tf:
                if m.isdir():
                    continue
                d, _, base = m.name.rpartition("/")
                key, dot, suffix = base.partition(".")
                if not dot:
                    continue
                link = m.linkname if (m.issym() or m.islnk()) else ("<not a regular file>" if not m.isfile() else None)
                groups.setdefault(f"{d}/{key}" if d else key, {})[suffix] = (m.name, m.offset_data, m.size, link)
        except tarfile.TarError as e:  # truncated or corrupt after some members: keep those, name the rest
            last = [v for g in groups.values() for v in g.values()][-1:]
            if not (last and last[0][1] + last[0][2] > path.stat().st_size):  # else: that member is reported
                groups["<rest of archive>"] = {"<tar>": ("<rest of archive>", 0, 0, f"<cannot be read: {e}>")}
    return list(groups.items())


class GenRefFolderSource(Source):
    """A folder of per-sample folders, each holding the GenRef files; ``index`` is the folder name."""

    format = "genref"

    def __init__(self, folder, fields=None, streaming=False, root=None):
        super().__init__(folder, fields, streaming, root)
        self.samples = sorted(d for d in self.file.iterdir() if d.is_dir())
        if not self.samples:
            raise FileNotFoundError(f"{folder}: no sample folders (each with prompt.txt, bad_image.jpg, ...)")

    def __len__(self) -> int:
        return len(self.samples)

    def row(self, i: int):
        d = self.samples[i]
        raw: dict[str, Any] = {"__key__": d.name}
        for f in sorted(d.iterdir()):
            ext = f.suffix.lstrip(".").lower()
            if ext not in _IMAGE_EXTS and f.suffix != ".txt":
                continue
            why = outside_reason(f, self.root)
            if why:
                raw.setdefault("__refused__", {})[f.name] = (why, ERR_OUTSIDE)
            elif not f.is_file():  # never open a FIFO or device named like a sample file
                raw.setdefault("__refused__", {})[f.name] = ("not a regular file (not read)", ERR_VALUE)
            elif ext in _IMAGE_EXTS:
                raw[f.name] = f.name  # a path, relative to the sample folder (read lazily)
            else:
                raw[f.name] = f.read_bytes()
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


class GotSource(_JsonLinesSource):
    """GoT chains: ``.jsonl`` (one per line) or ``.json`` (a list, parsed whole). ``index``: the
    chain's ``id``, else ``line N`` / ``item N`` (0-based position in the list)."""

    format = "got"

    def __init__(self, file, fields=None, streaming=False, root=None):
        self._items = None
        if Path(file).suffix.lower() == ".json":
            Source.__init__(self, file, fields, streaming, root)
            self._items = self._read_list()
            self.streaming = False
        else:
            super().__init__(file, fields, streaming, root)

    def _read_list(self) -> list[tuple[str, Any]]:
        data = self.file.read_bytes()
        try:
            doc = json.loads(self._decode(data, "<file>", "<file>"))
        except RecordError as e:
            return [("<file>", e)]
        except json.JSONDecodeError as e:
            return [("<file>", self._err("<file>", "<json>", f"not valid JSON ({e.msg} at line {e.lineno} column "
                                         f"{e.colno})", ERR_JSON))]
        except RecursionError:
            return [("<file>", self._err("<file>", "<json>", "JSON nested too deeply to parse", ERR_JSON))]
        if not isinstance(doc, list):
            return [("<file>", self._err("<file>", "<json>", f"a GoT .json file holds a list of chains, got "
                                         f"{type(doc).__name__}", ERR_TYPE))]
        return [(f"item {k}", x) for k, x in enumerate(doc)]

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else super().__len__()

    def row(self, i: int):
        return self._items[i] if self._items is not None else super().row(i)

    def __iter__(self):
        if self._items is not None:
            yield from self._items
        else:
            yield from super().__iter__()

    def convert(self, index, raw) -> StepRecord:
        if isinstance(raw, RecordError):
            raise raw
        if isinstance(raw, bytes):
            raw = self._json(raw, index)
        if not isinstance(raw, dict):
            raise self._err(index, "<record>", f"a GoT chain is an object, got {type(raw).__name__}", ERR_TYPE)
        rid = raw.get(self.fields["id"])
        if rid is not None and str(rid).strip():
            index = str(rid)
        prompt = self._text(raw, "prompt", index)
        chain = self._text(raw, "chain", index)
        try:
            caption, boxes = parse_got_chain(chain)
        except ValueError as e:
            raise self._err(index, self.fields["chain"], str(e)) from None
        image = self._col(raw, "image", index)
        d = {"id": str(rid) if rid is not None else f"{self.file.stem}-{index.replace(' ', '')}", "task": "t2i",
             "prompt": prompt,
             "steps": [{"type": "plan", "caption": caption, "boxes": boxes}, {"type": "draft", "image": image}]}
        return StepRecord.from_dict(d, source=self.file, index=index, root=self.root)


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
        return StepRecord.from_dict(d, source=self.file, index=index, root=self.root)


class BagelEditSource(_HFSource):
    format = "bagel-edit"
    builder = "parquet"

    def __init__(self, file, fields=None, streaming=False, root=None):
        super().__init__(file, fields, streaming, root)
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
        return StepRecord.from_dict(d, source=self.file, index=index, root=self.root)


# ---------------------------------------------------------------------------------------------


def open_sources(path: str | Path, format: str | None = None, fields: dict[str, str] | None = None,
                 streaming: bool = False, allow_outside: bool = False) -> list[Source]:
    """The :class:`Source` objects for one path (a directory of GenRef shards gives several).

    Paths inside records must stay in the dataset folder (the file's folder; a GenRef sample
    folders' parent) unless ``allow_outside``.

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
    if fmt == "ftkit" and p.is_dir() and ftkit_records_file(p) is not None:
        p = ftkit_records_file(p)
        suffix = p.suffix.lower()
    root = None if allow_outside else Path(os.path.realpath(p if p.is_dir() else p.parent))
    kw = {"fields": fields, "streaming": streaming, "root": root}
    if fmt == "ftkit":
        if suffix == ".jsonl":
            return [FtkitJsonlSource(p, **kw)]
        if suffix == ".parquet":
            return [FtkitParquetSource(p, **kw)]
        raise ValueError(f"{p}: ftkit records are .jsonl or .parquet files")
    if fmt == "genref":
        if p.is_dir():
            tars = sorted(p.glob("*.tar"))
            if tars:
                return [GenRefTarSource(t, **kw) for t in tars]
            return [GenRefFolderSource(p, **kw)]
        if suffix == ".tar":
            return [GenRefTarSource(p, **kw)]
        raise ValueError(f"{p}: GenRef data is a webdataset .tar or a folder of sample folders")
    if fmt == "got":
        if suffix in (".json", ".jsonl"):
            return [GotSource(p, **kw)]
        raise ValueError(f"{p}: GoT chains are .json or .jsonl files")
    if suffix != ".parquet":
        raise ValueError(f"{p}: format {fmt!r} reads .parquet files")
    return [BagelT2ISource(p, **kw) if fmt == "bagel-t2i" else BagelEditSource(p, **kw)]
