"""``ftkit generate`` and ``ftkit eval`` end to end on a tiny BAGEL, a tiny adapter trained by ``ftkit fit``
and the merged (sharded) model; ``evaluate_shapes`` with a plug-in detector; bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ftkit.cli import setup_logging
from ftkit.data.geneval import GENEVAL_TAGS, Detection, Detector
from ftkit.infer.cli import _settings, build_generate_parser, eval_main, generate_main
from ftkit.infer.evaluate import balanced_subset, category_scores, evaluate_shapes, results_table
from ftkit.infer.generate import read_prompts
from ftkit.infer.load import load_for_inference
from ftkit.infer.mcot import SamplerSettings, TextSettings
from ftkit.models.folders import detect_model_folder
from ftkit.train.recipe import REPO_ROOT

PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
FAST = ["--steps", "3", "--max-new-tokens", "8"]
CELL = 192  # Trace.save's contact-sheet cell


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are all overhead: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine
    (10x faster here); the subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- helpers (as tests/train/test_train.py)
def write_recipe(root: Path, name: str) -> Path:
    cfg = {
        "defaults": [str(REPO_ROOT / "configs/loss/mcot.yaml"), str(REPO_ROOT / "configs/trainer/cpu.yaml")],
        "seed_everything": 0,
        "model": {"model_path": str(root / "model"), "dtype": "fp32", "lr": 1e-2, "warmup_steps": 1,
                  "adapter": {"method": "lora", "preset": "all-experts", "r": 4, "alpha": 8,
                              "modules_to_save": ["llm2vae"]}},
        "data": {"datasets": [str(root / "data" / "records.jsonl")], "token_budget": 400},
        "trainer": {"max_steps": 4, "enable_progress_bar": False},
        "ftkit": {"recipe": name, "checkpoint_every_n_steps": 100, "run_root": str(root / "runs")},
    }
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def ftkit_cmd(*args: str) -> list[str]:
    return [PY, "-m", "ftkit.cli", *map(str, args)]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(ftkit_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=REPO_ROOT)


def finish(p: subprocess.Popen, ok: bool = True, timeout: int = 600) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(p.args[3:])} failed ({p.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
    return p.returncode, out, err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny model + 24 shapes records, an adapter trained 4 steps by ``ftkit fit``, and the adapter merged
    by ``ftkit merge`` into shards (+ index) while the base model generates."""
    from ftkit.data.shapes import generate
    from ftkit.train.tiny import ensure_tiny_bagel

    root = tmp_path_factory.mktemp("infer_cli")
    generate(root / "data", 24, seed=0, size=64, progress=False)
    ensure_tiny_bagel(root / "model", corpus=str(root / "data" / "records.jsonl"), vocab_size=512, hidden=32, layers=2,
                      heads=2, kv_heads=1, intermediate=64, vit_hidden=32, vit_layers=1, vit_heads=2,
                      vit_intermediate=64)
    base_gen = start("generate", "--model", root / "model", "--prompt", *PROMPTS, "--out", root / "gen_base", *FAST)
    finish(subprocess.Popen(ftkit_cmd("fit", "--config", write_recipe(root, "gen"), "--run_id", "a"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO_ROOT))
    adapter = root / "runs" / "gen" / "a" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    merge = start("merge", "--base", root / "model", "--adapter", adapter, "--out", root / "merged", "--dtype", "fp32",
                  "--max-shard-size", "300KB")
    finish(base_gen)
    finish(merge)
    return {"root": root, "model": root / "model", "adapter": adapter, "merged": root / "merged"}


PROMPTS = ["a photo of a red circle", "two blue squares"]


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int64)


def check_generate_dir(out: Path, prompts: list[str], size=(64, 64)) -> dict:
    index = json.loads((out / "index.json").read_text())
    assert [e["prompt"] for e in index["prompts"]] == prompts
    for e in index["prompts"]:
        trace = json.loads((out / e["trace"]).read_text())
        assert trace["prompt"] == e["prompt"] and len(trace["rounds"]) == len(e["rounds"]) >= 1
        assert [r["image"] for r in trace["rounds"]] == e["rounds"]
        for name in [*e["rounds"], e["final"]]:
            with Image.open(out / name) as im:
                assert im.format == "PNG" and im.size == (size[1], size[0])
        assert np.array_equal(png(out / e["final"]), png(out / e["rounds"][-1]))
        with Image.open(out / e["sheet"]) as sheet:  # prompt/plan panel + (image, reflection) per round
            assert sheet.size == (CELL * (1 + 2 * len(trace["rounds"])), CELL + 16)
    files = {p.name for p in out.iterdir()}
    assert files == {"index.json"} | {f for e in index["prompts"] for f in (*e["rounds"], e["final"], e["trace"],
                                                                            e["sheet"])}
    return index


