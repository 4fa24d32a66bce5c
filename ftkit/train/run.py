"""Run folders: ``runs/<recipe>/<run-id>/`` and ``runs/<recipe>/latest``.

A run folder holds ``run.json`` (recipe, resolved config, base model, adapter path, git commit, command,
start/finish, resumed-from), ``config.yaml`` (the LightningCLI config the run was started with),
``metrics.csv``, ``tb/`` (TensorBoard), ``checkpoints/``, ``adapter/`` and ``samples/``. One process
trains into a folder at a time (:class:`~ftkit.train.faults.RunLock`); ranks started by a launcher
(Lightning's DDP subprocesses, torchrun) join the first rank's folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from ftkit.files import atomic_write
from ftkit.train.faults import RunLock, find_resumable, remove_stale_temps
from ftkit.train.recipe import REPO_ROOT

log = logging.getLogger("ftkit")
RUN_ID_ENV = "FTKIT_RUN_ID"
OUTPUTS = ("run.json", "metrics.csv", "adapter", "samples", "checkpoints", "tb")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def is_first_rank() -> bool:
    """True in the launching process (no launcher, or global rank 0 of one)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def open_run(run_root: Path, run_id: str | None, ckpt_path: str | None) -> tuple[Path, str | None]:
    """(run folder, checkpoint to resume from). ``ckpt_path == "last"``: the ``latest`` run and its newest
    checkpoint that verifies (each one skipped is logged); else a new folder named ``run_id`` (default: the
    time), shared with the ranks a launcher starts."""
    if ckpt_path == "last":
        run_dir = (run_root / "latest").resolve()
        found, skipped = find_resumable(run_dir / "checkpoints")
        for line in skipped:
            log.warning("resume: %s", line)
        if found is None:
            raise SystemExit(f"--ckpt_path last: no valid checkpoint in {run_dir / 'checkpoints'} to resume from")
        log.info("resuming from %s", found)
        return run_dir, str(found)
    run_id = run_id or os.environ.get(RUN_ID_ENV) or time.strftime("%Y%m%d-%H%M%S")
    os.environ[RUN_ID_ENV] = run_id
    return (run_root / run_id).resolve(), ckpt_path


@contextlib.contextmanager
def run_folder(run_dir: Path) -> Iterator[Path]:
    """Create ``run_dir``; in the first rank hold its lock and remove temporary files of killed writers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not is_first_rank():
            yield run_dir
            return
        with RunLock(run_dir):
            remove_stale_temps(run_dir)
            remove_stale_temps(run_dir / "checkpoints")
            yield run_dir
    finally:
        os.environ.pop(RUN_ID_ENV, None)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, default=str).encode()))


def point_latest(run_root: Path, run_dir: Path) -> None:
    latest = run_root / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    os.symlink(run_dir.name, latest)


def summary(run_dir: Path) -> str:
    lines = [f"\nrun finished: {run_dir}"]
    for name in OUTPUTS:
        p = run_dir / name
        lines.append(f"  {name:<12} {p}{'' if p.exists() else '  (not written)'}")
    return "\n".join(lines)
