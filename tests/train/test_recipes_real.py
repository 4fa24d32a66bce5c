"""The shipped real-model recipes start from a weights folder given on the command line, through the entry
points a user calls (``ftkit fit``, ``make MODEL=``): a tiny folder in BAGEL's release layout for
``bagel-mcot`` and ``bagel-qlora-24gb`` (NF4 on CPU), a tiny FoX folder built by ``build_fox`` from tiny
Qwen2 / SigLIP / diffusers-VAE folders for ``fox-mcot``. Two CPU steps each."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ftkit.train.cli import cli_value, cpu_bf16_warning
from ftkit.train.recipe import REPO_ROOT

pytestmark = pytest.mark.slow

CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
       "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
       "--model.dtype", "fp32", "--model.warmup_steps", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fixture_dir):
    """Tiny weights folders in the real layouts, and a small shapes dataset."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from ftkit.data.shapes import generate
    from ftkit.models.fox import build_fox, load_fox_tokenizer, save_fox
    from ftkit.train.tiny import ensure_tiny_bagel

    root = tmp_path_factory.mktemp("real")
    generate(root / "data", 16, seed=0, size=64, progress=False)
    ensure_tiny_bagel(root / "BAGEL-7B-MoT", corpus=str(root / "data" / "records.jsonl"), vocab_size=512, hidden=32,
                      layers=2, heads=2, kv_heads=1, intermediate=64, vit_hidden=32, vit_layers=1, vit_heads=2,
                      vit_intermediate=64)
    torch.manual_seed(0)
    parts = root / "parts"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
                     ).save_pretrained(parts / "qwen2")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(fixture_dir / f, parts / "qwen2" / f)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=56, patch_size=14)
                      ).save_pretrained(parts / "siglip")
    AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1,
                  norm_num_groups=32).save_pretrained(parts / "vae")
    fox = build_fox(parts / "qwen2", parts / "siglip", parts / "vae", max_latent_size=8)
    save_fox(fox, load_fox_tokenizer(parts / "qwen2"), root / "fox-qwen2-0.5b")
    return root


def data_args(root):
    return ["--data.datasets", json.dumps([str(root / "data" / "records.jsonl")]), "--data.generate_shapes", "null",
            "--data.val_dataset", "null", "--data.token_budget", "600", "--data.num_workers", "0",
            "--data.vae_image_size", "64", "--data.vit_image_size", "56"]


def fit(*args, cwd=REPO_ROOT):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ftkit.cli", "fit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=900)


@pytest.mark.parametrize("recipe,folder", [("bagel-mcot", "BAGEL-7B-MoT"), ("bagel-qlora-24gb", "BAGEL-7B-MoT"),
                                           ("fox-mcot", "fox-qwen2-0.5b")])
def test_recipe_trains_from_model_path(folders, recipe, folder):
    runs = folders / "runs"
    r = fit("--config", recipe, "--model.model_path", str(folders / folder), "--run_root", str(runs),
            *data_args(folders), *CPU)
    assert r.returncode == 0, f"{recipe}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    run = (runs / recipe / "latest").resolve()
    info = json.loads((run / "run.json").read_text())
    assert info["base_model"] == str(folders / folder) and info["global_step"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_missing_weights_name_the_override(tmp_path):
    """The weights check reads the command line, not the recipe's default path."""
    missing = tmp_path / "nowhere"
    r = fit("--config", "bagel-mcot", "--model.model_path", str(missing), "--run_root", str(tmp_path))
    assert r.returncode != 0 and f"model weights not found at '{missing}'" in r.stderr + r.stdout
    r = fit("--config", "bagel-mcot", f"--model.model_path={missing}", "--run_root", str(tmp_path))
    assert f"'{missing}'" in r.stderr + r.stdout and "models/BAGEL-7B-MoT" not in r.stderr + r.stdout


def test_make_model_variable():
    out = subprocess.run(["make", "-n", "recipe=bagel-mcot", "MODEL=/data/BAGEL-7B-MoT", "ARGS=--trainer.devices 8"],
                         capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout
    line = next(x for x in out.splitlines() if " fit " in x)
    assert "--config recipes/bagel-mcot.yaml --model.model_path /data/BAGEL-7B-MoT" in line and line.endswith("8")
    line = next(x for x in subprocess.run(["make", "-n", "recipe=tiny-mcot"], capture_output=True, text=True,
                                          cwd=REPO_ROOT, check=True).stdout.splitlines() if " fit " in x)
    assert "model_path" not in line


def test_cli_value_forms():
    assert cli_value(["--model.model_path", "a", "--x", "1", "--model.model_path=b"], "model.model_path") == "b"
    assert cli_value(["--model.model_path_other", "a"], "model.model_path") is None


def test_typed_sections(tmp_path):
    """model.adapter / loss / tiny are dataclasses: fields are checked at parse time, hparams stay plain."""
    from ftkit.adapters.config import AdapterConfig
    from ftkit.train.module import MCoTModule

    m = MCoTModule(model_path=str(tmp_path), adapter={"r": 8}, loss={"spatial": 0.5}, tiny={"corpus": "c.jsonl"})
    assert isinstance(m.adapter_cfg, AdapterConfig) and m.adapter_cfg.r == 8 and m.loss_weights.spatial == 0.5
    assert m.hparams.adapter["r"] == 8 and m.hparams.tiny["corpus"] == "c.jsonl"  # plain dicts in checkpoints
    with pytest.raises(TypeError, match="rank"):
        MCoTModule(model_path=str(tmp_path), adapter={"rank": 8})
    r = fit("--config", "tiny-mcot", "--model.adapter.rank", "8", "--run_root", str(tmp_path))
    assert r.returncode != 0 and "rank" in r.stderr


def test_cpu_bf16_warning_only_where_bf16_is_emulated():
    assert "32-true" in cpu_bf16_warning("bf16-mixed", on_cpu=True, native_bf16=False)
    assert "32-true" in cpu_bf16_warning("bf16-true", on_cpu=True, native_bf16=False)
    assert cpu_bf16_warning("bf16-mixed", on_cpu=True, native_bf16=True) is None
    assert cpu_bf16_warning("bf16-mixed", on_cpu=False, native_bf16=False) is None
    assert cpu_bf16_warning("32-true", on_cpu=True, native_bf16=False) is None
