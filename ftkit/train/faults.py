"""What a run survives: kills, full disks and corrupt files lose nothing and ship nothing broken.

* :class:`AtomicCheckpointIO` (Lightning plugin): every checkpoint is written to a temporary name in its
  own folder, fsync-ed, then renamed (never staged in the system temp folder, whose rename across
  filesystems is a copy that a kill truncates), with a ``<name>.sha256`` sidecar. Loading verifies
  the sidecar and reads with ``torch.load(weights_only=True)`` (no pickled code runs); any failure
  names the file.
* :func:`find_resumable`: ``--ckpt_path last`` takes the newest checkpoint of the run that verifies,
  saying which ones were skipped and why.
* :class:`RunCSVLogger`: ``metrics.csv`` keeps every step's row exactly once across any number of
  kill-and-resume cycles (rows the killed run logged after its last checkpoint are replaced by the
  resumed run's), and is rewritten atomically.
* :class:`RunLock`: one process per run folder.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ftkit.errors import FtkitError
from ftkit.files import TMP_MARK, atomic_write, file_sha256, pid_alive

log = logging.getLogger("ftkit")


class CheckpointError(FtkitError):
    """A checkpoint that cannot be trusted (truncated, corrupt, checksum mismatch) or cannot be written."""


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (``.<name>.tmp-<pid>`` of dead pids)."""
    gone = []
    folder = Path(folder)
    if not folder.is_dir():
        return gone
    for p in folder.glob(f".*{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless its bytes match its sha256 sidecar (or, for
    a checkpoint without a sidecar, unless it loads)."""
    path = Path(path)
    if not _matches_sidecar(path):
        _load(path, map_location="cpu")


def _matches_sidecar(path: Path) -> bool:
    """True when ``path`` matches its sha256 sidecar, False when it has none; raises on a mismatch."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    side = _sidecar(path)
    if not side.is_file():
        return False
    want = [line.split()[0] for line in side.read_text().splitlines() if line.strip()]
    got = file_sha256(path)
    if got not in want:
        raise CheckpointError(f"{path}: sha256 {got[:12]}... does not match {side.name}: "
                              "the file is truncated or corrupt")
    return True


def _load(path: Path, map_location=None) -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any reader failure becomes one named error
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                              ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically in their own folder with a sha256 sidecar, read verified and with
    ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path, side = Path(path), _sidecar(Path(path))
        remove_stale_temps(path.parent)
        old = side.read_text().splitlines()[:1] if side.is_file() and path.is_file() else []

        def sidecar(*lines: str):
            return lambda fh: fh.write("".join(f"{x}\n" for x in lines).encode())

        try:
            # while the rename is pending the sidecar lists both digests, so a kill at any point leaves
            # a name whose bytes match its sidecar
            digest = atomic_write(path, lambda fh: torch.save(checkpoint, fh),
                                  before_rename=lambda d: atomic_write(side, sidecar(f"{d}  {path.name}", *old)))
            atomic_write(side, sidecar(f"{digest}  {path.name}"))
        except OSError as e:
            raise CheckpointError(f"{path}: could not write the checkpoint ({e.strerror or e}); the previous "
                                  "checkpoints are intact") from e

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        _matches_sidecar(path)  # a checkpoint without a sidecar is read once, by _load's own checks
        return _load(path, map_location)

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    """The global step of a Lightning checkpoint named ``...step=N...`` (-1 when the name has none)."""
    for part in path.stem.replace("-", "_").split("_"):
        if part.startswith("step="):
            try:
                return int(float(part[5:]))
            except ValueError:
                return -1
    return -1


def find_resumable(ckpt_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``ckpt_dir`` that verifies (``last.ckpt`` first, then by step and time),
    and one line per checkpoint skipped on the way. A skipped file is renamed ``<name>.corrupt`` (kept
    for inspection; Lightning would otherwise write ``last-v1.ckpt`` beside a broken ``last.ckpt``)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, []
    cands = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and TMP_MARK not in p.name]
    cands.sort(key=lambda p: (p.name.startswith("last"), _step_of(p), p.stat().st_mtime), reverse=True)
    skipped = []
    for p in cands:
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            bad = p.with_name(p.name + ".corrupt")
            os.replace(p, bad)
            if _sidecar(p).is_file():
                os.replace(_sidecar(p), _sidecar(bad))
            skipped.append(f"skipped {e} (kept as {bad.name})")
            continue
        return p, skipped
    return None, skipped


