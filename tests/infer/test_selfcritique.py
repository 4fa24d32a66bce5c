"""ftkit data self-critique: the shapes judge on rendered images, and the loop end to end on a tiny model."""

import json

import pytest
from PIL import Image

from ftkit.data.dataset import load_records
from ftkit.data.shapes import generate
from ftkit.infer.selfcritique import Critique, load_judge, shapes_judge


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("sc") / "set"
    generate(out, 12, seed=5, size=64, progress=False)
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    return out, recs


def test_shapes_judge_ok_on_correct_renders_and_names_the_conflict(shapes):
    root, recs = shapes
    judge = shapes_judge(root)
    for r in recs:  # the record's correct image (its refinement, or its draft when correct) passes
        with Image.open(root / [s for s in r["steps"] if s.get("image")][-1]["image"]) as im:
            c = judge(im.convert("RGB"), r, None)
        assert c.verdict == "ok" and not c.regions and c.target is None, r["id"]
    blank = Image.new("RGB", (64, 64), (200, 200, 200))
    for r in recs:  # nothing drawn: every object missing, each where the plan put it
        plan = load_records_plan(root, r)
        c = judge(blank, r, plan)
        assert c.verdict == "revise" and "Expected" in c.critique and c.target is not None, r["id"]
        assert c.target.size == (64, 64)
        want = [list(b.box) for b in plan.boxes if any(m["class"] in b.label for m in r["meta"]["include"])]
        assert sorted(g["box"] for g in c.regions) == sorted(want) and want, r["id"]
        assert all(g["kind"] == "missing" for g in c.regions)
        # without a plan nothing shows where a missing object belongs: no region (the whole image was one)
        assert judge(blank, r, None).regions == []
    assert load_judge("shapes", root) is not None
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_judge("nonsense")


def load_records_plan(root, rec):
    """The parsed plan step of a shapes record."""
    from ftkit.data.schema import StepRecord

    (plan,) = [s for s in StepRecord.from_dict(rec, str(root / "records.jsonl"), 0, base_dir=root).steps
               if s.type == "plan"]
    return plan


