"""Loss terms of MCoT fine-tuning: dense step-wise supervision and three consistency losses.

Every function here is pure and differentiable: it takes tensors the backbone already produced
(:class:`~ftkit.models.bagel.BagelOutput` and its typed ``flow``) and never calls a model. The
LightningModule combines them as

.. math::

    L = w_{ce} \\, CE + w_{mse} \\, MSE + w_{spatial} \\, L_{spatial} + w_{kl} \\, L_{kl}
        + w_{semantic} \\, L_{semantic},

where CE and MSE are step-weighted token means (:func:`step_breakdown`): plan / reflection /
answer text carries CE, draft / refined images carry the rectified-flow MSE, and each step's own
mean is logged separately.

Flow convention (BAGEL, ``../shared/spec/bagel.md``): ``x_t = (1 - t) x0 + t eps``, target
``v = eps - x0``, so the model's predicted clean latent is ``x0_hat = x_t - t v_hat``.

Latent-token layout: the VAE token table of a :class:`~ftkit.segments.PackedBatch` has ``Nz`` rows,
image after image in packing order, each image's ``h * w`` tokens in raster order (row-major over
its token grid ``batch.vae_latent_hw[i]``). :class:`~ftkit.models.bagel.FlowLatents` ``clean``,
``noisy`` and ``timesteps`` are indexed by these rows, and the predicted velocities ``v_pred [Nm, C]``
sit at rows ``flow.rows [Nm]``.

Host syncs: value checks that read a tensor on the host (labels in range, rows in range) run on CPU
tensors always, and on accelerator tensors only with the environment variable
``FTKIT_DEBUG_CHECKS=1`` (the packer builds valid labels and rows; a check there would stall every
step). :func:`step_breakdown` reads one small vector (which steps are present, for the per-step logs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ftkit.models import kernels
from ftkit.models.bagel import FlowLatents
from ftkit.segments import STEP_NAMES, PackedBatch, Step

__all__ = [
    "LossWeights",
    "Preference",
    "dpo_loss",
    "sequence_logps",
    "flow_mse_per_token",
    "kl_prior_preservation",
    "per_token_ce",
    "predicted_clean",
    "semantic_consistency",
    "semantic_consistency_from_batch",
    "spatial_consistency",
    "spatial_consistency_from_batch",
    "step_breakdown",
]

IGNORE_INDEX = -100


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def value_checks(t: Tensor) -> bool:
    """Whether to check ``t``'s values on the host: always on CPU (no device sync), on an accelerator
    only with ``FTKIT_DEBUG_CHECKS=1``."""
    return t.device.type == "cpu" or os.environ.get("FTKIT_DEBUG_CHECKS", "") not in ("", "0")


# ---------------------------------------------------------------------------------------------- CE


def per_token_ce(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Per-token natural-log cross-entropy of the LM head, without materialising all logits.

    .. math::

        CE_i = -\\log \\mathrm{softmax}(W h_i)_{y_i}
             = \\log \\sum_v e^{(W h_i)_v} - (W h_i)_{y_i},

    computed in fp32 by :func:`ftkit.models.kernels.linear_cross_entropy` (``chunk_size`` rows of
    logits at a time on the torch path, recomputed in backward; Liger's fused kernel on CUDA).
    Tokens labelled ``-100`` get loss 0.

    Args:
        hidden (Tensor): final-normed hidden states at the CE positions, ``[N, D]``.
        lm_head_weight (Tensor): LM head weight ``[V, D]``.
        labels (Tensor): integer targets ``[N]`` in ``[0, V)`` (or ``-100``: ignored).
        chunk_size (int): rows of logits held at once on the torch path.

    Returns:
        Tensor: ``[N]`` fp32 losses.

    Raises:
        ValueError: if shapes disagree, labels are not integers or lie outside ``[0, V)`` (other than
            -100; checked as :func:`value_checks` says), or ``chunk_size < 1``.
    """
    if hidden.dim() != 2:
        raise ValueError(f"per_token_ce: hidden must be [N, D], got {_shape(hidden)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"per_token_ce: lm_head_weight must be [V, D={hidden.shape[1]}], got {_shape(lm_head_weight)}"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"per_token_ce: labels must be [N={hidden.shape[0]}], got {_shape(labels)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"per_token_ce: labels must be an integer tensor, got {labels.dtype}")
    if chunk_size < 1:
        raise ValueError(f"per_token_ce: chunk_size must be >= 1, got {chunk_size}")
    if labels.numel() and value_checks(labels):
        vocab = lm_head_weight.shape[0]
        bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"per_token_ce: label {int(labels[first])} at position {first} is outside [0, {vocab}) "
                f"and is not the ignore index {IGNORE_INDEX}"
            )
    return kernels.linear_cross_entropy(hidden, lm_head_weight, labels, reduction="none", chunk_size=chunk_size)


