"""Load-balance metrics for MoE routers, as torchmetrics ``Metric``s fed from a ``Routing`` record.

Shape legend: T tokens, E experts, K selected slots per token, L layers.

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
- soft mass outside: per token, the share of Σ scores_TE on experts that got no valid slot (that
  is, no compute), averaged over tokens; non-zero only for soft gates and dropped slots.

Empty input never gives NaN: with no assignments MaxVio, CV, load entropy and effective experts
are 0 and the dead fraction is 1 (every expert idle); with no tokens the per-token means and
the drop rate are 0. Padding is honoured everywhere: padding tokens (``Routing.padding_mask_T``;
for a record without one, tokens with no valid or dropped slot) are left out of the per-token
means, and slots that are neither valid nor dropped count for no expert.

Every state is a float64 sum with ``dist_reduce_fx="sum"``, so under DDP ``compute()`` gives the
values of the data of all ranks together. Float64 keeps counts exact (no fp32 rounding past
2^24 assignments); it rules out the MPS backend, which has no float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from moe_router.routing import Routing

__all__ = [
    "ActiveExpertsPerToken",
    "DeadExpertFraction",
    "DropRate",
    "EffectiveExperts",
    "LoadBalanceMetrics",
    "LoadCV",
    "LoadEntropy",
    "MaxViolation",
    "RouterEntropy",
    "SoftMassOutside",
    "TokensPerExpert",
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
    return counts_E.to(torch.float64)


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
# Per-batch state increments.
# ---------------------------------------------------------------------------------------------


def _state_default(name: str, num_experts: int) -> Tensor:
    shape = (num_experts,) if name.endswith("_E") else ()
    return torch.zeros(shape, dtype=torch.float64)


class _RoutingBatch:
    """The increment of every metric state for one ``Routing``, each computed only if asked for.

    Everything is tensor arithmetic on the routing's device: no ``.item()``, no boolean-mask
    indexing, no data-dependent Python branches, so ``update`` never syncs with the host.
    """

    def __init__(self, routing: Routing, num_experts: int, capacity_factor: float | None) -> None:
        if not isinstance(routing, Routing):
            raise ValueError(f"routing must be a moe_router.routing.Routing, got {type(routing)}")
        ids_TK, scores_TE = routing.expert_ids_TK, routing.scores_TE
        if ids_TK.ndim != 2:
            raise ValueError(
                f"routing.expert_ids_TK must be [T, K], got shape {tuple(ids_TK.shape)}"
            )
        num_tokens = ids_TK.shape[0]
        dropped_TK, padding_mask_T = routing.dropped_TK, routing.padding_mask_T
        for name, tensor in (
            ("weights_TK", routing.weights_TK),
            ("valid_TK", routing.valid_TK),
            ("dropped_TK", dropped_TK),
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
        if padding_mask_T is not None and padding_mask_T.shape != (num_tokens,):
            raise ValueError(
                f"routing.padding_mask_T must be [T] = [{num_tokens}], "
                f"got {tuple(padding_mask_T.shape)}"
            )
        self.routing = routing
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.valid_TK = routing.valid_TK.bool()
        self.dropped_TK = (
            torch.zeros_like(self.valid_TK) if dropped_TK is None else dropped_TK.bool()
        )
        self.requested_TK = self.valid_TK | self.dropped_TK
        if padding_mask_T is not None:
            self.token_mask_T = ~padding_mask_T.bool()
        else:
            self.token_mask_T = self.requested_TK.any(-1)

    def _token_sum(self, per_token_T: Tensor) -> Tensor:
        # where, not multiply: padding rows may hold NaN scores, and NaN * 0 is NaN.
        return torch.where(self.token_mask_T, per_token_T, 0.0).sum(dtype=torch.float64)

    @cached_property
    def counts_E(self) -> Tensor:
        counts_E = torch.zeros(
            self.num_experts, dtype=torch.float64, device=self.routing.expert_ids_TK.device
        )
        return counts_E.index_add_(
            0, self.routing.expert_ids_TK.reshape(-1), self.requested_TK.reshape(-1).double()
        )

    @cached_property
    def num_assigned(self) -> Tensor:
        return self.counts_E.sum()

    @cached_property
    def num_batches(self) -> Tensor:
        # A batch with no assignment at all (pure padding) has no MaxVio; leave it out of the mean.
        return (self.num_assigned > 0).double()

    @cached_property
    def batch_max_vio_sum(self) -> Tensor:
        return _max_violation_f64(self.counts_E)

    @cached_property
    def last_counts_E(self) -> Tensor:
        return self.counts_E

    @cached_property
    def num_tokens(self) -> Tensor:
        return self.token_mask_T.sum(dtype=torch.float64)

    @cached_property
    def router_entropy_sum(self) -> Tensor:
        return self._token_sum(normalized_router_entropy(self.routing.scores_TE))

    @cached_property
    def active_experts_sum(self) -> Tensor:
        return self._token_sum(active_experts(self.routing.weights_TK, self.routing.valid_TK))

    @cached_property
    def soft_mass_outside_sum(self) -> Tensor:
        routing = self.routing
        return self._token_sum(
            soft_mass_outside(routing.scores_TE, routing.expert_ids_TK, routing.valid_TK)
        )

    @cached_property
    def num_dropped(self) -> Tensor:
        if self.capacity_factor is not None:
            return capacity_drops(self.counts_E, self.capacity_factor)
        return self.dropped_TK.sum(dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator as fp32, 0 where the denominator is 0.

    Every denominator here is a count, so clamping it to >= 1 only touches the 0 case and keeps
    the untaken branch of ``where`` finite.
    """
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1.0), 0.0).float()


