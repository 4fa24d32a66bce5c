"""Dataset registry: datasets by name, declared in YAML.

A registry file::

    datasets:
      shapes-train:
        format: ftkit            # ftkit | genref | got | bagel-t2i | bagel-edit
        path: shapes/train/records.jsonl      # or `paths: [...]`, or `paths: {train: [...], eval: [...]}`
        split: train             # the split this entry serves by default
        weight: 1.0              # sampling weight in a mixture (> 0)
        skip_invalid: false      # drop bad records (logged and listed) instead of refusing the dataset
        allow_outside_paths: false   # let records read files outside the dataset folder (.., absolute, symlinks)
        fields: {prompt: caption}   # ftkit-name -> column-name mapping (see ftkit.data.importers)
        description: "..."

Paths are relative to the directory of the registry file that declares them (absolute allowed;
glob patterns allowed). Files are merged in order, a later entry replacing an earlier one of the
same name: the built-in ``data/registry.yaml`` of the repository, then every file of the
``FTKIT_DATA_REGISTRY`` environment variable (colon-separated), then the files passed explicitly.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftkit.errors import FtkitError

FORMATS = ("ftkit", "genref", "got", "bagel-t2i", "bagel-edit")
ENV_VAR = "FTKIT_DATA_REGISTRY"
BUILTIN_REGISTRY = Path(__file__).resolve().parents[2] / "data" / "registry.yaml"
_ENTRY_KEYS = {"format", "path", "paths", "split", "weight", "skip_invalid", "allow_outside_paths", "fields",
               "description"}


class RegistryError(FtkitError, ValueError):
    """A registry file is unreadable or an entry is malformed (message names the file and field)."""


class UnknownDatasetError(FtkitError, KeyError):
    """A dataset name that no registry declares."""

    def __str__(self) -> str:  # KeyError repr()s its argument; keep the message readable
        return str(self.args[0])


@dataclass
class DatasetSpec:
    """One registry entry, paths resolved against the declaring file's directory."""

    name: str
    format: str
    paths: dict[str, list[str]]  # split -> list of path patterns (absolute)
    split: str = "train"
    weight: float = 1.0
    skip_invalid: bool = False
    allow_outside_paths: bool = False
    fields: dict[str, str] = field(default_factory=dict)
    description: str = ""
    origin: str = ""  # registry file that declared it

    def files(self, split: str | None = None) -> list[Path]:
        """The files of ``split`` (default: this entry's split), glob patterns expanded, sorted.

        Raises:
            RegistryError: unknown split, or a path that matches nothing.
        """
        split = split or self.split
        if split not in self.paths:
            raise RegistryError(f"{self.origin}: dataset {self.name!r} has no split {split!r} "
                                f"(splits: {', '.join(self.paths)})")
        out: list[Path] = []
        for pat in self.paths[split]:
            if any(c in pat for c in "*?["):
                hits = sorted(glob.glob(pat))
                if not hits:
                    raise RegistryError(f"{self.origin}: dataset {self.name!r}: pattern {pat!r} matches no file")
                out += [Path(h) for h in hits]
            else:
                p = Path(pat)
                if not p.exists():
                    hint = " (run `make data` to generate it)" if "shapes" in self.name else ""
                    raise RegistryError(f"{self.origin}: dataset {self.name!r}: {p} does not exist{hint}")
                out.append(p)
        return out


def _resolve(p: Any, base: Path, where: str) -> str:
    if not isinstance(p, str) or not p:
        raise RegistryError(f"{where}: path must be a non-empty string, got {p!r}")
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (base / q))


