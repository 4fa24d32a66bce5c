"""The contract between data and models: segments and the packed batch.

A dataset record becomes a list of :class:`Segment` (ftkit.data's sequence builder); the packer
(:func:`ftkit.data.packer.pack`) turns lists of segments into one :class:`PackedBatch`; a backbone
(ftkit.models) consumes the packed batch. Models never see dataset formats, datasets never see a
backbone. This module imports nothing from ftkit.

Functionality-expert routing is a property of segments:

===============  ====================  =========================================
segment kind     functionality         BAGEL expert (2)  /  FoX expert (3)
===============  ====================  =========================================
text             linguistic            understanding     /  linguistic
vit_image        semantic              understanding     /  semantic
vae_clean        semantic (context)    generation        /  semantic*
vae_noisy        generative            generation        /  generative
===============  ====================  =========================================

(*) BAGEL routes *every* VAE token, clean or noisy, to its generation weights: the backbone's
``expert_map`` decides, per (kind, functionality). Image start/end markers are text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum, IntEnum

import torch


class Kind(str, Enum):
    TEXT = "text"
    VIT_IMAGE = "vit_image"
    VAE_CLEAN = "vae_clean"
    VAE_NOISY = "vae_noisy"


class Functionality(IntEnum):
    LINGUISTIC = 0
    SEMANTIC = 1
    GENERATIVE = 2


class Step(IntEnum):
    """Which reasoning step a segment belongs to (losses are weighted and logged per step)."""

    CONTEXT = 0  # prompt, input image: never supervised
    PLAN = 1
    DRAFT = 2
    REFLECT = 3
    REFINE = 4
    ANSWER = 5  # plain understanding answers / captions


STEP_NAMES = {s: s.name.lower() for s in Step}

DEFAULT_FUNCTIONALITY = {
    Kind.TEXT: Functionality.LINGUISTIC,
    Kind.VIT_IMAGE: Functionality.SEMANTIC,
    Kind.VAE_CLEAN: Functionality.SEMANTIC,
    Kind.VAE_NOISY: Functionality.GENERATIVE,
}

# token-kind codes inside a PackedBatch (same as the fixture's seq_token_kind)
TOKEN_TEXT, TOKEN_VIT, TOKEN_VAE = 0, 1, 2


@dataclass
class Segment:
    """One item of an interleaved sequence.

    Text: ``text_ids`` are the content ids (no ``<|im_start|>``/``<|im_end|>``; the packer adds them).
    ``loss`` puts CE on every content token and on ``<|im_end|>``; ``end_label`` (e.g. the
    ``<|vision_start|>`` id when an image follows) adds CE at the ``<|im_end|>`` position.

    Images: ``image`` is a float tensor [3, H, W] in [-1, 1]. For ``vit_image`` H and W must be
    multiples of the ViT patch size, for VAE kinds multiples of the VAE stride x latent patch (16 on
    BAGEL). ``loss`` on a ``vae_noisy`` segment adds the flow loss; ``timestep_logit`` fixes its
    timestep (else the model draws one). ``region_mask`` ([H, W] bool, True where the reflection
    flags a region) is used by the spatial-consistency loss on refinements. ``pair_with`` is the
    index (within the same sample's segment list) of the image this one refines.
    ``dropped``: CFG dropout removed the content but the RoPE position still advances.
    """

    kind: Kind
    step: Step = Step.CONTEXT
    text_ids: list[int] | None = None
    image: torch.Tensor | None = None
    loss: bool = False
    end_label: int | None = None
    functionality: Functionality | None = None
    timestep_logit: float | None = None
    region_mask: torch.Tensor | None = None
    pair_with: int | None = None
    dropped: bool = False

    def __post_init__(self) -> None:
        self.kind = Kind(self.kind)
        self.step = Step(self.step)
        if self.functionality is None:
            self.functionality = DEFAULT_FUNCTIONALITY[self.kind]
        self.functionality = Functionality(self.functionality)
        if self.kind == Kind.TEXT:
            if self.text_ids is None:
                raise ValueError("text segment needs text_ids")
            if self.image is not None:
                raise ValueError("text segment cannot carry an image")
        else:
            if self.image is None:
                raise ValueError(f"{self.kind.value} segment needs image [3, H, W]")
            if self.image.dim() != 3 or self.image.shape[0] != 3:
                raise ValueError(f"{self.kind.value} image must be [3, H, W], got {tuple(self.image.shape)}")
            if self.loss and self.kind != Kind.VAE_NOISY:
                raise ValueError(f"only vae_noisy images carry a loss, not {self.kind.value}")


@dataclass
class PackedBatch:
    """Several samples packed into one sequence of length L (upstream's packing layout).

    Per-token tensors have length L. ``attention`` lists, per split, ``(start, end, mode, sample)``
    with mode in {"causal", "full", "noise"}: from it the backbone derives its mask (a dense mask on
    CPU, a block mask on CUDA) without the data layer knowing which.
    """

    sequence_length: int
    position_ids: torch.Tensor  # [L] RoPE positions
    token_kind: torch.Tensor  # [L] TOKEN_TEXT | TOKEN_VIT | TOKEN_VAE
    functionality: torch.Tensor  # [L] Functionality per token
    sample_ids: torch.Tensor  # [L] which packed sample
    token_step: torch.Tensor  # [L] Step per token
    attention: list[tuple[int, int, str, int]]
    # text
    text_ids: torch.Tensor  # [Nt]
    text_indexes: torch.Tensor  # [Nt]
    # ViT
    vit_tokens: torch.Tensor  # [Nv, p*p*3] patchified pixels
    vit_position_ids: torch.Tensor  # [Nv]
    vit_token_indexes: torch.Tensor  # [Nv]
    vit_seqlens: list[int]  # tokens per ViT image
    # VAE: images are encoded by the model (it owns the autoencoder)
    vae_images: list[torch.Tensor]  # each [3, H, W]
    vae_latent_hw: list[tuple[int, int]]  # token grid (h, w) per VAE image
    vae_token_indexes: torch.Tensor  # [Nz]
    vae_position_ids: torch.Tensor  # [Nz]
    vae_image_noisy: list[bool]
    vae_image_step: list[int]
    vae_timestep_logits: torch.Tensor  # [n_vae_images], nan = draw, -inf = clean
    vae_region_masks: list[torch.Tensor | None]  # per image, [h, w] token grid bool (flagged)
    vae_pair_with: list[int]  # per image: index of the image it refines, -1 if none
    # losses
    ce_indexes: torch.Tensor  # [Nce]
    ce_labels: torch.Tensor  # [Nce]
    ce_step: torch.Tensor  # [Nce]
    mse_indexes: torch.Tensor  # [Nm] sequence positions of noisy tokens that carry flow loss
    mse_step: torch.Tensor  # [Nm]
    sample_lengths: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PackedBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                v = [t.to(device) for t in v]
            elif f.name == "vae_region_masks":
                v = [None if t is None else t.to(device) for t in v]
            out[f.name] = v
        return PackedBatch(**out)

    def vae_token_image(self) -> torch.Tensor:
        """[Nz] index of the VAE image each VAE token belongs to."""
        counts = torch.tensor([h * w for h, w in self.vae_latent_hw], dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(counts)), counts).to(self.vae_token_indexes.device)
