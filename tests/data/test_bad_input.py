"""Bad input, as an attacker or an unlucky user makes it: one bad record never takes down the rest.

The tests generate a corpus with every kind of breakage (JSONL, Parquet, a webdataset tar, a GenRef
folder, GoT chains): bytes that are not UTF-8, a PNG whose header claims 50000x50000, JSON nested
100,000 levels deep, duplicate ids, missing / corrupt images, paths that leave the dataset folder,
a UTF-8 BOM. Each bad record must be named with its location and field, no good record rejected,
and ``ftkit data validate`` and the training data module must agree.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ftkit.data.cli import main as data_main
from ftkit.data.dataset import InvalidDatasetError, load_records
from ftkit.data.validate import validate
from ftkit.errors import FtkitError

GOOD_PNG_SIZE = 32


def png(color="red", size=GOOD_PNG_SIZE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR then claims ``width`` x ``height`` (CRC fixed, so PIL trusts it)."""
    data = bytearray(png(size=1))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def b64(data: bytes) -> dict:
    return {"bytes_b64": base64.b64encode(data).decode()}


def rec(rid: str, image="ok.png", **kw) -> dict:
    r = {"id": rid, "task": "t2i", "prompt": f"a red circle ({rid})",
         "steps": [{"type": "plan", "caption": "a red circle", "boxes": [{"label": "red circle", "box": [100, 100, 500, 500]}]},
                   {"type": "draft", "image": image},
                   {"type": "reflect", "verdict": "revise", "critique": "too small"},
                   {"type": "refine", "image": "ok.png"}]}
    r.update(kw)
    return r


class Corpus:
    """Files, and for each file the expected bad records ``{location: (field, kind, text in reason)}``
    and the good locations."""

    def __init__(self, root: Path):
        self.root = root
        self.bad: dict[str, dict[str, tuple[str, str, str]]] = {}
        self.good: dict[str, list] = {}


