"""Attach adapters to a BAGEL-architecture model in place (peft's *layer* / *model* part).

:func:`attach_adapters` injects peft LoRA / DoRA / rsLoRA layers (``peft.inject_adapter_in_model``)
into the projections an :class:`~ftkit.adapters.config.AdapterConfig` resolves to, freezes every base
parameter and makes the adapter (and ``modules_to_save``) trainable. It works on bf16 / fp32 models
and on NF4-quantized ones (bitsandbytes ``Linear4bit`` base layers: QLoRA), whose 4-bit weights stay
frozen.

``modules_to_save`` (small connectors such as ``vae2llm``) are trained *in place* under their own
parameter names, so the model's forward code and the release's key names are unchanged; a frozen
copy of their original values is kept (non-persistent buffers ``ftkit_base_<param>``, not in the
state dict) so that :func:`adapters_disabled` can give the base model's outputs exactly. (peft's own
``ModulesToSaveWrapper`` renames the parameters, which the release format cannot hold.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from ftkit.adapters.config import AdapterConfig
from ftkit.errors import FtkitError
from ftkit.models.experts import has_adapters as _has_peft_layers
from ftkit.models.experts import is_adapter_parameter

ADAPTER_NAME = "default"
_BASE_PREFIX = "ftkit_base_"
_STATE = "_ftkit_adapter_state"


@dataclass
class AdapterState:
    """What :func:`attach_adapters` records on a model: the ftkit config, the peft config it became, and
    whether the adapters are switched on (:func:`set_adapters_enabled`)."""

    cfg: AdapterConfig
    peft_config: object
    enabled: bool = True


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's :class:`AdapterState`.

    Raises:
        AdapterStateError: no ftkit adapters attached.
    """
    state = getattr(model, _STATE, None)
    if state is None:
        raise AdapterStateError("this model has no ftkit adapters attached (attach_adapters / load_adapter)")
    return state


def detach_adapter_state(model: nn.Module) -> None:
    """Forget the adapter state (after the adapters were merged into the base weights)."""
    for attr in (_STATE, "peft_config"):
        if hasattr(model, attr):
            delattr(model, attr)


class AdapterStateError(FtkitError, RuntimeError):
    """An adapter operation that does not fit the model's current adapter state."""


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer (the wrapper around the original Linear)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_adapters(model: nn.Module) -> bool:
    """True when ftkit adapters are attached, or any peft adapter layer sits in the model."""
    return getattr(model, _STATE, None) is not None or _has_peft_layers(model)


def adapter_config_of(model: nn.Module) -> AdapterConfig:
    return adapter_state(model).cfg


