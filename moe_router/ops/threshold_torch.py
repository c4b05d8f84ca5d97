"""Threshold-adjusted soft top-k: the batched PyTorch solver and the one-pass backward.

This is the readable reference path and the CPU path; the Triton kernels are checked against it.

Shape legend: R rows (every leading dim flattened), N entries per row, K candidate count.

The operator (DESIGN.md, seed 002 "ThreTopK"): for z = x / tau find the threshold lambda with

    sum_i f(z_i - lambda) = k,        p_i = f(z_i - lambda),

for a monotone f: R -> [0, 1]. Each method solves it with a partial sort (torch.topk) of only
the candidates that can hold, then closed forms:

- exp, f = min(1, e^u), and sparse, f = min(1, relu(u)), are the pointwise minimum of an
  "above" branch f_A and a "below" branch f_B. So for *any* set A of entries, the surrogate
  G_A(lambda) = sum_{i in A} f_A(z_i - lambda) + sum_{i not in A} f_B(z_i - lambda) is
  >= F(lambda), and its root is an upper bound on the threshold, equal to it when A is the set
  of entries above. That set is a "top-m" set, so lambda* = min over m of the segment roots: no
  consistency test that rounding could break. exp needs m < k (top ceil(k) values); sparse's
  support has no bound in k, so it sorts whole rows.
- laplace is not such a minimum (e^u/2 >= 1 - e^-u/2 everywhere); its segment is found from F
  at the breakpoints, which increases with m, and m < 2k since f >= 1/2 above the threshold
  (top ceil(2k) values).
- sigmoid has no closed form; laplace brackets it within +-log 2 (sigma(u) lies between
  laplace(u - log 2) and laplace(u + log 2)), and safeguarded Newton steps in w = e^-lambda
  (where sum_i sigma(z_i - lambda) is concave and increasing, so Newton from the upper end
  never overshoots) converge in a handful of iterations.

All four then take one exact step in the threshold's own frame (solve_threshold).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

THRESHOLD_METHODS = ("sigmoid", "laplace", "exp", "sparse")

# Newton iterations for `sigmoid` after the laplace bracket (|sum p - k| < 1e-7 k in float64
# on the stress suite after 5; one spare).
SIGMOID_NEWTON_STEPS = 6
_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# helpers

# (lam_R, above_RN, linear_RN): the threshold and the segment it lies on, by rank: the entries
# on the "above" branch (capped ones for sparse) and, for sparse, the linear ones.
_Solution = tuple[Tensor, "Tensor | None", "Tensor | None"]


def _top_values(z_RN: Tensor, num: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `num` largest values per row in descending order, log-sum-exp of the others, ranks.

    Returns:
        s_RK: the K = min(num, N) largest values of each row, descending.
        log_rest_R: log sum_{i not among them} e^{z_i}; -inf when K = N.
        rank_RN: each entry's rank (0 = largest) among the top K, K for the others.
    """
    num_entries = z_RN.shape[-1]
    if num >= num_entries:
        s_RK, idx_RK = torch.sort(z_RN, dim=-1, descending=True)
        log_rest_R = z_RN.new_full(z_RN.shape[:-1], -math.inf)
    else:
        s_RK, idx_RK = torch.topk(z_RN, num, dim=-1)
    num_top = s_RK.shape[-1]
    rank_K = torch.arange(num_top, device=z_RN.device)
    rank_RN = torch.full_like(z_RN, num_top, dtype=torch.long).scatter_(
        -1, idx_RK, rank_K.expand_as(idx_RK)
    )
    if num < num_entries:
        # exclude the selected positions by index, not by value: ties with the K-th value stay in
        log_rest_R = torch.logsumexp(z_RN.masked_fill(rank_RN < num_top, -math.inf), dim=-1)
    return s_RK, log_rest_R, rank_RN


def _log_tails(s_RK: Tensor, log_rest_R: Tensor) -> Tensor:
    """log sum_{i > m} e^{s_i} for m = 0..K (the last one is the rest alone), shape [R, K+1]."""
    vals_RK1 = torch.cat([s_RK, log_rest_R.unsqueeze(-1)], dim=-1)
    return torch.logcumsumexp(vals_RK1.flip(-1), dim=-1).flip(-1)


