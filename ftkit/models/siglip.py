"""SigLIP-NaViT vision encoder (``vit_model.vision_model`` upstream) and BAGEL's small blocks.

Encoder, for the packed patches of several images (each image attends only to itself)::

    x = W_patch p + b + E_pos[row * S + col]            p: a 14x14x3 patch, (row, col, channel) order
    x = x + Attn(LN1(x));  x = x + FC2(gelu_tanh(FC1(LN2(x))))     (pre-LN, per layer)
    y = LN_post(x)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftkit.models.attention import AttentionSpec, packed_attention
from ftkit.models.config import ViTConfig


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        n, d = x.shape
        hd = d // self.heads
        q, k, v = (p(x).view(n, self.heads, hd).transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = packed_attention(q, k, v, spec, hd**-0.5)
        return self.out_proj(out.transpose(0, 1).reshape(n, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x, spec):
        x = x + self.self_attn(self.layer_norm1(x), spec)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, max_patches_per_side: int):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.patch_size**2 * cfg.num_channels, cfg.hidden_size)
        self.position_embedding = nn.Embedding(max_patches_per_side**2, cfg.hidden_size)


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: ViTConfig, max_patches_per_side: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg, max_patches_per_side)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """patches [N, p*p*3] -> features [N, hidden]; ``seqlens`` splits N into images."""
        x = self.embeddings.patch_embedding(patches.to(self.embeddings.patch_embedding.weight.dtype))
        x = x + self.embeddings.position_embedding(position_ids)
        splits, s = [], 0
        for i, n in enumerate(seqlens):
            splits.append((s, s + n, "full", i))
            s += n
        spec = AttentionSpec.from_splits(splits, x.shape[0], device=x.device)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, spec, use_reentrant=False)
            else:
                x = layer(x, spec)
        return self.post_layernorm(x)


class SiglipWrapper(nn.Module):
    """Holds ``vision_model`` so parameter names match upstream's ``vit_model.vision_model.*``."""

    def __init__(self, cfg: ViTConfig, max_patches_per_side: int):
        super().__init__()
        self.vision_model = SiglipVisionModel(cfg, max_patches_per_side)

    def forward(self, patches, position_ids, seqlens):
        return self.vision_model(patches, position_ids, seqlens)


class Connector(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: ViT features -> LLM width."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class PositionTable(nn.Module):
    """Frozen 2-D sin-cos table ``pos_embed`` [max_side^2, D]; row ``r * max_side + c``.

    Row (h, w) holds [sin(w o), cos(w o), sin(h o), cos(h o)], each D/4 wide, o_k = 10000^(-k/(D/4)).
    Loaders read the stored (bf16-rounded) values; :func:`sincos_2d` recomputes them for new models.
    """

    def __init__(self, max_side: int, dim: int):
        super().__init__()
        self.max_side = max_side
        self.pos_embed = nn.Parameter(sincos_2d(max_side, dim), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def sincos_2d(max_side: int, dim: int) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"2-D sin-cos table needs dim divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    hh, ww = torch.meshgrid(torch.arange(max_side, dtype=torch.float64), torch.arange(max_side, dtype=torch.float64), indexing="ij")
    w_arg = ww.reshape(-1, 1) * omega
    h_arg = hh.reshape(-1, 1) * omega
    return torch.cat([w_arg.sin(), w_arg.cos(), h_arg.sin(), h_arg.cos()], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> ``mlp.2(silu(mlp.0([cos(t f), sin(t f)])))``, f_i = exp(-ln(1e4) i / 128), 256 features."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.sinusoid(t).to(w.dtype if w.is_floating_point() else torch.float32))