def _mts_params(model: nn.Module, cfg: AdapterConfig) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full parameter name, owning module, attribute name, parameter) of every modules_to_save parameter."""
    for path in cfg.module_paths_to_save():
        try:
            root = model.get_submodule(path)
        except AttributeError as e:
            raise AdapterStateError(f"modules_to_save: this model has no module {path!r}") from e
        for sub_name, sub in root.named_modules():
            for pname, p in sub.named_parameters(recurse=False):
                full = ".".join(x for x in (path, sub_name, pname) if x)
                yield full, sub, pname, p


def attach_adapters(model: nn.Module, cfg: AdapterConfig, *, keep_base_copies: bool = True,
                    peft_config=None) -> nn.Module:
    """Inject adapters into ``model`` in place and return it.

    Every base parameter is frozen; LoRA ``A``/``B`` (and DoRA magnitudes) and the ``modules_to_save``
    parameters become trainable. ``keep_base_copies`` keeps a frozen copy of each modules_to_save
    tensor (needed by :func:`adapters_disabled` to reproduce the base exactly; costs those modules'
    size, e.g. ~1 GB for a bf16 lm_head of BAGEL-7B). ``peft_config`` overrides ``cfg.to_peft(model)``
    (used by :func:`ftkit.adapters.io.load_adapter` to re-attach exactly the saved config).

    Raises:
        AdapterStateError: the model already carries adapters.
        AdapterConfigError: the config does not fit this model (see :meth:`AdapterConfig.resolve_targets`).
    """
    from peft import inject_adapter_in_model

    if has_adapters(model):
        raise AdapterStateError("this model already has adapters attached; load a fresh base model")
    targets = cfg.resolve_targets(model)
    peft_cfg = peft_config if peft_config is not None else cfg.to_peft(model)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER_NAME)
    # adapters of a bf16/fp16 base are kept in fp32 (and so is their AdamW state); peft casts the input
    # to the adapter's dtype and the result back, so the frozen base keeps its compute dtype
    from peft.tuners.tuners_utils import cast_adapter_dtype

    cast_adapter_dtype(model, adapter_name=ADAPTER_NAME, autocast_adapter_dtype=True)
    attached = sorted(lora_layers(model))
    if attached != targets:
        raise AdapterStateError(f"peft adapted {len(attached)} modules, the config resolves to {len(targets)} "
                                f"(first differences: {sorted(set(attached) ^ set(targets))[:4]})")
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(name) and f".{ADAPTER_NAME}" in name)
    for _, owner, pname, p in _mts_params(model, cfg):
        p.requires_grad_(True)
        if keep_base_copies:
            owner.register_buffer(_BASE_PREFIX + pname, p.detach().clone(), persistent=False)
    setattr(model, _STATE, AdapterState(cfg, peft_cfg))
    return model


def train_only_experts(model: nn.Module, experts: list[str]) -> int:
    """Freeze the adapter weights of every expert not named in ``experts`` (``understanding`` / ``linguistic``,
    ``semantic``, ``generative``); a modules_to_save module trains with the expert that owns it
    (:func:`ftkit.models.experts.parameter_experts`: the flow connectors with ``generative``, lm_head /
    embeddings / the ViT connector with ``understanding``). Returns how many adapter parameters still train.

    Raises:
        AdapterStateError: no adapters attached, an unknown expert name, or nothing left to train.
    """
    from ftkit.adapters.config import EXPERT_SUFFIX
    from ftkit.models.experts import parameter_experts

    cfg = adapter_config_of(model)
    unknown = [e for e in experts if e not in EXPERT_SUFFIX]
    if unknown:
        raise AdapterStateError(f"unknown expert(s) {unknown}; experts are {', '.join(EXPERT_SUFFIX)}")
    suffixes = {EXPERT_SUFFIX[e] for e in experts}
    owner = parameter_experts(model)
    mts = {full for full, *_ in _mts_params(model, cfg)}
    n = 0
    for name, p in model.named_parameters():
        if name in mts or is_adapter_parameter(name):
            p.requires_grad_(owner[name] in suffixes)
        n += int(p.requires_grad)
    if n == 0:
        raise AdapterStateError(f"no adapter weight of the experts {experts} to train (the adapter's preset is "
                                f"{cfg.preset!r})")
    return n


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything that trains (``requires_grad``)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the adapter consists of, under the model's own parameter names (detached, not copied):
    LoRA ``lora_A`` / ``lora_B`` / DoRA ``lora_magnitude_vector`` weights and the modules_to_save
    parameters. ``model.load_state_dict(sd, strict=False)`` puts them back.

    Raises:
        AdapterStateError: no adapters attached.
    """
    cfg = adapter_config_of(model)
    out = {n: p.detach() for n, p in model.named_parameters() if is_adapter_parameter(n) and f".{ADAPTER_NAME}." in n}
    for full, _, _, p in _mts_params(model, cfg):
        out[full] = p.detach()
    return out


