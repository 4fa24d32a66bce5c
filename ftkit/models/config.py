"""Model configurations as dataclasses, read from the release folder's JSON files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftkit.segments import Functionality


def read_json_object(path: Path, hint: str = "") -> dict:
    """``path`` as a JSON object.

    Raises:
        FileNotFoundError: no such file (``hint`` says how to get it). ValueError: naming the file, when
        it is not valid JSON or not an object.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found" + (f". {hint}" if hint else ""))
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _fields(path: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> tuple[dict, dict]:
    """(the JSON object at ``path``, its ``required`` fields plus those of ``optional`` it has).
    Raises ValueError naming the file and the first missing required field."""
    d = read_json_object(path)
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{path}: missing field {missing[0]!r}")
    return d, {k: d[k] for k in (*required, *optional) if k in d}


@dataclass
class LLMConfig:
    """Qwen2 decoder shape (llm_config.json). BAGEL forces qk_norm on and untied embeddings."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v have biases in Qwen2; o_proj never does
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported (Qwen2 uses silu)")

    @classmethod
    def from_json(cls, path: str | Path, *, force_bagel: bool = True) -> LLMConfig:
        path = Path(path)
        d, kw = _fields(path, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size"), ("rope_theta", "rms_norm_eps", "hidden_act", "max_position_embeddings"))
        kw["num_key_value_heads"] = d.get("num_key_value_heads", kw["num_attention_heads"])
        if force_bagel:
            kw.update(qk_norm=True, tie_word_embeddings=False)
        else:
            kw.update(qk_norm=bool(d.get("qk_norm", False)), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_hf_dict(self) -> dict:
        """A transformers Qwen2 config dict (what the release's llm_config.json holds)."""
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps, "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_dropout": 0.0,
            "use_sliding_window": False, "torch_dtype": "bfloat16",
        }


@dataclass
class ViTConfig:
    """SigLIP-NaViT encoder (vit_config.json). BAGEL drops the last listed layer at load."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26  # layers actually built (config value minus one on BAGEL)
    num_attention_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_json(cls, path: str | Path, *, drop_last_layer: bool = True) -> ViTConfig:
        path = Path(path)
        _, kw = _fields(path, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "patch_size"), ("num_channels", "layer_norm_eps", "hidden_act"))
        if drop_last_layer:
            kw["num_hidden_layers"] -= 1
        if kw.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"{path}: hidden_act {kw['hidden_act']!r} not supported")
        return cls(**kw)

    def to_hf_dict(self, *, add_dropped_layer: bool = True, image_size: int | None = None) -> dict:
        """transformers SigLIP vision config. ``image_size`` (patch size x patches per side) sizes upstream's
        position table: without it upstream's SigLIP defaults to 224 px, so a release writes it."""
        extra = {} if image_size is None else {"image_size": image_size}
        return {**extra,
            "model_type": "siglip_vision_model", "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers + (1 if add_dropped_layer else 0),
            "num_attention_heads": self.num_attention_heads, "patch_size": self.patch_size,
            "num_channels": self.num_channels, "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act, "attention_dropout": 0.0,
        }


@dataclass
class BagelConfig:
    """Everything that defines a BAGEL-architecture model (upstream passes the last group in code).

    ``experts`` are the module-name suffixes of the decoder's experts, in order; ``routing`` maps each
    :class:`~ftkit.segments.Functionality` to an expert index; ``vae_tokens_generative`` routes every
    VAE token (clean or noisy) to the last expert, as upstream BAGEL does.
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0
    vae_downsample: int = 8
    latent_channels: int = 16
    experts: tuple[str, ...] = ("", "_moe_gen")
    routing: tuple[int, int, int] = (0, 0, 1)  # linguistic, semantic, generative -> expert index
    vae_tokens_generative: bool = True
    # special token ids (Qwen2.5 values; the fixture's tiny tokenizer has its own)
    bos_id: int = 151644
    eos_id: int = 151645
    start_of_image: int = 151652
    end_of_image: int = 151653

    def __post_init__(self) -> None:
        if isinstance(self.llm, dict):
            self.llm = LLMConfig(**self.llm)
        if isinstance(self.vit, dict):
            self.vit = ViTConfig(**self.vit)
        self.experts = tuple(self.experts)
        self.routing = tuple(int(r) for r in self.routing)
        if len(self.routing) != len(Functionality):
            raise ValueError("routing needs one expert index per functionality (linguistic, semantic, generative)")
        if any(r < 0 or r >= len(self.experts) for r in self.routing):
            raise ValueError(f"routing {self.routing} refers to an expert outside {self.experts}")
        if self.experts[0] != "":
            raise ValueError("expert 0 must be the base ('') expert")

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def vae_stride(self) -> int:
        return self.vae_downsample * self.latent_patch_size

    def pack_config(self) -> dict:
        """The packer geometry of this model: keyword arguments of
        :class:`ftkit.data.packer.PackConfig` (``PackConfig(**cfg.pack_config())``; a dict, because
        models never import data): special-token ids, ViT patch and position-table side, VAE
        downsampling, latent patch and latent position-table side."""
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "start_of_image": self.start_of_image,
                "end_of_image": self.end_of_image, "vit_patch_size": self.vit.patch_size,
                "vit_max_patches_per_side": self.vit_max_num_patch_per_side, "vae_downsample": self.vae_downsample,
                "latent_patch_size": self.latent_patch_size, "max_latent_size": self.max_latent_size}

    def default_image_size(self) -> int:
        """The largest square image (px) the latent position table holds, capped at 1024:
        ``max_latent_size x vae_downsample x latent_patch_size`` (BAGEL-7B-MoT: 64 x 8 x 2 = 1024, upstream's
        default generation size)."""
        return min(1024, self.max_latent_size * self.vae_downsample * self.latent_patch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BagelConfig:
        return cls(**d)

    @staticmethod
    def three_experts(cfg: BagelConfig) -> BagelConfig:
        """The same model with the understanding expert split into linguistic and semantic."""
        d = cfg.to_dict()
        d.update(experts=("", "_moe_sem", "_moe_gen"), routing=(0, 1, 2))
        return BagelConfig.from_dict(d)
