"""FoX's ablation, batched: the same held-out prompts in every mode, paired differences with bootstrap intervals.

:func:`run_ablation` (``ftkit eval shapes --ablation``) draws each prompt in FoX's modes -- ``base``, ``t2i``,
``t2i-twice``, ``plan-act``, ``mcot`` (verdict-gated correction by inpainting the flagged regions),
``mcot-verify`` (a correction kept only when the model's own reflection on it says ``ok``), ``mcot-regen``,
``mcot-oracle`` (the evaluator's verdict and failed regions in place of the model's reflection: what the correction
alone can repair) and ``plan-guided`` (GoT's plan guidance) -- from the same starting noises, batched through
the sampler, and reports the scores by GenEval's rules (:mod:`ftkit.infer.evaluate`), the paired
differences with category-stratified bootstrap intervals, the reflection's quality, the plans' quality (a plan
is right when its boxes, drawn by the shapes renderer, pass the evaluator: which failures start in the plan and
which in the drawing) and seconds per prompt.

Read top to bottom: the constants, the held-out prompts (:func:`ablation_records`), the statistics
(:func:`paired_bootstrap`) and region helpers, a batch's state (:class:`_Batch`), the stages
(:class:`_Ablation`, one method per stage in pipeline order), :func:`run_ablation` (the batch loop and the
summary) and the report (contact sheets, :func:`ablation_markdown`).

Prompts: a held-out split, seed :data:`ABLATION_SEED` = 1011 (training data uses seed 0, the shipped
``shapes-eval`` seed 1), 600 records generated on demand -- the same records as
``ftkit data shapes --out DIR --n 600 --seed 1011``. The detector was developed on seed 2022, never on these.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ftkit.adapters.attach import adapters_disabled, adapters_merged, has_adapters
from ftkit.data.geneval import GENEVAL_TAGS, Detector, default_detector, judge_image
from ftkit.data.schema import PlanStep, ReflectStep
from ftkit.data.serialize import ParseError, parse_plan, parse_reflection, serialize_reflection
from ftkit.data.shapes import render_plan
from ftkit.files import atomic_write
from ftkit.infer.context import GuidanceContexts
from ftkit.infer.evaluate import (
    _fields,
    _panel_image,
    _panel_text,
    _save_png,
    category_scores,
    check_modes,
    results_table,
)
from ftkit.infer.mcot import (
    SamplerSettings,
    TextSettings,
    _image_cell,
    _reflection_from,
    _Text,
    acted_verdict,
    default_vit_hw,
    revise_probability,
)
from ftkit.infer.sampler import GeneratedText, decode_image, generate_images, generate_texts, latent_grid
from ftkit.infer.selfcritique import conflict_regions, shapes_judge

ABLATION_MODES = ("base", "t2i", "t2i-twice", "plan-act", "mcot")
ALL_ABLATION_MODES = (*ABLATION_MODES, "mcot-verify", "mcot-regen", "mcot-oracle", "plan-guided")
# plan-guided's plan scale when the sampler sets none: GoT's spatial / semantic ratio (4.0 / 7.5) at text scale 4
PLAN_GUIDANCE_SCALE = 2.0
ABLATION_SEED = 1011  # held-out: training data uses seed 0, the shipped shapes-eval seed 1
ABLATION_N = 600
DIFFERENCES = (("mcot", "t2i-twice"), ("plan-act", "t2i-twice"), ("mcot", "plan-act"), ("mcot-verify", "t2i-twice"),
               ("mcot-verify", "plan-act"), ("mcot-verify", "mcot"), ("mcot-oracle", "plan-act"), ("mcot-oracle", "mcot"),
               ("plan-guided", "plan-act"))
# which pipeline stages each mode needs (for its seconds per prompt)
_STAGES = {"base": ("base",), "t2i": ("t2i",), "t2i-twice": ("t2i", "twice"), "plan-act": ("plan", "draft"),
           "mcot": ("plan", "draft", "see", "reflect", "inpaint"),
           "mcot-verify": ("plan", "draft", "see", "reflect", "inpaint", "verify"),
           "mcot-regen": ("plan", "draft", "see", "reflect", "regen"), "mcot-oracle": ("plan", "draft", "see", "oracle"),
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


def plan_right(plan: PlanStep | None, meta, size: int, detector=None, color_fn=None) -> bool:
    """Whether a plan itself satisfies the prompt of ``meta``: its boxes drawn by the shapes world's renderer
    (:func:`ftkit.data.shapes.render_plan`, ``size`` px) pass the evaluator. False for no plan (unparsed) or a
    box label that is no shape of that world."""
    if plan is None:
        return False
    try:
        picture = render_plan(plan, size)
    except ValueError:
        return False
    return judge_image(picture, meta, detector, color_fn).passed


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


def flagged_tokens(refl: ReflectStep | None, grid: tuple[int, int]) -> torch.Tensor:
    """Latent tokens a correction redraws (``[h*w]`` bool): under the reflection's regions, all of them when it
    names none (or did not parse)."""
    if refl is not None and refl.regions:
        return region_token_mask([g.box for g in refl.regions], grid)
    return torch.ones(grid[0] * grid[1], dtype=torch.bool)


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


def regions_iou(a, b, hw: tuple[int, int]) -> float:
    """IoU of the pixels of an ``hw`` image covered by boxes ``a`` and by boxes ``b`` (``[x0, y0, x1, y1]`` in
    [0, 1000]); 0 when neither covers any."""
    return _iou(_box_mask(a, hw), _box_mask(b, hw))


class _Said(NamedTuple):
    """One decoded reflection: its token ids, text, the parsed reflection (``None`` when it does not parse),
    the verdict acted on (:func:`~ftkit.infer.mcot.acted_verdict`: an unparseable reflection counts as
    ``revise``, the loop must do something) and the model's probability of ``revise`` at the verdict token."""

    ids: list[int]
    text: str
    parsed: ReflectStep | None
    verdict: str
    p_revise: float | None


