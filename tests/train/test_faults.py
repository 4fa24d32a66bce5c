"""Faults during training: a diverging run stops, names the step and the batch's records, and writes
nothing non-finite; ``nonfinite: skip`` skips up to a limit."""

import math

from safetensors.torch import load_file

from tests.train import test_train as tt
from tests.train.test_train import metrics, run_fit, write_recipe

tiny_env = tt.tiny_env  # the session fixture of test_train


def _all_finite_checkpoints(run_dir):
    import torch

    for ck in (run_dir / "checkpoints").glob("*.ckpt"):
        sd = torch.load(ck, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), ck


def test_diverging_run_stops_and_ships_nothing_non_finite(tiny_env):
    # lr 1e30: AdamW's first update moves every trained weight by ~1e30, so the loss turns non-finite within a
    # step or two whatever the data (at 1e6 it depended on the batch: a run on other shapes data stayed finite)
    recipe = write_recipe(tiny_env, "nan", model={"lr": 1e30, "warmup_steps": 0},
                          trainer={"max_steps": 30}, ftkit={"checkpoint_every_n_steps": 1})
    r = run_fit(recipe, "--run_id", "nan", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "step " in last and "records:" in last, last
    run = tiny_env / "runs" / "nan" / "nan"
    assert not (run / "adapter").exists()  # no adapter from a diverged run
    _all_finite_checkpoints(run)
    steps = metrics(run)
    assert steps and all(math.isfinite(v) for row in steps.values() for v in row.values())


def test_skip_mode_skips_up_to_the_limit(tiny_env):
    recipe = write_recipe(tiny_env, "skip", model={"lr": 1e30, "warmup_steps": 0, "nonfinite": "skip",
                                                   "max_skipped": 2}, trainer={"max_steps": 30})
    r = run_fit(recipe, "--run_id", "skip", check=False)
    assert r.returncode == 2 and r.stderr.count("batch skipped") == 2, r.stderr[-3000:]
    assert "max_skipped > 2" in r.stderr.strip().splitlines()[-1]
    adapter = tiny_env / "runs" / "skip" / "skip" / "adapter"
    if adapter.exists():
        import torch

        assert all(torch.isfinite(t).all() for t in load_file(adapter / "adapter_model.safetensors").values())
