"""Balance losses and the expert bias against hand computations and slow references."""

import math

import pytest
import torch

from moe_router.balancing import (
    ExpertBias,
    load_balancing_loss,
    router_z_loss,
    sequence_load_balancing_loss,
)


def reference_balance_loss(probs, expert_ids, valid=None, token_mask=None):
    """E * sum_i f_i P_i with Python loops over tokens, slots and experts."""
    num_tokens, num_experts = probs.shape
    counts = [0.0] * num_experts
    prob_sums = [0.0] * num_experts
    real_tokens = 0
    for t in range(num_tokens):
        if token_mask is not None and not token_mask[t]:
            continue
        real_tokens += 1
        for e in range(num_experts):
            prob_sums[e] += float(probs[t, e])
        for s in range(expert_ids.shape[1]):
            if valid is None or valid[t, s]:
                counts[int(expert_ids[t, s])] += 1
    total = sum(counts)
    return num_experts * sum(
        (counts[e] / total) * (prob_sums[e] / real_tokens) for e in range(num_experts)
    )


def test_balanced_routing_gives_one():
    # 4 experts, 8 tokens, K=2: every expert gets 4 assignments. Any probabilities then give
    # E * sum_i (1/E) P_i = sum_i P_i = 1.
    expert_ids = torch.tensor([[0, 1], [2, 3]] * 4)
    probs = torch.rand(8, 4).softmax(-1)
    assert load_balancing_loss(probs, expert_ids).item() == pytest.approx(1.0, abs=1e-6)
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, expert_ids).item() == pytest.approx(1.0, abs=1e-6)


def test_collapsed_routing_gives_num_experts():
    probs = torch.zeros(5, 4)
    probs[:, 2] = 1.0
    expert_ids = torch.full((5, 1), 2)
    assert load_balancing_loss(probs, expert_ids).item() == pytest.approx(4.0)


def test_crafted_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    expert_ids = torch.tensor([[0], [1], [0]])
    # f = (2/3, 1/3, 0); P = (1.3/3, 1.05/3, 0.65/3)
    expected = 3 * (2 / 3 * 1.3 / 3 + 1 / 3 * 1.05 / 3)
    assert load_balancing_loss(probs, expert_ids).item() == pytest.approx(expected, rel=1e-6)


def test_matches_reference_with_invalid_slots_and_padding():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(13, 6, generator=gen).softmax(-1)
    expert_ids = torch.randint(0, 6, (13, 3), generator=gen)
    valid = torch.rand(13, 3, generator=gen) > 0.3
    token_mask = torch.rand(13, generator=gen) > 0.2
    got = load_balancing_loss(probs, expert_ids, valid, token_mask)
    expected = reference_balance_loss(probs, expert_ids, valid, token_mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_flows_through_probabilities_only():
    probs = torch.rand(6, 4).softmax(-1).requires_grad_()
    expert_ids = torch.tensor([[0], [0], [1], [2], [2], [2]])
    load_balancing_loss(probs, expert_ids).backward()
    # d/dP_ti of E * sum_i f_i * mean_t P_ti = E * f_i / T.
    fractions = torch.tensor([2, 1, 3, 0]) / 6
    expected = (4 * fractions / 6).expand(6, 4)
    torch.testing.assert_close(probs.grad, expected)


def test_sequence_loss_is_mean_of_per_sequence_losses():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 7, 5, generator=gen).softmax(-1)
    expert_ids = torch.randint(0, 5, (3, 7, 2), generator=gen)
    token_mask = torch.ones(3, 7, dtype=torch.bool)
    token_mask[1, 4:] = False
    token_mask[2] = False  # a sequence of padding only is left out of the mean
    got = sequence_load_balancing_loss(probs, expert_ids, token_mask_BS=token_mask)
    per_sequence = [
        reference_balance_loss(probs[b], expert_ids[b], token_mask=token_mask[b]) for b in range(2)
    ]
    assert got.item() == pytest.approx(sum(per_sequence) / 2, rel=1e-5)


