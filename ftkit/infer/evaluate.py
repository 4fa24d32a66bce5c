"""Shapes-world evaluation by GenEval's rules: direct text-to-image vs the full MCoT loop.

For every eval record (a prompt with GenEval metadata ``{"tag", "include", "exclude"}``) the model
generates

* ``direct``: one image with :func:`~ftkit.infer.mcot.text_to_image` (upstream's plain T2I), and
* ``mcot``: the final image of :func:`~ftkit.infer.mcot.run_mcot` (plan -> draft -> reflect -> refine,
  up to ``rounds`` images; the draft is scored too, as ``mcot_draft``),

from the same seed (``seed + i`` for record ``i``; with greedy text decoding the MCoT draft starts from
the same noise as the direct image). Each image is judged by :func:`ftkit.data.geneval.evaluate_image`
against the record's metadata: pass/fail and the violated rules. A category's score is the mean pass
rate over its prompts and ``overall`` the mean over the categories present, the rule of
:func:`ftkit.data.geneval.evaluate`.

Detector hook
-------------
``detector`` is anything satisfying :class:`ftkit.data.geneval.Detector`, i.e. a
``detect(image: np.ndarray[H, W, 3] uint8) -> list[Detection]`` method, ``Detection(cls, color, box,
score)`` with ``box = (x0, y0, x1, y1)`` in pixels. The default (``None``) is the shapes world's colour
segmentation detector (:class:`ftkit.data.geneval.ColorShapeDetector`). GenEval's own detector plugs in
the same way on a GPU machine that has its weights (not run here): a class whose ``detect`` runs
mmdetection's Mask2Former (``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``) through
``inference_detector``, keeps boxes with score >= 0.3 (0.9 for counting prompts), at most 16 per class,
and returns ``color=None``; pass GenEval's CLIP ViT-L/14 colour classifier of the masked crop as
``color_fn(image, detection) -> colour name``, and eval records whose metadata name COCO classes. On
the command line: ``ftkit eval shapes --detector package.module:factory`` (the factory's object is
used as ``detector``, and its ``color`` method, when it has one, as ``color_fn``).

FoX's ablation (``ftkit eval shapes --ablation``) lives in :mod:`ftkit.infer.ablation` and uses this
module's scoring and contact-sheet helpers.

Files (when ``out_dir`` is given): ``images/STEM_direct.png``, ``traces/STEM*`` (the MCoT trace as
written by :meth:`~ftkit.infer.mcot.Trace.save`, including its contact sheet), ``failures/STEM.png``
(for every prompt that either mode failed: the MCoT contact sheet above a row with the direct image,
the MCoT final image, each with the detector's boxes drawn, and the reasons), ``results.json`` and
``results.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ftkit.data.geneval import GENEVAL_TAGS, Detector, default_detector, evaluate_image
from ftkit.files import atomic_write

MODES = ("direct", "mcot")


# ------------------------------------------------------------------------------------ records
def check_modes(modes: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """``modes`` as a tuple; raises ValueError unless they are distinct values among ``known``."""
    modes = tuple(modes)
    if not modes or any(m not in known for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct values among {tuple(known)}, got {modes}")
    return modes


def _fields(rec, i: int) -> tuple[str, str, dict]:
    """(id, prompt, meta) of a StepRecord or a dict; raises ValueError naming the record and field."""
    if isinstance(rec, Mapping):
        rid, prompt, meta = rec.get("id", str(i)), rec.get("prompt"), rec.get("meta")
    else:
        rid, prompt, meta = getattr(rec, "id", str(i)), getattr(rec, "prompt", None), getattr(rec, "meta", None)
    where = f"record {i} ({rid})"
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field prompt missing or empty")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("tag"), str):
        raise ValueError(f"{where}: field meta.tag missing (an eval record needs GenEval metadata: tag, include, "
                         "exclude)")
    if not isinstance(meta.get("include"), list) or not meta["include"]:
        raise ValueError(f"{where}: field meta.include missing or empty")
    return str(rid), prompt, dict(meta)


def balanced_subset(records: Sequence, n: int) -> list:
    """``n`` records taken round-robin over the categories (``meta.tag``) in order of first appearance,
    each category's records in their own order; all records when ``n >= len(records)``. On the shipped
    ``shapes-eval`` (tags cycle) this is the first ``n`` records.

    Raises:
        ValueError: ``n < 1`` or a record without ``meta.tag``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    groups: dict[str, list] = {}
    for i, r in enumerate(records):
        groups.setdefault(_fields(r, i)[2]["tag"], []).append(r)
    out, k = [], 0
    while len(out) < min(n, len(records)):
        for g in groups.values():
            if k < len(g) and len(out) < n:
                out.append(g[k])
        k += 1
    return out


