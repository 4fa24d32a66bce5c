"""What the two merges share: the merged weight of one adapted projection, the in-memory fold, and the
plumbing around a merged folder (argument checks, free space, writing, verification, model card).

Front ends: :func:`ftkit.adapters.merge.merge` streams a BAGEL release folder a block of rows at a time;
:func:`ftkit.adapters.merge_fox.merge_fox` loads a FoX folder whole, unties shared experts and folds the
adapters in with :func:`merge_into_model`. Every merged weight of both comes from :func:`merged_weight`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ftkit.adapters.io import AdapterFolder
from ftkit.errors import FtkitError
from ftkit.models.folders import parse_dtype

FOUR_BIT_EXPLANATION = (
    "ftkit does not merge adapters into 4-bit (or 8-bit) weights: that would dequantize each weight, add the "
    "LoRA update and quantize again, and the update (usually smaller than one NF4 quantization step) would be "
    "largely rounded away, so the result would not be the model you trained. A QLoRA adapter is an update to "
    "the UNQUANTIZED base weights: merge it into the unquantized release folder instead "
    "(`ftkit merge --base <unquantized BAGEL folder> --adapter <adapter> --out <folder>`)."
)


class MergeError(FtkitError):
    """A merge that cannot be done (bad input, 4-bit target, verification above tolerance)."""


@dataclass
class MergeReport:
    out: Path
    files: list[str]
    tensors: int
    merged: int
    replaced: int
    upcycled: int
    total_bytes: int
    sharded: bool
    method: str
    max_diff: float | None = None
    max_scaled_diff: float | None = None
    tolerance: float | None = None
    per_output: dict = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the math

def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The merged weight ``W'`` of one LoRA / rsLoRA / DoRA projection (a new tensor; the inputs are unchanged).

    With the base weight ``W`` [rows, in], ``A`` [r, in], ``B`` [rows, r], ``s = scale`` (``alpha / r``;
    rsLoRA ``alpha / sqrt(r)``) and the DoRA magnitude ``m`` [rows]::

        delta = (B A) s                                  (peft LoraLayer.get_delta_weight)
        LoRA / rsLoRA:  W' = W + delta
        DoRA:           V = W + delta,   W' = (m / ||V||_row) V

    where ``||V||_row`` is the L2 norm of each row over the input dimension (peft
    ``DoraLinearLayer.get_weight_norm``). Each output row needs only its own rows of ``W``, ``B`` and
    ``m``, so a block of rows merges on its own (the streaming merge passes blocks). The operations are
    peft's ``LoraLayer.merge``, one for one, so the result equals peft's bit for bit: ``delta`` in fp32;
    LoRA rounds it to ``W``'s dtype and adds there; DoRA computes ``V`` and ``W'`` in fp32 and returns
    ``W'`` in ``W``'s dtype.
    """
    delta = (B.float() @ A.float()).mul_(scale)
    if magnitude is None:
        return delta.add_(weight) if weight.dtype == torch.float32 else weight + delta.to(weight.dtype)
    v = delta.add_(weight)
    return v.mul_((magnitude / torch.linalg.norm(v, dim=1)).unsqueeze(1)).to(weight.dtype)


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, or MergeError naming ``name`` when it has NaN/inf (a diverged adapter is never merged)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise MergeError(f"{name}: the merged tensor has non-finite values (the adapter holds NaN/inf); nothing "
                         "merged or written")
    return t


def adapter_method(peft_cfg: dict) -> str:
    """``"dora"``, ``"rslora"`` or ``"lora"`` from an ``adapter_config.json``."""
    return "dora" if peft_cfg.get("use_dora") else ("rslora" if peft_cfg.get("use_rslora") else "lora")


# ----------------------------------------------------------------------------- in memory

def _is_low_bit(layer: nn.Module) -> bool:
    kind = type(layer).__name__
    wkind = type(getattr(layer, "weight", None)).__name__
    return kind in ("Linear4bit", "Linear8bitLt") or wkind in ("Params4bit", "Int8Params")


