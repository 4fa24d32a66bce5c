"""Save and load adapters (peft-style folder + ftkit's record of what base it belongs to).

An adapter folder holds:

* ``adapter_config.json``: the ``peft.LoraConfig`` dict (presets already resolved to a regex), so peft
  tooling can read it;
* ``adapter_model.safetensors``: the trained tensors under peft's on-disk names
  (``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``, DoRA ``...lora_magnitude_vector``;
  modules_to_save as ``base_model.model.<param name>``);
* ``ftkit_adapter.json``: the ftkit :class:`~ftkit.adapters.config.AdapterConfig`, the base model's
  path and fingerprint (architecture dict and its hash, experts, the ``[out, in]`` shape of every
  targeted weight, the shapes of modules_to_save, quantization at training time), the ftkit version
  and whatever run information the caller passes (recipe, data, metrics).

Folders are written into a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ftkit.adapters.attach import (
    ADAPTER_NAME,
    AdapterStateError,
    adapter_config_of,
    adapter_state,
    adapter_state_dict,
    attach_adapters,
    has_adapters,
    lora_layers,
)
from ftkit.adapters.config import AdapterConfig, AdapterConfigError, model_experts
from ftkit.errors import FtkitError
from ftkit.files import file_sha256
from ftkit.models.folders import SAMPLING_FILE, check_sampling

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FTKIT_META = "ftkit_adapter.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FTKIT_META)
DISK_PREFIX = "base_model.model."
FORMAT = "ftkit-adapter"
FORMAT_VERSION = 1


class AdapterError(FtkitError, ValueError):
    """An adapter folder that is unreadable or does not belong to the given base model."""


def ftkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("ftkit")
    except Exception:  # not installed as a distribution (source checkout on sys.path)
        return "unknown"


# ----------------------------------------------------------------------------- names

def to_disk_key(name: str) -> str:
    """Model parameter name -> peft on-disk key (adapter name removed, ``base_model.model.`` prefix)."""
    if name.endswith(f".lora_magnitude_vector.{ADAPTER_NAME}.weight"):
        name = name[: -len(f".{ADAPTER_NAME}.weight")]
    else:
        name = name.replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.").replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B.")
    return DISK_PREFIX + name


def from_disk_key(key: str) -> str:
    """peft on-disk key -> model parameter name (inverse of :func:`to_disk_key`)."""
    name = key.removeprefix(DISK_PREFIX)
    if name.endswith(".lora_magnitude_vector"):
        return name + f".{ADAPTER_NAME}.weight"
    return name.replace(".lora_A.", f".lora_A.{ADAPTER_NAME}.").replace(".lora_B.", f".lora_B.{ADAPTER_NAME}.")


def split_disk_key(key: str) -> tuple[str, str]:
    """On-disk key -> (module name, part) with part in {"A", "B", "magnitude", "param"}."""
    name = key.removeprefix(DISK_PREFIX)
    if name.endswith(".lora_magnitude_vector"):
        return name[: -len(".lora_magnitude_vector")], "magnitude"
    for part in ("A", "B"):
        tag = f".lora_{part}."
        if tag in name:
            return name.split(tag)[0], part
    return name, "param"


# ----------------------------------------------------------------------------- fingerprint

def architecture_dict(model: nn.Module) -> dict:
    """The shape-defining configuration of a BAGEL-architecture model (dtype and experts excluded)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "llm"):
        return {}
    llm = {k: v for k, v in cfg.llm.to_hf_dict().items() if k not in ("torch_dtype", "architectures")}
    vit = cfg.vit.to_hf_dict(add_dropped_layer=False)
    return {"llm": llm, "vit": vit, "max_latent_size": cfg.max_latent_size,
            "vit_max_num_patch_per_side": cfg.vit_max_num_patch_per_side,
            "latent_channels": cfg.latent_channels, "latent_patch_size": cfg.latent_patch_size}


def config_hash(arch: dict) -> str:
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def _quantization(layers: dict[str, nn.Module]) -> str | None:
    for m in layers.values():
        base = m.get_base_layer()
        kind = type(base).__name__
        if kind == "Linear4bit":
            return getattr(base.weight, "quant_type", "nf4")
        if kind == "Linear8bitLt":
            return "int8"
    return None


