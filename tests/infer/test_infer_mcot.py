"""Mechanics of the plan -> draft -> reflect -> refine loop on the bagel-tiny model (random weights:
its text never parses as a reflection, so only the loop, the trace and the files are checked)."""

import json

import numpy as np
import pytest
import torch

from ftkit.data.serialize import parse_plan
from ftkit.infer.mcot import (
    SamplerSettings,
    TextSettings,
    Trace,
    contact_sheet,
    default_vit_hw,
    run_mcot,
    text_to_image,
)
from ftkit.infer.sampler import latent_grid
from ftkit.models.loading import load_bagel, load_tokenizer
from ftkit.testing import ScriptedTokenizer

FAST = SamplerSettings(num_timesteps=3)
SHORT = TextSettings(max_plan_tokens=8, max_reflect_tokens=8)


@pytest.fixture(scope="module")
def mt(fixture_dir):
    return load_bagel(fixture_dir, dtype=torch.float32), load_tokenizer(fixture_dir)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_runs_to_the_round_limit(mt, tmp_path):
    model, tok = mt
    # posterior "mean": context images draw nothing, so the generator feeds only each round's initial noise
    kw = dict(image_hw=(32, 48), sampler=FAST, text=SHORT, posterior="mean")
    tr = run_mcot(model, tok, "a red cube left of a blue ball", rounds=2, generator=gen(0), **kw)
    assert len(tr.rounds) == 2  # random weights never say "ok"
    assert tr.plan is not None and tr.plan_text is not None
    for r in tr.rounds:
        assert r.image.size == (48, 32) and r.image.mode == "RGB"
        assert r.verdict == "revise"
        assert r.reflection is None and r.parse_error  # unparseable text is recorded, not fatal
        assert isinstance(r.reflection_text, str)
    assert tr.final_image is tr.rounds[-1].image
    assert not tr.stopped_ok
    assert tr.settings["image_hw"] == [32, 48] and tr.settings["vit_hw"] == [28, 42]
    # the refinement is conditioned on more context (draft + reflection), so it differs from an image drawn
    # from the same initial noise on the draft's context: skip the draft's noise, then generate a draft
    g = gen(0)
    gh, gw = latent_grid(model, (32, 48))
    torch.randn(gh * gw, model.cfg.patch_latent_dim, generator=g)
    same_noise = run_mcot(model, tok, "a red cube left of a blue ball", rounds=1, generator=g, **kw)
    assert same_noise.plan_text == tr.plan_text
    a, b = (np.asarray(im, dtype=np.int64) for im in (tr.rounds[1].image, same_noise.rounds[0].image))
    assert np.abs(a - b).max() > 0, "the refinement ignored its context: same image as a draft from the same noise"

    # JSON round trip, with embedded images and with files
    back = Trace.from_json(tr.to_json(embed_images=True))
    assert back.to_dict() == tr.to_dict()
    for r0, r1 in zip(tr.rounds, back.rounds):
        assert np.array_equal(np.asarray(r0.image), np.asarray(r1.image))
    paths = tr.save(tmp_path, "p0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0.json", "p0.png", "p0_0.png", "p0_1.png", "p0_sheet.png"]
    d = json.loads(paths["json"].read_text())
    assert [r["image"] for r in d["rounds"]] == ["p0_0.png", "p0_1.png"] and d["final_round"] == 1
    loaded = Trace.from_json(paths["json"].read_text(), base_dir=tmp_path)
    assert np.array_equal(np.asarray(loaded.final_image), np.asarray(tr.final_image))
    sheet = contact_sheet(tr, cell=96)
    assert sheet.size == (96 * 5, 96 + 16)  # prompt/plan + 2 x (image, reflection)


