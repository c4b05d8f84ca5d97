"""The seed documents' other soft top-k constructions, kept as reference methods.

Both are plain PyTorch with plain autograd (no custom backward) and take an integer k. They are
slower than the threshold family and exist to compare against (seed 002).

Shape legend: R rows, N entries per row, M = max k + 1 orders of the symmetric polynomials.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REFERENCE_METHODS = ("iterative", "grad")

# A finite stand-in for log(0): -inf would make the log-sum-exp gradient 0/0 = NaN where both
# terms are empty; exp(_LOG_ZERO - anything finite) is exactly 0 in fp32 and fp64 alike.
_LOG_ZERO = -1e30


def _integer_k(k_R: Tensor, num_entries: int, max_k: int | None) -> tuple[Tensor, int]:
    """Per-row integer k (long) and the number of orders to carry (static, no host sync)."""
    k_long_R = k_R.detach().round().long()
    num_orders = (num_entries - 1) if max_k is None else max_k
    return k_long_R, num_orders


def iterative_soft_topk(z_RN: Tensor, k_R: Tensor, max_k: int | None) -> Tensor:
    """Softmax applied k times, each time on (1 - p) * (z - min z) (seed 002, "iterative").

    Sums to k exactly; satisfies the tau -> 0 limit. Rows take min(k, number of steps) steps, so
    per-row k costs N - 1 steps for every row (no host sync to find the max).
    """
    k_long_R, num_steps = _integer_k(k_R, z_RN.shape[-1], max_k)
    finite_RN = torch.isfinite(z_RN)
    row_min_R1 = torch.where(finite_RN, z_RN, math.inf).amin(-1, keepdim=True)
    x_RN = torch.where(finite_RN, z_RN - row_min_R1, torch.zeros_like(z_RN))  # >= 0
    p_RN = torch.zeros_like(z_RN)
    for step in range(num_steps):
        y_RN = ((1 - p_RN) * x_RN).masked_fill(~finite_RN, -math.inf)
        take_R1 = (k_long_R > step).unsqueeze(-1)
        p_RN = p_RN + torch.where(take_R1, torch.softmax(y_RN, dim=-1), torch.zeros_like(p_RN))
    return p_RN


def _log_elementary_prefixes(z_RN: Tensor, num_orders: int) -> Tensor:
    """log e_m(z_1..z_j) for j = 0..N and m = 0..num_orders, shape [R, N+1, M]."""
    num_rows, num_entries = z_RN.shape
    log_e_RM = z_RN.new_full((num_rows, num_orders + 1), _LOG_ZERO)
    log_e_RM[:, 0] = 0.0
    prefixes = [log_e_RM]
    for j in range(num_entries):
        # e_m(z_1..z_j) = e_m(z_1..z_{j-1}) + e^{z_j} e_{m-1}(z_1..z_{j-1})
        shifted_RM = torch.cat(
            [log_e_RM.new_full((num_rows, 1), _LOG_ZERO), log_e_RM[:, :-1] + z_RN[:, j : j + 1]],
            dim=-1,
        )
        # logsumexp of the pair, not logaddexp: the latter's double backward is inf/inf at the
        # log-zero stand-in
        log_e_RM = torch.logsumexp(torch.stack([log_e_RM, shifted_RM]), dim=0)
        prefixes.append(log_e_RM)
    return torch.stack(prefixes, dim=1)


def grad_soft_topk(z_RN: Tensor, k_R: Tensor, max_k: int | None) -> Tensor:
    """The gradient of log sum over all k-subsets of exp(sum of the subset) (seed 002, GradTopK).

    p_i = e^{z_i} e_{k-1}(z without i) / e_k(z), with the elementary symmetric polynomials e_m
    of e^z carried in log space by a prefix and a suffix recursion, so no 1 - p cancellation
    (the seed's recursion breaks for large spreads) and no O(C(n, k)) sum.
    """
    k_long_R, num_orders = _integer_k(k_R, z_RN.shape[-1], max_k)
    z_RN = torch.where(torch.isfinite(z_RN), z_RN, torch.full_like(z_RN, _LOG_ZERO))
    # Center each row: e_m scales by e^{m c}, which cancels in p; keeps the sums O(k * spread)
    z_RN = z_RN - z_RN.amax(-1, keepdim=True).detach()
    prefix_RJM = _log_elementary_prefixes(z_RN, num_orders)  # over z_1..z_j
    suffix_RJM = _log_elementary_prefixes(z_RN.flip(-1), num_orders).flip(1)  # over z_{j+1}..z_N
    # e_{k-1}(z without i) = sum_a e_a(z_<i) e_{k-1-a}(z_>i)
    before_RNM = prefix_RJM[:, :-1]  # j = i: entries before i
    after_RNM = suffix_RJM[:, 1:]  # entries after i
    orders_M = torch.arange(num_orders + 1, device=z_RN.device)
    partner_RM = (k_long_R.unsqueeze(-1) - 1 - orders_M).clamp_min(0)
    partner_RNM = partner_RM.unsqueeze(1).expand_as(before_RNM)
    pair_RNM = before_RNM + after_RNM.gather(-1, partner_RNM)
    pair_RNM = pair_RNM.masked_fill((orders_M > k_long_R.unsqueeze(-1) - 1).unsqueeze(1), _LOG_ZERO)
    log_without_RN = torch.logsumexp(pair_RNM, dim=-1)
    log_total_R = prefix_RJM[:, -1].gather(-1, k_long_R.clamp(0, num_orders).unsqueeze(-1))
    return torch.exp(z_RN + log_without_RN - log_total_R)
