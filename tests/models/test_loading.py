"""Loading BAGEL release folders: save -> load round trip of a second tiny configuration, NF4 / int8
loading with a LoRA training step on CPU, the plain-read safetensors path, and bad input."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import ftkit.models.loading as L
from ftkit.data.packer import pack
from ftkit.models.loading import CheckpointError, SafetensorsFile, fill_from_safetensors, load_bagel
from ftkit.models.release import build_random_bagel, save_bagel, tiny_ae_config, tiny_bagel_config
from ftkit.segments import Kind, Segment
from ftkit.testing import pack_config_for

SPECIALS = dict(bos_id=401, eos_id=402, start_of_image=403, end_of_image=404)  # the fixture tokenizer's


def second_config():
    """Other sizes than the fixture: hidden 48, 3 layers, 6 heads (head_dim 8), 2 KV heads, ViT 24 wide."""
    return tiny_bagel_config(vocab_size=448, hidden=48, layers=3, heads=6, kv_heads=2, intermediate=80,
                             vit_hidden=24, vit_layers=2, vit_heads=3, vit_intermediate=40, max_latent_size=6,
                             vit_max=6, special_ids=SPECIALS)


def segments(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def img(h, w):
        return torch.rand(3, h, w, generator=g) * 2 - 1

    s1 = [Segment(Kind.TEXT, text_ids=[5, 17, 33, 60]),
          Segment(Kind.VIT_IMAGE, image=img(28, 70)),
          Segment(Kind.TEXT, text_ids=[70, 71, 72], loss=True, end_label=403),
          Segment(Kind.VAE_CLEAN, image=img(32, 80)),
          Segment(Kind.TEXT, text_ids=[90, 91]),
          Segment(Kind.VAE_NOISY, image=img(48, 16), loss=True, timestep_logit=0.3)]
    s2 = [Segment(Kind.TEXT, text_ids=[7, 8, 9], loss=True),
          Segment(Kind.VAE_NOISY, image=img(32, 80), loss=True, timestep_logit=-0.7)]
    return [s1, s2]


def flow_inputs(batch, ae_channels: int = 16, patch_dim: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.vae_token_indexes.numel(), patch_dim, generator=g)
    eps = [torch.randn(ae_channels, im.shape[1] // 8, im.shape[2] // 8, generator=g) for im in batch.vae_images]
    return dict(flow_noise=noise, vae_posterior_eps=eps)


def perturb(model, seed: int = 3):
    """Non-trivial values everywhere (init zeroes biases / llm2vae and sets norms to one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("pos_embed"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fixture_dir):
    """A second tiny configuration, saved in fp32 (so the round trip must be exact) with a tokenizer."""
    ref = perturb(build_random_bagel(second_config(), tiny_ae_config(ch=32, levels=4), seed=11)).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "bagel-second"
    save_bagel(ref, folder, tokenizer_dir=fixture_dir, dtype=torch.float32)
    batch = pack(segments(), pack_config_for(ref.cfg))
    return ref, folder, batch, flow_inputs(batch)


def broken_copy(saved, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(saved[1], out)
    return out


# ----------------------------------------------------------------------------- round trip

def test_round_trip_identical_outputs(saved):
    ref, folder, batch, fl = saved
    model = load_bagel(folder, dtype=torch.float32)
    assert model.cfg.llm == ref.cfg.llm and model.cfg.vit == ref.cfg.vit
    assert (model.cfg.max_latent_size, model.cfg.vit_max_num_patch_per_side) == (6, 6)
    assert (model.cfg.bos_id, model.cfg.end_of_image) == (401, 404)  # read from the tokenizer files
    assert len(batch.vae_images) == 3 and batch.vit_tokens.shape[0] == 2 * 5 and batch.mse_indexes.numel() > 0
    with torch.no_grad():
        a = ref(batch, return_logits=True, **fl)
        b = model(batch, return_logits=True, **fl)
        ids = torch.tensor([[401, 5, 17, 33, 402], [401, 70, 71, 72, 9]])
        ta, tb = ref.text_logits(ids), model.text_logits(ids)
    for name in ("llm_input", "hidden", "ce_logits", "velocity_pred", "velocity_target"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("vit_last_hidden", "packed_noisy_latent", "timestep_embeds"):
        assert torch.equal(a.extras[name], b.extras[name]), name
    assert a.velocity_pred.abs().max() > 0 and a.ce_logits.shape[0] == batch.ce_indexes.numel()
    assert torch.equal(ta, tb) and ta.shape == (2, 5, 448)


def test_nothing_left_uninitialised_and_all_match_the_files(saved):
    _, folder, _, _ = saved
    model = load_bagel(folder, dtype=torch.float32)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    sd = load_file(str(folder / "ema.safetensors"))
    mine = model.release_state_dict()
    assert sd.keys() == mine.keys()
    for k, v in sd.items():
        assert torch.equal(mine[k], v), k
    ae = load_file(str(folder / "ae.safetensors"))
    assert torch.equal(model.vae.autoencoder.encoder.conv_in.weight, ae["encoder.conv_in.weight"])
    assert not any(p.requires_grad for p in model.parameters())


def test_bf16_load_reads_the_file_values(saved):
    _, folder, _, _ = saved
    model = load_bagel(folder, dtype=torch.bfloat16, load_vae=False)
    sd = load_file(str(folder / "ema.safetensors"))
    assert model.vae is None and model.dtype == torch.bfloat16
    for k, v in model.release_state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, sd[k].to(torch.bfloat16)), k


# ----------------------------------------------------------------------------- the plain-read reader

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_reader_reads_in_pieces_and_casts(tmp_path, monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 29, generator=g).to(dtype), "b": torch.arange(11, dtype=torch.int64),
               "c": torch.randn((), generator=g).to(dtype), "d": torch.zeros(0, 4, dtype=dtype)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(L, "_PIECE", 64)  # many pieces per tensor, read by several threads
    with SafetensorsFile(tmp_path / "x.safetensors") as st:
        assert sorted(st.keys()) == ["a", "b", "c", "d"] and st.shape("a") == (37, 29)
        for k, v in tensors.items():
            assert torch.equal(st.read(k), v), k
        assert torch.equal(st.read("a", torch.float64), tensors["a"].double())
        rows = list(st.iter_rows("a", 8, torch.float32))
        assert [r for r, _ in rows] == [0, 8, 16, 24, 32]
        assert torch.equal(torch.cat([t for _, t in rows]), tensors["a"].float())


def test_nf4_row_blocks_bit_identical_to_bitsandbytes():
    import bitsandbytes as bnb

    w = (torch.randn(37, 224) * 0.02).to(torch.bfloat16)  # 224 = 3.5 quantization blocks per row
    ref = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                            quant_storage=torch.uint8)._quantize("cpu")
    rows = L.nf4_rows_per_block(tuple(w.shape), 2, budget=1000)
    assert rows % 2 == 0 and rows < 37  # several blocks, each a whole number of 64-value blocks
    got = L.nf4_quantize_rows(((r, w[r:r + rows]) for r in range(0, 37, rows)), tuple(w.shape), torch.bfloat16)
    a, b = ref.quant_state, got.quant_state
    assert torch.equal(ref.data, got.data) and torch.equal(a.absmax, b.absmax) and torch.equal(a.offset, b.offset)
    assert torch.equal(a.state2.absmax, b.state2.absmax) and a.shape == b.shape and a.dtype == b.dtype
    with pytest.raises(ValueError, match="row block at row 1"):
        L.nf4_quantize_rows([(0, w[:1]), (1, w[1:])], tuple(w.shape), torch.bfloat16)


# ----------------------------------------------------------------------------- quantized loading

def _cos(a, b):
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_nf4_load_forward_backward_with_lora(saved, monkeypatch):
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    ref, folder, batch, fl = saved
    monkeypatch.setattr(L, "_NF4_ROWS_BYTES", 4096)  # decoder weights quantized in several row blocks
    model = load_bagel(folder, dtype=torch.float32, quantize="nf4")
    cfg = model.cfg
    q4 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(q4) == cfg.llm.num_hidden_layers * len(cfg.experts) * 7  # q k v o gate up down, both experts
    assert all(n.startswith("language_model.model.layers.") for n in q4)
    assert any(n.endswith("q_proj_moe_gen") for n in q4) and any(n.endswith("mlp_moe_gen.down_proj") for n in q4)
    assert all(m.support_avx512bf16_for_cpu is False for m in q4.values())
    # the 4-bit weights are exactly what bitsandbytes makes of the file's tensor
    sd = load_file(str(folder / "ema.safetensors"))
    k = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    whole = bnb.nn.Params4bit(sd[k], requires_grad=False, quant_type="nf4", compress_statistics=True,
                              quant_storage=torch.uint8)._quantize("cpu")
    assert torch.equal(model.get_submodule(k[:-7]).weight.data, whole.data)
    # everything else stays unquantized in the compute dtype
    for n, p in model.named_parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            assert p.dtype == torch.float32, n
    for n in ("language_model.model.embed_tokens", "language_model.lm_head", "connector.fc1", "vae2llm", "llm2vae",
              "vit_model.vision_model.encoder.layers.0.self_attn.q_proj", "time_embedder.mlp.0"):
        assert type(model.get_submodule(n)).__module__.startswith("torch.nn"), n

    # eval no-grad forward first: bnb's CPU path would repack the 4-bit weights here and break training
    model.eval()
    with torch.no_grad():
        q = model(batch, return_logits=True, **fl)
        full = ref(batch, return_logits=True, **fl)
    assert _cos(q.hidden, full.hidden) > 0.95  # the 4-bit decoder stays close to the full-precision model

    # the decoder's q/v projections of both experts (a regex: the ViT has q_proj/v_proj too)
    targets = r"language_model\.model\.layers\.\d+\.self_attn\.(q_proj|v_proj)(_moe_gen)?"
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                                    model)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 4 * cfg.llm.num_hidden_layers  # A and B for 4 targets per layer
    assert any("q_proj_moe_gen.lora_B" in n for n in lora) and not [n for n in lora if n.startswith("vit_model.")]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    with torch.no_grad():
        ev = model(batch, return_logits=True, **fl)
    assert not torch.allclose(ev.hidden, q.hidden, atol=1e-3)  # the (random) adapters act

    model.train()
    out = model(batch, return_logits=True, **fl)
    assert torch.allclose(out.hidden, ev.hidden, atol=1e-5)
    loss = F.cross_entropy(out.ce_logits, batch.ce_labels) + F.mse_loss(out.velocity_pred, out.velocity_target)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in lora.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    for m in q4.values():
        assert m.weight.grad is None and not m.weight.requires_grad


