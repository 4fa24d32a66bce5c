"""ftkit eval flow on the bagel-tiny fixture (random weights: the arithmetic and the outputs, not the scores)."""

import json

import pytest
import torch

from ftkit.data.builder import pil_to_tensor
from ftkit.data.dataset import load_records
from ftkit.infer.ablation import ablation_records
from ftkit.infer.context import GuidanceContexts
from ftkit.infer.flowcheck import flow_by_timestep, target_image
from ftkit.infer.sampler import velocity
from ftkit.models.loading import load_bagel, load_tokenizer

HW = (32, 32)


@pytest.fixture(scope="module")
def setup(fixture_dir, tmp_path_factory):
    _, folder = ablation_records(3, seed=1011, size=32, cache_dir=tmp_path_factory.mktemp("cache"))
    records = list(load_records(str(folder)))
    return load_bagel(fixture_dir, dtype=torch.float32), load_tokenizer(fixture_dir), records, folder


def test_flow_by_timestep_matches_a_direct_computation(setup):
    model, tok, records, _ = setup
    ts = (0.25, 0.9)
    res, sheet = flow_by_timestep(model, tok, records, ts, image_hw=HW, seed=5, sheet_rows=2)
    assert res["n"] == 3 and len(res["mse_cond"]) == 2 and sheet.size == (32 * 3, 32 * 2)
    # pair 1 at t = 0.9 by hand: the training path x_t = (1 - t) x0 + t eps, target eps - x0
    rec = records[1]
    gc = GuidanceContexts(model)
    gc.add_user_text(tok.encode(rec.prompt, add_special_tokens=False))
    image = pil_to_tensor(target_image(rec).open(), HW)
    x0 = model.patchify(gc.cond.vae_latent(image, posterior="mean")).float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5 + 1))
    x_t = 0.1 * x0 + 0.9 * eps
    for ctx, key in ((gc.cond, "mse_cond"), (gc.uncond_text, "mse_uncond")):
        want = float(((velocity(ctx, x_t, 0.9, HW) - (eps - x0)) ** 2).mean())
        assert res["per_record"][1][key][1] == pytest.approx(want, rel=1e-5)
    assert res["text_gain"][1] == pytest.approx(res["mse_uncond"][1] - res["mse_cond"][1])
    again, _ = flow_by_timestep(model, tok, records, ts, image_hw=HW, seed=5)
    assert again["mse_cond"] == res["mse_cond"]
    with pytest.raises(ValueError, match="timesteps"):
        flow_by_timestep(model, tok, records, (0.0, 0.5), image_hw=HW)


def test_eval_flow_cli(setup, fixture_dir, tmp_path, capsys):
    from ftkit.infer.cli import eval_main

    _, _, _, folder = setup
    out = tmp_path / "flow"
    rc = eval_main(["flow", "--model", str(fixture_dir), "--data", str(folder), "--size", "32", "--n", "2",
                    "--timesteps", "0.5", "0.8", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "flow.json").read_text())
    assert res["n"] == 2 and res["timesteps"] == [0.5, 0.8] and (out / "sheet.png").is_file()
    assert "| mse cond |" in capsys.readouterr().out
    rc = eval_main(["flow", "--model", str(fixture_dir), "--data", str(folder), "--size", "32", "--n", "0",
                    "--out", str(tmp_path / "bad")])
    assert rc == 1 and "--n" in capsys.readouterr().err
