"""The plan -> draft -> reflect -> refine generation loop (multimodal chain of thought), and plain
text-to-image.

The sequence the model reads is the one it is trained on (``ftkit/data/builder.py``)::

    [input image: clean VAE + ViT]  prompt  plan  draft(clean VAE + ViT)  reflection  refine(...) ...

1. **plan**: decode text after the prompt; parsed with :func:`ftkit.data.serialize.parse_plan`
   (caption + boxes). Unparseable text is kept raw and treated as a caption-only plan.
2. **draft**: sample an image conditioned on prompt + plan.
3. **reflect**: the image goes into the context as a clean VAE copy and a ViT copy; decode a
   reflection, parsed with :func:`~ftkit.data.serialize.parse_reflection`. Verdict ``ok`` stops the
   loop; unparseable text counts as ``revise``. With ``TextSettings.revise_threshold`` above 0.5 a
   ``revise`` is acted on only when the model is that sure of it (:func:`revise_probability`).
4. **refine**: sample the next image conditioned on everything so far; reflect again; up to
   ``rounds`` images.

Guidance follows upstream's interleaved inference (:class:`~ftkit.infer.context.GuidanceContexts`): the
text-CFG branch drops the text read since the last image (the prompt for the draft, so plain T2I
guides against the empty context; the plan / reflection rides along only in the conditional
branch, like upstream's "think" text), the image-CFG branch keeps the texts and drops the images.
With ``SamplerSettings.cfg_plan_scale`` set, a fourth branch drops only the generated text since the
last image (GoT's plan guidance; :mod:`ftkit.infer.sampler`).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ftkit.data.schema import Box, PlanStep, ReflectStep, Region
from ftkit.data.serialize import ParseError, parse_plan, parse_reflection, serialize_reflection
from ftkit.files import atomic_write
from ftkit.infer.context import Context, GuidanceContexts
from ftkit.infer.sampler import GeneratedText, decode_image, generate_image, generate_text
from ftkit.models.folders import SAMPLER_KEYS, model_sampling


@dataclass
class SamplerSettings:
    """Image sampler settings (upstream T2I defaults; for edits upstream uses cfg_img_scale 2, interval (0, 1))."""

    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    cfg_plan_scale: float | None = None  # plan guidance (GoT; see ftkit.infer.sampler); None = off
    inpaint: str = "path"  # how a correction holds the unflagged tokens (ftkit.infer.sampler.INPAINT_MODES)

    def kwargs(self) -> dict:
        d = asdict(self)
        d["cfg_interval"] = tuple(d["cfg_interval"])
        return d

    @classmethod
    def for_model(cls, folder: str | os.PathLike, adapter: str | os.PathLike | None = None) -> SamplerSettings:
        """These defaults, overridden by the model folder's ``sampling.json`` where it has one, and by the
        adapter folder's over that (:func:`ftkit.models.folders.read_sampling`)."""
        d = model_sampling(folder, adapter)
        return cls(**{k: v for k, v in d.items() if k in SAMPLER_KEYS})


@dataclass
class TextSettings:
    """Text decoding settings for plans and reflections (greedy by default)."""

    max_plan_tokens: int = 256
    max_reflect_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # a `revise` verdict is acted on only when p(revise) / (p(revise) + p(ok)) at the verdict token exceeds
    # this; 0.5 = the decoded verdict. Correcting pays only when p * fix_rate > (1 - p) * break_rate, so
    # a correction that breaks good drafts more often than it fixes bad ones needs a high threshold
    revise_threshold: float = 0.5

    def __post_init__(self):
        if not 0.5 <= self.revise_threshold < 1.0:
            raise ValueError(f"revise_threshold must be in [0.5, 1), got {self.revise_threshold}")


@dataclass
class Round:
    """One generated image and the reflection on it.

    ``reflection`` is ``None`` when the text did not parse (``parse_error`` says why); ``verdict`` is
    then ``"revise"``. ``verdict`` is the one acted on (:func:`acted_verdict`); ``p_revise`` the model's
    probability of ``revise`` at the verdict token (:func:`revise_probability`).
    """

    image: object  # PIL.Image.Image
    reflection_text: str | None = None
    reflection: ReflectStep | None = None
    verdict: str = "revise"
    parse_error: str | None = None
    p_revise: float | None = None


