"""PLACEHOLDER (being replaced by the real batched solver): slow bisection soft top-k with the
final public signature, so that routers can be developed against it."""

from __future__ import annotations

import torch
from torch import Tensor

_F = {
    "sigmoid": torch.sigmoid,
    "exp": lambda u: torch.clamp(torch.exp(u), max=1.0),
    "laplace": lambda u: torch.where(u >= 0, 1 - 0.5 * torch.exp(-u.clamp(min=0)), 0.5 * torch.exp(u.clamp(max=0))),
    "sparse": lambda u: u.clamp(0.0, 1.0),
}


def soft_topk(scores: Tensor, k, *, tau=1.0, dim: int = -1, method: str = "sigmoid") -> Tensor:
    f = _F[method]
    x = scores.movedim(dim, -1).float() / (tau if not torch.is_tensor(tau) else tau.unsqueeze(-1))
    k_t = torch.as_tensor(k, dtype=x.dtype, device=x.device)
    k_t = torch.broadcast_to(k_t, x.shape[:-1]).unsqueeze(-1)
    with torch.no_grad():
        finite = torch.where(torch.isfinite(x), x, torch.nan)
        lo = torch.nan_to_num(finite.nan_to_num(float("inf")).amin(-1, keepdim=True)) - 50
        hi = torch.nan_to_num(finite.nan_to_num(float("-inf")).amax(-1, keepdim=True)) + 50
        for _ in range(100):
            mid = (lo + hi) / 2
            above = f(x - mid).sum(-1, keepdim=True) > k_t
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        lam = (lo + hi) / 2
    u = x - lam
    # implicit gradient of lambda through a detached weight vector (stop-gradient trick)
    with torch.enable_grad():
        uu = u.detach().requires_grad_(True)
        w = torch.autograd.grad(f(uu).sum(), uu)[0]
    wn = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    lam_sg = (x * wn).sum(-1, keepdim=True) - (x.detach() * wn).sum(-1, keepdim=True) + lam
    p = f(x - lam_sg)
    return p.movedim(-1, dim).to(scores.dtype)
