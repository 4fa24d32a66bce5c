"""FoX-style three-expert model built from tiny real Qwen2 / SigLIP / diffusers-VAE folders."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftkit.data.packer import grid_position_ids, pack, patchify_vit
from ftkit.models.experts import expert_parameter_report
from ftkit.models.fox import FOX_EXPERTS, build_fox, load_fox, load_fox_tokenizer, save_fox
from ftkit.models.loading import CheckpointError
from ftkit.segments import Kind, Segment, Step
from ftkit.testing import pack_config_for

TOL = 1e-5
LORA_TARGETS = (r".*language_model\.model\.layers\.\d+\."
                r"(self_attn\.[qkvo]_proj(_moe_sem|_moe_gen)?|mlp(_moe_sem|_moe_gen)?\.(gate|up|down)_proj)")


@pytest.fixture(scope="module")
def parts(tmp_path_factory, fixture_dir):
    """Tiny real source folders: transformers Qwen2 (tied, + the fixture's tokenizer), SigLIP, diffusers VAE."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("fox_parts")
    torch.manual_seed(1234)
    qcfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    qwen = Qwen2ForCausalLM(qcfg).eval()
    qwen.save_pretrained(root / "qwen2")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(fixture_dir / f, root / "qwen2" / f)
    vit = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=56, patch_size=14)).eval()
    vit.save_pretrained(root / "siglip")
    ae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1,
                       norm_num_groups=32, scaling_factor=0.5, shift_factor=0.1)
    ae.save_pretrained(root / "vae")
    return {"root": root, "qwen2": root / "qwen2", "siglip": root / "siglip", "vae": root / "vae",
            "hf_qwen": qwen, "hf_vit": vit}


def build(parts, mode, **kw):
    kw.setdefault("max_latent_size", 8)
    return build_fox(parts["qwen2"], parts["siglip"], parts["vae"], mode=mode, **kw)


@pytest.fixture(scope="module")
def fox(parts):
    return {m: build(parts, m) for m in ("copy", "shared")}


def segments(cfg, seed=0, images=True):
    g = torch.Generator().manual_seed(seed)

    def img(h, w):
        return torch.rand(3, h, w, generator=g) * 2 - 1

    segs = [Segment(Kind.TEXT, text_ids=[5, 6, 7], loss=True, end_label=cfg.start_of_image)]
    if images:
        segs += [Segment(Kind.VIT_IMAGE, image=img(28, 28)), Segment(Kind.VAE_CLEAN, image=img(32, 32))]
    segs.append(Segment(Kind.TEXT, text_ids=[8, 9, 10, 11], loss=True, step=Step.PLAN))
    if images:
        segs.append(Segment(Kind.VAE_NOISY, image=img(32, 32), loss=True, timestep_logit=0.3, step=Step.DRAFT))
    return segs


def noise_for(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = batch.vae_token_indexes.numel()
    eps = [torch.randn(model.cfg.latent_channels, h * 2, w * 2, generator=g) for h, w in batch.vae_latent_hw]
    return {"flow_noise": torch.randn(n, model.cfg.patch_latent_dim, generator=g), "vae_posterior_eps": eps}


def expected_experts(batch):
    """Linguistic 0 for text and markers, semantic 1 for ViT and clean VAE tokens, generative 2 for noisy."""
    e = torch.zeros(batch.sequence_length, dtype=torch.long)
    e[batch.vit_token_indexes] = 1
    start = 0
    for (h, w), noisy in zip(batch.vae_latent_hw, batch.vae_image_noisy):
        e[batch.vae_token_indexes[start:start + h * w]] = 2 if noisy else 1
        start += h * w
    return e


def attach_lora(model, r=4):
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, init_lora_weights=False)
    return inject_adapter_in_model(cfg, model)


def lora_params_by_expert(model):
    out = {s: {} for s in FOX_EXPERTS}
    for n, p in model.named_parameters():
        if "lora_" in n:
            mod = n.split(".lora_")[0].split(".")[-1]
            suffix = next((s for s in FOX_EXPERTS[1:] if s in n.split(".lora_")[0]), "")
            assert mod in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") or suffix
            out[suffix][n] = p
    return out


# ------------------------------------------------------------------ equivalence with the source models
@pytest.mark.parametrize("mode", ["copy", "shared"])
def test_text_logits_equal_qwen2(parts, fox, mode):
    model = fox[mode]
    ids = torch.tensor([[401, 64, 277, 272, 402, 5, 6, 7], [401, 5, 6, 7, 8, 9, 10, 402]])
    with torch.no_grad():
        ours = model.text_logits(ids)
        ref = parts["hf_qwen"](ids).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL
    lm = model.language_model
    assert model.cfg.llm.tie_word_embeddings and not model.cfg.llm.qk_norm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters())