@dataclass
class Trace:
    """The reasoning trace of one prompt. ``plan`` is ``None`` only when planning was off; an
    unparseable plan becomes ``PlanStep(caption=plan_text)`` with ``plan_parse_error`` set."""

    prompt: str
    plan_text: str | None
    plan: PlanStep | None
    rounds: list[Round]
    plan_parse_error: str | None = None
    settings: dict = field(default_factory=dict)

    @property
    def final_image(self):
        """The last generated image."""
        return self.rounds[-1].image

    @property
    def stopped_ok(self) -> bool:
        return bool(self.rounds) and self.rounds[-1].verdict == "ok"

    # ---------------------------------------------------------------- JSON
    def to_dict(self, image_paths: list[str] | None = None, embed_images: bool = False) -> dict:
        """JSON-able dict. Images: ``image_paths[k]`` for round k, or base64 PNG with ``embed_images``,
        else ``null``."""
        if image_paths is not None and len(image_paths) != len(self.rounds):
            raise ValueError(f"{len(image_paths)} image paths for {len(self.rounds)} rounds")
        rounds = []
        for k, r in enumerate(self.rounds):
            img = None
            if embed_images:
                img = {"png_base64": base64.b64encode(_png_bytes(r.image)).decode("ascii")}
            elif image_paths is not None:
                img = image_paths[k]
            rounds.append({"image": img, "reflection_text": r.reflection_text,
                           "reflection": _reflection_dict(r.reflection), "verdict": r.verdict,
                           "p_revise": r.p_revise, "parse_error": r.parse_error})
        return {"prompt": self.prompt, "plan_text": self.plan_text, "plan": _plan_dict(self.plan),
                "plan_parse_error": self.plan_parse_error, "rounds": rounds,
                "final_round": len(self.rounds) - 1, "stopped_ok": self.stopped_ok, "settings": self.settings}

    def to_json(self, image_paths: list[str] | None = None, embed_images: bool = False, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(image_paths, embed_images), indent=indent)

    @classmethod
    def from_json(cls, text: str, base_dir: str | os.PathLike | None = None) -> Trace:
        """Inverse of :meth:`to_json`; images come from embedded PNGs or paths relative to ``base_dir``
        (``None`` when absent). Raises ValueError naming the field on malformed input."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"trace JSON does not parse: {e}") from e
        try:
            rounds = []
            for k, r in enumerate(d["rounds"]):
                rounds.append(Round(image=_load_image(r.get("image"), base_dir, f"rounds[{k}].image"),
                                    reflection_text=r.get("reflection_text"),
                                    reflection=_reflection_from(r.get("reflection")), verdict=r["verdict"],
                                    parse_error=r.get("parse_error"), p_revise=r.get("p_revise")))
            return cls(prompt=d["prompt"], plan_text=d.get("plan_text"), plan=_plan_from(d.get("plan")), rounds=rounds,
                       plan_parse_error=d.get("plan_parse_error"), settings=d.get("settings", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"trace JSON: missing or malformed field {e}") from e

    # ---------------------------------------------------------------- files
    def save(self, out_dir: str | os.PathLike, stem: str = "trace", cell: int = 192) -> dict[str, Path]:
        """Write ``{stem}_{k}.png`` per round, ``{stem}.png`` (final image), ``{stem}.json`` and
        ``{stem}_sheet.png`` into ``out_dir`` (each via a temporary name, then renamed). Returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        names = []
        for k, r in enumerate(self.rounds):
            p = out / f"{stem}_{k}.png"
            atomic_write(p, _png_bytes(r.image))
            names.append(p.name)
            paths[f"round_{k}"] = p
        paths["final"] = out / f"{stem}.png"
        atomic_write(paths["final"], _png_bytes(self.final_image))
        paths["json"] = out / f"{stem}.json"
        atomic_write(paths["json"], self.to_json(image_paths=names).encode())
        paths["sheet"] = out / f"{stem}_sheet.png"
        atomic_write(paths["sheet"], _png_bytes(contact_sheet(self, cell)))
        return paths


