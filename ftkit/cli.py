"""The ``ftkit`` command: one verb per job. Each verb lives in the package that does the work; this
module only dispatches (no logic of its own)."""

from __future__ import annotations

import importlib
import logging
import sys

# verb -> (module, function taking argv list, one-line help)
VERBS: dict[str, tuple[str, str, str]] = {
    "fit": ("ftkit.train.cli", "fit_main", "train with a recipe (LightningCLI): ftkit fit --config recipes/NAME.yaml"),
    "pretrain-ae": ("ftkit.train.pretrain_ae", "main", "train the shapes-world tiny autoencoder (resumable)"),
    "pretrain-export": ("ftkit.train.pretrain", "export_main", "full-fine-tuning checkpoint -> release folder"),
    "estimate": ("ftkit.train.cli", "estimate_main", "pre-flight memory estimate of a recipe"),
    "data": ("ftkit.data.cli", "main", "validate, preview, generate (shapes) and list datasets"),
    "merge": ("ftkit.adapters.cli", "merge_main", "merge adapters into a release checkpoint"),
    "generate": ("ftkit.infer.cli", "generate_main", "plan -> draft -> reflect -> refine generation"),
    "eval": ("ftkit.infer.cli", "eval_main", "shapes-world evaluation of a model (+ adapter)"),
}

# "VERB SUBVERB" handled outside the verb's own module (which may not import its dependencies)
SUBVERBS: dict[tuple[str, str], tuple[str, str]] = {
    ("data", "self-critique"): ("ftkit.infer.cli", "self_critique_main"),
}


def _usage() -> str:
    lines = ["usage: ftkit VERB [options]   (ftkit VERB --help for details; ftkit --version)", "", "verbs:"]
    width = max(map(len, VERBS))
    lines += [f"  {v:<{width}}  {h}" for v, (_, _, h) in VERBS.items()]
    return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message (not as it was when the handler was made: a caller
    such as pytest may swap and close it between ``ftkit`` calls in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging() -> None:
    """ftkit's own messages (where a run's settings came from, what it wrote) at INFO on stderr, prefixed
    ``[ftkit]``; other libraries' loggers are left as they are (Lightning prints its own, once)."""
    log = logging.getLogger("ftkit")
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("[ftkit] %(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"ftkit {version('ftkit')}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"ftkit: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = VERBS[verb]
    if rest and (verb, rest[0]) in SUBVERBS:
        (module, func), rest = SUBVERBS[verb, rest[0]], rest[1:]
    from ftkit.errors import FtkitError

    setup_logging()
    try:
        rc = getattr(importlib.import_module(module), func)(rest)
    except FtkitError as e:  # a user's mistake: one line, no traceback
        print(f"ftkit {verb}: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
