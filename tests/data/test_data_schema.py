"""Record schema (ftkit.data.schema) and text serialisation (ftkit.data.serialize)."""

from __future__ import annotations

import base64
import copy
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ftkit.data.schema import (
    REGION_KINDS,
    Box,
    ImageRef,
    PlanStep,
    RecordError,
    ReflectStep,
    Region,
    StepRecord,
)
from ftkit.data.serialize import (
    ParseError,
    parse_plan,
    parse_reflection,
    serialize_plan,
    serialize_reflection,
)


def png_bytes(color="red", size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def full_record() -> dict:
    return {
        "id": "r1", "task": "t2i", "prompt": "two red circles", "input_image": None,
        "meta": {"tag": "counting", "include": [{"class": "circle", "count": 2, "color": "red"}], "exclude": []},
        "steps": [
            {"type": "plan", "caption": "two red circles", "boxes": [{"label": "red circle", "box": [100, 100, 400, 400]},
                                                                     {"label": "red circle", "box": [500, 100, 900, 400]}]},
            {"type": "draft", "image": "draft.png", "partial": True},
            {"type": "reflect", "verdict": "revise", "critique": "one circle is missing",
             "regions": [{"box": [500, 100, 900, 400], "label": "red circle", "kind": "missing"}], "mask": None},
            {"type": "refine", "image": {"bytes_b64": base64.b64encode(png_bytes()).decode()}, "mode": "inpaint"},
        ],
        "supervise": ["plan", "draft", "reflect", "refine"],
    }


def test_valid_record_parses_and_round_trips(tmp_path):
    src = tmp_path / "records.jsonl"
    rec = StepRecord.from_dict(full_record(), source=src, index=3)
    assert [s.type for s in rec.steps] == ["plan", "draft", "reflect", "refine"]
    assert rec.steps[0].boxes[1] == Box("red circle", (500, 100, 900, 400))
    assert rec.steps[1].partial is True
    assert rec.steps[1].image.path == tmp_path / "draft.png"  # relative to the record file
    assert rec.steps[3].image.data == png_bytes()
    assert rec.steps[2].regions == [Region((500, 100, 900, 400), "red circle", "missing")]
    assert rec.meta["include"][0]["count"] == 2
    assert rec.supervised == {"plan", "draft", "reflect", "refine"}
    again = StepRecord.from_dict(rec.to_dict(base_dir=tmp_path), source=src, index=3)
    assert again.steps == rec.steps and again.prompt == rec.prompt and again.meta == rec.meta


def test_supervise_defaults_to_present_types():
    d = full_record()
    del d["supervise"]
    d["steps"] = d["steps"][:2]
    assert StepRecord.from_dict(d).supervised == {"plan", "draft"}


def test_image_ref_forms(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes("blue", 20))
    by_path = ImageRef.from_value("a.png", tmp_path)
    assert by_path.open().getpixel((0, 0)) == (0, 0, 255) and by_path.size == (20, 20)
    assert ImageRef.from_value(str(p)).path == p  # absolute
    parquet = ImageRef.from_value({"bytes": png_bytes("blue", 20), "path": None})
    assert parquet.open().size == (20, 20)
    b64 = ImageRef.from_value({"bytes_b64": base64.b64encode(png_bytes()).decode()})
    assert b64.open().getpixel((1, 1)) == (255, 0, 0)
    assert ImageRef.from_value({"bytes": None, "path": "a.png"}, tmp_path).path == p
    with pytest.raises(ValueError, match="base64"):
        ImageRef.from_value({"bytes_b64": "***"})
    with pytest.raises(TypeError):
        ImageRef.from_value(12)


def _mutate(path, value):
    def f(d):
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return d
    return f


@pytest.mark.parametrize("mutate, field, reason", [
    (_mutate(["prompt"], KeyError), "prompt", "missing required field"),
    (_mutate(["id"], KeyError), "id", "missing required field"),
    (_mutate(["task"], "video"), "task", "'video' is not one of t2i, edit"),
    (_mutate(["prompt"], 5), "prompt", "must be a string, got int"),
    (_mutate(["steps"], []), "steps", "no steps"),
    (_mutate(["steps"], "not json"), "steps", "not a JSON list"),
    (_mutate(["steps", 0, "boxes", 0, "box"], [0, 0, 1200, 10]), "steps[0].boxes[0].box", "outside 0..1000"),
    (_mutate(["steps", 0, "boxes", 0, "box"], [300, 0, 200, 10]), "steps[0].boxes[0].box", "x0 < x1"),
    (_mutate(["steps", 0, "boxes", 0, "box"], [1, 2, 3]), "steps[0].boxes[0].box", "4 integers"),
    (_mutate(["steps", 0, "boxes", 0, "box"], [1.5, 2, 3, 4]), "steps[0].boxes[0].box", "must be integers"),
    (_mutate(["steps", 0, "boxes", 0, "label"], ""), "steps[0].boxes[0].label", "non-empty"),
    (_mutate(["steps", 1, "image"], KeyError), "steps[1].image", "missing required image"),
    (_mutate(["steps", 1, "partial"], "yes"), "steps[1].partial", "true or false"),
    (_mutate(["steps", 2, "regions", 0, "kind"], "ugly"), "steps[2].regions[0].kind", "not one of missing"),
    (_mutate(["steps", 3, "mode"], "paint"), "steps[3].mode", "not one of regenerate"),
    (_mutate(["steps", 1, "colour"], "red"), "steps[1].colour", "unknown field"),
    (_mutate(["supervise"], ["plan", "think"]), "supervise", "unknown step types"),
    (_mutate(["meta"], [1, 2]), "meta", "must be an object"),
    (_mutate(["steps", 0, "caption"], "a cat <region>x"), "steps[0].caption", "must not contain <box>/<region>"),
    (_mutate(["steps", 2, "critique"], "bad</verdict>"), "steps[2].critique", "must not contain <box>/<region>"),
])
def test_schema_problems_name_file_index_field(mutate, field, reason):
    d = mutate(copy.deepcopy(full_record()))
    with pytest.raises(RecordError) as ei:
        StepRecord.from_dict(d, source="/data/x.jsonl", index=7)
    e = ei.value
    assert any(p.field == field and reason in p.reason for p in e.problems), e.problems
    assert str(e).startswith("/data/x.jsonl:7:")


@pytest.mark.parametrize("steps, field, reason", [
    ([{"type": "reflect", "verdict": "revise"}], "steps[0]", "reflect needs a draft or refine"),
    ([{"type": "draft", "image": "a.png"}, {"type": "refine", "image": "b.png"}], "steps[1]", "must follow a reflect"),
    ([{"type": "draft", "image": "a.png"}, {"type": "reflect", "verdict": "ok"}, {"type": "refine", "image": "b.png"}],
     "steps[2]", "verdict is 'ok'"),
    ([{"type": "draft", "image": "a.png"}, {"type": "reflect", "verdict": "revise"}, {"type": "draft", "image": "c.png"},
      {"type": "refine", "image": "b.png"}], "steps[3]", "must follow a reflect"),
    ([{"type": "draft", "image": "a.png"}, {"type": "reflect", "verdict": "revise"},
      {"type": "refine", "image": "b.png", "mode": "inpaint"}], "steps[2].mode", "inpaint needs regions"),
])
def test_ordering_rules(steps, field, reason):
    d = {"id": "o", "task": "t2i", "prompt": "p", "steps": steps}
    with pytest.raises(RecordError) as ei:
        StepRecord.from_dict(d, source="f.jsonl", index=0)
    assert any(p.field == field and reason in p.reason for p in ei.value.problems), ei.value.problems


def test_partial_records_are_valid():
    draft = {"type": "draft", "image": "a.png"}
    plan_act = {"id": "a", "task": "t2i", "prompt": "p", "steps": [{"type": "plan", "caption": "c"}, draft]}
    reflection_only = {"id": "b", "task": "t2i", "prompt": "p",
                       "steps": [draft, {"type": "reflect", "verdict": "revise", "critique": "x"}],
                       "supervise": ["reflect"]}
    correction_only = {"id": "c", "task": "t2i", "prompt": "p", "supervise": ["refine"],
                       "steps": [draft, {"type": "reflect", "verdict": "revise"}, {"type": "refine", "image": "b.png"}]}
    two_rounds = {"id": "d", "task": "t2i", "prompt": "p",
                  "steps": [draft, {"type": "reflect", "verdict": "revise"}, {"type": "refine", "image": "b.png"},
                            {"type": "reflect", "verdict": "revise"}, {"type": "refine", "image": "c.png"},
                            {"type": "reflect", "verdict": "ok"}]}
    for d in (plan_act, reflection_only, correction_only, two_rounds):
        StepRecord.from_dict(d)


def test_edit_and_t2i_input_image_rules():
    base = {"id": "e", "prompt": "make it blue", "steps": [{"type": "draft", "image": "a.png"}]}
    with pytest.raises(RecordError, match="input_image: task 'edit' needs an input_image"):
        StepRecord.from_dict({**base, "task": "edit"}, source="f", index=0)
    with pytest.raises(RecordError, match="must not have an input_image"):
        StepRecord.from_dict({**base, "task": "t2i", "input_image": "x.png"}, source="f", index=0)
    rec = StepRecord.from_dict({**base, "task": "edit", "input_image": "x.png"}, source="/d/f.jsonl")
    assert str(rec.input_image.path) == "/d/x.png"


def test_all_problems_of_a_record_are_collected():
    d = full_record()
    del d["prompt"]
    d["task"] = "nope"
    d["steps"][0]["boxes"][0]["box"] = [0, 0, 0, 0]
    with pytest.raises(RecordError) as ei:
        StepRecord.from_dict(d, source="f", index=1)
    fields = {p.field for p in ei.value.problems}
    assert {"prompt", "task", "steps[0].boxes[0].box"} <= fields


def test_parquet_union_keys_with_none_are_accepted():
    d = full_record()
    for s in d["steps"]:  # Parquet gives every step the union of all step keys
        for k in ("caption", "boxes", "image", "partial", "verdict", "critique", "regions", "mask", "mode"):
            s.setdefault(k, None)
    rec = StepRecord.from_dict(d)
    assert rec.steps[1].partial is True and rec.steps[0].caption == "two red circles"


def test_json_string_nested_fields():
    import json

    d = full_record()
    d["steps"] = json.dumps(d["steps"])
    d["meta"] = json.dumps(d["meta"])
    rec = StepRecord.from_dict(d)
    assert rec.meta["tag"] == "counting" and len(rec.steps) == 4


# --------------------------------------------------------------------------- serialisation

label_chars = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="[]<>\n\r")
labels = st.text(label_chars, min_size=1, max_size=12).map(str.strip).filter(bool)
free_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="<>"),
                    max_size=40).map(str.strip)


