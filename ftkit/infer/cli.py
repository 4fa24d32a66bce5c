"""``ftkit generate`` and ``ftkit eval``: the inference verbs, and the model loader they share.

:func:`load_for_inference` opens any folder ftkit can generate with:

* a BAGEL release folder (``llm_config.json``, ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors``,
  tokenizer files), as downloaded or as written by ``ftkit merge`` into one file;
* a merged BAGEL folder written in shards (``model-0000i-of-0000n.safetensors`` +
  ``model.safetensors.index.json``, what ``ftkit merge`` writes above ``--max-shard-size``);
* an ftkit FoX folder (``config.json`` with ``"model_type": "ftkit-fox"``);

optionally with a trained adapter folder on top (``adapter_config.json``, ``adapter_model.safetensors``,
``ftkit_adapter.json``). ``ftkit generate`` then runs the plan -> draft -> reflect -> refine loop
(:func:`ftkit.infer.mcot.run_mcot`) or plain text-to-image per prompt; ``ftkit eval shapes`` scores
direct T2I against full MCoT on the shapes-world eval set (:func:`ftkit.infer.evaluate.evaluate_shapes`).
Output folders are written under a temporary name beside ``--out`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from ftkit.models.folders import DTYPES, FOLDER_HELP, FOX_MODEL_TYPE, SHARD_INDEX, detect_model_folder  # noqa: F401

log = logging.getLogger("ftkit")

# ============================================================================================ loading
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given.

    Raises:
        ValueError: a CUDA device is asked for on a machine without one.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA, fp32 on CPU; ``"fp32" | "bf16" | "fp16"`` (or a torch dtype) as given.

    Raises:
        ValueError: unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _adapter_base(adapter: Path) -> tuple[str | None, list[str]]:
    """(recorded base path, experts the adapter was trained with) from ``ftkit_adapter.json``."""
    from ftkit.adapters.io import AdapterFolder

    ad = AdapterFolder(adapter)
    return (ad.meta.get("base") or {}).get("path"), ad.experts


def load_for_inference(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                       dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                       quantize: str | None = None):
    """Load a model folder (+ an adapter) for generation; returns ``(model, tokenizer)`` in eval mode with
    every parameter frozen.

    The folder kind is detected (:func:`detect_model_folder`): BAGEL release / merged folder
    (:func:`ftkit.models.loading.load_bagel`), sharded merged folder (also :func:`~ftkit.models.loading.load_bagel`) or FoX
    (:func:`ftkit.models.fox.load_fox`). With ``adapter``, the base is loaded the way the adapter was
    trained (an adapter trained on a three-expert upcycled BAGEL loads the base with ``three_experts``),
    then :func:`ftkit.adapters.io.load_adapter` attaches it and checks shapes and architecture. The base
    path recorded in the adapter's ``ftkit_adapter.json`` is compared with ``model_path``: a difference
    only warns (a copied folder is fine; a merged folder that already contains this adapter would apply
    it twice).

    Args:
        model_path: the model folder.
        adapter: an adapter folder (``ftkit fit`` writes ``runs/<recipe>/<run>/adapter``).
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        quantize: ``None``, ``"nf4"`` or ``"int8"``: decoder Linear layers as bitsandbytes layers.

    Raises:
        FileNotFoundError: model or adapter folder (or a file in them) missing; the message names it.
        ValueError: unknown dtype / device, quantizing a sharded folder; ``AdapterError`` /
            ``CheckpointError`` (ValueError subclasses) for an adapter that does not fit or broken weights.
    """
    from ftkit.adapters.io import load_adapter

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = Path(model_path)
    kind = detect_model_folder(folder)
    three_experts = False
    if adapter is not None:
        adapter = Path(adapter)
        recorded, experts = _adapter_base(adapter)
        three_experts = "_moe_sem" in experts
        if recorded is not None and Path(recorded).resolve() != folder.resolve():
            msg = (f"{adapter}: adapter was trained on {recorded}, loading it on {folder.resolve()} (fine for a copy "
                   "of that base; a merged folder that already contains this adapter would apply it twice)")
            warnings.warn(msg, stacklevel=2)
    if kind == "fox":
        from ftkit.models.fox import load_fox, load_fox_tokenizer

        model = load_fox(folder, dtype=dt, device=dev, quantize=quantize)
        tokenizer = load_fox_tokenizer(folder, vocab_size=model.cfg.llm.vocab_size)
    else:  # "bagel" or "bagel-sharded": load_bagel reads ema.safetensors or the shards' index
        from ftkit.models.loading import load_bagel, load_tokenizer

        # three_experts only upcycles a two-expert folder; a three-expert (merged) folder loads as it is
        model = load_bagel(folder, dtype=dt, device=dev, quantize=quantize, three_experts=three_experts)
        tokenizer = load_tokenizer(folder)
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s model from %s%s (%s, %s)", kind, folder, f" + adapter {adapter}" if adapter else "", dt, dev)
    return model, tokenizer


# ============================================================================================ prompts
def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a ``.txt`` file (one per line; blank lines and lines starting with ``#`` skipped) or a
    ``.jsonl`` file (one JSON object per line with a string field ``"prompt"``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: another extension, a bad line (names file, line and field), or no prompts at all.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: prompts file not found")
    ext = p.suffix.lower()
    if ext not in (".txt", ".jsonl"):
        raise ValueError(f"{p}: prompts file must be .txt (one prompt per line) or .jsonl (objects with \"prompt\"), "
                         f"got {ext or 'no extension'!r}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e})") from e
    prompts = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or (ext == ".txt" and s.startswith("#")):
            continue
        if ext == ".txt":
            prompts.append(s)
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{p}:{n}: expected a JSON object with a \"prompt\" field, got {type(obj).__name__}")
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(f"{p}:{n}: field \"prompt\" missing or not a non-empty string")
        prompts.append(obj["prompt"].strip())
    if not prompts:
        raise ValueError(f"{p}: no prompts in the file")
    return prompts


def prompt_stem(i: int, prompt: str, width: int = 40) -> str:
    """File stem of prompt ``i``: ``0003_a-photo-of-a-red-circle`` (index, then a lower-case slug)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:width].rstrip("-")
    return f"{i:04d}_{slug}" if slug else f"{i:04d}"


