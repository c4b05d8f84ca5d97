"""Other libraries' soft top-k operators, wrapped for the operator benchmark.

Each peer maps ``(x_RN, k, tau) -> p_RN`` (differentiable in x) and says which of our methods
computes the same function, and with which temperature mapping; a peer whose package is not
installed (or does not build) is returned with the reason instead of a function.

Shape legend: R rows, N entries per row.

* torchsort: the projection of x / tau onto the capped simplex {0 <= p <= 1, sum p = k},
  through torchsort's isotonic regression with w = (1^k, 0^(N-k)) (the permutahedron of that w
  *is* the capped simplex): the function of our ``sparse`` at the same tau.
  torchsort's public ``soft_rank`` fixes w = (N, ..., 1); this is its ``SoftRank`` with the
  top-k w, calling the same compiled isotonic kernels.
* entmax ``budget_bisect(x / tau, budget=k)``: the same projection by 50 bisection steps
  (its default): our ``sparse``.
* LapSum (Struski et al., "LapSum - One Method to Differentiate Them All: Ranking, Sorting and
  Top-k Selection", ICML 2025): p_i = Laplace CDF((x_i - b) / alpha) with b such that
  sum p = k, found in closed form from sorted prefix sums. LapSum is not on the registry; this
  is an implementation of the paper's algorithm written for this benchmark (it shares no code
  with ours): our ``laplace`` at tau = alpha.
* difftopk (Petersen et al., "Differentiable Top-k Classification Learning", ICML 2022): a
  relaxed bitonic sorting network; p = the relaxed membership of each entry in the top k
  (rows of the relaxed permutation summed over the k top positions). A different function
  (no temperature mapping: steepness 10, Cauchy relaxation, its defaults), so only sum p - k is
  compared. Its cost is O(N^2 log^2 N) per row, so it is timed on a subset of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PeerFn = Callable[[Tensor, int, float], Tensor]


@dataclass
class Peer:
    """One peer operator.

    Attributes:
        name: Row label.
        same_as: Our method computing the same function, or None.
        mapping: How its temperature / parameters relate to ours.
        fn: ``(x_RN, k, tau) -> p_RN``; None when unavailable.
        skip_reason: Why ``fn`` is None.
        max_rows: ``N -> rows``: time it on at most that many rows and scale the time to R
            (None = all rows).
    """

    name: str
    same_as: str | None
    mapping: str
    fn: PeerFn | None = None
    skip_reason: str | None = None
    max_rows: Callable[[int], int] | None = None


# --------------------------------------------------------------------------------------------
# torchsort


def _torchsort_topk() -> PeerFn:
    from torchsort import ops  # the compiled isotonic regression kernels

    class CappedSimplexProjection(torch.autograd.Function):
        """torchsort's SoftRank (l2) with the permutahedron of w = (1^k, 0^(N-k))."""

        @staticmethod
        def forward(ctx, x_RN, k, tau):
            theta_RN = x_RN / tau
            w_N = torch.zeros(x_RN.shape[-1], dtype=x_RN.dtype)
            w_N[:k] = 1.0
            s_RN, perm_RN = torch.sort(theta_RN, dim=-1, descending=True)
            inv_perm_RN = torch.empty_like(perm_RN).scatter_(
                -1, perm_RN, torch.arange(x_RN.shape[-1]).expand_as(perm_RN)
            )
            dual_RN = ops.isotonic_l2["cpu"](s_RN - w_N)
            ctx.save_for_backward(s_RN, dual_RN, perm_RN, inv_perm_RN)
            ctx.tau = tau
            return (s_RN - dual_RN).gather(-1, inv_perm_RN)

        @staticmethod
        def backward(ctx, grad_RN):
            s_RN, dual_RN, perm_RN, inv_perm_RN = ctx.saved_tensors
            grad_sorted_RN = grad_RN.gather(-1, perm_RN).contiguous()
            correction_RN = ops.isotonic_l2_backward["cpu"](s_RN, dual_RN, grad_sorted_RN)
            return (grad_RN - correction_RN.gather(-1, inv_perm_RN)) / ctx.tau, None, None

    return lambda x_RN, k, tau: CappedSimplexProjection.apply(x_RN, k, tau)


# --------------------------------------------------------------------------------------------
# entmax


def _entmax_budget() -> PeerFn:
    from entmax import budget_bisect

    return lambda x_RN, k, tau: budget_bisect(x_RN / tau, budget=k, dim=-1)


# --------------------------------------------------------------------------------------------
# LapSum


