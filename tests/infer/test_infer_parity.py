"""Inference parity with upstream BAGEL's KV-cache path on the bagel-tiny fixture (fp32).

Upstream numbers (fixture README, "Inference outputs"): the prompt context occupies positions 0..4,
the query block ``[<|vision_start|>] 6 VAE tokens [<|vision_end|>]`` sits at position 5 (the
unconditional branch: same block, empty context, position 0); guided velocity step, a 3-step
generation + decode, and greedy decoding after a ViT image and a prompt.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ftkit.data.packer import pack
from ftkit.infer.context import (
    Context,
    GuidanceContexts,
    forward_blocks,
    image_block,
    prefill_texts,
    text_block,
)
from ftkit.infer.sampler import (
    decode_latent,
    generate_image,
    generate_images,
    generate_text,
    guide,
    to_pil,
    velocities,
    velocity,
)
from ftkit.models.attention import AttentionSpec
from ftkit.models.bagel import timestep_schedule
from ftkit.models.loading import load_bagel
from ftkit.segments import TOKEN_VAE, Functionality, Kind, Segment
from ftkit.testing import pack_config_for

TOL = 1e-4


@pytest.fixture(scope="module")
def fx(fixture_dir):
    inputs = load_file(fixture_dir / "inputs.safetensors")
    expected = load_file(fixture_dir / "expected.safetensors")
    meta = json.loads((fixture_dir / "inputs.json").read_text())
    model = load_bagel(fixture_dir, dtype=torch.float32)
    return model, inputs, expected, meta


def maxabs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def close(actual, expected, tol=TOL):
    d = maxabs(actual, expected)
    assert d <= tol, f"max-abs diff {d:.3e} > {tol}"
    return d


def prompt_context(model, meta) -> Context:
    return Context(model).add_text(meta["inference_t2i"]["prompt_ids"])


def test_prompt_context_layout(fx):
    model, _, _, meta = fx
    it = meta["inference_t2i"]
    ctx = prompt_context(model, meta)
    assert (ctx.length, ctx.position) == (it["context_kv_len"], it["query_position_ids"][0]) == (5, 5)
    k, v = ctx.cache[0]
    assert k.shape == (model.cfg.llm.num_key_value_heads, 5, model.cfg.llm.head_dim)
    assert len(ctx.cache) == model.cfg.llm.num_hidden_layers


def test_guided_step(fx):
    model, inputs, exp, meta = fx
    it = meta["inference_t2i"]
    hw = tuple(it["image_hw"])
    ts = timestep_schedule(it["num_timesteps"], it["timestep_shift"])
    k = it["step_index"]
    t, dt = ts[k], ts[k] - ts[k + 1]
    close(t, exp["t2i_step_t"][0], 1e-7)
    close(dt, exp["t2i_step_dt"][0], 1e-7)
    x = inputs["t2i_step_init_noise"]
    ctx = prompt_context(model, meta)
    # both branches in one packed decoder call, as the sampler runs them
    v_cond, v_unc = velocities([ctx, Context(model)], [x, x], t, [hw, hw])
    close(v_cond, exp["t2i_step_v_cond"])
    close(v_unc, exp["t2i_step_v_uncond"])
    # and one at a time
    close(velocity(ctx, x, t, hw), exp["t2i_step_v_cond"])
    close(velocity(Context(model), x, t, hw), exp["t2i_step_v_uncond"])
    v_cfg = guide(v_cond, v_unc, cfg_text_scale=it["cfg_text_scale"], renorm_type=it["cfg_renorm_type"],
                  renorm_min=it["cfg_renorm_min"])
    close(v_cfg, exp["t2i_step_v_cfg"])
    close(x - v_cfg * dt, exp["t2i_step_x_next"])
    # the velocity block is not written into the context
    assert (ctx.length, ctx.position) == (5, 5)


def test_full_short_generation_and_decode(fx):
    model, inputs, exp, meta = fx
    it = meta["inference_t2i"]
    fr = it["full_run"]
    hw = tuple(it["image_hw"])
    lat = generate_image(model, prompt_context(model, meta), Context(model), hw=hw,
                         num_timesteps=fr["num_timesteps"], timestep_shift=fr["timestep_shift"],
                         cfg_text_scale=fr["cfg_text_scale"], cfg_img_scale=fr["cfg_img_scale"],
                         cfg_interval=tuple(fr["cfg_interval"]), cfg_renorm_type=fr["cfg_renorm_type"],
                         cfg_renorm_min=fr["cfg_renorm_min"], init_noise=inputs["t2i_full_init_noise"])
    close(lat, exp["t2i_full_final_latent"])
    dec = decode_latent(model, lat, hw)
    assert dec.shape == exp["t2i_full_decoded"].shape
    close(dec, exp["t2i_full_decoded"])
    img = np.asarray(to_pil(dec)).astype(np.int64)
    want = exp["t2i_full_image_uint8"].numpy().astype(np.int64)
    assert img.shape == want.shape == (hw[0], hw[1], 3)
    diff = np.abs(img - want)
    assert diff.max() <= 1
    # an off-by-one pixel is only allowed where upstream's float sits at an integer boundary
    ref = ((exp["t2i_full_decoded"][0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255).numpy()
    frac = np.abs(ref - np.round(ref))
    assert np.all(frac[diff > 0] < 1e-3), "a pixel differs away from an integer boundary"


def test_cfg_interval_and_scale_one_turn_guidance_off(fx):
    model, inputs, _, meta = fx
    hw = tuple(meta["inference_t2i"]["image_hw"])
    noise = inputs["t2i_full_init_noise"]
    kw = dict(hw=hw, num_timesteps=4, init_noise=noise)
    ctx = prompt_context(model, meta)
    plain = generate_image(model, ctx, None, cfg_text_scale=1.0, **kw)
    never = generate_image(model, ctx, None, cfg_text_scale=4.0, cfg_interval=(1.0, 1.0), **kw)
    guided = generate_image(model, ctx, None, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0), **kw)
    close(never, plain, 1e-6)
    assert maxabs(guided, plain) > 1e-3


def test_batched_prompts_match_single(fx):
    model, inputs, _, meta = fx
    hw = tuple(meta["inference_t2i"]["image_hw"])
    ctx_a = prompt_context(model, meta)
    ctx_b = Context(model).add_text([5, 6, 7, 8, 9])
    noise_b = torch.randn(inputs["t2i_full_init_noise"].shape, generator=torch.Generator().manual_seed(3))
    kw = dict(hw=hw, num_timesteps=4, cfg_interval=(0.0, 1.0))
    both = generate_images(model, [ctx_a, ctx_b], None, None, init_noise=[inputs["t2i_full_init_noise"], noise_b], **kw)
    a = generate_image(model, ctx_a, None, init_noise=inputs["t2i_full_init_noise"], **kw)
    b = generate_image(model, ctx_b, None, init_noise=noise_b, **kw)
    close(both[0], a, 1e-5)
    close(both[1], b, 1e-5)
    # one decoder call per branch gives the same images
    sep = generate_images(model, [ctx_a, ctx_b], None, None, init_noise=[inputs["t2i_full_init_noise"], noise_b],
                          packed=False, **kw)
    close(sep[0], a, 1e-5)
    close(sep[1], b, 1e-5)
    assert maxabs(both[0], both[1]) > 1e-3


def test_image_guidance_branch(fx):
    model, inputs, _, meta = fx
    hw = tuple(meta["inference_t2i"]["image_hw"])
    x = inputs["t2i_step_init_noise"]
    ctx = prompt_context(model, meta)
    unc_img = Context(model).add_text([7, 8])
    kw = dict(hw=hw, num_timesteps=3, cfg_interval=(0.0, 1.0), init_noise=x)
    with_img = generate_image(model, ctx, None, unc_img, cfg_img_scale=2.0, **kw)
    without = generate_image(model, ctx, None, None, cfg_img_scale=2.0, **kw)
    scale_one = generate_image(model, ctx, None, unc_img, cfg_img_scale=1.0, **kw)
    close(scale_one, without, 1e-6)
    assert maxabs(with_img, without) > 1e-4
    # the guidance rule itself, stage by stage
    v, u_t, u_i = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(0)).unbind(0)
    v_text = u_t + 4.0 * (v - u_t)
    v2 = u_i + 2.0 * (v_text - u_i)
    want = v2 * (v.norm() / (v2.norm() + 1e-8)).clamp(0, 1)
    close(guide(v, u_t, u_i, cfg_text_scale=4.0, cfg_img_scale=2.0), want, 1e-6)
    want_ch = v2 * (v.norm(dim=-1, keepdim=True) / (v2.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    close(guide(v, u_t, u_i, cfg_text_scale=4.0, cfg_img_scale=2.0, renorm_type="channel"), want_ch, 1e-6)
    v_text_r = v_text * (v.norm(dim=-1, keepdim=True) / (v_text.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    close(guide(v, u_t, u_i, cfg_text_scale=4.0, cfg_img_scale=2.0, renorm_type="text_channel"),
          u_i + 2.0 * (v_text_r - u_i), 1e-6)
    with pytest.raises(ValueError, match="renorm"):
        guide(v, u_t, renorm_type="bogus")


def test_greedy_understanding_decode(fx):
    model, inputs, exp, meta = fx
    iu = meta["inference_understanding"]
    ctx = Context(model).add_vit_image(inputs["vit_image"])
    assert (ctx.length, ctx.position) == (iu["vit_stage"]["kv_lens"][0], iu["vit_stage"]["ropes"][0])
    prompt_ids = iu["prompt_stage"]["packed_text_ids"][1:-1]
    ctx.add_text(prompt_ids)
    assert (ctx.length, ctx.position) == (iu["prompt_stage"]["kv_lens"][0], iu["prompt_stage"]["ropes"][0])
    n = iu["max_length"]
    out = generate_text(ctx, n, return_logits=True)
    assert out.ids[0] == iu["start_token"]
    assert out.ids[:n] == exp["und_generated_ids"].tolist()
    close(out.logits[:n], exp["und_decode_logits"])
    # the context is unchanged: decoding again gives the same tokens
    assert (ctx.length, ctx.position) == (20, 7)
    assert generate_text(ctx, n).ids == out.ids


def test_context_cache_equals_training_path(fx):
    """Text, ViT and clean VAE context prefilled one item at a time over the cache gives the same
    keys/values as the packed training forward of the same segments (positions, experts, t = 0)."""
    model, inputs, _, _ = fx
    latent = model.vae.encode_mean(inputs["target_image"][None])[0]
    p_ids, q_ids = [64, 277, 272], [282, 272]
    segs = [Segment(Kind.TEXT, text_ids=p_ids), Segment(Kind.VIT_IMAGE, image=inputs["vit_image"]),
            Segment(Kind.TEXT, text_ids=q_ids), Segment(Kind.VAE_CLEAN, image=inputs["target_image"])]
    batch = pack([segs], pack_config_for(model.cfg))
    with torch.no_grad():
        seq, _ = model.embed(batch, clean_latent_tokens=model.patchify(latent))
        spec = AttentionSpec.from_splits(batch.attention, batch.sequence_length)
        experts = model.expert_index(batch.functionality, batch.token_kind)
        _, ref = model.language_model.model(seq, batch.position_ids, experts, spec, use_cache=True)
    ctx = Context(model).add_text(p_ids).add_vit_image(inputs["vit_image"]).add_text(q_ids)
    ctx.add_vae_image(latent=latent)
    assert ctx.length == batch.sequence_length
    assert ctx.position == int(batch.position_ids.max()) + 1
    for (k, v), (rk, rv) in zip(ctx.cache, ref):
        close(k, rk, 1e-5)
        close(v, rv, 1e-5)


def test_batched_text_prefill_and_copy(fx):
    model, _, _, _ = fx
    a, b = Context(model).add_text([1, 2, 3]), Context(model)
    a_fork = a.copy()
    prefill_texts([a, b], [[4, 5], [6, 7, 8, 9]])
    ref_a = Context(model).add_text([1, 2, 3]).add_text([4, 5])
    ref_b = Context(model).add_text([6, 7, 8, 9])
    for ctx, ref in ((a, ref_a), (b, ref_b)):
        assert (ctx.length, ctx.position) == (ref.length, ref.position)
        for (k, v), (rk, rv) in zip(ctx.cache, ref.cache):
            close(k, rk, 1e-5)
            close(v, rv, 1e-5)
    # the fork taken before is untouched
    assert (a_fork.length, a_fork.position) == (5, 5)
    assert a_fork.cache[0][0].shape[1] == 5


def test_expert_routing_reaches_the_generation_expert(fx):
    """VAE tokens of the query block must go to the generation weights: routing them to the
    understanding expert changes the velocity."""
    model, inputs, exp, meta = fx
    ctx = prompt_context(model, meta)
    hw = tuple(meta["inference_t2i"]["image_hw"])
    t = torch.tensor(meta["inference_t2i"]["t"])
    from ftkit.infer.context import vae_token_embeds

    body = vae_token_embeds(model, inputs["t2i_step_init_noise"], t.expand(6), (2, 3))
    good = image_block(model, body, ctx.position, int(Functionality.GENERATIVE), TOKEN_VAE)
    bad = image_block(model, body, ctx.position, int(Functionality.LINGUISTIC), 0)
    with torch.no_grad():
        (hg,), _ = forward_blocks(model, [ctx.cache], [good])
        (hb,), _ = forward_blocks(model, [ctx.cache], [bad])
    close(model.llm2vae(hg[1:-1]), exp["t2i_step_v_cond"])
    assert maxabs(model.llm2vae(hb[1:-1]), exp["t2i_step_v_cond"]) > 1e-2
    assert hw == (32, 48)


def test_three_expert_model_runs_the_same_context(fixture_dir, fx):
    """An upcycled 3-expert model (semantic expert = copy of understanding) gives the same
    understanding decode: ViT tokens now go to ``_moe_sem`` through ``model.expert_index``."""
    model, inputs, exp, meta = fx
    m3 = load_bagel(fixture_dir, dtype=torch.float32, three_experts=True, load_vae=False)
    assert len(m3.cfg.experts) == 3
    iu = meta["inference_understanding"]
    ctx = Context(m3).add_vit_image(inputs["vit_image"]).add_text(iu["prompt_stage"]["packed_text_ids"][1:-1])
    out = generate_text(ctx, 3, return_logits=True)
    assert out.ids[:3] == exp["und_generated_ids"].tolist()
    close(out.logits, exp["und_decode_logits"])


def test_bad_inputs_raise(fx):
    model, inputs, _, _ = fx
    ctx = Context(model)
    with pytest.raises(ValueError, match="multiple"):
        velocity(ctx, torch.zeros(6, 64), 0.5, (30, 48))
    with pytest.raises(ValueError, match="patch size"):
        ctx.add_vit_image(torch.zeros(3, 40, 56))
    with pytest.raises(ValueError, match="exactly one"):
        ctx.add_vae_image()
    with pytest.raises(ValueError, match="init_noise"):
        generate_image(model, ctx, hw=(32, 48), num_timesteps=3, init_noise=torch.zeros(5, 64))
    with pytest.raises(ValueError, match="vocabulary"):
        text_block(model, [model.cfg.llm.vocab_size], 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text(ctx, 0)


def test_vae_image_from_pixels_matches_given_latent(fx):
    model, inputs, _, _ = fx
    img = inputs["target_image"]
    eps = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(7))
    lat_sample = model.vae.sample_latent(img[None], eps=eps)[0]
    lat_mean = model.vae.encode_mean(img[None])[0]
    for kw, lat in (({"posterior": "sample", "generator": torch.Generator().manual_seed(7)}, lat_sample),
                    ({"posterior": "mean"}, lat_mean)):
        a = Context(model).add_text([5]).add_vae_image(img, **kw)
        b = Context(model).add_text([5]).add_vae_image(latent=lat)
        assert (a.length, a.position) == (b.length, b.position) == (3 + 14, 4)
        for (k, v), (rk, rv) in zip(a.cache, b.cache):
            close(k, rk, 1e-6)
            close(v, rv, 1e-6)


def test_plan_guidance(fx):
    """GoT's plan guidance: v = u_text + s_text (u_plan - u_text) + s_plan (v - u_plan)."""
    model, inputs, _, meta = fx
    hw = tuple(meta["inference_t2i"]["image_hw"])
    gc = GuidanceContexts(model).add_user_text(meta["inference_t2i"]["prompt_ids"])
    assert gc.uncond_plan is None
    prompt_len = gc.cond.length
    gc.add_generated_text([7, 8, 9]).add_generated_text([10])
    assert gc.uncond_plan.length == prompt_len  # the context before everything generated since the last image
    kw = dict(hw=hw, num_timesteps=4, cfg_interval=(0.0, 1.0), cfg_text_scale=4.0,
              init_noise=[inputs["t2i_full_init_noise"]])
    plain = generate_images(model, [gc.cond], [gc.uncond_text], **kw)[0]
    for scale, same in ((4.0, True), (1.0, False), (8.0, False)):  # the plan scale = the text scale: plain guidance
        got = generate_images(model, [gc.cond], [gc.uncond_text], uncond_plans=[gc.uncond_plan],
                              cfg_plan_scale=scale, **kw)[0]
        assert (maxabs(got, plain) <= 1e-5) == same, scale
    # no plan in the context (the plan branch is the conditional one): any plan scale is plain guidance
    t2i = GuidanceContexts(model).add_user_text(meta["inference_t2i"]["prompt_ids"])
    base = generate_images(model, [t2i.cond], [t2i.uncond_text], **kw)[0]
    close(generate_images(model, [t2i.cond], [t2i.uncond_text], uncond_plans=[t2i.cond.copy()], cfg_plan_scale=1.0,
                          **kw)[0], base, 1e-5)
    # without a scale the plan branch is ignored; an image resets it
    close(generate_images(model, [gc.cond], [gc.uncond_text], uncond_plans=[gc.uncond_plan], **kw)[0], plain, 0)
    x = torch.rand(hw[0], hw[1], 3)
    from PIL import Image
    gc.add_image(Image.fromarray((x.numpy() * 255).astype("uint8")), vit=False)
    assert gc.uncond_plan is None
