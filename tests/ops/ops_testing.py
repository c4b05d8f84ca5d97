"""Shared references of the ops tests: slow, obviously right, at any scale.

Shape legend: N entries per row.
"""

from __future__ import annotations

import math

import torch


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


def scale_cases() -> list[tuple[str, torch.Tensor, float, float]]:
    """(name, fp32 row, k, tau): rows whose scale, spread or temperature would lose the
    threshold in a frame far from it (the row max, or z = x / tau), issue 12 item 6."""
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