class _Batch:
    """The per-prompt state of one batch of the ablation (noises, contexts, images, texts), filled stage by stage."""

    def __init__(self, idx, fields, seed, N, C):
        self.idx, self.fields = idx, fields
        self.prompts = [f[1] for f in fields]
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        self.eps1 = [torch.randn(N, C, generator=g) for g in gens]
        self.eps2 = [torch.randn(N, C, generator=g) for g in gens]
        self.gens = gens  # then used for context-image posteriors
        self.seed, self.N, self.C = seed, N, C
        self.imgs: dict[str, list] = {}  # mode -> its image per prompt
        self.gcs_t: list[GuidanceContexts] = []  # t2i contexts (t2i-twice adds the first image)
        self.gcs_p: list[GuidanceContexts] = []  # plan contexts (+ draft, reflection, corrections)
        self.plans: list[tuple[str, PlanStep | None]] = []
        self.lat_d: list[torch.Tensor] = []  # the drafts' latents (kept outside the flagged regions)
        self.said: list[_Said] = []  # the reflections on the drafts
        self.masks: dict[int, torch.Tensor] = {}  # prompt k -> latent tokens its first correction redraws
        self.used = [1] * len(idx)  # images per prompt in mode mcot, draft included
        self.judged_ok: set[int] = set()  # prompts whose last correction the model's reflection called `ok`
        self.verified: dict[int, _Said] = {}  # prompt k -> the reflection on its last correction (mcot-verify)
        self.oracle: list = []  # the evaluator's Critique of each draft (mcot-oracle)
        self.oracle_masks: dict[int, torch.Tensor] = {}  # prompt k -> latent tokens the oracle's correction redraws

    @property
    def revised(self) -> list[int]:
        """Prompts whose draft the reflection sends to correction."""
        return [k for k, s in enumerate(self.said) if s.verdict != "ok"]

    def eps_round(self, k: int, r: int) -> torch.Tensor:
        """Starting noise of prompt ``k``'s image ``r`` >= 3 in mcot mode (``eps1``: the draft, ``eps2``: the first
        correction), from ``(seed + i, r)`` so that extra rounds leave every other draw unchanged."""
        g = torch.Generator().manual_seed((self.seed + self.idx[k]) * 1009 + r)
        return torch.randn(self.N, self.C, generator=g)


