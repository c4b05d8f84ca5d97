"""Load-balance metrics for MoE routers: one torchmetrics ``Metric`` fed from a ``Routing`` record.

Shape legend: T tokens, E experts, K selected slots per token, L layers, A = E + 1 bins of a
per-token count (0..E).

Definitions (c_i = assignments the router made to expert i over the window: valid slots plus
slots a capacity limit dropped (``Routing.dropped_TK``), i.e. the load the router asked for,
which is also what ``Routing.tokens_per_expert_E`` counts; c̄ = Σc / E, which is T·K/E when
every slot of every real token is assigned):

- tokens per expert: c.
- MaxVio = (max_i c_i − c̄) / c̄, per batch (mean over batches, and the last batch) and global
  (from the counts summed over the whole window, e.g. a validation pass).
- CV of load = std(c) / mean(c) with the *population* std (divide by E, not E − 1).
- load entropy H = −Σ q_i log q_i with q = c / Σc (nats, 0·log 0 = 0); effective experts exp(H).
- dead-expert fraction = #{i : c_i = 0} / E over the window.
- router entropy: per token, p = scores_TE renormalised to sum 1, −Σ p log p / log E (so a
  uniform router scores 1 and a one-hot router 0), averaged over tokens.
- drop rate = dropped assignments / Σc. With a ``capacity_factor`` the dropped assignments are
  what a capacity C = ceil(factor · Σc / E) per expert and batch would drop,
  Σ_i max(0, c_i − C) (a what-if for a dropless layer); without one they are the ones the layer
  really dropped, Σ ``dropped_TK`` (0 for a dropless layer).
- active experts per token: mean number of valid slots with weight > 0 (below K for sparse gates).
  ``active_experts_p99`` is the 99th percentile of that per-token count over the window's
  tokens: the smallest a such that at least 99 % of the tokens have at most a active experts
  (the inverted-CDF / nearest-rank percentile, always an integer).
- soft mass outside: per token, the share of Σ scores_TE on experts that got no valid slot (that
  is, no compute), averaged over tokens; non-zero only for soft gates and dropped slots.
- overflow (support-exact sparse gates, ``Routing.overflow_T`` / ``overflow_mass_T``; 0 when the
  record has none): an overflowed assignment is an expert the gate gave p > 0 but could not put
  in a slot because the token's static slot cap was full.
  overflow rate = Σ overflow / (Σ slotted + Σ overflow), slotted = valid or dropped slots, that
  is, the share of the assignments the gate wanted that found no slot (a capacity drop still
  had its slot, so capacity does not change this rate);
  overflow mass = Σ overflow_mass / Σ scores_TE, the share of the window's score mass on
  overflowed experts; support per token = mean of (active experts + overflow), the experts the
  gate would have computed without the cap.

Every per-token quantity is summed over real tokens only and divided by their number.

Empty input never gives NaN: with no assignments MaxVio, CV, load entropy and effective experts
are 0 and the dead fraction is 1 (every expert idle); with no tokens the per-token means, the
p99, the drop rate and the overflow rate and mass are 0. Padding is honoured everywhere: padding
tokens (``Routing.padding_mask_T``; for a record without one, tokens with no valid, dropped or
overflowed assignment) are left out of every per-token quantity, and slots that are neither
valid nor dropped count for no expert.

Every state is a float64 sum with ``dist_reduce_fx="sum"``, so under DDP ``compute()`` gives the
values of the data of all ranks together, and ``merge_state`` of two instances equals one
instance fed both windows (the last batch then being the union of the two last batches).
Float64 keeps counts exact (no fp32 rounding past 2^24 assignments); it rules out the MPS
backend, which has no float64. The p99 is exact under this reduction too: its state is a
histogram of the per-token count (A = E + 1 float64 sum bins), not a sample.

Why one ``Metric`` and not a ``MetricCollection`` with compute groups: every value here is a
function of the same handful of sums, and the intermediates of one batch (counts per expert,
the real-token mask, the active experts per token) are shared by most of them. One ``update``
computes each once and adds it to an explicitly declared state; a collection would either
recompute them per member or rely on compute groups, which torchmetrics forms by comparing
member states with ``allclose`` after the first update (a host sync inside the training step).
One metric also gives one state dict to checkpoint, merge and reduce. For a single value, take
its key from ``compute()`` or apply the functional form below to counts you already have
(``max_violation(loads_LE)``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from moe_router.routing import Routing, require

__all__ = [
    "LoadBalanceMetrics",
    "active_experts",
    "capacity_drops",
    "dead_expert_fraction",
    "effective_experts",
    "load_cv",
    "load_entropy",
    "max_violation",
    "normalized_router_entropy",
    "scalar_metrics",
    "soft_mass_outside",
]


# ---------------------------------------------------------------------------------------------
# Functional forms. Count-based ones take counts [..., E] (any leading dims, e.g. loads_LE) and
# reduce the last dim; they compute in float64 and return fp32.
# ---------------------------------------------------------------------------------------------


def _as_counts(counts_E: Tensor) -> Tensor:
    if counts_E.ndim == 0:
        raise ValueError(f"counts_E must have an expert dim, got a 0-d tensor {counts_E}")
    counts_E = counts_E.to(torch.float64)
    require((counts_E >= 0).all(), "counts_E must be counts >= 0 (assignments per expert)")
    return counts_E


def _max_violation_f64(counts_E: Tensor) -> Tensor:
    mean = counts_E.mean(-1)
    violation = (counts_E.amax(-1) - mean) / mean.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(mean > 0, violation, 0.0)


def max_violation(counts_E: Tensor) -> Tensor:
    """MaxVio = (max_i c_i − c̄) / c̄ with c̄ the mean count.

    Args:
        counts_E: Assignments per expert, [..., E].

    Returns:
        fp32 [...]; 0 for perfectly balanced load and, by definition, for all-zero counts.
    """
    return _max_violation_f64(_as_counts(counts_E)).float()


def load_cv(counts_E: Tensor) -> Tensor:
    """Coefficient of variation of the load, population std(c) / mean(c).

    Args:
        counts_E: Assignments per expert, [..., E].

    Returns:
        fp32 [...]; 0 for all-zero counts.
    """
    counts_E = _as_counts(counts_E)
    mean = counts_E.mean(-1)
    cv = counts_E.std(-1, correction=0) / mean.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(mean > 0, cv, 0.0).float()


def _load_entropy_f64(counts_E: Tensor) -> Tensor:
    total = counts_E.sum(-1, keepdim=True)
    share_E = counts_E / total.clamp_min(torch.finfo(torch.float64).tiny)
    # 0 - x rather than -x so that an all-zero row gives +0, not -0.
    return 0.0 - torch.special.xlogy(share_E, share_E).sum(-1)


def load_entropy(counts_E: Tensor) -> Tensor:
    """Entropy (nats) of the load distribution c / Σc; log E when balanced.

    Args:
        counts_E: Assignments per expert, [..., E].

    Returns:
        fp32 [...]; 0 for all-zero counts.
    """
    return _load_entropy_f64(_as_counts(counts_E)).float()


def effective_experts(counts_E: Tensor) -> Tensor:
    """exp(load entropy): the number of equally loaded experts with the same entropy.

    Args:
        counts_E: Assignments per expert, [..., E].

    Returns:
        fp32 [...] in [1, E]; 0 for all-zero counts (no expert carries load).
    """
    counts_E = _as_counts(counts_E)
    effective = _load_entropy_f64(counts_E).exp()
    return torch.where(counts_E.sum(-1) > 0, effective, 0.0).float()


def dead_expert_fraction(counts_E: Tensor) -> Tensor:
    """Fraction of experts with no assignment, #{c_i = 0} / E.

    Args:
        counts_E: Assignments per expert, [..., E].

    Returns:
        fp32 [...]; 1 for all-zero counts.
    """
    return (_as_counts(counts_E) == 0).double().mean(-1).float()


def capacity_drops(counts_E: Tensor, capacity_factor: float) -> Tensor:
    """Assignments a capacity C = ceil(capacity_factor · Σc / E) per expert would drop.

    Args:
        counts_E: Assignments per expert of one batch, [..., E].
        capacity_factor: Capacity per expert in units of the balanced load Σc / E, > 0.

    Returns:
        float64 [...]: Σ_i max(0, c_i − C) (exact integers, kept float64 for accumulation).

    Raises:
        ValueError: If ``capacity_factor`` is not a positive finite number.
    """
    _check_capacity_factor(capacity_factor)
    counts_E = _as_counts(counts_E)
    num_experts = counts_E.shape[-1]
    # Same operation order as math.ceil(factor * T * K / E) so the rounding matches it.
    capacity = torch.ceil(capacity_factor * counts_E.sum(-1, keepdim=True) / num_experts)
    return (counts_E - capacity).clamp_min(0).sum(-1)


def normalized_router_entropy(scores_TE: Tensor) -> Tensor:
    """Per-token entropy of the router scores renormalised to a distribution, over log E.

    Soft top-k scores sum to K and sigmoid scores to anything, so each row is divided by its
    sum first; the result is 1 for a uniform router and 0 for a one-hot one.

    Args:
        scores_TE: Non-negative gate scores, [T, E].

    Returns:
        fp32 [T]; 0 for a row of zeros and when E = 1.
    """
    scores_TE = scores_TE.float()
    num_experts = scores_TE.shape[-1]
    total_T1 = scores_TE.sum(-1, keepdim=True)
    p_TE = scores_TE / total_T1.clamp_min(torch.finfo(torch.float32).tiny)
    entropy_T = 0.0 - torch.special.xlogy(p_TE, p_TE).sum(-1)
    if num_experts == 1:
        return torch.zeros_like(entropy_T)
    return entropy_T / math.log(num_experts)


def _selected_TE(expert_ids_TK: Tensor, valid_TK: Tensor, num_experts: int) -> Tensor:
    """Bool [T, E]: which experts receive each token (a scatter-add tolerates repeated ids)."""
    hits_TE = torch.zeros(
        expert_ids_TK.shape[0], num_experts, dtype=torch.float32, device=expert_ids_TK.device
    )
    return hits_TE.scatter_add_(1, expert_ids_TK, valid_TK.float()) > 0


def soft_mass_outside(scores_TE: Tensor, expert_ids_TK: Tensor, valid_TK: Tensor) -> Tensor:
    """Per-token share of the score mass on experts that receive no valid slot.

    Args:
        scores_TE: Non-negative gate scores, [T, E].
        expert_ids_TK: Selected expert ids, [T, K].
        valid_TK: Which slots carry an assignment, [T, K].

    Returns:
        fp32 [T] in [0, 1]; 0 for a row of zero scores.
    """
    scores_TE = scores_TE.float()
    selected_TE = _selected_TE(expert_ids_TK, valid_TK, scores_TE.shape[-1])
    total_T = scores_TE.sum(-1)
    outside_T = torch.where(selected_TE, 0.0, scores_TE).sum(-1)
    share_T = outside_T / total_T.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(total_T > 0, share_T, 0.0)


def active_experts(weights_TK: Tensor, valid_TK: Tensor) -> Tensor:
    """Per-token number of valid slots with a positive combine weight.

    Args:
        weights_TK: Combine weights, [T, K].
        valid_TK: Which slots carry an assignment, [T, K].

    Returns:
        fp32 [T].
    """
    return (valid_TK & (weights_TK > 0)).float().sum(-1)


def _check_capacity_factor(capacity_factor: float | None) -> None:
    if capacity_factor is None:
        return
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(
            f"capacity_factor must be a positive finite number or None, got {capacity_factor!r}"
        )


# ---------------------------------------------------------------------------------------------
# The metric.
# ---------------------------------------------------------------------------------------------


def _check_num_experts(num_experts: int) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")


def _check_routing(routing: Routing, num_experts: int) -> None:
    """Shapes only (static), so the check never syncs with the host."""
    if not isinstance(routing, Routing):
        raise ValueError(f"routing must be a moe_router.routing.Routing, got {type(routing)}")
    ids_TK, scores_TE = routing.expert_ids_TK, routing.scores_TE
    if ids_TK.ndim != 2:
        raise ValueError(f"routing.expert_ids_TK must be [T, K], got shape {tuple(ids_TK.shape)}")
    num_tokens, num_slots = ids_TK.shape
    for name, tensor in (
        ("weights_TK", routing.weights_TK),
        ("valid_TK", routing.valid_TK),
        ("dropped_TK", routing.dropped_TK),
    ):
        if tensor is not None and tensor.shape != ids_TK.shape:
            raise ValueError(
                f"routing.{name} must have the shape of expert_ids_TK {tuple(ids_TK.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    if scores_TE.shape != (num_tokens, num_experts):
        raise ValueError(
            f"routing.scores_TE must be [T, E] = [{num_tokens}, {num_experts}] for this metric "
            f"(num_experts={num_experts}), got {tuple(scores_TE.shape)}"
        )
    # The active-expert histogram has bins 0..E; a token's active count is at most K.
    if num_slots > num_experts:
        raise ValueError(
            f"routing.expert_ids_TK must have K <= num_experts = {num_experts} slots per token, "
            f"got K = {num_slots}"
        )
    for name, tensor in (
        ("padding_mask_T", routing.padding_mask_T),
        ("overflow_T", routing.overflow_T),
        ("overflow_mass_T", routing.overflow_mass_T),
    ):
        if tensor is not None and tensor.shape != (num_tokens,):
            raise ValueError(
                f"routing.{name} must be [T] = [{num_tokens}], got {tuple(tensor.shape)}"
            )
    if (routing.overflow_T is None) != (routing.overflow_mass_T is None):
        raise ValueError(
            "routing.overflow_T and routing.overflow_mass_T must both be set or both be None, "
            f"got overflow_T {'None' if routing.overflow_T is None else 'set'} and "
            f"overflow_mass_T {'None' if routing.overflow_mass_T is None else 'set'}"
        )


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator as fp32, 0 where the denominator is 0.

    Every denominator here is a non-negative sum; clamping it to the smallest positive float64
    only touches the 0 case and keeps the untaken branch of ``where`` free of 0 / 0.
    """
    safe = denominator.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(denominator > 0, numerator / safe, 0.0).float()