def _jsonl(c: Corpus, outside: Path) -> Path:
    d = c.root / "jsonl"
    d.mkdir()
    (d / "ok.png").write_bytes(png())
    (d / "garbage.png").write_bytes(b"definitely not an image")
    (d / "bomb.png").write_bytes(bomb_png(50000, 50000))
    (d / "big.png").write_bytes(bomb_png(10000, 10000))  # 1e8 px: above PIL's limit, below its 2x error
    (d / "tiny.png").write_bytes(png(size=4))
    os.symlink(outside, d / "link.png")
    f = d / "records.jsonl"
    lines: list[bytes] = []
    bad, good = {}, []

    def add(line: bytes | dict, expect=None):
        lines.append(line if isinstance(line, bytes) else json.dumps(line).encode())
        loc = f"line {len(lines)}"
        if expect is None:
            good.append(loc)
        else:
            bad[loc] = expect

    lines_bom = json.dumps(rec("j-good-0")).encode()
    lines.append(b"\xef\xbb\xbf" + lines_bom)                             # BOM then a good record
    good.append("line 1")
    add(json.dumps(rec("j-latin1", prompt="caf\u00e9")).encode().replace(b"caf\\u00e9", b"caf\xe9"),
        ("<line>", "encoding", "not valid UTF-8 (byte 0xe9"))
    add(rec("j-bomb", image="bomb.png"), ("steps[1].image", "image_decode", "too large"))
    add(rec("j-bomb-b64", image=b64(bomb_png(50000, 50000))), ("steps[1].image", "image_decode", "too large"))
    add(rec("j-big", image="big.png"), ("steps[1].image", "image_decode", "10000x10000"))
    add(b'{"id": "j-deep", "task": "t2i", "prompt": "p", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        ("<json>", "json", "nested too deeply"))
    add(rec("j-good-1"))
    add(rec("j-good-0"), ("id", "duplicate_id", "first at"))             # second occurrence
    add(rec("j-missing", image="nowhere.png"), ("steps[1].image", "image_missing", "nowhere.png"))
    add(rec("j-garbage", image="garbage.png"), ("steps[1].image", "image_decode", "garbage.png"))
    add(rec("j-garbage-b64", image=b64(b"\x89PNG garbage")), ("steps[1].image", "image_decode", "cannot identify"))
    add(rec("j-tiny", image="tiny.png"), ("steps[1].image", "image_size", "4x4"))
    add(rec("j-dotdot", image=f"../{outside.name}"), ("steps[1].image", "outside_path", "outside the dataset folder"))
    add(rec("j-abs", image=str(outside)), ("steps[1].image", "outside_path", "outside the dataset folder"))
    add(rec("j-link", image="link.png"), ("steps[1].image", "outside_path", "is a symlink to"))
    add(b"{not json", ("<json>", "json", "not valid JSON"))
    add(b"[1, 2, 3]", ("<record>", "type", "record must be an object"))
    add(rec("j-types", prompt=42), ("prompt", "type", "must be a string"))
    add(json.dumps(rec("j-surrogate", prompt="x")).encode().replace(b'"x"', b'"\\ud800"'),
        ("prompt", "encoding", "lone surrogate"))
    add(b'{"id": "j-bigint", "n": ' + b"9" * 5000 + b"}", ("<json>", "json", "not readable JSON"))
    lines.append(b"")                                                     # blank lines are not records
    lines.append(b"   ")
    add(json.dumps(rec("j-good-2")).encode() + b"\r")                     # CRLF line ending
    add(rec("j-nested-ok", meta={"a": {"b": {"c": [1, [2, [3]]]}}}))
    f.write_bytes(b"\n".join(lines) + b"\n")
    c.bad[str(f)], c.good[str(f)] = bad, good
    return f


def _parquet(c: Corpus, outside: Path) -> Path:
    d = c.root / "parquet"
    d.mkdir()
    (d / "ok.png").write_bytes(png())
    rows = [
        (rec("p-good-0"), None),
        (rec("p-bomb", image=b64(bomb_png(50000, 50000))), ("steps[1].image", "image_decode", "too large")),
        (rec("p-garbage", image=b64(b"garbage")), ("steps[1].image", "image_decode", "cannot identify")),
        (rec("p-good-0"), ("id", "duplicate_id", "first at")),
        (rec("p-outside", image=str(outside)), ("steps[1].image", "outside_path", "outside the dataset folder")),
        ({**rec("p-deep"), "meta": "[" * 100_000 + "]" * 100_000}, ("<record>", "json", "nested too deeply")),
        ({**rec("p-noprompt"), "prompt": None}, ("prompt", "missing_field", "missing required field")),
        (rec("p-good-1"), None),
    ]
    table = pa.table({
        "id": [r["id"] for r, _ in rows], "task": [r["task"] for r, _ in rows], "prompt": [r["prompt"] for r, _ in rows],
        "steps": [json.dumps(r["steps"]) for r, _ in rows],
        "meta": [r["meta"] if isinstance(r.get("meta"), str) else None for r, _ in rows]})
    f = d / "records.parquet"
    pq.write_table(table, f)
    c.bad[str(f)] = {i: e for i, (_, e) in enumerate(rows) if e is not None}
    c.good[str(f)] = [i for i, (_, e) in enumerate(rows) if e is None]
    return f


GENREF_OK = {"prompt.txt": b"a cat on a red sofa", "reflection.txt": b"the sofa should be red", "subset.txt": b"general"}


def _tar(c: Corpus) -> Path:
    d = c.root / "tar"
    d.mkdir()
    f = d / "genref.tar"
    samples = {
        "c0ffee00": ({}, None),
        "c0ffee11": ({"prompt.txt": b"caf\xe9 au lait"}, ("prompt.txt", "encoding", "not valid UTF-8")),
        "c0ffee22": ({"reflection.txt": None}, ("reflection.txt", "missing_field", "missing required column")),
        "c0ffee33": ({"good_image.png": b"not a png"}, ("steps[2].image", "image_decode", "genref.tar:c0ffee33.good_image")),
        "c0ffee44": ({"bad_image.png": bomb_png(50000, 50000)}, ("steps[0].image", "image_decode", "too large")),
        "c0ffee55": ({"prompt.txt": "LINK"}, ("prompt.txt", "outside_path", "/etc/passwd")),
        "c0ffee66": ({"prompt.txt": b"\xef\xbb\xbfa prompt with a BOM"}, None),
    }
    with tarfile.open(f, "w") as tf:
        for key, (over, _) in samples.items():
            files = {**GENREF_OK, "bad_image.png": png("blue"), "good_image.png": png("red"), **over}
            for name, data in files.items():
                if data is None:
                    continue
                ti = tarfile.TarInfo(f"{key}.{name}")
                if data == "LINK":
                    ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                    tf.addfile(ti)
                    continue
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    c.bad[str(f)] = {k: e for k, (_, e) in samples.items() if e is not None}
    c.good[str(f)] = [k for k, (_, e) in samples.items() if e is None]
    return f


def _genref_folder(c: Corpus, outside: Path) -> Path:
    d = c.root / "genref"
    samples = {
        "s0": ({}, None),
        "s1": ({"prompt.txt": "LINK"}, ("prompt.txt", "outside_path", "is a symlink to")),
        "s2": ({"reflection.txt": b"\xff\xfe broken"}, ("reflection.txt", "encoding", "not valid UTF-8")),
        "s3": ({"good_image.png": b"garbage"}, ("steps[2].image", "image_decode", "good_image.png")),
        "s4": ({}, None),
        "s5": ({"prompt.txt": "FIFO"}, ("prompt.txt", "value", "not a regular file")),  # reading it would block
    }
    for key, (over, _) in samples.items():
        s = d / key
        s.mkdir(parents=True)
        for name, data in {**GENREF_OK, "bad_image.png": png("blue"), "good_image.png": png("red"), **over}.items():
            if data == "LINK":
                os.symlink(outside.with_suffix(".txt"), s / name)
            elif data == "FIFO":
                os.mkfifo(s / name)
            else:
                (s / name).write_bytes(data)
    c.bad[str(d)] = {k: e for k, (_, e) in samples.items() if e is not None}
    c.good[str(d)] = [k for k, (_, e) in samples.items() if e is None]
    return d


CHAIN = "A room. <|obj_start|>yellow vase<|obj_end|><|box_start|>(202,482),(729,964)<|box_end|> on a table."


def _got(c: Corpus) -> Path:
    d = c.root / "got"
    d.mkdir()
    (d / "ok.png").write_bytes(png())
    f = d / "got.jsonl"
    lines = [
        json.dumps({"id": "g1", "prompt": "a vase", "chain": CHAIN, "image": "ok.png"}).encode(),
        json.dumps({"id": "g2", "prompt": "a vase", "chain": "<|obj_start|>x<|obj_end|>", "image": "ok.png"}).encode(),
        b'{"id": "g3", "prompt": "caf\xe9", "chain": "c", "image": "ok.png"}',
        json.dumps({"id": "g1", "prompt": "again", "chain": CHAIN, "image": "ok.png"}).encode(),
        json.dumps({"id": "g4", "prompt": "a vase", "chain": CHAIN, "image": "missing.png"}).encode(),
        json.dumps({"id": "g5", "prompt": "a vase", "chain": CHAIN, "image": "ok.png"}).encode(),
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    c.bad[str(f)] = {"g2": ("chain", "value", "malformed"), "line 3": ("<line>", "encoding", "not valid UTF-8"),
                     "g4": ("steps[1].image", "image_missing", "missing.png")}
    # g1 is both a good record (first) and a bad one (second occurrence): checked by position below
    c.good[str(f)] = ["g5"]
    return f


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("bad-input")
    outside = root / "outside.png"  # a valid image, but not inside any dataset folder
    outside.write_bytes(png("green"))
    outside.with_suffix(".txt").write_text("a secret outside the dataset")
    c = Corpus(root)
    c.files = {"jsonl": _jsonl(c, outside), "parquet": _parquet(c, outside), "tar": _tar(c),
               "genref": _genref_folder(c, outside), "got": _got(c)}
    reg = root / "registry.yaml"
    reg.write_text("datasets:\n" + "".join(
        f"  bad-{k}: {{format: {'genref' if k in ('tar', 'genref') else 'got' if k == 'got' else 'ftkit'}, "
        f"path: {p}, skip_invalid: true}}\n" for k, p in c.files.items()))
    c.registry = reg
    return c


def _score(c: Corpus, reports) -> dict[str, int]:
    """bad records named / missed, good records rejected, over every file of the corpus."""
    named = missed = rejected = 0
    wrong: list[str] = []
    for report in reports:
        for file, expected in c.bad.items():
            if not any(file == f for f, _ in report.bad_records) and file not in report.name:
                continue
            found = {}
            for p in report.problems:
                if p.file == file or p.file.startswith(file + os.sep):
                    found.setdefault(p.index, []).append(p)
            for loc, (field, kind, text) in expected.items():
                hit = [p for p in found.get(loc, []) if p.field == field and p.kind == kind and text in p.reason]
                if hit:
                    named += 1
                else:
                    missed += 1
                    wrong.append(f"{file}:{loc}: expected {field} {kind} '{text}', got {[str(p) for p in found.get(loc, [])]}")
            for loc in c.good[file]:
                if loc in found:
                    rejected += 1
                    wrong.append(f"good record rejected: {[str(p) for p in found[loc]]}")
    return {"named": named, "missed": missed, "rejected": rejected, "wrong": wrong}


def test_every_bad_record_is_named_and_no_good_one_rejected(corpus, capsys):
    reports = [validate(f"bad-{k}", registry=str(corpus.registry)) for k in corpus.files]
    s = _score(corpus, reports)
    total_bad = sum(len(v) for v in corpus.bad.values())
    assert s["wrong"] == [], "\n".join(s["wrong"])
    assert s["named"] == total_bad and s["missed"] == 0 and s["rejected"] == 0
    # duplicate ids: the second occurrence, never the first
    got = next(r for r in reports if r.name == "bad-got")
    dup = [p for p in got.problems if p.kind == "duplicate_id"]
    assert len(dup) == 1 and dup[0].index == "g1" and "first at" in dup[0].reason
    assert got.good == 2 and got.total == 6
    jsonl = next(r for r in reports if r.name == "bad-jsonl")
    assert jsonl.good == len(corpus.good[str(corpus.files["jsonl"])])
    assert jsonl.outside_paths == 3 and "3 path(s) leave the dataset folder" in jsonl.summary()
    # messages are file:location:field: reason, never a repr of an in-memory buffer
    lines = [str(p) for r in reports for p in r.problems]
    assert f"{corpus.files['tar']}:c0ffee11:prompt.txt: not valid UTF-8 (byte 0xe9 at offset 3)" in lines
    assert not any("BytesIO" in m or "object at 0x" in m for m in lines)
    assert any(m.startswith(f"{corpus.files['jsonl']}:line 2:<line>: not valid UTF-8") for m in lines)
    with capsys.disabled():
        print(f"\nbad-input corpus: {total_bad} bad records, {s['named']} named, {s['missed']} missed, 0 crashes, "
              f"{s['rejected']} of {sum(len(v) for v in corpus.good.values())} good records rejected")


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    f = tmp_path / "shard.tar"
    with tarfile.open(f, "w") as tf:
        for key in ("k0", "k1", "k2"):
            for name, data in {**GENREF_OK, "bad_image.png": png("blue", 64), "good_image.png": png("red", 64)}.items():
                ti = tarfile.TarInfo(f"{key}.{name}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    data = f.read_bytes()
    cut = data.index(b"k2.good_image.png") + 512 + 100  # inside the last member's data
    f.write_bytes(data[:cut])
    report = validate(f)
    assert report.good == 2 and report.bad == 1 and report.total == 3
    (p,) = report.problems
    assert str(p).startswith(f"{f}:k2:good_image.png: tar member k2.good_image.png is truncated")


def test_unreadable_container_is_one_error_naming_the_file(tmp_path):
    for name, fmt in (("r.parquet", "ftkit"), ("t.parquet", "bagel-t2i"), ("g.tar", "genref")):
        f = tmp_path / name
        f.write_bytes(b"PAR1 this is not really a parquet file or a tar archive" * 20)
        with pytest.raises(FtkitError, match=str(f)) as ei:
            validate(f, format=fmt)
        assert "\n" not in str(ei.value)


def test_validate_cli_names_records_without_a_traceback(corpus, capsys):
    f = corpus.files["jsonl"]
    assert data_main(["validate", str(f)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "DatasetGenerationError" not in out.out + out.err
    assert f"{f}:line 6:<json>: JSON nested too deeply to parse" in out.out.splitlines()
    assert "3 path(s) leave the dataset folder" in out.out


def test_outside_paths_allowed_by_the_registry_entry(corpus, tmp_path):
    reg = tmp_path / "r.yaml"
    reg.write_text(f"datasets:\n  lax: {{path: {corpus.files['jsonl']}, allow_outside_paths: true}}\n")
    report = validate("lax", registry=str(reg))
    strict = validate(corpus.files["jsonl"])
    assert report.outside_paths == 0 and report.good == strict.good + 3  # the three outside images are valid


def test_genref_folder_never_reads_a_symlinked_prompt(corpus):
    ds = load_records("bad-genref", registry=str(corpus.registry), invalid_list_dir=corpus.root / "logs")
    assert [r.index for r in ds] == ["s0", "s4"]
    assert not any("secret" in r.prompt for r in ds)


def test_load_agrees_with_validate(corpus, tmp_path):
    for k in corpus.files:
        report = validate(f"bad-{k}", registry=str(corpus.registry))
        ds = load_records(f"bad-{k}", registry=str(corpus.registry), invalid_list_dir=tmp_path)
        assert len(ds) == report.good and ds.skipped == report.bad
        assert ds.invalid_list.read_text().splitlines() == [str(p) for p in report.problems]
        with pytest.raises(InvalidDatasetError) as ei:
            load_records(f"bad-{k}", registry=str(corpus.registry), skip_invalid=False)
        assert isinstance(ei.value, FtkitError) and f"{report.bad} of {report.total} records are invalid" in str(ei.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_changed_file_with_the_same_mtime_is_read_again(tmp_path, suffix):
    (tmp_path / "ok.png").write_bytes(png())
    f = tmp_path / f"r{suffix}"

    def write(ids):
        if suffix == ".jsonl":
            f.write_text("".join(json.dumps(rec(i)) + "\n" for i in ids))
        else:
            rs = [rec(i) for i in ids]
            pq.write_table(pa.table({"id": ids, "task": ["t2i"] * len(ids), "prompt": [r["prompt"] for r in rs],
                                     "steps": [json.dumps(r["steps"]) for r in rs]}), f)

    write(["first"])
    st = f.stat()
    assert [r.id for r in load_records(f)] == ["first"]
    write(["secnd", "third"])
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert [r.id for r in load_records(f)] == ["secnd", "third"]


# --------------------------------------------------------------------------- the training data module


def _dm(datasets, fixture_dir, **kw):
    from ftkit.train.datamodule import MCoTDataModule

    return MCoTDataModule(datasets, model_path=str(fixture_dir), cfg_dropout=None, **{"token_budget": 4096, **kw})


def test_datamodule_skips_what_validate_reports_into_the_run_folder(corpus, fixture_dir, tmp_path):
    names = [f"bad-{k}" for k in corpus.files]
    reports = [validate(n, registry=str(corpus.registry)) for n in names]
    run = tmp_path / "run"
    dm = _dm(names, fixture_dir, registry=str(corpus.registry), skipped_dir=str(run))
    dm.setup("fit")
    listed = (run / "skipped-records.txt").read_text().splitlines()
    assert listed == [str(p) for r in reports for p in r.problems]
    assert [row["records"] for row in dm.mixture] == [r.good for r in reports]
    assert [row["skipped"] for row in dm.mixture] == [r.bad for r in reports]
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_samples >= 1


def test_datamodule_refuses_before_step_0_in_one_message(corpus, fixture_dir):
    reg = corpus.root / "strict.yaml"
    reg.write_text(f"datasets:\n  strict-jsonl: {{path: {corpus.files['jsonl']}}}\n")
    dm = _dm(["strict-jsonl"], fixture_dir, registry=str(reg))
    with pytest.raises(InvalidDatasetError) as ei:
        dm.setup("fit")
    msg = str(ei.value)
    n_bad = len(corpus.bad[str(corpus.files["jsonl"])])
    assert msg.startswith(f"dataset 'strict-jsonl': {n_bad} of ") and f"... and {n_bad - 5} more problems" in msg
    assert f"{corpus.files['jsonl']}:line 2:<line>: not valid UTF-8" in msg


def test_a_record_that_can_never_fit_the_budget_is_bad_at_load(fixture_dir, tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    f = tmp_path / "r.jsonl"
    huge = "a red circle left of a blue square. " * 58_000  # ~2 MB
    f.write_text("".join(json.dumps(r) + "\n" for r in [rec("a"), rec("huge", prompt=huge), rec("b")]))
    assert validate(f).ok  # nothing wrong with the record itself ...
    dm = _dm([str(f)], fixture_dir, token_budget=2048, skip_invalid=True, skipped_dir=str(tmp_path / "run"))
    dm.setup("fit")  # ... but it can never be trained at this budget
    assert len(dm.records) == 2 and max(dm.lengths) <= 2048
    (line,) = (tmp_path / "run" / "skipped-records.txt").read_text().splitlines()
    assert line.startswith(f"{f}:line 2:<record>: packs to ") and "more than token_budget=2048" in line


def test_mixture_is_printed_with_records_weights_and_shares(fixture_dir, tmp_path, caplog):
    import logging

    (tmp_path / "ok.png").write_bytes(png())
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text("".join(json.dumps(rec(f"s{i}")) + "\n" for i in range(4)))
    big.write_text("".join(json.dumps(rec(f"b{i}")) + "\n" for i in range(60)))
    dm = _dm([str(small), str(big)], fixture_dir)
    with caplog.at_level(logging.INFO, logger="ftkit"):
        dm.setup("fit")
    rows = {Path(r["dataset"]).name: r for r in dm.mixture}
    assert rows["small.jsonl"]["records"] == 4 and rows["big.jsonl"]["records"] == 60
    assert rows["small.jsonl"]["samples"] + rows["big.jsonl"]["samples"] == 64
    assert 0.35 < rows["small.jsonl"]["share"] < 0.65  # equal weights: half the samples from 4 records
    assert "data mixture: 64 samples per epoch" in caplog.text
    assert "note: " in caplog.text and "small.jsonl: 4 records make" in caplog.text
    # weights proportional to record counts sample records evenly: no note
    dm = _dm([str(small), str(big)], fixture_dir, weights=[4, 60])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftkit"):
        dm.setup("fit")
    assert "note: " not in caplog.text