def _finite_prefix(s_RK: Tensor) -> Tensor:
    """[R, K+1] bool: candidate m (the top-m entries are 'above') uses only finite entries."""
    ok_RK = torch.isfinite(s_RK)
    return torch.cat([torch.ones_like(ok_RK[..., :1]), ok_RK], dim=-1)


# --------------------------------------------------------------------------------------------
# closed forms


def _solve_exp(z_RN: Tensor, k_R: Tensor, max_k: float | None) -> _Solution:
    """f(u) = min(1, e^u). Candidate m (entries above) solves m + e^-lam * tail_m = k."""
    num_entries = z_RN.shape[-1]
    num = num_entries if max_k is None else min(num_entries, math.ceil(max_k))
    s_RK, log_rest_R, rank_RN = _top_values(z_RN, num)
    log_tail_RK = _log_tails(s_RK, log_rest_R)[..., : s_RK.shape[-1]]  # m = 0..K-1
    m_K = torch.arange(s_RK.shape[-1], dtype=z_RN.dtype, device=z_RN.device)
    budget_RK = k_R.unsqueeze(-1) - m_K
    lam_RK = log_tail_RK - torch.log(budget_RK.clamp_min(torch.finfo(z_RN.dtype).tiny))
    valid_RK = (budget_RK > 0) & _finite_prefix(s_RK)[..., :-1] & ~torch.isnan(lam_RK)
    lam_R, above_R = lam_RK.masked_fill(~valid_RK, math.inf).min(dim=-1)
    return lam_R, rank_RN < above_R.unsqueeze(-1), None


def _log_c_plus_root(c_R: Tensor, log_prod_R: Tensor) -> Tensor:
    """log(c + sqrt(c^2 + e^L)) for c >= 0, without overflow or cancellation for any L.

    With h = L / 2 and d = L - 2 log c: h + asinh(c e^-h) when d >= 0 (c e^-h <= 1), else
    log c + log1p(sqrt(1 + e^d)). L = -inf gives log(2c); c = 0 gives L / 2.
    """
    half_log_R = 0.5 * log_prod_R
    log_c_R = torch.log(c_R)
    gap_R = log_prod_R - 2 * log_c_R
    wide_R = half_log_R + torch.asinh(torch.exp((log_c_R - half_log_R).clamp(max=0.0)))
    narrow_R = log_c_R + torch.log1p(torch.sqrt(1 + torch.exp(gap_R.clamp(max=0.0))))
    return torch.where(gap_R >= 0, wide_R, narrow_R)


def _solve_laplace(z_RN: Tensor, k_R: Tensor, max_k: float | None) -> _Solution:
    """f(u) = 1 - e^-u/2 above, e^u/2 below. With the top-m entries above, lam solves

    k - m = -(e^lam / 2) * S_A + (e^-lam / 2) * S_B,  S_A = sum_{i<=m} e^-s_i, S_B = sum_{i>m} e^s_i
    =>  e^-lam = (c + sqrt(c^2 + S_A S_B)) / S_B with c = k - m   (seed 002), evaluated in log
    space without overflow (_log_c_plus_root); m = 0 and S_B = 0 are its one-sided limits.

    Here f is not the minimum of its two branches (e^u/2 >= 1 - e^-u/2 everywhere), so the
    segment is found from F at the breakpoints instead: the entries above the threshold are those
    with F(s_m) < k, and F(s_m) = m - (S_A e^{s_m} - S_B e^{-s_m}) / 2 increases with m.
    """
    num_entries = z_RN.shape[-1]
    num = num_entries if max_k is None else min(num_entries, math.ceil(2 * max_k))
    s_RK, log_rest_R, rank_RN = _top_values(z_RN, num)
    log_b_RK1 = _log_tails(s_RK, log_rest_R)  # m = 0..K
    log_a_RK = torch.logcumsumexp(-s_RK, dim=-1)  # m = 1..K
    # F(s_m) for m = 1..K; both exponents are O(log N):
    # log sum_{i<=m} e^{s_m - s_i} and log sum_{i>m} e^{s_i - s_m}
    f_at_s_RK = (
        torch.arange(1, s_RK.shape[-1] + 1, dtype=z_RN.dtype, device=z_RN.device)
        - 0.5 * torch.exp(log_a_RK + s_RK)
        + 0.5 * torch.exp(log_b_RK1[..., 1:] - s_RK)
    )
    above_R = (f_at_s_RK < k_R.unsqueeze(-1)).sum(-1, keepdim=True)  # NaN (from -inf) never counts
    log_a_RK1 = torch.cat([torch.full_like(log_a_RK[..., :1], -math.inf), log_a_RK], dim=-1)
    log_a_R = log_a_RK1.gather(-1, above_R).squeeze(-1)
    log_b_R = log_b_RK1.gather(-1, above_R).squeeze(-1)
    budget_R = k_R - above_R.squeeze(-1).to(z_RN.dtype)
    # c = k - m >= 0: lam = log S_B - G(c);  c < 0: lam = G(|c|) - log S_A  (rationalised form)
    root_R = _log_c_plus_root(budget_R.abs(), log_a_R + log_b_R)
    lam_R = torch.where(budget_R >= 0, log_b_R - root_R, root_R - log_a_R)
    return lam_R, rank_RN < above_R, None