def merge_into_model(model: nn.Module) -> nn.Module:
    """Fold the attached adapters into the model's own (bf16/fp32) weights and remove the adapter layers.

    Each LoRA layer's base weight becomes :func:`merged_weight` of its tensors and peft's ``scaling``
    (equal to peft's ``layer.merge`` bit for bit); modules_to_save already hold their trained values,
    their base copies are dropped.

    Raises:
        MergeError: a targeted layer is a bitsandbytes 4-/8-bit layer (QLoRA; see the explanation in the
            message: merge into the unquantized release folder with :func:`ftkit.adapters.merge.merge`),
            a peft layer ftkit does not merge (not a Linear, lora_bias, fan_in_fan_out), non-finite result.
    """
    from peft.tuners.lora import Linear as LoraLinear

    from ftkit.adapters.attach import (
        _BASE_PREFIX,
        ADAPTER_NAME,
        adapter_state,
        detach_adapter_state,
        lora_layers,
    )

    state = adapter_state(model)
    cfg = state.cfg
    if not state.enabled:
        raise MergeError("merge_into_model inside adapters_disabled(); leave the context first")
    layers = lora_layers(model)
    low = [n for n, m in layers.items() if _is_low_bit(m.get_base_layer())]
    if low:
        raise MergeError(f"{low[0]} (and {len(low) - 1} more) are 4-/8-bit layers. {FOUR_BIT_EXPLANATION}")
    for name, layer in layers.items():
        if not isinstance(layer, LoraLinear) or layer.fan_in_fan_out or layer.lora_bias.get(ADAPTER_NAME):
            raise MergeError(f"{name}: {type(layer).__name__} adapters with lora_bias / fan_in_fan_out or on "
                             "non-Linear layers are not supported by ftkit merge")
        base = layer.get_base_layer()
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight if layer.use_dora[ADAPTER_NAME] else None
        with torch.no_grad():
            w = merged_weight(base.weight, layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight,
                              layer.scaling[ADAPTER_NAME], magnitude)
        base.weight.data = check_finite(f"{name}.weight", w)
        parent_name, _, attr = name.rpartition(".")
        base.weight.requires_grad_(False)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, base)
    for path in cfg.module_paths_to_save():
        for sub in model.get_submodule(path).modules():
            for b in [b for b in sub._buffers if b.startswith(_BASE_PREFIX)]:
                del sub._buffers[b]
    for p in model.parameters():
        p.requires_grad_(False)
    detach_adapter_state(model)
    return model


# ----------------------------------------------------------------------------- checks and writing

def check_merge_args(takes: str, base, adapter, out, dtype: torch.dtype | str, overwrite: bool,
                     check_base: Callable[[Path], None]) -> tuple[Path, Path, Path, torch.dtype, AdapterFolder]:
    """The refusals both merges make before reading a weight, in this order: ``base`` is a model
    (TypeError: ``takes`` + use merge_into_model), unknown ``dtype`` (ValueError), no folder ``base``
    (FileNotFoundError), ``check_base(base)`` (the folder kind's own files), ``out`` exists without
    ``overwrite`` (FileExistsError), an incomplete adapter folder (:class:`AdapterFolder`).

    Returns:
        (base, adapter, out) as paths, the dtype, the adapter folder.
    """
    if isinstance(base, nn.Module):
        raise TypeError(f"{takes}; for an in-memory model use merge_into_model(model)")
    base, adapter, out = Path(base), Path(adapter), Path(out)
    dtype = parse_dtype(dtype)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: base folder not found")
    check_base(base)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: output folder exists (pass overwrite=True / --overwrite)")
    return base, adapter, out, dtype, AdapterFolder(adapter)


def human_bytes(n: float) -> str:
    """``7.8 MB``, ``512 kB``, ``14.2 GB``: three significant digits in the unit that shows them."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (its nearest existing ancestor)."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def require_free_space(out: Path, need: int) -> None:
    """Refuse (ENOSPC, naming ``out`` and both sizes in a unit that shows them) a write of ``need`` bytes
    that the filesystem holding ``out`` cannot take."""
    free = free_bytes(out.parent)
    if need > free:
        raise OSError(errno.ENOSPC, f"{out}: not enough disk space: the merged folder needs {human_bytes(need)}, "
                                    f"{human_bytes(free)} free")


@contextlib.contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """Re-raise an OSError while writing the merged folder as one naming ``out`` and the likely cause (the
    caller writes inside :class:`~ftkit.models.release.atomic_dir`, which then leaves nothing under ``out``)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{out}: writing the merged folder failed ({e.strerror or e}); is the disk "
                               f"full? Nothing was written under {out}") from e


# ----------------------------------------------------------------------------- verification

def probe_batch(cfg, seed: int = 0):
    """A small packed batch with every token kind: text (CE), a ViT image, a clean and a noisy VAE image.

    Returns (batch, forward kwargs with fixed flow noise and VAE posterior noise).
    """
    from ftkit.data.packer import PackConfig, pack
    from ftkit.segments import Kind, Segment, Step

    g = torch.Generator().manual_seed(seed)
    vocab = cfg.llm.vocab_size
    ids = lambda n: torch.randint(0, min(vocab, 1000), (n,), generator=g).tolist()  # noqa: E731
    vit_side, vae_side = cfg.vit.patch_size * 2, cfg.vae_stride * 2
    img = lambda s: torch.rand(3, s, s, generator=g) * 2 - 1  # noqa: E731
    segs = [Segment(Kind.TEXT, Step.CONTEXT, text_ids=ids(5)),
            Segment(Kind.VIT_IMAGE, image=img(vit_side)),
            Segment(Kind.VAE_CLEAN, image=img(vae_side)),
            Segment(Kind.TEXT, Step.PLAN, text_ids=ids(6), loss=True),
            Segment(Kind.VAE_NOISY, Step.DRAFT, image=img(vae_side), loss=True, timestep_logit=0.3)]
    batch = pack([segs], PackConfig(**cfg.pack_config()))
    lat = vae_side // cfg.vae_downsample
    eps = [torch.randn(cfg.latent_channels, lat, lat, generator=g) for _ in batch.vae_images]
    noise = torch.randn(batch.vae_token_indexes.numel(), cfg.patch_latent_dim, generator=g)
    return batch, {"flow_noise": noise, "vae_posterior_eps": eps}