# ---------------------------------------------------------------------------- generate
def test_generate_base_adapter_and_merged(env):
    root = env["root"]
    pa = start("generate", "--model", env["model"], "--adapter", env["adapter"], "--prompt", *PROMPTS, "--out",
               root / "gen_adapter", *FAST)
    pm = start("generate", "--model", env["merged"], "--prompt", *PROMPTS, "--out", root / "gen_merged", *FAST)
    _, out_a, err_a = finish(pa)
    _, out_m, _ = finish(pm)
    assert "generated 2 prompt(s) (mcot)" in out_a and "generate (mcot)" in err_a  # summary + progress bar
    assert "adapter was trained on" not in err_a  # the adapter's recorded base is this model
    base = check_generate_dir(root / "gen_base", PROMPTS)
    adapted = check_generate_dir(root / "gen_adapter", PROMPTS)
    merged = check_generate_dir(root / "gen_merged", PROMPTS)
    assert base["adapter"] is None and adapted["adapter"] == str(env["adapter"].resolve())
    assert base["mode"] == "mcot" and base["sampler"]["num_timesteps"] == 3 and base["text"]["max_plan_tokens"] == 8
    assert (env["merged"] / "model.safetensors.index.json").is_file()  # the sharded layout was loaded
    # --no-merge: the adapter as a branch while sampling (the default folds it into the weights for the run)
    rc = generate_main(["--model", str(env["model"]), "--adapter", str(env["adapter"]), "--prompt", *PROMPTS,
                        "--out", str(root / "gen_branch"), "--no-merge", *FAST])
    assert rc == 0
    branch = check_generate_dir(root / "gen_branch", PROMPTS)
    assert adapted["merged_adapter"] is True and branch["merged_adapter"] is False and base["merged_adapter"] is False
    for eb, ea, em, er in zip(base["prompts"], adapted["prompts"], merged["prompts"], branch["prompts"]):
        b, a, m, r = (png(d / e["rounds"][0]) for d, e in ((root / "gen_base", eb), (root / "gen_adapter", ea),
                                                             (root / "gen_merged", em), (root / "gen_branch", er)))
        assert np.abs(a - b).mean() > 1.0  # the trained adapter changes the drafts
        assert np.abs(a - m).max() <= 3  # merged (fp32) == base + adapter up to rounding
        assert np.abs(a - r).max() <= 3  # merged while sampling == the adapter as a branch, up to rounding


def test_generate_t2i_from_prompts_file(env, tmp_path, capsys):
    pf = tmp_path / "prompts.jsonl"
    pf.write_text('{"prompt": "a photo of a green ring"}\n\n{"prompt": "three yellow crosses", "id": 7}\n')
    out = tmp_path / "t2i"
    out.mkdir()  # an existing EMPTY folder is fine
    rc = generate_main(["--model", str(env["model"]), "--prompts", str(pf), "--out", str(out), "--mode", "t2i",
                        "--size", "32", "48", "--steps", "2", "--seed", "5"])
    assert rc == 0, capsys.readouterr().err
    index = check_generate_dir(out, ["a photo of a green ring", "three yellow crosses"], size=(32, 48))
    assert index["mode"] == "t2i" and [e["seed"] for e in index["prompts"]] == [5, 6]
    trace = json.loads((out / index["prompts"][0]["trace"]).read_text())
    assert trace["plan"] is None and len(trace["rounds"]) == 1 and trace["rounds"][0]["verdict"] == "none"
    # same seed, same output: the run is reproducible; --overwrite replaces the folder
    first = png(out / index["prompts"][1]["final"])
    rc = generate_main(["--model", str(env["model"]), "--prompt", "three yellow crosses", "--out", str(out), "--mode",
                        "t2i", "--size", "32", "48", "--steps", "2", "--seed", "6", "--overwrite"])
    assert rc == 0
    again = json.loads((out / "index.json").read_text())
    assert len(again["prompts"]) == 1 and np.array_equal(png(out / again["prompts"][0]["final"]), first)
    assert not list(tmp_path.glob(".t2i*"))  # no temporary folder left behind