def test_int8_load_runs_forward(saved):
    import bitsandbytes as bnb

    ref, folder, batch, fl = saved
    model = load_bagel(folder, dtype=torch.float32, quantize="int8")
    q8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(q8) == model.cfg.llm.num_hidden_layers * 2 * 7 and q8[0].weight.dtype == torch.int8
    assert model.language_model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(batch, return_logits=True, **fl)
        full = ref(batch, return_logits=True, **fl)
    assert torch.isfinite(out.hidden).all() and _cos(out.hidden, full.hidden) > 0.9


def test_unknown_quantize_mode(saved):
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_bagel(saved[1], dtype=torch.float32, quantize="fp4")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", ["llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"])
def test_missing_file(saved, tmp_path, name):
    folder = broken_copy(saved, tmp_path)
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        load_bagel(folder, dtype=torch.float32)


def test_missing_folder_points_to_the_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="ByteDance-Seed/BAGEL-7B-MoT"):
        load_bagel(tmp_path / "nope")


def _rewrite_ema(folder, edit):
    sd = load_file(str(folder / "ema.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "ema.safetensors"))


def test_missing_key(saved, tmp_path):
    folder = broken_copy(saved, tmp_path)
    _rewrite_ema(folder, lambda sd: sd.pop("language_model.model.layers.2.self_attn.k_norm_moe_gen.weight"))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors.*missing keys \(1\): "
                                              r"language_model\.model\.layers\.2\.self_attn\.k_norm_moe_gen\.weight"):
        load_bagel(folder, dtype=torch.float32)


def test_unexpected_key(saved, tmp_path):
    folder = broken_copy(saved, tmp_path)
    _rewrite_ema(folder, lambda sd: sd.update({"language_model.model.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors.*unexpected keys \(1\): "
                                              r"language_model\.model\.extra_head\.weight"):
        load_bagel(folder, dtype=torch.float32)


def test_misshaped_key(saved, tmp_path):
    folder = broken_copy(saved, tmp_path)
    _rewrite_ema(folder, lambda sd: sd.update({"connector.fc1.weight": sd["connector.fc1.weight"][:, :-1].clone()}))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: mis-shaped keys.*connector\.fc1\.weight \[48, 23\] "
                                              r"\(model expects \[48, 24\]\)"):
        load_bagel(folder, dtype=torch.float32)


@pytest.mark.parametrize("field,value,expect", [
    ("hidden_size", 60, r"mis-shaped keys.*language_model\.model\.embed_tokens\.weight \[448, 48\] "
                        r"\(model expects \[448, 60\]\)"),
    ("intermediate_size", 96, r"mis-shaped keys.*mlp\.down_proj\.weight"),
    ("num_hidden_layers", 2, r"unexpected keys \(\d+\): language_model\.model\.layers\.2\."),
    ("num_hidden_layers", 4, r"missing keys \(\d+\): language_model\.model\.layers\.3\."),
])
def test_config_contradicting_weights(saved, tmp_path, field, value, expect):
    folder = broken_copy(saved, tmp_path)
    cfg = json.loads((folder / "llm_config.json").read_text())
    cfg[field] = value
    (folder / "llm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors.*" + expect):
        load_bagel(folder, dtype=torch.float32)


def test_truncated_ema(saved, tmp_path):
    folder = broken_copy(saved, tmp_path)
    path = folder / "ema.safetensors"
    st = SafetensorsFile(path)
    last = max(st.keys(), key=st.offset)  # the tensor stored last loses its tail
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match=rf"ema\.safetensors: truncated: {size - 100} bytes on disk.*"
                                              rf"{last.replace('.', r'[.]')}"):
        load_bagel(folder, dtype=torch.float32)
    with open(path, "r+b") as fh:  # cut inside the header: no tensor can be named, the file still is
        fh.truncate(50)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: cannot read safetensors file.*truncated or corrupt"):
        load_bagel(folder, dtype=torch.float32)


def test_truncated_ae(saved, tmp_path):
    folder = broken_copy(saved, tmp_path)
    path = folder / "ae.safetensors"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 10)
    with pytest.raises(ValueError, match=r"ae\.safetensors: truncated"):
        load_bagel(folder, dtype=torch.float32)


