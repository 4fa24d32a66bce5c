"""GPU checks that only a CUDA machine can answer (run on a lent GPU; CI never runs this).

    python bench/gpu_check.py --out DIR            # on a CUDA machine
    python bench/gpu_check.py --smoke              # tiny sizes on CPU, to test the script itself

1. Liger vs torch kernels: parity (fp32, small model) of hidden states, per-token CE and gradients.
2. Flex attention (block mask) vs SDPA with a dense mask on a packed multi-sample sequence; peak memory
   of flex at a long pack where a dense L x L mask would not be built.
3. bitsandbytes NF4 on CUDA: dequantisation error, Linear4bit + LoRA forward/backward.
4. Training-step throughput and peak memory at BAGEL-7B width (reduced depth), LoRA on the generation
   expert, bf16: torch kernels + SDPA vs Liger + flex; QLoRA (NF4) with gradient checkpointing.
Results go to DIR/gpu_check.json and DIR/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftkit.data.packer import PackConfig, pack  # noqa: E402
from ftkit.models import kernels  # noqa: E402
from ftkit.models.attention import AttentionSpec, packed_attention  # noqa: E402
from ftkit.models.bagel import BagelModel  # noqa: E402
from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig  # noqa: E402
from ftkit.segments import Kind, Segment  # noqa: E402

RESULTS: dict = {}


def record(name, value):
    RESULTS[name] = value
    print(f"[gpu_check] {name}: {json.dumps(value, default=str)}", flush=True)


def make_cfg(hidden, layers, heads, kv, inter, vocab, vit_hidden, vit_layers, vit_heads, vit_inter) -> BagelConfig:
    llm = LLMConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv, vocab_size=vocab)
    vit = ViTConfig(hidden_size=vit_hidden, intermediate_size=vit_inter, num_hidden_layers=vit_layers,
                    num_attention_heads=vit_heads)
    return BagelConfig(llm=llm, vit=vit, max_latent_size=64, vit_max_num_patch_per_side=70, bos_id=1, eos_id=2,
                       start_of_image=3, end_of_image=4)


def make_model(cfg, device, dtype, seed=0) -> BagelModel:
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = BagelModel(cfg)
    m = m.to_empty(device=device)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("pos_embed"):
                from ftkit.models.siglip import sincos_2d

                p.copy_(sincos_2d(int(math.isqrt(p.shape[0])), p.shape[1]))
            elif p.dim() >= 2:
                p.normal_(0, 0.02)
            elif n.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return m.to(dtype)


def make_batch(cfg, n_samples, text_len, img_side, vit_side, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc = PackConfig(1, 2, 3, 4, 14, 70, 8, 2, 64)
    samples = []
    for _ in range(n_samples):
        ids = lambda n: torch.randint(5, cfg.llm.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        samples.append([
            Segment(Kind.TEXT, text_ids=ids(text_len)),
            Segment(Kind.VIT_IMAGE, image=torch.rand(3, vit_side, vit_side, generator=g) * 2 - 1),
            Segment(Kind.TEXT, text_ids=ids(text_len), loss=True, end_label=3, step=1),
            Segment(Kind.VAE_NOISY, image=torch.zeros(3, img_side, img_side), loss=True, timestep_logit=0.3, step=2),
            Segment(Kind.VAE_CLEAN, image=torch.zeros(3, img_side, img_side), step=2),
            Segment(Kind.TEXT, text_ids=ids(text_len), loss=True, step=3),
        ])
    b = pack(samples, pc)
    nz = b.vae_token_indexes.numel()
    clean = torch.randn(nz, cfg.patch_latent_dim, generator=g)
    noise = torch.randn(nz, cfg.patch_latent_dim, generator=g)
    return b, clean, noise


def step(model, b, clean, noise, attn_impl, backward=True):
    out = model(b.to(model.device), clean_latent_tokens=clean.to(model.device), flow_noise=noise.to(model.device),
                attn_impl=attn_impl)
    ce = kernels.linear_cross_entropy(out.ce_hidden, model.language_model.lm_head.weight, b.ce_labels.to(model.device))
    mse = ((out.velocity_pred.float() - out.velocity_target.float()) ** 2).mean(-1)
    loss = ce.mean() + mse.mean()
    if backward:
        loss.backward()
    return out, ce, loss


def check_liger_parity(dev, smoke):
    sizes = dict(hidden=256, layers=2, heads=8, kv=2, inter=512, vocab=8192, vit_hidden=64, vit_layers=1, vit_heads=2,
                 vit_inter=128)
    cfg = make_cfg(**sizes)
    b, clean, noise = make_batch(cfg, 2, 24, 64, 56)
    res = {}
    outs = {}
    for backend in ("torch", "liger"):
        if backend == "liger" and not kernels.liger_available():
            res["liger"] = "unavailable"
            continue
        kernels.set_backend(backend)
        m = make_model(cfg, dev, torch.float32)
        out, ce, loss = step(m, b, clean, noise, "sdpa")
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        outs[backend] = (out.hidden.detach(), ce.detach(), loss.detach(), grads)
    kernels.set_backend("torch")
    if "liger" in outs:
        ht, ct, lt, gt = outs["torch"]
        hl, cl, ll, gl = outs["liger"]
        rel = {k: ((gt[k] - gl[k]).abs().max() / gt[k].abs().max().clamp_min(1e-12)).item() for k in gt}
        worst = sorted(rel.items(), key=lambda kv: -kv[1])[:4]
        res.update(hidden_maxabs=(ht - hl).abs().max().item(), ce_maxabs=(ct - cl).abs().max().item(),
                   loss_abs=(lt - ll).abs().item(), grad_max_rel=worst[0][1], worst_grads=worst,
                   grads_within_1em4=sum(v < 1e-4 for v in rel.values()), grads_total=len(rel))
    record("liger_parity_fp32", res)


def check_flex(dev, smoke):
    torch.manual_seed(0)
    res = {}
    for L, n_samples in ((2048, 4), (8192, 8)) if not smoke else ((128, 2),):
        # random packed layout: samples of text / full / noise splits
        splits, s = [], 0
        per = L // n_samples
        for smp in range(n_samples):
            a = per // 4
            for mode, ln in (("causal", a), ("full", a), ("noise", a), ("causal", per - 3 * a)):
                splits.append((s, s + ln, mode, smp))
                s += ln
        H, Hkv, d = 16, 4, 128
        q = torch.randn(H, s, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(Hkv, s, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(Hkv, s, d, device=dev, dtype=torch.bfloat16)
        dense = AttentionSpec.from_splits(splits, s, device=dev, impl="sdpa")
        ref = packed_attention(q.float(), k.float(), v.float(), dense, d**-0.5)
        flex = AttentionSpec.from_splits(splits, s, device=dev, impl="flex")
        out = packed_attention(q, k, v, flex, d**-0.5)
        res[f"L{s}_maxabs_vs_fp32_dense"] = (out.float() - ref).abs().max().item()
        out_d = packed_attention(q, k, v, dense, d**-0.5)
        res[f"L{s}_dense_bf16_maxabs"] = (out_d.float() - ref).abs().max().item()
    if dev.type == "cuda" and not smoke:
        L = 65536
        splits = [(i * 4096, (i + 1) * 4096, "causal" if i % 2 == 0 else "full", i // 4) for i in range(L // 4096)]
        q = torch.randn(28, L, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(4, L, 128, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        spec = AttentionSpec.from_splits(splits, L, device=dev, impl="flex")
        t = time.perf_counter()
        o = packed_attention(q, k, k, spec, 128**-0.5)
        torch.cuda.synchronize()
        res["L65536_flex_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        res["L65536_flex_first_call_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(5):
            o = packed_attention(q, k, k, spec, 128**-0.5)
        torch.cuda.synchronize()
        res["L65536_flex_ms"] = (time.perf_counter() - t) / 5 * 1000
        res["dense_mask_would_need_gb"] = L * L / 2**30
        del o
    record("flex_attention", res)


def check_bnb(dev, smoke):
    res = {}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as BF
    except ImportError as e:
        record("bnb", f"unavailable: {e}")
        return
    res["version"] = bnb.__version__
    w = torch.randn(3584, 3584 if not smoke else 64, dtype=torch.bfloat16, device=dev)
    q, st = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    deq = BF.dequantize_4bit(q, st)
    res["nf4_rel_err_bf16_randn"] = ((deq.float() - w.float()).norm() / w.float().norm()).item()
    from ftkit.models.loading import _quantized_linear

    lin = _quantized_linear(w.float(), None, "nf4", torch.bfloat16, dev)
    import peft  # noqa: F401
    from peft import LoraConfig, inject_adapter_in_model

    class Wrap(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.proj = lin

        def forward(self, x):
            return self.proj(x)

    m = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]), Wrap(lin))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(64, w.shape[1], device=dev, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    y.float().pow(2).mean().backward()
    res["lora_on_nf4_grad_finite"] = bool(all(torch.isfinite(p.grad).all() for n, p in m.named_parameters()
                                               if p.requires_grad))
    res["nf4_fwd_maxabs_vs_dequant"] = (m.proj.base_layer(x).float() - (x @ deq.t()).float()).abs().max().item()
    record("bnb", res)


def throughput(dev, smoke, budget_s):
    if smoke:
        sizes = dict(hidden=128, layers=2, heads=4, kv=2, inter=256, vocab=1024, vit_hidden=64, vit_layers=1,
                     vit_heads=2, vit_inter=128)
        n_samples, text_len, side, vit_side = 2, 16, 64, 56
    else:
        sizes = dict(hidden=3584, layers=4, heads=28, kv=4, inter=18944, vocab=152064, vit_hidden=1152,
                     vit_layers=2, vit_heads=16, vit_inter=4304)
        n_samples, text_len, side, vit_side = 8, 256, 512, 378
    cfg = make_cfg(**sizes)
    b, clean, noise = make_batch(cfg, n_samples, text_len, side, vit_side)
    res = {"layers": sizes["layers"], "hidden": sizes["hidden"], "tokens": b.sequence_length}
    from peft import LoraConfig, inject_adapter_in_model

    for name, backend, attn, quant in (("torch+flex", "torch", "flex", None), ("liger+flex", "liger", "flex", None),
                                       ("qlora_nf4+liger+flex+ckpt", "liger", "flex", "nf4")):
        if backend == "liger" and not kernels.liger_available():
            res[name] = "liger unavailable"
            continue
        try:
            kernels.set_backend(backend)
            torch.cuda.empty_cache() if dev.type == "cuda" else None
            m = make_model(cfg, dev, torch.bfloat16)
            if quant:
                from ftkit.models.loading import _quantized_linear

                for layer in m.language_model.model.layers:
                    for parent in (layer.self_attn, layer.mlp, layer.mlp_moe_gen):
                        for attr in list(vars(parent)["_modules"]):
                            mod = getattr(parent, attr)
                            if isinstance(mod, torch.nn.Linear):
                                setattr(parent, attr, _quantized_linear(mod.weight.data.float(), None if mod.bias is None else mod.bias.data, "nf4", torch.bfloat16, dev))
                m.language_model.model.gradient_checkpointing = True
            m.requires_grad_(False)
            regex = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj_moe_gen|mlp_moe_gen\.(gate|up|down)_proj)"
            inject_adapter_in_model(LoraConfig(r=64, lora_alpha=128, target_modules=regex), m)
            m.train()
            n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            t_end = time.perf_counter() + budget_s
            for i in range(6):
                t = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    _, _, loss = step(m, b, clean, noise, attn)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                if time.perf_counter() > t_end and i >= 2:
                    break
            steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            res[name] = {"step_s_median": steady, "first_step_s": times[0], "tokens_per_s": b.sequence_length / steady,
                         "peak_gb": peak, "loss": float(loss), "trainable_M": n_train / 1e6, "steps": len(times)}
            del m, opt
        except Exception as e:  # report and continue with the next configuration
            res[name] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()
    kernels.set_backend("torch")
    record("train_step_7b_width", res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=40)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    record("env", {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                   "liger": kernels.liger_available(), "date": time.strftime("%Y-%m-%d")})
    for fn in (check_liger_parity, check_flex, check_bnb):
        try:
            fn(dev, a.smoke)
        except Exception as e:
            record(fn.__name__, f"failed: {type(e).__name__}: {e}")
            traceback.print_exc()
    throughput(dev, a.smoke, a.budget_s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
