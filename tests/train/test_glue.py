"""Where the pieces join: MCoTModule's loss total against its configured weights on a real tiny BAGEL
and a packed MCoT batch, and the validator on inverted boxes."""

from __future__ import annotations

import json

import pytest
import torch

from ftkit.data.packer import pack
from ftkit.segments import STEP_NAMES, Kind, Segment, Step
from ftkit.testing import pack_config_for
from ftkit.train import losses as Ls
from ftkit.train.datamodule import BatchItem
from ftkit.train.losses import LossWeights

WEIGHTS = {"ce": 0.7, "mse": 1.3, "spatial": 2.5, "kl_prior": 0.4, "semantic": 3.0,
           "steps": {"plan": 2.0, "reflect": 0.25, "draft": 1.5, "refine": 0.5}}
TERMS = ("ce", "mse", "spatial", "kl_prior", "semantic")


def _img(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    return torch.rand(3, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def module(fixture_dir):
    """MCoTModule on the bagel-tiny release folder with LoRA on every expert (B perturbed so the adapted
    model differs from the base one and the KL term is not 0)."""
    from ftkit.train.module import MCoTModule

    m = MCoTModule(model_path=str(fixture_dir), dtype="fp32", kernels="torch", attn_impl="sdpa", seed=3,
                   adapter={"method": "lora", "preset": "all-experts", "r": 4, "alpha": 8}, loss=WEIGHTS)
    m.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def item(module):
    """Two samples: plan, noisy draft + its clean and ViT copies, reflection, refinement of the draft
    (top-left token flagged); and a noisy draft alone. Every loss term has something to measure."""
    g = torch.Generator().manual_seed(1)
    cfg = module.model.cfg
    draft = _img(g, 32, 32)
    flagged = torch.zeros(32, 32, dtype=torch.bool)
    flagged[:16, :16] = True
    s0 = [
        Segment(Kind.TEXT, Step.CONTEXT, text_ids=[20, 21, 22]),
        Segment(Kind.TEXT, Step.PLAN, text_ids=[30, 31, 32, 33], loss=True, end_label=cfg.start_of_image),
        Segment(Kind.VAE_NOISY, Step.DRAFT, image=draft, loss=True),
        Segment(Kind.VAE_CLEAN, Step.DRAFT, image=draft),
        Segment(Kind.VIT_IMAGE, Step.DRAFT, image=_img(g, 28, 28)),
        Segment(Kind.TEXT, Step.REFLECT, text_ids=[40, 41], loss=True, end_label=cfg.start_of_image),
        Segment(Kind.VAE_NOISY, Step.REFINE, image=_img(g, 32, 32), loss=True, region_mask=flagged, pair_with=3),
    ]
    s1 = [Segment(Kind.TEXT, Step.CONTEXT, text_ids=[23, 24]),
          Segment(Kind.VAE_NOISY, Step.DRAFT, image=_img(g, 32, 48), loss=True)]
    for segs in (s0, s1):
        for s in segs:
            if s.kind == Kind.VAE_NOISY:
                s.timestep_logit = float(torch.randn((), generator=g))
    batch = pack([s0, s1], pack_config_for(cfg))
    assert batch.vae_pair_with == [-1, -1, 1, -1]
    assert set(batch.ce_step.tolist()) == {int(Step.PLAN), int(Step.REFLECT)}
    assert set(batch.mse_step.tolist()) == {int(Step.DRAFT), int(Step.REFINE)}
    return BatchItem(batch, index=5, num_samples=2)


def _total_from_logs(lw: LossWeights, logs: dict) -> torch.Tensor:
    return sum(getattr(lw, t) * logs[t] for t in TERMS)


def test_total_is_the_configured_weighted_sum(module, item):
    lw = module.loss_weights
    assert (lw.ce, lw.mse, lw.spatial, lw.kl_prior, lw.semantic) == tuple(WEIGHTS[t] for t in TERMS)
    for index in (0, 5, 11):  # every step: other draws (noise, posterior), same identity
        with torch.no_grad():
            total, logs = module.compute_losses(BatchItem(item.batch, index, item.num_samples))
        assert set(TERMS) <= set(logs), sorted(logs)
        for t in TERMS:
            assert logs[t].item() > 1e-6, f"term {t} is {logs[t].item()}: the batch does not exercise it"
        want = _total_from_logs(lw, logs)
        assert torch.allclose(total, want, rtol=1e-6, atol=0), (
            f"step {index}: total {total.item():.6f} != sum of weight * term {want.item():.6f} "
            f"({ {t: logs[t].item() for t in TERMS} })")
        torch.testing.assert_close(logs["total"], total.detach())


@pytest.mark.parametrize("term", TERMS)
def test_each_weight_scales_its_own_term(module, item, term):
    """Raising one weight by 1 raises the total by exactly that term's logged value (draws are a pure
    function of (seed, batch index), so both calls see the same noise)."""
    base = module.loss_weights
    try:
        with torch.no_grad():
            total, logs = module.compute_losses(item)
            module.loss_weights = LossWeights(**{**WEIGHTS, term: WEIGHTS[term] + 1.0})
            total2, logs2 = module.compute_losses(item)
    finally:
        module.loss_weights = base
    for t in TERMS:
        torch.testing.assert_close(logs2[t], logs[t], msg=f"term {t} changed when only w_{term} did")
    torch.testing.assert_close(total2 - total, logs[term], rtol=1e-5, atol=1e-6,
                               msg=f"w_{term} + 1 did not add the {term} term to the total")


def test_terms_are_ftkits_loss_functions_with_the_step_weights(module, item):
    """Recompute every term from one forward with the module's own draws and ftkit's loss functions."""
    m, b, lw = module.model, item.batch, module.loss_weights
    eps, noise = module._draws(item)
    kw = dict(flow_noise=noise, vae_posterior_eps=eps, timestep_shift=module.hparams.timestep_shift, attn_impl="sdpa")
    with torch.no_grad():
        _, logs = module.compute_losses(item)
        out = m(b, **kw)
        from ftkit.adapters.attach import adapters_disabled

        with adapters_disabled(m):
            base = m(b, **kw)
    head = m.language_model.lm_head.weight
    sw = lw.step_weights()
    assert sw[int(Step.PLAN)] == 2.0 and sw[int(Step.REFINE)] == 0.5
    ce_tok = Ls.per_token_ce(out.ce_hidden, head, b.ce_labels)
    ce, ce_per = Ls.step_breakdown(ce_tok, b.ce_step, sw)
    mse_tok = Ls.flow_mse_per_token(out.velocity_pred, out.velocity_target)
    mse, mse_per = Ls.step_breakdown(mse_tok, b.mse_step, sw)
    # the step weights change CE / MSE (not the plain token mean)
    assert abs(ce.item() - ce_tok.mean().item()) > 1e-4 and abs(mse.item() - mse_tok.mean().item()) > 1e-4
    rows = out.flow.rows
    reason = (b.ce_step == int(Step.PLAN)) | (b.ce_step == int(Step.REFLECT))
    want = {
        "ce": ce,
        "mse": mse,
        "spatial": Ls.spatial_consistency_from_batch(b, out.flow, rows, out.velocity_pred),
        "semantic": Ls.semantic_consistency_from_batch(b, out.flow, rows, out.velocity_pred),
        "kl_prior": Ls.kl_prior_preservation(out.ce_hidden[reason], base.ce_hidden[reason], head),
    }
    for t, v in want.items():
        torch.testing.assert_close(logs[t], v, rtol=1e-5, atol=1e-6, msg=f"logged {t}")
    for s, v in ce_per.items():
        torch.testing.assert_close(logs[f"ce/{STEP_NAMES[Step(s)]}"], v)
    for s, v in mse_per.items():
        torch.testing.assert_close(logs[f"mse/{STEP_NAMES[Step(s)]}"], v)


def test_total_backpropagates_into_the_adapters(module, item):
    module.zero_grad(set_to_none=True)
    total, _ = module.compute_losses(item)
    total.backward()
    grads = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") for n in grads)
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    module.zero_grad(set_to_none=True)


def test_region_noise_refine_loss_is_the_flagged_tokens_mean(module, item):
    """model.region_noise: the refinement's flow loss is the mean over its flagged token only (the rest is held
    at the draft), the draft's loss is unchanged, and the total still backpropagates."""
    from ftkit.train import losses as Ls

    module.hparams.region_noise = True
    try:
        total, logs = module.compute_losses(item)
        out = module.model(item.batch, **dict(zip(("vae_posterior_eps", "flow_noise"), module._draws(item))),
                           timestep_shift=module.hparams.timestep_shift, attn_impl="sdpa", region_noise=True)
    finally:
        module.hparams.region_noise = False
    keep = out.extras["mse_keep"]
    steps = item.batch.mse_step[keep]
    assert int((steps == int(Step.REFINE)).sum()) == 1 and int((item.batch.mse_step == int(Step.REFINE)).sum()) == 4
    per_tok = Ls.flow_mse_per_token(out.velocity_pred, out.velocity_target)
    torch.testing.assert_close(logs["mse/refine"], per_tok[steps == int(Step.REFINE)].mean())
    _, logs_off = module.compute_losses(item)
    torch.testing.assert_close(logs["mse/draft"], logs_off["mse/draft"])
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_" in n)
    module.zero_grad(set_to_none=True)


def test_adapter_records_the_inpaint_mode_it_was_trained_for(module, fixture_dir, tmp_path):
    """``--inpaint auto`` reads ``region_noise`` from the adapter folder (AdapterExport writes it)."""
    from ftkit.adapters.io import save_adapter
    from ftkit.infer.load import adapter_inpaint

    for flag, want in ((True, "clean"), (False, "path")):
        save_adapter(module.model, None, tmp_path / want, base_path=str(fixture_dir), extra={"region_noise": flag})
        assert adapter_inpaint(tmp_path / want) == want
    save_adapter(module.model, None, tmp_path / "older", base_path=str(fixture_dir))  # written before the flag
    assert adapter_inpaint(tmp_path / "older") == "path"


# ------------------------------------------------------------------------------------- validator


def _png(path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(path)


@pytest.mark.parametrize(
    "where, box",
    [("plan", [600, 100, 200, 500]),  # x0 > x1
     ("plan", [100, 600, 500, 200]),  # y0 > y1
     ("plan", [300, 100, 300, 500]),  # x0 = x1: empty
     ("region", [900, 0, 100, 1000])],  # x0 > x1 in a reflection region
)
def test_validator_rejects_inverted_boxes(tmp_path, where, box):
    from ftkit.data.schema import StepRecord, box_problem
    from ftkit.data.validate import validate
    from ftkit.errors import FtkitError

    _png(tmp_path / "ok.png")
    good = [100, 100, 500, 500]
    steps = [{"type": "plan", "caption": "c", "boxes": [{"label": "c", "box": box if where == "plan" else good}]},
             {"type": "draft", "image": "ok.png"},
             {"type": "reflect", "verdict": "revise", "critique": "x",
              "regions": [{"box": box if where == "region" else good, "label": "c", "kind": "missing"}]}]
    rec = {"id": "r0", "task": "t2i", "prompt": "p", "steps": steps}
    ok = {**rec, "id": "r1", "steps": [{**steps[0], "boxes": [{"label": "c", "box": good}]}, steps[1],
                                       {**steps[2], "regions": [{**steps[2]["regions"][0], "box": good}]}]}
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(rec) + "\n" + json.dumps(ok) + "\n")
    report = validate(f)
    field = "steps[0].boxes[0].box" if where == "plan" else "steps[2].regions[0].box"
    assert not report.ok and report.good == 1, report.summary()
    assert [(p.index, p.field, p.kind) for p in report.problems] == [("line 1", field, "box")]
    assert "needs x0 < x1 and y0 < y1" in str(report.problems[0]) and str(f) in str(report.problems[0])
    assert box_problem(box) is not None and box_problem(good) is None
    with pytest.raises(FtkitError, match=field.replace("[", r"\[").replace("]", r"\]")):
        StepRecord.from_dict(rec, source=f, index=0)


def test_init_adapter_continues_a_saved_adapter(module, fixture_dir, tmp_path):
    """A second round starts from the first round's adapter: same weights, trainable, with its saved config
    (which replaces the recipe's)."""
    from ftkit.adapters.io import save_adapter
    from ftkit.train.module import MCoTModule

    save_adapter(module.model, None, tmp_path / "round1", base_path=str(fixture_dir))
    m2 = MCoTModule(model_path=str(fixture_dir), dtype="fp32", kernels="torch", attn_impl="sdpa",
                    adapter={"method": "lora", "preset": "generative", "r": 2, "alpha": 2},
                    init_adapter=str(tmp_path / "round1"))
    m2.configure_model()
    assert m2.adapter_cfg.r == 4 and m2.adapter_cfg.preset == "all-experts"
    saved = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    now = {n: p for n, p in m2.model.named_parameters() if p.requires_grad}
    assert saved.keys() == now.keys() and any("lora_B" in n for n in now)
    for n, p in now.items():
        torch.testing.assert_close(p, saved[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_adapter"):
        MCoTModule(model_path=str(fixture_dir), full_finetune=True, init_adapter=str(tmp_path / "round1")).configure_model()


def test_lr_scale_trains_each_expert_at_its_rate(fixture_dir, item):
    """One AdamW step moves each weight by ~lr * sign(grad): the generative expert's LoRA and the flow
    connector by 0.25 lr, the understanding expert's LoRA by lr."""
    from ftkit.models.experts import parameter_experts
    from ftkit.train.module import MCoTModule

    lr = 1e-3
    m = MCoTModule(model_path=str(fixture_dir), dtype="fp32", kernels="torch", attn_impl="sdpa", lr=lr, warmup_steps=0,
                   lr_scale={"generative": 0.25}, adapter={"method": "lora", "preset": "all-experts", "r": 4,
                                                           "alpha": 8, "modules_to_save": ["llm2vae"]})
    m.configure_model()
    owner = parameter_experts(m.model)
    assert owner["llm2vae.weight"] == "_moe_gen" and owner["language_model.lm_head.weight"] == ""
    opt = m.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in m.model.named_parameters() if p.requires_grad}
    total, _ = m.compute_losses(item)
    total.backward()
    opt.step()
    moved: dict[str, float] = {}
    for n, p in m.model.named_parameters():
        if n in before and ("lora_B" in n or n.startswith("llm2vae")):
            key = "connector" if n.startswith("llm2vae") else owner[n]
            moved[key] = max(moved.get(key, 0.0), (p.detach() - before[n]).abs().max().item())
    assert set(moved) == {"", "_moe_gen", "connector"}, moved
    assert moved[""] == pytest.approx(lr, rel=1e-3)
    assert moved["_moe_gen"] == pytest.approx(0.25 * lr, rel=1e-3)
    assert moved["connector"] == pytest.approx(0.25 * lr, rel=1e-3)


@pytest.mark.parametrize("scale, match", [({"vision": 0.5}, "unknown expert 'vision'"),
                                          ({"generative": 0.0}, "finite number > 0"),
                                          ({"understanding": 1.0, "linguistic": 2.0}, "same expert")])
def test_lr_scale_refuses_bad_values(fixture_dir, scale, match):
    from ftkit.train.module import MCoTModule

    with pytest.raises(ValueError, match=match):
        MCoTModule(model_path=str(fixture_dir), adapter={"r": 4}, lr_scale=scale)


def test_lr_scale_names_an_expert_the_model_lacks(fixture_dir):
    from ftkit.train.module import MCoTModule

    m = MCoTModule(model_path=str(fixture_dir), dtype="fp32", kernels="torch", adapter={"r": 4},
                   lr_scale={"semantic": 0.5})
    m.configure_model()
    with pytest.raises(ValueError, match="no semantic expert"):
        m.configure_optimizers()
