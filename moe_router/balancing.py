"""Load balancing: auxiliary losses (functional) and the auxiliary-loss-free expert bias.

Shape legend: B sequences, S tokens per sequence, T tokens (= B*S), E experts, K selected slots.

The losses take the routing decision as tensors, so any router (or a test) can call them:

* ``load_balancing_loss`` — Switch / GShard ``E * sum_i f_i * P_i`` over a micro-batch, where
  ``f_i`` is the fraction of assignments that went to expert i (no gradient: counts are
  discrete) and ``P_i`` the mean routing probability of expert i (carries the gradient).
  Perfectly balanced routing gives exactly 1.
* ``sequence_load_balancing_loss`` — the same per sequence, averaged over sequences
  (DeepSeek-V3's complementary sequence-wise loss).
* ``router_z_loss`` — ST-MoE's ``mean_t logsumexp(logits_t)^2`` keeps logits small.

``ExpertBias`` is DeepSeek-V3's auxiliary-loss-free balancing: a selection-only fp32 bias,
``b += u * sign(mean_load - load)``, recentred to zero mean, updated after the optimizer step from
loads summed over all data-parallel ranks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moe_router.routing import Routing
from moe_router.state import RouterState, all_reduce_sum

if TYPE_CHECKING:
    from moe_router.config import RouterConfig

__all__ = [
    "ExpertBias",
    "load_balancing_loss",
    "relu_l1_loss",
    "router_aux_losses",
    "router_z_loss",
    "sequence_load_balancing_loss",
]


def _check_routing_shapes(probs: Tensor, expert_ids: Tensor, valid: Tensor | None) -> None:
    if probs.shape[:-1] != expert_ids.shape[:-1]:
        raise ValueError(
            f"probs and expert_ids must share leading dims, got {tuple(probs.shape)} and "
            f"{tuple(expert_ids.shape)}"
        )
    if valid is not None and valid.shape != expert_ids.shape:
        raise ValueError(
            f"valid must have expert_ids' shape {tuple(expert_ids.shape)}, got {tuple(valid.shape)}"
        )


def sequence_load_balancing_loss(
    probs_BSE: Tensor,
    expert_ids_BSK: Tensor,
    valid_BSK: Tensor | None = None,
    token_mask_BS: Tensor | None = None,
) -> Tensor:
    """Switch/GShard balance loss computed per sequence and averaged over sequences.

    For each sequence b: ``E * sum_i f_bi * P_bi`` with ``f_bi`` the fraction of the sequence's
    valid assignments routed to expert i and ``P_bi`` the mean of ``probs`` over the sequence's
    real tokens. Sequences without any real token are left out of the mean.

    Args:
        probs_BSE: Per-token routing distribution over experts; each row should sum to 1
            (the router normalises its scores before calling this). Carries the gradient.
        expert_ids_BSK: Selected expert per token and slot (int64).
        valid_BSK: Which slots carry an assignment; all slots when None.
        token_mask_BS: True for real tokens, False for padding; all real when None.

    Returns:
        A scalar fp32 tensor; 1.0 for perfectly balanced routing.

    Raises:
        ValueError: If the shapes do not line up.
    """
    _check_routing_shapes(probs_BSE, expert_ids_BSK, valid_BSK)
    num_experts = probs_BSE.shape[-1]
    probs_BSE = probs_BSE.float()
    if valid_BSK is None:
        valid_BSK = torch.ones_like(expert_ids_BSK, dtype=torch.bool)
    if token_mask_BS is None:
        token_mask_BS = torch.ones(probs_BSE.shape[:-1], dtype=torch.bool, device=probs_BSE.device)
    # Padding tokens must not count anywhere, whatever their slots say.
    valid_BSK = valid_BSK & token_mask_BS.unsqueeze(-1)
    batch = probs_BSE.shape[0]

    # f: assignment fractions (discrete, no gradient by construction).
    counts_BE = torch.zeros(batch, num_experts, device=probs_BSE.device)
    counts_BE.scatter_add_(1, expert_ids_BSK.flatten(1), valid_BSK.flatten(1).float())
    fraction_BE = counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1.0)

    # P: mean routing probability over the real tokens of each sequence.
    token_weight_BS = token_mask_BS.float()
    num_tokens_B = token_weight_BS.sum(-1)
    prob_sum_BE = torch.einsum("bse,bs->be", probs_BSE, token_weight_BS)
    mean_prob_BE = prob_sum_BE / num_tokens_B.clamp_min(1.0).unsqueeze(-1)

    loss_B = num_experts * (fraction_BE * mean_prob_BE).sum(-1)
    has_tokens_B = (num_tokens_B > 0).float()
    return (loss_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1.0)


def load_balancing_loss(
    probs_TE: Tensor,
    expert_ids_TK: Tensor,
    valid_TK: Tensor | None = None,
    token_mask_T: Tensor | None = None,
) -> Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i`` over one micro-batch.

    Args:
        probs_TE: Per-token routing distribution over experts (rows sum to 1). Carries the
            gradient.
        expert_ids_TK: Selected expert per token and slot (int64).
        valid_TK: Which slots carry an assignment; all slots when None.
        token_mask_T: True for real tokens, False for padding; all real when None.

    Returns:
        A scalar fp32 tensor; 1.0 for perfectly balanced routing, E when every assignment and
        all probability mass go to one expert.

    Raises:
        ValueError: If the shapes do not line up.
    """
    return sequence_load_balancing_loss(
        probs_TE.unsqueeze(0),
        expert_ids_TK.unsqueeze(0),
        None if valid_TK is None else valid_TK.unsqueeze(0),
        None if token_mask_T is None else token_mask_T.unsqueeze(0),
    )


