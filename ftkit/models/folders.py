"""Model folders: which kind a folder is, its :class:`~ftkit.models.config.BagelConfig`, and dtype names.

The one home of what every loader, merger and CLI asks of a model folder (like LitGPT's
``Config.from_file``, which every script uses). Three layouts are read:

* ``"bagel"``: a BAGEL release folder (``llm_config.json``, ``vit_config.json``, ``ema.safetensors``,
  ``ae.safetensors``, tokenizer files);
* ``"bagel-sharded"``: the same with ``model.safetensors.index.json`` + shards instead of
  ``ema.safetensors`` (what ``ftkit merge --max-shard-size`` writes);
* ``"fox"``: an ftkit FoX folder (``config.json`` with ``"model_type": "ftkit-fox"``, see
  :mod:`ftkit.models.fox`).

Importing this module is cheap (torch and the config dataclasses only); reading a BAGEL config
opens the weights' safetensors header (never the tensors) and, when present, the tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig, read_json_object

FOX_MODEL_TYPE = "ftkit-fox"
FOX_FORMAT_VERSION = 1
SHARD_INDEX = "model.safetensors.index.json"
SAMPLING_FILE = "sampling.json"  # a model / adapter folder's own sampler settings (read_sampling)
RENORM_TYPES = ("global", "channel", "text_channel")  # the sampler's guidance renorms (ftkit.infer.sampler)
FOLDER_HELP = ("expected a BAGEL release folder (llm_config.json, vit_config.json, ema.safetensors or "
               f"{SHARD_INDEX}, ae.safetensors, tokenizer files), a folder written by `ftkit merge`, or an ftkit "
               f"FoX folder (config.json with model_type '{FOX_MODEL_TYPE}')")

# dtype names accepted by recipes and CLIs -> torch dtype (bytes per element: ``DTYPES[name].itemsize``)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

# safetensors dtype tags -> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_TAGS: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name of :data:`DTYPES` (or a torch dtype, returned as is) -> torch dtype.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_bytes(name: str | torch.dtype) -> int:
    """Bytes per element of a dtype name of :data:`DTYPES` (``"bf16"`` -> 2)."""
    return parse_dtype(name).itemsize


def is_fox_folder(path: str | os.PathLike) -> bool:
    """True if ``path/config.json`` is a JSON object with ``model_type == "ftkit-fox"`` (no other check)."""
    try:
        return read_json_object(Path(path) / "config.json").get("model_type") == FOX_MODEL_TYPE
    except (OSError, ValueError):
        return False


def detect_model_folder(path: str | os.PathLike) -> str:
    """Which kind of model folder ``path`` is: ``"bagel"`` (one ``ema.safetensors``), ``"bagel-sharded"``
    (shards + ``model.safetensors.index.json``, as ``ftkit merge`` writes) or ``"fox"``.

    Raises:
        FileNotFoundError: the folder does not exist, or holds none of the layouts (names what is missing).
        ValueError: ``config.json`` is unreadable or names another ``model_type``.
    """
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(f"{folder}: model folder {what}; {FOLDER_HELP}")
    cfg = folder / "config.json"
    if not (folder / "llm_config.json").is_file() and cfg.is_file():
        try:
            raw = json.loads(cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg}: not valid JSON ({e})") from e
        mt = raw.get("model_type") if isinstance(raw, dict) else None
        if mt != FOX_MODEL_TYPE:
            raise ValueError(f"{cfg}: field model_type is {mt!r}; ftkit reads '{FOX_MODEL_TYPE}' folders here "
                             f"(a transformers/diffusers checkpoint is not a BAGEL/FoX folder). {FOLDER_HELP}")
        return "fox"
    if (folder / "llm_config.json").is_file():
        if (folder / "ema.safetensors").is_file():
            return "bagel"
        if (folder / SHARD_INDEX).is_file():
            return "bagel-sharded"
        raise FileNotFoundError(f"{folder}: has llm_config.json but neither ema.safetensors nor {SHARD_INDEX}; "
                                f"{FOLDER_HELP}")
    raise FileNotFoundError(f"{folder}: not a model folder (no llm_config.json, no config.json); {FOLDER_HELP}")


def read_fox_meta(folder: str | os.PathLike, hint: str = "") -> dict:
    """The ``config.json`` of a FoX folder, checked for ``model_type`` and ``format_version``.

    Raises:
        FileNotFoundError: no config.json. ValueError: naming config.json and the field.
    """
    path = Path(folder) / "config.json"
    raw = read_json_object(path, hint)
    if raw.get("model_type") != FOX_MODEL_TYPE:
        raise ValueError(f"{path}: field model_type is {raw.get('model_type')!r}, expected {FOX_MODEL_TYPE!r}")
    if raw.get("format_version") != FOX_FORMAT_VERSION:
        raise ValueError(f"{path}: field format_version {raw.get('format_version')!r} not supported "
                         f"(this ftkit reads {FOX_FORMAT_VERSION})")
    return raw


def fox_config(raw: dict, path: Path) -> BagelConfig:
    """The :class:`BagelConfig` stored in a FoX ``config.json`` (``raw``, read from ``path``)."""
    try:
        return BagelConfig.from_dict(raw["bagel_config"])
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: field bagel_config: {e}") from e


def bagel_release_config(folder: str | os.PathLike) -> BagelConfig:
    """The :class:`BagelConfig` of a BAGEL folder (single-file or sharded): the JSON configs, the
    constants upstream passes in code read from the weights' tensor shapes
    (:func:`~ftkit.models.loading.infer_bagel_config`), the VAE downsampling of ``ae_config.json``
    (FLUX's 8 without one) and the special-token ids of its tokenizer (the config's defaults when the
    folder has no tokenizer files)."""
    from ftkit.models.loading import infer_bagel_config, load_tokenizer, release_weights, special_token_ids

    folder = Path(folder)
    llm = LLMConfig.from_json(folder / "llm_config.json")
    vit = ViTConfig.from_json(folder / "vit_config.json")
    weights = release_weights(folder)
    if weights is None:
        raise FileNotFoundError(f"{folder}: neither ema.safetensors nor {SHARD_INDEX}; {FOLDER_HELP}")
    extra = infer_bagel_config(folder, llm, vit, weights)
    if (folder / "ae_config.json").is_file():  # a non-FLUX autoencoder: its own downsampling
        from ftkit.models.vae import AEConfig

        extra["vae_downsample"] = AEConfig.from_json(folder / "ae_config.json").downsample
    specials = {}
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        specials = special_token_ids(load_tokenizer(folder))
    return BagelConfig(llm=llm, vit=vit, **extra, **specials)


def read_model_config(path: str | os.PathLike) -> BagelConfig:
    """The :class:`BagelConfig` of any model folder :func:`detect_model_folder` accepts.

    ``read_model_config(path).pack_config()`` is the packer geometry of the folder, the same for a
    sharded folder as for its single-file original.

    Raises:
        FileNotFoundError / ValueError naming the folder or file and the field;
        :class:`~ftkit.models.loading.CheckpointError` for an unreadable weights header.
    """
    folder = Path(path)
    if detect_model_folder(folder) == "fox":
        return fox_config(read_fox_meta(folder), folder / "config.json")
    return bagel_release_config(folder)


# ----------------------------------------------------------------------------- sampling.json

SAMPLER_KEYS = ("num_timesteps", "timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_interval",
                "cfg_renorm_type", "cfg_renorm_min")
SAMPLING_KEYS = (*SAMPLER_KEYS, "revise_threshold")


def check_sampling(d: object, where: str) -> dict:
    """A validated copy of sampler settings ``d`` (``cfg_interval`` as a tuple).

    Keys: :class:`ftkit.infer.mcot.SamplerSettings`' fields except the per-run ``cfg_plan_scale`` and ``inpaint``, and
    :class:`ftkit.infer.mcot.TextSettings`' ``revise_threshold`` (the reflection gate an adapter was calibrated with).

    Raises:
        ValueError: naming ``where`` and the field, for an unknown key or a value out of range.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be a JSON object of sampler settings")
    out = {}
    for k, v in d.items():
        bad = None
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        if k not in SAMPLING_KEYS:
            bad = f"unknown sampler setting (known: {', '.join(SAMPLING_KEYS)})"
        elif k == "num_timesteps":
            bad = None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "must be an integer >= 1"
        elif k == "cfg_interval":
            ok = (isinstance(v, (list, tuple)) and len(v) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and 0 <= v[0] <= v[1] <= 1)
            bad = None if ok else "must be [lo, hi] with 0 <= lo <= hi <= 1"
        elif k == "cfg_renorm_type":
            bad = None if v in RENORM_TYPES else f"must be one of {', '.join(RENORM_TYPES)}"
        elif k == "revise_threshold":
            bad = None if number and 0.5 <= v < 1.0 else "must be a number in [0.5, 1)"
        elif not number or v < 0:
            bad = "must be a number >= 0"
        if bad:
            raise ValueError(f"{where}: field {k!r}: {bad}, got {v!r}")
        out[k] = (float(v[0]), float(v[1])) if k == "cfg_interval" else v
    return out


