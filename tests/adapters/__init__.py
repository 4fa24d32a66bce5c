"""Adapter tests; ``randomize_adapters`` gives an attached adapter non-zero weights (no training needed to
test the plumbing)."""

import torch


def randomize_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Random LoRA A/B (``scale``), perturbed DoRA magnitudes, nudged modules_to_save copies."""
    from ftkit.adapters import adapter_state_dict

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter_state_dict(model).items():
            if ".lora_magnitude_vector." in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
