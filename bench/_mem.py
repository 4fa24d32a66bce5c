"""Peak-RSS helpers shared by the benchmarks.

:func:`run_in_child` runs ``fn(*args, **kwargs)`` in a fresh Python process (multiprocessing
``spawn``: nothing is inherited from the parent's heap) and reports the child's resident memory:

* ``baseline_rss``: VmRSS after the ``preimport`` modules are imported, just before ``fn`` runs;
* ``peak_rss``: VmHWM (the kernel's high-water mark of RSS: anonymous + file-backed + shmem pages)
  when ``fn`` returns; ``ru_maxrss`` from ``resource.getrusage`` is reported alongside as a check;
* ``wall_s``: wall time of ``fn`` alone (imports excluded).

``fn`` must be importable by name (a module-level function) and return something picklable.
Bytes everywhere (not KiB).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import resource
import time
import traceback


def proc_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssFile`` ...) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no field {field}")


def _child(conn, fn, args, kwargs, preimport):
    try:
        for name in preimport:
            importlib.import_module(name)
        base = proc_status("VmRSS")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        wall = time.perf_counter() - t0
        conn.send({"ok": True, "result": result, "wall_s": wall, "baseline_rss": base,
                   "peak_rss": proc_status("VmHWM"), "final_rss": proc_status("VmRSS"),
                   "final_rss_file": proc_status("RssFile"),
                   "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    except BaseException as e:  # report the child's failure to the parent, which re-raises
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def run_in_child(fn, *args, preimport: tuple[str, ...] = (), **kwargs) -> dict:
    """Run ``fn`` in a fresh spawned process; return its result and memory numbers (see module doc).

    Raises:
        RuntimeError: the child raised (its traceback is in the message) or died without reporting
            (e.g. killed by the OOM killer; the exit code is in the message).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args, kwargs, tuple(preimport)))
    p.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"benchmark child for {fn.__name__} died without a result (exit code {p.exitcode})") from None
    p.join()
    if not out["ok"]:
        raise RuntimeError(f"benchmark child for {fn.__name__} failed: {out['error']}\n{out['traceback']}")
    del out["ok"]
    return out
