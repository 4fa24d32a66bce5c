"""Benchmark: ftkit's training step against transformers + peft on the same work and the same weights.

    python bench/bench_vs_hf.py [--steps 5] [--tokens 1024] [--dtypes fp32 bf16] [--no-write]

The work (issue "Training step at least as fast as transformers + peft"): a text-only pack of
``--tokens`` tokens with CE on every next token, a decoder of hidden 512, 12 layers, 8 heads, 2 KV heads,
intermediate 1408, vocab 32000, LoRA r16 / alpha 32 on the understanding expert's q/k/v/o and
gate/up/down (1,744,896 trainable parameters on both sides), AdamW.

* ftkit: ``build_random_bagel`` (BAGEL MoT decoder with q/k RMSNorm, two experts; text tokens use the
  understanding expert), ``attach_adapters(AdapterConfig(preset="understanding"))``, the packer's batch,
  ``model(batch)`` + ``per_token_ce`` mean — what ``MCoTModule`` does for a text-only pack.
* transformers: ``Qwen3ForCausalLM`` (the exact equivalent of BAGEL's understanding expert: Qwen2 with
  q/k norms; ``attention_bias=True`` for Qwen2's q/k/v biases, SDPA attention) with the SAME weights
  copied from the ftkit model, ``peft.get_peft_model`` with the same LoRA (A initialised from the same
  seed: both sides' LoRA A are copied from ftkit's, B = 0), ``model(input_ids, labels=...)``.
* Step-0 losses must agree to 1e-6 (fp32) or the benchmark stops. bf16 = weights in bf16 on both
  sides (LoRA A/B fp32, peft's default), losses in fp32.
* Steps alternate between the two sides (ftkit, hf, ftkit, hf, ...) so that load on a shared machine
  hits both alike; the median of ``--steps`` timed steps per side after one warm-up each.

Results: a table on stdout and in BENCHMARKS.md section "## ftkit vs transformers + peft (CPU step)".
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
SECTION = "## ftkit vs transformers + peft (CPU step)"
SHAPE = dict(vocab_size=32000, hidden=512, layers=12, heads=8, kv_heads=2, intermediate=1408, vit_hidden=32,
             vit_layers=1, vit_heads=2, vit_intermediate=64, max_latent_size=8, vit_max=8)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_ftkit(dtype: torch.dtype):
    from ftkit.adapters.attach import attach_adapters
    from ftkit.adapters.config import AdapterConfig
    from ftkit.models.release import build_random_bagel, tiny_ae_config, tiny_bagel_config

    cfg = tiny_bagel_config(**SHAPE, special_ids={"bos_id": 1, "eos_id": 2, "start_of_image": 3, "end_of_image": 4})
    model = build_random_bagel(cfg, tiny_ae_config(), seed=0)
    attach_adapters(model, AdapterConfig(method="lora", preset="understanding", r=16, alpha=32.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" not in n:
                p.data = p.data.to(dtype)
            elif ".lora_B." in n:  # B = 0 would leave A without gradient at step 0; same values on both sides
                p.normal_(0, 0.01)
    return model


def build_hf(ft_model, dtype: torch.dtype):
    """Qwen3ForCausalLM + peft LoRA holding exactly ftkit's understanding-expert weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    llm = ft_model.cfg.llm
    cfg = Qwen3Config(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                      num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
                      num_key_value_heads=llm.num_key_value_heads, head_dim=llm.hidden_size // llm.num_attention_heads,
                      rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta, attention_bias=True,
                      tie_word_embeddings=False, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    hf = Qwen3ForCausalLM(cfg)
    src = {n.removeprefix("language_model."): p for n, p in ft_model.named_parameters()}
    base = {n.replace(".base_layer", ""): p for n, p in src.items() if ".lora_" not in n and "_moe_gen" not in n}
    missing = []
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n not in base:
                if n.endswith("o_proj.bias"):  # Qwen3's attention_bias also gives o_proj a bias; Qwen2 has none
                    p.zero_()
                else:
                    missing.append(n)
                continue
            p.copy_(base[n].float())
    if missing:
        raise RuntimeError(f"no ftkit weight for {missing[:5]}")
    hf = hf.to(dtype)
    peft_model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    lora = {n: p for n, p in src.items() if ".lora_" in n}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_" in n:
                key = n.removeprefix("base_model.model.")
                p.copy_(lora[key].to(p.dtype))
    return peft_model


def make_work(ft_model, tokens: int):
    from ftkit.data.packer import pack
    from ftkit.segments import Kind, Segment
    from ftkit.testing import pack_config_for

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, ft_model.cfg.llm.vocab_size, (tokens - 2,), generator=g).tolist()  # + bos/eos
    batch = pack([[Segment(Kind.TEXT, text_ids=ids, loss=True)]], pack_config_for(ft_model.cfg))
    if batch.text_indexes.numel() != batch.sequence_length or not torch.equal(
            batch.position_ids, torch.arange(batch.sequence_length)):
        raise RuntimeError("a text-only pack should be all text at positions 0..L-1")
    input_ids = torch.empty(1, batch.sequence_length, dtype=torch.long)
    input_ids[0, batch.text_indexes] = batch.text_ids
    labels = torch.full_like(input_ids, -100)
    labels[0, batch.ce_indexes + 1] = batch.ce_labels  # HF shifts: logits[i] predicts labels[i + 1]
    return batch, input_ids, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ftkit.models import kernels
    from ftkit.train.losses import per_token_ce

    kernels.set_backend("torch")
    rows = []
    for name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        ft = build_ftkit(dtype)
        hf = build_hf(ft, dtype)
        ft.train()
        hf.train()
        batch, input_ids, labels = make_work(ft, args.tokens)
        head = ft.language_model.lm_head.weight
        sides = {}
        for side, model in (("ftkit", ft), ("hf", hf)):
            params = [p for p in model.parameters() if p.requires_grad]
            sides[side] = {"params": params, "opt": torch.optim.AdamW(params, lr=1e-4), "times": [], "losses": []}
        n_ft, n_hf = (sum(p.numel() for p in sides[s]["params"]) for s in ("ftkit", "hf"))
        if n_ft != n_hf:
            raise RuntimeError(f"trainable parameters differ: ftkit {n_ft}, hf {n_hf}")

        def step_ftkit(ft=ft, batch=batch, head=head):
            out = ft(batch, attn_impl="sdpa")
            return per_token_ce(out.ce_hidden, head, batch.ce_labels).mean()

        def step_hf(hf=hf, input_ids=input_ids, labels=labels):
            return hf(input_ids=input_ids, labels=labels).loss.float()

        fns = {"ftkit": step_ftkit, "hf": step_hf}
        for i in range(args.steps + 1):
            for side in ("ftkit", "hf") if i % 2 == 0 else ("hf", "ftkit"):
                s = sides[side]
                t0 = time.perf_counter()
                loss = fns[side]()
                loss.backward()
                s["opt"].step()
                s["opt"].zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                s["losses"].append(float(loss))
                if i:
                    s["times"].append(dt)
            if i == 0:
                d = abs(sides["ftkit"]["losses"][0] - sides["hf"]["losses"][0])
                tol = 1e-6 if dtype == torch.float32 else 2e-2
                print(f"{name}: step-0 loss ftkit {sides['ftkit']['losses'][0]:.7f} hf {sides['hf']['losses'][0]:.7f} "
                      f"(|diff| {d:.2e}, tolerance {tol:g})")
                if d > tol:
                    raise RuntimeError("the two sides do not compute the same loss")
        t_ft, t_hf = (statistics.median(sides[s]["times"]) for s in ("ftkit", "hf"))
        rows.append({"dtype": name, "tokens": batch.sequence_length, "trainable": n_ft, "ftkit_s": t_ft, "hf_s": t_hf,
                     "speedup": t_hf / t_ft, "loss0": sides["ftkit"]["losses"][0],
                     "loss0_diff": abs(sides["ftkit"]["losses"][0] - sides["hf"]["losses"][0]),
                     "ft_all": sides["ftkit"]["times"], "hf_all": sides["hf"]["times"]})
        print(f"{name}: ftkit {t_ft:.3f} s/step, transformers+peft {t_hf:.3f} s/step -> ftkit is {t_hf / t_ft:.2f}x")

    load = os.getloadavg()[0]
    lines = [f"`python bench/bench_vs_hf.py --steps {args.steps}` on {platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {datetime.date.today().isoformat()}; load average at the end {load:.1f} "
             f"(the machine {'was shared with other jobs' if load > 1.5 else 'was quiet'}). Same weights, same "
             f"{rows[0]['tokens']}-token text-only pack, LoRA r16 on the understanding expert "
             f"({rows[0]['trainable']:,} trainable both sides), steps interleaved, medians of {args.steps}.",
             "", "| dtype | ftkit s/step | transformers + peft s/step | ftkit speed vs HF | step-0 loss (abs diff) |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['ftkit_s']:.3f} | {r['hf_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['loss0']:.6f} ({r['loss0_diff']:.1e}) |")
    body = "\n".join(lines)
    print("\n" + body)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
