"""Load a BAGEL release folder as it is downloaded (no conversion step).

The model is built on the meta device; every parameter is then read from the memory-mapped
safetensors file, cast, (optionally) quantized and assigned one tensor at a time, so peak RAM stays
close to the final model's size. Every key is accounted for: missing, unexpected or mis-shaped keys
raise an error naming the file and the keys; nothing is left randomly initialised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from ftkit.models.bagel import BagelModel
from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig

log = logging.getLogger("ftkit")

RELEASE_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors")
WEIGHTS_HINT = (
    "BAGEL-7B-MoT is published on the Hugging Face Hub as ByteDance-Seed/BAGEL-7B-MoT; download the folder "
    "(e.g. `huggingface-cli download ByteDance-Seed/BAGEL-7B-MoT --local-dir PATH` on a machine with network) "
    "and pass its local path."
)
QUANTIZE = (None, "nf4", "int8")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it should fill."""


def _fmt_keys(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def open_safetensors(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e}); "
                              "the file is truncated or corrupt, download it again") from e


def _check_payload(path: Path, f) -> None:
    """safetensors opens a truncated file whose header survived; check the data section's length."""
    import json
    import struct

    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        raise CheckpointError(f"{path}: truncated: {size} bytes on disk, header describes {8 + n + end}; download it again")


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise KeyError(name)


def is_quantizable(name: str) -> bool:
    """Decoder Linear layers of every expert (attention projections and MLPs)."""
    return ".layers." in name and name.startswith("language_model.") and name.endswith(".weight") and (
        "_proj" in name.rsplit(".", 2)[-2]
    )


def _quantized_linear(w: torch.Tensor, bias: torch.Tensor | None, mode: str, dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    if mode == "nf4":
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=dtype, quant_type="nf4",
                                quant_storage=torch.uint8, device="meta")
        lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       quant_storage=torch.uint8)._quantize(device)
        # bnb's CPU path repacks 4-bit weights after an eval no-grad forward, which breaks later training
        # forwards; keep the portable kernel (no effect on CUDA).
        lin.support_avx512bf16_for_cpu = False
    else:
        lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, device="meta")
        lin.weight = bnb.nn.Int8Params(w.to(torch.float16 if torch.device(device).type == "cuda" else dtype),
                                       requires_grad=False, has_fp16_weights=False)
        lin = lin.to(device)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(dtype).to(device), requires_grad=False)
    return lin


def fill_from_safetensors(
    model: nn.Module,
    path: Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    source_key: Callable[[str, set[str]], str | None] | None = None,
    skip_prefixes: tuple[str, ...] = (),
    trainable: bool = False,
) -> None:
    """Fill every meta parameter of ``model`` from ``path``; strict on keys and shapes.

    ``source_key(model_key, file_keys)`` may redirect a model key to another file key (upcycling an
    expert from the base weights); ``skip_prefixes`` are model keys filled elsewhere (the VAE).
    Frozen float tensors stay in ``dtype``; integer tensors keep theirs.
    """
    f = open_safetensors(path)
    _check_payload(path, f)
    file_keys = set(f.keys())
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(skip_prefixes)}
    src_of = {}
    for k in targets:
        s = k if k in file_keys else (source_key(k, file_keys) if source_key else None)
        src_of[k] = s
    missing = [k for k, s in src_of.items() if s is None or s not in file_keys]
    used = {s for s in src_of.values() if s is not None}
    unexpected = file_keys - used
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        raise CheckpointError(f"{path}: checkpoint does not match the model built from its config: " + "; ".join(parts))
    bad = []
    for k, t in targets.items():
        shape = tuple(f.get_slice(src_of[k]).get_shape())
        if shape != tuple(t.shape):
            bad.append(f"{src_of[k]} {list(shape)} (model expects {list(t.shape)})")
    if bad:
        raise CheckpointError(f"{path}: mis-shaped keys (does the config contradict the weights?): " + "; ".join(bad[:8])
                              + (f" ... (+{len(bad) - 8} more)" if len(bad) > 8 else ""))
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")

    quantized_modules = set()
    for k in targets:
        if quantize and is_quantizable(k):
            quantized_modules.add(k.rsplit(".", 1)[0])
    for k in targets:
        mod_name = k.rsplit(".", 1)[0]
        if mod_name in quantized_modules:
            continue
        t = f.get_tensor(src_of[k])
        if t.is_floating_point():
            t = t.to(dtype)
        _set_tensor(model, k, t.to(device), requires_grad=trainable)
    for mod_name in sorted(quantized_modules):
        w = f.get_tensor(src_of[mod_name + ".weight"])
        b = f.get_tensor(src_of[mod_name + ".bias"]) if (mod_name + ".bias") in targets else None
        parent_name, _, attr = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, _quantized_linear(w, b, quantize, dtype, device))
        del w, b