def _percentile_from_histogram(counts_A: Tensor, percent: int) -> Tensor:
    """Inverted-CDF percentile of a value a in 0..A-1 from its histogram counts_A.

    The smallest a with #{x <= a} >= percent / 100 · N, compared as 100 · #{x <= a} <
    percent · N in float64 integers, so it is exact (no rounding of 0.99 · N). 0 when N = 0.
    """
    cumulative_A = counts_A.cumsum(0)
    below_A = 100 * cumulative_A < percent * cumulative_A[-1]
    return below_A.sum(dtype=torch.float64).float()


class LoadBalanceMetrics(Metric):
    """Every load-balance metric of one MoE layer, from one set of float64 sum states.

    Keep one instance per layer and stage (train / val) as a module attribute; call it (or
    ``update``) with each batch's ``Routing`` and ``compute()`` at the end of the window.
    ``forward`` returns the same dict for the batch alone, whose ``max_vio_batch_last`` is the
    per-step MaxVio to log during training.

    ``compute()`` returns a dict of fp32 tensors: ``tokens_per_expert`` [E] and the scalars
    named in ``SCALAR_KEYS`` (definitions in the module docstring). Log the scalars with
    ``scalar_metrics(out, prefix)``.

    Args:
        num_experts: E.
        capacity_factor: If set, the drop rate counts what a capacity
            C = ceil(capacity_factor · Σc / E) per expert and batch would drop; if None, the
            assignments the layer really dropped (``Routing.dropped_TK``; none when dropless).
        **kwargs: Passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: If ``num_experts`` is not an int >= 1 or ``capacity_factor`` is not None or
            a positive finite number.
    """

    full_state_update: ClassVar[bool] = False
    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None

    SCALAR_KEYS: ClassVar[tuple[str, ...]] = (
        "max_vio_batch_mean",
        "max_vio_batch_last",
        "max_vio_global",
        "load_cv",
        "load_entropy",
        "effective_experts",
        "dead_expert_fraction",
        "router_entropy",
        "drop_rate",
        "active_experts_per_token",
        "active_experts_p99",
        "support_per_token",
        "soft_mass_outside",
        "overflow_rate",
        "overflow_mass",
    )

    counts_E: Tensor
    last_counts_E: Tensor
    batch_max_vio_sum: Tensor
    num_batches: Tensor
    num_assigned: Tensor
    num_dropped: Tensor
    num_tokens: Tensor
    router_entropy_sum: Tensor
    active_experts_sum: Tensor
    tokens_per_active_count_A: Tensor
    soft_mass_outside_sum: Tensor
    num_slotted: Tensor
    num_overflow: Tensor
    score_mass_sum: Tensor
    overflow_mass_sum: Tensor

    def __init__(
        self, num_experts: int, capacity_factor: float | None = None, **kwargs: Any
    ) -> None:
        _check_num_experts(num_experts)
        _check_capacity_factor(capacity_factor)
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64)

        # Load, over the window and of the last batch. last_counts_E is replaced by each update,
        # not added to; summed over DDP ranks it is the load of the last step's global batch.
        self.add_state("counts_E", zeros(num_experts), dist_reduce_fx="sum")
        self.add_state("last_counts_E", zeros(num_experts), dist_reduce_fx="sum")
        # Per-batch MaxVio, summed over the batches that had some load, and their number.
        self.add_state("batch_max_vio_sum", zeros(), dist_reduce_fx="sum")
        self.add_state("num_batches", zeros(), dist_reduce_fx="sum")
        # Drop rate: dropped (real or what-if) over all assignments the router made.
        self.add_state("num_assigned", zeros(), dist_reduce_fx="sum")
        self.add_state("num_dropped", zeros(), dist_reduce_fx="sum")
        # Per-token sums over real tokens, and their number.
        self.add_state("num_tokens", zeros(), dist_reduce_fx="sum")
        self.add_state("router_entropy_sum", zeros(), dist_reduce_fx="sum")
        self.add_state("active_experts_sum", zeros(), dist_reduce_fx="sum")
        self.add_state("soft_mass_outside_sum", zeros(), dist_reduce_fx="sum")
        # tokens_per_active_count_A[a] = real tokens with a active experts, a in 0..E.
        self.add_state("tokens_per_active_count_A", zeros(num_experts + 1), dist_reduce_fx="sum")
        # Overflow of support-exact sparse gates, over real tokens.
        self.add_state("num_slotted", zeros(), dist_reduce_fx="sum")
        self.add_state("num_overflow", zeros(), dist_reduce_fx="sum")
        self.add_state("score_mass_sum", zeros(), dist_reduce_fx="sum")
        self.add_state("overflow_mass_sum", zeros(), dist_reduce_fx="sum")

    def update(self, routing: Routing) -> None:
        """Accumulate one batch.

        Tensor arithmetic on the routing's device only: no ``.item()``, no boolean-mask
        indexing, no data-dependent Python branch, so ``update`` never syncs with the host.

        Args:
            routing: The router's (or, with a capacity, the MoE layer's) record for the batch;
                its ``padding_mask_T``, ``dropped_TK``, ``overflow_T`` and ``overflow_mass_T``
                are used when present.

        Raises:
            ValueError: If ``routing`` is not a ``Routing``, its shapes do not fit each other or
                ``num_experts``, it has more slots than experts, or only one of its overflow
                fields is set.
        """
        _check_routing(routing, self.num_experts)
        ids_TK, scores_TE = routing.expert_ids_TK, routing.scores_TE
        num_tokens = ids_TK.shape[0]
        valid_TK = routing.valid_TK.bool()
        if routing.dropped_TK is None:
            dropped_TK = torch.zeros_like(valid_TK)
        else:
            dropped_TK = routing.dropped_TK.bool()
        requested_TK = valid_TK | dropped_TK
        if routing.overflow_T is None:
            overflow_T = torch.zeros(num_tokens, dtype=torch.float64, device=ids_TK.device)
            overflow_mass_T = overflow_T
        else:
            overflow_T = routing.overflow_T.double()
            overflow_mass_T = routing.overflow_mass_T.double()
        if routing.padding_mask_T is not None:
            token_mask_T = ~routing.padding_mask_T.bool()
        else:
            token_mask_T = requested_TK.any(-1) | (overflow_T > 0)

        def token_sum(per_token_T: Tensor) -> Tensor:
            # where, not multiply: padding rows may hold NaN scores, and NaN * 0 is NaN.
            return torch.where(token_mask_T, per_token_T, 0.0).sum(dtype=torch.float64)

        # Load.
        counts_E = torch.zeros(self.num_experts, dtype=torch.float64, device=ids_TK.device)
        counts_E.index_add_(0, ids_TK.reshape(-1), requested_TK.reshape(-1).double())
        num_assigned = counts_E.sum()
        self.counts_E = self.counts_E + counts_E
        self.last_counts_E = counts_E
        # A batch with no assignment at all (pure padding) has no MaxVio; leave it out.
        self.batch_max_vio_sum = self.batch_max_vio_sum + _max_violation_f64(counts_E)
        self.num_batches = self.num_batches + (num_assigned > 0).double()

        # Drops.
        if self.capacity_factor is not None:
            num_dropped = capacity_drops(counts_E, self.capacity_factor)
        else:
            num_dropped = dropped_TK.sum(dtype=torch.float64)
        self.num_assigned = self.num_assigned + num_assigned
        self.num_dropped = self.num_dropped + num_dropped

        # Per-token quantities.
        active_T = active_experts(routing.weights_TK, valid_TK)
        outside_T = soft_mass_outside(scores_TE, ids_TK, valid_TK)
        self.num_tokens = self.num_tokens + token_mask_T.sum(dtype=torch.float64)
        self.router_entropy_sum = self.router_entropy_sum + token_sum(
            normalized_router_entropy(scores_TE)
        )
        self.active_experts_sum = self.active_experts_sum + token_sum(active_T)
        self.soft_mass_outside_sum = self.soft_mass_outside_sum + token_sum(outside_T)
        tokens_per_active_count_A = torch.zeros(
            self.num_experts + 1, dtype=torch.float64, device=ids_TK.device
        )
        tokens_per_active_count_A.index_add_(0, active_T.long(), token_mask_T.double())
        self.tokens_per_active_count_A = self.tokens_per_active_count_A + tokens_per_active_count_A

        # Overflow.
        self.num_slotted = self.num_slotted + token_sum(requested_TK.sum(-1, dtype=torch.float64))
        self.num_overflow = self.num_overflow + token_sum(overflow_T)
        self.score_mass_sum = self.score_mass_sum + token_sum(scores_TE.double().sum(-1))
        self.overflow_mass_sum = self.overflow_mass_sum + token_sum(overflow_mass_T)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Update with one batch and return the metrics of that batch alone.

        The fast forward path merges the batch into the running states by each state's
        reduction (a sum); ``last_counts_E`` must end up as the batch's counts, so the previous
        value is taken back out.
        """
        if self.dist_sync_on_step:
            return super().forward(*args, **kwargs)
        previous_last_E = self.last_counts_E.clone()
        batch_values = super().forward(*args, **kwargs)
        self.last_counts_E = self.last_counts_E - previous_last_E
        return batch_values

    def compute(self) -> dict[str, Tensor]:
        """All metrics of the window, fp32: ``tokens_per_expert`` [E] and ``SCALAR_KEYS``."""
        counts_E, num_tokens = self.counts_E, self.num_tokens
        return {
            "tokens_per_expert": counts_E.float(),
            "max_vio_batch_mean": _ratio(self.batch_max_vio_sum, self.num_batches),
            "max_vio_batch_last": _max_violation_f64(self.last_counts_E).float(),
            "max_vio_global": _max_violation_f64(counts_E).float(),
            "load_cv": load_cv(counts_E),
            "load_entropy": load_entropy(counts_E),
            "effective_experts": effective_experts(counts_E),
            "dead_expert_fraction": dead_expert_fraction(counts_E),
            "router_entropy": _ratio(self.router_entropy_sum, num_tokens),
            "drop_rate": _ratio(self.num_dropped, self.num_assigned),
            "active_experts_per_token": _ratio(self.active_experts_sum, num_tokens),
            "active_experts_p99": _percentile_from_histogram(self.tokens_per_active_count_A, 99),
            "support_per_token": _ratio(self.active_experts_sum + self.num_overflow, num_tokens),
            "soft_mass_outside": _ratio(self.soft_mass_outside_sum, num_tokens),
            "overflow_rate": _ratio(self.num_overflow, self.num_slotted + self.num_overflow),
            "overflow_mass": _ratio(self.overflow_mass_sum, self.score_mass_sum),
        }

    def extra_repr(self) -> str:
        if self.capacity_factor is None:
            return f"num_experts={self.num_experts}"
        return f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"


def scalar_metrics(values: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The scalar entries of a ``LoadBalanceMetrics`` result, keys prefixed, ready for logging.

    Args:
        values: A ``LoadBalanceMetrics.compute()`` (or ``forward``) result.
        prefix: Put before every key, e.g. ``"val/layer3/"``.

    Returns:
        ``{prefix + key: value}`` for every key in ``LoadBalanceMetrics.SCALAR_KEYS``.

    Raises:
        ValueError: If a scalar key is missing from ``values``.
    """
    missing = [key for key in LoadBalanceMetrics.SCALAR_KEYS if key not in values]
    if missing:
        raise ValueError(f"values lacks the load-balance keys {missing}; got {sorted(values)}")
    return {prefix + key: values[key] for key in LoadBalanceMetrics.SCALAR_KEYS}
