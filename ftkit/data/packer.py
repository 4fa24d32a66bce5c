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

These rules live in :func:`wrap_text`, :func:`text_layout`, :func:`image_layout` (+ :func:`image_advance`),
:func:`vit_patches`, :func:`vae_grid` and :func:`latent_position_ids`; the packer and inference
(:mod:`ftkit.infer.context`, which appends the same blocks to a KV cache) both build their tokens from them.
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
    """[h*w] rows of a ``max_side x max_side`` position table for an h x w token grid: ``row * max_side + col``."""
    if h > max_side or w > max_side:
        raise ValueError(f"image grid {h}x{w} exceeds the position table's {max_side}x{max_side}")
    rows = torch.arange(h).unsqueeze(1) * max_side
    return (rows + torch.arange(w).unsqueeze(0)).reshape(-1)


def vit_patches(cfg: PackConfig, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT image [3, H, W] -> (patches [N, p*p*3] of :func:`patchify_vit`, their position ids [N] in the
    ``vit_max_patches_per_side`` table), N = (H/p)(W/p)."""
    p = cfg.vit_patch_size
    tokens = patchify_vit(image, p)
    return tokens, grid_position_ids(image.shape[1] // p, image.shape[2] // p, cfg.vit_max_patches_per_side)


def vae_grid(cfg: PackConfig, image: torch.Tensor) -> tuple[int, int]:
    """VAE image [3, H, W] -> its latent token grid (H / stride, W / stride); raises ValueError unless H and W
    are multiples of ``cfg.vae_stride``."""
    s = cfg.vae_stride
    if image.shape[1] % s or image.shape[2] % s:
        raise ValueError(f"VAE image {image.shape[1]}x{image.shape[2]} is not a multiple of {s}")
    return image.shape[1] // s, image.shape[2] // s


def latent_position_ids(cfg: PackConfig, grid_hw: tuple[int, int]) -> torch.Tensor:
    """[h*w] rows of the latent position table (side ``max_latent_size``) of an h x w VAE token grid."""
    return grid_position_ids(*grid_hw, cfg.max_latent_size)


# token kind of an image segment's body (its markers are text tokens)
IMAGE_TOKEN_KIND = {Kind.VIT_IMAGE: TOKEN_VIT, Kind.VAE_CLEAN: TOKEN_VAE, Kind.VAE_NOISY: TOKEN_VAE}


@dataclass(frozen=True)
class BlockLayout:
    """The tokens of one text or image segment, in sequence order.

    ``text_ids`` sit at the offsets ``text_offsets`` (text: every token; image: the two markers), image
    tokens at ``body_offsets``; per token its RoPE position, functionality and token kind; ``attention``
    inside the block (``"causal"`` | ``"full"`` | ``"noise"``); ``advance``: how far the RoPE position
    moves past the block.
    """

    text_ids: list[int]
    text_offsets: list[int]
    body_offsets: list[int]
    position_ids: list[int]
    functionality: list[int]
    token_kind: list[int]
    attention: str
    advance: int

    def __len__(self) -> int:
        return len(self.position_ids)


def wrap_text(cfg: PackConfig, ids: Sequence[int]) -> list[int]:
    """``[<|im_start|>] ids [<|im_end|>]``: a text segment's tokens."""
    return [cfg.bos_id, *ids, cfg.eos_id]


def text_layout(ids: Sequence[int], position: int, functionality: int = Functionality.LINGUISTIC) -> BlockLayout:
    """Text tokens ``ids`` as given (a segment's are :func:`wrap_text`'s): positions ``position, position + 1,
    ...``, causal, ``(functionality, TOKEN_TEXT)``; advance ``len(ids)``."""
    n = len(ids)
    return BlockLayout(text_ids=list(ids), text_offsets=list(range(n)), body_offsets=[],
                       position_ids=list(range(position, position + n)), functionality=[int(functionality)] * n,
                       token_kind=[TOKEN_TEXT] * n, attention="causal", advance=n)


def image_advance(noisy: bool) -> int:
    """RoPE positions an image takes: 1 for a ViT or clean VAE image (dropped or not), 0 for a noisy target."""
    return 0 if noisy else 1


def image_layout(cfg: PackConfig, n_body: int, position: int, functionality: int, token_kind: int, *,
                 noisy: bool = False) -> BlockLayout:
    """``[<|vision_start|>] n_body tokens [<|vision_end|>]``, all at ``position``; markers ``(LINGUISTIC,
    TOKEN_TEXT)``, body ``(functionality, token_kind)``; bidirectional inside (``"noise"``: also seen by no
    token outside it); advance :func:`image_advance`."""
    n, lin = n_body + 2, int(Functionality.LINGUISTIC)
    return BlockLayout(text_ids=[cfg.start_of_image, cfg.end_of_image], text_offsets=[0, n - 1],
                       body_offsets=list(range(1, n - 1)), position_ids=[position] * n,
                       functionality=[lin] + [int(functionality)] * n_body + [lin],
                       token_kind=[TOKEN_TEXT] + [int(token_kind)] * n_body + [TOKEN_TEXT],
                       attention="noise" if noisy else "full", advance=image_advance(noisy))


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

    def _emit(self, lay: BlockLayout, sample: int, step: int) -> int:
        """Append a block's tokens (text ids at their indexes, attention split); returns its first index."""
        start, n = self.L, len(lay)
        self.pos += lay.position_ids
        self.kind += lay.token_kind
        self.func += lay.functionality
        self.sample += [sample] * n
        self.step += [step] * n
        self.text_ids += lay.text_ids
        self.text_idx += [start + o for o in lay.text_offsets]
        self.attention.append((start, start + n, lay.attention, sample))
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
                ids = wrap_text(cfg, seg.text_ids)
                lay = text_layout(ids, rope, seg.functionality)
                start, n = self._emit(lay, sample, int(seg.step)), len(lay)
                if seg.loss:
                    self.ce_idx += list(range(start, start + n - 1))
                    self.ce_lab += ids[1:]
                    self.ce_step += [int(seg.step)] * (n - 1)
                if seg.end_label is not None:
                    self.ce_idx.append(start + n - 1)
                    self.ce_lab.append(int(seg.end_label))
                    self.ce_step.append(int(seg.step))
                rope += lay.advance
                continue

            noisy = seg.kind == Kind.VAE_NOISY
            if seg.dropped:
                rope += image_advance(noisy)
                continue
            image = seg.image
            if seg.kind == Kind.VIT_IMAGE:
                tokens, vit_pos = vit_patches(cfg, image)
                n_img = tokens.shape[0]
            else:
                hw = vae_grid(cfg, image)
                n_img = hw[0] * hw[1]
            lay = image_layout(cfg, n_img, rope, seg.functionality, IMAGE_TOKEN_KIND[seg.kind], noisy=noisy)
            start = self._emit(lay, sample, int(seg.step))
            body = [start + o for o in lay.body_offsets]
            rope += lay.advance
            if seg.kind == Kind.VIT_IMAGE:
                self.vit_tokens.append(tokens)
                self.vit_pos.append(vit_pos)
                self.vit_idx += body
                self.vit_seqlens.append(n_img)
            else:
                image_of_segment[si] = len(self.vae_images)
                self.vae_images.append(image)
                self.vae_hw.append(hw)
                self.vae_idx += body
                self.vae_pos.append(latent_position_ids(cfg, hw))
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
                if noisy and seg.loss:
                    self.mse_idx += body
                    self.mse_step += [int(seg.step)] * n_img
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
