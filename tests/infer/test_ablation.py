"""The batched ablation on the bagel-tiny model (random weights: the mechanics, not the scores):
inpainting keeps the latent outside the regions bit for bit; batched sampling and decoding equal the
unbatched paths; every mode runs end to end and writes its JSON, Markdown and contact sheets."""

import json
import math

import numpy as np
import pytest
import torch

from ftkit.adapters.attach import adapters_disabled, attach_adapters
from ftkit.adapters.config import AdapterConfig
from ftkit.data.schema import PlanStep, ReflectStep, Region
from ftkit.infer.ablation import (
    ALL_ABLATION_MODES,
    PLANNED_MODES,
    ablation_records,
    flagged_tokens,
    paired_bootstrap,
    plan_right,
    region_token_mask,
    run_ablation,
    threshold_sweep,
)
from ftkit.infer.context import GuidanceContexts
from ftkit.infer.mcot import (
    SamplerSettings,
    TextSettings,
    _Text,
    acted_verdict,
    revise_probability,
    run_mcot,
    text_to_image,
)
from ftkit.infer.sampler import GeneratedText, generate_images, generate_text, generate_texts, latent_grid
from ftkit.models.bagel import timestep_schedule
from ftkit.models.loading import load_bagel, load_tokenizer
from ftkit.testing import ScriptedTokenizer

HW = (32, 32)


@pytest.fixture(scope="module")
def mt(fixture_dir):
    return load_bagel(fixture_dir, dtype=torch.float32), load_tokenizer(fixture_dir)


def _conds(model, tok, prompts):
    out = []
    for p in prompts:
        gc = GuidanceContexts(model)
        gc.add_user_text(tok.encode(p, add_special_tokens=False))
        out.append(gc)
    return out


def _noise(model, n, seed=0):
    gh, gw = latent_grid(model, HW)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(gh * gw, model.cfg.patch_latent_dim, generator=g) for _ in range(n)]


def test_inpainting_keeps_the_outside_bitwise_at_every_step(mt):
    model, tok = mt
    (gc,) = _conds(model, tok, ["a photo of a red circle"])
    gh, gw = latent_grid(model, HW)
    z, eps = _noise(model, 2, seed=3)
    mask = region_token_mask([[0, 0, 500, 500]], (gh, gw))
    assert 0 < int(mask.sum()) < gh * gw
    steps = 6
    ts = timestep_schedule(steps, 3.0)
    seen = []

    def cb(i, t, xs):
        seen.append(i)
        want = (1 - ts[i + 1]) * z + ts[i + 1] * eps
        assert torch.equal(xs[0][~mask], want[~mask]), i  # bit for bit
        assert not torch.equal(xs[0][mask], want[mask])  # the region is the model's own

    (x,) = generate_images(model, [gc.cond], [gc.uncond_text], hw=HW, num_timesteps=steps, init_noise=[eps],
                           keep=[(z, mask)], callback=cb)
    assert seen == list(range(steps - 1))
    assert torch.equal(x[~mask], z[~mask])  # t = 0: the draft itself
    # without keep the same noise and context give another image everywhere
    (free,) = generate_images(model, [gc.cond], [gc.uncond_text], hw=HW, num_timesteps=steps, init_noise=[eps])
    assert not torch.equal(free[~mask], z[~mask])
    with pytest.raises(ValueError, match="keep"):
        generate_images(model, [gc.cond], hw=HW, num_timesteps=3, init_noise=[eps], keep=[(z, mask.float())])


