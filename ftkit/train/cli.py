"""``ftkit fit`` (LightningCLI over a composed recipe) and ``ftkit estimate``.

    ftkit fit --config recipes/tiny-mcot.yaml [--trainer.max_steps 20 ...] [--ckpt_path last]

Every run writes ``runs/<recipe>/<run-id>/``: ``run.json`` (recipe, resolved config, base model,
adapter path, git commit), ``config.yaml``, ``metrics.csv``, ``tb/`` (TensorBoard), ``checkpoints/``,
``adapter/``, ``samples/``; ``runs/<recipe>/latest`` points at the newest run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ftkit.train.recipe import REPO_ROOT, compose, find_recipe, split_ftkit

log = logging.getLogger("ftkit")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[ftkit] %(message)s")
    logging.getLogger("ftkit").setLevel(logging.INFO)


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


def fit_main(argv: list[str]) -> int:
    _setup_logging()
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
    run_root = Path(ns.run_root or fcfg.get("run_root") or "runs") / recipe
    from ftkit.train.faults import RunLock, find_resumable, remove_stale_temps

    ckpt = None
    if ns.ckpt_path == "last":
        run_dir = (run_root / "latest").resolve()
        found, skipped = find_resumable(run_dir / "checkpoints")
        for line in skipped:
            log.warning("resume: %s", line)
        if found is None:
            raise SystemExit(f"--ckpt_path last: no valid checkpoint in {run_dir / 'checkpoints'} to resume from")
        ckpt = str(found)
        log.info("resuming from %s", found)
    else:
        # ranks started by a launcher (Lightning's DDP subprocesses, torchrun) inherit the first one's folder
        run_id = ns.run_id or os.environ.get("FTKIT_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")
        os.environ["FTKIT_RUN_ID"] = run_id
        run_dir = (run_root / run_id).resolve()
        ckpt = ns.ckpt_path
    run_dir.mkdir(parents=True, exist_ok=True)
    if not all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return _fit(ns, rest, recipe, recipe_path, lcfg, fcfg, run_root, run_dir, ckpt)  # rank 0 holds the lock
    try:
        with RunLock(run_dir):
            remove_stale_temps(run_dir)
            remove_stale_temps(run_dir / "checkpoints")
            return _fit(ns, rest, recipe, recipe_path, lcfg, fcfg, run_root, run_dir, ckpt)
    finally:
        os.environ.pop("FTKIT_RUN_ID", None)


def _fit(ns, rest, recipe, recipe_path, lcfg, fcfg, run_root: Path, run_dir: Path, ckpt: str | None) -> int:
    from ftkit.train.faults import AtomicCheckpointIO, MetricsBeforeCheckpoint, RunCSVLogger, atomic_write

    cfg_file = run_dir / "config.yaml"
    atomic_write(cfg_file, lambda fh: fh.write(yaml.safe_dump(lcfg, sort_keys=False).encode()))

    import lightning as L  # noqa: F401
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from ftkit.train.callbacks import AdapterExport, MCoTSamples

    every = int(fcfg.get("checkpoint_every_n_steps", 50))
    callbacks = [ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=every,
                                 save_top_k=int(fcfg.get("keep_checkpoints", 1)), monitor="step", mode="max"),
                 AdapterExport(run_dir / "adapter", extra={"recipe": recipe, "run_dir": str(run_dir)}),
                 MetricsBeforeCheckpoint(every)]
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
    model_path = cli.model.hparams.model_path
    if cli.model.hparams.get("tiny") is None and not Path(model_path).exists():
        check_weights({"model": {"model_path": model_path, "backbone": cli.model.hparams.backbone}}, recipe)
    run_info = {"recipe": recipe, "recipe_file": str(recipe_path), "run_dir": str(run_dir),
                "base_model": str(model_path), "adapter": str(run_dir / "adapter"), "git_commit": _git_commit(),
                "command": [sys.argv[0], *sys.argv[1:]], "resumed_from": ckpt,
                "config": yaml.safe_load(cfg_file.read_text()), "overrides": rest,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cli.trainer.is_global_zero:
        write_json(run_dir / "run.json", run_info)
        latest = run_root / "latest"
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        os.symlink(run_dir.name, latest)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    if cli.trainer.is_global_zero:
        run_info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        run_info["global_step"] = cli.trainer.global_step
        write_json(run_dir / "run.json", run_info)
        print(f"\nrun finished: {run_dir}")
        for what, p in (("run.json", run_dir / "run.json"), ("metrics", run_dir / "metrics.csv"),
                        ("adapter", run_dir / "adapter"), ("samples", run_dir / "samples"),
                        ("checkpoints", run_dir / "checkpoints"), ("tensorboard", run_dir / "tb")):
            print(f"  {what:<12} {p}{'' if p.exists() else '  (not written)'}")
    return 0


def write_json(path: Path, obj: dict) -> None:
    from ftkit.train.faults import atomic_write

    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, default=str).encode()))


def _model_cls():
    from ftkit.train.module import MCoTModule

    return MCoTModule


def _dm_cls():
    from ftkit.train.datamodule import MCoTDataModule

    return MCoTDataModule


def estimate_main(argv: list[str]) -> int:
    from ftkit.train.estimate import estimate_main as run

    return run(argv)
