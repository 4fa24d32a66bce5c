"""Kernel paths: the torch reference path on CPU; Liger vs torch parity when CUDA (and liger-kernel) exist."""

import pytest
import torch
import torch.nn.functional as F

from ftkit.data.packer import pack
from ftkit.models import kernels
from ftkit.models.release import build_random_bagel, tiny_ae_config, tiny_bagel_config
from ftkit.segments import Kind, Segment
from ftkit.testing import pack_config_for


def test_backend_switch_refuses_liger_without_cuda():
    if kernels.liger_available():
        pytest.skip("CUDA + liger present")
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.set_backend("liger")
    assert kernels.set_backend("auto") == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("triton")


def test_torch_path_matches_reference_ops():
    torch.manual_seed(0)
    x, w = torch.randn(5, 7, 16), torch.rand(16) + 0.5
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.allclose(kernels.rms_norm(x, w, 1e-6), ref, atol=1e-6)
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(kernels.silu_mul(g, u), F.silu(g) * u)
    h, W, y = torch.randn(50, 16, requires_grad=True), torch.randn(300, 16), torch.randint(0, 300, (50,))
    ce = kernels.linear_cross_entropy(h, W, y, chunk_size=7)
    assert torch.allclose(ce, F.cross_entropy(h @ W.t(), y, reduction="none"), atol=1e-5)


def _batch(cfg, device):
    g = torch.Generator().manual_seed(0)
    segs = [Segment(Kind.TEXT, text_ids=torch.randint(5, 400, (12,), generator=g).tolist()),
            Segment(Kind.VIT_IMAGE, image=torch.rand(3, 28, 42, generator=g) * 2 - 1),
            Segment(Kind.TEXT, text_ids=torch.randint(5, 400, (9,), generator=g).tolist(), loss=True, end_label=403),
            Segment(Kind.VAE_NOISY, image=torch.rand(3, 32, 48, generator=g) * 2 - 1, loss=True, timestep_logit=0.2),
            Segment(Kind.VAE_CLEAN, image=torch.rand(3, 32, 48, generator=g) * 2 - 1)]
    b = pack([segs], pack_config_for(cfg))
    noise = torch.randn(b.vae_token_indexes.numel(), cfg.patch_latent_dim, generator=g)
    eps = [torch.randn(16, im.shape[1] // 8, im.shape[2] // 8, generator=g) for im in b.vae_images]
    return b.to(device), noise.to(device), [e.to(device) for e in eps]


@pytest.mark.parametrize("rows,chunk", [(37, 1024), (40, 16), (45, 20)])
def test_linear_cross_entropy_row_padding_is_invisible(rows, chunk):
    """Chunks whose row count is not a multiple of CE_ROW_ALIGN are padded with ignored zero rows: the losses
    and the gradients of hidden and weight equal the plain full-logits cross-entropy."""
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (rows,), generator=g)
    y[3] = -100
    got = kernels.linear_cross_entropy(h, w, y, chunk_size=chunk)
    assert got.shape == (rows,) and got[3] == 0
    (got * torch.arange(rows)).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy(h @ w.t(), y, reduction="none")
    (want * torch.arange(rows)).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not kernels.liger_available(), reason="needs CUDA and liger-kernel")
def test_liger_matches_torch_on_cuda():
    """Same model, same batch, fp32: hidden states, per-token CE and gradients agree across kernel paths."""
    dev = torch.device("cuda")
    cfg = tiny_bagel_config(special_ids={"bos_id": 401, "eos_id": 402, "start_of_image": 403, "end_of_image": 404})
    results = {}
    for backend in ("torch", "liger"):
        kernels.set_backend(backend)
        try:
            m = build_random_bagel(cfg, tiny_ae_config(), seed=3).to(dev)
            torch.nn.init.normal_(m.llm2vae.weight, std=0.02)
            b, noise, eps = _batch(cfg, dev)
            out = m(b, flow_noise=noise, vae_posterior_eps=eps, attn_impl="sdpa")
            ce = kernels.linear_cross_entropy(out.ce_hidden, m.language_model.lm_head.weight, b.ce_labels)
            loss = ce.mean() + (out.velocity_pred - out.velocity_target).pow(2).mean()
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()
                     if p.grad is not None and n.startswith("language_model")}
            results[backend] = (out.hidden.detach(), ce.detach(), grads)
        finally:
            kernels.set_backend("torch")
    (ht, ct, gt), (hl, cl, gl) = results["torch"], results["liger"]
    assert (ht - hl).abs().max() < 1e-4
    assert (ct - cl).abs().max() < 1e-4
    for k in gt:
        scale = gt[k].abs().max().clamp_min(1e-3)
        assert (gt[k] - gl[k]).abs().max() / scale < 1e-3, k
