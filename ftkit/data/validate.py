"""Check every record of a dataset before a GPU-hour is spent on it.

:func:`validate` goes through every row of every file, never stopping, and collects each problem as
``file:location:field: reason``, with the checks of :mod:`ftkit.data.checks` (the same ones a
dataset goes through when it loads for training): reading (encoding, JSON), schema and ordering
rules, paths that leave the dataset folder, images (exist, decode, size), mask sizes, duplicate ids.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ftkit.data.checks import MIN_IMAGE_SIZE, check_image, check_record_images, check_sources  # noqa: F401
from ftkit.data.dataset import open_dataset
from ftkit.data.importers import Source
from ftkit.data.registry import Registry
from ftkit.data.schema import ERR_OUTSIDE, Problem, RecordError


@dataclass
class Report:
    """Outcome of :func:`validate`."""

    name: str
    total: int = 0
    good: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_records: list[tuple[str, int | str]] = field(default_factory=list)
    step_counts: Counter = field(default_factory=Counter)  # over good records
    error_kinds: Counter = field(default_factory=Counter)

    @property
    def bad(self) -> int:
        return len(self.bad_records)

    @property
    def ok(self) -> bool:
        return not self.bad_records

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v}" for k, v in sorted(self.step_counts.items())) or "none"
        lines = [f"{self.name}: {self.total} records, {self.good} good, {self.bad} bad",
                 f"  steps (good records): {steps}"]
        if self.error_kinds:
            lines.append("  problems: " + ", ".join(f"{k} {v}" for k, v in self.error_kinds.most_common()))
        if self.outside_paths:
            lines.append(f"  {self.outside_paths} path(s) leave the dataset folder (refused; `allow_outside_paths: "
                         "true` in the registry entry allows them)")
        return "\n".join(lines)

    @property
    def outside_paths(self) -> int:
        return self.error_kinds.get(ERR_OUTSIDE, 0)


def validate(source: str | os.PathLike | list[Source], *, format: str | None = None,
             registry: Registry | str | os.PathLike | list | None = None, split: str | None = None,
             min_size: int = MIN_IMAGE_SIZE, images: bool = True) -> Report:
    """Check every record of a dataset (registry name, path, or list of sources).

    Args:
        source: registry name, file/folder path, or already opened :class:`Source` objects.
        format: override the format (else the registry's, or guessed from the path).
        registry: extra registry file(s) or a :class:`Registry`.
        split: split of a registry entry.
        min_size: smallest allowed image side in pixels (masks excepted).
        images: decode images (off: schema only).

    Returns:
        A :class:`Report`; ``report.ok`` is False if any record has a problem.
    """
    if isinstance(source, list):
        sources, name = source, ", ".join(str(s.file) for s in source)
    else:
        spec, sources = open_dataset(source, registry, split=split, format=format)
        name = spec.name
    report = Report(name=name)
    for s, _, rec in check_sources(sources, images=images, min_size=min_size):
        report.total += 1
        if isinstance(rec, RecordError):
            report.problems += rec.problems
            report.bad_records.append((str(Path(sources[s].file)), rec.index))
            report.error_kinds.update(p.kind for p in rec.problems)
        else:
            report.good += 1
            report.step_counts.update(st.type for st in rec.steps)
    return report