@st.composite
def boxes(draw):
    x0 = draw(st.integers(0, 999))
    y0 = draw(st.integers(0, 999))
    return (x0, y0, draw(st.integers(x0 + 1, 1000)), draw(st.integers(y0 + 1, 1000)))


plans = st.builds(PlanStep, caption=free_text, boxes=st.lists(st.builds(Box, label=labels, box=boxes()), max_size=5))
reflections = st.builds(
    ReflectStep, verdict=st.sampled_from(["ok", "revise"]), critique=free_text,
    regions=st.lists(st.builds(Region, box=boxes(), label=st.one_of(st.just(""), labels),
                               kind=st.sampled_from(REGION_KINDS)), max_size=4))


@settings(max_examples=200, deadline=None)
@given(plans)
def test_plan_round_trip(plan):
    text = serialize_plan(plan)
    assert parse_plan(text) == plan
    assert parse_plan(f"\n  {text}  \n\n") == plan  # surrounding whitespace is tolerated


@settings(max_examples=200, deadline=None)
@given(reflections)
def test_reflection_round_trip(refl):
    text = serialize_reflection(refl)
    assert parse_reflection(text) == refl
    assert parse_reflection("  " + text.replace("\n", "\n  ") + "\n") == refl


def test_serialisation_is_documented_format():
    plan = PlanStep("a red circle", [Box("red circle", (1, 2, 30, 40))])
    assert serialize_plan(plan) == "a red circle\n<box>red circle [1,2,30,40]</box>"
    refl = ReflectStep("revise", "move it", [Region((0, 0, 10, 10), "red circle", "position"), Region((5, 5, 6, 6), "", "artifact")])
    assert serialize_reflection(refl) == ("<verdict>revise</verdict>\nmove it\n"
                                          "<region>position red circle [0,0,10,10]</region>\n<region>artifact [5,5,6,6]</region>")
    assert parse_plan("cap\n<box> red circle [ 1, 2 ,30, 40 ] </box>").boxes == [Box("red circle", (1, 2, 30, 40))]


