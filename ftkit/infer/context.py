"""Inference context over the decoder's KV cache (interleaved text / image conditioning).

A :class:`Context` is what the model has "read" so far: the per-layer KV cache (a list with one
``(k, v)`` pair per layer, ``k``/``v`` of shape ``[Hkv, L, head_dim]`` after RoPE), the number of
cached tokens ``length`` and the next RoPE position ``position``. Appending content prefills the new
tokens over the cache; the layout is the packer's (``ftkit/data/packer.py``), so what the model reads
at inference is what it was trained on:

=====================  ==========================================================  ==================
item                   tokens (expert = ``model.expert_index(functionality, kind)``)  RoPE positions
=====================  ==========================================================  ==================
text                   ``[<|im_start|>] ids [<|im_end|>]``, causal, linguistic        p, p+1, ... (+n)
ViT image              ``[<|vision_start|>] ViT tokens [<|vision_end|>]``, full;       all p, then +1
                       markers linguistic/text, body semantic/ViT
clean VAE image        ``[<|vision_start|>] VAE tokens [<|vision_end|>]``, full;       all p, then +1
                       body semantic/VAE (BAGEL: generation expert), t = 0 embedding
=====================  ==========================================================  ==================

Blocks are built by the packer's own rules (:func:`~ftkit.data.packer.wrap_text`,
:func:`~ftkit.data.packer.text_layout`, :func:`~ftkit.data.packer.image_layout`, the functionality table
:data:`ftkit.segments.DEFAULT_FUNCTIONALITY`) and image tokens by the model's
:meth:`~ftkit.models.bagel.BagelModel.embed_vit_tokens` / :meth:`~ftkit.models.bagel.BagelModel.embed_vae_tokens`,
the functions training's :meth:`~ftkit.models.bagel.BagelModel.embed` uses: a layout change is one edit.

Every new block sees the whole cache; text is causal inside itself, an image block is
bidirectional inside itself. Tensors in the cache are never modified in place: appending builds new
tensors, so :meth:`Context.copy` is O(layers) and copies share storage safely.

:func:`forward_blocks` runs blocks of several contexts in ONE decoder call (their caches concatenated
along the key axis; each block attends its own cache and itself as one row of a padded batch,
``RowLayout``, rather than through one mostly-masked block-diagonal mask), which is how the sampler
batches guidance branches and prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftkit.data.builder import pil_to_tensor
from ftkit.data.packer import (
    IMAGE_TOKEN_KIND,
    BlockLayout,
    PackConfig,
    image_layout,
    latent_position_ids,
    text_layout,
    vae_grid,
    vit_patches,
    wrap_text,
)
from ftkit.models.attention import RowLayout
from ftkit.segments import DEFAULT_FUNCTIONALITY, Kind

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Block:
    """New tokens to run over a context.

    Args:
        embeds: ``[L, D]`` LLM input embeddings.
        position_ids: ``[L]`` RoPE positions.
        expert: ``[L]`` expert index per token (from ``model.expert_index``).
        causal: causal attention inside the block (text) or bidirectional (image).
        advance: how far the block moves the context's RoPE position once appended (the packer's rule).
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor
    expert: torch.Tensor
    causal: bool
    advance: int = 0

    def __len__(self) -> int:
        return self.embeds.shape[0]


def pack_config(model) -> PackConfig:
    """The packer geometry of ``model`` (special-token ids, patch sizes, position-table sides)."""
    return PackConfig(**model.cfg.pack_config())


