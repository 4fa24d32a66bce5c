"""Pack lists of segments into one :class:`~ftkit.segments.PackedBatch` (upstream BAGEL's layout).

Rules (../shared/spec/bagel.md, reproduced exactly on the bagel-tiny fixture):

* text ``[<|im_start|>] ids [<|im_end|>]``: RoPE position +1 per token, causal attention. With
  ``loss``, CE at ``<|im_start|>`` and each content token (label: the next token, the last one
  labelled ``<|im_end|>``); with ``end_label`` also CE at ``<|im_end|>``.
* image ``[<|vision_start|>] tokens [<|vision_end|>]``: every token, markers included, shares one
  RoPE position, bidirectional inside the image. The position advances by one after a ViT image or
  a clean VAE image, not after a noisy target; a noisy image is seen by no token outside it.
* a dropped segment (CFG dropout) emits no token; a dropped image still advances the position.
* RoPE positions restart at 0 for each packed sample; samples never attend to each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ftkit.segments import (
    TOKEN_TEXT,
    TOKEN_VAE,
    TOKEN_VIT,
    Functionality,
    Kind,
    PackedBatch,
    Segment,
)


@dataclass(frozen=True)
class PackConfig:
    bos_id: int
    eos_id: int
    start_of_image: int
    end_of_image: int
    vit_patch_size: int = 14
    vit_max_patches_per_side: int = 70
    vae_downsample: int = 8
    latent_patch_size: int = 2
    max_latent_size: int = 64

    @property
    def vae_stride(self) -> int:
        return self.vae_downsample * self.latent_patch_size


def patchify_vit(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[3, H, W] -> [(H/p)*(W/p), p*p*3]; patches row-major, inside a patch (row, column, channel)."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"ViT image {h}x{w} is not a multiple of the patch size {patch}")
    x = image.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch) * (w // patch), patch * patch * c)


def grid_position_ids(h: int, w: int, max_side: int) -> torch.Tensor:
    if h > max_side or w > max_side:
        raise ValueError(f"image grid {h}x{w} exceeds the position table's {max_side}x{max_side}")
    rows = torch.arange(h).unsqueeze(1) * max_side
    return (rows + torch.arange(w).unsqueeze(0)).reshape(-1)


class _Builder:
    def __init__(self, cfg: PackConfig):
        self.cfg = cfg
        self.L = 0
        self.pos: list[int] = []
        self.kind: list[int] = []
        self.func: list[int] = []
        self.sample: list[int] = []
        self.step: list[int] = []
        self.attention: list[tuple[int, int, str, int]] = []
        self.text_ids: list[int] = []
        self.text_idx: list[int] = []
        self.vit_tokens: list[torch.Tensor] = []
        self.vit_pos: list[torch.Tensor] = []
        self.vit_idx: list[int] = []
        self.vit_seqlens: list[int] = []
        self.vae_images: list[torch.Tensor] = []
        self.vae_hw: list[tuple[int, int]] = []
        self.vae_idx: list[int] = []
        self.vae_pos: list[torch.Tensor] = []
        self.vae_noisy: list[bool] = []
        self.vae_step: list[int] = []
        self.vae_logits: list[float] = []
        self.vae_masks: list[torch.Tensor | None] = []
        self.vae_pair: list[int] = []
        self.ce_idx: list[int] = []
        self.ce_lab: list[int] = []
        self.ce_step: list[int] = []
        self.mse_idx: list[int] = []
        self.mse_step: list[int] = []
        self.sample_lengths: list[int] = []

    def _emit(self, n: int, pos: int | list[int], kind: int | list[int], func: int | list[int], sample: int, step: int):
        start = self.L
        self.pos += pos if isinstance(pos, list) else [pos] * n
        self.kind += kind if isinstance(kind, list) else [kind] * n
        self.func += func if isinstance(func, list) else [func] * n
        self.sample += [sample] * n
        self.step += [step] * n
        self.L += n
        return start

    def add_sample(self, segments: Sequence[Segment], sample: int) -> None:
        cfg = self.cfg
        rope = 0
        start_len = self.L
        image_of_segment: dict[int, int] = {}
        for si, seg in enumerate(segments):
            if seg.kind == Kind.TEXT:
                if seg.dropped:
                    continue
                ids = [cfg.bos_id, *seg.text_ids, cfg.eos_id]
                n = len(ids)
                start = self._emit(n, list(range(rope, rope + n)), TOKEN_TEXT, int(seg.functionality), sample, int(seg.step))
                self.text_ids += ids
                self.text_idx += list(range(start, start + n))
                if seg.loss:
                    self.ce_idx += list(range(start, start + n - 1))
                    self.ce_lab += ids[1:]
                    self.ce_step += [int(seg.step)] * (n - 1)
                if seg.end_label is not None:
                    self.ce_idx.append(start + n - 1)
                    self.ce_lab.append(int(seg.end_label))
                    self.ce_step.append(int(seg.step))
                self.attention.append((start, start + n, "causal", sample))
                rope += n
                continue

            noisy = seg.kind == Kind.VAE_NOISY
            if seg.dropped:
                if not noisy:
                    rope += 1
                continue
            image = seg.image
            if seg.kind == Kind.VIT_IMAGE:
                p = cfg.vit_patch_size
                tokens = patchify_vit(image, p)
                hw = (image.shape[1] // p, image.shape[2] // p)
                n_img = tokens.shape[0]
                tok_kind = TOKEN_VIT
            else:
                s = cfg.vae_stride
                if image.shape[1] % s or image.shape[2] % s:
                    raise ValueError(f"VAE image {image.shape[1]}x{image.shape[2]} is not a multiple of {s}")
                hw = (image.shape[1] // s, image.shape[2] // s)
                n_img = hw[0] * hw[1]
                tok_kind = TOKEN_VAE
            n = n_img + 2
            marker_func = int(Functionality.LINGUISTIC)
            funcs = [marker_func] + [int(seg.functionality)] * n_img + [marker_func]
            kinds = [TOKEN_TEXT] + [tok_kind] * n_img + [TOKEN_TEXT]
            start = self._emit(n, rope, kinds, funcs, sample, int(seg.step))
            self.text_ids += [cfg.start_of_image, cfg.end_of_image]
            self.text_idx += [start, start + n - 1]
            body = list(range(start + 1, start + 1 + n_img))
            if seg.kind == Kind.VIT_IMAGE:
                self.vit_tokens.append(tokens)
                self.vit_pos.append(grid_position_ids(*hw, cfg.vit_max_patches_per_side))
                self.vit_idx += body
                self.vit_seqlens.append(n_img)
                rope += 1
                self.attention.append((start, start + n, "full", sample))
            else:
                image_of_segment[si] = len(self.vae_images)
                self.vae_images.append(image)
                self.vae_hw.append(hw)
                self.vae_idx += body
                self.vae_pos.append(grid_position_ids(*hw, cfg.max_latent_size))
                self.vae_noisy.append(noisy)
                self.vae_step.append(int(seg.step))
                if noisy:
                    self.vae_logits.append(math.nan if seg.timestep_logit is None else float(seg.timestep_logit))
                else:
                    self.vae_logits.append(-math.inf)
                mask = None
                if seg.region_mask is not None:
                    m = seg.region_mask.to(torch.float32)[None, None]
                    if m.shape[-2:] != image.shape[-2:]:
                        raise ValueError(f"region_mask {tuple(m.shape[-2:])} != image {tuple(image.shape[-2:])}")
                    mask = F.max_pool2d(m, cfg.vae_stride)[0, 0] > 0
                self.vae_masks.append(mask)
                pair = -1
                if seg.pair_with is not None:
                    if seg.pair_with not in image_of_segment:
                        raise ValueError(f"segment {si}: pair_with={seg.pair_with} is not an earlier VAE image")
                    pair = image_of_segment[seg.pair_with]
                self.vae_pair.append(pair)
                if noisy:
                    if seg.loss:
                        self.mse_idx += body
                        self.mse_step += [int(seg.step)] * n_img
                    self.attention.append((start, start + n, "noise", sample))
                else:
                    rope += 1
                    self.attention.append((start, start + n, "full", sample))
        self.sample_lengths.append(self.L - start_len)

    def build(self) -> PackedBatch:
        long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        patch_dim = self.cfg.vit_patch_size**2 * 3
        return PackedBatch(
            sequence_length=self.L,
            position_ids=long(self.pos),
            token_kind=long(self.kind),
            functionality=long(self.func),
            sample_ids=long(self.sample),
            token_step=long(self.step),
            attention=self.attention,
            text_ids=long(self.text_ids),
            text_indexes=long(self.text_idx),
            vit_tokens=torch.cat(self.vit_tokens) if self.vit_tokens else torch.zeros(0, patch_dim),
            vit_position_ids=torch.cat(self.vit_pos) if self.vit_pos else long([]),
            vit_token_indexes=long(self.vit_idx),
            vit_seqlens=self.vit_seqlens,
            vae_images=self.vae_images,
            vae_latent_hw=self.vae_hw,
            vae_token_indexes=long(self.vae_idx),
            vae_position_ids=torch.cat(self.vae_pos) if self.vae_pos else long([]),
            vae_image_noisy=self.vae_noisy,
            vae_image_step=self.vae_step,
            vae_timestep_logits=torch.tensor(self.vae_logits, dtype=torch.float32),
            vae_region_masks=self.vae_masks,
            vae_pair_with=self.vae_pair,
            ce_indexes=long(self.ce_idx),
            ce_labels=long(self.ce_lab),
            ce_step=long(self.ce_step),
            mse_indexes=long(self.mse_idx),
            mse_step=long(self.mse_step),
            sample_lengths=self.sample_lengths,
        )


def pack(samples: Sequence[Sequence[Segment]], cfg: PackConfig) -> PackedBatch:
    """Pack several samples (each a list of segments) into one sequence."""
    if not samples:
        raise ValueError("pack() needs at least one sample")
    b = _Builder(cfg)
    for i, segs in enumerate(samples):
        b.add_sample(segs, i)
    return b.build()


def packed_length(segments: Sequence[Segment], cfg: PackConfig) -> int:
    """Tokens one sample takes once packed (for token-budget batching), without building it."""
    n = 0
    for seg in segments:
        if seg.dropped:
            continue
        if seg.kind == Kind.TEXT:
            n += len(seg.text_ids) + 2
        elif seg.kind == Kind.VIT_IMAGE:
            p = cfg.vit_patch_size
            n += (seg.image.shape[1] // p) * (seg.image.shape[2] // p) + 2
        else:
            s = cfg.vae_stride
            n += (seg.image.shape[1] // s) * (seg.image.shape[2] // s) + 2
    return n
