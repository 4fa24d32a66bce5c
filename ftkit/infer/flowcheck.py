"""Denoising quality by timestep: where a flow model fails, measured before any sampling.

For held-out (prompt, image) pairs (the image: the record's last image, its final answer):
x0 = the VAE posterior mean latent as tokens, eps ~ N(0, I) seeded per pair, and for each t::

    x_t        = (1 - t) x0 + t eps                      (the training path, convention of ftkit.models.bagel)
    mse_cond   = mean over tokens and channels of (v(x_t, t | prompt) - (eps - x0))^2
    mse_uncond = the same with the text-CFG context (no prompt: plain text-to-image's unconditional branch)
    text_gain  = mse_uncond - mse_cond                   (what the prompt buys the denoiser; ~0 = ignored)
    x0_hat     = x_t - t v(x_t, t | prompt)              (decoded into a contact sheet, one column per t)

Reading it: sampling integrates from t = 1, so the layout and the identity of each object are decided at
high t. A model whose x0_hat is good at t <= 0.7 while at t = 0.9 it is already sharp fragments rather
than a blurred layout draws blobs: it saw too little training at high noise (training t = sigmoid(N(0, 1))
puts 1.4% of draws above 0.9; a training timestep shift of 3, t' = 3t / (1 + 2t), puts 13.6% there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def target_image(record):
    """The record's last image (its final answer: the refinement, else the draft); ValueError when it has none."""
    from ftkit.data.schema import DraftStep, RefineStep

    images = [s.image for s in record.steps if isinstance(s, (DraftStep, RefineStep))]
    if not images:
        raise ValueError(f"{record.source}: record {record.index} ({record.id}): no draft or refine image")
    return images[-1]


@torch.no_grad()
def flow_by_timestep(model, tokenizer, records: Sequence, timesteps: Sequence[float] = DEFAULT_TIMESTEPS, *,
                     image_hw: tuple[int, int] = (64, 64), seed: int = 0, sheet_rows: int = 8):
    """Velocity error per timestep on ``records`` (module docstring).

    Returns ``(result, sheet)``: ``result`` = ``{"timesteps", "mse_cond", "mse_uncond", "text_gain", "n",
    "per_record": [{"id", "mse_cond": [...], "mse_uncond": [...]}]}``; ``sheet`` = PIL image, one row per
    pair (the first ``sheet_rows``): the image, then x0_hat decoded at each t.

    Raises:
        ValueError: no records, a timestep outside (0, 1], a record without an image.
    """
    from PIL import Image

    from ftkit.data.builder import pil_to_tensor
    from ftkit.infer.context import GuidanceContexts
    from ftkit.infer.mcot import _Text
    from ftkit.infer.sampler import decode_image, to_pil, velocities

    ts = [float(t) for t in timesteps]
    if not records:
        raise ValueError("flow_by_timestep: no records")
    if not ts or any(not 0.0 < t <= 1.0 for t in ts):
        raise ValueError(f"timesteps must be in (0, 1], got {ts}")
    hw = tuple(image_hw)
    tx = _Text(model, tokenizer)
    per, rows = [], []
    for i, rec in enumerate(records):
        image = pil_to_tensor(target_image(rec).open(), hw)  # the training path's conversion
        gc = GuidanceContexts(model)
        gc.add_user_text(tx.encode(rec.prompt))
        x0 = model.patchify(gc.cond.vae_latent(image, posterior="mean")).float().cpu()
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + i))
        x_ts = [(1 - t) * x0 + t * eps for t in ts]
        vs = [velocities([gc.cond, gc.uncond_text], [x, x], t, [hw, hw]) for t, x in zip(ts, x_ts)]  # both branches
        v_cond, v_unc = [v[0].cpu() for v in vs], [v[1].cpu() for v in vs]
        target = eps - x0
        per.append({"id": rec.id,
                    "mse_cond": [float(((v - target) ** 2).mean()) for v in v_cond],
                    "mse_uncond": [float(((v - target) ** 2).mean()) for v in v_unc]})
        if len(rows) < sheet_rows:
            rows.append([to_pil(image)] + [decode_image(model, x - t * v, hw) for t, x, v in zip(ts, x_ts, v_cond)])
    n = len(per)
    mean = lambda key, j: sum(p[key][j] for p in per) / n  # noqa: E731
    mc = [mean("mse_cond", j) for j in range(len(ts))]
    mu = [mean("mse_uncond", j) for j in range(len(ts))]
    result = {"timesteps": ts, "mse_cond": mc, "mse_uncond": mu, "text_gain": [u - c for c, u in zip(mc, mu)],
              "n": n, "image_hw": list(hw), "seed": seed, "per_record": per}
    H, W = hw
    sheet = Image.new("RGB", (W * (len(ts) + 1), H * len(rows)), "black")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (W * c, H * r))
    return result, sheet


def flow_markdown(res: dict) -> str:
    """The per-timestep table of :func:`flow_by_timestep`'s result."""
    head = "| t | " + " | ".join(f"{t:g}" for t in res["timesteps"]) + " |"
    sep = "|---|" + "---:|" * len(res["timesteps"])
    line = lambda name, xs: f"| {name} | " + " | ".join(f"{x:.4f}" for x in xs) + " |"  # noqa: E731
    return "\n".join([
        f"# Velocity error by timestep ({res['n']} pairs, {res['image_hw'][0]}x{res['image_hw'][1]} px, seed {res['seed']})",
        "", head, sep, line("mse cond", res["mse_cond"]), line("mse uncond", res["mse_uncond"]),
        line("text gain", res["text_gain"]), "",
        "sheet.png: per pair, the image, then x0_hat = x_t - t v decoded at each t.", ""])


__all__ = ["DEFAULT_TIMESTEPS", "flow_by_timestep", "flow_markdown", "target_image"]
