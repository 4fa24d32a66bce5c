"""Benchmark: peak RAM and speed of loading a BAGEL release folder (``ftkit.models.load_bagel``).

    python bench/bench_load.py [--workdir /tmp/ftkit-bench] [--rebuild] [--no-write]

1. Builds once (cached under ``--workdir``) a BAGEL-shaped release folder at FULL 7B width and reduced
   depth: Qwen2 decoder hidden 3584, intermediate 18944, 28 heads, 4 KV heads, vocab 152064, 2 layers
   (x 2 experts); SigLIP so400m width (1152 / 4304 / 16 heads) with 2 layers; max_latent_size 64, ViT
   max 70 patches per side; the full FLUX VAE. Random bf16 weights, written by streaming one tensor
   (in 16M-element chunks) at a time into the safetensors layout, so the writer never holds the model.
2. Measures the disk's own read rate: plain sequential reads of ema.safetensors after dropping it from
   the page cache (``posix_fadvise(DONTNEED)``; ``fincore`` confirms what was resident), then again warm.
3. Each in a fresh child process (bench/_mem.py): ``load_bagel(dtype=bf16)`` cold and warm cache,
   ``load_bagel(dtype=bf16, quantize="nf4")``, and, for reference, both through the previous
   memory-mapped ``safe_open(...).get_tensor`` read path. Reported: wall time, throughput (file bytes
   / wall), peak RSS (VmHWM) against the loaded model's own parameter + buffer bytes (goal <= 1.2)
   and against the file bytes.
4. Prints a Markdown table and writes it into BENCHMARKS.md, section "## Loading a BAGEL release folder".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mem import run_in_child  # noqa: E402
from _report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Loading a BAGEL release folder"
GB = 1e9
BENCH_SHAPE = {
    "llm": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064),
    "vit": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16),
    "max_latent_size": 64, "vit_max_num_patch_per_side": 70, "ae": "flux", "version": 1,
}
PREIMPORT = ("torch", "ftkit.models.loading", "ftkit.models.vae", "bitsandbytes", "diffusers.models.autoencoders")


# ----------------------------------------------------------------------------- streaming writer

def write_safetensors_streaming(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
                                metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor: ``produce(name, dtype, shape)`` yields tensors of
    ``dtype`` whose flattened concatenation is that tensor's data. Returns the file size.

    Layout: u64 little-endian header length, JSON header (space-padded to a multiple of 8), data.

    Raises:
        ValueError: ``produce`` yielded the wrong number of bytes for a tensor.
    """
    from ftkit.models.loading import ST_TAGS

    header, off = {}, 0
    for name, dt, shape in specs:
        nb = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": ST_TAGS[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(len(hb).to_bytes(8, "little"))
        fh.write(hb)
        for name, dt, shape in specs:
            want, got = math.prod(shape) * dt.itemsize, 0
            for part in produce(name, dt, shape):
                buf = part.contiguous().reshape(-1).view(torch.uint8).numpy()
                fh.write(memoryview(buf))
                got += buf.nbytes
            if got != want:
                raise ValueError(f"{path}: produced {got} bytes for {name}, expected {want}")
        fh.flush()
        os.fsync(fh.fileno())
    return path.stat().st_size


def _random_chunks(seed: int):
    g = torch.Generator().manual_seed(seed)

    def produce(name: str, dt: torch.dtype, shape: tuple[int, ...]):
        n = math.prod(shape)
        for i in range(0, n, 1 << 24):
            m = min(1 << 24, n - i)
            x = torch.randn(m, generator=g).mul_(0.02)
            if name.endswith(".weight") and ("norm" in name or len(shape) == 1):
                x.add_(1.0)
            yield x.to(dt)

    return produce


