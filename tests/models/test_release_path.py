"""The path from a release folder to a shipped checkpoint: what upstream's loader needs (one
ema.safetensors, vit_config image_size, Qwen2 tokenizer files), merge outputs that never destroy inputs,
adapters whose bytes are verified, and nothing non-finite written."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ftkit.adapters import AdapterConfig, attach_adapters, save_adapter
from ftkit.adapters.cli import merge_main
from ftkit.adapters.io import AdapterError, AdapterFolder, load_adapter
from ftkit.adapters.merge import human_bytes, merge
from ftkit.errors import FtkitError
from ftkit.models.loading import load_bagel
from ftkit.models.release import atomic_dir, build_random_bagel, save_bagel, tiny_ae_config, tiny_bagel_config
from ftkit.train.tiny import train_tokenizer

TEXTS = ["a photo of two red circles left of a blue square", "<box>red circle [100,200,300,400]</box>",
         "<verdict>revise</verdict> the square is too small, 12 px\n  it should be 345"] * 10


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from ftkit.models.loading import special_token_ids

    tok = train_tokenizer(TEXTS, 400)
    cfg = tiny_bagel_config(vocab_size=448, special_ids=special_token_ids(tok), vit_max=6)
    model = build_random_bagel(cfg, tiny_ae_config(ch=32, levels=2), seed=0)
    out = tmp_path_factory.mktemp("rel") / "bagel"
    save_bagel(model, out, tokenizer=tok, dtype=torch.float32)
    return out, tok, cfg


@pytest.fixture(scope="module")
def adapter(release, tmp_path_factory):
    folder, _, _ = release
    m = load_bagel(folder, dtype=torch.float32)
    attach_adapters(m, AdapterConfig(method="lora", preset="all-experts", r=4, alpha=8))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return save_adapter(m, None, tmp_path_factory.mktemp("ad") / "adapter", base_path=folder)


def test_release_tokenizer_loads_as_qwen2_and_tokenizes_alike(release):
    from transformers import AutoTokenizer, Qwen2Tokenizer

    folder, tok, _ = release
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "Qwen2Tokenizer" and tc["eos_token"] == "<|im_end|>"
    assert {v["content"] for v in tc["added_tokens_decoder"].values()} >= {"<|im_start|>", "<|vision_start|>"}
    # what upstream reads: vocab.json + merges.txt + tokenizer_config.json (tokenizer.json hidden)
    only_slow = folder.parent / "slow"
    only_slow.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (only_slow / name).write_bytes((folder / name).read_bytes())
    q = Qwen2Tokenizer.from_pretrained(str(only_slow))
    auto = AutoTokenizer.from_pretrained(str(folder))
    for s in [*TEXTS[:3], "two <|im_start|>blue squares<|im_end|> at [5,6,7,8]"]:
        want = tok(s)["input_ids"]
        assert q(s)["input_ids"] == want and auto(s)["input_ids"] == want, s


def test_vit_config_image_size_matches_position_table(release):
    folder, _, cfg = release
    vc = json.loads((folder / "vit_config.json").read_text())
    assert vc["image_size"] == cfg.vit_max_num_patch_per_side * cfg.vit.patch_size == 6 * 14


def test_default_merge_is_one_ema_safetensors(release, adapter, tmp_path, capsys):
    folder, _, _ = release
    out = tmp_path / "merged"
    assert merge_main(["--base", str(folder), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert (out / "ema.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert "upstream" not in printed  # no sharding note
    # the printed verdict names the compared quantity and its tolerance
    line = next(x for x in printed.splitlines() if x.startswith("verification:"))
    scaled, tol = float(line.split("max scaled diff ")[1].split()[0]), float(line.split("tolerance ")[1].split()[0])
    assert scaled <= tol and line.endswith(": ok")
    shards = tmp_path / "sharded"
    assert merge_main(["--base", str(folder), "--adapter", str(adapter), "--out", str(shards), "--dtype", "fp32",
                       "--max-shard-size", "100KB", "--no-verify"]) == 0
    assert (shards / "model.safetensors.index.json").is_file() and not (shards / "ema.safetensors").exists()
    assert "upstream BAGEL's loader reads only ema.safetensors" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["base", "inside-base", "contains-adapter"])
def test_merge_refuses_outputs_that_touch_inputs(release, adapter, tmp_path, where):
    folder, _, _ = release
    keep = {p.name for p in folder.iterdir()}
    out = {"base": folder, "inside-base": folder / "sub", "contains-adapter": adapter.parent}[where]
    with pytest.raises(FtkitError, match="output folder (is|contains|is inside) the input"):
        merge(folder, adapter, out, dtype="fp32", overwrite=True, verify=False)
    assert {p.name for p in folder.iterdir()} == keep and AdapterFolder(adapter).tensors()


def test_overwrite_replaces_only_model_folders(release, adapter, tmp_path):
    folder, _, _ = release
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FtkitError, match="replaces only a model folder"):
        merge(folder, adapter, precious, dtype="fp32", overwrite=True, verify=False)
    assert (precious / "holiday.jpg").read_bytes() == b"x"
    out = tmp_path / "m"
    merge(folder, adapter, out, dtype="fp32", verify=False)
    merge(folder, adapter, out, dtype="fp32", overwrite=True, verify=False)  # a model folder: replaced
    assert (out / "ema.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock / temp left


def test_second_writer_of_one_out_is_refused(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".o.lock").write_text(str(holder.pid))  # a live writer holds the lock
        with pytest.raises(FtkitError, match=f"another process \\(pid {holder.pid}\\)"):
            with atomic_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with atomic_dir(out) as tmp:  # its process is gone: the stale lock is taken over
        (tmp / "f").write_text("ok")
    assert (out / "f").read_text() == "ok" and not (tmp_path / ".o.lock").exists()


def test_adapter_sha256_is_verified(release, adapter, tmp_path):
    import shutil

    folder, _, _ = release
    bad = tmp_path / "flipped"
    shutil.copytree(adapter, bad)
    w = bad / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256 differs"):
        load_adapter(load_bagel(folder, dtype=torch.float32), bad)
    with pytest.raises(AdapterError, match="sha256 differs"):
        merge(folder, bad, tmp_path / "m", dtype="fp32", verify=False)
    assert not (tmp_path / "m").exists()


def test_non_finite_adapter_is_never_written_or_merged(release, adapter, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _, _ = release
    m = load_bagel(folder, dtype=torch.float32)
    attach_adapters(m, AdapterConfig(method="lora", preset="all-experts", r=4, alpha=8))
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(AdapterError, match="non-finite"):
        save_adapter(m, None, tmp_path / "nan", base_path=folder)
    assert not (tmp_path / "nan").exists()
    # an adapter poisoned outside ftkit (no sha256 recorded) is refused by the merge, nothing written
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    t = load_file(str(foreign / "adapter_model.safetensors"))
    k = next(k for k in t if "lora_B" in k)
    t[k] = torch.full_like(t[k], float("inf"))
    save_file(t, str(foreign / "adapter_model.safetensors"))
    meta = json.loads((foreign / "ftkit_adapter.json").read_text())
    meta.pop("sha256")
    (foreign / "ftkit_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(FtkitError, match="non-finite"):
        merge(folder, foreign, tmp_path / "m", dtype="fp32", verify=False)
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]


def test_free_space_units_show_the_difference():
    assert human_bytes(7.8e6) == "7.8 MB" and human_bytes(5e6) == "5 MB"
    assert human_bytes(14.2e9) == "14.2 GB" and human_bytes(512) == "512 B"
    assert os.path.exists(os.sep)


def test_estimate_prices_each_recipes_own_model_and_takes_overrides(release, capsys):
    from ftkit.cli import main

    def total(*argv):
        assert main(["estimate", *argv, "--json"]) in (0, 1)
        return json.loads(capsys.readouterr().out)

    fox, bagel = total("fox-mcot"), total("bagel-mcot")
    assert fox["experts"] == 3 and "Qwen2-0.5B" in fox["source"] and fox["weights_gb"] < 5 < bagel["weights_gb"]
    small = total("bagel-mcot", "--data.token_budget", "1024")
    assert small["tokens"] == 1024 and small["activations_gb"] < bagel["activations_gb"]
    folder, _, _ = release
    own = total("bagel-mcot", f"--model.model_path={folder}")
    assert own["source"] == str(folder) and own["weights_gb"] < 0.01
    assert main(["estimate", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-recipe" in err[0] and "known:" in err[0]


def test_generate_uses_the_models_size_and_refuses_broken_inputs(release, adapter, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from ftkit.infer.cli import generate_main
    from ftkit.models.folders import read_model_config

    folder, _, _ = release
    cfg = read_model_config(folder)
    side = cfg.default_image_size()
    assert cfg.vae_downsample == 2 and side == cfg.max_latent_size * 2 * cfg.latent_patch_size  # AE of stride 2
    argv = ["--model", str(folder), "--prompt", "a photo of a red circle", "--mode", "t2i", "--steps", "2"]
    assert generate_main([*argv, "--adapter", str(adapter), "--out", str(tmp_path / "g")]) == 0
    assert f"at {side}x{side} px" in capsys.readouterr().out
    from PIL import Image

    pngs = sorted((tmp_path / "g").rglob("*.png"))
    assert pngs and Image.open(next(p for p in pngs if "sheet" not in p.name)).size == (side, side)
    # a diverged adapter (NaN weights, written by another tool) is refused: no black PNG
    nan = tmp_path / "nan"
    shutil.copytree(adapter, nan)
    t = load_file(str(nan / "adapter_model.safetensors"))
    k = next(k for k in t if "lora_A" in k)
    t[k] = torch.full_like(t[k], float("nan"))
    save_file(t, str(nan / "adapter_model.safetensors"))
    meta = json.loads((nan / "ftkit_adapter.json").read_text())
    meta.pop("sha256")
    (nan / "ftkit_adapter.json").write_text(json.dumps(meta))
    assert generate_main([*argv, "--adapter", str(nan), "--out", str(tmp_path / "n")]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and str(nan) in err and not (tmp_path / "n").exists()
    # a truncated tokenizer.json is named
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tj = broken / "tokenizer.json"
    tj.write_text(tj.read_text()[:500])
    assert generate_main(["--model", str(broken), *argv[2:], "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert f"{tj}: not valid JSON" in err and len(err.strip().splitlines()) == 1
