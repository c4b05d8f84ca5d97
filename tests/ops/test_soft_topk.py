"""Tests for moe_router.soft_topk against slow, obvious references.

The reference threshold is a float64 bisection with 200 steps on sum_i f(z_i - lam) = k: slow,
and obviously right.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_testing import exact_reference, scale_cases
from torch.autograd import gradcheck, gradgradcheck

from moe_router import soft_topk
from moe_router.ops.soft_topk import METHODS, REFERENCE_METHODS, THRESHOLD_METHODS
from moe_router.ops.threshold_torch import apply_f

# the two CPU implementations of the threshold methods: the PyTorch path and the C++ kernels
CPU_BACKENDS = ["torch", "cpp"]


def bisection_reference(scores: torch.Tensor, k, tau: float, method: str) -> torch.Tensor:
    """p = f(z - lam) with lam from 200 bisection steps in float64 (rows along the last dim)."""
    z = scores.double() / tau
    k = torch.as_tensor(k, dtype=torch.float64).expand(z.shape[:-1])
    finite = torch.isfinite(z)
    lo = torch.where(finite, z, math.inf).amin(-1) - 60
    hi = torch.where(finite, z, -math.inf).amax(-1) + 60
    for _ in range(200):
        mid = (lo + hi) / 2
        too_low = apply_f(z - mid.unsqueeze(-1), method).sum(-1) > k
        lo, hi = torch.where(too_low, mid, lo), torch.where(too_low, hi, mid)
    return apply_f(z - ((lo + hi) / 2).unsqueeze(-1), method)


def hard_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


# ------------------------------------------------------------------------------ forward accuracy


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize(
    ("num_entries", "k"),
    [(8, 2), (64, 8), (256, 8), (64, 1), (64, 32), (64, 63), (64, 2.5), (5, 0.3)],
)
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_matches_float64_reference(method, num_entries, k, scale, backend):
    torch.manual_seed(0)
    scores = torch.randn(64, num_entries) * scale
    p = soft_topk(scores, k, method=method, backend=backend)
    assert p.dtype == torch.float32
    assert (p.double().sum(-1) - k).abs().max() <= 1e-5 * max(k, 1)
    torch.testing.assert_close(
        p.double(), bisection_reference(scores, k, 1.0, method), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_row_k_matches_reference(method, backend):
    torch.manual_seed(1)
    scores = torch.randn(64, 16)
    k_R = torch.rand(64) * 14 + 0.5  # fractional, one budget per row
    p = soft_topk(scores, k_R, method=method, backend=backend)
    torch.testing.assert_close(p.sum(-1), k_R, atol=1e-5 * 15, rtol=0)
    torch.testing.assert_close(
        p.double(), bisection_reference(scores, k_R, 1.0, method), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tau_and_dim_and_leading_dims(method, backend):
    torch.manual_seed(2)
    scores = torch.randn(3, 10, 4, 5)  # select along dim 1
    p = soft_topk(scores, 3, tau=0.3, dim=1, method=method, backend=backend)
    assert p.shape == scores.shape
    expected = bisection_reference(scores.movedim(1, -1), 3, 0.3, method).movedim(-1, 1)
    torch.testing.assert_close(p.double(), expected, atol=1e-5, rtol=0)
    # per-row tau, broadcast over the batch shape (3, 4, 5)
    tau = torch.rand(4, 5) + 0.2
    p = soft_topk(scores, 3, tau=tau, dim=1, method=method, backend=backend)
    for i in range(4):
        for j in range(5):
            expected = bisection_reference(scores[:, :, i, j], 3, tau[i, j].item(), method)
            torch.testing.assert_close(p[:, :, i, j].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_range_sum_shape_dtype(method):
    torch.manual_seed(3)
    scores = torch.randn(6, 12, dtype=torch.float64)
    p = soft_topk(scores, 4, method=method, tau=0.5)
    assert p.shape == scores.shape and p.dtype == torch.float64
    torch.testing.assert_close(p.sum(-1), torch.full((6,), 4.0, dtype=torch.float64))
    if method != "iterative":
        assert p.min() >= 0 and p.max() <= 1


def test_iterative_can_exceed_one_as_the_seed_warns():
    """Seed 002 says the iterative construction has no proof of p <= 1; it indeed breaks it.

    Kept as a reference method, faithfully: the threshold family is the one to use.
    """
    scores = torch.tensor([[3.0, 2.9, -5.0, -5.0]])
    p = soft_topk(scores, 2, method="iterative")
    torch.testing.assert_close(p.sum(), torch.tensor(2.0))
    assert p.max() > 1.0


def test_grad_method_matches_brute_force_subsets():
    """GradTopK: p_i = sum over k-subsets containing i of e^{sum} / sum over all k-subsets."""
    from itertools import combinations

    torch.manual_seed(4)
    scores = torch.randn(3, 6, dtype=torch.float64) * 2
    p = soft_topk(scores, 3, method="grad")
    for row in range(3):
        weights = {
            subset: math.exp(sum(scores[row, list(subset)].tolist()))
            for subset in combinations(range(6), 3)
        }
        total = sum(weights.values())
        expected = [sum(w for s, w in weights.items() if i in s) / total for i in range(6)]
        torch.testing.assert_close(p[row], torch.tensor(expected, dtype=torch.float64))


def test_iterative_matches_the_seed_loop():
    torch.manual_seed(5)
    scores = torch.randn(4, 7, dtype=torch.float64)
    p = soft_topk(scores, 3, method="iterative")
    for row in range(4):
        x = scores[row] - scores[row].min()
        q = torch.zeros(7, dtype=torch.float64)
        for _ in range(3):
            q = q + torch.softmax((1 - q) * x, dim=0)
        torch.testing.assert_close(p[row], q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_low_precision_solved_in_fp32(dtype, method):
    torch.manual_seed(6)
    scores = torch.randn(32, 16).to(dtype)
    p = soft_topk(scores, 4, method=method)
    assert p.dtype == dtype
    expected = soft_topk(scores.float(), 4, method=method).to(dtype)
    torch.testing.assert_close(p, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_huge_logits_give_no_nan(dtype, method):
    scores = (torch.randn(16, 8) * 1e4).clamp(-6e4, 6e4).to(dtype)
    scores[0] = torch.tensor([1e4, -1e4, 1e4, -1e4, 1e4, 0.0, 5.0, -5.0]).to(dtype)
    p = soft_topk(scores.requires_grad_(), 2, method=method)
    assert torch.isfinite(p).all()
    p.float().pow(2).sum().backward()
    assert torch.isfinite(scores.grad).all()


# ------------------------------------------------------------------------------ any scale


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", scale_cases(), ids=lambda case: case[0])
def test_exact_in_the_rows_own_frame_at_any_scale(case, method, backend):
    """1e-5 on logits of any scale: the threshold is solved next to itself, so p matches a
    float64 solve on the same fp32 values, and sums to k, however large the logits, however
    wide the row and however small or large tau."""
    _, row, k, tau = case
    scores = row.float().unsqueeze(0)
    tau = torch.tensor(tau).float().item()  # the fp32 value the op computes with
    p = soft_topk(scores, k, tau=tau, method=method, backend=backend)
    assert torch.isfinite(p).all()
    assert abs(p.double().sum().item() - k) <= 1e-5 * max(k, 1)
    key = (case[0], method)
    if key not in _EXACT:
        _EXACT[key] = exact_reference(row.float(), k, tau, method)
    torch.testing.assert_close(p[0].double(), _EXACT[key], atol=1e-5, rtol=0)


_EXACT: dict[tuple[str, str], torch.Tensor] = {}  # the references, shared by both backends


# ------------------------------------------------------------------------------ limits


@pytest.mark.parametrize("method", METHODS)
def test_small_tau_gives_the_hard_topk_mask(method):
    torch.manual_seed(7)
    scores = torch.randn(50, 10)
    x = scores.clone().requires_grad_()
    p = soft_topk(x, 3, tau=1e-4, method=method)
    torch.testing.assert_close(p, hard_topk_mask(scores, 3), atol=1e-4, rtol=0)
    p.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_exp_with_k1_is_softmax():
    torch.manual_seed(8)
    scores = torch.randn(20, 9) * 3
    torch.testing.assert_close(soft_topk(scores, 1, method="exp"), torch.softmax(scores, -1))


def test_laplace_with_k1_is_softmax_only_while_no_entry_exceeds_one_half():
    """Seed 002 says laplace with k = 1 is softmax. That holds while max softmax <= 1/2 (then no
    entry is above the threshold); beyond that laplace gives the top entry 1 - e^-u/2 instead."""
    torch.manual_seed(9)
    flat = torch.randn(20, 9) * 0.5
    assert torch.softmax(flat, -1).max() <= 0.5
    torch.testing.assert_close(soft_topk(flat, 1, method="laplace"), torch.softmax(flat, -1))
    peaked = torch.tensor([[10.0, 0.0]])
    p = soft_topk(peaked, 1, method="laplace")
    torch.testing.assert_close(p, torch.tensor([[1 - math.exp(-5) / 2, math.exp(-5) / 2]]))
    assert not torch.allclose(p, torch.softmax(peaked, -1))


# ------------------------------------------------------------------------------ gradients


def _double(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_batched_dim_not_last(method):
    x = _double(3, 6, 4, seed=10)  # selection along dim 1 of size 6
    fn = lambda a: soft_topk(a, 2, tau=0.7, dim=1, method=method)  # noqa: E731
    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    assert gradgradcheck(fn, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_per_row_k_and_tau(method, backend):
    x = _double(3, 6, 4, seed=11)
    torch.manual_seed(11)
    k = (torch.rand(3, 4, dtype=torch.float64) * 4 + 0.5).requires_grad_()
    tau = (torch.rand(3, 4, dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda a, b, c: soft_topk(a, b, tau=c, dim=1, method=method, backend=backend)  # noqa: E731
    assert gradcheck(fn, (x, k, tau), eps=1e-6, atol=1e-6)
    assert gradgradcheck(fn, (x, k, tau), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("method", REFERENCE_METHODS)
def test_reference_methods_accept_integer_per_row_k(method):
    x = _double(5, 6, seed=12)
    k = torch.tensor([1, 2, 3, 4, 5])
    p = soft_topk(x, k, method=method)
    torch.testing.assert_close(p.sum(-1), k.double())
    for row in range(5):
        torch.testing.assert_close(p[row], soft_topk(x[row], int(k[row]), method=method))
    assert gradcheck(lambda a: soft_topk(a, k, method=method), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_matches_explicit_jacobian(method, backend):
    """The one-pass formula v*g - v*(v.g)/sum v against the explicit Jacobian
    diag(v) - v v^T / sum v
    (the off-diagonal term), built row by row in the slowest way."""
    torch.manual_seed(13)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 7, dtype=torch.float64)
    tau = 0.8
    p = soft_topk(x, 3, tau=tau, method=method, backend=backend)
    (grad,) = torch.autograd.grad(p, x, g)
    from moe_router.ops.threshold_torch import f_prime_from_p

    for row in range(4):
        v = f_prime_from_p(p[row].detach(), method) / tau
        if v.sum() == 0:  # no entry on a sloped piece: p is locally constant
            torch.testing.assert_close(grad[row], torch.zeros_like(grad[row]))
            continue
        jacobian = torch.diag(v) - torch.outer(v, v) / v.sum()
        torch.testing.assert_close(grad[row], jacobian.T @ g[row])


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saturated_rows_give_zero_gradient_not_nan(method, backend):
    x = torch.tensor([[100.0, 100.0, -100.0, -100.0]], requires_grad=True)
    p = soft_topk(x, 2, tau=1e-3, method=method, backend=backend)
    (grad,) = torch.autograd.grad((p * torch.arange(4.0)).sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


# ------------------------------------------------------------------------------ masking


@pytest.mark.parametrize("method", METHODS)
def test_neg_inf_column_equals_dropping_it(method):
    torch.manual_seed(14)
    scores = torch.randn(8, 6, dtype=torch.float64)
    masked = scores.clone()
    masked[:, 2] = -math.inf
    x = masked.clone().requires_grad_()
    p = soft_topk(x, 2, method=method)
    assert torch.equal(p[:, 2], torch.zeros(8, dtype=torch.float64))
    kept = [0, 1, 3, 4, 5]
    torch.testing.assert_close(p[:, kept], soft_topk(scores[:, kept], 2, method=method))
    (p * torch.randn(8, 6, dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad[:, 2], torch.zeros(8, dtype=torch.float64))
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_too_few_finite_entries(method):
    scores = torch.tensor([[1.0, 2.0, -math.inf, -math.inf], [1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(ValueError, match="finite"):
        soft_topk(scores, 2.5, method=method)
    # tensor k: the documented fallback, finite entries -> 1 (sum < k), no error, no NaN
    x = scores.clone().requires_grad_()
    p = soft_topk(x, torch.tensor([2.5, 2.5]), method=method)
    assert torch.equal(p[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(p[1].sum(), torch.tensor(2.5))
    p.sum().backward()
    assert torch.equal(x.grad[0], torch.zeros(4))


@pytest.mark.parametrize("method", METHODS)
def test_nan_propagates_to_its_row_only(method):
    torch.manual_seed(15)
    scores = torch.randn(3, 5)
    scores[1, 2] = math.nan
    p = soft_topk(scores, 2, method=method)
    assert torch.isnan(p[1]).all()
    torch.testing.assert_close(p[[0, 2]], soft_topk(scores[[0, 2]], 2, method=method))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_validates_and_masks_alike(method):
    """The reference methods follow the threshold family's contract (a
    negative tensor tau selected the bottom k, tau = 0 gave NaN, a tensor k = n summed to
    n - 1 (iterative) or 1.5e-4 (grad), k = n + 1, NaN or inf raised IndexError, grad put
    p = 1 on -inf entries)."""
    torch.manual_seed(18)
    scores = torch.randn(3, 5, dtype=torch.float64)
    for bad_tau in (torch.tensor([1.0, -1.0, 1.0]), torch.tensor([1.0, 0.0, 1.0])):
        with pytest.raises(ValueError, match="tau must be positive"):
            soft_topk(scores, 2, tau=bad_tau.double(), method=method)
    # per-row k: n and n + 1 saturate (p = 1), inf too, 0 gives zeros, NaN gives a NaN row
    k = torch.tensor([5.0, 6.0, 2.0], dtype=torch.float64)
    p = soft_topk(scores, k, method=method)
    assert torch.equal(p[:2], torch.ones(2, 5, dtype=torch.float64))
    torch.testing.assert_close(p[2].sum(), torch.tensor(2.0, dtype=torch.float64))
    p = soft_topk(
        scores, torch.tensor([math.inf, 0.0, math.nan], dtype=torch.float64), method=method
    )
    assert torch.equal(p[0], torch.ones(5, dtype=torch.float64))
    assert torch.equal(p[1], torch.zeros(5, dtype=torch.float64))
    assert torch.isnan(p[2]).all()
    # -inf entries: p = 0 on them; a row with at most k finite scores gets 1 on those
    masked = scores.clone()
    masked[0, 2:] = -math.inf
    masked[1, 4] = -math.inf
    p = soft_topk(masked, torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64), method=method)
    assert torch.equal(p[0], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert p[1, 4] == 0
    torch.testing.assert_close(p[1:].sum(-1), torch.full((2,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs more than k finite scores"):
        soft_topk(masked, 3, method=method)


def test_grad_method_refuses_rows_its_float64_sums_cannot_hold():
    """grad sums e^{z} over k-subsets in log space: at 1e9 tau of spread its sums lose k
    (sum p - k of 4e-3 at 1e12 in float64, and 1e28 in float32 at 1e8 before it ran in
    float64), so it raises instead of answering; within 1e8 it holds k."""
    scores = torch.tensor([[1e9, 0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="method='grad' holds its budget only"):
        soft_topk(scores, 2, method="grad")
    p = soft_topk(scores, 2, tau=100.0, method="grad")  # a spread of 1e7 tau
    torch.testing.assert_close(p.sum(), torch.tensor(2.0), atol=1e-6, rtol=0)
    torch.manual_seed(19)
    wide = torch.rand(50, 13) * 1e4
    torch.testing.assert_close(
        soft_topk(wide, 8, method="grad").sum(-1), torch.full((50,), 8.0), atol=1e-5, rtol=0
    )


def test_tensor_k_nonpositive_gives_zeros():
    p = soft_topk(torch.randn(2, 5), torch.tensor([0.0, 2.0]), method="exp")
    assert torch.equal(p[0], torch.zeros(5))
    torch.testing.assert_close(p[1].sum(), torch.tensor(2.0))


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=0), "k=0"),
        (dict(k=-1.5), "k=-1.5"),
        (dict(k=5), "k=5"),
        (dict(k=2, tau=0.0), "tau"),
        (dict(k=2, tau=-1.0), "tau"),
        (dict(k=2, tau=math.inf), "tau"),
        (dict(k=2, method="softmax"), "method='softmax'"),
        (dict(k=2, dim=2), "dim=2"),
        (dict(k=2, dim=-3), "dim=-3"),
        (dict(k=2.5, method="grad"), "integer k"),
        (dict(k=2, backend="cuda"), "backend='cuda'"),
        (dict(k=True), "k must be a number"),
        (dict(k=torch.ones(3)), "broadcast"),
        (dict(k=2, tau=torch.tensor([1.0, -1.0, 1.0, 1.0])), "tau"),
        (dict(k=2, dim=1.0), "dim must be an int, got dim=1.0"),
        (dict(k=2, dim=True), "dim must be an int, got dim=True"),
        (dict(k=torch.tensor(True)), "k must be a real-valued tensor"),
        (dict(k=2, tau=torch.ones(4, dtype=torch.complex64)), "tau must be a real-valued"),
        (dict(k=torch.full((4,), 2.0, device="meta")), "k is on device meta"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_topk(torch.randn(4, 5), **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (2, 0, 3), (0, 4)])
def test_empty_scores_with_tensor_k(shape, method):
    """An empty score tensor gives an empty result (and gradient), whatever k is: a tensor k
    with no entries per row used to fail in a reshape."""
    backends = CPU_BACKENDS if method in THRESHOLD_METHODS else ["auto"]
    for backend in backends:
        x = torch.empty(shape, requires_grad=True)
        k = torch.tensor(2.0, requires_grad=True)
        p = soft_topk(x, k, dim=1 if len(shape) == 3 else -1, method=method, backend=backend)
        assert p.shape == x.shape
        p.sum().backward()
        assert x.grad.shape == x.shape


def test_integer_scores_raise_value_error():
    with pytest.raises(ValueError, match="dtype=torch.int64"):
        soft_topk(torch.arange(10).view(2, 5), 2)


# ----------------------------------------------------------------------- compile, vmap, opcheck


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_torch_compile_fullgraph(method):
    torch._dynamo.reset()
    x = torch.randn(16, 8, requires_grad=True)
    k = torch.rand(16) * 3 + 1

    def loss_fn(scores, budget):
        return (soft_topk(scores, budget, tau=0.5, method=method) * torch.arange(8.0)).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    (grad_compiled,) = torch.autograd.grad(compiled(x, k), x)
    (grad_eager,) = torch.autograd.grad(loss_fn(x, k), x)
    torch.testing.assert_close(grad_compiled, grad_eager)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    x = torch.randn(32, 8)
    compiled = torch.compile(lambda s: soft_topk(s, 2, method="sigmoid").square(), fullgraph=True)
    torch.testing.assert_close(compiled(x), soft_topk(x, 2, method="sigmoid").square())


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_vmap_and_vmap_of_grad(method):
    torch.manual_seed(16)
    x = torch.randn(5, 3, 8)
    batched = torch.func.vmap(lambda s: soft_topk(s, 2, method=method))(x)
    torch.testing.assert_close(batched, torch.stack([soft_topk(s, 2, method=method) for s in x]))
    weights = torch.arange(8.0)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda s: (soft_topk(s, 2, method=method) * weights).sum())
    )
    expected = torch.stack(
        [torch.func.grad(lambda s: (soft_topk(s, 2, method=method) * weights).sum())(s) for s in x]
    )
    torch.testing.assert_close(per_sample(x), expected)


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_opcheck(method):
    op = torch.ops.moe_router.soft_topk_threshold.default
    torch.manual_seed(17)
    scores = torch.randn(6, 5, dtype=torch.float64)
    k = torch.full((6,), 2.0, dtype=torch.float64)
    tau = torch.full((6,), 0.7, dtype=torch.float64)
    # the op is the forward kernel (autograd lives in the autograd.Function around it)
    torch.library.opcheck(op, (scores, k, tau, method, None, "torch", True))
    torch.library.opcheck(op, (scores.float(), k.float(), tau.float(), method, 2.0, "cpp", False))


# ------------------------------------------------------------------------------ properties

row_values = st.lists(
    st.floats(min_value=-20, max_value=20, allow_nan=False, width=32),
    min_size=3,
    max_size=12,
    unique=True,
)


@settings(max_examples=40, deadline=None)
@given(values=row_values, k_frac=st.floats(0.05, 0.95), method=st.sampled_from(THRESHOLD_METHODS))
def test_properties_range_sum_monotone(values, k_frac, method):
    scores = torch.tensor([values], dtype=torch.float64)
    n = len(values)
    k = max(min(k_frac * n, n - 0.5), 0.5)
    p = soft_topk(scores, k, method=method)[0]
    assert p.min() >= 0 and p.max() <= 1
    assert abs(p.sum().item() - k) <= 1e-9 * n
    order = torch.argsort(scores[0])
    assert (p[order].diff() >= -1e-12).all()  # monotone: larger score, no smaller p


@settings(max_examples=40, deadline=None)
@given(
    values=row_values,
    shift=st.floats(-50, 50),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(THRESHOLD_METHODS),
)
def test_properties_shift_invariant_permutation_equivariant(values, shift, seed, method):
    scores = torch.tensor([values], dtype=torch.float64)
    k = 2 if len(values) > 2 else 1
    p = soft_topk(scores, k, method=method)
    torch.testing.assert_close(soft_topk(scores + shift, k, method=method), p, atol=1e-9, rtol=0)
    perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        soft_topk(scores[:, perm], k, method=method), p[:, perm], atol=1e-9, rtol=0
    )


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.integers(-1000, 1000), min_size=3, max_size=10, unique=True),
    method=st.sampled_from(METHODS),
)
def test_property_small_tau_limit(values, method):
    scores = torch.tensor([values], dtype=torch.float64)  # distinct by >= 1: tau = 1e-3 is hard
    k = len(values) // 2
    p = soft_topk(scores, k, tau=1e-3, method=method)
    torch.testing.assert_close(p, hard_topk_mask(scores, k), atol=1e-6, rtol=0)


def test_sparse_torch_path_memory_is_linear_in_the_row():
    """The PyTorch sparse solve needs O(R N) memory: it used to build an [R, ceil(k), N + 1]
    temporary (4 x 100000 at k = 5000: 23 GB). Peak resident memory of a fresh process, before
    and after one solve of 2 x 20000 at k = 1000 (that temporary alone: 160 MB per copy)."""
    import subprocess
    import sys

    code = (
        "import resource, torch; from moe_router import soft_topk;"
        "x = torch.randn(2, 20000); soft_topk(x[:, :100], 10, method='sparse', backend='torch');"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "p = soft_topk(x, 1000, method='sparse', backend='torch');"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "assert abs(p.sum(-1) - 1000).max() < 1e-2, p.sum(-1);"
        "print((after - before) / 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout) < 40, f"peak memory grew by {result.stdout.strip()} MB"