def _parse_entry(name: str, e: Any, file: Path) -> DatasetSpec:
    where = f"{file}: datasets.{name}"
    if not isinstance(e, dict):
        raise RegistryError(f"{where}: entry must be a mapping, got {type(e).__name__}")
    unknown = set(e) - _ENTRY_KEYS
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
    fmt = e.get("format", "ftkit")
    if fmt not in FORMATS:
        raise RegistryError(f"{where}.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    split = e.get("split", "train")
    if not isinstance(split, str):
        raise RegistryError(f"{where}.split: must be a string, got {split!r}")
    if ("path" in e) == ("paths" in e):
        raise RegistryError(f"{where}: needs exactly one of 'path' or 'paths'")
    base = file.parent
    raw = e.get("paths", e.get("path"))
    if isinstance(raw, dict):
        paths = {}
        for sp, v in raw.items():
            vs = v if isinstance(v, list) else [v]
            paths[str(sp)] = [_resolve(x, base, f"{where}.paths.{sp}") for x in vs]
        if split not in paths:
            split = next(iter(paths))
    else:
        vs = raw if isinstance(raw, list) else [raw]
        if not vs:
            raise RegistryError(f"{where}.paths: empty list")
        paths = {split: [_resolve(x, base, f"{where}.paths") for x in vs]}
    weight = e.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise RegistryError(f"{where}.weight: must be a number > 0, got {weight!r}")
    skip = e.get("skip_invalid", False)
    if not isinstance(skip, bool):
        raise RegistryError(f"{where}.skip_invalid: must be true or false, got {skip!r}")
    outside = e.get("allow_outside_paths", False)
    if not isinstance(outside, bool):
        raise RegistryError(f"{where}.allow_outside_paths: must be true or false, got {outside!r}")
    fields = e.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        raise RegistryError(f"{where}.fields: must map field names to column names (strings), got {fields!r}")
    desc = e.get("description", "")
    return DatasetSpec(name=name, format=fmt, paths=paths, split=split, weight=float(weight), skip_invalid=skip,
                       allow_outside_paths=outside, fields=dict(fields), description=str(desc), origin=str(file))


def read_registry_file(path: str | os.PathLike) -> dict[str, DatasetSpec]:
    """Parse one registry YAML file. Raises :class:`RegistryError` naming the file (and entry)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise RegistryError(f"{file}: registry file does not exist")
    try:
        doc = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise RegistryError(f"{file}: not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict) or "datasets" not in doc:
        raise RegistryError(f"{file}: expected a mapping with a top-level 'datasets:' key")
    ds = doc["datasets"] or {}
    if not isinstance(ds, dict):
        raise RegistryError(f"{file}: 'datasets' must map names to entries, got {type(ds).__name__}")
    return {str(name): _parse_entry(str(name), e, file) for name, e in ds.items()}


class Registry:
    """Merged view of registry files (later files override earlier names)."""

    def __init__(self, specs: dict[str, DatasetSpec] | None = None, files: list[str] | None = None):
        self.specs: dict[str, DatasetSpec] = dict(specs or {})
        self.files: list[str] = list(files or [])

    @classmethod
    def load(cls, extra: str | os.PathLike | list | tuple | None = None, *, builtin: bool = True,
             env: bool = True) -> Registry:
        """Built-in registry, then ``$FTKIT_DATA_REGISTRY`` (colon-separated), then ``extra`` files.

        Raises:
            RegistryError: a file is missing, not YAML or has a malformed entry.
        """
        files: list[Path] = []
        if builtin and BUILTIN_REGISTRY.is_file():
            files.append(BUILTIN_REGISTRY)
        if env and os.environ.get(ENV_VAR):
            files += [Path(p) for p in os.environ[ENV_VAR].split(os.pathsep) if p]
        if extra is not None:
            extras = [extra] if isinstance(extra, (str, os.PathLike)) else list(extra)
            files += [Path(p) for p in extras]
        reg = cls()
        for f in files:
            reg.specs.update(read_registry_file(f))
            reg.files.append(str(f))
        return reg

    def names(self) -> list[str]:
        return sorted(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def get(self, name: str) -> DatasetSpec:
        """Raises :class:`UnknownDatasetError` listing the known names."""
        if name not in self.specs:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownDatasetError(f"unknown dataset {name!r}; registered: {known} "
                                      f"(registry files: {', '.join(self.files) or 'none'})")
        return self.specs[name]

    def __getitem__(self, name: str) -> DatasetSpec:
        return self.get(name)
