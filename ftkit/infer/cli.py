"""``ftkit generate`` and ``ftkit eval``: argument parsing, dispatch and printing.

The work is the library's: :func:`ftkit.infer.load.load_for_inference` opens the model folder (+ adapter),
:func:`ftkit.infer.generate.generate_prompts` runs the plan -> draft -> reflect -> refine loop
(:func:`ftkit.infer.mcot.run_mcot`) or plain text-to-image per prompt, and ``ftkit eval shapes`` scores
direct T2I against full MCoT on the shapes-world eval set (:func:`ftkit.infer.evaluate.evaluate_shapes`).
Output folders are written under a temporary name beside ``--out`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from ftkit.infer.generate import generate_prompts, read_prompts
from ftkit.infer.load import check_finite, load_for_inference
from ftkit.infer.sampler import RENORM_TYPES
from ftkit.models.folders import SAMPLING_FILE

log = logging.getLogger("ftkit")


# ============================================================================================ shared args
def _add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", required=True, help="BAGEL release folder, merged folder or ftkit FoX folder")
    g.add_argument("--adapter", default=None, help="adapter folder to load on top (ftkit fit's runs/.../adapter)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--quantize", default=None, choices=["nf4", "int8"], help="load decoder Linears in 4/8 bit")
    g.add_argument("--no-merge", action="store_true",
                   help="keep the adapter as a separate branch while sampling (default: fold LoRA/DoRA into float "
                        "weights for the run, ~20%% faster on a tiny model; 4-bit layers are never merged)")


def _merged(model, a: argparse.Namespace):
    """The run's adapter folded into the weights (``adapters_merged``) unless ``--no-merge`` or no adapter."""
    if a.adapter is None or a.no_merge:
        return contextlib.nullcontext()
    from ftkit.adapters.attach import adapters_merged

    return adapters_merged(model)


