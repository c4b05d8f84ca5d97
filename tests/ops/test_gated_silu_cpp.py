"""The C++ gated SiLU of the MoE layer's experts (threshold_cpp.py, csrc/gated_silu.cpp),
through its autograd Function, against the PyTorch composition and by gradcheck.

Shape legend: N rows, F expert hidden.
"""

from __future__ import annotations

import math

import pytest
import torch
from ops_testing import NEEDS_CPP_KERNELS

from moe_router.experts import _GatedSiLU, _WeightedGatedSiLU

pytestmark = NEEDS_CPP_KERNELS


@pytest.mark.parametrize("width", [1, 7, 8, 64, 130])
def test_weighted_gated_silu_kernel_matches_its_reference(width):
    """The CPU kernel of the experts' activation with the combine weight folded in: outputs
    and both gradients against ``_GatedSiLU(gate_up) * weight`` (float32: widths on both sides
    of a SIMD vector, large gates, a NaN that must propagate), and gradcheck in float64."""
    gen = torch.Generator().manual_seed(width)
    gate_up = 3 * torch.randn(37, 2 * width, generator=gen)
    gate_up[0, 0], gate_up[1, 0], gate_up[2, :width] = 90.0, -90.0, 0.0
    weight = torch.rand(37, generator=gen)
    grad = torch.randn(37, width, generator=gen)
    got = [t.clone().requires_grad_() for t in (gate_up, weight)]
    ref = [t.clone().requires_grad_() for t in (gate_up, weight)]
    y = _WeightedGatedSiLU.apply(*got)
    y_ref = _GatedSiLU.apply(ref[0]) * ref[1].unsqueeze(-1)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(got[0].grad, ref[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].grad, ref[1].grad, rtol=1e-5, atol=1e-4)
    gate_up[3, width // 2] = math.nan  # a NaN in the gate (or up) row reaches its output row
    assert torch.isnan(_WeightedGatedSiLU.apply(gate_up, weight)[3]).any()
    double = [t.double().requires_grad_() for t in (gate_up[4:], weight[4:])]
    assert torch.autograd.gradcheck(_WeightedGatedSiLU.apply, double)
    # fp64 activations with fp32 combine weights: the weight's gradient comes back in fp32
    mixed = [gate_up[4:].double().requires_grad_(), weight[4:].clone().requires_grad_()]
    _WeightedGatedSiLU.apply(*mixed).sum().backward()
    assert mixed[1].grad.dtype == torch.float32
