"""Benchmark: where a tiny-pretrain step's time goes, and packed attention as one dense mask vs per sample.

    python bench/bench_pretrain_step.py [--model data/tiny-backbone] [--steps 9] [--profile] [--no-write]

The tiny backbone's pretraining packs ~1,000 tokens of 5-10 short samples (text-to-image, captioning,
judging). One joint attention over the pack with a dense L x L mask spends most of its work on pairs of
different samples, all masked (the CPU kernels do not skip masked blocks); ``AttentionSpec.grouped`` runs
the samples as a padded batch instead (``B Lmax^2`` instead of ``L^2``). This script takes real packs of
``recipes/tiny-pretrain.yaml`` and times full training steps (bf16 autocast as the recipe, forward +
losses + backward + fused AdamW), alternating the two attention layouts step by step (so load on a shared
machine hits both alike); the median of ``--steps`` steps per layout after two warm-up steps each. Before
timing, the losses of one pack under both layouts (fp32, same noise) must agree to 1e-5.

``--profile``: a ``torch.profiler`` op table of five steps of each layout (stdout only).
Results: stdout and BENCHMARKS.md section "## Tiny-pretrain step: packed attention per sample (CPU)".
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Tiny-pretrain step: packed attention per sample (CPU)"


def build(model_path: str):
    from ftkit.train.datamodule import MCoTDataModule
    from ftkit.train.module import MCoTModule
    from ftkit.train.recipe import compose, split_ftkit

    lcfg, _ = split_ftkit(compose(REPO / "recipes/tiny-pretrain.yaml"))
    m = dict(lcfg["model"], model_path=model_path)
    d = dict(lcfg["data"], model_path=model_path)
    d.pop("generate_shapes", None)
    model, dm = MCoTModule(**m), MCoTDataModule(**d)
    dm.setup("fit")
    model.configure_model()  # loads the backbone (Lightning calls it in fit)
    return model, dm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "data/tiny-backbone"))
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.chdir(REPO)  # the recipe's data paths are relative to the repository
    from ftkit.models.attention import AttentionSpec

    grouped = AttentionSpec.grouped
    layouts = {"dense mask": lambda self: None, "per sample": grouped}
    model, dm = build(args.model)
    model.train()
    it = iter(dm.train_dataloader())
    items = [next(it) for _ in range(4 + 2 * args.steps)]

    # the layouts compute the same thing: losses of one pack, fp32, same noise
    losses = {}
    for name, fn in layouts.items():
        AttentionSpec.grouped = fn
        torch.manual_seed(0)
        with torch.no_grad():
            losses[name] = float(model.compute_losses(items[0])[0])
    diff = abs(losses["dense mask"] - losses["per sample"])
    if diff > 1e-5:
        print(f"layouts disagree: {losses}", file=sys.stderr)
        return 1

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step(item) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.compute_losses(item)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {n: [] for n in layouts}
    for i, item in enumerate(items):
        name = list(layouts)[i % 2]
        AttentionSpec.grouped = layouts[name]
        dt = step(item)
        if i >= 4:
            times[name].append(dt)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in layouts.items():
            AttentionSpec.grouped = fn
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for item in items[4:9]:
                    step(item)
            print(f"--- {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    AttentionSpec.grouped = grouped

    # pack statistics: samples per pack and the attention work of each layout
    stats = []
    for item in items[4:]:
        b = item.batch
        spec = AttentionSpec.from_splits(b.attention, b.sequence_length)
        r = spec.ranges or ((0, b.sequence_length),)
        lm = max(e - s for s, e in r)
        stats.append((b.sequence_length, len(r), lm, len(r) * lm * lm / b.sequence_length ** 2))
    tokens = statistics.mean(s[0] for s in stats)
    med = {n: statistics.median(v) for n, v in times.items()}
    rows = ["| attention | s/step (median) | tokens/s | steps |", "|---|---:|---:|---:|"]
    for n in layouts:
        rows.append(f"| {n} | {med[n]:.3f} | {tokens / med[n]:.0f} | {len(times[n])} |")
    load = os.getloadavg()[0]
    body = "\n".join([
        f"`python bench/bench_pretrain_step.py --steps {args.steps}` on {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.date.today()}; load average at the "
        f"end {load:.1f}. Model `{Path(args.model).name}`; real packs of `recipes/tiny-pretrain.yaml` (bf16 autocast, "
        "forward + losses + backward + fused AdamW), the two layouts alternating step by step.",
        "",
        f"Packs: {tokens:.0f} tokens, {statistics.mean(s[1] for s in stats):.1f} samples, longest sample "
        f"{statistics.mean(s[2] for s in stats):.0f} tokens on average; per-sample attention work = "
        f"{statistics.mean(s[3] for s in stats):.2f} of the dense mask's. Step-0 losses (fp32, same noise): "
        f"{losses['dense mask']:.6f} vs {losses['per sample']:.6f} (diff {diff:.1e}).",
        "",
        *rows,
        "",
        f"Per-sample attention: {med['dense mask'] / med['per sample']:.2f}x the dense-mask step's speed.",
    ])
    print(body)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