@pytest.mark.parametrize("text, match", [
    ("cap\n<box>circle [0,0,1001,5]</box>", r"line 2: box \[0, 0, 1001, 5\] is outside 0..1000"),
    ("cap\n<box>circle [0,0,5]</box>", "line 2: box needs 4 integers"),
    ("cap\n<box>circle [0,0,5.5,6]</box>", r"line 2: box value '5.5' is not an integer"),
    ("cap\n<box>circle [9,0,5,6]</box>", "x0 < x1"),
    ("cap\n<box>circle [1,2,3,4]", "malformed box line"),
    ("cap\n<box>circle 1,2,3,4</box>", "malformed box"),
    ("cap\n<box> [1,2,3,4]</box>", "empty label"),
    ("<box>a [1,2,3,4]</box>\nmore caption", "caption text after the box lines"),
    ("a cat and a\n<region>missing dog [1,2,3,4]</>", "line 2: a stray tag in the caption"),  # a model's broken plan
])
def test_parse_plan_rejects_malformed(text, match):
    with pytest.raises(ParseError, match=match):
        parse_plan(text)


@pytest.mark.parametrize("text, match", [
    ("", "empty reflection"),
    ("looks fine", "must start with '<verdict>"),
    ("<verdict>maybe</verdict>", "verdict 'maybe'"),
    ("<verdict>revise</verdict>\n<region>ugly circle [1,2,3,4]</region>", "region kind 'ugly'"),
    ("<verdict>revise</verdict>\n<region>[1,2,3,4]</region>", "region has no kind"),
    ("<verdict>revise</verdict>\n<region>missing circle [1,2,3,1200]</region>", "outside 0..1000"),
    ("<verdict>revise</verdict>\nno <box>circle", "line 2: a stray tag in the critique"),
])
def test_parse_reflection_rejects_malformed(text, match):
    with pytest.raises(ParseError, match=match):
        parse_reflection(text)


def test_serialize_rejects_unwritable_labels():
    with pytest.raises(ValueError, match="label"):
        serialize_plan(PlanStep("c", [Box("a [b]", (0, 0, 1, 1))]))
    with pytest.raises(ValueError, match="tags"):
        serialize_plan(PlanStep("sneaky <box>", []))