class LapSumTopK(torch.autograd.Function):
    """LapSum soft top-k: p_i = L((z_i - b)), z = x / alpha, L the unit Laplace CDF,
    sum_i p_i = k.

    With z sorted ascending (s_1 <= ... <= s_N) and b in the segment [s_j, s_j+1], the j lowest
    entries are on the lower branch L(u) = e^u / 2 and the others on the upper one
    1 - e^-u / 2, so

        F(b) = e^-b B_j / 2 + (N - j) - e^b A_j / 2,  B_j = sum_{i<=j} e^s_i,
                                                      A_j = sum_{i>j} e^-s_i,

    a quadratic in e^b. F decreases in b; the segment is the number of breakpoints with
    F(s_j) >= k, and F at every breakpoint comes from two cumulative log-sum-exps. The root is
    taken in the form that does not cancel (the sign of c = N - j - k decides which).
    Backward: dp_i/dz_j = d_i (delta_ij - d_j / sum d), d = L'(z - b) = e^-|z - b| / 2.
    """

    @staticmethod
    def forward(ctx, x_RN, k, alpha):
        z_RN = x_RN / alpha
        num = z_RN.shape[-1]
        s_RN = torch.sort(z_RN, dim=-1).values
        # below_RN[j] = sum_{i<=j} e^(s_i - s_j); above_RN[j] = sum_{i>=j} e^(s_j - s_i)
        below_RN = (torch.logcumsumexp(s_RN, -1) - s_RN).exp()
        above_RN = (torch.logcumsumexp(-s_RN.flip(-1), -1).flip(-1) + s_RN).exp()
        # F at b = s_j (1-based j): (below_j - 1) / 2 + 1 / 2 + (N - j) - (above_j - 1) / 2
        j_N = torch.arange(1, num + 1, dtype=z_RN.dtype)
        f_at_breaks_RN = 0.5 * (below_RN - above_RN) + (num - j_N) + 0.5
        seg_R1 = (f_at_breaks_RN >= k).sum(-1, keepdim=True)  # b in [s_seg, s_seg+1]
        lo_R1 = (seg_R1 - 1).clamp(0, num - 1)  # 0-based index of s_seg
        hi_R1 = seg_R1.clamp(0, num - 1)  # 0-based index of s_seg+1
        s_lo_R1, s_hi_R1 = s_RN.gather(-1, lo_R1), s_RN.gather(-1, hi_R1)
        # B_seg = e^s_lo * below_lo (0 when seg = 0); A_seg = e^-s_hi * above_hi (0 when seg = N)
        b_lo_R1 = torch.where(seg_R1 > 0, below_RN.gather(-1, lo_R1), 0.0)
        a_hi_R1 = torch.where(seg_R1 < num, above_RN.gather(-1, hi_R1), 0.0)
        c_R1 = (num - seg_R1 - k).to(z_RN.dtype)
        # A*B in the shifted frame: a_hi * b_lo * e^(s_lo - s_hi) (finite: s_lo <= s_hi)
        root_R1 = c_R1.abs() + torch.sqrt(c_R1**2 + a_hi_R1 * b_lo_R1 * (s_lo_R1 - s_hi_R1).exp())
        b_R1 = torch.where(
            c_R1 > 0,
            s_hi_R1 + root_R1.log() - a_hi_R1.log(),  # e^b = (c + root') / A
            s_lo_R1 + b_lo_R1.log() - root_R1.log(),  # e^b = B / (|c| + root')
        )
        u_RN = z_RN - b_R1
        half_exp_RN = 0.5 * torch.exp(-u_RN.abs())
        ctx.save_for_backward(half_exp_RN)
        ctx.alpha = alpha
        return torch.where(u_RN > 0, 1.0 - half_exp_RN, half_exp_RN)

    @staticmethod
    def backward(ctx, grad_RN):
        (density_RN,) = ctx.saved_tensors
        weights_RN = density_RN / density_RN.sum(-1, keepdim=True)
        mean_grad_R1 = (weights_RN * grad_RN).sum(-1, keepdim=True)
        return density_RN * (grad_RN - mean_grad_R1) / ctx.alpha, None, None


def lapsum_topk(x_RN: Tensor, k: int, alpha: float) -> Tensor:
    """LapSum's soft top-k of each row (see :class:`LapSumTopK`)."""
    return LapSumTopK.apply(x_RN, k, alpha)


# --------------------------------------------------------------------------------------------
# difftopk


def _difftopk() -> PeerFn:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints about the optional torch-sparse
        from difftopk import DiffTopkNet

    nets: dict[tuple[int, int], object] = {}

    def run(x_RN: Tensor, k: int, tau: float) -> Tensor:
        num = x_RN.shape[-1]
        if (num, k) not in nets:
            nets[num, k] = DiffTopkNet("bitonic", num, k, sparse=False, device="cpu")
        relaxed_perm_RNK = nets[num, k](x_RN)[1]
        return relaxed_perm_RNK.sum(-1)

    return run


# --------------------------------------------------------------------------------------------


def _load(name: str, same_as: str | None, mapping: str, factory, **kwargs) -> Peer:
    try:
        return Peer(name, same_as, mapping, fn=factory(), **kwargs)
    except Exception as error:  # any import / build failure makes a skipped row, not a crash
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return Peer(name, same_as, mapping, skip_reason=reason[:160], **kwargs)


def load_peers() -> list[Peer]:
    """Every peer, available or with the reason it is not."""
    return [
        _load(
            "torchsort (isotonic, w=1^k 0^(n-k))",
            "sparse",
            "regularization_strength = tau",
            _torchsort_topk,
        ),
        _load("entmax budget_bisect", "sparse", "input x / tau, budget = k", _entmax_budget),
        _load(
            "LapSum (paper's closed form, reimplemented)",
            "laplace",
            "alpha = tau",
            lambda: lapsum_topk,
        ),
        _load(
            "difftopk (bitonic, cauchy)",
            None,
            "different function (steepness 10)",
            _difftopk,
            max_rows=difftopk_rows,
        ),
    ]


def difftopk_rows(num_entries: int) -> int:
    """Rows to time difftopk on: about 0.2 s a call on one core (its cost per row grows like
    N^2 log^2 N: each of the log^2 N layers multiplies [N, N] matrices)."""
    cost_per_row = num_entries**2 * max(1, int(math.log2(num_entries))) ** 2
    return max(8, min(1024, int(2e6 // cost_per_row)))
