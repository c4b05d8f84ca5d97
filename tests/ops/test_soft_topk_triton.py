"""Triton soft top-k kernels against slow references.

Where a GPU is present the kernels run compiled on CUDA tensors. Without one they run on CPU under
Triton's interpreter, which only works if TRITON_INTERPRET=1 was set before `triton` itself was
first imported in the process (the interpreter swaps in its own `tl.*` functions at that point).
So this module sets the variable before anything imports triton and restores the environment
afterwards; if another test module already imported triton in compiled mode (Lightning does),
the interpreter tests are skipped here and re-run by one test in a fresh subprocess instead.

References: a float64 bisection solve written here (200 halvings), finite differences of it for
the gradients, the explicit Jacobian diag(v) - v v^T / sum(v) with v = f'(u) / tau computed from
u (not from p, as the kernel does), and the PyTorch path ``moe_router.soft_topk``.

Shape legend: R rows, N entries per row.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch

_CUDA = torch.cuda.is_available()
_SUBPROCESS_FLAG = "MOE_ROUTER_TRITON_INTERPRETER_SUBPROCESS"


@contextlib.contextmanager
def _interpreter_env():
    """TRITON_INTERPRET=1 inside the block only (triton also reads it lazily at launch time)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not _CUDA and "triton" not in sys.modules:
    with _interpreter_env(), contextlib.suppress(ImportError):
        import triton  # noqa: F401  (decorates triton.language under the interpreter)

        from moe_router.ops import threshold_triton  # noqa: F401

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")

from ops_testing import exact_reference, run_fuzz_case, scale_cases, soft_topk_inputs  # noqa: E402

from moe_router.ops import threshold_triton as kernels  # noqa: E402
from moe_router.ops.soft_topk import soft_topk  # noqa: E402
from moe_router.ops.threshold_torch import THRESHOLD_METHODS, apply_f  # noqa: E402

# The interpreter runs the kernels' guarded divisions and logs with numpy, which warns about the
# branch that tl.where throws away.
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
    # (and about the differences that overflow to +-inf on purpose in rows near the fp32 max)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEVICE = "cuda" if _CUDA else "cpu"
# The small tests run here if the kernels can run in this process.
RUNNABLE = _CUDA or kernels.INTERPRETED
needs_kernels = pytest.mark.skipif(
    not RUNNABLE,
    reason="triton was imported in compiled mode before this module on a machine without CUDA; "
    "test_interpreter_suite_in_subprocess runs these tests",
)


def _mode():
    return contextlib.nullcontext() if _CUDA else _interpreter_env()


def forward(x, k_R, tau_R, method, return_threshold=False, launch=None):
    """The kernel on DEVICE, results back on the CPU."""
    with _mode():
        out = kernels.triton_soft_topk_forward(
            x.to(DEVICE), k_R.to(DEVICE), tau_R.to(DEVICE), method, return_threshold, launch
        )
    return tuple(t.cpu() for t in out) if return_threshold else out.cpu()


def backward(p, g, tau_R, method, need_k=True, need_tau=True, launch=None):
    with _mode():
        out = kernels.triton_soft_topk_backward(
            p.to(DEVICE), g.to(DEVICE), tau_R.to(DEVICE), method, need_k, need_tau, launch
        )
    return tuple(None if t is None else t.cpu() for t in out)


# ----------------------------------------------------------------------------- references


def _f_prime(u, method):
    if method == "sigmoid":
        s = torch.sigmoid(u)
        return s * (1 - s)
    if method == "laplace":
        return 0.5 * torch.exp(-u.abs())
    if method == "exp":
        return torch.where(u < 0, torch.exp(u.clamp(max=0)), 0.0)
    return ((u > 0) & (u < 1)).double()