def test_vision_features_equal_siglip(parts, fox):
    model = fox["copy"]
    img = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(3)) * 2 - 1
    p = model.cfg.vit.patch_size
    with torch.no_grad():
        ours = model.vit_model(patchify_vit(img, p), grid_position_ids(4, 4, model.cfg.vit_max_num_patch_per_side), [16])
        ref = parts["hf_vit"](pixel_values=img[None]).last_hidden_state[0]
    assert model.cfg.vit_max_num_patch_per_side == 4 and model.cfg.vit.num_hidden_layers == 2
    assert (ours - ref).abs().max().item() <= TOL


def test_resized_position_table_matches_siglip_interpolation(parts):
    model = build(parts, "shared", vit_max_num_patch_per_side=8)
    assert model.vit_model.vision_model.embeddings.position_embedding.weight.shape == (64, 32)
    assert model.vit_pos_embed.pos_embed.shape == (64, 64)
    img = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ours = model.vit_model(patchify_vit(img, 14), grid_position_ids(8, 8, 8), [64])
        ref = parts["hf_vit"](pixel_values=img[None], interpolate_pos_encoding=True).last_hidden_state[0]
    assert (ours - ref).abs().max().item() <= 1e-4


# ------------------------------------------------------------------ routing
def test_each_token_goes_to_its_functionality_expert(parts):
    model = build(parts, "copy")
    batch = pack([segments(model.cfg)], pack_config_for(model.cfg))
    want = expected_experts(batch)
    assert set(want.tolist()) == {0, 1, 2}
    dec = model.language_model.model
    seen = {}

    def pre(i):
        def hook(mod, args):
            seen[("in", i)] = args[0].detach().clone()
        return hook

    def norm_hook(i, e):
        def hook(mod, args, out):
            seen[(i, e)] = args[0].detach().clone()
        return hook

    handles = []
    for i, layer in enumerate(dec.layers):
        handles.append(layer.register_forward_pre_hook(pre(i)))
        for e, s in enumerate(FOX_EXPERTS):
            handles.append(getattr(layer, f"input_layernorm{s}").register_forward_hook(norm_hook(i, e)))
    noise = noise_for(model, batch)
    with torch.no_grad():
        ref = model(batch, **noise)
    for h in handles:
        h.remove()
    assert torch.equal(ref.extras["expert_index"], want)
    for i in range(len(dec.layers)):  # every layer's expert e receives exactly the rows of its tokens
        for e in range(3):
            assert torch.equal(seen[(i, e)], seen[("in", i)][want == e]), (i, e)
    # give the experts' final norms different scales: each token's output scales by its own expert's factor
    scale = torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        for e, s in enumerate(FOX_EXPERTS):
            getattr(dec, f"norm{s}").weight.mul_(scale[e])
        out = model(batch, **noise)
    ratio = (out.hidden / ref.hidden).median(dim=1).values
    assert torch.allclose(ratio, scale[want], atol=1e-5)


# ------------------------------------------------------------------ memory
def test_shared_mode_holds_one_expert(parts, fox):
    qwen = parts["hf_qwen"]
    one_expert = sum(p.numel() * 4 for n, p in qwen.named_parameters() if ".layers." in n or n == "model.norm.weight")
    reports = {}
    for mode in ("copy", "shared"):
        model = build(parts, mode)
        attach_lora(model)
        rep = expert_parameter_report(model)
        unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
        assert rep["total_bytes"] == sum(unique.values())
        assert rep["total_bytes"] == rep["decoder_expert_bytes"] + rep["adapter_bytes"] + rep["other_bytes"]
        per = rep["experts"]
        assert [per[k]["bytes"] for k in ("base", "moe_sem", "moe_gen")] == [one_expert] * 3
        assert per["base"]["adapter_bytes"] == per["moe_sem"]["adapter_bytes"] == per["moe_gen"]["adapter_bytes"] > 0
        reports[mode] = rep
    shared, copy = reports["shared"], reports["copy"]
    assert shared["decoder_expert_bytes"] == one_expert
    assert copy["decoder_expert_bytes"] == 3 * one_expert
    assert shared["experts"]["moe_gen"]["own_bytes"] == 0
    assert shared["experts"]["moe_gen"]["shared_with"] == ["base", "moe_sem"]
    assert copy["experts"]["moe_gen"]["own_bytes"] == one_expert
    assert shared["other_bytes"] == copy["other_bytes"] and shared["adapter_bytes"] == copy["adapter_bytes"]
    assert shared["total_bytes"] == copy["total_bytes"] - 2 * one_expert


