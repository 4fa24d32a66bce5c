"""Does a decoder trained on the backbone's own latents draw its samples better? (A probe; not shipped.)

    python bench/decoder_on_generated_latents.py --out OUT [--pool 4000] [--steps 2500] [--t0 0.3 0.7] [--lr 2e-4]

Pool: ``--pool`` fresh shapes-world scenes (seed 7: not a training, development or eval seed) are encoded by the
model folder's autoencoder, noised to one t0 ~ U(lo, hi) per batch of 20 on the flow path and sampled back to
t = 0 by the backbone with each scene's prompt and the folder's sampler settings (``SamplerSettings.for_model``:
guidance, interval, renorm; SDEdit). Then the decoder alone (encoder, shift and scale unchanged) trains
``--steps`` steps, batch 16: half pool pairs ``D(z_gen) -> scene``, half fresh reconstructions ``D(E(x)) -> x``,
L1 + L2 as in ``ftkit pretrain-ae``. Writes ``OUT/ae.safetensors`` (the folder's ``ae_config.json`` fits it);
copy the model folder, drop it in, and compare ``ftkit eval shapes --ablation --ablation-modes base`` on
development prompts (BENCHMARKS.md, "Two more decoder-only continuations").
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from ftkit.data.shapes import make_record
from ftkit.files import atomic_write
from ftkit.infer.context import Context, GuidanceContexts, merge_caches
from ftkit.infer.mcot import SamplerSettings, _Text
from ftkit.infer.sampler import guide, latent_grid, velocities
from ftkit.models.bagel import timestep_schedule
from ftkit.models.loading import load_bagel, load_tokenizer
from ftkit.models.release import ae_state_dict_flux
from ftkit.models.vae import AEConfig, load_ae
from ftkit.train.pretrain_ae import shapes_batch

SEED, BATCH = 7, 20


@torch.no_grad()
def generated_pool(folder: str, n: int, lo: float, hi: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw decoder-input latents of the backbone's SDEdit samples, the scenes in [-1, 1])``."""
    model = load_bagel(folder, dtype=torch.bfloat16)
    tx = _Text(model, load_tokenizer(folder))
    s = SamplerSettings.for_model(folder)
    hw = (64, 64)
    gh, gw = latent_grid(model, hw)
    full = timestep_schedule(s.num_timesteps, s.timestep_shift)
    zs, xs_out, t_start = [], [], time.time()
    for b in range(n // BATCH):
        recs = [make_record(b * BATCH + i + 1, SEED, 64, kind="ok") for i in range(BATCH)]
        x = torch.stack([torch.from_numpy(np.asarray(next(iter(im.values())), dtype=np.float32)).permute(2, 0, 1)
                         for _, im in recs]) / 127.5 - 1.0
        toks = [model.patchify(z) for z in model.vae.encode_mean(x.to(model.vae.dtype)).float()]
        t0 = float(torch.empty(1).uniform_(lo, hi, generator=g))
        ts = full[full <= t0]
        ts = torch.cat([torch.tensor([t0]), ts]) if float(ts[0]) < t0 else ts
        xt = [(1 - ts[0]) * z + ts[0] * torch.randn(z.shape, generator=g) for z in toks]
        gcs = [GuidanceContexts(model) for _ in recs]
        for gc, (r, _) in zip(gcs, recs):
            gc.add_user_text(tx.encode(r["prompt"]))
        conds, unconds = [gc.cond for gc in gcs], [Context(model) for _ in recs]
        both, cond_only = merge_caches([c.cache for c in conds + unconds]), merge_caches([c.cache for c in conds])
        for i in range(len(ts) - 1):
            t, dt = ts[i], ts[i] - ts[i + 1]
            if s.cfg_text_scale > 1 and s.cfg_interval[0] < float(t) <= s.cfg_interval[1]:
                vs = velocities(conds + unconds, xt + xt, t, [hw] * (2 * BATCH), merged=both)
                vs = [guide(vs[j], vs[BATCH + j], cfg_text_scale=s.cfg_text_scale, renorm_type=s.cfg_renorm_type,
                            renorm_min=s.cfg_renorm_min) for j in range(BATCH)]
            else:
                vs = velocities(conds, xt, t, [hw] * BATCH, merged=cond_only)
            xt = [a - v * dt for a, v in zip(xt, vs)]
        zs += [model.unpatchify(a.float(), gh, gw) / model.vae.scale_factor + model.vae.shift_factor for a in xt]
        xs_out += list(x)
        if b % 10 == 0:
            print(f"pool {len(zs)}  t0 {t0:.2f}  {time.time() - t_start:.0f} s", flush=True)
    return torch.stack(zs).float(), torch.stack(xs_out).float()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="data/tiny-backbone")
    p.add_argument("--out", required=True)
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--t0", type=float, nargs=2, default=(0.3, 0.7))
    p.add_argument("--lr", type=float, default=2e-4)
    a = p.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    pz, px = generated_pool(a.model, a.pool, *a.t0, g)
    ae = load_ae(Path(a.model) / "ae.safetensors", AEConfig.from_json(Path(a.model) / "ae_config.json"), freeze=False)
    enc, dec = ae.autoencoder.encoder, ae.autoencoder.decoder
    enc.requires_grad_(False)
    opt = torch.optim.AdamW(dec.parameters(), lr=a.lr, weight_decay=0.0)
    t_start = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, len(pz), (8,), generator=g)
        xr = shapes_batch(8, 64, SEED, 100_000 + step)
        with torch.no_grad():
            mu = enc(xr).chunk(2, dim=1)[0]
        target = torch.cat([px[idx], xr])
        xh = dec(torch.cat([pz[idx], mu]))
        loss = (xh - target).abs().mean() + (xh - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                d = dec(pz[:64]) - px[:64]
                print(f"decoder step {step}  loss {loss.item():.4f}  on generated latents {(d.abs().mean() + d.pow(2).mean()).item():.4f}"
                      f"  {time.time() - t_start:.0f} s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "ae.safetensors", save(ae_state_dict_flux(ae), metadata={"format": "pt"}))
    print(f"wrote {out / 'ae.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
