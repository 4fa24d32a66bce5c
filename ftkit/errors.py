"""One base for every error a user can cause: a bad name, a missing folder, a bad record or override.

Each ``ftkit`` verb catches :class:`FtkitError` and prints its message as one line (exit code 2);
anything else is a bug in ftkit and keeps its traceback."""

from __future__ import annotations


class FtkitError(Exception):
    """A user-facing error: its message names the file, record or field and says what to do."""