# ------------------------------------------------------------------------------------ helpers
def _plan_dict(p: PlanStep | None) -> dict | None:
    if p is None:
        return None
    return {"caption": p.caption, "boxes": [{"label": b.label, "box": list(b.box)} for b in p.boxes]}


def _plan_from(d: dict | None) -> PlanStep | None:
    if d is None:
        return None
    return PlanStep(caption=d["caption"], boxes=[Box(b["label"], tuple(b["box"])) for b in d["boxes"]])


def _reflection_dict(r: ReflectStep | None) -> dict | None:
    if r is None:
        return None
    return {"verdict": r.verdict, "critique": r.critique,
            "regions": [{"box": list(g.box), "label": g.label, "kind": g.kind} for g in r.regions]}


def _reflection_from(d: dict | None) -> ReflectStep | None:
    if d is None:
        return None
    return ReflectStep(verdict=d["verdict"], critique=d["critique"],
                       regions=[Region(box=tuple(g["box"]), label=g["label"], kind=g["kind"]) for g in d["regions"]])


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _load_image(v, base_dir, fld: str):
    from PIL import Image

    if v is None:
        return None
    if isinstance(v, dict):
        if "png_base64" not in v:
            raise ValueError(f"trace JSON: {fld} has no png_base64")
        im = Image.open(io.BytesIO(base64.b64decode(v["png_base64"])))
    else:
        p = Path(base_dir) / v if base_dir is not None else Path(v)
        if not p.is_file():
            return None
        im = Image.open(p)
    im.load()
    return im.convert("RGB")


