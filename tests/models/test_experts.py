"""Expert utilities on the bagel-tiny fixture: share / copy / report / upcycle, and a three-expert
BAGEL training step with per-expert LoRA."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

from ftkit.data.packer import pack
from ftkit.models.experts import (
    copy_expert_weights,
    expert_parameter_report,
    share_expert_weights,
    shared_expert_pairs,
    upcycle_bagel_to_three,
)
from ftkit.models.loading import load_bagel
from ftkit.segments import TOKEN_VAE
from ftkit.testing import fixture_segments, pack_config_for

EXPERTS3 = ("", "_moe_sem", "_moe_gen")
LORA_TARGETS = (r".*language_model\.model\.layers\.\d+\."
                r"(self_attn\.[qkvo]_proj(_moe_sem|_moe_gen)?|mlp(_moe_sem|_moe_gen)?\.(gate|up|down)_proj)")


@pytest.fixture(scope="module")
def fx(fixture_dir):
    inputs = load_file(fixture_dir / "inputs.safetensors")
    return fixture_dir, inputs


def run(model, fixture_dir, inputs):
    batch = pack([fixture_segments(fixture_dir, inputs)], pack_config_for(model.cfg))
    out = model(batch, return_logits=True, flow_noise=inputs["flow_noise"],
                vae_posterior_eps=list(inputs["vae_posterior_eps"]))
    return batch, out


def one_expert_bytes(model, suffix=""):
    return expert_parameter_report(model)["experts"]["base" if not suffix else suffix.lstrip("_")]["bytes"]


@pytest.mark.parametrize("mode", ["copy", "shared"])
def test_upcycle_two_to_three_experts(fx, mode):
    fixture_dir, inputs = fx
    two = load_bagel(fixture_dir, dtype=torch.float32)
    rep2 = expert_parameter_report(two)
    one = rep2["experts"]["base"]["bytes"]
    with torch.no_grad():
        _, out2 = run(two, fixture_dir, inputs)
    three = upcycle_bagel_to_three(two, mode)
    assert three.cfg.experts == EXPERTS3 and three.cfg.routing == (0, 1, 2) and three.cfg.vae_tokens_generative
    assert three.vit_model is two.vit_model and three.vae is two.vae  # moved, not copied
    ref = load_bagel(fixture_dir, dtype=torch.float32, three_experts=True)
    sa, sb = three.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        batch, out3 = run(three, fixture_dir, inputs)
    e = out3.extras["expert_index"]
    assert (e[batch.vit_token_indexes] == 1).all() and (e[batch.token_kind == TOKEN_VAE] == 2).all()
    assert (e[batch.text_indexes] == 0).all()
    # the semantic expert starts as the understanding expert: the outputs do not move
    assert torch.equal(out3.hidden, out2.hidden) and torch.equal(out3.velocity_pred, out2.velocity_pred)

    a = three.language_model.model.layers[0].self_attn
    rep3 = expert_parameter_report(three)
    if mode == "shared":
        assert a.q_proj_moe_sem.weight is a.q_proj.weight and a.q_proj_moe_sem is not a.q_proj
        assert not a.q_proj.weight.requires_grad
        assert shared_expert_pairs(three) == {"_moe_sem": ""}
        assert rep3["total_bytes"] == rep2["total_bytes"]
        assert rep3["experts"]["moe_sem"]["own_bytes"] == 0 and rep3["experts"]["base"]["shared_with"] == ["moe_sem"]
    else:
        assert a.q_proj_moe_sem.weight.data_ptr() != a.q_proj.weight.data_ptr()
        with torch.no_grad():
            a.q_proj_moe_sem.weight.add_(1.0)
        assert not torch.equal(a.q_proj_moe_sem.weight, a.q_proj.weight)
        assert shared_expert_pairs(three) == {}
        assert rep3["total_bytes"] == rep2["total_bytes"] + one
    assert rep3["decoder_expert_bytes"] == rep2["decoder_expert_bytes"] + (one if mode == "copy" else 0)


def test_share_and_copy_between_existing_experts(fx):
    fixture_dir, _ = fx
    model = load_bagel(fixture_dir, dtype=torch.float32, three_experts=True)
    dec = model.language_model.model
    one = one_expert_bytes(model)
    assert expert_parameter_report(model)["decoder_expert_bytes"] == 3 * one
    share_expert_weights(model, "", "_moe_gen")
    for layer in dec.layers:
        assert layer.mlp_moe_gen.down_proj.weight is layer.mlp.down_proj.weight
        assert layer.self_attn.k_norm_moe_gen.weight is layer.self_attn.k_norm.weight
        assert layer.post_attention_layernorm_moe_gen is not layer.post_attention_layernorm
    assert dec.norm_moe_gen.weight is dec.norm.weight and not dec.norm.weight.requires_grad
    assert expert_parameter_report(model)["decoder_expert_bytes"] == 2 * one
    assert shared_expert_pairs(model) == {"_moe_gen": ""}
    l0 = dec.layers[0]
    with torch.no_grad():  # make the semantic expert differ from the base before copying it
        l0.mlp_moe_sem.gate_proj.weight.add_(0.5)
    copy_expert_weights(model, "_moe_sem", "_moe_gen")
    assert torch.equal(l0.mlp_moe_gen.gate_proj.weight, l0.mlp_moe_sem.gate_proj.weight)
    assert l0.mlp_moe_gen.gate_proj.weight.data_ptr() != l0.mlp_moe_sem.gate_proj.weight.data_ptr()
    assert not torch.equal(l0.mlp_moe_gen.gate_proj.weight, l0.mlp.gate_proj.weight)
    assert expert_parameter_report(model)["decoder_expert_bytes"] == 3 * one


def test_bad_requests_raise(fx):
    fixture_dir, _ = fx
    model = load_bagel(fixture_dir, dtype=torch.float32, three_experts=True)
    with pytest.raises(ValueError, match="two-expert"):
        upcycle_bagel_to_three(model, "copy")
    with pytest.raises(ValueError, match="mode must be one of"):
        upcycle_bagel_to_three(model, "tied")
    with pytest.raises(ValueError, match="not one of the decoder's experts"):
        share_expert_weights(model, "", "_moe_vision")
    with pytest.raises(ValueError, match="must differ"):
        copy_expert_weights(model, "_moe_sem", "_moe_sem")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=LORA_TARGETS), model)
    with pytest.raises(ValueError, match="adapters are already attached"):
        share_expert_weights(model, "", "_moe_sem")


def lora_by_expert(model):
    out = {s: {} for s in EXPERTS3}
    for n, p in model.named_parameters():
        if "lora_" in n:
            owner = n.split(".lora_")[0]
            out[next((s for s in EXPERTS3[1:] if s in owner), "")][n] = p
    return out


@pytest.mark.parametrize("mode", ["copy", "shared"])
def test_three_expert_bagel_training_step(fx, mode):
    fixture_dir, inputs = fx
    if mode == "copy":
        model = load_bagel(fixture_dir, dtype=torch.float32, three_experts=True)
    else:
        model = upcycle_bagel_to_three(load_bagel(fixture_dir, dtype=torch.float32), "shared")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False), model)
    model.train()
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    groups = lora_by_expert(model)
    assert all(len(g) == 28 for g in groups.values())
    rep = expert_parameter_report(model)
    assert rep["experts"]["moe_sem"]["adapter_bytes"] == rep["experts"]["base"]["adapter_bytes"] > 0
    batch, out = run(model, fixture_dir, inputs)
    loss = F.cross_entropy(out.ce_logits, batch.ce_labels) + F.mse_loss(out.velocity_pred, out.velocity_target)
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    for s, g in groups.items():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g.values()), s
        assert all(p.grad.abs().sum() > 0 for n, p in g.items() if ".layers.0." in n), s
