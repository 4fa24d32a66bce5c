"""LightningDataModule: records -> segments -> packed batches within a token budget.

Every batch is a pure function of ``(seed, batch_index)``: the epoch's record order, the greedy
packing into ``token_budget`` tokens, the CFG dropout draws and the flow timesteps. The module's
state (``batches_consumed``) goes into Lightning checkpoints, so a resumed run continues with exactly
the batches an uninterrupted run would have seen. Under DDP/FSDP, rank ``r`` of ``W`` takes batches
``r, r + W, ...``; dataloader workers split the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ftkit.data.builder import BuilderConfig, apply_cfg_dropout, build_segments
from ftkit.data.packer import PackConfig, pack, packed_length
from ftkit.data.schema import ERR_TOO_LONG, RecordError
from ftkit.errors import FtkitError
from ftkit.segments import Kind, PackedBatch, Segment

log = logging.getLogger("ftkit")


@dataclass
class BatchItem:
    batch: PackedBatch
    index: int  # global batch index (seed for the model's noise draws)
    num_samples: int
    record_ids: tuple[str, ...] = ()  # the packed records' ids, for messages about this batch

    def to(self, device):
        return BatchItem(self.batch.to(device), self.index, self.num_samples, self.record_ids)


def mixture_table(parts: list, records) -> list[dict]:
    """Per dataset: records kept, records skipped, weight, samples per epoch and their share."""
    schedule = getattr(records, "schedule", None)
    counts = [0] * len(parts)
    if schedule is None:
        counts[0] = len(records)
    else:
        for d, _ in schedule:
            counts[d] += 1
    weights = getattr(records, "weights", [getattr(parts[0], "weight", 1.0)])
    total = sum(counts)
    return [{"dataset": p.name, "records": len(p), "skipped": len(p.errors), "weight": float(w), "samples": c,
             "share": c / total} for p, w, c in zip(parts, weights, counts)]


def format_mixture(rows: list[dict]) -> str:
    """The mixture as a table (printed at set-up), with a note for any dataset whose share of
    samples is far from its share of records (weights are per dataset, not per record)."""
    total_s, total_r = sum(r["samples"] for r in rows), sum(r["records"] for r in rows)
    w = max(len("dataset"), *(len(r["dataset"]) for r in rows))
    lines = [f"data mixture: {total_s} samples per epoch",
             f"  {'dataset':<{w}} {'records':>8} {'skipped':>8} {'weight':>7} {'samples':>8} {'share':>7}"]
    for r in rows:
        lines.append(f"  {r['dataset']:<{w}} {r['records']:>8} {r['skipped']:>8} {r['weight']:>7g} {r['samples']:>8} "
                     f"{r['share']:>7.1%}")
    if len(rows) > 1:
        for r in rows:
            per = r["samples"] / max(r["records"], 1)
            if per >= 2 or r["share"] > 2 * r["records"] / max(total_r, 1):
                lines.append(f"  note: {r['dataset']}: {r['records']} records make {r['share']:.1%} of samples "
                             f"(each seen ~{per:.0f}x per epoch): weights set a dataset's share, not a record's; "
                             "set weights proportional to record counts to sample records evenly")
    return "\n".join(lines)


def plan_epoch(lengths: list[int], budget: int, seed: int, epoch: int, max_samples: int | None = None) -> list[list[int]]:
    """Shuffle record indexes with (seed, epoch) and pack them greedily into bins of <= budget tokens.

    A record longer than the budget gets a bin of its own (the data module refuses such records at set-up).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    bins, cur, used = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and (used + n > budget or (max_samples and len(cur) >= max_samples)):
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        bins.append(cur)
    return bins


