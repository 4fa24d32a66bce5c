"""Self-sampled critiques (process-driven generation's largest gain): the model's own drafts, judged.

For each prompt record the current model (base + adapter) plans and draws, exactly as the ablation's
``plan-act`` mode does (batched, prompt ``i`` from noise seed ``seed + i``); a judge decides whether the
draft satisfies the prompt and, when it does not, names the conflict. The result is written as ftkit
records (FoX's separate tasks), ready for a second round of training:

* ``<id>#self-reflect``: ``[plan (the model's own, when it parses), draft (its image), reflect (the judge's)]``,
  ``supervise: [reflect]``: reflections of the model's own outputs, correct drafts with verdict ``ok``;
  Each also carries ``rejected`` (a preference pair for DPO, :mod:`ftkit.data.preference`): with
  ``rejected="own"`` the model's own reflection on its draft where it is a wrong critique
  (:func:`wrong_own_reflection`: the other verdict, or ``revise`` flagging regions that miss the judge's),
  else (and with ``rejected="flip"``) the judge's with its verdict flipped
  (:func:`~ftkit.data.preference.flipped_reflection`);
* ``<id>#self-correct`` (drafts judged ``revise`` when the judge supplies a target image):
  ``[plan, draft, reflect, refine (target, the critique's mode)]``, ``supervise: [refine]``.

A judge is a callable ``judge(image, record, plan) -> Critique | None`` (``plan`` the parsed
:class:`~ftkit.data.schema.PlanStep` or ``None``); ``None`` skips the prompt. :func:`shapes_judge` is the
shapes world's: GenEval's rules (:func:`~ftkit.data.geneval.judge_image`) decide; each failed rule becomes
a sentence of the critique and its regions (:func:`conflict_regions`: the failed detection's box, kind
from the prompt's GenEval category; for a missing object the model's own plan boxes of it); the target is the
record's correct image (its last image step: a shapes record's refinement, or its draft when correct;
mode ``regenerate``), or with ``target="edit"`` the draft itself repaired where the rules fail
(:func:`repair_draft`; mode ``inpaint``, the regions then the edited boxes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ftkit.data.schema import BOX_MAX, PlanStep, ReflectStep
from ftkit.data.world import relative_position

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
    mode: str = "regenerate"  # the refine step's mode: how the target relates to the draft


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


def _label(d) -> str:
    """A detection's region label: colour and class, the class alone when it has no colour."""
    return f"{d.color} {d.cls}" if d.color else d.cls


def _bg_color(arr: np.ndarray) -> np.ndarray:
    """The image's background: the median colour of its one-pixel border."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return np.median(border, axis=0).astype(np.uint8)


def _overlaps(a, b, gap: int = 2) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _fits(box, avoid, relation) -> bool:
    """``box`` overlaps no box of ``avoid`` (2 px apart) and, with ``relation = (rel, target box)``, is
    ``rel`` the target by GenEval's rule."""
    return not any(_overlaps(box, a) for a in avoid) and (
        relation is None or relation[0] in relative_position(box, relation[1]))


