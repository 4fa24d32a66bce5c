"""Datasets of :class:`~ftkit.data.schema.StepRecord`: by registry name or path, checked at load,
and mixed by weight.

``load_records(name_or_path)`` checks every record when it loads (map-style), with the checks of
``ftkit data validate`` (:mod:`ftkit.data.checks`: schema, paths, images, duplicate ids), so both
count the same bad records. A dataset with bad records raises :class:`InvalidDatasetError` listing
the first ones and the count, unless ``skip_invalid`` (argument, or the registry entry's
``skip_invalid: true``) is set; then the bad records are dropped, their count is logged (logger
``ftkit.data``) and the full list is written to a file whose path is logged. Streaming datasets are
checked while iterating.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ftkit.data.checks import MIN_IMAGE_SIZE, check_sources
from ftkit.data.importers import Source, guess_format, open_sources
from ftkit.data.registry import DatasetSpec, Registry
from ftkit.data.schema import RecordError, StepRecord
from ftkit.errors import FtkitError
from ftkit.files import atomic_write

log = logging.getLogger("ftkit.data")


class InvalidDatasetError(FtkitError, ValueError):
    """A dataset has bad records and ``skip_invalid`` is off: one message with the count and the
    first ``shown`` problems."""

    def __init__(self, name: str, errors: list[RecordError], total: int, shown: int = 5):
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

    ``ds[i]`` converts on access (images stay lazy). ``ds.locate(i)`` is ``(file, location)``.
    """

    def __init__(self, name: str, sources: list[Source], keep: list[tuple[int, int]] | None = None,
                 weight: float = 1.0):
        self.name, self.sources, self.weight = name, sources, weight
        self._items = keep if keep is not None else [(s, i) for s, src in enumerate(sources) for i in range(len(src))]
        self.errors: list[RecordError] = []  # bad records found at load (not in the indices)
        self.skip_invalid = False

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

    def check(self, images: bool = True, min_size: int = MIN_IMAGE_SIZE
              ) -> tuple[list[tuple[int, int]], list[RecordError]]:
        """Check every record (:func:`ftkit.data.checks.check_sources`): (kept (source, row) pairs, errors)."""
        keep, errors = [], []
        for s, j, rec in check_sources(self.sources, images=images, min_size=min_size):
            if isinstance(rec, RecordError):
                errors.append(rec)
            else:
                keep.append((s, j))
        return keep, errors

    def drop(self, positions: list[int], errors: list[RecordError]) -> None:
        """Drop items ``positions`` (found bad after load, e.g. too long for a token budget)."""
        gone = set(positions)
        self._items = [it for k, it in enumerate(self._items) if k not in gone]
        self.errors += errors


class StreamingRecordDataset:
    """Iterable records of streaming sources; bad records raise unless ``skip_invalid``."""

    def __init__(self, name: str, sources: list[Source], skip_invalid: bool = False, weight: float = 1.0,
                 images: bool = True):
        self.name, self.sources, self.skip_invalid, self.weight = name, sources, skip_invalid, weight
        self.images = images
        self.skipped = 0

    def __iter__(self) -> Iterator[StepRecord]:
        for _, _, rec in check_sources(self.sources, images=self.images):
            if isinstance(rec, RecordError):
                if not self.skip_invalid:
                    raise rec
                self.skipped += 1
                log.warning("dataset %s: skipping invalid record %s", self.name, rec)
                continue
            yield rec


