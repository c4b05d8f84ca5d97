"""The record every router returns.

Shape legend: T tokens, E experts, K selected slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def require(condition: Tensor, message: str) -> None:
    """A check of tensor *values* that never makes a GPU wait: a ``ValueError`` on the CPU
    (where reading the result costs nothing), a device-side assert elsewhere and under
    ``torch.compile`` (no host sync, no graph break).

    Args:
        condition: A bool scalar tensor.
        message: The error, naming the argument and what is allowed.

    Raises:
        ValueError: If ``condition`` is False on the CPU.
    """
    if condition.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


@dataclass
class Routing:
    """What a router decided for a batch of tokens.

    Every tensor is fp32 (ids are int64) whatever the model dtype, and has T = the number of
    tokens after flattening the leading dims of the router input.

    Attributes:
        expert_ids_TK: Selected expert per token and slot, int64 in [0, E).
        weights_TK: Combine weight per token and slot. Slots that carry no compute (a sparse
            gate that selected fewer than K experts, a dropped assignment, a padding token)
            have weight 0 and ``valid_TK`` False.
        scores_TE: Full gate scores per expert (softmax / sigmoid probabilities for ``topk``,
            the soft top-k output p for soft gates).
        logits_TE: Raw router logits (before bias, jitter-free), fp32.
        aux_losses: Named auxiliary losses, already multiplied by their coefficients; the
            training loss adds ``sum(aux_losses.values())``.
        tokens_per_expert_E: Number of (valid) assignments per expert in this batch, fp32;
            assignments a capacity limit dropped still count (see ``dropped_TK``).
        valid_TK: Which slots carry an assignment (False for padding slots of variable-count
            gates, for dropped assignments, and for masked padding tokens).
        padding_mask_T: Bool, True for padding tokens (excluded from everything); None when
            the router got no padding mask.
        dropped_TK: Bool, True for assignments the router made but a capacity limit dropped
            (``MoELayer`` with ``capacity_factor``); None when no capacity applies. Dropped
            slots have ``valid_TK`` False and weight 0, but ``tokens_per_expert_E`` still
            counts them: it is the load the router asked for, the quantity drop rate and
            balance metrics are defined on.
        capacity: Assignments each expert could take (None when dropless).
        overflow_T: Experts a support-exact sparse gate gave p > 0 to but could not compute
            because the token's static slot cap (``max_active``) was full, per token (fp32);
            None when the gate never overflows.
        overflow_mass_T: Sum of p on those overflowed experts, per token (fp32); None with
            ``overflow_T``.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    scores_TE: Tensor
    logits_TE: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    tokens_per_expert_E: Tensor | None = None
    valid_TK: Tensor | None = None
    padding_mask_T: Tensor | None = None
    dropped_TK: Tensor | None = None
    capacity: int | None = None
    overflow_T: Tensor | None = None
    overflow_mass_T: Tensor | None = None

    def __post_init__(self) -> None:
        if self.valid_TK is None:
            self.valid_TK = torch.ones_like(self.expert_ids_TK, dtype=torch.bool)
        if self.tokens_per_expert_E is None:
            num_experts = self.scores_TE.shape[-1]
            ids_TK = self.expert_ids_TK
            require(
                ((ids_TK >= 0) & (ids_TK < num_experts)).all(),
                f"expert_ids_TK must lie in [0, {num_experts}) (scores_TE has E = {num_experts})",
            )
            counts_E = torch.zeros(num_experts, dtype=torch.float32, device=self.scores_TE.device)
            self.tokens_per_expert_E = counts_E.index_add_(
                0, self.expert_ids_TK.reshape(-1), self.valid_TK.reshape(-1).float()
            )

    @property
    def num_experts(self) -> int:
        """E, the number of experts routed over."""
        return self.scores_TE.shape[-1]

    @property
    def num_dropped(self) -> Tensor:
        """Number of assignments dropped by the capacity limit (an int64 scalar tensor)."""
        if self.dropped_TK is None:
            return torch.zeros((), dtype=torch.long, device=self.expert_ids_TK.device)
        return self.dropped_TK.sum()

    @property
    def aux_loss(self) -> Tensor:
        """Sum of all auxiliary losses (a zero scalar when there are none)."""
        if not self.aux_losses:
            return self.logits_TE.new_zeros(())
        return torch.stack(list(self.aux_losses.values())).sum()
