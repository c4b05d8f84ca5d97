"""The threshold methods in plain PyTorch: the readable reference path, and the backward.

The C++ kernels (threshold_cpp.py) and the Triton kernels (threshold_triton.py) are tested
against this path; it also runs where neither applies (backend="torch", CUDA float64 or rows
longer than the Triton kernels take, CPU without a compiler).

Shape legend: R rows (every leading dim flattened), N entries per row, K candidates (the K
largest scores of a row).

The operator: for scores x, a budget k and a temperature tau, find the threshold theta with

    sum_i f((x_i - theta) / tau) = k,        p_i = f((x_i - theta) / tau),

for a monotone f: R -> [0, 1] (apply_f). The solver is exact in the row's own frame at any
finite scale: theta is carried as a pivot P, one of the row's own scores, plus an offset d in
units of tau (theta = P + tau d), and every quantity is computed from the differences x_i - P,
which are exact for the scores near P (Sterbenz). So u_i = (x_i - P) / tau - d carries the
rounding of u_i only, not that of x_i, x_i / tau or of the row max: logits near 1e8 or 1e38,
or a tau of 1e-30, give the accuracy of logits near 1. A difference that overflows to +-inf
belongs to an entry whose p is 0 or 1 anyway.

1. The segment, by rank (no host sync). With the K largest scores s_0 >= s_1 >= ... of a row
   (torch.topk), the number m of entries above the threshold is the number of candidates j
   with F(s_j) < k, where F(s_j) = sum_i f((x_i - s_j) / tau) is evaluated in the frame of
   s_j itself. F(s_j) increases with j, so a bisection over j finds m in ceil(log2(K + 1))
   passes over the row. K: exp has m < k (f = 1 above the threshold): the top ceil(k);
   laplace has m < 2k (f >= 1/2 above): the top ceil(2k); sparse has no bound in k, and a
   tensor k has no host-side bound (reading its max would sync): whole rows.
2. The closed form on that segment, in the frame of a pivot next to the threshold, with sums
   in log space (no overflow, no underflow):
   - exp, f = min(1, e^u): P = s_m (the largest entry below), d = log sum_{x <= P}
     e^{(x - P) / tau} - log(k - m).
   - laplace, f = 1 - e^-u/2 (u >= 0), e^u/2 (u < 0): with S_A = sum_above e^-y and
     S_B = sum_below e^y (y = (x - P) / tau), k - m = -(e^d / 2) S_A + (e^-d / 2) S_B, so
     e^-d = (c + sqrt(c^2 + S_A S_B)) / S_B with c = k - m. P = s_m when c >= 0,
     s_{m-1} when c < 0: the side whose sum is >= 1, and the form free of cancellation.
   - sparse, f = clip(u, 0, 1): a second bisection finds the number a of capped entries (the
     j < m with F(s_j - tau) < k); then the entries of rank a..m-1 are on the linear piece and
     P = s_{m-1}, d = (sum_linear (x - P) / tau - (k - a)) / (m - a): the projection onto the
     capped simplex, in O(R N) memory.
   - sigmoid has no closed form. laplace brackets it within +-log 2 (sigma(u) lies between
     laplace(u - log 2) and laplace(u + log 2)), so it takes laplace's pivot and runs
     safeguarded Newton steps in w = e^-d there (sum_i sigma(y_i - d) is concave and
     increasing in w, so Newton from the upper end never overshoots), then one more Newton
     step for the rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

THRESHOLD_METHODS = ("sigmoid", "laplace", "exp", "sparse")
# The code of each method in the fused kernels (the C++ enum Method, the Triton METHOD): its
# position above.
METHOD_CODES = {name: code for code, name in enumerate(THRESHOLD_METHODS)}

# Newton iterations for `sigmoid` after the laplace bracket (|sum p - k| < 1e-7 k in float64
# on the stress suite after 5; one spare).
SIGMOID_NEWTON_STEPS = 6
_LOG2 = math.log(2.0)


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


# --------------------------------------------------------------------------------------------
# the segment, by rank


def _frame(x_RN: Tensor, pivot_R: Tensor, tau_R: Tensor) -> Tensor:
    """y = (x - P) / tau: the row in the frame of its pivot, in units of tau."""
    return (x_RN - pivot_R.unsqueeze(-1)) / tau_R.unsqueeze(-1)


def _at_rank(s_RK: Tensor, rank_R: Tensor) -> Tensor:
    """The candidate of the given rank in each row (ranks clamped to the candidates)."""
    return s_RK.gather(-1, rank_R.clamp(0, s_RK.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)


def _count_below_budget(
    x_RN: Tensor,
    s_RK: Tensor,
    tau_R: Tensor,
    k_R: Tensor,
    method: str,
    shift: float = 0.0,
    upper_R: Tensor | None = None,
) -> Tensor:
    """The number of leading candidates j with F(s_j - shift tau) < k, by bisection over j.

    F(s_j - shift tau) = sum_i f((x_i - s_j) / tau + shift) increases with j, so the answer
    is the first j where it reaches k (or `upper_R`, default K, when none does below it).
    -inf candidates (rows with fewer finite scores than K) count as reaching k.
    """
    num_candidates = s_RK.shape[-1]
    lo_R = torch.zeros(s_RK.shape[:-1], dtype=torch.long, device=s_RK.device)
    hi_R = torch.full_like(lo_R, num_candidates) if upper_R is None else upper_R
    for _ in range(num_candidates.bit_length()):  # ceil(log2(K + 1)) halvings of [0, K]
        mid_R = (lo_R + hi_R) // 2
        s_mid_R = _at_rank(s_RK, mid_R)
        total_R = apply_f(_frame(x_RN, s_mid_R, tau_R) + shift, method).sum(-1)
        below_R = (total_R < k_R) & torch.isfinite(s_mid_R)
        open_R = lo_R < hi_R
        lo_R = torch.where(open_R & below_R, mid_R + 1, lo_R)
        hi_R = torch.where(open_R & ~below_R, mid_R, hi_R)
    return lo_R


def _candidates(x_RN: Tensor, num: int) -> Tensor:
    """The `num` largest scores of each row, descending (whole rows sorted for num >= N)."""
    if num >= x_RN.shape[-1]:
        return torch.sort(x_RN, dim=-1, descending=True).values
    return torch.topk(x_RN, num, dim=-1).values


def _masked_logsumexp(y_RN: Tensor, keep_RN: Tensor) -> Tensor:
    return torch.logsumexp(y_RN.masked_fill(~keep_RN, -math.inf), dim=-1)


# --------------------------------------------------------------------------------------------
# closed forms; each returns (pivot_R, offset_R): theta = pivot + tau * offset


def _solve_exp(x_RN, tau_R, k_R, max_k):
    num_entries = x_RN.shape[-1]
    num = num_entries if max_k is None else min(num_entries, math.ceil(max_k))
    s_RK = _candidates(x_RN, num)
    pivot_R = _at_rank(s_RK, _count_below_budget(x_RN, s_RK, tau_R, k_R, "exp"))
    above_RN = x_RN > pivot_R.unsqueeze(-1)
    y_RN = _frame(x_RN, pivot_R, tau_R)
    budget_R = k_R - above_RN.sum(-1).to(x_RN.dtype)
    tiny = torch.finfo(x_RN.dtype).tiny
    offset_R = _masked_logsumexp(y_RN, ~above_RN) - torch.log(budget_R.clamp_min(tiny))
    return pivot_R, offset_R


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
    root_R = torch.where(gap_R >= 0, wide_R, narrow_R)
    return torch.where(c_R == 0, half_log_R, root_R)  # (gap is NaN for c = 0 and L = -inf)


def _solve_laplace(x_RN, tau_R, k_R, max_k):
    num_entries = x_RN.shape[-1]
    num = num_entries if max_k is None else min(num_entries, math.ceil(2 * max_k))
    s_RK = _candidates(x_RN, num)
    above_R = _count_below_budget(x_RN, s_RK, tau_R, k_R, "laplace")
    budget_R = k_R - above_R.to(x_RN.dtype)
    # the entries above are those >= s_{m-1} (s_{m-1} > s_m: they cannot tie across the cut)
    lowest_above_R = torch.where(above_R > 0, _at_rank(s_RK, above_R - 1), math.inf)
    pivot_R = torch.where(budget_R >= 0, _at_rank(s_RK, above_R), lowest_above_R)
    above_RN = x_RN >= lowest_above_R.unsqueeze(-1)
    y_RN = _frame(x_RN, pivot_R, tau_R)
    log_a_R = _masked_logsumexp(-y_RN, above_RN)  # log S_A
    log_b_R = _masked_logsumexp(y_RN, ~above_RN)  # log S_B
    # c >= 0: d = log S_B - G(c);  c < 0: d = G(|c|) - log S_A  (the rationalised form)
    root_R = _log_c_plus_root(budget_R.abs(), log_a_R + log_b_R)
    offset_R = torch.where(budget_R >= 0, log_b_R - root_R, root_R - log_a_R)
    return pivot_R, offset_R


def _solve_sparse(x_RN, tau_R, k_R, max_k):
    s_RN = _candidates(x_RN, x_RN.shape[-1])
    # m entries above the threshold, a of them capped (F(s_j - tau) < k: s_j - tau > theta)
    above_R = _count_below_budget(x_RN, s_RN, tau_R, k_R, "sparse")
    capped_R = _count_below_budget(
        x_RN, s_RN, tau_R, k_R, "sparse", shift=1.0, upper_R=(above_R - 1).clamp_min(0)
    )
    pivot_R = _at_rank(s_RN, above_R - 1)  # the lowest entry on the linear piece
    lowest_capped_R = torch.where(capped_R > 0, _at_rank(s_RN, capped_R - 1), math.inf)
    capped_RN = x_RN >= lowest_capped_R.unsqueeze(-1)
    linear_RN = (x_RN >= pivot_R.unsqueeze(-1)) & ~capped_RN
    y_RN = _frame(x_RN, pivot_R, tau_R)
    num_linear_R = linear_RN.sum(-1).to(x_RN.dtype)
    budget_R = k_R - capped_RN.sum(-1).to(x_RN.dtype)
    linear_sum_R = torch.where(linear_RN, y_RN, torch.zeros_like(y_RN)).sum(-1)
    offset_R = (linear_sum_R - budget_R) / num_linear_R.clamp_min(1)
    return pivot_R, offset_R


def _sigmoid_sums(u_RN: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_i sigma(u_i), sum_i sigma'(u_i)). The sum is taken as
    #(u >= 0) - sum_{u >= 0} sigma(-u) + sum_{u < 0} sigma(u): each term <= 1/2 and mostly
    tiny, so a k in the hundreds keeps its last bits in fp32 (sum_i p_i would not)."""
    q_RN = torch.sigmoid(-u_RN.abs())
    positive_RN = u_RN >= 0
    total_R = positive_RN.sum(-1).to(u_RN.dtype) + torch.where(positive_RN, -q_RN, q_RN).sum(-1)
    return total_R, (q_RN * (1 - q_RN)).sum(-1)


