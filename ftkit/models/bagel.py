"""BAGEL-architecture unified model: Qwen2 MoT decoder + SigLIP-NaViT + FLUX VAE bridge.

Read top to bottom: :class:`BagelModel` holds the modules under upstream's names (so the release's
``ema.safetensors`` loads without conversion), :meth:`BagelModel.embed` turns a
:class:`~ftkit.segments.PackedBatch` into the LLM input sequence, :meth:`BagelModel.forward` runs the
decoder with functionality-expert routing and returns what the losses need.

Rectified flow (BAGEL's convention): t = sigmoid(logit), t' = s t / (1 + (s - 1) t),
x_t = (1 - t') x0 + t' eps, target velocity v = eps - x0, prediction v_hat = llm2vae(h); the predicted
clean latent is x0_hat = x_t - t' v_hat.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ftkit.models.attention import AttentionSpec
from ftkit.models.config import BagelConfig
from ftkit.models.qwen2_mot import Qwen2MoTForCausalLM
from ftkit.models.siglip import Connector, PositionTable, SiglipWrapper, TimestepEmbedder
from ftkit.models.vae import patchify_latent, unpatchify_latent
from ftkit.segments import TOKEN_VAE, Functionality, PackedBatch


def _image_key(img: torch.Tensor) -> bytes:
    t = img.detach().to("cpu").contiguous()
    h = hashlib.blake2b(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes(),
                        digest_size=16)
    h.update(str((tuple(t.shape), t.dtype)).encode())
    return h.digest()


def shift_timestep(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t) (identity for s = 1)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class FlowLatents:
    """The VAE-token table of one forward, what the consistency losses need.

    Rows ``Nz``: image after image in packing order, each image's ``h * w`` tokens in raster order
    (``batch.vae_latent_hw``). ``noisy = (1 - t) clean + t eps`` row by row; the predicted velocity
    ``BagelOutput.velocity_pred[j]`` belongs to row ``rows[j]``.
    """

    clean: torch.Tensor  # [Nz, C] clean latent tokens x0 (fp32)
    noisy: torch.Tensor  # [Nz, C] x_t
    timesteps: torch.Tensor  # [Nz] t of each token (0 = clean, 1 = noise)
    rows: torch.Tensor  # [Nm] VAE-table row of each predicted velocity (long)


@dataclass
class BagelOutput:
    """What :meth:`BagelModel.forward` returns. ``flow`` is None when the batch has no VAE image;
    ``extras`` holds named intermediates (upstream's names) for parity tests and debugging."""

    hidden: torch.Tensor  # [L, D] final-normed hidden states
    llm_input: torch.Tensor  # [L, D]
    ce_hidden: torch.Tensor  # [Nce, D] hidden states at CE positions
    ce_logits: torch.Tensor | None  # [Nce, V] only with return_logits
    velocity_pred: torch.Tensor  # [Nm, C] at mse positions
    velocity_target: torch.Tensor  # [Nm, C]
    flow: FlowLatents | None = None
    extras: dict = field(default_factory=dict)


class BagelModel(nn.Module):
    def __init__(self, cfg: BagelConfig, vae: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm, cfg.experts)
        self.vit_model = SiglipWrapper(cfg.vit, cfg.vit_max_num_patch_per_side)
        self.connector = Connector(cfg.vit.hidden_size, d, cfg.connector_act)
        self.vit_pos_embed = PositionTable(cfg.vit_max_num_patch_per_side, d)
        self.time_embedder = TimestepEmbedder(d)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, d)
        self.llm2vae = nn.Linear(d, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionTable(cfg.max_latent_size, d)
        self.vae = vae  # FluxAE (frozen), not part of ema.safetensors

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under ema.safetensors' names (the VAE is stored separately in ae.safetensors)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vae.")}

    def expert_index(self, functionality: torch.Tensor, token_kind: torch.Tensor) -> torch.Tensor:
        """Per-token expert: ``routing[functionality]``; BAGEL sends every VAE token to the generative one."""
        table = torch.tensor(self.cfg.routing, dtype=torch.long, device=functionality.device)
        e = table[functionality]
        if self.cfg.vae_tokens_generative:
            e = torch.where(token_kind == TOKEN_VAE, table[int(Functionality.GENERATIVE)], e)
        return e

    def text_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain causal LM over text: [B, T] ids -> [B, T, V] logits (linguistic expert, positions 0..T-1)."""
        lm = self.language_model
        out = []
        for row in input_ids:
            T = row.shape[0]
            h = lm.model.embed_tokens(row)
            spec = AttentionSpec.from_splits([(0, T, "causal", 0)], T, device=row.device)
            pos = torch.arange(T, device=row.device)
            e = torch.full((T,), self.cfg.routing[int(Functionality.LINGUISTIC)], dtype=torch.long, device=row.device)
            hidden, _ = lm.model(h, pos, e, spec)
            out.append(lm.lm_head(hidden))
        return torch.stack(out)

    # ------------------------------------------------------------------ image tokens -> LLM input
    def embed_vit_tokens(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LLM input of ViT tokens, the one rule of training (:meth:`embed`) and inference
        (``ftkit.infer.context``): ``connector(vit(patches)) + vit_pos_embed[position_ids]``.

        Args:
            patches: ``[N, p*p*3]`` patchified pixels of one or more images (``seqlens`` tokens each).
            position_ids: ``[N]`` rows of the ViT position table (``row * max_patches_per_side + col``).
            seqlens: tokens per image (the ViT attends within each image only).

        Returns:
            (LLM input ``[N, D]``, the ViT's last hidden states, the connector's output).
        """
        dev = self.device
        pos = position_ids.to(dev)
        feats = self.vit_model(patches.to(dev, self.dtype), pos, seqlens)
        conn = self.connector(feats)
        return conn + self.vit_pos_embed(pos), feats, conn

    def embed_vae_tokens(self, x: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM input of VAE tokens, the one rule of training (:meth:`embed`) and inference
        (``ftkit.infer.context``): ``vae2llm(x) + time_embedder(t) + latent_pos_embed[position_ids]``.

        Args:
            x: ``[N, p*p*C]`` latent patch tokens (x_t; a clean context image is x0 with t = 0).
            t: ``[N]`` timesteps in [0, 1] (0 = clean), fed to the embedder as they are.
            position_ids: ``[N]`` rows of the latent position table (``row * max_latent_size + col``).

        Returns:
            (LLM input ``[N, D]``, the timestep embeddings ``[N, D]``).
        """
        temb = self.time_embedder(t)
        return self.vae2llm(x.to(self.dtype)) + temb + self.latent_pos_embed(position_ids.to(self.device)), temb

    def enable_vae_cache(self, max_items: int) -> None:
        """Cache the frozen encoder's posterior moments (mean, logvar) of up to ``max_items`` images.

        Exact: the encoder is deterministic and frozen; the posterior is still *sampled* every step
        with fresh noise. Worth it when the same images recur every epoch (small datasets, CPU runs).
        """
        self._vae_cache = OrderedDict() if max_items > 0 else None
        self._vae_cache_max = max_items

    @torch.no_grad()
    def vae_moments(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder moments [2C, H/8, W/8] per image; same-size images are encoded in one batch."""
        if self.vae is None:
            raise RuntimeError("this BagelModel has no autoencoder attached (load_bagel(..., load_vae=True))")
        cache = getattr(self, "_vae_cache", None)
        out: list[torch.Tensor | None] = [None] * len(images)
        keys: list[bytes | None] = [None] * len(images)
        todo: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            if cache is not None:
                keys[i] = _image_key(img)
                if keys[i] in cache:
                    cache.move_to_end(keys[i])
                    out[i] = cache[keys[i]]
                    continue
            todo.setdefault(tuple(img.shape), []).append(i)
        for idx in todo.values():
            x = torch.stack([images[i] for i in idx]).to(self.vae.device if hasattr(self.vae, "device") else self.device,
                                                          self.vae.dtype)
            mom = self.vae.encode_moments(x).float()
            for j, i in enumerate(idx):
                out[i] = mom[j]
                if cache is not None:
                    cache[keys[i]] = mom[j]
                    if len(cache) > self._vae_cache_max:
                        cache.popitem(last=False)
        return out

    @torch.no_grad()
    def encode_vae_latents(self, images: list[torch.Tensor], posterior_eps: list[torch.Tensor] | None = None,
                           generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Each [3, H, W] in [-1, 1] -> sampled, scaled latent [C, H/8, W/8] (upstream samples the posterior):
        ``s * (mean + exp(logvar / 2) * eps - b)``."""
        out = []
        for i, mom in enumerate(self.vae_moments(images)):
            mean, logvar = mom.chunk(2, dim=0)
            if posterior_eps is None:
                eps = torch.randn(mean.shape, generator=generator).to(mean.device)
            else:
                eps = posterior_eps[i].to(mean.device, torch.float32)
                if eps.shape != mean.shape:
                    raise ValueError(f"posterior eps {i} has shape {list(eps.shape)}, expected {list(mean.shape)}")
            z = mean + torch.exp(0.5 * logvar) * eps
            out.append(self.vae.scale_factor * (z - self.vae.shift_factor))
        return out

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """[C, h, w] -> [(h/p)(w/p), p*p*C], feature index (dy*p + dx)*C + c, raster token order."""
        return patchify_latent(latent, self.cfg.latent_patch_size)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`patchify` for a token grid (h, w) -> [C, h*p, w*p]."""
        p = self.cfg.latent_patch_size
        return unpatchify_latent(tokens, h * p, w * p, p, self.cfg.latent_channels)

    def sample_timesteps(self, batch: PackedBatch, timestep_shift: float, generator=None) -> torch.Tensor:
        """Per VAE image: clean -> 0; noisy -> shift(sigmoid(logit)), logit drawn from N(0,1) when nan."""
        logits = batch.vae_timestep_logits.clone().float()
        draw = torch.isnan(logits)
        if draw.any():
            logits[draw] = torch.randn(int(draw.sum()), generator=generator).to(logits.device)
        t = torch.sigmoid(logits)  # sigmoid(-inf) = 0 for clean images
        return shift_timestep(t, timestep_shift)

    def embed(self, batch: PackedBatch, *, timestep_shift: float | None = None, flow_noise: torch.Tensor | None = None,
              vae_posterior_eps: list[torch.Tensor] | None = None, clean_latent_tokens: torch.Tensor | None = None,
              generator: torch.Generator | None = None, region_noise: bool = False) -> tuple[torch.Tensor, dict]:
        """PackedBatch -> LLM input sequence [L, D] and the flow quantities of the VAE tokens.

        ``region_noise``: region-conditioned refinement (:func:`region_tokens`). A refinement after a reflection
        that names regions is noised only under them; its other tokens are the draft's clean latent at
        timestep 0, as the sampler's ``inpaint="clean"`` holds them, so the per-token timestep tells the model
        which tokens to redraw. Only the redrawn tokens carry a flow loss."""
        D, dev, dt = self.cfg.llm.hidden_size, self.device, self.dtype
        L = batch.sequence_length
        seq = torch.zeros(L, D, dtype=dt, device=dev)
        ex: dict = {}
        text = self.language_model.model.embed_tokens(batch.text_ids.to(dev))
        seq = seq.index_put((batch.text_indexes.to(dev),), text.to(dt))
        if batch.vit_tokens.shape[0]:
            vit_in, feats, conn = self.embed_vit_tokens(batch.vit_tokens, batch.vit_position_ids, batch.vit_seqlens)
            ex.update(vit_last_hidden=feats, vit_features_after_connector=conn, vit_tokens_into_llm=vit_in)
            seq = seq.index_put((batch.vit_token_indexes.to(dev),), vit_in.to(dt))
        if batch.vae_images:
            shift = self.cfg.timestep_shift if timestep_shift is None else timestep_shift
            if clean_latent_tokens is None:
                lat = self.encode_vae_latents(batch.vae_images, vae_posterior_eps, generator)
                ex["vae_latent"] = lat
                clean_latent_tokens = torch.cat([self.patchify(z) for z in lat])
            clean = clean_latent_tokens.to(dev, torch.float32)
            t_img = self.sample_timesteps(batch, shift, generator).to(dev)
            tok_img = batch.vae_token_image().to(dev)
            t_tok = t_img[tok_img]
            if region_noise:
                weight, source = region_tokens(batch)
                t_tok = t_tok * weight.to(dev)
                clean = clean[source.to(dev)]  # outside the regions: the draft's own latent
            if flow_noise is None:
                flow_noise = torch.randn(clean.shape, generator=generator).to(dev)
            noise = flow_noise.to(dev, torch.float32)
            x_t = (1 - t_tok[:, None]) * clean + t_tok[:, None] * noise
            vae_in, temb = self.embed_vae_tokens(x_t, t_tok, batch.vae_position_ids)
            seq = seq.index_put((batch.vae_token_indexes.to(dev),), vae_in.to(dt))
            ex.update(packed_latent_clean=clean, packed_noisy_latent=x_t, packed_timesteps=t_tok, flow_noise=noise,
                      timestep_embeds=temb, vae_tokens_into_llm=vae_in, vae_timesteps_per_image=t_img)
        return seq, ex

    # ------------------------------------------------------------------ forward
    def forward(self, batch: PackedBatch, *, return_logits: bool = False, timestep_shift: float | None = None,
                flow_noise: torch.Tensor | None = None, vae_posterior_eps: list[torch.Tensor] | None = None,
                clean_latent_tokens: torch.Tensor | None = None, generator: torch.Generator | None = None,
                attn_impl: str = "auto", region_noise: bool = False) -> BagelOutput:
        dev = self.device
        seq, ex = self.embed(batch, timestep_shift=timestep_shift, flow_noise=flow_noise,
                             vae_posterior_eps=vae_posterior_eps, clean_latent_tokens=clean_latent_tokens,
                             generator=generator, region_noise=region_noise)
        spec = AttentionSpec.from_splits(batch.attention, batch.sequence_length, device=dev, impl=attn_impl)
        experts = self.expert_index(batch.functionality.to(dev), batch.token_kind.to(dev))
        hidden, _ = self.language_model.model(seq, batch.position_ids.to(dev), experts, spec)
        ce_hidden = hidden[batch.ce_indexes.to(dev)]
        logits = self.language_model.lm_head(ce_hidden) if return_logits else None
        C = self.cfg.patch_latent_dim
        if batch.mse_indexes.numel():
            row_of = torch.full((batch.sequence_length,), -1, dtype=torch.long, device=dev)
            row_of[batch.vae_token_indexes.to(dev)] = torch.arange(batch.vae_token_indexes.numel(), device=dev)
            mse_idx = batch.mse_indexes.to(dev)
            rows = row_of[mse_idx]
            if region_noise:  # tokens held clean (timestep 0) have no velocity to learn
                keep = ex["packed_timesteps"][rows] > 0
                rows, mse_idx = rows[keep], mse_idx[keep]
                ex["mse_keep"] = keep
            v_pred = self.llm2vae(hidden[mse_idx])
            v_tgt = ex["flow_noise"][rows] - ex["packed_latent_clean"][rows]
            ex["mse_rows"] = rows
        else:
            rows = torch.zeros(0, dtype=torch.long, device=dev)
            v_pred = hidden.new_zeros(0, C)
            v_tgt = hidden.new_zeros(0, C)
        ex["expert_index"] = experts
        flow = (FlowLatents(clean=ex["packed_latent_clean"], noisy=ex["packed_noisy_latent"],
                            timesteps=ex["packed_timesteps"], rows=rows) if "packed_latent_clean" in ex else None)
        return BagelOutput(hidden=hidden, llm_input=seq, ce_hidden=ce_hidden, ce_logits=logits,
                           velocity_pred=v_pred, velocity_target=v_tgt, flow=flow, extras=ex)

    # ------------------------------------------------------------------ inference primitives
    def prefill(self, embeds: torch.Tensor, position_ids: torch.Tensor, expert_index: torch.Tensor,
                mask: torch.Tensor, past: list | None = None) -> tuple[torch.Tensor, list]:
        """Run new tokens over an optional KV cache. ``mask`` [Lq, Lpast + Lq] bool. Returns (hidden, cache)."""
        return self.language_model.model(embeds, position_ids, expert_index, mask, past, use_cache=True)


def region_tokens(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-conditioned refinement's token plan: ``(weight [Nz] float, source [Nz] long)``. A noisy image
    with a region mask (a refinement after a reflection that names regions) is redrawn under the mask only:
    weight 1 there, 0 outside, where its input is the clean latent of token ``source`` -- the same cell of
    the draft it refines (``batch.vae_pair_with``, same grid) or else its own. Every other token: weight 1,
    source itself."""
    counts = [h * w for h, w in batch.vae_latent_hw]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    weight = torch.ones(sum(counts))
    source = torch.arange(sum(counts))
    for i, ((h, w), noisy, mask) in enumerate(zip(batch.vae_latent_hw, batch.vae_image_noisy, batch.vae_region_masks)):
        if not noisy or mask is None or not bool(mask.any()):
            continue
        a = starts[i]
        m = mask.reshape(h * w).bool().cpu()
        weight[a:a + h * w] = m.float()
        j = int(batch.vae_pair_with[i])
        if 0 <= j < len(counts) and tuple(batch.vae_latent_hw[j]) == (h, w):
            src = torch.arange(starts[j], starts[j] + h * w)
            source[a:a + h * w] = torch.where(m, source[a:a + h * w], src)
    return weight, source


def timestep_schedule(num_timesteps: int, shift: float, device=None) -> torch.Tensor:
    """Upstream's inference schedule: linspace(1, 0, n) then the timestep shift."""
    ts = torch.linspace(1, 0, num_timesteps, device=device)
    return shift_timestep(ts, shift)


__all__ = ["BagelModel", "BagelOutput", "FlowLatents", "region_tokens", "shift_timestep", "timestep_schedule"]
