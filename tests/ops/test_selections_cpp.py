"""The C++ selections of the balanced gate (threshold_cpp.py, csrc/selections.cpp): top_values,
rank_pair and margin_quantiles against torch.topk, a full sort and the PyTorch path of the gate
(gates._dispatch_margin), exactly.

Shape legend: R rows, N entries per row, T tokens, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch
from ops_testing import NEEDS_CPP_KERNELS, stress_rows

from moe_router.ops import threshold_cpp

pytestmark = NEEDS_CPP_KERNELS


def _nan_as_neg_inf(rows_RN: torch.Tensor) -> torch.Tensor:
    return rows_RN.masked_fill(torch.isnan(rows_RN), -math.inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_entries", [1, 5, 16, 64, 200])
def test_top_values_match_torch_topk(num_entries, dtype):
    """The balanced gate's row selection: torch.topk's values, NaN counted as -inf, on rows
    with ties, -inf masks and scales from 1e-3 to 1e3; row counts that leave a partial block
    of 8, and counts on both sides of the SIMD sifting path's limit (16) and of the insertion
    path's (32; larger counts select with nth_element and sort)."""
    rows_RN = stress_rows(num_entries, dtype)
    rows_RN = torch.cat([rows_RN, torch.randn(3 * 8 + 5, num_entries, dtype=dtype)])
    expected_RN = _nan_as_neg_inf(rows_RN)
    for num in sorted({min(num, num_entries) for num in (1, 2, 9, 16, 17, 32, 33, 100)}):
        got_RN = threshold_cpp.top_values(rows_RN, num)
        assert torch.equal(got_RN, expected_RN.topk(num, dim=-1).values), num


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_entries", [1, 2, 7, 64, 1000])
def test_rank_pair_matches_a_full_sort(num_entries, dtype):
    """The balanced gate's column quantiles: the sorted row's entries at rank and rank + 1
    (the last one repeated past the end), ranks clamped to the row, NaN counted as -inf."""
    rows_RN = stress_rows(num_entries, dtype)
    num_rows = rows_RN.shape[0]
    sorted_RN = _nan_as_neg_inf(rows_RN).sort(dim=-1, descending=True).values
    gen = torch.Generator().manual_seed(3)
    rank_R = torch.randint(-2, num_entries + 2, (num_rows,), generator=gen)
    rank_R[0], rank_R[1] = 0, num_entries - 1
    pair_R2 = threshold_cpp.rank_pair(rows_RN, rank_R)
    at_R1 = rank_R.clamp(0, num_entries - 1).unsqueeze(-1)
    assert torch.equal(pair_R2[:, 0], sorted_RN.gather(-1, at_R1).squeeze(-1))
    next_R1 = (at_R1 + 1).clamp(max=num_entries - 1)
    assert torch.equal(pair_R2[:, 1], sorted_RN.gather(-1, next_R1).squeeze(-1))
    # a transposed (non-contiguous) view is copied, not misread
    cols_NR = rows_RN.t()
    assert torch.equal(threshold_cpp.rank_pair(cols_NR.t(), rank_R), pair_R2)


def _margin_quantiles_reference(z_TE, mu_E, lam_T, k, rank_E):
    """The PyTorch path of one load-balancing alternation (gates._dispatch_margin, then a full
    sort of every expert's column)."""
    from moe_router.config import RouterConfig
    from moe_router.gates import _dispatch_margin

    num_tokens, num_experts = z_TE.shape
    gate, method = ("sparse_soft_topk", "sparse") if lam_T is not None else ("topk", "sigmoid")
    config = RouterConfig(d_model=4, num_experts=num_experts, k=k, gate=gate, method=method)
    margin_TE = _dispatch_margin(z_TE - mu_E, lam_T, config, None)
    load_E = (margin_TE > 0).sum(0).to(z_TE.dtype)
    if rank_E is None:
        rank_E = (load_E.mean().ceil().long() - 1).expand(num_experts)
    sorted_ET = margin_TE.t().sort(dim=-1, descending=True).values
    at_E1 = rank_E.clamp(0, num_tokens - 1).unsqueeze(-1)
    next_E1 = (at_E1 + 1).clamp(max=num_tokens - 1)
    inside_E, outside_E = sorted_ET.gather(-1, at_E1), sorted_ET.gather(-1, next_E1)
    return torch.cat([inside_E, outside_E, load_E.unsqueeze(-1)], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "k"), [(1, 2, 1), (203, 8, 2), (1000, 64, 8), (77, 40, 17)]
)
@pytest.mark.parametrize("support_exact", [False, True])
def test_margin_quantiles_match_the_pytorch_path(num_tokens, num_experts, k, support_exact, dtype):
    """One alternation of the balanced gate's load target in one call: margins, loads and
    each expert's margins at rank and rank + 1, exactly as the PyTorch path and a full sort.
    Ranks at both ends of the column, right around the load (the short buffers on both sides
    of it) and far from it (the selection); padding rows, -inf experts, a NaN logit; partial
    blocks of 8 tokens and K on both sides of the SIMD limit; the shared rank of support-exact
    gates (rank None)."""
    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    z_TE = (
        torch.randn(num_tokens, num_experts, generator=gen) + torch.linspace(2, -2, num_experts)
    ).to(dtype)
    z_TE[: num_tokens // 10] = -math.inf  # padding
    z_TE[num_tokens // 3 :: 7, 1] = -math.inf  # masked expert
    z_TE[num_tokens // 2, 0] = math.nan
    mu_E = (0.3 * torch.randn(num_experts, generator=gen)).to(dtype)
    lam_T = torch.randn(num_tokens, generator=gen).to(dtype) if support_exact else None
    margin_load_E = _margin_quantiles_reference(z_TE, mu_E, lam_T, k, None)[:, 2].long()
    offsets_E = torch.randint(-40, 40, (num_experts,), generator=gen)
    offsets_E[:4] = torch.tensor([-1, 0, 1, 2])[:num_experts]
    for rank_E in (
        margin_load_E + offsets_E,  # around the load: the short buffers, both sides
        torch.randint(-2, num_tokens + 2, (num_experts,), generator=gen),  # anywhere
        torch.tensor([0, num_tokens - 1] * num_experts)[:num_experts],  # the ends
        None,
    ):
        expected_E3 = _margin_quantiles_reference(z_TE, mu_E, lam_T, k, rank_E)
        got_E3 = threshold_cpp.margin_quantiles(z_TE, mu_E, lam_T, k, rank_E)
        assert torch.equal(got_E3, expected_E3), rank_E