def _swap_base_copies(model: nn.Module, cfg: AdapterConfig) -> None:
    """Exchange each modules_to_save parameter's data with its frozen base copy (an involution)."""
    for full, owner, pname, p in _mts_params(model, cfg):
        buf = owner._buffers.get(_BASE_PREFIX + pname)
        if buf is None:
            raise AdapterStateError(f"{full} is trained (modules_to_save) but no base copy was kept "
                                    "(attach_adapters(keep_base_copies=False)): the base model cannot be recovered")
        trained = p.data
        p.data = buf
        owner._buffers[_BASE_PREFIX + pname] = trained


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` on or off (off: the model computes the base model's function).

    LoRA/DoRA layers skip their adapter branch; modules_to_save parameters are swapped with their
    base copies. ``requires_grad`` flags are left as they were (peft's own toggle would change them).

    Raises:
        AdapterStateError: no adapters attached, or modules_to_save without base copies.
    """
    state = adapter_state(model)
    cfg = state.cfg
    if bool(enabled) == state.enabled:
        return
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if cfg.modules_to_save:
        _swap_base_copies(model, cfg)
    for layer in lora_layers(model).values():
        layer.enable_adapters(bool(enabled))
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    state.enabled = bool(enabled)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with adapters_disabled(model): ref = model(batch)`` runs the base model (the same weights, no
    second copy) -- e.g. for the KL prior-preservation loss; adapters are restored on exit."""
    was = adapter_state(model).enabled
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        set_adapters_enabled(model, was)


@contextlib.contextmanager
def adapters_merged(model: nn.Module):
    """``with adapters_merged(model): ...`` folds each LoRA / DoRA adapter into its (float) base weight,
    W' = W + (alpha / r) B A (DoRA: peft's magnitude-scaled form), so a forward costs what the base
    model's does: no adapter branch, and in bf16 no fp32 adapter casts. For sampling, where the adapter
    branch is ~20% of a tiny model's time (BENCHMARKS.md).

    The function computed is the adapted model's up to float rounding (W' is rounded once to W's
    dtype). Each merged layer computes on a merged copy of its weight; on exit the original tensor is put
    back, so the base weights come out bit-identical (no W' - BA round trip). Memory: one copy of each
    merged weight while inside. Quantized base layers (QLoRA's ``Linear4bit`` / 8-bit) are not merged
    (ftkit never merges into 4-bit weights) and keep their adapter branch. Inside, switching adapters off
    (:func:`adapters_disabled`) would make peft unmerge: don't nest them.

    Raises:
        AdapterStateError: no ftkit adapters attached, or they are switched off.
    """
    if not adapter_state(model).enabled:
        raise AdapterStateError("adapters_merged: the adapters are switched off (adapters_disabled)")
    done: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for layer in lora_layers(model).values():
            w = getattr(layer.get_base_layer(), "weight", None)
            # exactly nn.Parameter: bnb's Params4bit / Int8Params are subclasses (quantized, never merged)
            if layer.merged or type(w) is not nn.Parameter or not w.dtype.is_floating_point:
                continue
            done.append((layer, w.data))
            w.data = w.data.clone()
            layer.merge()
        yield model
    finally:
        for layer, orig in reversed(done):
            if layer.merged:
                layer.unmerge()  # clears peft's merged flag; the weight it edits is the copy
            layer.get_base_layer().weight.data = orig


def enable_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> None:
    """Recompute activations in backward for the decoder layers (``language_model.model``) and the ViT
    encoder layers (``vit_model.vision_model``). Both use ``torch.utils.checkpoint(use_reentrant=False)``,
    which propagates gradients to adapter parameters inside a layer even when the layer's inputs do
    not require grad (frozen embeddings), so no ``enable_input_require_grads`` hook is needed.

    Raises:
        AttributeError: the model has neither module.
    """
    found = 0
    for path in ("language_model.model", "vit_model.vision_model"):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if not hasattr(mod, "gradient_checkpointing"):
            raise AttributeError(f"{path} ({type(mod).__name__}) does not support gradient checkpointing")
        mod.gradient_checkpointing = bool(enabled)
        found += 1
    if not found:
        raise AttributeError(f"{type(model).__name__} has no language_model.model or vit_model.vision_model")


__all__ = ["attach_adapters", "trainable_parameters", "adapter_state_dict", "set_adapters_enabled",
           "adapters_disabled", "adapters_merged", "enable_gradient_checkpointing", "lora_layers", "has_adapters",
           "adapter_config_of", "AdapterStateError", "ADAPTER_NAME"]