def test_model_folder_sampling_json_sets_the_sampler_defaults(env, tmp_path, capsys):
    """A folder's sampling.json replaces the built-in sampler defaults; a flag still wins; a bad field is one line
    naming the file and the field."""
    folder = tmp_path / "model"
    shutil.copytree(env["model"], folder)

    def gen(out, *extra):
        rc = generate_main(["--model", str(folder), "--adapter", str(env["adapter"]), "--prompt", "a red circle",
                            "--out", str(tmp_path / out), "--mode", "t2i", "--size", "32", "--seed", "1", *extra])
        assert rc == 0, capsys.readouterr().err
        capsys.readouterr()
        return png(tmp_path / out / json.loads((tmp_path / out / "index.json").read_text())["prompts"][0]["final"])

    unguided = gen("a", "--steps", "2", "--cfg-text", "1")
    (folder / "sampling.json").write_text(json.dumps({"num_timesteps": 2, "cfg_text_scale": 1.0}))
    assert SamplerSettings.for_model(folder) == SamplerSettings(num_timesteps=2, cfg_text_scale=1.0)
    assert np.array_equal(gen("b"), unguided)  # no flags: the folder's settings
    assert not np.array_equal(gen("c", "--cfg-text", "4"), unguided)  # a flag overrides the folder
    for bad, field in (({"cfg_text_scale": -1}, "cfg_text_scale"), ({"cfg_interval": [0.9, 0.1]}, "cfg_interval"),
                       ({"num_timesteps": 2.5}, "num_timesteps"), ({"guidance": 4}, "guidance")):
        (folder / "sampling.json").write_text(json.dumps(bad))
        rc = generate_main(["--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "d"), "--mode", "t2i"])
        err = "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[ftkit] "))  # info
        assert rc == 1 and "sampling.json" in err and repr(field) in err and len(err.splitlines()) == 1, err


def test_adapter_sampling_json_sets_the_revise_threshold_over_the_model_folder(env, tmp_path, capsys):
    """An adapter folder's sampling.json (its calibrated revise threshold, written by ftkit fit from the recipe)
    overrides the model folder's; flags override both; a bad value names the adapter's file and the field."""
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    shutil.copytree(env["model"], model)
    shutil.copytree(env["adapter"], adapter)

    def settings(*flags):
        a = build_generate_parser().parse_args(["--model", str(model), "--adapter", str(adapter), "--prompt", "x",
                                                "--out", str(tmp_path / "o"), "--size", "32", *flags])
        _, sampler, text = _settings(a)
        return sampler, text.revise_threshold

    assert settings() == (SamplerSettings(), 0.5)  # neither folder says anything: the built-in defaults
    (model / "sampling.json").write_text(json.dumps({"cfg_text_scale": 8.0, "num_timesteps": 20}))
    (adapter / "sampling.json").write_text(json.dumps({"revise_threshold": 0.8, "cfg_text_scale": 6.0}))
    setup_logging()  # as every `ftkit` verb does: its lines on stderr
    capsys.readouterr()
    sampler, threshold = settings()
    assert (sampler.cfg_text_scale, sampler.num_timesteps, threshold) == (6.0, 20, 0.8)
    said = [ln for ln in capsys.readouterr().err.splitlines() if "sampling settings from" in ln]
    assert said == [f"[ftkit] sampling settings from {model / 'sampling.json'}: num_timesteps=20 (flags override)",
                    f"[ftkit] sampling settings from {adapter / 'sampling.json'}: cfg_text_scale=6.0, "
                    "revise_threshold=0.8 (flags override)"], said  # each setting named once, where it is taken from
    sampler, threshold = settings("--revise-threshold", "0.6", "--cfg-text", "2")
    assert (sampler.cfg_text_scale, sampler.num_timesteps, threshold) == (2.0, 20, 0.6)
    for flags, name in ((["--revise-threshold", "0.3"], "--revise-threshold"), (["--cfg-interval", "0.9", "0.1"],
                                                                                    "--cfg-interval"),
                        (["--steps", "0"], "--steps")):
        with pytest.raises(ValueError, match=f"^{name}: field"):
            settings(*flags)
    (adapter / "sampling.json").write_text(json.dumps({"revise_threshold": 1.0}))
    rc = generate_main(["--model", str(model), "--adapter", str(adapter), "--prompt", "x", "--out",
                        str(tmp_path / "d"), "--mode", "mcot"])
    err = "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[ftkit] ")).strip()
    assert rc == 1 and str(adapter / "sampling.json") in err and "'revise_threshold'" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------- eval