def layout_block(model, lay: BlockLayout, body: torch.Tensor | None = None) -> Block:
    """A packer :class:`~ftkit.data.packer.BlockLayout` -> :class:`Block`: its text ids embedded at their
    offsets, ``body`` [N, D] (image tokens, already LLM-width) at the others, experts from
    ``model.expert_index(functionality, token_kind)``."""
    dev = model.device
    text = model.language_model.model.embed_tokens(torch.tensor(lay.text_ids, dtype=torch.long, device=dev))
    if lay.body_offsets:
        if body is None or body.shape[0] != len(lay.body_offsets):
            raise ValueError(f"layout has {len(lay.body_offsets)} image tokens, got "
                             f"{None if body is None else body.shape[0]}")
        emb = text.new_empty(len(lay), text.shape[1])
        emb[torch.tensor(lay.text_offsets, device=dev)] = text
        emb[torch.tensor(lay.body_offsets, device=dev)] = body.to(text.dtype)
    else:
        emb = text
    exp = model.expert_index(torch.tensor(lay.functionality, dtype=torch.long, device=dev),
                             torch.tensor(lay.token_kind, dtype=torch.long, device=dev))
    pos = torch.tensor(lay.position_ids, dtype=torch.long, device=dev)
    return Block(emb, pos, exp, causal=lay.attention == "causal", advance=lay.advance)


def text_block(model, ids, position: int) -> Block:
    """Tokens ``ids`` as they are (no bos/eos added), positions ``position ..``, causal, linguistic expert."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
    if not ids:
        raise ValueError("text_block needs at least one token")
    vocab = model.cfg.llm.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"token id outside the vocabulary [0, {vocab}): min {min(ids)}, max {max(ids)}")
    return layout_block(model, text_layout(ids, position))


def image_block(model, body: torch.Tensor, position: int, functionality: int, token_kind: int, *,
                noisy: bool = False) -> Block:
    """``[<|vision_start|>] body [<|vision_end|>]``, every token at ``position``, bidirectional
    (:func:`~ftkit.data.packer.image_layout`).

    Markers are text tokens (linguistic functionality); ``body`` [N, D] tokens get
    ``(functionality, token_kind)``; experts come from ``model.expert_index``.
    """
    return layout_block(model, image_layout(pack_config(model), body.shape[0], position, functionality, token_kind,
                                            noisy=noisy), body)


def segment_block(model, kind: Kind, body: torch.Tensor, position: int) -> Block:
    """:func:`image_block` with the functionality and token kind the packer gives a ``kind`` segment
    (ViT / clean VAE: semantic; noisy VAE: generative, a query that moves no position)."""
    return image_block(model, body, position, DEFAULT_FUNCTIONALITY[kind], IMAGE_TOKEN_KIND[kind],
                       noisy=kind == Kind.VAE_NOISY)


@dataclass
class MergedCache:
    """Several contexts' caches concatenated along the key axis (``past``, ``None`` when all are empty)
    and each one's length; build once with :func:`merge_caches` and reuse across calls."""

    past: KVCache | None
    lens: list[int]


def merge_caches(caches: list[KVCache | None]) -> MergedCache:
    lens = [0 if c is None else c[0][0].shape[1] for c in caches]
    present = [c for c in caches if c is not None]
    if not present:
        return MergedCache(None, lens)
    if len(present) == 1:
        return MergedCache(present[0], lens)
    past = [(torch.cat([c[i][0] for c in present], dim=1), torch.cat([c[i][1] for c in present], dim=1))
            for i in range(len(present[0]))]
    return MergedCache(past, lens)


