"""Sequence builder: :class:`~ftkit.data.schema.StepRecord` -> list of :class:`~ftkit.segments.Segment`.

Mapping (``S`` = the record's supervised step types, default every type present; "supervised
image" = a draft/refine whose type is in ``S``):

======================  ===========================================================================
record part             segments
======================  ===========================================================================
input image (edit)      VAE_CLEAN + VIT_IMAGE, step CONTEXT (upstream's edit order: image first)
prompt                  TEXT, step CONTEXT, no loss; ``end_label = start_of_image`` if the first
                        step is a supervised image
plan                    TEXT of :func:`~ftkit.data.serialize.serialize_plan`, step PLAN, loss if
                        "plan" in S; ``end_label = start_of_image`` if a supervised image follows
reflect                 TEXT of :func:`~ftkit.data.serialize.serialize_reflection`, step REFLECT,
                        loss if "reflect" in S; ``end_label`` as for plan
draft / refine          if supervised: VAE_NOISY (loss) of step DRAFT / REFINE; then, when later
                        steps follow (they read it as context), a VAE_CLEAN copy and, if
                        ``vit_context_for_generated``, a VIT_IMAGE copy, both of the same step, no
                        loss. An unsupervised image appears only as those clean copies.
refine (supervised)     also ``region_mask`` ([H, W] bool at the VAE size: the union of the
                        preceding reflection's region boxes, or its mask image) and ``pair_with``
                        = index of the VAE_CLEAN segment of the image it refines
======================  ===========================================================================

Steps after the last supervised step are dropped (they would carry no loss). Images are resized to
``vae_image_size`` / ``vit_image_size`` squares (bicubic) and mapped to [-1, 1]:
``x -> (x / 255 - 0.5) / 0.5``.

:func:`apply_cfg_dropout` then marks CONTEXT segments ``dropped`` for classifier-free guidance
(upstream BAGEL rates: text 0.1, ViT 0.3, clean VAE 0.3); segments with a loss are never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ftkit.data.schema import (
    ERR_IMAGE_DECODE,
    DraftStep,
    ImageRef,
    PlanStep,
    RecordError,
    RefineStep,
    ReflectStep,
    StepRecord,
)
from ftkit.data.serialize import serialize_plan, serialize_reflection
from ftkit.segments import Kind, Segment, Step

_STEP = {"plan": Step.PLAN, "draft": Step.DRAFT, "reflect": Step.REFLECT, "refine": Step.REFINE}


@dataclass(frozen=True)
class BuilderConfig:
    """Args:
        start_of_image: id of ``<|vision_start|>`` (the CE label that opens an image).
        vae_image_size: side of generated / clean VAE images (multiple of ``vae_stride``).
        vit_image_size: side of ViT context images (multiple of ``vit_patch_size``).
        vae_stride: VAE downsampling x latent patch (16 on BAGEL).
        vit_patch_size: ViT patch (14 on BAGEL).
        vit_context_for_generated: also give generated images to the model as ViT context when
            later steps read them (reflection "sees" the draft with the understanding encoder).

    Raises:
        ValueError: a size is not a positive multiple of its stride.
    """

    start_of_image: int
    vae_image_size: int = 64
    vit_image_size: int = 56
    vae_stride: int = 16
    vit_patch_size: int = 14
    vit_context_for_generated: bool = True

    def __post_init__(self):
        if self.vae_image_size <= 0 or self.vae_image_size % self.vae_stride:
            raise ValueError(f"vae_image_size {self.vae_image_size} must be a positive multiple of {self.vae_stride}")
        if self.vit_image_size <= 0 or self.vit_image_size % self.vit_patch_size:
            raise ValueError(f"vit_image_size {self.vit_image_size} must be a positive multiple of "
                             f"{self.vit_patch_size}")


def pil_to_tensor(image, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image -> [3, H, W] float32 in [-1, 1]: RGB, resized (bicubic) to ``size`` (S: square, or (H, W);
    None: as it is) when it differs, then ``(x/255 - 0.5)/0.5``. The one image conversion of training
    and inference (:func:`ftkit.infer.context.image_to_tensor`)."""
    from PIL import Image

    im = image.convert("RGB")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        if im.size != (w, h):
            im = im.resize((w, h), Image.BICUBIC)
    w, h = im.size
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    return (x.permute(2, 0, 1).to(torch.float32) / 255.0 - 0.5) / 0.5