class PackedStream(IterableDataset):
    """Endless stream of packed batches starting at ``start`` (global batch index)."""

    def __init__(self, dm: MCoTDataModule, start: int, rank: int, world: int, train: bool = True):
        self.dm, self.start, self.rank, self.world, self.train = dm, start, rank, world, train

    def _batch(self, gidx: int, record_ids: list[int]) -> BatchItem:
        dm = self.dm
        g = torch.Generator().manual_seed(dm.seed * 7_919 + gidx)
        samples, ids = [], []
        for rid in record_ids:
            ids.append(str(getattr(dm.records[rid], "id", rid)))
            for segs in dm.samples(rid):  # one sequence, or a preference pair's two (chosen, rejected)
                if self.train and dm.cfg_dropout:
                    segs = apply_cfg_dropout(segs, *dm.cfg_dropout, generator=g)
                for s in segs:
                    if s.kind == Kind.VAE_NOISY and s.timestep_logit is None:
                        s.timestep_logit = float(torch.randn((), generator=g))
                samples.append(segs)
        return BatchItem(pack(samples, dm.pack_cfg), gidx, len(samples), tuple(ids))

    def __iter__(self):
        dm = self.dm
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi else (0, 1)
        per_epoch = len(dm.epoch_plan(0))
        gidx = self.start
        while True:
            # global batch index -> (epoch, bin); ranks interleave, and workers take turns from `start`
            # (the loader reads worker 0 first, so a resumed stream keeps its order)
            if (gidx % self.world) == self.rank and (((gidx - self.start) // self.world) % nw) == wid:
                epoch, b = divmod(gidx, per_epoch)
                plan = dm.epoch_plan(epoch)
                yield self._batch(gidx, plan[b % len(plan)])
            gidx += 1
            if not self.train and gidx >= self.start + per_epoch:
                return


class MCoTDataModule(L.LightningDataModule):
    """Step-wise MCoT data for ftkit's trainers.

    Args:
        datasets: registry names or paths (ftkit JSONL/Parquet, GenRef, GoT, BAGEL parquet).
        weights: sampling weight per dataset (default: the registry's, else equal).
        registry: extra registry YAML file(s) merged over the built-in ``data/registry.yaml``.
        model_path: the backbone folder (tokenizer and special token ids come from it); linked from
            the model by the CLI.
        token_budget: tokens per packed batch (per device).
        max_samples_per_batch: cap on samples per pack (0 = no cap).
        vae_image_size / vit_image_size: image sides fed to the VAE (multiple of 16) and ViT (of 14).
        cfg_dropout: (text, vit, vae[, plan]) dropout rates, upstream's (0.1, 0.3, 0.3); a fourth rate drops
            the plan before a supervised image (GoT's spatial-condition dropout, 0.05 there; see
            :func:`~ftkit.data.builder.apply_cfg_dropout`); ``null`` disables.
        skip_invalid: drop invalid records instead of refusing the dataset (default: each registry
            entry's own ``skip_invalid``). Records are checked at set-up with ``ftkit data validate``'s
            checks (schema, paths, images, duplicate ids), plus one of the data module's own: a record
            whose packed length exceeds ``token_budget`` can never be trained and is invalid too. The
            skipped records are listed in ``skipped_dir/skipped-records.txt``; with ``skip_invalid``
            off, set-up raises :class:`~ftkit.data.dataset.InvalidDatasetError` (count and first
            problems, one message) before step 0.
        skipped_dir: folder for the list of skipped records; default the run folder (the trainer's
            ``default_root_dir``) when a trainer is attached, else ``$TMPDIR/ftkit-invalid``.
        min_image_size: smallest allowed image side in pixels (as ``ftkit data validate --min-size``).
        val_dataset: optional evaluation set (no dropout).
        num_workers: dataloader worker processes.
        seed: data seed (packing order, dropout, timesteps).
        preference: ``"record"``: every record is a preference pair of reflections (DPO; the record's
            ``rejected`` against its last, chosen, reflect; :mod:`ftkit.data.preference`), packed as two
            consecutive sequences (chosen, rejected) that supervise only that reflection; a record without
            ``rejected`` is not used (logged; none at all is an error). ``"perturb"``: such a record gets the
            chosen one with its verdict flipped.
            Needs ``cfg_dropout: null`` (both sequences of a pair must see the same context).
        generate_shapes: ``{out, n, seed, size}``: generate the shapes-world set at ``out`` in
            ``prepare_data`` when it is absent (the tiny-mcot recipe runs from a bare clone); with
            ``pretrain: true`` the text-to-image + captioning set of :mod:`ftkit.data.pretrain` (``plan_act:
            true``: a third of it plan & act; ``correct: true``: wrong drafts' judging records also carry the
            correction); with
            ``tasks: [plan-act, reflect, correct, mcot]`` each record as FoX's separate tasks
            (:mod:`ftkit.data.tasks`); ``error_rate`` / ``partial_rate``: the shares of wrong and partial
            drafts (default 0.7 / 0.15, :func:`ftkit.data.shapes.generate`).
    """

    def __init__(
        self,
        datasets: list[str],
        weights: list[float] | None = None,
        registry: str | None = None,
        model_path: str | None = None,
        token_budget: int = 2048,
        max_samples_per_batch: int = 0,
        vae_image_size: int = 64,
        vit_image_size: int = 56,
        vit_context_for_generated: bool = True,
        cfg_dropout: tuple[float, ...] | None = (0.1, 0.3, 0.3),
        skip_invalid: bool = False,
        skipped_dir: str | None = None,
        min_image_size: int = 16,
        val_dataset: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        generate_shapes: dict | None = None,
        preference: str | None = None,
    ):
        super().__init__()
        self.datasets, self.weights, self.registry = list(datasets), weights, registry
        self.model_path = model_path
        self.token_budget, self.max_samples = token_budget, max_samples_per_batch or None
        self.vae_image_size, self.vit_image_size = vae_image_size, vit_image_size
        self.vit_context_for_generated = vit_context_for_generated
        self.cfg_dropout = tuple(cfg_dropout) if cfg_dropout else None
        if self.cfg_dropout is not None and len(self.cfg_dropout) not in (3, 4):
            raise ValueError(f"data.cfg_dropout takes 3 or 4 rates (text, vit, vae[, plan]), got {list(cfg_dropout)}")
        self.skip_invalid, self.val_dataset = skip_invalid, val_dataset
        self.skipped_dir, self.min_image_size = skipped_dir, min_image_size
        self.num_workers, self.seed = num_workers, seed
        self.generate_shapes = generate_shapes
        if preference not in (None, "record", "perturb"):
            raise ValueError(f"data.preference {preference!r}: choose record or perturb (or null)")
        if preference and self.cfg_dropout:
            raise ValueError("data.preference needs data.cfg_dropout: null (a pair's two sequences must see the same "
                             "context)")
        self.preference = preference
        self.batches_consumed = 0
        self._plans: dict[int, list[list[int]]] = {}
        self._ready = False

    # -------------------------------------------------------------- set-up
    def prepare_data(self) -> None:
        gs = self.generate_shapes
        if gs and gs.get("pretrain") and not (Path(gs["out"]) / "records.jsonl").is_file():
            from ftkit.data.pretrain import generate_pretrain

            log.info("generating shapes-world pretraining data at %s (n=%d, seed=%d)", gs["out"], gs["n"], gs["seed"])
            generate_pretrain(gs["out"], gs["n"], seed=gs["seed"], size=gs.get("size", 64),
                              plan_act=bool(gs.get("plan_act", False)), correct=bool(gs.get("correct", False)))
        elif gs and not (Path(gs["out"]) / "records.jsonl").is_file():
            from ftkit.data.shapes import generate

            log.info("generating shapes-world data at %s (n=%d, seed=%d)", gs["out"], gs["n"], gs.get("seed", 0))
            generate(gs["out"], gs["n"], seed=gs.get("seed", 0), size=gs.get("size", 64), progress=False,
                     tasks=gs.get("tasks"), error_rate=gs.get("error_rate", 0.7),
                     partial_rate=gs.get("partial_rate", 0.15))

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        from ftkit.data.dataset import MixtureDataset, load_records, settle_invalid
        from ftkit.models.loading import load_tokenizer, special_token_ids

        if not self.model_path:
            raise ValueError("MCoTDataModule needs model_path (the backbone folder holding the tokenizer)")
        self.tokenizer = load_tokenizer(self.model_path)
        sp = special_token_ids(self.tokenizer)
        from ftkit.models.folders import read_model_config

        geo = read_model_config(Path(self.model_path)).pack_config()  # the model's own geometry (any folder kind)
        geo.update({k: sp[k] for k in ("bos_id", "eos_id", "start_of_image", "end_of_image")})  # the tokenizer's ids
        self.pack_cfg = PackConfig(**geo)
        self.builder_cfg = BuilderConfig(start_of_image=sp["start_of_image"], vae_image_size=self.vae_image_size,
                                         vit_image_size=self.vit_image_size,
                                         vae_stride=self.pack_cfg.vae_stride, vit_patch_size=self.pack_cfg.vit_patch_size,
                                         vit_context_for_generated=self.vit_context_for_generated)
        parts = [self._load(name) for name in self.datasets]
        out_dir = self.skipped_dir or (self.trainer.default_root_dir if self.trainer is not None else None)
        settle_invalid(parts, out_dir, filename="skipped-records.txt" if out_dir else None)
        for d in parts:
            if len(d) == 0:
                raise FtkitError(f"dataset {d.name!r}: no valid record left ({len(d.errors)} skipped, listed in "
                                 f"{getattr(d, 'invalid_list', '?')})")
        if len(parts) == 1:
            self.records, self.lengths = parts[0], list(parts[0].lengths)
        else:
            self.records = MixtureDataset(parts, weights=self.weights, seed=self.seed)
            self.lengths = [parts[d].lengths[j] for d, j in self.records.schedule]
        self.mixture = mixture_table(parts, self.records)
        log.info("%s", format_mixture(self.mixture))
        self.val_records = None
        if self.val_dataset:
            self.val_records = load_records(self.val_dataset, registry=self.registry, min_size=self.min_image_size,
                                            invalid_list_dir=out_dir)
        self._ready = True
        log.info("data: %d records, %d packed batches per epoch at %d tokens", len(self.records),
                 len(self.epoch_plan(0)), self.token_budget)

    def _load(self, name: str):
        """One dataset, checked: records failing ``validate``'s checks, or whose packed length exceeds
        ``token_budget`` (built once here, so nothing fails mid-run), are in ``ds.errors``; the
        packed length of each kept record is in ``ds.lengths``."""
        from ftkit.data.dataset import load_records

        ds = load_records(name, registry=self.registry, skip_invalid=self.skip_invalid or None,
                          min_size=self.min_image_size, defer_invalid=True)
        if self.preference:
            self._keep_pairs(ds)
        lengths, drop, errors = [], [], []
        for k in range(len(ds)):
            rec = ds[k]
            try:
                n = sum(packed_length(segs, self.pack_cfg) for segs in self._record_samples(rec))
            except RecordError as e:
                drop.append(k)
                errors.append(e)
                continue
            if n > self.token_budget:
                drop.append(k)
                errors.append(RecordError(rec.source, rec.index, "<record>", f"packs to {n} tokens, more than "
                                          f"token_budget={self.token_budget}: it can never fit a batch", ERR_TOO_LONG))
                continue
            lengths.append(n)
        ds.drop(drop, errors)
        ds.lengths = lengths
        return ds

    def _keep_pairs(self, ds) -> None:
        """Preference mode: use only the records that form a pair (a ``self-critique`` file also holds
        corrections); the others are not errors, just not used (logged). None at all is an error."""
        from ftkit.data.preference import pair_records

        unpaired = []
        for k in range(len(ds)):
            try:
                pair_records(ds[k], perturb=self.preference == "perturb")
            except RecordError:
                unpaired.append(k)
        if len(unpaired) == len(ds) and len(ds):
            need = "a last reflect step" + (" and a rejected reflection" if self.preference == "record" else "")
            raise FtkitError(f"dataset {ds.name!r}: no preference pair among its {len(ds)} records (data.preference "
                             f"{self.preference} needs {need})")
        if unpaired:
            ds.drop(unpaired, [])
            log.info("dataset %s: %d preference pairs; %d records that are not pairs are not used", ds.name, len(ds),
                     len(unpaired))

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def segments(self, i: int, records=None) -> list[Segment]:
        rec = (records or self.records)[i]
        return build_segments(rec, self.tokenize, self.builder_cfg)

    def samples(self, i: int) -> list[list[Segment]]:
        """The packed sequences of record ``i``: its segments, or a preference pair's (chosen, rejected)."""
        return self._record_samples(self.records[i])

    def _record_samples(self, rec) -> list[list[Segment]]:
        if not self.preference:
            return [build_segments(rec, self.tokenize, self.builder_cfg)]
        from ftkit.data.preference import pair_records

        pair = pair_records(rec, perturb=self.preference == "perturb")  # RecordError: refused at set-up
        return [build_segments(r, self.tokenize, self.builder_cfg) for r in pair]

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.lengths, self.token_budget, self.seed, epoch, self.max_samples)}
        return self._plans[epoch]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_plan(0))

    # -------------------------------------------------------------- loaders
    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        start = self.batches_consumed
        if start:
            log.info("data: resuming at global batch %d", start)
        return DataLoader(PackedStream(self, start, rank, world), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False)

    def val_dataloader(self):
        if self.val_records is None:
            return []
        return DataLoader(_ValStream(self), batch_size=None)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device) if isinstance(batch, BatchItem) else super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -------------------------------------------------------------- resume
    def state_dict(self):
        t = self.trainer
        consumed = t.global_step * t.accumulate_grad_batches * t.world_size if t is not None else self.batches_consumed
        return {"batches_consumed": int(consumed), "seed": self.seed, "token_budget": self.token_budget}

    def load_state_dict(self, state) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("token_budget", self.token_budget) != self.token_budget:
            log.warning("resuming with a different data seed/token budget: the data order will differ")
        self.batches_consumed = int(state["batches_consumed"])


class _ValStream(IterableDataset):
    def __init__(self, dm: MCoTDataModule):
        self.dm = dm

    def __iter__(self):
        dm = self.dm
        recs = dm.val_records
        budget, cur, used, k = dm.token_budget, [], 0, 0
        for i in range(len(recs)):
            segs = build_segments(recs[i], dm.tokenize, dm.builder_cfg)
            n = packed_length(segs, dm.pack_cfg)
            if cur and used + n > budget:
                yield _val_item(cur, dm, k)
                cur, used, k = [], 0, k + 1
            g = torch.Generator().manual_seed(k)
            for s in segs:
                if s.kind == Kind.VAE_NOISY and s.timestep_logit is None:
                    s.timestep_logit = float(torch.randn((), generator=g))
            cur.append(segs)
            used += n
        if cur:
            yield _val_item(cur, dm, k)


def _val_item(samples, dm, k) -> BatchItem:
    return BatchItem(pack(samples, dm.pack_cfg), 10**9 + k, len(samples))


__all__ = ["MCoTDataModule", "BatchItem", "plan_epoch"]
