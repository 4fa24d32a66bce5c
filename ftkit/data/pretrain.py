"""Shapes-world pretraining records for the tiny backbone: text-to-image, grounded captioning and judging.

Record ``i`` (1-based) of a set with seed ``seed`` becomes

* ``i % 3 != 0``: text-to-image on the correct scene of ``make_record(i, seed, kind="ok")``,
  ``{"task": "t2i", "prompt": PROMPT, "steps": [draft IMAGE]}`` (flow loss on the image given the prompt);
* ``i % 6 == 3``: grounded captioning of that correct scene, ``{"task": "edit", "prompt": "Describe the
  image.", "input_image": IMAGE, "steps": [plan CAPTION + BOXES]}`` (cross-entropy on the caption: colours,
  sizes, positions and boxes of every object, given the image only);
* ``i % 6 == 0``: judging, ``{"task": "t2i", "prompt": PROMPT, "steps": [draft DRAFT, reflect],
  "supervise": ["reflect"]}`` (cross-entropy on the reflection only; the draft is context, as in MCoT):
  a draft of ``make_record`` (correct with probability 1/2, else one of the shapes world's typed errors:
  missing or extra objects, wrong count, colour, position or attribute) and the reflection that judges it
  against the prompt (verdict, critique, regions). The counting / colour / position questions of GenEval's
  categories, asked as "does this image show PROMPT?", in the reflection format: the understanding
  expert learns the words and tags that MCoT fine-tuning later asks it to write. Without them those
  tokens are never targets in pretraining, and their ``lm_head`` rows all drift the same way (each step
  pushes every non-target logit down), so an adapter cannot tell them apart.

With ``plan_act`` (FoX's "plan & act" in pretraining), the text-to-image records with ``i % 3 == 2`` carry
the plan first: ``{"task": "t2i", "prompt": PROMPT, "steps": [plan CAPTION + BOXES, draft IMAGE]}`` (CE on
the plan, flow loss on the image given prompt and plan), so the base model already draws from a written
layout and MCoT fine-tuning does not have to teach it; text-to-image from the prompt alone keeps 1/3.

With ``correct`` (drawing with an image in context), a judging record whose draft is wrong also carries the
correction: ``"steps": [draft DRAFT, reflect, refine IMAGE]``, ``"supervise": ["reflect", "refine"]`` (flow
loss on the correct scene, mode ``regenerate``, given the prompt, the wrong draft and its reflection). BAGEL
is pretrained on interleaved data (edits, frame sequences), so it draws well with an image in its context;
without these records the tiny backbone never generates after an image, and every mode that does (FoX's
"generate twice", MCoT's correction) starts out of distribution. A twelfth of the records: the half of the
judging records whose draft is wrong.

``meta`` keeps the scene's GenEval metadata. Written like :func:`ftkit.data.shapes.generate` (temporary
folder renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ftkit.data.shapes import TAGS, _png_bytes, make_record

DESCRIBE = "Describe the image."


def pretrain_tag(index: int) -> str:
    """GenEval category of record ``index``, cycling through all six within each of the three tasks.

    (``make_record``'s default, ``TAGS[(index - 1) % 6]``, would tie the category to ``index % 3`` and so
    to the task: text-to-image would never see counting or colour-attribution prompts.)"""
    block, r = divmod(index, 3)
    if r:  # text-to-image: two of every three records
        return TAGS[(2 * block + r - 1) % len(TAGS)]
    return TAGS[((block - 1) // 2) % len(TAGS)]  # captioning and judging alternate


def pretrain_record(index: int, seed: int, size: int = 64, plan_act: bool = False,
                    correct: bool = False) -> tuple[dict, dict[str, bytes]]:
    """``(record, {image path: png})`` of record ``index``; its image is ``images/<id>.png`` (a correction's
    target ``images/<id>_refine.png``)."""
    judge = index % 6 == 0
    rec, images = make_record(index, seed, size, tag=pretrain_tag(index),
                              **({"error_rate": 0.5, "partial_rate": 0.0} if judge else {"kind": "ok"}))
    plan, draft = rec["steps"][0], rec["steps"][1]
    path = f"images/{rec['id']}.png"
    meta = {k: rec["meta"][k] for k in ("tag", "include", "exclude", "seed", "size")}
    pngs = {path: _png_bytes(images[draft["image"]])}
    if judge:
        meta["error"] = rec["meta"]["error"]
        out = {"id": rec["id"], "task": "t2i", "prompt": rec["prompt"], "input_image": None, "meta": meta,
               "steps": [{**draft, "image": path}, rec["steps"][2]], "supervise": ["reflect"]}
        if correct and meta["error"] is not None:
            refine = rec["steps"][3]
            fixed = f"images/{rec['id']}_refine.png"
            out["steps"].append({**refine, "image": fixed})
            out["supervise"].append("refine")
            pngs[fixed] = _png_bytes(images[refine["image"]])
    elif index % 3:
        steps = [{"type": "draft", "image": path, "partial": False}]
        out = {"id": rec["id"], "task": "t2i", "prompt": rec["prompt"], "input_image": None, "meta": meta,
               "steps": [plan, *steps] if plan_act and index % 3 == 2 else steps}
    else:
        out = {"id": rec["id"], "task": "edit", "prompt": DESCRIBE, "input_image": path, "meta": meta,
               "steps": [plan]}
    return out, pngs


def generate_pretrain(out: str | os.PathLike, n: int, seed: int = 2, size: int = 64, plan_act: bool = False,
                      correct: bool = False) -> Path:
    """Write ``n`` pretraining records to ``out/records.jsonl`` (+ ``out/images/``); refuses an existing ``out``.
    ``plan_act``: a third of all records are plan & act; ``correct``: wrong drafts' judging records carry the
    correction (module docstring)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; pretraining data is generated once")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        with open(tmp / "records.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for i in range(1, n + 1):
                rec, pngs = pretrain_record(i, seed, size, plan_act, correct)
                for path, png in pngs.items():
                    (tmp / path).write_bytes(png)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
