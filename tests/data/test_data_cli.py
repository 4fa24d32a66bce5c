"""`ftkit data` verbs: validate, preview, list, shapes."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ftkit.cli import main as ftkit_main
from ftkit.data.cli import main


def png(color="red", size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def rec(i, image="ok.png", **kw):
    return {"id": f"r{i}", "task": "t2i", "prompt": "a red square",
            "steps": [{"type": "plan", "caption": "a red square", "boxes": [{"label": "red square", "box": [100, 100, 600, 600]}]},
                      {"type": "draft", "image": image},
                      {"type": "reflect", "verdict": "revise", "critique": "too small",
                       "regions": [{"box": [100, 100, 600, 600], "label": "red square", "kind": "attribute"}]},
                      {"type": "refine", "image": image}], **kw}


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(rec(i)) + "\n" for i in range(3)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(rec(0)), json.dumps(rec(1, image="gone.png")), json.dumps(rec(2, task="x"))]) + "\n")
    return tmp_path


def test_validate_good_and_bad(corpus, capsys):
    assert main(["validate", str(corpus / "good.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "3 records, 3 good, 0 bad" in out and "plan 3" in out
    assert ftkit_main(["data", "validate", str(corpus / "bad.jsonl")]) == 1
    out = capsys.readouterr().out.splitlines()
    f = corpus / "bad.jsonl"
    assert "3 records, 1 good, 2 bad" in out[0]
    assert f"{f}:line 2:steps[1].image: image file not found: {corpus / 'gone.png'}" in out
    assert f"{f}:line 3:task: 'x' is not one of t2i, edit" in out


def test_validate_by_registry_name_and_format(corpus, capsys, tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text("datasets:\n  mine: {path: good.jsonl}\n")
    assert main(["validate", "mine", "--registry", str(reg)]) == 0
    assert "mine: 3 records" in capsys.readouterr().out
    assert main(["validate", "mine"]) == 2  # not registered without --registry
    assert "unknown dataset 'mine'" in capsys.readouterr().err
    assert main(["validate", str(corpus / "good.jsonl"), "--format", "got"]) == 1  # wrong layout -> every row bad
    assert "missing required column" in capsys.readouterr().out


def test_list_shows_builtin_and_user_entries(tmp_path, capsys):
    reg = tmp_path / "reg.yaml"
    reg.write_text("datasets:\n  genref-mini: {format: genref, path: shards/, weight: 0.5}\n")
    assert main(["list", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert "shapes-train" in out and "shapes-eval" in out
    assert "genref-mini" in out and "genref" in out and "0.5" in out


def test_preview_writes_contact_sheet(corpus, tmp_path, capsys):
    out = tmp_path / "sheet" / "preview.png"
    assert main(["preview", str(corpus / "bad.jsonl"), "--out", str(out), "--n", "3", "--cell", "64"]) == 0
    with Image.open(out) as im:
        # record 1 has a missing image (error panel), record 2 is invalid (skipped): rows 0 and 1 shown
        assert im.size[1] == 2 * (64 + 16) and im.size[0] >= 5 * 64
    assert "1 invalid skipped" in capsys.readouterr().out


def test_shapes_verb_generates_valid_records(tmp_path, capsys):
    pytest.importorskip("ftkit.data.shapes")
    out = tmp_path / "shapes"
    assert main(["shapes", "--out", str(out), "--n", "6", "--seed", "3", "--size", "64", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["validate", str(out / "records.jsonl")]) == 0
    assert "6 records, 6 good, 0 bad" in capsys.readouterr().out


def test_validate_accepts_a_dataset_folder(tmp_path, capsys):
    """A folder written by `ftkit data shapes` (records.jsonl + images/) is an ftkit dataset."""
    out = tmp_path / "shapes"
    assert main(["shapes", "--out", str(out), "--n", "4", "--seed", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    assert "4 records, 4 good, 0 bad" in capsys.readouterr().out
    (out / "images" / sorted(p.name for p in (out / "images").iterdir())[0]).write_bytes(b"not a png")
    assert main(["validate", str(out)]) == 1
    assert "images/" in capsys.readouterr().out
