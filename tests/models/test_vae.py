"""FLUX autoencoder bridge (ftkit.models.vae) against the bagel-tiny upstream fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftkit.models.vae import (
    AEConfig,
    FluxAE,
    build_autoencoder,
    diffusers_to_flux_key,
    flux_to_diffusers_key,
    load_ae,
    patchify_latent,
    unpatchify_latent,
)


@pytest.fixture(scope="module")
def ae(fixture_dir) -> FluxAE:
    return load_ae(fixture_dir / "ae.safetensors", AEConfig.from_json(fixture_dir / "ae_config.json"), torch.float32)


@pytest.fixture(scope="module")
def inputs(fixture_dir) -> dict[str, torch.Tensor]:
    return load_file(fixture_dir / "inputs.safetensors")


@pytest.fixture(scope="module")
def expected(fixture_dir) -> dict[str, torch.Tensor]:
    return load_file(fixture_dir / "expected.safetensors")


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_flux_config_is_the_release_shape():
    cfg = AEConfig.flux()
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (128, [1, 2, 4, 4], 2, 16)
    assert (cfg.resolution, cfg.in_channels, cfg.out_ch, cfg.downsample) == (256, 3, 3, 8)
    assert (cfg.scale_factor, cfg.shift_factor) == (0.3611, 0.1159)
    assert cfg.block_out_channels == [128, 256, 512, 512]


def test_from_json_reads_fixture_config(fixture_dir):
    cfg = AEConfig.from_json(fixture_dir / "ae_config.json")
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.downsample) == (
        32,
        [1, 1, 1, 1],
        1,
        16,
        8,
    )


def test_from_json_rejects_bad_files(tmp_path):
    bad = tmp_path / "ae_bad.json"
    bad.write_text(json.dumps({"ch": 32, "channels_typo": 3}))
    with pytest.raises(ValueError, match=r"ae_bad\.json.*channels_typo"):
        AEConfig.from_json(bad)
    bad.write_text(json.dumps({"downsample": 16}))  # 4 levels give 8, not 16
    with pytest.raises(ValueError, match=r"ae_bad\.json.*downsample"):
        AEConfig.from_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"ae_bad\.json"):
        AEConfig.from_json(bad)


# ------------------------------------------------------------------------------------------------
# Parity with upstream (bagel-tiny)
# ------------------------------------------------------------------------------------------------


def test_loaded_module_is_materialised_frozen_fp32(ae):
    params = list(ae.parameters())
    assert params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for p in params)
    assert ae.autoencoder.quant_conv is None and ae.autoencoder.post_quant_conv is None
    assert ae.downsample == 8 and ae.z_channels == 16


def test_encoder_moments_match_upstream(ae, inputs, expected):
    with torch.no_grad():
        moments = ae.encode_moments(inputs["target_image"][None])
    want = expected["vae_encoder_moments"]
    assert moments.shape == (1, 32, 6, 8)
    for row in range(want.shape[0]):  # both rows encode the same target image
        diff = _maxabs(moments[0], want[row])
        assert diff < 1e-5, f"row {row}: max-abs {diff}"


def test_sampled_latent_matches_upstream(ae, inputs, expected):
    x = inputs["target_image"][None].expand(2, -1, -1, -1)
    with torch.no_grad():
        latent = ae.sample_latent(x, eps=inputs["vae_posterior_eps"])
        mean_latent = ae.encode_mean(x[:1])
        zero_eps = ae.sample_latent(x[:1], eps=torch.zeros(1, 16, 6, 8))
    diff = _maxabs(latent, expected["vae_latent"])
    assert diff < 1e-5, f"max-abs {diff}"
    # the two copies get different posterior samples
    assert _maxabs(latent[0], latent[1]) > 1e-2
    # the deterministic variant is the eps = 0 sample
    torch.testing.assert_close(mean_latent, zero_eps, rtol=0, atol=0)
    mean = expected["vae_encoder_moments"][:1, :16]
    assert _maxabs(mean_latent, 0.3611 * (mean - 0.1159)) < 1e-5


def test_sample_latent_draws_from_generator(ae, inputs):
    x = inputs["target_image"][None]
    with torch.no_grad():
        a = ae.sample_latent(x, generator=torch.Generator().manual_seed(3))
        b = ae.sample_latent(x, generator=torch.Generator().manual_seed(3))
        c = ae.sample_latent(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="eps has shape"):
        ae.sample_latent(x, eps=torch.zeros(1, 16, 3, 4))


def test_decode_matches_upstream(ae, expected):
    with torch.no_grad():
        image = ae.decode(expected["vae_latent"][:1])
    diff = _maxabs(image, expected["vae_decoded_target_latent"])
    assert diff < 1e-4, f"max-abs {diff}"


def test_patchify_matches_packed_latents(expected):
    latent, packed = expected["vae_latent"], expected["packed_latent_clean"]
    for i in range(2):
        tokens = patchify_latent(latent[i], p=2)
        assert tokens.shape == (12, 64)
        assert torch.equal(tokens, packed[12 * i : 12 * (i + 1)])
        assert torch.equal(unpatchify_latent(tokens, 6, 8, 2, 16), latent[i])
    # batched form agrees with the per-image form
    assert torch.equal(patchify_latent(latent).reshape(24, 64), packed)
    assert torch.equal(unpatchify_latent(patchify_latent(latent), 6, 8), latent)


def test_patchify_feature_layout_and_errors():
    c, h, w, p = 3, 4, 6, 2
    z = torch.arange(c * h * w, dtype=torch.float32).reshape(c, h, w)
    tokens = patchify_latent(z, p)
    assert tokens.shape == (h // p * w // p, p * p * c)
    for r in range(h // p):
        for col in range(w // p):
            for dy in range(p):
                for dx in range(p):
                    for ch in range(c):
                        assert (
                            tokens[r * (w // p) + col, (dy * p + dx) * c + ch]
                            == z[ch, r * p + dy, col * p + dx]
                        )
    assert torch.equal(unpatchify_latent(tokens, h, w, p, c), z)
    with pytest.raises(ValueError, match="not divisible"):
        patchify_latent(torch.zeros(3, 5, 6), 2)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify_latent(tokens, h, w + 2, p, c)


def test_decode_t2i_final_latent_matches_upstream(ae, expected):
    # 32x48 image -> 4x6 latent -> 2x3 tokens of 2x2 patches
    latent = unpatchify_latent(expected["t2i_full_final_latent"], 4, 6, 2, 16)
    with torch.no_grad():
        image = ae.decode(latent[None])
    diff = _maxabs(image, expected["t2i_full_decoded"])
    assert diff < 1e-4, f"max-abs {diff}"
    # upstream's PIL image: truncation of clamp(x * 0.5 + 0.5, 0, 1) * 255 (allow a one-level flip)
    pixels = (torch.clamp(image[0] * 0.5 + 0.5, 0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
    assert (pixels.int() - expected["t2i_full_image_uint8"].int()).abs().max().item() <= 1


def test_load_casts_to_requested_dtype(fixture_dir, inputs):
    ae16 = load_ae(fixture_dir / "ae.safetensors", AEConfig.from_json(fixture_dir / "ae_config.json"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ae16.parameters())
    with torch.no_grad():
        out = ae16.decode(torch.zeros(1, 16, 2, 2))
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Strict loading: bad files
# ------------------------------------------------------------------------------------------------


def _tiny_config(fixture_dir: Path) -> AEConfig:
    return AEConfig.from_json(fixture_dir / "ae_config.json")


def test_truncated_file_raises_with_name(fixture_dir, tmp_path):
    bad = tmp_path / "cut_ae.safetensors"
    shutil.copy(fixture_dir / "ae.safetensors", bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 5000])
    with pytest.raises(ValueError, match=r"cut_ae\.safetensors.*truncated.*'(en|de)coder\.[\w.]+'"):
        load_ae(bad, _tiny_config(fixture_dir))
    bad.write_bytes(data[:100])  # header itself cut
    with pytest.raises(ValueError, match=r"cut_ae\.safetensors.*truncated"):
        load_ae(bad, _tiny_config(fixture_dir))


def _rewrite(fixture_dir: Path, tmp_path: Path, name: str, edit) -> Path:
    state = load_file(fixture_dir / "ae.safetensors")
    edit(state)
    out = tmp_path / name
    save_file(state, out)
    return out


def test_missing_key_raises(fixture_dir, tmp_path):
    bad = _rewrite(fixture_dir, tmp_path, "missing_ae.safetensors", lambda s: s.pop("decoder.up.2.block.1.conv2.weight"))
    with pytest.raises(
        ValueError,
        match=r"missing_ae\.safetensors.*missing key\(s\): decoder\.up\.2\.block\.1\.conv2\.weight",
    ):
        load_ae(bad, _tiny_config(fixture_dir))


def test_extra_key_raises(fixture_dir, tmp_path):
    def add(state):
        state["encoder.quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
        state["encoder.down.9.block.0.conv1.weight"] = torch.zeros(32, 32, 3, 3)  # level that does not exist

    bad = _rewrite(fixture_dir, tmp_path, "extra_ae.safetensors", add)
    with pytest.raises(ValueError, match=r"extra_ae\.safetensors.*unexpected key\(s\)") as info:
        load_ae(bad, _tiny_config(fixture_dir))
    assert "encoder.quant_conv.weight" in str(info.value)
    assert "encoder.down.9.block.0.conv1.weight" in str(info.value)
    assert "missing" not in str(info.value)


def test_misshaped_key_raises(fixture_dir, tmp_path):
    def reshape(state):
        state["encoder.mid.attn_1.q.weight"] = state["encoder.mid.attn_1.q.weight"].reshape(32, 32)
        state["decoder.conv_in.weight"] = torch.zeros(32, 8, 3, 3)

    bad = _rewrite(fixture_dir, tmp_path, "shape_ae.safetensors", reshape)
    with pytest.raises(ValueError, match=r"shape_ae\.safetensors.*mis-shaped") as info:
        load_ae(bad, _tiny_config(fixture_dir))
    msg = str(info.value)
    assert "encoder.mid.attn_1.q.weight has shape [32, 32], expected [32, 32, 1, 1]" in msg
    assert "decoder.conv_in.weight has shape [32, 8, 3, 3], expected [32, 16, 3, 3]" in msg


def test_wrong_config_for_file_raises(fixture_dir, tmp_path):
    # the release config against the tiny file: key sets differ (the release has 3 decoder res blocks per level, the tiny file 2)
    with pytest.raises(ValueError, match=r"ae\.safetensors.*missing key\(s\): .*block\.2"):
        load_ae(fixture_dir / "ae.safetensors", AEConfig.flux())
    with pytest.raises(ValueError, match=r"nope\.safetensors.*not found"):
        load_ae(tmp_path / "nope.safetensors", _tiny_config(fixture_dir))


# ------------------------------------------------------------------------------------------------
# Real-release compatibility (meta device only; no real FLUX weights are allocated)
# ------------------------------------------------------------------------------------------------


def _flux_checkpoint_shapes(cfg: AEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an ORIGINAL FLUX ``ae.safetensors``, written from the FLUX module structure."""
    out: dict[str, tuple[int, ...]] = {}

    def norm(prefix, c):
        out[f"{prefix}.weight"] = (c,)
        out[f"{prefix}.bias"] = (c,)

    def conv(prefix, cin, cout, k):
        out[f"{prefix}.weight"] = (cout, cin, k, k)
        out[f"{prefix}.bias"] = (cout,)

    def resnet(prefix, cin, cout):
        norm(f"{prefix}.norm1", cin)
        conv(f"{prefix}.conv1", cin, cout, 3)
        norm(f"{prefix}.norm2", cout)
        conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cin, cout, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{name}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    levels = len(cfg.ch_mult)
    conv("encoder.conv_in", cfg.in_channels, cfg.ch, 3)
    in_mult = [1, *cfg.ch_mult]
    for i in range(levels):
        cin, cout = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", cout, cout, 3)
    top = cfg.ch * cfg.ch_mult[-1]
    mid("encoder", top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", top, 2 * cfg.z_channels, 3)

    conv("decoder.conv_in", cfg.z_channels, top, 3)
    mid("decoder", top)
    cin = top
    for i in reversed(range(levels)):
        cout = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cout, cout, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, cfg.out_ch, 3)
    return out