def _solve_sparse(z_RN: Tensor, k_R: Tensor, max_k: float | None) -> _Solution:
    """f(u) = clip(u, 0, 1) = min(1, relu(u)): projection onto the capped simplex.

    For a capped count a, G_a(lam) = a + sum_{i>a} relu(s_i - lam) = k is a simplex-projection
    threshold, max over support sizes j of (sum_{i=a+1}^{a+j} s_i - (k - a)) / j (each linear
    piece under-estimates the relu sum). The answer is the min over a < k. Needs the full sort:
    the support has no bound in k.
    """
    num_entries = z_RN.shape[-1]
    s_RN, _, rank_RN = _top_values(z_RN, num_entries)
    num_capped = num_entries if max_k is None else min(num_entries, math.ceil(max_k))
    zeros_R1 = s_RN.new_zeros(s_RN.shape[:-1] + (1,))
    # -inf entries never enter a support. Stand in (min finite - 2): the threshold of a feasible
    # row is > min - 1 (there F(min - 1) = #finite > k), so such entries stay outside every
    # support the max picks, and the prefix sums stay finite.
    finite_RN = torch.isfinite(s_RN)
    row_min_R1 = torch.where(finite_RN, s_RN, math.inf).amin(-1, keepdim=True)
    row_min_R1 = torch.where(torch.isfinite(row_min_R1), row_min_R1, 0.0)
    s_fin_RN = torch.where(finite_RN, s_RN, row_min_R1 - 2)
    prefix_RN1 = torch.cat([zeros_R1, torch.cumsum(s_fin_RN, dim=-1)], dim=-1)
    a_A = torch.arange(num_capped, device=z_RN.device)
    idx_N1 = torch.arange(num_entries + 1, device=z_RN.device)
    support_AN1 = (idx_N1.unsqueeze(0) - a_A.unsqueeze(1)).to(z_RN.dtype)  # j = idx - a
    budget_RA = k_R.unsqueeze(-1) - a_A.to(z_RN.dtype)
    numer_RAN1 = (
        prefix_RN1.unsqueeze(-2) - prefix_RN1[..., :num_capped].unsqueeze(-1)
    ) - budget_RA.unsqueeze(-1)
    lam_RAN1 = numer_RAN1 / support_AN1.clamp_min(1)
    lam_RAN1 = lam_RAN1.masked_fill(support_AN1 < 1, -math.inf)
    lam_RA, end_RA = lam_RAN1.max(dim=-1)  # end = a + j: the support is ranks [0, end)
    capped_finite_RA = _finite_prefix(s_RN)[..., :num_capped]
    valid_RA = (budget_RA > 0) & capped_finite_RA
    lam_R, capped_R = lam_RA.masked_fill(~valid_RA, math.inf).min(dim=-1)
    end_R = end_RA.gather(-1, capped_R.unsqueeze(-1))
    capped_RN = rank_RN < capped_R.unsqueeze(-1)
    return lam_R, capped_RN, (rank_RN < end_R) & ~capped_RN


