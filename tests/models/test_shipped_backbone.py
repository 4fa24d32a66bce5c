"""The tiny backbone shipped in data/tiny-backbone (what `make` fine-tunes): a complete release folder that
loads strictly through the real loader, stays within the repository's size budget, and says what it is."""

import json

import torch

from ftkit.models.loading import load_bagel, load_tokenizer
from ftkit.train.recipe import REPO_ROOT

SHIPPED = REPO_ROOT / "data" / "tiny-backbone"


def test_shipped_backbone_is_a_small_complete_release_folder():
    total = sum(p.stat().st_size for p in SHIPPED.iterdir() if p.is_file())
    assert total <= 30 * 2**20, f"data/tiny-backbone is {total / 2**20:.1f} MiB (budget 30)"
    info = json.loads((SHIPPED / "pretrain.json").read_text())
    assert info["step"] > 0 and info["trained_tensors"] > 0
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert f"{info['step']:,}" in card, "MODEL_CARD.md does not name the shipped step"


def test_shipped_backbone_loads_strictly_with_finite_weights():
    model = load_bagel(SHIPPED, dtype=torch.float32)
    tok = load_tokenizer(SHIPPED)
    assert tok.encode("a photo of a red circle")
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 8e6, n
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
