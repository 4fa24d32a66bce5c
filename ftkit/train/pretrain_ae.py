"""``ftkit pretrain-ae``: train the tiny autoencoder of the shapes world, resumably, on a CPU.

The autoencoder is a diffusers ``AutoencoderKL`` in ftkit's FLUX layout (:func:`build_autoencoder`) with
``levels`` resolution levels, i.e. stride ``2 ** (levels - 1)``: 64 px images with stride 4 give a 16 x 16
latent, 8 x 8 = 64 BAGEL image tokens after 2 x 2 patching. Each step draws fresh shapes-world scenes
(``default_rng([seed, step])``, tags round-robin) and minimises

    L = mean |x_hat - x| + mean (x_hat - x)^2 + kl * mean KL(N(mu, sigma) || N(0, 1))

with ``x_hat = D(mu + sigma * eps)``. The run folder holds ``state.pt`` (weights, optimiser, step,
seconds trained), replaced atomically (temporary file + ``os.replace``) every ``ckpt_minutes``; a second
start continues from it. ``export`` writes ``ae.safetensors`` (FLUX key names) + ``ae_config.json`` with
``shift_factor``/``scale_factor`` set from the latent mean and standard deviation (so BAGEL's latents are
about unit-variance), which :func:`ftkit.models.vae.load_ae` and ``load_bagel`` read back.

``decoder_only`` continues an exported autoencoder (``init``: its folder) with the encoder frozen: only
``D`` learns, so the latent space, and the shift / scale fitted from the encoder, stay exactly those a
backbone was pretrained on, while reconstructions (and that backbone's samples) sharpen. Its run keeps the
``init`` folder's ``shift_factor`` / ``scale_factor`` (``state.pt``'s ``latent``) and ``export`` writes those
rather than refitting them, so a continuation with another ``seed`` (fresh scenes) keeps them too.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ftkit.files import atomic_write
from ftkit.models.vae import AEConfig, FluxAE, build_autoencoder

log = logging.getLogger("ftkit")


@dataclass
class AERecipe:
    """Shape and optimisation of the tiny autoencoder (stored in ``state.pt``; a resume must match)."""

    size: int = 64
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    z_channels: int = 16
    batch: int = 16
    lr: float = 1e-3
    kl: float = 1e-6
    seed: int = 0
    decoder_only: bool = False  # train D only, E frozen (a continuation of ``init``; module docstring)

    def ae_config(self, scale: float = 1.0, shift: float = 0.0) -> AEConfig:
        return AEConfig(resolution=self.size, in_channels=3, downsample=2 ** (len(self.ch_mult) - 1), ch=self.ch,
                        out_ch=3, ch_mult=list(self.ch_mult), num_res_blocks=1, z_channels=self.z_channels,
                        scale_factor=scale, shift_factor=shift)


def shapes_batch(n: int, size: int, seed: int, step: int) -> torch.Tensor:
    """``n`` fresh correct shapes-world scenes as ``[n, 3, size, size]`` in [-1, 1] (deterministic in seed, step)."""
    from ftkit.data.shapes import TAGS, generate_scene, render

    rng = np.random.default_rng([seed, step])
    imgs = [np.asarray(render(generate_scene(rng, TAGS[(step * n + i) % len(TAGS)], size)), dtype=np.float32)
            for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _save_atomic(obj, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _init_from(ae: torch.nn.Module, recipe: AERecipe, folder: str | Path) -> dict:
    """Load an exported autoencoder (``folder/ae.safetensors`` + ``ae_config.json``) into ``ae``; its shape
    must be the recipe's. Returns its latent statistics ``{"shift": .., "scale": ..}``."""
    from ftkit.errors import FtkitError
    from ftkit.models.vae import AEConfig, load_ae

    folder = Path(folder)
    cfg = AEConfig.from_json(folder / "ae_config.json")
    mine = recipe.ae_config()
    shape = ("resolution", "downsample", "ch", "ch_mult", "num_res_blocks", "z_channels")
    if any(getattr(cfg, k) != getattr(mine, k) for k in shape):
        raise FtkitError(f"{folder / 'ae_config.json'}: shape {[getattr(cfg, k) for k in shape]} differs from the "
                         f"recipe's {[getattr(mine, k) for k in shape]} ({', '.join(shape)})")
    ae.load_state_dict(load_ae(folder / "ae.safetensors", cfg, freeze=False).autoencoder.state_dict())
    return {"shift": cfg.shift_factor, "scale": cfg.scale_factor}


