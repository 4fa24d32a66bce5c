"""Merge an adapter into a FoX checkpoint folder (:func:`ftkit.models.fox.save_fox`'s format), in memory.

FoX checkpoints are small (Qwen2-0.5B-class: about 1.3B parameters in ``copy`` mode, 5 GiB in fp32), so
the merge loads the base whole in fp32 instead of streaming it (:func:`ftkit.adapters.merge.merge` is
the streaming merge of BAGEL release folders). The math is the streaming merge's, peft's operation for
operation (:func:`~ftkit.adapters.merge_common.merged_weight` through
:func:`~ftkit.adapters.merge_common.merge_into_model`), per LoRA target with base weight ``W`` [out, in],
``A`` [r, in], ``B`` [out, r] and scale ``s`` (``alpha / r``; rsLoRA ``alpha / sqrt(r)``; per-module values
from ``rank_pattern`` / ``alpha_pattern``)::

    LoRA / rsLoRA:  W' = W + s B A
    DoRA:           W' = m / ||W + s B A||_row * (W + s B A)

(``||.||_row``: L2 norm of each output row over the input dimension; ``m`` the learned magnitude). A
QLoRA adapter (trained on an NF4-quantized base) is an update to the *unquantized* weights: the base
folder is always loaded unquantized and the update lands there, never in 4-bit weights. Trained
``modules_to_save`` replace their base tensors.

**Shared experts.** A ``fox_mode: "shared"`` base stores one expert's decoder weights that all three
experts use (the very same ``nn.Parameter`` objects). Merging writes into the parameter a LoRA layer
wraps, so merging expert ``e``'s delta into a shared tensor would silently give every expert that
shares it ``e``'s delta. Before merging, every *adapted* expert that shares its weights therefore gets
its own copy of all its base tensors (whole experts are untied, so the written folder never records a
partial share); experts without an adapter keep sharing one copy of the original weights (when the
group's every member is adapted, one of them keeps the originals). Any other LoRA target whose
weight is tied elsewhere (e.g. a custom ``lm_head`` target on a model with tied word embeddings) is
untied the same way, and ``tie_word_embeddings`` is then written as ``false``. The output records
``fox_mode: "copy"`` unless some untouched experts still share (``shared_experts`` lists them).

Output folder (what :func:`~ftkit.models.fox.load_fox` reads; see :mod:`ftkit.models.fox`)::

    config.json          model_type "ftkit-fox", fox_mode, bagel_config, shared_experts, tied_parameters, dtype
    model.safetensors    every non-VAE tensor once, in ``dtype`` (tied ones listed in tied_parameters)
    vae/                 the base's autoencoder folder, copied byte for byte (the merge does not change it)
    tokenizer files      (tokenizer.save_pretrained of the base's tokenizer)
    README.md            model card: base, adapter, method, recipe / data / metrics if recorded, verification

written into a temporary sibling folder and renamed to ``out`` only after verification passed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ftkit.adapters import merge_common as common
from ftkit.adapters.attach import lora_layers
from ftkit.adapters.config import AdapterConfigError
from ftkit.adapters.io import AdapterError, AdapterFolder, load_adapter, split_disk_key
from ftkit.models.experts import is_adapter_parameter
from ftkit.models.folders import FOX_MODEL_TYPE, is_fox_folder
from ftkit.models.fox import unique_tensors

WEIGHTS = "model.safetensors"


@dataclass
class FoxMergeReport(common.MergeReport):
    """:class:`~ftkit.adapters.merge_common.MergeReport` plus what happened to the experts.

    ``fox_mode_in`` / ``fox_mode_out``: the base's and the output's ``fox_mode``; ``untied_experts``:
    expert suffixes that got their own copy of previously shared base weights; ``shared_experts``: the
    output's ``{dst: src}`` whole-expert shares; ``untied_other``: other tied weights a LoRA target
    had to be separated from (e.g. ``language_model.lm_head.weight``)."""

    fox_mode_in: str = "copy"
    fox_mode_out: str = "copy"
    untied_experts: list[str] = field(default_factory=list)
    shared_experts: dict[str, str] = field(default_factory=dict)
    untied_other: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- untying shared weights

def _base_params(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owning sub-module, attribute, parameter) of every non-adapter parameter under ``module``."""
    out = []
    for path, sub in module.named_modules():
        if is_adapter_parameter(path):
            continue
        for attr, p in sub._parameters.items():
            if p is not None and not is_adapter_parameter(attr):
                out.append((sub, attr, p))
    return out


