"""Multi-process helpers: FSDP2 sharding of ftkit backbones (Lightning's ModelParallelStrategy)."""

from __future__ import annotations

import torch.nn as nn


def shard_fsdp2(model: nn.Module, mesh) -> None:
    """Shard every decoder layer (and the trainable connectors) with FSDP2's ``fully_shard``.

    Only the decoder layers hold real weight; embeddings, ViT, VAE and heads stay replicated (they
    are frozen under LoRA). Trainable modules outside the layers are sharded too so their gradients
    are reduced; a trainable ``lm_head`` is refused (its weight is used outside a module call by the
    chunked cross-entropy).
    """
    from torch.distributed.fsdp import fully_shard

    dp = mesh["data_parallel"] if getattr(mesh, "mesh_dim_names", None) and "data_parallel" in mesh.mesh_dim_names else mesh
    lm = model.language_model
    if any(p.requires_grad for p in lm.lm_head.parameters()) or any(p.requires_grad for p in lm.model.embed_tokens.parameters()):
        raise ValueError("FSDP2 with a trainable lm_head / embed_tokens is not supported; use DDP for that adapter")
    for layer in lm.model.layers:
        fully_shard(layer, mesh=dp)
    for name in ("vae2llm", "llm2vae", "time_embedder", "connector"):
        mod = getattr(model, name, None)
        if mod is not None and any(p.requires_grad for p in mod.parameters()):
            fully_shard(mod, mesh=dp)
