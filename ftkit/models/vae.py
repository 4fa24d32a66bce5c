"""FLUX.1 autoencoder bridge for BAGEL: config, strict checkpoint loader and latent helpers.

BAGEL's release ships the FLUX.1 VAE as ``ae.safetensors`` in the ORIGINAL FLUX / ldm key naming
(``encoder.down.{i}.block.{j}.conv1``, ``encoder.mid.attn_1.q``, ``decoder.up.{i}`` ...). ftkit runs it
with diffusers' :class:`~diffusers.AutoencoderKL`, so this module

* describes the autoencoder with :class:`AEConfig` (``AEConfig.flux()`` is the hard-coded release
  shape; ``AEConfig.from_json`` reads the optional ``ae_config.json`` of the tiny fixture),
* renames FLUX keys to diffusers keys (:func:`flux_to_diffusers_key`, :func:`diffusers_to_flux_key`),
* loads the file strictly and without a second full copy (:func:`load_ae`): the model is built on
  the meta device and every parameter is materialised straight from the memory-mapped file,
* wraps the result in :class:`FluxAE` with BAGEL's latent convention

  ``latent = scale * (z - shift)``, ``z = mean + exp(0.5 * logvar) * eps``; decode: ``D(latent / scale + shift)``,

* and provides the 2x2 latent patchify used for VAE tokens (:func:`patchify_latent`,
  :func:`unpatchify_latent`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "AEConfig",
    "FluxAE",
    "build_autoencoder",
    "diffusers_to_flux_key",
    "flux_to_diffusers_key",
    "load_ae",
    "patchify_latent",
    "unpatchify_latent",
]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class AEConfig:
    """Hyper-parameters of a FLUX-style KL autoencoder (field names follow FLUX's ``AutoEncoderParams``).

    Args:
        resolution: nominal training resolution (only stored; inputs of any size divisible by
            ``downsample`` work).
        in_channels: image channels fed to the encoder.
        downsample: spatial reduction factor; must equal ``2 ** (len(ch_mult) - 1)``.
        ch: base channel width; level ``i`` has ``ch * ch_mult[i]`` channels.
        out_ch: image channels produced by the decoder.
        ch_mult: per-level channel multipliers.
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
        z_channels: latent channels; the encoder outputs ``2 * z_channels`` (mean, logvar).
        scale_factor: latent scale ``s`` in ``latent = s * (z - shift)``.
        shift_factor: latent shift.

    Raises:
        ValueError: on non-positive sizes or a ``downsample`` inconsistent with ``ch_mult``.
    """

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        for name in (
            "resolution",
            "in_channels",
            "downsample",
            "ch",
            "out_ch",
            "num_res_blocks",
            "z_channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AEConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(
                f"AEConfig.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}"
            )
        expected = 2 ** (len(self.ch_mult) - 1)
        if self.downsample != expected:
            raise ValueError(
                f"AEConfig.downsample={self.downsample} but ch_mult has {len(self.ch_mult)} levels, "
                f"which downsample by {expected}"
            )
        if self.scale_factor == 0:
            raise ValueError("AEConfig.scale_factor must be non-zero")

    @property
    def block_out_channels(self) -> list[int]:
        """Channel width per level: ``[ch * m for m in ch_mult]``."""
        return [self.ch * m for m in self.ch_mult]

    @classmethod
    def flux(cls) -> AEConfig:
        """The FLUX.1 VAE that the BAGEL release hard-codes (ch 128, ch_mult [1, 2, 4, 4], 2 res blocks)."""
        return cls()

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AEConfig:
        """Read an ``ae_config.json`` (a flat object with the dataclass field names).

        Raises:
            ValueError: if the file is not valid JSON, not an object, has unknown fields or bad values.
                The message names the file.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read autoencoder config: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: autoencoder config must be a JSON object, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown autoencoder config field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Key conversion (FLUX / ldm naming <-> diffusers AutoencoderKL naming)
# --------------------------------------------------------------------------------------------------

_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_PARTS = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}

_RE_BLOCK = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_SAMPLE = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$")
_RE_MID_RES = re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)$")
_RE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$")
_RE_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$")