class _Ablation:
    """One ablation run: the model, its fixed settings and the seconds spent per stage. The stage methods
    run in pipeline order (:meth:`adapter_stages`) and fill a :class:`_Batch`; :meth:`row` judges one prompt."""

    def __init__(self, model, tokenizer, *, hw, sampler, text, detector, color_fn, pack_tokens, rounds):
        self.model, self.hw, self.rounds = model, hw, rounds
        self.grid = latent_grid(model, hw)
        self.N, self.C = self.grid[0] * self.grid[1], model.cfg.patch_latent_dim
        self.ts = text or TextSettings()
        self.vit_hw = default_vit_hw(model, hw)
        self.tx = _Text(model, tokenizer)
        self.detector, self.color_fn = detector, color_fn
        self.critic = shapes_judge(detector=detector, color_fn=color_fn)  # mcot-oracle's reflections
        self.skw = (sampler or SamplerSettings()).kwargs()
        plan_scale = self.skw.pop("cfg_plan_scale")  # only the plan-guided mode guides the plan
        self.plan_scale = PLAN_GUIDANCE_SCALE if plan_scale is None else plan_scale
        self.pack = max(1, round(pack_tokens / (self.N + 2)))
        self.secs = dict.fromkeys(("base", "t2i", "twice", "plan", "draft", "see", "reflect", "inpaint", "regen",
                                   "oracle", "guided", "verify"), 0.0)

    # ---------------------------------------------------------------- tools
    @contextlib.contextmanager
    def clock(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.secs[stage] += time.perf_counter() - t0

    def judge(self, image, meta, where: str):
        try:
            return judge_image(image, meta, self.detector, self.color_fn)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def user(self, prompts: Sequence[str]) -> list[GuidanceContexts]:
        gcs = [GuidanceContexts(self.model) for _ in prompts]
        for g, p in zip(gcs, prompts):
            g.add_user_text(self.tx.encode(p))
        return gcs

    def sample(self, gcs, eps, keep=None, plain=False, plan_guided=False):
        """Images from contexts ``gcs`` and starting noises ``eps`` (``keep``: inpainting's kept latents and
        masks; ``plain``: text guidance only, as text-to-image) -> ``(latents, PIL images)``."""
        lat = generate_images(self.model, [g.cond for g in gcs], None if plain else [g.uncond_text for g in gcs],
                              None if plain else [g.uncond_img for g in gcs], hw=self.hw, init_noise=eps, keep=keep,
                              packed=self.pack, uncond_plans=[g.uncond_plan for g in gcs] if plan_guided else None,
                              cfg_plan_scale=self.plan_scale if plan_guided else None, **self.skw)
        return lat, [decode_image(self.model, z, self.hw) for z in lat]

    def decode(self, gcs, max_tokens: int, logits: bool | int = False) -> list[tuple[list[int], str, GeneratedText]]:
        outs = generate_texts([g.cond for g in gcs], max_tokens, return_logits=logits)
        return [(ids, self.tx.decode(ids), o) for ids, o in ((self.tx.clean(o.new_ids), o) for o in outs)]

    def reflections(self, gcs) -> list[_Said]:
        out = []
        for ids, txt, g in self.decode(gcs, self.ts.max_reflect_tokens, logits=self.tx.verdict_steps):
            try:
                r = parse_reflection(txt)
            except ParseError:
                r = None
            p = revise_probability(g, self.tx)
            verdict = acted_verdict(None if r is None else r.verdict, p, self.ts.revise_threshold)
            out.append(_Said(ids, txt, r, verdict, p))
        return out

    # ---------------------------------------------------------------- stages
    def base(self, bt: _Batch) -> None:
        with self.clock("base"):
            bt.imgs["base"] = self.sample(self.user(bt.prompts), bt.eps1, plain=True)[1]

    def adapter_stages(self, bt: _Batch, need: set[str]) -> None:
        """Every stage but ``base``, in the order that shares their work (and their generators' draws)."""
        if "t2i" in need:
            with self.clock("t2i"):
                bt.gcs_t = self.user(bt.prompts)
                bt.imgs["t2i"] = self.sample(bt.gcs_t, bt.eps1, plain=True)[1]
        if "twice" in need:
            with self.clock("twice"):
                for g, im, gen in zip(bt.gcs_t, bt.imgs["t2i"], bt.gens):
                    g.add_image(im, vae_hw=self.hw, vit_hw=self.vit_hw, generator=gen)
                bt.imgs["t2i-twice"] = self.sample(bt.gcs_t, bt.eps2)[1]
        if "plan" in need:
            with self.clock("plan"):
                self.plan(bt)
        if "draft" in need:
            with self.clock("draft"):
                bt.lat_d, bt.imgs["plan-act"] = self.sample(bt.gcs_p, bt.eps1)
        if "guided" in need:
            with self.clock("guided"):
                bt.imgs["plan-guided"] = self.sample(bt.gcs_p, bt.eps1, plan_guided=True)[1]
        if "see" in need:
            with self.clock("see"):
                for g, im, gen in zip(bt.gcs_p, bt.imgs["plan-act"], bt.gens):
                    g.add_image(im, vae_hw=self.hw, vit_hw=self.vit_hw, generator=gen)
        if "oracle" in need:  # before the model's reflections extend the contexts
            with self.clock("oracle"):
                bt.imgs["mcot-oracle"] = self.oracle(bt)
        if "reflect" in need:
            with self.clock("reflect"):
                self.reflect(bt)
        if "inpaint" in need:
            bt.imgs["mcot"] = self.correct(bt, inpaint=True)
        if "regen" in need:
            bt.imgs["mcot-regen"] = self.correct(bt, inpaint=False)
        if "verify" in need:
            with self.clock("verify"):
                bt.imgs["mcot-verify"] = self.verify(bt)

    def plan(self, bt: _Batch) -> None:
        bt.gcs_p = self.user(bt.prompts)
        for g, (ids, txt, _) in zip(bt.gcs_p, self.decode(bt.gcs_p, self.ts.max_plan_tokens)):
            try:
                pl = parse_plan(txt)
            except ParseError:
                pl = None
            g.add_generated_text(ids)
            bt.plans.append((txt, pl))

    def reflect(self, bt: _Batch) -> None:
        """A reflection on each draft (in the context since stage ``see``); a ``revise`` goes into the context too."""
        bt.said = self.reflections(bt.gcs_p)
        for k in bt.revised:
            bt.gcs_p[k].add_generated_text(bt.said[k].ids)
            bt.masks[k] = flagged_tokens(bt.said[k].parsed, self.grid)

    def correct(self, bt: _Batch, inpaint: bool) -> list:
        """The final image per prompt: the draft where the verdict is ``ok``, else its correction from ``eps2``
        (``inpaint``: the flagged tokens redrawn, the rest kept; else regenerated whole). Inpainting repeats
        (reflect on the correction, inpaint it again while ``revise``) up to ``rounds`` images."""
        stage = "inpaint" if inpaint else "regen"
        final = list(bt.imgs["plan-act"])
        rev = bt.revised
        if not rev:
            return final
        keep = [(bt.lat_d[k], bt.masks[k]) for k in rev] if inpaint else None
        with self.clock(stage):
            lat_f, fixed = self.sample([bt.gcs_p[k] for k in rev], [bt.eps2[k] for k in rev], keep)
        for k, im in zip(rev, fixed):
            final[k] = im
        if not inpaint:
            return final
        for k in rev:
            bt.used[k] = 2
        cur = dict(zip(rev, lat_f))
        for r in range(3, self.rounds + 1):
            with self.clock("reflect"):
                for k in cur:
                    bt.gcs_p[k].add_image(final[k], vae_hw=self.hw, vit_hw=self.vit_hw, generator=bt.gens[k])
                again = {}
                for k, s in zip(cur, self.reflections([bt.gcs_p[k] for k in cur])):
                    if s.verdict == "ok":
                        bt.judged_ok.add(k)
                    else:
                        bt.gcs_p[k].add_generated_text(s.ids)
                        again[k] = flagged_tokens(s.parsed, self.grid)
            if not again:
                break
            with self.clock(stage):
                lat_f, fixed = self.sample([bt.gcs_p[k] for k in again], [bt.eps_round(k, r) for k in again],
                                           [(cur[k], m) for k, m in again.items()])
            cur = dict(zip(again, lat_f))
            for k, im in zip(again, fixed):
                final[k], bt.used[k] = im, r
        return final

    def oracle(self, bt: _Batch) -> list:
        """``mcot-oracle``'s final image per prompt: the evaluator judges each draft (:func:`~ftkit.infer.selfcritique.
        shapes_judge`, this run's detector); a draft it passes is kept, a failed one gets the judge's reflection
        (its critique, and its regions: the failed detections' boxes, the plan's box of a missing object, else
        the whole image) written into a fork of the context, and is inpainted under those regions from ``eps2``
        -- ``mcot`` with a perfect critic, so what is left to gain is the correction's own."""
        bt.oracle = [self.critic(im, {"prompt": p, "meta": meta}, pl)
                     for im, (_, p, meta), (_, pl) in zip(bt.imgs["plan-act"], bt.fields, bt.plans)]
        final = list(bt.imgs["plan-act"])
        rev = [k for k, c in enumerate(bt.oracle) if c.verdict != "ok"]
        if not rev:
            return final
        gcs = [bt.gcs_p[k].fork() for k in rev]
        for k, g in zip(rev, gcs):
            c = bt.oracle[k]
            step = _reflection_from({"verdict": "revise", "critique": c.critique, "regions": c.regions})
            g.add_generated_text(self.tx.encode(serialize_reflection(step)))
            bt.oracle_masks[k] = flagged_tokens(step, self.grid)
        _, fixed = self.sample(gcs, [bt.eps2[k] for k in rev], [(bt.lat_d[k], bt.oracle_masks[k]) for k in rev])
        for k, im in zip(rev, fixed):
            final[k] = im
        return final

    def verify(self, bt: _Batch) -> list:
        """``mcot-verify``'s final image per prompt: ``mcot``'s, except where the model's own reflection on the
        last correction (into the context after it) still says ``revise``: there the draft is kept. A correction
        the rounds loop already judged ``ok`` is not reflected on again. Runs last: it extends the contexts."""
        final = list(bt.imgs["mcot"])
        todo = [k for k in bt.revised if k not in bt.judged_ok]
        for k in todo:
            bt.gcs_p[k].add_image(final[k], vae_hw=self.hw, vit_hw=self.vit_hw, generator=bt.gens[k])
        for k, s in zip(todo, self.reflections([bt.gcs_p[k] for k in todo]) if todo else []):
            bt.verified[k] = s
            if s.verdict != "ok":
                final[k] = bt.imgs["plan-act"][k]
        return final

    # ---------------------------------------------------------------- judging
    def plan_right(self, plan: PlanStep | None, meta, where: str) -> bool:
        """:func:`plan_right` with this run's detector, naming the record if judging fails."""
        try:
            return plan_right(plan, meta, self.hw[0], self.detector, self.color_fn)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def row(self, bt: _Batch, k: int, modes: Sequence[str], need: set[str], out: Path | None, seed: int) -> dict:
        """Prompt ``k`` of the batch judged in every mode (images saved under ``out``), with its plan and the
        reflection's quality on its draft."""
        i = bt.idx[k]
        rid, prompt, meta = bt.fields[k]
        where = f"record {i} ({rid})"
        stem = f"{i:04d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in rid)}"
        row: dict = {"index": i, "id": rid, "prompt": prompt, "tag": meta["tag"], "seed": seed + i}
        judged = {}
        for m in modes:
            j = judged[m] = self.judge(bt.imgs[m][k], meta, where)
            row[m] = {"passed": j.passed, "reason": j.reason}
            if out is not None:
                _save_png(bt.imgs[m][k], out / "images" / m / f"{stem}.png")
                row[m]["image"] = f"images/{m}/{stem}.png"
        if "plan" in need:
            ptxt, pl = bt.plans[k]
            row["plan"] = {"text": ptxt, "parsed": pl is not None, "right": self.plan_right(pl, meta, where)}
        if "reflect" in need:
            s = bt.said[k]
            dj = judged["plan-act"] if "plan-act" in judged else self.judge(bt.imgs["plan-act"][k], meta, where)
            flagged = [list(g.box) for g in s.parsed.regions] if s.parsed is not None else []
            iou = None
            if not dj.passed and s.verdict == "revise" and flagged:
                fail_m = _box_mask([g["box"] for g in conflict_regions(dj, bt.plans[k][1], self.hw)], self.hw)
                if fail_m.any():
                    iou = _iou(_box_mask(flagged, self.hw), fail_m)
            if "mcot" in modes:
                row["mcot_images"] = bt.used[k]
            if "mcot-verify" in modes and s.verdict != "ok":  # which image the verification kept
                v = bt.verified.get(k)  # absent: the rounds loop already judged the correction ok
                verdict = "ok" if v is None else v.verdict
                row["verify"] = {"verdict": verdict, "p_revise": None if v is None else v.p_revise,
                                 "kept": "correction" if verdict == "ok" else "draft"}
            row["reflection"] = {"text": s.text, "parsed": s.parsed is not None, "verdict": s.verdict,
                                 "decoded": None if s.parsed is None else s.parsed.verdict, "p_revise": s.p_revise,
                                 "truth": "ok" if dj.passed else "revise", "regions": flagged, "iou": iou,
                                 "corrected": s.verdict != "ok",
                                 "inpainted_tokens": int(bt.masks[k].sum()) if k in bt.masks else 0}
        if "oracle" in need:
            c = bt.oracle[k]
            row["oracle"] = {"verdict": c.verdict, "critique": c.critique, "regions": [r["box"] for r in c.regions],
                             "inpainted_tokens": int(bt.oracle_masks[k].sum()) if k in bt.oracle_masks else 0}
        return row


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
    * ``mcot-verify``: as ``mcot``, then the last correction goes into the context and the model reflects on it
      once more (unless the rounds already judged it ``ok``); a correction judged ``revise`` again is dropped
      and the draft kept: the model checks its own edit, as best-of-two by its own verdict (same images as
      ``mcot``, one more reflection per corrected prompt);
    * ``mcot-regen``: as ``mcot`` but the correction regenerates the whole image from the context (one
      correction; not combined with ``rounds`` > 2, which extends the shared contexts).
    * ``mcot-oracle``: as ``mcot`` with one correction, but the evaluator is the critic: a draft it passes is kept,
      a failed one gets its reflection (:func:`~ftkit.infer.selfcritique.shapes_judge`'s critique and regions, in
      the reflection format) in place of the model's, and is inpainted under those regions from ``eps2``. It
      uses the evaluator's truth, so it is a diagnostic, not a method: the score a perfect reflection would
      reach with this correction (rows get ``oracle``, the result ``oracle``: failed drafts fixed).
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

    modes = check_modes(modes, ALL_ABLATION_MODES)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("run_ablation: no records")
    if rounds < 2 or (rounds > 2 and "mcot-regen" in modes):
        raise ValueError(f"rounds must be >= 2 (draft + a correction), and 2 with mode mcot-regen, got {rounds}")
    fields = [_fields(r, i) for i, r in enumerate(records)]
    hw = tuple(image_hw)
    run = _Ablation(model, tokenizer, hw=hw, sampler=sampler, text=text, detector=detector, color_fn=color_fn,
                    pack_tokens=pack_tokens, rounds=rounds)
    adapted = has_adapters(model)
    need = {s for m in modes for s in _STAGES[m]} | ({"plan", "draft", "see", "reflect"} if reflect else set())
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        for m in modes:
            (out / "images" / m).mkdir(parents=True, exist_ok=True)
        (out / "sheets").mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    corrections: list[tuple] = []  # the corrections sheet's rows
    for b0 in tqdm(range(0, len(fields), batch_size), desc="ablation", unit="batch", disable=not progress):
        idx = list(range(b0, min(len(fields), b0 + batch_size)))
        bt = _Batch(idx, [fields[i] for i in idx], seed, run.N, run.C)
        if "base" in need:
            with adapters_disabled(model) if adapted else contextlib.nullcontext():
                run.base(bt)
        # the adapter stages run on merged weights (one branch less); `base` above saw the base weights
        with adapters_merged(model) if adapted and merge_adapters else contextlib.nullcontext():
            run.adapter_stages(bt, need)
        for k in range(len(idx)):
            row = run.row(bt, k, modes, need, out, seed)
            rows.append(row)
            r = row.get("reflection")
            if r and r["corrected"] and "mcot" in modes and len(corrections) < sheet_rows:
                corrections.append((row["prompt"], bt.imgs["plan-act"][k], r["regions"], bt.masks[k],
                                    bt.imgs["mcot"][k], r["truth"] == "ok", row["mcot"]["passed"]))

    n = len(rows)
    tags = [r["tag"] for r in rows]
    passes = {m: [r[m]["passed"] for r in rows] for m in modes}
    scores = {m: category_scores(_by_tag(passes[m], tags)) for m in modes}
    diffs = {f"{a} - {b}": paired_bootstrap(passes[a], passes[b], tags, n_boot, seed)
             for a, b in DIFFERENCES if a in modes and b in modes}
    reflection = _reflection_quality(rows, modes) if "reflect" in need else None
    plans = _plan_quality(rows, modes) if "plan" in need else None
    if reflection is not None and "mcot" in modes and rounds == 2:
        reflection["threshold_sweep"] = threshold_sweep(rows, run.ts.revise_threshold, n_boot=n_boot, seed=seed)
    if "mcot-oracle" in modes:  # what the correction repairs when the critic is right
        sent = [r for r in rows if r["oracle"]["verdict"] == "revise"]
        oracle = {"failed_drafts": len(sent), "fixed": sum(1 for r in sent if r["mcot-oracle"]["passed"]),
                  "judged_ok": sum(1 for r in rows if r["oracle"]["verdict"] == "ok")}
    per_prompt = {m: round(sum(run.secs[s] for s in _STAGES[m]) / n, 4) for m in modes}
    counts: dict[str, int] = {}
    for t in tags:
        counts[t] = counts.get(t, 0) + 1
    res = {
        **(info or {}), "n": n, "modes": list(modes), "counts": counts, "scores": scores, "differences": diffs,
        "reflection": reflection, "plans": plans, **({"oracle": oracle} if "mcot-oracle" in modes else {}),
        "seconds_per_prompt": per_prompt,
        "stage_seconds": {s: round(v, 3) for s, v in run.secs.items() if s in need},
        "adapter_attached": adapted,
        "settings": {"batch_size": batch_size, "pack": run.pack, "image_hw": list(hw), "seed": seed, "n_boot": n_boot,
                     "merged_adapters": bool(adapted and merge_adapters),
                     "sampler": {**run.skw, "cfg_interval": list(run.skw["cfg_interval"]),
                                 **({"cfg_plan_scale": run.plan_scale} if "plan-guided" in modes else {})},
                     "text": {"max_plan_tokens": run.ts.max_plan_tokens, "max_reflect_tokens": run.ts.max_reflect_tokens,
                              "revise_threshold": run.ts.revise_threshold},
                     "rounds": rounds},
        "detector": type(detector if detector is not None else default_detector()).__name__,
        "prompts": rows,
    }
    if out is not None:
        res["sheets"] = _write_sheets(out, rows, modes, corrections, detector, run.grid, sheet_rows)
        for name, body in (("ablation.json", json.dumps(res, indent=2)), ("ablation.md", ablation_markdown(res))):
            atomic_write(out / name, body.encode())
    return res


SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def threshold_sweep(rows: Sequence[dict], run_threshold: float, thresholds: Sequence[float] = SWEEP_THRESHOLDS,
                    n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """What ``mcot`` (one correction) would have scored overall with each higher ``revise_threshold``, from
    this run's rows: a prompt corrected here keeps its correction only when its ``p_revise`` exceeds the
    threshold (an unparsed reflection is corrected always), else its draft (the ``plan-act`` image). Exact
    for thresholds >= the run's: raising the threshold only returns corrected prompts to their drafts. Meant
    for calibrating the threshold on development prompts, then evaluating it once on held-out ones. Each
    threshold's ``mcot - plan-act`` (and ``mcot - t2i-twice`` when the rows have it) is the overall paired
    bootstrap of :func:`paired_bootstrap` with the run's ``n_boot`` and ``seed``: what a run at that threshold
    would report."""
    tags = [r["tag"] for r in rows]
    truth = [r["reflection"]["truth"] == "revise" for r in rows]
    parsed = [r["reflection"]["parsed"] for r in rows]
    draft = category_scores(_by_tag([r["plan-act"]["passed"] for r in rows], tags))["overall"]
    out = []
    for t in (t for t in thresholds if t >= run_threshold):
        sent = [acted_verdict(x["decoded"], x["p_revise"], t) != "ok" for x in (r["reflection"] for r in rows)]
        ok = [r["mcot"]["passed"] if c else r["plan-act"]["passed"] for r, c in zip(rows, sent)]
        diffs = {f"mcot - {b}": paired_bootstrap(ok, [r[b]["passed"] for r in rows], tags, n_boot, seed)["overall"]
                 for b in ("t2i-twice", "plan-act") if b in rows[0]}
        out.append({"threshold": t, "mcot": category_scores(_by_tag(ok, tags))["overall"], "plan-act": draft,
                    "differences": diffs,
                    "corrected": sum(sent),
                    "fixed": sum(1 for r, c, f in zip(rows, sent, truth) if c and f and r["mcot"]["passed"]),
                    "broken": sum(1 for r, c, f in zip(rows, sent, truth) if c and not f and not r["mcot"]["passed"]),
                    "verdict_accuracy": float(np.mean([p and c == f for p, c, f in zip(parsed, sent, truth)]))})
    return out


PLANNED_MODES = tuple(m for m, stages in _STAGES.items() if "plan" in stages)  # the modes that draw from a plan


def _plan_quality(rows: Sequence[dict], modes: Sequence[str]) -> dict:
    """How often the model's plan itself satisfies the prompt (``right``: per category, its boxes drawn by the
    shapes renderer pass the evaluator), and per plan-conditioned mode the pass rate of its images under a
    right and under a wrong plan: a failure under a right plan is the drawing's, one under a wrong plan
    starts in the plan."""
    tags = [r["tag"] for r in rows]
    right = [r["plan"]["right"] for r in rows]
    out: dict = {"parsed": float(np.mean([r["plan"]["parsed"] for r in rows])),
                 "right": category_scores(_by_tag(right, tags)), "n_right": sum(right), "images": {}}
    for m in (m for m in PLANNED_MODES if m in modes):
        given = {}
        for want, name in ((True, "right"), (False, "wrong")):
            ps = [r[m]["passed"] for r, ok in zip(rows, right) if ok == want]
            given[name] = float(np.mean(ps)) if ps else None
        out["images"][m] = given
    return out


def _reflection_quality(rows: Sequence[dict], modes: Sequence[str]) -> dict:
    """Verdict accuracy, confusion, parse rate and region IoU of the reflections on the drafts; per correcting
    mode, what correction did to the drafts sent to it (``fixed``: failed drafts now passing, ``broken``:
    passing drafts now failing); for ``mcot-verify``, which image its verification kept."""
    rr = [r["reflection"] for r in rows]
    ious = [x["iou"] for x in rr if x["iou"] is not None]
    # an unparseable reflection is corrected like a `revise` (the loop must do something) but it is never
    # a right verdict; a constant `revise` would score the share of failed drafts (reported beside it)
    conf = {f"truth {t} / said {v}": sum(1 for x in rr if x["parsed"] and x["truth"] == t and x["verdict"] == v)
            for t in ("ok", "revise") for v in ("ok", "revise")}
    conf["unparsed"] = sum(1 for x in rr if not x["parsed"])
    out = {"verdict_accuracy": float(np.mean([x["parsed"] and x["truth"] == x["verdict"] for x in rr])),
           # the model's own verdict, before the revise threshold turned unsure `revise`s into `ok`
           "decoded_verdict_accuracy": float(np.mean([x["parsed"] and x["truth"] == x["decoded"] for x in rr])),
           "always_revise_accuracy": float(np.mean([x["truth"] == "revise" for x in rr])),
           "parsed": float(np.mean([x["parsed"] for x in rr])), "confusion": conf,
           "region_iou": float(np.mean(ious)) if ious else None, "region_iou_n": len(ious),
           "corrected": sum(x["corrected"] for x in rr)}
    if "mcot" in modes:
        out["mcot_images_mean"] = float(np.mean([r["mcot_images"] for r in rows]))
    sent = [r for r in rows if r["reflection"]["corrected"]]
    out["correction"] = {m: {"fixed": sum(1 for r in sent if r["reflection"]["truth"] == "revise" and r[m]["passed"]),
                             "failed_drafts": sum(1 for r in sent if r["reflection"]["truth"] == "revise"),
                             "broken": sum(1 for r in sent if r["reflection"]["truth"] == "ok" and not r[m]["passed"]),
                             "passing_drafts": sum(1 for r in sent if r["reflection"]["truth"] == "ok")}
                         for m in ("mcot", "mcot-verify", "mcot-regen") if m in modes}
    if "mcot-verify" in modes:
        out["verify_kept"] = {w: sum(1 for r in sent if r["verify"]["kept"] == w) for w in ("correction", "draft")}
    return out


def _write_sheets(out: Path, rows, modes, corrections, detector, grid, sheet_rows: int) -> dict[str, str]:
    """Contact sheets: each mode's failures, and the corrections (draft | flagged regions | corrected)."""
    sheets = {}
    for m in modes:
        failed = [(r["prompt"], out / r[m]["image"], r[m]["reason"]) for r in rows if not r[m]["passed"]]
        if failed:
            _save_png(_grid_sheet(failed[:sheet_rows * 4], detector), out / "sheets" / f"failures_{m}.png")
            sheets[f"failures_{m}"] = f"sheets/failures_{m}.png"
    if corrections:
        _save_png(_corrections_sheet(corrections, grid), out / "sheets" / "corrections.png")
        sheets["corrections"] = "sheets/corrections.png"
    return sheets


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


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def ablation_markdown(res: dict) -> str:
    """The ablation's report: scores per mode and category, the paired differences with bootstrap 95%
    intervals, reflection quality, plan quality, seconds per prompt and settings."""
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
                  f"{r['corrected']} of {res['n']}" + (
                      f"; the decoded verdicts, before the revise threshold {s['text']['revise_threshold']}: accuracy "
                      f"{r['decoded_verdict_accuracy']:.3f}" if s["text"].get("revise_threshold", 0.5) > 0.5 else ""),
                  "- " + "; ".join(f"{k}: {v}" for k, v in r["confusion"].items()),
                  f"- IoU of flagged regions with the failed objects: {iou} (over {r['region_iou_n']} drafts)"]
        if "mcot_images_mean" in r:
            lines.append(f"- mcot: {r['mcot_images_mean']:.2f} images per prompt on average (at most "
                         f"{res['settings'].get('rounds', 2)}, draft included)")
        for m, c in r.get("correction", {}).items():
            lines.append(f"- {m}: fixed {c['fixed']} of the {c['failed_drafts']} failed drafts corrected, broke "
                         f"{c['broken']} of the {c['passing_drafts']} passing ones")
        if r.get("threshold_sweep"):
            sw = r["threshold_sweep"]
            cols = list(sw[0]["differences"])
            lines += ["", "mcot if a `revise` had needed p(revise) above a threshold (from this run's rows; calibrate "
                      "on development prompts, not on the reported ones):", "",
                      "| threshold | mcot | " + " | ".join(cols) + " | corrected | fixed | broken | verdict accuracy |",
                      "|---:" * (len(cols) + 6) + "|"]
            for w in sw:
                d = " | ".join(f"{w['differences'][c]['diff']:+.3f} [{w['differences'][c]['lo']:+.3f}, "
                               f"{w['differences'][c]['hi']:+.3f}]" for c in cols)
                lines.append(f"| {w['threshold']:.2f} | {w['mcot']:.3f} | {d} | {w['corrected']} | {w['fixed']} | "
                             f"{w['broken']} | {w['verdict_accuracy']:.3f} |")
            lines.append("")
        if "verify_kept" in r:
            lines.append(f"- mcot-verify kept the correction for {r['verify_kept']['correction']} prompt(s), the "
                         f"draft for {r['verify_kept']['draft']} (its reflection on the correction said `revise`)")
        lines.append("")
    p = res.get("plans")
    if p:
        cols = [c for c in (*GENEVAL_TAGS, "overall") if p["right"].get(c) is not None]
        lines += [f"Plans (parsed {p['parsed']:.3f}): a plan is right when its boxes, drawn by the shapes renderer, "
                  "pass the evaluator; each planned mode's pass rate given a right / a wrong plan:", "",
                  "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                  "| plan right | " + " | ".join(f"{p['right'][c]:.3f}" for c in cols) + " |", ""]
        lines += [f"- {m}: {_rate(g['right'])} of the {p['n_right']} prompts with a right plan pass, "
                  f"{_rate(g['wrong'])} of the {res['n'] - p['n_right']} with a wrong one" for m, g in p["images"].items()]
        lines.append("")
    o = res.get("oracle")
    if o:
        lines += [f"mcot-oracle (the evaluator's verdict and regions as the reflection): fixed {o['fixed']} of the "
                  f"{o['failed_drafts']} failed drafts; {o['judged_ok']} passing drafts kept", ""]
    lines += ["Seconds per prompt (shared stages counted in every mode that needs them):", "",
              "| mode | s / prompt |", "|---|---:|"]
    lines += [f"| {m} | {v:.3f} |" for m, v in res["seconds_per_prompt"].items()]
    if res.get("sheets"):
        lines += ["", "Contact sheets: " + ", ".join(f"`{p}`" for p in res["sheets"].values())]
    return "\n".join(lines) + "\n"


__all__ = ["ABLATION_MODES", "ABLATION_N", "ABLATION_SEED", "ALL_ABLATION_MODES", "DIFFERENCES", "PLAN_GUIDANCE_SCALE",
           "PLANNED_MODES", "ablation_markdown", "ablation_records", "flagged_tokens", "paired_bootstrap", "plan_right",
           "region_token_mask", "run_ablation", "threshold_sweep"]
