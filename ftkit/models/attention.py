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

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("ftkit")

MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2
_MODES = {"causal": MODE_CAUSAL, "full": MODE_FULL, "noise": MODE_NOISE}


@dataclass
class RowLayout:
    """Independent attention problems stacked as one padded batch of rows (:func:`batched_attention`).

    Row ``b``'s queries are tokens ``q_index[b]`` of the query axis, its keys ``k_index[b]`` of the key
    axis; ``mask`` [B, 1, Qmax, Kmax] (True = may attend) must hide padding keys and give every padding
    query at least one key; ``back`` [Lq] is each query token's slot in the flattened ``B * Qmax``."""

    q_index: torch.Tensor  # [B, Qmax] long
    k_index: torch.Tensor  # [B, Kmax] long
    mask: torch.Tensor  # [B, 1, Qmax, Kmax] bool
    back: torch.Tensor  # [Lq] long

    @classmethod
    def for_blocks(cls, past_lens: list[int], q_lens: list[int], causal: list[bool], device=None) -> RowLayout:
        """The rows of ``forward_blocks``: block i's ``q_lens[i]`` new tokens see its own ``past_lens[i]``
        cached keys and its own new tokens (causally or fully), on the key axis [all caches | all new]."""
        P = sum(past_lens)
        B, Qm = len(q_lens), max(q_lens)
        Km = max(p + q for p, q in zip(past_lens, q_lens))
        q_index = torch.zeros(B, Qm, dtype=torch.long)
        k_index = torch.zeros(B, Km, dtype=torch.long)
        mask = torch.zeros(B, Qm, Km, dtype=torch.bool)
        back = []
        p0 = q0 = 0
        for b, (pl, ql, c) in enumerate(zip(past_lens, q_lens, causal)):
            q_index[b, :ql] = torch.arange(q0, q0 + ql)
            k_index[b, :pl] = torch.arange(p0, p0 + pl)
            k_index[b, pl:pl + ql] = torch.arange(P + q0, P + q0 + ql)
            own = torch.ones(ql, ql, dtype=torch.bool)
            mask[b, :ql, :pl] = True
            mask[b, :ql, pl:pl + ql] = own.tril() if c else own
            mask[b, ql:, :pl + ql] = True  # padding queries: any real key (their output is dropped)
            back.append(b * Qm + torch.arange(ql))
            p0 += pl
            q0 += ql
        return cls(q_index.to(device), k_index.to(device), mask[:, None].to(device), torch.cat(back).to(device))

    def work(self) -> int:
        """Query-key pairs computed: ``B Qmax Kmax``."""
        return self.q_index.numel() * self.k_index.shape[1]

    def dense(self, lq: int, lk: int) -> torch.Tensor:
        """The same rule as one [lq, lk] bool mask (for when one dense call is the cheaper layout)."""
        B, Qm = self.q_index.shape
        real = torch.zeros(B * Qm, dtype=torch.bool, device=self.mask.device)
        real[self.back] = True
        pairs = self.mask[:, 0] & real.view(B, Qm, 1)  # padding queries dropped; padding keys are never allowed
        out = torch.zeros(lq, lk, dtype=torch.bool, device=self.mask.device)
        out[self.q_index[:, :, None].expand_as(pairs)[pairs], self.k_index[:, None, :].expand_as(pairs)[pairs]] = True
        return out


