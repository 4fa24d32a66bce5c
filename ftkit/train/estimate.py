"""``ftkit estimate RECIPE``: pre-flight memory estimate before any weight is loaded.

Counts, from the configs alone (llm_config.json / vit_config.json of the model folder, or the
BAGEL-7B defaults when the folder is absent):

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
from ftkit.train.recipe import compose, find_recipe, split_ftkit

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2}
GB = 2**30


def _configs(model: dict) -> tuple[LLMConfig, ViTConfig, int, str]:
    path = Path(model.get("model_path", ""))
    tiny = model.get("tiny")
    if (path / "llm_config.json").is_file():
        vae = 84_000_000
        if (path / "ae.safetensors").is_file():  # count the real autoencoder from its header
            from safetensors import safe_open

            with safe_open(str(path / "ae.safetensors"), "pt") as f:
                vae = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return LLMConfig.from_json(path / "llm_config.json"), ViTConfig.from_json(path / "vit_config.json"), vae, str(path)
    if tiny is not None:
        t = dict(tiny)
        llm = LLMConfig(hidden_size=t.get("hidden", 128), intermediate_size=t.get("intermediate", 256),
                        num_hidden_layers=t.get("layers", 4), num_attention_heads=t.get("heads", 4),
                        num_key_value_heads=t.get("kv_heads", 2), vocab_size=t.get("vocab_size", 1024))
        vit = ViTConfig(hidden_size=t.get("vit_hidden", 64), intermediate_size=t.get("vit_intermediate", 128),
                        num_hidden_layers=t.get("vit_layers", 2), num_attention_heads=t.get("vit_heads", 2))
        return llm, vit, 1_000_000, "tiny (built on first run)"
    return LLMConfig(), ViTConfig(), 84_000_000, "BAGEL-7B-MoT defaults (folder not found)"


def estimate(cfg: dict) -> dict:
    model = cfg.get("model", {})
    data = cfg.get("data", {})
    llm, vit, vae_params, source = _configs(model)
    experts = 3 if model.get("three_experts") or model.get("backbone") == "fox" else 2
    dt = BYTES[model.get("dtype", "bf16")]
    H, Im, Lyr, V = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers, llm.vocab_size
    kv = llm.num_key_value_heads * llm.head_dim
    lin_shapes = [(H, H), (H, kv), (H, kv), (H, H), (H, Im), (H, Im), (Im, H)]  # q k v o gate up down (in, out)
    lin_params = sum(i * o for i, o in lin_shapes) * Lyr * experts
    other_llm = 2 * V * H + Lyr * experts * (2 * H + 2 * llm.head_dim)
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


def estimate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ftkit estimate", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--device-memory", type=float, default=None, help="GB available (default: the CUDA GPU's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    cfg, _ = split_ftkit(compose(find_recipe(a.recipe)))
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