def test_same_seed_same_trace_and_one_round(mt):
    model, tok = mt
    kw = dict(rounds=1, image_hw=(32, 32), sampler=FAST, text=SHORT, plan=False)
    a = run_mcot(model, tok, "a cube", generator=gen(1), **kw)
    b = run_mcot(model, tok, "a cube", generator=gen(1), **kw)
    c = run_mcot(model, tok, "a cube", generator=gen(2), **kw)
    assert len(a.rounds) == 1 and a.plan is None and a.plan_text is None
    assert np.array_equal(np.asarray(a.final_image), np.asarray(b.final_image))
    assert a.rounds[0].reflection_text == b.rounds[0].reflection_text
    assert not np.array_equal(np.asarray(a.final_image), np.asarray(c.final_image))


def test_parsed_plan_and_ok_verdict_stop_the_loop(mt):
    model, tok = mt
    plan = "a red cube\n<box>red cube [100,200,500,600]</box>"
    scripted = ScriptedTokenizer(tok, [plan, "<verdict>ok</verdict>\nlooks right"])
    tr = run_mcot(model, scripted, "a red cube", rounds=3, image_hw=(32, 32), sampler=FAST, text=SHORT,
                  generator=gen(0))
    assert tr.plan == parse_plan(plan) and tr.plan_parse_error is None
    assert len(tr.rounds) == 1 and tr.stopped_ok
    assert tr.rounds[0].reflection.critique == "looks right"
    assert Trace.from_json(tr.to_json()).plan.boxes[0].box == (100, 200, 500, 600)


def test_revise_then_ok(mt):
    model, tok = mt
    texts = ["a cube", "<verdict>revise</verdict>\ntoo small\n<region>attribute cube [0,0,500,500]</region>",
             "<verdict>ok</verdict>"]
    tr = run_mcot(model, ScriptedTokenizer(tok, texts), "a cube", rounds=4, image_hw=(32, 32), sampler=FAST,
                  text=SHORT, generator=gen(0))
    assert [r.verdict for r in tr.rounds] == ["revise", "ok"]
    assert tr.rounds[0].reflection.regions[0].kind == "attribute"


def test_edit_input_and_text_to_image(mt):
    model, tok = mt
    src = text_to_image(model, tok, "a cube", image_hw=(32, 32), sampler=FAST, generator=gen(4))
    assert src.size == (32, 32)
    again = text_to_image(model, tok, "a cube", image_hw=(32, 32), sampler=FAST, generator=gen(4))
    assert np.array_equal(np.asarray(src), np.asarray(again))
    kw = dict(rounds=1, image_hw=(32, 32), sampler=FAST, text=SHORT, plan=False)
    tr = run_mcot(model, tok, "make it blue", input_image=src, generator=gen(0), **kw)
    assert tr.settings["edit"] and tr.final_image.size == (32, 32)
    # the input image is read: same seed (same draws) with another input image gives another output ...
    other_src = text_to_image(model, tok, "a ball", image_hw=(32, 32), sampler=FAST, generator=gen(5))
    assert not np.array_equal(np.asarray(src), np.asarray(other_src))
    other = run_mcot(model, tok, "make it blue", input_image=other_src, generator=gen(0), **kw)
    assert not np.array_equal(np.asarray(tr.final_image), np.asarray(other.final_image)), "input image ignored"
    # ... and without an input image (posterior "mean": the input draws nothing, the noise is the same)
    mean_kw = dict(kw, posterior="mean")
    edit = run_mcot(model, tok, "make it blue", input_image=src, generator=gen(0), **mean_kw)
    plain = run_mcot(model, tok, "make it blue", generator=gen(0), **mean_kw)
    assert not plain.settings["edit"]
    assert not np.array_equal(np.asarray(edit.final_image), np.asarray(plain.final_image)), "input image ignored"


def test_bad_arguments(mt):
    model, tok = mt
    with pytest.raises(ValueError, match="rounds"):
        run_mcot(model, tok, "x", rounds=0)
    with pytest.raises(ValueError, match="multiples"):
        run_mcot(model, tok, "x", image_hw=(30, 32), sampler=FAST, text=SHORT, plan=False)
    with pytest.raises(ValueError, match="does not parse"):
        Trace.from_json("{")
    assert default_vit_hw(model, (64, 64)) == (56, 56)
    assert default_vit_hw(model, (1024, 1024)) == (112, 112)  # capped by the tiny ViT table (8 patches)