def forward_blocks(model, caches: list[KVCache | None] | MergedCache, blocks: list[Block], *, update: bool = False
                   ) -> tuple[list[torch.Tensor], list[KVCache] | None]:
    """Run ``blocks[i]`` over cache i for every i in one decoder call.

    The caches are concatenated along the key axis (pass a :class:`MergedCache` to reuse one); the
    mask ``[sum Lq, sum Lpast + sum Lq]`` lets block i see exactly its own cache and itself (causally
    or fully). Returns the final-normed hidden states per block and, with ``update``, the extended
    cache per block (``cat(cache_i, new_i)``).
    """
    merged = caches if isinstance(caches, MergedCache) else merge_caches(list(caches))
    if len(merged.lens) != len(blocks) or not blocks:
        raise ValueError(f"forward_blocks needs one cache per block, got {len(merged.lens)} caches, {len(blocks)} blocks")
    dev = model.device
    past_lens = merged.lens
    q_lens = [len(b) for b in blocks]
    P, Q = sum(past_lens), sum(q_lens)
    # each block's attention as one row of a padded batch (RowLayout) rather than one [Q, P + Q] mask that
    # is mostly pairs of different blocks (the kernels do not skip masked pairs); the dense mask when cheaper
    rows = RowLayout.for_blocks(past_lens, q_lens, [b.causal for b in blocks], dev)
    mask = rows if len(blocks) > 1 and 2 * rows.work() <= Q * (P + Q) else rows.dense(Q, P + Q)
    if len(blocks) == 1:
        embeds, pos, exp = blocks[0].embeds, blocks[0].position_ids, blocks[0].expert
    else:
        embeds = torch.cat([b.embeds for b in blocks])
        pos = torch.cat([b.position_ids for b in blocks])
        exp = torch.cat([b.expert for b in blocks])
    hidden, cache = model.prefill(embeds, pos, exp, mask, merged.past)
    hiddens = list(hidden.split(q_lens))
    if not update:
        return hiddens, None
    if len(blocks) == 1:
        return hiddens, [cache]
    out = []
    p0 = q0 = 0
    for pl, ql in zip(past_lens, q_lens):
        kv = []
        for k, v in cache:
            kv.append((torch.cat([k[:, p0:p0 + pl], k[:, P + q0:P + q0 + ql]], dim=1),
                       torch.cat([v[:, p0:p0 + pl], v[:, P + q0:P + q0 + ql]], dim=1)))
        out.append(kv)
        p0 += pl
        q0 += ql
    return hiddens, out