def upcycle_source_key(model_key: str, file_keys: set[str]) -> str | None:
    """A new expert's weight (``*_moe_sem*``) starts from the base (understanding) expert's."""
    if "_moe_sem" in model_key:
        k = model_key.replace("_moe_sem", "")
        return k if k in file_keys else None
    return None


def infer_bagel_config(folder: Path, llm: LLMConfig, vit: ViTConfig, ema: Path) -> dict:
    """Read the BAGEL-level constants upstream passes in code from the checkpoint's tensor shapes."""
    f = open_safetensors(ema)
    keys = set(f.keys())
    out = {}
    for key, field_ in (("latent_pos_embed.pos_embed", "max_latent_size"), ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side")):
        if key not in keys:
            raise CheckpointError(f"{ema}: missing key {key}")
        rows = f.get_slice(key).get_shape()[0]
        side = math.isqrt(rows)
        if side * side != rows:
            raise CheckpointError(f"{ema}: {key} has {rows} rows, not a square grid")
        out[field_] = side
    if any("_moe_sem" in k for k in keys):  # a checkpoint saved with three experts
        out.update(experts=("", "_moe_sem", "_moe_gen"), routing=(0, 1, 2))
    if "vae2llm.weight" in keys:
        pdim = f.get_slice("vae2llm.weight").get_shape()[1]
        out["latent_channels"] = pdim // 4  # 2x2 latent patches
    return out


def load_tokenizer(folder: str | Path):
    """The Qwen2 tokenizer files of the release folder (vocab.json + merges.txt [+ tokenizer.json])."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for field_, tok in (("bos_id", "<|im_start|>"), ("eos_id", "<|im_end|>"),
                        ("start_of_image", "<|vision_start|>"), ("end_of_image", "<|vision_end|>")):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {tok} token")
        ids[field_] = int(i)
    return ids


def load_bagel(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
    load_vae: bool = True,
    three_experts: bool = False,
    timestep_shift: float = 1.0,
    vae_dtype: torch.dtype | None = None,
) -> BagelModel:
    """Load a BAGEL release folder (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors,
    tokenizer files; optional ae_config.json for non-FLUX autoencoders).

    ``quantize="nf4"`` / ``"int8"`` turns the decoder's Linear layers of every expert into bitsandbytes
    4-/8-bit layers; embeddings, norms, lm_head, ViT, VAE and connectors stay in ``dtype``.
    ``three_experts=True`` splits the understanding expert into linguistic + semantic (``_moe_sem``
    starts as a copy of the understanding weights). Raises FileNotFoundError / CheckpointError naming
    the file and keys on any mismatch.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: BAGEL folder not found. {WEIGHTS_HINT}")
    needed = list(RELEASE_FILES) + (["ae.safetensors"] if load_vae else [])
    absent = [n for n in needed if not (folder / n).is_file()]
    if absent:
        raise FileNotFoundError(f"{folder}: missing {', '.join(absent)} (a BAGEL release folder holds "
                                f"{', '.join(needed)} and the tokenizer files). {WEIGHTS_HINT}")
    llm = LLMConfig.from_json(folder / "llm_config.json")
    vit = ViTConfig.from_json(folder / "vit_config.json")
    ema = folder / "ema.safetensors"
    extra = infer_bagel_config(folder, llm, vit, ema)
    specials = {}
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        specials = special_token_ids(load_tokenizer(folder))
    cfg = BagelConfig(llm=llm, vit=vit, timestep_shift=timestep_shift, **extra, **specials)
    if three_experts and len(cfg.experts) == 2:
        cfg = BagelConfig.three_experts(cfg)
    with torch.device("meta"):
        model = BagelModel(cfg)
    fill_from_safetensors(model, ema, dtype=dtype, device=device, quantize=quantize,
                          source_key=upcycle_source_key if three_experts else None)
    if load_vae:
        from ftkit.models.vae import AEConfig, load_ae

        ae_cfg = AEConfig.from_json(folder / "ae_config.json") if (folder / "ae_config.json").is_file() else AEConfig.flux()
        model.vae = load_ae(folder / "ae.safetensors", ae_cfg, dtype=vae_dtype or dtype, device=device)
        model.vae.requires_grad_(False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded BAGEL from %s (%s, quantize=%s, experts=%s)", folder, dtype, quantize, cfg.experts)
    return model
