"""Shapes world: generator (exact labels, typed errors, determinism, CLI) and GenEval-rule evaluator."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ftkit.data import geneval, shapes
from ftkit.data.builder import boxes_to_mask
from ftkit.data.geneval import (
    Detection,
    evaluate,
    evaluate_image,
    format_table,
    read_records,
    relative_position,
)

REGION_KIND = {
    "partial": "missing",
    "missing": "missing",
    "count": "count",
    "extra": "count",
    "color": "color",
    "position": "position",
    "attribute": "attribute",
}


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "set"
    summary = shapes.generate(out, 300, seed=3, size=64, progress=False)
    return out, read_records(out), summary


def _image(root: Path, rec: dict, step_type: str) -> Image.Image | None:
    paths = [s["image"] for s in rec["steps"] if s["type"] == step_type]
    return Image.open(root / paths[-1]).convert("RGB") if paths else None


def _final(root: Path, rec: dict) -> Image.Image:
    refine = _image(root, rec, "refine")
    return refine if refine is not None else _image(root, rec, "draft")


def test_correct_images_pass_every_category(shapes_set):
    root, recs, _ = shapes_set
    items = [(_final(root, r), r["meta"]) for r in recs]
    n_ok_drafts = sum(r["meta"]["error"] is None for r in recs)
    assert n_ok_drafts >= 20  # correct drafts are part of the sample
    scores = evaluate(items)
    assert list(scores)[:6] == list(shapes.TAGS)
    for tag in shapes.TAGS:
        assert scores[tag] >= 0.99, (tag, scores)
    # the record form reads the same images from disk
    assert evaluate(recs, root=root, which="final") == scores


def test_typed_error_drafts_fail_their_category(shapes_set):
    root, recs, summary = shapes_set
    failed = defaultdict(list)
    for r in recs:
        err = r["meta"]["error"]
        if err is None:
            continue
        ok, reason = evaluate_image(_image(root, r, "draft"), r["meta"])
        failed[err].append(not ok)
        if not ok:
            assert reason  # names the violated rule
        if err == "position" and not ok:
            assert "target" in reason
        if err == "extra" and not ok:
            assert "<" in reason  # the exclude rule (count must be exact)
    assert set(failed) == set(shapes.ERRORS) | {"partial"}
    for err, flags in failed.items():
        assert len(flags) >= 8, (err, len(flags))
        assert np.mean(flags) >= 0.95, (err, np.mean(flags))
    # the draft score of a set is its share of correct drafts
    drafts = evaluate(recs, root=root, which="draft")
    assert drafts["overall"] < 0.5
    assert summary["kinds"]["ok"] == sum(r["meta"]["error"] is None for r in recs)


def test_record_structure_and_boxes(shapes_set):
    root, recs, _ = shapes_set
    assert [r["id"] for r in recs] == [f"shapes-{i:06d}" for i in range(1, 301)]
    for r in recs:
        meta, steps, err = r["meta"], r["steps"], r["meta"]["error"]
        assert r["task"] == "t2i" and r["input_image"] is None and meta["seed"] == 3 and meta["size"] == 64
        types = [s["type"] for s in steps]
        plan, draft, reflect = steps[:3]
        assert types == (
            ["plan", "draft", "reflect"] if err is None else ["plan", "draft", "reflect", "refine"]
        )
        assert len(plan["boxes"]) == sum(e["count"] for e in meta["include"])
        boxes = [b["box"] for b in plan["boxes"]] + [g["box"] for g in reflect["regions"]]
        for box in boxes:
            assert all(isinstance(c, int) and 0 <= c <= 1000 for c in box), box
            assert box[0] < box[2] and box[1] < box[3], box
        assert draft["partial"] == (err == "partial")
        assert (reflect["verdict"] == "ok") == (err is None) == (reflect["regions"] == [])
        assert reflect["critique"] and reflect["mask"] is None
        if err is not None:
            assert steps[3]["mode"] == ("inpaint" if err == "partial" else "regenerate")
            assert {g["kind"] for g in reflect["regions"]} == {REGION_KIND[err]}
            # partial / missing / fewer: regions are planned boxes of objects absent from the draft
            if err in ("partial", "missing", "count"):
                planned = [b["box"] for b in plan["boxes"]]
                assert all(g["box"] in planned for g in reflect["regions"])
        for s in steps:
            if "image" in s:
                with Image.open(root / s["image"]) as im:
                    assert im.size == (64, 64) and im.format == "PNG"
        if meta["tag"] == "counting":
            (inc,), (exc,) = meta["include"], meta["exclude"]
            assert exc == {"class": inc["class"], "count": inc["count"] + 1}


def test_plan_boxes_are_the_rendered_objects(shapes_set):
    """Every planned box is exactly one detected object of the planned colour and class."""
    root, recs, _ = shapes_set
    det = geneval.ColorShapeDetector()
    for r in recs[:120]:
        img = _final(root, r)
        found = Counter(
            (f"{d.color} {d.cls}", tuple(shapes.norm_box(tuple(int(c) for c in d.box), 64)))
            for d in det.detect(np.asarray(img))
        )
        planned = Counter((b["label"], tuple(b["box"])) for b in r["steps"][0]["boxes"])
        assert found == planned, r["id"]


def test_only_palette_colours_are_drawn(shapes_set):
    root, recs, _ = shapes_set
    allowed = {tuple(c) for c in shapes.COLORS.values()} | {tuple(c) for c in shapes.BACKGROUNDS.values()}
    for r in recs[:60]:
        arr = np.asarray(_image(root, r, "draft")).reshape(-1, 3)
        assert {tuple(int(v) for v in p) for p in np.unique(arr, axis=0)} <= allowed


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    shapes.generate(tmp_path / "a", 24, seed=5, progress=False)
    shapes.generate(tmp_path / "b", 24, seed=5, progress=False)
    shapes.generate(tmp_path / "c", 24, seed=6, progress=False)
    shapes.generate(tmp_path / "d", 12, seed=5, progress=False)
    a, b, c = (_tree_bytes(tmp_path / k) for k in "abc")
    assert a == b and len(a) > 24
    assert a["records.jsonl"] != c["records.jsonl"]
    # record i depends on (seed, i) only: a shorter set is a prefix of a longer one
    lines_a = a["records.jsonl"].decode().splitlines()
    assert (tmp_path / "d" / "records.jsonl").read_text().splitlines() == lines_a[:12]


def test_cli_summary_and_overwrite_guard(tmp_path, capsys):
    out = tmp_path / "set"
    assert shapes.main(["--out", str(out), "--n", "12", "--seed", "1", "--no-progress"]) == 0
    msg = capsys.readouterr().out
    assert "wrote 12 records" in msg and "counting 2" in msg
    before = _tree_bytes(out)
    # refuses a non-empty folder, leaves it untouched, no temp folder left behind
    assert shapes.main(["--out", str(out), "--n", "6", "--seed", "2", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _tree_bytes(out) == before
    assert shapes.main(["--out", str(out), "--n", "6", "--seed", "2", "--no-progress", "--overwrite"]) == 0
    assert len(read_records(out)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    # an empty folder is fine; bad arguments are an error, not a traceback
    (tmp_path / "empty").mkdir()
    assert shapes.main(["--out", str(tmp_path / "empty"), "--n", "3", "--no-progress"]) == 0
    assert shapes.main(["--out", str(tmp_path / "x"), "--size", "60", "--no-progress"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert shapes.main(["--out", str(tmp_path / "x"), "--error-rate", "0.9", "--partial-rate", "0.2"]) == 2


def test_rates_control_the_mix(tmp_path):
    s = shapes.generate(tmp_path / "ok", 30, seed=0, error_rate=0, partial_rate=0, progress=False)
    assert s["kinds"] == {"ok": 30} and s["images"] == 30
    s = shapes.generate(tmp_path / "bad", 30, seed=0, error_rate=1, partial_rate=0, progress=False)
    assert "ok" not in s["kinds"] and "partial" not in s["kinds"] and s["images"] == 60


def test_size_128_scales_and_evaluates(tmp_path):
    shapes.generate(tmp_path / "s", 24, seed=2, size=128, progress=False)
    recs = read_records(tmp_path / "s")
    assert Image.open(tmp_path / "s" / recs[0]["steps"][1]["image"]).size == (128, 128)
    assert evaluate(recs, root=tmp_path / "s")["overall"] == 1.0
    for r in recs:
        if r["meta"]["error"] is not None:
            assert not evaluate_image(Image.open(tmp_path / "s" / r["steps"][1]["image"]), r["meta"])[0]
    # a scene rendered at another size keeps its labels
    rng = np.random.default_rng(0)
    for tag in shapes.TAGS:
        scene = shapes.generate_scene(rng, tag, 64)
        assert evaluate_image(
            shapes.render(scene, 128), {"tag": tag, "include": scene.include, "exclude": scene.exclude}
        )[0], tag


def _degrade(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Blur (edges get blended colours) and pixel noise: what a generative model's output looks like."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7))).astype(np.int16)
    return np.clip(arr + rng.integers(-15, 16, arr.shape), 0, 255).astype(np.uint8)


def test_evaluator_tolerates_blur_and_noise(shapes_set):
    root, recs, _ = shapes_set
    rng = np.random.default_rng(0)
    good = [(_degrade(_final(root, r), rng), r["meta"]) for r in recs[:120]]
    assert evaluate(good)["overall"] >= 0.99
    bad = [(_degrade(_image(root, r, "draft"), rng), r["meta"]) for r in recs[:120] if r["meta"]["error"]]
    assert np.mean([not evaluate_image(im, m)[0] for im, m in bad]) >= 0.95


def test_detector_classifies_every_shape_at_every_size():
    det = geneval.ColorShapeDetector()
    for cls in shapes.CLASSES:
        for d in range(10, 41, 3):
            arr = np.full((64, 64, 3), 255, np.uint8)
            arr[5 : 5 + d, 7 : 7 + d][shapes.shape_mask(cls, d)] = shapes.COLORS["purple"]
            (found,) = det.detect(arr)
            assert (found.cls, found.color) == (cls, "purple"), (cls, d, found)


def test_relative_position_follows_geneval():
    a, b = (0, 40, 10, 50), (30, 40, 40, 50)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position((40, 0, 50, 10), (40, 30, 50, 40)) == {"above"}
    assert relative_position((0, 0, 10, 10), (40, 40, 50, 50)) == {"left of", "above"}
    # centres closer than 0.1 x (combined size) on both axes: no relation
    assert relative_position((0, 0, 20, 20), (3, 3, 23, 23)) == set()
    # offset mostly vertical with a small horizontal part: only "below"
    assert relative_position((5, 40, 15, 50), (0, 0, 10, 10)) == {"below"}


class _ListDetector:
    """A detector that returns given detections (stands in for e.g. Mask2Former + CLIP)."""

    def __init__(self, dets):
        self.dets = dets

    def detect(self, image):
        return list(self.dets)


def test_pluggable_detector_and_rules():
    img = np.zeros((64, 64, 3), np.uint8)
    dog, cat = Detection("dog", None, (0, 20, 10, 30), 0.9), Detection("cat", None, (40, 20, 50, 30), 0.8)
    assert isinstance(_ListDetector([]), geneval.Detector)
    meta = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    }
    assert evaluate_image(img, meta, _ListDetector([dog, cat])) == (True, "")
    meta["include"][1]["position"] = ["right of", 0]
    ok, reason = evaluate_image(img, meta, _ListDetector([dog, cat]))
    assert not ok and "expected dog right of target, found left of target" in reason
    # colour through color_fn when the detector gives none
    meta = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "brown"}]}
    assert evaluate_image(img, meta, _ListDetector([dog]), color_fn=lambda im, d: "brown")[0]
    assert not evaluate_image(img, meta, _ListDetector([dog]), color_fn=lambda im, d: "black")[0]
    with pytest.raises(ValueError, match="color_fn"):
        evaluate_image(img, meta, _ListDetector([dog]))
    # counting: N asked, N+1 excluded; GenEval uses the best-scored detections first
    two = [Detection("dog", "red", (0, 0, 5, 5), 0.5), Detection("dog", "red", (20, 0, 25, 5), 0.6)]
    meta = {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
    }
    assert evaluate_image(img, meta, _ListDetector(two))[0]
    ok, reason = evaluate_image(
        img, meta, _ListDetector([*two, Detection("dog", "blue", (40, 0, 45, 5), 0.4)])
    )
    assert not ok and reason == "expected dog<3, found 3"
    ok, reason = evaluate_image(img, meta, _ListDetector(two[:1]))
    assert not ok and reason == "expected dog>=2, found 1"


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"tag": "x"}, "meta.include"),
        ({"include": [{"class": "dog", "count": 0}]}, r"meta.include\[0\].count"),
        ({"include": [{"count": 1}]}, r"meta.include\[0\].class"),
        (
            {"include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]},
            r"meta.include\[0\].position",
        ),
        (
            {"include": [{"class": "dog", "count": 1}], "exclude": [{"class": "dog", "count": "2"}]},
            r"meta.exclude\[0\].count",
        ),
    ],
)
def test_bad_meta_names_the_field(meta, field):
    with pytest.raises(ValueError, match=field):
        evaluate_image(np.zeros((8, 8, 3), np.uint8), meta)


def test_evaluate_errors_name_the_item(tmp_path):
    with pytest.raises(ValueError, match="item 1: meta.tag"):
        evaluate(
            [
                (np.zeros((8, 8, 3), np.uint8), {"tag": "colors", "include": [{"class": "dog", "count": 1}]}),
                (np.zeros((8, 8, 3)), {}),
            ]
        )
    with pytest.raises(ValueError, match=r"item 0 \(r1\): steps"):
        evaluate([{"id": "r1", "meta": {"tag": "colors"}, "steps": "x"}])
    (tmp_path / "records.jsonl").write_text('{"id": 1}\n[1]\n')
    with pytest.raises(ValueError, match=r"records.jsonl:2: not a JSON object"):
        read_records(tmp_path)


def test_generator_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="multiple of 16"):
        shapes.generate_scene(rng, "colors", 72)
    with pytest.raises(ValueError, match="unknown tag"):
        shapes.generate_scene(rng, "colours", 64)
    scene = shapes.generate_scene(rng, "single_object", 64)
    with pytest.raises(ValueError, match="does not break"):
        shapes.make_draft(rng, scene, "color")
    with pytest.raises(ValueError, match="partial"):
        shapes.make_draft(rng, scene, "partial")
    with pytest.raises(ValueError, match="error_rate"):
        shapes.make_record(1, 0, error_rate=0.9, partial_rate=0.2)
    rec, images = shapes.make_record(7, 0, tag="color_attr", kind="attribute")
    assert rec["meta"]["error"] == "attribute" and len(images) == 2


def test_format_table():
    s = {"single_object": 1.0, "counting": 0.5, "overall": 0.75}
    table = format_table({"draft": s, "final": {"single_object": 1.0, "overall": 1.0}})
    lines = table.splitlines()
    assert lines[0] == "| | single_object | counting | overall |"
    assert lines[2] == "| draft | 1.000 | 0.500 | 0.750 |" and lines[3] == "| final | 1.000 | - | 1.000 |"
    assert format_table(s).splitlines()[2].startswith("| score | 1.000")


def test_shipped_eval_set_is_reproducible(tmp_path):
    """data/shapes/eval is exactly `ftkit data shapes --out data/shapes/eval --n 200 --seed 1`."""
    shipped = Path(__file__).resolve().parents[2] / "data" / "shapes" / "eval"
    if not (shipped / "records.jsonl").exists():
        pytest.skip("shipped eval set not present in this checkout")
    fresh = tmp_path / "eval"
    shapes.generate(fresh, 200, seed=1, size=64, progress=False)
    assert (fresh / "records.jsonl").read_bytes() == (shipped / "records.jsonl").read_bytes()
    # pixels, not PNG bytes: another zlib may compress the same pixels differently
    names = sorted(p.name for p in (fresh / "images").iterdir())
    assert names == sorted(p.name for p in (shipped / "images").iterdir())
    for name in names:
        a, b = (np.asarray(Image.open(d / "images" / name)) for d in (fresh, shipped))
        assert np.array_equal(a, b), name
    assert evaluate(read_records(shipped), root=shipped)["overall"] == 1.0


def test_noise_is_not_a_scene():
    """Texture (e.g. an untrained generator's output) must not pass as objects in any category."""
    import numpy as np

    from ftkit.data.geneval import ColorShapeDetector, evaluate_image

    rng = np.random.default_rng(0)
    det = ColorShapeDetector()
    for _ in range(20):
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        assert det.detect(noise) == []
        ok, reason = evaluate_image(noise, {"tag": "single_object", "include": [{"class": "cross", "count": 1}]})
        assert not ok and "found 0" in reason


def test_refinement_differs_from_draft_only_inside_the_regions(shapes_set):
    """A correction that inpaints the reflection's regions can reach the refinement exactly: every typed error
    changes only pixels under its regions (a position error's: each moved object where it is and belongs)."""
    root, recs, _ = shapes_set
    seen = Counter()
    for r in recs:
        if r["meta"]["error"] is None:
            continue
        reflect = r["steps"][2]
        draft = np.asarray(_image(root, r, "draft")).astype(int)
        refine = np.asarray(_image(root, r, "refine")).astype(int)
        inside = boxes_to_mask([g["box"] for g in reflect["regions"]], 64, 64).numpy()  # training's region mask
        changed = (draft != refine).any(-1)
        assert changed.any(), r["id"]
        assert not (changed & ~inside).any(), (r["id"], r["meta"]["error"], int((changed & ~inside).sum()))
        if r["meta"]["error"] == "position":  # the subject where it is and where it belongs (+ the target's)
            labels = [g["label"] for g in reflect["regions"]]
            assert len(labels) in (2, 4) and labels[0] == labels[1] and labels[-1] == labels[-2], labels
        seen[r["meta"]["error"]] += 1
    assert set(seen) == set(shapes.ERRORS) | {"partial"}
