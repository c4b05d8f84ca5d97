"""Shared pieces of the ops tests: slow references that are right at any scale, the rows
that stress them, and the fuzz harness of the public op (its strategy and its oracle).

Shape legend: R rows, N entries per row.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import strategies as st

from moe_router import soft_topk
from moe_router.ops.reference import GRAD_MAX_SPREAD
from moe_router.ops.soft_topk import REFERENCE_METHODS, THRESHOLD_METHODS

# The marks of a module whose tests call the C++ kernels' ops directly (`pytestmark =
# NEEDS_CPP_KERNELS`): skipped without a compiler, the kernels built first (conftest.py).
NEEDS_CPP_KERNELS = [
    pytest.mark.skipif(
        shutil.which("c++") is None and shutil.which("g++") is None,
        reason="no C++ compiler to build the kernels with",
    ),
    pytest.mark.usefixtures("cpp_kernels"),
]


def exact_reference(row: torch.Tensor, k: float, tau: float, method: str) -> torch.Tensor:
    """p of one row by bisection on the threshold in 100-digit arithmetic (mpmath), from the
    exact values of the row's floats: slow, and right at any scale (300 halvings of the
    bracket reach below 1e-45 tau even for a row spanning the whole fp32 range)."""
    import mpmath

    def f(u):
        if method == "sigmoid":
            return 1 / (1 + mpmath.exp(-u))
        if method == "laplace":
            return 1 - mpmath.exp(-u) / 2 if u >= 0 else mpmath.exp(u) / 2
        if method == "exp":
            return min(mpmath.mpf(1), mpmath.exp(u))
        return min(mpmath.mpf(1), max(mpmath.mpf(0), u))

    with mpmath.workdps(100):
        values = [mpmath.mpf(v) for v in row.tolist() if v > -math.inf]
        scale = mpmath.mpf(tau)
        lo, hi = min(values) - 80 * scale, max(values) + 80 * scale
        for _ in range(300):
            mid = (lo + hi) / 2
            if sum(f((v - mid) / scale) for v in values) > k:
                lo = mid
            else:
                hi = mid
        theta = (lo + hi) / 2
        p = [
            float(f((mpmath.mpf(v) - theta) / scale)) if v > -math.inf else 0.0
            for v in row.tolist()
        ]
    return torch.tensor(p, dtype=torch.float64)


def stress_rows(num_entries: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows for every branch: several scales, heavy ties, all equal, values spaced by exactly 1
    (the kinks of `sparse` coincide), -inf masks, one NaN row and one +inf row."""
    gen = torch.Generator().manual_seed(seed)
    n = num_entries
    rows = [torch.randn(n, generator=gen) * scale for scale in (1e-3, 0.1, 1.0, 10.0, 1e3)]
    rows.append(torch.randint(0, 3, (n,), generator=gen).float())
    rows.append(torch.zeros(n))
    rows.append(torch.arange(n).float().flip(0))
    masked = torch.randn(n, generator=gen)
    masked[::3] = -math.inf
    rows.append(masked)
    with_nan = torch.randn(n, generator=gen)
    with_nan[n // 2] = math.nan
    rows.append(with_nan)
    with_inf = torch.randn(n, generator=gen)
    with_inf[0] = math.inf
    rows.append(with_inf)
    return torch.stack(rows).to(dtype)


def scale_cases() -> list[tuple[str, torch.Tensor, float, float]]:
    """(name, fp32 row, k, tau): rows whose scale, spread or temperature would lose the
    threshold in a frame far from it (the row max, or z = x / tau)."""
    gen = torch.Generator().manual_seed(21)
    noise = torch.randn(12, generator=gen)
    rows = [
        ("equal at 1e8", torch.full((8,), 1e8), 2, 1.0),
        ("equal at 1e6", torch.full((8,), 1e6), 2, 1.0),
        ("equal at -1e30", torch.full((6,), -1e30), 2.5, 1.0),
        ("wide gap", torch.tensor([1e8, -1e8, 1.0, 2.0, 0.0, -1.0]), 2, 1.0),
        ("near the fp32 max", torch.tensor([3e38, -1e38, -1.5e38, -2e38]), 2, 1.0),
        ("far above a cluster", torch.cat([torch.tensor([3e38]), noise]), 3.5, 1.0),
        ("offset cluster", 1e6 + noise * 8, 3.5, 1.0),
        ("large logits, tau 0.3", noise * 1e4, 4.5, 0.3),
        ("threshold far below the max", torch.cat([torch.tensor([1e7]), noise * 0.5]), 3, 1.0),
        ("tiny tau", noise, 3.5, 1e-10),
        ("tiny tau, integer k", noise, 3, 1e-10),
        ("subnormal tau", noise, 3.5, 1e-45),
        ("huge tau", noise, 2.5, 1e30),
    ]
    return rows


# ------------------------------------------------------------------------------ fuzz harness

METHODS = THRESHOLD_METHODS + REFERENCE_METHODS
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ARGUMENT_NAMES = ("k", "tau", "dim", "method", "backend", "scores")

ROW_KINDS = ("normal", "equal", "ties", "wide", "masked", "all_masked", "nan", "posinf")
SCALES = (1e-30, 1e-3, 1.0, 30.0, 1e4, 1e8, 1e30, 3e38)


@st.composite
def rows(draw, num_entries: int) -> list[float]:
    """One row of `num_entries` scores (float64 values; the dtype cast comes later)."""
    kind = draw(st.sampled_from(ROW_KINDS))
    scale = draw(st.sampled_from(SCALES))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(num_entries, generator=gen, dtype=torch.float64) * scale).clamp(
        -3.4e38, 3.4e38
    )
    if kind == "equal":
        values = torch.full((num_entries,), draw(st.sampled_from((0.0, 1e8, -1e30, 5.0))))
    elif kind == "ties":
        values = torch.randint(0, 3, (num_entries,), generator=gen).double() * scale
    elif kind == "wide":
        ends = torch.tensor([3e38, -3e38, 1e8, -1e8, 1.0, 0.0], dtype=torch.float64)
        values = ends[torch.randint(0, 6, (num_entries,), generator=gen)]
        values = values + torch.randn(num_entries, generator=gen, dtype=torch.float64)
    elif kind == "masked":
        values[torch.rand(num_entries, generator=gen) < 0.4] = -math.inf
    elif kind == "all_masked":
        values[:] = -math.inf
    elif kind in ("nan", "posinf") and num_entries > 0:
        values[draw(st.integers(0, num_entries - 1))] = math.nan if kind == "nan" else math.inf
    return values.tolist()