def _solve_sigmoid(z_RN: Tensor, k_R: Tensor, max_k: float | None) -> _Solution:
    """Safeguarded Newton in w = e^-lam in the bracket lam_L -+ log 2 (lam_L: laplace)."""
    lam_laplace_R, _, _ = _solve_laplace(z_RN, k_R, max_k)
    lo_R, hi_R = lam_laplace_R - _LOG2, lam_laplace_R + _LOG2
    lam_R = hi_R  # the upper end: F(lam) <= k, where Newton in w is monotone
    for _ in range(SIGMOID_NEWTON_STEPS):
        p_RN = torch.sigmoid(z_RN - lam_R.unsqueeze(-1))
        total_R = p_RN.sum(-1)
        slope_R = (p_RN * (1 - p_RN)).sum(-1)
        too_low_R = total_R > k_R
        lo_R = torch.where(too_low_R, lam_R, lo_R)
        hi_R = torch.where(too_low_R, hi_R, lam_R)
        ratio_R = (k_R - total_R) / slope_R
        newton_R = lam_R - torch.log1p(ratio_R.clamp_min(-0.5))
        inside_R = torch.isfinite(newton_R) & (newton_R >= lo_R) & (newton_R <= hi_R)
        next_R = torch.where(inside_R, newton_R, 0.5 * (lo_R + hi_R))
        lam_R = torch.where(total_R == k_R, lam_R, next_R)  # exact hit (flat, slope 0): stay
    return lam_R, None, None


_SOLVERS = {
    "sigmoid": _solve_sigmoid,
    "laplace": _solve_laplace,
    "exp": _solve_exp,
    "sparse": _solve_sparse,
}


def apply_f(u: Tensor, method: str) -> Tensor:
    """The monotone squashing function f of `method`, elementwise."""
    if method == "sigmoid":
        return torch.sigmoid(u)
    if method == "laplace":
        e = torch.exp(-u.abs())
        return torch.where(u >= 0, 1 - 0.5 * e, 0.5 * e)
    if method == "exp":
        return torch.exp(u.clamp(max=0.0))
    if method == "sparse":
        return u.clamp(0.0, 1.0)
    raise ValueError(f"method={method!r} is not a threshold method; use one of {THRESHOLD_METHODS}")