# ------------------------------------------------------------------ training step
@pytest.mark.parametrize("mode", ["copy", "shared"])
def test_forward_backward_reaches_exactly_the_lora_of_present_experts(parts, mode):
    model = build(parts, mode)
    with torch.no_grad():  # a zero llm2vae (its initial value) blocks every gradient from the flow loss
        model.llm2vae.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    attach_lora(model)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if mode == "shared":
        a = model.language_model.model.layers[0].self_attn
        assert a.q_proj_moe_gen.base_layer.weight is a.q_proj.base_layer.weight
        assert a.q_proj_moe_gen.lora_A["default"].weight is not a.q_proj.lora_A["default"].weight
    by_expert = lora_params_by_expert(model)
    assert all(len(v) == 2 * 7 * 2 for v in by_expert.values())  # A and B, 7 modules, 2 layers

    batch = pack([segments(model.cfg)], pack_config_for(model.cfg))
    out = model(batch, return_logits=True, **noise_for(model, batch))
    loss = F.cross_entropy(out.ce_logits, batch.ce_labels) + F.mse_loss(out.velocity_pred, out.velocity_target)
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    for s, params in by_expert.items():
        layer0 = [p for n, p in params.items() if ".layers.0." in n]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer0), s
        assert all(p.grad is not None for p in params.values()), s
        assert all(torch.isfinite(p.grad).all() for p in params.values())

    model.zero_grad(set_to_none=True)
    text = pack([segments(model.cfg, images=False)], pack_config_for(model.cfg))
    out = model(text, return_logits=True)
    F.cross_entropy(out.ce_logits, text.ce_labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in by_expert[""].items() if ".layers.0." in n)
    for s in FOX_EXPERTS[1:]:
        assert all(p.grad is None for p in by_expert[s].values()), s


