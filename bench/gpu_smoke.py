"""CUDA smoke checks of the library paths CI cannot run (lent GPU only):

    FTKIT_BAGEL_FIXTURE=PATH python bench/gpu_smoke.py

1. fixture parity on CUDA in fp32 with flex attention (training path) vs upstream's expected tensors;
2. the same model in bf16 (drift against the fp32 reference);
3. NF4 load on CUDA + LoRA forward/backward;
4. inference on CUDA: a guided t2i image and one MCoT round (mechanics), bf16.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftkit.data.packer import pack  # noqa: E402
from ftkit.models.loading import load_bagel, load_tokenizer  # noqa: E402
from ftkit.testing import fixture_segments, pack_config_for  # noqa: E402

FX = Path(os.environ.get("FTKIT_BAGEL_FIXTURE", Path(__file__).resolve().parents[2] / "shared/fixtures/bagel-tiny"))
dev = torch.device("cuda")
res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
inp, exp = load_file(FX / "inputs.safetensors"), load_file(FX / "expected.safetensors")
meta = json.loads((FX / "inputs.json").read_text())
shift = meta["bagel_config"]["timestep_shift"]

for dtype, impl in ((torch.float32, "flex"), (torch.float32, "sdpa"), (torch.bfloat16, "flex")):
    m = load_bagel(FX, dtype=dtype, device=dev, timestep_shift=shift)
    b = pack([fixture_segments(FX, inp)], pack_config_for(m.cfg)).to(dev)
    with torch.no_grad():
        out = m(b, return_logits=True, flow_noise=inp["flow_noise"].to(dev),
                vae_posterior_eps=[e.to(dev) for e in inp["vae_posterior_eps"]], attn_impl=impl)
    key = f"{str(dtype).split('.')[-1]}_{impl}"
    res[key] = {name: (t.float().cpu() - exp[ref]).abs().max().item() for name, t, ref in (
        ("last_hidden_state", out.hidden, "last_hidden_state"), ("ce_logits", out.ce_logits, "ce_logits"),
        ("velocity_pred", out.velocity_pred, "velocity_pred"))}
    print(key, res[key], flush=True)

from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

m4 = load_bagel(FX, dtype=torch.bfloat16, device=dev, quantize="nf4")
inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=r".*self_attn\.(q|v)_proj(_moe_gen)?"), m4)
for n, p in m4.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(p, std=0.02)
m4.train()
b = pack([fixture_segments(FX, inp)], pack_config_for(m4.cfg)).to(dev)
out = m4(b, flow_noise=inp["flow_noise"].to(dev), vae_posterior_eps=[e.to(dev) for e in inp["vae_posterior_eps"]])
loss = (out.velocity_pred.float() - out.velocity_target.float()).pow(2).mean() + out.ce_hidden.float().pow(2).mean()
loss.backward()
gl = [p.grad for n, p in m4.named_parameters() if "lora_" in n]
res["nf4_cuda_lora"] = {"loss": loss.item(), "lora_grads": len(gl), "all_finite": all(torch.isfinite(g).all().item() for g in gl),
                        "nonzero": sum(int(g.abs().sum() > 0) for g in gl)}
print("nf4", res["nf4_cuda_lora"], flush=True)

from ftkit.infer.mcot import SamplerSettings, TextSettings, run_mcot, text_to_image  # noqa: E402

mb = load_bagel(FX, dtype=torch.bfloat16, device=dev)
tok = load_tokenizer(FX)
t = time.perf_counter()
img = text_to_image(mb, tok, "a red cube", image_hw=(32, 48), sampler=SamplerSettings(num_timesteps=10),
                    generator=torch.Generator().manual_seed(0))
res["t2i_bf16"] = {"size": list(img.size), "s": round(time.perf_counter() - t, 2)}
t = time.perf_counter()
tr = run_mcot(mb, tok, "a red cube", rounds=2, image_hw=(32, 32), sampler=SamplerSettings(num_timesteps=6),
              text=TextSettings(max_plan_tokens=12, max_reflect_tokens=12), generator=torch.Generator().manual_seed(0))
res["mcot_bf16"] = {"rounds": len(tr.rounds), "final": list(tr.final_image.size), "s": round(time.perf_counter() - t, 2)}
print(json.dumps(res, indent=1))
out_dir = Path(os.environ.get("OUT", "bench/out"))
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "gpu_smoke.json").write_text(json.dumps(res, indent=1))