def _solve_offset(
    u_RN: Tensor, k_R: Tensor, method: str, above_RN: Tensor | None, linear_RN: Tensor | None
) -> Tensor:
    """Given u = z - lam0 for a close lam0, the offset d with sum_i f(u_i - d) = k.

    Exact for the piecewise methods, given the segment by rank from the solver (the sign of u
    is not enough: the entry at the kink may round to the wrong side, and then m = k). One
    Newton step for sigmoid. Every sum runs over e^{-|u|} ~<= 1: no overflow.
    """
    tiny = torch.finfo(u_RN.dtype).tiny
    zero_RN = torch.zeros_like(u_RN)
    if method == "sigmoid":
        # one Newton step (the solver's iterate is converged; this repairs lam0's rounding).
        # sum p = #(u >= 0) - sum_{u >= 0} sigma(-u) + sum_{u < 0} sigma(u): each term <= 1/2,
        # so a k in the hundreds keeps its last bits in fp32 (sum_i p_i would not).
        q_RN = torch.sigmoid(-u_RN.abs())
        positive_RN = u_RN >= 0
        total_R = positive_RN.sum(-1).to(u_RN.dtype) + torch.where(positive_RN, -q_RN, q_RN).sum(-1)
        slope_R = (q_RN * (1 - q_RN)).sum(-1)
        offset_R = (total_R - k_R) / slope_R.clamp_min(tiny)
        bound_R = torch.full_like(offset_R, 1e-2)
        offset_R = torch.maximum(torch.minimum(offset_R, bound_R), -bound_R)
        return torch.where(slope_R > 0, offset_R, torch.zeros_like(offset_R))
    if method == "sparse":
        capped_RN = above_RN
        num_linear_R = linear_RN.sum(-1).to(u_RN.dtype)
        budget_R = k_R - capped_RN.sum(-1).to(u_RN.dtype)
        offset_R = (
            torch.where(linear_RN, u_RN, zero_RN).sum(-1) - budget_R
        ) / num_linear_R.clamp_min(1)
        offset_R = torch.where(num_linear_R > 0, offset_R, torch.zeros_like(offset_R))
        return offset_R
    num_above_R = above_RN.sum(-1).to(u_RN.dtype)
    sum_below_R = torch.where(above_RN, zero_RN, torch.exp(u_RN)).sum(-1)
    if method == "exp":
        budget_R = (k_R - num_above_R).clamp_min(tiny)
        offset_R = torch.log(sum_below_R.clamp_min(tiny)) - torch.log(budget_R)
        return torch.where(sum_below_R > 0, offset_R, torch.zeros_like(offset_R))
    if method == "laplace":
        sum_above_R = torch.where(above_RN, torch.exp(-u_RN), zero_RN).sum(-1)
        budget_R = k_R - num_above_R
        # k - m = -(e^d / 2) S_A + (e^-d / 2) S_B  =>  e^-d = (c + sqrt(c^2 + S_A S_B)) / S_B
        root_R = torch.sqrt(budget_R.square() + sum_above_R * sum_below_R)
        # the two algebraically equal forms, each free of cancellation on its side of c = 0
        offset_pos_R = torch.log(sum_below_R.clamp_min(tiny)) - torch.log(
            (budget_R + root_R).clamp_min(tiny)
        )
        offset_neg_R = torch.log((root_R - budget_R).clamp_min(tiny)) - torch.log(
            sum_above_R.clamp_min(tiny)
        )
        offset_R = torch.where(budget_R >= 0, offset_pos_R, offset_neg_R)
        ok_R = torch.where(budget_R >= 0, sum_below_R > 0, sum_above_R > 0)
        return torch.where(ok_R, offset_R, torch.zeros_like(offset_R))
    raise ValueError(f"method={method!r} is not a threshold method; use one of {THRESHOLD_METHODS}")