def test_inpaint_clean_holds_the_draft_at_timestep_zero(mt):
    """Region-conditioned correction: outside the mask the state is the draft itself at every step (not its
    noisy path), and the model is told so (those tokens enter at timestep 0), which changes the region."""
    model, tok = mt
    (gc,) = _conds(model, tok, ["a photo of a red circle"])
    gh, gw = latent_grid(model, HW)
    z, eps = _noise(model, 2, seed=3)
    mask = region_token_mask([[0, 0, 500, 500]], (gh, gw))
    seen = []

    def cb(i, t, xs):
        seen.append(i)
        assert torch.equal(xs[0][~mask], z[~mask]), i

    kw = dict(hw=HW, num_timesteps=5, init_noise=[eps], keep=[(z, mask)])
    (x,) = generate_images(model, [gc.cond], [gc.uncond_text], inpaint="clean", callback=cb, **kw)
    assert seen == list(range(4)) and torch.equal(x[~mask], z[~mask])
    (path,) = generate_images(model, [gc.cond], [gc.uncond_text], **kw)
    assert torch.equal(path[~mask], z[~mask]) and not torch.allclose(x[mask], path[mask])
    with pytest.raises(ValueError, match="inpaint 'hold'"):
        generate_images(model, [gc.cond], inpaint="hold", **kw)


def test_region_token_mask():
    m = region_token_mask([[0, 0, 250, 250], [760, 760, 1000, 1000]], (4, 4)).reshape(4, 4)
    assert m[0, 0] and m[3, 3] and int(m.sum()) == 2
    assert region_token_mask([[240, 0, 260, 10]], (4, 4)).reshape(4, 4)[0, :2].all()  # overlap counts
    assert not region_token_mask([], (4, 4)).any()
    # a correction redraws under the reflection's regions, everything when it names none or did not parse
    refl = ReflectStep("revise", "x", [Region((0, 0, 250, 250), "red circle", "color")])
    assert torch.equal(flagged_tokens(refl, (4, 4)), region_token_mask([[0, 0, 250, 250]], (4, 4)))
    assert flagged_tokens(ReflectStep("revise", "x"), (4, 4)).all() and flagged_tokens(None, (2, 3)).shape == (6,)


