"""ftkit.models.folders: folder detection, the config (and packer geometry) of every folder kind, dtype
names; loading.fill_from_safetensors over several sources (the path FoX loads through)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftkit.data.packer import PackConfig
from ftkit.models.bagel import BagelModel
from ftkit.models.config import BagelConfig
from ftkit.models.folders import (
    DTYPES,
    FOX_MODEL_TYPE,
    detect_model_folder,
    dtype_bytes,
    is_fox_folder,
    parse_dtype,
    read_model_config,
)
from ftkit.models.loading import (
    CheckpointError,
    SafetensorsFile,
    WeightFile,
    fill_from_safetensors,
    is_quantizable,
    load_bagel,
)
from ftkit.models.release import build_random_bagel, save_bagel, tiny_ae_config, tiny_bagel_config
from ftkit.testing import pack_config_for

SPECIALS = dict(bos_id=401, eos_id=402, start_of_image=403, end_of_image=404)  # the fixture tokenizer's


@pytest.fixture(scope="module")
def release(tmp_path_factory, fixture_dir):
    """A tiny BAGEL release folder (3-level autoencoder: downsampling 4, not FLUX's 8) and its sharded twin."""
    cfg = tiny_bagel_config(vocab_size=448, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=48,
                            vit_hidden=16, vit_layers=1, vit_heads=2, vit_intermediate=24, max_latent_size=6,
                            vit_max=5, special_ids=SPECIALS)
    cfg.vae_downsample = 4
    ref = build_random_bagel(cfg, tiny_ae_config(ch=32, levels=3), seed=3).eval()
    root = tmp_path_factory.mktemp("folders")
    single = save_bagel(ref, root / "single", tokenizer_dir=fixture_dir, dtype=torch.float32)
    sharded = save_bagel(ref, root / "sharded", tokenizer_dir=fixture_dir, dtype=torch.float32)
    sd = load_file(str(sharded / "ema.safetensors"))
    keys, wmap = sorted(sd), {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in keys[i::2]}, str(sharded / name))
        wmap.update({k: name for k in keys[i::2]})
    (sharded / "ema.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return ref, single, sharded


def test_detects_each_folder_kind(release, tmp_path):
    _, single, sharded = release
    assert detect_model_folder(single) == "bagel" and detect_model_folder(sharded) == "bagel-sharded"
    fox = tmp_path / "fox"
    fox.mkdir()
    (fox / "config.json").write_text(json.dumps({"model_type": FOX_MODEL_TYPE}))
    assert detect_model_folder(fox) == "fox" and is_fox_folder(fox) and not is_fox_folder(single)
    (fox / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=r"fox/config.json: field model_type is 'qwen2'"):
        detect_model_folder(fox)
    assert not is_fox_folder(fox)
    (fox / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"fox/config.json: not valid JSON"):
        detect_model_folder(fox)
    with pytest.raises(FileNotFoundError, match=r"nowhere: model folder not found"):
        detect_model_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"empty: not a model folder"):
        (tmp_path / "empty").mkdir()
        detect_model_folder(tmp_path / "empty")


def test_config_and_geometry_equal_for_single_and_sharded_folders(release):
    ref, single, sharded = release
    a, b = read_model_config(single), read_model_config(sharded)
    assert a == b
    assert a.pack_config() == b.pack_config() == ref.cfg.pack_config()
    geo = PackConfig(**a.pack_config())
    assert geo == pack_config_for(ref.cfg)
    # read from the folder, nothing defaulted: ViT / latent tables, the autoencoder's downsampling, specials
    assert (geo.vit_max_patches_per_side, geo.max_latent_size, geo.vae_downsample, geo.vae_stride) == (5, 6, 4, 8)
    assert (geo.bos_id, geo.end_of_image) == (401, 404)
    # the loader uses the same config
    assert load_bagel(sharded, dtype=torch.float32).cfg == a