def test_corrupt_header_entry(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "x.safetensors"))
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"shape":[4,4]', b'"shape":[4,5]')
    (tmp_path / "x.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"x\.safetensors: key w: data_offsets \[0, 64\] do not hold"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_tensor_left_on_meta_is_an_error(saved):
    _, folder, _, _ = saved
    from ftkit.models.bagel import BagelModel

    with torch.device("meta"):
        model = BagelModel(second_config())
    model.connector.register_buffer("scratch", torch.empty(3, device="meta"), persistent=False)  # not in any file
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: model tensors not filled.*connector\.scratch"):
        fill_from_safetensors(model, folder / "ema.safetensors", dtype=torch.float32)
    assert not math.isnan(model.connector.fc1.weight.sum().item())  # the rest was read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_matches_cpu(saved):
    """The staged read to a GPU gives the same tensors; NF4 is quantized on the GPU and runs."""
    import bitsandbytes as bnb

    ref, folder, batch, fl = saved
    cpu = load_bagel(folder, dtype=torch.float32, load_vae=False)
    gpu = load_bagel(folder, dtype=torch.float32, device="cuda", load_vae=False)
    for k, v in cpu.release_state_dict().items():
        assert torch.equal(gpu.release_state_dict()[k].cpu(), v), k
    q = load_bagel(folder, dtype=torch.bfloat16, quantize="nf4", device="cuda")
    lin = q.language_model.model.layers[0].mlp.up_proj
    assert isinstance(lin, bnb.nn.Linear4bit) and lin.weight.device.type == "cuda"
    w = cpu.language_model.model.layers[0].mlp.up_proj.weight
    deq = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float().cpu()
    assert (deq - w).abs().max() <= 0.2 * w.abs().max()
    with torch.no_grad():
        out = q(batch, return_logits=True, **fl)
    assert torch.isfinite(out.hidden.float()).all()


def _shard(folder, n_shards: int = 3):
    """Rewrite ema.safetensors as shards + model.safetensors.index.json (as `ftkit merge` writes)."""
    import json

    sd = load_file(str(folder / "ema.safetensors"))
    keys = sorted(sd)
    wmap = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n_shards]}
        save_file(part, str(folder / name))
        wmap.update({k: name for k in part})
    (folder / "ema.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return wmap


def test_sharded_folder_loads_identically(saved, tmp_path):
    ref, _, batch, flow = saved
    folder = broken_copy(saved, tmp_path)
    _shard(folder)
    m = load_bagel(folder, dtype=torch.float32)
    with torch.no_grad():
        a = ref(batch, **flow).hidden
        b = m(batch, **flow).hidden
    assert torch.equal(a, b)


def test_sharded_index_errors_name_the_file(saved, tmp_path):
    import json

    folder = broken_copy(saved, tmp_path)
    wmap = _shard(folder)
    idx = folder / "model.safetensors.index.json"
    key = "language_model.lm_head.weight"
    wmap[key] = "model-00001-of-00003.safetensors" if wmap[key] != "model-00001-of-00003.safetensors" else \
        "model-00002-of-00003.safetensors"
    idx.write_text(json.dumps({"weight_map": wmap}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: key {key} is listed for"):
        load_bagel(folder, dtype=torch.float32)
    idx.write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json: not a safetensors index"):
        load_bagel(folder, dtype=torch.float32)
