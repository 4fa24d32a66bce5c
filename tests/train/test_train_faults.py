"""Faults that lose nothing: real ``kill -9`` of a training process in the middle of a step and of a
checkpoint write (``TMPDIR`` on another filesystem), chained kill-and-resume cycles, a truncated
``last.ckpt``, a corrupt checkpoint, two runs into one folder."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ftkit.train.faults import (
    AtomicCheckpointIO,
    CheckpointError,
    RunCSVLogger,
    find_resumable,
    verify_checkpoint,
)
from ftkit.train.recipe import REPO_ROOT
from tests.train import test_train as tt
from tests.train.test_train import metrics, run_fit, write_recipe

tiny_env = tt.tiny_env  # the session fixture of test_train
pytestmark = pytest.mark.slow


def start_fit(recipe, *args, tmpdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
    return subprocess.Popen([sys.executable, "-m", "ftkit.cli", "fit", "--config", str(recipe), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)


def ckpt_steps(run):
    return sorted(int(p.stem.split("step=")[1].split("-")[0]) for p in (run / "checkpoints").glob("*step=*.ckpt")
                  if ".tmp-" not in p.name)


def kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def rows_per_step(run):
    import csv

    counts = {}
    with open(run / "metrics.csv") as fh:
        for r in csv.DictReader(fh):
            if r.get("train/total"):
                counts[int(r["step"])] = counts.get(int(r["step"]), 0) + 1
    return counts


@pytest.fixture(scope="module")
def shm(tmp_path_factory):
    """A TMPDIR on another filesystem than the run folder (tmpfs), checked empty after every kill."""
    d = tmp_path_factory.mktemp("unused")  # keeps pytest's naming; the real one is on /dev/shm
    root = f"/dev/shm/ftkit-test-{os.getpid()}-{d.name}"
    os.makedirs(root, exist_ok=True)
    yield root
    for f in os.listdir(root):
        os.unlink(os.path.join(root, f))
    os.rmdir(root)


def test_chained_kill9_cycles_lose_no_step(tiny_env, shm):
    """Five kill -9 at random moments (mid-step, mid-write), each followed by ``--ckpt_path last``:
    metrics.csv holds every step exactly once, with the losses of an uninterrupted run."""
    steps = 14
    recipe = write_recipe(tiny_env, "chain", trainer={"max_steps": steps}, ftkit={"checkpoint_every_n_steps": 2})
    run_fit(recipe, "--run_id", "straight")
    run = tiny_env / "runs" / "chain" / "killed"
    rng = random.Random(0)
    args = ["--run_id", "killed"]
    done = 0
    for cycle in range(5):
        proc = start_fit(recipe, *args, tmpdir=shm)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            have = ckpt_steps(run) if (run / "checkpoints").is_dir() else []
            if have and max(have) > done:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"cycle {cycle}: run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        done = max(ckpt_steps(run))
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:  # finished in the meantime: nothing left to kill
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        kill9(proc)
        assert os.listdir(shm) == [], f"kill left files in TMPDIR: {os.listdir(shm)}"
        args = ["--ckpt_path", "last"]
        if done >= steps - 2:
            break
    run_fit(recipe, "--ckpt_path", "last")
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name], "temporary files left in the run folder"
    counts = rows_per_step(run)
    assert counts == {s: 1 for s in range(steps)}, counts
    a, b = metrics(tiny_env / "runs" / "chain" / "straight"), metrics(run)
    for s in range(steps):
        assert abs(a[s]["train/total"] - b[s]["train/total"]) <= 1e-6, (s, a[s]["train/total"], b[s]["train/total"])


def test_kill9_during_checkpoint_write(tiny_env, shm):
    """Killed while a checkpoint is being written: the previous checkpoints are intact, the partial file
    never carries a checkpoint's name, resume works and the leftover temporary file is cleaned."""
    recipe = write_recipe(tiny_env, "midwrite", trainer={"max_steps": 40}, ftkit={"checkpoint_every_n_steps": 1})
    run = tiny_env / "runs" / "midwrite" / "w"
    proc = start_fit(recipe, "--run_id", "w", tmpdir=shm)
    caught = None
    ck = run / "checkpoints"
    while proc.poll() is None:
        names = os.listdir(ck) if ck.is_dir() else []
        tmp = [n for n in names if ".ckpt.tmp-" in n]  # a checkpoint's bytes being written
        if tmp and any(n.endswith(".ckpt") for n in names):
            proc.send_signal(signal.SIGKILL)
            caught = tmp
            break
    proc.wait(timeout=60)
    assert caught, "the run finished before a checkpoint write could be caught"
    assert os.listdir(shm) == []
    for p in ck.glob("*.ckpt"):
        verify_checkpoint(p)  # every file under a checkpoint name is complete
    r = run_fit(recipe, "--ckpt_path", "last")
    assert "resuming from" in r.stderr
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    assert set(rows_per_step(run)) == set(range(40))


