"""Importers (ftkit / GenRef / GoT / BAGEL), registry and dataset loading, on small samples built here."""

from __future__ import annotations

import base64
import io
import json
import logging
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ftkit.data.dataset import InvalidDatasetError, MixtureDataset, load_mixture, load_records
from ftkit.data.importers import open_sources, parse_got_chain
from ftkit.data.registry import Registry, RegistryError, UnknownDatasetError
from ftkit.data.schema import DraftStep, PlanStep, RecordError, RefineStep, ReflectStep


def img_bytes(color, size=32, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def t2i(i, image="d.png"):
    return {"id": f"r{i}", "task": "t2i", "prompt": f"prompt {i}",
            "steps": [{"type": "plan", "caption": "c", "boxes": [{"label": "circle", "box": [0, 0, 500, 500]}]},
                      {"type": "draft", "image": image}]}


# --------------------------------------------------------------------------- ftkit


def test_ftkit_jsonl_paths_and_embedded_bytes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "d.png").write_bytes(img_bytes("red"))
    embedded = {"bytes_b64": base64.b64encode(img_bytes("blue")).decode()}
    f = write_jsonl(tmp_path / "recs.jsonl", [t2i(0, "img/d.png"), t2i(1, embedded)])
    ds = load_records(f)
    assert len(ds) == 2
    assert ds[0].steps[1].image.open().getpixel((0, 0)) == (255, 0, 0)
    assert ds[1].steps[1].image.open().getpixel((0, 0)) == (0, 0, 255)
    assert ds[1].id == "r1" and ds.locate(1) == (str(f), "line 2")


def test_ftkit_jsonl_streaming_matches_map_style(tmp_path):
    (tmp_path / "d.png").write_bytes(img_bytes("red"))
    f = write_jsonl(tmp_path / "recs.jsonl", [t2i(i) for i in range(5)])
    streamed = list(load_records(f, streaming=True))
    mapped = load_records(f)
    assert [r.id for r in streamed] == [mapped[i].id for i in range(5)] == [f"r{i}" for i in range(5)]


def test_ftkit_parquet_structs_and_json_strings(tmp_path):
    steps = [{"type": "plan", "caption": "c", "boxes": [{"label": "sq", "box": [10, 10, 20, 20]}], "image": None},
             {"type": "draft", "caption": None, "boxes": None, "image": {"bytes": img_bytes("green"), "path": None}}]
    table = pa.table({"id": ["a", "b"], "task": ["t2i", "t2i"], "prompt": ["p", "q"],
                      "steps": [steps, steps], "meta": [json.dumps({"tag": "x"}), None]})
    pq.write_table(table, tmp_path / "recs.parquet")
    ds = load_records(tmp_path / "recs.parquet")
    assert len(ds) == 2 and ds[0].meta == {"tag": "x"}
    assert ds[1].steps[1].image.open().getpixel((3, 3)) == (0, 128, 0)
    # steps as a JSON string column
    steps_json = [{"type": "draft", "image": {"bytes_b64": base64.b64encode(img_bytes("red")).decode()}}]
    pq.write_table(pa.table({"id": ["c"], "task": ["t2i"], "prompt": ["p"], "steps": [json.dumps(steps_json)]}),
                   tmp_path / "j.parquet")
    assert load_records(tmp_path / "j.parquet")[0].steps[0].image.open().getpixel((0, 0)) == (255, 0, 0)


def test_field_mapping_from_registry(tmp_path):
    (tmp_path / "d.png").write_bytes(img_bytes("red"))
    rec = t2i(0)
    rec["caption"] = rec.pop("prompt")
    write_jsonl(tmp_path / "mine.jsonl", [rec])
    reg = tmp_path / "reg.yaml"
    reg.write_text("datasets:\n  mine:\n    format: ftkit\n    path: mine.jsonl\n    fields: {prompt: caption}\n")
    assert load_records("mine", registry=str(reg))[0].prompt == "prompt 0"


# --------------------------------------------------------------------------- GenRef


GENREF = {"prompt.txt": b"a cat on a red sofa\n", "reflection.txt": b"the sofa should be red, not blue",
          "subset.txt": b"general"}


