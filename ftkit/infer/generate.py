"""Generate for a list of prompts into a folder: :func:`generate_prompts` (what ``ftkit generate`` runs),
and the prompt files it reads (:func:`read_prompts`).

Per prompt, the plan -> draft -> reflect -> refine loop (:func:`ftkit.infer.mcot.run_mcot`) or plain
text-to-image (:func:`ftkit.infer.mcot.text_to_image`); each trace is saved by
:meth:`ftkit.infer.mcot.Trace.save` under a stem of :func:`prompt_stem`, then ``index.json``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from ftkit.files import atomic_write


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
    prompts = []
    if ext == ".jsonl":
        from ftkit.data.importers import json_objects

        for n, obj in json_objects(p):
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"{p}:{n}: field \"prompt\" missing or not a non-empty string")
            prompts.append(obj["prompt"].strip())
    else:
        try:
            lines = p.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e})") from e
        prompts = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"{p}: no prompts in the file")
    return prompts


def prompt_stem(i: int, prompt: str, width: int = 40) -> str:
    """File stem of prompt ``i``: ``0003_a-photo-of-a-red-circle`` (index, then a lower-case slug)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:width].rstrip("-")
    return f"{i:04d}_{slug}" if slug else f"{i:04d}"


def generate_prompts(model, tokenizer, prompts: list[str], out_dir: str | os.PathLike, *, mode: str = "mcot",
                     rounds: int = 2, plan: bool = True, image_hw: tuple[int, int] = (64, 64), sampler=None,
                     text=None, seed: int = 0, progress: bool = True, info: dict | None = None) -> dict:
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
    atomic_write(out / "index.json", json.dumps(index, indent=2).encode())
    return index


__all__ = ["generate_prompts", "prompt_stem", "read_prompts"]
