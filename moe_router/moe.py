"""Dropless MoE layer: router, SwiGLU experts, sort-based dispatch and weighted combine.

Shape legend: T tokens, D model dim, E experts, K selected slots per token, F expert hidden.

A file per part of the layer:

- ``moe_router.router``: the :class:`~moe_router.router.Router` (logits, gate, aux losses).
- ``moe_router.dispatch``: the token-expert pairs sorted by expert (invalid slots of a sparse
  gate, padding tokens and capacity drops behind every expert), the grouped matmul over the
  expert slices, the capacity mask, and the gather / weighted scatter-add autograd Functions.
- ``moe_router.experts``: the experts' compute over the slices (grouped, or one expert at a
  time on CPU), the gated-SiLU autograd Functions and the dense :class:`SwiGLU`.
- this file: :class:`MoELayer`, which routes, applies the capacity, sorts, runs the experts
  and adds the shared expert (megablocks / torchtitan style: no token dropped unless a
  capacity is set).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from moe_router.config import (
    DROP_POLICIES,
    GROUPED_MM_BACKENDS,
    MoEConfig,
    MoEOptions,
    config_from_arguments,
)
from moe_router.dispatch import (
    capacity_keep_mask,
    grouped_matmul,
    grouped_mm_available,
    slice_sizes,
    sort_pairs,
)
from moe_router.experts import SwiGLU, run_experts_grouped, run_experts_per_slice
from moe_router.router import Router
from moe_router.routing import Routing
from moe_router.state import DefaultOutputs

__all__ = [
    "DROP_POLICIES",
    "GROUPED_MM_BACKENDS",
    "MoEConfig",
    "MoEOptions",
    "MoELayer",
    "SwiGLU",
    "capacity_keep_mask",
    "grouped_matmul",
    "grouped_mm_available",
    "slice_sizes",
]


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer: router + SwiGLU experts + dropless dispatch.

    Build it with keywords (``MoELayer(d_model=256, d_ff=512, num_experts=8, k=2,
    gate="soft_topk", tau=0.5)``) or from a config (``MoELayer(config)``).

    Args:
        config: A :class:`~moe_router.config.MoEConfig`; or, instead of one, its fields
            (``d_model``, ``d_ff``, ``num_experts``, ``k``, ``gate`` and any option) as
            keywords (the four sizes may also come positionally, in that order).

    Raises:
        ValueError: On an invalid setting.

    Attributes:
        router: The :class:`~moe_router.router.Router`.
        w1_EDF, w3_EDF, w2_EFD: Routed expert weights (gate, up, down projections).
        shared_expert: The shared :class:`SwiGLU` or None.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        config = config_from_arguments(MoEConfig, args, kwargs)
        self.config = config
        d_model, d_ff, num_experts = config.d_model, config.d_ff, config.num_experts
        self.router = Router(config.router_config)
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.shared_expert = SwiGLU(d_model, config.shared_d_ff) if config.shared_d_ff > 0 else None
        if config.default_moe_beta is not None:
            self.router.add_default_outputs(
                DefaultOutputs(num_experts, d_model, config.default_moe_beta)
            )
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: MoEConfig) -> MoELayer:
        """Build a layer from a :class:`MoEConfig` (the same as ``MoELayer(config)``)."""
        return cls(config)

    def reset_parameters(self) -> None:
        """Expert weights: uniform with nn.Linear's bounds per expert (1/sqrt(fan_in))."""
        for weight in (self.w1_EDF, self.w3_EDF, self.w2_EFD):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        return_routing: bool = False,
    ) -> Tensor | tuple[Tensor, Routing]:
        """Route, run the experts and combine.

        Args:
            x: ``[..., D]`` hidden states in any float dtype.
            padding_mask: Bool over the leading dims of x, True for padding tokens (they get
                no expert; their output is the shared expert's alone, or zero).
            return_routing: Also return the :class:`Routing` record (aux losses, loads, drops).

        Returns:
            y with x's shape and dtype, or ``(y, routing)``.
        """
        config = self.config
        routing = self.router(x, padding_mask=padding_mask)
        x_TD = x.reshape(-1, config.d_model)  # (T, D)
        capacity = config.capacity(x_TD.shape[0])
        if capacity is not None:
            routing = self._apply_capacity(routing, capacity)
            self.router.last_routing = routing  # what moe_router.routings(model) reads
        # Static knowledge that every slot carries compute lets the dispatch skip its masks.
        all_valid = (
            padding_mask is None and capacity is None and config.router_config.all_slots_valid
        )
        default = self.router.default_outputs
        sums_ED = None
        if default is not None and self.training and torch.is_grad_enabled():
            sums_ED = torch.zeros(config.num_experts, config.d_model, device=x.device)
        y_TD = self.experts(
            x_TD,
            routing.expert_ids_TK,
            routing.weights_TK,
            None if all_valid else routing.valid_TK,
            sums_ED=sums_ED,
        )
        if default is not None and torch.is_grad_enabled():
            y_TD = y_TD + self._default_gradient(routing, default.default_ED).to(y_TD.dtype)
        if sums_ED is not None:
            weights_E = torch.zeros(config.num_experts, device=x.device).index_add_(
                0,
                routing.expert_ids_TK.reshape(-1),
                torch.where(routing.valid_TK, routing.weights_TK.detach(), 0.0).reshape(-1),
            )
            default.add(sums_ED, weights_E)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        y = y_TD.view_as(x)
        return (y, routing) if return_routing else y

    def _default_gradient(self, routing: Routing, default_ED: Tensor) -> Tensor:
        """Default MoE: ``sum_e w_te default_e`` over the experts token t was not computed on,
        with w the gate's scores there (times ``score_scale``), as a term of value 0 whose
        gradient reaches those scores: the router hears from every expert, at the cost of one
        ``[T, E] @ [E, D]`` matmul, and the forward is unchanged."""
        scores_TE = routing.scores_TE
        computed_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(
            -1, routing.expert_ids_TK, routing.valid_TK
        )
        missing_TE = torch.where(computed_TE, 0.0, scores_TE) * self.config.score_scale
        if routing.padding_mask_T is not None:
            missing_TE = torch.where(routing.padding_mask_T.unsqueeze(-1), 0.0, missing_TE)
        default_TD = missing_TE @ default_ED
        return default_TD - default_TD.detach()

    def _apply_capacity(self, routing: Routing, capacity: int) -> Routing:
        config = self.config
        priority_TK = None
        if config.drop_policy == "score":
            priority_TK = routing.scores_TE.detach().gather(-1, routing.expert_ids_TK)
        keep_TK = capacity_keep_mask(
            routing.expert_ids_TK, routing.valid_TK, priority_TK, config.num_experts, capacity
        )
        return replace(
            routing,
            weights_TK=routing.weights_TK * keep_TK,
            valid_TK=keep_TK,
            dropped_TK=routing.valid_TK & ~keep_TK,
            capacity=capacity,
        )

    def experts(
        self,
        x_TD: Tensor,
        expert_ids_TK: Tensor,
        weights_TK: Tensor,
        valid_TK: Tensor | None = None,
        *,
        sums_ED: Tensor | None = None,
    ) -> Tensor:
        """Dropless dispatch of the routed experts (the layer minus router and shared expert).

        Args:
            x_TD: Token rows.
            expert_ids_TK: Selected experts.
            weights_TK: fp32 combine weights.
            valid_TK: Slots that carry compute (the others cost no matmul); None when every
                slot does, which skips the masking.
            sums_ED: None, or an fp32 ``[E, D]`` tensor that receives each expert's sum of
                ``weight * output`` over its tokens (Default MoE's statistics; no gradient).

        Returns:
            ``sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` over valid slots, in x's dtype.
        """
        pairs = sort_pairs(expert_ids_TK, weights_TK, valid_TK, self.config.num_experts)
        weights = (self.w1_EDF, self.w3_EDF, self.w2_EFD)
        if self._use_per_slice(x_TD):
            y_TD = run_experts_per_slice(x_TD, pairs, *weights, sums_ED=sums_ED)
        else:
            y_TD = run_experts_grouped(
                x_TD, pairs, valid_TK, *weights, self.config.backend, sums_ED=sums_ED
            )
        return y_TD.to(x_TD.dtype)

    def _use_per_slice(self, x_TD: Tensor) -> bool:
        """``loop``, or ``auto`` on CPU: the per-expert path; else the grouped path."""
        backend = self.config.backend
        return backend == "loop" or (backend == "auto" and x_TD.device.type == "cpu")

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"d_model={c.d_model}, d_ff={c.d_ff}, num_experts={c.num_experts}, k={c.k}"]
        if c.shared_d_ff:
            parts.append(f"shared_d_ff={c.shared_d_ff}")
        if c.capacity_factor is not None:
            parts.append(f"capacity_factor={c.capacity_factor}, drop_policy={c.drop_policy!r}")
        return ", ".join(parts)
