"""Packed-sequence attention: one joint attention over all tokens, with upstream BAGEL's mask.

A query ``q`` may attend a key ``k`` when all hold (spec/bagel.md, fixture ``attention_allowed``):

1. same packed sample;
2. ``k <= q``, or both are in the same ``full``/``noise`` split (bidirectional inside an image);
3. ``k`` is not in a ``noise`` split other than ``q``'s own (noisy targets are hidden from others).

The mask is described by three per-token tensors (sample, split, mode), so it can be realised as a
dense boolean mask (CPU / short packs, torch SDPA) or as a flex-attention block mask on CUDA that
never materialises the L x L matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("ftkit")

MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2
_MODES = {"causal": MODE_CAUSAL, "full": MODE_FULL, "noise": MODE_NOISE}


@dataclass
class AttentionSpec:
    sample: torch.Tensor  # [L] long
    split: torch.Tensor  # [L] long, globally unique split id
    mode: torch.Tensor  # [L] long
    impl: str = "sdpa"  # "sdpa" (dense mask) | "flex" (block mask, CUDA)
    causal: bool = False  # one sample, causal splits only: the mask is plain k <= q (SDPA's fast path)
    _dense: torch.Tensor | None = None
    _block: object | None = None

    @classmethod
    def from_splits(cls, splits: list[tuple[int, int, str, int]], length: int, device=None, impl: str = "auto"):
        sample = torch.empty(length, dtype=torch.long)
        split = torch.empty(length, dtype=torch.long)
        mode = torch.empty(length, dtype=torch.long)
        covered, samples = 0, set()
        for i, (s, e, m, smp) in enumerate(splits):
            if m not in _MODES:
                raise ValueError(f"attention split {i}: unknown mode {m!r}")
            sample[s:e], split[s:e], mode[s:e] = smp, i, _MODES[m]
            covered += e - s
            samples.add(smp)
        if covered != length:
            raise ValueError(f"attention splits cover {covered} tokens, sequence has {length}")
        if impl == "auto":
            impl = "flex" if (device is not None and torch.device(device).type == "cuda") else "sdpa"
        causal = len(samples) <= 1 and all(m == "causal" for _, _, m, _ in splits)
        return cls(sample.to(device), split.to(device), mode.to(device), impl, causal)

    def allowed(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """Elementwise rule on (broadcastable) query/key index tensors."""
        same_sample = self.sample[q_idx] == self.sample[k_idx]
        same_split = self.split[q_idx] == self.split[k_idx]
        bidir = same_split & (self.mode[q_idx] != MODE_CAUSAL)
        hidden = (self.mode[k_idx] == MODE_NOISE) & ~same_split
        return same_sample & ((k_idx <= q_idx) | bidir) & ~hidden

    def dense(self) -> torch.Tensor:
        """[L, L] bool mask (True = may attend)."""
        if self._dense is None:
            n = self.sample.shape[0]
            idx = torch.arange(n, device=self.sample.device)
            self._dense = self.allowed(idx[:, None], idx[None, :])
        return self._dense

    def block_mask(self):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            n = self.sample.shape[0]

            def mask_mod(b, h, q, k):
                return self.allowed(q, k)

            # _compile=True builds the block mask block by block; without it torch evaluates the dense L x L mask
            self._block = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=self.sample.device,
                                            _compile=True)
        return self._block


_flex_compiled = None
_flex_failed: set = set()


def _flex(q, k, v, block_mask, scale, enable_gqa):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=True)
    return _flex_compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _sdpa(q, k, v, mask: torch.Tensor | None, scale: float, causal: bool = False) -> torch.Tensor:
    """torch SDPA on [1, H, L, d] views (the 4-D layout its fused CPU/CUDA kernels need; 3-D inputs fall
    back to the math path, which keeps the H x L x L probabilities for backward). ``mask`` is a boolean
    [Lq, Lk] (True = may attend); ``causal=True`` uses the kernel's own ``k <= q`` rule instead (no mask
    tensor). GQA through ``enable_gqa``: query head j reads KV head j // (H / Hkv), no K/V copies."""
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=None if causal else mask,
                                         is_causal=causal, scale=scale, enable_gqa=q.shape[0] != k.shape[0])
    return out[0]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, scale: float) -> torch.Tensor:
    """q [H, L, d], k/v [Hkv, L, d] -> [H, L, d] under the packed mask (GQA: head j uses kv j // (H/Hkv))."""
    gqa = q.shape[0] != k.shape[0]
    key = (q.dtype, q.shape[-1])
    if spec.impl == "flex" and key not in _flex_failed:
        try:
            return _flex(q[None], k[None], v[None], spec.block_mask(), scale, gqa)[0]
        except Exception as e:  # inductor found no flex kernel for this dtype / head size (seen: fp32, d=16)
            if q.device.type != "cuda":
                raise
            _flex_failed.add(key)
            log.warning("flex attention cannot compile for %s, head_dim %d (%s); using SDPA with a dense mask",
                        q.dtype, q.shape[-1], type(e).__name__)
    if spec.causal:
        return _sdpa(q, k, v, None, scale, causal=True)
    return _sdpa(q, k, v, spec.dense(), scale)


def cached_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of new queries over [cache + new] keys with an explicit [Lq, Lk] mask (inference)."""
    return _sdpa(q, k, v, mask, scale)
