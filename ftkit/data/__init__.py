"""ftkit.data: step-wise MCoT records, registry, importers, validation, sequence builder, packer,
shapes world.

Attributes are imported lazily so that ``import ftkit.data.packer`` stays cheap (no ``datasets``,
no PIL): ``from ftkit.data import load_records`` imports :mod:`ftkit.data.dataset` on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    # schema
    "StepRecord": "schema", "RecordError": "schema", "ImageRef": "schema", "Box": "schema", "Region": "schema",
    "PlanStep": "schema", "DraftStep": "schema", "ReflectStep": "schema", "RefineStep": "schema",
    "Problem": "schema",
    # text
    "serialize_plan": "serialize", "serialize_reflection": "serialize", "parse_plan": "serialize",
    "parse_reflection": "serialize", "ParseError": "serialize",
    # registry / loading
    "Registry": "registry", "DatasetSpec": "registry", "RegistryError": "registry",
    "UnknownDatasetError": "registry",
    "load_records": "dataset", "load_mixture": "dataset", "MixtureDataset": "dataset",
    "RecordDataset": "dataset", "InvalidDatasetError": "dataset", "open_dataset": "dataset",
    "settle_invalid": "dataset",
    "open_sources": "importers", "UnreadableFileError": "importers",
    "check_sources": "checks", "check_record_images": "checks",
    "Report": "validate",  # the function is ftkit.data.validate.validate (same name as its module)
    # sequences
    "BuilderConfig": "builder", "build_segments": "builder", "apply_cfg_dropout": "builder",
    "PackConfig": "packer", "pack": "packer",
    "contact_sheet": "preview",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(f"ftkit.data.{_LAZY[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module 'ftkit.data' has no attribute {name!r}")