def build_checkpoint(folder: Path, rebuild: bool = False) -> Path:
    """The cached BAGEL-shaped release folder (see module doc); rebuilt when absent or of another shape."""
    from ftkit.models.bagel import BagelModel
    from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig
    from ftkit.models.release import ae_state_dict_flux, atomic_dir
    from ftkit.models.vae import AEConfig, FluxAE, build_autoencoder

    marker = folder / "bench_shape.json"
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == BENCH_SHAPE:
        return folder
    cfg = BagelConfig(llm=LLMConfig(**BENCH_SHAPE["llm"]), vit=ViTConfig(**BENCH_SHAPE["vit"]),
                      max_latent_size=BENCH_SHAPE["max_latent_size"],
                      vit_max_num_patch_per_side=BENCH_SHAPE["vit_max_num_patch_per_side"])
    with torch.device("meta"):
        model = BagelModel(cfg)
    ae = FluxAE(build_autoencoder(AEConfig.flux(), device="meta"), AEConfig.flux())
    t0 = time.perf_counter()
    with atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "llm_config.json").write_text(json.dumps(cfg.llm.to_hf_dict(), indent=2))
        (tmp / "vit_config.json").write_text(json.dumps(cfg.vit.to_hf_dict(add_dropped_layer=True), indent=2))
        specs = sorted((k, torch.bfloat16, tuple(v.shape)) for k, v in model.release_state_dict().items())
        write_safetensors_streaming(tmp / "ema.safetensors", specs, _random_chunks(0), {"format": "pt"})
        specs = sorted((k, torch.bfloat16, tuple(v.shape)) for k, v in ae_state_dict_flux(ae).items())
        write_safetensors_streaming(tmp / "ae.safetensors", specs, _random_chunks(1))
        (tmp / "bench_shape.json").write_text(json.dumps(BENCH_SHAPE))
    print(f"built {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


# ----------------------------------------------------------------------------- page cache and disk

def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Fraction of ``path`` in the page cache (util-linux ``fincore``), None when unavailable."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        return None
    return int(r.stdout.split()[0]) / max(1, path.stat().st_size)


def cache_label(frac: float | None) -> str:
    if frac is None:
        return "unknown"
    return "cold" if frac < 0.05 else ("warm" if frac > 0.95 else f"{frac:.0%} cached")


def disk_read(path: Path, drop: bool) -> dict:
    """Plain sequential read of the whole file into one reused 64 MiB buffer."""
    if drop:
        drop_from_cache(path)
    frac = resident_fraction(path)
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while k := fh.readinto(mv):
            n += k
    dt = time.perf_counter() - t0
    return {"bytes": n, "wall_s": dt, "cache": cache_label(frac)}


# ----------------------------------------------------------------------------- children

def loaded_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's own tensors: parameters + buffers (+ bitsandbytes quantization state)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for x in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(x)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(t, "SCB", None))
    return total


def _fill_via_safe_open(model, path: Path, dtype: torch.dtype, quantize: str | None) -> None:
    """Reference only: ftkit's previous read path. ``safe_open`` memory-maps the file; ``get_tensor``
    returns a tensor backed by the map (copy-on-write, no copy when the dtype matches); a quantized
    layer is made from the whole mapped weight by bitsandbytes."""
    from safetensors import safe_open

    from ftkit.models.loading import _quantized_linear, _set_tensor, is_quantizable

    with safe_open(str(path), framework="pt") as f:
        targets = [k for k in model.state_dict(keep_vars=True) if not k.startswith("vae.")]
        qmods = {k.rsplit(".", 1)[0] for k in targets if quantize and is_quantizable(k)}
        for k in targets:
            if k.rsplit(".", 1)[0] not in qmods:
                _set_tensor(model, k, f.get_tensor(k).to(dtype), requires_grad=False)
        for m in sorted(qmods):
            b = f.get_tensor(m + ".bias") if m + ".bias" in targets else None
            parent, _, attr = m.rpartition(".")
            setattr(model.get_submodule(parent), attr, _quantized_linear(f.get_tensor(m + ".weight"), b, quantize,
                                                                          dtype, "cpu"))


def touch(model: torch.nn.Module) -> int:
    """Read one byte of every 4 KiB page of every weight (as a first forward would): pages of a
    memory-mapped weight become resident only when touched."""
    s = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.numel():
            s += int(t.detach().reshape(-1).view(torch.uint8)[::4096].sum())
    return s


def child_load(folder: str, quantize: str | None, read_path: str = "ftkit") -> dict:
    import ftkit.models.loading as L

    t0 = time.perf_counter()
    if read_path == "ftkit":
        model = L.load_bagel(folder, dtype=torch.bfloat16, quantize=quantize)
    else:  # the same steps as load_bagel, with the previous (memory-mapped) read path for ema.safetensors
        from ftkit.models.vae import AEConfig, load_ae

        folder_ = Path(folder)
        llm = L.LLMConfig.from_json(folder_ / "llm_config.json")
        vit = L.ViTConfig.from_json(folder_ / "vit_config.json")
        cfg = L.BagelConfig(llm=llm, vit=vit, **L.infer_bagel_config(folder_, llm, vit, folder_ / "ema.safetensors"))
        with torch.device("meta"):
            model = L.BagelModel(cfg)
        _fill_via_safe_open(model, folder_ / "ema.safetensors", torch.bfloat16, quantize)
        model.vae = load_ae(folder_ / "ae.safetensors", AEConfig.flux(), dtype=torch.bfloat16)
    wall = time.perf_counter() - t0
    touch(model)
    n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    return {"load_s": wall, "loaded_bytes": loaded_bytes(model), "n_linear4bit": n4}


# ----------------------------------------------------------------------------- report

def machine_info() -> dict:
    import bitsandbytes
    import safetensors

    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": mem / 2**30,
            "date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "loadavg": os.getloadavg()[0],
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "safetensors": safetensors.__version__}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/ftkit-bench", help="where the checkpoint is built and cached")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    ap.add_argument("--benchmarks", default=str(REPO / "BENCHMARKS.md"))
    a = ap.parse_args(argv)

    folder = build_checkpoint(Path(a.workdir) / "bagel-7b-width-2layers", a.rebuild)
    ema, ae = folder / "ema.safetensors", folder / "ae.safetensors"
    file_bytes = ema.stat().st_size + ae.stat().st_size

    # best of two cold reads: the disk is shared with other processes on this machine
    cold = min((disk_read(ema, drop=True) for _ in range(2)), key=lambda r: r["wall_s"])
    warm = disk_read(ema, drop=False)
    disk = {k: v["bytes"] / v["wall_s"] / GB for k, v in (("cold", cold), ("warm", warm))}
    print(f"disk read of ema.safetensors ({cold['bytes'] / GB:.2f} GB): {cold['cache']} {disk['cold']:.2f} GB/s, "
          f"{warm['cache']} {disk['warm']:.2f} GB/s", flush=True)

    runs = [("bf16", None, "ftkit", True), ("bf16", None, "ftkit", False), ("nf4", "nf4", "ftkit", False),
            ("bf16, previous mmap path (reference; lazy: pages are read on first touch)", None, "mmap", False),
            ("nf4, previous mmap path (reference)", "nf4", "mmap", False)]
    rows = []
    for label, quant, read_path, drop in runs:
        for f in (ema, ae):
            if drop:
                drop_from_cache(f)
            else:  # warm: make sure the file is in the page cache (other processes may have evicted it)
                disk_read(f, drop=False)
        cache = cache_label(resident_fraction(ema))
        r = run_in_child(child_load, str(folder), quant, read_path, preimport=PREIMPORT)
        res = r["result"]
        row = dict(label=label, cache=cache, load_s=res["load_s"], gbps=file_bytes / res["load_s"] / GB,
                   loaded=res["loaded_bytes"], base=r["baseline_rss"], peak=r["peak_rss"],
                   ratio=r["peak_rss"] / res["loaded_bytes"],
                   ratio_net=(r["peak_rss"] - r["baseline_rss"]) / res["loaded_bytes"],
                   ratio_file=r["peak_rss"] / file_bytes)
        rows.append(row)
        print(f"{label} [{cache}]: {row['load_s']:.1f} s, {row['gbps']:.2f} GB/s, loaded {row['loaded'] / GB:.2f} GB, "
              f"peak RSS {row['peak'] / GB:.2f} GB (baseline {row['base'] / GB:.2f}), "
              f"peak/loaded {row['ratio']:.3f}", flush=True)

    m = machine_info()
    lines = [
        "`python bench/bench_load.py` builds (cached) a BAGEL-shaped release folder at full 7B width with reduced "
        "depth: decoder hidden 3584 / intermediate 18944 / 28 heads / 4 KV heads / vocab 152064 with 2 layers x 2 "
        "experts, SigLIP so400m width (1152 / 4304 / 16 heads) with 2 layers, latent table 64x64, ViT table 70x70, "
        f"full FLUX VAE; bf16, ema.safetensors {ema.stat().st_size / GB:.2f} GB + ae.safetensors "
        f"{ae.stat().st_size / GB:.2f} GB. Each load runs in a fresh process; peak RSS is the child's VmHWM; "
        "*loaded* is the loaded model's own parameter + buffer bytes (4-bit weights and their quantization "
        "state for nf4); *baseline* is the RSS after importing torch, ftkit, bitsandbytes and diffusers' "
        "autoencoders. Peak RSS is taken after the load and a pass that reads one byte of every 4 KiB page of every "
        "weight (as a first forward does), so memory-mapped weights are counted too.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM; {m['date']}; Python {m['python']}, "
        f"torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, safetensors {m['safetensors']}; 1-minute load "
        f"average {m['loadavg']:.1f} when the table was written (a shared machine: wall times vary, RSS does not).",
        "",
        f"Disk's own read rate (plain sequential reads of ema.safetensors, best of two): {disk['cold']:.2f} GB/s "
        f"{cold['cache']} "
        f"(dropped with posix_fadvise DONTNEED, residency checked with fincore), {disk['warm']:.2f} GB/s "
        f"{warm['cache']} (page cache).",
        "",
        "| load | page cache | wall s | GB/s (file bytes / wall) | loaded GB | baseline RSS GB | peak RSS GB "
        "| peak / loaded | (peak - baseline) / loaded | peak / file bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['cache']} | {r['load_s']:.1f} | {r['gbps']:.2f} | {r['loaded'] / GB:.2f} | "
                     f"{r['base'] / GB:.2f} | {r['peak'] / GB:.2f} | {r['ratio']:.3f} | {r['ratio_net']:.3f} | "
                     f"{r['ratio_file']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if not a.no_write:
        write_section(Path(a.benchmarks), SECTION, table + "\n\n" + NOTES)
        print(f"\nwrote section '{SECTION}' of {a.benchmarks}")


NOTES = """\
**Read path.** `load_bagel` builds the model on the meta device and reads ema.safetensors with plain positional
reads (`os.preadv`, 4 threads, 16 MiB pieces) straight into the storage of each final tensor (`torch.empty`,
viewed as bytes); when the target dtype differs (fp32 from a bf16 file) or the target is a GPU, each piece
passes through a 16 MiB staging buffer and is cast by `copy_`. With `quantize="nf4"` (CPU) every decoder
Linear weight is read and quantized in row blocks of about 8 MiB and only the packed 4-bit data is kept; the
result is bit-identical to bitsandbytes quantizing the whole weight (tested). The header is validated against
the file size first, so a truncated file fails before any read, naming the keys cut off.

**Why it changed (reference rows: the previous path).** With safetensors 0.8, `safe_open(...).get_tensor`
returns a tensor backed by a private memory map of the file (no copy when the dtype matches), so a plain bf16
load costs the same peak either way (its pages become resident, as file-backed RSS, when first touched). It
costs more as soon as the loader transforms a tensor: the mapped pages of every quantized weight stay resident
as long as any tensor from the map lives (all the unquantized ones do), and bitsandbytes quantizes a whole
weight at once (about 0.9 GB of temporaries for one 18944 x 3584 weight on CPU): see the nf4 reference row;
with row blocks nf4 stays within the goal, its remainder above 1.0 being the import baseline. Casting (fp32 from a bf16
file) likewise kept the mapped pages next to the cast copy. A model whose weights are a map of the file also
dies with SIGBUS if that file is rewritten in place while it is loaded; plain reads do not depend on the file
after loading.

**Throughput.** The disk's warm rate reads into one reused buffer; a load must also fault in fresh memory for
every weight (4 KiB pages on this VM), which bounds the warm load at about 1.5-2 GB/s here; cold, both are
bound by the disk. nf4 time is bitsandbytes' CPU quantization (about 20 M weights/s here); on CUDA the weight is
read to the GPU and quantized there. The autoencoder (ae.safetensors, 0.17 GB) is read by
`ftkit.models.vae.load_ae` through `safe_open` (mapped, zero-copy)."""


if __name__ == "__main__":
    main()
