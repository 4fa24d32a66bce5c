"""``ftkit estimate RECIPE``: pre-flight memory estimate before any weight is loaded.

Counts, from the configs alone (the model folder's configs: BAGEL release, sharded or FoX folder; when
the folder is absent, the published shapes of the recipe's backbone: BAGEL-7B-MoT, or for FoX Qwen2-0.5B
+ SigLIP so400m). Takes the same ``--section.key value`` overrides as ``ftkit fit``:

* weights by dtype: decoder Linear layers of every expert (bf16: 2 B/param; nf4: 0.5 B/param + one
  fp32 absmax per 64 weights, double-quantised ~0.127 bit/param; int8: 1 B/param), the rest (embeddings,
  lm_head, norms, ViT, connectors) in the compute dtype, the FLUX VAE (84M params);
* adapters: r * (in + out) per targeted Linear, fp32; AdamW state: 2 x fp32 per trainable param
  + fp32 gradients;
* activations at the recipe's token budget: per decoder layer and token, the tensors saved for
  backward (~(7 H + 2 kv + 4 I) values: norms, q/k/v, attention output, residuals, SwiGLU's gate/up/
  product; flash/flex attention keeps no L x L scores); with gradient checkpointing only each layer's
  input (H values) plus one layer recomputed; and the chunked CE's chunk x vocab fp32 logits (x2).
The device is the first CUDA GPU when present (else ``--device-memory GB``); the estimate warns when
the total will not fit.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ftkit.models.config import LLMConfig, ViTConfig
from ftkit.models.folders import dtype_bytes
from ftkit.train.recipe import compose, find_recipe, split_ftkit

GB = 2**30


# Qwen2-0.5B (the FoX recipe's source decoder): hidden 896, 24 layers, 14 heads, 2 KV heads, tied embeddings
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936)


def _configs(model: dict) -> tuple[LLMConfig, ViTConfig, int, str]:
    path = Path(model.get("model_path", ""))
    tiny = model.get("tiny")
    if path.is_dir() and any((path / f).is_file() for f in ("llm_config.json", "config.json")):
        from ftkit.models.folders import read_model_config

        cfg = read_model_config(path)
        vae = 84_000_000
        for ae in (path / "ae.safetensors", path / "vae" / "diffusion_pytorch_model.safetensors"):
            if ae.is_file():  # count the real autoencoder from its header
                from safetensors import safe_open

                with safe_open(str(ae), "pt") as f:
                    vae = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
                break
        return cfg.llm, cfg.vit, vae, str(path)
    if tiny is not None:
        t = dict(tiny)
        llm = LLMConfig(hidden_size=t.get("hidden", 128), intermediate_size=t.get("intermediate", 256),
                        num_hidden_layers=t.get("layers", 4), num_attention_heads=t.get("heads", 4),
                        num_key_value_heads=t.get("kv_heads", 2), vocab_size=t.get("vocab_size", 1024))
        vit = ViTConfig(hidden_size=t.get("vit_hidden", 64), intermediate_size=t.get("vit_intermediate", 128),
                        num_hidden_layers=t.get("vit_layers", 2), num_attention_heads=t.get("vit_heads", 2))
        return llm, vit, 1_000_000, "tiny (built on first run)"
    if model.get("backbone") == "fox":
        return (LLMConfig(**QWEN2_05B, tie_word_embeddings=True), ViTConfig(), 84_000_000,
                "FoX from Qwen2-0.5B + SigLIP so400m (published shapes; folder not found)")
    return LLMConfig(), ViTConfig(), 84_000_000, "BAGEL-7B-MoT defaults (folder not found)"


def estimate(cfg: dict) -> dict:
    model = cfg.get("model", {})
    data = cfg.get("data", {})
    llm, vit, vae_params, source = _configs(model)
    experts = 3 if model.get("three_experts") or model.get("backbone") == "fox" else 2
    dt = dtype_bytes(model.get("dtype", "bf16"))
    H, Im, Lyr, V = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers, llm.vocab_size
    kv = llm.num_key_value_heads * llm.head_dim
    lin_shapes = [(H, H), (H, kv), (H, kv), (H, H), (H, Im), (H, Im), (Im, H)]  # q k v o gate up down (in, out)
    lin_params = sum(i * o for i, o in lin_shapes) * Lyr * experts
    other_llm = (1 if llm.tie_word_embeddings else 2) * V * H + Lyr * experts * (2 * H + 2 * llm.head_dim)
    vit_params = vit.num_hidden_layers * (4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size) \
        + 588 * vit.hidden_size
    conn = vit.hidden_size * H + H * H + 2 * 64 * H + 256 * H + H * H
    q = model.get("quantize")
    per = {None: dt, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / H}[q]
    weights = lin_params * per + (other_llm + vit_params + conn + vae_params) * dt
    ad = model.get("adapter") or {}
    r = int(ad.get("r", 16))
    preset = ad.get("preset", "generative")
    n_exp_targeted = {"generative": 1, "understanding": experts - 1, "all-experts": experts}.get(preset, experts)
    targets = lin_shapes if ad.get("include_mlp", True) else lin_shapes[:4]
    adapter_params = 0 if model.get("full_finetune") else sum(r * (i + o) for i, o in targets) * Lyr * n_exp_targeted
    trainable = lin_params + conn if model.get("full_finetune") else adapter_params
    optim = trainable * (4 + 4 + 4) + (trainable * (4 if model.get("full_finetune") and dt == 2 else 0))
    adapters = adapter_params * 4
    tokens = int(data.get("token_budget", 2048))
    ckpt = bool(model.get("gradient_checkpointing"))
    act_b = 4 if dt == 4 else 2
    full_layer = (7 * H + 2 * kv + 4 * Im) * act_b  # tensors one layer saves for backward, per token
    per_layer_tok = H * act_b if ckpt else full_layer  # checkpointing keeps only each layer's input
    act = tokens * Lyr * per_layer_tok + (tokens * full_layer if ckpt else 0) \
        + int(model.get("ce_chunk_size", 1024)) * V * 4 * 2
    total = weights + adapters + optim + act
    return {"source": source, "experts": experts, "quantize": q, "dtype": model.get("dtype", "bf16"),
            "weights_gb": weights / GB, "adapters_gb": adapters / GB, "optimizer_grads_gb": optim / GB,
            "activations_gb": act / GB, "total_gb": total / GB, "tokens": tokens, "trainable_params": trainable,
            "gradient_checkpointing": ckpt}


def apply_overrides(cfg: dict, args: list[str]) -> dict:
    """``--model.model_path X --data.token_budget 8192`` (or ``--a.b=X``) into ``cfg``; values parsed as YAML."""
    import yaml

    from ftkit.train.recipe import RecipeError

    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise RecipeError(f"override {arg!r}: expected --section.key VALUE (e.g. --data.token_budget 8192)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise RecipeError(f"override {arg}: missing value")
        node = cfg
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override --{key}: {k} is not a section")
        node[leaf] = yaml.safe_load(value)
    return cfg


def estimate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ftkit estimate", description=__doc__.splitlines()[0],
                                 epilog="any other --section.key VALUE overrides the recipe, as with ftkit fit "
                                        "(e.g. --model.model_path /data/BAGEL-7B-MoT --data.token_budget 8192)")
    ap.add_argument("recipe")
    ap.add_argument("--device-memory", type=float, default=None, help="GB available (default: the CUDA GPU's)")
    ap.add_argument("--json", action="store_true")
    a, rest = ap.parse_known_args(argv)
    cfg, _ = split_ftkit(compose(find_recipe(a.recipe)))
    apply_overrides(cfg, rest)
    e = estimate(cfg)
    mem = a.device_memory
    if mem is None:
        import torch

        if torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(0).total_memory / GB
    if a.json:
        print(json.dumps(e | {"device_memory_gb": mem}, indent=2))
    else:
        print(f"recipe {a.recipe}: {e['source']}, {e['experts']} experts, {e['dtype']}, quantize={e['quantize']}")
        for k in ("weights_gb", "adapters_gb", "optimizer_grads_gb", "activations_gb", "total_gb"):
            print(f"  {k[:-3]:<18} {e[k]:8.2f} GB")
        print(f"  trainable params   {e['trainable_params'] / 1e6:8.1f} M   tokens/step {e['tokens']}")
    if mem is not None and e["total_gb"] > mem:
        print(f"WARNING: estimated {e['total_gb']:.1f} GB will not fit the device's {mem:.1f} GB "
              "(lower data.token_budget, enable model.gradient_checkpointing, or use quantize: nf4)")
        return 1
    return 0