def _free_cell(d: int, hw: tuple[int, int], avoid, near: tuple[float, float], relation=None):
    """The ``d x d`` cell (pixel box, exclusive ends) nearest to centre ``near`` that :func:`_fits`;
    ``None`` when there is none. Candidates every pixel up to 64 px, on a 64 x 64 lattice above."""
    h, w = hw
    step = max(1, min(h, w) // 64)
    best, best_d = None, None
    for y in range(0, h - d + 1, step):
        for x in range(0, w - d + 1, step):
            box = (x, y, x + d, y + d)
            if not _fits(box, avoid, relation):
                continue
            dist = (x + d / 2 - near[0]) ** 2 + (y + d / 2 - near[1]) ** 2
            if best_d is None or dist < best_d:
                best, best_d = box, dist
    return best


def repair_draft(image: Image.Image, meta: Mapping, plan: PlanStep | None = None, detector=None, color_fn=None,
                 max_edits: int = 8) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]] | None:
    """The draft repaired where the shapes rules fail, every other pixel kept: a correction target that
    inpainting the edited regions can reach (unlike the scene's own rendering, whose layout is another).

    One edit per round, then the rules are checked again (at most ``max_edits`` rounds): a detection in
    the wrong colour is erased and its shape painted again in the asked colour in the same cell; one in
    the wrong place is erased and painted in the nearest free cell where the relation holds; one too many
    is erased; a missing object is painted (colour: the prompt's, else the plan's label, else red) in its
    plan box when that is free, else in the nearest free cell. Erasing fills the detection's box (1 px
    around) with the background (the border's median colour). Returns ``(target, edits)``, ``edits`` the
    ``(label, pixel box)`` of every edited region (a recolouring: the asked-for label over old and new cell;
    a move: the object's old and new cells), or ``None`` when the draft already passes or the repaired image
    still fails the rules."""
    from ftkit.data.geneval import judge_image
    from ftkit.data.world import COLORS, shape_mask

    arr = np.asarray(image.convert("RGB")).copy()
    h, w = arr.shape[:2]
    bg = _bg_color(arr)
    wants = {req["class"]: req for req in meta["include"]}
    edits: list[tuple[str, tuple[int, int, int, int]]] = []  # (label, pixel box) of every edited region

    def erase(box) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = (max(0, int(box[0]) - 1), max(0, int(box[1]) - 1), min(w, int(np.ceil(box[2])) + 1),
                          min(h, int(np.ceil(box[3])) + 1))
        arr[y0:y1, x0:x1] = bg
        return x0, y0, x1, y1

    def paint(cls: str, color: str, cell) -> tuple[int, int, int, int]:
        x, y, d = int(cell[0]), int(cell[1]), int(cell[2] - cell[0])
        m = shape_mask(cls, d)
        arr[y:y + d, x:x + d][m] = COLORS[color]
        return x, y, x + d, y + d

    def cell_of(box) -> tuple[int, int, int, int]:
        """The square cell of a box's larger side, centred on it, inside the image."""
        d = max(4, min(h, w, int(round(max(box[2] - box[0], box[3] - box[1])))))
        x = min(max(0, int(round((box[0] + box[2] - d) / 2))), w - d)
        y = min(max(0, int(round((box[1] + box[3] - d) / 2))), h - d)
        return x, y, x + d, y + d

    def relation(req, dets, but=None):
        """``(rel, the target's box)`` for a positional requirement whose target is among ``dets``, else None."""
        if not req.get("position"):
            return None
        rel, t = req["position"]
        tcls = meta["include"][t]["class"]
        tbox = next((x.box for x in dets if x.cls == tcls and x is not but), None)
        return None if tbox is None else (rel, tbox)

    def centre(box) -> tuple[float, float]:
        return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2

    for _ in range(max_edits):
        j = judge_image(arr, meta, detector, color_fn)
        if j.passed:
            break
        if j.failed:
            d = j.failed[0]
            req = wants.get(d.cls) or {}
            rest = [x.box for x in j.detections if x is not d]
            if req.get("color") and d.color != req["color"]:  # wrong colour: the same shape, recoloured
                a, b = erase(d.box), paint(d.cls, req["color"], cell_of(d.box))
                edits.append((f"{req['color']} {d.cls}", (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]),
                                                           max(a[3], b[3]))))
            elif req.get("position"):  # wrong place: moved to the nearest cell where the relation holds
                rel = relation(req, j.detections, but=d)
                cell = cell_of(d.box)
                new = None if rel is None else _free_cell(cell[2] - cell[0], (h, w), rest, centre(d.box), rel)
                if new is None:
                    return None
                edits += [(_label(d), erase(d.box)), (_label(d), paint(d.cls, d.color if d.color in COLORS else "red", new))]
            else:  # one too many
                edits.append((_label(d), erase(d.box)))
        elif j.missing:
            cls = j.missing[0]
            req = wants.get(cls) or {}
            others = [x.box for x in j.detections]
            pboxes = [b for b in (plan.boxes if plan else ()) if cls in b.label]
            color = req.get("color") or next((c for b in pboxes for c in COLORS if c in b.label.split()), "red")
            if pboxes:
                want = cell_of([v / BOX_MAX * s for v, s in zip(pboxes[0].box, (w, h, w, h))])
            else:
                d_ = int(np.median([max(b[2] - b[0], b[3] - b[1]) for b in others])) if others else w // 4
                want = cell_of((w / 2 - d_ / 2, h / 2 - d_ / 2, w / 2 + d_ / 2, h / 2 + d_ / 2))
            rel = relation(req, j.detections)
            cell = want if _fits(want, others, rel) else _free_cell(want[2] - want[0], (h, w), others, centre(want), rel)
            if cell is None:
                return None
            edits.append((f"{color} {cls}", paint(cls, color, cell)))
        else:
            return None
    else:
        if not judge_image(arr, meta, detector, color_fn).passed:
            return None
    if not edits:
        return None
    return Image.fromarray(arr, mode="RGB"), edits