@contextlib.contextmanager
def _small_tensor_mode():
    """One thread for the references' many tiny ops: on a busy 2-core machine intra-op threads
    turn each of them from microseconds into milliseconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reference_threshold(x_RN, k_R, tau_R, method):
    """lambda (z units) by float64 bisection; -inf for fallback rows, NaN for NaN rows."""
    with _small_tensor_mode():
        return _reference_threshold(x_RN, k_R, tau_R, method)


def _reference_threshold(x_RN, k_R, tau_R, method):
    z = x_RN.double() / tau_R.double()[:, None]
    k = k_R.double()
    nan_row = torch.isnan(z).any(1)
    z = torch.where(torch.isnan(z), float("-inf"), z)
    present = z > float("-inf")
    finite_z = torch.where(present, z, float("nan"))
    lo = torch.nan_to_num(finite_z.nan_to_num(float("inf")).amin(1)) - 60
    hi = torch.nan_to_num(finite_z.nan_to_num(float("-inf")).amax(1)) + 60
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = apply_f(z - mid[:, None], method).sum(1) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    lam = 0.5 * (lo + hi)
    lam = torch.where(present.sum(1) <= k, float("-inf"), lam)
    return torch.where(nan_row, float("nan"), lam)


def reference_forward(x_RN, k_R, tau_R, method):
    z = x_RN.double() / tau_R.double()[:, None]
    lam = reference_threshold(x_RN, k_R, tau_R, method)
    present = z > float("-inf")
    p = apply_f(z - lam[:, None], method)
    fallback = (present.sum(1) <= k_R.double())[:, None]
    p = torch.where(fallback, present.double(), p)
    return torch.where(torch.isnan(lam)[:, None], float("nan"), p)


def reference_grads(x_RN, k_R, tau_R, g_RN, method):
    """(grad_x, grad_k, grad_tau) in float64: explicit Jacobian for x, central differences for
    k and tau."""
    x = x_RN.double()
    tau = tau_R.double()
    lam = reference_threshold(x_RN, k_R, tau_R, method)
    u = x / tau[:, None] - lam[:, None]
    v = torch.nan_to_num(_f_prime(u, method)) / tau[:, None]
    v_sum = v.sum(1, keepdim=True)
    jac = torch.diag_embed(v) - v[:, :, None] * v[:, None, :] / v_sum.clamp_min(1e-300)[:, :, None]
    grad_x = torch.einsum("rij,rj->ri", jac, g_RN.double())
    h = 1e-6
    g = g_RN.double()

    def loss(k_, tau_):
        return torch.nan_to_num(reference_forward(x, k_, tau_, method) * g).sum(1)

    grad_k = (loss(k_R.double() + h, tau) - loss(k_R.double() - h, tau)) / (2 * h)
    grad_tau = (loss(k_R.double(), tau + h) - loss(k_R.double(), tau - h)) / (2 * h)
    return grad_x, grad_k, grad_tau


def finite_difference_grad_x(x_RN, k_R, tau_R, g_RN, method, h=1e-6):
    """d(sum p g)/dx by central differences of the float64 reference, all entries at once."""
    n_rows, n = x_RN.shape
    x = x_RN.double()
    eye = torch.eye(n, dtype=torch.float64)
    x_plus = (x[:, None, :] + h * eye).reshape(n_rows * n, n)  # (R*N, N)
    x_minus = (x[:, None, :] - h * eye).reshape(n_rows * n, n)  # (R*N, N)
    k = k_R.repeat_interleave(n)
    tau = tau_R.repeat_interleave(n)
    g = g_RN.double().repeat_interleave(n, dim=0)
    diff = reference_forward(x_plus, k, tau, method) - reference_forward(x_minus, k, tau, method)
    return ((diff * g).sum(1) / (2 * h)).reshape(n_rows, n)


# ----------------------------------------------------------------------------- inputs


def make_rows(n_rows, n, *, seed, scale=2.0, dtype=torch.float32, k=2.0, per_row_k=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n_rows, n, generator=gen) * scale).to(dtype)
    if per_row_k:
        k_R = torch.rand(n_rows, generator=gen) * (min(n, 6) - 1.2) + 0.6  # fractional, in (0, n)
    else:
        k_R = torch.full((n_rows,), float(k))
    tau_R = torch.rand(n_rows, generator=gen) * 1.5 + 0.5
    return x, k_R, tau_R


FWD_ATOL = 1e-5


def check_forward(x, k_R, tau_R, method):
    p, lam = forward(x, k_R, tau_R, method, return_threshold=True)
    assert p.dtype == torch.float32 and p.shape == x.shape
    p_ref = reference_forward(x, k_R, tau_R, method)
    torch.testing.assert_close(p.double(), p_ref, atol=FWD_ATOL, rtol=0, equal_nan=True)
    ok = ~torch.isnan(p_ref).any(1)
    budget = torch.minimum(k_R.double(), (x.double() > float("-inf")).sum(1).double())
    sum_err = (p.double().sum(1) - budget)[ok].abs()
    assert (sum_err <= 1e-5 * torch.clamp(budget[ok], min=1.0)).all(), sum_err.max()
    lam_ref = reference_threshold(x, k_R, tau_R, method)
    solved = ok & torch.isfinite(lam_ref)
    if method in ("sigmoid", "laplace"):  # strictly increasing f: lambda is unique
        torch.testing.assert_close(lam.double()[solved], lam_ref[solved], atol=1e-4, rtol=1e-5)
    assert torch.equal(torch.isnan(lam), torch.isnan(lam_ref))
    return p


# ----------------------------------------------------------------------------- forward


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("n", [7, 60, 257])
def test_forward_matches_float64_reference(method, n):
    # R not a multiple of the rows per program: ROWS is 128, 32, 4 for these n.
    n_rows = {7: 130, 60: 37, 257: 9}[n]
    x, k_R, tau_R = make_rows(n_rows, n, seed=n, per_row_k=True)
    check_forward(x, k_R, tau_R, method)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("scale", [0.1, 30.0])
def test_forward_flat_and_peaked_rows(method, scale):
    x, k_R, tau_R = make_rows(33, 16, seed=int(scale * 10), scale=scale, k=3.0)
    check_forward(x, k_R, tau_R, method)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_router_like_rows_converge_within_8_iterations(method, monkeypatch):
    """The documented typical budget: 8 iterations per solve suffice for router-like rows."""
    monkeypatch.setattr(kernels, "MAX_ITERS", 8)
    for n, k in [(8, 2.0), (64, 1.0), (64, 8.0), (256, 8.0)]:
        x, k_R, tau_R = make_rows(9, n, seed=n + int(k), scale=3.0, k=k)
        check_forward(x, k_R, tau_R, method)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_hard_rows_large_k_wide_spread(method):
    """k close to N on widely spread rows, where 8 iterations are not enough for exp / laplace:
    the cap and the bisection steps must still get there."""
    x, k_R, tau_R = make_rows(6, 40, seed=17, scale=10.0, k=37.5)
    check_forward(x, k_R, tau_R, method)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_precision_inputs(method, dtype):
    x, k_R, tau_R = make_rows(20, 24, seed=3, dtype=dtype, per_row_k=True)
    check_forward(x, k_R, tau_R, method)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_forward_masks_fallback_and_nan(method):
    x, k_R, tau_R = make_rows(8, 12, seed=5, k=2.5)
    x[0, 3] = float("-inf")
    x[1, :6] = float("-inf")
    x[2, 2:] = float("-inf")  # 2 entries left for k = 2.5: fallback, both get 1
    x[3, :] = float("-inf")  # nothing left
    x[4, 7] = float("nan")
    x[5, 3:] = float("-inf")  # 3 entries for k = 2.5: solved
    p = check_forward(x, k_R, tau_R, method)
    assert torch.equal(p[x == float("-inf")], torch.zeros_like(p[x == float("-inf")]))
    assert torch.equal(p[2], torch.tensor([1.0, 1.0] + [0.0] * 10))
    assert torch.equal(p[3], torch.zeros(12))
    assert torch.isnan(p[4]).all()
    assert not torch.isnan(p[torch.arange(8) != 4]).any()


@needs_kernels
def test_forward_threshold_units_and_fallback_value():
    x, k_R, tau_R = make_rows(5, 9, seed=11, k=2.0)
    x[4, 1:] = float("-inf")
    p, lam = forward(x, k_R, tau_R, "laplace", return_threshold=True)
    z = x.double() / tau_R.double()[:, None]
    torch.testing.assert_close(
        p[:4].double(), apply_f(z[:4] - lam[:4, None].double(), "laplace"), atol=1e-6, rtol=0
    )
    assert lam[4] == float("-inf")


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_forward_matches_torch_path(method):
    x, k_R, tau_R = make_rows(19, 33, seed=7, k=3.0)
    p = forward(x, k_R, tau_R, method)
    with _small_tensor_mode():
        p_torch = soft_topk(x.double(), 3, tau=tau_R.double(), method=method)
    torch.testing.assert_close(p.double(), p_torch.double(), atol=2e-5, rtol=0)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_exact_in_the_rows_own_frame_at_any_scale(method):
    """As the PyTorch and C++ paths: 1e-5 against a 100-digit solve on the same fp32 values,
    for logits near 1e8 or 3e38, rows spanning the fp32 range, and tau from 1e-45 to 1e30."""
    for name, row, k, tau in scale_cases():
        x = row.float().unsqueeze(0)
        tau = torch.tensor(tau).float().item()
        p = forward(x, torch.tensor([float(k)]), torch.tensor([tau]), method)[0].double()
        assert abs(p.sum().item() - k) <= 1e-5 * max(k, 1), name
        expected = exact_reference(row.float(), k, tau, method)
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=0, msg=name)


@needs_kernels
@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    case=soft_topk_inputs(
        methods=THRESHOLD_METHODS, backends=("triton",), dtypes=(torch.float32, torch.float16)
    )
)
def test_fuzz_public_op(case):
    """The fuzz harness of test_soft_topk_fuzz.py through backend="triton": a clear error or
    the contract's result, equal to the PyTorch backend's."""
    with _mode():
        run_fuzz_case(case, DEVICE)


@needs_kernels
def test_forward_row_stride():
    x, k_R, tau_R = make_rows(10, 40, seed=2)
    p_view = forward(x[:, :30], k_R, tau_R, "exp")
    p_copy = forward(x[:, :30].contiguous(), k_R, tau_R, "exp")
    assert torch.equal(p_view, p_copy)


@needs_kernels
@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(THRESHOLD_METHODS),
    n=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    shift=st.floats(-50, 50),
    scale=st.floats(0.05, 8.0),
)
def test_invariants(method, n, seed, shift, scale):
    """p in [0, 1], sums to k, is monotone in x within a row and invariant to x + c."""
    x, k_R, tau_R = make_rows(5, n, seed=seed, scale=scale, per_row_k=True)
    k_R = torch.clamp(k_R, max=n - 0.5)
    p = forward(x, k_R, tau_R, method)
    p_shifted = forward(x + shift, k_R, tau_R, method)
    assert ((p >= 0) & (p <= 1)).all()
    assert ((p.double().sum(1) - k_R.double()).abs() <= 1e-5 * k_R.clamp(min=1)).all()
    order = torch.argsort(x, dim=1)
    assert (torch.diff(p.gather(1, order), dim=1) >= -1e-6).all()
    # |x + shift| up to ~60 / tau: allow the fp32 rounding of the shifted scores.
    torch.testing.assert_close(p_shifted, p, atol=2e-5 * (1 + abs(shift) / 10), rtol=0)


# ----------------------------------------------------------------------------- backward


def run_backward(x, k_R, tau_R, g, method):
    p = forward(x, k_R, tau_R, method)
    return backward(p, g, tau_R, method)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("n", [7, 60])
def test_backward_matches_finite_differences(method, n):
    n_rows = {7: 130, 60: 5}[n]
    x, k_R, tau_R = make_rows(n_rows, n, seed=100 + n, per_row_k=True)
    g = torch.randn(n_rows, n, generator=torch.Generator().manual_seed(1))
    grad_x, grad_k, grad_tau = run_backward(x, k_R, tau_R, g, method)
    ref_x, ref_k, ref_tau = reference_grads(x, k_R, tau_R, g, method)
    fd_x = finite_difference_grad_x(x, k_R, tau_R, g, method)
    torch.testing.assert_close(ref_x, fd_x, atol=1e-5, rtol=1e-4)  # the reference itself
    torch.testing.assert_close(grad_x.double(), ref_x, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad_k.double(), ref_k, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad_tau.double(), ref_tau, atol=5e-5, rtol=1e-3)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_backward_half_precision_and_wide_rows(method):
    x, k_R, tau_R = make_rows(6, 257, seed=9, dtype=torch.bfloat16, k=4.0)
    g = torch.randn(6, 257, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    grad_x, grad_k, grad_tau = run_backward(x, k_R, tau_R, g, method)
    ref_x, ref_k, ref_tau = reference_grads(x, k_R, tau_R, g, method)
    torch.testing.assert_close(grad_x.double(), ref_x, atol=5e-5, rtol=1e-3)
    torch.testing.assert_close(grad_k.double(), ref_k, atol=5e-5, rtol=1e-3)
    torch.testing.assert_close(grad_tau.double(), ref_tau, atol=2e-4, rtol=2e-3)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_backward_masks_fallback_and_nan(method):
    # Fractional k: with an integer k sparse rows can sit on a flat piece (no entry strictly
    # between 0 and 1), where p is not differentiable in k and finite differences disagree.
    x, k_R, tau_R = make_rows(6, 10, seed=21, k=2.5)
    x[0, 4] = float("-inf")
    x[1, 2:] = float("-inf")  # fallback row: sum v = 0
    x[2, 5] = float("nan")
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    grad_x, grad_k, grad_tau = run_backward(x, k_R, tau_R, g, method)
    assert grad_x[0, 4] == 0
    assert torch.equal(grad_x[1], torch.zeros(10))
    assert grad_k[1] == 0 and grad_tau[1] == 0
    assert torch.isnan(grad_x[2]).all() and torch.isnan(grad_k[2]) and torch.isnan(grad_tau[2])
    clean = torch.tensor([0, 3, 4, 5])
    ref_x, ref_k, ref_tau = reference_grads(x[clean], k_R[clean], tau_R[clean], g[clean], method)
    torch.testing.assert_close(grad_x[clean].double(), ref_x, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad_k[clean].double(), ref_k, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad_tau[clean].double(), ref_tau, atol=5e-5, rtol=1e-3)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_backward_matches_torch_path_autograd(method):
    x, k_R, tau_R = make_rows(11, 20, seed=13, k=3.0)
    g = torch.randn(11, 20, generator=torch.Generator().manual_seed(4))
    grad_x, _, grad_tau = run_backward(x, k_R, tau_R, g, method)
    x64 = x.double().requires_grad_(True)
    tau64 = tau_R.double().requires_grad_(True)
    with _small_tensor_mode():
        p_torch = soft_topk(x64, 3, tau=tau64, method=method)
        torch_x, torch_tau = torch.autograd.grad((p_torch * g.double()).sum(), (x64, tau64))
    torch.testing.assert_close(grad_x.double(), torch_x, atol=5e-5, rtol=1e-3)
    torch.testing.assert_close(grad_tau.double(), torch_tau, atol=2e-4, rtol=2e-3)


@needs_kernels
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_results_do_not_depend_on_the_launch_tile(method, monkeypatch):
    """Rows are independent: a tuning sweep's (ROWS, num_warps) changes the tiling, not p or
    the gradients (20 rows: tiles of 1, 4 and 32 rows, partial last tiles included). Within
    rounding: on a GPU the warps split a row's sums differently. The launches are recorded, to
    check that the tile asked for is the one launched."""
    launches = []
    traceable = kernels._traceable

    def recording(kernel):
        def at(grid):
            def launch_kernel(*args, **kwargs):
                launches.append((grid, kwargs["ROWS"], kwargs["num_warps"]))
                return traceable(kernel)[grid](*args, **kwargs)

            return launch_kernel

        return type("Recording", (), {"__getitem__": lambda self, grid: at(grid)})()

    monkeypatch.setattr(kernels, "_traceable", recording)
    x, k_R, tau_R = make_rows(20, 12, seed=3, per_row_k=True)
    x[5, :4] = float("-inf")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    p, lam = forward(x, k_R, tau_R, method, return_threshold=True)
    grads = backward(p, g, tau_R, method)
    assert [rows for _, rows, _ in launches] == [kernels._launch_config(12)[1]] * 2
    for launch in [(1, 1), (4, 2), (32, 8)]:
        launches.clear()
        p_tile, lam_tile = forward(x, k_R, tau_R, method, return_threshold=True, launch=launch)
        torch.testing.assert_close(p_tile, p, atol=2e-6, rtol=0)
        torch.testing.assert_close(lam_tile, lam, atol=2e-6, rtol=1e-6)
        for ours, ref in zip(backward(p, g, tau_R, method, launch=launch), grads, strict=True):
            torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
        rows, warps = launch
        assert launches == [((-(-20 // rows),), rows, warps)] * 2  # forward, backward


@needs_kernels
@pytest.mark.parametrize(
    "launch", [(3, 4), (0, 4), (256, 4), (8, 3), (8, 32), (8.0, 4), (8,), (8, 4, 1), 8]
)
def test_bad_launch_tile_is_rejected(launch):
    x, k_R, tau_R = make_rows(4, 8, seed=1)
    with pytest.raises(ValueError, match=r"launch=.*ROWS a power of two"):
        forward(x, k_R, tau_R, "exp", launch=launch)
    with pytest.raises(ValueError, match=r"launch=.*ROWS a power of two"):
        backward(x, x, tau_R, "exp", launch=launch)


@needs_kernels
def test_backward_optional_outputs_are_none():
    x, k_R, tau_R = make_rows(4, 8, seed=1)
    p = forward(x, k_R, tau_R, "sigmoid")
    grad_x, grad_k, grad_tau = backward(p, torch.ones_like(p), tau_R, "sigmoid", False, False)
    assert grad_k is None and grad_tau is None
    torch.testing.assert_close(grad_x, torch.zeros_like(grad_x), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- API


@needs_kernels
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "iterative"}, "method='iterative'"),
        ({"scores_RN": torch.zeros(2, 3, 4)}, "2-D"),
        ({"scores_RN": torch.zeros(2, kernels.MAX_N + 1)}, f"at most {kernels.MAX_N}"),
        ({"scores_RN": torch.zeros(2, 4, dtype=torch.float64)}, "float64"),
        ({"scores_RN": torch.zeros(4, 2).t()}, "unit stride"),
        ({"k_R": torch.ones(3)}, "k_R must have shape"),
    ],
)
def test_forward_rejects_bad_input(kwargs, match):
    args = {"x": torch.zeros(2, 4), "k_R": torch.ones(2), "tau_R": torch.ones(2), "method": "exp"}
    if "scores_RN" in kwargs:
        kwargs["x"] = kwargs.pop("scores_RN")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        forward(**args)


def test_compiled_kernels_refuse_cpu_tensors():
    if kernels.INTERPRETED:
        pytest.skip("the kernels in this process are interpreted")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.triton_soft_topk_forward(torch.zeros(2, 4), torch.ones(2), torch.ones(2), "exp")


def test_is_supported_only_for_cuda_threshold_methods():
    cpu = torch.zeros(3, 8)
    assert not kernels.is_supported(cpu, "sigmoid")  # CPU: the PyTorch path
    if _CUDA:
        assert kernels.is_supported(cpu.cuda(), "sigmoid")
        assert kernels.is_supported(cpu.cuda().bfloat16(), "sparse")
        assert not kernels.is_supported(cpu.cuda(), "iterative")
        assert not kernels.is_supported(cpu.cuda().double(), "exp")
        assert not kernels.is_supported(torch.zeros(2, kernels.MAX_N + 1, device="cuda"), "exp")


@needs_kernels
def test_empty_input():
    p, lam = forward(torch.zeros(0, 5), torch.ones(0), torch.ones(0), "exp", True)
    assert p.shape == (0, 5) and lam.shape == (0,)


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_router.ops import threshold_triton as kernels
assert not kernels.INTERPRETED
fwd = {name: "*fp32" for name in ("k_ptr", "tau_ptr", "p_ptr", "lam_ptr")}
fwd.update({"x_ptr": "*bf16", "R": "i32", "N": "i32", "stride_x": "i32"})
fwd.update({c: "constexpr" for c in ("METHOD", "ROWS", "BLOCK_N", "ITERS", "WRITE_LAM")})
bwd = {name: "*fp32" for name in ("p_ptr", "tau_ptr", "gx_ptr", "gk_ptr", "gtau_ptr")}
bwd.update({"g_ptr": "*bf16", "R": "i32", "N": "i32", "stride_p": "i32", "stride_g": "i32"})
bwd.update({c: "constexpr" for c in ("METHOD", "ROWS", "BLOCK_N", "NEED_K", "NEED_TAU")})
target = GPUTarget("cuda", 90, 32)
sources = [
    ASTSource(fn=kernels._soft_topk_fwd_kernel, signature=fwd, constexprs={
        "METHOD": method, "ROWS": 32, "BLOCK_N": 64, "ITERS": 8, "WRITE_LAM": True})
    for method in (0, 3)  # sigmoid runs the laplace solve too; sparse has its own walk
]
sources.append(ASTSource(fn=kernels._soft_topk_bwd_kernel, signature=bwd, constexprs={
    "METHOD": 1, "ROWS": 32, "BLOCK_N": 64, "NEED_K": True, "NEED_TAU": True}))
for source in sources:
    assert "cubin" in triton.compile(source, target=target).asm
print("compiled")
"""


