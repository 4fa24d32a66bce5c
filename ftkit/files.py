"""Safe file writes, the one home: a file appears whole or not at all, is on disk when the call returns, and its
sha256 can be recorded; pid locks for folders that one process writes at a time. No ftkit imports, so data,
models, adapters, train and infer all use it.

Temporary files are ``.<name>.tmp-<pid>`` beside the file they become (``TMP_MARK``), so a later run can remove
those of dead writers (:func:`ftkit.train.faults.remove_stale_temps`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

TMP_MARK = ".tmp-"


def atomic_write(path: str | Path, write, before_rename=None) -> str | None:
    """``write(fh)`` (or ``write`` itself when it is bytes) into a temporary file beside ``path``, fsync, rename
    over ``path``. With ``before_rename``, the sha256 of the bytes written is computed, passed to ``before_rename(sha256)`` just
    before the rename and returned (else None). On any error the temporary file is removed and ``path`` is
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(write, bytes):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        digest = None
        if before_rename is not None:
            digest = file_sha256(tmp)
            before_rename(digest)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_pid_lock(lock: Path, busy: Callable[[int], str]) -> None:
    """Create ``lock`` exclusively holding this process's pid. A lock of a live process raises
    ``FtkitError(busy(pid))``; one left by a dead process is taken over."""
    from ftkit.errors import FtkitError

    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise FtkitError(busy(pid)) from None
            lock.unlink(missing_ok=True)  # left by a dead process
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return
    raise FtkitError(f"{lock}: could not take the lock")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
