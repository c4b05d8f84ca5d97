"""moe_router: Mixture-of-Experts routing with a differentiable soft top-k gate.

The op (`soft_topk`), the router (`Router`, one interface for every gate), the dropless MoE
layer (`MoELayer`), load-balancing losses, and torchmetrics load-balance metrics with a
markdown / heatmap report. `moe_router` never imports Lightning, `datasets` or `models`.
"""

from moe_router.balancing import (
    ExpertBias,
    load_balancing_loss,
    router_z_loss,
    sequence_load_balancing_loss,
)
from moe_router.config import MoEOptions, RouterOptions
from moe_router.gates import balance_thresholds, run_gate
from moe_router.metrics import (
    LoadBalanceMetrics,
    scalar_metrics,
)
from moe_router.moe import MoEConfig, MoELayer, SwiGLU, capacity_keep_mask, grouped_matmul
from moe_router.ops import soft_topk
from moe_router.records import aux_loss, routings
from moe_router.report import (
    LoadBalanceReport,
    load_balance_table,
    plot_load_heatmap,
    plot_load_heatmaps,
    write_load_balance_report,
)
from moe_router.router import GATES, Router, RouterConfig, select_experts
from moe_router.routing import Routing
from moe_router.stepping import register_optimizer_hooks, routers, step_routers

__all__ = [
    "GATES",
    "ExpertBias",
    "LoadBalanceMetrics",
    "LoadBalanceReport",
    "MoEConfig",
    "MoELayer",
    "MoEOptions",
    "Router",
    "RouterConfig",
    "RouterOptions",
    "Routing",
    "SwiGLU",
    "aux_loss",
    "balance_thresholds",
    "capacity_keep_mask",
    "grouped_matmul",
    "load_balance_table",
    "load_balancing_loss",
    "plot_load_heatmap",
    "plot_load_heatmaps",
    "register_optimizer_hooks",
    "router_z_loss",
    "routers",
    "routings",
    "run_gate",
    "scalar_metrics",
    "select_experts",
    "sequence_load_balancing_loss",
    "soft_topk",
    "step_routers",
    "write_load_balance_report",
]