def write_invalid_list(name: str, errors: list[RecordError], out_dir: str | os.PathLike | None = None,
                       filename: str | None = None) -> Path:
    """Write every problem (one ``file:location:field: reason`` per line) to a file; return its path.

    ``out_dir`` (default ``$TMPDIR/ftkit-invalid``) gets ``filename`` (default ``NAME-TIME-PID.txt``);
    the file is written to a temporary name and renamed."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir()) / "ftkit-invalid"
    out.mkdir(parents=True, exist_ok=True)
    if filename is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
        filename = f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path = out / filename
    atomic_write(path, "".join(f"{p}\n" for e in errors for p in e.problems).encode())
    return path


def open_dataset(name_or_path: str | os.PathLike, registry: Registry | str | os.PathLike | list | None = None,
                 split: str | None = None, format: str | None = None, streaming: bool = False
                 ) -> tuple[DatasetSpec, list[Source]]:
    """The registry entry (or ad-hoc entry for a path) and the opened sources of one dataset."""
    spec = resolve(name_or_path, registry, format)
    sources: list[Source] = []
    for f in spec.files(None if spec.origin == "<path>" else split):
        sources += open_sources(f, spec.format, spec.fields, streaming, allow_outside=spec.allow_outside_paths)
    return spec, sources


def settle_invalid(datasets: Sequence[RecordDataset], out_dir: str | os.PathLike | None = None,
                   filename: str | None = None) -> Path | None:
    """Refuse or skip the bad records that :func:`load_records` (``defer_invalid=True``) found.

    A dataset with bad records and ``skip_invalid`` off raises :class:`InvalidDatasetError` (one
    message: count and first problems, every refused dataset). Otherwise the bad records of all
    datasets are listed in one file in ``out_dir``, logged, and its path returned (None when there are none).
    """
    refused = [d for d in datasets if d.errors and not d.skip_invalid]
    if refused:
        errors = [e for d in refused for e in d.errors]
        total = sum(len(d) + len(d.errors) for d in refused)
        raise InvalidDatasetError(", ".join(d.name for d in refused), errors, total)
    bad = [d for d in datasets if d.errors]
    if not bad:
        return None
    path = write_invalid_list(bad[0].name if len(bad) == 1 else "datasets", [e for d in bad for e in d.errors],
                              out_dir, filename)
    for d in bad:
        d.skipped, d.invalid_list = len(d.errors), path
        log.warning("dataset %s: skipped %d of %d invalid records (skip_invalid); full list: %s",
                    d.name, len(d.errors), len(d) + len(d.errors), path)
    return path


def load_records(name_or_path: str | os.PathLike, registry: Registry | str | os.PathLike | list | None = None,
                 split: str | None = None, format: str | None = None, streaming: bool = False,
                 skip_invalid: bool | None = None, check: bool = True, images: bool = True,
                 min_size: int = MIN_IMAGE_SIZE, invalid_list_dir: str | os.PathLike | None = None,
                 defer_invalid: bool = False) -> RecordDataset | StreamingRecordDataset:
    """Load a dataset of records.

    Args:
        name_or_path: a registry name or a path (file or folder; format guessed unless given).
        registry: a :class:`Registry`, or extra registry file(s) merged over the built-in one.
        split: which split of the entry (default: the entry's ``split``).
        format: override the format (ftkit | genref | got | bagel-t2i | bagel-edit).
        streaming: iterate without materialising; no length, no indexing.
        skip_invalid: drop bad records instead of raising (default: the entry's ``skip_invalid``).
        check: check every record at load (map-style only); off, bad records raise on access.
        images: the check decodes every image (as ``ftkit data validate`` does).
        min_size: smallest allowed image side (pixels).
        invalid_list_dir: where the list of skipped records goes (default: ``$TMPDIR/ftkit-invalid``).
        defer_invalid: return the good records with the bad ones in ``.errors`` and neither raise nor
            write the list: the caller adds its own checks and calls :func:`settle_invalid`.

    Raises:
        UnknownDatasetError, RegistryError, FileNotFoundError: the dataset cannot be found.
        InvalidDatasetError: bad records and ``skip_invalid`` off.
    """
    spec, sources = open_dataset(name_or_path, registry, split, format, streaming)
    skip = spec.skip_invalid if skip_invalid is None else skip_invalid
    if streaming:
        return StreamingRecordDataset(spec.name, sources, skip, spec.weight, images=images)
    ds = RecordDataset(spec.name, sources, weight=spec.weight)
    ds.skip_invalid = skip
    if not check:
        return ds
    keep, ds.errors = ds.check(images, min_size)
    ds._items = keep
    if not defer_invalid:
        settle_invalid([ds], invalid_list_dir)
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
