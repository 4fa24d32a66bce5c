"""Functionality experts of a Mixture-of-Transformers decoder: share, copy, report, upcycle.

A decoder built by :mod:`ftkit.models.qwen2_mot` holds every per-layer module once per expert, the
expert being named by a module-name suffix (``""`` base/linguistic, ``"_moe_sem"`` semantic,
``"_moe_gen"`` generative). The *expert modules* are, per layer ``i``::

    layers.{i}.self_attn.{q,k,v,o}_proj{s}   layers.{i}.self_attn.{q,k}_norm{s}  (only with qk_norm)
    layers.{i}.mlp{s}  (gate/up/down_proj)   layers.{i}.input_layernorm{s}   layers.{i}.post_attention_layernorm{s}

plus the final ``norm{s}``. Everything else (embeddings, lm_head, ViT, connectors, VAE) is common.

Two ways to give a new expert ``dst`` the weights of an existing expert ``src``:

* **copy** (:func:`copy_expert_weights`): ``dst`` gets independent clones; the experts can then be
  fully fine-tuned apart (FoX and BAGEL's upcycling). Memory: one more expert.
* **shared** (:func:`share_expert_weights`): each ``dst`` module becomes a new module object whose
  parameters are the *same* ``nn.Parameter`` objects as ``src``'s, frozen. Experts then differ only by
  the adapters attached later (peft wraps every module separately, so ``q_proj`` and
  ``q_proj_moe_sem`` get their own LoRA): ``W_e x = W0 x + (alpha/r) B_e A_e x``. Memory: one
  expert's base weights for all experts, plus adapters. Works for bitsandbytes 4-/8-bit layers too
  (the quantized weight object is shared).

Both replace modules, so they must run *before* adapters are attached (they raise otherwise).
:func:`expert_parameter_report` measures what is held (shared storage counted once), and
:func:`upcycle_bagel_to_three` turns a loaded two-expert BAGEL into a three-expert one without
copying any existing weight.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn as nn

from ftkit.models.bagel import BagelModel
from ftkit.models.config import BagelConfig
from ftkit.models.qwen2_mot import Qwen2MoTForCausalLM, Qwen2MoTModel

MODES = ("copy", "shared")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
QK_NORM_MODULES = ("q_norm", "k_norm")
LAYER_MODULES = ("mlp", "input_layernorm", "post_attention_layernorm")
FINAL_NORM = "norm"
EXPERT_BASE_NAMES = frozenset(ATTN_MODULES + QK_NORM_MODULES + LAYER_MODULES + (FINAL_NORM,))
ADAPTER_MARKERS = ("lora_", "dora_")


def expert_name(suffix: str) -> str:
    """Readable name of an expert suffix: ``""`` -> ``"base"``, ``"_moe_sem"`` -> ``"moe_sem"``."""
    return suffix.lstrip("_") or "base"


def find_decoder(model: nn.Module) -> Qwen2MoTModel:
    """The :class:`Qwen2MoTModel` inside a BagelModel / Qwen2MoTForCausalLM / peft wrapper.

    Raises:
        TypeError: if ``model`` holds no MoT decoder.
    """
    if hasattr(model, "get_base_model"):  # peft PeftModel
        model = model.get_base_model()
    if isinstance(model, Qwen2MoTModel):
        return model
    if isinstance(model, Qwen2MoTForCausalLM):
        return model.model
    lm = getattr(model, "language_model", None)
    if isinstance(lm, Qwen2MoTForCausalLM):
        return lm.model
    raise TypeError(f"{type(model).__name__} holds no Qwen2 MoT decoder (expected a BagelModel or Qwen2MoT*)")


def expert_slots(decoder: Qwen2MoTModel) -> Iterator[tuple[str, nn.Module, str]]:
    """Every per-expert module position: ``(path of the parent in the decoder, parent, base name)``.

    The expert ``s`` module at a slot is ``getattr(parent, base + s)``.
    """
    attn_names = ATTN_MODULES + (QK_NORM_MODULES if decoder.cfg.qk_norm else ())
    for i, layer in enumerate(decoder.layers):
        for n in attn_names:
            yield f"layers.{i}.self_attn", layer.self_attn, n
        for n in LAYER_MODULES:
            yield f"layers.{i}", layer, n
    yield "", decoder, FINAL_NORM


def has_adapters(module: nn.Module) -> bool:
    """True if any peft adapter (LoRA/DoRA) is attached inside ``module``."""
    if any(is_adapter_parameter(name) for name, _ in module.named_parameters()):
        return True
    return any(hasattr(m, "base_layer") for m in module.modules())


def _check_suffixes(decoder: Qwen2MoTModel, *suffixes: str) -> None:
    for s in suffixes:
        if s not in decoder.experts:
            raise ValueError(f"expert suffix {s!r} is not one of the decoder's experts {decoder.experts}")
    if len(set(suffixes)) != len(suffixes):
        raise ValueError(f"source and destination experts must differ, got {suffixes}")
    if has_adapters(decoder):
        raise ValueError("adapters are already attached: share/copy expert weights before attaching adapters "
                         "(they replace the expert modules)")


def shared_clone(module: nn.Module) -> nn.Module:
    """A new module object of the same class whose parameters and buffers are the SAME tensors.

    Sub-modules are cloned the same way (new objects, shared tensors), hook dictionaries are copied,
    so wrapping the clone (peft) never touches the original. Works for ``nn.Linear``, RMSNorm, the MLP
    and bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.
    """
    new = copy.copy(module)
    for key, value in list(vars(module).items()):
        if key == "_modules":
            new._modules = {k: (None if v is None else shared_clone(v)) for k, v in value.items()}
        elif isinstance(value, dict | set):
            setattr(new, key, copy.copy(value))  # _parameters, _buffers (same tensors), hook dicts
    return new


def share_expert_weights(model: nn.Module, src: str = "", dst: str = "_moe_sem") -> nn.Module:
    """Make expert ``dst`` use expert ``src``'s base weights ("shared" mode), in place.

    For every expert module slot, ``dst``'s module is replaced by :func:`shared_clone` of ``src``'s:
    ``getattr(parent, base + dst).weight is getattr(parent, base + src).weight``. The shared
    parameters are frozen (``requires_grad=False``): a gradient on them would train every expert at
    once. ``dst``'s previous tensors are dropped, so calling this on a meta-device model before
    filling ``src`` ("build, then tie before filling") never materialises ``dst`` at all.

    Args:
        model: a BagelModel, Qwen2MoTForCausalLM or Qwen2MoTModel whose decoder has both experts.
        src: suffix of the expert whose weights are shared.
        dst: suffix of the expert that will share them.

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: if a suffix is not an expert of the decoder, ``src == dst``, or adapters are attached.
    """
    dec = find_decoder(model)
    _check_suffixes(dec, src, dst)
    for _, parent, base in expert_slots(dec):
        source = getattr(parent, base + src)
        source.requires_grad_(False)
        setattr(parent, base + dst, shared_clone(source))
    return model


def copy_expert_weights(model: nn.Module, src: str, dst: str) -> nn.Module:
    """Give expert ``dst`` independent copies of expert ``src``'s weights ("copy" mode), in place.

    ``dst``'s module at every slot becomes ``copy.deepcopy`` of ``src``'s (same class, same values,
    new storage, same ``requires_grad``).

    Raises:
        ValueError: as :func:`share_expert_weights`.
    """
    dec = find_decoder(model)
    _check_suffixes(dec, src, dst)
    for _, parent, base in expert_slots(dec):
        setattr(parent, base + dst, copy.deepcopy(getattr(parent, base + src)))
    return model


def decoder_prefix(model: nn.Module, dec: nn.Module | None = None) -> str:
    """The name prefix of the decoder's parameters in ``model`` (``"language_model.model."`` in a BagelModel;
    ``""`` when ``model`` is the decoder). ``dec``: the decoder when already found."""
    dec = find_decoder(model) if dec is None else dec
    prefix = next((n + "." if n else "" for n, m in model.named_modules() if m is dec), None)
    if prefix is None:
        raise TypeError("could not locate the decoder among the model's modules")
    return prefix


def expert_of_parameter(name: str, decoder_prefix: str, experts: tuple[str, ...]) -> str | None:
    """The expert suffix owning parameter ``name`` (a full name from ``model.named_parameters()``), or
    ``None`` for parameters outside the expert modules (embeddings, lm_head, ViT, connectors...)."""
    if not name.startswith(decoder_prefix):
        return None
    parts = name[len(decoder_prefix):].split(".")
    if parts[0] == "layers" and len(parts) > 3:
        comp = parts[3] if parts[2] == "self_attn" else parts[2]
    else:
        comp = parts[0]
    for s in sorted((e for e in experts if e), key=len, reverse=True):
        if comp.endswith(s) and comp[: -len(s)] in EXPERT_BASE_NAMES:
            return s
    return "" if comp in EXPERT_BASE_NAMES else None


# Modules outside the decoder's experts that only the generation path uses (the flow connectors): for
# per-expert settings (``model.lr_scale``) they belong to the generative expert.
FLOW_MODULES = frozenset(("vae2llm", "llm2vae", "time_embedder", "latent_pos_embed"))


def parameter_experts(model: nn.Module) -> dict[str, str]:
    """Name -> expert suffix of every parameter of ``model`` (a BagelModel, bare or peft-wrapped).

    Decoder expert modules and their adapters belong to their expert (:func:`expert_of_parameter`); the
    flow connectors (:data:`FLOW_MODULES`) to the generative expert ``"_moe_gen"`` when the decoder has
    one; everything else (embeddings, lm_head, ViT and its connector) to the base expert ``""``, the
    understanding side that reads them.
    """
    dec = find_decoder(model)
    prefix = decoder_prefix(model, dec)
    gen = "_moe_gen" if "_moe_gen" in dec.experts else ""
    out = {}
    for name, _ in model.named_parameters():
        s = expert_of_parameter(name, prefix, dec.experts)
        out[name] = s if s is not None else (gen if FLOW_MODULES & set(name.split(".")) else "")
    return out


def tensor_storage_key(p: torch.Tensor) -> tuple:
    """Identity of a tensor's memory: (device, data pointer, numel, dtype); meta tensors by object id."""
    if p.is_meta or p.data_ptr() == 0:
        return ("id", id(p))
    return (p.device.type, p.data_ptr(), p.numel(), p.dtype)


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def is_adapter_parameter(name: str) -> bool:
    """True for a peft adapter parameter or module name (``...lora_A.default.weight``, DoRA's
    ``lora_magnitude_vector``): the one test of "is this adapter, not base" in ftkit."""
    return any(m in name for m in ADAPTER_MARKERS)