def router_z_loss(logits_TE: Tensor, token_mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over real tokens of ``logsumexp(logits)^2``.

    Args:
        logits_TE: Raw router logits.
        token_mask_T: True for real tokens, False for padding; all real when None.

    Returns:
        A scalar fp32 tensor (0 when there is no real token).
    """
    log_z_T = torch.logsumexp(logits_TE.float(), dim=-1)
    if token_mask_T is None:
        return log_z_T.square().sum() / max(log_z_T.numel(), 1)  # 0, not NaN, with no token
    weight_T = token_mask_T.float()
    return (log_z_T.square() * weight_T).sum() / weight_T.sum().clamp_min(1.0)


def relu_l1_loss(gates_TE: Tensor, k: int, token_mask_T: Tensor | None = None) -> Tensor:
    """ReMoE's load-balanced L1 penalty on ReLU gates (unscaled).

    Megatron's switch balance formula applied to the ReLU outputs:
    ``E * sum_e (sum_t g_te / T) * (n_e / (T K))`` with ``n_e`` the real tokens whose gate
    ``g_te`` is > 0 (no gradient: counts) and T the real tokens. It pushes every gate toward
    0, the busiest experts' hardest.

    Args:
        gates_TE: ReLU gates (carry the gradient).
        k: K, the target number of active experts per token.
        token_mask_T: True for real tokens; all real when None.

    Returns:
        A scalar fp32 tensor (0 when there is no real token).
    """
    gates_TE = gates_TE.float()
    if token_mask_T is not None:
        gates_TE = torch.where(token_mask_T.unsqueeze(-1), gates_TE, 0.0)
        num_tokens = token_mask_T.float().sum().clamp_min(1.0)
    else:
        num_tokens = max(gates_TE.shape[0], 1)
    num_experts = gates_TE.shape[-1]
    active_E = (gates_TE.detach() > 0).float().sum(0)
    mean_gate_E = gates_TE.sum(0) / num_tokens
    return num_experts * (mean_gate_E * active_E / (num_tokens * k)).sum()


def router_aux_losses(
    config: RouterConfig,
    lead_shape: tuple[int, ...],
    logits_TE: Tensor,
    scores_TE: Tensor,
    expert_ids_TK: Tensor,
    valid_TK: Tensor,
    token_mask_T: Tensor | None,
    relu_l1_coef: Tensor | None = None,
) -> dict[str, Tensor]:
    """The auxiliary losses a router's config enables, already scaled by their coefficients.

    Args:
        config: The router's config (``aux_loss_coef``, ``seq_aux_loss_coef``,
            ``z_loss_coef``).
        lead_shape: The leading dims of the router input: ``[B, S]`` defines the sequences of
            the per-sequence loss; any other shape is one sequence.
        logits_TE: Raw router logits (z-loss).
        scores_TE: The gate's scores (softmax / sigmoid, or the soft top-k p).
        expert_ids_TK: Selected experts.
        valid_TK: Which slots carry an assignment.
        token_mask_T: True for real tokens; all real when None.
        relu_l1_coef: The ``relu`` gate's current L1 coefficient (its sparsity controller's);
            None for the other gates.

    Returns:
        ``{"load_balance": ..., "seq_load_balance": ..., "z_loss": ..., "relu_l1": ...}``,
        the enabled ones.
    """
    losses: dict[str, Tensor] = {}
    if config.aux_loss_coef > 0 or config.seq_aux_loss_coef > 0:
        # P_i needs a distribution per token: softmax already is one, sigmoid scores and soft
        # top-k p (which sums to K) are normalised by their row sum (DeepSeek-V3).
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    if config.aux_loss_coef > 0:
        losses["load_balance"] = config.aux_loss_coef * load_balancing_loss(
            probs_TE, expert_ids_TK, valid_TK, token_mask_T
        )
    if config.seq_aux_loss_coef > 0:
        batch = lead_shape[0] if len(lead_shape) >= 2 else 1
        seq = math.prod(lead_shape[1:]) if len(lead_shape) >= 2 else logits_TE.shape[0]
        token_mask_BS = None if token_mask_T is None else token_mask_T.view(batch, seq)
        losses["seq_load_balance"] = config.seq_aux_loss_coef * sequence_load_balancing_loss(
            probs_TE.view(batch, seq, config.num_experts),
            expert_ids_TK.view(batch, seq, expert_ids_TK.shape[-1]),
            valid_TK.view(batch, seq, valid_TK.shape[-1]),
            token_mask_BS,
        )
    if config.z_loss_coef > 0:
        losses["z_loss"] = config.z_loss_coef * router_z_loss(logits_TE, token_mask_T)
    if relu_l1_coef is not None:
        l1_loss = relu_l1_loss(scores_TE, config.k, token_mask_T)
        losses["relu_l1"] = relu_l1_coef * l1_loss
    return losses


class ExpertBias(RouterState):
    """DeepSeek-V3 auxiliary-loss-free balancing bias (selection-only, fp32).

    The bias is added to the selection scores only, so it changes which experts a token goes
    to but never the combine weights, and it gets no gradient. The support-exact
    ``sparse_soft_topk`` gate is the exception: there the bias shifts each expert's threshold
    inside the solve (its weights are the biased p), since that gate computes exactly the
    experts with p > 0.

    A router component (:class:`~moe_router.state.RouterState`): training forwards
    :meth:`accumulate` their loads, :meth:`step` applies :meth:`update` to them after each
    optimizer step. Loads are summed over the data-parallel ranks first, so every rank applies
    the same update and holds the same bias.

    The buffer stays fp32 when the module is cast (``.to(torch.bfloat16)``, ``.half()``):
    updates of size ``u`` ~ 1e-3 would be lost to bf16 rounding, and ranks must agree exactly.

    Args:
        num_experts: E.
        update_rate: u, the step size of the sign update.

    Raises:
        ValueError: If ``num_experts`` < 1 or ``update_rate`` < 0.
    """

    def __init__(self, num_experts: int, update_rate: float = 1e-3) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not update_rate >= 0:
            raise ValueError(f"update_rate must be >= 0, got {update_rate}")
        self.num_experts = num_experts
        self.update_rate = update_rate
        self.register_buffer("bias_E", torch.zeros(num_experts, dtype=torch.float32))
        # Loads of the training forwards since the last step.
        self.register_buffer(
            "pending_load_E", torch.zeros(num_experts, dtype=torch.float32), persistent=False
        )

    @torch.no_grad()
    def accumulate(self, routing: Routing, token_mask_T: Tensor | None) -> None:
        """Add the batch's assignments per expert (padding is already out of them)."""
        self.pending_load_E += routing.tokens_per_expert_E

    @torch.no_grad()
    def step(self) -> None:
        """:meth:`update` from the loads since the last step, then reset them."""
        self.update(self.pending_load_E)
        self.pending_load_E.zero_()

    def forward(self, scores_TE: Tensor) -> Tensor:
        """Selection scores: ``scores + bias`` (fp32; the bias carries no gradient)."""
        return scores_TE.float() + self.bias_E

    @torch.no_grad()
    def update(self, tokens_per_expert_E: Tensor) -> None:
        """Apply ``b += u * sign(mean_load - load)`` and recentre b to zero mean.

        Args:
            tokens_per_expert_E: This rank's assignments per expert since the last update.
                Summed over all ranks (``all_reduce``) when torch.distributed is initialised.

        Raises:
            ValueError: If the load does not have E entries.
        """
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert_E must have shape ({self.num_experts},), "
                f"got {tuple(tokens_per_expert_E.shape)}"
            )
        load_E = tokens_per_expert_E.detach().to(device=self.bias_E.device, dtype=torch.float32)
        load_E = all_reduce_sum(load_E)  # a copy: the caller's tensor is never touched
        self.bias_E += self.update_rate * torch.sign(load_E.mean() - load_E)
        self.bias_E -= self.bias_E.mean()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, update_rate={self.update_rate}"
