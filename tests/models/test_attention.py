"""Packed attention: the per-sample layout (``AttentionSpec.grouped``) computes what the dense mask does."""

import pytest
import torch

from ftkit.models.attention import AttentionSpec, _sample_ranges, _sdpa, packed_attention


def _pack(lengths_per_sample, modes=("causal", "noise", "full", "causal")):
    splits, pos = [], 0
    for smp, lens in enumerate(lengths_per_sample):
        for j, n in enumerate(lens):
            splits.append((pos, pos + n, modes[j % len(modes)], smp))
            pos += n
    return splits, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_attention_equals_dense_mask(dtype):
    # samples of unequal length (padding slots), every split mode, GQA (4 query heads over 2 KV heads)
    splits, L = _pack([[5, 8, 3], [7], [4, 6], [9, 2, 2], [1], [3, 3], [6], [8], [5, 5]])
    spec = AttentionSpec.from_splits(splits, L)
    rows = spec.grouped()
    assert rows.q_index.shape == (9, 16) and rows.back.shape == (L,)
    torch.manual_seed(0)
    q = torch.randn(4, L, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(2, L, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(2, L, 16, dtype=dtype, requires_grad=True)
    out = packed_attention(q, k, v, spec, 0.25)
    ref = _sdpa(q.float(), k.float(), v.float(), spec.dense(), 0.25)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    g = torch.randn(out.shape)
    grads = torch.autograd.grad((out.float() * g).sum(), [q, k, v])
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref_grads = torch.autograd.grad((_sdpa(qf, kf, vf, spec.dense(), 0.25) * g).sum(), [qf, kf, vf])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, atol=tol * 4, rtol=tol * 4)


def test_grouped_only_where_it_saves_work():
    # one sample (nothing to split), or one long sample among short ones (B Lmax^2 > L^2 / 2): the dense mask
    assert AttentionSpec.from_splits(*_pack([[10, 20]])).grouped() is None
    assert AttentionSpec.from_splits(*_pack([[60], [2], [2]])).grouped() is None
    assert AttentionSpec.from_splits(*_pack([[10], [10], [10], [10]])).grouped() is not None


def test_sample_ranges_need_contiguous_samples():
    assert _sample_ranges([(0, 3, "causal", 0), (3, 5, "full", 0), (5, 9, "causal", 1)]) == ((0, 5), (5, 9))
    # sample 0 interleaved around sample 1: no per-sample layout (the dense mask still handles it)
    splits = [(0, 3, "causal", 0), (3, 5, "causal", 1), (5, 9, "causal", 0)]
    assert _sample_ranges(splits) is None
    spec = AttentionSpec.from_splits(splits, 9)
    assert spec.grouped() is None
    q = torch.randn(2, 9, 8)
    torch.testing.assert_close(packed_attention(q, q, q, spec, 0.3), _sdpa(q, q, q, spec.dense(), 0.3))


def test_cached_blocks_as_rows_equal_the_block_diagonal_mask():
    # inference: block i's new tokens see its own cache and itself (causal text, full image), key axis =
    # [all caches | all new tokens]; caches of different lengths, one block without a cache
    from ftkit.models.attention import RowLayout, cached_attention

    past, new, causal = [5, 0, 9, 3], [4, 6, 1, 6], [True, False, True, False]
    P, Q = sum(past), sum(new)
    dense = torch.zeros(Q, P + Q, dtype=torch.bool)
    p0 = q0 = 0
    for pl, ql, c in zip(past, new, causal):
        dense[q0:q0 + ql, p0:p0 + pl] = True
        own = torch.ones(ql, ql, dtype=torch.bool)
        dense[q0:q0 + ql, P + q0:P + q0 + ql] = own.tril() if c else own
        p0, q0 = p0 + pl, q0 + ql
    rows = RowLayout.for_blocks(past, new, causal)
    assert rows.work() == 4 * 6 * 10
    assert torch.equal(rows.dense(Q, P + Q), dense)  # the single-call layout: the same rule
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, Q, 8, generator=g), torch.randn(2, P + Q, 8, generator=g), torch.randn(2, P + Q, 8, generator=g)
    torch.testing.assert_close(cached_attention(q, k, v, rows, 0.35), cached_attention(q, k, v, dense, 0.35))