def test_batched_equals_unbatched(mt):
    """Contexts of different lengths (prompts of 4 to 12 words, one with an image) in one call."""
    model, tok = mt
    prompts = ["a photo of a cross", "a photo of two rings and a big blue square on the left", "a photo of a ring"]
    gcs = _conds(model, tok, prompts)
    gcs[1].add_image(text_to_image(model, tok, "x", image_hw=HW, sampler=SamplerSettings(num_timesteps=2),
                                   generator=torch.Generator().manual_seed(0)), vae_hw=HW, vit_hw=(28, 28),
                     posterior="mean")
    assert len({g.cond.length for g in gcs}) == 3
    eps = _noise(model, 3, seed=1)
    gh, gw = latent_grid(model, HW)
    z = _noise(model, 1, seed=2)[0]
    keep = [None, (z, region_token_mask([[100, 100, 600, 900]], (gh, gw))), None]
    for inpaint in ("path", "clean"):  # "clean": the held tokens' timestep rides along every branch row
        kw = dict(hw=HW, num_timesteps=4, inpaint=inpaint)
        runs = [generate_images(model, [g.cond for g in gcs], [g.uncond_text for g in gcs],
                                [g.uncond_img for g in gcs], init_noise=eps, keep=keep, packed=packed, **kw)
                for packed in (True, 2)]
        for j, g in enumerate(gcs):
            (one,) = generate_images(model, [g.cond], [g.uncond_text], [g.uncond_img], init_noise=[eps[j]],
                                     keep=[keep[j]], **kw)
            for batched in runs:
                torch.testing.assert_close(batched[j], one, rtol=1e-5, atol=1e-5)

    texts = generate_texts([g.cond for g in gcs], 6, return_logits=True)
    for g, t in zip(gcs, texts):
        one = generate_text(g.cond, 6, return_logits=True)
        assert t.ids == one.ids and t.stopped == one.stopped
        torch.testing.assert_close(t.logits, one.logits, rtol=1e-5, atol=1e-5)
    # an int keeps only the first steps' logits, the same rows; the decoded text is unchanged
    for t, two, one in zip(texts, generate_texts([g.cond for g in gcs], 6, return_logits=2),
                           (generate_text(g.cond, 6, return_logits=2) for g in gcs)):
        assert two.ids == one.ids == t.ids and two.logits.shape[0] == one.logits.shape[0] == 2
        torch.testing.assert_close(two.logits, t.logits[:2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one.logits, t.logits[:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="return_logits"):
        generate_text(gcs[0].cond, 2, return_logits=0)


def test_paired_bootstrap():
    tags = ["a"] * 50 + ["b"] * 50
    a = [True] * 100
    b = [False] * 50 + [True] * 50
    d = paired_bootstrap(a, b, tags, n_boot=500)
    assert d["a"] == {"diff": 1.0, "lo": 1.0, "hi": 1.0} and d["b"]["diff"] == 0.0
    assert d["overall"]["diff"] == 0.5 and d["overall"]["lo"] == d["overall"]["hi"] == 0.5
    rng = np.random.default_rng(0)
    x, y = rng.random(200) < 0.6, rng.random(200) < 0.4
    d = paired_bootstrap(x, y, ["t"] * 200, n_boot=1000)
    assert d["t"]["lo"] < d["t"]["diff"] < d["t"]["hi"] and d["t"]["hi"] - d["t"]["lo"] < 0.3


def test_ablation_end_to_end(fixture_dir, tmp_path):
    model, tok = load_bagel(fixture_dir, dtype=torch.float32), load_tokenizer(fixture_dir)  # gets an adapter
    records, folder = ablation_records(4, seed=1011, size=32, cache_dir=tmp_path / "cache")
    assert (folder / "records.jsonl").is_file() and len(records) == 4
    assert ablation_records(4, seed=1011, size=32, cache_dir=tmp_path / "cache")[0] == records  # cached
    plans = ["a shape\n<box>circle square triangle cross ring [100,100,400,400]</box>"] * 4  # any missing class
    refls = [
        "<verdict>ok</verdict>",
        "<verdict>revise</verdict>\nwrong colour\n<region>color red circle [0,0,500,500]</region>",
        "not a reflection",
        "<verdict>ok</verdict>",
    ]
    checks = {1: "<verdict>ok</verdict>", 2: "<verdict>revise</verdict>\n<region>missing ring [0,0,900,900]</region>"}
    attach_adapters(model, AdapterConfig(r=4, init="gaussian"))
    for p in model.parameters():  # a visible adapter: B is zero at init
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    res = run_ablation(model, ScriptedTokenizer(tok, _script(plans, refls, 3, checks)), records, modes=ALL_ABLATION_MODES,
                       batch_size=3, image_hw=HW, sampler=SamplerSettings(num_timesteps=3), text=TextSettings(8, 8),
                       out_dir=tmp_path / "out", n_boot=200, progress=False)
    with adapters_disabled(model):  # the base mode really runs without the adapter
        base0 = text_to_image(model, tok, records[0]["prompt"], image_hw=HW,
                              sampler=SamplerSettings(num_timesteps=3), init_noise=_noise_of(model, 0))
    out = tmp_path / "out"
    img = {m: [np.asarray(_open(out / r[m]["image"])) for r in res["prompts"]] for m in ALL_ABLATION_MODES}
    assert np.abs(img["base"][0].astype(int) - np.asarray(base0).astype(int)).max() <= 1
    assert any(not np.array_equal(a, b) for a, b in zip(img["base"], img["t2i"]))
    refl = [r["reflection"] for r in res["prompts"]]
    assert [x["verdict"] for x in refl] == ["ok", "revise", "revise", "ok"]
    # mcot-verify: the correction judged ok is kept (mcot's image), the one judged revise gives the draft back
    assert np.array_equal(img["mcot-verify"][1], img["mcot"][1]) and not np.array_equal(img["mcot"][1], img["plan-act"][1])
    assert np.array_equal(img["mcot-verify"][2], img["plan-act"][2])
    assert [r.get("verify", {}).get("kept") for r in res["prompts"]] == [None, "correction", "draft", None]
    assert res["reflection"]["verify_kept"] == {"correction": 1, "draft": 1}
    assert set(res["reflection"]["correction"]) == {"mcot", "mcot-verify", "mcot-regen"}
    assert [x["parsed"] for x in refl] == [True, True, False, True]
    for k, x in enumerate(refl):  # correction only on revise; ok keeps the draft
        same = np.array_equal(img["mcot"][k], img["plan-act"][k])
        assert same == (x["verdict"] == "ok")
    assert refl[1]["regions"] == [[0, 0, 500, 500]]
    # noise: every asked-for object is missing, so the failed area is the plan's box (32 px: 10x10 px)
    # and the flagged region is 16x16 px around it
    assert refl[1]["iou"] == pytest.approx(100 / 256) and refl[0]["iou"] is None
    assert res["reflection"]["region_iou_n"] == 1
    gh, gw = latent_grid(model, HW)
    assert refl[1]["inpainted_tokens"] == int(region_token_mask([[0, 0, 500, 500]], (gh, gw)).sum())
    assert refl[2]["inpainted_tokens"] == gh * gw  # unparseable: the whole image
    # inpainting leaves the pixels far from the region (nearly) as drawn; regenerating does not
    far = (slice(24, 32), slice(24, 32))
    d_in = np.abs(img["mcot"][1][far].astype(int) - img["plan-act"][1][far].astype(int)).mean()
    d_re = np.abs(img["mcot-regen"][1][far].astype(int) - img["plan-act"][1][far].astype(int)).mean()
    assert d_in < d_re
    assert res["reflection"]["confusion"]["truth revise / said ok"] == 2  # noise never passes
    assert res["reflection"]["confusion"]["unparsed"] == 1
    # the one parsed `revise` is the only right verdict: the unparsed one is corrected but not counted right
    assert res["reflection"]["verdict_accuracy"] == pytest.approx(1 / 4)
    assert res["reflection"]["always_revise_accuracy"] == 1.0
    assert set(res["seconds_per_prompt"]) == set(ALL_ABLATION_MODES)
    assert all(v > 0 for v in res["seconds_per_prompt"].values())
    assert set(res["differences"]) == {"mcot - t2i-twice", "plan-act - t2i-twice", "mcot - plan-act",
                                       "mcot-verify - t2i-twice", "mcot-verify - plan-act", "mcot-verify - mcot",
                                       "mcot-oracle - plan-act", "mcot-oracle - mcot", "plan-guided - plan-act"}
    # mcot-oracle: the evaluator's verdict on each draft (noise: every one fails), its region the plan's box of a
    # missing object, inpainted from the draft: the far pixels stay (nearly) as drawn
    oracle = [r["oracle"] for r in res["prompts"]]
    assert [o["verdict"] for o in oracle] == ["revise"] * 4 and res["oracle"] == {"failed_drafts": 4, "fixed": 0,
                                                                                   "judged_ok": 0}
    assert all(o["regions"] and all(b == [100, 100, 400, 400] for b in o["regions"]) and o["critique"] for o in oracle)
    assert oracle[0]["inpainted_tokens"] == int(region_token_mask([[100, 100, 400, 400]], (gh, gw)).sum())
    for k in range(4):  # (the tiny random decoder spreads a change: far pixels move, much less than regenerated)
        assert not np.array_equal(img["mcot-oracle"][k], img["plan-act"][k])
        assert np.abs(img["mcot-oracle"][k][far].astype(int) - img["plan-act"][k][far].astype(int)).mean() < d_re / 2
    assert "mcot-oracle (the evaluator's verdict" in (tmp_path / "out" / "ablation.md").read_text()
    # the scripted plans name no shape of the world: none is right, so every planned image's rate is under a wrong plan
    assert [r["plan"]["right"] for r in res["prompts"]] == [False] * 4 and res["plans"]["n_right"] == 0
    assert res["plans"]["right"]["overall"] == 0.0 and set(res["plans"]["images"]) == set(PLANNED_MODES)
    assert all(g["right"] is None and g["wrong"] == 0.0 for g in res["plans"]["images"].values())
    assert "Plans (parsed 1.000)" in (tmp_path / "out" / "ablation.md").read_text()
    # plan guidance (scale 2 against text scale 4) changes the image drawn from the same plan and noise
    assert res["settings"]["sampler"]["cfg_plan_scale"] == 2.0
    assert any(not np.array_equal(a, b) for a, b in zip(img["plan-guided"], img["plan-act"]))
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["scores"] == res["scores"] and saved["n"] == 4
    md = (out / "ablation.md").read_text()
    assert "mcot - plan-act" in md and "verdict accuracy" in md and "| t2i-twice |" in md
    for m in ALL_ABLATION_MODES:
        assert (out / "sheets" / f"failures_{m}.png").is_file()
    assert (out / "sheets" / "corrections.png").is_file()

    # batching does not change the results, nor does keeping the adapter unmerged (the default merges it)
    assert res["settings"]["merged_adapters"] is True
    res1 = run_ablation(model, ScriptedTokenizer(tok, _script(plans, refls, 1, checks)), records, modes=ALL_ABLATION_MODES,
                        batch_size=1, image_hw=HW, sampler=SamplerSettings(num_timesteps=3), text=TextSettings(8, 8),
                        out_dir=tmp_path / "out1", n_boot=200, progress=False, merge_adapters=False)
    assert res1["settings"]["merged_adapters"] is False
    for m in ALL_ABLATION_MODES:
        for r, r1 in zip(res["prompts"], res1["prompts"]):
            a, b = (np.asarray(_open(o / x[m]["image"])).astype(int) for o, x in ((out, r), (tmp_path / "out1", r1)))
            assert np.abs(a - b).max() <= 1, m
    with pytest.raises(ValueError, match="modes"):
        run_ablation(model, tok, records, modes=("nope",))


def _script(plans, refls, batch, checks=None):
    """The order texts are decoded in: per batch, its plans, its reflections, then mcot-verify's reflections on
    the corrections (``checks``: prompt index -> text, for the prompts sent to correction)."""
    out = []
    for b in range(0, len(plans), batch):
        out += plans[b:b + batch] + refls[b:b + batch]
        out += [checks[i] for i in range(b, min(b + batch, len(plans))) if checks and i in checks]
    return out


def _noise_of(model, i, seed=0):
    gh, gw = latent_grid(model, HW)
    return torch.randn(gh * gw, model.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(seed + i))


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_eval_shapes_ablation_cli(fixture_dir, tmp_path, capsys):
    from ftkit.infer.cli import eval_main

    _, folder = ablation_records(3, seed=1011, size=32, cache_dir=tmp_path / "cache")
    out = tmp_path / "abl"
    rc = eval_main(["shapes", "--ablation", "--model", str(fixture_dir), "--data", str(folder), "--size", "32",
                    "--steps", "3", "--max-new-tokens", "4", "--batch", "2", "--out", str(out),
                    "--ablation-modes", "t2i", "t2i-twice", "plan-act", "mcot"])
    assert rc == 0
    res = json.loads((out / "ablation.json").read_text())
    assert res["n"] == 3 and res["modes"] == ["t2i", "t2i-twice", "plan-act", "mcot"] and res["data"] == str(folder)
    assert "| mcot |" in capsys.readouterr().out and (out / "ablation.md").is_file()
    rc = eval_main(["shapes", "--ablation", "--model", str(fixture_dir), "--data", str(folder), "--size", "32",
                    "--steps", "3", "--max-new-tokens", "4", "--n", "1", "--out", str(tmp_path / "pg"),
                    "--ablation-modes", "plan-guided", "--cfg-plan", "3"])
    res = json.loads((tmp_path / "pg" / "ablation.json").read_text())
    assert rc == 0 and res["settings"]["sampler"]["cfg_plan_scale"] == 3.0 and res["seconds_per_prompt"]["plan-guided"] > 0
    rc = eval_main(["shapes", "--ablation", "--model", str(fixture_dir), "--data", str(folder), "--batch", "0",
                    "--out", str(tmp_path / "bad")])
    assert rc == 1 and "batch_size" in capsys.readouterr().err


def test_ablation_mcot_rounds(fixture_dir, tmp_path):
    """``rounds=3``: a correction still judged ``revise`` is reflected on and inpainted again; one judged ``ok``
    stops; everything before the third image is the two-round run's."""
    model, tok = load_bagel(fixture_dir, dtype=torch.float32), load_tokenizer(fixture_dir)
    records, _ = ablation_records(4, seed=1011, size=32, cache_dir=tmp_path / "cache")
    plans = ["a shape\n<box>circle [100,100,400,400]</box>"] * 4
    refls = ["<verdict>ok</verdict>", "<verdict>revise</verdict>\n<region>color red circle [0,0,500,500]</region>",
             "not a reflection", "<verdict>ok</verdict>"]
    second = ["<verdict>ok</verdict>", "<verdict>revise</verdict>\n<region>missing circle [500,500,1000,1000]</region>"]
    kw = dict(modes=("plan-act", "mcot"), batch_size=4, image_hw=HW, sampler=SamplerSettings(num_timesteps=3),
              text=TextSettings(8, 8), n_boot=50, progress=False)
    two = run_ablation(model, ScriptedTokenizer(tok, plans + refls), records, out_dir=tmp_path / "two", **kw)
    three = run_ablation(model, ScriptedTokenizer(tok, plans + refls + second), records, out_dir=tmp_path / "three",
                         rounds=3, **kw)
    assert [r["mcot_images"] for r in three["prompts"]] == [1, 2, 3, 1]
    assert [r["mcot_images"] for r in two["prompts"]] == [1, 2, 2, 1]
    assert three["reflection"]["mcot_images_mean"] == pytest.approx(7 / 4) and three["settings"]["rounds"] == 3
    img = {name: [np.asarray(_open(tmp_path / name / r["mcot"]["image"])) for r in res["prompts"]]
           for name, res in (("two", two), ("three", three))}
    for k in (0, 1, 3):  # stopped by `ok` (or never corrected): the same image as with two rounds
        assert np.array_equal(img["two"][k], img["three"][k]), k
    assert not np.array_equal(img["two"][2], img["three"][2])  # a third image, inpainted in the new region only
    d = np.abs(img["two"][2].astype(int) - img["three"][2].astype(int)).mean(-1)
    assert d[16:, 16:].mean() > d[:16, :16].mean()  # the flagged quarter changes most (the decoder mixes a little)
    assert "1.75 images per prompt" in (tmp_path / "three" / "ablation.md").read_text()
    # mcot-verify with rounds 3: prompt 1's correction was judged ok in the loop (kept, not reflected on again);
    # prompt 2's third image is reflected on once more: `ok` keeps it
    kw["modes"] = ("plan-act", "mcot", "mcot-verify")
    ver = run_ablation(model, ScriptedTokenizer(tok, plans + refls + second + ["<verdict>ok</verdict>"]), records,
                       out_dir=tmp_path / "ver", rounds=3, **kw)
    assert [r.get("verify", {}).get("kept") for r in ver["prompts"]] == [None, "correction", "correction", None]
    for r in ver["prompts"]:
        a, b = (np.asarray(_open(tmp_path / "ver" / r[m]["image"])) for m in ("mcot", "mcot-verify"))
        assert np.array_equal(a, b)
    assert ver["reflection"]["correction"]["mcot-verify"] == ver["reflection"]["correction"]["mcot"]
    with pytest.raises(ValueError, match="rounds"):
        run_ablation(model, tok, records, modes=("mcot", "mcot-regen"), rounds=3)


class _ForkTokenizer(ScriptedTokenizer):
    """Scripted texts, and an encoding in which a reflection's verdict word is its first token (the
    ``<verdict>`` tag encodes to nothing), so ``p_revise`` is the random model's real probability of one of
    two tokens at the reflection's first step; ``swap`` exchanges which of the two means ``revise``."""

    def __init__(self, tok, texts, swap=False):
        super().__init__(tok, texts)
        self.swap = swap

    def encode(self, text, add_special_tokens=False):
        if text.startswith("<verdict>"):
            word = text[len("<verdict>"):].split("<", 1)[0]
            if self.swap:
                word = {"ok": "revise", "revise": "ok"}[word]
            return self.tok.encode(word, add_special_tokens=False)
        return super().encode(text, add_special_tokens)


def test_revise_threshold_gates_correction_and_the_sweep_predicts_it(fixture_dir, tmp_path):
    """A decoded ``revise`` is acted on only above the threshold: a prompt under it keeps its draft bit for bit,
    one above it gets the same correction as at 0.5; the sweep of the 0.5 run predicts the gated run."""
    model, tok = load_bagel(fixture_dir, dtype=torch.float32), load_tokenizer(fixture_dir)
    records, _ = ablation_records(6, seed=1011, size=32, cache_dir=tmp_path / "cache")
    plans = ["a shape\n<box>circle [100,100,400,400]</box>"] * 6
    refls = ["<verdict>revise</verdict>\n<region>missing circle [0,0,600,600]</region>"] * 6

    def run(name, threshold, swap):
        return run_ablation(model, _ForkTokenizer(tok, plans + refls, swap), records, modes=("plan-act", "mcot"),
                            batch_size=6, image_hw=HW, sampler=SamplerSettings(num_timesteps=3),
                            text=TextSettings(8, 8, revise_threshold=threshold), n_boot=20, progress=False,
                            out_dir=tmp_path / name)

    first = run("a", 0.5, False)
    ps = [r["reflection"]["p_revise"] for r in first["prompts"]]
    swap = sum(p > 0.5 for p in ps) < 3  # orient the pair so that most prompts are sent to correction at 0.5
    at5 = run("b", 0.5, True) if swap else first
    ps = [r["reflection"]["p_revise"] for r in at5["prompts"]]
    assert all(isinstance(p, float) and 0 < p < 1 for p in ps) and len(set(ps)) == 6  # real, per-context
    if swap:
        assert [q["reflection"]["p_revise"] for q in first["prompts"]] == pytest.approx([1 - p for p in ps], abs=1e-5)
    above = sorted(p for p in ps if p > 0.5)
    assert len(above) >= 3
    tau = (above[0] + above[1]) / 2  # sends all but the least sure of them
    gated = run("c", tau, swap)
    assert gated["settings"]["text"]["revise_threshold"] == tau

    def img(name, r, m):
        return np.asarray(_open(tmp_path / name / r[m]["image"]))

    for r5, rg, p in zip(at5["prompts"], gated["prompts"], ps):
        assert r5["reflection"]["corrected"] == (p > 0.5) and rg["reflection"]["corrected"] == (p > tau)
        assert rg["reflection"]["verdict"] == ("revise" if p > tau else "ok")
        assert np.array_equal(img("c", rg, "plan-act"), img("b" if swap else "a", r5, "plan-act"))
        want = img("b" if swap else "a", r5, "mcot") if p > tau else img("c", rg, "plan-act")
        assert np.array_equal(img("c", rg, "mcot"), want)
    sweep = threshold_sweep(at5["prompts"], 0.5, [0.5, tau], n_boot=20)
    assert sweep[0]["corrected"] == sum(p > 0.5 for p in ps) == at5["reflection"]["corrected"]
    assert sweep[1]["corrected"] == sum(p > tau for p in ps) == gated["reflection"]["corrected"] == len(above) - 1
    assert sweep[1]["mcot"] == gated["scores"]["mcot"]["overall"]
    assert sweep[1]["differences"] == {"mcot - plan-act": gated["differences"]["mcot - plan-act"]["overall"]}
    assert sweep[1]["verdict_accuracy"] == pytest.approx(gated["reflection"]["verdict_accuracy"])
    # noise fails every prompt: the decoded `revise` is always right, the gated one only where it was sure
    assert gated["reflection"]["decoded_verdict_accuracy"] == 1.0 and {r["reflection"]["decoded"] for r in gated["prompts"]} == {"revise"}
    assert gated["reflection"]["verdict_accuracy"] == pytest.approx((len(above) - 1) / 6)
    assert [w["threshold"] for w in at5["reflection"]["threshold_sweep"]][:2] == [0.5, 0.6]
    assert "p(revise) above a threshold" in (tmp_path / ("b" if swap else "a") / "ablation.md").read_text()
    with pytest.raises(ValueError, match="revise_threshold"):
        TextSettings(revise_threshold=0.4)
    # run_mcot acts on the same rule, and records p_revise in its trace
    kw = dict(rounds=2, image_hw=HW, sampler=SamplerSettings(num_timesteps=3), posterior="mean")

    def trace(threshold):
        return run_mcot(model, _ForkTokenizer(tok, plans[:1] + refls[:2], swap), records[0]["prompt"],
                        text=TextSettings(8, 8, revise_threshold=threshold), generator=torch.Generator().manual_seed(0),
                        **kw)

    t5 = trace(0.5)
    p = t5.rounds[0].p_revise
    assert len(t5.rounds) == (2 if p > 0.5 else 1) and t5.rounds[0].verdict == ("revise" if p > 0.5 else "ok")
    high = trace(max(0.5, (p + 1) / 2))
    assert high.rounds[0].p_revise == p and len(high.rounds) == 1 and high.rounds[0].verdict == "ok"
    assert json.loads(high.to_json())["rounds"][0]["p_revise"] == p


def test_revise_probability_reads_the_verdict_token(mt):
    model, tok = mt
    tx = _Text(model, tok)
    prefix, ok, rev = tx.verdict_fork
    for word, t in (("ok", ok), ("revise", rev)):  # the fork is where the two verdict words part
        assert f"<verdict>{word}</verdict>".startswith(tok.decode(prefix + [t]))
    logits = torch.zeros(len(prefix) + 2, model.language_model.lm_head.out_features)
    logits[len(prefix), rev] = math.log(3.0)
    logits[len(prefix), ok + 1 if ok + 1 != rev else ok + 2] = 50.0  # other tokens do not count
    bos = model.cfg.bos_id
    g = GeneratedText(ids=[bos, *prefix, rev, 7], logits=logits, stopped=False)
    assert revise_probability(g, tx) == pytest.approx(0.75)
    short = GeneratedText(ids=g.ids, logits=logits[:tx.verdict_steps], stopped=False)  # what the loops keep
    assert tx.verdict_steps == len(prefix) + 1 and revise_probability(short, tx) == pytest.approx(0.75)
    assert revise_probability(GeneratedText(ids=g.ids, logits=logits[:len(prefix)], stopped=False), tx) is None
    assert revise_probability(GeneratedText(ids=g.ids, logits=None, stopped=False), tx) is None
    if prefix:  # text that does not start with the verdict tag has no verdict probability
        wrong = GeneratedText(ids=[bos, prefix[0] + 1, *prefix[1:], rev, 7], logits=logits, stopped=False)
        assert revise_probability(wrong, tx) is None
    assert acted_verdict("revise", 0.75, 0.5) == "revise" and acted_verdict("revise", 0.75, 0.8) == "ok"
    assert acted_verdict("revise", None, 0.9) == "revise" and acted_verdict("ok", 0.9, 0.5) == "ok"
    assert acted_verdict(None, 0.1, 0.5) == "revise"  # unparseable: the loop must do something


def test_plan_right_judges_what_the_plan_says():
    from ftkit.data.schema import Box
    from ftkit.data.shapes import make_record, render_plan

    for i in range(1, 13):  # every category twice: a scene's own plan draws back the scene, and it is right
        rec, images = make_record(i, 3, 64, kind="ok")
        p = rec["steps"][0]
        plan = PlanStep(p["caption"], [Box(b["label"], tuple(b["box"])) for b in p["boxes"]])
        assert np.array_equal(np.asarray(render_plan(plan, 64)), np.asarray(images[rec["steps"][1]["image"]]))
        assert plan_right(plan, rec["meta"], 64)
        if rec["meta"]["tag"] == "position":  # the two objects' boxes swapped: the relation turns round
            swapped = PlanStep(plan.caption, [Box(a.label, b.box) for a, b in zip(plan.boxes, plan.boxes[::-1])])
            assert not plan_right(swapped, rec["meta"], 64)
        if rec["meta"]["tag"] == "two_object":  # one object left out of the plan
            assert not plan_right(PlanStep(plan.caption, plan.boxes[:1]), rec["meta"], 64)
    assert not plan_right(None, rec["meta"], 64)  # unparsed
    assert not plan_right(PlanStep("", [Box("circle square", (0, 0, 500, 500))]), rec["meta"], 64)
    with pytest.raises(ValueError, match="'circle square'"):
        render_plan(PlanStep("", [Box("circle square", (0, 0, 500, 500))]))
