"""BagelOutput.flow: the typed VAE-token table the consistency losses read; loss-path value checks."""

import pytest
import torch

from ftkit.data.packer import pack
from ftkit.models.bagel import FlowLatents
from ftkit.models.release import build_random_bagel, tiny_bagel_config
from ftkit.segments import Kind, Segment, Step
from ftkit.testing import pack_config_for
from ftkit.train import losses as Ls

SPECIAL = {"bos_id": 1, "eos_id": 2, "start_of_image": 3, "end_of_image": 4}


@pytest.fixture(scope="module")
def model():
    cfg = tiny_bagel_config(vocab_size=64, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, special_ids=SPECIAL)
    m = build_random_bagel(cfg, seed=0)
    torch.nn.init.normal_(m.llm2vae.weight, std=0.1)  # zero-initialised upstream
    return m


def _img(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_flow_is_the_vae_token_table_and_feeds_the_losses(model):
    flagged = torch.zeros(32, 32, dtype=torch.bool)
    flagged[:16, :16] = True
    segs = [Segment(Kind.TEXT, Step.PLAN, text_ids=[10, 11], loss=True),
            Segment(Kind.VAE_CLEAN, Step.DRAFT, image=_img(32, 32, 0)),
            Segment(Kind.TEXT, Step.REFLECT, text_ids=[12], loss=True),
            Segment(Kind.VAE_NOISY, Step.REFINE, image=_img(32, 32, 1), loss=True, region_mask=flagged, pair_with=1,
                    timestep_logit=0.5)]
    batch = pack([segs], pack_config_for(model.cfg))
    clean = torch.randn(8, model.cfg.patch_latent_dim)
    out = model(batch, clean_latent_tokens=clean)
    f = out.flow
    assert isinstance(f, FlowLatents)
    assert torch.equal(f.clean, clean) and f.rows.tolist() == [4, 5, 6, 7]
    assert torch.allclose(f.noisy, (1 - f.timesteps[:, None]) * clean + f.timesteps[:, None] * out.extras["flow_noise"])
    assert f.timesteps[:4].abs().max() == 0 and (f.timesteps[4:] > 0).all()  # clean draft at t = 0
    v = out.velocity_pred
    sp = Ls.spatial_consistency_from_batch(batch, f, f.rows, v)
    x0_hat = f.noisy[4:] - f.timesteps[4:, None] * v
    keep = torch.tensor([False, True, True, True])  # token (0, 0) flagged
    want = ((x0_hat - clean[:4]) ** 2).sum(-1)[keep].sum() / (3 * model.cfg.patch_latent_dim)
    torch.testing.assert_close(sp, want)
    torch.testing.assert_close(Ls.semantic_consistency_from_batch(batch, f, f.rows, v),
                               ((x0_hat - clean[4:]).mean(0) ** 2).mean())
    with pytest.raises(TypeError, match="BagelOutput.flow"):  # one typed input, no string-keyed extras
        Ls.spatial_consistency_from_batch(batch, out.extras, f.rows, v)
    bad = FlowLatents(clean=f.clean[:7], noisy=f.noisy, timesteps=f.timesteps, rows=f.rows)
    with pytest.raises(ValueError, match=r"flow\.clean .*must be \[8, 64\]"):
        Ls.spatial_consistency_from_batch(batch, bad, f.rows, v)


def test_region_noise_redraws_only_the_flagged_tokens(model):
    """region_noise: the refinement is noised under its region only; elsewhere its input is the draft's clean
    latent at t = 0 and it has no flow loss. An image without a region mask is noised as before."""
    flagged = torch.zeros(32, 32, dtype=torch.bool)
    flagged[:16, :16] = True  # token (0, 0) of a 2 x 2 grid
    segs = [Segment(Kind.TEXT, Step.PLAN, text_ids=[10, 11], loss=True),
            Segment(Kind.VAE_CLEAN, Step.DRAFT, image=_img(32, 32, 0)),
            Segment(Kind.TEXT, Step.REFLECT, text_ids=[12], loss=True),
            Segment(Kind.VAE_NOISY, Step.REFINE, image=_img(32, 32, 1), loss=True, region_mask=flagged, pair_with=1)]
    plain = [Segment(Kind.TEXT, Step.PLAN, text_ids=[13], loss=True),
             Segment(Kind.VAE_NOISY, Step.DRAFT, image=_img(32, 32, 2), loss=True)]
    batch = pack([segs, plain], pack_config_for(model.cfg))
    clean = torch.randn(12, model.cfg.patch_latent_dim)
    noise = torch.randn(12, model.cfg.patch_latent_dim)
    out = model(batch, clean_latent_tokens=clean, flow_noise=noise, region_noise=True)
    f, t = out.flow, out.flow.timesteps
    assert t[:4].abs().max() == 0 and t[4] > 0 and t[5:8].abs().max() == 0 and (t[8:] > 0).all()
    assert torch.equal(f.noisy[5:8], clean[1:4])  # outside the region: the draft, not the refinement's own latent
    torch.testing.assert_close(f.noisy[4], (1 - t[4]) * clean[4] + t[4] * noise[4])
    torch.testing.assert_close(f.noisy[8:], (1 - t[8:, None]) * clean[8:] + t[8:, None] * noise[8:])
    assert f.rows.tolist() == [4, 8, 9, 10, 11] and out.extras["mse_keep"].tolist() == [True, False, False, False,
                                                                                          True, True, True, True]
    torch.testing.assert_close(out.velocity_target, noise[[4, 8, 9, 10, 11]] - clean[[4, 8, 9, 10, 11]])
    assert out.velocity_pred.shape == (5, model.cfg.patch_latent_dim)
    # off: every token of the refinement is noised and carries the loss
    off = model(batch, clean_latent_tokens=clean, flow_noise=noise)
    assert (off.flow.timesteps[4:8] > 0).all() and off.flow.rows.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_no_vae_image_no_flow(model):
    batch = pack([[Segment(Kind.TEXT, Step.PLAN, text_ids=[10, 11, 12], loss=True)]], pack_config_for(model.cfg))
    out = model(batch)
    assert out.flow is None and out.velocity_pred.shape == (0, model.cfg.patch_latent_dim)


def test_value_checks_on_cpu_always_elsewhere_only_when_debugging(monkeypatch):
    monkeypatch.delenv("FTKIT_DEBUG_CHECKS", raising=False)
    on_meta = torch.empty(3, device="meta")
    assert Ls.value_checks(torch.zeros(3)) and not Ls.value_checks(on_meta)
    monkeypatch.setenv("FTKIT_DEBUG_CHECKS", "1")
    assert Ls.value_checks(on_meta)
    monkeypatch.setenv("FTKIT_DEBUG_CHECKS", "0")
    assert not Ls.value_checks(on_meta)
    with pytest.raises(ValueError, match=r"label 9 at position 1 is outside \[0, 5\)"):
        Ls.per_token_ce(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"step_ids must lie in \[0, 6\)"):
        Ls.step_breakdown(torch.rand(2), torch.tensor([1, 7]))


def test_step_breakdown_weights_by_table_and_means_per_step():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    steps = torch.tensor([4, 1, 4, 0, 1])
    total, per = Ls.step_breakdown(values, steps, {4: 3.0, 1: 0.0})
    assert total.item() == pytest.approx((3 * 1 + 0 * 2 + 3 * 3 + 4 + 0 * 5) / 5)
    assert {s: v.item() for s, v in per.items()} == {0: 4.0, 1: 3.5, 4: 2.0}
