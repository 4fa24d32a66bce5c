"""Rectified-flow image sampler with upstream BAGEL's guidance, and text decoding over a context.

Flow convention (as in training): x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0, so
sampling integrates from t = 1 (noise) to t = 0 (data) with Euler steps x <- x - v dt over
``timestep_schedule(n, shift)`` (``linspace(1, 0, n)`` then t' = s t / (1 + (s - 1) t); n - 1 steps).

Velocity of a context (:func:`velocity`): the query block ``[<|vision_start|>] z [<|vision_end|>]`` at the
context's next RoPE position sees the whole cache and itself bidirectionally;
z = vae2llm(x_t) + time_embedder(t) + latent_pos_embed; v = llm2vae(hidden at z). The block is never
written into the cache.

Guidance (:func:`guide`, upstream's ``_forward_flow``), applied only while ``lo < t <= hi`` for
``cfg_interval = (lo, hi)`` and only when ``s_text > 1`` (as upstream: image guidance rides on text
guidance)::

    v_text = u_text + s_text (v - u_text)
    v'     = u_img + s_img (v_text - u_img)     if an image-unconditional branch is used (s_img > 1)
    v_out  = v' * clamp(|v| / (|v'| + 1e-8), renorm_min, 1)

with norms over the whole token block ("global") or per token ("channel"); "text_channel"
renormalises v_text per token before the image stage instead.

Plan guidance (GoT's semantic-spatial multi-guidance, ``cfg_plan_scale`` ``s_plan``): with ``u_plan``
the velocity of the context without the generated plan (the prompt only), the text stage becomes

    v_text = u_text + s_text (u_plan - u_text) + s_plan (v - u_plan)

(the prompt is guided against the empty context, the plan against the prompt alone, each with its own
scale). ``s_plan = s_text`` gives back plain guidance exactly; ``s_plan = 1`` conditions on the plan
without amplifying it. GoT's text-to-image scales are 7.5 (semantic) and 4.0 (spatial).

Inpainting (``keep`` of :func:`generate_images`, FoX's region correction, the rectified-flow form of
RePaint / SDEdit-style "replace the known part"): given a kept latent ``z`` (the draft's final tokens), a
token mask ``m`` (1 = regenerate) and the starting noise ``eps`` (= x at t = 1), every state the sampler
holds is

    x_t = m * x_t^model + (1 - m) * ((1 - t) z + t eps)

i.e. outside the region the latent is exactly the point of the straight noise-to-draft path at the
current t (the forward process of training, with the same eps), so the region is denoised in the
context of the draft's own noisy neighbourhood, and at t = 0 the outside is ``z`` itself (bit for bit).
The model's velocity is computed on the whole block each step; only the region keeps its update.
``inpaint="clean"`` (region-conditioned refinement, for adapters trained with ``region_noise``) holds the
outside at ``z`` itself with timestep 0 instead, so the per-token timestep marks the region to redraw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ftkit.infer.context import (
    Context,
    MergedCache,
    forward_blocks,
    merge_caches,
    segment_block,
    text_block,
    vae_token_embeds,
)
from ftkit.models.bagel import timestep_schedule
from ftkit.models.folders import RENORM_TYPES
from ftkit.segments import Kind

INPAINT_MODES = ("path", "clean")


def latent_grid(model, hw: tuple[int, int]) -> tuple[int, int]:
    """Pixel size (H, W) -> VAE token grid (H / stride, W / stride); raises ValueError when H or W is not
    a multiple of the stride (16 on BAGEL) or the grid exceeds the latent position table."""
    H, W = int(hw[0]), int(hw[1])
    s = model.cfg.vae_stride
    if H <= 0 or W <= 0 or H % s or W % s:
        raise ValueError(f"image size {H}x{W} must be positive multiples of the VAE stride {s}")
    gh, gw = H // s, W // s
    m = model.cfg.max_latent_size
    if gh > m or gw > m:
        raise ValueError(f"image size {H}x{W} needs a {gh}x{gw} latent grid, the model's table is {m}x{m} "
                         f"(at most {m * s}x{m * s} pixels)")
    return gh, gw


def _flow_block(ctx: Context, x_t: torch.Tensor, t: torch.Tensor, grid: tuple[int, int],
                held: torch.Tensor | None = None):
    model = ctx.model
    tt = t.reshape(1).to(model.device, torch.float32).expand(x_t.shape[0])
    if held is not None:  # tokens held clean (inpaint="clean") carry timestep 0
        tt = torch.where(held.to(model.device), torch.zeros_like(tt), tt)
    body = vae_token_embeds(model, x_t.to(model.device), tt, grid)
    return segment_block(model, Kind.VAE_NOISY, body, ctx.position)


@torch.no_grad()
def velocities(contexts: Sequence[Context], x_ts: Sequence[torch.Tensor], t, hws: Sequence[tuple[int, int]],
               merged: MergedCache | None = None, packed: bool = True,
               held: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Velocity of each ``x_ts[i]`` ([N_i, p*p*C] latent tokens) given ``contexts[i]``, all at timestep
    ``t`` (float or 0-d tensor), except the tokens ``held[i]`` ([N_i] bool) marks: clean, at timestep 0.
    ``packed``: ONE decoder call for all (``merged`` = ``merge_caches`` of the contexts' caches, to reuse
    across steps); else one call per context. Returns float32 ``[N_i, p*p*C]`` per item."""
    if not contexts:
        return []
    model = contexts[0].model
    t = torch.as_tensor(t, dtype=torch.float32)
    held = list(held) if held is not None else [None] * len(contexts)
    blocks = [_flow_block(c, x, t, latent_grid(model, hw), h)
              for c, x, hw, h in zip(contexts, x_ts, hws, held, strict=True)]
    if not packed:
        return [model.llm2vae(forward_blocks(model, [c.cache], [b])[0][0][1:-1]).float()
                for c, b in zip(contexts, blocks)]
    if merged is None:
        merged = merge_caches([c.cache for c in contexts])
    hiddens, _ = forward_blocks(model, merged, blocks, update=False)
    return [model.llm2vae(h[1:-1]).float() for h in hiddens]