def solve_threshold(
    z_RN: Tensor, k_R: Tensor, method: str, max_k: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve sum_i f(z_i - lam) = k per row; return (p_RN, lam_R).

    Args:
        z_RN: Scores already divided by tau, float32 or float64. -inf entries get p = 0.
        k_R: Per-row budget, same dtype.
        method: One of THRESHOLD_METHODS.
        max_k: An upper bound on k_R known on the host (a Python number). It sizes the partial
            sort; None sorts whole rows (tensor k, where reading the max would be a host sync).

    Returns:
        p_RN in [0, 1] with sum k per row, and the threshold lam_R (z units). Rows with at most
        k finite entries get p = 1 on their finite entries (sum < k; the constraint cannot be
        met); rows with k <= 0 get p = 0; a row holding a NaN (or +inf) is NaN throughout.
    """
    # Solve in the frame of the row max (shift invariance keeps the candidate sums O(1)), then
    # take one exact final step in the frame of the threshold itself: u = z - anchor is exact
    # (Sterbenz) for the entries near the threshold, which carry the mass, while both z - max
    # and lam are only good to the ulp of the score range (1e-4 to 1e-3 errors in p at scales
    # 1e2-1e4 otherwise). The segment, by rank, comes from the solver.
    # amax propagates NaN and +inf, so the bad rows are read off [R] values, not [R, N] masks
    row_max_R = z_RN.amax(-1)
    bad_row_R = torch.isnan(row_max_R) | torch.isposinf(row_max_R)
    row_max_R = torch.where(torch.isfinite(row_max_R), row_max_R, 0.0)
    lam_R, above_RN, linear_RN = _SOLVERS[method](z_RN - row_max_R.unsqueeze(-1), k_R, max_k)
    anchor_R = row_max_R + lam_R
    u_RN = z_RN - anchor_R.unsqueeze(-1)
    offset_R = _solve_offset(u_RN, k_R, method, above_RN, linear_RN)
    p_RN = apply_f(u_RN - offset_R.unsqueeze(-1), method)
    lam_R = anchor_R + offset_R
    finite_RN = z_RN > -math.inf  # NaN / +inf rows are overwritten below
    saturated_R = finite_RN.sum(-1).to(z_RN.dtype) <= k_R
    p_RN = torch.where(saturated_R.unsqueeze(-1), finite_RN.to(z_RN.dtype), p_RN)
    p_RN = torch.where((k_R <= 0).unsqueeze(-1), torch.zeros_like(p_RN), p_RN)
    lam_R = torch.where(saturated_R, -math.inf, lam_R)
    lam_R = torch.where(k_R <= 0, math.inf, lam_R)
    p_RN = torch.where(bad_row_R.unsqueeze(-1), math.nan, p_RN)
    lam_R = torch.where(bad_row_R | torch.isnan(k_R), math.nan, lam_R)
    return p_RN, lam_R


# --------------------------------------------------------------------------------------------
# backward


def f_prime_from_p(p: Tensor, method: str) -> Tensor:
    """f'(u) written through p = f(u), so the backward needs only the saved output."""
    if method == "sigmoid":
        return p * (1 - p)
    if method == "laplace":
        return torch.minimum(p, 1 - p)
    if method == "exp":
        return torch.where(p < 1, p, torch.zeros_like(p))
    if method == "sparse":
        return ((p > 0) & (p < 1)).to(p.dtype)
    raise ValueError(f"method={method!r} is not a threshold method; use one of {THRESHOLD_METHODS}")


def f_inverse(p: Tensor, method: str, support: Tensor) -> Tensor:
    """u = f^{-1}(p) where `support` (f'(u) > 0) holds, 0 elsewhere; finite and NaN-free."""
    safe_p = torch.where(support, p, torch.full_like(p, 0.5))
    if method == "sigmoid":
        u = torch.log(safe_p) - torch.log1p(-safe_p)
    elif method == "laplace":
        u = torch.where(safe_p < 0.5, torch.log(2 * safe_p), -torch.log(2 * (1 - safe_p)))
    elif method == "exp":
        u = torch.log(safe_p)
    elif method == "sparse":
        u = safe_p
    else:
        raise ValueError(f"method={method!r} is not a threshold method")
    return torch.where(support, u, torch.zeros_like(u))


def threshold_backward(
    p_RN: Tensor,
    grad_RN: Tensor,
    tau_R: Tensor,
    method: str,
    need_k_grad: bool = True,
    need_tau_grad: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Vector-Jacobian product of the operator (implicit function theorem), in one pass.

    With v = f'(u) / tau:  dL/dx = v*g - v * (sum v*g) / (sum v);  dL/dk = (sum v*g) / (sum v);
    dL/dtau = -sum_i z_i * dL/dx_i (z = x/tau, dz/dtau = -z/tau and dL/dz = tau * dL/dx), where
    z may be replaced by u = z - lam = f^{-1}(p) because dL/dx sums to zero. sum v = 0 gives
    zero gradients. Written with differentiable torch ops on the saved output, so double
    backward works.

    Returns:
        (grad_scores_RN, grad_k_R or None, grad_tau_R or None).
    """
    grad_RN = grad_RN.to(p_RN.dtype)
    w_RN = f_prime_from_p(p_RN, method)
    # NaN rows: keep NaN in the gradient of that row only (p is NaN there)
    v_RN = w_RN / tau_R.unsqueeze(-1)
    sum_v_R = v_RN.sum(-1)
    sum_vg_R = (v_RN * grad_RN).sum(-1)
    mean_g_R = sum_vg_R / torch.where(sum_v_R > 0, sum_v_R, torch.ones_like(sum_v_R))
    grad_x_RN = v_RN * (grad_RN - mean_g_R.unsqueeze(-1))
    grad_k_R = mean_g_R if need_k_grad else None
    grad_tau_R = None
    if need_tau_grad:
        u_RN = f_inverse(p_RN, method, w_RN > 0)
        grad_tau_R = -(u_RN * grad_x_RN).sum(-1)
    return grad_x_RN, grad_k_R, grad_tau_R
