"""How well does the correction repair the drafts it was trained on? A diagnostic of the corrector alone.

    python bench/correction_teacher_forced.py --model data/tiny-backbone --adapter runs/tiny-mcot/latest/adapter \
        --data DIR [--n 100] [--inpaint auto|path|clean]

For each shapes-world record of ``DIR/records.jsonl`` (``ftkit data shapes --out DIR --seed 3``: not a
training or an eval seed) that has a refinement, the context is the record's own prompt, plan, rendered
(wrong) draft and reflection -- teacher forcing, as in training -- and the correction is sampled twice from
the same noise: by inpainting the reflection's regions (the draft kept outside them, as ``mcot`` does) and
by regenerating the whole image from that context (``mcot-regen``). Each correction is judged by GenEval's
rules against the record's prompt; the script prints how many of the wrong drafts each fixed, per draft error.
``mcot-oracle`` in ``ftkit eval shapes --ablation`` measures the same corrector on the model's own drafts;
this one removes the gap between rendered and generated drafts, so a low rate here is the corrector's own.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from ftkit.adapters.attach import adapters_merged
from ftkit.data.geneval import judge_image
from ftkit.data.schema import DraftStep, PlanStep, RefineStep, ReflectStep, StepRecord
from ftkit.data.serialize import serialize_plan, serialize_reflection
from ftkit.infer.ablation import flagged_tokens
from ftkit.infer.context import GuidanceContexts, image_to_tensor
from ftkit.infer.load import adapter_inpaint, load_for_inference
from ftkit.infer.mcot import SamplerSettings, default_vit_hw
from ftkit.infer.sampler import decode_image, generate_images, latent_grid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True, help="a shapes-world folder (records.jsonl + images/)")
    ap.add_argument("--n", type=int, default=100, help="records with a refinement to use (default 100)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--inpaint", default="auto", choices=["auto", "path", "clean"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    inpaint = adapter_inpaint(a.adapter) if a.inpaint == "auto" else a.inpaint
    model, tok = load_for_inference(a.model, a.adapter)
    data = Path(a.data)
    records = []
    with open(data / "records.jsonl") as fh:
        for i, line in enumerate(fh):
            r = StepRecord.from_dict(json.loads(line), data / "records.jsonl", i)
            if any(isinstance(s, RefineStep) for s in r.steps):
                records.append(r)
    records = records[:a.n]
    hw = (int(records[0].meta["size"]),) * 2
    vit_hw, grid = default_vit_hw(model, hw), latent_grid(model, hw)
    settings = SamplerSettings(inpaint=inpaint).kwargs()
    settings.pop("cfg_plan_scale")
    enc = lambda text: list(tok.encode(text, add_special_tokens=False))  # noqa: E731
    fixed = Counter()
    with adapters_merged(model), torch.no_grad():
        for b0 in range(0, len(records), a.batch):
            batch = records[b0:b0 + a.batch]
            gcs, keep, eps = [], [], []
            for j, r in enumerate(batch):
                gen = torch.Generator().manual_seed(a.seed + b0 + j)
                plan = next(s for s in r.steps if isinstance(s, PlanStep))
                draft = next(s for s in r.steps if isinstance(s, DraftStep))
                refl = next(s for s in r.steps if isinstance(s, ReflectStep))
                image = draft.image.open("RGB")
                g = GuidanceContexts(model)
                g.add_user_text(enc(r.prompt))
                g.add_generated_text(enc(serialize_plan(plan)))
                g.add_image(image, vae_hw=hw, vit_hw=vit_hw, generator=gen)
                g.add_generated_text(enc(serialize_reflection(refl)))
                z = model.patchify(g.cond.vae_latent(image_to_tensor(image, hw), "mean").float())
                mask = flagged_tokens(refl, grid)
                gcs.append(g)
                keep.append((z, mask))
                eps.append(torch.randn(z.shape, generator=gen))
            for mode in ("inpaint", "regenerate"):
                lat = generate_images(model, [g.cond for g in gcs], [g.uncond_text for g in gcs],
                                      [g.uncond_img for g in gcs], hw=hw, init_noise=eps,
                                      keep=keep if mode == "inpaint" else None, **settings)
                for r, z in zip(batch, lat):
                    ok = judge_image(decode_image(model, z, hw), r.meta).passed
                    for kind in (r.meta.get("error") or "?", "all"):
                        fixed[(mode, kind, ok)] += 1
    print(f"{len(records)} wrong drafts of {data}, teacher-forced correction (inpaint mode {inpaint!r}):")
    kinds = sorted({k for _, k, _ in fixed} - {"all"}) + ["all"]
    print("| draft error | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for mode in ("inpaint", "regenerate"):
        cells = [f"{fixed[(mode, k, True)]}/{fixed[(mode, k, True)] + fixed[(mode, k, False)]}" for k in kinds]
        print(f"| {mode} fixed | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
