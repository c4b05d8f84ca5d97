"""moe_router: Mixture-of-Experts routing with a differentiable soft top-k gate."""

from moe_router.ops import soft_topk
from moe_router.routing import Routing

__all__ = ["Routing", "soft_topk"]