def _clone_into(slots: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Give ``slots`` fresh copies of their parameters (one copy per distinct parameter, so ties
    *within* the slots are kept)."""
    fresh: dict[int, nn.Parameter] = {}
    for owner, attr, p in slots:
        if id(p) not in fresh:
            fresh[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
        owner._parameters[attr] = fresh[id(p)]


def untie_adapted_weights(model: nn.Module) -> tuple[list[str], list[str]]:
    """Make sure merging the attached adapters changes no tensor that an un-adapted layer also uses.

    Experts: groups of experts sharing base tensors are found by parameter identity; inside a group,
    each adapted expert gets its own copy of ALL its base tensors, except that when every member is
    adapted the first keeps the originals; un-adapted members keep sharing the originals. Then every
    remaining LoRA target whose weight/bias is still used elsewhere gets its own copy. Values are
    unchanged, so the model's function is unchanged.

    Returns:
        (untied expert suffixes, names of other untied LoRA-target parameters).
    """
    from ftkit.models.experts import decoder_prefix, expert_of_parameter, expert_slots, find_decoder

    dec = find_decoder(model)
    experts = tuple(dec.experts)
    prefix = decoder_prefix(model, dec)
    layers = lora_layers(model)
    adapted = {expert_of_parameter(n + ".weight", prefix, experts) for n in layers} - {None}
    slots = {s: [x for _, parent, base in expert_slots(dec) for x in _base_params(getattr(parent, base + s))]
             for s in experts}
    ids = {s: {id(p) for _, _, p in slots[s]} for s in experts}
    groups: list[list[str]] = []
    for s in experts:  # connected components of "shares a tensor with"
        joined = [g for g in groups if any(ids[s] & ids[t] for t in g)]
        merged = [s] + [t for g in joined for t in g]
        groups = [g for g in groups if g not in joined] + [sorted(merged, key=experts.index)]
    untied = []
    for g in groups:
        if len(g) < 2:
            continue
        ad = [s for s in g if s in adapted]
        keep_originals = len(ad) == len(g)
        for s in ad[1:] if keep_originals else ad:
            _clone_into(slots[s])
            untied.append(s)
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    other = []
    for name, layer in sorted(layers.items()):
        base = layer.get_base_layer()
        for attr in ("weight", "bias"):
            p = base._parameters.get(attr)
            if p is not None and count[id(p)] > 1:
                _clone_into([(base, attr, p)])
                count[id(p)] -= 1
                other.append(f"{name}.{attr}")
    return sorted(untied, key=experts.index), other


# ----------------------------------------------------------------------------- writing

def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _model_card(base: Path, adapter: Path, ad: AdapterFolder, rep: FoxMergeReport, dtype: torch.dtype) -> str:
    rows = [f"| weights | {str(dtype).removeprefix('torch.')} ({WEIGHTS}), fox_mode {rep.fox_mode_out}"
            + (f", shared experts {rep.shared_experts}" if rep.shared_experts else "") + " |"]
    if rep.untied_experts:
        names = ", ".join(f"`{s or 'base'}`" for s in rep.untied_experts)
        rows.append(f"| untied | experts {names} got their own copy of the shared base weights (each carries "
                    "its own merged adapter) |")
    if rep.untied_other:
        rows.append(f"| untied weights | {', '.join(rep.untied_other)} |")
    loading = ["`ftkit.models.fox.load_fox(PATH)` (pass `quantize=\"nf4\"` for QLoRA on top) and "
               "`load_fox_tokenizer(PATH)`, or `ftkit generate --model PATH`."]
    return common.model_card("FoX", f"`{base}` (fox_mode {rep.fox_mode_in})", adapter, ad, rep, rows, loading)


def _require_fox_config(base: Path) -> None:
    cfg_path = base / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: file not found (a FoX folder holds config.json, {WEIGHTS}, vae/ and "
                                "tokenizer files)")
    if not is_fox_folder(base):
        raise ValueError(f"{cfg_path}: not a FoX checkpoint (field model_type must be {FOX_MODEL_TYPE!r}); "
                         "BAGEL release folders merge with ftkit.adapters.merge.merge")


# ----------------------------------------------------------------------------- merge

def merge_fox(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
              dtype: torch.dtype | str = torch.bfloat16, overwrite: bool = False, verify: bool = True,
              tolerance: float | None = None) -> FoxMergeReport:
    """Merge ``adapter`` into the FoX checkpoint folder ``base`` and write a FoX folder ``out``.

    Steps: load ``base`` unquantized in fp32 (:func:`~ftkit.models.fox.load_fox`), attach the adapter
    (:func:`~ftkit.adapters.io.load_adapter`: experts, architecture and target shapes are checked against
    the adapter's fingerprint), run the probe batch through base + adapter (reference), untie shared
    weights the adapter would change (:func:`untie_adapted_weights`), fold the adapters in
    (:func:`~ftkit.adapters.merge_common.merge_into_model`), write the folder (module doc), load it back with
    ``load_fox`` in fp32 and compare.

    Args:
        base: FoX folder written by :func:`~ftkit.models.fox.save_fox` (copy or shared mode), the one the
            adapter was trained on (for a QLoRA adapter: the unquantized folder it was loaded from).
        adapter: adapter folder written by :func:`~ftkit.adapters.io.save_adapter`.
        out: output folder (written to a temporary sibling, renamed at the end).
        dtype: dtype of the written decoder/ViT/connector weights (``torch.bfloat16``, ``"fp32"``, ...);
            the VAE folder is copied unchanged.
        overwrite: replace an existing ``out``.
        verify: compare base + adapter (fp32) with the written folder (loaded in fp32) on
            :func:`~ftkit.adapters.merge_common.probe_batch` (text, ViT, clean and noisy VAE tokens: final hidden
            states, CE logits, velocities); fail when the max abs difference, each output's divided by
            its largest magnitude where that exceeds 1, is above ``tolerance`` (default 1e-4 for fp32
            output, 2e-2 for bf16/fp16).

    Returns:
        A :class:`FoxMergeReport` (``max_diff`` / ``max_scaled_diff`` / ``per_output`` when verified).

    Raises:
        TypeError: ``base`` is a model (use :func:`~ftkit.adapters.merge_common.merge_into_model`).
        ValueError: ``base`` is not a FoX folder (config.json ``model_type``), unknown ``dtype``.
        FileNotFoundError: a folder or file of ``base`` / ``adapter`` is missing.
        FileExistsError: ``out`` exists and not ``overwrite``.
        AdapterError: the adapter was trained for another base (experts, architecture, target names or
            shapes) or is malformed; the message names the adapter file and the mismatch.
        MergeError: ``out`` is ``base`` or ``adapter``; verification above tolerance.
        OSError: not enough disk space or writing failed; nothing is left under ``out``.
    """
    from ftkit.models.fox import load_fox, load_fox_tokenizer
    from ftkit.models.release import atomic_dir

    t0 = time.perf_counter()
    # missing / malformed adapter files fail here, before the base is read
    base, adapter, out, dtype, ad = common.check_merge_args("merge_fox() takes the base FoX FOLDER", base, adapter,
                                                            out, dtype, overwrite, _require_fox_config)
    raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    vae_src = base / str(raw.get("vae", "vae"))

    model = load_fox(base, dtype=torch.float32)  # unquantized: QLoRA updates land in the full-precision weights
    try:
        load_adapter(model, adapter)
    except (AdapterError, AdapterConfigError) as e:
        raise AdapterError(f"cannot merge {adapter} into the FoX base {base}: {e}") from e
    merged = len(lora_layers(model))
    replaced = sum(1 for k in ad.tensors() if split_disk_key(k)[1] == "param")
    method = common.adapter_method(ad.peft)
    probe = ref = None
    if verify:
        probe = common.probe_batch(model.cfg)
        ref = common.run_probe(model, probe)

    untied, other = untie_adapted_weights(model)
    common.merge_into_model(model)
    from ftkit.models.experts import shared_expert_pairs

    try:
        pairs = shared_expert_pairs(model)
    except ValueError as e:
        raise common.MergeError(f"{base}: after untying, experts share only part of their weights ({e})") from e
    tensors, ties = unique_tensors(model, dtype)  # each storage once, ties recorded as save_fox does
    cfg_dict = model.cfg.to_dict()
    lm = model.language_model
    if cfg_dict["llm"]["tie_word_embeddings"] and lm.lm_head.weight is not lm.model.embed_tokens.weight:
        cfg_dict["llm"]["tie_word_embeddings"] = False  # a merged lm_head LoRA separated it from the embeddings
    del lm
    meta = {
        "model_type": FOX_MODEL_TYPE, "format_version": raw.get("format_version", 1),
        "fox_mode": "shared" if pairs else "copy", "bagel_config": cfg_dict, "shared_experts": pairs,
        "tied_parameters": ties, "vae": "vae", "dtype": str(dtype).removeprefix("torch."),
    }
    tokenizer = load_fox_tokenizer(base, model.cfg.llm.vocab_size)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    rep = FoxMergeReport(out=out, files=[], tensors=len(tensors), merged=merged, replaced=replaced, upcycled=0,
                         total_bytes=total, sharded=False, method=method,
                         fox_mode_in=str(raw.get("fox_mode", "copy")), fox_mode_out=meta["fox_mode"],
                         untied_experts=untied, shared_experts=pairs, untied_other=other)
    del model
    for k, t in tensors.items():
        common.check_finite(k, t)
    need = total + _dir_bytes(vae_src) + (4 << 20)
    common.require_free_space(out, need)
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite, inputs=(base, adapter), model_folder=True) as tmp:
        with common.write_errors(out):
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "model_type": FOX_MODEL_TYPE})
            del tensors
            shutil.copytree(vae_src, tmp / "vae")
            tokenizer.save_pretrained(str(tmp))
            (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if verify:
            got = common.run_probe(load_fox(tmp, dtype=torch.float32), probe)
            common.record_verification(rep, common.compare_outputs(ref, got), tolerance, dtype, out)
        (tmp / "README.md").write_text(_model_card(base, adapter, ad, rep, dtype), encoding="utf-8")
        rep.files = sorted(p.name for p in tmp.iterdir())
    rep.seconds = time.perf_counter() - t0
    return rep


__all__ = ["FoxMergeReport", "is_fox_folder", "merge_fox", "untie_adapted_weights"]