def image_to_tensor(image, hw: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image (resized to ``hw`` = (H, W) with bicubic if given) -> [3, H, W] float32 in [-1, 1], the
    training conversion (:func:`ftkit.data.builder.pil_to_tensor`). Tensors pass through."""
    return image if isinstance(image, torch.Tensor) else pil_to_tensor(image, hw)


class Context:
    """What the model has read: KV cache, cached length and next RoPE position.

    ``add_*`` methods prefill new content over the cache, update ``self`` and return it (chainable);
    :meth:`copy` forks a context cheaply (branches for classifier-free guidance).

    Args:
        model: a :class:`~ftkit.models.bagel.BagelModel` (any expert count: routing goes through
            ``model.expert_index``).
    """

    def __init__(self, model, cache: KVCache | None = None, length: int = 0, position: int = 0):
        self.model = model
        self.cache = cache
        self.length = length
        self.position = position

    def __repr__(self) -> str:
        return f"Context(length={self.length}, position={self.position})"

    def copy(self) -> Context:
        """A fork sharing the (immutable) cache tensors."""
        return Context(self.model, None if self.cache is None else list(self.cache), self.length, self.position)

    # ---------------------------------------------------------------- generic
    def extend(self, block: Block, advance: int | None = None) -> torch.Tensor:
        """Prefill ``block`` over the cache, append its keys/values, move the position by ``advance``
        (default ``block.advance``, the packer's rule). Returns the block's final-normed hidden states [L, D]."""
        with torch.no_grad():
            (hidden,), (cache,) = forward_blocks(self.model, [self.cache], [block], update=True)
        self.cache = cache
        self.length += len(block)
        self.position += block.advance if advance is None else advance
        return hidden

    # ---------------------------------------------------------------- content
    def add_text(self, ids) -> Context:
        """Append ``[<|im_start|>] ids [<|im_end|>]`` (``ids`` without specials); position += len + 2."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        self.extend(text_block(self.model, wrap_text(pack_config(self.model), ids), self.position))
        return self

    def vit_tokens(self, image) -> torch.Tensor:
        """[3, H, W] in [-1, 1] (H, W multiples of the ViT patch) -> LLM-width ViT tokens [N, D]
        (SigLIP, connector, + ``vit_pos_embed``)."""
        model = self.model
        x = image_to_tensor(image)
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"ViT image must be [3, H, W], got {tuple(x.shape)}")
        p = model.cfg.vit.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViT image {x.shape[1]}x{x.shape[2]} is not a multiple of the patch size {p}; "
                             "resize it first (e.g. image_to_tensor(pil, hw))")
        patches, pos = vit_patches(pack_config(model), x)
        with torch.no_grad():
            return model.embed_vit_tokens(patches, pos, [patches.shape[0]])[0]

    def add_vit_image(self, image) -> Context:
        """Append an understanding image (``[3, H, W]`` in [-1, 1] or PIL): markers + ViT tokens at one
        position, bidirectional; position += 1."""
        body = self.vit_tokens(image)
        self.extend(segment_block(self.model, Kind.VIT_IMAGE, body, self.position))
        return self

    def vae_latent(self, image, posterior: str = "sample", generator: torch.Generator | None = None) -> torch.Tensor:
        """[3, H, W] in [-1, 1] (or PIL) -> scaled latent [C, H/8, W/8]. ``posterior``: "sample" (upstream
        samples the posterior for context images too) or "mean"."""
        model = self.model
        if model.vae is None:
            raise RuntimeError("this BagelModel has no autoencoder attached (load_bagel(..., load_vae=True))")
        x = image_to_tensor(image)
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"VAE image must be [3, H, W], got {tuple(x.shape)}")
        vae_grid(pack_config(model), x)  # H, W multiples of the VAE stride
        xb = x[None].to(model.device)
        with torch.no_grad():
            if posterior == "sample":
                # eps drawn on the CPU so that a CPU generator seeds GPU runs too
                ds = model.vae.downsample
                eps = torch.randn(1, model.vae.z_channels, x.shape[1] // ds, x.shape[2] // ds, generator=generator)
                z = model.vae.sample_latent(xb, eps=eps.to(model.device))
            elif posterior == "mean":
                z = model.vae.encode_mean(xb)
            else:
                raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
        return z[0].float()

    def add_vae_image(self, image=None, *, latent: torch.Tensor | None = None, posterior: str = "sample",
                      generator: torch.Generator | None = None) -> Context:
        """Append a clean VAE image (conditioning): give ``image`` ([3, H, W] in [-1, 1] or PIL; encoded
        by the model's autoencoder) or ``latent`` ([C, H/8, W/8] scaled latent). Tokens are
        ``vae2llm(x0) + time_embedder(0) + latent_pos_embed``; markers + tokens at one position,
        bidirectional; position += 1."""
        model = self.model
        if (image is None) == (latent is None):
            raise ValueError("add_vae_image needs exactly one of image or latent")
        if latent is None:
            latent = self.vae_latent(image, posterior, generator)
        p = model.cfg.latent_patch_size
        if latent.dim() != 3 or latent.shape[0] != model.cfg.latent_channels or latent.shape[1] % p or latent.shape[2] % p:
            raise ValueError(f"latent must be [{model.cfg.latent_channels}, h, w] with h, w multiples of {p}, "
                             f"got {tuple(latent.shape)}")
        gh, gw = latent.shape[1] // p, latent.shape[2] // p
        tokens = model.patchify(latent.to(model.device, torch.float32))
        with torch.no_grad():
            body = vae_token_embeds(model, tokens, torch.zeros(tokens.shape[0], device=model.device), (gh, gw))
        self.extend(segment_block(model, Kind.VAE_CLEAN, body, self.position))
        return self

    def add_image(self, image, *, vae: bool = True, vit: bool = True, vae_hw: tuple[int, int] | None = None,
                  vit_hw: tuple[int, int] | None = None, posterior: str = "sample",
                  generator: torch.Generator | None = None) -> Context:
        """Upstream's ``update_context_image``: the clean VAE copy first, then the ViT copy.

        ``image`` is PIL (resized to ``vae_hw`` / ``vit_hw`` = (H, W) when given; multiples of the VAE
        stride / ViT patch) or a [3, H, W] tensor in [-1, 1] used as is for both."""
        if not (vae or vit):
            raise ValueError("add_image needs vae or vit")
        if vae:
            self.add_vae_image(image_to_tensor(image, vae_hw), posterior=posterior, generator=generator)
        if vit:
            self.add_vit_image(image_to_tensor(image, vit_hw))
        return self


def vae_token_embeds(model, x: torch.Tensor, t: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """LLM input of VAE tokens on a grid: :meth:`~ftkit.models.bagel.BagelModel.embed_vae_tokens` at the
    packer's latent positions (:func:`~ftkit.data.packer.latent_position_ids`).

    Args:
        x: ``[h*w, p*p*C]`` latent patch tokens (raster order).
        t: ``[h*w]`` timesteps in [0, 1] (0 = clean), fed to the embedder as they are.
        grid_hw: token grid (h, w); positions ``row * max_latent_size + col``.
    """
    gh, gw = grid_hw
    if x.shape[0] != gh * gw:
        raise ValueError(f"{x.shape[0]} latent tokens do not fill a {gh}x{gw} grid")
    return model.embed_vae_tokens(x, t, latent_position_ids(pack_config(model), (gh, gw)))[0]


def prefill_texts(contexts: list[Context], ids_list: list[list[int]]) -> list[Context]:
    """Batched :meth:`Context.add_text`: append ``[<|im_start|>] ids_i [<|im_end|>]`` to ``contexts[i]``
    for every i in one decoder call (each context updated in place; returned for chaining)."""
    if len(contexts) != len(ids_list):
        raise ValueError(f"{len(contexts)} contexts but {len(ids_list)} texts")
    if not contexts:
        return contexts
    model = contexts[0].model
    pc = pack_config(model)
    blocks = [text_block(model, wrap_text(pc, [int(i) for i in ids]), c.position) for c, ids in zip(contexts, ids_list)]
    with torch.no_grad():
        _, caches = forward_blocks(model, [c.cache for c in contexts], blocks, update=True)
    for c, b, kv in zip(contexts, blocks, caches):
        c.cache, c.length, c.position = kv, c.length + len(b), c.position + b.advance
    return contexts


class GuidanceContexts:
    """The three contexts of upstream's interleaved inference, kept in step.

    * ``cond``: everything.
    * ``uncond_text`` (text-CFG branch): ``cond`` as it was before the text added since the last
      image (user text), i.e. empty for plain text-to-image, the input image for an edit.
    * ``uncond_img`` (image-CFG branch): every user text, no image.
    * ``uncond_plan`` (plan-guidance branch): ``cond`` as it was before the text generated since the
      last image (the plan, for a draft); ``None`` while there is none.

    Generated text (a plan, a reflection: upstream's "think" text) goes into ``cond`` only.
    """

    def __init__(self, model):
        self.cond = Context(model)
        self.uncond_text = Context(model)
        self.uncond_img = Context(model)
        self.uncond_plan: Context | None = None

    def fork(self) -> GuidanceContexts:
        """Independent copies of the contexts (sharing the immutable cache tensors): one branch of the loop."""
        g = GuidanceContexts.__new__(GuidanceContexts)
        g.cond, g.uncond_text, g.uncond_img = self.cond.copy(), self.uncond_text.copy(), self.uncond_img.copy()
        g.uncond_plan = None if self.uncond_plan is None else self.uncond_plan.copy()
        return g

    def add_user_text(self, ids) -> GuidanceContexts:
        self.uncond_text = self.cond.copy()
        self.cond.add_text(ids)
        self.uncond_img.add_text(ids)
        self.uncond_plan = None
        return self

    def add_generated_text(self, ids) -> GuidanceContexts:
        if self.uncond_plan is None:
            self.uncond_plan = self.cond.copy()
        self.cond.add_text(ids)
        return self

    def add_image(self, image, **kw) -> GuidanceContexts:
        self.cond.add_image(image, **kw)
        self.uncond_text = self.cond.copy()
        self.uncond_plan = None
        return self


__all__ = ["Block", "Context", "GuidanceContexts", "KVCache", "MergedCache", "forward_blocks", "image_block",
           "image_to_tensor", "layout_block", "merge_caches", "pack_config", "prefill_texts", "segment_block",
           "text_block", "vae_token_embeds"]