def boxes_to_mask(boxes: Sequence[Sequence[int]], height: int, width: int) -> torch.Tensor:
    """[H, W] bool, True inside any box ([x0, y0, x1, y1] in 0..1000; pixel span floor(x0*W/1000) ..
    ceil(x1*W/1000))."""
    m = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = (x0 * width) // 1000, (y0 * height) // 1000
        c1, r1 = -((-x1 * width) // 1000), -((-y1 * height) // 1000)
        m[r0:r1, c0:c1] = True
    return m


def mask_image_to_tensor(image, height: int, width: int) -> torch.Tensor:
    """Mask image -> [H, W] bool (nearest resize, grey level > 127)."""
    from PIL import Image

    im = image.convert("L").resize((width, height), Image.NEAREST)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(height, width)
    return x > 127


class _Images:
    """Decode each ImageRef once per record; decode errors become RecordErrors."""

    def __init__(self, rec: StepRecord):
        self.rec, self.cache = rec, {}

    def pil(self, ref: ImageRef, fld: str):
        key = id(ref)
        if key not in self.cache:
            try:
                self.cache[key] = ref.open()
            except (OSError, ValueError, SyntaxError) as e:
                raise RecordError(self.rec.source, self.rec.index, fld, f"image does not decode ({ref.name}): {e}",
                                  ERR_IMAGE_DECODE) from None
        return self.cache[key]


def build_segments(record: StepRecord, tokenize: Callable[[str], list[int]], cfg: BuilderConfig) -> list[Segment]:
    """Turn a record into segments (see the module docstring for the mapping).

    Args:
        record: a validated record.
        tokenize: text -> token ids (no special tokens; the packer adds ``<|im_start|>``/``<|im_end|>``).
        cfg: sizes and the start-of-image id.

    Raises:
        RecordError: an image does not decode (names file, record and field), a plan or reflection cannot be
            written as text, or the record has no supervised step.
    """
    sup = record.supervised
    last = max((i for i, s in enumerate(record.steps) if s.type in sup), default=-1)
    if last < 0:
        raise RecordError(record.source, record.index, "supervise",
                          f"record has no supervised step (supervise={sorted(sup)})")
    steps = record.steps[: last + 1]
    images = _Images(record)
    V, T = cfg.vae_image_size, cfg.vit_image_size
    soi = cfg.start_of_image

    def supervised_image(i: int) -> bool:
        return i < len(steps) and isinstance(steps[i], (DraftStep, RefineStep)) and steps[i].type in sup

    segs: list[Segment] = []
    if record.input_image is not None:
        pil = images.pil(record.input_image, "input_image")
        segs.append(Segment(Kind.VAE_CLEAN, Step.CONTEXT, image=pil_to_tensor(pil, V)))
        segs.append(Segment(Kind.VIT_IMAGE, Step.CONTEXT, image=pil_to_tensor(pil, T)))
    segs.append(Segment(Kind.TEXT, Step.CONTEXT, text_ids=list(tokenize(record.prompt)),
                        end_label=soi if supervised_image(0) else None))

    clean_of_step: dict[int, int] = {}  # step index -> index of its VAE_CLEAN segment
    last_image: int | None = None
    last_reflect: ReflectStep | None = None
    for i, s in enumerate(steps):
        step = _STEP[s.type]
        loss = s.type in sup
        if isinstance(s, (PlanStep, ReflectStep)):
            try:
                text = serialize_plan(s) if isinstance(s, PlanStep) else serialize_reflection(s)
            except ValueError as e:  # a record the schema let through but the text format cannot write
                raise RecordError(record.source, record.index, f"steps[{i}]", str(e)) from e
            segs.append(Segment(Kind.TEXT, step, text_ids=list(tokenize(text)), loss=loss,
                                end_label=soi if supervised_image(i + 1) else None))
            if isinstance(s, ReflectStep):
                last_reflect = s
            continue
        fld = f"steps[{i}].image"
        pil = images.pil(s.image, fld)
        x = pil_to_tensor(pil, V)
        if loss:
            region_mask = pair_with = None
            if isinstance(s, RefineStep):
                if last_reflect is not None:
                    if last_reflect.mask is not None:
                        region_mask = mask_image_to_tensor(images.pil(last_reflect.mask, f"steps[{i}] reflect mask"), V, V)
                    elif last_reflect.regions:
                        region_mask = boxes_to_mask([r.box for r in last_reflect.regions], V, V)
                if last_image is not None:
                    pair_with = clean_of_step.get(last_image)
            segs.append(Segment(Kind.VAE_NOISY, step, image=x, loss=True, region_mask=region_mask,
                                pair_with=pair_with))
        if i < len(steps) - 1:
            clean_of_step[i] = len(segs)
            segs.append(Segment(Kind.VAE_CLEAN, step, image=x))
            if cfg.vit_context_for_generated:
                segs.append(Segment(Kind.VIT_IMAGE, step, image=pil_to_tensor(pil, T)))
        last_image = i
    return segs


def apply_cfg_dropout(segments: Sequence[Segment], text: float = 0.1, vit: float = 0.3, vae: float = 0.3,
                      plan: float = 0.0, generator: torch.Generator | None = None) -> list[Segment]:
    """Classifier-free-guidance dropout: each CONTEXT segment without loss is marked ``dropped`` with
    probability ``text`` (TEXT), ``vit`` (VIT_IMAGE) or ``vae`` (VAE_CLEAN), independently. A dropped
    segment emits no tokens (a dropped image still advances the RoPE position; see the packer).
    With probability ``plan`` the sample's plan is dropped too, loss and all, when a supervised image
    follows it (GoT's spatial-condition dropout: the image is then learned from the prompt alone, the
    context of plan guidance's extra branch); otherwise loss targets are never dropped.
    Returns new segments; the input list is not modified."""
    rates = {Kind.TEXT: text, Kind.VIT_IMAGE: vit, Kind.VAE_CLEAN: vae}
    for name, p in (*((k.value, p) for k, p in rates.items()), ("plan", plan)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout rate for {name} must be in [0, 1], got {p}")
    drop_plan = False
    if plan > 0:
        plans = [i for i, s in enumerate(segments) if s.step == Step.PLAN and s.kind == Kind.TEXT]
        if plans and any(s.kind == Kind.VAE_NOISY for s in segments[plans[0] + 1:]):
            drop_plan = float(torch.rand((), generator=generator)) < plan
    out = []
    for seg in segments:
        p = rates.get(seg.kind, 0.0)
        if seg.step == Step.CONTEXT and not seg.loss and p > 0:
            if float(torch.rand((), generator=generator)) < p:
                seg = replace(seg, dropped=True)
        elif drop_plan and seg.step == Step.PLAN and seg.kind == Kind.TEXT:
            seg = replace(seg, dropped=True)
        out.append(seg)
    return out