def conflict_regions(j, plan: PlanStep | None, hw: tuple[int, int], kind: str = "attribute") -> list[dict]:
    """Where a failed judgement ``j`` (:func:`~ftkit.data.geneval.judge_image` on an ``hw`` image) puts the
    conflict, as reflection regions (boxes in [0, ``BOX_MAX``]): each failed detection's box (``kind``), and
    for each missing class each box of the model's own ``plan`` whose label names it (kind ``missing``). A
    missing object the plan did not place has no region: nothing in the image shows where it belongs. The
    shapes judge writes these regions and the ablation's region IoU measures a reflection against them."""
    regions = [{"kind": kind, "label": _label(d), "box": _norm_box(d.box, hw)} for d in j.failed]
    for cls in dict.fromkeys(j.missing):  # a class missing n times is listed n times
        regions += [{"kind": "missing", "label": cls, "box": list(b.box)}
                    for b in (plan.boxes if plan else ()) if cls in b.label]
    return regions


def shapes_judge(root: str | os.PathLike | None = None, detector=None, color_fn=None, target: str = "scene") -> Callable:
    """The shapes world's judge (module docstring); ``root``: the folder image paths of records are relative to.

    ``target``: a failed draft's correction target: ``"scene"`` the record's own correct image (a new
    layout: refine mode ``regenerate``), or ``"edit"`` the draft repaired by :func:`repair_draft` (refine
    mode ``inpaint``; the critique's regions are then the edited boxes, so the reflection names what the
    correction redraws; a draft it cannot repair gets no target)."""
    from ftkit.data.geneval import judge_image

    if target not in ("scene", "edit"):
        raise ValueError(f"target {target!r}: choose scene or edit")
    base = Path(root) if root is not None else None

    def judge(image: Image.Image, record: Mapping, plan: PlanStep | None) -> Critique:
        meta = record["meta"]
        j = judge_image(image, meta, detector, color_fn)
        if j.passed:
            return Critique("ok", f"The image matches the prompt: {record['prompt']}.")
        hw = (image.height, image.width)
        kind = _KIND.get(meta.get("tag"), "attribute")
        regions = conflict_regions(j, plan, hw, kind)
        critique = " ".join(_sentence(r) for r in j.reason.splitlines() if r)
        if target == "edit":
            fixed = repair_draft(image, meta, plan, detector, color_fn)
            if fixed is None:
                return Critique("revise", critique, regions, None)
            edited = [{"kind": kind, "label": label, "box": _norm_box(b, hw)} for label, b in fixed[1]]
            return Critique("revise", critique, edited, fixed[0], mode="inpaint")
        tgt = None
        images = [s.get("image") for s in record.get("steps") or () if isinstance(s, Mapping) and s.get("image")]
        if images and base is not None:
            with Image.open(base / images[-1]) as im:
                tgt = im.convert("RGB")
        return Critique("revise", critique, regions, tgt)

    return judge


