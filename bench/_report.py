"""Writing benchmark results into BENCHMARKS.md: each benchmark owns one ``## `` section."""

from __future__ import annotations

import os
from pathlib import Path


def write_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the section headed ``section`` with ``body``; other sections are kept. Atomic."""
    text = path.read_text() if path.is_file() else "# ftkit benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n"
    i = text.find(section + "\n")
    if i < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        j = text.find("\n## ", i + len(section))
        text = text[:i] + block + ("\n" + text[j + 1:] if j >= 0 else "")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
