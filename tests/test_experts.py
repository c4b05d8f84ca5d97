"""The experts' compute (moe_router/experts.py): the gated-SiLU autograd Function against
finite differences, and the grouped and per-expert-slice paths against each other."""

import pytest
import torch
import torch.nn.functional as F

from moe_router.dispatch import sort_pairs
from moe_router.experts import _GatedSiLU, run_experts_grouped, run_experts_per_slice


def test_gated_silu_gradcheck():
    # The hand-written backward of the gated SiLU of the fused gate|up projection against
    # finite differences, and its output against the plain composition.
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(7, 10, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(_GatedSiLU.apply, (gate_up,))
    gate, up = gate_up.detach().chunk(2, -1)
    torch.testing.assert_close(_GatedSiLU.apply(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("with_invalid", [False, True])
@pytest.mark.parametrize(("num_experts", "d_model"), [(4, 8), (16, 8)])  # fused, split gate|up
def test_grouped_and_per_slice_paths_agree(num_experts, d_model, with_invalid):
    gen = torch.Generator().manual_seed(num_experts)
    num_tokens, num_slots, d_ff = 11, 2, 6
    x = torch.randn(num_tokens, d_model, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = [
        torch.randn(num_experts, *shape, dtype=torch.float64, generator=gen, requires_grad=True)
        for shape in ((d_model, d_ff), (d_model, d_ff), (d_ff, d_model))
    ]
    expert_ids = torch.randint(0, num_experts, (num_tokens, num_slots), generator=gen)
    combine = torch.rand(num_tokens, num_slots, dtype=torch.float64, generator=gen)
    valid = torch.rand(num_tokens, num_slots, generator=gen) > 0.3 if with_invalid else None
    pairs = sort_pairs(expert_ids, combine, valid, num_experts)
    grad = torch.randn(num_tokens, d_model, dtype=torch.float64, generator=gen)
    results = []
    for run in (
        lambda: run_experts_grouped(x, pairs, valid, *weights, "auto"),
        lambda: run_experts_per_slice(x, pairs, *weights),
    ):
        y = run()
        results.append([y, *torch.autograd.grad((y * grad).sum(), [x, *weights])])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
