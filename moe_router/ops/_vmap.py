"""Shared piece of the vmap rules of the soft top-k ops (rows are independent, so every rule
folds the vmapped dim into the rows and calls its op once)."""

from __future__ import annotations

from torch import Tensor


def batch_first(tensor: Tensor, in_dim: int | None, batch_size: int) -> Tensor:
    """`tensor` with its vmapped dim moved to the front; an unbatched one is expanded."""
    if in_dim is None:
        return tensor.unsqueeze(0).expand(batch_size, *tensor.shape)
    return tensor.movedim(in_dim, 0)
