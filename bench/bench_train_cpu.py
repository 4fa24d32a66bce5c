"""Benchmark: one training step of a ~100M-parameter BAGEL-shaped model on CPU.

    python bench/bench_train_cpu.py [--steps 3] [--wait-quiet S] [--only LoRA:bf16 ...] [--workdir DIR]
                                    [--json PATH] [--no-write] [--smoke]

About 3.5 minutes on an idle 2-core machine (``--wait-quiet 60`` waits for other jobs to pause first).

1. Measures the machine's matmul rates in this same run: fp32 and bf16 ``[n, n] @ [n, n]`` products
   (n = 2048, 2 n^3 FLOPs each; median of 7 clean products after 2 warm-ups; ``torch.set_num_threads``
   = all cores), plus one product at the model's own MLP shape ([L, 512] @ [512, 1408]) for reference.
2. Builds once (``build_random_bagel``) a BAGEL-architecture model: Qwen2 MoT decoder hidden 512,
   12 layers x 2 experts (understanding + generation), 8 heads, 2 KV heads, intermediate 1408, vocab
   32000 (untied lm_head); SigLIP-NaViT hidden 256, 4 layers, 4 heads, intermediate 1024; the tiny
   FLUX-style autoencoder (``tiny_ae_config``); saved as an fp32 release folder with ``save_bagel``
   (with a small tokenizer so the special ids are the ones the loader reads) and loaded in every
   configuration with ``load_bagel`` (nf4 goes through the real loader).
3. A fixed packed batch of one MCoT-shaped sample (:func:`make_segments`): prompt text, a 224 px ViT
   image (256 tokens), plan text with CE, a 256 px noisy VAE draft with the flow loss (256 tokens), the
   same draft clean as context (256 tokens), reflection text with CE -- 1052 tokens in all.
4. Six configurations, each in its own fresh child process (bench/_mem.py, so peak RSS is per
   configuration): {LoRA, QLoRA, full} x {fp32, bf16}.

   * LoRA: ``AdapterConfig(method="lora", preset="all-experts", r=16, alpha=32)`` on every expert's
     q/k/v/o and gate/up/down projections; base frozen.
   * QLoRA: ``load_bagel(..., quantize="nf4")`` (bitsandbytes ``Linear4bit``, compute dtype = the
     configuration's dtype, so "QLoRA fp32" is NF4 storage with fp32 compute) + the same LoRA +
     ``enable_gradient_checkpointing`` (decoder and ViT layers).
   * full: every parameter except the autoencoder and the fixed sin-cos position tables trains.
   * bf16 = weights loaded in bf16 (``load_bagel(dtype=bf16)``), no autocast; the LoRA A/B are cast
     to fp32 after ``attach_adapters`` (peft's ``cast_adapter_dtype``, what ``get_peft_model`` does by
     default; ftkit's ``inject_adapter_in_model`` path leaves them bf16), so their AdamW state is fp32; in the full
     bf16 run parameters, gradients and AdamW state are all bf16 (pure bf16, what ftkit's
     ``MCoTModule`` does with ``dtype: bf16`` and ``full_finetune: true``). Losses are computed in fp32.

   A step is what ``MCoTModule.compute_losses`` + the optimizer do: forward with fixed
   ``flow_noise`` / ``vae_posterior_eps``, ``per_token_ce`` (chunked, never all logits) mean +
   ``flow_mse_per_token`` mean, backward, ``AdamW.step``, ``zero_grad``. One warm-up step, then the
   median of ``--steps`` *clean* timed steps: the machine may be shared, and a step during which this
   process's threads spent more than ``CLEAN_WAIT`` of their time runnable but waiting for a CPU
   (run delay from /proc/self/task/*/schedstat) is repeated (at most 3 x ``--steps`` steps, none
   started after ``MAX_TIMED_S`` of timed steps); every step's CPU wait is reported. The matmul peaks
   are medians of clean products in the same way.

Model FLOPs per step (what the MFU column divides by the matching dtype's measured matmul rate;
recomputation under gradient checkpointing is not counted, so QLoRA's MFU is a *model* FLOPs
utilisation, not a hardware one):

    sum over every matmul weight W (Linear layers, found with forward hooks during the warm-up step,
    LoRA A and B included) of (2 + 2 [W's input needs a gradient] + 2 [W trains]) * n_rows(W) * |W|
    + the LM head on the CE rows only: (2 + 2 + 2 [lm_head trains]) * N_ce * V * D
    + attention: 4 L^2 d_model per decoder layer forward (the CPU path's dense L x L mask), 4 s^2
      d_vit per ViT layer and image; x3 when it needs backward (always in the decoder; the ViT only
      when it trains)
    + the autoencoder's convolutions (forward only; frozen, nothing before them trains).

This is the usual ``6 N tokens`` (full) / ``4 N_frozen tokens + 6 N_trainable tokens`` (LoRA) with N
counted per token: a MoT token only passes through its own expert's weights, the LM head only acts
on CE rows, and frozen weights with nothing trainable before them (ViT, autoencoder under LoRA) need
no backward at all.

Results: a Markdown table on stdout, written into BENCHMARKS.md section "## Training step on CPU"
(``--no-write`` skips it); the raw numbers as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mem import proc_status, run_in_child  # noqa: E402
from _report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Training step on CPU"
GB = 1e9
PREIMPORT = ("torch", "ftkit.models.loading", "ftkit.adapters.attach", "ftkit.train.losses", "peft", "bitsandbytes")
SPECIAL_IDS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")

MODEL = dict(vocab_size=32000, hidden=512, layers=12, heads=8, kv_heads=2, intermediate=1408, vit_hidden=256,
             vit_layers=4, vit_heads=4, vit_intermediate=1024, max_latent_size=16, vit_max=16)
SMOKE_MODEL = dict(vocab_size=1024, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vit_hidden=32,
                   vit_layers=1, vit_heads=2, vit_intermediate=64, max_latent_size=16, vit_max=16)
# (name, quantize, adapter, gradient checkpointing)
METHODS = {
    "LoRA": (None, True, False),
    "QLoRA": ("nf4", True, True),
    "full": (None, False, False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_N = 2048
MAX_TIMED_S = 60.0
CLEAN_WAIT = 0.05  # a step / product whose threads waited longer than this share of their time for a CPU is unclean
LORA = dict(method="lora", preset="all-experts", r=16, alpha=32.0)


# ----------------------------------------------------------------------------- machine peak

def run_delay_ns() -> int | None:
    """Total time this process's threads have spent runnable but waiting for a CPU (ns; field 2 of
    /proc/self/task/*/schedstat), or None where the kernel does not expose it."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        except (OSError, IndexError, ValueError):
            return None
    return total


def timed(fn, threads: int):
    """Run ``fn()``; return (its result, wall seconds, CPU wait share).

    CPU wait share = time this process's threads spent runnable but waiting for a CPU held by another
    process / (wall x threads): ~0 on an idle machine, ~0.5 when another busy process takes one of two
    cores; None where /proc/self/task/*/schedstat is missing.
    """
    d0, t0 = run_delay_ns(), time.perf_counter()
    out = fn()
    dt, d1 = time.perf_counter() - t0, run_delay_ns()
    wait = None if d0 is None or d1 is None else (d1 - d0) / 1e9 / (dt * threads)
    return out, dt, wait


def is_clean(wait: float | None) -> bool:
    return wait is None or wait <= CLEAN_WAIT


def matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, reps: int = 7, warmup: int = 2,
                max_reps: int = 25) -> dict:
    """GFLOP/s of ``[m, k] @ [k, n]`` (2 m k n FLOPs) in ``dtype``: the median over ``reps`` *clean* products
    (CPU wait share <= CLEAN_WAIT, i.e. not slowed by other processes), trying at most ``max_reps``; the median
    of all products when none was clean. Returns ``{"gflops", "clean", "tried"}``."""
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    for _ in range(warmup):
        torch.mm(a, b)
    clean, every = [], []
    while len(clean) < reps and len(every) < max_reps:
        _, dt, wait = timed(lambda: torch.mm(a, b), threads)
        every.append(dt)
        if is_clean(wait):
            clean.append(dt)
    flops = 2 * m * k * n
    return {"gflops": flops / statistics.median(clean or every) / 1e9, "clean": len(clean), "tried": len(every),
            "clean_s": clean, "every_s": every, "flops": flops}


def pooled_rate(*runs: dict) -> dict:
    """Pool several :func:`matmul_rate` results of the same product: median over all clean products."""
    clean = [t for r in runs for t in r["clean_s"]]
    every = [t for r in runs for t in r["every_s"]]
    return {"gflops": runs[0]["flops"] / statistics.median(clean or every) / 1e9, "clean": len(clean),
            "tried": len(every), "clean_s": clean, "every_s": every, "flops": runs[0]["flops"]}


# ----------------------------------------------------------------------------- model and batch

def build_release(out_dir: str, shape: dict) -> dict:
    """Build the random model (fp32) with a small tokenizer and save it as a release folder."""
    from ftkit.models.release import build_random_bagel, save_bagel, tiny_ae_config, tiny_bagel_config
    from ftkit.train.tiny import train_tokenizer

    tok = train_tokenizer(["a plan to draw a red circle above a blue square", "the square is too small"], 300)
    ids = {f: tok.convert_tokens_to_ids(t) for f, t in
           (("bos_id", "<|im_start|>"), ("eos_id", "<|im_end|>"), ("start_of_image", "<|vision_start|>"),
            ("end_of_image", "<|vision_end|>"))}
    cfg = tiny_bagel_config(**shape, special_ids=ids)
    model = build_random_bagel(cfg, tiny_ae_config(), seed=0)
    counts = param_counts(model)
    save_bagel(model, out_dir, tokenizer=tok, dtype=torch.float32, overwrite=True)
    return counts


def param_counts(model) -> dict:
    """Parameter counts by part (the autoencoder is not part of the release's ema.safetensors)."""
    parts: dict[str, int] = {}
    for n, p in model.named_parameters():
        if n.startswith("vae."):
            k = "autoencoder"
        elif n.startswith("language_model.model.layers."):
            k = "decoder layers, generation expert" if "_moe_gen" in n else "decoder layers, understanding expert"
        elif n.startswith("language_model.model.embed_tokens"):
            k = "embed_tokens"
        elif n.startswith("language_model.lm_head"):
            k = "lm_head"
        elif n.startswith("vit_model."):
            k = "ViT"
        else:
            k = "norms, connectors, time embedder, position tables"
        parts[k] = parts.get(k, 0) + p.numel()
    parts["total without autoencoder"] = sum(v for k, v in parts.items() if k != "autoencoder")
    parts["total"] = parts["total without autoencoder"] + parts.get("autoencoder", 0)
    return parts


def make_segments(vocab: int, start_of_image: int, text=(96, 128, 48), vit_px=224, vae_px=256, seed=0):
    """One MCoT-shaped sample: prompt, ViT image, plan (CE), noisy draft (MSE), clean draft, reflection (CE)."""
    from ftkit.segments import Kind, Segment, Step

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(8, vocab, (n,), generator=g).tolist()

    def img(px):
        return torch.rand(3, px, px, generator=g) * 2 - 1

    draft = img(vae_px)
    return [
        Segment(Kind.TEXT, text_ids=ids(text[0])),
        Segment(Kind.VIT_IMAGE, image=img(vit_px)),
        Segment(Kind.TEXT, text_ids=ids(text[1]), loss=True, end_label=start_of_image, step=Step.PLAN),
        Segment(Kind.VAE_NOISY, image=draft, loss=True, timestep_logit=0.0, step=Step.DRAFT),
        Segment(Kind.VAE_CLEAN, image=draft, step=Step.DRAFT),
        Segment(Kind.TEXT, text_ids=ids(text[2]), loss=True, step=Step.REFLECT),
    ]


# ----------------------------------------------------------------------------- FLOP counting

class FlopCounter:
    """Model FLOPs of one step, from forward hooks on every Linear / Conv2d (see the module docstring)."""

    def __init__(self, model):
        import torch.nn as nn

        self.linear_fwd = self.linear_total = self.conv_fwd = 0
        self.active = False
        self.handles = []
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                self.handles.append(mod.register_forward_hook(self._linear))
            elif isinstance(mod, nn.Conv2d):
                self.handles.append(mod.register_forward_hook(self._conv))

    def _linear(self, mod, inp, out):
        if not self.active:  # recomputation in backward (gradient checkpointing) is not model FLOPs
            return
        x = inp[0]
        rows = x.numel() // mod.in_features
        fwd = 2 * rows * mod.in_features * mod.out_features
        self.linear_fwd += fwd
        self.linear_total += fwd * (1 + int(x.requires_grad) + int(mod.weight.requires_grad))

    def _conv(self, mod, inp, out):
        if not self.active:
            return
        kh, kw = mod.kernel_size
        flops = 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
        self.conv_fwd += flops
        needs_back = inp[0].requires_grad or mod.weight.requires_grad
        if needs_back:
            raise RuntimeError("bench: a convolution needs a backward; its FLOPs rule is not implemented")

    def remove(self):
        for h in self.handles:
            h.remove()


def attention_flops(model, batch) -> dict:
    """Attention score/value matmul FLOPs (model FLOPs: forward x1, +x2 when a backward runs)."""
    llm = model.cfg.llm
    L = batch.sequence_length
    dec_fwd = 4 * L * L * llm.hidden_size * llm.num_hidden_layers  # QK^T and PV over the dense L x L mask
    vit = model.cfg.vit
    vit_fwd = sum(4 * s * s * vit.hidden_size * vit.num_hidden_layers for s in batch.vit_seqlens)
    vit_trains = any(p.requires_grad for p in model.vit_model.parameters())
    return {"decoder": 3 * dec_fwd, "vit": vit_fwd * (3 if vit_trains else 1)}


# ----------------------------------------------------------------------------- one configuration (child)

def run_config(model_dir: str, method: str, dtype_name: str, steps: int, threads: int, quiet_s: float = 0.0) -> dict:
    """Load, attach, warm up and time ``steps`` optimizer steps. Runs in a child process."""
    import ftkit.models.kernels as kernels
    from ftkit.adapters.attach import attach_adapters, enable_gradient_checkpointing
    from ftkit.adapters.config import AdapterConfig
    from ftkit.data.packer import pack
    from ftkit.models.loading import load_bagel
    from ftkit.testing import pack_config_for
    from ftkit.train import losses as Ls

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kernels.set_backend("torch")
    quantize, adapter, ckpt = METHODS[method]
    dtype = DTYPES[dtype_name]
    t0 = time.perf_counter()
    model = load_bagel(model_dir, dtype=dtype, quantize=quantize)
    load_s = time.perf_counter() - t0
    if adapter:
        from peft.tuners.tuners_utils import cast_adapter_dtype

        attach_adapters(model, AdapterConfig(**LORA))
        # what peft.get_peft_model does by default (autocast_adapter_dtype=True): bf16/fp16 LoRA weights
        # become fp32; ftkit's attach_adapters (inject_adapter_in_model) leaves them in the base's dtype
        cast_adapter_dtype(model, adapter_name="default", autocast_adapter_dtype=True)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(not (n.startswith("vae.") or n.endswith("pos_embed")))
    if ckpt:
        enable_gradient_checkpointing(model)
    model.train()
    model.vae.eval()
    rss_loaded = proc_status("VmRSS")

    cfg = model.cfg
    batch = pack([make_segments(cfg.llm.vocab_size, cfg.start_of_image)], pack_config_for(cfg))
    g = torch.Generator().manual_seed(1)
    ds, zc = model.vae.downsample, model.vae.z_channels
    eps = [torch.randn(zc, im.shape[1] // ds, im.shape[2] // ds, generator=g) for im in batch.vae_images]
    noise = torch.randn(batch.vae_token_indexes.numel(), cfg.patch_latent_dim, generator=g)
    head = model.language_model.lm_head.weight

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    train_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    counter = FlopCounter(model)
    # the matching peak, measured in this process just before (and after) its steps (the machine may be shared)
    if quiet_s:
        wait_quiet(quiet_s, polls=2)
    peak = matmul_rate(dtype, PEAK_N, PEAK_N, PEAK_N)

    def step(count: bool = False) -> float:
        counter.active = count
        out = model(batch, flow_noise=noise, vae_posterior_eps=eps, attn_impl="sdpa")
        counter.active = False
        ce = Ls.per_token_ce(out.ce_hidden, head, batch.ce_labels).mean()
        mse = Ls.flow_mse_per_token(out.velocity_pred, out.velocity_target).mean()
        loss = ce + mse
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    losses = [step(count=True)]
    warm_s = time.perf_counter() - t0
    counter.remove()
    # timed steps until `steps` clean ones (CPU wait share <= CLEAN_WAIT), at most 3 x steps, and no new attempt
    # after MAX_TIMED_S of timed steps once `steps` were tried (the machine may be shared)
    times, cpu_wait, faults = [], [], []
    contention = {"before": machine_load()}
    while True:
        if quiet_s:  # start each step on a quiet machine (the wait is not timed)
            wait_quiet(quiet_s, polls=2)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss, dt, wait = timed(step, threads)
        losses.append(loss)
        times.append(dt)
        cpu_wait.append(wait)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        n_clean = sum(is_clean(x) for x in cpu_wait)
        if n_clean >= steps or len(times) >= 3 * steps or (len(times) >= steps and sum(times) > MAX_TIMED_S):
            break
    contention["after"] = machine_load()
    # and again after the steps: the peak is the median over the clean products of both sessions
    if quiet_s:
        wait_quiet(quiet_s, polls=2)
    peak = pooled_rate(peak, matmul_rate(dtype, PEAK_N, PEAK_N, PEAK_N))
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{method} {dtype_name}: non-finite loss {losses}")

    n_ce = batch.ce_indexes.numel()
    V, D = head.shape
    ce_flops = 2 * n_ce * V * D * (2 + int(head.requires_grad))
    attn = attention_flops(model, batch)
    flops = {"linear": counter.linear_total, "lm_head_ce": ce_flops, "attention_decoder": attn["decoder"],
             "attention_vit": attn["vit"], "autoencoder_conv": counter.conv_fwd}
    n_base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae.") and ".lora_" not in n)
    if quantize:  # Params4bit holds two 4-bit values per uint8 element
        import bitsandbytes as bnb

        n_base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae.") and ".lora_" not in n
                     and not isinstance(p, bnb.nn.Params4bit))
        n_base += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    return {
        "method": method, "dtype": dtype_name, "quantize": quantize, "gradient_checkpointing": ckpt,
        "tokens": batch.sequence_length, "n_ce": n_ce, "n_mse": batch.mse_indexes.numel(),
        "n_vit": batch.vit_tokens.shape[0], "n_vae": batch.vae_token_indexes.numel(),
        "params_base": n_base, "params_trainable": n_train, "trainable_dtypes": train_dtypes,
        "load_s": load_s, "warmup_s": warm_s, "step_s": times,
        "clean_steps": [t for t, x in zip(times, cpu_wait, strict=True) if is_clean(x)],
        "step_s_median": statistics.median([t for t, x in zip(times, cpu_wait, strict=True) if is_clean(x)] or times),
        "losses": losses, "flops": flops, "flops_total": sum(flops.values()), "rss_loaded": rss_loaded,
        "threads": torch.get_num_threads(), "peak_gflops": peak["gflops"], "peak_clean": peak, "cpu_wait": cpu_wait,
        "minor_faults": faults, "contention": contention,
    }


# ----------------------------------------------------------------------------- report

def machine_load() -> dict:
    """1-minute load average and the kernel's CPU pressure (share of the last 10 s in which some runnable
    task waited for a CPU; /proc/pressure/cpu, absent on old kernels) -- the machine may be shared."""
    out = {"loadavg_1m": os.getloadavg()[0]}
    try:
        with open("/proc/pressure/cpu") as fh:
            first = fh.readline().split()
        out["cpu_pressure_avg10"] = float(dict(kv.split("=") for kv in first[1:])["avg10"])
    except (OSError, KeyError, ValueError):
        pass
    return out


def machine() -> dict:
    def lscpu_field(name):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
        return "?"

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import bitsandbytes as bnb

        bnb_v = bnb.__version__
    except ImportError:
        bnb_v = "absent"
    import peft

    isa = torch.backends.cpu.get_cpu_capability()
    return {"cpu": lscpu_field("Model name"), "cores": os.cpu_count(), "ram_gib": ram / 2**30,
            "python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bnb_v, "peft": peft.__version__,
            "torch_cpu_capability": isa, "date": datetime.date.today().isoformat()}


def wait_quiet(limit_s: float, polls: int = 3) -> float:
    """Sleep until ``polls`` consecutive 1 s samples of /proc/stat ``procs_running`` show no runnable task
    besides the reader, or ``limit_s`` passed; return the seconds waited."""
    t0, quiet = time.perf_counter(), 0
    while quiet < polls and time.perf_counter() - t0 < limit_s:
        time.sleep(1.0)
        with open("/proc/stat") as fh:
            running = next((int(ln.split()[1]) for ln in fh if ln.startswith("procs_running")), 1)
        quiet = quiet + 1 if running <= 1 else 0
    return time.perf_counter() - t0


def _load_str(d: dict) -> str:
    p = d.get("cpu_pressure_avg10")
    return f"load {d['loadavg_1m']:.1f}" + (f", CPU pressure {p:.0f}%" if p is not None else "")


def _wait_str(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def render(res: dict) -> str:
    m, rates, counts = res["machine"], res["matmul_gflops"], res["params"]
    rows = res["configs"]
    r0, sh = rows[0], res["shape"]
    lines = [SECTION, ""]
    lines.append(
        f"`{res['command']}` (~{res['wall_s'] / 60:.0f} min) trains a BAGEL-architecture model of "
        f"{counts['total without autoencoder'] / 1e6:.1f}M parameters ({counts['total without autoencoder']:,}, "
        "both experts counted: "
        + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items() if not k.startswith("total") and k != "autoencoder")
        + f"; the tiny autoencoder's {counts.get('autoencoder', 0):,} more are frozen and outside the release "
        f"weights): Qwen2 MoT decoder hidden {sh['hidden']}, {sh['layers']} layers x 2 experts, {sh['heads']} heads / "
        f"{sh['kv_heads']} KV heads, intermediate {sh['intermediate']}, vocab {sh['vocab_size']}, untied lm_head; "
        f"SigLIP-NaViT {sh['vit_hidden']} wide, {sh['vit_layers']} layers, {sh['vit_heads']} heads, intermediate "
        f"{sh['vit_intermediate']}; `tiny_ae_config()` autoencoder. "
        f"One fixed packed batch of {r0['tokens']} tokens, one MCoT-shaped sample: prompt (96), a 224 px ViT image "
        f"({r0['n_vit']} tokens), plan (128, CE), a 256 px noisy draft with the flow loss and the same draft clean "
        f"({r0['n_vae']} VAE tokens), reflection (48, CE); {r0['n_ce']} CE and {r0['n_mse']} flow-loss tokens. "
        "The model is written once with `save_bagel` (fp32) and each configuration loads it with `load_bagel` "
        "(nf4: the real quantizing loader) in its own fresh process (bench/_mem.py).")
    lines.append("")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM "
                 f"(torch CPU capability {m['torch_cpu_capability']}); {m['date']}; Python {m['python']}, "
                 f"torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, peft {m['peft']}; {r0['threads']} threads. "
                 f"Machine load at start: {_load_str(res['load_start'])}; at end: {_load_str(res['load_end'])}"
                 + ("; `--wait-quiet`: each configuration, timed step and peak measurement started once no other "
                    "process was runnable (waits not timed)."
                    if res.get("waited_s") else "."))
    lines.append("")
    n = res["matmul_n"]
    lines.append(
        f"Matmul rates measured in the same run ({n}^3 products, median of 7): at start fp32 "
        f"{rates['fp32']:.0f} / bf16 {rates['bf16']:.0f} GFLOP/s (bf16/fp32 = {rates['bf16'] / rates['fp32']:.1f}x); "
        f"at the model's MLP shape [{res['mlp_shape'][0]}, {res['mlp_shape'][1]}] @ [{res['mlp_shape'][1]}, "
        f"{res['mlp_shape'][2]}]: fp32 {rates['fp32_mlp_shape']:.0f} / bf16 {rates['bf16_mlp_shape']:.0f} GFLOP/s. "
        "Each configuration measures its own dtype's rate again in its own process, before and after its timed "
        "steps (column *peak*: median of the clean products of both); **MFU = model FLOPs per step / median step time / that peak**.")
    lines.append("")
    lines.append("| method | dtype | trainable params | step s | tokens/s | peak RSS GB | model GFLOP/step | GFLOP/s "
                 "| peak GFLOP/s | MFU | clean steps: CPU wait of each | loss first -> last |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        lines.append(
            f"| {r['method']}{' (nf4 + grad. ckpt)' if r['quantize'] else ''} | {r['dtype']} "
            f"| {r['params_trainable'] / 1e6:.2f}M {'/'.join(x.replace('float32', 'fp32').replace('bfloat16', 'bf16') for x in r['trainable_dtypes'])} "
            f"| {r['step_s_median']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss'] / GB:.2f} "
            f"| {r['flops_total'] / 1e9:.0f} | {r['achieved_gflops']:.1f} | {r['peak_gflops']:.0f} | {100 * r['mfu']:.1f}% "
            f"| {len(r['clean_steps'])}/{len(r['step_s'])}: {' '.join(_wait_str(x) for x in r['cpu_wait'])} "
            f"| {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
    lines.append("")
    lines.append(
        f"*step s*: forward + chunked CE + flow MSE + backward + AdamW step + zero_grad, the median over *clean* "
        f"steps after one warm-up step (the same batch each step, so the loss falls). *CPU wait*: the time the "
        f"process's threads were runnable but waiting for a CPU (/proc/self/task/*/schedstat) / (wall x threads); "
        f"a step is *clean* when it is <= {CLEAN_WAIT}. This 2-core machine is shared with other jobs, and a step "
        f"that loses one core to another process runs several times slower (two OpenMP threads, one "
        f"descheduled, the other waiting for it at every op), so steps are repeated until {res['steps']} are clean "
        f"(at most {3 * res['steps']}, no new one after {MAX_TIMED_S:.0f} s of timed steps). *peak* is measured "
        f"the same way (clean products only). *peak RSS*: the child's VmHWM over load + all steps (a child "
        f"holds {res['baseline_rss'] / GB:.2f} GB after its imports). "
        "bf16 = weights loaded in bf16, no autocast, losses in fp32; the LoRA A/B are cast to "
        "fp32 after `attach_adapters` (peft's `autocast_adapter_dtype` default of `get_peft_model`), so their "
        "AdamW state is fp32; the full bf16 run is pure bf16 (parameters, gradients and AdamW state). "
        "QLoRA fp32 = NF4 storage with fp32 compute dtype. Trainable: LoRA r=16 alpha=32 on q/k/v/o and "
        "gate/up/down of both experts; full = everything but the autoencoder and the fixed sin-cos tables.")
    lines.append("")
    lines.append(
        "Model FLOPs per step = sum over matmul weights W (forward hooks on every Linear during the warm-up "
        "step, LoRA A/B included) of (2 + 2 [W's input needs a gradient] + 2 [W trains]) x rows(W) x |W|, + the "
        "LM head on CE rows only, + attention (4 L^2 d per decoder layer over the CPU path's dense L x L mask, "
        "x3 with its backward; the frozen ViT's x1), + the frozen autoencoder's convolutions (forward only). That "
        "is 6 N tokens for full fine-tuning and 4 N_frozen + 6 N_trainable per token for LoRA, with N counted "
        "per token (a token passes through its own expert only). Recomputation under gradient checkpointing is "
        "not counted (QLoRA's MFU is model, not hardware, FLOPs). fp32 LoRA step, GFLOP: "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r0["flops"].items()) + ".")
    lines.append("")
    for note in res.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def auto_notes(res: dict) -> list[str]:
    """Observations computed from the numbers (written under the table)."""
    by = {(r["method"], r["dtype"]): r for r in res["configs"]}
    notes = []
    for meth in METHODS:
        a, b = by.get((meth, "fp32")), by.get((meth, "bf16"))
        if a and b:
            sp = a["step_s_median"] / b["step_s_median"]
            notes.append(f"{meth}: the bf16 step is {sp:.2f}x the speed of the fp32 step (matmul peak ratio in "
                         f"those processes {b['peak_gflops'] / a['peak_gflops']:.1f}x); peak RSS "
                         f"{b['peak_rss'] / GB:.2f} vs {a['peak_rss'] / GB:.2f} GB.")
    for dt in DTYPES:
        lo, q = by.get(("LoRA", dt)), by.get(("QLoRA", dt))
        if lo and q:
            notes.append(f"QLoRA vs LoRA, {dt}: {q['step_s_median'] / lo['step_s_median']:.2f}x the step time, "
                         f"{q['peak_rss'] / lo['peak_rss']:.2f}x the peak RSS.")
    short = [f"{r['method']} {r['dtype']}" for r in res["configs"] if len(r["clean_steps"]) < res["steps"]]
    if short:
        notes.append(f"Fewer than {res['steps']} clean steps (the machine was busy; the median then includes "
                     f"slowed steps, or is over all steps when none was clean): {', '.join(short)}.")
    notes.append("bitsandbytes on CPU: in training mode `Linear4bit` dequantizes the whole NF4 weight to the compute "
                 "dtype at every forward (`gemm_4bit` default implementation: `dequantize_4bit` + `F.linear`) and "
                 "again for the input gradient in backward; gradient checkpointing adds one more forward per "
                 "layer. The fused AVX512-BF16 NF4 kernel is used only for inference weights repacked at eval "
                 "time, and its faster variant comes from the Hub `kernels` package, absent here (bnb logs "
                 "\"Failed to load CPU gemm_4bit_forward from kernels-community\"). So on CPU QLoRA saves memory, not time.")
    faults = {f"{r['method']} {r['dtype']}": statistics.median(r["minor_faults"]) for r in res["configs"]}
    notes.append("Minor page faults per step (glibc returning freed blocks to the OS and faulting them back): "
                 + ", ".join(f"{k} {v / 1e3:.0f}k" for k, v in faults.items()) + ".")
    return notes


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration")
    ap.add_argument("--workdir", default=None, help="where the release folder is written (default: a temp dir)")
    ap.add_argument("--only", nargs="*", default=None, help="configurations METHOD:DTYPE, e.g. LoRA:bf16")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="wait up to this many seconds for no other runnable process before each configuration "
                         "(and up to half of it before each timed step and peak measurement)")
    ap.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step, no write (tests the script)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    steps = 1 if args.smoke else args.steps
    shape = SMOKE_MODEL if args.smoke else MODEL
    configs = [(m, d) for m in METHODS for d in DTYPES]
    if args.only:
        want = [tuple(x.split(":")) for x in args.only]
        bad = [w for w in want if w not in configs]
        if bad:
            ap.error(f"--only: unknown configuration(s) {bad}; choose from {[f'{m}:{d}' for m, d in configs]}")
        configs = [c for c in configs if c in want]
    cmd = ("python bench/bench_train_cpu.py" + (f" --steps {args.steps}" if args.steps != 3 else "")
           + (f" --wait-quiet {args.wait_quiet:g}" if args.wait_quiet else ""))
    res: dict = {"command": cmd, "steps": steps, "machine": machine(), "shape": shape}
    t_all = time.perf_counter()
    res["load_start"] = machine_load()

    n = 512 if args.smoke else 2048
    L = 1030
    res["matmul_n"] = n
    res["mlp_shape"] = [L, shape["hidden"], shape["intermediate"]]
    res["waited_s"] = [wait_quiet(args.wait_quiet)] if args.wait_quiet else []
    res["matmul_detail"] = {k: matmul_rate(dt, n, n, n) for k, dt in DTYPES.items()}
    res["matmul_detail"].update({f"{k}_mlp_shape": matmul_rate(dt, L, shape["hidden"], shape["intermediate"], reps=15)
                                 for k, dt in DTYPES.items()})
    res["matmul_gflops"] = {k: v["gflops"] for k, v in res["matmul_detail"].items()}
    print(f"[bench] matmul GFLOP/s: {json.dumps({k: round(v, 1) for k, v in res['matmul_gflops'].items()})}",
          flush=True)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ftkit-bench-train-"))
    model_dir = work / ("bagel-smoke" if args.smoke else "bagel-100m")
    try:
        built = run_in_child(build_release, str(model_dir), shape, preimport=PREIMPORT)
        res["params"] = built["result"]
        print(f"[bench] model built in {built['wall_s']:.1f} s: {json.dumps(res['params'])}", flush=True)
        rows = []
        for meth, dt in configs:
            if args.wait_quiet:
                res["waited_s"].append(wait_quiet(args.wait_quiet))
            out = run_in_child(run_config, str(model_dir), meth, dt, steps, threads, args.wait_quiet / 2,
                               preimport=PREIMPORT)
            r = out["result"]
            r["peak_rss"], r["ru_maxrss"], r["baseline_rss"] = out["peak_rss"], out["ru_maxrss"], out["baseline_rss"]
            r["tokens_per_s"] = r["tokens"] / r["step_s_median"]
            r["achieved_gflops"] = r["flops_total"] / r["step_s_median"] / 1e9
            r["mfu"] = r["achieved_gflops"] / r["peak_gflops"]
            rows.append(r)
            print(f"[bench] {meth:5s} {dt}: step {r['step_s_median']:.2f} s ({', '.join(f'{t:.2f}' for t in r['step_s'])}), "
                  f"CPU wait {[_wait_str(x) for x in r['cpu_wait']]}, peak {r['peak_gflops']:.0f} GFLOP/s "
                  f"({r['peak_clean']['clean']}/{r['peak_clean']['tried']} clean), "
                  f"{r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss'] / GB:.2f} GB, "
                  f"{r['flops_total'] / 1e9:.0f} GFLOP, MFU {100 * r['mfu']:.1f}%, load {r['load_s']:.1f} s, "
                  f"warm-up {r['warmup_s']:.1f} s, losses {[round(x, 4) for x in r['losses']]}", flush=True)
        res["configs"] = rows
        res["baseline_rss"] = min(r["baseline_rss"] for r in rows)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["load_end"] = machine_load()
    res["notes"] = auto_notes(res)
    res["wall_s"] = time.perf_counter() - t_all
    text = render(res)
    print()
    print(text)
    print(f"[bench] total wall {res['wall_s']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    if not (args.no_write or args.smoke or args.only):
        write_section(REPO / "BENCHMARKS.md", SECTION, text.removeprefix(SECTION))
        print(f"[bench] wrote section {SECTION!r} of {REPO / 'BENCHMARKS.md'}")
    return res


if __name__ == "__main__":
    main()