def _run_python(args, env_update, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter is lenient; this runs Triton's real frontend and backend down to a cubin
    (in a fresh process, so that it works whatever mode triton is in here)."""
    result = _run_python(["-c", _COMPILE_SCRIPT], {}, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout + result.stderr


def test_interpreter_suite_in_subprocess():
    if RUNNABLE or os.environ.get(_SUBPROCESS_FLAG):
        pytest.skip("the kernel tests run in this process")
    result = _run_python(
        [
            "-m",
            "pytest",
            __file__,
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not gpu",
            "-k",
            "not subprocess and not sm90",
        ],
        {"TRITON_INTERPRET": "1", _SUBPROCESS_FLAG: "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


# ----------------------------------------------------------------------------- GPU, full size


@pytest.mark.gpu
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize(("n_rows", "n"), [(1_000_000, 64), (100_000, 8), (20_000, 257)])
def test_gpu_full_size_against_torch_path(method, n_rows, n):
    torch.manual_seed(0)
    x = torch.randn(n_rows, n, device="cuda") * 2
    x[::97, 3] = float("-inf")
    k_R = torch.rand(n_rows, device="cuda") * 3 + 1
    tau_R = torch.rand(n_rows, device="cuda") + 0.5
    p = kernels.triton_soft_topk_forward(x, k_R, tau_R, method)
    x64 = x.double().requires_grad_(True)
    tau64 = tau_R.double().requires_grad_(True)
    p_ref = soft_topk(x64, k_R.double(), tau=tau64, method=method)
    torch.testing.assert_close(p.double(), p_ref.detach(), atol=FWD_ATOL, rtol=0)
    sum_err = (p.double().sum(1) - k_R.double()).abs()
    assert (sum_err <= 1e-5 * k_R.double().clamp(min=1)).all()
    g = torch.randn_like(p)
    grad_x, _, grad_tau = kernels.triton_soft_topk_backward(p, g, tau_R, method, False, True)
    ref_x, ref_tau = torch.autograd.grad((p_ref * g.double()).sum(), (x64, tau64))
    # sparse: v = 1[0 < p < 1] jumps where p touches 0 or 1. Among 10^7 fp32 entries a few sit
    # within rounding of such a kink, where fp32 and fp64 legitimately pick different sides
    # (the gradient is discontinuous there). Those rows must be rare and truly at a kink; all
    # other rows must match.
    same_support_R = torch.ones(n_rows, dtype=torch.bool, device="cuda")
    if method == "sparse":
        v, v_ref = (p > 0) & (p < 1), (p_ref > 0) & (p_ref < 1)
        differ = v != v_ref
        same_support_R = ~differ.any(1)
        p_at = p_ref.detach()[differ]
        assert (torch.minimum(p_at, 1 - p_at) <= FWD_ATOL).all(), p_at
        assert int((~same_support_R).sum()) <= max(1, n_rows // 100_000)
    torch.testing.assert_close(
        grad_x.double()[same_support_R], ref_x[same_support_R], atol=5e-5, rtol=1e-3
    )
    torch.testing.assert_close(
        grad_tau.double()[same_support_R], ref_tau[same_support_R], atol=2e-4, rtol=2e-3
    )


@pytest.mark.gpu
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_gpu_half_inputs(method):
    torch.manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(50_000, 64, device="cuda").to(dtype)
        k_R = torch.full((50_000,), 2.0, device="cuda")
        tau_R = torch.ones(50_000, device="cuda")
        p = kernels.triton_soft_topk_forward(x, k_R, tau_R, method)
        p_ref = soft_topk(x.double(), 2, method=method)
        torch.testing.assert_close(p.double(), p_ref, atol=FWD_ATOL, rtol=0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    x = torch.randn(4096, 64, device="cuda")
    k_R = torch.full((4096,), 2.0, device="cuda")
    tau_R = torch.ones(4096, device="cuda")
    g = torch.randn(4096, 64, device="cuda")
    for method in THRESHOLD_METHODS:  # compile outside the capture
        p = kernels.triton_soft_topk_forward(x, k_R, tau_R, method)
        kernels.triton_soft_topk_backward(p, g, tau_R, method, True, True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        p = kernels.triton_soft_topk_forward(x, k_R, tau_R, "sigmoid")
        grad_x, grad_k, grad_tau = kernels.triton_soft_topk_backward(
            p, g, tau_R, "sigmoid", True, True
        )
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    p_eager = kernels.triton_soft_topk_forward(x, k_R, tau_R, "sigmoid")
    assert torch.equal(p, p_eager)


@pytest.mark.gpu
def test_gpu_wrappers_trace_inside_triton_op_under_torch_compile():
    """The wrappers launch through wrap_triton, so a triton_op around them compiles fullgraph."""
    from torch.library import triton_op

    @triton_op("moe_router_tests::triton_soft_topk_sigmoid", mutates_args=())
    def soft_topk_sigmoid(x: torch.Tensor, k: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return kernels.triton_soft_topk_forward(x, k, tau, "sigmoid")

    x = torch.randn(1000, 64, device="cuda")
    k_R = torch.full((1000,), 2.0, device="cuda")
    tau_R = torch.ones(1000, device="cuda")
    compiled = torch.compile(lambda x, k, tau: soft_topk_sigmoid(x, k, tau) * 2, fullgraph=True)
    eager = kernels.triton_soft_topk_forward(x, k_R, tau_R, "sigmoid") * 2
    torch.testing.assert_close(compiled(x, k_R, tau_R), eager)
