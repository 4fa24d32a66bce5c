"""Streaming merge on the bagel-tiny fixture: LoRA / DoRA / rsLoRA / QLoRA adapters, modules_to_save,
three-expert upcycling, shards + index, refusals (4-bit, other base, existing output, missing files), atomicity."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftkit.adapters import (
    AdapterConfig,
    AdapterError,
    MergeError,
    attach_adapters,
    merge_into_model,
    save_adapter,
)
from ftkit.adapters.attach import lora_layers
from ftkit.adapters.cli import merge_main
from ftkit.adapters.io import load_adapter
from ftkit.adapters.merge import (
    Checkpoint,
    lora_scale,
    merge,
    parse_size,
    probe_batch,
    run_probe,
)
from ftkit.errors import FtkitError
from ftkit.models.loading import load_bagel
from ftkit.models.release import build_random_bagel, tiny_bagel_config
from tests.adapters import randomize_adapters


def make_adapter(fixture_dir, out, cfg, *, quantize=None, three_experts=False, seed=0):
    m = load_bagel(fixture_dir, dtype=torch.float32, quantize=quantize, three_experts=three_experts)
    attach_adapters(m, cfg)
    randomize_adapters(m, seed)
    return save_adapter(m, cfg, out, base_path=fixture_dir, extra={"recipe": "tiny-mcot", "metrics": {"ce": 2.0}}), m


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def lora_adapter(fixture_dir, work):
    cfg = AdapterConfig(preset="all-experts", r=4, alpha=8.0, expert_r={"generative": 2}, modules_to_save=["vae2llm"])
    return make_adapter(fixture_dir, work / "lora", cfg)[0]


def no_leftovers(parent):
    return not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("method", ["lora", "dora", "rslora"])
def test_merge_matches_peft_merge_and_outputs(fixture_dir, work, method):
    cfg = AdapterConfig(method=method, preset="generative", r=4, alpha=8.0, expert_r={"generative": 3},
                        modules_to_save=["llm2vae"])
    ad, _ = make_adapter(fixture_dir, work / f"ad-{method}", cfg, seed=11)
    rep = merge(fixture_dir, ad, work / f"out-{method}", dtype="fp32", max_shard_size=None)
    assert rep.merged == 14 and rep.replaced == 2 and not rep.sharded
    assert rep.max_diff is not None and rep.max_diff <= 1e-4
    # weights equal peft's own in-memory merge of the same adapter (math check of the streaming merge)
    ref = load_adapter(load_bagel(fixture_dir, dtype=torch.float32), ad)
    merge_into_model(ref)
    assert not lora_layers(ref)
    merged = load_file(work / f"out-{method}" / "ema.safetensors")
    want = ref.release_state_dict()
    assert set(merged) == set(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], atol=2e-6, rtol=1e-5, msg=k)
    base = load_file(fixture_dir / "ema.safetensors")
    assert not torch.equal(merged["language_model.model.layers.0.mlp_moe_gen.up_proj.weight"].to(base[
        "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"].dtype), base["language_model.model.layers.0.mlp_moe_gen.up_proj.weight"])
    assert torch.equal(merged["language_model.model.layers.0.mlp.up_proj.weight"],
                       base["language_model.model.layers.0.mlp.up_proj.weight"].float())
    # folder: release files, byte-identical autoencoder, model card with the run info
    out = work / f"out-{method}"
    for f in ("llm_config.json", "vit_config.json", "ae.safetensors", "vocab.json", "README.md"):
        assert (out / f).is_file(), f
    assert (out / "ae.safetensors").read_bytes() == (fixture_dir / "ae.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert "tiny-mcot" in card and method in card and "max abs diff" in card
    # ftkit's loader reads the merged folder; its outputs match base + adapter
    probe = probe_batch(ref.cfg, seed=9)
    adapted = run_probe(load_adapter(load_bagel(fixture_dir, dtype=torch.float32), ad), probe)
    got = run_probe(load_bagel(out, dtype=torch.float32), probe)
    for k in adapted:
        torch.testing.assert_close(got[k], adapted[k], atol=1e-4, rtol=0)
    assert no_leftovers(work)


def test_bf16_merge_default_tolerance(fixture_dir, lora_adapter, work):
    rep = merge(fixture_dir, lora_adapter, work / "out-bf16")
    assert rep.tolerance == 2e-2 and rep.max_scaled_diff <= 2e-2
    with safe_open(str(work / "out-bf16" / "ema.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert "language_model.model.layers.1.mlp.down_proj.weight" in f.keys()


def test_qlora_adapter_merges_into_unquantized_base(fixture_dir, work):
    cfg = AdapterConfig(preset="generative", r=4, alpha=8.0)
    ad, qmodel = make_adapter(fixture_dir, work / "ad-qlora", cfg, quantize="nf4", seed=4)
    assert json.loads((ad / "ftkit_adapter.json").read_text())["base"]["fingerprint"]["quantization"] == "nf4"
    with pytest.raises(MergeError, match="4-bit.*UNQUANTIZED"):
        merge_into_model(qmodel)
    rep = merge(fixture_dir, ad, work / "out-qlora", dtype="fp32", max_shard_size=None)
    assert rep.max_diff <= 1e-4 and rep.merged == 14
    # W' = W + (alpha / r) B A on the unquantized base weight, by hand
    name = "language_model.model.layers.1.self_attn.o_proj_moe_gen"
    t = load_file(ad / "adapter_model.safetensors")
    A, B = t[f"base_model.model.{name}.lora_A.weight"], t[f"base_model.model.{name}.lora_B.weight"]
    W = load_file(fixture_dir / "ema.safetensors")[name + ".weight"].float()
    got = load_file(work / "out-qlora" / "ema.safetensors")[name + ".weight"]
    torch.testing.assert_close(got, W + 2.0 * B.float() @ A.float(), atol=1e-6, rtol=1e-6)
    assert "QLoRA, nf4 base" in (work / "out-qlora" / "README.md").read_text()


def test_three_expert_adapter_upcycles(fixture_dir, work):
    cfg = AdapterConfig(preset="all-experts", r=4, expert_r={"semantic": 2})
    ad, _ = make_adapter(fixture_dir, work / "ad-3x", cfg, three_experts=True, seed=2)
    rep = merge(fixture_dir, ad, work / "out-3x", dtype="fp32", max_shard_size=None)
    assert rep.max_diff <= 1e-4 and rep.merged == 42 and rep.upcycled > 0
    m = load_bagel(work / "out-3x", dtype=torch.float32)
    assert m.cfg.experts == ("", "_moe_sem", "_moe_gen")
    sd = load_file(work / "out-3x" / "ema.safetensors")
    base = load_file(fixture_dir / "ema.safetensors")
    # untargeted _moe_sem tensors start from the understanding expert; targeted ones carry their own delta
    assert torch.equal(sd["language_model.model.layers.0.input_layernorm_moe_sem.weight"],
                       base["language_model.model.layers.0.input_layernorm.weight"].float())
    assert not torch.equal(sd["language_model.model.layers.0.mlp_moe_sem.up_proj.weight"],
                           sd["language_model.model.layers.0.mlp.up_proj.weight"])


def test_sharded_output_with_index(fixture_dir, lora_adapter, work):
    full = merge(fixture_dir, lora_adapter, work / "out-single", dtype="fp32", max_shard_size=None, verify=False)
    rep = merge(fixture_dir, lora_adapter, work / "out-shards", dtype="fp32", max_shard_size="150KB")
    out = work / "out-shards"
    assert rep.sharded and rep.max_diff <= 1e-4
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "ema.safetensors").exists()
    single = load_file(work / "out-single" / "ema.safetensors")
    assert set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == full.total_bytes
    for s in shards:  # each shard is a valid safetensors file (official reader) within the size limit
        tensors = load_file(out / s)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 150_000 or len(tensors) == 1
        for k, t in tensors.items():
            assert index["weight_map"][k] == s and torch.equal(t, single[k]), k
    m = load_bagel(out, dtype=torch.float32)  # the loader reads the index and its shards
    probe = probe_batch(m.cfg, seed=1)
    got = run_probe(m, probe)
    want = run_probe(load_bagel(work / "out-single", dtype=torch.float32), probe)
    assert all(torch.equal(got[k], want[k]) for k in got)
    with Checkpoint(out) as ck:  # the index-aware reader used by verification
        assert set(ck.infos) == set(single)


def test_merged_folder_keeps_the_sampling_settings(fixture_dir, lora_adapter, work):
    base = work / "base-sampling"
    shutil.copytree(fixture_dir, base)
    (base / "sampling.json").write_text('{"cfg_text_scale": 8.0}')
    merge(base, lora_adapter, work / "out-sampling", dtype="fp32", max_shard_size=None, verify=False)
    assert json.loads((work / "out-sampling" / "sampling.json").read_text()) == {"cfg_text_scale": 8.0}
    # the adapter's own settings (its calibrated revise threshold) go over the base's, in the merged folder
    adapter = work / "adapter-sampling"
    shutil.copytree(lora_adapter, adapter)
    (adapter / "sampling.json").write_text('{"revise_threshold": 0.8, "cfg_text_scale": 6.0}')
    merge(base, adapter, work / "out-sampling2", dtype="fp32", max_shard_size=None, verify=False)
    merged = json.loads((work / "out-sampling2" / "sampling.json").read_text())
    assert merged == {"cfg_text_scale": 6.0, "revise_threshold": 0.8}
    (adapter / "sampling.json").write_text('{"revise_threshold": 2}')
    with pytest.raises(ValueError, match=r"adapter-sampling/sampling\.json: field 'revise_threshold'"):
        merge(base, adapter, work / "never-sampling", dtype="fp32", max_shard_size=None, verify=False)
    assert not (work / "never-sampling").exists()


# ----------------------------------------------------------------------------- refusals and atomicity


def test_refuses_quantized_weights_and_models(fixture_dir, lora_adapter, work):
    q = work / "base-4bit"
    shutil.copytree(fixture_dir, q)
    sd = load_file(fixture_dir / "ema.safetensors")
    sd["language_model.model.layers.0.mlp.up_proj.weight.absmax"] = torch.ones(4)
    save_file(sd, q / "ema.safetensors")
    with pytest.raises(MergeError, match=r"quantized \(e\.g\. .*absmax\).*UNQUANTIZED"):
        merge(q, lora_adapter, work / "never-4bit")
    with pytest.raises(TypeError, match="merge_into_model"):
        merge(load_bagel(fixture_dir, dtype=torch.float32), lora_adapter, work / "never-model")
    assert not (work / "never-4bit").exists() and not (work / "never-model").exists()


def test_refuses_adapter_for_another_base(fixture_dir, work):
    other = build_random_bagel(tiny_bagel_config(hidden=32, intermediate=96))
    cfg = AdapterConfig(preset="generative", r=4)
    attach_adapters(other, cfg)
    ad = save_adapter(other, cfg, work / "ad-other")
    with pytest.raises(AdapterError, match=r"ad-other/ftkit_adapter\.json: adapter trained for another base.*hidden_size"):
        merge(fixture_dir, ad, work / "never-other")
    # same architecture record but other target shapes (a doctored fingerprint): names and shapes are reported
    meta = json.loads((ad / "ftkit_adapter.json").read_text())
    meta["base"]["fingerprint"]["arch"] = {}
    (ad / "ftkit_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"layers\.0\.mlp_moe_gen\.down_proj: adapter trained on \[32, 96\], the base .* has \[64, 128\]"):
        merge(fixture_dir, ad, work / "never-other")
    assert not (work / "never-other").exists() and no_leftovers(work)


def test_refuses_missing_files_and_existing_output(fixture_dir, lora_adapter, work):
    bad = work / "ad-incomplete"
    shutil.copytree(lora_adapter, bad)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        merge(fixture_dir, bad, work / "never-missing")
    nobase = work / "base-noconfig"
    nobase.mkdir()
    shutil.copy(fixture_dir / "ema.safetensors", nobase)
    with pytest.raises(FileNotFoundError, match="missing llm_config.json, vit_config.json"):
        merge(nobase, lora_adapter, work / "never-missing")
    existing = work / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge(fixture_dir, lora_adapter, existing)
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(FtkitError, match="replaces only a model folder.*nothing was deleted"):
        merge(fixture_dir, lora_adapter, existing, overwrite=True, verify=False)
    assert (existing / "keep.txt").read_text() == "mine"
    model_out = work / "existing-model"
    merge(fixture_dir, lora_adapter, model_out, verify=False)
    (model_out / "stale.txt").write_text("old")
    merge(fixture_dir, lora_adapter, model_out, overwrite=True, verify=False)  # a model folder: replaced whole
    assert not (model_out / "stale.txt").exists() and (model_out / "ema.safetensors").is_file()
    assert not (work / "never-missing").exists() and no_leftovers(work)


def test_failed_verification_leaves_nothing(fixture_dir, lora_adapter, work):
    with pytest.raises(MergeError, match="verification failed.*nothing written"):
        merge(fixture_dir, lora_adapter, work / "never-verify", tolerance=0.0)  # bf16 rounding > 0
    assert not (work / "never-verify").exists() and no_leftovers(work)


def test_disk_full_mid_write_leaves_nothing(fixture_dir, lora_adapter, work):
    """A real write failure: the child process may not write files larger than 200 kB (RLIMIT_FSIZE ->
    EFBIG, as a full disk gives ENOSPC); the merge must fail cleanly with no output folder."""
    out = work / "never-full"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from ftkit.adapters.merge import merge
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            merge({str(fixture_dir)!r}, {str(lora_adapter)!r}, {str(out)!r}, dtype="fp32", max_shard_size=None)
        except OSError as e:
            print("OSERROR", e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "writing the merged folder failed" in r.stdout and "Nothing was written" in r.stdout
    assert not out.exists() and no_leftovers(work)


# ----------------------------------------------------------------------------- CLI and helpers


def test_cli(fixture_dir, lora_adapter, work, capsys):
    out = work / "out-cli"
    assert merge_main(["--base", str(fixture_dir), "--adapter", str(lora_adapter), "--out", str(out),
                       "--dtype", "fp32", "--max-shard-size", "none"]) == 0
    printed = capsys.readouterr().out
    assert "verification: max scaled diff" in printed and ": ok" in printed and (out / "ema.safetensors").is_file()
    assert merge_main(["--base", str(fixture_dir), "--adapter", str(lora_adapter), "--out", str(out)]) == 1
    assert "output folder exists" in capsys.readouterr().err


def test_parse_size_and_scale():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500kb") == 500_000
    assert parse_size(None) is None and parse_size("none") is None and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")
    cfg = {"lora_alpha": 8, "alpha_pattern": {r"a\.\d+\.q": 4}, "use_rslora": False}
    assert lora_scale(cfg, "m.a.1.q", 2) == 2.0 and lora_scale(cfg, "m.a.1.k", 2) == 4.0
    assert lora_scale({**cfg, "use_rslora": True}, "m.a.1.k", 4) == 4.0


# ----------------------------------------------------------------------------- the one merge formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_merged_weight_is_peft_merge_bit_for_bit(method, dtype):
    """merged_weight (used by the streaming merge and by merge_into_model / merge_fox) equals peft's own
    layer.merge on real peft layers bit for bit (fp32 and bf16 bases, fp32 adapters, s = 5/3 or 5/sqrt(3),
    not a power of two), and merges a block of rows on its own (what the streaming merge relies on)."""
    from ftkit.adapters.attach import ADAPTER_NAME
    from ftkit.adapters.merge_common import merged_weight

    model = build_random_bagel(tiny_bagel_config(), dtype=dtype)
    attach_adapters(model, AdapterConfig(method=method, preset="generative", r=3, alpha=5.0))
    randomize_adapters(model, seed=5)
    layers = lora_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        base = layer.get_base_layer()
        args = (layer.lora_A[ADAPTER_NAME].weight.detach(), layer.lora_B[ADAPTER_NAME].weight.detach(),
                layer.scaling[ADAPTER_NAME])
        mag = layer.lora_magnitude_vector[ADAPTER_NAME].weight.detach() if method == "dora" else None
        assert layer.scaling[ADAPTER_NAME] == (5 / 3 ** 0.5 if method == "rslora" else 5 / 3)
        w0 = base.weight.detach().clone()
        ours = merged_weight(w0, *args, mag)
        assert torch.equal(base.weight, w0), "merged_weight changed its input"
        rows = w0.shape[0] // 3
        blocks = torch.cat([merged_weight(w0[:rows], args[0], args[1][:rows], args[2], None if mag is None else mag[:rows]),
                            merged_weight(w0[rows:], args[0], args[1][rows:], args[2], None if mag is None else mag[rows:])])
        torch.testing.assert_close(blocks, ours, rtol=1e-6, atol=0, msg=name)
        with torch.no_grad():
            layer.merge(safe_merge=True)
        assert base.weight.dtype == ours.dtype == dtype and torch.equal(base.weight, ours), name
        assert not torch.equal(ours, w0), name


def test_merge_into_model_refuses_a_non_finite_adapter(fixture_dir):
    model = load_bagel(fixture_dir, dtype=torch.float32)
    attach_adapters(model, AdapterConfig(preset="generative", r=4))
    name = sorted(lora_layers(model))[3]
    with torch.no_grad():
        lora_layers(model)[name].lora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(MergeError, match=rf"{name}\.weight: the merged tensor has non-finite values"):
        merge_into_model(model)
