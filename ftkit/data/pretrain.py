"""Shapes-world pretraining records for the tiny backbone: text-to-image and grounded captioning.

Record ``i`` (1-based) of a set with seed ``seed`` takes the correct scene of
``make_record(i, seed, kind="ok")`` and becomes

* ``i % 3 != 0``: text-to-image, ``{"task": "t2i", "prompt": PROMPT, "steps": [draft IMAGE]}``
  (flow loss on the image given the prompt);
* ``i % 3 == 0``: understanding, ``{"task": "edit", "prompt": "Describe the image.", "input_image": IMAGE,
  "steps": [plan CAPTION + BOXES]}`` (cross-entropy on the grounded caption: colours, sizes, positions
  and boxes of every object, given the image only).

``meta`` keeps the scene's GenEval metadata. Written like :func:`ftkit.data.shapes.generate` (temporary
folder renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ftkit.data.shapes import _png_bytes, make_record

DESCRIBE = "Describe the image."


def pretrain_record(index: int, seed: int, size: int = 64) -> tuple[dict, bytes]:
    """``(record, png)`` of record ``index``; the record's image path is ``images/<id>.png``."""
    rec, images = make_record(index, seed, size, kind="ok")
    plan, draft = rec["steps"][0], rec["steps"][1]
    path = f"images/{rec['id']}.png"
    meta = {k: rec["meta"][k] for k in ("tag", "include", "exclude", "seed", "size")}
    if index % 3:
        out = {"id": rec["id"], "task": "t2i", "prompt": rec["prompt"], "input_image": None, "meta": meta,
               "steps": [{"type": "draft", "image": path, "partial": False}]}
    else:
        out = {"id": rec["id"], "task": "edit", "prompt": DESCRIBE, "input_image": path, "meta": meta,
               "steps": [plan]}
    return out, _png_bytes(images[draft["image"]])


def generate_pretrain(out: str | os.PathLike, n: int, seed: int = 2, size: int = 64) -> Path:
    """Write ``n`` pretraining records to ``out/records.jsonl`` (+ ``out/images/``); refuses an existing ``out``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; pretraining data is generated once")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        with open(tmp / "records.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for i in range(1, n + 1):
                rec, png = pretrain_record(i, seed, size)
                (tmp / f"images/{rec['id']}.png").write_bytes(png)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