def base_fingerprint(model: nn.Module) -> dict:
    """Fingerprint of the base an adapted ``model`` was built on (see module doc)."""
    cfg = adapter_config_of(model)
    layers = lora_layers(model)
    arch = architecture_dict(model)
    targets = {n: [m.get_base_layer().out_features, m.get_base_layer().in_features] for n, m in sorted(layers.items())}
    mts = {n: list(t.shape) for n, t in adapter_state_dict(model).items()
           if any(n == p or n.startswith(p + ".") for p in cfg.module_paths_to_save())}
    return {"arch": arch, "config_hash": config_hash(arch), "experts": list(model_experts(model)),
            "targets": targets, "modules_to_save": mts, "quantization": _quantization(layers),
            "dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------- save

def _jsonable(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, enum.Enum):
        return o.value
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def peft_config_dict(peft_cfg) -> dict:
    return json.loads(json.dumps(peft_cfg.to_dict(), default=_jsonable))


def save_adapter(model: nn.Module, cfg: AdapterConfig | None, out_dir: str | Path, base_path: str | Path | None = None,
                 extra: dict | None = None, *, sampling: dict | None = None, overwrite: bool = False) -> Path:
    """Write the adapter of ``model`` to ``out_dir`` (see module doc), atomically.

    Args:
        model: a model with adapters attached (:func:`~ftkit.adapters.attach.attach_adapters`).
        cfg: its AdapterConfig (``None``: the one it was attached with; must be that one otherwise).
        base_path: the base model folder it was trained on (recorded, used by ``ftkit merge``).
        extra: JSON-serialisable run information (recipe, data, metrics, ...), recorded verbatim.
        sampling: the settings to generate with (e.g. ``{"revise_threshold": 0.8}``), written as the folder's
            ``sampling.json`` (:func:`ftkit.models.folders.read_sampling`); validated.
        overwrite: replace an existing ``out_dir``.

    Raises:
        AdapterStateError: the model has no adapters; AdapterError: ``cfg`` is not the attached config
        or ``extra`` is not JSON-serialisable; FileExistsError: ``out_dir`` exists and not ``overwrite``.
    """
    from ftkit.models.release import atomic_dir

    attached = adapter_config_of(model)
    if cfg is not None and cfg.to_dict() != attached.to_dict():
        raise AdapterError("save_adapter: cfg differs from the config the model's adapters were attached with")
    if sampling:
        sampling = check_sampling(sampling, f"{out_dir}: sampling")
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except TypeError as e:
        raise AdapterError(f"save_adapter: extra is not JSON-serialisable ({e})") from e
    state = adapter_state(model)
    if not state.enabled:
        raise AdapterStateError("save_adapter inside adapters_disabled(): the modules_to_save hold base values")
    peft_dict = peft_config_dict(state.peft_config)
    peft_dict["base_model_name_or_path"] = str(base_path) if base_path is not None else None
    tensors = {to_disk_key(n): t.detach().to("cpu").contiguous() for n, t in adapter_state_dict(model).items()}
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterError(f"{out_dir}: refusing to write an adapter with non-finite values in {len(bad)} tensor(s), "
                           f"e.g. {from_disk_key(bad[0])} (the run diverged; lower the learning rate)")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ftkit_version": ftkit_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "adapter": attached.to_dict(),
        "base": {"path": str(Path(base_path).resolve()) if base_path is not None else None,
                 "fingerprint": base_fingerprint(model)},
        "extra": extra_json,
    }
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_dict, indent=2))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "ftkit": FORMAT})
        meta["sha256"] = {ADAPTER_WEIGHTS: file_sha256(tmp / ADAPTER_WEIGHTS)}
        (tmp / FTKIT_META).write_text(json.dumps(meta, indent=2))
        if sampling:
            (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
    return Path(out_dir)


# ----------------------------------------------------------------------------- read

class AdapterFolder:
    """A parsed adapter folder: ``peft`` (adapter_config.json dict), ``meta`` (ftkit_adapter.json),
    ``cfg`` (AdapterConfig), ``fingerprint``, and :meth:`tensors` (on-disk key -> tensor)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: adapter folder not found")
        absent = [f for f in ADAPTER_FILES if not (self.path / f).is_file()]
        if absent:
            raise FileNotFoundError(f"{self.path}: not an ftkit adapter folder, missing {', '.join(absent)} "
                                    f"(an adapter folder holds {', '.join(ADAPTER_FILES)})")
        self.peft = self._json(ADAPTER_CONFIG)
        self.meta = self._json(FTKIT_META)
        if self.meta.get("format") != FORMAT:
            raise AdapterError(f"{self.path / FTKIT_META}: field 'format' is {self.meta.get('format')!r}, "
                               f"expected {FORMAT!r}")
        if self.peft.get("peft_type") != "LORA":
            raise AdapterError(f"{self.path / ADAPTER_CONFIG}: field 'peft_type' is {self.peft.get('peft_type')!r}; "
                               "only LoRA-family adapters (LoRA, DoRA, rsLoRA) are supported")
        try:
            self.cfg = AdapterConfig.from_dict(self.meta["adapter"])
        except (KeyError, TypeError, AdapterConfigError) as e:
            raise AdapterError(f"{self.path / FTKIT_META}: field 'adapter' is not a valid adapter config ({e})") from e
        try:
            self.fingerprint = self.meta["base"]["fingerprint"]
            self.targets = {k: tuple(v) for k, v in self.fingerprint["targets"].items()}
        except (KeyError, TypeError) as e:
            raise AdapterError(f"{self.path / FTKIT_META}: field 'base.fingerprint' missing or malformed ({e})") from e
        self._tensors = None

    def _json(self, name: str) -> dict:
        try:
            d = json.loads((self.path / name).read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(f"{self.path / name}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise AdapterError(f"{self.path / name}: expected a JSON object")
        return d

    @property
    def weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            want = (self.meta.get("sha256") or {}).get(ADAPTER_WEIGHTS)
            if want is not None and file_sha256(self.weights_path) != want:
                raise AdapterError(f"{self.weights_path}: sha256 differs from the one recorded in {FTKIT_META} "
                                   "(the file was changed or corrupted after it was written)")
            try:
                self._tensors = load_file(str(self.weights_path))
            except Exception as e:  # safetensors raises its own error type for corrupt files
                raise AdapterError(f"{self.weights_path}: cannot read ({type(e).__name__}: {e})") from e
        return self._tensors

    def peft_config(self):
        from peft import LoraConfig

        d = dict(self.peft)
        for k in ("peft_type", "auto_mapping", "peft_version", "revision", "task_type"):
            d.pop(k, None)
        known = set(LoraConfig.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"{self.path / ADAPTER_CONFIG}: fields {unknown} unknown to this peft version")
        return LoraConfig(**d)

    @property
    def experts(self) -> list[str]:
        return list(self.fingerprint.get("experts", []))

    def check_shapes(self, actual: dict[str, tuple | None], what: str, extra_actual: set[str] = frozenset()) -> None:
        """Compare the fingerprint's target shapes with ``actual`` (name -> [out, in] or None when absent).

        Raises:
            AdapterError: naming the adapter file and the mismatching targets / shapes.
        """
        problems = []
        for n, shp in self.targets.items():
            a = actual.get(n)
            if a is None:
                problems.append(f"{n}: not in {what}")
            elif tuple(a) != tuple(shp):
                problems.append(f"{n}: adapter trained on {list(shp)}, {what} has {list(a)}")
        for n in sorted(extra_actual):
            problems.append(f"{n}: adapted in {what} but not among the adapter's recorded targets")
        if problems:
            more = f" ... (+{len(problems) - 8} more)" if len(problems) > 8 else ""
            raise AdapterError(f"{self.path / FTKIT_META}: adapter does not fit {what} (trained for another base?): "
                               + "; ".join(problems[:8]) + more)


def _arch_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _arch_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: adapter {va!r}, model {vb!r}")
    return out


def load_adapter(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Attach the adapter saved in ``path`` to ``model`` (in place) and load its weights.

    Checks before attaching: the model's experts, the ``[out, in]`` shape of every targeted weight,
    and (``strict``) the architecture dict against the fingerprint; then the saved peft config is
    attached exactly and every tensor is loaded (keys and shapes must match exactly).

    Raises:
        FileNotFoundError: folder or one of its files missing.
        AdapterError: naming the adapter file and the mismatching targets / shapes / fields.
        AdapterStateError: the model already has adapters.
    """
    ad = AdapterFolder(path)
    if has_adapters(model):
        raise AdapterStateError(f"{ad.path}: the model already has adapters attached; load a fresh base model")
    experts = list(model_experts(model))
    if ad.experts and ad.experts != experts:
        hint = (" (load the base with load_bagel(..., three_experts=True))"
                if "_moe_sem" in ad.experts and "_moe_sem" not in experts else "")
        raise AdapterError(f"{ad.path / FTKIT_META}: adapter was trained on a model with experts {ad.experts}, "
                           f"this model has {experts}{hint}")
    diffs = _arch_diff(ad.fingerprint.get("arch", {}), architecture_dict(model))
    if diffs:
        msg = f"{ad.path / FTKIT_META}: base architecture differs from the adapter's: " + "; ".join(diffs[:8])
        if strict:
            raise AdapterError(msg)
        warnings.warn(msg, stacklevel=2)
    modules = dict(model.named_modules())
    actual = {}
    for n in ad.targets:
        m = modules.get(n)
        actual[n] = (m.out_features, m.in_features) if isinstance(m, nn.Linear) else None
    ad.check_shapes(actual, "this model")
    attach_adapters(model, ad.cfg, peft_config=ad.peft_config())
    extra = set(lora_layers(model)) - set(ad.targets)
    if extra:
        ad.check_shapes(actual, "this model", extra)
    want = adapter_state_dict(model)
    got = {from_disk_key(k): v for k, v in ad.tensors().items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = [f"{k}: file {list(got[k].shape)}, model {list(want[k].shape)}"
           for k in sorted(set(want) & set(got)) if got[k].shape != want[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing ({len(missing)}): {', '.join(map(to_disk_key, missing[:6]))}")
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): {', '.join(map(to_disk_key, unexpected[:6]))}")
        if bad:
            parts.append(f"mis-shaped: {'; '.join(bad[:6])}")
        raise AdapterError(f"{ad.weights_path}: tensors do not match the attached adapter: " + "; ".join(parts))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in got.items():
            p = params[k]
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return model


__all__ = ["save_adapter", "load_adapter", "AdapterFolder", "AdapterError", "base_fingerprint", "architecture_dict",
           "to_disk_key", "from_disk_key", "split_disk_key", "ADAPTER_FILES"]
