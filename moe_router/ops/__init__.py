"""Parameter-free operators."""

from moe_router.ops.soft_topk import soft_topk

__all__ = ["soft_topk"]
