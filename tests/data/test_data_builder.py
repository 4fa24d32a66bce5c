"""Record -> segments (ftkit.data.builder), checked through the packer with the fixture's tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from ftkit.data.builder import BuilderConfig, apply_cfg_dropout, boxes_to_mask, build_segments, pil_to_tensor
from ftkit.data.packer import PackConfig, pack
from ftkit.data.schema import RecordError, StepRecord
from ftkit.data.serialize import serialize_plan, serialize_reflection
from ftkit.segments import Kind, Step

REPO = Path(__file__).resolve().parents[2]


def _tokenizer_dir() -> Path:
    p = Path(os.environ.get("FTKIT_BAGEL_FIXTURE", REPO.parent / "shared" / "fixtures" / "bagel-tiny"))
    return p if p.is_absolute() else REPO / p


@pytest.fixture(scope="module")
def tokenize():
    from transformers import AutoTokenizer

    d = _tokenizer_dir()
    if not (d / "vocab.json").is_file():
        pytest.fail(f"bagel-tiny tokenizer not found at {d} (set FTKIT_BAGEL_FIXTURE)")
    tok = AutoTokenizer.from_pretrained(str(d))
    return lambda text: tok(text, add_special_tokens=False).input_ids


SOI, EOI, BOS, EOS = 403, 404, 401, 402
CFG = BuilderConfig(start_of_image=SOI, vae_image_size=64, vit_image_size=56)
PACK = PackConfig(bos_id=BOS, eos_id=EOS, start_of_image=SOI, end_of_image=EOI)


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (48, 48), "red").save(tmp_path / "draft.png")
    Image.new("RGB", (80, 80), "blue").save(tmp_path / "refine.png")
    Image.new("RGB", (32, 32), "green").save(tmp_path / "input.png")
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 32, 16))
    m.save(tmp_path / "mask.png")
    return tmp_path


PLAN = {"type": "plan", "caption": "a red circle left of a blue square",
        "boxes": [{"label": "red circle", "box": [0, 0, 500, 500]}, {"label": "blue square", "box": [500, 500, 1000, 1000]}]}
DRAFT = {"type": "draft", "image": "draft.png"}
REFLECT = {"type": "reflect", "verdict": "revise", "critique": "the square is missing",
           "regions": [{"box": [500, 500, 1000, 1000], "label": "blue square", "kind": "missing"}]}
REFINE = {"type": "refine", "image": "refine.png", "mode": "inpaint"}


def make(images, steps, **kw) -> StepRecord:
    d = {"id": "x", "task": "t2i", "prompt": "a red circle left of a blue square", "steps": steps, **kw}
    return StepRecord.from_dict(d, source=images / "r.jsonl", index=0)


def summary(segs):
    return [(s.kind, s.step, s.loss, s.end_label) for s in segs]


def test_full_record_segments_and_packed_batch(images, tokenize):
    rec = make(images, [PLAN, DRAFT, REFLECT, REFINE])
    segs = build_segments(rec, tokenize, CFG)
    T, NOISY, CLEAN, VIT = Kind.TEXT, Kind.VAE_NOISY, Kind.VAE_CLEAN, Kind.VIT_IMAGE
    assert summary(segs) == [
        (T, Step.CONTEXT, False, None),
        (T, Step.PLAN, True, SOI),
        (NOISY, Step.DRAFT, True, None),
        (CLEAN, Step.DRAFT, False, None),
        (VIT, Step.DRAFT, False, None),
        (T, Step.REFLECT, True, SOI),
        (NOISY, Step.REFINE, True, None),
    ]
    assert segs[0].text_ids == tokenize(rec.prompt)
    plan_ids, refl_ids = tokenize(serialize_plan(rec.steps[0])), tokenize(serialize_reflection(rec.steps[2]))
    assert segs[1].text_ids == plan_ids and segs[5].text_ids == refl_ids
    # images: resized and in [-1, 1]; red draft -> (1, -1, -1)
    assert segs[2].image.shape == (3, 64, 64) and segs[4].image.shape == (3, 56, 56)
    assert torch.allclose(segs[2].image[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(segs[2].image, segs[3].image)
    # the refinement pairs with the clean draft and carries the reflection's region
    assert segs[6].pair_with == 3
    assert torch.equal(segs[6].region_mask, boxes_to_mask([(500, 500, 1000, 1000)], 64, 64))
    assert segs[6].region_mask.sum() == 32 * 32

    b = pack([segs], PACK)
    # CE: plan tokens (+ <|im_end|>) and the <|vision_start|> that opens the draft; same for the reflection
    for step, ids in ((Step.PLAN, plan_ids), (Step.REFLECT, refl_ids)):
        sel = b.ce_step == int(step)
        assert b.ce_labels[sel].tolist() == ids + [EOS, SOI]
    assert not (b.ce_step == int(Step.CONTEXT)).any()
    # noisy targets are the draft and the refinement, 4x4 latent tokens each
    assert b.vae_image_noisy == [True, False, True]
    assert b.vae_image_step == [int(Step.DRAFT), int(Step.DRAFT), int(Step.REFINE)]
    assert b.mse_step.tolist() == [int(Step.DRAFT)] * 16 + [int(Step.REFINE)] * 16
    assert b.vae_pair_with == [-1, -1, 1]
    expected_grid = torch.zeros(4, 4, dtype=torch.bool)
    expected_grid[2:, 2:] = True
    assert torch.equal(b.vae_region_masks[2], expected_grid)
    assert b.vit_seqlens == [16]
    # the step of every token follows its segment
    assert set(b.token_step.tolist()) == {int(s) for s in (Step.CONTEXT, Step.PLAN, Step.DRAFT, Step.REFLECT, Step.REFINE)}


def test_t2i_prompt_then_draft(images, tokenize):
    segs = build_segments(make(images, [DRAFT]), tokenize, CFG)
    assert summary(segs) == [(Kind.TEXT, Step.CONTEXT, False, SOI), (Kind.VAE_NOISY, Step.DRAFT, True, None)]
    b = pack([segs], PACK)
    assert b.ce_labels.tolist() == [SOI] and b.ce_step.tolist() == [int(Step.CONTEXT)]
    assert b.mse_step.numel() == 16


def test_reflection_only_record_gives_draft_as_context(images, tokenize):
    segs = build_segments(make(images, [DRAFT, REFLECT], supervise=["reflect"]), tokenize, CFG)
    assert summary(segs) == [(Kind.TEXT, Step.CONTEXT, False, None), (Kind.VAE_CLEAN, Step.DRAFT, False, None),
                             (Kind.VIT_IMAGE, Step.DRAFT, False, None), (Kind.TEXT, Step.REFLECT, True, None)]
    b = pack([segs], PACK)
    assert b.mse_indexes.numel() == 0 and b.vae_image_noisy == [False]
    assert set(b.ce_step.tolist()) == {int(Step.REFLECT)}


def test_correction_only_record(images, tokenize):
    segs = build_segments(make(images, [DRAFT, REFLECT, REFINE], supervise=["refine"]), tokenize, CFG)
    assert summary(segs) == [(Kind.TEXT, Step.CONTEXT, False, None), (Kind.VAE_CLEAN, Step.DRAFT, False, None),
                             (Kind.VIT_IMAGE, Step.DRAFT, False, None), (Kind.TEXT, Step.REFLECT, False, SOI),
                             (Kind.VAE_NOISY, Step.REFINE, True, None)]
    assert segs[4].pair_with == 1 and segs[4].region_mask is not None
    b = pack([segs], PACK)
    assert b.ce_labels.tolist() == [SOI]  # only the image opening is a text target
    assert b.vae_pair_with == [-1, 0]


def test_edit_record_input_image_first(images, tokenize):
    rec = StepRecord.from_dict({"id": "e", "task": "edit", "prompt": "make it red", "input_image": "input.png",
                                "steps": [DRAFT]}, source=images / "r.jsonl", index=0)
    segs = build_segments(rec, tokenize, CFG)
    assert summary(segs) == [(Kind.VAE_CLEAN, Step.CONTEXT, False, None), (Kind.VIT_IMAGE, Step.CONTEXT, False, None),
                             (Kind.TEXT, Step.CONTEXT, False, SOI), (Kind.VAE_NOISY, Step.DRAFT, True, None)]
    assert torch.allclose(segs[0].image[:, 0, 0], torch.tensor([-1.0, 128 / 255 * 2 - 1, -1.0]), atol=1e-6)


def test_trailing_unsupervised_steps_are_dropped_and_vit_copies_optional(images, tokenize):
    segs = build_segments(make(images, [PLAN, DRAFT], supervise=["plan"]), tokenize, CFG)
    assert summary(segs) == [(Kind.TEXT, Step.CONTEXT, False, None), (Kind.TEXT, Step.PLAN, True, None)]
    no_vit = BuilderConfig(start_of_image=SOI, vit_context_for_generated=False)
    segs = build_segments(make(images, [DRAFT, REFLECT, REFINE]), tokenize, no_vit)
    assert [s.kind for s in segs] == [Kind.TEXT, Kind.VAE_NOISY, Kind.VAE_CLEAN, Kind.TEXT, Kind.VAE_NOISY]
    assert segs[4].pair_with == 2


def test_mask_image_becomes_region_mask(images, tokenize):
    refl = {**REFLECT, "mask": "mask.png"}
    segs = build_segments(make(images, [DRAFT, refl, REFINE]), tokenize, CFG)
    m = segs[-1].region_mask
    assert m.shape == (64, 64) and m[:16, :32].all() and m.sum() == 16 * 32


def test_undecodable_image_names_the_field(images, tokenize):
    (images / "draft.png").write_bytes(b"broken")
    with pytest.raises(RecordError, match=r"r.jsonl:0:steps\[0\].image: image does not decode"):
        build_segments(make(images, [DRAFT]), tokenize, CFG)


def test_builder_config_checks_sizes():
    with pytest.raises(ValueError, match="multiple of 16"):
        BuilderConfig(start_of_image=1, vae_image_size=60)
    with pytest.raises(ValueError, match="multiple of 14"):
        BuilderConfig(start_of_image=1, vit_image_size=64)


def test_pil_to_tensor_range():
    x = pil_to_tensor(Image.new("RGB", (10, 10), (0, 255, 128)), 16)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[:, 5, 5], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_cfg_dropout(images, tokenize):
    rec = StepRecord.from_dict({"id": "e", "task": "edit", "prompt": "make it red", "input_image": "input.png",
                                "steps": [DRAFT, REFLECT, REFINE]}, source=images / "r.jsonl", index=0)
    segs = build_segments(rec, tokenize, CFG)
    all_dropped = apply_cfg_dropout(segs, 1.0, 1.0, 1.0)
    assert [s.dropped for s in all_dropped] == [s.step == Step.CONTEXT for s in segs]
    assert not any(s.dropped for s in segs)  # input untouched
    assert not any(s.dropped for s in all_dropped if s.loss)
    assert not any(s.dropped for s in apply_cfg_dropout(segs, 0.0, 0.0, 0.0))
    # a dropped context image still advances the RoPE position
    kept, dropped = pack([segs], PACK), pack([all_dropped], PACK)
    assert dropped.sequence_length < kept.sequence_length
    # drop only the context images (the input's VAE and ViT copies, which lead the sample): every token
    # that follows keeps exactly the RoPE position, step and kind it has in the undropped pack
    img_dropped = apply_cfg_dropout(segs, 0.0, 1.0, 1.0)
    assert [s.dropped for s in img_dropped] == [s.kind != Kind.TEXT and s.step == Step.CONTEXT for s in segs]
    assert [s.kind for s in segs[:2]] == [Kind.VAE_CLEAN, Kind.VIT_IMAGE]
    part = pack([img_dropped], PACK)
    n_gone = kept.sequence_length - part.sequence_length
    assert n_gone == (4 * 4 + 2) + (4 * 4 + 2)  # 64 px / 16 and 56 px / 14, each with its two markers
    assert part.position_ids[0].item() == 2, "a dropped context image must still advance the RoPE position"
    assert torch.equal(part.position_ids, kept.position_ids[n_gone:])
    assert torch.equal(part.token_step, kept.token_step[n_gone:]) and torch.equal(part.token_kind, kept.token_kind[n_gone:])
    assert torch.equal(part.ce_labels, kept.ce_labels) and torch.equal(part.ce_indexes, kept.ce_indexes - n_gone)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    runs1 = [[s.dropped for s in apply_cfg_dropout(segs, generator=g1)] for _ in range(50)]
    runs2 = [[s.dropped for s in apply_cfg_dropout(segs, generator=g2)] for _ in range(50)]
    assert runs1 == runs2
    g = torch.Generator().manual_seed(1)
    n = 3000
    rates = torch.tensor([[s.dropped for s in apply_cfg_dropout(segs[:3], generator=g)] for _ in range(n)]).float().mean(0)
    assert abs(rates[0] - 0.3) < 0.04 and abs(rates[1] - 0.3) < 0.04 and abs(rates[2] - 0.1) < 0.03


def test_plan_dropout(images, tokenize):
    segs = build_segments(make(images, [PLAN, DRAFT]), tokenize, CFG)
    kept = pack([segs], PACK)
    gone = apply_cfg_dropout(segs, 0.0, 0.0, 0.0, plan=1.0)
    assert [s.dropped for s in gone] == [s.step == Step.PLAN for s in segs]
    dropped = pack([gone], PACK)
    assert dropped.ce_labels.numel() < kept.ce_labels.numel()  # the plan's CE goes with it
    # the image is then read after the prompt alone, at the position it takes at inference without a plan
    noplan = pack([build_segments(make(images, [DRAFT]), tokenize, CFG)], PACK)
    assert dropped.sequence_length == noplan.sequence_length
    assert torch.equal(dropped.position_ids, noplan.position_ids)
    # a plan that no supervised image follows (grounded captioning) is never dropped: it is the only target
    cap = build_segments(make(images, [PLAN]), tokenize, CFG)
    assert not any(s.dropped for s in apply_cfg_dropout(cap, 0.0, 0.0, 0.0, plan=1.0))
    assert not any(s.dropped for s in apply_cfg_dropout(segs, 0.0, 0.0, 0.0, plan=0.0))
    with pytest.raises(ValueError, match="plan"):
        apply_cfg_dropout(segs, plan=1.5)
