"""Two other soft top-k constructions, kept as reference methods ("iterative", "grad").

Both are plain PyTorch with plain autograd (no custom backward) and take an integer k. They are
slower than the threshold family and exist to compare against.

Shape legend: R rows, N entries per row, M = max k + 1 orders of the symmetric polynomials.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REFERENCE_METHODS = ("iterative", "grad")


def _integer_k(k_R: Tensor, num_entries: int, max_k: int | None) -> tuple[Tensor, int]:
    """Per-row integer k (long) and the number of orders to carry (static, no host sync)."""
    k_long_R = k_R.detach().round().long()
    num_orders = (num_entries - 1) if max_k is None else max_k
    return k_long_R, num_orders


# grad's log-space sums lose about 4e-15 of the row's spread in float64 (measured: sum p - k
# of 4e-9 at a spread of 1e6 tau, 4e-7 at 1e8, 4e-3 at 1e12): beyond this spread the method
# cannot hold its own budget to 1e-6, and soft_topk refuses it (on CPU, where checking costs
# no device sync).
GRAD_MAX_SPREAD = 1e8


def reference_soft_topk(
    x_RN: Tensor, k_R: Tensor, tau_R: Tensor, method: str, max_k: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """A reference method under the threshold family's contract for special rows.

    A row holding a NaN or +inf, or with a NaN k, is NaN; a row with k <= 0 is 0; a row with
    at most k finite scores gets 1 on its finite scores (the nearest the budget allows);
    -inf scores get 0. The other rows run the method in float64 (these are references: their
    sums must hold k, which float32 log-space sums do not) on z = (x - max x) / tau, invariant
    to the shift and clamped to the finite range.

    Args:
        x_RN: Scores, float32 or float64.
        k_R: Per-row budget, rounded to an integer here.
        tau_R: Per-row temperature > 0.
        method: "iterative" or "grad".
        max_k: The integer k when it is a number (sizes the loops), else None.

    Returns:
        (p_RN, short_R, spread_R): p in the dtype of x; the rows with at most k finite scores
        (for the caller's error on a number k); the spread (max - min) / tau of the finite
        scores of each row the method solved (0 on the others; see GRAD_MAX_SPREAD).
    """
    k_R = k_R.round()
    if x_RN.shape[-1] == 0:  # nothing to select: every row is saturated (or has k <= 0)
        return x_RN.clone(), k_R > 0, torch.zeros_like(k_R)
    dtype = x_RN.dtype
    x_RN, k_R, tau_R = x_RN.double(), k_R.double(), tau_R.double()
    row_max_R1 = x_RN.amax(-1, keepdim=True)
    bad_row_R1 = torch.isnan(row_max_R1) | torch.isposinf(row_max_R1) | torch.isnan(k_R)[:, None]
    finite_RN = x_RN > -math.inf
    short_R = finite_RN.sum(-1).to(k_R.dtype) <= k_R
    nonpositive_R = k_R <= 0
    solvable_R = ~(bad_row_R1.squeeze(-1) | short_R | nonpositive_R)
    # the special rows solve a harmless stand-in (no host sync to skip them); zeros for a bad
    # row keep NaN out of its gradient
    x_RN = torch.where(bad_row_R1, torch.zeros_like(x_RN), x_RN)
    row_max_R1 = torch.where(bad_row_R1 | torch.isneginf(row_max_R1), 0.0, row_max_R1)
    big = torch.finfo(x_RN.dtype).max
    z_RN = ((x_RN - row_max_R1.detach()) / tau_R.unsqueeze(-1)).clamp(min=-big)
    z_RN = torch.where(finite_RN, z_RN, -math.inf)
    spread_R = -torch.where(finite_RN, z_RN, 0.0).detach().amin(-1)
    k_solve_R = torch.where(solvable_R, k_R, torch.ones_like(k_R))
    reference = iterative_soft_topk if method == "iterative" else grad_soft_topk
    p_RN = reference(z_RN, k_solve_R, max_k)
    p_RN = torch.where(short_R.unsqueeze(-1), finite_RN.to(p_RN.dtype), p_RN)
    p_RN = torch.where(nonpositive_R.unsqueeze(-1), torch.zeros_like(p_RN), p_RN)
    p_RN = torch.where(bad_row_R1, math.nan, p_RN)
    if x_RN.requires_grad and not p_RN.requires_grad:
        # no step ran (N = 1 or no rows): p is constant, so its gradient is zero, not missing
        p_RN = torch.where(torch.ones_like(p_RN, dtype=torch.bool), p_RN, x_RN)
    short_R = short_R & ~bad_row_R1.squeeze(-1) & ~nonpositive_R
    return p_RN.to(dtype), short_R, torch.where(solvable_R, spread_R, 0.0)


def iterative_soft_topk(z_RN: Tensor, k_R: Tensor, max_k: int | None) -> Tensor:
    """Softmax applied k times, each time on (1 - p) * (z - min z) (the "iterative" construction).

    Sums to k exactly; satisfies the tau -> 0 limit. Rows take min(k, number of steps) steps, so
    per-row k costs N - 1 steps for every row (no host sync to find the max).
    """
    k_long_R, num_steps = _integer_k(k_R, z_RN.shape[-1], max_k)
    finite_RN = torch.isfinite(z_RN)
    row_min_R1 = torch.where(finite_RN, z_RN, math.inf).amin(-1, keepdim=True)
    # >= 0, and finite (a difference that overflows is clamped: p = 0 there either way)
    big = torch.finfo(z_RN.dtype).max
    x_RN = torch.where(finite_RN, (z_RN - row_min_R1).clamp(max=big), torch.zeros_like(z_RN))
    p_RN = torch.zeros_like(z_RN)
    for step in range(num_steps):
        y_RN = ((1 - p_RN) * x_RN).masked_fill(~finite_RN, -math.inf)
        take_R1 = (k_long_R > step).unsqueeze(-1)
        p_RN = p_RN + torch.where(take_R1, torch.softmax(y_RN, dim=-1), torch.zeros_like(p_RN))
    return p_RN


def _log_zero(dtype: torch.dtype) -> float:
    """A finite stand-in for log(0): -inf would make the log-sum-exp gradient 0/0 = NaN where
    both terms are empty. Half the dtype's range: below every sum of up to N clamped scores
    (grad_soft_topk), and two of them still add up without overflow."""
    return -torch.finfo(dtype).max / 2


def _log_elementary_prefixes(z_RN: Tensor, num_orders: int) -> Tensor:
    """log e_m(z_1..z_j) for j = 0..N and m = 0..num_orders, shape [R, N+1, M]."""
    num_rows, num_entries = z_RN.shape
    log_zero = _log_zero(z_RN.dtype)
    log_e_RM = z_RN.new_full((num_rows, num_orders + 1), log_zero)
    log_e_RM[:, 0] = 0.0
    prefixes = [log_e_RM]
    for j in range(num_entries):
        # e_m(z_1..z_j) = e_m(z_1..z_{j-1}) + e^{z_j} e_{m-1}(z_1..z_{j-1})
        shifted_RM = torch.cat(
            [log_e_RM.new_full((num_rows, 1), log_zero), log_e_RM[:, :-1] + z_RN[:, j : j + 1]],
            dim=-1,
        )
        # logsumexp of the pair, not logaddexp: the latter's double backward is inf/inf at the
        # log-zero stand-in
        log_e_RM = torch.logsumexp(torch.stack([log_e_RM, shifted_RM]), dim=0)
        prefixes.append(log_e_RM)
    return torch.stack(prefixes, dim=1)


def grad_soft_topk(z_RN: Tensor, k_R: Tensor, max_k: int | None) -> Tensor:
    """The gradient of log sum over all k-subsets of exp(sum of the subset) (GradTopK).

    p_i = e^{z_i} e_{k-1}(z without i) / e_k(z), with the elementary symmetric polynomials e_m
    of e^z carried in log space by a prefix and a suffix recursion, so no 1 - p cancellation
    (the plain recursion breaks for large spreads) and no O(C(n, k)) sum.
    """
    k_long_R, num_orders = _integer_k(k_R, z_RN.shape[-1], max_k)
    num_entries = z_RN.shape[-1]
    # Center each row: e_m scales by e^{m c}, which cancels in p; keeps the sums O(k * spread).
    # Sums of up to N scores must not overflow: the finite ones are clamped to a floor of
    # -max / (2 (N + 1)) (p = 0 there either way) and the masked ones sit far below it.
    finite_RN = torch.isfinite(z_RN)
    row_max_R1 = torch.where(finite_RN, z_RN, -math.inf).amax(-1, keepdim=True).detach()
    row_max_R1 = torch.where(torch.isfinite(row_max_R1), row_max_R1, 0.0)
    floor = torch.finfo(z_RN.dtype).max / (2 * (num_entries + 1))
    z_RN = torch.where(finite_RN, (z_RN - row_max_R1).clamp(min=-floor), _log_zero(z_RN.dtype))
    prefix_RJM = _log_elementary_prefixes(z_RN, num_orders)  # over z_1..z_j
    suffix_RJM = _log_elementary_prefixes(z_RN.flip(-1), num_orders).flip(1)  # over z_{j+1}..z_N
    # e_{k-1}(z without i) = sum_a e_a(z_<i) e_{k-1-a}(z_>i)
    before_RNM = prefix_RJM[:, :-1]  # j = i: entries before i
    after_RNM = suffix_RJM[:, 1:]  # entries after i
    orders_M = torch.arange(num_orders + 1, device=z_RN.device)
    partner_RM = (k_long_R.unsqueeze(-1) - 1 - orders_M).clamp_min(0)
    partner_RNM = partner_RM.unsqueeze(1).expand_as(before_RNM)
    pair_RNM = before_RNM + after_RNM.gather(-1, partner_RNM)
    pair_RNM = pair_RNM.masked_fill(
        (orders_M > k_long_R.unsqueeze(-1) - 1).unsqueeze(1), _log_zero(z_RN.dtype)
    )
    log_without_RN = torch.logsumexp(pair_RNM, dim=-1)
    log_total_R = prefix_RJM[:, -1].gather(-1, k_long_R.clamp(0, num_orders).unsqueeze(-1))
    return torch.exp(z_RN + log_without_RN - log_total_R)
