"""Backbones: BAGEL-architecture unified models (BAGEL-7B-MoT, 3-expert BAGEL, FoX) and their loaders.

Imports are lazy so that ``import ftkit.models.<module>`` stays cheap."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BagelModel": "ftkit.models.bagel",
    "BagelOutput": "ftkit.models.bagel",
    "FlowLatents": "ftkit.models.bagel",
    "BagelConfig": "ftkit.models.config",
    "LLMConfig": "ftkit.models.config",
    "ViTConfig": "ftkit.models.config",
    "detect_model_folder": "ftkit.models.folders",
    "read_model_config": "ftkit.models.folders",
    "parse_dtype": "ftkit.models.folders",
    "load_bagel": "ftkit.models.loading",
    "load_tokenizer": "ftkit.models.loading",
    "CheckpointError": "ftkit.models.loading",
    "save_bagel": "ftkit.models.release",
    "build_fox": "ftkit.models.fox",
    "load_fox": "ftkit.models.fox",
    "save_fox": "ftkit.models.fox",
    "load_fox_tokenizer": "ftkit.models.fox",
    "share_expert_weights": "ftkit.models.experts",
    "copy_expert_weights": "ftkit.models.experts",
    "expert_parameter_report": "ftkit.models.experts",
    "upcycle_bagel_to_three": "ftkit.models.experts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ftkit.models' has no attribute {name!r}")