def test_synthetic_flux_layout_reproduces_the_fixture_file(fixture_dir):
    """The FLUX layout writer used below agrees key-for-key and shape-for-shape with upstream's tiny file."""
    from safetensors import safe_open

    with safe_open(str(fixture_dir / "ae.safetensors"), framework="pt") as fh:
        real = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert _flux_checkpoint_shapes(_tiny_config(fixture_dir)) == real


def test_flux_release_layout_converts_onto_meta_model():
    cfg = AEConfig.flux()
    ckpt = _flux_checkpoint_shapes(cfg)
    assert len(ckpt) == 244
    assert ckpt["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert ckpt["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    model = build_autoencoder(cfg, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {}
    for key, shape in ckpt.items():
        new = flux_to_diffusers_key(key, len(cfg.ch_mult))
        assert new is not None, key
        assert diffusers_to_flux_key(new, len(cfg.ch_mult)) == key
        if ".attentions.0." in new and new.endswith("weight") and "group_norm" not in new:
            assert shape[2:] == (1, 1), key
            shape = shape[:2]
        converted[new] = shape
    assert len(converted) == len(ckpt)  # the rename is injective
    assert converted == model_shapes
    # decoder levels are reversed: ldm up.0 (full resolution) is diffusers' last up block
    assert (
        flux_to_diffusers_key("decoder.up.0.block.2.conv1.weight", 4)
        == "decoder.up_blocks.3.resnets.2.conv1.weight"
    )
    assert (
        flux_to_diffusers_key("encoder.mid.attn_1.proj_out.bias", 4)
        == "encoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert flux_to_diffusers_key("encoder.down.0.block.0.shortcut.weight", 4) is None
    assert flux_to_diffusers_key("decoder.up.1.downsample.conv.weight", 4) is None
