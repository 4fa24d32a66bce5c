"""Adapters on the bagel-tiny fixture: presets, per-expert rank/alpha, LoRA/DoRA/rsLoRA, modules_to_save,
QLoRA (NF4) training step, enable/disable, gradient checkpointing, save/load round trip, base mismatch."""

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ftkit.adapters import (
    AdapterConfig,
    AdapterConfigError,
    AdapterError,
    adapter_state_dict,
    adapters_disabled,
    attach_adapters,
    enable_gradient_checkpointing,
    load_adapter,
    save_adapter,
    set_adapters_enabled,
    trainable_parameters,
)
from ftkit.adapters.attach import AdapterStateError, adapters_merged, lora_layers
from ftkit.adapters.merge import probe_batch, run_probe
from ftkit.models.bagel import BagelModel
from ftkit.models.config import BagelConfig
from ftkit.models.loading import load_bagel
from ftkit.models.release import build_random_bagel, tiny_bagel_config
from tests.adapters import randomize_adapters

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def expert_names(suffix: str, layers: int = 2, mlp: bool = True) -> set[str]:
    out = set()
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        out |= {f"{p}self_attn.{a}_proj{suffix}" for a in ATTN}
        if mlp:
            out |= {f"{p}mlp{suffix}.{m}_proj" for m in MLP}
    return out