def test_fox_folder_config_comes_from_its_config_json(tmp_path):
    cfg = tiny_bagel_config(vocab_size=64, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32,
                            max_latent_size=7, vit_max=9, special_ids=SPECIALS)
    cfg.vae_downsample = 16
    (tmp_path / "config.json").write_text(json.dumps({"model_type": FOX_MODEL_TYPE, "format_version": 1,
                                                      "bagel_config": cfg.to_dict()}))
    got = read_model_config(tmp_path)
    assert got == BagelConfig.from_dict(cfg.to_dict())
    assert PackConfig(**got.pack_config()).vae_stride == 32
    (tmp_path / "config.json").write_text(json.dumps({"model_type": FOX_MODEL_TYPE, "format_version": 1}))
    with pytest.raises(ValueError, match=r"config.json: missing field 'bagel_config'"):
        read_model_config(tmp_path)


def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    assert dtype_bytes("bf16") == 2 and dtype_bytes("fp32") == 4
    assert set(DTYPES) >= {"fp32", "bf16", "fp16"}
    with pytest.raises(ValueError, match=r"dtype 'int4': choose one of fp32, float32, bf16"):
        parse_dtype("int4")


# ------------------------------------------------------------------ fill_from_safetensors with sources


def _sources(model, path, rename=None):
    wf = WeightFile(SafetensorsFile(path), str(path))
    rename = rename or {}
    return {k: (wf, rename.get(k, k), None) for k in model.state_dict()}


def test_sources_fill_equals_path_fill_and_nf4_uses_row_blocks(release, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import ftkit.models.loading as L

    ref, single, _ = release
    ema = single / "ema.safetensors"
    with torch.device("meta"):
        a, b = BagelModel(ref.cfg), BagelModel(ref.cfg)
    fill_from_safetensors(a, ema, dtype=torch.float32)
    fill_from_safetensors(b, sources=_sources(b, ema), dtype=torch.float32)
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())

    blocks = []
    real = L.nf4_quantize_rows

    def spy(it, shape, dtype, blocksize=64):
        rows = list(it)
        blocks.append(len(rows))
        return real(iter(rows), shape, dtype, blocksize)

    monkeypatch.setattr(L, "nf4_quantize_rows", spy)
    monkeypatch.setattr(L, "_NF4_ROWS_BYTES", 256)  # several row blocks per weight
    with torch.device("meta"):
        q = BagelModel(ref.cfg)
    fill_from_safetensors(q, sources=_sources(q, ema), dtype=torch.float32, quantize="nf4")
    n_quant = len({k.rsplit(".", 1)[0] for k in ref.state_dict() if is_quantizable(k)})
    assert len(blocks) == n_quant and max(blocks) > 1
    lin = q.language_model.model.layers[0].self_attn.q_proj
    w = ref.language_model.model.layers[0].self_attn.q_proj.weight
    import bitsandbytes as bnb

    want = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                             quant_storage=torch.uint8)._quantize("cpu")
    assert torch.equal(lin.weight.data, want.data)  # bit-identical to quantizing the whole weight


def test_sources_errors_name_each_file(release, tmp_path):
    ref, single, _ = release
    ema = single / "ema.safetensors"
    with torch.device("meta"):
        m = BagelModel(ref.cfg)
    src = _sources(m, ema, rename={"connector.fc1.bias": "connector.fc1.nope"})
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: missing keys \(1\): connector\.fc1\.nope.*"
                                              r"ema\.safetensors: unexpected keys \(1\): connector\.fc1\.bias"):
        fill_from_safetensors(m, sources=src, dtype=torch.float32)
    src = _sources(m, ema, rename={"connector.fc1.bias": "connector.fc2.bias"})
    src["connector.fc2.bias"] = (src["connector.fc2.bias"][0], "connector.fc1.bias", None)
    with torch.device("meta"):
        m2 = BagelModel(ref.cfg)
    # a swap of two same-shaped tensors is the user's choice; shapes are checked, and names used once each
    fill_from_safetensors(m2, sources=src, dtype=torch.float32)
    assert torch.equal(m2.connector.fc1.bias, ref.connector.fc2.bias)
    with pytest.raises(ValueError, match="either path or sources"):
        fill_from_safetensors(m2, dtype=torch.float32)
