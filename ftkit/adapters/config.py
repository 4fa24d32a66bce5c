"""Adapter configuration: which projections of which functionality expert get LoRA / DoRA / rsLoRA.

peft's split in spirit: this module is the *config* (a dataclass and its resolution into a
``peft.LoraConfig`` for one concrete model), :mod:`ftkit.adapters.attach` wraps layers,
:mod:`ftkit.adapters.io` saves and loads, :mod:`ftkit.adapters.merge` folds adapters into a release.

A LoRA layer replaces ``y = W x + b`` by ``y = W x + b + s B A x`` with ``A`` [r, in], ``B`` [out, r]
(``B = 0`` at init) and scale ``s = alpha / r`` (rsLoRA: ``s = alpha / sqrt(r)``). DoRA additionally
learns a per-output-row magnitude ``m``: ``y = m / ||W + s B A||_row * (W + s B A) x + b`` (norm of each
output row over the input dimension, as peft's ``DoraLinearLayer.get_weight_norm`` computes it).

BAGEL's decoder holds every projection once per functionality expert, named by suffix:
``""`` (understanding; "linguistic" is an alias), ``"_moe_sem"`` (semantic, three-expert models) and
``"_moe_gen"`` (generative). Presets:

* ``generative``: ``self_attn.{q,k,v,o}_proj_moe_gen`` and ``mlp_moe_gen.{gate,up,down}_proj`` only
  (public practice: Flow-GRPO on BAGEL, rank 64, alpha 128);
* ``understanding``: the ``""`` expert's projections (and ``_moe_sem``'s when the model has it);
* ``all-experts``: every expert's projections;
* ``custom``: ``target_modules`` lists module names (peft semantics: a name matches a module whose
  full name equals it or ends with ``"." + name``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

import torch.nn as nn

from ftkit.errors import FtkitError

METHODS = ("lora", "dora", "rslora")
PRESETS = ("generative", "understanding", "all-experts", "custom")
INITS = {"default": True, "gaussian": "gaussian"}
# expert name -> module suffix
EXPERT_SUFFIX = {"understanding": "", "linguistic": "", "semantic": "_moe_sem", "generative": "_moe_gen"}
# modules_to_save short name -> module path in BagelModel (== prefix of its ema.safetensors keys)
MODULES_TO_SAVE = {
    "vae2llm": "vae2llm",
    "llm2vae": "llm2vae",
    "time_embedder": "time_embedder",
    "connector": "connector",
    "lm_head": "language_model.lm_head",
    "embed_tokens": "language_model.model.embed_tokens",
}
ATTN_PROJ = ("q", "k", "v", "o")
MLP_PROJ = ("gate", "up", "down")
# any decoder projection of any expert: groups (attn letter, attn suffix, mlp suffix, mlp name)
_DECODER_PROJ = re.compile(
    r"language_model\.model\.layers\.\d+\.(?:self_attn\.([qkvo])_proj(_moe_[a-z]+)?|mlp(_moe_[a-z]+)?\.(gate|up|down)_proj)"
)


class AdapterConfigError(FtkitError, ValueError):
    """An adapter configuration that cannot be applied (to this model)."""


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or a bitsandbytes 4-/8-bit Linear (both subclass nn.Linear) or a peft-wrapped one."""
    if isinstance(module, nn.Linear):
        return True
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Linear)


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the Linear layers that can carry an adapter (the autoencoder, not in the release, excluded)."""
    out = []
    for name, mod in model.named_modules():
        if name.startswith("vae.") or name == "vae":
            continue
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        if is_linear_like(mod):
            out.append(name)
    return out


def model_experts(model: nn.Module) -> tuple[str, ...]:
    """The decoder's expert suffixes (``("", "_moe_gen")`` for BAGEL, plus ``"_moe_sem"`` with three)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "experts"):
        return tuple(cfg.experts)
    found = set()
    for name in _linear_names(model):
        m = _DECODER_PROJ.fullmatch(name)
        if m:
            found.add(m.group(2) or m.group(3) or "")
    return tuple(sorted(found))


