"""Recipe composition: a recipe lists config fragments and overrides a few fields.

    # recipes/NAME.yaml
    defaults:                       # fragments, merged in order (later wins)
      - configs/model/bagel-7b.yaml
      - configs/peft/lora-generative.yaml
      - configs/data/shapes.yaml
      - configs/trainer/gpu-ddp.yaml
    model:                          # overrides, deep-merged over the fragments
      lr: 5.0e-5

Dicts merge key by key; any other value (lists included) replaces. A fragment may itself have
``defaults``. Paths are relative to the file that names them, else to the repository root. The
result is a LightningCLI config (``model``, ``data``, ``trainer``, ``seed_everything``) plus an
``ftkit`` section (run directory, samples, export) that ftkit's own launcher consumes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ftkit.errors import FtkitError

REPO_ROOT = Path(__file__).resolve().parents[2]


class RecipeError(FtkitError, ValueError):
    pass


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve(name: str, relative_to: Path) -> Path:
    for cand in (relative_to / name, REPO_ROOT / name, Path(name)):
        if cand.is_file():
            return cand.resolve()
    raise RecipeError(f"{relative_to}: config fragment {name!r} not found")


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p.resolve()
    for cand in (REPO_ROOT / "recipes" / f"{name_or_path}.yaml", Path("recipes") / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand.resolve()
    known = sorted(x.stem for x in (REPO_ROOT / "recipes").glob("*.yaml"))
    raise RecipeError(f"recipe {name_or_path!r} not found (known: {', '.join(known)})")


def load_yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(d, dict):
        raise RecipeError(f"{path}: a recipe/config fragment must be a mapping")
    return d


def compose(path: str | Path, _seen: tuple = ()) -> dict:
    """Resolve ``defaults`` recursively and merge; returns the composed dict."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: circular defaults ({' -> '.join(map(str, _seen))})")
    d = load_yaml(path)
    defaults = d.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise RecipeError(f"{path}: 'defaults' must be a list of fragment paths")
    out: dict = {}
    for frag in defaults:
        out = deep_merge(out, compose(_resolve(frag, path.parent), (*_seen, path)))
    return deep_merge(out, d)


def split_ftkit(cfg: dict) -> tuple[dict, dict]:
    """(LightningCLI config, ftkit launcher section)."""
    cfg = copy.deepcopy(cfg)
    return cfg, cfg.pop("ftkit", {}) or {}