@dataclass
class AttentionSpec:
    sample: torch.Tensor  # [L] long
    split: torch.Tensor  # [L] long, globally unique split id
    mode: torch.Tensor  # [L] long
    impl: str = "sdpa"  # "sdpa" (dense mask) | "flex" (block mask, CUDA)
    causal: bool = False  # one sample, causal splits only: the mask is plain k <= q (SDPA's fast path)
    ranges: tuple[tuple[int, int], ...] | None = None  # (start, end) of each packed sample, when contiguous
    _dense: torch.Tensor | None = None
    _block: object | None = None
    _grouped: tuple | None = None

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
        return cls(sample.to(device), split.to(device), mode.to(device), impl, causal, _sample_ranges(splits))

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

    def grouped(self):
        """The pack as a padded batch of its samples, when that is at most half the dense work, else None.

        A pack of B samples attends block-diagonally: the dense L x L mask spends most of its work on
        pairs of different samples (all masked; the CPU kernels do not skip masked blocks). Stacking the
        samples as ``[B, Lmax]`` rows costs ``B Lmax^2`` instead of ``L^2``: a :class:`RowLayout` whose
        padding slots repeat the sample's first token; its mask is the packed rule (a padding query sees
        only its own slot, a padding key is seen by nobody).
        """
        if self._grouped is None:
            r = self.ranges
            n = self.sample.shape[0]
            if not r or len(r) < 2 or len(r) * max(e - s for s, e in r) ** 2 * 2 > n * n:
                self._grouped = (None,)
            else:
                dev = self.sample.device
                lm = max(e - s for s, e in r)
                starts = torch.tensor([s for s, _ in r], device=dev)
                lens = torch.tensor([e - s for s, e in r], device=dev)
                slot = torch.arange(lm, device=dev)
                valid = slot[None, :] < lens[:, None]  # [B, Lm]
                index = starts[:, None] + torch.where(valid, slot[None, :], 0)
                mask = self.allowed(index[:, :, None], index[:, None, :]) & valid[:, None, :] & valid[:, :, None]
                mask |= (~valid[:, :, None]) & torch.eye(lm, dtype=torch.bool, device=dev)
                back = torch.cat([b * lm + torch.arange(e - s, device=dev) for b, (s, e) in enumerate(r)])
                self._grouped = (RowLayout(index, index, mask[:, None], back),)
        return self._grouped[0]

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


def _sample_ranges(splits) -> tuple[tuple[int, int], ...] | None:
    """(start, end) of each sample in pack order, or None when a sample's splits are not contiguous."""
    ranges: list[list[int]] = []  # [start, end, sample]
    for s, e, _, smp in sorted(splits):
        if ranges and ranges[-1][2] == smp and ranges[-1][1] == s:
            ranges[-1][1] = e
        elif any(r[2] == smp for r in ranges):
            return None
        else:
            ranges.append([s, e, smp])
    return tuple((a, b) for a, b, _ in ranges)


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
    grouped = spec.grouped()
    if grouped is not None:  # one attention per sample, stacked as a padded batch
        return batched_attention(q, k, v, grouped, scale)
    return _sdpa(q, k, v, spec.dense(), scale)


def batched_attention(q, k, v, rows: RowLayout, scale: float) -> torch.Tensor:
    """q [H, Lq, d], k/v [Hkv, Lk, d] -> [H, Lq, d]: attention of each row of ``rows`` (its own queries
    over its own keys), the rows run as one batch.

    On CPU in fp32: torch's bf16 flash backward is 3-5x slower than fp32 on such short rows
    (bench/bench_pretrain_step.py); long single sequences keep the input dtype, where bf16 is faster."""
    B, Qm = rows.q_index.shape
    Km = rows.k_index.shape[1]
    cpu = q.device.type == "cpu"
    dt = torch.float32 if cpu else q.dtype

    def gather(x, index, n):  # [h, L, d] -> [B, h, n, d]
        return x.index_select(1, index.reshape(-1)).unflatten(1, (B, n)).transpose(0, 1).to(dt)

    with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(gather(q, rows.q_index, Qm), gather(k, rows.k_index, Km),
                                             gather(v, rows.k_index, Km), attn_mask=rows.mask, scale=scale,
                                             enable_gqa=q.shape[0] != k.shape[0])
    return out.transpose(0, 1).reshape(q.shape[0], B * Qm, q.shape[-1]).index_select(1, rows.back).to(q.dtype)


def cached_attention(q, k, v, mask: torch.Tensor | RowLayout, scale: float) -> torch.Tensor:
    """Attention of new queries over [cache + new] keys (inference): an explicit [Lq, Lk] mask, or the
    blocks of :func:`ftkit.infer.context.forward_blocks` as a :class:`RowLayout`."""
    if isinstance(mask, RowLayout):
        return batched_attention(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask, scale)
