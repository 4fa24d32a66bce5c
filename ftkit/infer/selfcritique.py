"""Self-sampled critiques (process-driven generation's largest gain): the model's own drafts, judged.

For each prompt record the current model (base + adapter) plans and draws, exactly as the ablation's
``plan-act`` mode does (batched, prompt ``i`` from noise seed ``seed + i``); a judge decides whether the
draft satisfies the prompt and, when it does not, names the conflict. The result is written as ftkit
records (FoX's separate tasks), ready for a second round of training:

* ``<id>#self-reflect``: ``[plan (the model's own, when it parses), draft (its image), reflect (the judge's)]``,
  ``supervise: [reflect]``: reflections of the model's own outputs, correct drafts with verdict ``ok``;
  Each also carries ``rejected`` (a preference pair for DPO, :mod:`ftkit.data.preference`): with
  ``rejected="own"`` the model's own reflection on its draft where its verdict disagrees with the judge's,
  else (and with ``rejected="flip"``) the judge's with its verdict flipped
  (:func:`~ftkit.data.preference.flipped_reflection`);
* ``<id>#self-correct`` (drafts judged ``revise`` when the judge supplies a target image):
  ``[plan, draft, reflect, refine (target, regenerate)]``, ``supervise: [refine]``.

A judge is a callable ``judge(image, record, plan) -> Critique | None`` (``plan`` the parsed
:class:`~ftkit.data.schema.PlanStep` or ``None``); ``None`` skips the prompt. :func:`shapes_judge` is the
shapes world's: GenEval's rules (:func:`~ftkit.data.geneval.judge_image`) decide; each failed rule becomes
a sentence of the critique and a region (kind from the prompt's GenEval category; the detection's box,
or for a missing object the model's own plan box of it, else the whole image); the target is the
record's correct image (its last image step: a shapes record's refinement, or its draft when correct).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ftkit.data.schema import BOX_MAX, PlanStep

# the region kind a failed detection gets, by the prompt's GenEval category
_KIND = {"single_object": "missing", "two_object": "missing", "counting": "count", "colors": "color",
         "position": "position", "color_attr": "color"}


@dataclass
class Critique:
    """A judge's answer for one draft: ``verdict`` ok | revise, a one-paragraph ``critique``, ``regions``
    (dicts ``{"kind", "label", "box": [x0, y0, x1, y1] in 0..1000}``) and an optional corrected ``target``."""

    verdict: str
    critique: str
    regions: list[dict] = field(default_factory=list)
    target: Image.Image | None = None


def _norm_box(box, hw: tuple[int, int]) -> list[int]:
    h, w = hw
    x0, y0, x1, y1 = box
    b = [round(x0 / w * BOX_MAX), round(y0 / h * BOX_MAX), round(x1 / w * BOX_MAX), round(y1 / h * BOX_MAX)]
    b = [min(BOX_MAX, max(0, v)) for v in b]
    if b[2] <= b[0] or b[3] <= b[1]:
        return [0, 0, BOX_MAX, BOX_MAX]
    return b


def _sentence(reason: str) -> str:
    return reason[0].upper() + reason[1:].replace(">=", " at least ").replace("<", " fewer than ") + "."


def shapes_judge(root: str | os.PathLike | None = None, detector=None, color_fn=None) -> Callable:
    """The shapes world's judge (module docstring); ``root``: the folder image paths of records are relative to."""
    from ftkit.data.geneval import judge_image

    base = Path(root) if root is not None else None

    def judge(image: Image.Image, record: Mapping, plan: PlanStep | None) -> Critique:
        meta = record["meta"]
        j = judge_image(image, meta, detector, color_fn)
        if j.passed:
            return Critique("ok", f"The image matches the prompt: {record['prompt']}.")
        hw = (image.height, image.width)
        kind = _KIND.get(meta.get("tag"), "attribute")
        regions = [{"kind": kind, "label": f"{d.color} {d.cls}" if d.color else d.cls, "box": _norm_box(d.box, hw)}
                   for d in j.failed]
        for cls in j.missing:
            boxes = [b.box for b in (plan.boxes if plan else ()) if cls in b.label]
            regions.append({"kind": "missing", "label": cls, "box": list(boxes[0]) if boxes else [0, 0, BOX_MAX, BOX_MAX]})
        target = None
        images = [s.get("image") for s in record.get("steps") or () if isinstance(s, Mapping) and s.get("image")]
        if images and base is not None:
            with Image.open(base / images[-1]) as im:
                target = im.convert("RGB")
        critique = " ".join(_sentence(r) for r in j.reason.splitlines() if r)
        return Critique("revise", critique, regions, target)

    return judge


def load_judge(spec: str, root: str | os.PathLike | None = None) -> Callable:
    """``"shapes"`` -> :func:`shapes_judge` (``root``: the prompts' folder); ``"package.module:function"`` -> that
    callable. Raises ValueError for a malformed spec or an import failure."""
    if spec == "shapes":
        return shapes_judge(root)
    from ftkit.infer.load import import_spec

    fn = import_spec(spec, "--judge", "'shapes' or MODULE:FUNCTION")
    if not callable(fn):
        raise ValueError(f"--judge {spec!r}: {type(fn).__name__} is not callable")
    return fn


