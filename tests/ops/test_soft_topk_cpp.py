"""The C++ soft top-k (threshold_cpp.py, csrc/soft_topk.cpp) against the PyTorch path
(threshold_torch.py), and the build cache of the C++ kernels.

The PyTorch path is itself checked against a float64 bisection in test_soft_topk.py (which also
runs its accuracy and gradcheck tests through both backends); here the two implementations are
compared row by row on inputs built to reach every branch of the kernels.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from ops_testing import NEEDS_CPP_KERNELS, stress_rows

from moe_router import soft_topk
from moe_router.ops import threshold_cpp
from moe_router.ops.threshold_torch import THRESHOLD_METHODS, solve_threshold, threshold_backward

pytestmark = NEEDS_CPP_KERNELS


def per_row_budgets(num_rows: int, num_entries: int, dtype: torch.dtype, seed: int = 0):
    """Fractional and integer k in (0, n), plus k = 0 and k = n rows (the documented fallbacks)."""
    gen = torch.Generator().manual_seed(seed + 1)
    k_R = torch.rand(num_rows, generator=gen, dtype=torch.float64) * num_entries
    k_R[1::2] = k_R[1::2].ceil().clamp(max=max(num_entries - 1, 1))
    k_R[0] = 0.0
    k_R[-3] = num_entries
    tau_R = torch.rand(num_rows, generator=gen, dtype=torch.float64) + 0.1
    return k_R.to(dtype), tau_R.to(dtype)


def assert_same_threshold(lam_a: torch.Tensor, lam_b: torch.Tensor, scale: torch.Tensor) -> None:
    both_finite = torch.isfinite(lam_a) & torch.isfinite(lam_b)
    assert torch.equal(torch.isnan(lam_a), torch.isnan(lam_b))
    assert torch.equal(
        lam_a[~both_finite & ~torch.isnan(lam_a)], lam_b[~both_finite & ~torch.isnan(lam_b)]
    )
    tol = 1e-4 * (1 + scale[both_finite])
    assert ((lam_a - lam_b)[both_finite].abs() <= tol).all()


def test_kernels_build_and_auto_uses_them():
    assert threshold_cpp.available()
    scores = torch.randn(16, 32)
    for method in THRESHOLD_METHODS:
        auto = soft_topk(scores, 4, method=method)
        torch.testing.assert_close(
            auto, soft_topk(scores, 4, method=method, backend="cpp"), atol=0, rtol=0
        )


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("num_entries", [1, 2, 5, 8, 13, 64, 257, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_torch_path(method, num_entries, dtype):
    scores_RN = stress_rows(num_entries, dtype)
    k_R, tau_R = per_row_budgets(scores_RN.shape[0], num_entries, dtype)
    p_RN, lam_R = threshold_cpp.forward(scores_RN, k_R, tau_R, method)
    z_RN = scores_RN / tau_R.unsqueeze(-1)
    # the reference: the PyTorch path in float64 on the same rows (in fp32 it is the less
    # accurate of the two at large k, where its sums of p round)
    p_ref_RN, lam_ref_R = solve_threshold(
        scores_RN.double(), k_R.double(), tau_R.double(), method, None
    )
    p_ref_RN, lam_ref_R = p_ref_RN.to(dtype), lam_ref_R.to(dtype)
    atol = 5e-6 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(p_RN, p_ref_RN, atol=atol, rtol=0, equal_nan=True)
    scale_R = z_RN.masked_fill(~torch.isfinite(z_RN), 0).abs().amax(-1)
    assert_same_threshold(lam_R, lam_ref_R, scale_R)


@pytest.mark.parametrize("num_entries", [5, 64, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_exact_sorted_path_matches(num_entries, dtype):
    """sparse_newton_steps=0 sends every row to the exact sorted fallback of the Newton solve."""
    scores_RN = stress_rows(num_entries, dtype, seed=3)
    k_R, tau_R = per_row_budgets(scores_RN.shape[0], num_entries, dtype, seed=3)
    p_RN, _ = threshold_cpp.forward(scores_RN, k_R, tau_R, "sparse", sparse_newton_steps=0)
    p_newton_RN, _ = threshold_cpp.forward(scores_RN, k_R, tau_R, "sparse")
    p_ref_RN = solve_threshold(scores_RN.double(), k_R.double(), tau_R.double(), "sparse")[0]
    p_ref_RN = p_ref_RN.to(dtype)
    atol = 5e-6 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(p_RN, p_ref_RN, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(p_newton_RN, p_ref_RN, atol=atol, rtol=0, equal_nan=True)


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# 8 and 16: float32 rows of whole SIMD vectors, unrolled; 37: vectors and a scalar tail
@pytest.mark.parametrize("num_entries", [8, 16, 37])
def test_backward_matches_torch_formula(method, dtype, num_entries):
    scores_RN = stress_rows(num_entries, dtype, seed=5)
    k_R, tau_R = per_row_budgets(scores_RN.shape[0], num_entries, dtype, seed=5)
    p_RN, _ = threshold_cpp.forward(scores_RN, k_R, tau_R, method)
    grad_RN = torch.randn(p_RN.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    grad_x, grad_k, grad_tau = threshold_cpp.backward(p_RN, grad_RN, tau_R, method, True)
    ref_x, ref_k, ref_tau = threshold_backward(p_RN, grad_RN, tau_R, method)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grad_x, ref_x, atol=atol, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad_k, ref_k, atol=atol, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad_tau, ref_tau, atol=atol, rtol=1e-4, equal_nan=True)
    # without the tau gradient: the same dL/dx and dL/dk
    grad_x_only, grad_k_only, grad_tau_none = threshold_cpp.backward(
        p_RN, grad_RN, tau_R, method, False
    )
    assert grad_tau_none is None
    torch.testing.assert_close(grad_x_only, grad_x, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(grad_k_only, grad_k, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
def test_public_gradients_match_torch_backend(method):
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(4, 9, 12, generator=gen)
    k = torch.rand(4, 12, generator=gen) * 6 + 0.5
    tau = torch.rand(4, 12, generator=gen) + 0.3
    weight = torch.randn(4, 9, 12, generator=gen)
    grads = {}
    for backend in ("torch", "cpp"):
        leaves = [t.clone().requires_grad_() for t in (scores, k, tau)]
        p = soft_topk(leaves[0], leaves[1], tau=leaves[2], dim=1, method=method, backend=backend)
        (p * weight).sum().backward()
        grads[backend] = [leaf.grad for leaf in leaves]
    for ours, ref in zip(grads["cpp"], grads["torch"], strict=True):
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_thread_count_does_not_change_results():
    scores_RN = torch.randn(3000, 40)
    k_R = torch.full((3000,), 5.0)
    tau_R = torch.ones(3000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = {m: threshold_cpp.forward(scores_RN, k_R, tau_R, m)[0] for m in THRESHOLD_METHODS}
        torch.set_num_threads(max(2, threads))
        for method in THRESHOLD_METHODS:
            assert torch.equal(
                threshold_cpp.forward(scores_RN, k_R, tau_R, method)[0], single[method]
            )
    finally:
        torch.set_num_threads(threads)


def test_failed_build_warns_and_falls_back(monkeypatch):
    def broken_build(verbose=False):
        raise RuntimeError("Error building extension 'moe_router_cpu': no compiler")

    threshold_cpp.available.cache_clear()
    monkeypatch.setattr(threshold_cpp, "build", broken_build)
    try:
        with pytest.warns(RuntimeWarning, match="using the PyTorch path instead"):
            assert not threshold_cpp.available()
        scores = torch.randn(8, 16)
        torch.testing.assert_close(soft_topk(scores, 3), soft_topk(scores, 3, backend="torch"))
        with pytest.raises(ValueError, match="backend='cpp' needs the C\\+\\+ kernels"):
            soft_topk(scores, 3, backend="cpp")
    finally:
        monkeypatch.undo()
        threshold_cpp.available.cache_clear()
        assert threshold_cpp.available()


def test_environment_switch_turns_them_off():
    code = (
        "import torch, warnings; warnings.simplefilter('error');"
        "from moe_router import soft_topk; from moe_router.ops import threshold_cpp;"
        "assert not threshold_cpp.available();"
        "x = torch.randn(4, 8); soft_topk(x, 2)"
    )
    env = dict(os.environ, MOE_ROUTER_CPU_KERNELS="0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_cpp_backend_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="backend='cpp' supports"):
        soft_topk(torch.randn(4, 8), 2, method="iterative", backend="cpp")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CPU tensors"):
            soft_topk(torch.randn(4, 8, device="cuda"), 2, backend="cpp")


# ------------------------------------------------------------------------------ the build cache


def test_build_key_covers_what_the_binary_depends_on(monkeypatch):
    name = threshold_cpp._build_name()
    assert name == threshold_cpp._build_name()
    monkeypatch.setattr(threshold_cpp, "_compiler_identity", lambda: "/usr/bin/clang++ 18.1")
    assert threshold_cpp._build_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert threshold_cpp._build_name() != name


def test_build_key_covers_every_source_and_header(monkeypatch, tmp_path):
    """The extension is every csrc/*.cpp (one per op family) with the headers they share: an
    edit to any one of them is another build."""
    name = threshold_cpp._build_name()
    files = threshold_cpp.SOURCES + threshold_cpp.HEADERS
    assert {path.name for path in threshold_cpp.SOURCES} >= {
        "soft_topk.cpp",
        "selections.cpp",
        "gated_silu.cpp",
    }
    assert {path.suffix for path in threshold_cpp.HEADERS} == {".h"}
    for path in files:
        edited = tmp_path / path.name
        edited.write_bytes(path.read_bytes() + b"// edited\n")
        for attr in ("SOURCES", "HEADERS"):
            paths = getattr(threshold_cpp, attr)
            monkeypatch.setattr(
                threshold_cpp, attr, tuple(edited if p == path else p for p in paths)
            )
        assert threshold_cpp._build_name() != name, path.name
        monkeypatch.undo()
    assert threshold_cpp._build_name() == name


def _copy_package(destination):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copytree(
        os.path.join(root, "moe_router"),
        os.path.join(destination, "moe_router"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return str(destination)


def test_other_checkouts_load_the_cached_build_without_rebuilding(tmp_path):
    """The cache is keyed by what the binary depends on, not by which checkout asks: a second
    checkout (another path, same source, same torch and compiler) loads the file directly,
    without ninja or torch.utils.cpp_extension. It used to share one build folder whose
    build.ninja named the source path, so two checkouts rebuilt it in turn."""
    assert threshold_cpp.available()
    cache = tmp_path / "cache"
    cache.mkdir()
    built = threshold_cpp.library_path()
    shutil.copy(built, cache / built.name)
    checkout = _copy_package(tmp_path / "other_checkout")
    code = (
        "import sys; from moe_router.ops import threshold_cpp;"
        "assert threshold_cpp.available();"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'rebuilt';"
        "print(threshold_cpp.library_path())"
    )
    env = dict(os.environ, MOE_ROUTER_CACHE=str(cache), PYTHONPATH=checkout)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(cache / built.name)
    assert sorted(p.name for p in cache.iterdir()) == [built.name]


def test_build_key_stays_the_same_after_a_build():
    """torch.utils.cpp_extension appends to the flag lists it is given (_prepare_ldflags); the
    key hashes the flags, so with shared lists a second build() in the same process looked for
    another file, compiled it and loaded a second library of the same ops, which aborts the
    process. The flags are tuples, and build() loads one library per process."""
    name = threshold_cpp._build_name()
    assert threshold_cpp.build() == threshold_cpp.build() == threshold_cpp.library_path()
    assert threshold_cpp._build_name() == name
    assert isinstance(threshold_cpp._CFLAGS, tuple) and isinstance(threshold_cpp._LDFLAGS, tuple)


# ------------------------------------------------------------------------------ narrow rows


def narrow_rows(num_entries: int, num_rows: int = 203, seed: int = 0):
    """float32 rows for the 8-rows-at-a-time path: router-like rows at several scales, with
    special rows in the middle of blocks (NaN, +inf, all -inf, masked entries, k <= 0, k >= n,
    NaN k) and rows it must hand back to the row path (a 1e8-scale row, a tiny tau, ties)."""
    gen = torch.Generator().manual_seed(seed)
    scale_R = torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0]).repeat(num_rows)[:num_rows]
    scores_RN = torch.randn(num_rows, num_entries, generator=gen) * scale_R[:, None]
    k_R = torch.rand(num_rows, generator=gen) * (num_entries - 0.2) + 0.1
    k_R[::3] = k_R[::3].ceil().clamp(max=max(num_entries - 1, 1))
    tau_R = torch.rand(num_rows, generator=gen) + 0.3
    scores_RN[::17, 0] = -math.inf
    scores_RN[5, num_entries // 2] = math.nan
    scores_RN[11, 0] = math.inf
    scores_RN[20] = -math.inf
    scores_RN[29] = 1e8 + torch.arange(num_entries).float() * 64
    scores_RN[30] = 7.0  # all tied
    k_R[13] = 0.0
    k_R[14] = num_entries
    k_R[15] = math.nan
    tau_R[31] = 1e-30
    return scores_RN, k_R, tau_R


@pytest.mark.parametrize("method", THRESHOLD_METHODS)
@pytest.mark.parametrize("num_entries", [1, 2, 3, 5, 8, 13, 16])
def test_narrow_rows_match_the_row_path_and_torch(method, num_entries):
    """float32 rows of at most 16 entries run 8 at a time, one SIMD lane each; the lanes with a
    special row, an unsettled solve or a threshold far from the max go back to the row path."""
    scores_RN, k_R, tau_R = narrow_rows(num_entries)
    p_RN, lam_R = threshold_cpp.forward(scores_RN, k_R, tau_R, method)
    p_row_RN, lam_row_R = threshold_cpp.forward(scores_RN, k_R, tau_R, method, narrow=False)
    p_ref_RN = solve_threshold(scores_RN.double(), k_R.double(), tau_R.double(), method)[0]
    torch.testing.assert_close(p_RN, p_row_RN, atol=2e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(p_RN.double(), p_ref_RN, atol=2e-6, rtol=0, equal_nan=True)
    # the special rows' thresholds mark them exactly as the row path does
    for marker in (torch.isnan, torch.isneginf, torch.isposinf):
        assert torch.equal(marker(lam_R), marker(lam_row_R))
    budget_R = torch.minimum(k_R, (scores_RN > -math.inf).sum(-1).float()).clamp_min(0)
    solved_R = ~torch.isnan(p_RN).any(-1)
    sum_err_R = (p_RN.double().sum(-1) - budget_R.double())[solved_R].abs()
    assert (sum_err_R <= 2e-6 * budget_R[solved_R].clamp_min(1)).all()