_RE_D_BLOCK = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$"
)
_RE_D_SAMPLE = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(weight|bias)$"
)
_RE_D_MID_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)$")
_RE_D_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)$")
_RE_D_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)$")


def flux_to_diffusers_key(key: str, num_levels: int) -> str | None:
    """Rename one FLUX/ldm autoencoder key to diffusers ``AutoencoderKL`` naming.

    Rules (``n = num_levels``): ``encoder.down.{i}.block.{j}.X`` -> ``encoder.down_blocks.{i}.resnets.{j}.X``;
    ``decoder.up.{i}.block.{j}.X`` -> ``decoder.up_blocks.{n-1-i}.resnets.{j}.X`` (ldm stores decoder levels
    lowest-resolution-last, diffusers runs them in order); ``nin_shortcut`` -> ``conv_shortcut``;
    ``{down,up}sample.conv`` -> ``{down,up}samplers.0.conv``; ``mid.block_{1,2}`` -> ``mid_block.resnets.{0,1}``;
    ``mid.attn_1.{norm,q,k,v,proj_out}`` -> ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``;
    ``norm_out`` -> ``conv_norm_out``.

    Returns:
        The diffusers key, or ``None`` if ``key`` follows no FLUX autoencoder pattern (the caller
        reports it as unexpected). Level indices are not range-checked here.
    """
    if m := _RE_BLOCK.match(key):
        side, level, j, part, kind = m.groups()
        if part not in _RESNET_PARTS:
            return None
        level = int(level)
        if side == "encoder.down":
            return f"encoder.down_blocks.{level}.resnets.{j}.{_RESNET_PARTS[part]}.{kind}"
        return f"decoder.up_blocks.{num_levels - 1 - level}.resnets.{j}.{_RESNET_PARTS[part]}.{kind}"
    if m := _RE_SAMPLE.match(key):
        side, level, which, kind = m.groups()
        if (side == "encoder.down") != (which == "downsample"):
            return None
        level = int(level)
        if side == "encoder.down":
            return f"encoder.down_blocks.{level}.downsamplers.0.conv.{kind}"
        return f"decoder.up_blocks.{num_levels - 1 - level}.upsamplers.0.conv.{kind}"
    if m := _RE_MID_RES.match(key):
        side, idx, part, kind = m.groups()
        if part not in _RESNET_PARTS:
            return None
        return f"{side}.mid_block.resnets.{int(idx) - 1}.{_RESNET_PARTS[part]}.{kind}"
    if m := _RE_MID_ATTN.match(key):
        side, part, kind = m.groups()
        if part not in _ATTN_PARTS:
            return None
        return f"{side}.mid_block.attentions.0.{_ATTN_PARTS[part]}.{kind}"
    if m := _RE_TOP.match(key):
        side, part, kind = m.groups()
        return f"{side}.{_TOP_PARTS[part]}.{kind}"
    return None


def diffusers_to_flux_key(key: str, num_levels: int) -> str | None:
    """Inverse of :func:`flux_to_diffusers_key` (used to name missing checkpoint keys in errors).

    Returns:
        The FLUX/ldm key, or ``None`` if ``key`` is not an ``AutoencoderKL`` key this bridge knows.
    """
    res_inv = {v: k for k, v in _RESNET_PARTS.items()}
    attn_inv = {v: k for k, v in _ATTN_PARTS.items()}
    top_inv = {v: k for k, v in _TOP_PARTS.items()}
    if m := _RE_D_BLOCK.match(key):
        side, level, j, part, kind = m.groups()
        if part not in res_inv:
            return None
        level = int(level)
        if side == "encoder.down_blocks":
            return f"encoder.down.{level}.block.{j}.{res_inv[part]}.{kind}"
        return f"decoder.up.{num_levels - 1 - level}.block.{j}.{res_inv[part]}.{kind}"
    if m := _RE_D_SAMPLE.match(key):
        side, level, which, kind = m.groups()
        level = int(level)
        if side == "encoder.down_blocks" and which == "downsamplers":
            return f"encoder.down.{level}.downsample.conv.{kind}"
        if side == "decoder.up_blocks" and which == "upsamplers":
            return f"decoder.up.{num_levels - 1 - level}.upsample.conv.{kind}"
        return None
    if m := _RE_D_MID_RES.match(key):
        side, idx, part, kind = m.groups()
        if part not in res_inv:
            return None
        return f"{side}.mid.block_{int(idx) + 1}.{res_inv[part]}.{kind}"
    if m := _RE_D_MID_ATTN.match(key):
        side, part, kind = m.groups()
        if part not in attn_inv:
            return None
        return f"{side}.mid.attn_1.{attn_inv[part]}.{kind}"
    if m := _RE_D_TOP.match(key):
        side, part, kind = m.groups()
        return f"{side}.{top_inv[part]}.{kind}"
    return None