def test_self_critique_cli_writes_valid_reflection_and_correction_records(shapes, fixture_dir, tmp_path, capsys):
    from ftkit.cli import main

    root, _ = shapes
    out = tmp_path / "round2"
    rc = main(["data", "self-critique", "--model", str(fixture_dir), "--prompts", str(root / "records.jsonl"), "--n", "3",
               "--steps", "3", "--size", "32", "--batch", "2", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    recs = list(load_records(str(out / "records.jsonl")))  # validates schema and images
    reflect = [r for r in recs if r.id.endswith("#self-reflect")]
    assert len(reflect) == 3 == summary["ok"] + summary["revise"]
    assert [r.steps[-1].verdict for r in reflect] == summary["verdicts"]
    assert summary["corrections"] == summary["revise"] == sum(r.id.endswith("#self-correct") for r in recs)
    assert all(r.supervise == ("reflect",) for r in reflect)
    # every reflection is a DPO pair: the model's own wrong reflection, else the judge's with its verdict flipped
    assert all(r.rejected is not None and r.rejected != r.steps[-1] for r in reflect)
    assert sum(r.rejected.verdict == r.steps[-1].verdict for r in reflect) == summary["rejected_own_regions"]
    assert summary["rejected_own"] + summary["rejected_flipped"] == 3 and 0 <= summary["own_verdict_accuracy"] <= 1
    from ftkit.train.datamodule import MCoTDataModule

    dm = MCoTDataModule([str(out / "records.jsonl")], model_path=str(fixture_dir), cfg_dropout=None,
                        token_budget=4096, preference="record")
    dm.setup()  # the corrections are not pairs: only the reflections train
    assert sorted(r.id for r in dm.records) == sorted(r.id for r in reflect)
    assert "3 prompts" in capsys.readouterr().out
    assert main(["data", "self-critique", "--model", str(fixture_dir), "--prompts", str(root / "records.jsonl"),
                 "--out", str(out)]) == 1  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err


def test_the_models_own_reflection_is_rejected_when_its_verdict_or_its_regions_are_wrong():
    from ftkit.data.schema import ReflectStep, Region
    from ftkit.infer.selfcritique import wrong_own_reflection

    judge = Critique("revise", "Expected a red circle.", [{"kind": "missing", "label": "red circle",
                                                           "box": [0, 0, 500, 500]}])
    here = ReflectStep("revise", "no red circle", [Region((0, 0, 450, 500), "red circle", "missing")])
    there = ReflectStep("revise", "no red circle", [Region((500, 500, 1000, 1000), "red circle", "missing")])
    nowhere = ReflectStep("revise", "no red circle", [])
    ok = ReflectStep("ok", "fine")
    hw = (64, 64)
    assert wrong_own_reflection(here, judge, hw) is None  # right verdict, IoU 0.9: a right critique
    assert wrong_own_reflection(there, judge, hw) is there  # right verdict, the wrong place
    assert wrong_own_reflection(nowhere, judge, hw) is nowhere  # flags nothing the judge flags
    assert wrong_own_reflection(ok, judge, hw) is ok  # the other verdict
    assert wrong_own_reflection(None, judge, hw) is None  # unparsed: the caller flips the judge's
    assert wrong_own_reflection(ok, Critique("ok", "fine"), hw) is None
    assert wrong_own_reflection(there, Critique("revise", "wrong, somewhere"), hw) is None  # no judge regions


def test_custom_judge_can_skip(shapes, fixture_dir, tmp_path):
    from ftkit.infer.load import load_for_inference
    from ftkit.infer.mcot import SamplerSettings
    from ftkit.infer.selfcritique import self_critique

    root, recs = shapes
    model, tok = load_for_inference(str(fixture_dir), None)
    calls = []

    def judge(image, record, plan):
        calls.append(record["id"])
        return None if len(calls) == 1 else Critique("ok", "fine")

    (tmp_path / "o").mkdir()
    s = self_critique(model, tok, recs[:2], judge, tmp_path / "o", batch_size=2, image_hw=(32, 32),
                      sampler=SamplerSettings(num_timesteps=2), progress=False)
    assert calls == [recs[0]["id"], recs[1]["id"]] and s["skipped"] == 1 and s["records"] == 1


def test_repair_draft_fixes_broken_renders_and_keeps_every_other_pixel(tmp_path):
    import numpy as np

    from ftkit.data.geneval import judge_image
    from ftkit.data.schema import Box, PlanStep
    from ftkit.infer.selfcritique import repair_draft

    out = tmp_path / "broken"
    generate(out, 60, seed=7, size=64, progress=False)
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    tried, repaired, tags = 0, 0, set()
    for r in recs:
        draft = next(s for s in r["steps"] if s["type"] == "draft")
        with Image.open(out / draft["image"]) as im:
            img = im.convert("RGB")
        if judge_image(img, r["meta"]).passed:
            assert repair_draft(img, r["meta"]) is None  # nothing to repair
            continue
        tried += 1
        plan = next(s for s in r["steps"] if s["type"] == "plan")  # missing objects go to their planned boxes
        fixed = repair_draft(img, r["meta"], PlanStep(plan["caption"], [Box(b["label"], tuple(b["box"]))
                                                                          for b in plan["boxes"]]))
        if fixed is None:
            continue
        target, edits = fixed
        assert judge_image(target, r["meta"]).passed, r["id"]
        inside = np.zeros((64, 64), dtype=bool)
        for label, (x0, y0, x1, y1) in edits:
            inside[y0:y1, x0:x1] = True
            assert label.split()[-1] in {q["class"] for q in r["meta"]["include"]} | {"circle", "square", "triangle",
                                                                                    "cross", "ring"}
        a, b = np.asarray(img), np.asarray(target)
        assert edits and np.array_equal(a[~inside], b[~inside]), r["id"]  # only the edited boxes change
        assert not np.array_equal(a[inside], b[inside])
        repaired += 1
        tags.add(r["meta"]["tag"])
    assert tried >= 40 and repaired >= 0.9 * tried, (repaired, tried)
    assert len(tags) >= 5  # colour, position, count, missing objects: every kind of failure gets repaired


def test_shapes_judge_edit_target_inpaints_the_named_regions(shapes):
    root, recs = shapes
    judge = load_judge("shapes", root, target="edit")
    blank = Image.new("RGB", (64, 64), (230, 230, 230))
    r = next(x for x in recs if x["meta"]["tag"] == "two_object")
    c = judge(blank, r, None)
    assert c.verdict == "revise" and c.mode == "inpaint" and c.target is not None and len(c.regions) == 2
    # each region is labelled with what was painted there: both asked-for classes
    assert {g["label"].split()[-1] for g in c.regions} == {q["class"] for q in r["meta"]["include"]}
    x0, y0, x1, y1 = c.regions[0]["box"]  # the painted object, not the whole image
    assert 0 < (x1 - x0) * (y1 - y0) < 1000 * 1000 / 4
    assert shapes_judge(root)(blank, r, None).mode == "regenerate"
    with pytest.raises(ValueError, match="only the shapes judge"):
        load_judge("json:loads", target="edit")