def test_truncated_last_falls_back_and_corrupt_is_named(tiny_env, tmp_path):
    recipe = write_recipe(tiny_env, "trunc", trainer={"max_steps": 4}, ftkit={"checkpoint_every_n_steps": 2})
    run_fit(recipe, "--run_id", "t")
    ck = tiny_env / "runs" / "trunc" / "t" / "checkpoints"
    last = ck / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    found, skipped = find_resumable(ck)
    assert found is not None and found.name != "last.ckpt" and "step=" in found.name
    assert len(skipped) == 1 and "last.ckpt" in skipped[0] and "truncated or corrupt" in skipped[0]
    assert (ck / "last.ckpt.corrupt").is_file() and not last.exists()  # kept aside, named
    r = run_fit(recipe, "--ckpt_path", "last", "--trainer.max_steps", "6")
    assert f"resuming from {found}" in r.stderr
    assert (ck / "last.ckpt").is_file() and not list(ck.glob("last-v*.ckpt"))  # a fresh last.ckpt, no last-v1
    # a corrupt file passed by name: one line naming it, exit 2 (not KeyError: 'pytorch-lightning_version')
    bad = tmp_path / "bad.ckpt"
    torch.save({"not": "a checkpoint"}, bad)
    r = run_fit(recipe, "--run_id", "bad", "--ckpt_path", str(bad), check=False)
    assert r.returncode == 2 and str(bad) in r.stderr.strip().splitlines()[-1] and "KeyError" not in r.stderr
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        AtomicCheckpointIO().load_checkpoint(REPO_ROOT / "README.md")


def test_second_run_into_the_same_folder_is_refused(tiny_env, shm):
    recipe = write_recipe(tiny_env, "lock", trainer={"max_steps": 200})
    run = tiny_env / "runs" / "lock" / "one"
    proc = start_fit(recipe, "--run_id", "one", tmpdir=shm)
    try:
        while not (run / ".lock").is_file():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        r = run_fit(recipe, "--run_id", "one", check=False)
        assert r.returncode == 2 and f"another run (pid {proc.pid})" in r.stderr.strip().splitlines()[-1]
    finally:
        kill9(proc)
    r = run_fit(recipe, "--run_id", "one", "--trainer.max_steps", "2")  # a dead holder's lock is taken over
    assert r.returncode == 0 and not (run / ".lock").exists()


def test_metrics_writer_keeps_earlier_rows(tmp_path):
    """Unit: rows of a killed run before the resumed run's first step stay, later ones are replaced."""
    (tmp_path / "metrics.csv").write_text("loss,step\n1.0,0\n2.0,1\n3.0,2\n9.0,3\n")
    lg = RunCSVLogger(save_dir=str(tmp_path), name="", version="")
    lg.log_metrics({"loss": 4.0}, step=3)
    lg.save()
    assert (tmp_path / "metrics.csv").read_text().split() == ["loss,step", "1.0,0", "2.0,1", "3.0,2", "4.0,3"]