def _solve_sigmoid(x_RN, tau_R, k_R, max_k):
    pivot_R, offset_laplace_R = _solve_laplace(x_RN, tau_R, k_R, max_k)
    big = torch.finfo(x_RN.dtype).max
    offset_laplace_R = offset_laplace_R.clamp(-big, big)  # (see solve_threshold)
    y_RN = _frame(x_RN, pivot_R, tau_R)
    lo_R, hi_R = offset_laplace_R - _LOG2, offset_laplace_R + _LOG2
    offset_R = hi_R  # the upper end: F(d) <= k, where Newton in w = e^-d is monotone
    for _ in range(SIGMOID_NEWTON_STEPS):
        total_R, slope_R = _sigmoid_sums(y_RN - offset_R.unsqueeze(-1))
        too_low_R = total_R > k_R
        lo_R = torch.where(too_low_R, offset_R, lo_R)
        hi_R = torch.where(too_low_R, hi_R, offset_R)
        ratio_R = (k_R - total_R) / slope_R
        newton_R = offset_R - torch.log1p(ratio_R.clamp_min(-0.5))
        inside_R = torch.isfinite(newton_R) & (newton_R >= lo_R) & (newton_R <= hi_R)
        next_R = torch.where(inside_R, newton_R, 0.5 * (lo_R + hi_R))
        offset_R = torch.where(total_R == k_R, offset_R, next_R)  # exact hit (flat): stay
    # one more Newton step, in the frame of the threshold itself (repairs the rounding of the
    # last iterate; bounded, as the iterate is converged)
    total_R, slope_R = _sigmoid_sums(y_RN - offset_R.unsqueeze(-1))
    step_R = (total_R - k_R) / slope_R.clamp_min(torch.finfo(x_RN.dtype).tiny)
    step_R = torch.where(slope_R > 0, step_R.clamp(-1e-2, 1e-2), torch.zeros_like(step_R))
    return pivot_R, offset_R + step_R