# ------------------------------------------------------------------------------------ scores
def category_scores(passes: Mapping[str, Sequence[bool]]) -> dict[str, float | None]:
    """``{tag: [passed, ...]}`` -> ``{six GenEval tags (None when absent), other tags, "overall"}``;
    ``overall`` is the mean of the scores of the categories present."""
    scores: dict[str, float | None] = {t: (float(np.mean(passes[t])) if passes.get(t) else None) for t in GENEVAL_TAGS}
    for t in sorted(set(passes) - set(GENEVAL_TAGS)):
        if passes[t]:
            scores[t] = float(np.mean(passes[t]))
    present = [v for v in scores.values() if v is not None]
    scores["overall"] = float(np.mean(present)) if present else None
    return scores


def results_table(scores: Mapping[str, Mapping[str, float | None]], counts: Mapping[str, int] | None = None) -> str:
    """Markdown table: one row per mode, columns GenEval's six categories (always; ``-`` when a category
    had no prompts), any other category, then ``overall``; with ``counts`` a last row of prompts per column."""
    cols = list(GENEVAL_TAGS)
    for s in scores.values():
        cols += [c for c in s if c not in cols and c != "overall"]
    cols.append("overall")
    lines = ["| mode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join("-" if s.get(c) is None else f"{s[c]:.3f}" for c in cols) + " |")
    if counts is not None:
        total = sum(counts.values())
        lines.append("| prompts | " + " | ".join(str(counts.get(c, 0)) if c != "overall" else str(total)
                                                for c in cols) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ failure sheets
# the MCoT contact sheet's cells and font (one look for every sheet ftkit writes)
from ftkit.infer.mcot import _font  # noqa: E402
from ftkit.infer.mcot import _text_cell as _panel_text  # noqa: E402


def _panel_image(image, title: str, dets, cell: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (cell, cell + 16), "white")
    pic = image.convert("RGB").resize((cell, cell), Image.NEAREST)
    sx, sy = cell / image.width, cell / image.height
    d = ImageDraw.Draw(pic)
    for det in dets:
        x0, y0, x1, y1 = det.box
        d.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline="#ff3b30", width=2)
        d.text((x0 * sx + 2, y0 * sy + 1), f"{det.color or ''} {det.cls}".strip(), fill="#ff3b30", font=_font())
    im.paste(pic, (0, 16))
    ImageDraw.Draw(im).text((3, 2), title, fill="black", font=_font())
    return im


def failure_sheet(prompt: str, judged: Mapping[str, tuple], trace=None, detector: Detector | None = None,
                  cell: int = 192):
    """Contact sheet of one prompt: the MCoT trace's own sheet (when given) above a row with, per mode,
    the image with the detector's boxes and a panel with the verdict and the violated rules.

    ``judged`` maps mode -> ``(image, passed, reason)``. Returns a PIL image.
    """
    from PIL import Image

    from ftkit.infer.mcot import contact_sheet

    det = default_detector() if detector is None else detector
    panels = [_panel_text(prompt, "prompt", cell)]
    for mode, (image, passed, reason) in judged.items():
        dets = det.detect(np.asarray(image.convert("RGB")))
        panels.append(_panel_image(image, f"{mode}: {'pass' if passed else 'FAIL'}", dets, cell))
        found = ", ".join(f"{d.color or ''} {d.cls}".strip() for d in dets) or "nothing"
        panels.append(_panel_text(f"{reason or 'ok'}\n\ndetected: {found}", f"{mode} rules", cell))
    row = Image.new("RGB", (cell * len(panels), cell + 16), "white")
    for i, p in enumerate(panels):
        row.paste(p, (i * cell, 0))
    if trace is None:
        return row
    top = contact_sheet(trace, cell)
    sheet = Image.new("RGB", (max(top.width, row.width), top.height + row.height), "white")
    sheet.paste(top, (0, 0))
    sheet.paste(row, (0, top.height))
    return sheet


def _save_png(image, path: Path) -> None:
    atomic_write(path, lambda fh: image.save(fh, format="PNG"))


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_shapes(model, tokenizer, records: Sequence, *, detector: Detector | None = None, color_fn=None,
                    modes: Sequence[str] = MODES, rounds: int = 2, image_hw: tuple[int, int] = (64, 64),
                    plan: bool = True, sampler=None, text=None, seed: int = 0,
                    out_dir: str | os.PathLike | None = None, progress: bool = True, info: dict | None = None) -> dict:
    """Score direct T2I and full MCoT on eval records by GenEval's rules (see the module docstring).

    Args:
        model, tokenizer: from :func:`ftkit.infer.load.load_for_inference` (base, + adapter, or merged).
        records: :class:`~ftkit.data.schema.StepRecord` s or dicts with ``prompt``, ``meta`` (GenEval
            metadata with ``tag``) and optionally ``id`` -- e.g. ``load_records("shapes-eval")``.
        detector: a :class:`ftkit.data.geneval.Detector` (default: the shapes-world colour detector).
        color_fn: ``color_fn(image, detection) -> colour`` for detectors that return ``color=None``.
        modes: any of ``"direct"``, ``"mcot"``.
        rounds, plan, image_hw, sampler, text: passed to :func:`~ftkit.infer.mcot.run_mcot` /
            :func:`~ftkit.infer.mcot.text_to_image`.
        seed: record ``i`` uses a CPU generator seeded with ``seed + i`` (the same for both modes).
        out_dir: when given (an existing folder), write images, traces, failure sheets, ``results.json``
            and ``results.md`` there.
        info: extra JSON-able fields for the result (model / adapter paths, data name).

    Returns:
        ``{"n", "modes", "counts": {tag: prompts}, "scores": {mode: {tag | "overall": score or None}},
        "mcot_draft": scores of the MCoT drafts (when mcot ran), "prompts": [per-prompt dict with, per
        mode, passed / reason / image file], "settings", "detector", "seconds", "failure_sheets", **info}``.

    Raises:
        ValueError: no records, a record without prompt / ``meta.tag`` / ``meta.include`` (names the
            record index and id), an unknown mode, ``rounds < 1`` or an image size the model cannot make.
    """
    from tqdm.auto import tqdm

    from ftkit.infer.mcot import SamplerSettings, TextSettings, run_mcot, text_to_image
    from ftkit.infer.sampler import latent_grid

    modes = check_modes(modes, MODES)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not records:
        raise ValueError("evaluate_shapes: no records")
    fields = [_fields(r, i) for i, r in enumerate(records)]  # validate all before generating anything
    latent_grid(model, image_hw)
    if detector is not None and not isinstance(detector, Detector):
        raise ValueError(f"detector {type(detector).__name__} has no detect(image) method (ftkit.data.geneval.Detector)")
    sampler = sampler or SamplerSettings()
    text = text or TextSettings()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        for sub in ("images", "traces", "failures"):
            (out / sub).mkdir(parents=True, exist_ok=True)

    def judge(image, meta, where: str) -> tuple[bool, str]:
        try:
            return evaluate_image(image, meta, detector, color_fn)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    t_all = time.perf_counter()
    passes: dict[str, dict[str, list[bool]]] = {m: {} for m in (*modes, "mcot_draft")}
    per_prompt, n_sheets = [], 0
    for i, (rid, prompt, meta) in enumerate(tqdm(fields, desc="eval shapes", unit="prompt", disable=not progress)):
        where = f"record {i} ({rid})"
        stem = f"{i:04d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in rid)}"
        entry: dict = {"index": i, "id": rid, "prompt": prompt, "tag": meta["tag"], "seed": seed + i}
        judged, trace = {}, None
        if "direct" in modes:
            image = text_to_image(model, tokenizer, prompt, image_hw=image_hw, sampler=sampler,
                                  generator=torch.Generator().manual_seed(seed + i))
            ok, reason = judge(image, meta, where)
            judged["direct"] = (image, ok, reason)
            entry["direct"] = {"passed": ok, "reason": reason}
            if out is not None:
                _save_png(image, out / "images" / f"{stem}_direct.png")
                entry["direct"]["image"] = f"images/{stem}_direct.png"
        if "mcot" in modes:
            trace = run_mcot(model, tokenizer, prompt, rounds=rounds, image_hw=image_hw, plan=plan, sampler=sampler,
                             text=text, generator=torch.Generator().manual_seed(seed + i))
            ok, reason = judge(trace.final_image, meta, where)
            d_ok, d_reason = judge(trace.rounds[0].image, meta, where) if len(trace.rounds) > 1 else (ok, reason)
            judged["mcot"] = (trace.final_image, ok, reason)
            entry["mcot"] = {"passed": ok, "reason": reason, "rounds": len(trace.rounds), "stopped_ok": trace.stopped_ok,
                             "plan_parsed": trace.plan_parse_error is None,
                             "draft_passed": d_ok, "draft_reason": d_reason}
            passes["mcot_draft"].setdefault(meta["tag"], []).append(d_ok)
            if out is not None:
                paths = trace.save(out / "traces", stem)
                entry["mcot"]["image"] = f"traces/{paths['final'].name}"
                entry["mcot"]["trace"] = f"traces/{paths['json'].name}"
        for m in modes:
            passes[m].setdefault(meta["tag"], []).append(entry[m]["passed"])
        if out is not None and not all(entry[m]["passed"] for m in modes):
            sheet = failure_sheet(prompt, judged, trace, detector)
            _save_png(sheet, out / "failures" / f"{stem}.png")
            entry["failure_sheet"] = f"failures/{stem}.png"
            n_sheets += 1
        per_prompt.append(entry)

    counts: dict[str, int] = {}
    for _, _, meta in fields:
        counts[meta["tag"]] = counts.get(meta["tag"], 0) + 1
    scores = {m: category_scores(passes[m]) for m in modes}
    res = {
        **(info or {}),
        "n": len(fields), "modes": list(modes), "counts": counts, "scores": scores,
        "mcot_draft": category_scores(passes["mcot_draft"]) if "mcot" in modes else None,
        "settings": {"rounds": rounds, "plan": plan, "image_hw": list(image_hw), "seed": seed,
                     "sampler": {**sampler.kwargs(), "cfg_interval": list(sampler.cfg_interval)},
                     "text": {"max_plan_tokens": text.max_plan_tokens, "max_reflect_tokens": text.max_reflect_tokens}},
        "detector": type(detector if detector is not None else default_detector()).__name__,
        "failure_sheets": n_sheets, "prompts": per_prompt, "seconds": round(time.perf_counter() - t_all, 3),
    }
    if out is not None:
        for name, body in (("results.json", json.dumps(res, indent=2)),
                           ("results.md", _markdown(res))):
            atomic_write(out / name, body.encode())
    return res


def _markdown(res: dict) -> str:
    s = res["settings"]
    lines = ["# Shapes-world evaluation (GenEval rules)", ""]
    for k in ("model", "adapter", "data"):
        if res.get(k):
            lines.append(f"- {k}: `{res[k]}`")
    lines += [f"- prompts: {res['n']}; detector: {res['detector']}; image {s['image_hw'][0]}x{s['image_hw'][1]}, "
              f"{s['sampler']['num_timesteps']} steps, MCoT up to {s['rounds']} rounds; seed {s['seed']}", "",
              results_table(res["scores"], res["counts"]), ""]
    if res.get("mcot_draft"):
        lines += ["MCoT draft only (before reflection / refinement):", "",
                  results_table({"mcot draft": res["mcot_draft"]}), ""]
    lines.append(f"{res['failure_sheets']} prompt(s) failed in at least one mode: contact sheets in `failures/`.")
    return "\n".join(lines) + "\n"


__all__ = ["MODES", "balanced_subset", "category_scores", "check_modes", "evaluate_shapes", "failure_sheet", "results_table"]