def _step(row: dict) -> int | None:
    try:
        return int(row.get("step"))
    except (TypeError, ValueError):  # a line cut short by a kill
        return None


class RunMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it keeps the rows of earlier (killed) runs in this folder.

    One row per step (a step logged twice is merged into one row). Rows an earlier run logged at or after
    the first step this run logs are dropped (the resumed run logs those steps again; a line a kill cut
    short is among them). The file is rewritten atomically when its header or an existing row changes,
    else appended to and fsync-ed.
    """

    def __init__(self, log_dir: str) -> None:
        from lightning.fabric.utilities.cloud_io import get_filesystem

        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._fs = get_filesystem(log_dir)
        os.makedirs(log_dir, exist_ok=True)
        self._earlier: list[dict[str, str]] | None = None
        self._rows: list[dict] = []
        self._disk_keys: list[str] | None = None  # header of the file as last written by this writer
        self._disk_hparams: dict[str, Any] = {}
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as fh:
                self._earlier = list(csv.DictReader(fh))

    def save(self) -> None:
        new, self.metrics = self.metrics, []
        if self._earlier is not None and new:
            first = min(s for s in (_step(r) for r in new) if s is not None)
            self._rows = [r for r in self._earlier if (_step(r) is not None and _step(r) < first)]
            self._earlier = None
        added, merged = [], False
        for row in new:  # one row per step: a step logged twice (see MetricsBeforeCheckpoint) is merged
            same = next((r for r in reversed(self._rows[-8:]) if _step(r) == _step(row)), None)
            if same is not None:
                same.update(row)
                merged = True
            else:
                self._rows.append(row)
                added.append(row)
        keys = sorted({k for r in self._rows for k in r})
        if added and not merged and keys == self._disk_keys:
            with open(self.metrics_file_path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=keys).writerows(added)
                fh.flush()
                os.fsync(fh.fileno())
        elif added or merged or (self._rows and keys != self._disk_keys):

            def write(fh):
                text = io.StringIO(newline="")
                w = csv.DictWriter(text, fieldnames=keys)
                w.writeheader()
                w.writerows(self._rows)
                fh.write(text.getvalue().encode())

            atomic_write(self.metrics_file_path, write)
            self._disk_keys = keys
        if self.hparams and self.hparams != self._disk_hparams:
            from lightning.pytorch.core.saving import save_hparams_to_yaml

            save_hparams_to_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)
            self._disk_hparams = dict(self.hparams)


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` in the run folder: one row per logged step, kept across resumes (see
    :class:`RunMetricsWriter`; :class:`MetricsBeforeCheckpoint` writes it before each checkpoint)."""

    @property
    def experiment(self) -> RunMetricsWriter:
        if self._experiment is None:
            self._experiment = RunMetricsWriter(self.log_dir)
        return self._experiment


class MetricsBeforeCheckpoint(L.Callback):
    """At a step that ends in a checkpoint, log the step's row and write the loggers' files *before* the
    checkpoint is written (Lightning logs a step's row only after its callbacks, checkpointing included,
    have run), so no kill can leave a checkpoint whose steps have no rows. The loop logs the same row
    again afterwards; :class:`RunMetricsWriter` keeps one."""

    def __init__(self, every_n_train_steps: int):
        self.every = int(every_n_train_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            trainer._logger_connector.update_train_step_metrics()
            for lg in trainer.loggers:
                lg.save()


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` (the pid, created exclusively); a second
    process training into the same folder is refused, a lock left by a dead process is taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self) -> RunLock:
        from ftkit.files import take_pid_lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        take_pid_lock(self.path, lambda pid: f"{self.path.parent}: another run (pid {pid}) is training into this "
                                             "folder; wait for it or pick another --run_id")
        return self

    def __exit__(self, *exc) -> None:
        if self.path.is_file() and self.path.read_text().strip() == str(os.getpid()):
            self.path.unlink(missing_ok=True)
