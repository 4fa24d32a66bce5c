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

Ablation (:func:`run_ablation`, ``ftkit eval shapes --ablation``): FoX's modes ``base``, ``t2i``,
``t2i-twice``, ``plan-act``, ``mcot`` (verdict-gated correction by inpainting the flagged regions),
``mcot-regen`` and ``plan-guided`` (GoT's plan guidance) on the same prompts, batched through the sampler, with paired bootstrap intervals of the
differences, reflection quality and seconds per prompt. Its prompts are a held-out split: seed
:data:`ABLATION_SEED` = 1011 (training data uses seed 0, the shipped ``shapes-eval`` seed 1), 600 records,
generated on demand by :func:`ablation_records` -- the same records as
``ftkit data shapes --out DIR --n 600 --seed 1011``. The detector was developed on seed 2022, never on these.

Files (when ``out_dir`` is given): ``images/STEM_direct.png``, ``traces/STEM*`` (the MCoT trace as
written by :meth:`~ftkit.infer.mcot.Trace.save`, including its contact sheet), ``failures/STEM.png``
(for every prompt that either mode failed: the MCoT contact sheet above a row with the direct image,
the MCoT final image, each with the detector's boxes drawn, and the reasons), ``results.json`` and
``results.md``.
"""

from __future__ import annotations

import contextlib
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

    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct values among {MODES}, got {modes}")
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




# ==================================================================================== ablation
ABLATION_MODES = ("base", "t2i", "t2i-twice", "plan-act", "mcot")
ALL_ABLATION_MODES = (*ABLATION_MODES, "mcot-regen", "plan-guided")
# plan-guided's plan scale when the sampler sets none: GoT's spatial / semantic ratio (4.0 / 7.5) at text scale 4
PLAN_GUIDANCE_SCALE = 2.0
ABLATION_SEED = 1011  # held-out: training data uses seed 0, the shipped shapes-eval seed 1
ABLATION_N = 600
DIFFERENCES = (("mcot", "t2i-twice"), ("plan-act", "t2i-twice"), ("mcot", "plan-act"), ("plan-guided", "plan-act"))
# which pipeline stages each mode needs (for its seconds per prompt)
_STAGES = {"base": ("base",), "t2i": ("t2i",), "t2i-twice": ("t2i", "twice"), "plan-act": ("plan", "draft"),
           "mcot": ("plan", "draft", "reflect", "inpaint"), "mcot-regen": ("plan", "draft", "reflect", "regen"),
           "plan-guided": ("plan", "guided")}


def ablation_records(n: int = ABLATION_N, seed: int = ABLATION_SEED, size: int = 64,
                     cache_dir: str | os.PathLike | None = None) -> tuple[list[dict], Path]:
    """The ablation's held-out prompts: ``n`` shapes-world records of seed ``seed`` (tags cycling, so every
    prefix is category-balanced), generated on first use into ``cache_dir`` (default ``$FTKIT_CACHE`` or
    ``~/.cache/ftkit``) as ``shapes-ablation-s{seed}-n{n}-{size}`` -- the same bytes as
    ``ftkit data shapes --out DIR --n n --seed seed --size size``. Returns ``(records, folder)``."""
    from ftkit.data import shapes
    from ftkit.data.geneval import read_records

    root = Path(cache_dir or os.environ.get("FTKIT_CACHE") or Path.home() / ".cache" / "ftkit")
    folder = root / f"shapes-ablation-s{seed}-n{n}-{size}"
    if not (folder / "records.jsonl").is_file():
        shapes.generate(folder, n, seed, size, overwrite=True, progress=False)
    return read_records(folder), folder


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], tags: Sequence[str], n_boot: int = 2000,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Difference of scores ``a - b`` on the same prompts with a paired, category-stratified bootstrap 95%
    interval: each resample draws, within every category, its prompts with replacement (the pair
    ``(a_i, b_i)`` stays together); a category's difference is the mean of ``a_i - b_i``, ``overall``
    the mean over categories (the score's own rule). Returns ``{tag | "overall": {"diff", "lo", "hi"}}``
    (percentiles 2.5 / 97.5)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    tags = np.asarray(tags)
    rng = np.random.default_rng(seed)
    order = [t for t in GENEVAL_TAGS if t in set(tags)] + sorted(set(tags) - set(GENEVAL_TAGS))
    out, boots = {}, []
    for t in order:
        dt = d[tags == t]
        bt = dt[rng.integers(0, len(dt), (n_boot, len(dt)))].mean(1)
        boots.append(bt)
        out[t] = {"diff": float(dt.mean()), "lo": float(np.percentile(bt, 2.5)), "hi": float(np.percentile(bt, 97.5))}
    ov = np.mean(boots, axis=0)
    out["overall"] = {"diff": float(np.mean([out[t]["diff"] for t in order])), "lo": float(np.percentile(ov, 2.5)),
                      "hi": float(np.percentile(ov, 97.5))}
    return out


def region_token_mask(boxes: Sequence[Sequence[int]], grid: tuple[int, int]) -> torch.Tensor:
    """Latent tokens (raster order, ``grid`` = (h, w)) whose cell overlaps any box ``[x0, y0, x1, y1]`` in
    [0, 1000]: ``[h*w]`` bool. Token ``(r, c)`` covers ``[c, c + 1) * 1000 / w`` by ``[r, r + 1) * 1000 / h``."""
    gh, gw = grid
    m = torch.zeros(gh, gw, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        c0, c1 = int(np.floor(x0 * gw / 1000)), int(np.ceil(x1 * gw / 1000))
        r0, r1 = int(np.floor(y0 * gh / 1000)), int(np.ceil(y1 * gh / 1000))
        m[max(0, r0):min(gh, r1), max(0, c0):min(gw, c1)] = True
    return m.flatten()


def _box_mask(boxes, hw: tuple[int, int]) -> np.ndarray:
    """Pixel mask of an ``hw`` image covered by boxes ``[x0, y0, x1, y1]`` in [0, 1000]."""
    m = np.zeros(hw, dtype=bool)
    sy, sx = hw[0] / 1000, hw[1] / 1000
    for x0, y0, x1, y1 in boxes:
        m[int(round(y0 * sy)):int(round(y1 * sy)), int(round(x0 * sx)):int(round(x1 * sx))] = True
    return m


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 0.0


class _Batch:
    """The per-prompt state of one batch of the ablation (contexts, images, texts)."""

    def __init__(self, idx, fields, seed, N, C):
        self.idx, self.fields = idx, fields
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        self.eps1 = [torch.randn(N, C, generator=g) for g in gens]
        self.eps2 = [torch.randn(N, C, generator=g) for g in gens]
        self.gens = gens  # then used for context-image posteriors
        self.seed, self.N, self.C = seed, N, C

    def eps_round(self, k: int, r: int) -> torch.Tensor:
        """Starting noise of prompt ``k``'s image ``r`` >= 3 in mcot mode (``eps1``: the draft, ``eps2``: the first
        correction), from ``(seed + i, r)`` so that extra rounds leave every other draw unchanged."""
        g = torch.Generator().manual_seed((self.seed + self.idx[k]) * 1009 + r)
        return torch.randn(self.N, self.C, generator=g)


@torch.no_grad()
def run_ablation(model, tokenizer, records: Sequence, *, modes: Sequence[str] = ABLATION_MODES,
                 batch_size: int = 16, image_hw: tuple[int, int] = (64, 64), sampler=None, text=None, seed: int = 0,
                 detector: Detector | None = None, color_fn=None, out_dir: str | os.PathLike | None = None,
                 n_boot: int = 2000, progress: bool = True, info: dict | None = None, sheet_rows: int = 24,
                 pack_tokens: int = 8192, reflect: bool = False, rounds: int = 2,
                 merge_adapters: bool = True) -> dict:
    """FoX's ablation on the same prompts, batched (``batch_size`` prompts per sampler / decoder call).

    Modes (record ``i`` draws its starting noises ``eps1, eps2`` from ``Generator(seed + i)``, shared by
    all modes, so the comparison is paired):

    * ``base``: the model with its adapter switched off, text-to-image from ``eps1`` (the same weights
      as ``t2i`` when no adapter is attached);
    * ``t2i``: text-to-image from ``eps1``;
    * ``t2i-twice``: the ``t2i`` image goes into the context (VAE + ViT), a second image from ``eps2``;
    * ``plan-act``: decode a plan, then the image from ``eps1``;
    * ``mcot``: the ``plan-act`` image is the draft; reflect; only when the verdict is ``revise``
      (unparseable text counts as revise) correct it by inpainting (:func:`~ftkit.infer.sampler.generate_images`
      ``keep``) the latent tokens under the reflection's regions (:func:`region_token_mask`; the whole
      image when it names none) from ``eps2``, context = prompt, plan, draft, reflection;
      With ``rounds`` > 2 (most images per prompt, draft included) the correction goes into the context, is
      reflected on, and is inpainted again (from its own latent, noise from ``(seed + i, round)``) while the
      verdict is ``revise``, up to ``rounds`` images; rows record the images used (``mcot_images``);
    * ``mcot-regen``: as ``mcot`` but the correction regenerates the whole image from the context (one
      correction; not combined with ``rounds`` > 2, which extends the shared contexts).
    * ``plan-guided``: the ``plan-act`` image (same plan, same ``eps1``) sampled with plan guidance
      (GoT; ``sampler.cfg_plan_scale``, default :data:`PLAN_GUIDANCE_SCALE`): a fourth branch without the
      plan, so the plan is guided against the prompt alone.

    ``reflect``: also reflect on the ``plan-act`` drafts (rows get ``reflection``, the result its quality)
    without correcting them, when no mode needs it (``ftkit data self-critique`` keeps the model's own critiques).

    Stages shared by modes are computed once (``t2i`` is the first image of ``t2i-twice``, ``plan-act``
    the draft of ``mcot``); a mode's seconds per prompt add up the stages it needs.

    Reflection quality (on the mcot drafts): verdict accuracy against the evaluator (truth ``ok`` when
    the draft passes; an unparseable reflection is corrected but counts as a wrong verdict), beside the
    accuracy of always answering ``revise`` (the share of failed drafts); IoU of the union of flagged region boxes with the union of the boxes of the
    detections that broke a rule plus the model's own plan boxes of objects the evaluator found missing
    (drafts that fail, are flagged, and have both).

    Batching: the contexts of a batch are prefilled separately (any lengths); each sampler step packs
    their query blocks (image tokens + markers, all guidance branches) up to ``pack_tokens`` tokens per
    decoder call, each block attending its own cache as one row of a padded batch (``generate_images(packed=k)``);
    plans and reflections are decoded for the whole batch at once (:func:`~ftkit.infer.sampler.generate_texts`).
    ``merge_adapters``: each batch's adapter stages run with the adapters folded into the weights
    (:func:`~ftkit.adapters.attach.adapters_merged`; the base weights are restored exactly for ``base``).

    Returns the result dict (also ``ablation.json`` / ``ablation.md`` / ``sheets/`` / ``images/`` under
    ``out_dir``). Raises ValueError for an unknown mode, no records, a bad record or size.
    """
    from tqdm.auto import tqdm

    from ftkit.adapters.attach import adapters_disabled, adapters_merged, has_adapters
    from ftkit.data.geneval import judge_image
    from ftkit.data.serialize import ParseError, parse_plan, parse_reflection
    from ftkit.infer.context import GuidanceContexts
    from ftkit.infer.mcot import SamplerSettings, TextSettings, _Text, default_vit_hw
    from ftkit.infer.sampler import decode_image, generate_images, generate_texts, latent_grid

    modes = tuple(modes)
    if not modes or any(m not in ALL_ABLATION_MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct values among {ALL_ABLATION_MODES}, got {modes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("run_ablation: no records")
    if rounds < 2 or (rounds > 2 and "mcot-regen" in modes):
        raise ValueError(f"rounds must be >= 2 (draft + a correction), and 2 with mode mcot-regen, got {rounds}")
    fields = [_fields(r, i) for i, r in enumerate(records)]
    hw = tuple(image_hw)
    grid = latent_grid(model, hw)
    N, C = grid[0] * grid[1], model.cfg.patch_latent_dim
    sampler = sampler or SamplerSettings()
    ts = text or TextSettings()
    vit_hw = default_vit_hw(model, hw)
    tx = _Text(model, tokenizer)
    adapted = has_adapters(model)
    need = {s for m in modes for s in _STAGES[m]} | ({"plan", "draft", "reflect"} if reflect else set())
    secs = {s: 0.0 for s in ("base", "t2i", "twice", "plan", "draft", "reflect", "inpaint", "regen", "guided")}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        for m in modes:
            (out / "images" / m).mkdir(parents=True, exist_ok=True)
        (out / "sheets").mkdir(parents=True, exist_ok=True)
    skw = sampler.kwargs()
    plan_scale = skw.pop("cfg_plan_scale")  # only the plan-guided mode guides the plan
    plan_scale = PLAN_GUIDANCE_SCALE if plan_scale is None else plan_scale
    pack = max(1, round(pack_tokens / (N + 2)))

    def judge(image, meta, where):
        try:
            return judge_image(image, meta, detector, color_fn)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def sample(gcs, eps, keep=None, plain=False, plan_guided=False):
        lat = generate_images(model, [g.cond for g in gcs], None if plain else [g.uncond_text for g in gcs],
                              None if plain else [g.uncond_img for g in gcs], hw=hw, init_noise=eps, keep=keep,
                              packed=pack, uncond_plans=[g.uncond_plan for g in gcs] if plan_guided else None,
                              cfg_plan_scale=plan_scale if plan_guided else None, **skw)
        return lat, [decode_image(model, z, hw) for z in lat]

    def user(prompts):
        gcs = [GuidanceContexts(model) for _ in prompts]
        for g, p in zip(gcs, prompts):
            g.add_user_text(tx.encode(p))
        return gcs

    @contextlib.contextmanager
    def clock(stage):
        t0 = time.perf_counter()
        yield
        secs[stage] += time.perf_counter() - t0

    def flagged_tokens(rf):
        """Latent tokens a correction redraws: under the reflection's regions, all of them when it names none."""
        if rf is not None and rf.regions:
            return region_token_mask([g.box for g in rf.regions], grid)
        return torch.ones(N, dtype=torch.bool)

    def decode_all(gcs, max_tokens):
        outs = generate_texts([g.cond for g in gcs], max_tokens)
        return [(ids, tx.decode(ids)) for ids in (tx.clean(o.new_ids) for o in outs)]

    rows: list[dict] = []
    corrections: list[tuple] = []
    for b0 in tqdm(range(0, len(fields), batch_size), desc="ablation", unit="batch", disable=not progress):
        idx = list(range(b0, min(len(fields), b0 + batch_size)))
        bt = _Batch(idx, [fields[i] for i in idx], seed, N, C)
        prompts = [f[1] for f in bt.fields]
        imgs: dict[str, list] = {}
        if "base" in need:
            with clock("base"), (adapters_disabled(model) if adapted else contextlib.nullcontext()):
                imgs["base"] = sample(user(prompts), bt.eps1, plain=True)[1]
        with contextlib.ExitStack() as merged:  # the adapter stages run on merged weights (one branch less)
            if adapted and merge_adapters:
                merged.enter_context(adapters_merged(model))
            if "t2i" in need:
                with clock("t2i"):
                    gcs_t = user(prompts)
                    imgs["t2i"] = sample(gcs_t, bt.eps1, plain=True)[1]
            if "twice" in need:
                with clock("twice"):
                    for g, im, gen in zip(gcs_t, imgs["t2i"], bt.gens):
                        g.add_image(im, vae_hw=hw, vit_hw=vit_hw, generator=gen)
                    imgs["t2i-twice"] = sample(gcs_t, bt.eps2)[1]
            if "plan" in need:
                with clock("plan"):
                    gcs_p = user(prompts)
                    plans = []
                    for g, (ids, ptxt) in zip(gcs_p, decode_all(gcs_p, ts.max_plan_tokens)):
                        try:
                            pl = parse_plan(ptxt)
                        except ParseError:
                            pl = None
                        g.add_generated_text(ids)
                        plans.append((ptxt, pl))
                if "draft" in need:
                    with clock("draft"):
                        lat_d, imgs["plan-act"] = sample(gcs_p, bt.eps1)
                if "guided" in need:
                    with clock("guided"):
                        imgs["plan-guided"] = sample(gcs_p, bt.eps1, plan_guided=True)[1]
            if "reflect" in need:
                with clock("reflect"):
                    for g, im, gen in zip(gcs_p, imgs["plan-act"], bt.gens):
                        g.add_image(im, vae_hw=hw, vit_hw=vit_hw, generator=gen)
                    refls = []
                    for ids, rtxt in decode_all(gcs_p, ts.max_reflect_tokens):
                        try:
                            r = parse_reflection(rtxt)
                        except ParseError:
                            r = None
                        refls.append((ids, rtxt, r, "revise" if r is None else r.verdict))
                    rev = [k for k, r in enumerate(refls) if r[3] != "ok"]
                    for k in rev:
                        gcs_p[k].add_generated_text(refls[k][0])
                    masks = {k: flagged_tokens(refls[k][2]) for k in rev}
                used = [1] * len(idx)  # images per prompt in mode mcot, draft included
                for stage, mode in (("inpaint", "mcot"), ("regen", "mcot-regen")):
                    if stage not in need:
                        continue
                    final = list(imgs["plan-act"])
                    if rev:
                        keep = [(lat_d[k], masks[k]) for k in rev] if stage == "inpaint" else None
                        with clock(stage):
                            lat_f, fixed = sample([gcs_p[k] for k in rev], [bt.eps2[k] for k in rev], keep)
                        for k, im in zip(rev, fixed):
                            final[k] = im
                        if stage == "inpaint":
                            for k in rev:
                                used[k] = 2
                            cur = {k: z for k, z in zip(rev, lat_f)}
                            for r in range(3, rounds + 1):  # reflect on the correction, inpaint again while `revise`
                                with clock("reflect"):
                                    for k in cur:
                                        gcs_p[k].add_image(final[k], vae_hw=hw, vit_hw=vit_hw, generator=bt.gens[k])
                                    keys = list(cur)
                                    again = {}
                                    for k, (ids, rtxt) in zip(keys, decode_all([gcs_p[k] for k in keys],
                                                                               ts.max_reflect_tokens)):
                                        try:
                                            rf = parse_reflection(rtxt)
                                        except ParseError:
                                            rf = None
                                        if rf is None or rf.verdict != "ok":
                                            gcs_p[k].add_generated_text(ids)
                                            again[k] = flagged_tokens(rf)
                                if not again:
                                    break
                                keys = list(again)
                                with clock(stage):
                                    lat_f, fixed = sample([gcs_p[k] for k in keys], [bt.eps_round(k, r) for k in keys],
                                                          [(cur[k], again[k]) for k in keys])
                                cur = {k: z for k, z in zip(keys, lat_f)}
                                for k, im in zip(keys, fixed):
                                    final[k], used[k] = im, r
                    imgs[mode] = final
        for k, i in enumerate(idx):
            rid, prompt, meta = bt.fields[k]
            where = f"record {i} ({rid})"
            stem = f"{i:04d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in rid)}"
            row: dict = {"index": i, "id": rid, "prompt": prompt, "tag": meta["tag"], "seed": seed + i}
            for m in modes:
                j = judge(imgs[m][k], meta, where)
                row[m] = {"passed": j.passed, "reason": j.reason}
                if out is not None:
                    _save_png(imgs[m][k], out / "images" / m / f"{stem}.png")
                    row[m]["image"] = f"images/{m}/{stem}.png"
            if "plan" in need:
                ptxt, pl = plans[k]
                row["plan"] = {"text": ptxt, "parsed": pl is not None}
            if "reflect" in need:
                ids, rtxt, r, verdict = refls[k]
                dj = judge(imgs["plan-act"][k], meta, where)
                flagged = [list(g.box) for g in r.regions] if r is not None else []
                iou = None
                if not dj.passed and verdict == "revise" and flagged:
                    fail_m = np.zeros(hw, dtype=bool)
                    for d in dj.failed:
                        x0, y0, x1, y1 = d.box
                        fail_m[int(y0):int(y1), int(x0):int(x1)] = True
                    pl = plans[k][1]
                    miss_boxes = [b.box for c in dj.missing for b in (pl.boxes if pl else []) if c in b.label]
                    fail_m |= _box_mask(miss_boxes, hw)
                    if fail_m.any():
                        iou = _iou(_box_mask(flagged, hw), fail_m)
                if "mcot" in modes:
                    row["mcot_images"] = used[k]
                row["reflection"] = {"text": rtxt, "parsed": r is not None, "verdict": verdict,
                                     "truth": "ok" if dj.passed else "revise", "regions": flagged, "iou": iou,
                                     "corrected": verdict != "ok",
                                     "inpainted_tokens": int(masks[k].sum()) if k in masks else 0}
                if verdict != "ok" and "mcot" in modes and len(corrections) < sheet_rows:
                    corrections.append((prompt, imgs["plan-act"][k], flagged, masks[k], imgs["mcot"][k],
                                        dj.passed, row["mcot"]["passed"]))
            rows.append(row)

    n = len(rows)
    tags = [r["tag"] for r in rows]
    passes = {m: [r[m]["passed"] for r in rows] for m in modes}
    scores = {m: category_scores(_by_tag(passes[m], tags)) for m in modes}
    diffs = {f"{a} - {b}": paired_bootstrap(passes[a], passes[b], tags, n_boot, seed)
             for a, b in DIFFERENCES if a in modes and b in modes}
    reflection = None
    if "reflect" in need:
        rr = [r["reflection"] for r in rows]
        ious = [x["iou"] for x in rr if x["iou"] is not None]
        # an unparseable reflection is corrected like a `revise` (the loop must do something) but it is never
        # a right verdict; a constant `revise` would score the share of failed drafts (reported beside it)
        conf = {f"truth {t} / said {v}": sum(1 for x in rr if x["parsed"] and x["truth"] == t and x["verdict"] == v)
                for t in ("ok", "revise") for v in ("ok", "revise")}
        conf["unparsed"] = sum(1 for x in rr if not x["parsed"])
        reflection = {"verdict_accuracy": float(np.mean([x["parsed"] and x["truth"] == x["verdict"] for x in rr])),
                      "always_revise_accuracy": float(np.mean([x["truth"] == "revise" for x in rr])),
                      "parsed": float(np.mean([x["parsed"] for x in rr])), "confusion": conf,
                      "region_iou": float(np.mean(ious)) if ious else None, "region_iou_n": len(ious),
                      "corrected": sum(x["corrected"] for x in rr)}
        if "mcot" in modes:
            reflection["mcot_images_mean"] = float(np.mean([r["mcot_images"] for r in rows]))
    per_prompt = {m: round(sum(secs[s] for s in _STAGES[m]) / n, 4) for m in modes}
    counts: dict[str, int] = {}
    for t in tags:
        counts[t] = counts.get(t, 0) + 1
    res = {
        **(info or {}), "n": n, "modes": list(modes), "counts": counts, "scores": scores, "differences": diffs,
        "reflection": reflection, "seconds_per_prompt": per_prompt,
        "stage_seconds": {s: round(v, 3) for s, v in secs.items() if s in need},
        "adapter_attached": adapted,
        "settings": {"batch_size": batch_size, "pack": pack, "image_hw": list(hw), "seed": seed, "n_boot": n_boot,
                     "merged_adapters": bool(adapted and merge_adapters),
                     "sampler": {**skw, "cfg_interval": list(sampler.cfg_interval),
                                 **({"cfg_plan_scale": plan_scale} if "plan-guided" in modes else {})},
                     "text": {"max_plan_tokens": ts.max_plan_tokens, "max_reflect_tokens": ts.max_reflect_tokens},
                     "rounds": rounds},
        "detector": type(detector if detector is not None else default_detector()).__name__,
        "prompts": rows,
    }
    if out is not None:
        sheets = {}
        for m in modes:
            failed = [(r["prompt"], imgs_path, r[m]["reason"]) for r in rows if not r[m]["passed"]
                      for imgs_path in [out / r[m]["image"]]][:sheet_rows * 4]
            if failed:
                _save_png(_grid_sheet(failed, detector), out / "sheets" / f"failures_{m}.png")
                sheets[f"failures_{m}"] = f"sheets/failures_{m}.png"
        if corrections:
            _save_png(_corrections_sheet(corrections, grid), out / "sheets" / "corrections.png")
            sheets["corrections"] = "sheets/corrections.png"
        res["sheets"] = sheets
        for name, body in (("ablation.json", json.dumps(res, indent=2)), ("ablation.md", ablation_markdown(res))):
            atomic_write(out / name, body.encode())
    return res


def _by_tag(passed: Sequence[bool], tags: Sequence[str]) -> dict[str, list[bool]]:
    d: dict[str, list[bool]] = {}
    for p, t in zip(passed, tags):
        d.setdefault(t, []).append(p)
    return d


def _grid_sheet(items, detector, cell: int = 128, cols: int = 8):
    """Failed images of one mode: detector boxes drawn, prompt and first violated rule below."""
    from PIL import Image

    det = default_detector() if detector is None else detector
    panels = []
    for prompt, path, reason in items:
        with Image.open(path) as im:
            image = im.convert("RGB")
        pic = _panel_image(image, prompt[11:] if prompt.startswith("a photo of ") else prompt,
                           det.detect(np.asarray(image)), cell)
        txt = _panel_text((reason or "").splitlines()[0] if reason else "", "", cell)
        p = Image.new("RGB", (cell, cell + 16 + 40), "white")
        p.paste(pic, (0, 0))
        p.paste(txt.crop((0, 16, cell, 56)), (0, cell + 16))
        panels.append(p)
    rows = (len(panels) + cols - 1) // cols
    sheet = Image.new("RGB", (cell * min(cols, len(panels)), rows * (cell + 56)), "white")
    for k, p in enumerate(panels):
        sheet.paste(p, ((k % cols) * cell, (k // cols) * (cell + 56)))
    return sheet


def _corrections_sheet(items, grid, cell: int = 128):
    """One row per corrected prompt: prompt | draft | flagged regions (boxes, inpainted tokens shaded) |
    corrected, with the evaluator's pass / FAIL of draft and correction."""
    from PIL import Image, ImageDraw

    from ftkit.infer.mcot import _image_cell

    gh, gw = grid
    rows = []
    for prompt, draft, flagged, mask, fixed, d_ok, f_ok in items:
        shade = draft.convert("RGB").resize((cell, cell), Image.NEAREST)
        over = Image.new("RGBA", shade.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(over)
        for t in np.flatnonzero(mask.numpy()):
            r, c = divmod(int(t), gw)
            d.rectangle([c * cell / gw, r * cell / gh, (c + 1) * cell / gw - 1, (r + 1) * cell / gh - 1],
                        fill=(255, 59, 48, 70))
        shade = Image.alpha_composite(shade.convert("RGBA"), over).convert("RGB")
        panels = [_panel_text(prompt, "prompt", cell),
                  _image_cell(draft, f"draft: {'pass' if d_ok else 'FAIL'}", cell),
                  _image_cell(shade, "flagged regions", cell, [("", tuple(b), "#ff3b30") for b in flagged]),
                  _image_cell(fixed, f"corrected: {'pass' if f_ok else 'FAIL'}", cell)]
        row = Image.new("RGB", (cell * 4, cell + 16), "white")
        for k, p in enumerate(panels):
            row.paste(p, (k * cell, 0))
        rows.append(row)
    sheet = Image.new("RGB", (cell * 4, len(rows) * (cell + 16)), "white")
    for k, r in enumerate(rows):
        sheet.paste(r, (0, k * (cell + 16)))
    return sheet


def ablation_markdown(res: dict) -> str:
    """The ablation's report: scores per mode and category, the paired differences with bootstrap 95%
    intervals, reflection quality, seconds per prompt and settings."""
    s = res["settings"]
    sm = s["sampler"]
    lines = ["# Shapes-world ablation (GenEval rules)", ""]
    for k in ("model", "adapter", "data"):
        if res.get(k):
            lines.append(f"- {k}: `{res[k]}`")
    lines += [f"- prompts: {res['n']}; detector: {res['detector']}; image {s['image_hw'][0]}x{s['image_hw'][1]}, "
              f"{sm['num_timesteps']} timesteps, cfg text {sm['cfg_text_scale']}; batch {s['batch_size']}; "
              f"seed {s['seed']}; adapter attached: {res['adapter_attached']}", "",
              results_table(res["scores"], res["counts"]), ""]
    if res["differences"]:
        cols = [c for c in (*GENEVAL_TAGS, "overall") if c in next(iter(res["differences"].values()))]
        lines += ["Paired differences (bootstrap 95% interval, stratified by category, "
                  f"{s['n_boot']} resamples):", "", "| difference | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for name, d in res["differences"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{d[c]['diff']:+.3f} [{d[c]['lo']:+.3f}, {d[c]['hi']:+.3f}]" for c in cols) + " |")
        lines.append("")
    r = res.get("reflection")
    if r:
        iou = "n/a" if r["region_iou"] is None else f"{r['region_iou']:.3f}"
        lines += ["Reflection on the mcot drafts (truth: the evaluator's verdict on the draft):", "",
                  f"- verdict accuracy {r['verdict_accuracy']:.3f} (an unparsed reflection counts as wrong; always "
                  f"`revise` would score {r['always_revise_accuracy']:.3f}); parsed {r['parsed']:.3f}; corrected "
                  f"{r['corrected']} of {res['n']}",
                  "- " + "; ".join(f"{k}: {v}" for k, v in r["confusion"].items()),
                  f"- IoU of flagged regions with the failed objects: {iou} (over {r['region_iou_n']} drafts)"]
        if "mcot_images_mean" in r:
            lines.append(f"- mcot: {r['mcot_images_mean']:.2f} images per prompt on average (at most "
                         f"{res['settings'].get('rounds', 2)}, draft included)")
        lines.append("")
    lines += ["Seconds per prompt (shared stages counted in every mode that needs them):", "",
              "| mode | s / prompt |", "|---|---:|"]
    lines += [f"| {m} | {v:.3f} |" for m, v in res["seconds_per_prompt"].items()]
    if res.get("sheets"):
        lines += ["", "Contact sheets: " + ", ".join(f"`{p}`" for p in res["sheets"].values())]
    return "\n".join(lines) + "\n"


__all__ = ["ABLATION_MODES", "ABLATION_SEED", "ALL_ABLATION_MODES", "MODES", "ablation_markdown", "ablation_records",
           "balanced_subset", "category_scores", "evaluate_shapes", "failure_sheet", "paired_bootstrap",
           "region_token_mask", "results_table", "run_ablation"]
