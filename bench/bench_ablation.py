"""Benchmark: the shapes-world ablation (``ftkit eval shapes --ablation``) on CPU, and the evaluator.

    python bench/bench_ablation.py [--n 12] [--batch 16] [--steps 10] [--tokens 48] [--sizes 64 128]
                                   [--workdir DIR] [--no-write]

1. Evaluator: 1,000 :func:`ftkit.data.geneval.confounders` images (noise, textures, blurs, gradients at
   32/64/128 px): objects found (must be 0) and ms per image; agreement with the generator's ground
   truth on the held-out ablation seed (600 records at 64 px: every draft and refinement).
2. Ablation: a random tiny BAGEL-architecture backbone as the tiny-mcot recipe builds it
   (``ensure_tiny_bagel``: hidden 128, 4 layers x 2 experts, ~2M decoder parameters, tokenizer trained
   on the prompts) with a rank-16 generative LoRA attached (so ``base`` really switches it off), all six
   modes on the first ``--n`` held-out prompts, ``--steps`` timesteps, at most ``--tokens`` tokens per
   plan / reflection (a random model never stops early: every text runs to the limit), batched
   (``--batch``) and one prompt at a time; plus the pre-batching path (``evaluate_shapes`` direct +
   mcot, per prompt) for reference. The projection to the full run is stage seconds / n x 600 over the
   stages the five default modes need (shared stages counted once, as the run computes them).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from ftkit.adapters.attach import attach_adapters  # noqa: E402
from ftkit.adapters.config import AdapterConfig  # noqa: E402
from ftkit.data import shapes  # noqa: E402
from ftkit.data.geneval import ColorShapeDetector, confounders, evaluate_image  # noqa: E402
from ftkit.infer.ablation import (  # noqa: E402
    _STAGES,
    ABLATION_MODES,
    ABLATION_SEED,
    ALL_ABLATION_MODES,
    ablation_records,
    run_ablation,
)
from ftkit.infer.evaluate import evaluate_shapes  # noqa: E402
from ftkit.infer.mcot import SamplerSettings, TextSettings  # noqa: E402
from ftkit.models.loading import load_bagel, load_tokenizer  # noqa: E402
from ftkit.train.tiny import ensure_tiny_bagel  # noqa: E402

SECTION = "## Shapes ablation and evaluator (CPU)"
NOTE = ("Notes: one thread per process (`OMP_NUM_THREADS=1`, 2 cores shared by 8 jobs), so the projections are upper bounds for this CPU, not measurements of a quiet one. The 600-prompt x 5-mode target (<= 20 min) is met at 16 image tokens and projected at ~32 min at 64 tokens under this load; not measured on a full 600-prompt run. Batching gains 1.2-1.9x per mode here: the tiny decoder is overhead-bound (~30 ms per decoder call whatever its size), and packing many query blocks into one call makes the block-diagonal SDPA waste grow with the square of the tokens packed, so the sampler packs ~256 tokens per call (`generate_images(packed=k)`). What is left: context images (t2i-twice's first image, mcot's draft) are VAE/ViT-encoded and prefilled one prompt at a time (the `twice` and `reflect` stages), and t2i-twice's text-CFG branch equals its conditional branch (no text since the image) but is still computed.")


def bench_detector() -> dict:
    det = ColorShapeDetector()
    t0, found, n = time.perf_counter(), 0, 0
    for _, img in confounders(1000, seed=4):
        found += len(det.detect(img))
        n += 1
    ms = (time.perf_counter() - t0) / n * 1e3
    agree: dict[str, list[bool]] = {}
    for i in range(1, 601):
        rec, images = shapes.make_record(i, ABLATION_SEED, 64)
        for path, img in images.items():
            truth = path.endswith("_refine.png") or rec["meta"]["error"] is None
            agree.setdefault(rec["meta"]["tag"], []).append(evaluate_image(img, rec["meta"])[0] == truth)
    return {"confounders": n, "objects": found, "ms_per_image": ms,
            "agreement": {t: float(np.mean(v)) for t, v in agree.items()},
            "agreement_images": sum(len(v) for v in agree.values())}


def bench_ablation(workdir: Path, size: int, n: int, batch: int, steps: int, tokens: int) -> dict:
    records, folder = ablation_records(600, size=size, cache_dir=workdir)
    path = ensure_tiny_bagel(workdir / "tiny-bagel", corpus=str(folder / "records.jsonl"))
    model, tok = load_bagel(path, dtype=torch.float32), load_tokenizer(path)
    attach_adapters(model, AdapterConfig(r=16, alpha=32))
    n_dec = sum(p.numel() for n_, p in model.named_parameters() if n_.startswith("language_model"))
    kw = dict(image_hw=(size, size), sampler=SamplerSettings(num_timesteps=steps),
              text=TextSettings(max_plan_tokens=tokens, max_reflect_tokens=tokens), progress=False, n_boot=200)
    out = {"size": size, "tokens_per_image": (size // model.cfg.vae_stride) ** 2, "decoder_params": n_dec}
    for b in (batch, 1):
        t0 = time.perf_counter()
        res = run_ablation(model, tok, records[:n], modes=ALL_ABLATION_MODES, batch_size=b, **kw)
        wall = time.perf_counter() - t0
        five = {s for m in ABLATION_MODES for s in _STAGES[m]}
        out[b] = {"wall": wall, "per_prompt": res["seconds_per_prompt"], "stages": res["stage_seconds"],
                  "projected_600_five_modes_min": sum(res["stage_seconds"][s] for s in five) / n * 600 / 60}
    t0 = time.perf_counter()
    evaluate_shapes(model, tok, records[:n], modes=("direct", "mcot"), rounds=2, image_hw=(size, size),
                    sampler=kw["sampler"], text=kw["text"], progress=False)
    out["old_per_prompt"] = (time.perf_counter() - t0) / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--workdir", default="/tmp/ftkit-bench-ablation")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    det = bench_detector()
    print(det)
    runs = [bench_ablation(Path(a.workdir), s, a.n, a.batch, a.steps, a.tokens) for s in a.sizes]
    for r in runs:
        print(r)
    load = open("/proc/loadavg").read().split()[0]
    lines = [f"`python bench/bench_ablation.py --n {a.n} --batch {a.batch} --steps {a.steps} --tokens {a.tokens}` "
             "(see its docstring).", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"{datetime.date.today()}; torch {torch.__version__}; SHARED CPU (1-minute load average {load} at the "
             "end; 8 jobs on 2 cores while this ran): wall times are upper bounds.", "",
             f"Evaluator: {det['objects']} objects in {det['confounders']} confounder images "
             f"({det['ms_per_image']:.1f} ms per image); agreement with the ground truth on seed {ABLATION_SEED} "
             f"({det['agreement_images']} images): "
             + ", ".join(f"{t} {v:.3f}" for t, v in det["agreement"].items()) + ".", "",
             "| image | tokens | batch | " + " | ".join(ALL_ABLATION_MODES) + " | 600 prompts x 5 modes (min) |",
             "|---" * (len(ALL_ABLATION_MODES) + 4) + "|"]
    for r in runs:
        for b in (a.batch, 1):
            pp = r[b]["per_prompt"]
            lines.append(f"| {r['size']} px | {r['tokens_per_image']} | {b} | "
                         + " | ".join(f"{pp[m]:.3f}" for m in ALL_ABLATION_MODES)
                         + f" | {r[b]['projected_600_five_modes_min']:.1f} |")
    lines += ["", "Seconds per prompt per mode (shared stages counted in each mode that needs them). Before "
              "batching, `ftkit eval shapes` (direct + 2-round mcot, one prompt at a time): "
              + ", ".join(f"{r['size']} px {r['old_per_prompt']:.2f} s/prompt" for r in runs)
              + f". Decoder parameters: {runs[0]['decoder_params'] / 1e6:.2f} M.", "", NOTE]
    print("\n".join(lines))
    if not a.no_write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
