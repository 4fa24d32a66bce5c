"""Training-path parity with upstream BAGEL on the bagel-tiny fixture (fp32, 1e-5 max-abs)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ftkit.data.packer import pack
from ftkit.models.loading import load_bagel
from ftkit.segments import Kind, Segment
from ftkit.testing import fixture_segments, pack_config_for
from ftkit.train.losses import flow_mse_per_token, per_token_ce, step_breakdown

TOL = 1e-5


@pytest.fixture(scope="module")
def fx(fixture_dir):
    inputs = load_file(fixture_dir / "inputs.safetensors")
    expected = load_file(fixture_dir / "expected.safetensors")
    meta = json.loads((fixture_dir / "inputs.json").read_text())
    model = load_bagel(fixture_dir, dtype=torch.float32, timestep_shift=meta["bagel_config"]["timestep_shift"])
    batch = pack([fixture_segments(fixture_dir, inputs)], pack_config_for(model.cfg))
    eps = list(inputs["vae_posterior_eps"])
    with torch.no_grad():
        out = model(batch, return_logits=True, flow_noise=inputs["flow_noise"], vae_posterior_eps=eps)
    return model, batch, inputs, expected, out


def close(actual, expected, tol=TOL):
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= tol, f"max-abs diff {diff:.3e} > {tol}"


def test_packing_matches_upstream(fx):
    _, b, inputs, _, _ = fx
    pairs = {"ce_loss_indexes": b.ce_indexes, "mse_loss_indexes": b.mse_indexes, "packed_label_ids": b.ce_labels,
             "packed_latent_position_ids": b.vae_position_ids, "packed_position_ids": b.position_ids,
             "packed_text_ids": b.text_ids, "packed_text_indexes": b.text_indexes,
             "packed_vae_token_indexes": b.vae_token_indexes, "packed_vit_position_ids": b.vit_position_ids,
             "packed_vit_token_indexes": b.vit_token_indexes}
    for k, v in pairs.items():
        assert torch.equal(inputs[k].long(), v), k
    assert torch.equal(inputs["packed_vit_tokens"], b.vit_tokens)


def test_attention_mask_and_routing(fx):
    model, b, inputs, _, out = fx
    from ftkit.models.attention import AttentionSpec

    spec = AttentionSpec.from_splits(b.attention, b.sequence_length)
    assert torch.equal(spec.dense(), inputs["attention_allowed"].bool())
    assert torch.equal(out.extras["expert_index"], inputs["seq_expert"].long())
    assert torch.equal(b.token_kind, inputs["seq_token_kind"].long())


def test_each_expert_processes_exactly_its_tokens(fx):
    """The decoder, not just the routing table: every per-expert module of every layer (and the final
    norms) sees exactly the rows of the tokens upstream routes to that expert."""
    model, b, inputs, _, out = fx
    want = inputs["seq_expert"].long()
    dec = model.language_model.model
    experts = model.cfg.experts
    assert len(experts) == 2 and set(want.tolist()) == {0, 1}
    seen: dict = {}

    def record(key):
        def hook(mod, args, output):
            seen[key] = args[0].detach().clone()
        return hook

    def layer_input(i):
        def hook(mod, args):
            seen[("in", i)] = args[0].detach().clone()
        return hook

    handles = [dec.register_forward_hook(lambda mod, args, output: seen.__setitem__("out", output[0].detach()))]
    per_expert = ["input_layernorm", "post_attention_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj"]
    for i, layer in enumerate(dec.layers):
        handles.append(layer.register_forward_pre_hook(layer_input(i)))
        for e, s in enumerate(experts):
            for name in per_expert:
                handles.append(layer.get_submodule(name + s).register_forward_hook(record((i, name, e))))
    for e, s in enumerate(experts):
        handles.append(getattr(dec, f"norm{s}").register_forward_hook(record(("norm", e))))
    eps = list(inputs["vae_posterior_eps"])
    try:
        with torch.no_grad():
            again = model(b, flow_noise=inputs["flow_noise"], vae_posterior_eps=eps)
    finally:
        for h in handles:
            h.remove()
    close(again.hidden, out.hidden, 0.0)
    for i in range(len(dec.layers)):
        for e in range(len(experts)):
            rows = int((want == e).sum())
            # the expert's input norm gets exactly its tokens' rows of the layer input, in sequence order
            got = seen[(i, "input_layernorm", e)]
            assert torch.equal(got, seen[("in", i)][want == e]), f"layer {i}: expert {e} got other tokens"
            for name in per_expert:
                n = seen[(i, name, e)].shape[0]
                assert n == rows, f"layer {i}: {name} of expert {e} processed {n} tokens, upstream routes {rows}"
    for e in range(len(experts)):
        n = seen[("norm", e)].shape[0]
        assert n == int((want == e).sum()), f"final norm of expert {e} processed {n} tokens"
    # each token's final hidden state is its own expert's final norm of the last layer's output
    ref = out.hidden.clone()
    for e, s in enumerate(experts):
        ref[want == e] = getattr(dec, f"norm{s}")(seen[("norm", e)])
    close(out.hidden, ref, 0.0)


@pytest.mark.parametrize("name", ["vit_last_hidden", "vit_features_after_connector", "vit_tokens_into_llm",
                                  "timestep_embeds", "vae_tokens_into_llm"])
def test_embedding_tensors(fx, name):
    close(fx[4].extras[name], fx[3][name])


def test_vae_latents_and_flow_inputs(fx):
    _, _, _, exp, out = fx
    close(torch.stack(out.extras["vae_latent"]), exp["vae_latent"])
    close(out.extras["packed_latent_clean"], exp["packed_latent_clean"])
    close(out.extras["packed_timesteps"], exp["packed_timesteps_effective"])
    close(out.extras["packed_noisy_latent"], exp["packed_noisy_latent"])


def test_sequence_hidden_states_and_heads(fx):
    _, b, _, exp, out = fx
    close(out.llm_input, exp["llm_input_sequence"])
    close(out.hidden, exp["last_hidden_state"])
    close(out.ce_logits, exp["ce_logits"])
    close(out.velocity_pred, exp["velocity_pred"])
    close(out.velocity_target, exp["velocity_target"])


def test_losses(fx):
    """ftkit's own loss functions (the ones MCoTModule calls) reproduce upstream's losses."""
    model, b, inputs, exp, out = fx
    head = model.language_model.lm_head.weight
    ce = per_token_ce(out.ce_hidden, head, b.ce_labels, chunk_size=4)
    close(ce, exp["ce_per_token"])
    ce_total, ce_steps = step_breakdown(ce, b.ce_step)  # unit step weights: upstream's token mean
    close(ce_total, exp["ce_loss"][0])
    for s, v in ce_steps.items():
        close(v, ce[b.ce_step == s].mean())
    w = inputs["ce_loss_weights"]
    close((ce * w).sum() / w.sum(), exp["ce_loss_reweighted"][0])
    close(ce, F.cross_entropy(out.ce_logits, b.ce_labels, reduction="none"))  # same as the logits path
    # d = pred - target is held to TOL above (velocity_pred); its square then differs by up to 2 |d| TOL
    bound = TOL * (1 + 2 * exp["mse_elementwise"].sqrt().max().item())
    close((out.velocity_pred - out.velocity_target) ** 2, exp["mse_elementwise"], bound)
    mse = flow_mse_per_token(out.velocity_pred, out.velocity_target)
    close(mse, exp["mse_per_token"])
    mse_total, _ = step_breakdown(mse, b.mse_step)
    close(mse_total, exp["mse_loss"][0])


def test_text_logits_matches_packed_path(fx):
    model = fx[0]
    cfg = model.cfg
    ids = torch.tensor([[cfg.bos_id, 64, 277, 272, cfg.eos_id], [cfg.bos_id, 5, 6, 7, 8]])
    logits = model.text_logits(ids)
    assert logits.shape == (2, 5, cfg.llm.vocab_size)
    # a prefix's logits do not depend on what follows (causal)
    close(model.text_logits(ids[:, :3]), logits[:, :3], 1e-5)
    # the same text as a packed training sample: CE positions 0..T-2 carry the same logits
    for row, lg in zip(ids, logits):
        batch = pack([[Segment(Kind.TEXT, text_ids=row[1:-1].tolist(), loss=True)]], pack_config_for(cfg))
        assert batch.text_ids.tolist() == [cfg.bos_id, *row[1:-1].tolist(), cfg.eos_id]
        with torch.no_grad():
            packed = model(batch, return_logits=True)
        assert batch.ce_indexes.tolist() == list(range(row.numel() - 1))
        close(lg[: row.numel() - 1], packed.ce_logits, 1e-5)


def test_vae_moment_cache_is_exact(fx):
    model, b, inputs, exp, _ = fx
    eps = list(inputs["vae_posterior_eps"])
    model.enable_vae_cache(8)
    try:
        first = model.encode_vae_latents(b.vae_images, eps)
        second = model.encode_vae_latents(b.vae_images, eps)  # served from the cache
        assert len(model._vae_cache) == 1  # the two copies of the target image share one entry
        close(torch.stack(second), exp["vae_latent"])
        assert all(torch.equal(a, c) for a, c in zip(first, second))
    finally:
        model.enable_vae_cache(0)