def self_critique(model, tokenizer, records: Sequence[Mapping], judge: Callable, out_dir: str | os.PathLike, *,
                  batch_size: int = 16, image_hw: tuple[int, int] = (64, 64), sampler=None, text=None,
                  seed: int = 0, progress: bool = True, rejected: str = "own") -> dict:
    """Sample plan + draft for every record, judge each draft, write the records (module docstring) and their
    images into the existing, empty folder ``out_dir`` (``records.jsonl``, ``images/``, ``summary.json``).

    ``rejected``: ``"own"`` also decodes the model's reflection on each draft (module docstring; the summary
    then has ``own_verdict_accuracy``, the model's verdicts against the judge's, unparsed ones wrong), ``"flip"``
    does not.

    Returns the summary: prompts, drafts judged ok / revise, records written, skipped prompts, the
    verdict of every draft in order, how many rejected reflections are the model's own."""
    from ftkit.data.preference import flipped_reflection
    from ftkit.data.schema import StepRecord, step_to_dict
    from ftkit.data.serialize import ParseError, parse_plan, parse_reflection
    from ftkit.infer.ablation import run_ablation

    if rejected not in ("own", "flip"):
        raise ValueError(f"rejected {rejected!r}: choose own or flip")
    out = Path(out_dir)
    res = run_ablation(model, tokenizer, records, modes=("plan-act",), batch_size=batch_size, image_hw=image_hw,
                       sampler=sampler, text=text, seed=seed, out_dir=out / "sampled", n_boot=10, progress=progress,
                       reflect=rejected == "own")
    (out / "images").mkdir(exist_ok=True)
    lines, verdicts, skipped, own, agree = [], [], 0, 0, []
    for rec, row in zip(records, res["prompts"]):
        src = out / "sampled" / row["plan-act"]["image"]
        with Image.open(src) as im:
            draft = im.convert("RGB")
        ptxt = row["plan"]["text"]
        try:
            plan = parse_plan(ptxt)
        except ParseError:
            plan = None
        c = judge(draft, rec, plan)
        if c is None:
            skipped += 1
            verdicts.append(None)
            continue
        if c.verdict not in ("ok", "revise"):
            raise ValueError(f"record {row['id']}: judge returned verdict {c.verdict!r} (ok | revise)")
        verdicts.append(c.verdict)
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in row["id"])
        draft_path = f"images/{stem}_draft.png"
        draft.save(out / draft_path)
        # an unparseable plan cannot be written as a plan step (its text breaks the format): the record
        # then reflects on the draft with the prompt alone as context
        plan_step = [step_to_dict(plan)] if plan is not None else []
        reflect = {"type": "reflect", "verdict": c.verdict, "critique": c.critique, "regions": c.regions, "mask": None}
        meta = {k: v for k, v in dict(rec.get("meta") or {}).items() if k != "error"}  # the source draft's error
        meta["self_critique"] = {"verdict": c.verdict, "seed": seed + row["index"], "plan_parsed": plan is not None}
        steps = [*plan_step, {"type": "draft", "image": draft_path, "partial": False}, reflect]
        line = {"id": f"{row['id']}#self-reflect", "task": "t2i", "prompt": rec["prompt"], "input_image": None,
                "meta": meta, "steps": steps, "supervise": ["reflect"]}
        mine = None
        if rejected == "own":
            try:
                mine = parse_reflection(row["reflection"]["text"])
            except ParseError:
                mine = None
            agree.append(mine is not None and mine.verdict == c.verdict)
        worse = mine if mine is not None and mine.verdict != c.verdict else None  # parsed: no stray tags
        own += worse is not None
        if worse is None:
            worse = flipped_reflection(StepRecord.from_dict(line, str(out / "records.jsonl"), len(lines), base_dir=out))
        line["rejected"] = step_to_dict(worse)
        lines.append(line)
        if c.verdict == "revise" and c.target is not None:
            target_path = f"images/{stem}_target.png"
            c.target.convert("RGB").resize(draft.size).save(out / target_path)
            lines.append({"id": f"{row['id']}#self-correct", "task": "t2i", "prompt": rec["prompt"],
                          "input_image": None, "meta": meta,
                          "steps": [*steps, {"type": "refine", "image": target_path, "mode": "regenerate"}],
                          "supervise": ["refine"]})
    with open(out / "records.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for r in lines:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {"prompts": len(records), "ok": verdicts.count("ok"), "revise": verdicts.count("revise"),
               "skipped": skipped, "records": len(lines),
               "corrections": sum(1 for r in lines if r["id"].endswith("#self-correct")),
               "plan_act_score": res["scores"]["plan-act"], "verdicts": verdicts, "rejected_own": own,
               "rejected_flipped": sum(1 for r in lines if "rejected" in r) - own,
               "own_verdict_accuracy": sum(agree) / len(agree) if agree else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
