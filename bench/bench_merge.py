"""Benchmark: peak RAM of ``ftkit merge`` (streaming) on a BAGEL-shaped checkpoint at full 7B width.

    python bench/bench_merge.py [--workdir /tmp/ftkit-bench-merge] [--layers 2] [--rebuild] [--no-naive] [--no-write]

1. Builds once (cached) the BAGEL-shaped release folder of bench/bench_load.py (full 7B width: hidden
   3584, intermediate 18944, vocab 152064, 2 experts; SigLIP so400m width; reduced depth; full FLUX VAE;
   random bf16), written tensor by tensor by that file's streaming writer.
2. Builds a rank-64 / alpha-128 ``generative`` adapter (the ``_moe_gen`` attention + MLP projections,
   Flow-GRPO's public setting) with random non-zero A and B, through ftkit's own attach / save path
   (the model is built on the meta device; only the adapter tensors are materialised).
3. In a fresh child process each (bench/_mem.py): the streaming merge to one ema.safetensors, the
   streaming merge to 1 GB shards + index, and (reference) the non-streaming way -- safetensors
   ``load_file`` of the whole base, merge, ``save_file``. Reported: wall time, peak RSS (VmHWM) and
   peak minus the post-import baseline, against the largest tensor's bytes plus the adapter's bytes.
4. Writes the table into BENCHMARKS.md, section "## Streaming merge".
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mem import run_in_child  # noqa: E402
from _report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Streaming merge"
GB = 1e9
PREIMPORT = ("torch", "ftkit.adapters.merge", "ftkit.adapters.io", "ftkit.models.release", "tqdm.auto")


def build_base(folder: Path, layers: int, rebuild: bool) -> Path:
    """bench_load's checkpoint builder (same shape, ``layers`` decoder layers)."""
    import bench_load

    bench_load.BENCH_SHAPE["llm"]["num_hidden_layers"] = layers
    return bench_load.build_checkpoint(folder, rebuild)


def build_adapter(base: Path, out: Path, r: int = 64, alpha: float = 128.0, seed: int = 0) -> Path:
    """A generative-preset adapter for ``base`` with random A, B (model on meta; only LoRA tensors real)."""
    import torch.nn as nn

    from ftkit.adapters import AdapterConfig, attach_adapters, save_adapter
    from ftkit.adapters.attach import adapter_state_dict
    from ftkit.models.bagel import BagelModel
    from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig

    llm = LLMConfig.from_json(base / "llm_config.json")
    vit = ViTConfig.from_json(base / "vit_config.json")
    shape = json.loads((base / "bench_shape.json").read_text())
    cfg = BagelConfig(llm=llm, vit=vit, max_latent_size=shape["max_latent_size"],
                      vit_max_num_patch_per_side=shape["vit_max_num_patch_per_side"])
    with torch.device("meta"):
        model = BagelModel(cfg)
    acfg = AdapterConfig(preset="generative", r=r, alpha=alpha)
    attach_adapters(model, acfg)
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in adapter_state_dict(model):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        t = torch.randn(params[name].shape, generator=g) * (0.01 if ".lora_A." in name else 0.001)
        mod._parameters[attr] = nn.Parameter(t)
    return save_adapter(model, acfg, out, base_path=base, overwrite=True,
                        extra={"recipe": "bench_merge", "note": "random adapter, not trained"})


def child_merge(base: str, adapter: str, out: str, max_shard_size: str | None = None) -> dict:
    from ftkit.adapters.merge import merge

    rep = merge(base, adapter, out, dtype=torch.bfloat16, max_shard_size=max_shard_size, overwrite=True, verify=False)
    return {"files": len(rep.files), "sharded": rep.sharded, "merged": rep.merged, "total_bytes": rep.total_bytes}