def _add_sampler_args(ap: argparse.ArgumentParser, *, tokens: int = 128) -> None:
    g = ap.add_argument_group("sampling")
    g.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                   help="image size: S (square) or H W, multiples of the VAE stride (16 on BAGEL); default: the "
                        "model's (the largest its latent position table holds, at most 1024: BAGEL-7B-MoT 1024)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"Euler steps of the flow sampler (default: the model folder's {SAMPLING_FILE}, else 50)")
    g.add_argument("--shift", type=float, default=None, help="timestep shift (default: the folder's, else 3.0)")
    g.add_argument("--cfg-text", type=float, default=None,
                   help="text guidance scale (default: the folder's, else 4.0)")
    g.add_argument("--cfg-img", type=float, default=None,
                   help="image guidance scale (default: the folder's, else 1.0 = off)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="timesteps t in [LO, HI] are guided (default: the folder's, else 0.4 1.0)")
    g.add_argument("--cfg-plan", type=float, default=None, metavar="S",
                   help="plan guidance scale (GoT's spatial guidance: the plan against the prompt alone; default "
                        "off; the ablation's plan-guided mode uses 2.0 unless set)")
    g.add_argument("--cfg-renorm", default=None, choices=list(RENORM_TYPES),
                   help="guidance renorm type (default: the folder's, else global)")
    g.add_argument("--inpaint", default="auto", choices=["auto", "path", "clean"],
                   help="how an inpainting correction holds the unflagged tokens: on the noise-to-draft path, or "
                        "clean at timestep 0 (region-conditioned: adapters trained with model.region_noise); "
                        "default auto: what the adapter was trained for")
    g.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    g.add_argument("--max-new-tokens", type=int, default=tokens,
                   help=f"most tokens per plan / reflection (default {tokens}; greedy decoding)")
    g.add_argument("--revise-threshold", type=float, default=None, metavar="P",
                   help="act on a reflection's `revise` only when the model's p(revise) / (p(revise) + p(ok)) at the "
                        f"verdict token exceeds P, in [0.5, 1) (default: the adapter's {SAMPLING_FILE}, else 0.5: the "
                        "decoded verdict); calibrate it on development prompts with the ablation's threshold sweep")


def _settings(a: argparse.Namespace):
    from ftkit.infer.mcot import TextSettings

    if a.size is None:
        from ftkit.models.folders import read_model_config

        side = read_model_config(a.model).default_image_size()
        hw = (side, side)
        log.info("image size %dx%d px (the model's default; --size to change)", side, side)
    elif len(a.size) not in (1, 2):
        raise ValueError(f"--size takes 1 or 2 values (S or H W), got {len(a.size)}")
    else:
        hw = (a.size[0], a.size[0]) if len(a.size) == 1 else (a.size[0], a.size[1])
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    sampler, threshold = _sampler(a)
    inpaint = a.inpaint
    if inpaint == "auto":
        from ftkit.infer.load import adapter_inpaint

        inpaint = adapter_inpaint(a.adapter) if getattr(a, "adapter", None) else "path"
    sampler.cfg_plan_scale, sampler.inpaint = a.cfg_plan, inpaint
    text = TextSettings(max_plan_tokens=a.max_new_tokens, max_reflect_tokens=a.max_new_tokens,
                        revise_threshold=threshold)
    return hw, sampler, text


FLAGS = {"num_timesteps": "steps", "timestep_shift": "shift", "cfg_text_scale": "cfg_text", "cfg_img_scale": "cfg_img",
         "cfg_interval": "cfg_interval", "cfg_renorm_type": "cfg_renorm", "revise_threshold": "revise_threshold"}


def _sampler(a: argparse.Namespace):
    """``(sampler settings, revise threshold)`` of a run: each flag given, else the adapter folder's
    ``sampling.json``, else the model folder's (:func:`~ftkit.models.folders.read_sampling`), else the built-in
    default; the folders' are logged."""
    from ftkit.infer.mcot import SamplerSettings
    from ftkit.models.folders import check_sampling, read_sampling

    given = {k: getattr(a, f, None) for k, f in FLAGS.items()}
    given = {k: tuple(v) if k == "cfg_interval" else v for k, v in given.items() if v is not None}
    for k, v in given.items():
        check_sampling({k: v}, f"--{FLAGS[k].replace('_', '-')}")
    folders = [Path(a.model)] + ([Path(a.adapter)] if getattr(a, "adapter", None) else [])
    merged, source = {}, {}
    for folder in folders:
        for k, v in read_sampling(folder).items():
            if k not in given:
                merged[k], source[k] = v, folder
    for folder in folders:  # each setting once, from where it is taken
        own = [f"{k}={v}" for k, v in merged.items() if source[k] == folder]
        if own:
            log.info("sampling settings from %s: %s (flags override)", folder / SAMPLING_FILE, ", ".join(own))
    merged.update(given)
    threshold = merged.pop("revise_threshold", 0.5)
    return SamplerSettings(**merged), threshold


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty ``out`` unless ``overwrite``; a file in its place is refused always.

    Raises:
        FileExistsError: naming the folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: output folder is not empty (pass --overwrite to replace it)")
    return out


def _errors():
    from ftkit.adapters.io import AdapterError
    from ftkit.data.registry import UnknownDatasetError

    return (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, AdapterError, UnknownDatasetError,
            OSError)


def _fmt_err(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# ============================================================================================ generate
GENERATE_EPILOG = """\
examples:
  ftkit generate --model models/BAGEL-7B-MoT --prompt "a photo of two red circles" --out out/gen
  ftkit generate --model models/bagel-tiny --adapter runs/tiny-mcot/latest/adapter --prompts prompts.txt --out out/g
  ftkit generate --model models/bagel-mcot-merged --prompts p.jsonl --mode t2i --steps 30 --out out/t2i
Per prompt: STEM_0.png, STEM_1.png ... (each round), STEM.png (final), STEM.json (reasoning trace),
STEM_sheet.png (contact sheet); index.json lists them."""


def build_generate_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ftkit generate", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Generate images with the plan -> draft -> reflect -> refine loop "
                                             "(--mode mcot) or plain text-to-image (--mode t2i).",
                                 epilog=GENERATE_EPILOG)
    _add_model_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT", help="one or more prompts (repeatable)")
    src.add_argument("--prompts", metavar="FILE", help=".txt (one prompt per line) or .jsonl (objects with \"prompt\")")
    ap.add_argument("--out", required=True, help="output folder (refused when not empty, unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    ap.add_argument("--mode", default="mcot", choices=["mcot", "t2i"], help="mcot (default) or plain t2i")
    ap.add_argument("--rounds", type=int, default=2, help="most images per prompt in mcot mode, draft included "
                                                          "(default 2; stops early at verdict ok)")
    ap.add_argument("--no-plan", action="store_true", help="mcot mode: skip the plan, draft from the prompt")
    _add_sampler_args(ap)
    return ap


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ftkit generate``; returns the exit status (0 ok, 1 failed; bad usage exits 2)."""
    a = build_generate_parser().parse_args(argv)
    try:
        from ftkit.models.release import atomic_dir

        out = check_out_dir(a.out, a.overwrite)
        prompts = [p.strip() for p in a.prompt] if a.prompt else read_prompts(a.prompts)
        if not all(prompts):
            raise ValueError("--prompt: empty prompt")
        if a.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {a.rounds}")
        hw, sampler, text = _settings(a)
        t0 = time.perf_counter()
        model, tok = load_for_inference(a.model, a.adapter, dtype=a.dtype, device=a.device, quantize=a.quantize)
        t_load = time.perf_counter() - t0
        info = {"model": str(Path(a.model).resolve()), "adapter": str(Path(a.adapter).resolve()) if a.adapter else None,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "load_seconds": round(t_load, 3),
                "merged_adapter": a.adapter is not None and not a.no_merge}
        check_finite(model, a.adapter or a.model)
        try:
            with atomic_dir(out, overwrite=True) as tmp, _merged(model, a):
                index = generate_prompts(model, tok, prompts, tmp, mode=a.mode, rounds=a.rounds, plan=not a.no_plan,
                                         image_hw=hw, sampler=sampler, text=text, seed=a.seed, info=info)
        except OSError as e:
            raise OSError(e.errno, f"{out}: writing the outputs failed ({e.strerror or e}); nothing was written "
                                   "there") from e
    except _errors() as e:
        print(f"ftkit generate: error: {_fmt_err(e)}", file=sys.stderr)
        return 1
    print(f"generated {len(prompts)} prompt(s) ({a.mode}) at {hw[0]}x{hw[1]} px in {index['seconds']:.1f} s "
          f"(model loaded in {t_load:.1f} s); wrote {out} (index.json)")
    return 0


# ============================================================================================ eval
EVAL_EPILOG = """\
examples:
  ftkit eval shapes --model models/bagel-tiny --adapter runs/tiny-mcot/latest/adapter --out out/eval
  ftkit eval shapes --model models/bagel-mcot-merged --n 60 --steps 30 --out out/eval60
  ftkit eval shapes --model M --out O --detector mypkg.geneval_det:make_detector   # GenEval's own detector
  ftkit eval shapes --ablation --model M --adapter A --steps 10 --out out/ablation   # FoX's ablation, 600 prompts
Writes results.json (per prompt pass/fail + reason for direct T2I and MCoT, per-category scores),
results.md (table: rows direct / mcot, GenEval's six categories + overall), images/, traces/ and
failures/ (contact sheets of the prompts either mode failed)."""


def build_eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ftkit eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Evaluate a model (+ adapter).", epilog=EVAL_EPILOG)
    sub = ap.add_subparsers(dest="suite", required=True, metavar="SUITE")
    sp = sub.add_parser("shapes", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVAL_EPILOG,
                        help="shapes-world GenEval: direct T2I vs full MCoT",
                        description="Shapes-world evaluation by GenEval's rules: direct text-to-image vs the full "
                                    "plan -> draft -> reflect -> refine loop, per category.")
    _add_model_args(sp)
    sp.add_argument("--out", required=True, help="output folder (refused when not empty, unless --overwrite)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    sp.add_argument("--data", default=None, help="registry name or path of the eval records (default shapes-eval, "
                                                 "200 shipped prompts; with --ablation: 600 prompts of the held-out "
                                                 "seed 1011, generated into ~/.cache/ftkit on first use)")
    sp.add_argument("--registry", default=None, help="extra dataset registry file")
    sp.add_argument("--n", type=int, default=None, help="evaluate a category-balanced subset of N prompts")
    sp.add_argument("--rounds", type=int, default=2, help="most MCoT images per prompt (default 2)")
    sp.add_argument("--modes", nargs="+", default=["direct", "mcot"], choices=["direct", "mcot"],
                    help="which modes to run (default both)")
    sp.add_argument("--ablation", action="store_true", help="FoX's ablation instead: base, t2i, t2i-twice, plan-act, "
                    "mcot (inpainting correction) on the same prompts, with bootstrap intervals (ablation.json/.md)")
    sp.add_argument("--ablation-modes", nargs="+", default=None, metavar="MODE",
                    help="ablation modes (default base t2i t2i-twice plan-act mcot; also mcot-verify, mcot-regen, mcot-oracle, "
                         "plan-guided)")
    sp.add_argument("--batch", type=int, default=16, help="prompts per sampler call in --ablation (default 16)")
    sp.add_argument("--detector", default=None, metavar="MODULE:CALLABLE",
                    help="factory returning a geneval Detector (default: the shapes-world colour detector); "
                         "if the object has a color(image, detection) method it is used as color_fn")
    _add_sampler_args(sp)
    fp = sub.add_parser("flow", formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="velocity error by timestep on held-out images (where a flow model fails)",
                        description="Denoising quality by timestep (ftkit.infer.flowcheck): for each (prompt, image) "
                                    "pair, noise the image to t, compare the model's velocity with the truth, with "
                                    "and without the prompt; decode x0_hat into a contact sheet.")
    _add_model_args(fp)
    fp.add_argument("--out", required=True, help="output folder (refused when not empty, unless --overwrite)")
    fp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    fp.add_argument("--data", default="shapes-eval", help="registry name or path of records with images "
                                                          "(default shapes-eval; each record's last image is used)")
    fp.add_argument("--registry", default=None, help="extra dataset registry file")
    fp.add_argument("--n", type=int, default=40, help="pairs (the first N records; default 40)")
    fp.add_argument("--timesteps", type=float, nargs="+", default=None, metavar="T",
                    help="timesteps in (0, 1] (default 0.1 0.3 0.5 0.7 0.9)")
    fp.add_argument("--size", type=int, default=None, metavar="PX", help="image side (default: the model's)")
    fp.add_argument("--seed", type=int, default=0, help="pair i draws its noise with seed + i (default 0)")
    return ap


def _eval_flow(a: argparse.Namespace) -> int:
    from ftkit.data.dataset import load_records
    from ftkit.infer.flowcheck import DEFAULT_TIMESTEPS, flow_by_timestep, flow_markdown
    from ftkit.models.release import atomic_dir

    try:
        out = check_out_dir(a.out, a.overwrite)
        if a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        if a.size is None:
            from ftkit.models.folders import read_model_config

            a.size = read_model_config(a.model).default_image_size()
        records = list(load_records(a.data, registry=a.registry))[: a.n]
        model, tok = load_for_inference(a.model, a.adapter, dtype=a.dtype, device=a.device, quantize=a.quantize)
        check_finite(model, a.adapter or a.model)
        with _merged(model, a):
            res, sheet = flow_by_timestep(model, tok, records, a.timesteps or DEFAULT_TIMESTEPS,
                                          image_hw=(a.size, a.size), seed=a.seed)
        res.update(model=str(Path(a.model).resolve()), adapter=str(Path(a.adapter).resolve()) if a.adapter else None,
                   data=a.data)
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "flow.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
            (tmp / "flow.md").write_text(flow_markdown(res), encoding="utf-8")
            sheet.save(tmp / "sheet.png")
    except _errors() as e:
        print(f"ftkit eval: error: {_fmt_err(e)}", file=sys.stderr)
        return 1
    print(flow_markdown(res), end="")
    print(f"wrote {out} (flow.json, flow.md, sheet.png)")
    return 0


def load_detector(spec: str):
    """``"package.module:factory"`` -> ``factory()``, checked to be a :class:`ftkit.data.geneval.Detector`.

    Raises:
        ValueError: malformed spec, import failure, or the object has no ``detect`` method.
    """
    from ftkit.data.geneval import Detector
    from ftkit.infer.load import import_spec

    factory = import_spec(spec, "--detector", "MODULE:CALLABLE (e.g. mypkg.det:make_detector)")
    det = factory
    if callable(factory) and not isinstance(factory, Detector):
        try:
            det = factory()
        except TypeError as e:
            raise ValueError(f"--detector {spec!r}: calling it with no arguments failed ({e})") from e
    if not isinstance(det, Detector):
        raise ValueError(f"--detector {spec!r}: {type(det).__name__} has no detect(image) method "
                         "(see ftkit.data.geneval.Detector)")
    return det


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ftkit eval``; returns the exit status (0 ok, 1 failed; bad usage exits 2)."""
    a = build_eval_parser().parse_args(argv)
    if a.suite == "flow":
        return _eval_flow(a)
    try:
        from ftkit.data.dataset import load_records
        from ftkit.infer.evaluate import balanced_subset, evaluate_shapes
        from ftkit.models.release import atomic_dir

        out = check_out_dir(a.out, a.overwrite)
        if a.n is not None and a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        if a.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {a.rounds}")
        hw, sampler, text = _settings(a)
        detector = load_detector(a.detector) if a.detector else None
        color_fn = getattr(detector, "color", None) if detector is not None else None
        if a.ablation and a.data is None:
            from ftkit.infer.ablation import ablation_records

            records, folder = ablation_records(size=hw[0])
            a.data = str(folder)
        else:
            a.data = a.data or "shapes-eval"
            records = list(load_records(a.data, registry=a.registry))
        if a.n is not None:
            records = balanced_subset(records, a.n)
        model, tok = load_for_inference(a.model, a.adapter, dtype=a.dtype, device=a.device, quantize=a.quantize)
        check_finite(model, a.adapter or a.model)
        info = {"model": str(Path(a.model).resolve()), "adapter": str(Path(a.adapter).resolve()) if a.adapter else None,
                "data": a.data}
        with atomic_dir(out, overwrite=True) as tmp:
            if a.ablation:
                from ftkit.infer.ablation import ABLATION_MODES, run_ablation

                res = run_ablation(model, tok, records, modes=tuple(a.ablation_modes or ABLATION_MODES),
                                   batch_size=a.batch, image_hw=hw, sampler=sampler, text=text, seed=a.seed,
                                   detector=detector, color_fn=color_fn, out_dir=tmp, info=info, rounds=a.rounds,
                                   merge_adapters=not a.no_merge)
            else:
                with _merged(model, a):
                    res = evaluate_shapes(model, tok, records, detector=detector, color_fn=color_fn,
                                          modes=tuple(a.modes),
                                          rounds=a.rounds, image_hw=hw, sampler=sampler, text=text, seed=a.seed,
                                          out_dir=tmp, info=info)
    except _errors() as e:
        print(f"ftkit eval: error: {_fmt_err(e)}", file=sys.stderr)
        return 1
    from ftkit.infer.ablation import ablation_markdown
    from ftkit.infer.evaluate import results_table

    if a.ablation:
        print(ablation_markdown(res), end="")
        print(f"ablation of {res['n']} prompt(s) at {hw[0]}x{hw[1]} px; wrote {out} (ablation.json, ablation.md, "
              "sheets/)")
        return 0

    print(results_table(res["scores"], res["counts"]))
    print(f"evaluated {res['n']} prompt(s) at {hw[0]}x{hw[1]} px in {res['seconds']:.1f} s; wrote {out} (results.json, results.md, "
          f"{res['failure_sheets']} failure sheet(s) in failures/)")
    return 0


__all__ = ["build_eval_parser", "build_generate_parser", "check_out_dir", "eval_main", "generate_main",
           "load_detector", "self_critique_main"]


def self_critique_main(argv: list[str]) -> int:
    """``ftkit data self-critique``: the model's own plan-act drafts, judged, written as records
    (:mod:`ftkit.infer.selfcritique`). Exit 0, 1 on bad input (one line naming the file / field)."""
    from ftkit.infer.evaluate import balanced_subset
    from ftkit.infer.selfcritique import load_judge, self_critique
    from ftkit.models.release import atomic_dir

    ap = argparse.ArgumentParser(prog="ftkit data self-critique",
                                 description="the model's own drafts, judged, as reflection / correction records")
    ap.add_argument("--model", required=True, help="base model folder")
    ap.add_argument("--adapter", default=None, help="adapter folder (the round being improved)")
    ap.add_argument("--prompts", required=True, help="records.jsonl whose records carry GenEval meta (shapes world)")
    ap.add_argument("--judge", default="shapes", help="shapes (default) or MODULE:FUNCTION (ftkit.infer.selfcritique)")
    ap.add_argument("--target", choices=("scene", "edit"), default="scene",
                    help="the shapes judge's correction target: the prompt record's own scene (scene, default; "
                         "a new layout) or the draft repaired where it fails (edit: what inpainting can reach)")
    ap.add_argument("--out", required=True, help="output folder (records.jsonl, images/, summary.json)")
    ap.add_argument("--n", type=int, default=None, help="N prompts, balanced over categories (default all)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per sampler call")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"Euler steps of the flow sampler (default: the model folder's {SAMPLING_FILE}, else 50; its "
                         "other sampler settings are the folder's too)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="prompt i draws its noise from seed + i")
    ap.add_argument("--rejected", choices=("own", "flip"), default="own",
                    help="each reflection record's rejected one (DPO pairs): the model's own reflection where its "
                         "verdict is wrong, else the judge's flipped (own, default; decodes a reflection per draft), "
                         "or always the flipped one (flip)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        out = check_out_dir(a.out, a.overwrite)
        src = Path(a.prompts)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: prompts file not found")
        records = []
        for ln, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{src}:line {ln}: not JSON ({e.msg})") from e
        if a.n is not None:
            records = balanced_subset(records, a.n)
        judge = load_judge(a.judge, root=src.parent, target=a.target)
        model, tok = load_for_inference(a.model, a.adapter)
        check_finite(model, a.adapter or a.model)
        with atomic_dir(out, overwrite=True) as tmp:
            s = self_critique(model, tok, records, judge, tmp, batch_size=a.batch, image_hw=(a.size, a.size),
                              sampler=_sampler(a)[0], seed=a.seed, progress=not a.no_progress,
                              rejected=a.rejected)
    except _errors() as e:
        print(f"ftkit data self-critique: error: {_fmt_err(e)}", file=sys.stderr)
        return 1
    print(f"{s['prompts']} prompts: drafts ok {s['ok']}, revise {s['revise']}, skipped {s['skipped']}; "
          f"wrote {s['records']} records ({s['corrections']} corrections) to {out}")
    if s["own_verdict_accuracy"] is not None:
        print(f"the model's own verdicts agree with the judge on {s['own_verdict_accuracy']:.3f} of the drafts; "
              f"rejected reflections: {s['rejected_own']} its own ({s['rejected_own_regions']} of them flagging the wrong "
              f"regions), {s['rejected_flipped']} flipped")
    return 0
