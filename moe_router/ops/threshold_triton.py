"""Fused Triton kernels for the threshold soft top-k (methods sigmoid, laplace, exp, sparse).

A different algorithm from the PyTorch and C++ paths, on purpose. Those two first select the
top candidates of each row (torch.topk, or a partial selection in cache) and then evaluate
closed forms on the sorted candidates, which is cheapest on a CPU. A GPU program instead holds
a tile of whole rows in registers: a per-row sort or top-k there is a data-dependent sorting
network, costly in registers and instructions, while an elementwise pass with a row reduction
is nearly free. So these kernels iterate safeguarded segment (Newton) steps over the whole row,
each step one pass over the registers, and stop when every row of the tile has converged. They
solve the same equation and are tested against the PyTorch path to fp32 rounding.

Shape legend: R rows (tokens, flattened batch), N entries per row (experts), BN = N rounded up to
a power of two (the kernel tile width), ROWS rows per program.

The operator (see docs/design.md, "The soft top-k operator"): with z = x / tau per row,

    p_i = f(z_i - lambda),   lambda such that sum_i f(z_i - lambda) = k.

Forward: one program holds a ROWS x BN tile in registers, solves lambda for every row of the
tile and writes p once. Backward: one pass over p and the incoming gradient (implicit function
theorem; everything it needs is a function of p).

The solver works in shifted coordinates y = (x - max x) / tau <= 0, which is free (the operator
is shift invariant) and keeps exp() in range and lambda near 0 where fp32 is densest; the
difference is taken before the division, so the entries near the max keep every bit however
large x is (x / tau - max would round them to ulp(x / tau)). Each step
is a *segment* solve: at the current lambda the entries split into pieces on which f has one
formula, and the equation restricted to that split has a closed form:

    exp      m + e^-lam * S = k                        (m entries capped at 1, S = sum_below e^y)
    laplace  m - e^lam * T / 2 + e^-lam * S / 2 = k    (T = sum_above e^-y; a quadratic in e^-lam)
    sparse   c + sum_linear (y - lam) = k              (c entries capped)
    sigmoid  no closed form: a plain Newton step on sum_i sigmoid(y_i - lam) = k

For sparse this is exactly Newton's step; for exp and laplace it is Newton's step on the segment
model. Once lambda lies in the right segment the step is exact, so the last iteration is the
"exact final step". For exp and laplace the model F_seg built at lambda bounds the true F from the
side that makes the iteration monotone (exp: F <= F_seg everywhere; laplace: F <= F_seg left of
lambda, F >= F_seg right of it), so from the initial upper bound it walks down through at most
one segment per step and never overshoots: at most ceil(k) + 1 steps for exp and 2k + 1 for
laplace (only entries with f >= 1/2, at most 2k of them, lie above lambda). Every step is
safeguarded by a bracket [lo, hi] with F(lo) >= k >= F(hi): bisection when a step leaves it,
lands on an end already evaluated (piecewise-linear F can cycle there), or, after 4 free steps,
moves more than half as far as the step before last (the walk above crawls one kink per step
when k is large and the row is spread over tens of units). The loop stops as soon as every row
of the tile has converged (|F - k| <= 1e-6, or a step below ~4 ulp of lambda).

Iteration counts (measured on the interpreter): on router-like rows (N = 8..256, k <= 8,
z = logits / tau with standard deviation <= 5) every row converges within 8 iterations per solve
(sigmoid runs two solves, see below); at standard deviation 10 and k = 8 a few rows need more.
MAX_ITERS = 64 is a cap for such hard rows (and k near N on widely spread rows), which converge
by the bisection steps.
Exact in the row's own frame at any scale: a threshold more than FRAME_REACH = 8 units of tau
from the frame's origin was solved on coordinates rounded to ~2^-24 of their size (1e8-scale
logits, a tiny tau, k near N on a widely spread row). Such rows move the origin to their entry
nearest the threshold, where the entries that carry the mass have exact coordinates again, and
solve once more inside a bracket around the translated threshold (widened until it holds the
root; bisection in sign(v) log(1 + |v|) for a bracket spanning the fp32 range). Each move gains
~2^-23 of the distance, so a few stages (at most MAX_STAGES) cover the whole fp32 range, and
rows that need none, the usual case, pay one reduction. Differences that overflow are clamped
to the finite range: they belong to entries whose p is 0 or 1 anyway.
Accuracy: p within 1e-5 of an exact solve on the same fp32 values and |sum p - k| <=
1e-5 max(k, 1), for logits of any scale and any tau > 0 (tested from 1e-45 to 1e30).

Initial brackets (shifted coordinates: max y = 0, M = number of entries that are not -inf,
S0 = sum_i e^y_i, y_min the smallest finite y, t the ceil(k)-th largest y):

    exp      hi = log S0 - log k       (min(1, e^u) <= e^u)      lo = y_min   (all capped: F = M)
    laplace  hi = log S0 - log 2k      (f(u) <= e^u / 2)         lo = y_min + log(2 (1 - k/M))
    sparse   hi = t                    (< k entries above t)     lo = t - 1   (>= k capped)
             (t found by <= 8 max-reductions; for larger k, lo = y_min - 1)
    sigmoid  [lambda_laplace - log 2, lambda_laplace + log 2], Newton from lambda_laplace

The laplace lo: with U = -log(2 (1 - k/M)) every entry has u >= U; if U >= 0 then
f(u) >= 1 - (1 - k/M) = k/M, else f(u) >= e^U / 2 = 1 / (4 (1 - k/M)) >= k/M. The sigmoid
bracket: laplace(u - log 2) <= sigmoid(u) <= laplace(u + log 2) for every u (check each branch:
1 - e^-u <= 1/(1 + e^-u); e^u / 4 <= e^u / (1 + e^u) for u < log 2; and the mirror images), so
F_sigmoid(lambda_L - log 2) >= F_laplace(lambda_L) = k >= F_sigmoid(lambda_L + log 2). The sigmoid
solve therefore runs the laplace solve first (its own budget) and then at most ITERS Newton
steps; on a width-1.39 bracket Newton converges quadratically.

Special rows: an entry that is -inf (or a column beyond N) gets p = 0 exactly and zero gradient;
a row with at most k entries that are not -inf gets p = 1 on them (the documented fallback of the
PyTorch path) and threshold -inf; a row with k <= 0 gets p = 0 and threshold +inf; a NaN or +inf
anywhere in a row, or a NaN k, makes its p, threshold and gradients NaN, other rows unaffected.

Importing this module never fails: without Triton, ``HAS_TRITON`` is False and the wrappers
raise. Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter when
``TRITON_INTERPRET=1`` was set before this module was first imported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_router.ops.threshold_torch import METHOD_CODES, THRESHOLD_METHODS

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


# Rows longer than this would not fit one row in registers; the PyTorch path handles them.
MAX_N = 1024
# Cap on the iterations of one solve; rows converge long before it (see the module docstring),
# and a tile stops iterating when all its rows have converged.
MAX_ITERS = 64
# The threshold is re-solved next to itself when it lies more than this many units of tau
# from the frame's origin (there the coordinates' rounding stays below ~2e-6), at most
# MAX_STAGES times.
FRAME_REACH = 8.0
MAX_STAGES = 8
# Elements per program tile: large enough to amortise the per-row reductions, small enough to
# stay in registers at 4-8 warps.
_TILE_ELEMENTS = 2048
_MAX_ROWS = 128

# The score dtypes the kernels take (they solve in fp32).
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if HAS_TRITON:
    # (globals a kernel reads must be constexpr)
    _FRAME_REACH = tl.constexpr(FRAME_REACH)
    _MAX_STAGES = tl.constexpr(MAX_STAGES)
    _FLOAT_MAX = tl.constexpr(3.4028234663852886e38)

    @triton.jit
    def _segment_step(y, lam, k, METHOD: tl.constexpr):
        """F(lam) - k and the segment / Newton candidate for the next lambda, per row."""
        u = y - lam[:, None]  # (ROWS, BN); -inf on masked entries
        if METHOD == 0:  # sigmoid: Newton on sum sigmoid(u) = k
            e = tl.exp(-tl.abs(u))
            s = tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            total = tl.sum(s, axis=1)
            slope = tl.sum(s * (1.0 - s), axis=1)
            candidate = lam + (total - k) / slope
        elif METHOD == 1:  # laplace: quadratic in w = e^-(mu - lam) on the current segment
            e = tl.exp(-tl.abs(u))
            above = u >= 0
            n_above = tl.sum(above.to(tl.float32), axis=1)
            t_above = tl.sum(tl.where(above, e, 0.0), axis=1)
            s_below = tl.sum(tl.where(above, 0.0, e), axis=1)
            total = n_above - 0.5 * t_above + 0.5 * s_below
            # S w^2 / 2 - (k - m) w - T / 2 = 0; take the positive root in whichever of its two
            # algebraically equal forms has no cancellation.
            gap = k - n_above
            root = tl.sqrt(gap * gap + s_below * t_above)
            inv_w_pos = s_below / (gap + root)
            inv_w_neg = (root - gap) / t_above
            inv_w = tl.where(gap >= 0, inv_w_pos, inv_w_neg)
            candidate = lam + tl.log(inv_w)
        elif METHOD == 2:  # exp: m + e^-(mu - lam) S = k
            above = u >= 0
            e = tl.exp(tl.minimum(u, 0.0))
            n_above = tl.sum(above.to(tl.float32), axis=1)
            s_below = tl.sum(tl.where(above, 0.0, e), axis=1)
            total = n_above + s_below
            candidate = lam + tl.log(s_below) - tl.log(k - n_above)
        else:  # sparse: c + sum_linear (y - mu) = k
            capped = u >= 1.0
            linear = (u > 0.0) & (u < 1.0)
            n_capped = tl.sum(capped.to(tl.float32), axis=1)
            n_linear = tl.sum(linear.to(tl.float32), axis=1)
            s_linear = tl.sum(tl.where(linear, u, 0.0), axis=1)
            total = n_capped + s_linear
            candidate = lam + (s_linear - (k - n_capped)) / n_linear
        return total - k, candidate

    @triton.jit
    def _midpoint(lo, hi):
        """The bisection point of [lo, hi]: the middle, or for a bracket much wider than its
        distance from 0 (a re-solve that starts from the whole fp32 range) the middle in
        sign(v) log(1 + |v|), which reaches any threshold in ~8 + 24 halvings, not ~150."""
        half_width = 0.5 * hi - 0.5 * lo  # (no overflow)
        wide = half_width > 32.0 + 0.25 * (tl.abs(lo) + tl.abs(hi))
        g_lo = tl.where(lo < 0, -tl.log(1.0 - lo), tl.log(1.0 + lo))
        g_hi = tl.where(hi < 0, -tl.log(1.0 - hi), tl.log(1.0 + hi))
        g_mid = 0.5 * (g_lo + g_hi)
        geometric = tl.where(g_mid < 0, 1.0 - tl.exp(-g_mid), tl.exp(g_mid) - 1.0)
        return tl.where(wide, geometric, 0.5 * lo + 0.5 * hi)

    @triton.jit
    def _solve(y, lam, lo, hi, k, active, METHOD: tl.constexpr, ITERS: tl.constexpr):
        """Safeguarded segment / Newton iterations from lam inside [lo, hi]; returns lambda.

        The loop runs while any row of the tile is unconverged, at most ITERS times.
        """
        n_active = tl.sum(active.to(tl.int32), axis=0)
        lo_seen = lo != lo  # all False: no end of the bracket evaluated yet
        hi_seen = lo_seen
        last_move = tl.full(lam.shape, float("inf"), tl.float32)
        older_move = last_move
        it = 0
        while (it < ITERS) & (n_active > 0):
            excess, candidate = _segment_step(y, lam, k, METHOD)
            too_low = excess > 0  # F(lam) > k: lambda must grow
            lo = tl.where(too_low, lam, lo)
            hi = tl.where(too_low, hi, lam)
            lo_seen = lo_seen | too_low
            hi_seen = hi_seen | ~too_low
            # About 4 ulp of lambda: below this fp32 cannot tell two thresholds apart.
            tol = 5e-7 * (1.0 + tl.abs(lam))
            # Accept the step if it lands inside the bracket, or within rounding of lam (at the
            # root hi = lam exactly), or on an end not evaluated yet (piecewise-linear F can
            # have its root exactly on an initial end). A step onto an evaluated end would
            # cycle, so that and any other excursion falls back to bisection.
            move = tl.abs(candidate - lam)
            inside = (candidate > lo) & (candidate < hi)
            inside = inside | (move <= tol)
            inside = inside | (~lo_seen & (tl.abs(candidate - lo) <= tol))
            inside = inside | (~hi_seen & (tl.abs(candidate - hi) <= tol))
            step = tl.minimum(tl.maximum(candidate, lo), hi)
            # After a few free steps, a step that is not at most half the move before last is
            # crawling (the monotone walk of exp / laplace through many kinks when k is large
            # and the row widely spread): bisect instead, so the bracket keeps halving.
            fast = (it < 4) | (move <= 0.5 * tl.maximum(last_move, older_move)) | (move <= tol)
            new_lam = tl.where(inside & fast, step, _midpoint(lo, hi))
            # |F(lam) - k| <= eps bounds every |p_i - p_i*| by eps (f is monotone), so lam is
            # done; this also ends the rounding dance of an entry sitting exactly on lam, and
            # flat pieces (sparse, integer k) where the step is 0/0.
            settled = tl.abs(excess) <= 1e-6
            new_lam = tl.where(settled, tl.where(inside, step, lam), new_lam)
            converged = settled | (tl.abs(new_lam - lam) <= tol)
            older_move = tl.where(active, last_move, older_move)
            last_move = tl.where(active, tl.abs(new_lam - lam), last_move)
            lam = tl.where(active, new_lam, lam)
            active = active & ~converged
            n_active = tl.sum(active.to(tl.int32), axis=0)
            it += 1
        return lam

    @triton.jit
    def _frame(x, origin, tau, present):
        """(x - origin) / tau on present entries, clamped to the finite range (a difference
        that overflows belongs to an entry whose p is 0 or 1 anyway); -inf on masked ones."""
        y = (x - origin[:, None]) / tau[:, None]
        y = tl.minimum(tl.maximum(y, -_FLOAT_MAX), _FLOAT_MAX)
        return tl.where(present, y, float("-inf"))

    @triton.jit
    def _apply_f(u, METHOD: tl.constexpr):
        if METHOD == 0:
            e = tl.exp(-tl.abs(u))
            p = tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        elif METHOD == 1:
            e = tl.exp(-tl.abs(u))
            p = tl.where(u >= 0, 1.0 - 0.5 * e, 0.5 * e)
        elif METHOD == 2:
            p = tl.exp(tl.minimum(u, 0.0))
        else:
            p = tl.minimum(tl.maximum(u, 0.0), 1.0)
        return p

    @triton.jit
    def _soft_topk_fwd_kernel(
        x_ptr,
        k_ptr,
        tau_ptr,
        p_ptr,
        lam_ptr,
        R,
        N,
        stride_x,
        METHOD: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        ITERS: tl.constexpr,
        WRITE_LAM: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        cols = tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < N)  # (ROWS, BN)
        row_offsets = rows.to(tl.int64) * stride_x
        x = tl.load(x_ptr + row_offsets[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        k = tl.load(k_ptr + rows, mask=row_ok, other=1.0)
        tau = tl.load(tau_ptr + rows, mask=row_ok, other=1.0)
        x = x.to(tl.float32)

        # A NaN or +inf anywhere makes the row NaN (as the PyTorch path); -inf marks entries
        # that must not be selected.
        row_nan = tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=1) > 0
        row_nan = row_nan | (k != k)  # (a NaN budget too)
        x = tl.where(row_nan[:, None], 0.0, x)
        present = x > float("-inf")
        n_present = tl.sum(present.to(tl.float32), axis=1)
        x_max = tl.max(tl.where(present, x, float("-inf")), axis=1)
        any_present = x_max > float("-inf")
        origin = tl.where(any_present, x_max, 0.0)
        # The row in the frame of its max, in units of tau: (x - max) / tau, not x / tau - max,
        # so that entries near the max keep every bit however large x is.
        y = _frame(x, origin, tau, present)  # <= 0 on present entries, -inf on masked ones
        y_min = tl.min(tl.where(present, y, float("inf")), axis=1)
        y_min = tl.where(any_present, y_min, 0.0)

        # At most k entries to share k: all of them are selected (the torch path's fallback);
        # k <= 0: none (and that takes precedence, as on the torch path).
        nonpositive = k <= 0
        fallback = (n_present <= k) & ~nonpositive
        # Sanitised budget for rows that skip the solve, so their arithmetic stays finite.
        skip = fallback | nonpositive | row_nan
        k_solve = tl.where(skip, 0.5, k)
        m_solve = tl.where(skip, 1.0, n_present)
        active = row_ok & ~skip
        if METHOD == 3:
            # Walk down the distinct values towards t = the ceil(k)-th largest: fewer than k
            # entries lie above t, so F(t) < k, and at least k lie at or above it, so
            # F(t - 1) >= k. Up to 8 cheap max-reductions buy a bracket of width 1; rows with
            # a larger k keep the valid hi = t and take lo = y_min - 1 (everything capped).
            t = tl.zeros([ROWS], dtype=tl.float32)
            short = active & (tl.sum((y >= 0.0).to(tl.float32), axis=1) < k_solve)
            n_short = tl.sum(short.to(tl.int32), axis=0)
            walked = 0
            while (n_short > 0) & (walked < 8):
                t_next = tl.max(tl.where(y < t[:, None], y, float("-inf")), axis=1)
                t = tl.where(short, t_next, t)
                short = short & (tl.sum((y >= t[:, None]).to(tl.float32), axis=1) < k_solve)
                n_short = tl.sum(short.to(tl.int32), axis=0)
                walked += 1
            lo = tl.where(short, tl.minimum(y_min - 1.0, t - 1.0), t - 1.0)
            lam = _solve(y, t, lo, t, k_solve, active, 3, ITERS)
        elif METHOD == 2:
            s0 = tl.sum(tl.exp(y), axis=1)
            s0 = tl.where(any_present, s0, 1.0)
            hi = tl.log(s0) - tl.log(k_solve)
            lam = _solve(y, hi, tl.minimum(y_min, hi), hi, k_solve, active, 2, ITERS)
        else:
            s0 = tl.sum(tl.exp(y), axis=1)
            s0 = tl.where(any_present, s0, 1.0)
            hi = tl.log(s0) - tl.log(2.0 * k_solve)
            lo = tl.minimum(y_min + tl.log(2.0 * (1.0 - k_solve / m_solve)), hi)
            lam = _solve(y, hi, lo, hi, k_solve, active, 1, ITERS)
            if METHOD == 0:
                # sigmoid(u) lies between laplace(u - log 2) and laplace(u + log 2), so the
                # sigmoid threshold is within log 2 of the laplace one; Newton from there.
                ln2 = 0.6931471805599453
                lam = _solve(y, lam, lam - ln2, lam + ln2, k_solve, active, 0, ITERS)

        # Exact in the row's own frame: a threshold more than FRAME_REACH units of tau from
        # the origin was solved on coordinates rounded to ~ulp(lam) (1e8-scale logits, a tiny
        # tau, k near N on a wide row). Move the origin to the entry nearest the threshold,
        # where the coordinates of the entries that carry the mass are exact again, and solve
        # there inside a bracket around the translated threshold. Each move gains ~2^-23 of
        # the distance, so a few stages cover the whole fp32 range; rows that need none (the
        # usual case) cost one reduction.
        refine = active & (tl.abs(lam) > _FRAME_REACH)
        n_refine = tl.sum(refine.to(tl.int32), axis=0)
        stage = 0
        while (n_refine > 0) & (stage < _MAX_STAGES):
            dist = tl.where(present, tl.abs(y - lam[:, None]), float("inf"))
            nearest = tl.min(dist, axis=1)
            at_nearest = present & (dist == nearest[:, None])
            new_origin = tl.max(tl.where(at_nearest, x, float("-inf")), axis=1)
            y_new_origin = tl.max(tl.where(at_nearest, y, float("-inf")), axis=1)
            lam_start = lam - y_new_origin
            # the old coordinates were good to ~2^-23 of their size: bracket 16x that
            width = 2e-6 * (tl.abs(lam) + tl.abs(y_new_origin) + 64.0)
            origin = tl.where(refine, new_origin, origin)
            y = _frame(x, origin, tau, present)
            lo = lam_start - width
            hi = lam_start + width
            # Widen until F(lo) >= k >= F(hi): the estimate above holds unless the old frame
            # had tied distinct entries (at its clamp), and then the whole range does.
            widened = 0
            while widened < 4:
                excess_lo, _ = _segment_step(y, lo, k_solve, METHOD)
                excess_hi, _ = _segment_step(y, hi, k_solve, METHOD)
                short_lo = refine & ~(excess_lo >= 0)
                short_hi = refine & ~(excess_hi <= 0)
                if widened == 3:
                    lo = tl.where(short_lo, -_FLOAT_MAX, lo)
                    hi = tl.where(short_hi, _FLOAT_MAX, hi)
                else:
                    lo = tl.where(short_lo, lam_start - 1024.0 * (lam_start - lo), lo)
                    hi = tl.where(short_hi, lam_start + 1024.0 * (hi - lam_start), hi)
                    lo = tl.maximum(lo, -_FLOAT_MAX)
                    hi = tl.minimum(hi, _FLOAT_MAX)
                widened += 1
            lam = tl.where(refine, lam_start, lam)
            lam = _solve(y, lam, lo, hi, k_solve, refine, METHOD, ITERS)
            refine = refine & (tl.abs(lam) > _FRAME_REACH)
            n_refine = tl.sum(refine.to(tl.int32), axis=0)
            stage += 1

        p = _apply_f(y - lam[:, None], METHOD)
        p = tl.where(fallback[:, None], tl.where(present, 1.0, 0.0), p)
        p = tl.where(nonpositive[:, None], 0.0, p)
        p = tl.where(row_nan[:, None], float("nan"), p)
        tl.store(p_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], p, mask=mask)
        if WRITE_LAM:
            # lambda in units of x / tau, within the finite range (a solved row is never -inf)
            lam_z = tl.minimum(tl.maximum(origin / tau + lam, -_FLOAT_MAX), _FLOAT_MAX)
            lam_z = tl.where(fallback, float("-inf"), lam_z)
            lam_z = tl.where(nonpositive, float("inf"), lam_z)
            lam_z = tl.where(row_nan, float("nan"), lam_z)
            tl.store(lam_ptr + rows, lam_z, mask=row_ok)

    @triton.jit
    def _soft_topk_bwd_kernel(
        p_ptr,
        g_ptr,
        tau_ptr,
        gx_ptr,
        gk_ptr,
        gtau_ptr,
        R,
        N,
        stride_p,
        stride_g,
        METHOD: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NEED_K: tl.constexpr,
        NEED_TAU: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        cols = tl.arange(0, BLOCK_N)  # (BN,)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < N)  # (ROWS, BN)
        rows64 = rows.to(tl.int64)
        p = tl.load(p_ptr + rows64[:, None] * stride_p + cols[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        p = p.to(tl.float32)
        g = g.to(tl.float32)
        tau = tl.load(tau_ptr + rows, mask=row_ok, other=1.0)

        # v = tau * f'(u), written through p; the 1/tau cancels in the ratio and is applied last.
        if METHOD == 0:
            v = p * (1.0 - p)
        elif METHOD == 1:
            v = tl.minimum(p, 1.0 - p)
        elif METHOD == 2:
            v = tl.where(p < 1.0, p, 0.0)
        else:
            v = tl.where((p > 0.0) & (p < 1.0), 1.0, 0.0)
        row_nan = tl.max((p != p).to(tl.int32), axis=1) > 0
        v_sum = tl.sum(v, axis=1)
        vg_sum = tl.sum(v * g, axis=1)
        ratio = tl.where(v_sum > 0, vg_sum / tl.where(v_sum > 0, v_sum, 1.0), 0.0)
        ratio = tl.where(row_nan, float("nan"), ratio)
        gx = v * (g - ratio[:, None]) / tau[:, None]
        gx = tl.where(row_nan[:, None], float("nan"), gx)
        tl.store(gx_ptr + rows64[:, None] * N + cols[None, :], gx, mask=mask)
        if NEED_K:
            tl.store(gk_ptr + rows, ratio, mask=row_ok)
        if NEED_TAU:
            # u = f^-1(p) where f' > 0; elsewhere v = 0 and so is gx.
            live = v > 0
            p_safe = tl.where(live, p, 0.5)
            if METHOD == 0:
                u = tl.log(p_safe / (1.0 - p_safe))
            elif METHOD == 1:
                u = tl.where(p_safe < 0.5, tl.log(2.0 * p_safe), -tl.log(2.0 * (1.0 - p_safe)))
            elif METHOD == 2:
                u = tl.log(p_safe)
            else:
                u = p_safe
            u = tl.where(live, u, 0.0)
            # d z / d tau = -z / tau and sum(gx) = 0, so grad_tau = -sum(z gx) = -sum(u gx).
            gtau = -tl.sum(u * gx, axis=1)
            gtau = tl.where(row_nan, float("nan"), gtau)
            tl.store(gtau_ptr + rows, gtau, mask=row_ok)


# Whether the kernels were decorated under Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = HAS_TRITON and type(_soft_topk_fwd_kernel).__name__ == "InterpretedFunction"


def _traceable(kernel):
    """The kernel as ``torch.library.triton_op`` / torch.compile want to see it launched.

    ``wrap_triton`` returns the kernel itself outside tracing, so eager launches are unchanged;
    the interpreter's kernels are not JITFunctions and are launched as they are.
    """
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    if wrap_triton is None or INTERPRETED:
        return kernel
    return wrap_triton(kernel)


_NUM_WARPS = (1, 2, 4, 8, 16)


def _launch_config(n: int, launch: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of n entries: the default tile, or `launch`.

    launch: (ROWS, num_warps) instead of the default (a tuning sweep's override); ROWS a power
    of two from 1 to _MAX_ROWS, num_warps one of 1, 2, 4, 8, 16.
    """
    block_n = max(8, 1 << (n - 1).bit_length())
    if launch is None:
        rows = max(1, min(_MAX_ROWS, _TILE_ELEMENTS // block_n))
        num_warps = 4 if rows * block_n <= 2048 else 8
        return block_n, rows, num_warps
    valid = (
        isinstance(launch, tuple | list)
        and len(launch) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in launch)
    )
    if valid:
        rows, num_warps = launch
        valid = 1 <= rows <= _MAX_ROWS and rows & (rows - 1) == 0 and num_warps in _NUM_WARPS
    if not valid:
        raise ValueError(
            f"launch={launch!r}: need (ROWS, num_warps) with ROWS a power of two from 1 to "
            f"{_MAX_ROWS} and num_warps one of {_NUM_WARPS}"
        )
    return block_n, rows, num_warps


def is_supported(scores: Tensor, method: str) -> bool:
    """Whether ``backend="auto"`` may send these scores to the Triton kernels.

    Args:
        scores: The scores in the layout the op will pass (entries along the last dim).
        method: The soft top-k method.

    Returns:
        True for CUDA float16/bfloat16/float32 scores with 1..``MAX_N`` entries per row and a
        threshold method, when Triton is importable; False otherwise (use the PyTorch path).
    """
    return (
        HAS_TRITON
        and method in METHOD_CODES
        and scores.is_cuda
        and scores.dtype in INPUT_DTYPES
        and scores.dim() >= 1
        and 0 < scores.shape[-1] <= MAX_N
    )


def dtype_names() -> str:
    """``INPUT_DTYPES`` for messages: "float16, bfloat16, float32"."""
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in INPUT_DTYPES)