def _number_k(draw, n: int):
    valid = [k for k in (0.5, 1, 2, 2.5, n - 1, n - 0.5) if 0 < k < n]
    if valid and draw(st.integers(0, 9)) < 7:
        return draw(st.sampled_from(valid))
    return draw(st.sampled_from([0, -1, n, n + 1, math.nan, math.inf, True]))


@st.composite
def soft_topk_inputs(draw, methods=METHODS, backends=("auto", "torch", "cpp"), dtypes=DTYPES):
    """Keyword arguments of one soft_topk call (CPU tensors): see test_soft_topk_fuzz.py."""
    # (9 and 17 rows: whole blocks of 8 for the C++ narrow path, and a remainder)
    num_rows = draw(st.sampled_from((0, 1, 2, 3, 9, 17)))
    num_entries = draw(st.sampled_from((0, 1, 2, 3, 5, 8, 13)))
    leading = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    scores_RN = torch.tensor(
        [draw(rows(num_entries)) for _ in range(num_rows)], dtype=torch.float64
    ).reshape(num_rows, num_entries)
    if leading:  # (R, N) -> (N, R, 1) with dim = 0: selection along a leading dim
        scores = scores_RN.t().unsqueeze(-1).to(dtype)
        dim = 0
    else:
        scores = scores_RN.to(dtype)
        dim = draw(st.sampled_from((-1, 1)))
    if draw(st.booleans()):
        k = _number_k(draw, num_entries)
    else:
        budgets = [
            draw(
                st.sampled_from(
                    (0.0, -1.0, 0.5, 1.0, 2.5, num_entries, num_entries + 1.0, math.nan, math.inf)
                )
            )
            for _ in range(num_rows)
        ]
        k = torch.tensor(budgets, dtype=torch.float64)
        # float, int or (rarely) bool tensor
        k = draw(st.sampled_from((k, k, k, k.nan_to_num(0.0).round().long(), k > 1)))
        if leading:
            k = k.unsqueeze(-1)  # batch shape (R, 1)
    good_taus = (1.0, 1.0, 0.3, 3.0, 1e-45, 1e-10, 1e30)
    bad_taus = (0.0, -1.0, math.inf, math.nan)
    bad_tau = draw(st.integers(0, 9)) == 0  # one in ten

    def draw_tau():
        return draw(st.sampled_from(bad_taus if bad_tau else good_taus))

    if draw(st.booleans()):
        tau = draw_tau()
    else:
        tau_R = torch.tensor([draw_tau() for _ in range(num_rows)], dtype=torch.float64)
        tau = tau_R.unsqueeze(-1) if leading else tau_R
    method = draw(st.sampled_from(methods))
    usable = [b for b in backends if method in THRESHOLD_METHODS or b in ("auto", "torch")]
    # (a reference method with a threshold-only backend: an error, one in twenty)
    if not usable or draw(st.integers(0, 19)) == 0:
        usable = list(backends)
    backend = draw(st.sampled_from(usable))
    return dict(scores=scores, k=k, tau=tau, dim=dim, method=method, backend=backend)