# ============================================================================================ shared args
def _add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", required=True, help="BAGEL release folder, merged folder or ftkit FoX folder")
    g.add_argument("--adapter", default=None, help="adapter folder to load on top (ftkit fit's runs/.../adapter)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--quantize", default=None, choices=["nf4", "int8"], help="load decoder Linears in 4/8 bit")


def _add_sampler_args(ap: argparse.ArgumentParser, *, steps: int = 50, tokens: int = 128) -> None:
    g = ap.add_argument_group("sampling")
    g.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                   help="image size: S (square) or H W, multiples of the VAE stride (16 on BAGEL); default: the "
                        "model's (the largest its latent position table holds, at most 1024: BAGEL-7B-MoT 1024)")
    g.add_argument("--steps", type=int, default=steps, help=f"Euler steps of the flow sampler (default {steps})")
    g.add_argument("--shift", type=float, default=3.0, help="timestep shift (default 3.0)")
    g.add_argument("--cfg-text", type=float, default=4.0, help="text guidance scale (default 4.0)")
    g.add_argument("--cfg-img", type=float, default=1.0, help="image guidance scale (default 1.0 = off)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=[0.4, 1.0], metavar=("LO", "HI"),
                   help="timesteps t in [LO, HI] are guided (default 0.4 1.0)")
    g.add_argument("--cfg-renorm", default="global", choices=["global", "channel", "text_channel"],
                   help="guidance renorm type (default global)")
    g.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    g.add_argument("--max-new-tokens", type=int, default=tokens,
                   help=f"most tokens per plan / reflection (default {tokens}; greedy decoding)")


