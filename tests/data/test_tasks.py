"""FoX's separate tasks from one MCoT record: which steps each task keeps and supervises, and that the
model never learns to draw an image its reflection rejects."""

import json

import pytest

from ftkit.data.schema import StepRecord
from ftkit.data.shapes import generate, make_record
from ftkit.data.tasks import TASKS, split_tasks


def _rec(kind):
    return make_record(2, 0, 64, kind=kind)[0]  # record 2: a two_object scene


def test_revise_record_splits_into_four_tasks():
    rec = _rec("missing")
    draft, refine = rec["steps"][1]["image"], rec["steps"][3]["image"]
    out = {r["meta"]["mcot_task"]: r for r in split_tasks(rec)}
    assert list(out) == list(TASKS)
    pa = out["plan-act"]
    assert [s["type"] for s in pa["steps"]] == ["plan", "draft"] and pa["supervise"] == ["plan", "draft"]
    assert pa["steps"][1]["image"] == refine != draft  # plan-act draws the corrected image, never the broken one
    assert out["reflect"]["supervise"] == ["reflect"] and out["reflect"]["steps"][1]["image"] == draft
    assert out["correct"]["supervise"] == ["refine"] and len(out["correct"]["steps"]) == 4
    assert out["mcot"]["supervise"] == ["plan", "reflect", "refine"]  # the rejected draft is context only
    assert {r["id"] for r in out.values()} == {f"{rec['id']}#{t}" for t in TASKS}
    assert rec["steps"][1]["image"] == draft and "supervise" not in rec  # the input record is untouched
    for r in out.values():
        StepRecord.from_dict(r)


def test_ok_record_has_no_correction_and_learns_its_draft():
    rec = _rec("ok")
    out = {r["meta"]["mcot_task"]: r for r in split_tasks(rec)}
    assert set(out) == {"plan-act", "reflect", "mcot"}
    assert out["plan-act"]["steps"][1]["image"] == rec["steps"][1]["image"]
    assert out["reflect"]["steps"][2]["verdict"] == "ok"  # reflection also learns to accept correct drafts
    assert out["mcot"]["supervise"] == ["plan", "draft", "reflect"]


def test_subsets_and_errors():
    rec = _rec("missing")
    assert [r["meta"]["mcot_task"] for r in split_tasks(rec, ["correct", "plan-act"])] == ["plan-act", "correct"]
    no_refine = {**rec, "steps": rec["steps"][:3]}
    assert [r["meta"]["mcot_task"] for r in split_tasks(no_refine)] == ["reflect", "mcot"]
    with pytest.raises(ValueError, match="unknown MCoT task 'act'"):
        split_tasks(rec, ["act"])
    with pytest.raises(ValueError, match="no draft"):
        split_tasks({"id": "x", "steps": [rec["steps"][0]]})


def test_generate_writes_tasks_that_validate(tmp_path):
    s = generate(tmp_path / "t", 12, seed=0, size=32, progress=False, tasks=TASKS)
    lines = [json.loads(x) for x in (tmp_path / "t/records.jsonl").read_text().splitlines()]
    assert s["tasks"] == list(TASKS) and len(lines) > 12
    for i, r in enumerate(lines):
        StepRecord.from_dict(r, source=str(tmp_path / "t/records.jsonl"), index=i)
        for st in r["steps"]:
            if "image" in st:
                assert (tmp_path / "t" / st["image"]).is_file()
