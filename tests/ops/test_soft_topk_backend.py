"""The public soft_topk(..., backend=...) switch: Triton kernels (through Triton's CPU
interpreter) against the PyTorch path, forward and backward, through the public function.

TRITON_INTERPRET=1 must be set before Triton is first imported, and other tests (Lightning)
import Triton earlier in the process, so the comparison runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import math
    import torch
    from moe_router import soft_topk
    from moe_router.ops.soft_topk import THRESHOLD_METHODS

    torch.manual_seed(0)
    for method in THRESHOLD_METHODS:
        x = torch.randn(2, 9, 13) * 3  # select along dim 1 (n = 9), 26 rows
        x[0, 4, :] = -math.inf
        k = torch.rand(2, 13) * 5 + 0.5
        tau = torch.rand(13) + 0.5
        weights = torch.randn(2, 9, 13)
        results = {}
        for backend in ("torch", "triton"):
            xs = x.clone().requires_grad_()
            ks = k.clone().requires_grad_()
            taus = tau.clone().requires_grad_()
            p = soft_topk(xs, ks, tau=taus, dim=1, method=method, backend=backend)
            (p * weights).sum().backward()
            results[backend] = (p, xs.grad, ks.grad, taus.grad)
        for name, a, b in zip(("p", "grad_x", "grad_k", "grad_tau"), *results.values()):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"{method} {name}")
        fp16 = soft_topk(x.half(), 3, dim=1, method=method, backend="triton")
        assert fp16.dtype == torch.float16
        expected = soft_topk(x.half(), 3, dim=1, method=method)
        torch.testing.assert_close(fp16, expected, atol=1e-3, rtol=0)
    print("backend switch ok")
    """
)


def test_triton_backend_matches_torch_backend_through_the_public_op():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend switch ok" in result.stdout


def test_triton_backend_on_cpu_without_interpreter_is_a_value_error(monkeypatch):
    import torch

    from moe_router import soft_topk

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        soft_topk(torch.randn(4, 5), 2, backend="triton")


def _spy_on_implementations(monkeypatch):
    """Record which implementation each forward and backward of the threshold op runs."""
    import importlib

    from moe_router.ops import threshold_cpp

    # the module, not the function that moe_router.ops exports under the same name
    op_module = importlib.import_module("moe_router.ops.soft_topk")
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(threshold_cpp, "forward", spy("cpp forward", threshold_cpp.forward))
    monkeypatch.setattr(threshold_cpp, "backward", spy("cpp backward", threshold_cpp.backward))
    monkeypatch.setattr(
        op_module, "solve_threshold", spy("torch forward", op_module.solve_threshold)
    )
    monkeypatch.setattr(
        op_module, "threshold_backward", spy("torch backward", op_module.threshold_backward)
    )
    return calls


def test_backward_runs_the_backend_the_forward_ran(monkeypatch):
    import torch

    from moe_router import soft_topk
    from moe_router.ops import threshold_cpp

    if not threshold_cpp.available():
        pytest.skip("the C++ kernels do not build here")
    calls = _spy_on_implementations(monkeypatch)
    x = torch.randn(6, 8, requires_grad=True)
    soft_topk(x, 2).sum().backward()
    assert calls == ["cpp forward", "cpp backward"]
    calls.clear()
    soft_topk(x, 2, backend="torch").sum().backward()
    assert calls == ["torch forward", "torch backward"]


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_compiled_call_runs_one_backend_when_the_kernels_are_not_loaded(monkeypatch):
    """Traced code cannot build the C++ kernels. When they are not loaded at trace time the
    whole call (forward and backward) takes the PyTorch path; the forward used to build and
    run the kernels at run time while the traced backward took the PyTorch formula."""
    import importlib

    import torch
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    from moe_router import soft_topk
    from moe_router.ops import threshold_cpp

    if not threshold_cpp.available():
        pytest.skip("the C++ kernels do not build here")
    monkeypatch.setattr(threshold_cpp, "loaded", lambda: False)
    # the forward runs eagerly inside the opaque op, so a plain spy sees it; the backward is
    # traced, so the recorded graph shows which implementation it calls
    op_module = importlib.import_module("moe_router.ops.soft_topk")
    calls = []
    monkeypatch.setattr(threshold_cpp, "forward", lambda *a: calls.append("cpp") or 1 / 0)
    solve = op_module.solve_threshold
    monkeypatch.setattr(op_module, "solve_threshold", lambda *a: calls.append("torch") or solve(*a))
    recorder = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    try:
        x = torch.randn(6, 8, requires_grad=True)
        compiled = torch.compile(lambda s: soft_topk(s, 2).sum(), fullgraph=True, backend=recorder)
        compiled(x).backward()
    finally:
        torch._dynamo.reset()
    assert calls == ["torch"]
    (backward_graph,) = recorder.bw_graphs
    assert "moe_router_cpu" not in backward_graph.code


def test_first_call_does_not_import_dynamo():
    """An eager program pays no torch._dynamo import (seconds) for using the op: the op is
    defined through torch.library.Library, not the custom_op decorator, whose kernel wrapper
    imports torch._dynamo on its first call."""
    code = (
        "import sys, torch; from moe_router import soft_topk;"
        "x = torch.randn(4, 8, requires_grad=True);"
        "[soft_topk(x, 2, backend=b).sum().backward() for b in ('torch', 'auto')];"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