def _settings(a: argparse.Namespace):
    from ftkit.infer.mcot import SamplerSettings, TextSettings

    if a.size is None:
        from ftkit.models.folders import read_model_config

        side = read_model_config(a.model).default_image_size()
        hw = (side, side)
        log.info("image size %dx%d px (the model's default; --size to change)", side, side)
    elif len(a.size) not in (1, 2):
        raise ValueError(f"--size takes 1 or 2 values (S or H W), got {len(a.size)}")
    else:
        hw = (a.size[0], a.size[0]) if len(a.size) == 1 else (a.size[0], a.size[1])
    if a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps}")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    lo, hi = a.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--cfg-interval must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}")
    sampler = SamplerSettings(num_timesteps=a.steps, timestep_shift=a.shift, cfg_text_scale=a.cfg_text,
                              cfg_img_scale=a.cfg_img, cfg_interval=(lo, hi), cfg_renorm_type=a.cfg_renorm)
    text = TextSettings(max_plan_tokens=a.max_new_tokens, max_reflect_tokens=a.max_new_tokens)
    return hw, sampler, text


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


def check_finite(model, source) -> None:
    """Refuse weights with NaN/inf (a diverged adapter would draw black images): names ``source`` and a tensor."""
    from ftkit.models.loading import CheckpointError

    for n, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{source}: weight {n} holds non-finite values (NaN/inf); refusing to generate "
                                  "from a diverged model")


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


def generate(model, tokenizer, prompts: list[str], out_dir: str | os.PathLike, *, mode: str = "mcot",
             rounds: int = 2, plan: bool = True, image_hw: tuple[int, int] = (64, 64), sampler=None, text=None,
             seed: int = 0, progress: bool = True, info: dict | None = None) -> dict:
    """Generate for every prompt into the (existing, empty or temporary) folder ``out_dir``.

    Prompt ``i`` uses a CPU generator seeded with ``seed + i``. ``mode="mcot"`` runs
    :func:`~ftkit.infer.mcot.run_mcot`; ``mode="t2i"`` runs :func:`~ftkit.infer.mcot.text_to_image`
    and records it as a one-round trace without plan or reflection (verdict ``"none"``). Each trace is
    written by :meth:`~ftkit.infer.mcot.Trace.save` (round PNGs, final PNG, JSON, contact sheet), then
    ``index.json`` (``info`` + settings + one entry per prompt with its file names, relative to ``out_dir``).

    Returns:
        the index dict.

    Raises:
        ValueError: empty ``prompts``, unknown ``mode``, ``rounds < 1`` or an image size the model cannot make.
    """
    from tqdm.auto import tqdm

    from ftkit.infer.mcot import Round, SamplerSettings, TextSettings, Trace, run_mcot, text_to_image
    from ftkit.infer.sampler import latent_grid

    if not prompts:
        raise ValueError("no prompts")
    if mode not in ("mcot", "t2i"):
        raise ValueError(f"mode must be 'mcot' or 't2i', got {mode!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    latent_grid(model, image_hw)  # raises a clear ValueError before any work
    sampler = sampler or SamplerSettings()
    text = text or TextSettings()
    out = Path(out_dir)
    entries = []
    t_all = time.perf_counter()
    for i, prompt in enumerate(tqdm(prompts, desc=f"generate ({mode})", unit="prompt", disable=not progress)):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed + i)
        if mode == "mcot":
            trace = run_mcot(model, tokenizer, prompt, rounds=rounds, image_hw=image_hw, plan=plan, sampler=sampler,
                             text=text, generator=g)
        else:
            image = text_to_image(model, tokenizer, prompt, image_hw=image_hw, sampler=sampler, generator=g)
            trace = Trace(prompt=prompt, plan_text=None, plan=None, rounds=[Round(image, verdict="none")],
                          settings={"mode": "t2i", "image_hw": list(image_hw),
                                    "sampler": {**sampler.kwargs(), "cfg_interval": list(sampler.cfg_interval)}})
        trace.settings["seed"] = seed + i
        stem = prompt_stem(i, prompt)
        paths = trace.save(out, stem)
        entries.append({"index": i, "prompt": prompt, "stem": stem, "seed": seed + i,
                        "rounds": [paths[f"round_{k}"].name for k in range(len(trace.rounds))],
                        "final": paths["final"].name, "trace": paths["json"].name, "sheet": paths["sheet"].name,
                        "stopped_ok": trace.stopped_ok, "seconds": round(time.perf_counter() - t0, 3)})
    index = {**(info or {}), "mode": mode, "rounds": rounds if mode == "mcot" else 1, "plan": plan and mode == "mcot",
             "image_hw": list(image_hw), "seed": seed,
             "sampler": {**sampler.kwargs(), "cfg_interval": list(sampler.cfg_interval)},
             "text": {"max_plan_tokens": text.max_plan_tokens, "max_reflect_tokens": text.max_reflect_tokens},
             "prompts": entries, "seconds": round(time.perf_counter() - t_all, 3)}
    tmp = out / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
    os.replace(tmp, out / "index.json")
    return index


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
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "load_seconds": round(t_load, 3)}
        check_finite(model, a.adapter or a.model)
        try:
            with atomic_dir(out, overwrite=True) as tmp:
                index = generate(model, tok, prompts, tmp, mode=a.mode, rounds=a.rounds, plan=not a.no_plan,
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
                    help="ablation modes (default base t2i t2i-twice plan-act mcot; also mcot-regen)")
    sp.add_argument("--batch", type=int, default=16, help="prompts per sampler call in --ablation (default 16)")
    sp.add_argument("--detector", default=None, metavar="MODULE:CALLABLE",
                    help="factory returning a geneval Detector (default: the shapes-world colour detector); "
                         "if the object has a color(image, detection) method it is used as color_fn")
    _add_sampler_args(sp)
    return ap


