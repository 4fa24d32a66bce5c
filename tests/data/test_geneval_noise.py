"""The shapes-world detector cannot be fooled: nothing in noise, textures or blurs; exact agreement with
the generator's ground truth on a held-out seed (the detector was developed on seed 2022, never on
these)."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from ftkit.data import shapes
from ftkit.data.geneval import CONFOUNDER_KINDS, ColorShapeDetector, confounders, evaluate_image

EVAL_SEED = 1011  # the ablation's held-out eval seed (ftkit.infer.ablation.ABLATION_SEED)


def _noise_check(n: int, seed: int):
    det = ColorShapeDetector()
    kinds, fooled = Counter(), []
    for i, (kind, img) in enumerate(confounders(n, seed)):
        kinds[kind] += 1
        dets = det.detect(img)
        if dets:
            fooled.append((i, kind, img.shape, dets))
    assert set(kinds) == set(CONFOUNDER_KINDS)
    assert fooled == []


def test_no_objects_in_noise_textures_and_blurs():
    _noise_check(200, seed=3)


@pytest.mark.slow
def test_no_objects_in_1000_confounders():
    _noise_check(1000, seed=4)


def test_confounders_are_deterministic_and_varied():
    a = [img for _, img in confounders(12, seed=5)]
    b = [img for _, img in confounders(12, seed=5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert {img.shape[0] for img in a} <= {32, 64, 128} and len({img.shape[0] for img in a}) > 1
    assert all(img.std() > 0 for img in a)


def test_a_cross_prompt_fails_on_noise():
    meta = {"tag": "single_object", "include": [{"class": "cross", "count": 1}]}
    for _, img in confounders(30, seed=6):
        ok, reason = evaluate_image(img, meta)
        assert not ok and "found 0" in reason


@pytest.mark.parametrize("size", [64, 128])
def test_agreement_with_ground_truth_on_held_out_seed(size):
    """Every image of a record (draft, and the refinement when the draft is wrong) is judged; truth:
    the refinement and ``ok`` drafts pass, every other draft fails."""
    n = 600 if size == 64 else 120
    agree = defaultdict(list)
    for i in range(1, n + 1):
        rec, images = shapes.make_record(i, EVAL_SEED, size)
        meta = rec["meta"]
        for path, img in images.items():
            truth = path.endswith("_refine.png") or meta["error"] is None
            agree[meta["tag"]].append(evaluate_image(img, meta)[0] == truth)
    assert set(agree) == set(shapes.TAGS)
    for tag, v in agree.items():
        assert np.mean(v) >= 0.99, (tag, np.mean(v), len(v))
