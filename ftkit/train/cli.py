"""``ftkit fit`` (LightningCLI over a composed recipe) and ``ftkit estimate``.

    ftkit fit --config recipes/tiny-mcot.yaml [--trainer.max_steps 20 ...] [--ckpt_path last]

Every run writes a run folder (:mod:`ftkit.train.run`); faults it survives: :mod:`ftkit.train.faults`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml

from ftkit.train.recipe import compose, find_recipe, split_ftkit

log = logging.getLogger("ftkit")


def _make_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class FtkitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("model.model_path", "data.model_path")

    return FtkitCLI


def check_weights(cfg: dict, recipe: str) -> None:
    """A recipe that needs weights the user lacks fails at start, saying which folder and where to get it."""
    model = cfg.get("model", {})
    path = model.get("model_path")
    if not path or model.get("tiny") is not None or Path(path).exists():
        return
    from ftkit.models.loading import WEIGHTS_HINT

    hints = {"bagel": WEIGHTS_HINT,
             "fox": "Build a FoX folder from Qwen/Qwen2-0.5B, google/siglip-so400m-patch14-384 and a diffusers VAE "
                    "with ftkit.models.fox.build_fox + save_fox (all three are published on the Hugging Face Hub)."}
    raise SystemExit(f"recipe {recipe}: model weights not found at {path!r}. Pass the folder with "
                     f"--model.model_path PATH (or MODEL=PATH with make). {hints.get(model.get('backbone', 'bagel'), '')}")


def cli_value(args: list[str], key: str) -> str | None:
    """The last value given to ``--KEY`` in LightningCLI's argument forms (``--k v`` or ``--k=v``), else None."""
    value = None
    for i, a in enumerate(args):
        if a == f"--{key}" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(f"--{key}="):
            value = a.split("=", 1)[1]
    return value


def cpu_bf16_warning(precision: str, on_cpu: bool, native_bf16: bool | None = None) -> str | None:
    """One line for a bf16 run on a CPU without native bf16 (no AVX512-BF16 / AMX): there oneDNN emulates bf16
    and a step runs ~15x slower than fp32 (tiny-pretrain on a 2-core AVX2 EPYC: 110 vs 1,650 tokens/s)."""
    if not on_cpu or "bf16" not in str(precision):
        return None
    if native_bf16 is None:
        import torch

        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if native_bf16:
        return None
    return (f"precision {precision} on a CPU without native bf16 (no AVX512-BF16 / AMX): bf16 is emulated and "
            "a step runs ~15x slower than fp32; pass --trainer.precision 32-true")


def fit_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ftkit fit", add_help=False)
    ap.add_argument("--config", required=False)
    ap.add_argument("--ckpt_path", "--ckpt-path", default=None)
    ap.add_argument("--run_root", "--run-root", default=None)
    ap.add_argument("--run_id", "--run-id", default=None)
    ap.add_argument("-h", "--help", action="store_true")
    ns, rest = ap.parse_known_args(argv)
    if ns.help or not ns.config:
        print(__doc__)
        if ns.help:
            _make_cli_class()(_model_cls(), _dm_cls(), args=["--help"], run=False)
        return 0 if ns.help else 2
    recipe_path = find_recipe(ns.config)
    composed = compose(recipe_path)
    lcfg, fcfg = split_ftkit(composed)
    recipe = fcfg.get("recipe", recipe_path.stem)
    path = cli_value(rest, "model.model_path")
    if path is not None:  # the command line wins over the recipe, for the weights check too
        lcfg.setdefault("model", {})["model_path"] = path
    check_weights(lcfg, recipe)
    if fcfg.get("sampling") is not None:  # refused before a run folder exists
        from ftkit.models.folders import check_sampling

        fcfg["sampling"] = check_sampling(fcfg["sampling"], f"{recipe_path}: ftkit.sampling")
    from ftkit.train.run import open_run, run_folder

    run_root = Path(ns.run_root or fcfg.get("run_root") or "runs") / recipe
    run_dir, ckpt = open_run(run_root, ns.run_id, ns.ckpt_path)
    with run_folder(run_dir):
        return _fit(rest, recipe, recipe_path, lcfg, fcfg, run_root, run_dir, ckpt)


