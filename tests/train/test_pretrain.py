"""Tiny-backbone pretraining: the autoencoder run resumes and exports; pretraining records validate; the
tiny-pretrain recipe (full fine-tuning) runs, resumes with --ckpt_path last and exports a release folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftkit.errors import FtkitError
from ftkit.train.pretrain_ae import AERecipe, export, load_run, train
from ftkit.train.recipe import REPO_ROOT

PY = sys.executable
AE = AERecipe(size=32, ch=32, ch_mult=(1, 2, 2), batch=2)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ae") / "run"
    assert train(run, AE, minutes=5, max_steps=2)["step"] == 2
    return run


def test_ae_run_resumes_refuses_other_recipe_and_exports(ae_run, tmp_path):
    before = torch.load(ae_run / "state.pt", weights_only=False)["model"]
    assert train(ae_run, AE, minutes=5, max_steps=3)["step"] == 3  # continues at step 2, one more step
    after = torch.load(ae_run / "state.pt", weights_only=False)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(FtkitError, match="recipe differs"):
        train(ae_run, AERecipe(size=32, ch=32, ch_mult=(1, 2), batch=2), minutes=1, max_steps=4)

    from ftkit.models.vae import AEConfig, load_ae

    out = export(ae_run, tmp_path / "ae")
    cfg = AEConfig.from_json(out / "ae_config.json")
    assert cfg.downsample == 4 and cfg.scale_factor > 0
    ae = load_ae(out / "ae.safetensors", cfg)
    ref = load_run(ae_run)[0]
    z = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(ae.decode(z), ref.decode(z))
    assert ae.encode_mean(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 8, 8)


def test_ae_decoder_only_keeps_the_latent_space(ae_run, tmp_path):
    """A decoder-only continuation of an exported autoencoder: the encoder, hence the latents and the exported
    shift / scale a backbone was trained with, stay exactly the same (also when its scenes come from another
    seed, whose latents would fit other statistics); the decoder learns; it resumes."""
    from ftkit.models.vae import AEConfig, load_ae

    src = export(ae_run, tmp_path / "ae")
    dec = AERecipe(**{**AE.__dict__, "decoder_only": True, "seed": AE.seed + 7})
    with pytest.raises(FtkitError, match="init"):
        train(tmp_path / "no-init", dec, minutes=1, max_steps=1)
    with pytest.raises(FtkitError, match="differs from the recipe"):
        train(tmp_path / "other", AERecipe(size=32, ch=64, ch_mult=(1, 2, 2), batch=2, decoder_only=True), minutes=1,
              max_steps=1, init=src)
    assert train(tmp_path / "dec", dec, minutes=5, max_steps=2, init=src)["step"] == 2
    assert train(tmp_path / "dec", dec, minutes=5, max_steps=3)["step"] == 3  # resumes without init
    out = export(tmp_path / "dec", tmp_path / "ae2")
    a, b = (load_ae(f / "ae.safetensors", AEConfig.from_json(f / "ae_config.json")) for f in (src, out))
    assert AEConfig.from_json(out / "ae_config.json") == AEConfig.from_json(src / "ae_config.json")
    sa, sb = a.autoencoder.state_dict(), b.autoencoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("encoder."))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(a.encode_mean(x), b.encode_mean(x), rtol=0, atol=0)


def test_pretrain_records_validate(tmp_path):
    from ftkit.data.dataset import load_records
    from ftkit.data.pretrain import DESCRIBE, generate_pretrain
    from ftkit.data.shapes import TAGS

    recs = list(load_records(str(generate_pretrain(tmp_path / "p", 36, size=32) / "records.jsonl")))
    assert [r.task for r in recs[:6]] == ["t2i", "t2i", "edit", "t2i", "t2i", "t2i"]
    assert [s.type for s in recs[0].steps] == ["draft"] and recs[0].input_image is None
    assert recs[2].prompt == DESCRIBE and recs[2].input_image.exists() and recs[2].steps[0].boxes
    judge = recs[5::6]
    assert all([s.type for s in r.steps] == ["draft", "reflect"] and r.supervise == ("reflect",) for r in judge)
    assert all(r.steps[1].verdict == ("ok" if r.meta["error"] is None else "revise") for r in judge)
    # every task sees every GenEval category (text-to-image included: counting, colour attribution)
    for task in ([r for i, r in enumerate(recs, 1) if i % 3], recs[2::6], judge):
        assert {r.meta["tag"] for r in task} == set(TAGS)


def test_pretrain_plan_act_records(tmp_path):
    """plan_act: records i % 3 == 2 are prompt -> plan -> image of the same scene (the plan's boxes are the
    rendered image's), every other record as without it."""
    from ftkit.data.dataset import load_records
    from ftkit.data.pretrain import generate_pretrain

    plain = list(load_records(str(generate_pretrain(tmp_path / "a", 12, size=32) / "records.jsonl")))
    recs = list(load_records(str(generate_pretrain(tmp_path / "b", 12, size=32, plan_act=True) / "records.jsonl")))
    for i, (a, b) in enumerate(zip(plain, recs, strict=True), 1):
        assert a.prompt == b.prompt and a.meta == b.meta
        if i % 3 == 2:
            assert [s.type for s in b.steps] == ["plan", "draft"] and b.supervise in (None, ())
            assert b.steps[0].boxes and b.steps[1].image.path.read_bytes() == a.steps[0].image.path.read_bytes()
        else:
            assert [s.type for s in b.steps] == [s.type for s in a.steps]


def test_pretrain_correct_records(tmp_path):
    """correct: a judging record whose draft is wrong also supervises the correct scene redrawn with the draft
    and its reflection in context; right drafts and every other record are as without it."""
    import numpy as np
    from PIL import Image

    from ftkit.data.dataset import load_records
    from ftkit.data.pretrain import generate_pretrain

    plain = list(load_records(str(generate_pretrain(tmp_path / "a", 48, size=32) / "records.jsonl")))
    recs = list(load_records(str(generate_pretrain(tmp_path / "b", 48, size=32, correct=True) / "records.jsonl")))
    wrong = 0
    for i, (a, b) in enumerate(zip(plain, recs, strict=True), 1):
        assert a.prompt == b.prompt and a.meta == b.meta
        if i % 6 or b.meta["error"] is None:
            assert [s.type for s in b.steps] == [s.type for s in a.steps] and b.supervise == a.supervise
            continue
        wrong += 1
        assert [s.type for s in b.steps] == ["draft", "reflect", "refine"] and b.supervise == ("reflect", "refine")
        assert b.steps[1].verdict == "revise" and b.steps[2].mode == "regenerate"
        draft, fixed = (np.asarray(Image.open(s.image.path)) for s in (b.steps[0], b.steps[2]))
        assert draft.shape == fixed.shape and (draft != fixed).any()
    assert wrong >= 2


@pytest.mark.slow
def test_tiny_pretrain_recipe_fits_resumes_and_exports(ae_run, tmp_path):
    from ftkit.data.pretrain import generate_pretrain
    from ftkit.data.shapes import generate
    from ftkit.train.pretrain import export_release
    from ftkit.train.tiny import ensure_tiny_bagel

    export(ae_run, tmp_path / "ae")
    generate(tmp_path / "corpus", 12, seed=0, size=32, progress=False)
    data = generate_pretrain(tmp_path / "data", 18, size=32, plan_act=True, correct=True)  # record 18: a correction
    init = ensure_tiny_bagel(tmp_path / "init", corpus=str(tmp_path / "corpus/records.jsonl"), vocab_size=512, hidden=32,
                             layers=2, heads=2, kv_heads=1, intermediate=64, vit_hidden=32, vit_layers=1, vit_heads=2,
                             vit_intermediate=64, max_latent_size=4, ae=str(tmp_path / "ae"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [PY, "-m", "ftkit.cli", "fit", "--config", "recipes/tiny-pretrain.yaml", "--run_root", str(tmp_path / "runs"),
            "--model.model_path", str(init), "--data.datasets", f"[{data}/records.jsonl]", "--data.generate_shapes",
            "null", "--data.vae_image_size", "32", "--data.vit_image_size", "28", "--data.token_budget", "400",
            "--trainer.enable_progress_bar", "false"]
    ckpt = tmp_path / "runs/tiny-pretrain/latest/checkpoints/last.ckpt"
    for steps, extra in ((2, []), (3, ["--ckpt_path", "last"])):
        r = subprocess.run([*args, "--trainer.max_steps", str(steps), *extra], capture_output=True, text=True, env=env,
                           cwd=REPO_ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
        if steps == 2:
            st2 = torch.load(ckpt, map_location="cpu", weights_only=True)
    st = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert st["global_step"] == 3
    # the recipe's moving average (WeightEMA): restored on resume, then one more update with beta_3 = 4/13
    key = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    assert st2["ema"]["updates"] == 2 and st["ema"]["updates"] == 3 and st["ema"]["decay"] == 0.999
    expect = torch.lerp(st2["ema"]["state_dict"][f"model.{key}"], st["state_dict"][f"model.{key}"], 1 - 4 / 13)
    torch.testing.assert_close(st["ema"]["state_dict"][f"model.{key}"], expect)
    assert not torch.equal(st["ema"]["state_dict"][f"model.{key}"], st["state_dict"][f"model.{key}"])

    out = export_release(ckpt, tmp_path / "release")  # the average
    ema = load_file(str(out / "ema.safetensors"))
    torch.testing.assert_close(ema[key], st["ema"]["state_dict"][f"model.{key}"])
    raw = load_file(str(export_release(ckpt, tmp_path / "raw", raw=True) / "ema.safetensors"))
    torch.testing.assert_close(raw[key], st["state_dict"][f"model.{key}"])
    init_ema = load_file(str(Path(init) / "ema.safetensors"))
    assert not torch.equal(ema[key], init_ema[key])
    assert (out / "ae_config.json").read_text() == (tmp_path / "ae/ae_config.json").read_text()
    from ftkit.train.faults import CheckpointError

    bad = tmp_path / "bad.ckpt"  # a cut copy: refused with the file named, nothing written
    bad.write_bytes(ckpt.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        export_release(bad, tmp_path / "from-bad")
    assert not (tmp_path / "from-bad").exists()
