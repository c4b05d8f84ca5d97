"""Load-balance metrics against hand computations and a slow per-token reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from distributed_testing import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.metrics import (
    LoadBalanceMetrics,
    active_experts,
    capacity_drops,
    dead_expert_fraction,
    effective_experts,
    load_cv,
    load_entropy,
    max_violation,
    normalized_router_entropy,
    scalar_metrics,
    soft_mass_outside,
)
from moe_router.routing import Routing

# ---------------------------------------------------------------------------------------------
# Data: a hand-sized routing and random ones.
# ---------------------------------------------------------------------------------------------


def hand_routing() -> Routing:
    """E = 4, K = 2, T = 3; every number below is worked out by hand in test_hand_computed."""
    expert_ids_TK = torch.tensor([[0, 1], [0, 2], [0, 1]])
    weights_TK = torch.tensor([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])
    scores_TE = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.4, 0.1], [0.9, 0.1, 0.0, 0.0]])
    return Routing(expert_ids_TK, weights_TK, scores_TE, scores_TE.clamp_min(1e-9).log())


def random_routing(
    num_tokens: int,
    num_experts: int,
    k: int,
    *,
    seed: int,
    padding_fraction: float = 0.0,
    sparse: bool = False,
    skew: float = 1.0,
    drop_fraction: float = 0.0,
    with_padding_mask: bool = True,
    overflow: bool = False,
) -> Routing:
    """A top-k routing over skewed softmax scores.

    Padding tokens get all slots invalid and NaN scores (what a masked row may hold) and, unless
    ``with_padding_mask`` is False, are marked in ``padding_mask_T``; a sparse gate invalidates
    random slots and zeroes random weights; dropped slots are invalid and marked in
    ``dropped_TK``, as a capacity limit leaves them. With ``overflow``, real tokens get 0..3
    overflowed experts with some mass on them, and padding tokens (when marked) garbage: 5
    overflowed experts with NaN mass.
    """
    generator = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(num_tokens, num_experts, generator=generator) * skew
    logits_TE = logits_TE + torch.linspace(0, skew, num_experts)  # a load imbalance to measure
    scores_TE = logits_TE.softmax(-1)
    weights_TK, expert_ids_TK = scores_TE.topk(k, dim=-1)
    valid_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
    if sparse:
        valid_TK &= torch.rand(num_tokens, k, generator=generator) > 0.3
        weights_TK = torch.where(
            torch.rand(num_tokens, k, generator=generator) > 0.2, weights_TK, 0.0
        )
        weights_TK = torch.where(valid_TK, weights_TK, 0.0)
    padding_T = torch.rand(num_tokens, generator=generator) < padding_fraction
    valid_TK &= ~padding_T[:, None]
    weights_TK = torch.where(valid_TK, weights_TK, 0.0)
    scores_TE = torch.where(padding_T[:, None], float("nan"), scores_TE)
    dropped_TK = valid_TK & (torch.rand(num_tokens, k, generator=generator) < drop_fraction)
    valid_TK &= ~dropped_TK
    weights_TK = torch.where(valid_TK, weights_TK, 0.0)
    requested_TK = valid_TK | dropped_TK
    overflow_T = overflow_mass_T = None
    if overflow:  # drawn last, so the rest of the routing is the same as without overflow
        overflow_T = torch.randint(0, 4, (num_tokens,), generator=generator).float()
        overflow_mass_T = overflow_T * 0.05 * torch.rand(num_tokens, generator=generator)
        padding_overflow = (5.0, float("nan")) if with_padding_mask else (0.0, 0.0)
        overflow_T = torch.where(padding_T, padding_overflow[0], overflow_T)
        overflow_mass_T = torch.where(padding_T, padding_overflow[1], overflow_mass_T)
    return Routing(
        expert_ids_TK,
        weights_TK,
        scores_TE,
        logits_TE,
        tokens_per_expert_E=torch.bincount(
            expert_ids_TK[requested_TK], minlength=num_experts
        ).float(),
        valid_TK=valid_TK,
        padding_mask_T=padding_T if with_padding_mask else None,
        dropped_TK=dropped_TK if drop_fraction > 0 else None,
        overflow_T=overflow_T,
        overflow_mass_T=overflow_mass_T,
    )


def concat(routings: list[Routing]) -> Routing:
    padding_mask_T = None
    if all(r.padding_mask_T is not None for r in routings):
        padding_mask_T = torch.cat([r.padding_mask_T for r in routings])
    dropped_TK = None
    if any(r.dropped_TK is not None for r in routings):
        dropped_TK = torch.cat(
            [
                torch.zeros_like(r.valid_TK) if r.dropped_TK is None else r.dropped_TK
                for r in routings
            ]
        )
    overflow_T = overflow_mass_T = None
    if any(r.overflow_T is not None for r in routings):
        no_overflow = [torch.zeros(r.expert_ids_TK.shape[0]) for r in routings]
        pairs = list(zip(routings, no_overflow, strict=True))
        overflow_T = torch.cat([z if r.overflow_T is None else r.overflow_T for r, z in pairs])
        overflow_mass_T = torch.cat(
            [z if r.overflow_T is None else r.overflow_mass_T for r, z in pairs]
        )
    return Routing(
        torch.cat([r.expert_ids_TK for r in routings]),
        torch.cat([r.weights_TK for r in routings]),
        torch.cat([r.scores_TE for r in routings]),
        torch.cat([r.logits_TE for r in routings]),
        tokens_per_expert_E=sum(r.tokens_per_expert_E for r in routings),
        valid_TK=torch.cat([r.valid_TK for r in routings]),
        padding_mask_T=padding_mask_T,
        dropped_TK=dropped_TK,
        overflow_T=overflow_T,
        overflow_mass_T=overflow_mass_T,
    )


# ---------------------------------------------------------------------------------------------
# The slow, obvious reference: Python loops over tokens and slots.
# ---------------------------------------------------------------------------------------------


def reference_metrics(
    routings: list[Routing], num_experts: int, capacity_factor: float | None = None
) -> dict[str, object]:
    total = [0] * num_experts
    batch_max_vio = []
    last = [0] * num_experts
    tokens = entropy_sum = active_sum = outside_sum = 0.0
    dropped = attempted = 0
    active_counts = []  # per real token, for the p99
    slotted = overflowed = overflow_mass = score_mass = 0.0
    for routing in routings:
        ids = routing.expert_ids_TK.tolist()
        weights = routing.weights_TK.tolist()
        valid = routing.valid_TK.tolist()
        scores = routing.scores_TE.tolist()
        no_slots = [[False] * len(row) for row in ids]
        dropped_slots = no_slots if routing.dropped_TK is None else routing.dropped_TK.tolist()
        no_overflow = [0.0] * len(ids)
        overflow = no_overflow if routing.overflow_T is None else routing.overflow_T.tolist()
        mass = no_overflow if routing.overflow_T is None else routing.overflow_mass_T.tolist()
        if routing.padding_mask_T is None:  # a real token has some valid, dropped or overflow
            padding = [
                not any(v + d) and o == 0
                for v, d, o in zip(valid, dropped_slots, overflow, strict=True)
            ]
        else:
            padding = routing.padding_mask_T.tolist()
        counts = [0] * num_experts
        for t in range(len(ids)):
            for k in range(len(ids[t])):
                if valid[t][k] or dropped_slots[t][k]:  # the load the router asked for
                    counts[ids[t][k]] += 1
        assigned = sum(counts)
        if assigned > 0:
            mean = assigned / num_experts
            batch_max_vio.append((max(counts) - mean) / mean)
        last = counts
        total = [a + b for a, b in zip(total, counts, strict=True)]
        attempted += assigned
        if capacity_factor is not None:
            capacity = math.ceil(capacity_factor * assigned / num_experts)
            dropped += sum(max(0, c - capacity) for c in counts)
        else:
            dropped += sum(sum(row) for row in dropped_slots)
        for t in range(len(ids)):
            if padding[t]:
                continue
            tokens += 1
            row_total = sum(scores[t])
            entropy = 0.0
            for s in scores[t]:
                p = s / row_total
                if p > 0:
                    entropy -= p * math.log(p)
            entropy_sum += entropy / math.log(num_experts)
            active = sum(1 for k in range(len(ids[t])) if valid[t][k] and weights[t][k] > 0)
            active_sum += active
            active_counts.append(active)
            slotted += sum(1 for k in range(len(ids[t])) if valid[t][k] or dropped_slots[t][k])
            overflowed += overflow[t]
            overflow_mass += mass[t]
            score_mass += row_total
            selected = {ids[t][k] for k in range(len(ids[t])) if valid[t][k]}
            outside = sum(s for e, s in enumerate(scores[t]) if e not in selected)
            outside_sum += outside / row_total

    def maxvio(counts):
        mean = sum(counts) / num_experts
        return (max(counts) - mean) / mean if mean > 0 else 0.0

    n = sum(total)
    mean = n / num_experts
    std = math.sqrt(sum((c - mean) ** 2 for c in total) / num_experts)
    entropy = -sum(c / n * math.log(c / n) for c in total if c > 0)
    # Nearest rank: the ceil(0.99 n)-th smallest count, in exact integer arithmetic.
    p99_rank = -(-99 * len(active_counts) // 100)
    return {
        "tokens_per_expert": [float(c) for c in total],
        "max_vio_batch_mean": sum(batch_max_vio) / len(batch_max_vio),
        "max_vio_batch_last": maxvio(last),
        "max_vio_global": maxvio(total),
        "load_cv": std / mean,
        "load_entropy": entropy,
        "effective_experts": math.exp(entropy),
        "dead_expert_fraction": sum(1 for c in total if c == 0) / num_experts,
        "router_entropy": entropy_sum / tokens,
        "drop_rate": dropped / attempted,
        "active_experts_per_token": active_sum / tokens,
        "active_experts_p99": float(sorted(active_counts)[p99_rank - 1]),
        "support_per_token": (active_sum + overflowed) / tokens,
        "soft_mass_outside": outside_sum / tokens,
        "overflow_rate": overflowed / (slotted + overflowed),
        "overflow_mass": overflow_mass / score_mass,
    }


def assert_values_close(actual: dict, expected: dict, keys=None, **tolerance) -> None:
    for key in keys if keys is not None else expected:
        value = actual[key]
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(
            value, torch.tensor(expected[key], dtype=torch.float32), msg=key, **tolerance
        )


# ---------------------------------------------------------------------------------------------
# Values.
# ---------------------------------------------------------------------------------------------


def test_hand_computed():
    metric = LoadBalanceMetrics(num_experts=4, capacity_factor=1.0)
    metric.update(hand_routing())
    out = metric.compute()

    # c = [3, 2, 1, 0], Σc = 6, c̄ = 1.5.
    cv = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 4) / 1.5
    load_h = -(0.5 * math.log(0.5) + 1 / 3 * math.log(1 / 3) + 1 / 6 * math.log(1 / 6))

    def h(*p):
        return -sum(x * math.log(x) for x in p if x > 0) / math.log(4)

    expected = {
        "tokens_per_expert": [3.0, 2.0, 1.0, 0.0],
        "max_vio_batch_mean": (3 - 1.5) / 1.5,
        "max_vio_batch_last": 1.0,
        "max_vio_global": 1.0,
        "load_cv": cv,
        "load_entropy": load_h,
        "effective_experts": math.exp(load_h),
        "dead_expert_fraction": 1 / 4,
        # Each score row already sums to 1.
        "router_entropy": (h(0.5, 0.3, 0.1, 0.1) + h(0.4, 0.1, 0.4, 0.1) + h(0.9, 0.1)) / 3,
        # C = ceil(1.0 * 6 / 4) = 2: expert 0 drops 1 of its 3.
        "drop_rate": 1 / 6,
        # The third token's second slot is valid but has weight 0.
        "active_experts_per_token": (2 + 2 + 1) / 3,
        # Sorted [1, 2, 2]: the ceil(0.99 * 3) = 3rd.
        "active_experts_p99": 2.0,
        # No overflow: the support is the active experts.
        "support_per_token": (2 + 2 + 1) / 3,
        # Unselected mass: token 0 {2, 3} = 0.2, token 1 {1, 3} = 0.2, token 2 {2, 3} = 0.
        "soft_mass_outside": (0.2 + 0.2 + 0.0) / 3,
        "overflow_rate": 0.0,
        "overflow_mass": 0.0,
    }
    assert set(out) == set(expected)
    assert_values_close(out, expected)
    assert out["tokens_per_expert"].shape == (4,)
    assert cv == pytest.approx(0.7453559925, abs=1e-9)  # the hand value itself, sqrt(5/4)/1.5


@pytest.mark.parametrize(
    ("num_experts", "k", "padding_fraction", "sparse", "drop_fraction", "capacity_factor"),
    [
        (8, 2, 0.0, False, 0.0, None),
        (8, 2, 0.25, False, 0.0, 1.0),
        (8, 2, 0.25, False, 0.3, None),  # the layer's own drops
        (16, 4, 0.1, True, 0.2, 1.25),  # simulated drops on the requested load
        (5, 1, 0.3, True, 0.5, 2.0),
    ],
)
@pytest.mark.parametrize("with_padding_mask", [True, False])
@pytest.mark.parametrize("overflow", [False, True])
def test_matches_reference(
    num_experts,
    k,
    padding_fraction,
    sparse,
    drop_fraction,
    capacity_factor,
    with_padding_mask,
    overflow,
):
    routings = [
        random_routing(
            37 + 11 * i,
            num_experts,
            k,
            seed=i,
            padding_fraction=padding_fraction,
            sparse=sparse,
            skew=1.0 + i,
            drop_fraction=drop_fraction,
            with_padding_mask=with_padding_mask,
            overflow=overflow,
        )
        for i in range(3)
    ]
    metric = LoadBalanceMetrics(num_experts, capacity_factor=capacity_factor)
    for routing in routings:
        metric.update(routing)
    out = metric.compute()
    assert_values_close(out, reference_metrics(routings, num_experts, capacity_factor))
    assert not any(torch.isnan(v).any() for v in out.values())


@pytest.mark.parametrize("overflow", [False, True])
def test_padding_tokens_change_nothing(overflow):
    routing = random_routing(40, 8, 2, seed=3, sparse=True, overflow=overflow)
    # All padding, NaN scores (and with overflow, garbage overflow counts and NaN mass).
    padded = random_routing(30, 8, 2, seed=4, padding_fraction=1.0, overflow=overflow)
    with_padding, without = LoadBalanceMetrics(8, 1.0), LoadBalanceMetrics(8, 1.0)
    with_padding.update(concat([padded, routing]))
    without.update(routing)
    for key, value in without.compute().items():
        torch.testing.assert_close(with_padding.compute()[key], value, msg=key)


def test_all_padding_batch_is_not_a_batch():
    metric = LoadBalanceMetrics(4)
    metric.update(hand_routing())
    metric.update(random_routing(10, 4, 2, seed=0, padding_fraction=1.0))
    out = metric.compute()
    assert out["max_vio_batch_mean"] == pytest.approx(1.0)  # the padding batch is left out
    # ...but it is the last batch, which had no load.
    assert out["max_vio_batch_last"] == 0.0


def test_empty_window_gives_defined_values():
    metric = LoadBalanceMetrics(6, capacity_factor=1.0)
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = metric.compute()
    expected = dict.fromkeys(LoadBalanceMetrics.SCALAR_KEYS, 0.0)
    expected["dead_expert_fraction"] = 1.0
    expected["tokens_per_expert"] = [0.0] * 6
    assert_values_close(out, expected)
    assert not math.copysign(1.0, out["load_entropy"].item()) < 0  # +0, not -0, in tables


def test_accumulation_equals_concatenation():
    routings = [random_routing(25 + i, 8, 2, seed=10 + i, padding_fraction=0.2) for i in range(4)]
    accumulated, single = LoadBalanceMetrics(8), LoadBalanceMetrics(8)
    for routing in routings:
        accumulated.update(routing)
    single.update(concat(routings))
    many, one = accumulated.compute(), single.compute()
    # Batch-level MaxVio is the only thing that depends on how the data was split.
    for key in set(one) - {"max_vio_batch_mean", "max_vio_batch_last"}:
        torch.testing.assert_close(many[key], one[key], msg=key)
    per_batch = [max_violation(r.tokens_per_expert_E) for r in routings]
    torch.testing.assert_close(many["max_vio_batch_mean"], torch.stack(per_batch).mean())
    torch.testing.assert_close(many["max_vio_batch_last"], per_batch[-1])


def test_capacity_drops_are_per_batch():
    # Batch 1 overloads expert 0, batch 2 expert 1: together balanced, but each drops.
    first = Routing(
        torch.tensor([[0], [0], [0], [1]]),
        torch.ones(4, 1),
        torch.ones(4, 2) / 2,
        torch.zeros(4, 2),
    )
    second = Routing(
        torch.tensor([[1], [1], [1], [0]]),
        torch.ones(4, 1),
        torch.ones(4, 2) / 2,
        torch.zeros(4, 2),
    )
    metric = LoadBalanceMetrics(2, capacity_factor=1.0)  # C = ceil(4 / 2) = 2 per batch
    metric.update(first)
    metric.update(second)
    assert metric.compute()["drop_rate"] == pytest.approx(2 / 8)


def test_capacity_rounds_up():
    counts_E = torch.tensor([5.0, 3.0, 1.0, 1.0])  # Σc = 10, E = 4
    # C = ceil(1.25 * 10 / 4) = ceil(3.125) = 4 -> drops 1; C = ceil(1.0 * 10 / 4) = 3 -> drops 2.
    assert capacity_drops(counts_E, 1.25).item() == 1
    assert capacity_drops(counts_E, 1.0).item() == 2
    # 1.2 * 10 / 4 is 3.0000000000000004 in floats; the metric rounds exactly as Python does.
    assert capacity_drops(counts_E, 1.2).item() == 5 - math.ceil(1.2 * 10 / 4)


def test_dropped_assignments():
    # The hand routing after a capacity of 2 per expert: expert 0 keeps tokens 0 and 2.
    routing = hand_routing()
    routing.dropped_TK = torch.tensor([[False, False], [True, False], [False, False]])
    routing.valid_TK = ~routing.dropped_TK
    routing.weights_TK = routing.weights_TK * routing.valid_TK
    metric = LoadBalanceMetrics(4)
    metric.update(routing)
    out = metric.compute()
    # Balance metrics see the load the router asked for, c = [3, 2, 1, 0], drops included.
    assert out["tokens_per_expert"].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert out["max_vio_global"] == pytest.approx(1.0)
    assert out["drop_rate"] == pytest.approx(1 / 6)
    # Token 1 lost expert 0: one active slot, and expert 0's 0.4 counts as mass outside.
    assert out["active_experts_per_token"] == pytest.approx((2 + 1 + 1) / 3)
    assert out["soft_mass_outside"] == pytest.approx((0.2 + 0.6 + 0.0) / 3)
    # A capacity factor instead counts what C = ceil(1.0 * 6 / 4) = 2 would drop: also 1.
    simulated = LoadBalanceMetrics(4, capacity_factor=1.0)
    simulated.update(routing)
    assert simulated.compute()["drop_rate"] == pytest.approx(1 / 6)
    dropless = LoadBalanceMetrics(4)
    dropless.update(hand_routing())
    assert dropless.compute()["drop_rate"] == 0.0


def test_padding_mask_decides_the_tokens():
    routing = hand_routing()
    # Every slot of token 1 dropped: still a real token without a padding mask...
    routing.dropped_TK = torch.tensor([[False, False], [True, True], [False, False]])
    routing.valid_TK = ~routing.dropped_TK
    metric = LoadBalanceMetrics(4)
    metric.update(routing)
    assert metric.compute()["active_experts_per_token"] == pytest.approx((2 + 0 + 1) / 3)
    # ...and the padding mask, when the record has one, is what decides.
    routing.padding_mask_T = torch.tensor([True, False, False])
    metric.reset()
    metric.update(routing)
    assert metric.compute()["active_experts_per_token"] == pytest.approx((0 + 1) / 2)


def test_overflow_hand_computed():
    # The hand routing from a support-exact gate whose cap of 2 slots was full: token 0 also
    # gave p = 0.1 to expert 2, token 1 p = 0.1 to each of experts 1 and 3.
    routing = hand_routing()
    routing.overflow_T = torch.tensor([1.0, 2.0, 0.0])
    routing.overflow_mass_T = torch.tensor([0.1, 0.2, 0.0])
    metric = LoadBalanceMetrics(4)
    metric.update(routing)
    out = metric.compute()
    # 6 slotted + 3 overflowed assignments; score mass 3 (each row sums to 1).
    assert out["overflow_rate"] == pytest.approx(3 / 9)
    assert out["overflow_mass"] == pytest.approx(0.3 / 3)
    # Active experts [2, 2, 1] stay what was computed; the support adds the overflow.
    assert out["active_experts_per_token"] == pytest.approx(5 / 3)
    assert out["support_per_token"] == pytest.approx((3 + 4 + 1) / 3)
    assert out["active_experts_p99"] == 2.0
    # A capacity drop keeps its slot: the overflow rate does not move.
    routing.dropped_TK = torch.tensor([[False, False], [True, False], [False, False]])
    routing.valid_TK = ~routing.dropped_TK
    routing.weights_TK = routing.weights_TK * routing.valid_TK
    metric.reset()
    metric.update(routing)
    out = metric.compute()
    assert out["overflow_rate"] == pytest.approx(3 / 9)
    assert out["support_per_token"] == pytest.approx((3 + 3 + 1) / 3)
    # Without a padding mask, a token whose only assignments overflowed is still a real token.
    routing = hand_routing()
    routing.valid_TK = torch.tensor([[True, True], [True, True], [False, False]])
    routing.weights_TK = routing.weights_TK * routing.valid_TK
    routing.overflow_T = torch.tensor([0.0, 0.0, 2.0])
    routing.overflow_mass_T = torch.tensor([0.0, 0.0, 1.0])
    metric.reset()
    metric.update(routing)
    out = metric.compute()
    assert out["support_per_token"] == pytest.approx((2 + 2 + 2) / 3)
    assert out["overflow_rate"] == pytest.approx(2 / 6)
    assert out["overflow_mass"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(("num_low", "expected_p99"), [(99, 1.0), (98, 3.0), (100, 1.0)])
def test_active_experts_p99_is_exact_at_the_boundary(num_low, expected_p99):
    # 100 tokens: num_low with 1 active expert, the rest with 3. The p99 is 1 exactly when at
    # least 99 of the 100 tokens have at most 1.
    active_T = torch.tensor([1] * num_low + [3] * (100 - num_low))
    weights_TK = (torch.arange(3) < active_T[:, None]).float()
    expert_ids_TK = torch.arange(3).expand(100, 3)
    scores_TE = torch.full((100, 4), 0.25)
    metric = LoadBalanceMetrics(4)
    # Two batches and a padding token with garbage slots, which must not count.
    halves = [slice(0, 37), slice(37, 100)]
    for half in halves:
        metric.update(Routing(expert_ids_TK[half], weights_TK[half], scores_TE[half], scores_TE))
    padding = Routing(
        torch.tensor([[0, 1, 2]]),
        torch.ones(1, 3),
        torch.full((1, 4), 0.25),
        torch.zeros(1, 4),
        padding_mask_T=torch.tensor([True]),
    )
    metric.update(padding)
    assert metric.compute()["active_experts_p99"] == expected_p99
    inverted_cdf = np.percentile(active_T.numpy(), 99, method="inverted_cdf")
    assert float(inverted_cdf) == expected_p99


def test_state_merge_equals_one_metric_over_both():
    # What DDP does to the states (gather, then sum), on one process: the states of two metric
    # objects summed equal one object that saw both windows, for every value including the p99.
    first_batches = [
        random_routing(
            29 + step, 8, 3, seed=40 + step, padding_fraction=0.2, drop_fraction=0.1, overflow=True
        )
        for step in range(2)
    ]
    second_batches = [
        random_routing(31, 8, 3, seed=50, padding_fraction=0.3, sparse=True, overflow=True)
    ]
    first, second, both = (LoadBalanceMetrics(8, capacity_factor=1.1) for _ in range(3))
    for routing in first_batches:
        first(routing)  # forward, as in a training step
        both.update(routing)
    for routing in second_batches:
        second(routing)
        both.update(routing)
    summed = {name: state + second.metric_state[name] for name, state in first.metric_state.items()}
    first.merge_state(second)
    for name, state in first.metric_state.items():
        torch.testing.assert_close(state, summed[name], msg=name)
    merged, expected = first.compute(), both.compute()
    # The last batch of the merge is the union of both objects' last batches, as under DDP.
    last_E = first_batches[-1].tokens_per_expert_E + second_batches[-1].tokens_per_expert_E
    expected["max_vio_batch_last"] = max_violation(last_E)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, msg=key)
    reference = reference_metrics(first_batches + second_batches, 8, capacity_factor=1.1)
    assert_values_close(merged, reference, keys=set(reference) - {"max_vio_batch_last"})
    assert merged["overflow_rate"] > 0 and merged["active_experts_p99"] == 3.0


def test_moe_layer_capacity_drops():
    from moe_router.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2, gate="topk", capacity_factor=1.0)
    x = torch.randn(4, 24, 16) * torch.linspace(0.5, 3.0, 16)  # skewed, so experts overflow
    _, routing = layer(x, return_routing=True)
    measured, simulated = LoadBalanceMetrics(8), LoadBalanceMetrics(8, capacity_factor=1.0)
    measured.update(routing)
    simulated.update(routing)
    out = measured.compute()
    torch.testing.assert_close(out["tokens_per_expert"], routing.tokens_per_expert_E)
    num_dropped = routing.num_dropped.item()
    assert num_dropped > 0
    assert out["drop_rate"] == pytest.approx(num_dropped / (4 * 24 * 2))
    # The layer's capacity ceil(1.0 * T * K / E) is the metric's when no token is padding.
    torch.testing.assert_close(simulated.compute()["drop_rate"], out["drop_rate"])
    assert_values_close(out, reference_metrics([routing], 8))


def test_values_agree_with_functional_forms():
    # What the dropped single-metric classes checked: each value of the suite is its functional
    # form applied to the window's counts, or the real-token mean of its per-token form.
    routings = [
        random_routing(33, 8, 2, seed=20 + i, sparse=True, padding_fraction=0.1) for i in range(3)
    ]
    metric = LoadBalanceMetrics(8, capacity_factor=1.1)
    for routing in routings:
        metric.update(routing)
    out = metric.compute()
    counts_E = sum(routing.tokens_per_expert_E for routing in routings)
    torch.testing.assert_close(out["tokens_per_expert"], counts_E)
    for key, form in (
        ("max_vio_global", max_violation),
        ("load_cv", load_cv),
        ("load_entropy", load_entropy),
        ("effective_experts", effective_experts),
        ("dead_expert_fraction", dead_expert_fraction),
    ):
        torch.testing.assert_close(out[key], form(counts_E), msg=key)
    per_batch = torch.stack([max_violation(routing.tokens_per_expert_E) for routing in routings])
    torch.testing.assert_close(out["max_vio_batch_mean"], per_batch.mean())
    torch.testing.assert_close(out["max_vio_batch_last"], per_batch[-1])
    drops = sum(capacity_drops(routing.tokens_per_expert_E, 1.1) for routing in routings)
    torch.testing.assert_close(out["drop_rate"], (drops / counts_E.sum()).float())
    real_T = ~torch.cat([routing.padding_mask_T for routing in routings])
    whole = concat(routings)
    for key, per_token_T in (
        ("router_entropy", normalized_router_entropy(whole.scores_TE)),
        ("active_experts_per_token", active_experts(whole.weights_TK, whole.valid_TK)),
        (
            "soft_mass_outside",
            soft_mass_outside(whole.scores_TE, whole.expert_ids_TK, whole.valid_TK),
        ),
    ):
        torch.testing.assert_close(out[key], per_token_T[real_T].mean(), msg=key)


def test_forward_returns_batch_and_accumulates():
    routings = [random_routing(20, 4, 2, seed=30 + i, skew=3.0) for i in range(3)]
    metric, reference = LoadBalanceMetrics(4), LoadBalanceMetrics(4)
    for routing in routings:
        batch = metric(routing)
        alone = LoadBalanceMetrics(4)
        alone.update(routing)
        for key, value in alone.compute().items():
            torch.testing.assert_close(batch[key], value, msg=key)
        reference.update(routing)
    for key, value in reference.compute().items():
        torch.testing.assert_close(metric.compute()[key], value, msg=key)
    torch.testing.assert_close(metric.last_counts_E, routings[-1].tokens_per_expert_E.double())


def test_reset():
    metric = LoadBalanceMetrics(4)
    metric.update(hand_routing())
    metric.reset()
    metric.update(random_routing(12, 4, 1, seed=5))
    fresh = LoadBalanceMetrics(4)
    fresh.update(random_routing(12, 4, 1, seed=5))
    for key, value in fresh.compute().items():
        torch.testing.assert_close(metric.compute()[key], value, msg=key)


def test_functional_forms_batch_over_layers():
    loads_LE = torch.tensor([[3, 2, 1, 0], [2, 2, 2, 2], [0, 0, 0, 0], [8, 0, 0, 0]])
    # Rows by hand: MaxVio (3 - 1.5) / 1.5, 0, 0 (empty), (8 - 2) / 2.
    torch.testing.assert_close(max_violation(loads_LE), torch.tensor([1.0, 0.0, 0.0, 3.0]))
    torch.testing.assert_close(dead_expert_fraction(loads_LE), torch.tensor([0.25, 0.0, 1.0, 0.75]))
    torch.testing.assert_close(effective_experts(loads_LE)[1:], torch.tensor([4.0, 0.0, 1.0]))
    torch.testing.assert_close(load_entropy(loads_LE)[1], torch.tensor(math.log(4)))
    # Population std of [8, 0, 0, 0] is sqrt((36 + 3 * 4) / 4) = sqrt(12); mean 2.
    torch.testing.assert_close(load_cv(loads_LE)[3], torch.tensor(math.sqrt(12) / 2))
    for row in range(4):
        torch.testing.assert_close(max_violation(loads_LE)[row], max_violation(loads_LE[row]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1_000), min_size=1, max_size=16))
def test_count_invariants(counts):
    counts_E = torch.tensor(counts)
    num_experts = len(counts)
    vio, cv = max_violation(counts_E).item(), load_cv(counts_E).item()
    entropy, effective = load_entropy(counts_E).item(), effective_experts(counts_E).item()
    assert 0.0 <= vio <= num_experts - 1 + 1e-5  # max when one expert takes everything
    assert 0.0 <= cv <= math.sqrt(num_experts - 1) + 1e-5
    assert 0.0 <= entropy <= math.log(num_experts) + 1e-5
    if sum(counts) > 0:
        assert 1.0 - 1e-5 <= effective <= num_experts + 1e-4
    # Scaling every count leaves every ratio unchanged.
    torch.testing.assert_close(max_violation(counts_E * 7), max_violation(counts_E))
    torch.testing.assert_close(load_cv(counts_E * 7), load_cv(counts_E))


def test_scalar_metrics_for_logging():
    metric = LoadBalanceMetrics(4)
    metric.update(hand_routing())
    logged = scalar_metrics(metric.compute(), prefix="val/layer0/")
    assert sorted(logged) == sorted("val/layer0/" + key for key in LoadBalanceMetrics.SCALAR_KEYS)
    assert all(value.ndim == 0 for value in logged.values())
    with pytest.raises(ValueError, match="lacks the load-balance keys"):
        scalar_metrics({"load_cv": torch.tensor(0.0)})


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [0, -3, 2.0, True, "8"])
def test_bad_num_experts(num_experts):
    with pytest.raises(ValueError, match="num_experts must be an int >= 1"):
        LoadBalanceMetrics(num_experts)


@pytest.mark.parametrize("capacity_factor", [0, -1.0, float("nan"), float("inf"), True, "1.0"])
def test_bad_capacity_factor(capacity_factor):
    with pytest.raises(ValueError, match="capacity_factor must be a positive finite number"):
        LoadBalanceMetrics(4, capacity_factor=capacity_factor)


def test_bad_routing():
    metric = LoadBalanceMetrics(5)
    with pytest.raises(ValueError, match=r"scores_TE must be \[T, E\] = \[3, 5\]"):
        metric.update(hand_routing())  # E = 4
    with pytest.raises(ValueError, match="must be a moe_router.routing.Routing"):
        metric.update({"expert_ids_TK": torch.zeros(3, 2)})
    routing = hand_routing()
    routing.weights_TK = routing.weights_TK[:, :1]
    with pytest.raises(ValueError, match="weights_TK must have the shape of expert_ids_TK"):
        LoadBalanceMetrics(4).update(routing)
    routing = hand_routing()
    routing.padding_mask_T = torch.zeros(4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"padding_mask_T must be \[T\] = \[3\]"):
        LoadBalanceMetrics(4).update(routing)
    routing = hand_routing()
    routing.dropped_TK = torch.zeros(3, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="dropped_TK must have the shape of expert_ids_TK"):
        LoadBalanceMetrics(4).update(routing)
    routing = hand_routing()
    routing.overflow_T, routing.overflow_mass_T = torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match=r"overflow_T must be \[T\] = \[3\], got \(2,\)"):
        LoadBalanceMetrics(4).update(routing)
    routing = hand_routing()
    routing.overflow_T = torch.zeros(3)
    with pytest.raises(ValueError, match="overflow_T and routing.overflow_mass_T must both be"):
        LoadBalanceMetrics(4).update(routing)
    routing = hand_routing()
    routing.overflow_T, routing.overflow_mass_T = torch.zeros(3), torch.zeros(3, 1)
    with pytest.raises(ValueError, match=r"overflow_mass_T must be \[T\] = \[3\]"):
        LoadBalanceMetrics(4).update(routing)
    with pytest.raises(ValueError, match="K <= num_experts = 2 slots per token, got K = 3"):
        LoadBalanceMetrics(2).update(
            Routing(
                torch.zeros(4, 3, dtype=torch.long),
                torch.ones(4, 3),
                torch.ones(4, 2),
                torch.zeros(4, 2),
            )
        )


# ---------------------------------------------------------------------------------------------
# No host syncs in update (CUDA only: the sync debug mode turns a sync into an error).
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_update_does_not_sync():
    routing = random_routing(
        64, 8, 2, seed=0, padding_fraction=0.2, sparse=True, drop_fraction=0.2, overflow=True
    )
    device = torch.device("cuda")
    routing = Routing(
        routing.expert_ids_TK.to(device),
        routing.weights_TK.to(device),
        routing.scores_TE.to(device),
        routing.logits_TE.to(device),
        tokens_per_expert_E=routing.tokens_per_expert_E.to(device),
        valid_TK=routing.valid_TK.to(device),
        padding_mask_T=routing.padding_mask_T.to(device),
        dropped_TK=routing.dropped_TK.to(device),
        overflow_T=routing.overflow_T.to(device),
        overflow_mass_T=routing.overflow_mass_T.to(device),
    )
    metrics = [LoadBalanceMetrics(8).to(device), LoadBalanceMetrics(8, 1.25).to(device)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for metric in metrics:
            metric.update(routing)
            metric(routing)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for metric, capacity_factor in zip(metrics, [None, 1.25], strict=True):
        reference = reference_metrics([routing, routing], 8, capacity_factor=capacity_factor)
        assert_values_close({k: v.cpu() for k, v in metric.compute().items()}, reference)


# ---------------------------------------------------------------------------------------------
# DDP: sum states reduced over two gloo processes equal one process on all the data.
# ---------------------------------------------------------------------------------------------

WORLD_SIZE = 2
DDP_EXPERTS = 6


def ddp_batches(rank: int) -> list[Routing]:
    return [
        random_routing(
            21 + 5 * rank + step,
            DDP_EXPERTS,
            2,
            seed=100 * rank + step,
            padding_fraction=0.2,
            skew=2.0,
            drop_fraction=0.1,
            overflow=True,
        )
        for step in range(3)
    ]


def _ddp_worker(rank: int, out_dir: str) -> None:
    metric = LoadBalanceMetrics(DDP_EXPERTS, capacity_factor=1.2)
    for routing in ddp_batches(rank):
        metric(routing)  # forward, as in a training step
    torch.save({"all": metric.compute()}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_ddp_reduction_equals_single_process(tmp_path):
    run_ranks(_ddp_worker, tmp_path, WORLD_SIZE)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    batches = [ddp_batches(rank) for rank in range(WORLD_SIZE)]
    single = LoadBalanceMetrics(DDP_EXPERTS, capacity_factor=1.2)
    for routing in batches[0] + batches[1]:  # every micro-batch, one process
        single.update(routing)
    expected = single.compute()
    # The last step's batch is the union of every rank's last micro-batch.
    last_step_E = sum(rank_batches[-1].tokens_per_expert_E for rank_batches in batches)
    expected["max_vio_batch_last"] = max_violation(last_step_E)
    reference = reference_metrics(batches[0] + batches[1], DDP_EXPERTS, capacity_factor=1.2)
    assert_values_close(expected, reference, keys=set(reference) - {"max_vio_batch_last"})

    for result in results:
        assert set(result["all"]) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(result["all"][key], value, msg=key)


def test_out_of_range_ids_and_negative_counts_are_clear_errors():
    with pytest.raises(ValueError, match=r"expert_ids_TK must lie in \[0, 8\)"):
        LoadBalanceMetrics(8).update(
            Routing(torch.tensor([[9, 1]]), torch.ones(1, 2), torch.rand(1, 8), torch.rand(1, 8))
        )
    with pytest.raises(ValueError, match="counts_E must be counts >= 0"):
        max_violation(torch.tensor([1.0, -2.0, 3.0]))
