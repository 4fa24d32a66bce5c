"""Datasets of :class:`~ftkit.data.schema.StepRecord`: by registry name or path, checked at load,
and mixed by weight.

``load_records(name_or_path)`` checks every record's schema when it loads (map-style): a dataset with
bad records raises :class:`InvalidDatasetError` listing the first ones and the count, unless
``skip_invalid`` (argument, or the registry entry's ``skip_invalid: true``) is set; then the bad
records are dropped, their count is logged (logger ``ftkit.data``) and the full list is written to
a file whose path is logged. Images are checked by :func:`ftkit.data.validate.validate`
(``ftkit data validate``), not at load. Streaming datasets are checked while iterating.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ftkit.data.importers import Source, guess_format, open_sources
from ftkit.data.registry import DatasetSpec, Registry
from ftkit.data.schema import RecordError, StepRecord
from ftkit.errors import FtkitError

log = logging.getLogger("ftkit.data")


class InvalidDatasetError(FtkitError, ValueError):
    """A dataset has bad records and ``skip_invalid`` is off."""

    def __init__(self, name: str, errors: list[RecordError], total: int, shown: int = 10):
        self.errors = errors
        lines = [str(p) for e in errors for p in e.problems]
        head = "\n  ".join(lines[:shown])
        more = f"\n  ... and {len(lines) - shown} more problems" if len(lines) > shown else ""
        super().__init__(
            f"dataset {name!r}: {len(errors)} of {total} records are invalid:\n  {head}{more}\n"
            "Fix them (`ftkit data validate` lists all) or set `skip_invalid: true` to drop them.")


def resolve(name_or_path: str | os.PathLike, registry: Registry | str | os.PathLike | list | None = None,
            format: str | None = None) -> DatasetSpec:
    """A registry entry for a name, or an ad-hoc entry for an existing path.

    Raises:
        UnknownDatasetError: neither a registered name nor an existing path.
    """
    reg = registry if isinstance(registry, Registry) else Registry.load(registry)
    key = str(name_or_path)
    if key in reg and not Path(key).exists():
        spec = reg.get(key)
        if format is not None and format != spec.format:
            spec = DatasetSpec(**{**spec.__dict__, "format": format})
        return spec
    p = Path(key)
    if p.exists():
        fmt = format or guess_format(p)
        return DatasetSpec(name=str(p), format=fmt, paths={"train": [str(p.resolve())]}, origin="<path>")
    return reg.get(key)  # raises UnknownDatasetError with the known names


class RecordDataset(Sequence):
    """Map-style dataset of records over one or more :class:`Source` (indices skip dropped records).

    ``ds[i]`` converts on access (images stay lazy). ``ds.locate(i)`` is ``(file, row index)``.
    """

    def __init__(self, name: str, sources: list[Source], keep: list[tuple[int, int]] | None = None,
                 weight: float = 1.0):
        self.name, self.sources, self.weight = name, sources, weight
        self._items = keep if keep is not None else [(s, i) for s, src in enumerate(sources) for i in range(len(src))]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s, j = self._items[i]
        return self.sources[s].record(j)

    def locate(self, i: int) -> tuple[str, int | str]:
        s, j = self._items[i]
        return str(self.sources[s].file), self.sources[s].row(j)[0]

    def check(self) -> tuple[list[tuple[int, int]], list[RecordError]]:
        """Convert every record: (kept (source, row) pairs, errors)."""
        keep, errors = [], []
        for s, src in enumerate(self.sources):
            # iteration reads in batches and visits rows in position order (position j = j-th row)
            for j, (_, rec) in enumerate(src.checked()):
                if isinstance(rec, RecordError):
                    errors.append(rec)
                else:
                    keep.append((s, j))
        return keep, errors


class StreamingRecordDataset:
    """Iterable records of streaming sources; bad records raise unless ``skip_invalid``."""

    def __init__(self, name: str, sources: list[Source], skip_invalid: bool = False, weight: float = 1.0):
        self.name, self.sources, self.skip_invalid, self.weight = name, sources, skip_invalid, weight
        self.skipped = 0

    def __iter__(self) -> Iterator[StepRecord]:
        for src in self.sources:
            for _, rec in src.checked():
                if isinstance(rec, RecordError):
                    if not self.skip_invalid:
                        raise rec
                    self.skipped += 1
                    log.warning("dataset %s: skipping invalid record %s", self.name, rec)
                    continue
                yield rec


def write_invalid_list(name: str, errors: list[RecordError], out_dir: str | os.PathLike | None = None) -> Path:
    """Write every problem (one ``file:index:field: reason`` per line) to a new file; return its path."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir()) / "ftkit-invalid"
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
    path = out / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{p}\n" for e in errors for p in e.problems), encoding="utf-8")
    tmp.replace(path)
    return path