def load_detector(spec: str):
    """``"package.module:factory"`` -> ``factory()``, checked to be a :class:`ftkit.data.geneval.Detector`.

    Raises:
        ValueError: malformed spec, import failure, or the object has no ``detect`` method.
    """
    import importlib

    from ftkit.data.geneval import Detector

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--detector {spec!r}: expected MODULE:CALLABLE (e.g. mypkg.det:make_detector)")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--detector {spec!r}: cannot import ({type(e).__name__}: {e})") from e
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
            from ftkit.infer.evaluate import ablation_records

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
                from ftkit.infer.evaluate import ABLATION_MODES, run_ablation

                res = run_ablation(model, tok, records, modes=tuple(a.ablation_modes or ABLATION_MODES),
                                   batch_size=a.batch, image_hw=hw, sampler=sampler, text=text, seed=a.seed,
                                   detector=detector, color_fn=color_fn, out_dir=tmp, info=info)
            else:
                res = evaluate_shapes(model, tok, records, detector=detector, color_fn=color_fn, modes=tuple(a.modes),
                                      rounds=a.rounds, image_hw=hw, sampler=sampler, text=text, seed=a.seed,
                                      out_dir=tmp, info=info)
    except _errors() as e:
        print(f"ftkit eval: error: {_fmt_err(e)}", file=sys.stderr)
        return 1
    from ftkit.infer.evaluate import ablation_markdown, results_table

    if a.ablation:
        print(ablation_markdown(res), end="")
        print(f"ablation of {res['n']} prompt(s) at {hw[0]}x{hw[1]} px; wrote {out} (ablation.json, ablation.md, "
              "sheets/)")
        return 0

    print(results_table(res["scores"], res["counts"]))
    print(f"evaluated {res['n']} prompt(s) at {hw[0]}x{hw[1]} px in {res['seconds']:.1f} s; wrote {out} (results.json, results.md, "
          f"{res['failure_sheets']} failure sheet(s) in failures/)")
    return 0


__all__ = ["build_eval_parser", "build_generate_parser", "check_out_dir", "detect_model_folder", "eval_main",
           "generate", "generate_main", "load_detector", "load_for_inference", "prompt_stem",
           "read_prompts", "resolve_device", "resolve_dtype"]