# -------------------------------------------------------------------------------------- flow MSE


def flow_mse_per_token(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """Rectified-flow loss per latent token: mean over channels of the squared velocity error.

    .. math::

        MSE_i = \\frac{1}{C} \\sum_c (\\hat v_{i,c} - v_{i,c})^2, \\qquad v = \\epsilon - x_0,

    in fp32 whatever the input dtype.

    Args:
        v_pred (Tensor): predicted velocities ``[N, C]``.
        v_target (Tensor): target velocities ``[N, C]``.

    Returns:
        Tensor: ``[N]`` fp32 losses.

    Raises:
        ValueError: if the shapes differ or are not 2-D.
    """
    if v_pred.dim() != 2 or _shape(v_pred) != _shape(v_target):
        raise ValueError(
            f"flow_mse_per_token: v_pred and v_target must both be [N, C], got {_shape(v_pred)} and {_shape(v_target)}"
        )
    return (v_pred.float() - v_target.float()).pow(2).mean(dim=-1)


# ------------------------------------------------------------------------------ step weighting


def step_breakdown(
    values: Tensor, step_ids: Tensor, weights: Mapping[int, float] | None = None
) -> tuple[Tensor, dict[int, Tensor]]:
    """Step-weighted token mean of a per-token loss, and each step's own mean for logging.

    .. math::

        total = \\frac{1}{N} \\sum_{s} w_s \\sum_{i: step_i = s} \\ell_i,

    with ``N`` all tokens of this term. With every ``w_s = 1`` this is the plain token mean, upstream's
    normalisation of both CE and MSE by their token counts. Steps missing from ``weights`` weigh 1.

    Args:
        values (Tensor): per-token losses ``[N]``.
        step_ids (Tensor): integer :class:`~ftkit.segments.Step` value of each token ``[N]``.
        weights (Mapping[int, float] | None): step value -> weight (see :meth:`LossWeights.step_weights`).

    Returns:
        tuple[Tensor, dict[int, Tensor]]: the fp32 scalar total (``values.sum() * 0`` when ``N = 0``, so
        it still backpropagates), and ``{step: detached mean of that step's values}`` for every step
        present (empty when ``N = 0``).

    Raises:
        ValueError: if ``values`` and ``step_ids`` are not 1-D of the same length, or ``step_ids`` is not
            an integer tensor.
    """
    if values.dim() != 1 or step_ids.dim() != 1 or values.shape[0] != step_ids.shape[0]:
        raise ValueError(
            f"step_breakdown: values and step_ids must both be [N], got {_shape(values)} and {_shape(step_ids)}"
        )
    if step_ids.dtype.is_floating_point or step_ids.dtype == torch.bool:
        raise ValueError(f"step_breakdown: step_ids must be an integer tensor, got {step_ids.dtype}")
    values = values.float()
    if values.numel() == 0:
        return values.sum() * 0.0, {}
    weights = {int(s): float(w) for s, w in (weights or {}).items()}
    n = max(len(Step), 1 + max(weights, default=0))
    step_ids = step_ids.to(values.device).long()
    if value_checks(step_ids) and bool(((step_ids < 0) | (step_ids >= n)).any()):
        raise ValueError(f"step_breakdown: step_ids must lie in [0, {n}), got {sorted(set(step_ids.tolist()))}")
    table = torch.ones(n)
    for s, w in weights.items():
        table[s] = w
    w_tok = table.to(values.device)[step_ids]
    total = (w_tok * values).sum() / values.numel()
    counts = torch.bincount(step_ids, minlength=n)
    sums = torch.zeros(n, device=values.device).index_add_(0, step_ids, values.detach())
    present = counts.nonzero().flatten().tolist()  # the one host read: which steps to log
    per_step = {s: sums[s] / counts[s] for s in present}
    return total, per_step


# ------------------------------------------------------------------------ predicted clean latent


def predicted_clean(x_t: Tensor, t: Tensor, v_pred: Tensor) -> Tensor:
    """The model's estimate of the clean latent: ``x0_hat = x_t - t * v_hat``.

    Exact inverse of the flow interpolation: with ``x_t = (1 - t) x0 + t eps`` and ``v_hat = eps - x0``
    it returns ``x0``.

    Args:
        x_t (Tensor): noisy latent tokens ``[N, C]``.
        t (Tensor): timestep of each token ``[N]`` (0 = clean, 1 = pure noise).
        v_pred (Tensor): predicted velocities ``[N, C]``.

    Returns:
        Tensor: ``[N, C]`` fp32 predicted clean latent tokens.

    Raises:
        ValueError: if shapes disagree.
    """
    if x_t.dim() != 2 or _shape(x_t) != _shape(v_pred):
        raise ValueError(f"predicted_clean: x_t and v_pred must both be [N, C], got {_shape(x_t)} and {_shape(v_pred)}")
    if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
        raise ValueError(f"predicted_clean: t must be [N={x_t.shape[0]}], got {_shape(t)}")
    return x_t.float() - t.float()[:, None] * v_pred.float()


# -------------------------------------------------------------------------- spatial consistency


def spatial_consistency(x0_hat: Tensor, reference: Tensor, keep: Tensor) -> Tensor:
    """Masked latent MSE: the refinement must leave the regions the reflection did not flag as they were.

    .. math::

        L_{spatial} = \\frac{\\sum_i k_i \\lVert \\hat x_{0,i} - r_i \\rVert^2}{C \\sum_i k_i},

    where ``x0_hat`` are the refined image's predicted clean latent tokens, ``r`` the draft's clean
    latent tokens at the same grid cells, and ``k_i = 1`` for tokens outside the flagged regions.
    Returns 0 (``x0_hat.sum() * 0``, still on the graph) when no token is kept.

    Args:
        x0_hat (Tensor): predicted clean latent tokens ``[N, C]``.
        reference (Tensor): reference clean latent tokens ``[N, C]`` (no gradient is wanted through it;
            pass a detached tensor).
        keep (Tensor): bool ``[N]``, True where the token is compared.

    Returns:
        Tensor: fp32 scalar.

    Raises:
        ValueError: if shapes disagree or ``keep`` is not bool.
    """
    if x0_hat.dim() != 2 or _shape(x0_hat) != _shape(reference):
        raise ValueError(
            f"spatial_consistency: x0_hat and reference must both be [N, C], got {_shape(x0_hat)} and {_shape(reference)}"
        )
    if keep.dim() != 1 or keep.shape[0] != x0_hat.shape[0]:
        raise ValueError(f"spatial_consistency: keep must be [N={x0_hat.shape[0]}], got {_shape(keep)}")
    if keep.dtype != torch.bool:
        raise ValueError(f"spatial_consistency: keep must be a bool tensor, got {keep.dtype}")
    x0_hat = x0_hat.float()
    k = keep.to(x0_hat.device, torch.float32)
    n_keep = k.sum()
    sq = (x0_hat - reference.float()).pow(2).sum(dim=-1)
    if x0_hat.numel() == 0 or not bool(n_keep > 0):
        return x0_hat.sum() * 0.0
    return (k * sq).sum() / (n_keep * x0_hat.shape[1])


def _image_predictions(
    batch: PackedBatch, flow: FlowLatents, v_pred_rows: Tensor, v_pred: Tensor, who: str
) -> tuple[list[tuple[int, int]], dict[int, Tensor], Tensor]:
    """Per VAE image: its row span, and x0_hat for images whose every token has a predicted velocity.

    Returns ``(spans, x0_hat_of_image, clean)`` where ``spans[i] = (start, end)`` rows of image ``i``.
    """
    if not isinstance(flow, FlowLatents):
        raise TypeError(f"{who}: flow must be BagelOutput.flow (FlowLatents), got {type(flow).__name__}")
    x_t, t, clean = flow.noisy, flow.timesteps, flow.clean
    hw = list(batch.vae_latent_hw)
    n_z = sum(h * w for h, w in hw)
    if x_t.dim() != 2 or x_t.shape[0] != n_z:
        raise ValueError(f"{who}: flow.noisy must be [Nz={n_z}, C], got {_shape(x_t)}")
    C = x_t.shape[1]
    if _shape(clean) != (n_z, C):
        raise ValueError(f"{who}: flow.clean must be [{n_z}, {C}], got {_shape(clean)}")
    if _shape(t) != (n_z,):
        raise ValueError(f"{who}: flow.timesteps must be [{n_z}], got {_shape(t)}")
    if v_pred.dim() != 2 or v_pred.shape[1] != C:
        raise ValueError(f"{who}: v_pred must be [Nm, C={C}], got {_shape(v_pred)}")
    if v_pred_rows.dim() != 1 or v_pred_rows.shape[0] != v_pred.shape[0]:
        raise ValueError(f"{who}: v_pred_rows must be [Nm={v_pred.shape[0]}], got {_shape(v_pred_rows)}")
    if v_pred_rows.dtype.is_floating_point or v_pred_rows.dtype == torch.bool:
        raise ValueError(f"{who}: v_pred_rows must be an integer tensor, got {v_pred_rows.dtype}")
    for name in ("vae_image_noisy", "vae_region_masks", "vae_pair_with"):
        if len(getattr(batch, name)) != len(hw):
            raise ValueError(f"{who}: batch.{name} has {len(getattr(batch, name))} entries for {len(hw)} VAE images")
    dev = x_t.device
    rows = v_pred_rows.to(dev)
    if rows.numel() and value_checks(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n_z):
        raise ValueError(f"{who}: v_pred_rows must lie in [0, {n_z}), got [{int(rows.min())}, {int(rows.max())}]")
    pos_of_row = torch.full((n_z,), -1, dtype=torch.long, device=dev)
    pos_of_row[rows] = torch.arange(rows.numel(), device=dev)
    spans, start = [], 0
    for h, w in hw:
        spans.append((start, start + h * w))
        start += h * w
    if rows.numel():
        covered = (pos_of_row >= 0).long()
        counts = torch.stack([covered[a:b].sum() for a, b in spans]).tolist() if spans else []
    else:
        counts = [0] * len(spans)
    v = v_pred.to(dev)
    preds: dict[int, Tensor] = {}
    for i, (a, b) in enumerate(spans):
        if b > a and counts[i] == b - a:
            preds[i] = predicted_clean(x_t[a:b], t[a:b], v[pos_of_row[a:b]])
    return spans, preds, clean


def spatial_consistency_from_batch(
    batch: PackedBatch, flow: FlowLatents, v_pred_rows: Tensor, v_pred: Tensor
) -> Tensor:
    """Spatial consistency of every refinement in a packed batch (mean over refined images).

    For each noisy VAE image ``i`` that refines image ``j = batch.vae_pair_with[i] >= 0`` on the same
    token grid and whose every token has a predicted velocity, take

    .. math::

        L_i = L_{spatial}(\\hat x_0^{(i)}, x_0^{(j)}, \\neg M_i),
        \\qquad \\hat x_0^{(i)} = x_t^{(i)} - t^{(i)} \\hat v^{(i)},

    with ``M_i = batch.vae_region_masks[i]`` (``[h, w]`` bool, flagged cells; None = nothing flagged)
    and ``x_0^{(j)}`` the draft's clean latent tokens (detached). Images whose grid differs from their
    draft's, images without predictions, and images whose every cell is flagged are skipped.

    Args:
        batch (PackedBatch): the packed batch the model ran on.
        flow (FlowLatents): ``BagelOutput.flow``: ``noisy [Nz, C]``, ``timesteps [Nz]``, ``clean [Nz, C]``
        v_pred_rows (Tensor): VAE-table rows of the predicted velocities ``[Nm]`` (``flow.rows``).
        v_pred (Tensor): predicted velocities ``[Nm, C]`` (``BagelOutput.velocity_pred``).

    Returns:
        Tensor: fp32 scalar, the mean of ``L_i`` over the images used, or ``v_pred.sum() * 0`` if none.

    Raises:
        ValueError: if flow tensors are missing or mis-shaped, or a region mask's shape is not the image's grid.
    """
    who = "spatial_consistency_from_batch"
    spans, preds, clean = _image_predictions(batch, flow, v_pred_rows, v_pred, who)
    terms = []
    for i, x0_hat in preds.items():
        j = int(batch.vae_pair_with[i])
        if not batch.vae_image_noisy[i] or j < 0:
            continue
        if not 0 <= j < len(spans):
            raise ValueError(f"{who}: batch.vae_pair_with[{i}] = {j} is not a VAE image index")
        if tuple(batch.vae_latent_hw[i]) != tuple(batch.vae_latent_hw[j]):
            continue
        h, w = batch.vae_latent_hw[i]
        mask = batch.vae_region_masks[i]
        if mask is None:
            keep = torch.ones(h * w, dtype=torch.bool, device=x0_hat.device)
        else:
            if _shape(mask) != (h, w):
                raise ValueError(f"{who}: batch.vae_region_masks[{i}] must be the token grid [{h}, {w}], got {_shape(mask)}")
            keep = ~mask.to(x0_hat.device, torch.bool).reshape(-1)
        if not bool(keep.any()):
            continue
        a, b = spans[j]
        terms.append(spatial_consistency(x0_hat, clean[a:b].detach(), keep))
    if not terms:
        return v_pred.float().sum() * 0.0
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- prior preservation


def _kl_chunk(h_a: Tensor, h_b: Tensor, weight: Tensor, temperature: float) -> Tensor:
    logp_a = F.log_softmax((h_a @ weight.t()).float() / temperature, dim=-1)
    logp_b = F.log_softmax((h_b @ weight.detach().t()).float() / temperature, dim=-1)
    return (logp_b.exp() * (logp_b - logp_a)).sum(dim=-1)


def kl_prior_preservation(
    h_adapted: Tensor,
    h_base: Tensor,
    lm_head_weight: Tensor,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> Tensor:
    """Prior preservation of reasoning text: KL from the base model's next-token distribution.

    .. math::

        L_{kl} = \\frac{1}{N} \\sum_i \\sum_v p^{base}_{i,v} (\\log p^{base}_{i,v} - \\log p^{ad}_{i,v}),
        \\quad p^{base}_i = \\mathrm{softmax}(W h^{base}_i / T), \\;
        p^{ad}_i = \\mathrm{softmax}(W h^{ad}_i / T),

    i.e. ``KL(p_base || p_adapted)`` per token, averaged over tokens (no ``T^2`` factor). ``h_base``
    comes from the same model with its adapters disabled, so it is treated as a constant (detached,
    as is ``W`` on the base side); gradients reach ``h_adapted`` (and ``W`` through the adapted side if
    it trains). Logits are formed ``chunk_size`` rows at a time in fp32 and recomputed in backward, so
    at most ``2 x chunk_size x V`` logits live at once.

    Args:
        h_adapted (Tensor): hidden states of the adapted model ``[N, D]``.
        h_base (Tensor): hidden states of the base model at the same positions ``[N, D]``.
        lm_head_weight (Tensor): LM head weight ``[V, D]``.
        chunk_size (int): rows per chunk.
        temperature (float): softmax temperature ``T > 0``.

    Returns:
        Tensor: fp32 scalar (``h_adapted.sum() * 0`` when ``N = 0``).

    Raises:
        ValueError: if shapes disagree, ``chunk_size < 1`` or ``temperature <= 0``.
    """
    if h_adapted.dim() != 2 or _shape(h_adapted) != _shape(h_base):
        raise ValueError(
            f"kl_prior_preservation: h_adapted and h_base must both be [N, D], got {_shape(h_adapted)} and {_shape(h_base)}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != h_adapted.shape[1]:
        raise ValueError(
            f"kl_prior_preservation: lm_head_weight must be [V, D={h_adapted.shape[1]}], got {_shape(lm_head_weight)}"
        )
    if chunk_size < 1:
        raise ValueError(f"kl_prior_preservation: chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"kl_prior_preservation: temperature must be > 0, got {temperature}")
    n = h_adapted.shape[0]
    if n == 0:
        return h_adapted.float().sum() * 0.0
    h_base = h_base.detach()
    total = h_adapted.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        ha, hb = h_adapted[s : s + chunk_size], h_base[s : s + chunk_size]
        if torch.is_grad_enabled() and (ha.requires_grad or lm_head_weight.requires_grad):
            kl = torch.utils.checkpoint.checkpoint(_kl_chunk, ha, hb, lm_head_weight, temperature, use_reentrant=False)
        else:
            kl = _kl_chunk(ha, hb, lm_head_weight, temperature)
        total = total + kl.sum()
    return total / n


# ---------------------------------------------------------------------------- semantic consistency


def semantic_consistency(x0_hat: Tensor, x0: Tensor, grid_hw: tuple[int, int], pool: int = 2) -> Tensor:
    """Semantic consistency between the plan and the visual state: agreement of the coarse layout.

    Definition. The plan fixes *what* is *where* and in which colour, which is the low-frequency
    content of the image; fine texture is left to the flow loss. So compare the predicted clean
    latent with the target's after a box low-pass: tokens ``[h*w, C]`` are laid on their ``(h, w)``
    grid and average-pooled over ``pool x pool`` token cells (ceil mode: edge cells average only the
    tokens they hold), then

    .. math::

        L_{semantic} = \\frac{1}{|cells| \\, C} \\sum_{cells} \\lVert P(\\hat x_0) - P(x_0) \\rVert^2 .

    Properties: 0 exactly when the pooled latents agree (so for a perfect prediction); for an error
    ``e d`` it equals ``e^2 L(d)``, growing monotonically with the error's magnitude; blind to any
    perturbation whose mean over every cell is zero (high-frequency detail). A squared error rather
    than a cosine term, because a cosine ignores the norm of the pooled latent (the colour intensity
    the plan also fixes) and is ill-defined for near-zero cells.

    Args:
        x0_hat (Tensor): predicted clean latent tokens ``[h*w, C]``, raster order.
        x0 (Tensor): target clean latent tokens ``[h*w, C]`` (no gradient is wanted through it).
        grid_hw (tuple[int, int]): token grid ``(h, w)``.
        pool (int): cell side in tokens (``>= 1``; 1 makes this the plain latent MSE).

    Returns:
        Tensor: fp32 scalar.

    Raises:
        ValueError: if shapes disagree with ``grid_hw`` or each other, or ``pool < 1``.
    """
    h, w = (int(v) for v in grid_hw)
    if h < 1 or w < 1:
        raise ValueError(f"semantic_consistency: grid_hw must be positive, got {grid_hw}")
    if pool < 1:
        raise ValueError(f"semantic_consistency: pool must be >= 1, got {pool}")
    if x0_hat.dim() != 2 or _shape(x0_hat) != _shape(x0):
        raise ValueError(f"semantic_consistency: x0_hat and x0 must both be [h*w, C], got {_shape(x0_hat)} and {_shape(x0)}")
    if x0_hat.shape[0] != h * w:
        raise ValueError(f"semantic_consistency: {x0_hat.shape[0]} tokens do not fill the grid {h}x{w}")
    C = x0_hat.shape[1]
    diff = (x0_hat.float() - x0.float()).t().reshape(1, C, h, w)  # pooling is linear: P(a) - P(b) = P(a - b)
    pooled = F.avg_pool2d(diff, kernel_size=pool, stride=pool, ceil_mode=True)
    return pooled.pow(2).mean()


def semantic_consistency_from_batch(
    batch: PackedBatch, flow: FlowLatents, v_pred_rows: Tensor, v_pred: Tensor, pool: int = 2
) -> Tensor:
    """:func:`semantic_consistency` of every noisy VAE image carrying flow loss, averaged over images.

    For each noisy image ``i`` whose every token has a predicted velocity: ``x0_hat = x_t - t v_hat`` of
    its tokens against its own clean latent tokens (detached) on its grid ``batch.vae_latent_hw[i]``.

    Args:
        batch (PackedBatch): the packed batch the model ran on.
        flow (FlowLatents): ``BagelOutput.flow``.
        v_pred_rows (Tensor): VAE-table rows of the predicted velocities ``[Nm]``.
        v_pred (Tensor): predicted velocities ``[Nm, C]``.
        pool (int): cell side in tokens.

    Returns:
        Tensor: fp32 scalar, the mean over those images, or ``v_pred.sum() * 0`` if none.

    Raises:
        ValueError: if flow tensors are missing or mis-shaped.
    """
    who = "semantic_consistency_from_batch"
    spans, preds, clean = _image_predictions(batch, flow, v_pred_rows, v_pred, who)
    terms = []
    for i, x0_hat in preds.items():
        if not batch.vae_image_noisy[i]:
            continue
        a, b = spans[i]
        terms.append(semantic_consistency(x0_hat, clean[a:b].detach(), batch.vae_latent_hw[i], pool))
    if not terms:
        return v_pred.float().sum() * 0.0
    return torch.stack(terms).mean()


# ------------------------------------------------------------------------- preference (DPO)


def sequence_logps(token_ce: Tensor, token_sample: Tensor, num_samples: int) -> Tensor:
    """Log-probability of each packed sample's supervised text: ``log p(y_s) = -sum_{i in s} CE_i``.

    Args:
        token_ce: [Nce] per-token CE (:func:`per_token_ce`).
        token_sample: [Nce] packed-sample index of each CE token (``batch.sample_ids[batch.ce_indexes]``).
        num_samples: samples in the pack (a sample without supervised tokens gets 0).
    """
    return -token_ce.float().new_zeros(num_samples).index_add(0, token_sample, token_ce.float())


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1) -> tuple[Tensor, Tensor]:
    """Direct preference optimisation (Rafailov et al. 2023), the sigmoid loss (trl's ``loss_type="sigmoid"``).

    With sequence log-probabilities of the policy (``chosen``, ``rejected``) and the reference
    (``ref_*``), the implicit rewards are ``r = beta * (log pi - log pi_ref)`` and

    .. math::

        L = -\\log \\sigma(r_c - r_r)

    averaged over pairs (tests/train/test_trl_parity.py checks it against trl's ``DPOTrainer``). Equal chosen
    and rejected give ``log 2``. Returns the loss and the per-pair reward margins ``r_c - r_r`` (detached).
    """
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


# -------------------------------------------------------------------------------------- weights


def _default_steps() -> dict[str, float]:
    return {name: 1.0 for name in STEP_NAMES.values()}


@dataclass
class LossWeights:
    """Weights of the loss terms (recipe field ``model.loss_weights``; 0 disables a term).

    Args:
        ce (float): cross-entropy on supervised text.
        mse (float): rectified-flow MSE on noisy images.
        steps (dict[str, float]): per-step weight inside CE and MSE, keys among ``plan``, ``draft``,
            ``reflect``, ``refine``, ``answer``, ``context``; missing keys weigh 1.0.
        spatial (float): :func:`spatial_consistency_from_batch`.
        kl_prior (float): :func:`kl_prior_preservation` on plan / reflection tokens.
        semantic (float): :func:`semantic_consistency_from_batch`.

    Raises:
        ValueError: on an unknown step name or a negative or non-finite weight.
    """

    ce: float = 1.0
    mse: float = 1.0
    steps: dict[str, float] = field(default_factory=_default_steps)
    spatial: float = 0.0
    kl_prior: float = 0.0
    semantic: float = 0.0

    def __post_init__(self) -> None:
        known = set(STEP_NAMES.values())
        unknown = sorted(set(self.steps) - known)
        if unknown:
            raise ValueError(f"LossWeights.steps: unknown step(s) {unknown}; expected among {sorted(known)}")
        self.steps = {**_default_steps(), **{k: float(v) for k, v in self.steps.items()}}
        named = {"ce": self.ce, "mse": self.mse, "spatial": self.spatial, "kl_prior": self.kl_prior,
                 "semantic": self.semantic, **{f"steps.{k}": v for k, v in self.steps.items()}}
        for name, value in named.items():
            v = float(value)
            if not (v >= 0.0 and v != float("inf")):
                raise ValueError(f"LossWeights.{name} must be a finite number >= 0, got {value!r}")

    def step_weights(self) -> dict[int, float]:
        """``{Step value: weight}`` for :func:`step_breakdown`."""
        return {int(s): float(self.steps[STEP_NAMES[s]]) for s in Step}


@dataclass
class Preference:
    """Preference training of reflections (recipe field ``model.preference``; needs ``data.preference``).

    Each packed pair (chosen, rejected; :mod:`ftkit.data.preference`) is scored by the policy and the
    reference, and trained with :func:`dpo_loss`; ``sft`` adds that weight times the chosen reflections'
    mean CE (keeps the chosen text likely, as RPO does). Neither reference keeps a second copy of the model:
    ``init`` is the adapter as training starts (the SFT round being improved; trl's reference when it
    re-trains an adapter), its log-probabilities computed once before step 0 and kept in checkpoints;
    ``base`` is the same weights with adapters disabled, one extra no-grad forward per step. For a new
    adapter (B = 0) the two are the same model.

    Args:
        beta (float): DPO's beta (trl's default 0.1).
        sft (float): weight of the chosen reflections' CE.
        experts (list[str]): the adapter experts that train (``understanding`` / ``semantic`` /
            ``generative``); the adapter weights of the others are frozen.
        reference (str): ``init`` or ``base`` (above).
    """

    beta: float = 0.1
    sft: float = 0.0
    experts: list[str] = field(default_factory=lambda: ["understanding"])
    reference: str = "init"

    def __post_init__(self) -> None:
        if not (float(self.beta) > 0.0 and float(self.beta) != float("inf")):
            raise ValueError(f"Preference.beta must be a finite number > 0, got {self.beta!r}")
        if not float(self.sft) >= 0.0:
            raise ValueError(f"Preference.sft must be >= 0, got {self.sft!r}")
        if self.reference not in ("init", "base"):
            raise ValueError(f"Preference.reference {self.reference!r}: choose init or base")
        self.experts = list(self.experts)
        if not self.experts:
            raise ValueError("Preference.experts must name at least one expert")