def _recipe_of(state: dict) -> dict:
    """A saved recipe with the fields added since it was written at their defaults."""
    return {**asdict(AERecipe()), **state["recipe"], "ch_mult": tuple(state["recipe"]["ch_mult"])}


def train(run: str | Path, recipe: AERecipe, *, minutes: float, max_steps: int = 0, ckpt_minutes: float = 3.0,
          init: str | Path | None = None) -> dict:
    """Train (or continue) the autoencoder in ``run`` for ``minutes`` of wall time or until ``max_steps``.

    ``init``: an exported autoencoder folder to start a new run from (ignored when ``run`` has a state);
    needed by ``recipe.decoder_only``. Returns the state's summary ``{step, seconds, loss}``. A resume with a
    different recipe is refused.
    """
    from ftkit.errors import FtkitError

    run = Path(run)
    state_path = run / "state.pt"
    if recipe.decoder_only and init is None and not state_path.is_file():
        raise FtkitError(f"{run}: decoder_only continues an exported autoencoder: pass its folder as init")
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    ae = build_autoencoder(recipe.ae_config())
    if recipe.decoder_only:
        ae.encoder.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=0.0)
    step, seconds, loss_ema, latent = 0, 0.0, None, None
    if not state_path.is_file() and init is not None:
        stats = _init_from(ae, recipe, init)
        latent = stats if recipe.decoder_only else None  # the encoder stays: so do its latents' statistics
        log.info("new run %s from %s%s", run, init, " (decoder only)" if recipe.decoder_only else "")
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if _recipe_of(st) != asdict(recipe):
            raise FtkitError(f"{state_path}: recipe differs from the run's ({st['recipe']}); use another run folder")
        ae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, seconds, loss_ema, latent = st["step"], st["seconds"], st["loss"], st.get("latent")
        log.info("resuming %s at step %d (%.0f s trained)", run, step, seconds)
    ae.train()
    t0 = last_ckpt = time.monotonic()
    base = seconds

    def save() -> None:
        _save_atomic({"recipe": asdict(recipe), "model": ae.state_dict(), "opt": opt.state_dict(), "step": step,
                      "seconds": seconds, "loss": loss_ema, "latent": latent}, state_path)

    while (not max_steps or step < max_steps) and time.monotonic() - t0 < minutes * 60:
        x = shapes_batch(recipe.batch, recipe.size, recipe.seed, step)
        with torch.set_grad_enabled(not recipe.decoder_only):
            mu, logvar = ae.encoder(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        xh = ae.decoder(z)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = (xh - x).abs().mean() + (xh - x).pow(2).mean() + recipe.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_ema = float(loss.detach()) if loss_ema is None else 0.98 * loss_ema + 0.02 * float(loss.detach())
        seconds = base + time.monotonic() - t0
        if step % 50 == 0:
            log.info("ae step %d  loss %.4f  %.0f s", step, loss_ema, seconds)
        if time.monotonic() - last_ckpt > ckpt_minutes * 60:
            save()
            last_ckpt = time.monotonic()
    save()
    return {"step": step, "seconds": round(seconds, 1), "loss": loss_ema}


def load_run(run: str | Path) -> tuple[FluxAE, AERecipe, dict]:
    """The run's autoencoder as a :class:`FluxAE` (eval mode), its recipe and state. Latent statistics: those a
    decoder-only run inherited from its ``init`` folder, else fitted to 256 scenes of seed ``recipe.seed + 10000``."""
    st = torch.load(Path(run) / "state.pt", map_location="cpu", weights_only=True)
    recipe = AERecipe(**_recipe_of(st))
    ae = build_autoencoder(recipe.ae_config())
    ae.load_state_dict(st["model"])
    ae.eval().requires_grad_(False)
    if st.get("latent"):
        shift, scale = st["latent"]["shift"], st["latent"]["scale"]
    else:
        with torch.no_grad():
            mu = ae.encoder(shapes_batch(256, recipe.size, recipe.seed + 10_000, 0)).chunk(2, dim=1)[0]
        shift, scale = float(mu.mean()), float(1.0 / mu.std())
    return FluxAE(ae, recipe.ae_config(scale=scale, shift=shift)), recipe, st


def export(run: str | Path, out: str | Path) -> Path:
    """Write ``out/ae.safetensors`` (FLUX names, fp32) + ``out/ae_config.json`` from the run's latest state."""
    from safetensors.torch import save

    from ftkit.models.release import ae_state_dict_flux

    ae, _, st = load_run(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "ae.safetensors", save(ae_state_dict_flux(ae), metadata={"format": "pt", "step": str(st["step"])}))
    (out / "ae_config.json").write_text(json.dumps(ae.config.to_dict(), indent=2))
    return out


@torch.no_grad()
def agreement(ae: FluxAE, n: int = 300, seed: int = 1, size: int = 64) -> dict:
    """Evaluator agreement on reconstructions: every image of ``n`` shapes-world records of seed ``seed``
    (broken drafts and correct renders) is judged as rendered and as ``D(E_mean(x))``; returns the fraction
    of images whose verdicts agree, overall and per tag, and the pass rates of both."""
    from PIL import Image

    from ftkit.data.geneval import evaluate_image
    from ftkit.data.shapes import make_record

    same: dict[str, list[bool]] = {}
    p_orig = p_rec = 0
    for i in range(1, n + 1):
        rec, images = make_record(i, seed, size)
        for img in images.values():  # the draft, and the correct render when the draft is broken
            x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
            xh = ae.decode(ae.encode_mean(x))[0].clamp(-1, 1)
            rimg = Image.fromarray(((xh.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
            a, b = evaluate_image(img, rec["meta"])[0], evaluate_image(rimg, rec["meta"])[0]
            p_orig += a
            p_rec += b
            same.setdefault(rec["meta"]["tag"], []).append(a == b)
    flat = [v for vs in same.values() for v in vs]
    return {"agreement": sum(flat) / len(flat), "images": len(flat), "pass_original": p_orig / len(flat),
            "pass_reconstruction": p_rec / len(flat), "by_tag": {t: sum(v) / len(v) for t, v in same.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftkit pretrain-ae", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (state.pt; resumed when present)")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of this start")
    p.add_argument("--max-steps", type=int, default=0, help="stop at this total step count (0: no limit)")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ch", type=int, default=32)
    p.add_argument("--levels", type=int, default=3, help="resolution levels: stride 2**(levels-1)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start a new run from this exported autoencoder folder")
    p.add_argument("--decoder-only", action="store_true",
                   help="train the decoder only (encoder frozen: the latent space a backbone was trained on is kept)")
    p.add_argument("--export", default=None, help="write ae.safetensors + ae_config.json here afterwards")
    p.add_argument("--eval", type=int, default=0, help="evaluator agreement on N records afterwards")
    p.add_argument("--eval-seed", type=int, default=1, help="the records' seed (1: the evaluator's; 1011: held out)")
    a = p.parse_args(argv)
    mult = (1,) + (2,) * (a.levels - 1)
    recipe = AERecipe(ch=a.ch, ch_mult=mult, batch=a.batch, lr=a.lr, seed=a.seed, decoder_only=a.decoder_only)
    summary = train(a.run, recipe, minutes=a.minutes, max_steps=a.max_steps, ckpt_minutes=a.ckpt_minutes, init=a.init)
    if a.export:
        export(a.run, a.export)
    if a.eval:
        summary["eval"] = agreement(load_run(a.run)[0], n=a.eval, seed=a.eval_seed)
    print(json.dumps(summary))
    return 0
