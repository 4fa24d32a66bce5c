"""Attention of the CPU benchmark's pack: one dense-mask SDPA call vs query blocks over their key ranges.

    python bench/attention_key_blocks.py

The pack of ``bench_train_cpu.py`` (prompt 96, ViT image 256, plan 128, noisy draft 256, clean draft 256,
reflection 60 tokens; 8 query / 2 KV heads, d 64): one layer's attention, forward + backward, timed as torch's
SDPA over the dense ``AttentionSpec`` mask, and split into blocks of 128 / 256 queries that each attend only
the keys any of their queries may see (every skipped pair is masked, so the result is the same). Medians of 7
interleaved runs, 2 threads. Issue 15 asked whether such blocks lift the bf16 MFU (BENCHMARKS.md).
"""

import time

import torch

from ftkit.models.attention import AttentionSpec, _sdpa

SPLITS = [(96, "causal"), (256, "full"), (128, "causal"), (256, "noise"), (256, "full"), (60, "causal")]


def timings(dt: torch.dtype, m: torch.Tensor, first: list[int], last: list[int]) -> dict[str, float]:
    """Median ms of each layout, forward + backward, in dtype ``dt``."""
    n = m.shape[0]
    q = torch.randn(8, n, 64, dtype=dt, requires_grad=True)
    k = torch.randn(2, n, 64, dtype=dt, requires_grad=True)
    v = torch.randn(2, n, 64, dtype=dt, requires_grad=True)

    def blocked(segs, masks):
        return torch.cat([_sdpa(q[:, a:b], k[:, k0:k1], v[:, k0:k1], mm, 0.125)
                          for (a, b, k0, k1), mm in zip(segs, masks)], 1)

    runs = {"dense": lambda: _sdpa(q, k, v, m, 0.125)}
    for block in (128, 256):
        segs = [(a, min(n, a + block), min(first[a:a + block]), max(last[a:a + block])) for a in range(0, n, block)]
        masks = [m[a:b, k0:k1].contiguous() for a, b, k0, k1 in segs]
        share = sum((b - a) * (k1 - k0) for a, b, k0, k1 in segs) / n / n
        runs[f"blocks of {block} ({share:.2f} of the pairs)"] = lambda segs=segs, masks=masks: blocked(segs, masks)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(7):
        for name, f in runs.items():
            t = time.perf_counter()
            f().float().sum().backward()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(x)[3] * 1000 for name, x in times.items()}


def main() -> int:
    torch.set_num_threads(2)
    splits, n = [], 0
    for length, mode in SPLITS:
        splits.append((n, n + length, mode, 0))
        n += length
    m = AttentionSpec.from_splits(splits, n).dense()
    idx = torch.arange(n)
    first = torch.where(m, idx, n).amin(1).tolist()
    last = (torch.where(m, idx, -1).amax(1) + 1).tolist()
    for dt in (torch.float32, torch.bfloat16):
        ms = timings(dt, m, first, last)
        print(str(dt).replace("torch.", ""), "  ".join(f"{k}: {x:.1f} ms" for k, x in ms.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