def expert_parameter_report(model: nn.Module) -> dict:
    """What the model holds, per expert, counting shared storage once.

    Returns a dict::

        {"experts": {name: {"suffix", "params", "bytes", "own_bytes", "shared_with", "adapter_bytes",
                            "adapter_params", "trainable_params"}},
         "decoder_expert_bytes": unique bytes of all experts' base weights (shared storage once),
         "adapter_bytes": bytes of all adapter parameters,
         "other_bytes": unique bytes of everything else (embeddings, lm_head, ViT, connectors, VAE),
         "total_bytes": unique bytes of all parameters  (= the three above summed),
         "trainable_params": number of elements with requires_grad}

    Per expert, ``bytes`` counts every base tensor its modules use, ``own_bytes`` only those no other
    expert uses, ``shared_with`` names the experts using the same storage. Buffers are not counted.
    A tensor is identified by (device, data pointer, numel, dtype), so two ``nn.Parameter`` objects on
    one storage also count once; meta tensors count by object identity.
    """
    dec = find_decoder(model)
    experts = dec.experts
    prefix = decoder_prefix(model, dec)
    per = {s: {"keys": set(), "adapter": set(), "params": 0, "adapter_params": 0, "trainable": 0} for s in experts}
    other: dict[tuple, int] = {}
    adapters: dict[tuple, int] = {}
    size_of: dict[tuple, int] = {}
    seen_trainable: set[int] = set()
    trainable = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        key = tensor_storage_key(p)
        size_of[key] = _nbytes(p)
        s = expert_of_parameter(name, prefix, experts)
        if p.requires_grad and id(p) not in seen_trainable:
            seen_trainable.add(id(p))
            trainable += p.numel()
            if s is not None:
                per[s]["trainable"] += p.numel()
        if is_adapter_parameter(name):
            adapters[key] = _nbytes(p)
            if s is not None and key not in per[s]["adapter"]:
                per[s]["adapter"].add(key)
                per[s]["adapter_params"] += p.numel()
        elif s is not None:
            if key not in per[s]["keys"]:
                per[s]["keys"].add(key)
                per[s]["params"] += p.numel()
        else:
            other[key] = _nbytes(p)
    expert_keys = set().union(*(v["keys"] for v in per.values()))
    other_keys = set(other) - expert_keys - set(adapters)
    out = {"experts": {}}
    for s, v in per.items():
        users = {t: per[t]["keys"] & v["keys"] for t in experts if t != s}
        shared = set().union(*users.values()) if users else set()
        out["experts"][expert_name(s)] = {
            "suffix": s,
            "params": v["params"],
            "bytes": sum(size_of[k] for k in v["keys"]),
            "own_bytes": sum(size_of[k] for k in v["keys"] - shared),
            "shared_with": sorted(expert_name(t) for t, ks in users.items() if ks),
            "adapter_params": v["adapter_params"],
            "adapter_bytes": sum(size_of[k] for k in v["adapter"]),
            "trainable_params": v["trainable"],
        }
    out["decoder_expert_bytes"] = sum(size_of[k] for k in expert_keys)
    out["adapter_bytes"] = sum(adapters.values())
    out["other_bytes"] = sum(size_of[k] for k in other_keys)
    out["total_bytes"] = sum(size_of.values())
    out["trainable_params"] = trainable
    return out