def velocity(ctx: Context, x_t: torch.Tensor, t, hw: tuple[int, int]) -> torch.Tensor:
    """Velocity ``[N, p*p*C]`` of latent tokens ``x_t`` at timestep ``t`` for an (H, W)-pixel image given ``ctx``."""
    return velocities([ctx], [x_t], t, [hw])[0]


def _renorm(v_ref: torch.Tensor, v: torch.Tensor, renorm_min: float, per_token: bool) -> torch.Tensor:
    if per_token:
        scale = v_ref.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)
    else:
        scale = v_ref.norm() / (v.norm() + 1e-8)
    return v * scale.clamp(min=renorm_min, max=1.0)


def guide(v_cond: torch.Tensor, v_uncond_text: torch.Tensor, v_uncond_img: torch.Tensor | None = None, *,
          cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.0, renorm_type: str = "global",
          renorm_min: float = 0.0, v_uncond_plan: torch.Tensor | None = None,
          cfg_plan_scale: float | None = None) -> torch.Tensor:
    """Upstream's two-stage guidance of one image's velocity block (see the module docstring).

    ``v_uncond_img`` is used only when given and ``cfg_img_scale > 1``; ``v_uncond_plan`` only when
    given with a ``cfg_plan_scale`` (plan guidance). Raises ValueError for an unknown ``renorm_type``."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"unknown cfg renorm type {renorm_type!r} (one of {', '.join(RENORM_TYPES)})")
    use_img = v_uncond_img is not None and cfg_img_scale > 1.0
    if v_uncond_plan is not None and cfg_plan_scale is not None:
        v_text = (v_uncond_text + cfg_text_scale * (v_uncond_plan - v_uncond_text)
                  + cfg_plan_scale * (v_cond - v_uncond_plan))
    else:
        v_text = v_uncond_text + cfg_text_scale * (v_cond - v_uncond_text)
    if renorm_type == "text_channel":
        v_text = _renorm(v_cond, v_text, renorm_min, per_token=True)
        return v_uncond_img + cfg_img_scale * (v_text - v_uncond_img) if use_img else v_text
    v = v_uncond_img + cfg_img_scale * (v_text - v_uncond_img) if use_img else v_text
    return _renorm(v_cond, v, renorm_min, per_token=renorm_type == "channel")


@torch.no_grad()
def generate_images(
    model,
    conds: Sequence[Context],
    uncond_texts: Sequence[Context | None] | None = None,
    uncond_imgs: Sequence[Context | None] | None = None,
    *,
    hw: tuple[int, int],
    num_timesteps: int = 50,
    timestep_shift: float = 3.0,
    cfg_text_scale: float = 4.0,
    cfg_img_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.4, 1.0),
    cfg_renorm_type: str = "global",
    cfg_renorm_min: float = 0.0,
    init_noise: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, float, list[torch.Tensor]], None] | None = None,
    packed: bool | int = True,
    keep: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    uncond_plans: Sequence[Context | None] | None = None,
    cfg_plan_scale: float | None = None,
    inpaint: str = "path",
) -> list[torch.Tensor]:
    """Sample one image per conditioning context, all of size ``hw`` = (H, W) pixels, batched: every
    Euler step runs all prompts and all their guidance branches in one decoder call.

    Args:
        model: the BagelModel the contexts belong to.
        conds: conditional contexts.
        uncond_texts: text-CFG contexts (``None`` entries / list = empty context, upstream's plain T2I).
        uncond_imgs: image-CFG contexts, used when ``cfg_img_scale > 1`` (``None`` = no image guidance).
        num_timesteps: schedule length (``num_timesteps - 1`` Euler steps).
        timestep_shift, cfg_*: see the module docstring; renorm is per image (upstream renorms the whole
            packed batch, identical for one image).
        init_noise: per image ``[N, p*p*C]`` starting noise; else drawn from ``generator`` on the CPU.
        callback: ``callback(step, t, x_list)`` after each step.
        packed: run all prompts and branches of a step in one decoder call (each branch attends only
            its own cache: one row of a padded batch, ``RowLayout``); ``False`` runs one call per branch;
            an int ``k`` packs the branches ``k`` at a time (caps the memory of one call).
        uncond_plans: plan-guidance contexts (the context without the generated plan), used when
            ``cfg_plan_scale`` is set (``None`` entries: no plan guidance for that image).
        keep: per image ``None`` or ``(z, mask)``: inpaint (module docstring): ``z`` ``[N, p*p*C]`` latent
            tokens to keep, ``mask`` ``[N]`` bool, True where the image is regenerated; outside the mask
            the state is ``(1 - t) z + t eps`` at every step (and ``z`` exactly at the end).
        inpaint: how ``keep`` holds the tokens outside the mask: ``"path"`` on the noise-to-draft path at the
            current t (any model), ``"clean"`` at ``z`` itself with timestep 0 (region-conditioned
            refinement: for adapters trained with ``region_noise``).

    Returns:
        per image, the final latent tokens ``[N, p*p*C]`` (float32; decode with :func:`decode_image`).

    Raises:
        ValueError: on mismatched list lengths, a bad size, ``num_timesteps < 2``, a bad renorm type or
            noise of the wrong shape.
    """
    B = len(conds)
    if B == 0:
        raise ValueError("generate_images needs at least one conditioning context")
    uncond_texts = list(uncond_texts) if uncond_texts is not None else [None] * B
    uncond_imgs = list(uncond_imgs) if uncond_imgs is not None else [None] * B
    uncond_plans = list(uncond_plans) if uncond_plans is not None else [None] * B
    if len(uncond_texts) != B or len(uncond_imgs) != B or len(uncond_plans) != B:
        raise ValueError(f"{B} conditional contexts but {len(uncond_texts)} text-uncond, {len(uncond_imgs)} "
                         f"image-uncond and {len(uncond_plans)} plan-uncond contexts")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2 (got {num_timesteps})")
    if cfg_renorm_type not in RENORM_TYPES:
        raise ValueError(f"unknown cfg renorm type {cfg_renorm_type!r} (one of {', '.join(RENORM_TYPES)})")
    gh, gw = latent_grid(model, hw)
    N, C = gh * gw, model.cfg.patch_latent_dim
    if init_noise is None:
        xs = [torch.randn(N, C, generator=generator).to(model.device) for _ in range(B)]
    else:
        if len(init_noise) != B:
            raise ValueError(f"init_noise has {len(init_noise)} entries for {B} images")
        xs = []
        for i, x in enumerate(init_noise):
            if tuple(x.shape) != (N, C):
                raise ValueError(f"init_noise[{i}] has shape {tuple(x.shape)}, expected {(N, C)} for a {hw} image")
            xs.append(x.to(model.device, torch.float32))
    uncond_texts = [u if u is not None else Context(model) for u in uncond_texts]
    ts = timestep_schedule(num_timesteps, timestep_shift).to(model.device)
    keeps = _check_keep(keep, B, N, C, model.device)
    if inpaint not in INPAINT_MODES:
        raise ValueError(f"inpaint {inpaint!r}: choose {' or '.join(INPAINT_MODES)}")
    eps = list(xs)
    clean = inpaint == "clean"
    held = [None if k is None else ~k[1] for k in keeps] if clean and keep is not None else None

    def _paste(xs_: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        tk = torch.zeros_like(t) if clean else t
        return [x if k is None else torch.where(k[1][:, None], x, (1 - tk) * k[0] + tk * e)
                for x, k, e in zip(xs_, keeps, eps)]

    if keep is not None:
        xs = _paste(xs, ts[0])
    lo, hi = cfg_interval
    use_img = cfg_img_scale > 1.0 and any(u is not None for u in uncond_imgs)
    img_rows = [j for j in range(B) if uncond_imgs[j] is not None] if use_img else []
    plan_rows = [j for j in range(B) if uncond_plans[j] is not None] if cfg_plan_scale is not None else []
    all_ctxs = list(conds) + uncond_texts + [uncond_imgs[j] for j in img_rows] + [uncond_plans[j] for j in plan_rows]
    merged: dict = {}  # caches concatenated once per branch set (and pack chunk), reused every step

    def branch_rows(per_image: list, guided: bool) -> list:
        """A per-image list laid out as the rows of ``all_ctxs`` (guided) or ``conds`` (not guided)."""
        if not guided:
            return list(per_image)
        return per_image + per_image + [per_image[j] for j in img_rows] + [per_image[j] for j in plan_rows]

    for i in range(num_timesteps - 1):
        t, dt = ts[i], ts[i] - ts[i + 1]
        guided = cfg_text_scale > 1.0 and lo < float(t) <= hi
        ctxs = all_ctxs if guided else list(conds)
        xq = branch_rows(xs, guided)
        hq = branch_rows(held, guided) if held else [None] * len(ctxs)  # the held tokens of each row of xq
        if packed is True or packed is False:
            if packed and guided not in merged:
                merged[guided] = merge_caches([c.cache for c in ctxs])
            vs = velocities(ctxs, xq, t, [hw] * len(ctxs), merged=merged.get(guided), packed=packed, held=hq)
        else:
            k = max(1, int(packed))
            chunks = [range(a, min(len(ctxs), a + k)) for a in range(0, len(ctxs), k)]
            if guided not in merged:
                merged[guided] = [merge_caches([ctxs[c].cache for c in ch]) for ch in chunks]
            vs = [v for ch, m in zip(chunks, merged[guided])
                  for v in velocities([ctxs[c] for c in ch], [xq[c] for c in ch], t, [hw] * len(ch), merged=m,
                                      held=[hq[c] for c in ch])]
        new = []
        for j in range(B):
            v = vs[j]
            if guided:
                u_img = vs[2 * B + img_rows.index(j)] if j in img_rows else None
                u_plan = vs[2 * B + len(img_rows) + plan_rows.index(j)] if j in plan_rows else None
                v = guide(v, vs[B + j], u_img, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                          renorm_type=cfg_renorm_type, renorm_min=cfg_renorm_min, v_uncond_plan=u_plan,
                          cfg_plan_scale=cfg_plan_scale)
            new.append(xs[j] - v * dt)
        xs = new if keep is None else _paste(new, ts[i + 1])
        if callback is not None:
            callback(i, float(t), xs)
    return xs


def _check_keep(keep, B: int, N: int, C: int, device) -> list:
    if keep is None:
        return [None] * B
    if len(keep) != B:
        raise ValueError(f"keep has {len(keep)} entries for {B} images")
    out = []
    for i, k in enumerate(keep):
        if k is None:
            out.append(None)
            continue
        z, m = k
        if tuple(z.shape) != (N, C) or tuple(m.shape) != (N,) or m.dtype != torch.bool:
            raise ValueError(f"keep[{i}]: expected latent {(N, C)} and bool mask ({N},), got {tuple(z.shape)} and "
                             f"{tuple(m.shape)} {m.dtype}")
        out.append((z.to(device, torch.float32), m.to(device)))
    return out


def generate_image(model, ctx_cond: Context, ctx_uncond_text: Context | None = None,
                   ctx_uncond_img: Context | None = None, *, hw: tuple[int, int], num_timesteps: int = 50,
                   timestep_shift: float = 3.0, cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.0,
                   cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm_type: str = "global",
                   cfg_renorm_min: float = 0.0, init_noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, packed: bool = True,
                   ctx_uncond_plan: Context | None = None, cfg_plan_scale: float | None = None,
                   inpaint: str = "path") -> torch.Tensor:
    """One image: :func:`generate_images` with a single prompt (upstream's ``gen_image`` math).
    Returns the final latent tokens ``[N, p*p*C]``."""
    return generate_images(model, [ctx_cond], [ctx_uncond_text], [ctx_uncond_img], hw=hw, inpaint=inpaint,
                           uncond_plans=[ctx_uncond_plan], cfg_plan_scale=cfg_plan_scale,
                           num_timesteps=num_timesteps, timestep_shift=timestep_shift, cfg_text_scale=cfg_text_scale,
                           cfg_img_scale=cfg_img_scale, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type,
                           cfg_renorm_min=cfg_renorm_min, init_noise=None if init_noise is None else [init_noise],
                           generator=generator, packed=packed)[0]


@torch.no_grad()
def decode_latent(model, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Latent tokens ``[N, p*p*C]`` of an (H, W) image -> decoder output ``[1, 3, H, W]`` (float, unclamped)."""
    if model.vae is None:
        raise RuntimeError("this BagelModel has no autoencoder attached (load_bagel(..., load_vae=True))")
    gh, gw = latent_grid(model, hw)
    if tokens.shape != (gh * gw, model.cfg.patch_latent_dim):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit a {hw} image ({gh * gw} x {model.cfg.patch_latent_dim})")
    latent = model.unpatchify(tokens.to(model.device, torch.float32), gh, gw)
    return model.vae.decode(latent[None]).float()


def to_pil(decoded: torch.Tensor):
    """``[1, 3, H, W]`` or ``[3, H, W]`` in [-1, 1] -> PIL RGB, uint8 = trunc(clamp(x * 0.5 + 0.5, 0, 1) * 255)
    (upstream's conversion)."""
    from PIL import Image

    x = decoded[0] if decoded.dim() == 4 else decoded
    arr = ((x.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)


def decode_image(model, tokens: torch.Tensor, hw: tuple[int, int]):
    """Latent tokens -> PIL image (unpatchify, VAE decode, :func:`to_pil`)."""
    return to_pil(decode_latent(model, tokens, hw))


# ------------------------------------------------------------------------------------------ text
@dataclass
class GeneratedText:
    """Result of :func:`generate_text`.

    ``ids``: the start token then every generated token (the end token excluded), as upstream's
    ``generate_text`` returns; ``logits``: ``[steps, V]`` lm_head logits after feeding ``ids[k]``
    (with ``return_logits``: every step, or the first ``n`` when it is an int ``n``); ``stopped``: the end
    token was produced.
    """

    ids: list[int]
    logits: torch.Tensor | None
    stopped: bool

    @property
    def new_ids(self) -> list[int]:
        """Generated tokens without the start token."""
        return self.ids[1:]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(descending=True)
        keep = p_sorted.cumsum(-1) - p_sorted < top_p  # smallest prefix with mass >= top_p
        p_sorted = torch.where(keep, p_sorted, torch.zeros_like(p_sorted))
        probs = torch.zeros_like(probs).scatter(-1, idx, p_sorted)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _logit_steps(return_logits: bool | int, max_new_tokens: int) -> int:
    """How many steps' logits to keep: all (``True``), none (``False``) or the first ``n`` (an int ``n``: a
    reader of one early token need not hold ``[steps, vocab]``, 150k wide for BAGEL)."""
    if isinstance(return_logits, bool):
        return max_new_tokens if return_logits else 0
    if return_logits < 1:
        raise ValueError(f"return_logits must be a bool or a step count >= 1, got {return_logits}")
    return return_logits


@torch.no_grad()
def _check_decoding(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate_text(ctx: Context, max_new_tokens: int = 256, *, do_sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None, start_id: int | None = None,
                  end_id: int | None = None, return_logits: bool | int = False) -> GeneratedText:
    """Decode text after ``ctx`` (which is not modified): feed ``<|im_start|>`` at the next position,
    then greedily (or sampled with ``temperature`` / nucleus ``top_p``) one token per step until
    ``<|im_end|>`` is produced or ``max_new_tokens`` tokens were produced. Linguistic expert, causal
    over the cache.

    Raises:
        ValueError: ``max_new_tokens < 1``, ``temperature <= 0`` when sampling, ``top_p`` outside (0, 1].
    """
    _check_decoding(max_new_tokens, do_sample, temperature, top_p)
    keep = _logit_steps(return_logits, max_new_tokens)
    model = ctx.model
    start = model.cfg.bos_id if start_id is None else start_id
    end = model.cfg.eos_id if end_id is None else end_id
    cache, pos = ctx.cache, ctx.position
    ids, rows, tok, stopped = [], [], start, False
    for _ in range(max_new_tokens):
        ids.append(tok)
        (h,), (cache,) = forward_blocks(model, [cache], [text_block(model, [tok], pos)], update=True)
        pos += 1
        logits = model.language_model.lm_head(h[-1])
        if len(rows) < keep:
            rows.append(logits.float())
        tok = _sample(logits, temperature, top_p, generator) if do_sample else int(logits.argmax())
        if tok == end:
            stopped = True
            break
    else:
        ids.append(tok)  # the last produced token (its logits were not computed: no further step)
    return GeneratedText(ids=ids, logits=torch.stack(rows) if keep else None, stopped=stopped)


@torch.no_grad()
def generate_texts(contexts: Sequence[Context], max_new_tokens: int = 256, *, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, generators: Sequence[torch.Generator | None] | None = None,
                   return_logits: bool | int = False) -> list[GeneratedText]:
    """:func:`generate_text` for several contexts of any lengths at once: every step feeds the next
    token of each unfinished context in ONE decoder call (caches concatenated, each token sees its own
    cache only), so the result equals per-context decoding up to float
    summation order. ``generators[i]`` samples context i."""
    if not contexts:
        return []
    _check_decoding(max_new_tokens, do_sample, temperature, top_p)
    keep = _logit_steps(return_logits, max_new_tokens)
    gens = list(generators) if generators is not None else [None] * len(contexts)
    if len(gens) != len(contexts):
        raise ValueError(f"{len(gens)} generators for {len(contexts)} contexts")
    model = contexts[0].model
    start, end = model.cfg.bos_id, model.cfg.eos_id
    n = len(contexts)
    caches = [c.cache for c in contexts]
    pos = [c.position for c in contexts]
    ids: list[list[int]] = [[] for _ in range(n)]
    rows: list[list[torch.Tensor]] = [[] for _ in range(n)]
    tok, stopped, live = [start] * n, [False] * n, list(range(n))
    for _ in range(max_new_tokens):
        for j in live:
            ids[j].append(tok[j])
        hs, new = forward_blocks(model, [caches[j] for j in live], [text_block(model, [tok[j]], pos[j]) for j in live],
                                 update=True)
        logits = model.language_model.lm_head(torch.stack([h[-1] for h in hs]))
        still = []
        for r, j in enumerate(live):
            caches[j], pos[j] = new[r], pos[j] + 1
            if len(rows[j]) < keep:
                rows[j].append(logits[r].float())
            tok[j] = _sample(logits[r], temperature, top_p, gens[j]) if do_sample else int(logits[r].argmax())
            if tok[j] == end:
                stopped[j] = True
            else:
                still.append(j)
        live = still
        if not live:
            break
    for j in live:
        ids[j].append(tok[j])
    return [GeneratedText(ids=ids[j], logits=torch.stack(rows[j]) if keep else None, stopped=stopped[j])
            for j in range(n)]


__all__ = ["GeneratedText", "RENORM_TYPES", "decode_image", "decode_latent", "generate_image", "generate_images",
           "generate_text", "generate_texts", "guide", "latent_grid", "to_pil", "velocities", "velocity"]
