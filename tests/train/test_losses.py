"""Loss terms of ftkit.train.losses on hand-computed cases and against unchunked references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ftkit.data.packer import PackConfig, pack
from ftkit.models.bagel import FlowLatents
from ftkit.segments import Kind, Segment, Step
from ftkit.train.losses import (
    LossWeights,
    flow_mse_per_token,
    kl_prior_preservation,
    per_token_ce,
    predicted_clean,
    semantic_consistency,
    semantic_consistency_from_batch,
    spatial_consistency,
    spatial_consistency_from_batch,
    step_breakdown,
)

# ------------------------------------------------------------------------------------------ CE


def test_ce_hand_computed_3_tokens_5_words():
    W = torch.eye(5)  # logits = hidden
    hidden = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],  # uniform: CE = ln 5
            [math.log(3), 0.0, 0.0, 0.0, 0.0],  # Z = 3 + 4 = 7; label 0 -> ln(7/3)
            [0.0, math.log(2), math.log(2), 0.0, 0.0],  # Z = 2 + 2 + 3 = 7; label 2 -> ln(7/2)
        ]
    )
    labels = torch.tensor([4, 0, 2])
    got = per_token_ce(hidden, W, labels, chunk_size=2)
    want = torch.tensor([math.log(5), math.log(7 / 3), math.log(7 / 2)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_ce_ignore_index_gives_zero():
    W = torch.eye(5)
    got = per_token_ce(torch.randn(3, 5), W, torch.tensor([1, -100, 3]))
    assert got[1].item() == 0.0 and got[0].item() > 0 and got[2].item() > 0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_ce_chunked_matches_unchunked_values_and_grads(chunk_size):
    N, D, V = 13, 8, 29
    h = torch.randn(N, D, requires_grad=True)
    W = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (N,))
    coef = torch.rand(N)  # non-uniform weighting so gradients are not a trivial mean

    got = per_token_ce(h, W, y, chunk_size=chunk_size)
    (coef * got).sum().backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None

    ref = F.cross_entropy(h @ W.t(), y, reduction="none")
    (coef * ref).sum().backward()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gW, W.grad, rtol=1e-5, atol=1e-6)


def test_ce_empty():
    h = torch.zeros(0, 4, requires_grad=True)
    assert per_token_ce(h, torch.randn(6, 4), torch.zeros(0, dtype=torch.long)).shape == (0,)


# ------------------------------------------------------------------------------------ flow MSE


def test_flow_mse_hand_numbers():
    v_pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    v_tgt = torch.tensor([[1.0, 0.0, 0.0], [1.0, -1.0, 2.0]])
    # row 0: (0 + 4 + 9) / 3; row 1: (1 + 1 + 4) / 3
    torch.testing.assert_close(flow_mse_per_token(v_pred, v_tgt), torch.tensor([13 / 3, 2.0]))
    assert flow_mse_per_token(v_pred.bfloat16(), v_tgt.bfloat16()).dtype == torch.float32


# ------------------------------------------------------------------------------- step breakdown


def test_step_breakdown_weighted_hand_numbers():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    steps = torch.tensor([1, 1, 2, 4])
    total, per = step_breakdown(values, steps, {1: 2.0, 2: 0.5, 3: 7.0})
    # (2*1 + 2*2 + 0.5*3 + 1*4) / 4
    assert total.item() == pytest.approx(2.875)
    assert set(per) == {1, 2, 4}
    assert per[1].item() == pytest.approx(1.5) and per[2].item() == 3.0 and per[4].item() == 4.0
    total.backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.5, 0.5, 0.125, 0.25]))


def test_step_breakdown_unit_weights_is_plain_mean():
    values = torch.rand(50)
    steps = torch.randint(0, 6, (50,))
    total, _ = step_breakdown(values, steps, {s: 1.0 for s in range(6)})
    torch.testing.assert_close(total, values.mean())
    total2, _ = step_breakdown(values, steps, None)
    torch.testing.assert_close(total2, values.mean())


def test_step_breakdown_empty_still_backprops():
    values = torch.zeros(0, requires_grad=True)
    total, per = step_breakdown(values, torch.zeros(0, dtype=torch.long), {1: 3.0})
    assert total.item() == 0.0 and per == {}
    total.backward()
    assert values.grad is not None


# ------------------------------------------------------------------------------ predicted clean


def test_predicted_clean_inverts_flow_interpolation():
    x0 = torch.randn(10, 6)
    eps = torch.randn(10, 6)
    t = torch.rand(10)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    torch.testing.assert_close(predicted_clean(x_t, t, eps - x0), x0, rtol=0, atol=1e-6)
    # a wrong velocity moves x0_hat by -t * error
    err = torch.randn(10, 6)
    torch.testing.assert_close(predicted_clean(x_t, t, eps - x0 + err), x0 - t[:, None] * err, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- spatial consistency


def test_spatial_consistency_hand_case():
    ref = torch.zeros(3, 2)
    x0_hat = torch.tensor([[1.0, 1.0], [2.0, 0.0], [100.0, -100.0]])
    keep = torch.tensor([True, True, False])
    # (1 + 1 + 4) / (C=2 * 2 kept)
    assert spatial_consistency(x0_hat, ref, keep).item() == pytest.approx(1.5)


def test_spatial_consistency_zero_when_unflagged_equal_and_flagged_ignored():
    ref = torch.randn(6, 4)
    keep = torch.tensor([True, False, True, True, False, True])
    x0_hat = ref.clone()
    x0_hat[~keep] += 5.0 * torch.randn(2, 4)
    assert spatial_consistency(x0_hat, ref, keep).item() == 0.0
    a = ref + 0.3
    b = a.clone()
    b[~keep] = torch.randn(2, 4) * 100
    torch.testing.assert_close(spatial_consistency(a, ref, keep), spatial_consistency(b, ref, keep))
    x = torch.randn(6, 4, requires_grad=True)
    spatial_consistency(x, ref, torch.zeros(6, dtype=torch.bool)).backward()  # nothing kept: 0, still on graph
    assert x.grad.abs().sum().item() == 0.0


# ------------------------------------------------------------------------------- batch glue

C = 3
CFG = PackConfig(bos_id=1, eos_id=2, start_of_image=3, end_of_image=4)  # VAE stride 16


def _img(h: int, w: int) -> torch.Tensor:
    return torch.rand(3, h, w) * 2 - 1


def _mcot_batch():
    """Sample 0: plan, draft (clean 2x2), reflection, refine (noisy 2x2, top-left cell flagged).
    Sample 1: draft (clean 2x2), refine on a 2x3 grid (mismatch: skipped by the spatial term)."""
    flagged = torch.zeros(32, 32, dtype=torch.bool)
    flagged[:16, :16] = True  # exactly token (0, 0)
    s0 = [
        Segment(Kind.TEXT, Step.PLAN, text_ids=[10, 11], loss=True),
        Segment(Kind.VAE_CLEAN, Step.DRAFT, image=_img(32, 32)),
        Segment(Kind.TEXT, Step.REFLECT, text_ids=[12], loss=True),
        Segment(Kind.VAE_NOISY, Step.REFINE, image=_img(32, 32), loss=True, region_mask=flagged, pair_with=1),
    ]
    s1 = [
        Segment(Kind.VAE_CLEAN, Step.DRAFT, image=_img(32, 32)),
        Segment(Kind.VAE_NOISY, Step.REFINE, image=_img(32, 48), loss=True, pair_with=0),
    ]
    batch = pack([s0, s1], CFG)
    assert batch.vae_latent_hw == [(2, 2), (2, 2), (2, 2), (2, 3)]
    assert batch.vae_pair_with == [-1, 0, -1, 2]
    assert batch.vae_region_masks[1].tolist() == [[True, False], [False, False]]
    return batch


def _flow_for(batch, x0_hat_rows: dict[int, torch.Tensor]):
    """Hand-made FlowLatents: clean latents, timesteps, x_t; v_pred chosen so x0_hat equals the given rows."""
    n_z = sum(h * w for h, w in batch.vae_latent_hw)
    clean = torch.randn(n_z, C)
    noisy = torch.tensor(batch.vae_image_noisy)[batch.vae_token_image()]
    t = torch.where(noisy, 0.5, 0.0)  # clean context images sit at t = 0
    x_t = clean + t[:, None] * torch.randn(n_z, C)
    rows = torch.tensor(sorted(x0_hat_rows))
    target = torch.stack([x0_hat_rows[int(r)] for r in rows])
    v_pred = ((x_t[rows] - target) / t[rows][:, None]).requires_grad_(True)
    return FlowLatents(clean=clean, noisy=x_t, timesteps=t, rows=rows), rows, v_pred


def test_spatial_from_batch_hand_case():
    batch = _mcot_batch()
    # refine (image 1, rows 4..7) vs its draft (image 0, rows 0..3); image 3 (rows 12..17) has a 2x3 grid
    flow, rows, _ = _flow_for(batch, {r: torch.zeros(C) for r in [*range(4, 8), *range(12, 18)]})
    clean = flow.clean
    x0_hat = {r: clean[r - 4].clone() for r in range(4, 8)}
    x0_hat[4] = x0_hat[4] + 50.0  # flagged cell (0, 0): ignored
    x0_hat[5] = x0_hat[5] + torch.tensor([1.0, 2.0, 2.0])  # ||.||^2 = 9
    for r in range(12, 18):
        x0_hat[r] = torch.randn(C)  # mismatched-grid refinement: skipped
    x_t, t = flow.noisy, flow.timesteps
    target = torch.stack([x0_hat[int(r)] for r in rows])
    v_pred = ((x_t[rows] - target) / t[rows][:, None]).requires_grad_(True)
    loss = spatial_consistency_from_batch(batch, flow, rows, v_pred)
    # kept tokens 5, 6, 7: 9 / (C=3 * 3)
    assert loss.item() == pytest.approx(1.0, abs=1e-5)
    loss.backward()
    assert v_pred.grad[0].abs().sum().item() == 0.0  # flagged token gets no gradient
    assert v_pred.grad[4:].abs().sum().item() == 0.0  # skipped image gets no gradient
    assert v_pred.grad[1].abs().sum().item() > 0


def test_spatial_from_batch_none_applicable_returns_zero_on_graph():
    batch = pack(
        [[Segment(Kind.TEXT, Step.PLAN, text_ids=[5], loss=True),
          Segment(Kind.VAE_NOISY, Step.DRAFT, image=_img(32, 32), loss=True)]],
        CFG,
    )
    flow, rows, v_pred = _flow_for(batch, {r: torch.randn(C) for r in range(4)})
    loss = spatial_consistency_from_batch(batch, flow, rows, v_pred)
    assert loss.item() == 0.0
    loss.backward()
    assert v_pred.grad is not None


def test_semantic_from_batch_hand_case():
    batch = _mcot_batch()
    flow, rows, _ = _flow_for(batch, {r: torch.zeros(C) for r in [*range(4, 8), *range(12, 18)]})
    clean, x_t, t = flow.clean, flow.noisy, flow.timesteps

    def v_for(x0_hat):
        return ((x_t[rows] - x0_hat[rows]) / t[rows][:, None]).requires_grad_(True)

    perfect = clean.clone()
    assert semantic_consistency_from_batch(batch, flow, rows, v_for(perfect)).item() == pytest.approx(0.0, abs=1e-10)
    off = clean.clone()
    off[12:18] += 0.5  # image 3 (2x3 grid) shifted by a constant: pooled error 0.5 in every cell
    loss = semantic_consistency_from_batch(batch, flow, rows, v_for(off))
    # mean over the two noisy images of (0, 0.25)
    assert loss.item() == pytest.approx(0.125, abs=1e-6)


def test_batch_glue_validates_flow():
    batch = _mcot_batch()
    flow, rows, v_pred = _flow_for(batch, {r: torch.zeros(C) for r in range(4, 8)})
    bad = dataclasses.replace(flow, timesteps=flow.timesteps[:-1])
    with pytest.raises(ValueError, match="flow.timesteps"):
        spatial_consistency_from_batch(batch, bad, rows, v_pred)
    bad = dataclasses.replace(flow, clean=torch.zeros(17, C))
    with pytest.raises(ValueError, match="flow.clean"):
        semantic_consistency_from_batch(batch, bad, rows, v_pred)
    with pytest.raises(ValueError, match="v_pred"):
        spatial_consistency_from_batch(batch, flow, rows, torch.zeros(4, C + 1))
    with pytest.raises(ValueError, match="v_pred_rows"):
        spatial_consistency_from_batch(batch, flow, rows + 100, v_pred)


# ------------------------------------------------------------------------------ KL prior


def test_kl_zero_when_identical():
    h = torch.randn(7, 4)
    W = torch.randn(11, 4)
    assert kl_prior_preservation(h, h.clone(), W, chunk_size=3).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_hand_computed_2_tokens_3_words():
    W = torch.eye(3)
    h_base = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])  # token 0: uniform
    h_ad = torch.tensor([[math.log(2), 0.0, 0.0], [1.0, 2.0, 3.0]])  # token 0: (1/2, 1/4, 1/4); token 1 same
    # KL(u || p) = sum 1/3 (ln 1/3 - ln p) = -ln 3 + (1/3) ln 2 + (2/3) ln 4
    want = (-math.log(3) + (5 / 3) * math.log(2)) / 2
    assert kl_prior_preservation(h_ad, h_base, W, chunk_size=1).item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_chunked_equals_unchunked_and_grads_only_into_adapted(temperature):
    N, D, V = 10, 6, 17
    h_base = torch.randn(N, D, requires_grad=True)
    W = torch.randn(V, D)
    grads, vals = [], []
    for chunk in (3, 1000):
        h_ad = (h_base.detach() + 0.3 * torch.randn(N, D, generator=torch.Generator().manual_seed(5))).requires_grad_()
        loss = kl_prior_preservation(h_ad, h_base, W, chunk_size=chunk, temperature=temperature)
        loss.backward()
        vals.append(loss.detach())
        grads.append(h_ad.grad)
    ref = F.kl_div(
        F.log_softmax(h_ad.detach() @ W.t() / temperature, -1),
        F.log_softmax(h_base.detach() @ W.t() / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vals[0], ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0
    assert h_base.grad is None


# ------------------------------------------------------------------------- semantic consistency


def test_semantic_zero_for_perfect_and_hand_value():
    x0 = torch.randn(4, 5)
    assert semantic_consistency(x0.clone(), x0, (2, 2), pool=2).item() == 0.0
    # 2x2 grid, one cell; error (2, 0, 0, 0, 0) on every token -> pooled (2, 0, ...) -> 4 / 5
    err = torch.zeros(4, 5)
    err[:, 0] = 2.0
    assert semantic_consistency(x0 + err, x0, (2, 2)).item() == pytest.approx(0.8)


def test_semantic_ceil_mode_edge_cells_hand_value():
    # 3x3 grid, pool 2 -> cells of 4, 2, 2, 1 tokens; error only on token (2, 2) (the lone corner cell)
    x0 = torch.zeros(9, 1)
    x = x0.clone()
    x[8, 0] = 2.0
    # cells' pooled errors: 0, 0, 0, 2 -> 4 / (4 cells * 1 channel)
    assert semantic_consistency(x, x0, (3, 3)).item() == pytest.approx(1.0)
    x = x0.clone()
    x[2, 0] = 2.0  # token (0, 2): right-edge cell of 2 tokens -> pooled error 1
    assert semantic_consistency(x, x0, (3, 3)).item() == pytest.approx(0.25)


def test_semantic_grows_monotonically_with_error():
    x0 = torch.randn(12, 4)
    d = torch.randn(12, 4)
    vals = [semantic_consistency(x0 + e * d, x0, (3, 4), pool=2).item() for e in (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)]
    assert vals[0] == 0.0
    assert all(b > a for a, b in zip(vals, vals[1:]))
    torch.testing.assert_close(torch.tensor(vals[4] / vals[3]), torch.tensor(4.0))  # quadratic


def test_semantic_invariant_to_zero_mean_high_frequency_within_cells():
    h, w, c = 4, 6, 3
    x0 = torch.randn(h * w, c)
    base_err = torch.randn(h * w, c) * 0.2
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).float().reshape(-1, 1)  # +-1, zero mean in every 2x2 cell
    hf = checker * torch.randn(1, c) * 3.0
    a = semantic_consistency(x0 + base_err, x0, (h, w))
    b = semantic_consistency(x0 + base_err + hf, x0, (h, w))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert semantic_consistency(x0 + hf, x0, (h, w)).item() == pytest.approx(0.0, abs=1e-10)
    # the same amplitude at low frequency is seen
    assert semantic_consistency(x0 + hf.abs(), x0, (h, w)).item() > 1.0


# ------------------------------------------------------------------------------ weights, errors


def test_loss_weights_step_weights():
    lw = LossWeights(steps={"plan": 2.0, "refine": 0.5})
    sw = lw.step_weights()
    assert sw[int(Step.PLAN)] == 2.0 and sw[int(Step.REFINE)] == 0.5 and sw[int(Step.DRAFT)] == 1.0
    assert set(sw) == {int(s) for s in Step}
    assert LossWeights().spatial == 0.0 and LossWeights().kl_prior == 0.0 and LossWeights().semantic == 0.0
    with pytest.raises(ValueError, match="unknown step"):
        LossWeights(steps={"planning": 1.0})
    with pytest.raises(ValueError, match="spatial"):
        LossWeights(spatial=-1.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: per_token_ce(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long)), "lm_head_weight"),
        (lambda: per_token_ce(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)), "labels"),
        (lambda: per_token_ce(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1])), "outside"),
        (lambda: per_token_ce(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3)), "integer"),
        (lambda: flow_mse_per_token(torch.randn(3, 4), torch.randn(3, 5)), "v_pred"),
        (lambda: step_breakdown(torch.randn(3), torch.zeros(4, dtype=torch.long)), "step_ids"),
        (lambda: predicted_clean(torch.randn(3, 4), torch.rand(2), torch.randn(3, 4)), "t must"),
        (lambda: spatial_consistency(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3)), "bool"),
        (lambda: spatial_consistency(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2, dtype=torch.bool)), "keep"),
        (lambda: kl_prior_preservation(torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4)), "h_base"),
        (lambda: kl_prior_preservation(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), temperature=0), "temperature"),
        (lambda: semantic_consistency(torch.randn(5, 2), torch.randn(5, 2), (2, 2)), "grid"),
        (lambda: semantic_consistency(torch.randn(4, 2), torch.randn(4, 2), (2, 2), pool=0), "pool"),
    ],
)
def test_shape_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_glue_on_a_real_tiny_bagel_forward():
    """Key names and row conventions agree with BagelModel.forward; gradients reach llm2vae."""
    from ftkit.models.release import build_random_bagel, tiny_bagel_config
    from ftkit.testing import pack_config_for

    special = {"bos_id": 1, "eos_id": 2, "start_of_image": 3, "end_of_image": 4}
    cfg = tiny_bagel_config(vocab_size=64, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, special_ids=special)
    model = build_random_bagel(cfg, seed=0)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.1)  # zero-initialised upstream
    flagged = torch.zeros(32, 32, dtype=torch.bool)
    flagged[16:, 16:] = True  # token (1, 1)
    segs = [
        Segment(Kind.TEXT, Step.PLAN, text_ids=[10, 11], loss=True),
        Segment(Kind.VAE_CLEAN, Step.DRAFT, image=_img(32, 32)),
        Segment(Kind.TEXT, Step.REFLECT, text_ids=[12], loss=True),
        Segment(Kind.VAE_NOISY, Step.REFINE, image=_img(32, 32), loss=True, region_mask=flagged, pair_with=1,
                timestep_logit=0.0),
    ]
    batch = pack([segs], pack_config_for(cfg))
    clean_tokens = torch.randn(8, cfg.patch_latent_dim)
    out = model(batch, clean_latent_tokens=clean_tokens)
    ex, rows, v = out.flow, out.flow.rows, out.velocity_pred
    assert rows.tolist() == [4, 5, 6, 7]

    sp = spatial_consistency_from_batch(batch, ex, rows, v)
    x0_hat = ex.noisy[4:8] - ex.timesteps[4:8, None] * v
    keep = torch.tensor([True, True, True, False])
    want = ((x0_hat - clean_tokens[:4]) ** 2).sum(-1)[keep].sum() / (3 * cfg.patch_latent_dim)
    torch.testing.assert_close(sp, want)
    se = semantic_consistency_from_batch(batch, ex, rows, v)
    want_se = ((x0_hat - clean_tokens[4:]).mean(0) ** 2).mean()  # a 2x2 grid is one 2x2 cell
    torch.testing.assert_close(se, want_se)
    (sp + se).backward()
    assert model.llm2vae.weight.grad.abs().sum() > 0