def expert_pattern(suffix: str, include_mlp: bool = True) -> str:
    """Regex (for ``re.fullmatch``) of one expert's decoder projections."""
    s = re.escape(suffix)
    parts = [rf"self_attn\.(?:{'|'.join(ATTN_PROJ)})_proj{s}"]
    if include_mlp:
        parts.append(rf"mlp{s}\.(?:{'|'.join(MLP_PROJ)})_proj")
    return r"language_model\.model\.layers\.\d+\.(?:" + "|".join(parts) + ")"


@dataclass
class AdapterConfig:
    """What to train. See the module docstring for the math and the presets.

    Args:
        method: ``"lora"``, ``"dora"`` (peft ``use_dora``) or ``"rslora"`` (peft ``use_rslora``: s = alpha/sqrt(r)).
        preset: ``"generative"``, ``"understanding"``, ``"all-experts"`` or ``"custom"``.
        r, alpha: default rank and alpha of every targeted projection.
        dropout: LoRA dropout on the adapter's input.
        include_mlp: also target the experts' MLP projections (gate/up/down), not only attention.
        expert_r, expert_alpha: per-expert overrides, keyed by expert name (``understanding`` or its
            alias ``linguistic``, ``semantic``, ``generative``); become peft ``rank_pattern`` /
            ``alpha_pattern`` entries.
        target_modules: module names for ``preset="custom"`` (forbidden otherwise).
        modules_to_save: small modules trained in full and saved with the adapter; allowed names are
            the keys of :data:`MODULES_TO_SAVE`.
        init: peft ``init_lora_weights``: ``"default"`` (Kaiming A, zero B) or ``"gaussian"``.

    Raises:
        AdapterConfigError: on an unknown method / preset / expert / module name / init, or bad numbers.
    """

    method: str = "lora"
    preset: str = "generative"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    include_mlp: bool = True
    expert_r: dict[str, int] = field(default_factory=dict)
    expert_alpha: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    init: str = "default"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AdapterConfigError(f"adapter method {self.method!r} unknown; choose one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise AdapterConfigError(f"adapter preset {self.preset!r} unknown; choose one of {', '.join(PRESETS)}")
        if self.init not in INITS:
            hint = (" (PiSSA/OLoRA/LoftQ rewrite the base weights, so the adapter would no longer apply to the "
                    "released base and could not be merged into it)") if self.init in ("pissa", "olora", "loftq") else ""
            raise AdapterConfigError(f"adapter init {self.init!r} not supported; choose one of {', '.join(INITS)}{hint}")
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"adapter r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise AdapterConfigError(f"adapter alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")
        for what, d, ok in (("expert_r", self.expert_r, lambda v: isinstance(v, int) and v > 0),
                            ("expert_alpha", self.expert_alpha, lambda v: isinstance(v, (int, float)) and v > 0)):
            for k, v in d.items():
                if k not in EXPERT_SUFFIX:
                    raise AdapterConfigError(f"{what}: unknown expert {k!r}; experts are {', '.join(EXPERT_SUFFIX)}")
                if not ok(v):
                    raise AdapterConfigError(f"{what}[{k!r}] must be positive, got {v!r}")
            if "understanding" in d and "linguistic" in d and d["understanding"] != d["linguistic"]:
                raise AdapterConfigError(f"{what}: 'understanding' and 'linguistic' name the same expert "
                                         f"but give {d['understanding']} and {d['linguistic']}")
        if self.preset == "custom":
            if not self.target_modules:
                raise AdapterConfigError("preset 'custom' needs target_modules (a list of module names)")
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
        elif self.target_modules:
            raise AdapterConfigError(f"target_modules is only used with preset 'custom' (preset is {self.preset!r})")
        bad = [m for m in self.modules_to_save if m not in MODULES_TO_SAVE]
        if bad:
            raise AdapterConfigError(f"modules_to_save: unknown module(s) {', '.join(map(repr, bad))}; "
                                     f"allowed: {', '.join(MODULES_TO_SAVE)}")
        self.modules_to_save = list(dict.fromkeys(self.modules_to_save))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise AdapterConfigError(f"unknown adapter config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    # ------------------------------------------------------------------ resolution against a model
    def module_paths_to_save(self) -> list[str]:
        return [MODULES_TO_SAVE[m] for m in self.modules_to_save]

    def _experts_of_preset(self, experts: tuple[str, ...]) -> list[str]:
        if self.preset == "generative":
            return ["_moe_gen"]
        if self.preset == "understanding":
            return [s for s in ("", "_moe_sem") if s in experts] or [""]
        return list(experts)

    def target_regex(self, model: nn.Module) -> str:
        """One regex (peft matches a string ``target_modules`` with ``re.fullmatch``) naming the targets."""
        if self.preset == "custom":
            names = self.resolve_targets(model)
            return "(?:" + "|".join(re.escape(n) for n in names) + ")"
        pats = [expert_pattern(s, self.include_mlp) for s in self._experts_of_preset(model_experts(model))]
        return pats[0] if len(pats) == 1 else "(?:" + "|".join(pats) + ")"

    def resolve_targets(self, model: nn.Module) -> list[str]:
        """The exact module names this config adapts in ``model`` (sorted).

        Raises:
            AdapterConfigError: a preset or custom name matches no Linear layer of this model, a name
                matches something that is not a Linear layer, or a target lies inside a module_to_save.
        """
        linears = _linear_names(model)
        experts = model_experts(model)
        if self.preset == "custom":
            all_names = [n for n, _ in model.named_modules() if not n.startswith("vae.")]
            out: set[str] = set()
            for t in self.target_modules or []:
                hits = [n for n in all_names if n == t or n.endswith("." + t)]
                if not hits:
                    raise AdapterConfigError(f"target_modules: {t!r} matches no module of this model "
                                             f"(decoder projections look like e.g. {linears[0] if linears else '?'})")
                not_lin = [n for n in hits if n not in linears]
                if not_lin:
                    raise AdapterConfigError(f"target_modules: {t!r} matches {not_lin[0]}, which is not a Linear "
                                             "layer (LoRA targets Linear layers)")
                out.update(hits)
            names = sorted(out)
        else:
            missing = [s for s in self._experts_of_preset(experts) if s not in experts]
            if missing:
                raise AdapterConfigError(f"preset {self.preset!r} targets expert suffix {missing[0]!r}, which this "
                                         f"model does not have (its experts: {list(experts)})")
            rx = re.compile(self.target_regex(model))
            names = sorted(n for n in linears if rx.fullmatch(n))
            if not names:
                raise AdapterConfigError(f"preset {self.preset!r} matches no module of this model")
        for p in self.module_paths_to_save():
            inside = [n for n in names if n == p or n.startswith(p + ".")]
            if inside:
                raise AdapterConfigError(f"{inside[0]} is both a LoRA target and inside modules_to_save {p!r}")
        return names

    def _patterns(self, model: nn.Module, per_expert: dict) -> dict:
        experts = model_experts(model)
        out = {}
        for name, v in per_expert.items():
            s = EXPERT_SUFFIX[name]
            if s not in experts:
                raise AdapterConfigError(
                    f"per-expert setting for {name!r} (suffix {s!r}) but this model's experts are {list(experts)}"
                    + ("; on a two-expert BAGEL the semantic tokens use the understanding weights"
                       if name == "semantic" else ""))
            out[expert_pattern(s, True)] = v
        return out

    def to_peft(self, model: nn.Module):
        """This config as a ``peft.LoraConfig`` for ``model`` (presets resolved to an exact regex).

        ``modules_to_save`` is *not* passed to peft (ftkit trains those modules in place, see
        :func:`ftkit.adapters.attach.attach_adapters`).
        """
        from peft import LoraConfig

        self.resolve_targets(model)  # validation (raises with a clear message)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_regex(model),
            rank_pattern=self._patterns(model, self.expert_r),
            alpha_pattern=self._patterns(model, self.expert_alpha),
            use_dora=self.method == "dora",
            use_rslora=self.method == "rslora",
            init_lora_weights=INITS[self.init],
            bias="none",
        )


__all__ = ["AdapterConfig", "AdapterConfigError", "EXPERT_SUFFIX", "MODULES_TO_SAVE", "METHODS", "PRESETS",
           "expert_pattern", "model_experts", "is_linear_like"]