class _RoutingMetric(Metric):
    """Base: float64 sum states named in ``_state_names``, updated from a ``Routing``.

    ``last_counts_E`` is the one state that an update replaces instead of adding to; it is still
    summed across DDP ranks, so after sync it holds the counts of the last step's global batch.
    """

    full_state_update: ClassVar[bool] = False
    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None
    _state_names: ClassVar[tuple[str, ...]] = ()

    # Only the metrics with a drop rate take one; the others leave it None.
    capacity_factor: float | None = None

    def __init__(self, num_experts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        self.num_experts = num_experts
        for name in self._state_names:
            self.add_state(name, default=_state_default(name, num_experts), dist_reduce_fx="sum")

    def update(self, routing: Routing) -> None:
        """Accumulate one batch.

        Args:
            routing: The router's (or, with a capacity, the MoE layer's) record for the batch;
                its ``padding_mask_T`` and ``dropped_TK`` are used when present.

        Raises:
            ValueError: If ``routing`` is not a ``Routing`` or its shapes do not fit each other
                or ``num_experts``.
        """
        batch = _RoutingBatch(routing, self.num_experts, self.capacity_factor)
        for name in self._state_names:
            increment = getattr(batch, name)
            if name == "last_counts_E":
                setattr(self, name, increment.clone())
            else:
                setattr(self, name, getattr(self, name) + increment)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Update with one batch and return the metric on that batch alone.

        The fast forward path merges the batch into the running states by each state's
        reduction (a sum); ``last_counts_E`` must end up as the batch's counts, so the previous
        value is taken back out.
        """
        if "last_counts_E" not in self._state_names or self.dist_sync_on_step:
            return super().forward(*args, **kwargs)
        previous_last_E = self.last_counts_E.clone()
        batch_value = super().forward(*args, **kwargs)
        self.last_counts_E = self.last_counts_E - previous_last_E
        return batch_value

    def extra_repr(self) -> str:
        if self.capacity_factor is None:
            return f"num_experts={self.num_experts}"
        return f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"


class TokensPerExpert(_RoutingMetric):
    """Assignments per expert (valid + dropped) summed over the window; fp32 [E] from ``compute()``.

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("counts_E",)

    def compute(self) -> Tensor:
        """Summed counts, fp32 [E]."""
        return self.counts_E.float()


class MaxViolation(_RoutingMetric):
    """MaxVio, per batch and over the window.

    ``compute()`` returns a dict of fp32 scalars:
    ``batch_mean`` (mean over batches with at least one assignment of each batch's MaxVio),
    ``batch_last`` (MaxVio of the last batch; under DDP, of the last step's batches of all
    ranks together) and ``global`` (MaxVio of the counts summed over the window).

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("counts_E", "batch_max_vio_sum", "num_batches", "last_counts_E")

    def compute(self) -> dict[str, Tensor]:
        """MaxVio per batch (mean, last) and global, fp32 scalars."""
        return {
            "batch_mean": _ratio(self.batch_max_vio_sum, self.num_batches),
            "batch_last": _max_violation_f64(self.last_counts_E).float(),
            "global": _max_violation_f64(self.counts_E).float(),
        }


class LoadCV(_RoutingMetric):
    """Coefficient of variation (population std / mean) of the window's load; fp32 scalar.

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("counts_E",)

    def compute(self) -> Tensor:
        """CV of the summed counts."""
        return load_cv(self.counts_E)


class LoadEntropy(_RoutingMetric):
    """Entropy (nats) of the window's load distribution; fp32 scalar, log E when balanced.

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("counts_E",)

    def compute(self) -> Tensor:
        """Load entropy of the summed counts."""
        return load_entropy(self.counts_E)


class EffectiveExperts(_RoutingMetric):
    """exp(load entropy) of the window's load; fp32 scalar in [1, E] (0 with no assignment).

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("counts_E",)

    def compute(self) -> Tensor:
        """Effective number of experts of the summed counts."""
        return effective_experts(self.counts_E)


class DeadExpertFraction(_RoutingMetric):
    """Fraction of experts that got no assignment over the whole window; fp32 scalar.

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("counts_E",)

    def compute(self) -> Tensor:
        """Dead fraction of the summed counts."""
        return dead_expert_fraction(self.counts_E)


class RouterEntropy(_RoutingMetric):
    """Token-mean router entropy of the renormalised scores, over log E; fp32 scalar in [0, 1].

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("router_entropy_sum", "num_tokens")

    def compute(self) -> Tensor:
        """Mean normalised router entropy (0 with no tokens)."""
        return _ratio(self.router_entropy_sum, self.num_tokens)


class DropRate(_RoutingMetric):
    """Dropped assignments over all assignments the router made in the window; fp32 scalar.

    Args:
        num_experts: E.
        capacity_factor: If set, count what a capacity C = ceil(capacity_factor · Σc / E) per
            expert and batch would drop; if None, count the assignments the layer really
            dropped (``Routing.dropped_TK``; none for a dropless layer).
        **kwargs: Passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: If ``capacity_factor`` is not None or a positive finite number.
    """

    _state_names = ("num_dropped", "num_assigned")

    def __init__(
        self, num_experts: int, capacity_factor: float | None = None, **kwargs: Any
    ) -> None:
        _check_capacity_factor(capacity_factor)
        super().__init__(num_experts, **kwargs)
        self.capacity_factor = capacity_factor

    def compute(self) -> Tensor:
        """Drop rate (0 with no assignment)."""
        return _ratio(self.num_dropped, self.num_assigned)


class ActiveExpertsPerToken(_RoutingMetric):
    """Token-mean number of valid slots with positive weight; fp32 scalar (sparse gates).

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("active_experts_sum", "num_tokens")

    def compute(self) -> Tensor:
        """Mean active experts per token (0 with no tokens)."""
        return _ratio(self.active_experts_sum, self.num_tokens)


class SoftMassOutside(_RoutingMetric):
    """Token-mean share of score mass on experts without a valid slot; fp32 scalar (soft gates).

    Args:
        num_experts: E.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    _state_names = ("soft_mass_outside_sum", "num_tokens")

    def compute(self) -> Tensor:
        """Mean soft mass outside the selected experts (0 with no tokens)."""
        return _ratio(self.soft_mass_outside_sum, self.num_tokens)


class LoadBalanceMetrics(_RoutingMetric):
    """Every load-balance metric of one MoE layer, from one set of sum states.

    Keep one instance per layer and stage (train / val) as a module attribute; call it (or
    ``update``) with each batch's ``Routing`` and ``compute()`` at the end of the window.
    ``forward`` returns the same dict for the batch alone, whose ``max_vio_batch_last`` is the
    per-step MaxVio to log during training.

    ``compute()`` returns a dict of fp32 tensors: ``tokens_per_expert`` [E] and the scalars
    named in ``SCALAR_KEYS`` (definitions in the module docstring). Log the scalars with
    ``{k: v for k, v in out.items() if k in LoadBalanceMetrics.SCALAR_KEYS}``.

    Args:
        num_experts: E.
        capacity_factor: For the drop rate; see ``DropRate``.
        **kwargs: Passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: If ``num_experts`` is not an int >= 1 or ``capacity_factor`` is not None or
            a positive finite number.
    """

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
        "soft_mass_outside",
    )
    _state_names = (
        "counts_E",
        "batch_max_vio_sum",
        "num_batches",
        "last_counts_E",
        "num_tokens",
        "router_entropy_sum",
        "active_experts_sum",
        "soft_mass_outside_sum",
        "num_dropped",
        "num_assigned",
    )

    def __init__(
        self, num_experts: int, capacity_factor: float | None = None, **kwargs: Any
    ) -> None:
        _check_capacity_factor(capacity_factor)
        super().__init__(num_experts, **kwargs)
        self.capacity_factor = capacity_factor

    def compute(self) -> dict[str, Tensor]:
        """All metrics of the window, fp32."""
        counts_E = self.counts_E
        return {
            "tokens_per_expert": counts_E.float(),
            "max_vio_batch_mean": _ratio(self.batch_max_vio_sum, self.num_batches),
            "max_vio_batch_last": _max_violation_f64(self.last_counts_E).float(),
            "max_vio_global": _max_violation_f64(counts_E).float(),
            "load_cv": load_cv(counts_E),
            "load_entropy": load_entropy(counts_E),
            "effective_experts": effective_experts(counts_E),
            "dead_expert_fraction": dead_expert_fraction(counts_E),
            "router_entropy": _ratio(self.router_entropy_sum, self.num_tokens),
            "drop_rate": _ratio(self.num_dropped, self.num_assigned),
            "active_experts_per_token": _ratio(self.active_experts_sum, self.num_tokens),
            "soft_mass_outside": _ratio(self.soft_mass_outside_sum, self.num_tokens),
        }


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