def _is_attn_projection(diffusers_key: str) -> bool:
    """True for the q/k/v/out projection weights that FLUX stores as 1x1 convs and diffusers as Linear."""
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )


def _flux_shape(diffusers_key: str, model_shape: torch.Size) -> tuple[int, ...]:
    """The shape the FLUX file must hold for a diffusers parameter (Linear [C, C] <- conv [C, C, 1, 1])."""
    if _is_attn_projection(diffusers_key):
        return (*model_shape, 1, 1)
    return tuple(model_shape)


# --------------------------------------------------------------------------------------------------
# Model construction and loading
# --------------------------------------------------------------------------------------------------


def build_autoencoder(config: AEConfig, device: torch.device | str | None = None):
    """Build a diffusers ``AutoencoderKL`` shaped like the FLUX autoencoder ``config`` describes.

    Mapping: ``block_out_channels = [ch * m for m in ch_mult]``, ``layers_per_block = num_res_blocks``,
    ``latent_channels = z_channels``, 32 norm groups, SiLU, ``Down/UpDecoderBlock2D`` per level, and no
    ``quant_conv`` / ``post_quant_conv`` (FLUX has neither). Pass ``device="meta"`` to get parameter
    shapes without allocating memory.

    Raises:
        ValueError: if a level's channel count is not divisible by the 32 GroupNorm groups.
    """
    from diffusers import AutoencoderKL

    for c in config.block_out_channels:
        if c % 32:
            raise ValueError(f"AEConfig: level width {c} (ch * ch_mult) is not divisible by 32 norm groups")
    levels = len(config.ch_mult)
    kwargs = dict(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.num_res_blocks,
        act_fn="silu",
        latent_channels=config.z_channels,
        norm_num_groups=32,
        sample_size=config.resolution,
        scaling_factor=config.scale_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    if device is None:
        return AutoencoderKL(**kwargs)
    with torch.device(device):
        return AutoencoderKL(**kwargs)


def _check_safetensors_header(path: Path) -> list[str]:
    """Validate the safetensors header by hand and return its tensor names.

    safetensors' own errors on a cut file do not say which tensors are affected; this names them.

    Raises:
        ValueError: naming ``path`` (and the tensors whose data lies past the end of the file).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file (only {size} bytes, header length missing)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(
                    f"{path}: truncated or corrupt safetensors file: header claims {n} bytes, file has {size}"
                )
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    names, past_end = [], []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        names.append(name)
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ValueError(f"{path}: tensor {name!r} has no valid data_offsets in the header")
        if offsets[1] > data_len:
            past_end.append(name)
    if past_end:
        raise ValueError(
            f"{path}: truncated safetensors file ({size} bytes): data of {len(past_end)} tensor(s) lies past "
            f"the end of the file, e.g. {sorted(past_end)[:5]}"
        )
    return names


def _fmt_keys(keys: list[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_ae(
    path: str | os.PathLike,
    config: AEConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    freeze: bool = True,
) -> FluxAE:
    """Load a FLUX-naming ``ae.safetensors`` strictly into a diffusers ``AutoencoderKL`` wrapped as :class:`FluxAE`.

    The model is built on the meta device; each tensor is read from the memory-mapped file
    (``safe_open``), renamed, reshaped (attention 1x1 conv ``[C, C, 1, 1]`` -> Linear ``[C, C]``), cast
    to ``dtype``, moved to ``device`` and assigned as the parameter, so no second full copy exists.

    Args:
        path: the ``ae.safetensors`` file.
        config: autoencoder shape; ``None`` means :meth:`AEConfig.flux` (what the release uses).
        dtype: parameter dtype (the file's dtype is cast).
        device: parameter device.
        freeze: if True (default) parameters get ``requires_grad=False`` and the module is put in eval
            mode (BAGEL never trains the VAE).

    Returns:
        The loaded :class:`FluxAE`.

    Raises:
        ValueError: naming the file and the key(s) when the file is missing, truncated or not
            safetensors, when checkpoint keys are unexpected (match no model parameter), when model
            parameters are missing from the file, or when a tensor has the wrong shape.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config = config if config is not None else AEConfig.flux()
    if not path.is_file():
        raise ValueError(f"{path}: autoencoder checkpoint not found")
    file_keys = _check_safetensors_header(path)

    model = build_autoencoder(config, device="meta")
    levels = len(config.ch_mult)
    model_shapes = {k: v.shape for k, v in model.state_dict().items()}

    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for key in file_keys:
        new = flux_to_diffusers_key(key, levels)
        if new is None or new not in model_shapes or new in mapping.values():
            unexpected.append(key)
        else:
            mapping[key] = new
    filled = set(mapping.values())
    missing = [diffusers_to_flux_key(k, levels) or k for k in model_shapes if k not in filled]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing key(s): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s): {_fmt_keys(unexpected)}")
        raise ValueError(
            f"{path}: does not match the FLUX autoencoder config (ch={config.ch}, ch_mult={config.ch_mult}, "
            f"num_res_blocks={config.num_res_blocks}, z_channels={config.z_channels}): " + "; ".join(parts)
        )

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            bad_shapes = []
            for key, new in mapping.items():
                want = _flux_shape(new, model_shapes[new])
                have = tuple(fh.get_slice(key).get_shape())
                if have != want:
                    bad_shapes.append(f"{key} has shape {list(have)}, expected {list(want)}")
            if bad_shapes:
                raise ValueError(f"{path}: mis-shaped key(s): " + "; ".join(bad_shapes[:10]))
            for key, new in mapping.items():
                tensor = fh.get_tensor(key)
                if _is_attn_projection(new):
                    tensor = tensor.reshape(model_shapes[new])
                state[new] = tensor.to(device=device, dtype=dtype)
    except SafetensorError as err:
        raise ValueError(f"{path}: cannot read safetensors file: {err}") from err
    model.load_state_dict(state, strict=True, assign=True)
    del state
    ae = FluxAE(model, config)
    if freeze:
        ae.requires_grad_(False)
        ae.eval()
    return ae


# --------------------------------------------------------------------------------------------------
# Wrapper with BAGEL's latent convention
# --------------------------------------------------------------------------------------------------


class FluxAE(nn.Module):
    """FLUX autoencoder with BAGEL's latent scaling.

    Math (``s = scale_factor``, ``b = shift_factor``, ``E``/``D`` the encoder/decoder)::

        [mean, logvar] = E(x)                       # raw, no logvar clamp
        z      = mean + exp(0.5 * logvar) * eps     # eps ~ N(0, I)
        latent = s * (z - b)
        x_hat  = D(latent / s + b)                  # no output clamp

    Args:
        autoencoder: a diffusers ``AutoencoderKL`` without quant convs (see :func:`build_autoencoder`).
        config: the matching :class:`AEConfig`.
    """

    def __init__(self, autoencoder: nn.Module, config: AEConfig):
        super().__init__()
        self.autoencoder = autoencoder
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return self._param_dtype()

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each axis (8 for FLUX)."""
        return self.config.downsample

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    def _param_dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output ``[B, 2*z, H/8, W/8]``: channels ``[:z]`` are the mean, ``[z:]`` the log-variance.

        Args:
            x: images ``[B, in_channels, H, W]`` in [-1, 1], ``H`` and ``W`` divisible by ``downsample``.

        Raises:
            ValueError: on a wrong rank, channel count or a size not divisible by ``downsample``.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"encode expects [B, {self.config.in_channels}, H, W] images, got {list(x.shape)}"
            )
        if x.shape[-2] % self.downsample or x.shape[-1] % self.downsample:
            raise ValueError(f"image size {list(x.shape[-2:])} is not divisible by {self.downsample}")
        moments = self.autoencoder.encoder(x.to(self._param_dtype()))
        if self.autoencoder.quant_conv is not None:  # never for FLUX; kept for AutoencoderKL built elsewhere
            moments = self.autoencoder.quant_conv(moments)
        return moments

    def sample_latent(
        self,
        x: torch.Tensor,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Posterior sample in BAGEL latent space: ``s * ((mean + exp(0.5*logvar) * eps) - b)``.

        Args:
            x: images ``[B, C, H, W]``.
            eps: standard-normal noise ``[B, z, H/8, W/8]``; drawn with ``generator`` when ``None``.
            generator: RNG for ``eps`` (ignored when ``eps`` is given).

        Raises:
            ValueError: if ``eps`` has the wrong shape.
        """
        mean, logvar = self.encode_moments(x).chunk(2, dim=1)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        elif eps.shape != mean.shape:
            raise ValueError(f"eps has shape {list(eps.shape)}, expected {list(mean.shape)}")
        z = mean + torch.exp(0.5 * logvar) * eps.to(mean)
        return self.scale_factor * (z - self.shift_factor)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (posterior mean): ``s * (mean - b)``."""
        mean, _ = self.encode_moments(x).chunk(2, dim=1)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode BAGEL latents ``[B, z, h, w]`` to images ``[B, out_ch, 8h, 8w]`` (not clamped).

        Raises:
            ValueError: on a wrong rank or channel count.
        """
        if latent.ndim != 4 or latent.shape[1] != self.z_channels:
            raise ValueError(f"decode expects [B, {self.z_channels}, h, w] latents, got {list(latent.shape)}")
        z = latent.to(self._param_dtype()) / self.scale_factor + self.shift_factor
        if self.autoencoder.post_quant_conv is not None:
            z = self.autoencoder.post_quant_conv(z)
        return self.autoencoder.decoder(z)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`decode`."""
        return self.decode(latent)


# --------------------------------------------------------------------------------------------------
# Latent <-> token helpers
# --------------------------------------------------------------------------------------------------


def patchify_latent(z: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Cut a latent into ``p x p`` patch tokens.

    ``z [C, h, w] -> tokens [(h/p) * (w/p), p*p*C]`` with token ``r * (w/p) + c`` (raster order) and
    feature ``(dy * p + dx) * C + ch`` = ``z[ch, r*p + dy, c*p + dx]``. A leading batch dim
    (``[B, C, h, w] -> [B, N, p*p*C]``) is also accepted.

    Raises:
        ValueError: if ``z`` is not 3-D/4-D or ``h``/``w`` are not divisible by ``p``.
    """
    if z.ndim not in (3, 4):
        raise ValueError(f"patchify_latent expects [C, h, w] or [B, C, h, w], got {list(z.shape)}")
    if p <= 0:
        raise ValueError(f"patch size must be positive, got {p}")
    c, h, w = z.shape[-3:]
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
    lead = z.shape[:-3]
    x = z.reshape(*lead, c, h // p, p, w // p, p)
    n = len(lead)
    # (..., C, gh, dy, gw, dx) -> (..., gh, gw, dy, dx, C)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int = 2, C: int = 16) -> torch.Tensor:
    """Inverse of :func:`patchify_latent`: ``tokens [(h/p)*(w/p), p*p*C] -> z [C, h, w]``.

    ``h`` and ``w`` are LATENT sizes (image size / 8), not token-grid sizes. A leading batch dim is
    accepted (``[B, N, p*p*C] -> [B, C, h, w]``).

    Raises:
        ValueError: if the token count or feature width does not match ``h, w, p, C``.
    """
    if tokens.ndim not in (2, 3):
        raise ValueError(f"unpatchify_latent expects [N, D] or [B, N, D] tokens, got {list(tokens.shape)}")
    if p <= 0 or h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    n_tok, dim = tokens.shape[-2:]
    if n_tok != gh * gw or dim != p * p * C:
        raise ValueError(
            f"tokens {list(tokens.shape)} do not fit a {C}x{h}x{w} latent with patch {p}: "
            f"expected [{gh * gw}, {p * p * C}]"
        )
    lead = tokens.shape[:-2]
    n = len(lead)
    x = tokens.reshape(*lead, gh, gw, p, p, C)
    # (..., gh, gw, dy, dx, C) -> (..., C, gh, dy, gw, dx)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)
    return x.reshape(*lead, C, h, w)
