"""Training: recipes, the tiny run end to end, QLoRA, resume parity, DDP / FSDP2 gradient parity."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftkit.infer.mcot import SamplerSettings
from ftkit.train.recipe import REPO_ROOT, RecipeError, compose, find_recipe

PY = sys.executable


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    from ftkit.data.shapes import generate
    from ftkit.train.tiny import ensure_tiny_bagel

    root = tmp_path_factory.mktemp("tiny")
    generate(root / "data", 24, seed=0, size=64, progress=False)
    ensure_tiny_bagel(root / "model", corpus=str(root / "data" / "records.jsonl"), vocab_size=512, hidden=32, layers=2,
                      heads=2, kv_heads=1, intermediate=64, vit_hidden=32, vit_layers=1, vit_heads=2,
                      vit_intermediate=64)
    return root


def write_recipe(root: Path, name: str, *, model: dict | None = None, data: dict | None = None,
                 trainer: dict | None = None, ftkit: dict | None = None) -> Path:
    cfg = {
        "defaults": [str(REPO_ROOT / "configs/loss/mcot.yaml"), str(REPO_ROOT / "configs/trainer/cpu.yaml")],
        "seed_everything": 0,
        "model": {"model_path": str(root / "model"), "dtype": "fp32", "lr": 1e-3, "warmup_steps": 2,
                  "adapter": {"method": "lora", "preset": "all-experts", "r": 4, "alpha": 8,
                              "modules_to_save": ["llm2vae"]},
                  "loss": {"kl_prior": 0.1}, **(model or {})},
        "data": {"datasets": [str(root / "data" / "records.jsonl")], "token_budget": 400, **(data or {})},
        "trainer": {"max_steps": 4, "enable_progress_bar": False, **(trainer or {})},
        "ftkit": {"recipe": name, "checkpoint_every_n_steps": 2, "run_root": str(root / "runs"), **(ftkit or {})},
    }
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_fit(recipe: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([PY, "-m", "ftkit.cli", "fit", "--config", str(recipe), *args], capture_output=True, text=True,
                       env=env, cwd=REPO_ROOT, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"ftkit fit failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(run_dir / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            step = int(row["step"])
            rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"})
    return rows


# ---------------------------------------------------------------------------- recipes
def test_every_recipe_composes():
    for p in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        cfg = compose(p)
        assert {"model", "data", "trainer"} <= set(cfg), p
        assert cfg["model"].get("adapter") or cfg["model"].get("full_finetune"), p
    assert compose(find_recipe("bagel-qlora-24gb"))["model"]["quantize"] == "nf4"


def test_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        find_recipe("no-such-recipe")
    bad = tmp_path / "r.yaml"
    bad.write_text("defaults: [missing.yaml]\n")
    with pytest.raises(RecipeError, match="missing.yaml"):
        compose(bad)


def test_recipe_missing_weights_fails_with_hint(tmp_path):
    r = subprocess.run([PY, "-m", "ftkit.cli", "fit", "--config", "bagel-mcot", "--model.model_path",
                        str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r.returncode != 0
    msg = r.stdout + r.stderr
    assert "model weights not found" in msg and "ByteDance-Seed/BAGEL-7B-MoT" in msg and "--model.model_path" in msg


def test_estimate_reports_and_warns():
    r = subprocess.run([PY, "-m", "ftkit.cli", "estimate", "bagel-qlora-24gb", "--device-memory", "24", "--json"],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    e = json.loads(r.stdout[r.stdout.index("{"):])
    # 14B-param MoT: 13B decoder-Linear params in NF4 (~0.52 B/param) + 2.2 GB of bf16 embeddings + ViT + VAE
    assert 8.0 < e["weights_gb"] < 11.0, e
    r2 = subprocess.run([PY, "-m", "ftkit.cli", "estimate", "bagel-mcot", "--device-memory", "24"],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r2.returncode == 1 and "will not fit" in r2.stdout


# ---------------------------------------------------------------------------- end to end
def test_fit_writes_run_dir_and_losses_fall(tiny_env):
    recipe = write_recipe(tiny_env, "e2e", trainer={"max_steps": 24}, model={"lr": 3e-3})
    r = run_fit(recipe, "--run_id", "a")
    run = tiny_env / "runs" / "e2e" / "a"
    assert "run finished" in r.stdout and str(run / "adapter") in r.stdout
    info = json.loads((run / "run.json").read_text())
    assert info["recipe"] == "e2e" and info["base_model"] == str(tiny_env / "model") and info["config"]["model"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (tiny_env / "runs" / "e2e" / "latest").resolve() == run.resolve()
    assert "kernels: torch" in r.stderr + r.stdout
    m = metrics(run)
    steps = sorted(s for s in m if "train/total" in m[s])
    assert len(steps) == 24
    first = [m[s]["train/total"] for s in steps[:6]]
    last = [m[s]["train/total"] for s in steps[-6:]]
    assert sum(last) < sum(first), (first, last)
    for term in ("train/ce", "train/mse", "train/ce/plan", "train/mse/draft", "train/kl_prior", "train/spatial"):
        assert any(term in m[s] for s in steps), term


def test_resume_after_kill_matches_straight_run(tiny_env):
    recipe = write_recipe(tiny_env, "resume", trainer={"max_steps": 6}, ftkit={"checkpoint_every_n_steps": 3})
    run_fit(recipe, "--run_id", "straight")
    kill = '[{"class_path": "ftkit.testing.KillAtStep", "init_args": {"step": 3}}]'
    r = run_fit(recipe, "--run_id", "killed", f"--trainer.callbacks={kill}", check=False)
    assert r.returncode == 17, r.stderr[-3000:]
    run_fit(recipe, "--ckpt_path", "last")
    a = metrics(tiny_env / "runs" / "resume" / "straight")
    b = metrics(tiny_env / "runs" / "resume" / "killed")
    for s in range(6):
        assert abs(a[s]["train/total"] - b[s]["train/total"]) <= 1e-6, (s, a[s]["train/total"], b[s]["train/total"])


def test_dpo_fit_from_a_recipe(tiny_env):
    """``ftkit fit`` with model.preference + data.preference: DPO on reflection pairs, understanding LoRA only;
    the two halves alone are refused before step 0."""
    from ftkit.data.shapes import generate

    pref = tiny_env / "pref"
    if not (pref / "records.jsonl").is_file():
        generate(pref, 8, seed=1, size=64, progress=False, tasks=["reflect"])
    data = {"datasets": [str(pref / "records.jsonl")], "preference": "perturb", "cfg_dropout": None, "token_budget": 1200}
    model = {"preference": {"beta": 0.5}, "lr": 1e-2, "loss": {}}
    recipe = write_recipe(tiny_env, "dpo", model=model, data=data, trainer={"max_steps": 6})
    r = run_fit(recipe, "--run_id", "a")
    assert "reference log-probabilities of 8 preference pairs" in r.stdout + r.stderr
    m = metrics(tiny_env / "runs" / "dpo" / "a")
    steps = sorted(s for s in m if "train/dpo" in m[s])
    assert len(steps) == 6 and abs(m[steps[0]]["train/dpo"] - 0.6931) < 1e-3, m  # a fresh LoRA is the reference
    assert m[steps[-1]]["train/margin"] > 0 and "train/mse" not in m[steps[-1]]
    saved = load_file(tiny_env / "runs" / "dpo" / "a" / "adapter" / "adapter_model.safetensors")
    assert any("_moe_gen" in k for k in saved)  # the whole adapter is saved; only its understanding half trained
    assert all(not v.any() for k, v in saved.items() if "_moe_gen" in k and "lora_B" in k)
    ck = torch.load(tiny_env / "runs" / "dpo" / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ref = ck["ftkit"]["reference_logps"]  # reference: init, kept for a resumed run
    assert len(ref) == 8 and all(len(v) == 2 and v[0] < 0 and v[1] < 0 for v in ref.values())
    # killed and resumed: the reference log-probabilities come back from the checkpoint (recomputing them from the
    # trained adapter would change every later loss)
    kill = '[{"class_path": "ftkit.testing.KillAtStep", "init_args": {"step": 3}}]'
    r = run_fit(recipe, "--run_id", "killed", f"--trainer.callbacks={kill}", check=False)
    assert r.returncode == 17, r.stderr[-3000:]
    r = run_fit(recipe, "--ckpt_path", "last")
    assert "reference log-probabilities" not in r.stdout + r.stderr
    b = metrics(tiny_env / "runs" / "dpo" / "killed")
    for s in steps:
        assert abs(m[s]["train/dpo"] - b[s]["train/dpo"]) <= 1e-6, (s, m[s]["train/dpo"], b[s]["train/dpo"])
    half = write_recipe(tiny_env, "dpo-half", model=model, data={**data, "preference": None})
    r = run_fit(half, "--run_id", "a", check=False)
    assert r.returncode != 0 and "model.preference and data.preference go together" in r.stdout + r.stderr


def test_qlora_training_steps_on_cpu(tiny_env):
    recipe = write_recipe(tiny_env, "qlora", model={"quantize": "nf4", "gradient_checkpointing": True,
                                                      "adapter": {"method": "lora", "preset": "generative", "r": 4,
                                                                  "alpha": 8}}, trainer={"max_steps": 3})
    run_fit(recipe, "--run_id", "q")
    run = tiny_env / "runs" / "qlora" / "q"
    m = metrics(run)
    assert all(torch.isfinite(torch.tensor(m[s]["train/total"])) for s in range(3))
    sd = load_file(run / "adapter" / "adapter_model.safetensors")
    assert sd and all("_moe_gen" in k for k in sd if "lora_" in k)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)


# ---------------------------------------------------------------------------- multi-process
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_multiprocess_gradients_match_single_process(tiny_env, strategy):
    grads = tiny_env / f"grads-{strategy}"
    dump = lambda p: f'[{{"class_path": "ftkit.train.callbacks.GradientDump", "init_args": {{"path": "{p}", "step": 0}}}}]'  # noqa: E731
    recipe = write_recipe(tiny_env, f"mp-{strategy}", trainer={"max_steps": 1}, model={"loss": {"kl_prior": 0.0}},
                          data={"cfg_dropout": None})
    run_fit(recipe, "--run_id", "single", "--trainer.accumulate_grad_batches=2",
            f"--trainer.callbacks={dump(grads / 'single.safetensors')}")
    strat = ["--trainer.strategy=ddp"] if strategy == "ddp" else [
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1"]
    run_fit(recipe, "--run_id", "multi", "--trainer.devices=2", *strat,
            f"--trainer.callbacks={dump(grads / 'multi.safetensors')}")
    a, b = load_file(grads / "single.safetensors"), load_file(grads / "multi.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-8)
        assert (a[k] - b[k]).abs().max() / scale < 1e-4, k
    # the adapters written at the end (FSDP2: gathered from the shards) agree too
    runs = tiny_env / "runs" / f"mp-{strategy}"
    sa = load_file(runs / "single" / "adapter" / "adapter_model.safetensors")
    sb = load_file(runs / "multi" / "adapter" / "adapter_model.safetensors")
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5


def test_full_finetune_bf16_keeps_fp32_master_weights(tiny_env):
    recipe = write_recipe(tiny_env, "full", model={"adapter": None, "full_finetune": True, "dtype": "bf16",
                                                    "loss": {"kl_prior": 0.0}},
                          trainer={"max_steps": 3, "precision": "bf16-mixed"})
    run_fit(recipe, "--run_id", "f")
    run = tiny_env / "runs" / "full" / "f"
    m = metrics(run)
    assert all(torch.isfinite(torch.tensor(m[s]["train/total"])) for s in range(3))
    ck = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ck["state_dict"]
    assert any(k.endswith("mlp_moe_gen.up_proj.weight") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert not (run / "adapter").exists()  # nothing to export without an adapter


def test_sample_grids_use_the_model_folders_sampling_settings(tiny_env, tmp_path):
    """The training sample grids read the backbone folder's sampling.json before step 0: a bad one stops the run
    with nothing written, a good one is used for the grids. A recipe's ftkit.sampling is checked before the run
    folder exists and written as the adapter's sampling.json."""
    import shutil

    root = tmp_path / "env"
    shutil.copytree(tiny_env / "model", root / "model")
    shutil.copytree(tiny_env / "data", root / "data")
    samples = {"every_n_steps": 2, "prompts": ["a photo of a red circle"], "image_size": 32, "num_timesteps": 2,
               "max_new_tokens": 4}
    # the recipe's own settings for the adapter (its calibrated revise threshold): checked before a run folder
    bad = write_recipe(root, "grids", trainer={"max_steps": 2}, ftkit={"samples": samples,
                                                                       "sampling": {"revise_threshold": 0.2}})
    r = run_fit(bad, check=False)
    assert r.returncode != 0 and "ftkit.sampling: field 'revise_threshold'" in r.stderr, r.stderr[-2000:]
    assert not (root / "runs").exists()
    recipe = write_recipe(root, "grids", trainer={"max_steps": 2}, ftkit={"samples": samples})
    (root / "model" / "sampling.json").write_text('{"cfg_text_scale": "high"}')
    r = run_fit(recipe, check=False)
    assert r.returncode != 0 and "sampling.json" in r.stderr and "'cfg_text_scale'" in r.stderr, r.stderr[-2000:]
    assert not list((root / "runs").rglob("*.ckpt")) and not list((root / "runs").rglob("adapter_model.safetensors"))
    (root / "model" / "sampling.json").write_text('{"cfg_text_scale": 1.0}')
    recipe = write_recipe(root, "grids", trainer={"max_steps": 2}, ftkit={"samples": samples,
                                                                          "sampling": {"revise_threshold": 0.8}})
    run_fit(recipe)
    assert (root / "runs" / "grids" / "latest" / "samples" / "step000002.png").is_file()
    adapter = root / "runs" / "grids" / "latest" / "adapter"
    assert json.loads((adapter / "sampling.json").read_text()) == {"revise_threshold": 0.8}
    assert SamplerSettings.for_model(root / "model", adapter) == SamplerSettings(cfg_text_scale=1.0)
