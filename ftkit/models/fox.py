"""FoX-style three-expert unified model, built from public parts, and its checkpoint folder.

FoX (arXiv 2503.01298) grows Qwen2-0.5B into three *functionality* experts sharing one attention:
Linguistic (text), Semantic Visual (clean image tokens) and Generative Visual (noisy latent tokens).
Its weights are not public, so :func:`build_fox` assembles the same architecture from three LOCAL
folders: a transformers Qwen2 folder, a transformers SigLIP vision folder and a diffusers
``AutoencoderKL`` folder. The result is a :class:`~ftkit.models.bagel.BagelModel` with::

    BagelConfig(experts=("", "_moe_sem", "_moe_gen"), routing=(0, 1, 2), vae_tokens_generative=False)

so a token goes to ``routing[functionality]``: text and image markers -> ``""`` (linguistic), ViT and
clean VAE tokens -> ``_moe_sem`` (semantic), noisy latents -> ``_moe_gen`` (generative). The Qwen2
decoder becomes the linguistic expert unchanged (``qk_norm=False``, Qwen2's own
``tie_word_embeddings``); the other two are upcycled from it in one of two modes
(:mod:`ftkit.models.experts`): ``copy`` (independent clones, three experts' memory) or ``shared``
(the same frozen tensors, one expert's memory; experts differ by their own adapters).

Rectified flow uses BAGEL's convention (x_t = (1 - t) x0 + t eps, v = eps - x0), not FoX's.

Checkpoint folder written by :func:`save_fox` and read by :func:`load_fox` (no original folder needed)::

    config.json              {"model_type": "ftkit-fox", "format_version": 1, "fox_mode": "copy"|"shared",
                              "bagel_config": {...every BagelConfig field...},
                              "shared_experts": {dst suffix: src suffix},   # shared mode
                              "tied_parameters": {name: name it is the same tensor as},
                              "vae": "vae", "dtype": "float32"}
    model.safetensors        every parameter except the VAE's, each tensor stored ONCE (a tied or
                             shared parameter is absent and listed in tied_parameters)
    vae/config.json + vae/diffusion_pytorch_model.safetensors   the diffusers AutoencoderKL layout
                             (scaling_factor / shift_factor in its config)
    tokenizer files          (tokenizer.save_pretrained; image markers included)

The folder is written under a temporary name next to ``out_dir`` and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftkit.models.bagel import BagelModel
from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig, read_json_object
from ftkit.models.experts import (
    MODES,
    expert_of_parameter,
    has_adapters,
    share_expert_weights,
    shared_expert_pairs,
    tensor_storage_key,
)
from ftkit.models.folders import FOX_FORMAT_VERSION, FOX_MODEL_TYPE, SHARD_INDEX, fox_config, read_fox_meta
from ftkit.models.loading import (
    SafetensorsFile,
    ShardedSafetensors,
    Source,
    WeightFile,
    fill_from_safetensors,
    load_tokenizer,
    special_token_ids,
)
from ftkit.models.siglip import sincos_2d
from ftkit.models.vae import AEConfig, FluxAE

MODEL_TYPE = FOX_MODEL_TYPE  # re-exported: the one definition is ftkit.models.folders.FOX_MODEL_TYPE
FORMAT_VERSION = FOX_FORMAT_VERSION
FOX_EXPERTS = ("", "_moe_sem", "_moe_gen")
FOX_ROUTING = (0, 1, 2)
IMAGE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")

QWEN2_HINT = ("Download Qwen/Qwen2-0.5B (e.g. `huggingface-cli download Qwen/Qwen2-0.5B --local-dir PATH` on a "
              "machine with network) and pass the folder (config.json, model.safetensors, tokenizer files).")
SIGLIP_HINT = ("Download a SigLIP vision model in transformers format, e.g. `huggingface-cli download "
               "google/siglip-so400m-patch14-384 --local-dir PATH` on a machine with network, and pass the folder "
               "(config.json, model.safetensors).")
VAE_HINT = ("Download a diffusers AutoencoderKL folder with 16 latent channels, e.g. the SD3 VAE "
            "(`huggingface-cli download stabilityai/stable-diffusion-3-medium-diffusers --include 'vae/*' "
            "--local-dir PATH`, gated: accept its licence first) or FLUX.1's `vae/`, on a machine with network, "
            "and pass PATH/vae (config.json, diffusion_pytorch_model.safetensors).")

# parameters build_fox creates (not in any source folder) and how they start
NEW_PARTS = ("connector.", "vae2llm.", "llm2vae.", "time_embedder.", "vit_pos_embed.", "latent_pos_embed.")


# ---------------------------------------------------------------------------------------------- files
def _need_dir(path: str | os.PathLike, what: str, hint: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {what} folder not found. {hint}")
    return folder


def _checkpoint(folder: Path, hint: str, ignore: Callable[[str], bool] = lambda k: False) -> WeightFile:
    """The safetensors weights of a transformers folder (``model.safetensors``, or shards behind
    ``model.safetensors.index.json``). Headers are validated up front
    (:class:`~ftkit.models.loading.SafetensorsFile`: truncated files refused, keys named); tensors are
    read with plain reads into fresh storage, so two model keys never alias one stored tensor."""
    index, single = folder / SHARD_INDEX, folder / "model.safetensors"
    if index.is_file():
        return WeightFile(ShardedSafetensors(index), str(folder), ignore)
    if single.is_file():
        return WeightFile(SafetensorsFile(single), str(folder), ignore)
    bin_note = (" (found pytorch_model.bin: only safetensors are read, no pickles; convert it with "
                "transformers' save_pretrained(safe_serialization=True))"
                if (folder / "pytorch_model.bin").is_file() else "")
    raise FileNotFoundError(f"{folder}: no model.safetensors or {SHARD_INDEX}{bin_note}. {hint}")


def _fmt(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------- configs
def _hf_config(folder: Path, hint: str):
    from transformers import AutoConfig

    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found. {hint}")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the transformers config ({type(e).__name__}: {e})") from e


def read_qwen2_config(folder: str | os.PathLike) -> LLMConfig:
    """A transformers Qwen2 ``config.json`` (defaults filled by transformers) -> :class:`LLMConfig`
    with ``qk_norm=False`` and the folder's own ``tie_word_embeddings``.

    Raises:
        FileNotFoundError: no config.json. ValueError (naming the file and field): not ``qwen2``, RoPE
        scaling, sliding-window attention or a head_dim other than hidden/heads (not supported).
    """
    folder = Path(folder)
    hf = _hf_config(folder, QWEN2_HINT)
    path = folder / "config.json"
    if hf.model_type != "qwen2":
        raise ValueError(f"{path}: model_type {hf.model_type!r}; build_fox needs a Qwen2 decoder (model_type 'qwen2')")
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype != "default" or theta is None:
        raise ValueError(f"{path}: field rope_parameters {rope} not supported (plain RoPE with rope_theta only)")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError(f"{path}: field use_sliding_window=true is not supported")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim != hf.hidden_size // hf.num_attention_heads:
        raise ValueError(f"{path}: field head_dim={head_dim} differs from hidden_size / num_attention_heads")
    try:
        return LLMConfig(
            hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads, vocab_size=hf.vocab_size,
            rope_theta=float(theta), rms_norm_eps=float(hf.rms_norm_eps), hidden_act=hf.hidden_act,
            qk_norm=False, tie_word_embeddings=bool(hf.tie_word_embeddings), attention_bias=True,
            max_position_embeddings=hf.max_position_embeddings,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def read_siglip_config(folder: str | os.PathLike) -> tuple[ViTConfig, int]:
    """A transformers SigLIP config (``siglip_vision_model``, or ``siglip`` with ``vision_config``) ->
    (:class:`ViTConfig` keeping ALL layers, patches per side of its position table).

    Raises:
        FileNotFoundError / ValueError naming the file and field.
    """
    folder = Path(folder)
    hf = _hf_config(folder, SIGLIP_HINT)
    path = folder / "config.json"
    if hf.model_type == "siglip":
        vc = hf.vision_config
    elif hf.model_type == "siglip_vision_model":
        vc = hf
    else:
        raise ValueError(f"{path}: model_type {hf.model_type!r}; expected 'siglip' or 'siglip_vision_model'")
    if vc.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"{path}: field hidden_act {vc.hidden_act!r} not supported")
    if vc.num_channels != 3:
        raise ValueError(f"{path}: field num_channels={vc.num_channels}; RGB (3) only")
    if vc.image_size % vc.patch_size:
        raise ValueError(f"{path}: image_size {vc.image_size} is not a multiple of patch_size {vc.patch_size}")
    vit = ViTConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                    num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
                    patch_size=vc.patch_size, num_channels=vc.num_channels, layer_norm_eps=vc.layer_norm_eps,
                    hidden_act=vc.hidden_act)
    return vit, vc.image_size // vc.patch_size


def _vae_files(path: str | os.PathLike) -> tuple[Path, Path]:
    folder = _need_dir(path, "VAE", VAE_HINT)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a whole diffusers pipeline folder
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: file not found. {VAE_HINT}")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: file not found (only safetensors are read). {VAE_HINT}")
    return cfg, weights


def load_diffusers_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> FluxAE:
    """A diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``) -> frozen :class:`FluxAE`.

    Built on the meta device and filled strictly from ``diffusion_pytorch_model.safetensors``
    (current diffusers key names). ``latent = scaling_factor * (z - shift_factor)`` with
    ``shift_factor = 0`` when the config has none; the downsampling factor is
    ``2 ** (len(block_out_channels) - 1)``.

    Raises:
        FileNotFoundError naming the folder/file; ValueError naming ``config.json`` and the field
        (not AutoencoderKL, per-channel latents_mean/std, widths not multiples of the first);
        CheckpointError naming the file and keys.
    """
    from diffusers import AutoencoderKL

    cfg_path, weights = _vae_files(path)
    raw = read_json_object(cfg_path)
    cls = raw.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"{cfg_path}: field _class_name is {cls!r}, expected 'AutoencoderKL'")
    for f in ("latents_mean", "latents_std"):
        if raw.get(f) is not None:
            raise ValueError(f"{cfg_path}: field {f} (per-channel latent statistics) is not supported")
    try:
        with torch.device("meta"):
            ae = AutoencoderKL.from_config(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: cannot build AutoencoderKL ({e})") from e
    c = ae.config
    boc = list(c.block_out_channels)
    if any(b % boc[0] for b in boc):
        raise ValueError(f"{cfg_path}: field block_out_channels {boc} must be multiples of the first width")
    size = c.sample_size[0] if isinstance(c.sample_size, list | tuple) else c.sample_size
    try:
        ae_cfg = AEConfig(resolution=int(size), in_channels=c.in_channels, downsample=2 ** (len(boc) - 1), ch=boc[0],
                          out_ch=c.out_channels, ch_mult=[b // boc[0] for b in boc], num_res_blocks=c.layers_per_block,
                          z_channels=c.latent_channels, scale_factor=float(c.scaling_factor),
                          shift_factor=float(c.shift_factor or 0.0))
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    fill_from_safetensors(ae, weights, dtype=dtype, device=device)
    out = FluxAE(ae, ae_cfg)
    out.requires_grad_(False)
    out.eval()
    return out


def load_fox_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None):
    """The Qwen2 tokenizer of ``folder`` with the four markers ftkit's packer needs.

    Markers the tokenizer lacks (Qwen2-0.5B has no ``<|vision_start|>`` / ``<|vision_end|>``) are
    added as special tokens; their ids then land in the embedding's padding rows (Qwen2 pads its
    vocabulary to 151936 rows), whose pretrained values are untrained and are learnt in fine-tuning.

    Raises:
        FileNotFoundError: no tokenizer files. ValueError: a marker id >= ``vocab_size`` (no row).
    """
    tok = load_tokenizer(folder)
    vocab = tok.get_vocab()
    absent = [t for t in IMAGE_MARKERS if t not in vocab]
    if absent:
        tok.add_tokens(absent, special_tokens=True)
    ids = special_token_ids(tok)
    if vocab_size is not None and max(ids.values()) >= vocab_size:
        raise ValueError(f"{folder}: tokenizer marker ids {ids} exceed the model's vocab_size {vocab_size}")
    return tok


# ---------------------------------------------------------------------------------------------- build
def _strip_suffix(rest: str, suffix: str) -> str:
    """``layers.0.self_attn.q_proj_moe_sem.weight`` -> ``layers.0.self_attn.q_proj.weight`` (decoder-relative)."""
    parts = rest.split(".")
    i = (3 if parts[2] == "self_attn" else 2) if parts[0] == "layers" else 0
    if suffix and parts[i].endswith(suffix):
        parts[i] = parts[i][: -len(suffix)]
    return ".".join(parts)


def _patch_embedding_transform() -> tuple[Callable, Callable]:
    """HF Conv2d [hidden, 3, p, p] -> ftkit Linear [hidden, p*p*3], columns (row, col, channel)."""
    def shape(s):
        return (s[0], s[1] * s[2] * s[3]) if len(s) == 4 else s

    def fn(t):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return shape, fn


def _position_table_transform(side: int) -> tuple[Callable, Callable]:
    """[S*S, D] -> [side*side, D]; bicubic resize of the 2-D grid (align_corners=False, as transformers'
    ``interpolate_pos_encoding``) when ``side != S``."""
    def shape(s):
        n = math.isqrt(s[0])
        return (side * side, s[1]) if n * n == s[0] else s

    def fn(t):
        n = math.isqrt(t.shape[0])
        if n == side:
            return t
        grid = t.float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(side * side, -1).to(t.dtype)
    return shape, fn


def _init_new_parts(model: BagelModel, *, seed: int, dtype: torch.dtype, device) -> list[str]:
    """Initialise what no source folder holds, reproducibly from ``seed``:

    * ``connector.fc{1,2}``, ``vae2llm``: Xavier-uniform weights, zero biases;
    * ``llm2vae``: zeros (as upstream's zero-init final layer: training starts at v_hat = 0);
    * ``time_embedder.mlp.{0,2}``: N(0, 0.02) weights, zero biases;
    * ``vit_pos_embed`` / ``latent_pos_embed``: the frozen 2-D sin-cos tables :func:`sincos_2d`.
    """
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    d, vh, c, fd = cfg.llm.hidden_size, cfg.vit.hidden_size, cfg.patch_latent_dim, model.time_embedder.freq_dim

    def xavier(out_f, in_f):
        return (torch.rand(out_f, in_f, generator=g) * 2 - 1) * math.sqrt(6.0 / (in_f + out_f))

    def normal(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    z = torch.zeros
    values = {
        "connector.fc1.weight": xavier(d, vh), "connector.fc1.bias": z(d),
        "connector.fc2.weight": xavier(d, d), "connector.fc2.bias": z(d),
        "vae2llm.weight": xavier(d, c), "vae2llm.bias": z(d),
        "llm2vae.weight": z(c, d), "llm2vae.bias": z(c),
        "time_embedder.mlp.0.weight": normal(d, fd), "time_embedder.mlp.0.bias": z(d),
        "time_embedder.mlp.2.weight": normal(d, d), "time_embedder.mlp.2.bias": z(d),
        "vit_pos_embed.pos_embed": sincos_2d(cfg.vit_max_num_patch_per_side, d),
        "latent_pos_embed.pos_embed": sincos_2d(cfg.max_latent_size, d),
    }
    model.load_state_dict({k: v.to(dtype).to(device) for k, v in values.items()}, strict=False, assign=True)
    return list(values)


def _finish(model: BagelModel) -> BagelModel:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unfilled: {_fmt(left)}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _tie_lm_head(model: BagelModel) -> None:
    lm = model.language_model
    if model.cfg.llm.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight


def build_fox(
    qwen2_path: str | os.PathLike,
    vision_path: str | os.PathLike,
    vae_path: str | os.PathLike,
    *,
    mode: str = "copy",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_latent_size: int = 64,
    vit_max_num_patch_per_side: int | None = None,
    timestep_shift: float = 1.0,
    seed: int = 0,
) -> BagelModel:
    """Assemble a FoX-style three-expert model from local Qwen2, SigLIP and diffusers-VAE folders.

    Weights: the Qwen2 decoder (``model.*``, ``lm_head.weight`` unless tied) fills the linguistic
    expert ``""`` unchanged; ``_moe_sem`` and ``_moe_gen`` are read from the same tensors (``copy``)
    or made to share them (``shared``: only ``""`` is read; the other experts' modules are then
    :func:`~ftkit.models.experts.share_expert_weights` clones, so no second copy ever exists). The
    SigLIP ``vision_model`` (all layers, post-layernorm; pooling ``head``, ``text_model``,
    ``logit_scale/bias`` ignored) fills ``vit_model.vision_model``; its Conv2d patch embedding
    becomes a Linear over (row, col, channel) columns and its position table is resized bicubically
    when ``vit_max_num_patch_per_side`` differs from ``image_size / patch_size``. The new parts start as
    documented in :func:`_init_new_parts` (Xavier connectors, zero ``llm2vae``, N(0, 0.02) time
    embedder, sin-cos tables), reproducibly from ``seed``. The model is built on the meta device and
    every tensor is filled once (strict: every stored key used, every model key filled).

    Args:
        qwen2_path: transformers Qwen2 folder (config.json, model.safetensors or sharded + index,
            tokenizer files).
        vision_path: transformers SigLIP folder (``siglip_vision_model`` or full ``siglip``).
        vae_path: diffusers AutoencoderKL folder (or a pipeline folder holding ``vae/``).
        mode: ``"copy"`` or ``"shared"``.
        dtype, device: of every parameter (VAE included).
        max_latent_size: side of the latent position table (latent tokens per side).
        vit_max_num_patch_per_side: side of the ViT position tables; default the SigLIP table's side.
        timestep_shift: flow timestep shift stored in the config.
        seed: seed of the new parts' initialisation.

    Returns:
        A frozen (``requires_grad=False``), eval-mode :class:`BagelModel` with its VAE attached; the
        training recipe unfreezes what it trains (e.g. connectors, ``vae2llm``, ``llm2vae``, time
        embedder) and attaches adapters. Its tokenizer: :func:`load_fox_tokenizer` (``qwen2_path``).

    Raises:
        FileNotFoundError: a folder or file is missing (the message names it and how to get it).
        ValueError: unsupported config field (naming the file). CheckpointError: missing, unexpected
        or mis-shaped keys (naming the file and keys).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    qdir = _need_dir(qwen2_path, "Qwen2", QWEN2_HINT)
    vdir = _need_dir(vision_path, "SigLIP vision", SIGLIP_HINT)
    _vae_files(vae_path)  # fail early, before reading anything large
    llm = read_qwen2_config(qdir)
    vit, hf_side = read_siglip_config(vdir)
    specials = special_token_ids(load_fox_tokenizer(qdir, llm.vocab_size))
    q_ck = _checkpoint(qdir, QWEN2_HINT, ignore=lambda k: (k == "lm_head.weight" and llm.tie_word_embeddings)
                       or k.endswith("rotary_emb.inv_freq"))
    v_keys = _checkpoint(vdir, SIGLIP_HINT)
    vprefix = "vision_model." if any(k.startswith("vision_model.") for k in v_keys.reader.keys()) else ""
    v_keys.ignore = lambda k: (k.startswith((f"{vprefix}head.", "text_model.")) or k in ("logit_scale", "logit_bias"))
    vae = load_diffusers_vae(vae_path, dtype=dtype, device=device)
    side = vit_max_num_patch_per_side or hf_side
    cfg = BagelConfig(llm=llm, vit=vit, max_latent_size=max_latent_size, vit_max_num_patch_per_side=side,
                      timestep_shift=timestep_shift, vae_downsample=vae.config.downsample,
                      latent_channels=vae.config.z_channels, experts=FOX_EXPERTS, routing=FOX_ROUTING,
                      vae_tokens_generative=False, **specials)
    with torch.device("meta"):
        model = BagelModel(cfg)

    dec_prefix, vit_prefix = "language_model.model.", "vit_model.vision_model."
    sources: dict[str, Source] = {}
    skip: set[str] = set()
    for k in model.state_dict(keep_vars=True):
        if k.startswith(NEW_PARTS):
            skip.add(k)
        elif k == "language_model.lm_head.weight":
            if llm.tie_word_embeddings:
                skip.add(k)
            else:
                sources[k] = (q_ck, "lm_head.weight", None)
        elif k.startswith(dec_prefix):
            s = expert_of_parameter(k, dec_prefix, cfg.experts)
            if s and mode == "shared":
                skip.add(k)
            else:
                sources[k] = (q_ck, "model." + _strip_suffix(k[len(dec_prefix):], s or ""), None)
        elif k.startswith(vit_prefix):
            rest = k[len(vit_prefix):]
            tr = (_patch_embedding_transform() if rest == "embeddings.patch_embedding.weight"
                  else _position_table_transform(side) if rest == "embeddings.position_embedding.weight" else None)
            sources[k] = (v_keys, vprefix + rest, tr)
    fill_from_safetensors(model, sources=sources, skip=skip, dtype=dtype, device=device)
    _tie_lm_head(model)
    if mode == "shared":
        for dst in FOX_EXPERTS[1:]:
            share_expert_weights(model, "", dst)
    _init_new_parts(model, seed=seed, dtype=dtype, device=device)
    model.vae = vae
    return _finish(model)


# ---------------------------------------------------------------------------------------------- save / load
def _is_quantized(model: nn.Module) -> bool:
    return any(type(p).__name__ in ("Params4bit", "Int8Params") or not p.is_floating_point()
               for p in model.parameters())


def unique_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The non-VAE state dict with each storage once (shared experts, tied embeddings) and the ties
    ``{name: name it shares storage with}``; floating tensors cast to ``dtype`` when given."""
    tensors, ties, first = {}, {}, {}
    for k, t in model.state_dict(keep_vars=True).items():
        if k.startswith("vae."):
            continue
        key = tensor_storage_key(t)
        if key in first:
            ties[k] = first[key]
            continue
        first[key] = k
        t = t.detach()
        tensors[k] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return tensors, ties


def save_fox(model: BagelModel, tokenizer, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` (+ its VAE and ``tokenizer``) as the checkpoint folder of the module docstring.

    Shared/tied parameters are stored once and listed in ``tied_parameters``; ``shared_experts``
    records which experts share all base weights (``fox_mode`` is ``"shared"`` when any do). Written
    to ``.NAME.tmp-*`` beside ``out_dir`` and renamed when complete.

    Raises:
        ValueError: adapters attached (save them with ftkit.adapters, or merge first), a quantized
            model (save the unquantized one and quantize at load), or no VAE attached.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if not isinstance(model, BagelModel):
        raise TypeError(f"expected a BagelModel, got {type(model).__name__}")
    if has_adapters(model):
        raise ValueError("the model has adapters attached: save the base model before attaching them, or merge them")
    if _is_quantized(model):
        raise ValueError("cannot save a quantized model: save the unquantized one and pass quantize= to load_fox")
    if model.vae is None or not hasattr(model.vae, "autoencoder"):
        raise ValueError("the model has no VAE attached (model.vae); a FoX checkpoint includes its autoencoder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    pairs = shared_expert_pairs(model)
    tensors, ties = unique_tensors(model)
    meta = {
        "model_type": FOX_MODEL_TYPE, "format_version": FOX_FORMAT_VERSION,
        "fox_mode": "shared" if pairs else "copy",
        "bagel_config": model.cfg.to_dict(), "shared_experts": pairs, "tied_parameters": ties,
        "vae": "vae", "dtype": str(model.dtype).removeprefix("torch."),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "model_type": FOX_MODEL_TYPE})
        model.vae.autoencoder.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_fox(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             quantize: str | None = None) -> BagelModel:
    """Load a folder written by :func:`save_fox` (no original Qwen2/SigLIP/VAE folder needed).

    Built on the meta device, filled strictly from ``model.safetensors``; shared experts are re-tied
    with :func:`~ftkit.models.experts.share_expert_weights` and every entry of ``tied_parameters`` is
    checked to be the same tensor again. ``quantize="nf4"|"int8"`` turns the decoder Linear layers
    into bitsandbytes layers (in shared mode the quantized layers are shared too). Returns a frozen,
    eval-mode model with its VAE; its tokenizer: :func:`load_fox_tokenizer` (``path``).

    Raises:
        FileNotFoundError naming the folder/file; ValueError naming config.json and the field;
        CheckpointError naming the file and keys.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: FoX checkpoint folder not found (save_fox writes one; build_fox "
                                "assembles a model from Qwen2, SigLIP and VAE folders)")
    cfg_path = folder / "config.json"
    raw = read_fox_meta(folder, "a FoX checkpoint folder holds config.json, model.safetensors, vae/ and tokenizer files")
    cfg = fox_config(raw, cfg_path)
    shared = raw.get("shared_experts", {})
    ties = raw.get("tied_parameters", {})
    if not isinstance(shared, dict) or not isinstance(ties, dict):
        raise ValueError(f"{cfg_path}: fields shared_experts and tied_parameters must be objects")
    vae_name = raw.get("vae", "vae")
    if not isinstance(vae_name, str) or not vae_name or Path(vae_name).name != vae_name or vae_name in (".", ".."):
        raise ValueError(f"{cfg_path}: field vae must name a sub-folder of the checkpoint, got {vae_name!r}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: file not found (written by save_fox)")
    _vae_files(folder / vae_name)
    ck = _checkpoint(folder, "")
    with torch.device("meta"):
        model = BagelModel(cfg)
    sd_keys = set(model.state_dict(keep_vars=True))
    unknown = [k for k in [*ties, *ties.values()] if k not in sd_keys]
    if unknown:
        raise ValueError(f"{cfg_path}: field tied_parameters names unknown parameters {_fmt(unknown)}")
    sources = {k: (ck, k, None) for k in sd_keys if k not in ties}
    fill_from_safetensors(model, sources=sources, skip=set(ties), dtype=dtype, device=device, quantize=quantize)
    _tie_lm_head(model)
    for dst, src in shared.items():
        share_expert_weights(model, src, dst)
    for dst, src in ties.items():
        p = model.get_parameter(src)
        if model.get_parameter(dst) is not p:
            parent, _, attr = dst.rpartition(".")
            model.get_submodule(parent)._parameters[attr] = p
    model.vae = load_diffusers_vae(folder / vae_name, dtype=dtype, device=device)
    return _finish(model)


__all__ = [
    "FOX_EXPERTS",
    "FOX_ROUTING",
    "MODEL_TYPE",
    "build_fox",
    "load_diffusers_vae",
    "load_fox",
    "load_fox_tokenizer",
    "read_qwen2_config",
    "read_siglip_config",
    "save_fox",
]