_SOLVERS = {
    "sigmoid": _solve_sigmoid,
    "laplace": _solve_laplace,
    "exp": _solve_exp,
    "sparse": _solve_sparse,
}


def solve_threshold(
    x_RN: Tensor, k_R: Tensor, tau_R: Tensor, method: str, max_k: float | None = None
) -> tuple[Tensor, Tensor]:
    """Solve sum_i f((x_i - theta) / tau) = k per row; return (p_RN, lam_R).

    Args:
        x_RN: Scores, float32 or float64. -inf entries get p = 0.
        k_R: Per-row budget, same dtype.
        tau_R: Per-row temperature > 0, same dtype.
        method: One of THRESHOLD_METHODS.
        max_k: An upper bound on k_R known on the host (a Python number). It sizes the partial
            sort; None sorts whole rows (tensor k, where reading the max would be a host sync).

    Returns:
        p_RN in [0, 1] with sum k per row, and the threshold in units of x / tau,
        lam_R = theta / tau (clamped to the finite range of the dtype). Rows with at most k
        finite entries get p = 1 on their finite entries and lam = -inf (the constraint cannot
        be met); rows with k <= 0 get p = 0 and lam = +inf; a row holding a NaN or +inf, or
        with a NaN k, is NaN throughout.
    """
    if x_RN.shape[-1] == 0:  # nothing to select: every row is saturated (or has k <= 0)
        lam_R = torch.where(k_R <= 0, math.inf, -math.inf)
        return x_RN.clone(), torch.where(torch.isnan(k_R), math.nan, lam_R)
    # amax propagates NaN and +inf, so the bad rows are read off [R] values, not [R, N] masks
    row_max_R = x_RN.amax(-1)
    bad_row_R = torch.isnan(row_max_R) | torch.isposinf(row_max_R) | torch.isnan(k_R)
    finite_RN = x_RN > -math.inf
    saturated_R = finite_RN.sum(-1).to(x_RN.dtype) <= k_R
    nonpositive_R = k_R <= 0
    # Solve every row (no host sync to pick some); the special rows are overwritten below, so
    # they solve a harmless stand-in: zeros for a bad row, k = 1/2 for the others.
    solvable_R = ~(bad_row_R | saturated_R | nonpositive_R)
    x_solve_RN = torch.where(bad_row_R.unsqueeze(-1), torch.zeros_like(x_RN), x_RN)
    k_solve_R = torch.where(solvable_R, k_R, torch.full_like(k_R, 0.5))
    pivot_R, offset_R = _SOLVERS[method](x_solve_RN, tau_R, k_solve_R, max_k)
    # An infinite offset means the threshold lies beyond the range of the dtype, between two
    # groups of scores whose differences overflow it (tiny tau): any finite value that far is
    # the same threshold, and keeps u = inf - offset from becoming NaN.
    big = torch.finfo(x_RN.dtype).max
    offset_R = offset_R.clamp(-big, big)
    u_RN = _frame(x_solve_RN, pivot_R, tau_R) - offset_R.unsqueeze(-1)
    p_RN = apply_f(u_RN, method)
    lam_R = (pivot_R / tau_R + offset_R).clamp(-big, big)
    p_RN = torch.where(saturated_R.unsqueeze(-1), finite_RN.to(x_RN.dtype), p_RN)
    lam_R = torch.where(saturated_R, -math.inf, lam_R)
    p_RN = torch.where(nonpositive_R.unsqueeze(-1), torch.zeros_like(p_RN), p_RN)
    lam_R = torch.where(nonpositive_R, math.inf, lam_R)
    p_RN = torch.where(bad_row_R.unsqueeze(-1), math.nan, p_RN)
    lam_R = torch.where(bad_row_R, math.nan, lam_R)
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
    # NaN rows: keep NaN in the gradient of that row only (p is NaN there). The 1 / tau of
    # v = w / tau cancels in the mean and is applied last, so a tiny tau gives an honest
    # +-inf gradient where 1 / tau overflows, never inf / inf = NaN.
    sum_w_R = w_RN.sum(-1)
    sum_wg_R = (w_RN * grad_RN).sum(-1)
    mean_g_R = sum_wg_R / torch.where(sum_w_R > 0, sum_w_R, torch.ones_like(sum_w_R))
    grad_x_RN = w_RN * (grad_RN - mean_g_R.unsqueeze(-1)) / tau_R.unsqueeze(-1)
    grad_k_R = mean_g_R if need_k_grad else None
    grad_tau_R = None
    if need_tau_grad:
        u_RN = f_inverse(p_RN, method, w_RN > 0)
        grad_tau_R = -(u_RN * grad_x_RN).sum(-1)
    return grad_x_RN, grad_k_R, grad_tau_R
