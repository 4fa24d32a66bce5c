"""Preference training of reflections (DPO): the loss, the pair records, their packing, and DPO steps on a
real tiny BAGEL with peft LoRA, the reference being the same model with adapters disabled."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftkit.data.preference import flipped_reflection, pair_records
from ftkit.data.schema import RecordError, ReflectStep, StepRecord
from ftkit.train import losses as Ls

# ------------------------------------------------------------------------------------------- loss


def test_dpo_loss_is_log2_on_equal_pairs_and_falls_with_the_margin():
    lp = torch.tensor([-3.0, -7.5])
    loss, margin = Ls.dpo_loss(lp, lp.clone(), lp - 1, lp - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and torch.equal(margin, torch.zeros(2))
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    loss, margin = Ls.dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-1.0]), beta=0.5)
    # margin = 0.5 * ((-2 + 3) - (-2 + 1)) = 1: loss = log(1 + e^-1)
    assert margin.item() == pytest.approx(1.0) and loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected


def test_sequence_logps_sums_each_packed_sample():
    ce = torch.tensor([0.5, 1.0, 2.0, 0.25, 4.0])
    sample = torch.tensor([0, 0, 2, 2, 3])
    torch.testing.assert_close(Ls.sequence_logps(ce, sample, 5), torch.tensor([-1.5, 0.0, -2.25, -4.0, 0.0]))


def test_preference_config_is_checked():
    with pytest.raises(ValueError, match="beta"):
        Ls.Preference(beta=0)
    with pytest.raises(ValueError, match="reference"):
        Ls.Preference(reference="sft")


# ------------------------------------------------------------------------------------------ records

def _record(tmp_path, verdict="revise", **extra) -> dict:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "d.png")
    reflect = {"type": "reflect", "verdict": verdict, "critique": "Expected a red circle.",
               "regions": [{"box": [0, 0, 500, 500], "label": "red circle", "kind": "missing"}] if verdict == "revise"
               else []}
    return {"id": "p1", "task": "t2i", "prompt": "a photo of a red circle",
            "steps": [{"type": "plan", "caption": "a red circle", "boxes": [{"label": "red circle", "box": [100, 100, 400, 400]}]},
                      {"type": "draft", "image": "d.png"}, reflect], "supervise": ["reflect"], **extra}


def test_rejected_reflection_parses_round_trips_and_names_bad_fields(tmp_path):
    src = str(tmp_path / "r.jsonl")
    d = _record(tmp_path, rejected={"verdict": "ok", "critique": "The image matches the prompt."})
    rec = StepRecord.from_dict(d, src, 0)
    assert isinstance(rec.rejected, ReflectStep) and rec.rejected.verdict == "ok"
    again = StepRecord.from_dict(rec.to_dict(tmp_path), src, 0)
    assert again.rejected == rec.rejected and again.steps[-1] == rec.steps[-1]
    with pytest.raises(RecordError, match=r"r.jsonl:3:rejected.verdict: "):
        StepRecord.from_dict(_record(tmp_path, rejected={"verdict": "maybe"}), src, 3)
    bad = _record(tmp_path, rejected={"verdict": "ok"})
    bad["steps"] = bad["steps"][:2]
    bad["supervise"] = ["draft"]
    with pytest.raises(RecordError, match=r":rejected: a preference pair needs a reflect as its last step"):
        StepRecord.from_dict(bad, src, 0)


def test_pairs_share_the_context_and_flip_the_verdict(tmp_path):
    src = str(tmp_path / "r.jsonl")
    rec = StepRecord.from_dict(_record(tmp_path), src, 7)
    with pytest.raises(RecordError, match=r"r.jsonl:7:rejected: missing"):
        pair_records(rec)
    chosen, rejected = pair_records(rec, perturb=True)
    assert chosen.steps[:-1] == rejected.steps[:-1] and chosen.supervise == rejected.supervise == ("reflect",)
    assert chosen.steps[-1].verdict == "revise" and rejected.steps[-1].verdict == "ok" and not rejected.steps[-1].regions
    ok = StepRecord.from_dict(_record(tmp_path, verdict="ok"), src, 0)
    flip = flipped_reflection(ok)
    assert flip.verdict == "revise" and flip.regions[0].box == (100, 100, 400, 400)  # the plan's box
    given = StepRecord.from_dict(_record(tmp_path, rejected={"verdict": "revise", "critique": "wrong"}), src, 0)
    assert pair_records(given)[1].steps[-1].critique == "wrong"


# -------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    from ftkit.data.shapes import generate

    root = tmp_path_factory.mktemp("pref")
    generate(root, 8, seed=2, size=64, progress=False, tasks=["reflect"])
    return root / "records.jsonl"


def _dm(pref_data, fixture_dir, **kw):
    from ftkit.train.datamodule import MCoTDataModule

    dm = MCoTDataModule([str(pref_data)], model_path=str(fixture_dir), token_budget=4096, cfg_dropout=None, **kw)
    dm.setup()
    return dm


def test_preference_batches_pack_chosen_then_rejected(pref_data, fixture_dir):
    from ftkit.train.datamodule import MCoTDataModule, PackedStream

    with pytest.raises(ValueError, match="cfg_dropout: null"):
        MCoTDataModule([str(pref_data)], model_path=str(fixture_dir), preference="perturb")
    with pytest.raises(Exception, match="no preference pair among its 8 records"):  # none has a rejected one
        _dm(pref_data, fixture_dir, preference="record")
    dm = _dm(pref_data, fixture_dir, preference="perturb")
    item = next(iter(PackedStream(dm, 0, 0, 1)))
    b = item.batch
    assert item.num_samples == 2 * len(item.record_ids)
    ce_sample = b.sample_ids[b.ce_indexes]
    assert set(ce_sample.tolist()) == set(range(item.num_samples))  # every sequence supervises its reflection
    for k in range(0, item.num_samples, 2):  # a pair: the same context up to where the reflections start
        a, c = b.text_ids[b.sample_ids[b.text_indexes] == k], b.text_ids[b.sample_ids[b.text_indexes] == k + 1]
        first = b.ce_indexes[ce_sample == k].min()
        n_ctx = int((b.text_indexes[b.sample_ids[b.text_indexes] == k] < first).sum())
        assert n_ctx > 0 and torch.equal(a[:n_ctx], c[:n_ctx]) and not torch.equal(a, c)


def _dpo_module(fixture_dir, reference):
    from ftkit.train.module import MCoTModule

    m = MCoTModule(model_path=str(fixture_dir), dtype="fp32", kernels="torch", attn_impl="sdpa", seed=1,
                   adapter={"method": "lora", "preset": "all-experts", "r": 4, "alpha": 8, "modules_to_save": ["llm2vae"]},
                   preference={"beta": 0.5, "reference": reference})
    m.configure_model()
    return m


def test_dpo_steps_raise_the_margin_and_train_only_the_understanding_adapter(pref_data, fixture_dir):
    from ftkit.train.datamodule import PackedStream

    dm = _dm(pref_data, fixture_dir, preference="perturb")
    item = next(iter(PackedStream(dm, 0, 0, 1)))
    m = _dpo_module(fixture_dir, "base")
    train = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert train and all("lora_" in n and "_moe_gen" not in n for n in train)  # understanding LoRA only
    frozen = {n: p.detach().clone() for n, p in m.model.named_parameters() if "_moe_gen.lora_" in n or "llm2vae" in n}
    loss, logs = m.compute_losses(item)
    # a fresh LoRA (B = 0) is the base model itself: every margin is 0 and the loss is exactly log 2
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and logs["margin"].item() == pytest.approx(0, abs=1e-6)
    opt = torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(6):
        opt.zero_grad()
        loss, logs = m.compute_losses(item)
        loss.backward()
        opt.step()
    loss, logs = m.compute_losses(item)
    assert loss.item() < math.log(2) - 0.05 and logs["margin"].item() > 0 and logs["reward_acc"].item() > 0.5, logs
    for n, p in m.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_init_reference_is_the_adapter_before_step_0(pref_data, fixture_dir):
    """A continued adapter (B != 0): with ``reference: init`` step 0 has margin 0 (the policy is its own
    reference, log-probabilities precomputed for every pair); with ``base`` it does not."""
    from ftkit.train.datamodule import PackedStream

    dm = _dm(pref_data, fixture_dir, preference="perturb")
    item = next(iter(PackedStream(dm, 0, 0, 1)))
    losses = {}
    for reference in ("init", "base"):
        m = _dpo_module(fixture_dir, reference)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in m.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if reference == "init":
            with pytest.raises(Exception, match="no reference log-probabilities"):
                m.compute_losses(item)
            m._precompute_reference(dm)
            assert set(m._ref_logps) == {str(dm.records[i].id) for i in range(len(dm.records))}
        loss, logs = m.compute_losses(item)
        losses[reference] = (loss.item(), logs["margin"].abs().max().item())
    assert losses["init"][0] == pytest.approx(math.log(2), abs=1e-5) and losses["init"][1] < 1e-4, losses
    assert losses["base"][1] > 1e-3, losses


def test_preference_needs_an_adapter_and_pairs(fixture_dir):
    from ftkit.train.module import MCoTModule

    with pytest.raises(ValueError, match="model.preference"):
        MCoTModule(model_path=str(fixture_dir), full_finetune=True, preference={"beta": 0.1})


def test_self_critique_records_serve_as_pairs(tmp_path):
    """The records ``ftkit data self-critique`` writes (last step the judge's reflect) pair with a flipped verdict."""
    lines = [_record(tmp_path, verdict=v) | {"id": f"s{i}#self-reflect"} for i, v in enumerate(("ok", "revise"))]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = [StepRecord.from_dict(x, str(tmp_path / "r.jsonl"), i) for i, x in enumerate(lines)]
    verdicts = [pair_records(r, perturb=True)[1].steps[-1].verdict for r in recs]
    assert verdicts == ["revise", "ok"]