def _check_available(t: Tensor, name: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton soft top-k backend needs the `triton` package")
    if t.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"{name} is on {t.device}; the Triton soft top-k kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before moe_router.ops.threshold_triton is imported)"
        )


def _check_method(method: str) -> int:
    if method not in METHOD_CODES:
        raise ValueError(
            f"method={method!r} has no Triton kernel; allowed: {', '.join(THRESHOLD_METHODS)}"
        )
    return METHOD_CODES[method]


def _check_rows(t: Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, entries), got shape {tuple(t.shape)}")
    if t.shape[1] > MAX_N:
        raise ValueError(
            f"{name} has {t.shape[1]} entries per row; the Triton kernels allow "
            f"at most {MAX_N} (use the torch backend)"
        )
    if t.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {dtype_names()}")
    if t.shape[0] > 0 and t.shape[1] > 1 and t.stride(1) != 1:  # (size <= 1: any stride)
        raise ValueError(f"{name} must have unit stride along its last dim, got {t.stride()}")


def _per_row(t: Tensor, rows: int, device: torch.device, name: str) -> Tensor:
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32).contiguous()


def triton_soft_topk_forward(
    scores_RN: Tensor,
    k_R: Tensor,
    tau_R: Tensor,
    method: str,
    return_threshold: bool = False,
    launch: tuple[int, int] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Soft top-k of every row with one fused kernel launch.

    Args:
        scores_RN: Scores, 2-D with unit stride along the last dim, float16/bfloat16/float32,
            at most ``MAX_N`` (1024) entries per row. ``-inf`` marks entries that must not be
            selected.
        k_R: Per-row budget, float32 (converted otherwise): k <= 0 gives p = 0, k >= the number
            of entries that are not -inf gives p = 1 on them, NaN gives NaN. Not checked.
        tau_R: Per-row temperature > 0, float32 (converted otherwise).
        method: One of ``sigmoid``, ``laplace``, ``exp``, ``sparse``.
        return_threshold: Also return lambda per row, in units of z = scores / tau.
        launch: (ROWS, num_warps) of the kernel tile instead of the default (for tuning
            sweeps, ``benchmarks/sweep_triton_launch.py``); the result does not depend on it.

    Returns:
        ``p_RN`` in float32 (a new contiguous tensor), and ``threshold_R`` (float32; ``-inf``
        for rows with at most k selectable entries, NaN for rows containing NaN) if asked.

    Raises:
        ValueError: On a bad method, shape, dtype, stride, device or launch.
        RuntimeError: If Triton is not installed.
    """
    method_code = _check_method(method)
    _check_rows(scores_RN, "scores_RN")
    _check_available(scores_RN, "scores_RN")
    n_rows, n = scores_RN.shape
    block_n, rows, num_warps = _launch_config(n, launch)
    k_R = _per_row(k_R, n_rows, scores_RN.device, "k_R")
    tau_R = _per_row(tau_R, n_rows, scores_RN.device, "tau_R")
    p_RN = torch.empty((n_rows, n), dtype=torch.float32, device=scores_RN.device)
    threshold_R = torch.empty(
        (n_rows if return_threshold else 1,), dtype=torch.float32, device=scores_RN.device
    )
    if n_rows > 0 and n > 0:
        grid = (triton.cdiv(n_rows, rows),)
        _traceable(_soft_topk_fwd_kernel)[grid](
            scores_RN,
            k_R,
            tau_R,
            p_RN,
            threshold_R,
            n_rows,
            n,
            scores_RN.stride(0),
            METHOD=method_code,
            ROWS=rows,
            BLOCK_N=block_n,
            ITERS=MAX_ITERS,
            WRITE_LAM=return_threshold,
            num_warps=num_warps,
        )
    elif return_threshold:
        threshold_R.fill_(float("-inf"))
    if return_threshold:
        return p_RN, threshold_R
    return p_RN


def triton_soft_topk_backward(
    p_RN: Tensor,
    grad_RN: Tensor,
    tau_R: Tensor,
    method: str,
    need_k_grad: bool,
    need_tau_grad: bool,
    launch: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Vector-Jacobian product of the soft top-k from its output alone, one fused pass.

    With v = f'(u) / tau written through p (sigmoid p(1-p), laplace min(p, 1-p), exp p [p < 1],
    sparse [0 < p < 1]), ``grad_scores = v g - v (sum v g) / (sum v)``,
    ``grad_k = (sum v g) / (sum v)`` and ``grad_tau = -sum_i u_i grad_scores_i`` with
    u = f^-1(p). Rows with sum v = 0 get zero gradients.

    Args:
        p_RN: The forward output, 2-D with unit last-dim stride, float16/bfloat16/float32.
        grad_RN: Incoming gradient dL/dp, same shape, unit last-dim stride, any float dtype
            above.
        tau_R: Per-row temperature used in the forward, float32 (converted otherwise).
        method: One of ``sigmoid``, ``laplace``, ``exp``, ``sparse``.
        need_k_grad: Compute dL/dk per row.
        need_tau_grad: Compute dL/dtau per row.
        launch: (ROWS, num_warps) of the kernel tile instead of the default, as in
            ``triton_soft_topk_forward``.

    Returns:
        ``(grad_scores_RN, grad_k_R, grad_tau_R)``, float32; the last two are None unless asked.

    Raises:
        ValueError: On a bad method, shape, dtype, stride, device or launch.
        RuntimeError: If Triton is not installed.
    """
    method_code = _check_method(method)
    _check_rows(p_RN, "p_RN")
    _check_rows(grad_RN, "grad_RN")
    if grad_RN.shape != p_RN.shape:
        raise ValueError(f"grad_RN has shape {tuple(grad_RN.shape)}, p_RN {tuple(p_RN.shape)}")
    _check_available(p_RN, "p_RN")
    n_rows, n = p_RN.shape
    block_n, rows, num_warps = _launch_config(n, launch)
    tau_R = _per_row(tau_R, n_rows, p_RN.device, "tau_R")
    device = p_RN.device
    grad_scores_RN = torch.empty((n_rows, n), dtype=torch.float32, device=device)
    grad_k_R = torch.empty((n_rows,), dtype=torch.float32, device=device) if need_k_grad else None
    grad_tau_R = (
        torch.empty((n_rows,), dtype=torch.float32, device=device) if need_tau_grad else None
    )
    if n_rows > 0 and n > 0:
        grid = (triton.cdiv(n_rows, rows),)
        _traceable(_soft_topk_bwd_kernel)[grid](
            p_RN,
            grad_RN,
            tau_R,
            grad_scores_RN,
            grad_k_R if need_k_grad else grad_scores_RN,
            grad_tau_R if need_tau_grad else grad_scores_RN,
            n_rows,
            n,
            p_RN.stride(0),
            grad_RN.stride(0),
            METHOD=method_code,
            ROWS=rows,
            BLOCK_N=block_n,
            NEED_K=need_k_grad,
            NEED_TAU=need_tau_grad,
            num_warps=num_warps,
        )
    else:
        for out in (grad_k_R, grad_tau_R):
            if out is not None:
                out.zero_()
    return grad_scores_RN, grad_k_R, grad_tau_R