# ------------------------------------------------------------------ checkpoint folder
@pytest.mark.parametrize("mode", ["copy", "shared"])
def test_save_load_round_trip(parts, fox, mode, tmp_path):
    model = fox[mode]
    tok = load_fox_tokenizer(parts["qwen2"])
    out_dir = save_fox(model, tok, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] == "ftkit-fox" and cfg["fox_mode"] == mode
    assert cfg["bagel_config"]["experts"] == list(FOX_EXPERTS) and cfg["bagel_config"]["routing"] == [0, 1, 2]
    assert cfg["bagel_config"]["vae_tokens_generative"] is False
    assert cfg["tied_parameters"]["language_model.lm_head.weight"] == "language_model.model.embed_tokens.weight"
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.lm_head.weight" not in keys
    assert any("_moe_sem" in k for k in keys) == (mode == "copy")
    assert (out_dir / "vae" / "config.json").is_file() and (out_dir / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = load_fox(out_dir, dtype=torch.float32)
    assert loaded.cfg == model.cfg
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    a = loaded.language_model.model.layers[1].mlp_moe_gen.up_proj.weight
    b = loaded.language_model.model.layers[1].mlp.up_proj.weight
    assert (a is b) == (mode == "shared")
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    batch = pack([segments(model.cfg, seed=7)], pack_config_for(model.cfg))
    noise = noise_for(model, batch, seed=7)
    with torch.no_grad():
        x, y = model(batch, return_logits=True, **noise), loaded(batch, return_logits=True, **noise)
    assert torch.equal(x.hidden, y.hidden) and torch.equal(x.ce_logits, y.ce_logits)
    assert torch.equal(x.extras["packed_latent_clean"], y.extras["packed_latent_clean"])
    assert load_fox_tokenizer(out_dir).convert_tokens_to_ids("<|vision_start|>") == model.cfg.start_of_image
    with pytest.raises(FileExistsError, match="ckpt"):
        save_fox(model, tok, out_dir)
    save_fox(model, tok, out_dir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ------------------------------------------------------------------ honest errors
def test_missing_folders_and_files_are_named(parts, tmp_path):
    q, v, a = parts["qwen2"], parts["siglip"], parts["vae"]
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*Qwen2 folder not found.*huggingface-cli download Qwen/Qwen2-0.5B"):
        build_fox(missing, v, a)
    with pytest.raises(FileNotFoundError, match=r"nowhere: SigLIP vision folder not found"):
        build_fox(q, missing, a)
    with pytest.raises(FileNotFoundError, match=r"nowhere: VAE folder not found"):
        build_fox(q, v, missing)
    no_weights = tmp_path / "qwen_no_weights"
    shutil.copytree(q, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"qwen_no_weights: no model.safetensors"):
        build_fox(no_weights, v, a)
    vae_no_weights = tmp_path / "vae_no_weights"
    shutil.copytree(a, vae_no_weights)
    (vae_no_weights / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae_no_weights/diffusion_pytorch_model.safetensors: file not found"):
        build_fox(q, v, vae_no_weights)
    vit_no_cfg = tmp_path / "vit_no_cfg"
    shutil.copytree(v, vit_no_cfg)
    (vit_no_cfg / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vit_no_cfg/config.json: file not found"):
        build_fox(q, vit_no_cfg, a)
    with pytest.raises(FileNotFoundError, match=r"nowhere: FoX checkpoint folder not found"):
        load_fox(missing)
    with pytest.raises(ValueError, match="mode must be one of"):
        build_fox(q, v, a, mode="tied")


def test_load_fox_missing_weights_and_wrong_type(parts, fox, tmp_path):
    out = save_fox(fox["shared"], load_fox_tokenizer(parts["qwen2"]), tmp_path / "ck")
    (out / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=r"ck/model.safetensors: file not found"):
        load_fox(out)
    (tmp_path / "moved.safetensors").rename(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "bagel"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"ck/config.json: field model_type"):
        load_fox(out)


def test_strict_loading_names_unexpected_and_missing_keys(parts, tmp_path):
    bad = tmp_path / "siglip_extra"
    shutil.copytree(parts["siglip"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["encoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"siglip_extra/model.safetensors: unexpected keys \(1\): encoder.layers.0.extra"):
        build_fox(parts["qwen2"], bad, parts["vae"])
    short = tmp_path / "qwen_short"
    shutil.copytree(parts["qwen2"], short)
    sd = load_file(short / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, short / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"qwen_short: missing keys.*model.layers.1.mlp.up_proj.weight"):
        build_fox(short, parts["siglip"], parts["vae"])


def test_sharded_qwen2_folder(parts, fox, tmp_path):
    sharded = tmp_path / "qwen_sharded"
    parts["hf_qwen"].save_pretrained(sharded, max_shard_size="100KB")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(parts["qwen2"] / f, sharded / f)
    assert (sharded / "model.safetensors.index.json").is_file()
    model = build_fox(sharded, parts["siglip"], parts["vae"], mode="shared", max_latent_size=8)
    ref = fox["shared"].state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())


def test_load_fox_nf4_shares_quantized_base_and_trains_lora(parts, fox, tmp_path):
    out = save_fox(fox["shared"], load_fox_tokenizer(parts["qwen2"]), tmp_path / "ck")
    model = load_fox(out, dtype=torch.float32, quantize="nf4")
    a = model.language_model.model.layers[0].self_attn
    assert type(a.q_proj).__name__ == "Linear4bit" and type(a.q_proj_moe_gen).__name__ == "Linear4bit"
    assert a.q_proj_moe_gen.weight is a.q_proj.weight and a.q_proj_moe_gen is not a.q_proj
    rep = expert_parameter_report(model)
    assert rep["decoder_expert_bytes"] < expert_parameter_report(fox["shared"])["decoder_expert_bytes"] / 4
    ids = torch.tensor([[401, 5, 6, 7, 402]])
    with torch.no_grad():
        assert (model.text_logits(ids) - fox["shared"].text_logits(ids)).abs().max() < 0.5  # nf4 rounding only
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    attach_lora(model)
    model.train()
    batch = pack([segments(model.cfg)], pack_config_for(model.cfg))
    o = model(batch, return_logits=True, **noise_for(model, batch))
    (F.cross_entropy(o.ce_logits, batch.ce_labels) + F.mse_loss(o.velocity_pred, o.velocity_target)).backward()
    for s, params in lora_params_by_expert(model).items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in params.items() if ".layers.0." in n), s
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_tokenizer_without_image_markers_gets_them(fixture_dir, tmp_path):
    """Qwen2-0.5B's tokenizer has no <|vision_start|>/<|vision_end|>: they are added as special tokens."""
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(fixture_dir / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for i in ("403", "404"):
        cfg["added_tokens_decoder"].pop(i)
    cfg["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_fox_tokenizer(tmp_path, vocab_size=512)
    start, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    assert start not in (None, tok.unk_token_id) and end not in (None, tok.unk_token_id) and start != end
    assert tok("<|vision_start|>hi<|vision_end|>")["input_ids"][0] == start
    with pytest.raises(ValueError, match="exceed the model's vocab_size"):
        load_fox_tokenizer(tmp_path, vocab_size=min(start, end))


def test_full_siglip_folder_uses_its_vision_tower(parts, tmp_path):
    """A whole SigLIP (text + vision) folder: vision_model.* is read, text_model/logit_* ignored."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(7)
    cfg = SiglipConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        vocab_size=100, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=56, patch_size=14))
    full = SiglipModel(cfg).eval()
    full.save_pretrained(tmp_path / "siglip_full")
    model = build_fox(parts["qwen2"], tmp_path / "siglip_full", parts["vae"], mode="shared", max_latent_size=8)
    img = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        ours = model.vit_model(patchify_vit(img, 14), grid_position_ids(4, 4, 4), [16])
        ref = full.vision_model(pixel_values=img[None]).last_hidden_state[0]
    assert (ours - ref).abs().max().item() <= TOL