def read_sampling(folder: str | os.PathLike) -> dict:
    """A model or adapter folder's ``sampling.json``, validated (:func:`check_sampling`); ``{}`` without one.

    A folder's authors record there the settings its scores were measured with, as a transformers
    checkpoint's ``generation_config.json`` does for text: e.g. ``{"cfg_text_scale": 8.0}`` for a backbone,
    ``{"revise_threshold": 0.8}`` for an MCoT adapter (``ftkit fit`` writes a recipe's ``ftkit.sampling``).

    Raises:
        ValueError: naming the file (and the field), for bad JSON, an unknown key or a value out of range.
    """
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from e
    return check_sampling(d, str(path))


def model_sampling(folder: str | os.PathLike, adapter: str | os.PathLike | None = None) -> dict:
    """The sampling settings of a model folder with an adapter: the adapter folder's over the model's."""
    return {**read_sampling(folder), **(read_sampling(adapter) if adapter is not None else {})}


__all__ = [
    "DTYPES",
    "FOLDER_HELP",
    "FOX_FORMAT_VERSION",
    "FOX_MODEL_TYPE",
    "RENORM_TYPES",
    "SAMPLER_KEYS",
    "SAMPLING_FILE",
    "SAMPLING_KEYS",
    "SHARD_INDEX",
    "ST_DTYPES",
    "ST_TAGS",
    "bagel_release_config",
    "check_sampling",
    "detect_model_folder",
    "dtype_bytes",
    "fox_config",
    "is_fox_folder",
    "model_sampling",
    "parse_dtype",
    "read_fox_meta",
    "read_model_config",
    "read_sampling",
]