@torch.no_grad()
def run_probe(model: nn.Module, probe) -> dict[str, torch.Tensor]:
    batch, kw = probe
    model.eval()
    out = model(batch, return_logits=True, **kw)
    return {"hidden": out.hidden.float(), "ce_logits": out.ce_logits.float(), "velocity": out.velocity_pred.float()}


def compare_outputs(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict:
    """Per probe output ``d = max |got - ref|`` (``per_output``), ``max_diff = max d`` and
    ``max_scaled_diff = max d / max(1, max |ref|)``: bf16 rounding of merged weights is relative, so
    logits of size 30 differ ~30x more than normalised hidden states."""
    diffs = {k: (got[k] - ref[k]).abs().max().item() if ref[k].numel() else 0.0 for k in ref}
    scaled = {k: d / max(1.0, ref[k].abs().max().item() if ref[k].numel() else 0.0) for k, d in diffs.items()}
    return {"max_diff": max(diffs.values()), "max_scaled_diff": max(scaled.values()), "per_output": diffs}


def record_verification(rep: MergeReport, v: dict, tolerance: float | None, dtype: torch.dtype, out: Path) -> None:
    """Put :func:`compare_outputs`' numbers and the tolerance (default 1e-4 for fp32 output, 2e-2 for
    bf16/fp16) in ``rep``; MergeError when ``max_scaled_diff`` is above the tolerance."""
    tol = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    rep.max_diff, rep.max_scaled_diff, rep.per_output = v["max_diff"], v["max_scaled_diff"], v["per_output"]
    rep.tolerance = tol
    if not rep.max_scaled_diff <= tol:
        raise MergeError(f"{out}: verification failed: merged model differs from base + adapter by "
                         f"{rep.max_diff:.3e} (scaled {rep.max_scaled_diff:.3e}) > tolerance {tol:.1e} "
                         f"({v['per_output']}); nothing written")


def verification_text(rep) -> str:
    """The quantity verification compares with the tolerance, the tolerance, and the verdict, in one line:
    ``scaled = max |merged - (base + adapter)| / max(1, max |output|)`` over the probe batch's outputs."""
    ok = rep.max_scaled_diff <= rep.tolerance
    return (f"max scaled diff {rep.max_scaled_diff:.3e} {'<=' if ok else '>'} tolerance {rep.tolerance:.1e} "
            f"(|merged - (base + adapter)| / max(1, |output|) on a probe batch; max abs diff {rep.max_diff:.3e}): "
            f"{'ok' if ok else 'FAILED'}")


# ----------------------------------------------------------------------------- model card

def model_card(model: str, base_row: str, adapter: Path, ad: AdapterFolder, rep: MergeReport, rows: list[str],
               loading: list[str]) -> str:
    """The merged folder's ``README.md``: a table (base, adapter, method, merged projections,
    modules_to_save, what it was trained on, the front end's ``rows``, verification, the run information
    recorded with the adapter) and a Loading section."""
    cfg, fp = ad.cfg, ad.fingerprint
    trained_on = f"QLoRA, {fp['quantization']} base" if fp.get("quantization") else fp.get("dtype", "?")
    lines = [
        f"# {model} with merged adapter", "",
        f"Merged by ftkit {ad.meta.get('ftkit_version', '?')} (`ftkit merge`).", "",
        "| | |", "|---|---|",
        f"| base | {base_row} |",
        f"| adapter | `{adapter}` |",
        f"| method | {rep.method} (preset `{cfg.preset}`, r {cfg.r}, alpha {cfg.alpha}"
        + (f", per-expert r {cfg.expert_r}" if cfg.expert_r else "")
        + (f", per-expert alpha {cfg.expert_alpha}" if cfg.expert_alpha else "") + ") |",
        f"| merged projections | {rep.merged} |",
        f"| modules_to_save | {', '.join(cfg.modules_to_save) or 'none'} |",
        f"| trained on | {trained_on}; experts {fp.get('experts')} |",
        *rows,
    ]
    if rep.max_diff is not None:
        lines.append(f"| verification | {verification_text(rep)} |")
    extra = ad.meta.get("extra") or {}
    known = ("recipe", "run", "data", "metrics")
    lines += [f"| {key} | `{json.dumps(extra[key])}` |" for key in known if key in extra]
    others = {k: v for k, v in extra.items() if k not in known}
    if others:
        lines.append(f"| other | `{json.dumps(others)}` |")
    return "\n".join([*lines, "", "## Loading", "", *loading, ""])


__all__ = ["MergeError", "MergeReport", "FOUR_BIT_EXPLANATION", "merged_weight", "check_finite", "adapter_method",
           "merge_into_model", "check_merge_args", "human_bytes", "free_bytes", "require_free_space", "write_errors",
           "probe_batch", "run_probe", "compare_outputs", "record_verification", "verification_text", "model_card"]