def test_eval_shapes_cli(env):
    out = env["root"] / "eval"
    _, stdout, _ = finish(start("eval", "shapes", "--model", env["model"], "--adapter", env["adapter"], "--out", out,
                                "--n", "6", *FAST))
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 6 and res["modes"] == ["direct", "mcot"] and res["data"] == "shapes-eval"
    assert res["counts"] == {t: 1 for t in GENEVAL_TAGS}  # the subset is category-balanced
    for mode in ("direct", "mcot"):
        s = res["scores"][mode]
        assert list(s) == [*GENEVAL_TAGS, "overall"]
        assert all(0.0 <= v <= 1.0 for v in s.values())
        per = [p[mode]["passed"] for p in res["prompts"]]
        assert s["overall"] == pytest.approx(np.mean(per))  # one prompt per category
    for p in res["prompts"]:
        for mode in ("direct", "mcot"):
            assert isinstance(p[mode]["passed"], bool) and isinstance(p[mode]["reason"], str)
            assert p[mode]["passed"] == (p[mode]["reason"] == "")
            assert (out / p[mode]["image"]).is_file()
        failed = not (p["direct"]["passed"] and p["mcot"]["passed"])
        assert ("failure_sheet" in p) == failed
        if failed:
            with Image.open(out / p["failure_sheet"]) as im:
                assert im.height == 2 * (CELL + 16)  # MCoT sheet above the per-mode verdict row
    assert res["failure_sheets"] == len(list((out / "failures").glob("*.png")))
    md = (out / "results.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0] == "| mode | " + " | ".join([*GENEVAL_TAGS, "overall"]) + " |"
    assert table[1].startswith("| direct |") and table[2].startswith("| mcot |")
    assert f"{res['scores']['mcot']['overall']:.3f}" in table[2]
    assert "| direct |" in stdout


class FixedDetector:
    """A real Detector: reports the same objects for every image, and counts the images it saw."""

    def __init__(self, detections=None):
        self.detections = detections if detections is not None else [
            Detection("circle", "red", (4.0, 4.0, 20.0, 20.0), 0.9),
            Detection("square", "blue", (40.0, 40.0, 60.0, 60.0), 0.8)]
        self.shapes = []

    def detect(self, image: np.ndarray) -> list[Detection]:
        assert image.dtype == np.uint8
        self.shapes.append(image.shape)
        return list(self.detections)


def make_detector():
    return FixedDetector()


RECORDS = [
    {"id": "c", "prompt": "a photo of a circle", "meta": {"tag": "single_object", "include": [{"class": "circle",
                                                                                             "count": 1}]}},
    {"id": "t", "prompt": "a photo of a triangle", "meta": {"tag": "single_object",
                                                            "include": [{"class": "triangle", "count": 1}]}},
    {"id": "p", "prompt": "a photo of a square right of a circle", "meta": {
        "tag": "position", "include": [{"class": "circle", "count": 1},
                                       {"class": "square", "count": 1, "position": ["right of", 0]}]}},
    {"id": "k", "prompt": "a photo of a green circle", "meta": {"tag": "colors", "include": [
        {"class": "circle", "count": 1, "color": "green"}]}},
]


@pytest.fixture(scope="module")
def base(env):
    return load_for_inference(env["model"])


def test_evaluate_shapes_with_plugged_detector(base, tmp_path):
    model, tok = base
    det = FixedDetector()
    assert isinstance(det, Detector)
    res = evaluate_shapes(model, tok, RECORDS, detector=det, rounds=2, image_hw=(32, 32),
                          sampler=SamplerSettings(num_timesteps=2), text=TextSettings(4, 4), out_dir=tmp_path,
                          progress=False)
    # the verdicts are the fixed detections' (not the generated pixels'): proves the detector was used
    verdicts = {p["id"]: (p["direct"]["passed"], p["mcot"]["passed"]) for p in res["prompts"]}
    assert verdicts == {"c": (True, True), "t": (False, False), "p": (True, True), "k": (False, False)}
    one = evaluate_shapes(model, tok, RECORDS, detector=FixedDetector(), rounds=1, image_hw=(32, 32),  # draft only is allowed
                          sampler=SamplerSettings(num_timesteps=2), text=TextSettings(4, 4), progress=False)
    assert {p["id"]: (p["direct"]["passed"], p["mcot"]["passed"]) for p in one["prompts"]} == verdicts
    reasons = {p["id"]: p["direct"]["reason"] for p in res["prompts"]}
    assert reasons["t"] == "expected triangle>=1, found 0"
    assert reasons["k"].startswith("expected green circle>=1, found 0 green")
    assert all(s == (32, 32, 3) for s in det.shapes)
    # direct + MCoT final + MCoT draft per record, and the failure sheets' boxes for the 2 failed records
    assert len(det.shapes) == 4 * 3 + 2 * 2
    for mode in ("direct", "mcot"):
        assert res["scores"][mode] == {"single_object": 0.5, "two_object": None, "counting": None, "colors": 0.0,
                                       "position": 1.0, "color_attr": None, "overall": 0.5}
    assert res["detector"] == "FixedDetector" and res["failure_sheets"] == 2
    assert sorted(p.name for p in (tmp_path / "failures").iterdir()) == ["0001_t.png", "0003_k.png"]
    md = (tmp_path / "results.md").read_text()
    assert "| direct | 0.500 | - | - | 0.000 | 1.000 | - | 0.500 |" in md


def test_eval_cli_detector_option_and_direct_only(env, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({**r, "task": "t2i", "steps": [{"type": "plan", "caption": "x", "boxes": []}]}) + "\n" for r in RECORDS[:2]))
    out = tmp_path / "ev"
    rc = eval_main(["shapes", "--model", str(env["model"]), "--out", str(out), "--data", str(data), "--modes", "direct",
                    "--detector", f"{__name__}:make_detector", "--steps", "2", "--size", "32"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["detector"] == "FixedDetector" and list(res["scores"]) == ["direct"] and res["mcot_draft"] is None
    assert [p["direct"]["passed"] for p in res["prompts"]] == [True, False]
    assert res["scores"]["direct"]["single_object"] == 0.5
    rc = eval_main(["shapes", "--model", str(env["model"]), "--out", str(tmp_path / "x"), "--data", str(data),
                    "--detector", "ftkit.data.geneval:GENEVAL_TAGS"])
    assert rc == 1 and "has no detect(image) method" in capsys.readouterr().err


# ---------------------------------------------------------------------------- loading
def test_load_for_inference_folder_kinds(env, tmp_path):
    assert detect_model_folder(env["model"]) == "bagel"
    assert detect_model_folder(env["merged"]) == "bagel-sharded"
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        detect_model_folder(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(ValueError, match="model_type is 'qwen2'"):
        detect_model_folder(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        detect_model_folder(tmp_path)
    # an adapter on a folder other than its recorded base loads, with a warning
    with pytest.warns(UserWarning, match="adapter was trained on"):
        model, _ = load_for_inference(env["merged"], env["adapter"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # the sharded merge output loads through load_bagel's index reader, quantized too
    sharded4, _ = load_for_inference(env["merged"], quantize="nf4")
    assert type(sharded4.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # QLoRA-style: 4-bit base + the adapter, still generates
    from ftkit.infer.mcot import text_to_image

    model, tok = load_for_inference(env["model"], env["adapter"], quantize="nf4")
    assert type(model.language_model.model.layers[0].self_attn.q_proj.get_base_layer()).__name__ == "Linear4bit"
    im = text_to_image(model, tok, "a red circle", image_hw=(32, 32), sampler=SamplerSettings(num_timesteps=2))
    assert im.size == (32, 32)


def test_read_prompts_and_helpers(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("# comment\na red circle\n\n  two squares  \n")
    assert read_prompts(t) == ["a red circle", "two squares"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: field \"prompt\""):
        read_prompts(bad)
    recs = [{"prompt": f"p{i}", "meta": {"tag": "ab"[i % 3 == 0], "include": [{"class": "x", "count": 1}]}}
            for i in range(7)]
    sub = balanced_subset(recs, 4)
    assert [r["prompt"] for r in sub] == ["p0", "p1", "p3", "p2"]
    assert category_scores({"colors": [True, False], "mine": [True]})["overall"] == pytest.approx(0.75)
    assert results_table({"direct": category_scores({"colors": [True]})}).count("|") == 3 * 9


# ---------------------------------------------------------------------------- bad input
def test_bad_input_exits_nonzero_with_clear_error(env, tmp_path, capsys):
    r = subprocess.run(ftkit_cmd("generate", "--model", tmp_path / "missing", "--prompt", "x", "--out", tmp_path / "o"),
                       capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 1 and "ftkit generate: error:" in r.stderr and "missing: model folder not found" in r.stderr
    assert not (tmp_path / "o").exists()

    def gen(*args):
        rc = generate_main(["--model", str(env["model"]), "--out", str(tmp_path / "o"), *map(str, args)])
        return rc, capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    rc, err = gen("--prompts", bad)
    assert rc == 1 and "bad.jsonl:2: not JSON" in err
    rc, err = gen("--prompts", tmp_path / "prompts.csv")
    assert rc == 1 and "prompts.csv: prompts file not found" in err
    (tmp_path / "p.csv").write_text("a,b\n")
    rc, err = gen("--prompts", tmp_path / "p.csv")
    assert rc == 1 and "must be .txt" in err
    rc, err = gen("--prompt", "x", "--size", "40")
    assert rc == 1 and "multiples of the VAE stride 16" in err
    rc, err = gen("--prompt", "x", "--adapter", tmp_path)
    assert rc == 1 and "not an ftkit adapter folder" in err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    rc, err = gen("--prompt", "x")
    assert rc == 1 and "output folder is not empty (pass --overwrite" in err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as e:  # argparse: --prompt and --prompts together
        gen("--prompt", "x", "--prompts", bad)
    assert e.value.code == 2
    rc = eval_main(["shapes", "--model", str(env["model"]), "--out", str(tmp_path / "e"), "--data", "no-such-set"])
    assert rc == 1 and "no-such-set" in capsys.readouterr().err
    rc = eval_main(["shapes", "--model", str(env["model"]), "--out", str(tmp_path / "e"), "--data", str(bad)])
    assert rc == 1 and "bad.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_generated_trace_parses(env):
    from ftkit.infer.mcot import Trace

    out = env["root"] / "gen_base"
    index = json.loads((out / "index.json").read_text())
    for e in index["prompts"]:
        tr = Trace.from_json((out / e["trace"]).read_text(), base_dir=out)
        assert tr.prompt == e["prompt"] and tr.plan_text is not None and tr.final_image.size == (64, 64)
        assert tr.settings["seed"] == e["seed"] and tr.settings["sampler"]["num_timesteps"] == 3
        assert np.array_equal(np.asarray(tr.final_image, dtype=np.int64), png(out / e["final"]))


# ---------------------------------------------------------------------------- FoX folder (+ adapter)
def test_fox_folder_with_adapter_generates(tmp_path, fixture_dir, capsys):
    """An ftkit FoX folder is detected and generates; an adapter saved on it changes the output."""
    import shutil

    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from ftkit.adapters import AdapterConfig, attach_adapters, save_adapter
    from ftkit.infer.mcot import text_to_image
    from ftkit.models.fox import build_fox, load_fox_tokenizer, save_fox

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True)).save_pretrained(
        tmp_path / "qwen2")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(fixture_dir / f, tmp_path / "qwen2" / f)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=56, patch_size=14)).save_pretrained(
        tmp_path / "siglip")
    AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=1,
                  norm_num_groups=32).save_pretrained(tmp_path / "vae")
    model = build_fox(tmp_path / "qwen2", tmp_path / "siglip", tmp_path / "vae", mode="shared", max_latent_size=8)
    with torch.no_grad():  # FoX starts with llm2vae = 0 (velocity independent of the decoder): give it weights
        model.llm2vae.weight.normal_(0, 0.1)
    save_fox(model, load_fox_tokenizer(tmp_path / "qwen2", vocab_size=512), tmp_path / "fox")
    attach_adapters(model, AdapterConfig(method="lora", preset="generative", r=2, alpha=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(model, None, tmp_path / "fox_adapter", base_path=tmp_path / "fox")

    assert detect_model_folder(tmp_path / "fox") == "fox"
    s, g = SamplerSettings(num_timesteps=2), lambda: torch.Generator().manual_seed(0)
    fox, tok = load_for_inference(tmp_path / "fox")
    fox_ad, tok_ad = load_for_inference(tmp_path / "fox", tmp_path / "fox_adapter")
    a = np.asarray(text_to_image(fox, tok, "a red circle", image_hw=(32, 32), sampler=s, generator=g()), dtype=int)
    b = np.asarray(text_to_image(fox_ad, tok_ad, "a red circle", image_hw=(32, 32), sampler=s, generator=g()),
                   dtype=int)
    assert a.shape == (32, 32, 3) and np.abs(a - b).max() > 0
    rc = generate_main(["--model", str(tmp_path / "fox"), "--adapter", str(tmp_path / "fox_adapter"), "--prompt",
                        "a red circle", "--out", str(tmp_path / "gen"), "--size", "32", "--steps", "2",
                        "--max-new-tokens", "4"])
    assert rc == 0, capsys.readouterr().err
    check_generate_dir(tmp_path / "gen", ["a red circle"], size=(32, 32))