def test_sequence_loss_sees_imbalance_the_batch_loss_averages_away():
    # Sequence 0 sends everything to expert 0, sequence 1 to expert 1: balanced over the
    # batch, maximally unbalanced within each sequence.
    probs = torch.tensor([[[1.0, 0.0]] * 4, [[0.0, 1.0]] * 4])
    expert_ids = torch.tensor([[[0]] * 4, [[1]] * 4])
    batch_loss = load_balancing_loss(probs.flatten(0, 1), expert_ids.flatten(0, 1))
    assert batch_loss.item() == pytest.approx(1.0)
    assert sequence_load_balancing_loss(probs, expert_ids).item() == pytest.approx(2.0)


def test_shape_errors():
    with pytest.raises(ValueError, match="leading dims"):
        load_balancing_loss(torch.rand(4, 3), torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="valid"):
        load_balancing_loss(
            torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 2, dtype=bool)
        )


def test_z_loss_formula_and_mask():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [5.0, -1.0]])
    log_z = [math.log(2.0), math.log(math.e + math.e**2), math.log(math.e**5 + math.e**-1)]
    expected = sum(v * v for v in log_z) / 3
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([True, False, True])
    expected_masked = (log_z[0] ** 2 + log_z[2] ** 2) / 2
    assert router_z_loss(logits, mask).item() == pytest.approx(expected_masked, rel=1e-6)


def test_bias_update_follows_the_sign_rule():
    bias = ExpertBias(4, update_rate=0.1)
    bias.update(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5: signs (-1, +1, 0, 0)
    torch.testing.assert_close(bias.bias_E, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    bias.update(torch.tensor([0.0, 0.0, 0.0, 12.0]))  # mean 3: (+, +, +, -), then recentre
    step = torch.tensor([0.1, 0.1, 0.1, -0.1])
    expected = torch.tensor([-0.1, 0.1, 0.0, 0.0]) + step - step.mean()
    torch.testing.assert_close(bias.bias_E, expected)
    assert bias.bias_E.sum().abs().item() < 1e-6


def test_bias_keeps_zero_mean_and_drives_loads_together():
    gen = torch.Generator().manual_seed(0)
    bias = ExpertBias(8, update_rate=0.01)
    affinity = torch.randn(8, generator=gen)  # a fixed preference the bias must undo
    for _ in range(300):
        scores = torch.randn(512, 8, generator=gen) * 0.1 + affinity
        chosen = bias(scores).topk(2, dim=-1).indices
        bias.update(torch.bincount(chosen.flatten(), minlength=8).float())
        assert abs(bias.bias_E.mean().item()) < 1e-6
    scores = torch.randn(4096, 8, generator=gen) * 0.1 + affinity
    loads = torch.bincount(bias(scores).topk(2, dim=-1).indices.flatten(), minlength=8).float()
    max_violation = (loads.max() - loads.mean()) / loads.mean()
    assert max_violation < 0.2


def test_bias_stays_fp32_when_module_is_cast():
    bias = ExpertBias(4, update_rate=1e-3)
    bias.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    before = bias.bias_E.clone()
    wrapper = torch.nn.Sequential(bias).to(torch.bfloat16)
    assert wrapper[0].bias_E.dtype == torch.float32
    torch.testing.assert_close(wrapper[0].bias_E, before, rtol=0, atol=0)
    assert "bias_E" in dict(wrapper[0].named_buffers())
    # Scores of any dtype come back fp32 with the bias added.
    out = wrapper[0](torch.zeros(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_bias_does_not_modify_the_callers_load():
    bias = ExpertBias(3)
    load = torch.tensor([1.0, 2.0, 3.0])
    bias.update(load)
    torch.testing.assert_close(load, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_experts": 0}, "num_experts"), ({"num_experts": 4, "update_rate": -1.0}, "update_rate")],
)
def test_bias_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertBias(**kwargs)


def test_bias_update_shape_error():
    with pytest.raises(ValueError, match="tokens_per_expert_E"):
        ExpertBias(4).update(torch.ones(3))