def default_vit_hw(model, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Largest multiples of the ViT patch not above ``image_hw``, capped by the ViT position table
    (64 -> 56 on BAGEL, the builder's default)."""
    p, m = model.cfg.vit.patch_size, model.cfg.vit_max_num_patch_per_side
    return tuple(max(1, min(m, s // p)) * p for s in image_hw)  # type: ignore[return-value]


class _Text:
    """Tokenizer bridge: text <-> ids without special tokens."""

    def __init__(self, model, tokenizer):
        self.tok = tokenizer
        cfg = model.cfg
        specials = {cfg.bos_id, cfg.eos_id, cfg.start_of_image, cfg.end_of_image}
        specials |= set(getattr(tokenizer, "all_special_ids", []) or [])
        self.specials = specials

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def clean(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i not in self.specials]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(self.clean(ids), skip_special_tokens=True)

    @functools.cached_property
    def verdict_fork(self) -> tuple[list[int], int, int]:
        """``(prefix, ok_id, revise_id)``: the tokens a reflection shares before its verdict word, then the
        first token where ``<verdict>ok`` and ``<verdict>revise`` differ."""
        ok, rev = (self.encode(serialize_reflection(ReflectStep(verdict=v, critique=""))) for v in ("ok", "revise"))
        j = next(i for i, (a, b) in enumerate(zip(ok, rev)) if a != b)
        return ok[:j], ok[j], rev[j]

    @property
    def verdict_steps(self) -> int:
        """Decoding steps up to and including the verdict token: the logits :func:`revise_probability` reads."""
        return len(self.verdict_fork[0]) + 1


def revise_probability(gen: GeneratedText, text: _Text) -> float | None:
    r"""How sure the model is of ``revise``: at the token where the reflection writes its verdict,
    :math:`p(\text{revise}) / (p(\text{revise}) + p(\text{ok}))` from that step's logits (``gen`` decoded
    with ``return_logits``). ``None`` when the decoded text does not start with the verdict tag."""
    prefix, ok, rev = text.verdict_fork
    new = gen.new_ids  # decode with return_logits >= verdict_steps
    if gen.logits is None or len(gen.logits) <= len(prefix) or new[:len(prefix)] != prefix:
        return None
    two = gen.logits[len(prefix)][[rev, ok]].float()
    return float(torch.softmax(two, 0)[0])


def acted_verdict(decoded: str | None, p_revise: float | None, threshold: float) -> str:
    """The verdict the loop acts on, from the decoded one (``None``: the reflection did not parse): a decoded
    ``revise`` whose ``p_revise`` is at most ``threshold`` becomes ``ok`` (at 0.5 and greedy decoding nothing
    changes: a greedy ``revise`` has ``p_revise > 0.5``). Unparseable text counts as ``revise``: the loop must
    do something."""
    if decoded is None:
        return "revise"
    if decoded == "revise" and p_revise is not None and p_revise <= threshold:
        return "ok"
    return decoded


def _decode(ctx: Context, text: _Text, max_tokens: int, ts: TextSettings, generator,
            logits: bool | int = False) -> tuple[list[int], str, GeneratedText]:
    g = generate_text(ctx, max_tokens, do_sample=ts.do_sample, temperature=ts.temperature, top_p=ts.top_p,
                      generator=generator, return_logits=logits)
    ids = text.clean(g.new_ids)
    return ids, text.decode(ids), g


# ------------------------------------------------------------------------------------ entry points
@torch.no_grad()
def run_mcot(model, tokenizer, prompt: str, *, rounds: int = 2, image_hw: tuple[int, int] = (64, 64),
             plan: bool = True, input_image=None, vit_context: bool = True, vit_hw: tuple[int, int] | None = None,
             sampler: SamplerSettings | None = None, text: TextSettings | None = None,
             generator: torch.Generator | None = None, posterior: str = "sample") -> Trace:
    """Plan -> draft -> reflect -> refine for one prompt (see the module docstring).

    Args:
        model: a BagelModel with its autoencoder (base, base + adapter, or merged).
        tokenizer: its tokenizer (``encode`` / ``decode``).
        prompt: the user prompt.
        rounds: most images to generate (the draft counts); every image is reflected on and the loop
            stops early at verdict ``ok``.
        image_hw: generated image size (H, W), multiples of the VAE stride (16).
        plan: decode a plan before the draft.
        input_image: optional PIL image to edit (read first, as clean VAE + ViT, like the builder).
        vit_context: give generated images to the model as ViT context too (builder default).
        vit_hw: ViT size of context images (default :func:`default_vit_hw`).
        sampler, text: image sampler and text decoding settings.
        generator: CPU ``torch.Generator`` for noise, posterior samples and text sampling.
        posterior: how context images are VAE-encoded ("sample" as upstream, or "mean").

    Returns:
        a :class:`Trace`.

    Raises:
        ValueError: ``rounds < 1`` or a bad image size.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sampler = sampler or SamplerSettings()
    ts = text or TextSettings()
    vit_hw = tuple(vit_hw) if vit_hw is not None else default_vit_hw(model, image_hw)
    tx = _Text(model, tokenizer)
    gc = GuidanceContexts(model)
    img_kw = dict(vae_hw=tuple(image_hw), vit_hw=vit_hw, vit=vit_context, posterior=posterior, generator=generator)
    if input_image is not None:
        gc.add_image(input_image, **img_kw)
    gc.add_user_text(tx.encode(prompt))

    plan_text = plan_step = plan_err = None
    if plan:
        ids, plan_text, _ = _decode(gc.cond, tx, ts.max_plan_tokens, ts, generator)
        try:
            plan_step = parse_plan(plan_text)
        except ParseError as e:
            plan_err = str(e)
            plan_step = PlanStep(caption=plan_text)
        gc.add_generated_text(ids)

    out: list[Round] = []
    for k in range(rounds):
        lat = generate_image(model, gc.cond, gc.uncond_text, gc.uncond_img, hw=tuple(image_hw), generator=generator,
                             ctx_uncond_plan=gc.uncond_plan, **sampler.kwargs())
        image = decode_image(model, lat, tuple(image_hw))
        gc.add_image(image, **img_kw)
        ids, refl_text, g = _decode(gc.cond, tx, ts.max_reflect_tokens, ts, generator, logits=tx.verdict_steps)
        p = revise_probability(g, tx)
        try:
            refl = parse_reflection(refl_text)
            rnd = Round(image, refl_text, refl, acted_verdict(refl.verdict, p, ts.revise_threshold), p_revise=p)
        except ParseError as e:
            rnd = Round(image, refl_text, None, "revise", parse_error=str(e), p_revise=p)
        out.append(rnd)
        if rnd.verdict == "ok" or k == rounds - 1:
            break
        gc.add_generated_text(ids)

    settings = {"rounds": rounds, "image_hw": list(image_hw), "vit_hw": list(vit_hw), "plan": plan,
                "vit_context": vit_context, "posterior": posterior, "edit": input_image is not None,
                "sampler": {**sampler.kwargs(), "cfg_interval": list(sampler.cfg_interval)}, "text": asdict(ts)}
    return Trace(prompt=prompt, plan_text=plan_text, plan=plan_step, rounds=out, plan_parse_error=plan_err,
                 settings=settings)


@torch.no_grad()
def text_to_image(model, tokenizer, prompt: str, *, image_hw: tuple[int, int] = (64, 64),
                  sampler: SamplerSettings | None = None, generator: torch.Generator | None = None,
                  init_noise: torch.Tensor | None = None):
    """Plain text-to-image (upstream's T2I: context ``[prompt]``, text-CFG against the empty context).
    Returns a PIL image."""
    sampler = sampler or SamplerSettings()
    gc = GuidanceContexts(model)
    gc.add_user_text(_Text(model, tokenizer).encode(prompt))
    lat = generate_image(model, gc.cond, gc.uncond_text, None, hw=tuple(image_hw), init_noise=init_noise,
                         generator=generator, **sampler.kwargs())
    return decode_image(model, lat, tuple(image_hw))


# ------------------------------------------------------------------------------------ contact sheet
def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_cell(text: str, title: str, cell: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (cell, cell + 16), "white")
    d = ImageDraw.Draw(im)
    d.text((3, 2), title, fill="black", font=_font())
    lines = []
    for para in (text or "").splitlines():
        lines += textwrap.wrap(para, max(10, cell // 7)) or [""]
    room = cell // 13
    if len(lines) > room:
        lines = lines[: room - 1] + ["..."]
    d.multiline_text((4, 20), "\n".join(lines), fill="black", font=_font(), spacing=2)
    return im


def _image_cell(image, title: str, cell: int, boxes=()):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (cell, cell + 16), "white")
    pic = image.convert("RGB").resize((cell, cell), Image.NEAREST)
    d = ImageDraw.Draw(pic)
    for label, (x0, y0, x1, y1), color in boxes:
        d.rectangle([x0 * cell / 1000, y0 * cell / 1000, x1 * cell / 1000 - 1, y1 * cell / 1000 - 1], outline=color, width=2)
        d.text((x0 * cell / 1000 + 3, y0 * cell / 1000 + 2), label, fill=color, font=_font())
    im.paste(pic, (0, 16))
    ImageDraw.Draw(im).text((3, 2), title, fill="black", font=_font())
    return im


def contact_sheet(trace: Trace, cell: int = 192):
    """One row: prompt + plan text, then per round the image (the plan's boxes drawn on the draft,
    the reflection's regions on each image) and the reflection text with its verdict. Returns PIL."""
    from PIL import Image

    panels = []
    head = trace.prompt if trace.plan_text is None else f"{trace.prompt}\n\nplan:\n{trace.plan_text}"
    panels.append(_text_cell(head, "prompt / plan", cell))
    for k, r in enumerate(trace.rounds):
        boxes = []
        if k == 0 and trace.plan is not None:
            boxes += [(b.label, b.box, "#007aff") for b in trace.plan.boxes]
        if r.reflection is not None:
            boxes += [(f"{g.kind}: {g.label}", g.box, "#ff3b30") for g in r.reflection.regions]
        if r.image is not None:
            panels.append(_image_cell(r.image, "draft" if k == 0 else f"refine {k}", cell, boxes))
        note = f"\n[unparsed: {r.parse_error}]" if r.parse_error else ""
        panels.append(_text_cell((r.reflection_text or "") + note, f"reflect: {r.verdict}", cell))
    sheet = Image.new("RGB", (cell * len(panels), cell + 16), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * cell, 0))
    return sheet


__all__ = ["Round", "SamplerSettings", "TextSettings", "Trace", "acted_verdict", "contact_sheet", "default_vit_hw",
           "revise_probability", "run_mcot", "text_to_image"]