def shared_expert_pairs(model: nn.Module) -> dict[str, str]:
    """``{dst: src}`` for every expert whose base weights are all the same tensors as an earlier expert's
    (what :func:`share_expert_weights` produces). Experts sharing only part of their weights raise.

    Raises:
        ValueError: on partial sharing (some slots shared, others not).
    """
    dec = find_decoder(model)
    pairs = {}
    for j, dst in enumerate(dec.experts):
        for src in dec.experts[:j]:
            same = []
            for _, parent, base in expert_slots(dec):
                a, b = getattr(parent, base + src), getattr(parent, base + dst)
                pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
                same.append(pa.keys() == pb.keys() and all(pa[k] is pb[k] for k in pa))
            if all(same):
                pairs[dst] = src
                break
            if any(same):
                raise ValueError(f"experts {src!r} and {dst!r} share only part of their weights")
    return pairs


def upcycle_bagel_to_three(model: BagelModel, mode: str = "copy") -> BagelModel:
    """Split a loaded two-expert BAGEL's understanding expert into linguistic + semantic.

    Returns a new :class:`BagelModel` with ``experts=("", "_moe_sem", "_moe_gen")``, ``routing=(0, 1, 2)``
    and ``vae_tokens_generative=True`` kept (every VAE token still goes to ``_moe_gen``; ViT tokens
    now go to ``_moe_sem``). All existing modules (ViT, connectors, embeddings, both experts, VAE,
    quantized layers included) are *moved* into the new model, not copied; the new ``_moe_sem``
    expert is ``copy`` (independent clones of the understanding weights) or ``shared`` (the same
    frozen tensors, see :func:`share_expert_weights`). With ``shared`` nothing new is materialised,
    so ``upcycle_bagel_to_three(load_bagel(path), "shared")`` is the memory-light way to get a
    three-expert BAGEL from the release file (``load_bagel(path, three_experts=True)`` is the copy
    mode straight from the file). The input model shares its modules with the result: use only the
    result afterwards.

    Raises:
        ValueError: unknown ``mode``, a model that is not two-expert (``("", "_moe_gen")``), or
            adapters already attached.
        RuntimeError: if some tensor of the new model was left unfilled (a structure this function
            does not know).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, BagelModel):
        raise TypeError(f"expected a BagelModel, got {type(model).__name__}")
    if tuple(model.cfg.experts) != ("", "_moe_gen"):
        raise ValueError(f"expected a two-expert BAGEL with experts ('', '_moe_gen'), got {model.cfg.experts}")
    if has_adapters(model):
        raise ValueError("adapters are already attached: upcycle before attaching adapters")
    cfg = BagelConfig.three_experts(model.cfg)
    with torch.device("meta"):
        new = BagelModel(cfg)
    for name, child in model.named_children():
        if name != "language_model":
            setattr(new, name, child)
    old_lm, new_lm = model.language_model, new.language_model
    new_lm.lm_head = old_lm.lm_head
    old_dec, new_dec = old_lm.model, new_lm.model
    new_dec.embed_tokens = old_dec.embed_tokens
    new_dec.gradient_checkpointing = old_dec.gradient_checkpointing
    new_slots = {(path, base): parent for path, parent, base in expert_slots(new_dec)}
    for path, parent, base in expert_slots(old_dec):
        for s in old_dec.experts:
            setattr(new_slots[(path, base)], base + s, getattr(parent, base + s))
    if mode == "shared":
        share_expert_weights(new, "", "_moe_sem")
    else:
        copy_expert_weights(new, "", "_moe_sem")
    left = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"upcycle_bagel_to_three left unfilled tensors: {left[:8]}")
    new.train(model.training)
    return new


__all__ = [
    "FLOW_MODULES",
    "MODES",
    "copy_expert_weights",
    "decoder_prefix",
    "expert_name",
    "expert_of_parameter",
    "expert_parameter_report",
    "expert_slots",
    "find_decoder",
    "parameter_experts",
    "has_adapters",
    "share_expert_weights",
    "shared_clone",
    "shared_expert_pairs",
    "tensor_storage_key",
    "upcycle_bagel_to_three",
]
