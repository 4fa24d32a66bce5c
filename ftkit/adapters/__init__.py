"""Adapters for BAGEL-architecture models: config (presets, per-expert rank), attach (peft layers,
QLoRA, enable/disable), io (adapter folders), merge (streaming merge into a release folder), merge_fox
(in-memory FoX merge), merge_common (what both merges share, merge_into_model)."""

from ftkit.adapters.attach import (
    adapter_state_dict,
    adapters_disabled,
    attach_adapters,
    enable_gradient_checkpointing,
    set_adapters_enabled,
    trainable_parameters,
)
from ftkit.adapters.config import AdapterConfig, AdapterConfigError
from ftkit.adapters.io import AdapterError, load_adapter, save_adapter
from ftkit.adapters.merge_common import MergeError, merge_into_model

# the streaming merge is ``ftkit.adapters.merge.merge`` (not re-exported here: a package attribute named
# ``merge`` would shadow the submodule for ``import ftkit.adapters.merge as m`` and mock.patch paths)

__all__ = ["AdapterConfig", "AdapterConfigError", "AdapterError", "MergeError", "attach_adapters",
           "adapter_state_dict", "adapters_disabled", "enable_gradient_checkpointing", "set_adapters_enabled",
           "trainable_parameters", "load_adapter", "save_adapter", "merge_into_model"]