def _fit(rest, recipe, recipe_path, lcfg, fcfg, run_root: Path, run_dir: Path, ckpt: str | None) -> int:
    from ftkit.files import atomic_write
    from ftkit.train.faults import AtomicCheckpointIO, MetricsBeforeCheckpoint, RunCSVLogger
    from ftkit.train.run import git_commit, point_latest, summary, write_json

    cfg_file = run_dir / "config.yaml"
    atomic_write(cfg_file, lambda fh: fh.write(yaml.safe_dump(lcfg, sort_keys=False).encode()))

    import lightning as L  # noqa: F401
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from ftkit.train.callbacks import AdapterExport, MCoTSamples, WeightEMA

    every = int(fcfg.get("checkpoint_every_n_steps", 50))
    callbacks = [ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=every,
                                 save_top_k=int(fcfg.get("keep_checkpoints", 1)), monitor="step", mode="max"),
                 AdapterExport(run_dir / "adapter", extra={"recipe": recipe, "run_dir": str(run_dir)},
                               sampling=fcfg.get("sampling")),
                 MetricsBeforeCheckpoint(every)]
    if (fcfg.get("ema") or {}).get("decay"):
        callbacks.append(WeightEMA(float(fcfg["ema"]["decay"])))
    samples = fcfg.get("samples") or {}
    if samples.get("every_n_steps"):
        callbacks.append(MCoTSamples(run_dir / "samples", **samples))
    loggers = [RunCSVLogger(save_dir=str(run_dir), name="", version=""),
               TensorBoardLogger(save_dir=str(run_dir), name="tb", version="")]
    cli = _make_cli_class()(_model_cls(), _dm_cls(), args=["--config", str(cfg_file), *rest], run=False,
                            save_config_kwargs={"overwrite": True},
                            trainer_defaults={"callbacks": callbacks, "logger": loggers,
                                              "default_root_dir": str(run_dir), "plugins": [AtomicCheckpointIO()]},
                            seed_everything_default=lcfg.get("seed_everything", 0))
    from lightning.pytorch.accelerators import CPUAccelerator

    slow = cpu_bf16_warning(cli.trainer.precision, isinstance(cli.trainer.accelerator, CPUAccelerator))
    if slow:
        log.warning(slow)
    model_path = cli.model.hparams.model_path
    if cli.model.hparams.get("tiny") is None and not Path(model_path).exists():
        check_weights({"model": {"model_path": model_path, "backbone": cli.model.hparams.backbone}}, recipe)
    run_info = {"recipe": recipe, "recipe_file": str(recipe_path), "run_dir": str(run_dir),
                "base_model": str(model_path), "adapter": str(run_dir / "adapter"), "git_commit": git_commit(),
                "command": [sys.argv[0], *sys.argv[1:]], "resumed_from": ckpt,
                "config": yaml.safe_load(cfg_file.read_text()), "overrides": rest,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cli.trainer.is_global_zero:
        write_json(run_dir / "run.json", run_info)
        point_latest(run_root, run_dir)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    if cli.trainer.is_global_zero:
        run_info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        run_info["global_step"] = cli.trainer.global_step
        write_json(run_dir / "run.json", run_info)
        print(summary(run_dir))
    return 0


def _model_cls():
    from ftkit.train.module import MCoTModule

    return MCoTModule


def _dm_cls():
    from ftkit.train.datamodule import MCoTDataModule

    return MCoTDataModule


def estimate_main(argv: list[str]) -> int:
    from ftkit.train.estimate import estimate_main as run

    return run(argv)
