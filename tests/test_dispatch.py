"""Dispatch (moe_router/dispatch.py): the sort, the grouped matmul, the capacity mask, and
the gather / combine autograd Functions against plain compositions and references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.dispatch import (
    _GatherSlices,
    _WeightedScatterAdd,
    capacity_keep_mask,
    grouped_matmul,
    grouped_mm_available,
    slice_sizes,
    sort_pairs,
)
from moe_router.moe import MoELayer

# The explicit expert backends (``auto`` picks one of them).
BACKENDS = ["loop", "grouped_mm"]


def reference_capacity_keep(expert_ids, valid, priority, num_experts, capacity):
    """Per expert: sort its assignments by (priority desc, position), keep the first C."""
    num_tokens, num_slots = expert_ids.shape
    keep = torch.zeros_like(valid)
    for e in range(num_experts):
        pairs = [
            (t, s)
            for t in range(num_tokens)
            for s in range(num_slots)
            if valid[t, s] and expert_ids[t, s] == e
        ]
        if priority is not None:
            pairs.sort(key=lambda ts: (-float(priority[ts]), ts[0] * num_slots + ts[1]))
        for t, s in pairs[:capacity]:
            keep[t, s] = True
    return keep


def test_gather_slices_matches_index_select_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    token = torch.tensor([4, 0, 0, 2, 1, 4, 3])
    sizes = [2, 0, 4, 1]
    slices = _GatherSlices.apply(x, token, sizes)
    for got, expected in zip(slices, x.index_select(0, token).split(sizes), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: _GatherSlices.apply(x, token, sizes), (x,))


def test_sort_pairs_puts_each_expert_in_one_slice_and_the_rest_last():
    expert_ids = torch.tensor([[2, 0], [0, 1], [2, 2]])
    weights = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    valid = torch.tensor([[True, True], [False, True], [True, True]])
    pairs = sort_pairs(expert_ids, weights, valid, num_experts=3)
    assert pairs.order_P.tolist() == [1, 3, 0, 4, 5, 2]  # expert 0, 1, 2, then the invalid
    assert pairs.token_P.tolist() == [0, 1, 0, 2, 2, 1]
    torch.testing.assert_close(pairs.weight_P, weights.reshape(-1)[pairs.order_P])
    assert pairs.counts_E1.tolist() == [1, 1, 3, 1]
    assert sort_pairs(expert_ids, weights, None, 3).counts_E1.tolist() == [2, 1, 3, 0]


def test_unaligned_width_falls_back_to_the_loop():
    x = torch.randn(10, 6)
    w = torch.randn(3, 6, 5)
    assert not grouped_mm_available(x, w)
    layer = MoELayer(6, 5, 3, 1, gate="topk")
    assert layer(torch.randn(4, 6)).shape == (4, 6)
    with pytest.raises(ValueError, match="grouped_mm"):
        grouped_matmul(x, w, torch.tensor([3, 3, 10], dtype=torch.int32), backend="grouped_mm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_matmul_against_per_expert_loop_with_empty_groups(backend):
    x = torch.randn(20, 16)
    w = torch.randn(4, 16, 8)
    counts = [0, 7, 0, 13]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = grouped_matmul(x, w, offsets, backend=backend)
    expected = torch.cat([x[:7] @ w[1], x[7:] @ w[3]])
    torch.testing.assert_close(out, expected)


def test_slice_sizes_and_grouped_matmul_with_given_sizes():
    offsets = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    sizes = slice_sizes(offsets, 23)
    assert sizes == [0, 7, 0, 13, 3]
    x = torch.randn(23, 16)
    w = torch.randn(4, 16, 8)
    out = grouped_matmul(x, w, offsets, backend="loop", sizes=sizes)
    torch.testing.assert_close(out[:20], torch.cat([x[:7] @ w[1], x[7:20] @ w[3]]))
    torch.testing.assert_close(out, grouped_matmul(x, w, offsets, backend="loop"))


def test_capacity_keep_mask_crafted():
    expert_ids = torch.tensor([[0], [0], [1], [0], [0]])
    valid = torch.tensor([[True], [True], [True], [True], [False]])
    priority = torch.tensor([[0.1], [0.9], [0.5], [0.7], [1.0]])
    by_score = capacity_keep_mask(expert_ids, valid, priority, num_experts=2, capacity=2)
    assert by_score.flatten().tolist() == [False, True, True, True, False]
    by_position = capacity_keep_mask(expert_ids, valid, None, num_experts=2, capacity=2)
    assert by_position.flatten().tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("policy", ["score", "position"])
def test_capacity_keep_mask_against_reference(policy):
    gen = torch.Generator().manual_seed(3)
    expert_ids = torch.randint(0, 5, (40, 3), generator=gen)
    valid = torch.rand(40, 3, generator=gen) > 0.2
    priority = torch.rand(40, 3, generator=gen) if policy == "score" else None
    got = capacity_keep_mask(expert_ids, valid, priority, 5, capacity=9)
    torch.testing.assert_close(got, reference_capacity_keep(expert_ids, valid, priority, 5, 9))


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 30),
    num_slots=st.integers(1, 4),
    num_experts=st.integers(1, 6),
    capacity=st.integers(0, 12),
    by_score=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_capacity_keep_mask_property(num_tokens, num_slots, num_experts, capacity, by_score, seed):
    gen = torch.Generator().manual_seed(seed)
    expert_ids = torch.randint(0, num_experts, (num_tokens, num_slots), generator=gen)
    valid = torch.rand(num_tokens, num_slots, generator=gen) > 0.25
    # Coarse priorities, so that ties (broken by position) actually occur.
    priority = torch.randint(0, 3, (num_tokens, num_slots), generator=gen).float()
    priority = priority if by_score else None
    got = capacity_keep_mask(expert_ids, valid, priority, num_experts, capacity)
    expected = reference_capacity_keep(expert_ids, valid, priority, num_experts, capacity)
    torch.testing.assert_close(got, expected)


def test_weighted_scatter_add_gradcheck():
    # The combine's hand-written backward (the weighted scatter-add with its invalid-row
    # select) against finite differences, and its output against the plain composition.
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.rand(9, dtype=torch.float64, generator=gen, requires_grad=True)
    token = torch.randint(0, 4, (9,), generator=gen)
    for valid in (None, torch.rand(9, generator=gen) > 0.3):
        assert torch.autograd.gradcheck(
            lambda r, w, v=valid: _WeightedScatterAdd.apply(r, w, token, v, 4), (rows, weight)
        )
        kept = torch.ones(9, dtype=torch.bool) if valid is None else valid
        expected = torch.zeros(4, 5, dtype=torch.float64).index_add_(
            0, token, (rows * weight.unsqueeze(-1) * kept.unsqueeze(-1)).detach()
        )
        torch.testing.assert_close(
            _WeightedScatterAdd.apply(rows, weight, token, valid, 4), expected
        )
