"""Merging adapters into FoX checkpoint folders: tiny FoX (copy and shared mode) built from tiny real Qwen2 /
SigLIP / diffusers-VAE folders; LoRA, DoRA, rsLoRA and QLoRA adapters; shared experts untied; refusals; CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ftkit.adapters import (
    AdapterConfig,
    AdapterError,
    MergeError,
    attach_adapters,
    save_adapter,
)
from ftkit.adapters.cli import merge_main
from ftkit.adapters.io import load_adapter
from ftkit.adapters.merge import merge_into_model, probe_batch, run_probe
from ftkit.adapters.merge_fox import is_fox_folder, merge_fox
from ftkit.errors import FtkitError
from ftkit.models.fox import build_fox, load_fox, load_fox_tokenizer, save_fox
from tests.adapters import randomize_adapters

PREFIX = "language_model.model."


def make_parts(root, fixture_dir, hidden=64):
    """Tiny real source folders: transformers Qwen2 (tied embeddings, the fixture's tokenizer), SigLIP, diffusers VAE."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1234)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                 tie_word_embeddings=True)).save_pretrained(root / "qwen2")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(fixture_dir / f, root / "qwen2" / f)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=56, patch_size=14)).save_pretrained(root / "siglip")
    AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1,
                  norm_num_groups=32, scaling_factor=0.5, shift_factor=0.1).save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge_fox")


@pytest.fixture(scope="module")
def bases(work, fixture_dir):
    """FoX folders in copy and shared mode (save_fox), from one set of source folders."""
    parts = make_parts(work / "parts", fixture_dir)
    tok = load_fox_tokenizer(parts / "qwen2")
    out = {}
    for mode in ("copy", "shared"):
        m = build_fox(parts / "qwen2", parts / "siglip", parts / "vae", mode=mode, max_latent_size=8)
        out[mode] = save_fox(m, tok, work / f"base-{mode}")
    return out


def make_adapter(base, out, cfg, *, quantize=None, seed=0):
    m = load_fox(base, dtype=torch.float32, quantize=quantize)
    attach_adapters(m, cfg)
    randomize_adapters(m, seed)
    return save_adapter(m, cfg, out, base_path=base, extra={"recipe": "tiny-fox", "metrics": {"ce": 1.5}})


def adapted_outputs(base, adapter, seed):
    """base + adapter (fp32, peft layers, the base's own tie structure) on a probe batch."""
    model = load_adapter(load_fox(base, dtype=torch.float32), adapter)
    return run_probe(model, probe_batch(model.cfg, seed=seed))


def assert_outputs_match(base, adapter, merged, seed=5, atol=1e-4):
    ref = adapted_outputs(base, adapter, seed)
    m = load_fox(merged, dtype=torch.float32)
    got = run_probe(m, probe_batch(m.cfg, seed=seed))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=0, msg=k)
    assert ref["velocity"].abs().max() > 0  # llm2vae is trained (modules_to_save): the flow head is exercised
    return m


def lora_by_hand(adapter, base_sd, module, dora=False):
    """W' from the adapter file and the base tensor: W + s B A (s = alpha / r, rsLoRA alpha / sqrt(r)), DoRA
    rescaled per row."""
    t = load_file(adapter / "adapter_model.safetensors")
    peft = json.loads((adapter / "adapter_config.json").read_text())
    key = f"base_model.model.{PREFIX}{module}"
    A, B = t[key + ".lora_A.weight"].float(), t[key + ".lora_B.weight"].float()
    r = A.shape[0] ** 0.5 if peft["use_rslora"] else A.shape[0]
    W = base_sd[PREFIX + module + ".weight"].float() + peft["lora_alpha"] / r * B @ A
    if dora:
        W = W * (t[key + ".lora_magnitude_vector"].float() / torch.linalg.norm(W, dim=1)).unsqueeze(1)
    return W


