"""Qwen2 Mixture-of-Transformers decoder with functionality-expert routing.

Every per-layer weight exists once per expert; expert ``e`` owns the modules whose names end with
its suffix (``""`` for the base/understanding expert, ``"_moe_gen"`` for BAGEL's generation expert,
``"_moe_sem"`` for a semantic expert), so the parameter names are exactly upstream BAGEL's:

    layers.{i}.self_attn.{q,k,v,o}_proj{suffix}, self_attn.{q,k}_norm{suffix},
    layers.{i}.mlp{suffix}.{gate,up,down}_proj, input_layernorm{suffix}, post_attention_layernorm{suffix},
    norm{suffix}

One layer, for hidden states ``h`` [L, D] and a per-token expert index ``e(t)``::

    x = RMSNorm_e(h);  q, k, v = W^q_e x + b, W^k_e x + b, W^v_e x + b       (per token, its expert)
    q, k = RMSNorm^q_e(q), RMSNorm^k_e(k)  (per head, over head_dim), then RoPE(position_ids)
    h = h + W^o_e Attention(q, k, v; packed mask)     (ONE joint attention over all tokens)
    h = h + MLP_e(RMSNorm'_e(h)),  MLP(x) = W_down (silu(W_gate x) * W_up x)

Routing is done by gathering each expert's tokens, applying its module, and scattering back; a
third expert slots in by adding a suffix (no change to this file).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ftkit.models import kernels
from ftkit.models.attention import AttentionSpec, cached_attention, packed_attention
from ftkit.models.config import LLMConfig


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` (Qwen2 RMSNorm; statistics in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


class Routing:
    """Per-token expert assignment, precomputed once per forward: gather indexes and the inverse
    permutation that puts per-expert outputs back into sequence order."""

    def __init__(self, expert_index: torch.Tensor, num_experts: int):
        self.groups: list[tuple[int, torch.Tensor]] = []
        for e in range(num_experts):
            idx = (expert_index == e).nonzero(as_tuple=True)[0]
            if idx.numel():
                self.groups.append((e, idx))
        self.single = len(self.groups) == 1
        if not self.single:
            perm = torch.cat([idx for _, idx in self.groups])
            self.inverse = torch.argsort(perm)
        self.length = expert_index.shape[0]

    def apply(self, modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """y[t] = modules[e(t)](x[t])."""
        if self.single:
            return modules[self.groups[0][0]](x)
        # index_select rather than x[idx]: the same gather, ~6x faster forward on CPU (aten::index is generic)
        outs = [modules[e](x.index_select(0, idx)) for e, idx in self.groups]
        return torch.cat(outs).index_select(0, self.inverse)


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, experts: tuple[str, ...]):
        super().__init__()
        self.cfg = cfg
        self.experts = experts
        d, hd = cfg.hidden_size, cfg.head_dim
        for s in experts:
            setattr(self, f"q_proj{s}", nn.Linear(d, cfg.num_attention_heads * hd, bias=cfg.attention_bias))
            setattr(self, f"k_proj{s}", nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.attention_bias))
            setattr(self, f"v_proj{s}", nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.attention_bias))
            setattr(self, f"o_proj{s}", nn.Linear(cfg.num_attention_heads * hd, d, bias=False))
            if cfg.qk_norm:
                setattr(self, f"q_norm{s}", RMSNorm(hd, cfg.rms_norm_eps))
                setattr(self, f"k_norm{s}", RMSNorm(hd, cfg.rms_norm_eps))

    def _mods(self, name: str) -> list[nn.Module]:
        return [getattr(self, f"{name}{s}") for s in self.experts]

    def forward(self, x, routing: Routing, cos, sin, attn, past_kv=None, use_cache=False):
        cfg = self.cfg
        L, hd = x.shape[0], cfg.head_dim
        q = routing.apply(self._mods("q_proj"), x).view(L, cfg.num_attention_heads, hd)
        k = routing.apply(self._mods("k_proj"), x).view(L, cfg.num_key_value_heads, hd)
        v = routing.apply(self._mods("v_proj"), x).view(L, cfg.num_key_value_heads, hd)
        if cfg.qk_norm:
            q = routing.apply(self._mods("q_norm"), q)
            k = routing.apply(self._mods("k_norm"), k)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, L, d]
        q, k = kernels.apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
        scale = hd**-0.5
        new_kv = None
        if isinstance(attn, AttentionSpec):
            if past_kv is not None:
                raise ValueError("a packed AttentionSpec forward cannot use a KV cache")
            out = packed_attention(q, k, v, attn, scale)
            if use_cache:
                new_kv = (k, v)
        else:  # inference: explicit [Lq, Lpast + Lq] mask over the cache
            if past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=1)
                v = torch.cat([past_kv[1], v], dim=1)
            out = cached_attention(q, k, v, attn, scale)
            if use_cache:
                new_kv = (k, v)
        out = out.transpose(0, 1).reshape(L, cfg.num_attention_heads * hd)
        return routing.apply(self._mods("o_proj"), out), new_kv


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, experts: tuple[str, ...]):
        super().__init__()
        self.experts = experts
        self.self_attn = MoTAttention(cfg, experts)
        for s in experts:
            setattr(self, f"mlp{s}", MLP(cfg.hidden_size, cfg.intermediate_size))
            setattr(self, f"input_layernorm{s}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, f"post_attention_layernorm{s}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def _mods(self, name: str) -> list[nn.Module]:
        return [getattr(self, f"{name}{s}") for s in self.experts]

    def forward(self, h, routing, cos, sin, attn, past_kv=None, use_cache=False):
        x = routing.apply(self._mods("input_layernorm"), h)
        a, new_kv = self.self_attn(x, routing, cos, sin, attn, past_kv, use_cache)
        h = h + a
        x = routing.apply(self._mods("post_attention_layernorm"), h)
        h = h + routing.apply(self._mods("mlp"), x)
        return h, new_kv


class Qwen2MoTModel(nn.Module):
    """Embeddings, MoT layers and per-expert final norms (``language_model.model`` upstream)."""

    def __init__(self, cfg: LLMConfig, experts: tuple[str, ...] = ("",)):
        super().__init__()
        self.cfg = cfg
        self.experts = tuple(experts)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, self.experts) for _ in range(cfg.num_hidden_layers))
        for s in self.experts:
            setattr(self, f"norm{s}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.gradient_checkpointing = False

    def forward(
        self,
        h: torch.Tensor,
        position_ids: torch.Tensor,
        expert_index: torch.Tensor,
        attn: AttentionSpec | torch.Tensor,
        past_key_values: list | None = None,
        use_cache: bool = False,
    ):
        """h [L, D] input embeddings -> (final-normed hidden [L, D], new KV cache or None)."""
        routing = Routing(expert_index, len(self.experts))
        cos, sin = kernels.rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, torch.float32)
        new_cache = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not use_cache:
                h, kv = torch.utils.checkpoint.checkpoint(
                    layer, h, routing, cos, sin, attn, past, use_cache, use_reentrant=False
                )
            else:
                h, kv = layer(h, routing, cos, sin, attn, past, use_cache)
            if use_cache:
                new_cache.append(kv)
        h = routing.apply([getattr(self, f"norm{s}") for s in self.experts], h)
        return h, new_cache


class Qwen2MoTForCausalLM(nn.Module):
    """``language_model`` upstream: the MoT model plus an untied ``lm_head``."""

    def __init__(self, cfg: LLMConfig, experts: tuple[str, ...] = ("",)):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2MoTModel(cfg, experts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