def child_naive(base: str, adapter: str, out: str) -> dict:
    """Reference: whole base in memory (safetensors load_file), merge, save_file."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(Path(base) / "ema.safetensors"))
    ad = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    peft_cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    scale = peft_cfg["lora_alpha"] / peft_cfg["r"]
    for k, a in ad.items():
        if ".lora_A." in k:
            mod = k.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = ad[k.replace(".lora_A.", ".lora_B.")]
            w = sd[mod + ".weight"]
            sd[mod + ".weight"] = (w.float() + scale * b.float() @ a.float()).to(w.dtype)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(sd, str(Path(out) / "ema.safetensors"))
    return {"merged": sum(".lora_A." in k for k in ad)}


def header_stats(path: Path) -> dict:
    from ftkit.models.loading import SafetensorsFile

    st = SafetensorsFile(path)
    nbytes = {k: nb for k, (_, _, _, nb) in st.entries.items()}
    big = max(nbytes, key=nbytes.get)
    return {"largest_name": big, "largest_bytes": nbytes[big], "n": len(nbytes), "bytes": sum(nbytes.values())}


def main(argv: list[str] | None = None) -> None:
    import bench_load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/ftkit-bench-merge")
    ap.add_argument("--layers", default="2,6", help="decoder depths of the full-width checkpoints (comma list)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-naive", action="store_true", help="skip the non-streaming reference run")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    ap.add_argument("--benchmarks", default=str(REPO / "BENCHMARKS.md"))
    a = ap.parse_args(argv)

    work = Path(a.workdir)
    depths = [int(x) for x in a.layers.split(",")]
    rows, info = [], []
    for depth in depths:
        t0 = time.perf_counter()
        base = build_base(work / f"bagel-7b-width-{depth}layers", depth, a.rebuild)
        adapter = build_adapter(base, work / f"adapter-gen-r64-{depth}layers")
        print(f"base + adapter ({depth} layers) ready in {time.perf_counter() - t0:.0f} s", flush=True)
        hs = header_stats(base / "ema.safetensors")
        ad_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        targets = json.loads((adapter / "ftkit_adapter.json").read_text())["base"]["fingerprint"]["targets"]
        largest_target = max(math.prod(s) for s in targets.values()) * 2
        ref_bytes = hs["largest_bytes"] + ad_bytes
        info.append(dict(depth=depth, hs=hs, ad_bytes=ad_bytes, n_targets=len(targets), largest_target=largest_target))
        print(f"base ema.safetensors {hs['bytes'] / GB:.2f} GB ({hs['n']} tensors), largest tensor {hs['largest_name']} "
              f"{hs['largest_bytes'] / GB:.3f} GB; adapter {ad_bytes / 1e6:.1f} MB ({len(targets)} projections)",
              flush=True)
        runs = [("streaming, one ema.safetensors", "single", child_merge, (None,)),
                ("streaming, 1GB shards + index", "shards", child_merge, ("1GB",))]
        if not a.no_naive and depth == depths[0]:
            runs.append(("reference: load_file whole base, merge, save_file", "naive", child_naive, ()))
        for label, tag, fn, extra in runs:
            out = work / f"merged-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_in_child(fn, str(base), str(adapter), str(out), *extra, preimport=PREIMPORT)
            out_bytes = sum(p.stat().st_size for p in out.iterdir()
                            if p.suffix == ".safetensors" and p.name != "ae.safetensors")
            files = sorted(p.name for p in out.iterdir())
            shutil.rmtree(out, ignore_errors=True)
            row = dict(label=label, depth=depth, base_gb=hs["bytes"] / GB, ad_mb=ad_bytes / 1e6, wall=r["wall_s"],
                       base=r["baseline_rss"], peak=r["peak_rss"], net=r["peak_rss"] - r["baseline_rss"],
                       gbps=(hs["bytes"] + out_bytes) / r["wall_s"] / GB)
            row["ratio"] = row["net"] / ref_bytes
            rows.append(row)
            print(f"{label}: {row['wall']:.1f} s, peak RSS {row['peak'] / GB:.2f} GB (baseline {row['base'] / GB:.2f}, "
                  f"net {row['net'] / GB:.3f}), net / (largest + adapter) {row['ratio']:.3f}; {len(files)} files",
                  flush=True)

    m = bench_load.machine_info()
    big = info[0]["hs"]
    lines = [
        "`python bench/bench_merge.py` merges a rank-64 / alpha-128 `generative` LoRA adapter (the `_moe_gen` "
        "attention and MLP projections, 7 per layer; random non-zero A and B, fp32) into BAGEL-shaped release "
        f"folders at full 7B width with {' and '.join(str(d) for d in depths)} decoder layers x 2 experts "
        "(bench/bench_load.py's checkpoint: hidden 3584, intermediate 18944, vocab 152064, SigLIP so400m width with "
        "2 layers), bf16 in and out, no verification. Each run is a fresh child process; *peak* is its VmHWM, "
        "*baseline* its RSS after importing torch and ftkit, *net* = peak - baseline.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM (shared with other jobs: wall times are "
        f"noisy); {m['date']}; Python {m['python']}, torch {m['torch']}, safetensors {m['safetensors']}.",
        "",
        f"Largest tensor `{big['largest_name']}` {big['largest_bytes'] / GB:.3f} GB (bf16); largest merged projection "
        f"{info[0]['largest_target'] / GB:.3f} GB (bf16).",
        "",
        "| merge | layers | base GB | adapter MB | wall s | GB/s (read + written) | baseline RSS GB | peak RSS GB "
        "| net GB | net / (largest tensor + adapter) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['depth']} | {r['base_gb']:.2f} | {r['ad_mb']:.1f} | {r['wall']:.1f} | "
                     f"{r['gbps']:.2f} | {r['base'] / GB:.2f} | {r['peak'] / GB:.2f} | {r['net'] / GB:.3f} | "
                     f"{r['ratio']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if not a.no_write:
        write_section(Path(a.benchmarks), SECTION, table + "\n\n" + NOTES)
        print(f"\nwrote section '{SECTION}' of {a.benchmarks}")


NOTES = """\
How the streaming merge stays small: the output header is computed from the base's header, then each
tensor is read with positioned reads (no memory map, so no file pages are charged to the process) in
blocks of at most 64 MiB of fp32 -- a block of rows for a merged projection (W' = W + s B A and DoRA's
row norm are row-local), a block of elements for a copied or cast tensor -- and written at once. Peak
RAM is the adapter (held whole, fp32) plus a fixed few hundred MB (blocks, allocator slack, library code
first touched by the merge), whatever the largest tensor or the depth: the net peak stayed at 0.35-0.44 GB
over repeated runs at 2 and 6 layers (base 4.2 -> 8.0 GB, adapter 46 -> 138 MB), a third of the largest
tensor alone. A 28-layer BAGEL-7B-MoT (14B parameters, ~29 GB bf16) with this rank-64 generative adapter
(~0.65 GB fp32) should therefore merge in about 1 GB on top of the imports (extrapolated, not measured
here), far inside 24 GB. The whole-base reference needs the full
checkpoint in RAM (its peak grows with the model). Wall time is disk-bound (each output file is fsync'ed
before the folder is renamed into place). Verification (on by default in `ftkit merge`) is not part of
these numbers: it loads base + adapter and then the merged model, one at a time, in fp32 (~4 bytes per
parameter), so on a 24 GB machine a full 7B merge is run with `--no-verify` or verified on a bigger one."""


if __name__ == "__main__":
    main()
