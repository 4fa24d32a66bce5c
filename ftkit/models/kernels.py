"""Fused-kernel dispatch: Liger (Triton) kernels on CUDA, plain torch everywhere else.

``set_backend("liger")`` switches RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy of every
ftkit decoder to Liger's kernels; ``"torch"`` (the default, and the only choice without CUDA) uses
the reference implementations below, whose cross-entropy is chunked so that the full [N, vocab]
logits are never materialised either.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("ftkit")
_BACKEND = "torch"
CE_ROW_ALIGN = 16  # LM-head rows per GEMM are padded to a multiple of this
RECOMPUTE_LOGITS_BYTES = 256 * 2**20  # linear_cross_entropy checkpoints its chunks above this many fp32 logit bytes


def liger_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def set_backend(name: str) -> str:
    """Select "torch", "liger" or "auto" (liger when CUDA and liger-kernel are present). Returns the choice."""
    global _BACKEND
    if name == "auto":
        name = "liger" if liger_available() else "torch"
    if name == "liger" and not liger_available():
        raise RuntimeError("kernels='liger' needs a CUDA device and `pip install ftkit[cuda]` (liger-kernel)")
    if name not in ("torch", "liger"):
        raise ValueError(f"unknown kernel backend {name!r} (torch | liger | auto)")
    _BACKEND = name
    return name


def backend() -> str:
    return _BACKEND


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight``, statistics in fp32, result in x's dtype (Qwen2)."""
    if _BACKEND == "liger" and x.is_cuda:
        from liger_kernel.transformers.functional import liger_rms_norm

        return liger_rms_norm(x, weight, eps, 0.0, "llama", False)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up``."""
    if _BACKEND == "liger" and gate.is_cuda:
        from liger_kernel.transformers.functional import liger_swiglu

        return liger_swiglu(gate, up)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate-half RoPE. q [Hq, L, d], k [Hk, L, d], cos/sin [L, d]."""
    if _BACKEND == "liger" and q.is_cuda:
        from liger_kernel.transformers.functional import liger_rope

        # liger wants [B, H, L, d] and cos/sin [1, L, d]
        qo, ko = liger_rope(q[None], k[None], cos[None], sin[None])
        return qo[0], ko[0]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "none",
    chunk_size: int = 1024,
    recompute: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, ``loss_i = logsumexp(z_i) - z_i[y_i]``.

    hidden [N, D], weight [V, D], labels [N]. Returns per-token loss [N] (``reduction="none"``) or the
    mean. Liger path (CUDA): its fused linear cross-entropy kernel, logits never held.

    Torch path: chunks of ``chunk_size`` rows, each padded with zero rows to a multiple of
    ``CE_ROW_ALIGN`` (a 1023-row bf16 LM-head GEMM took 18% longer than a 1024-row one on CPU,
    BENCHMARKS.md). Autograd keeps each chunk's fp32 logits and
    log-softmax for backward, ``~8 N V`` bytes in all; with ``recompute`` each chunk is checkpointed
    instead (peak ``~8 chunk_size V`` bytes) at the price of running the LM-head matmul and
    log-softmax twice (measured on CPU: CE 1.04 s vs 0.66 s for a 1024-row step). ``recompute=None``
    decides by size: recompute only when all fp32 logits would exceed ``RECOMPUTE_LOGITS_BYTES``
    (256 MiB: a BAGEL-7B vocab of 152,064 crosses it at ~440 CE rows; a 32k vocab at ~2,000).
    """
    if hidden.shape[0] == 0:
        z = hidden.sum() * 0.0
        return z if reduction == "mean" else hidden.new_zeros(0)
    if _BACKEND == "liger" and hidden.is_cuda:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        loss = liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="none").float()
        return loss.mean() if reduction == "mean" else loss

    def _chunk(h, w, y):
        n = h.shape[0]
        pad = -n % CE_ROW_ALIGN  # zero rows, label ignored: an odd row count takes a slower GEMM path
        if pad:
            h, y = F.pad(h, (0, 0, 0, pad)), F.pad(y, (0, pad), value=-100)
        return F.cross_entropy((h @ w.t()).float(), y, reduction="none")[:n]

    if recompute is None:
        recompute = hidden.shape[0] * weight.shape[0] * 4 > RECOMPUTE_LOGITS_BYTES
    pieces = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s : s + chunk_size], labels[s : s + chunk_size]
        if recompute and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk, h, weight, y, use_reentrant=False))
        else:
            pieces.append(_chunk(h, weight, y))
    loss = torch.cat(pieces)
    return loss.mean() if reduction == "mean" else loss
