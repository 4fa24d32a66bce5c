"""Validation on a corpus of deliberately broken records: every problem named, every good record kept."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image

from ftkit.data.dataset import load_records
from ftkit.data.validate import validate


def png(color="red", size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def rec(i, **kw):
    r = {"id": f"r{i}", "task": "t2i", "prompt": "a red circle",
         "steps": [{"type": "plan", "caption": "a red circle", "boxes": [{"label": "red circle", "box": [100, 100, 500, 500]}]},
                   {"type": "draft", "image": "ok.png"},
                   {"type": "reflect", "verdict": "revise", "critique": "too small",
                    "regions": [{"box": [100, 100, 500, 500], "label": "red circle", "kind": "attribute"}]},
                   {"type": "refine", "image": "ok.png"}]}
    r.update(kw)
    return r


def build_corpus(tmp_path):
    good_png = png()
    (tmp_path / "ok.png").write_bytes(good_png)
    (tmp_path / "truncated.png").write_bytes(png(size=64)[:60])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    (tmp_path / "tiny.png").write_bytes(png(size=8))
    (tmp_path / "mask_small.png").write_bytes(png("white", 16))
    b64 = {"bytes_b64": base64.b64encode(good_png).decode()}

    def with_draft(i, image):
        r = rec(i)
        r["steps"][1]["image"] = image
        return r

    lines = [
        json.dumps(rec(0)),                                                    # 0 good
        json.dumps(with_draft(1, "truncated.png")),                             # 1 truncated image
        json.dumps({k: v for k, v in rec(2).items() if k != "prompt"}),        # 2 missing field
        json.dumps(rec(3, steps=[{"type": "plan", "caption": "x", "boxes": [{"label": "c", "box": [0, 0, 1001, 50]}]}])),
        json.dumps(with_draft(4, "garbage.png")),                              # 4 unreadable file
        json.dumps(with_draft(5, "nowhere/missing.png")),                      # 5 file does not exist
        json.dumps(rec(6, prompt=42, steps={"type": "draft"})),                # 6 wrong types
        json.dumps(rec(7, steps=[])),                                          # 7 empty steps
        json.dumps(with_draft(8, b64)),                                        # 8 good (embedded)
        json.dumps(with_draft(9, "tiny.png")),                                 # 9 too small
        "{not json",                                                           # 10 bad JSON
        json.dumps(rec(11, steps=rec(11)["steps"][:2] + [{**rec(11)["steps"][2], "mask": "mask_small.png"}])),  # 11
        json.dumps(rec(12, steps=[{"type": "plan", "caption": "only a plan"}])),  # 12 good: partial record
    ]
    f = tmp_path / "corpus.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_every_broken_record_is_named(tmp_path):
    f = build_corpus(tmp_path)
    report = validate(f)
    got = {(int(p.index.split()[1]) - 1, p.field): (p.kind, p.reason) for p in report.problems}
    F = str(f)

    def has(index, field, kind, text):
        assert (index, field) in got, f"no problem for {index}:{field}; got {sorted(got)}"
        k, reason = got[(index, field)]
        assert k == kind and text in reason, (index, field, k, reason)

    has(1, "steps[1].image", "image_decode", "truncated.png")
    has(2, "prompt", "missing_field", "missing required field")
    has(3, "steps[0].boxes[0].box", "box", "box [0, 0, 1001, 50] is outside 0..1000")
    has(4, "steps[1].image", "image_decode", "cannot identify image file")
    has(5, "steps[1].image", "image_missing", "nowhere/missing.png")
    has(6, "prompt", "type", "must be a string, got int")
    has(6, "steps", "type", "must be a list, got dict")
    has(7, "steps", "value", "record has no steps")
    has(9, "steps[1].image", "image_size", "8x8, smaller than min_size 16")
    has(10, "<json>", "json", "not valid JSON")
    has(11, "steps[2].mask", "mask_size", "mask is 16x16 but the image it annotates (steps[1].image) is 32x32")
    assert {i for _, i in report.bad_records} == {f"line {n + 1}" for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11)}
    # nothing lost from the good records
    assert report.total == 13 and report.good == 3
    assert report.step_counts == {"plan": 3, "draft": 2, "reflect": 2, "refine": 2}
    # messages are file:record:field: reason
    assert f"{F}:line 4:steps[0].boxes[0].box: box [0, 0, 1001, 50] is outside 0..1000" in [str(p) for p in report.problems]
    assert "13 records, 3 good, 10 bad" in report.summary()
    assert "image_decode 2" in report.summary()


def test_truncated_image_passes_header_but_fails_full_decode(tmp_path):
    noise = Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3)))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    data = buf.getvalue()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    with Image.open(tmp_path / "t.png") as im:
        assert im.size == (64, 64)  # the header alone looks fine
    f = tmp_path / "r.jsonl"
    r = rec(0)
    r["steps"] = r["steps"][:2]
    r["steps"][1]["image"] = "t.png"
    f.write_text(json.dumps(r) + "\n")
    report = validate(f)
    assert not report.ok and report.problems[0].kind == "image_decode"
    assert report.problems[0].field == "steps[1].image"


def test_schema_only_mode_and_min_size(tmp_path):
    f = build_corpus(tmp_path)
    schema_only = validate(f, images=False)
    assert {i for _, i in schema_only.bad_records} == {f"line {n + 1}" for n in (2, 3, 6, 7, 10)}
    loose = validate(f, min_size=4)
    assert "line 10" not in {i for _, i in loose.bad_records}


def test_good_corpus_is_ok_and_loads(tmp_path):
    (tmp_path / "ok.png").write_bytes(png())
    f = tmp_path / "good.jsonl"
    f.write_text("".join(json.dumps(rec(i)) + "\n" for i in range(4)))
    report = validate(f)
    assert report.ok and report.good == 4 and report.problems == []
    assert len(load_records(f)) == 4