def load_judge(spec: str, root: str | os.PathLike | None = None, target: str = "scene") -> Callable:
    """``"shapes"`` -> :func:`shapes_judge` (``root``: the prompts' folder, ``target`` its correction target);
    ``"package.module:function"`` -> that callable (``target`` must stay ``"scene"``). Raises ValueError for a
    malformed spec, an import failure or a target a custom judge cannot take."""
    if spec == "shapes":
        return shapes_judge(root, target=target)
    if target != "scene":
        raise ValueError(f"--target {target}: only the shapes judge repairs drafts; a custom judge returns its own target")
    from ftkit.infer.load import import_spec

    fn = import_spec(spec, "--judge", "'shapes' or MODULE:FUNCTION")
    if not callable(fn):
        raise ValueError(f"--judge {spec!r}: {type(fn).__name__} is not callable")
    return fn


REGION_IOU_MIN = 0.5  # a `revise` whose regions cover the judge's less than this flags the wrong place


def wrong_own_reflection(mine: ReflectStep | None, judge: Critique, hw: tuple[int, int]) -> ReflectStep | None:
    """The model's own reflection ``mine`` when it is a wrong critique of its draft, for a DPO pair's rejected
    side: the verdict differs from the judge's, or both say ``revise`` and ``mine``'s regions cover the judge's
    with IoU below :data:`REGION_IOU_MIN` (on an ``hw`` image; a judge without regions checks the verdict
    only); else ``None`` (unparsed, or right). Pairs that differ only in the verdict word teach the verdict;
    these also teach where the conflict is."""
    if mine is None:
        return None
    if mine.verdict != judge.verdict:
        return mine
    if judge.verdict == "revise" and judge.regions:
        from ftkit.infer.ablation import regions_iou

        if regions_iou([g.box for g in mine.regions], [g["box"] for g in judge.regions], hw) < REGION_IOU_MIN:
            return mine
    return None


def self_critique(model, tokenizer, records: Sequence[Mapping], judge: Callable, out_dir: str | os.PathLike, *,
                  batch_size: int = 16, image_hw: tuple[int, int] = (64, 64), sampler=None, text=None,
                  seed: int = 0, progress: bool = True, rejected: str = "own") -> dict:
    """Sample plan + draft for every record, judge each draft, write the records (module docstring) and their
    images into the existing, empty folder ``out_dir`` (``records.jsonl``, ``images/``, ``summary.json``).

    ``rejected``: ``"own"`` also decodes the model's reflection on each draft (module docstring; the summary
    then has ``own_verdict_accuracy``, the model's verdicts against the judge's, unparsed ones wrong), ``"flip"``
    does not.

    Returns the summary: prompts, drafts judged ok / revise, records written, skipped prompts, the
    verdict of every draft in order, how many rejected reflections are the model's own (``rejected_own``; of
    them ``rejected_own_regions`` with the judge's verdict and the wrong regions)."""
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
    lines, verdicts, skipped, own, own_regions, agree = [], [], 0, 0, 0, []
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
        worse = wrong_own_reflection(mine, c, draft.size[::-1])  # parsed: no stray tags
        own += worse is not None
        own_regions += worse is not None and worse.verdict == c.verdict
        if worse is None:
            worse = flipped_reflection(StepRecord.from_dict(line, str(out / "records.jsonl"), len(lines), base_dir=out))
        line["rejected"] = step_to_dict(worse)
        lines.append(line)
        if c.verdict == "revise" and c.target is not None:
            target_path = f"images/{stem}_target.png"
            c.target.convert("RGB").resize(draft.size).save(out / target_path)
            lines.append({"id": f"{row['id']}#self-correct", "task": "t2i", "prompt": rec["prompt"],
                          "input_image": None, "meta": meta,
                          "steps": [*steps, {"type": "refine", "image": target_path, "mode": c.mode}],
                          "supervise": ["refine"]})
    with open(out / "records.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for r in lines:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {"prompts": len(records), "ok": verdicts.count("ok"), "revise": verdicts.count("revise"),
               "skipped": skipped, "records": len(lines),
               "corrections": sum(1 for r in lines if r["id"].endswith("#self-correct")),
               "plan_act_score": res["scores"]["plan-act"], "verdicts": verdicts, "rejected_own": own,
               "rejected_own_regions": own_regions,
               "rejected_flipped": sum(1 for r in lines if "rejected" in r) - own,
               "own_verdict_accuracy": sum(agree) / len(agree) if agree else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