# ------------------------------------------------------------------------------ the oracle


def as_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[R, N]: the rows along `dim` (R spelled out: -1 is ambiguous for N = 0)."""
    moved = t.movedim(dim, -1)
    return moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])


def expected_error(case: dict) -> str | None:
    """The argument the documented contract rejects, or None (CPU tensors).

    Errors that need the values of a tensor (tensor tau, a number k with too few finite
    scores, the "grad" method's spread) end in "(values)": the contract makes those checks on
    CPU only, since on CUDA they would be a device sync.
    """
    scores, k, tau, method, backend = (
        case[name] for name in ("scores", "k", "tau", "method", "backend")
    )
    n = scores.shape[case["dim"]]
    if backend in ("cpp", "triton") and method in REFERENCE_METHODS:
        return "backend"
    if torch.is_tensor(k):
        if k.dtype == torch.bool:
            return "k"
    elif isinstance(k, bool) or not 0 < k < n:
        return "k"
    elif method in REFERENCE_METHODS and k != int(k):
        return "k"
    if torch.is_tensor(tau):
        tau_fp = tau.to(scores.dtype if scores.dtype == torch.float64 else torch.float32)
        if tau_fp.numel() > 0 and not bool(((tau_fp > 0) & torch.isfinite(tau_fp)).all()):
            return "tau (values)"
    elif not 0 < tau < math.inf:
        return "tau"
    rows_RN = as_rows(scores, case["dim"]).double()
    good_R = ~(torch.isnan(rows_RN) | torch.isposinf(rows_RN)).any(-1)
    finite_R = (rows_RN > -math.inf).sum(-1)
    if not torch.is_tensor(k):  # a number k needs more than k finite scores per good row
        budget = round(k) if method in REFERENCE_METHODS else k
        if bool((good_R & (finite_R <= budget)).any()):
            return "k (values)"
    if method == "grad" and rows_RN.numel() > 0:  # and it holds k only within a spread
        k_R = per_row(k, rows_RN.shape[0]).round()
        tau_R = per_row(tau, rows_RN.shape[0])
        finite_RN = rows_RN > -math.inf
        spread_R = (
            torch.where(finite_RN, rows_RN, -math.inf).amax(-1)
            - torch.where(finite_RN, rows_RN, math.inf).amin(-1)
        ) / tau_R
        solved_R = good_R & (finite_R > k_R) & (k_R > 0)
        if bool((solved_R & (spread_R > GRAD_MAX_SPREAD)).any()):
            return "method (values)"
    return None


def per_row(value, num_rows: int) -> torch.Tensor:
    """k or tau as [R] float64 values."""
    value_R = (value if torch.is_tensor(value) else torch.tensor(float(value))).double()
    return value_R.reshape(-1) if value_R.numel() == num_rows else value_R.expand(num_rows)


def check_result(case: dict, p: torch.Tensor) -> None:
    """Assert the contract's result for `case` on p, row by row (see test_soft_topk_fuzz.py)."""
    scores, k, method = case["scores"], case["k"], case["method"]
    dim = case["dim"]
    assert p.shape == scores.shape and p.dtype == scores.dtype
    n = scores.shape[dim]
    rows_RN = as_rows(scores, dim).double()
    p_RN = as_rows(p, dim).double()
    k_R = per_row(k, rows_RN.shape[0])
    if method in REFERENCE_METHODS:
        k_R = k_R.round()
    low_precision = scores.dtype in (torch.float16, torch.bfloat16)
    for row, p_N, budget in zip(rows_RN, p_RN, k_R.tolist(), strict=True):
        if bool((torch.isnan(row) | torch.isposinf(row)).any()) or math.isnan(budget):
            assert torch.isnan(p_N).all(), (row, p_N)
            continue
        assert torch.isfinite(p_N).all(), (row, budget, p_N)
        finite_N = row > -math.inf
        assert (p_N[~finite_N] == 0).all()
        if budget <= 0:
            assert (p_N == 0).all()
            continue
        if finite_N.sum() <= budget:
            assert torch.equal(p_N, finite_N.double())
            continue
        assert (p_N >= 0).all()
        if method != "iterative":
            assert (p_N <= 1).all()
        # fp16 / bf16: each p is rounded to 2^-11 / 2^-8 relative
        tol = n * 2.0**-7 if low_precision else 1e-5 * max(budget, 1)
        assert abs(p_N.sum().item() - budget) <= tol, (row, budget, p_N)


def run_fuzz_case(case: dict, device: str = "cpu") -> str:
    """Run soft_topk on `case` (moved to `device`) and check it against the oracle.

    Returns:
        What happened, for hypothesis' statistics: "ValueError (<argument>)" or "result".
    """
    error = expected_error(case)
    on_device = {
        name: value.to(device) if torch.is_tensor(value) else value for name, value in case.items()
    }
    if error is not None and error.endswith("(values)") and device != "cpu":
        if not error.startswith("k"):  # unchecked off CPU, and the result is not specified
            soft_topk(**on_device)
            return f"unchecked off CPU: {error}"
        error = None  # rows short of finite scores take the documented fallback, checked below
    if error is not None:
        with pytest.raises(ValueError) as info:
            soft_topk(**on_device)
        message = str(info.value)
        assert any(
            f"{name}=" in message or message.startswith(f"{name} ") for name in ARGUMENT_NAMES
        )
        return f"ValueError ({error})"
    scores = on_device["scores"].clone().requires_grad_()
    p = soft_topk(**{**on_device, "scores": scores})
    check_result(case, p.detach().cpu())
    if case["method"] in THRESHOLD_METHODS and case["backend"] != "torch":
        expected = soft_topk(**{**case, "backend": "torch"})
        atol = 1e-5 if scores.dtype in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(p.detach().cpu(), expected, atol=atol, rtol=0, equal_nan=True)
    # The gradient of a good row has no NaN (that of a NaN row is NaN), and is finite unless
    # 1 / tau itself overflows the dtype (dp/dx = f' / tau: +-inf is the honest value there).
    weights = torch.linspace(-1, 1, p.numel(), dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad(
        (p.double().nan_to_num(0.0) * weights.reshape(p.shape)).sum(), scores
    )
    grad_RN = as_rows(grad.cpu(), case["dim"])
    good_R = ~torch.isnan(as_rows(p.detach().cpu(), case["dim"])).any(-1)
    assert not torch.isnan(grad_RN[good_R]).any()
    tau = case["tau"]
    if torch.is_tensor(tau):
        smallest_tau = float(tau.min()) if tau.numel() else 1.0
    else:
        smallest_tau = tau
    if smallest_tau >= 1e-20 and scores.dtype in (torch.float32, torch.float64):
        assert torch.isfinite(grad_RN[good_R]).all()
    return "result"
