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

    torch.manual_seed(0)
    for method in ("sigmoid", "laplace", "exp", "sparse"):
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
