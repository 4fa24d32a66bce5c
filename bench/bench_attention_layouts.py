"""Benchmark: attention layouts on CPU -- the kernel facts behind ``RowLayout``, and the sampler with it.

    python bench/bench_attention_layouts.py [--model data/tiny-backbone] [--prompts 20] [--steps 20] [--no-write]

1. Kernel: torch SDPA forward and backward (GQA 4 query / 2 KV heads, head size 32, bool mask) on ten
   147-token rows (a tiny-pretrain pack as a padded batch of its samples) and on one 946-token row (the
   same pack under one dense mask), fp32 and bf16; median of 10 after 3 warm-ups.
2. Sampler: ``generate_images`` for ``--prompts`` prompts x 2 guidance branches (text CFG), ``--steps``
   timesteps, on the shipped backbone, with (a) 4 branches per decoder call under one dense mask (the
   ablation's default before RowLayout), (b) every branch in one call under one dense mask, (c) every
   branch in one call as rows of a padded batch (RowLayout, the default now). The three layouts alternate,
   twice; the images must agree to 1e-4.

Results: stdout and BENCHMARKS.md section "## Attention layouts on CPU (kernel and sampler)".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Attention layouts on CPU (kernel and sampler)"


def kernel_ms(batch: int, length: int, dtype: torch.dtype) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, length, 32, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, 2, length, 32, generator=g).to(dtype).requires_grad_()
    v = torch.randn(batch, 2, length, 32, generator=g).to(dtype).requires_grad_()
    mask = (torch.rand(batch, 1, length, length, generator=g) > 0.5) | torch.eye(length, dtype=torch.bool)
    fwd, bwd = [], []
    for i in range(13):
        t0 = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        t1 = time.perf_counter()
        out.sum().backward()
        t2 = time.perf_counter()
        if i >= 3:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return 1e3 * statistics.median(fwd), 1e3 * statistics.median(bwd)


def sampler_seconds(model_path: str, n_prompts: int, steps: int) -> dict[str, list[float]]:
    from ftkit.infer.context import GuidanceContexts
    from ftkit.infer.load import load_for_inference
    from ftkit.infer.sampler import generate_images, latent_grid
    from ftkit.models.attention import RowLayout

    model, tok = load_for_inference(model_path)[:2]
    words = ["a red cross", "two rings", "a blue square", "three circles", "a ring left of a cross"]
    gcs = []
    for i in range(n_prompts):
        g = GuidanceContexts(model)
        g.add_user_text(tok.encode(f"a photo of {words[i % len(words)]}", add_special_tokens=False))
        gcs.append(g)
    hw = (64, 64)
    gh, gw = latent_grid(model, hw)
    eps = [torch.randn(gh * gw, model.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(i))
           for i in range(n_prompts)]
    work = RowLayout.work
    layouts = {"4 branches a call, dense mask": (4, True), "all in one call, dense mask": (True, True),
               "all in one call, RowLayout": (True, False)}
    times: dict[str, list[float]] = {n: [] for n in layouts}
    ref = None
    try:
        for _ in range(2):
            for name, (packed, dense) in layouts.items():
                RowLayout.work = (lambda self: 10**15) if dense else work  # never worth it -> the dense mask
                t = time.perf_counter()
                out = generate_images(model, [g.cond for g in gcs], [g.uncond_text for g in gcs],
                                      [g.uncond_img for g in gcs], hw=hw, init_noise=eps, packed=packed,
                                      num_timesteps=steps)
                times[name].append(time.perf_counter() - t)
                ref = out if ref is None else ref
                diff = max(float((a - b).abs().max()) for a, b in zip(out, ref))
                if diff > 1e-4:
                    raise SystemExit(f"{name}: images differ from the first layout's by {diff:.2e}")
    finally:
        RowLayout.work = work
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "data/tiny-backbone"))
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    krows = ["| layout | dtype | forward ms | backward ms |", "|---|---|---:|---:|"]
    for batch, length, what in ((10, 147, "10 rows x 147 (per sample)"), (1, 946, "1 row x 946 (dense mask)")):
        for dt in (torch.float32, torch.bfloat16):
            f, b = kernel_ms(batch, length, dt)
            krows.append(f"| {what} | {str(dt).split('.')[-1]} | {f:.1f} | {b:.1f} |")
    times = sampler_seconds(args.model, args.prompts, args.steps)
    srows = ["| sampler layout | seconds (each run) | median |", "|---|---|---:|"]
    for name, ts in times.items():
        srows.append(f"| {name} | {' / '.join(f'{t:.2f}' for t in ts)} | {statistics.median(ts):.2f} |")
    body = "\n".join([
        f"`python bench/bench_attention_layouts.py --prompts {args.prompts} --steps {args.steps}` on "
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.date.today()}; load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "Kernel (SDPA, 4 query / 2 KV heads of 32, bool mask, median of 10):",
        "",
        *krows,
        "",
        f"Sampler (`generate_images`, {args.prompts} prompts x 2 guidance branches, {args.steps} timesteps, model "
        f"`{Path(args.model).name}`; images equal to 1e-4 across layouts):",
        "",
        *srows,
    ])
    print(body)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
