"""Where a LoRA training step's time goes on CPU, by op, and one layer's attention by SDPA backend.

    python bench/profile_lora_step.py [--dtype bf16|fp32] [--workdir DIR]

1. The model and packed batch of ``bench/bench_train_cpu.py`` (BAGEL-architecture, hidden 512, 12 layers x 2
   experts, one 1,052-token MCoT-shaped sample) with its LoRA config: two warm-up steps, four timed steps,
   then two steps under ``torch.profiler`` (the table of the top ops by self CPU time: ``aten::mm`` for the
   GEMMs, ``_scaled_dot_product_flash_attention_for_cpu[_backward]`` for attention, ``aten::copy_`` for dtype
   casts).
2. One decoder layer's attention alone at the same shape (8 query heads, 2 KV heads, d 64, 1,052 tokens,
   causal with three bidirectional image blocks), forward + backward, CPU flash kernel vs the math path,
   fp32 and bf16 (best of 5 after 2 warm-ups).

Results go to stdout (BENCHMARKS.md, "Training step on CPU", quotes them with machine and date).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_cpu as B  # noqa: E402


def profile_step(dtype_name: str, workdir: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    import ftkit.models.kernels as kernels
    from ftkit.adapters.attach import attach_adapters
    from ftkit.adapters.config import AdapterConfig
    from ftkit.data.packer import pack
    from ftkit.models.loading import load_bagel
    from ftkit.testing import pack_config_for
    from ftkit.train import losses as Ls

    if not os.path.exists(os.path.join(workdir, "ema.safetensors")):
        B.build_release(workdir, B.MODEL)
    torch.manual_seed(0)
    kernels.set_backend("torch")
    model = load_bagel(workdir, dtype=B.DTYPES[dtype_name])
    attach_adapters(model, AdapterConfig(**B.LORA))  # LoRA A/B in fp32 on a bf16 base, as ftkit trains
    model.train()
    model.vae.eval()
    cfg = model.cfg
    batch = pack([B.make_segments(cfg.llm.vocab_size, cfg.start_of_image)], pack_config_for(cfg))
    g = torch.Generator().manual_seed(1)
    ds, zc = model.vae.downsample, model.vae.z_channels
    eps = [torch.randn(zc, im.shape[1] // ds, im.shape[2] // ds, generator=g) for im in batch.vae_images]
    noise = torch.randn(batch.vae_token_indexes.numel(), cfg.patch_latent_dim, generator=g)
    head = model.language_model.lm_head.weight
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def step() -> float:
        out = model(batch, flow_noise=noise, vae_posterior_eps=eps, attn_impl="sdpa")
        loss = (Ls.per_token_ce(out.ce_hidden, head, batch.ce_labels).mean()
                + Ls.flow_mse_per_token(out.velocity_pred, out.velocity_target).mean())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2):
        step()
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"LoRA {dtype_name}: step s {', '.join(f'{t:.2f}' for t in sorted(times))}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    print("two steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def _attend(backend, q, k, v, mask) -> None:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out.sum().backward()


def attention_layer() -> None:
    from torch.nn.attention import SDPBackend

    L, H, Hk, d = 1052, 8, 2, 64
    mask = torch.ones(L, L).tril().bool()
    for a, b in ((96, 352), (480, 736), (736, 992)):  # the ViT image and the two VAE images: bidirectional
        mask[a:b, a:b] = True
    for dtype in (torch.float32, torch.bfloat16):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            q = torch.randn(1, H, L, d, dtype=dtype, requires_grad=True)
            k = torch.randn(1, Hk, L, d, dtype=dtype, requires_grad=True)
            v = torch.randn(1, Hk, L, d, dtype=dtype, requires_grad=True)

            for _ in range(2):
                _attend(backend, q, k, v, mask)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                _attend(backend, q, k, v, mask)
                best = min(best, time.perf_counter() - t0)
            gflop = 3 * 4 * L * L * d * H / 1e9  # dense forward + backward
            print(f"attention layer {str(dtype).removeprefix('torch.')} {backend.name}: {best * 1e3:.1f} ms fwd+bwd "
                  f"({gflop / best:.0f} dense GFLOP/s)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=sorted(B.DTYPES))
    ap.add_argument("--workdir", default=None, help="where the random model is saved (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.workdir:
        profile_step(a.dtype, a.workdir)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            profile_step(a.dtype, tmp)
    attention_layer()


if __name__ == "__main__":
    main()
