"""Training-path parity with upstream BAGEL on the bagel-tiny fixture (fp32, 1e-5 max-abs)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ftkit.data.packer import pack
from ftkit.models.loading import load_bagel
from ftkit.testing import fixture_segments, pack_config_for

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
    _, b, inputs, exp, out = fx
    ce = F.cross_entropy(out.ce_logits, b.ce_labels, reduction="none")
    close(ce, exp["ce_per_token"])
    close(ce.mean(), exp["ce_loss"][0])
    w = inputs["ce_loss_weights"]
    close((ce * w).sum() / w.sum(), exp["ce_loss_reweighted"][0])
    se = (out.velocity_pred - out.velocity_target) ** 2
    close(se, exp["mse_elementwise"])
    close(se.mean(-1), exp["mse_per_token"])
    close(se.mean(-1).sum() / se.shape[0], exp["mse_loss"][0])


def test_text_logits_matches_packed_path(fx):
    model = fx[0]
    ids = torch.tensor([[401, 64, 277, 272, 402], [401, 5, 6, 7, 8]])
    logits = model.text_logits(ids)
    assert logits.shape == (2, 5, model.cfg.llm.vocab_size)
    # a prefix's logits do not depend on what follows (causal)
    close(model.text_logits(ids[:, :3]), logits[:, :3], 1e-5)


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