def test_genref_folder(tmp_path):
    for k, bad, good in [("s0", "blue", "red"), ("s1", "black", "white")]:
        d = tmp_path / "genref" / k
        d.mkdir(parents=True)
        for name, data in GENREF.items():
            (d / name).write_bytes(data)
        (d / "bad_image.jpg").write_bytes(img_bytes(bad, fmt="JPEG"))
        (d / "good_image.jpg").write_bytes(img_bytes(good, fmt="JPEG"))
    ds = load_records(tmp_path / "genref")
    assert len(ds) == 2
    r = ds[0]
    assert r.prompt == "a cat on a red sofa" and r.meta == {"subset": "general"}
    assert [type(s) for s in r.steps] == [DraftStep, ReflectStep, RefineStep]
    assert r.steps[1].verdict == "revise" and r.steps[1].critique == "the sofa should be red, not blue"
    assert r.supervised == {"reflect", "refine"}  # the flawed image is context only
    assert r.steps[0].image.open().getpixel((5, 5))[2] > 200  # blue bad image
    assert r.steps[2].image.open().getpixel((5, 5))[0] > 200  # red good image


def _genref_tar(path, n, broken=None):
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            files = dict(GENREF)
            files["bad_image.jpg"] = img_bytes("blue", fmt="JPEG")
            files["good_image.jpg"] = img_bytes("red", fmt="JPEG")
            if i == broken:
                del files["reflection.txt"]
            for name, data in files.items():
                ti = tarfile.TarInfo(f"sample{i:03d}.{name}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_genref_webdataset_tar(tmp_path, streaming):
    tar = _genref_tar(tmp_path / "shard-000.tar", 3)
    recs = list(load_records(tar, streaming=streaming)) if streaming else load_records(tar)[:]
    assert [r.id for r in recs] == ["genref-sample000", "genref-sample001", "genref-sample002"]
    assert all(isinstance(r.steps[2], RefineStep) for r in recs)
    assert recs[1].steps[2].image.open().size == (32, 32)


def test_genref_tar_missing_member_is_a_record_error(tmp_path):
    tar = _genref_tar(tmp_path / "shard.tar", 3, broken=1)
    (src,) = open_sources(tar, "genref")
    out = list(src.checked())
    assert isinstance(out[1][1], RecordError) and "reflection.txt" in str(out[1][1])
    assert not isinstance(out[0][1], RecordError) and not isinstance(out[2][1], RecordError)


# --------------------------------------------------------------------------- GoT

CHAIN = ("A cozy room. <|obj_start|>yellow vase<|obj_end|><|box_start|>(202,482),(729,964)<|box_end|> stands on "
         "<|obj_start|>a table<|obj_end|> <|box_start|>(0,600),(999,999)<|box_end|>.")


def test_parse_got_chain():
    caption, boxes = parse_got_chain(CHAIN)
    assert caption == "A cozy room. yellow vase stands on a table."
    assert boxes == [{"label": "yellow vase", "box": [202, 482, 729, 964]}, {"label": "a table", "box": [0, 600, 999, 999]}]
    with pytest.raises(ValueError, match="malformed"):
        parse_got_chain("a <|obj_start|>cat<|obj_end|><|box_start|>(1,2)<|box_end|>")


def test_got_json(tmp_path):
    (tmp_path / "im.png").write_bytes(img_bytes("yellow"))
    rows = [{"id": "g1", "prompt": "a vase", "chain": CHAIN, "image": "im.png"},
            {"id": "g2", "prompt": "bad", "chain": "<|obj_start|>x<|obj_end|><|box_start|>(500,0),(400,10)<|box_end|>",
             "image": "im.png"}]
    (tmp_path / "got.json").write_text(json.dumps(rows))
    (src,) = open_sources(tmp_path / "got.json", "got")
    (i0, r0), (i1, r1) = list(src.checked())
    assert isinstance(r0.steps[0], PlanStep) and r0.steps[0].boxes[0].box == (202, 482, 729, 964)
    assert r0.steps[1].image.open().size == (32, 32)
    assert isinstance(r1, RecordError) and "steps[0].boxes[0].box" in str(r1) and "x0 < x1" in str(r1)


# --------------------------------------------------------------------------- BAGEL


def test_bagel_t2i_parquet(tmp_path):
    pq.write_table(pa.table({"image": [img_bytes("red", fmt="JPEG"), img_bytes("blue")],
                             "captions": [json.dumps({"1": "second", "0": "first"}), json.dumps({"0": "only"})]}),
                   tmp_path / "t2i.parquet")
    ds = load_records(tmp_path / "t2i.parquet", format="bagel-t2i")
    assert [r.prompt for r in ds] == ["first", "only"]
    assert ds[0].meta["captions"] == ["first", "second"]
    assert isinstance(ds[1].steps[0], DraftStep) and ds[1].steps[0].image.open().getpixel((0, 0)) == (0, 0, 255)


def test_bagel_edit_parquet_expands_pairs(tmp_path):
    pq.write_table(pa.table({
        "image_list": [[img_bytes("red"), img_bytes("green"), img_bytes("blue")], [img_bytes("white"), img_bytes("black")]],
        "instruction_list": [[["make it green", "green please"], ["now blue"]], [["make it black"]]]}),
        tmp_path / "edit.parquet")
    ds = load_records(tmp_path / "edit.parquet", format="bagel-edit")
    assert len(ds) == 3
    assert [r.prompt for r in ds] == ["make it green", "now blue", "make it black"]
    r = ds[1]
    assert r.task == "edit" and r.input_image.open().getpixel((0, 0)) == (0, 128, 0)
    assert r.steps[0].image.open().getpixel((0, 0)) == (0, 0, 255)
    assert ds.locate(1)[1] == "0.1"
    streamed = list(load_records(tmp_path / "edit.parquet", format="bagel-edit", streaming=True))
    assert [s.prompt for s in streamed] == [r.prompt for r in ds]


# --------------------------------------------------------------------------- registry


def test_builtin_registry_has_shapes():
    reg = Registry.load(env=False)
    for name, split in (("shapes-train", "train"), ("shapes-eval", "eval")):
        spec = reg.get(name)
        assert spec.format == "ftkit" and spec.split == split
        assert spec.paths[split][0].endswith(f"data/shapes/{split}/records.jsonl")


def test_user_registry_by_argument_and_env(tmp_path, monkeypatch):
    (tmp_path / "d.png").write_bytes(img_bytes("red"))
    write_jsonl(tmp_path / "a.jsonl", [t2i(0)])
    write_jsonl(tmp_path / "b.jsonl", [t2i(1), t2i(2)])
    (tmp_path / "one.yaml").write_text("datasets:\n  mine: {path: a.jsonl, weight: 2}\n")
    (tmp_path / "two.yaml").write_text("datasets:\n  mine: {path: b.jsonl}\n  other: {path: a.jsonl, split: eval}\n")
    monkeypatch.setenv("FTKIT_DATA_REGISTRY", f"{tmp_path / 'one.yaml'}")
    reg = Registry.load()
    assert "shapes-train" in reg and reg.get("mine").weight == 2.0
    assert len(load_records("mine")) == 1  # env registry
    # explicit file wins over the env one (later files override names)
    assert len(load_records("mine", registry=str(tmp_path / "two.yaml"))) == 2
    monkeypatch.setenv("FTKIT_DATA_REGISTRY", f"{tmp_path / 'one.yaml'}:{tmp_path / 'two.yaml'}")
    assert Registry.load().get("other").split == "eval"
    # per-split paths, relative to the registry file's folder
    sub = tmp_path / "regs"
    sub.mkdir()
    (sub / "split.yaml").write_text("datasets:\n  both:\n    paths: {train: ../b.jsonl, eval: [../a.jsonl]}\n")
    assert len(load_records("both", registry=str(sub / "split.yaml"))) == 2
    assert len(load_records("both", registry=str(sub / "split.yaml"), split="eval")) == 1
    with pytest.raises(RegistryError, match="has no split 'test'"):
        load_records("both", registry=str(sub / "split.yaml"), split="test")


def test_registry_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [oops\n")
    with pytest.raises(RegistryError, match="bad.yaml: not valid YAML"):
        Registry.load(str(bad), env=False)
    bad.write_text("datasets:\n  x: {format: csv, path: a}\n")
    with pytest.raises(RegistryError, match=r"datasets.x.format: 'csv' is not one of"):
        Registry.load(str(bad), env=False)
    bad.write_text("datasets:\n  x: {path: a, weight: -1}\n")
    with pytest.raises(RegistryError, match="weight"):
        Registry.load(str(bad), env=False)
    bad.write_text("datasets:\n  x: {path: a, colour: red}\n")
    with pytest.raises(RegistryError, match="unknown keys"):
        Registry.load(str(bad), env=False)
    with pytest.raises(RegistryError, match="does not exist"):
        Registry.load(str(tmp_path / "nope.yaml"), env=False)
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'nothing'; registered: .*shapes-eval"):
        load_records("nothing")
    bad.write_text("datasets:\n  x: {path: missing.jsonl}\n")
    with pytest.raises(RegistryError, match="missing.jsonl does not exist"):
        load_records("x", registry=str(bad))


# --------------------------------------------------------------------------- skip_invalid + mixture


def test_bad_records_refuse_the_dataset_unless_skip_invalid(tmp_path, caplog):
    (tmp_path / "d.png").write_bytes(img_bytes("red"))
    recs = [t2i(i) for i in range(6)]
    del recs[2]["prompt"]
    recs[4]["steps"][0]["boxes"][0]["box"] = [0, 0, 2000, 10]
    f = write_jsonl(tmp_path / "recs.jsonl", recs)
    with pytest.raises(InvalidDatasetError) as ei:
        load_records(f)
    msg = str(ei.value)
    assert "2 of 6 records are invalid" in msg and f"{f}:line 3:prompt" in msg and f"{f}:line 5:steps[0].boxes[0].box" in msg
    with caplog.at_level(logging.WARNING, logger="ftkit.data"):
        ds = load_records(f, skip_invalid=True, invalid_list_dir=tmp_path / "logs")
    assert [r.id for r in ds] == ["r0", "r1", "r3", "r5"]
    assert "skipped 2 of 6" in caplog.text and str(ds.invalid_list) in caplog.text
    listed = ds.invalid_list.read_text().splitlines()
    assert listed == [f"{f}:line 3:prompt: missing required field",
                      f"{f}:line 5:steps[0].boxes[0].box: box [0, 0, 2000, 10] is outside 0..1000"]
    # the registry entry's skip_invalid is the default
    (tmp_path / "r.yaml").write_text("datasets:\n  lax: {path: recs.jsonl, skip_invalid: true}\n")
    assert len(load_records("lax", registry=str(tmp_path / "r.yaml"), invalid_list_dir=tmp_path / "logs")) == 4
    # streaming: raises while iterating, or skips
    with pytest.raises(RecordError):
        list(load_records(f, streaming=True))
    assert len(list(load_records(f, streaming=True, skip_invalid=True))) == 4


def test_mixture_is_seeded_and_weighted(tmp_path):
    (tmp_path / "d.png").write_bytes(img_bytes("red"))
    write_jsonl(tmp_path / "a.jsonl", [t2i(i) for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{**t2i(i), "id": f"b{i}"} for i in range(4)])
    (tmp_path / "r.yaml").write_text("datasets:\n  a: {path: a.jsonl, weight: 1}\n  b: {path: b.jsonl, weight: 3}\n")
    m1 = load_mixture(["a", "b"], registry=str(tmp_path / "r.yaml"), num_samples=400, seed=3)
    m2 = load_mixture(["a", "b"], registry=str(tmp_path / "r.yaml"), num_samples=400, seed=3)
    assert m1.schedule == m2.schedule
    counts = Counter(d for d, _ in m1.schedule)
    assert 0.68 < counts[1] / 400 < 0.82  # weight 3:1
    ids = [m1[i].id for i in range(8)]
    assert all(i.startswith(("r", "b")) for i in ids)
    # each dataset is walked through a permutation: the first 4 'b' draws are 4 distinct records
    first_b = [j for d, j in m1.schedule if d == 1][:4]
    assert sorted(first_b) == [0, 1, 2, 3]
    m3 = MixtureDataset(m1.datasets, weights=[1, 1], num_samples=400, seed=4)
    assert m3.schedule != m1.schedule
    with pytest.raises(ValueError, match="positive"):
        MixtureDataset(m1.datasets, weights=[1, 0])