def stored(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def base_weights(base):
    """Every decoder weight of a base folder by its full name (shared experts filled from their source)."""
    return load_fox(base, dtype=torch.float32).state_dict()


def no_leftovers(parent):
    return not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode,method", [("copy", "lora"), ("copy", "dora"), ("shared", "lora"), ("shared", "rslora")])
def test_all_experts_round_trip(bases, work, mode, method):
    base = bases[mode]
    cfg = AdapterConfig(method=method, preset="all-experts", r=4, alpha=8.0, expert_r={"generative": 2},
                        modules_to_save=["llm2vae"])
    ad = make_adapter(base, work / f"ad-{mode}-{method}", cfg, seed=3)
    out = work / f"out-{mode}-{method}"
    rep = merge_fox(base, ad, out, dtype="fp32")
    assert rep.merged == 2 * 7 * 3 and rep.replaced == 2 and rep.method == method
    assert rep.max_diff is not None and rep.max_scaled_diff <= 1e-4 and rep.tolerance == 1e-4
    assert rep.fox_mode_in == mode and rep.fox_mode_out == "copy" and rep.shared_experts == {}
    assert rep.untied_experts == (["_moe_sem", "_moe_gen"] if mode == "shared" else [])
    # folder: FoX format, untied, only Qwen2's own lm_head tie recorded
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "ftkit-fox" and meta["fox_mode"] == "copy" and meta["shared_experts"] == {}
    assert meta["tied_parameters"] == {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}
    assert meta["dtype"] == "float32" and meta["bagel_config"]["experts"] == ["", "_moe_sem", "_moe_gen"]
    sd = stored(out)
    assert any("_moe_sem" in k for k in sd) and any("_moe_gen" in k for k in sd)
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    # every expert carries exactly its own delta (no stale tie: shared-mode experts started equal)
    bsd = base_weights(base)
    for s in ("", "_moe_sem", "_moe_gen"):
        for mod in (f"layers.0.self_attn.q_proj{s}", f"layers.1.mlp{s}.down_proj"):
            want = lora_by_hand(ad, bsd, mod, dora=method == "dora")
            torch.testing.assert_close(sd[PREFIX + mod + ".weight"], want, atol=1e-5, rtol=1e-5, msg=mod)
    q = [sd[f"{PREFIX}layers.0.self_attn.q_proj{s}.weight"] for s in ("", "_moe_sem", "_moe_gen")]
    assert not torch.equal(q[0], q[1]) and not torch.equal(q[1], q[2])
    # the merged folder loads untied and computes base + adapter (independent probe seed)
    m = assert_outputs_match(base, ad, out)
    a = m.language_model.model.layers[1].self_attn
    assert a.v_proj_moe_gen.weight is not a.v_proj.weight and a.v_proj_moe_sem.weight is not a.v_proj.weight
    assert m.language_model.lm_head.weight is m.language_model.model.embed_tokens.weight
    card = (out / "README.md").read_text()
    assert "tiny-fox" in card and method in card and "max abs diff" in card and "FoX" in card
    assert load_fox_tokenizer(out).convert_tokens_to_ids("<|vision_start|>") == m.cfg.start_of_image
    assert sorted(rep.files) == sorted(p.name for p in out.iterdir())
    assert no_leftovers(work)


def test_shared_generative_only_keeps_untouched_share(bases, work):
    """Only _moe_gen adapted: it gets its own weights; '' and _moe_sem keep sharing the original tensors."""
    base = bases["shared"]
    ad = make_adapter(base, work / "ad-gen", AdapterConfig(preset="generative", r=4, modules_to_save=["llm2vae"]), seed=7)
    out = work / "out-gen"
    rep = merge_fox(base, ad, out, dtype="fp32")
    assert rep.untied_experts == ["_moe_gen"] and rep.fox_mode_out == "shared"
    assert rep.shared_experts == {"_moe_sem": ""} and rep.merged == 14 and rep.max_scaled_diff <= 1e-4
    meta = json.loads((out / "config.json").read_text())
    assert meta["fox_mode"] == "shared" and meta["shared_experts"] == {"_moe_sem": ""}
    sd, bsd = stored(out), base_weights(base)
    assert not any("_moe_sem" in k for k in sd) and any("_moe_gen" in k for k in sd)
    torch.testing.assert_close(sd[PREFIX + "layers.0.mlp.up_proj.weight"], bsd[PREFIX + "layers.0.mlp.up_proj.weight"],
                               atol=0, rtol=0)
    torch.testing.assert_close(sd[PREFIX + "layers.0.mlp_moe_gen.up_proj.weight"],
                               lora_by_hand(ad, bsd, "layers.0.mlp_moe_gen.up_proj"), atol=1e-5, rtol=1e-5)
    m = assert_outputs_match(base, ad, out)
    a = m.language_model.model.layers[0].self_attn
    assert a.q_proj_moe_sem.weight is a.q_proj.weight and a.q_proj_moe_gen.weight is not a.q_proj.weight


def test_shared_base_expert_adapted_others_keep_original(bases, work):
    """The source of the share ('') adapted, _moe_sem / _moe_gen not: they must keep W (a stale tie would give
    them W + sBA), and keep sharing it with each other."""
    base = bases["shared"]
    cfg = AdapterConfig(preset="custom", target_modules=["q_proj", "mlp.down_proj"], r=4, alpha=8.0,
                        modules_to_save=["llm2vae"])
    ad = make_adapter(base, work / "ad-base-only", cfg, seed=9)
    targets = json.loads((ad / "ftkit_adapter.json").read_text())["base"]["fingerprint"]["targets"]
    assert len(targets) == 6 and all("_moe_" not in t for t in targets)  # 2 decoder q_proj, 2 down_proj, 2 ViT q_proj
    rep = merge_fox(base, ad, work / "out-base-only", dtype="fp32")
    assert rep.untied_experts == [""] and rep.shared_experts == {"_moe_gen": "_moe_sem"} and rep.merged == 6
    sd, bsd = stored(work / "out-base-only"), base_weights(base)
    name = "layers.0.self_attn.q_proj"
    torch.testing.assert_close(sd[PREFIX + name + ".weight"], lora_by_hand(ad, bsd, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sd[PREFIX + name + "_moe_sem.weight"], bsd[PREFIX + name + ".weight"], atol=0, rtol=0)
    assert PREFIX + name + "_moe_gen.weight" not in sd  # tied to _moe_sem, stored once
    m = assert_outputs_match(base, ad, work / "out-base-only")
    a = m.language_model.model.layers[0].self_attn
    assert a.q_proj_moe_gen.weight is a.q_proj_moe_sem.weight and a.q_proj_moe_sem.weight is not a.q_proj.weight


def test_lora_on_tied_lm_head_unties_embeddings(bases, work):
    """A LoRA on lm_head of a tied-embedding Qwen2 changes lm_head only: the output stores it and is untied."""
    base = bases["copy"]
    cfg = AdapterConfig(preset="custom", target_modules=["lm_head"], r=4, alpha=8.0, modules_to_save=["llm2vae"])
    ad = make_adapter(base, work / "ad-head", cfg, seed=13)
    rep = merge_fox(base, ad, work / "out-head", dtype="fp32")
    assert rep.untied_other == ["language_model.lm_head.weight"] and rep.max_scaled_diff <= 1e-4
    meta = json.loads((work / "out-head" / "config.json").read_text())
    assert meta["bagel_config"]["llm"]["tie_word_embeddings"] is False and meta["tied_parameters"] == {}
    sd, bsd = stored(work / "out-head"), base_weights(base)
    torch.testing.assert_close(sd["language_model.model.embed_tokens.weight"],
                               bsd["language_model.model.embed_tokens.weight"], atol=0, rtol=0)
    assert not torch.equal(sd["language_model.lm_head.weight"], sd["language_model.model.embed_tokens.weight"])
    assert_outputs_match(base, ad, work / "out-head")


def test_qlora_adapter_merges_into_unquantized_base(bases, work):
    base = bases["shared"]
    cfg = AdapterConfig(preset="all-experts", r=4, alpha=8.0, modules_to_save=["llm2vae"])
    qmodel = load_fox(base, dtype=torch.float32, quantize="nf4")
    attach_adapters(qmodel, cfg)
    assert type(qmodel.language_model.model.layers[0].self_attn.q_proj_moe_gen.base_layer).__name__ == "Linear4bit"
    randomize_adapters(qmodel, seed=4)
    ad = save_adapter(qmodel, cfg, work / "ad-qlora", base_path=base, extra={"recipe": "tiny-fox-qlora"})
    assert json.loads((ad / "ftkit_adapter.json").read_text())["base"]["fingerprint"]["quantization"] == "nf4"
    with pytest.raises(MergeError, match="4-bit.*UNQUANTIZED"):
        merge_into_model(qmodel)
    rep = merge_fox(base, ad, work / "out-qlora", dtype="fp32")
    assert rep.merged == 42 and rep.max_scaled_diff <= 1e-4 and rep.fox_mode_out == "copy"
    sd, bsd = stored(work / "out-qlora"), base_weights(base)
    for mod in ("layers.1.self_attn.o_proj_moe_gen", "layers.0.mlp_moe_sem.gate_proj", "layers.1.mlp.up_proj"):
        torch.testing.assert_close(sd[PREFIX + mod + ".weight"], lora_by_hand(ad, bsd, mod), atol=1e-5, rtol=1e-5)
    assert_outputs_match(base, ad, work / "out-qlora")
    assert "QLoRA, nf4 base" in (work / "out-qlora" / "README.md").read_text()


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gen_adapter(bases, work):
    return make_adapter(bases["shared"], work / "ad-cli", AdapterConfig(preset="generative", r=4,
                                                                          modules_to_save=["llm2vae"]), seed=21)


def test_cli_subprocess_bf16(bases, gen_adapter, work):
    out = work / "out-cli"
    r = subprocess.run([sys.executable, "-m", "ftkit.cli", "merge", "--base", str(bases["shared"]), "--adapter",
                        str(gen_adapter), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verification: max scaled diff" in r.stdout and "fox_mode shared -> shared" in r.stdout
    assert is_fox_folder(out) and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert_outputs_match(bases["shared"], gen_adapter, out, atol=5e-2)  # bf16 weights


def test_cli_refusals(bases, gen_adapter, work, capsys):
    existing = work / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    argv = ["--base", str(bases["shared"]), "--adapter", str(gen_adapter), "--out", str(existing), "--dtype", "fp32"]
    assert merge_main(argv) == 1
    assert "output folder exists" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "mine"
    assert merge_main([*argv, "--overwrite", "--no-verify"]) == 1  # not a model folder: never deleted
    assert "replaces only a model folder" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "mine"
    out = work / "fox-out"
    argv = ["--base", str(bases["shared"]), "--adapter", str(gen_adapter), "--out", str(out), "--dtype", "fp32"]
    assert merge_main([*argv, "--no-verify"]) == 0
    (out / "stale.txt").write_text("old")
    assert merge_main([*argv, "--overwrite", "--no-verify", "--max-shard-size", "1GB"]) == 0
    io = capsys.readouterr()
    assert "verification: skipped" in io.out and "ignored for a FoX base" in io.err
    assert not (out / "stale.txt").exists() and is_fox_folder(out)
    assert no_leftovers(work)


# ----------------------------------------------------------------------------- refusals


def test_refuses_adapter_for_another_base(bases, work, fixture_dir):
    other_parts = make_parts(work / "parts-other", fixture_dir, hidden=32)
    other = build_fox(other_parts / "qwen2", other_parts / "siglip", other_parts / "vae", mode="shared",
                      max_latent_size=8)
    cfg = AdapterConfig(preset="generative", r=4)
    attach_adapters(other, cfg)
    ad = save_adapter(other, cfg, work / "ad-other")
    with pytest.raises(AdapterError, match=r"cannot merge .*ad-other into the FoX base .*base-shared.*"
                                           r"ad-other/ftkit_adapter\.json: base architecture differs.*hidden_size"):
        merge_fox(bases["shared"], ad, work / "never-other")
    # a BAGEL adapter (two experts) on a FoX base
    from ftkit.models.release import build_random_bagel, tiny_bagel_config

    bagel = build_random_bagel(tiny_bagel_config())
    attach_adapters(bagel, cfg)
    ad2 = save_adapter(bagel, cfg, work / "ad-bagel")
    with pytest.raises(AdapterError, match=r"experts \['', '_moe_gen'\], this model has \['', '_moe_sem', '_moe_gen'\]"):
        merge_fox(bases["copy"], ad2, work / "never-other")
    assert not (work / "never-other").exists() and no_leftovers(work)


def test_refuses_missing_files_existing_output_and_bad_verification(bases, gen_adapter, work, fixture_dir):
    bad = work / "ad-incomplete"
    shutil.copytree(gen_adapter, bad)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        merge_fox(bases["shared"], bad, work / "never")
    nobase = work / "base-noweights"
    shutil.copytree(bases["shared"], nobase)
    (nobase / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"base-noweights/model.safetensors: file not found"):
        merge_fox(nobase, gen_adapter, work / "never")
    with pytest.raises(ValueError, match=r"not a FoX checkpoint"):
        (work / "not-fox").mkdir()
        (work / "not-fox" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        merge_fox(work / "not-fox", gen_adapter, work / "never")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_fox(bases["shared"], gen_adapter, bases["copy"])
    with pytest.raises(FtkitError, match="output folder is the input"):
        merge_fox(bases["shared"], gen_adapter, bases["shared"], overwrite=True)
    with pytest.raises(MergeError, match="verification failed.*nothing written"):
        merge_fox(bases["shared"], gen_adapter, work / "never", tolerance=0.0)  # bf16 rounding > 0
    assert not is_fox_folder(fixture_dir)  # a BAGEL release folder goes to the streaming merge
    assert not (work / "never").exists() and no_leftovers(work)
    assert json.loads((bases["copy"] / "config.json").read_text())["fox_mode"] == "copy"