@pytest.fixture(scope="module")
def base2(fixture_dir):
    return load_bagel(fixture_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def base3(fixture_dir):
    return load_bagel(fixture_dir, dtype=torch.float32, three_experts=True)


@pytest.fixture
def fresh(fixture_dir):
    return lambda **kw: load_bagel(fixture_dir, dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def probe(base2):
    return probe_batch(base2.cfg, seed=3)


def outputs_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- presets


def test_presets_two_experts(base2):
    gen = AdapterConfig(preset="generative").resolve_targets(base2)
    assert set(gen) == expert_names("_moe_gen")
    und = AdapterConfig(preset="understanding").resolve_targets(base2)
    assert set(und) == expert_names("")
    allx = AdapterConfig(preset="all-experts").resolve_targets(base2)
    assert set(allx) == expert_names("") | expert_names("_moe_gen")
    attn_only = AdapterConfig(preset="generative", include_mlp=False).resolve_targets(base2)
    assert set(attn_only) == expert_names("_moe_gen", mlp=False)


def test_presets_three_experts(base3):
    assert set(AdapterConfig(preset="generative").resolve_targets(base3)) == expert_names("_moe_gen")
    assert set(AdapterConfig(preset="understanding").resolve_targets(base3)) == expert_names("") | expert_names("_moe_sem")
    assert set(AdapterConfig(preset="all-experts").resolve_targets(base3)) == (
        expert_names("") | expert_names("_moe_sem") | expert_names("_moe_gen"))


def test_preset_regex_attaches_exactly_the_resolved_modules(fresh):
    m = fresh(three_experts=True)
    cfg = AdapterConfig(preset="understanding", r=4)
    attach_adapters(m, cfg)
    assert set(lora_layers(m)) == expert_names("") | expert_names("_moe_sem")
    # nothing outside the decoder (ViT q_proj shares the suffix "self_attn.q_proj")
    assert not any(n.startswith("vit_model") for n in lora_layers(m))


def test_custom_targets_and_validation(base2):
    cfg = AdapterConfig(preset="custom", target_modules=["q_proj_moe_gen", "connector.fc1"])
    assert cfg.resolve_targets(base2) == sorted(
        ["connector.fc1"] + [f"language_model.model.layers.{i}.self_attn.q_proj_moe_gen" for i in range(2)])
    with pytest.raises(AdapterConfigError, match="'nonexistent_proj' matches no module"):
        AdapterConfig(preset="custom", target_modules=["nonexistent_proj"]).resolve_targets(base2)
    with pytest.raises(AdapterConfigError, match="not a Linear"):
        AdapterConfig(preset="custom", target_modules=["input_layernorm"]).resolve_targets(base2)
    with pytest.raises(AdapterConfigError, match="both a LoRA target and inside modules_to_save"):
        AdapterConfig(preset="custom", target_modules=["connector.fc1"], modules_to_save=["connector"]).resolve_targets(base2)


@pytest.mark.parametrize("kw, msg", [
    (dict(preset="experts"), "preset 'experts' unknown"),
    (dict(method="ia3"), "method 'ia3' unknown"),
    (dict(modules_to_save=["vae2llm", "vit"]), "unknown module"),
    (dict(expert_r={"visual": 4}), "unknown expert 'visual'"),
    (dict(r=0), "positive integer"),
    (dict(init="pissa"), "rewrite the base weights"),
    (dict(target_modules=["q_proj"]), "only used with preset 'custom'"),
    (dict(expert_alpha={"understanding": 8, "linguistic": 16}), "name the same expert"),
])
def test_config_validation(kw, msg):
    with pytest.raises(AdapterConfigError, match=msg):
        AdapterConfig(**kw)


def test_preset_or_expert_absent_from_model(base2):
    with pytest.raises(AdapterConfigError, match="semantic"):
        AdapterConfig(preset="all-experts", expert_r={"semantic": 4}).to_peft(base2)
    cfg = tiny_bagel_config()
    one = BagelModel(BagelConfig.from_dict({**cfg.to_dict(), "experts": ("",), "routing": (0, 0, 0)}))
    with pytest.raises(AdapterConfigError, match="'_moe_gen', which this model does not have"):
        AdapterConfig(preset="generative").resolve_targets(one)


# ----------------------------------------------------------------------------- rank / alpha / methods


def test_rank_and_alpha_patterns(fresh):
    m = fresh(three_experts=True)
    cfg = AdapterConfig(preset="all-experts", r=4, alpha=8.0, expert_r={"generative": 2, "semantic": 6},
                        expert_alpha={"generative": 3.0})
    attach_adapters(m, cfg)
    for name, layer in lora_layers(m).items():
        r, alpha = (2, 3.0) if "_moe_gen" in name else ((6, 8.0) if "_moe_sem" in name else (4, 8.0))
        assert layer.r["default"] == r, name
        assert layer.scaling["default"] == pytest.approx(alpha / r), name
        assert layer.lora_A["default"].weight.shape == (r, layer.in_features)


def test_rslora_and_dora_attach(fresh, probe):
    ref = run_probe(fresh(), probe)
    m = fresh()
    attach_adapters(m, AdapterConfig(method="rslora", r=4, alpha=8.0))
    assert all(lay.scaling["default"] == pytest.approx(8.0 / math.sqrt(4)) for lay in lora_layers(m).values())
    m = fresh()
    attach_adapters(m, AdapterConfig(method="dora", r=4, alpha=8.0))
    mags = {n for n in trainable_parameters(m) if "lora_magnitude_vector" in n}
    assert len(mags) == 14
    # DoRA at init (B = 0, m = ||W||_row) computes the base function
    out = run_probe(m, probe)
    assert all(torch.allclose(out[k], ref[k], atol=1e-5) for k in ref)


def test_trainable_and_adapter_state_dict(fresh):
    m = fresh()
    cfg = AdapterConfig(preset="generative", r=4, modules_to_save=["vae2llm", "time_embedder"])
    attach_adapters(m, cfg)
    train = trainable_parameters(m)
    lora = {n for n in train if ".lora_" in n}
    assert len(lora) == 14 * 2
    assert {n for n in train if ".lora_" not in n} == {
        "vae2llm.weight", "vae2llm.bias", "time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias",
        "time_embedder.mlp.2.weight", "time_embedder.mlp.2.bias"}
    assert set(adapter_state_dict(m)) == set(train)
    # base weights frozen, including the wrapped ones
    assert not m.language_model.model.layers[0].mlp_moe_gen.up_proj.base_layer.weight.requires_grad
    with pytest.raises(AdapterStateError, match="already has adapters"):
        attach_adapters(m, cfg)


# ----------------------------------------------------------------------------- enable / disable


def test_adapters_disabled_gives_base_outputs_exactly(fresh, probe):
    ref = run_probe(fresh(), probe)
    m = fresh()
    attach_adapters(m, AdapterConfig(preset="all-experts", r=4, modules_to_save=["vae2llm", "connector", "lm_head"]))
    randomize_adapters(m)
    adapted = run_probe(m, probe)
    assert not torch.allclose(adapted["velocity"], ref["velocity"], atol=1e-3)
    assert not torch.allclose(adapted["ce_logits"], ref["ce_logits"], atol=1e-4)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with adapters_disabled(m):
        assert outputs_equal(run_probe(m, probe), ref)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert outputs_equal(run_probe(m, probe), adapted)
    set_adapters_enabled(m, False)
    set_adapters_enabled(m, False)  # idempotent (no double swap of the modules_to_save copies)
    assert outputs_equal(run_probe(m, probe), ref)
    set_adapters_enabled(m, True)
    assert outputs_equal(run_probe(m, probe), adapted)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_merged_computes_the_adapted_function_and_restores_the_base_exactly(fresh, probe, method):
    ref = run_probe(fresh(), probe)
    m = fresh()
    attach_adapters(m, AdapterConfig(method=method, preset="all-experts", r=4, modules_to_save=["vae2llm"]))
    randomize_adapters(m)
    adapted = run_probe(m, probe)
    base_w = {n: lay.get_base_layer().weight for n, lay in lora_layers(m).items()}
    before = {n: w.detach().clone() for n, w in base_w.items()}
    with adapters_merged(m):
        assert all(lay.merged for lay in lora_layers(m).values())
        # folded in: the base weight now differs, and the forward no longer needs the adapter branch
        lay = m.language_model.model.layers[0].self_attn.q_proj
        assert not torch.equal(lay.get_base_layer().weight, before["language_model.model.layers.0.self_attn.q_proj"])
        merged = run_probe(m, probe)
        for k in adapted:
            torch.testing.assert_close(merged[k], adapted[k], atol=1e-4, rtol=1e-4)
    assert not any(lay.merged for lay in lora_layers(m).values())
    # the same tensors as before, bit for bit (restored, not W' - BA), and the same outputs as never merged
    assert all(lay.get_base_layer().weight is base_w[n] and torch.equal(base_w[n], before[n])
               for n, lay in lora_layers(m).items())
    assert outputs_equal(run_probe(m, probe), adapted)
    with adapters_disabled(m):
        assert outputs_equal(run_probe(m, probe), ref)
        with pytest.raises(AdapterStateError, match="switched off"), adapters_merged(m):
            pass


def test_adapters_merged_leaves_4bit_layers_unmerged(fresh, probe):
    m = fresh(quantize="nf4")
    attach_adapters(m, AdapterConfig(preset="all-experts", r=4, alpha=8.0))
    randomize_adapters(m, scale=0.05)
    for lay in lora_layers(m).values():  # see the brief: bnb's CPU path repacks 4-bit weights after eval forwards
        if hasattr(lay.get_base_layer(), "support_avx512bf16_for_cpu"):
            lay.get_base_layer().support_avx512bf16_for_cpu = False
    adapted = run_probe(m, probe)
    kinds = {type(lay.get_base_layer()).__name__ for lay in lora_layers(m).values()}
    assert "Linear4bit" in kinds
    with adapters_merged(m):
        merged = {type(lay.get_base_layer()).__name__: lay.merged for lay in lora_layers(m).values()}
        assert merged["Linear4bit"] is False
        out = run_probe(m, probe)
    for k in adapted:
        torch.testing.assert_close(out[k], adapted[k], atol=1e-4, rtol=1e-4)


def test_disable_without_base_copies_refuses(fresh):
    m = fresh()
    attach_adapters(m, AdapterConfig(r=4, modules_to_save=["llm2vae"]), keep_base_copies=False)
    with pytest.raises(AdapterStateError, match="no base copy"):
        set_adapters_enabled(m, False)


# ----------------------------------------------------------------------------- training paths


def _loss(model, probe):
    batch, kw = probe
    out = model(batch, return_logits=True, **kw)
    return out.velocity_pred.pow(2).mean() + out.ce_logits.float().logsumexp(-1).mean()


def test_qlora_nf4_forward_backward(fresh, probe):
    m = fresh(quantize="nf4")
    attach_adapters(m, AdapterConfig(preset="all-experts", r=4, alpha=8.0))
    layer = m.language_model.model.layers[1].mlp_moe_gen.down_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    randomize_adapters(m, scale=0.05)
    m.train()
    enable_gradient_checkpointing(m)
    loss = _loss(m, probe)
    loss.backward()
    grads = {n: p.grad for n, p in trainable_parameters(m).items()}
    assert len(grads) == 28 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert layer.base_layer.weight.grad is None
    opt = torch.optim.SGD(list(trainable_parameters(m).values()), lr=1e-2)
    opt.step()
    assert torch.isfinite(_loss(m, probe))


def test_gradient_checkpointing_same_grads(fresh, probe):
    grads = []
    for ckpt in (False, True):
        m = fresh()
        attach_adapters(m, AdapterConfig(preset="all-experts", r=4, modules_to_save=["connector"]))
        randomize_adapters(m, seed=5)
        m.train()
        if ckpt:
            enable_gradient_checkpointing(m)
            assert m.language_model.model.gradient_checkpointing and m.vit_model.vision_model.gradient_checkpointing
        _loss(m, probe).backward()
        grads.append({n: p.grad.clone() for n, p in trainable_parameters(m).items()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_save_load_round_trip(fresh, probe, tmp_path, fixture_dir, method):
    m = fresh()
    cfg = AdapterConfig(method=method, preset="generative", r=4, alpha=16.0, expert_r={"generative": 3},
                        modules_to_save=["llm2vae"])
    attach_adapters(m, cfg)
    randomize_adapters(m, seed=7)
    want = run_probe(m, probe)
    out = save_adapter(m, cfg, tmp_path / "ad", base_path=fixture_dir, extra={"recipe": "tiny-mcot", "metrics": {"loss": 1.5}})
    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "ftkit_adapter.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["use_dora"] == (method == "dora")
    meta = json.loads((out / "ftkit_adapter.json").read_text())
    assert meta["extra"]["metrics"] == {"loss": 1.5} and meta["adapter"]["r"] == 4
    assert meta["base"]["fingerprint"]["targets"]["language_model.model.layers.0.mlp_moe_gen.up_proj"] == [128, 64]
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj_moe_gen.lora_A.weight" in keys
    assert "base_model.model.llm2vae.weight" in keys
    assert ("base_model.model.language_model.model.layers.0.self_attn.q_proj_moe_gen.lora_magnitude_vector" in keys) \
        == (method == "dora")
    m2 = load_adapter(fresh(), out)
    assert outputs_equal(run_probe(m2, probe), want)
    with adapters_disabled(m2):
        assert outputs_equal(run_probe(m2, probe), run_probe(fresh(), probe))
    with pytest.raises(FileExistsError):
        save_adapter(m, cfg, out)


@pytest.fixture(scope="module")
def saved_adapter(fixture_dir, tmp_path_factory):
    m = load_bagel(fixture_dir, dtype=torch.float32)
    cfg = AdapterConfig(preset="all-experts", r=4)
    attach_adapters(m, cfg)
    randomize_adapters(m)
    return save_adapter(m, cfg, tmp_path_factory.mktemp("adapters") / "ad", base_path=fixture_dir)


def test_load_refuses_other_base(saved_adapter):
    other = build_random_bagel(tiny_bagel_config(hidden=32, intermediate=96, heads=4, kv_heads=2))
    with pytest.raises(AdapterError, match=r"ftkit_adapter\.json.*hidden_size"):
        load_adapter(other, saved_adapter)
    with pytest.raises(AdapterError, match=r"ftkit_adapter\.json: adapter does not fit this model.*"
                                           r"layers\.0\.mlp\.gate_proj: adapter trained on \[128, 64\], this model has \[96, 32\]"):
        load_adapter(other, saved_adapter, strict=False)


def test_load_architecture_difference_strict_vs_lenient(base2, saved_adapter, probe):
    cfg = copy.deepcopy(base2.cfg)
    cfg.llm.rope_theta = 10000.0
    other = BagelModel(cfg)
    other.load_state_dict(base2.release_state_dict(), strict=False)
    other.vae = base2.vae
    with pytest.raises(AdapterError, match="rope_theta"):
        load_adapter(other, saved_adapter)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_adapter(other, saved_adapter, strict=False)
    assert any("rope_theta" in str(x.message) for x in w)
    assert len(lora_layers(other)) == 28


def test_load_refuses_expert_mismatch(fresh, tmp_path, fixture_dir):
    m3 = fresh(three_experts=True)
    cfg = AdapterConfig(preset="understanding", r=4)
    attach_adapters(m3, cfg)
    out = save_adapter(m3, cfg, tmp_path / "ad3")
    with pytest.raises(AdapterError, match=r"three_experts=True"):
        load_adapter(fresh(), out)


def test_load_missing_and_corrupt_files(saved_adapter, tmp_path, fresh):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved_adapter, bad)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        load_adapter(fresh(), bad)
    shutil.copy(saved_adapter / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    t = load_file(bad / "adapter_model.safetensors")
    t.pop(sorted(t)[0])
    from safetensors.torch import save_file

    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="sha256 differs"):  # changed after ftkit wrote it
        load_adapter(fresh(), bad)
    meta = json.loads((bad / "ftkit_adapter.json").read_text())
    meta.pop("sha256")  # as an adapter written by another tool: the tensor check names what is missing
    (bad / "ftkit_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensors do not match.*missing \(1\)"):
        load_adapter(fresh(), bad)
    (bad / "ftkit_adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"ftkit_adapter\.json: not valid JSON"):
        load_adapter(fresh(), bad)


def test_bf16_base_keeps_fp32_adapters(fixture_dir):
    """LoRA weights (and so their optimizer state) stay fp32 on a bf16 base; the forward still runs in bf16."""
    from ftkit.adapters.attach import attach_adapters, trainable_parameters
    from ftkit.adapters.config import AdapterConfig
    from ftkit.models.loading import load_bagel

    m = load_bagel(fixture_dir, dtype=torch.bfloat16, load_vae=False)
    attach_adapters(m, AdapterConfig(preset="all-experts", r=4, alpha=8))
    tp = trainable_parameters(m)
    assert tp and all(p.dtype == torch.float32 for p in tp.values())
    assert m.language_model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    ids = torch.tensor([[401, 64, 277, 272, 402]])
    logits = m.text_logits(ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    text_expert = [p for n, p in tp.items() if "lora_" in n and "_moe_" not in n]  # text uses expert ""
    assert text_expert and all(p.grad is not None and p.grad.dtype == torch.float32 for p in text_expert)


def test_train_only_experts_trains_each_module_with_its_owner(fresh):
    """A modules_to_save module trains with the expert that owns it: lm_head with understanding, the flow
    connector llm2vae with generative; the other expert's LoRA is frozen."""
    from ftkit.adapters.attach import train_only_experts

    for experts, trains, frozen in ((["understanding"], ("lm_head", "q_proj.lora"), ("llm2vae", "q_proj_moe_gen")),
                                    (["generative"], ("llm2vae", "q_proj_moe_gen.lora"), ("lm_head", "q_proj.lora"))):
        m = attach_adapters(fresh(), AdapterConfig(preset="all-experts", r=4, alpha=8,
                                                   modules_to_save=["llm2vae", "lm_head"]))
        train_only_experts(m, experts)
        on = {n for n, p in m.named_parameters() if p.requires_grad}
        for key in trains:
            assert any(key in n for n in on), (experts, key)
        for key in frozen:
            assert not any(key in n for n in on), (experts, key, sorted(n for n in on if key in n)[:3])
    with pytest.raises(AdapterStateError, match="unknown expert"):
        train_only_experts(m, ["vision"])
