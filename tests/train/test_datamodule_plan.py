"""The packed training stream of ftkit.train.datamodule: the epoch plan, and batch ``i`` as a pure
function of ``(seed, i)`` however it is reached (resume, ranks, dataloader workers)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from ftkit.train.datamodule import MCoTDataModule, PackedStream, plan_epoch

# ------------------------------------------------------------------------------------ plan_epoch


LENGTHS = [120, 300, 75, 410, 220, 90, 150, 600, 45, 260, 180, 330, 95, 140, 210, 70]


def _check_plan(bins: list[list[int]], lengths: list[int], budget: int, max_samples: int | None = None) -> None:
    order = [i for b in bins for i in b]
    assert sorted(order) == list(range(len(lengths))), "every record exactly once per epoch"
    for k, b in enumerate(bins):
        used = sum(lengths[i] for i in b)
        assert b and (used <= budget or len(b) == 1), (k, b, used)
        if max_samples:
            assert len(b) <= max_samples
        if k + 1 < len(bins):  # greedy: a bin closes only when the next record does not fit
            nxt = lengths[bins[k + 1][0]]
            assert used + nxt > budget or (max_samples and len(b) == max_samples), (k, b, used, nxt)


@pytest.mark.parametrize("budget, max_samples", [(500, None), (800, 3), (100, None)])
def test_plan_covers_each_record_once_within_budget(budget, max_samples):
    for seed, epoch in itertools.product((0, 7), (0, 1, 2)):
        _check_plan(plan_epoch(LENGTHS, budget, seed, epoch, max_samples), LENGTHS, budget, max_samples)


def test_oversized_record_gets_a_bin_of_its_own():
    bins = plan_epoch(LENGTHS, 250, seed=0, epoch=0)
    for i, n in enumerate(LENGTHS):
        if n > 250:
            assert [i] in bins, (i, bins)


def test_plan_is_a_pure_function_of_seed_and_epoch():
    plans = {(s, e): plan_epoch(LENGTHS, 500, s, e) for s in (0, 1) for e in (0, 1, 2)}
    for (s, e), p in plans.items():
        assert plan_epoch(list(LENGTHS), 500, s, e) == p
    orders = {k: [i for b in p for i in b] for k, p in plans.items()}
    assert len({tuple(o) for o in orders.values()}) == len(orders), "each (seed, epoch) shuffles differently"


# ---------------------------------------------------------------------------------- the stream


@pytest.fixture(scope="module")
def dm(tmp_path_factory, fixture_dir):
    from ftkit.data.shapes import generate

    root = tmp_path_factory.mktemp("dm_plan")
    generate(root / "data", 10, seed=0, size=64, progress=False)
    return _datamodule(root, fixture_dir, seed=3)


def _datamodule(root, fixture_dir, seed: int) -> MCoTDataModule:
    d = MCoTDataModule([str(root / "data" / "records.jsonl")], model_path=str(fixture_dir), token_budget=700,
                       seed=seed)
    d.setup()
    d._root = root
    return d


def _fingerprint(item) -> dict:
    b = item.batch
    return {"index": item.index, "num_samples": item.num_samples, "text_ids": b.text_ids, "pos": b.position_ids,
            "lengths": torch.tensor(b.sample_lengths), "logits": b.vae_timestep_logits,
            "images": torch.cat([im.reshape(-1) for im in b.vae_images]), "vit": b.vit_tokens}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _take(stream, n: int) -> list[dict]:
    return [_fingerprint(x) for x in itertools.islice(iter(stream), n)]


def test_stream_walks_the_epoch_plans(dm):
    per = dm.batches_per_epoch
    assert 3 <= per < 10  # several records share a batch
    items = list(itertools.islice(iter(PackedStream(dm, 0, 0, 1)), 2 * per + 1))
    assert [x.index for x in items] == list(range(2 * per + 1))
    ref = PackedStream(dm, 0, 0, 1)
    for x in items:
        epoch, b = divmod(x.index, per)
        assert _same(_fingerprint(x), _fingerprint(ref._batch(x.index, dm.epoch_plan(epoch)[b]))), x.index
    # an epoch is every record once: its batches hold all records' samples
    assert sum(x.num_samples for x in items[:per]) == len(dm.records)
    assert sum(x.num_samples for x in items[per : 2 * per]) == len(dm.records)
    assert dm.epoch_plan(0) != dm.epoch_plan(1)


def test_batch_is_a_pure_function_of_seed_and_index(dm, fixture_dir):
    full = _take(PackedStream(dm, 0, 0, 1), 8)
    resumed = _take(PackedStream(dm, 5, 0, 1), 3)  # a run resumed at global batch 5
    assert [f["index"] for f in resumed] == [5, 6, 7]
    for a, b in zip(resumed, full[5:]):
        assert _same(a, b), f"batch {a['index']} differs when the stream starts at 5"
    again = _datamodule(dm._root, fixture_dir, seed=3)  # a fresh process: same seed, same batches
    assert all(_same(a, b) for a, b in zip(_take(PackedStream(again, 0, 0, 1), 8), full))
    other = _datamodule(dm._root, fixture_dir, seed=4)
    assert not all(_same(a, b) for a, b in zip(_take(PackedStream(other, 0, 0, 1), 8), full))
    # the data module's loader starts where the checkpoint says
    dm.batches_consumed = 6
    try:
        got = [_fingerprint(x) for x in itertools.islice(iter(dm.train_dataloader()), 2)]
    finally:
        dm.batches_consumed = 0
    assert [g["index"] for g in got] == [6, 7] and all(_same(a, b) for a, b in zip(got, full[6:]))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_each_batch_once_in_order(dm, world):
    n = 4
    full = _take(PackedStream(dm, 0, 0, 1), n * world)
    per_rank = [_take(PackedStream(dm, 0, r, world), n) for r in range(world)]
    for r, items in enumerate(per_rank):
        assert [f["index"] for f in items] == list(range(r, n * world, world)), r
    merged = [per_rank[i % world][i // world] for i in range(n * world)]
    assert all(_same(a, b) for a, b in zip(merged, full))


@pytest.mark.parametrize("rank, world, start", [(0, 1, 0), (0, 1, 3), (1, 2, 6), (1, 2, 3)])
def test_dataloader_workers_interleave(dm, rank, world, start):
    """Two worker processes: the loader's round-robin over them yields this rank's batches in order."""
    want_idx = [i for i in range(start, start + 40) if i % world == rank][:6]
    single = _take(PackedStream(dm, start, rank, world), 6)
    assert [f["index"] for f in single] == want_idx
    loader = DataLoader(PackedStream(dm, start, rank, world), batch_size=None, num_workers=2, timeout=120)
    got = [_fingerprint(x) for x in itertools.islice(iter(loader), 6)]
    assert [f["index"] for f in got] == want_idx
    assert all(_same(a, b) for a, b in zip(got, single))


# ------------------------------------------------------------------------------------ generate_shapes


def test_generate_shapes_passes_the_draft_rates(tmp_path):
    """A recipe's ``generate_shapes`` sets the shares of wrong / partial drafts of the set it generates."""
    import json

    for name, rates, want_ok in (("all-ok", {"error_rate": 0.0, "partial_rate": 0.0}, True), ("default", {}, False)):
        out = tmp_path / name
        MCoTDataModule(datasets=[str(out / "records.jsonl")],
                       generate_shapes={"out": str(out), "n": 24, "seed": 0, **rates}).prepare_data()
        errors = [json.loads(line)["meta"]["error"] for line in (out / "records.jsonl").read_text().splitlines()]
        assert len(errors) == 24
        assert all(e is None for e in errors) == want_ok, errors