def load_records(name_or_path: str | os.PathLike, registry: Registry | str | os.PathLike | list | None = None,
                 split: str | None = None, format: str | None = None, streaming: bool = False,
                 skip_invalid: bool | None = None, check: bool = True,
                 invalid_list_dir: str | os.PathLike | None = None) -> RecordDataset | StreamingRecordDataset:
    """Load a dataset of records.

    Args:
        name_or_path: a registry name or a path (file or folder; format guessed unless given).
        registry: a :class:`Registry`, or extra registry file(s) merged over the built-in one.
        split: which split of the entry (default: the entry's ``split``).
        format: override the format (ftkit | genref | got | bagel-t2i | bagel-edit).
        streaming: iterate without materialising (``datasets`` streaming); no length, no indexing.
        skip_invalid: drop bad records instead of raising (default: the entry's ``skip_invalid``).
        check: convert every record at load (map-style only); off, bad records raise on access.
        invalid_list_dir: where the list of skipped records goes (default: ``$TMPDIR/ftkit-invalid``).

    Raises:
        UnknownDatasetError, RegistryError, FileNotFoundError: the dataset cannot be found.
        InvalidDatasetError: bad records and ``skip_invalid`` off.
    """
    spec = resolve(name_or_path, registry, format)
    skip = spec.skip_invalid if skip_invalid is None else skip_invalid
    sources: list[Source] = []
    for f in spec.files(None if spec.origin == "<path>" else split):
        sources += open_sources(f, spec.format, spec.fields, streaming)
    if streaming:
        return StreamingRecordDataset(spec.name, sources, skip, spec.weight)
    ds = RecordDataset(spec.name, sources, weight=spec.weight)
    if not check:
        return ds
    keep, errors = ds.check()
    if errors:
        total = len(keep) + len(errors)
        if not skip:
            raise InvalidDatasetError(spec.name, errors, total)
        path = write_invalid_list(spec.name, errors, invalid_list_dir)
        log.warning("dataset %s: skipped %d of %d invalid records (skip_invalid); full list: %s",
                    spec.name, len(errors), total, path)
        ds = RecordDataset(spec.name, sources, keep=keep, weight=spec.weight)
        ds.skipped, ds.invalid_list = len(errors), path
    return ds


class MixtureDataset(Sequence):
    """Several record datasets sampled by weight, reproducibly.

    Index ``i`` maps to ``(dataset d, item j)`` through a schedule drawn once from ``seed``:
    ``d ~ Categorical(weights)`` for each of ``num_samples`` slots, and each dataset walks through
    its own seeded permutation (reshuffled every time it is exhausted). Map-style, so it works with
    any sampler / distributed sampler.

    Args:
        datasets: map-style record datasets (e.g. from :func:`load_records`).
        weights: sampling weights (> 0); default each dataset's ``weight``.
        num_samples: length of the mixture; default the sum of the datasets' lengths.
        seed: seed of the schedule.

    Raises:
        ValueError: no datasets, an empty dataset, or a non-positive weight.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float] | None = None, num_samples: int | None = None,
                 seed: int = 0):
        if not datasets:
            raise ValueError("MixtureDataset needs at least one dataset")
        weights = list(weights) if weights is not None else [float(getattr(d, "weight", 1.0)) for d in datasets]
        if len(weights) != len(datasets) or any(not w > 0 for w in weights):
            raise ValueError(f"weights must be one positive number per dataset, got {weights}")
        for d in datasets:
            if len(d) == 0:
                raise ValueError(f"dataset {getattr(d, 'name', d)!r} is empty")
        self.datasets, self.weights, self.seed = list(datasets), weights, seed
        n = num_samples if num_samples is not None else sum(len(d) for d in datasets)
        rng = random.Random(seed)
        choice = rng.choices(range(len(datasets)), weights=weights, k=n)
        perms: list[list[int]] = [[] for _ in datasets]
        self.schedule: list[tuple[int, int]] = []
        for d in choice:
            if not perms[d]:
                perms[d] = list(range(len(datasets[d])))
                rng.shuffle(perms[d])
            self.schedule.append((d, perms[d].pop()))

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, i: int) -> StepRecord:
        d, j = self.schedule[i]
        return self.datasets[d][j]


def load_mixture(names: Sequence[str], registry: Registry | str | os.PathLike | list | None = None,
                 split: str | None = None, num_samples: int | None = None, seed: int = 0,
                 weights: Sequence[float] | None = None, **kwargs) -> MixtureDataset:
    """:func:`load_records` for each name, mixed by their registry weights (or ``weights``)."""
    reg = registry if isinstance(registry, Registry) else Registry.load(registry)
    parts = [load_records(n, reg, split=split, **kwargs) for n in names]
    return MixtureDataset(parts, weights=weights, num_samples=num_samples, seed=seed)
