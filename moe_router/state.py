"""Per-step router state, one small component per mechanism.

Shape legend: T tokens, E experts, W window tokens.

A :class:`~moe_router.router.Router` builds the components its config enables and drives them
all through one protocol (:class:`RouterState`):

- ``accumulate(routing, token_mask_T)`` after every training forward (in-place buffer updates,
  no host sync);
- ``step()`` after every optimizer step: reduce what was accumulated over the data-parallel
  ranks (each component does its own all-reduce, so every rank holds the same state), update,
  reset;
- ``state_dict()`` through persistent buffers, so a checkpoint resumes the state exactly;
- ``needs_step``: whether training without ever calling ``step()`` leaves the component
  wrong (the router's "trained without a step" warning asks every component).

=========================  ====================================  ==============================
component                  enabled by                            what ``step()`` does
=========================  ====================================  ==============================
``ExpertBias``             ``expert_bias=True``                  ``b += u sign(mean load - load)``
(:mod:`moe_router.balancing`)
:class:`AnnealedTau`       ``tau_schedule="anneal"``             one schedule step
:class:`BudgetController`  ``target_active``                     ``log k += rate * rel. error``
:class:`RunningThresholds`  ``balanced_soft_topk``               EMA of the batch solutions
:class:`WindowThresholds`  ``balanced_soft_topk`` +              one solve over the last W
                           ``balance_window``                    training tokens' logits
=========================  ====================================  ==============================

Every floating-point buffer of a component stays fp32 under ``.to(torch.bfloat16)`` /
``.half()``: the updates are small and every rank must hold the same values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_router.config import RouterConfig
from moe_router.gates import annealed_tau, balance_thresholds
from moe_router.routing import Routing

__all__ = [
    "AnnealedTau",
    "BalancedThresholds",
    "BudgetController",
    "DefaultOutputs",
    "ReLUSparsity",
    "RouterState",
    "RunningThresholds",
    "WindowThresholds",
    "all_reduce_sum",
    "upgrade_flat_state_dict",
]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over data-parallel ranks when torch.distributed is initialised (a copy)."""
    tensor = tensor.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class RouterState(nn.Module):
    """One mechanism's per-step state (see the module docstring for the protocol)."""

    #: Whether a router holding this component must be stepped after each optimizer step.
    needs_step: bool = True

    def accumulate(self, routing: Routing, token_mask_T: Tensor | None) -> None:
        """Take what :meth:`step` needs from one training forward (default: nothing)."""

    def step(self) -> None:
        """Advance after one optimizer step; every rank must call it after the same step."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # Device moves are followed, dtype casts are not: a cast would round the fp32 values.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is None or not old.is_floating_point() or new.dtype == torch.float32:
                continue
            if old.is_meta or new.is_meta:
                self._buffers[name] = new.float()
            else:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self


class AnnealedTau(RouterState):
    """The ``anneal`` temperature schedule: its position in optimizer steps (checkpointed).

    Args:
        config: The router's config (``tau``, ``tau_final``, ``anneal_steps``,
            ``anneal_shape``).
    """

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))

    @property
    def tau(self) -> Tensor:
        """The temperature at the current step (fp32 scalar)."""
        return annealed_tau(self.config, self.schedule_step)

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step along the schedule."""
        self.schedule_step += 1


class BudgetController(RouterState):
    """Holds the mean support of a support-exact gate at ``target_active``.

    The soft budget k (the sum of p each token spends) follows an integral controller on the
    log scale, ``log k += rate * (target - s) / target``, with s the mean number of experts
    with p > 0 per real token since the last step, over all ranks; k stays in
    ``[1e-3, E_usable - 1e-3]``.

    Args:
        config: The router's config (``k``, ``target_active``, ``budget_update_rate``).

    Attributes:
        budget: The current soft budget (fp32 scalar, checkpointed).
    """

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("budget", torch.tensor(float(config.k), dtype=torch.float32))
        # [sum of supports, real tokens] since the last step.
        self.register_buffer(
            "pending_support", torch.zeros(2, dtype=torch.float32), persistent=False
        )

    @torch.no_grad()
    def accumulate(self, routing: Routing, token_mask_T: Tensor | None) -> None:
        """Add the batch's support: dispatched experts plus overflow, per real token (with an
        expert bias this is the biased support, the compute the budget is about); padding and
        NaN tokens are left out."""
        support_T = routing.valid_TK.sum(-1).float() + routing.overflow_T
        counted_T = ~routing.weights_TK.isnan().any(-1)  # a NaN token's support says nothing
        if token_mask_T is not None:
            counted_T = counted_T & token_mask_T
        self.pending_support[0] += torch.where(counted_T, support_T, 0.0).sum()
        self.pending_support[1] += counted_T.sum()

    @torch.no_grad()
    def step(self) -> None:
        """One controller step from the support since the last step (all ranks); no move
        when no token was seen."""
        config = self.config
        support_sum, num_tokens = all_reduce_sum(self.pending_support.double()).unbind()
        mean_support = support_sum / num_tokens.clamp_min(1.0)
        error = (config.target_active - mean_support) / config.target_active
        moved = (num_tokens > 0) & error.isfinite()  # a non-finite support moves nothing
        log_step = torch.where(moved, config.budget_update_rate * error, 0.0)
        usable = config.topk_groups * (config.num_experts // config.num_groups)
        new_budget = (self.budget.double().log() + log_step).exp()
        self.budget.copy_(new_budget.clamp(1e-3, usable - 1e-3).float())
        self.pending_support.zero_()


class ReLUSparsity(RouterState):
    """ReMoE's controller: the L1 penalty coefficient that holds the ``relu`` gate's sparsity
    (the fraction of zero gates) near ``1 - K / E``.

    After each optimizer step the coefficient is multiplied by ``relu_l1_factor`` while the
    gates since the last step (real tokens, all ranks) were denser than the target, and divided
    by it otherwise; no move when no token was seen. It stays in [1e-30, 1e30].

    Args:
        config: The router's config (``k``, ``num_experts``, ``relu_l1_init``,
            ``relu_l1_factor``).

    Attributes:
        l1_coef: The current coefficient (fp32 scalar, checkpointed).
    """

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("l1_coef", torch.tensor(config.relu_l1_init, dtype=torch.float32))
        # [non-zero gates, gates] of real tokens since the last step.
        self.register_buffer(
            "pending_active", torch.zeros(2, dtype=torch.float32), persistent=False
        )

    @torch.no_grad()
    def accumulate(self, routing: Routing, token_mask_T: Tensor | None) -> None:
        """Count the batch's non-zero gates (the whole support, overflow included)."""
        counted_T = ~routing.scores_TE.isnan().any(-1)  # a NaN token says nothing
        if token_mask_T is not None:
            counted_T = counted_T & token_mask_T
        active_T = (routing.scores_TE > 0).sum(-1).float()
        self.pending_active[0] += torch.where(counted_T, active_T, 0.0).sum()
        self.pending_active[1] += counted_T.sum() * self.config.num_experts

    @torch.no_grad()
    def step(self) -> None:
        """One multiplicative step toward the target sparsity (all ranks)."""
        config = self.config
        active, total = all_reduce_sum(self.pending_active.double()).unbind()
        sparsity = 1.0 - active / total.clamp_min(1.0)
        target = 1.0 - config.k / config.num_experts
        factor = torch.where(sparsity < target, config.relu_l1_factor, 1 / config.relu_l1_factor)
        new_coef = self.l1_coef * torch.where(total > 0, factor, 1.0).float()
        # finite whatever the run does (a sparsity the router cannot reach grows it forever)
        self.l1_coef.copy_(new_coef.clamp(1e-30, 1e30))
        self.pending_active.zero_()


class DefaultOutputs(RouterState):
    """Default MoE's per-expert default outputs: an EMA of each expert's combine-weighted mean
    output over the tokens dispatched to it, updated after each optimizer step over all ranks
    (an expert that got no token keeps its value). ``MoELayer`` accumulates the weighted
    output sums and weight sums of its training forwards and hands the component to its
    router, which steps it with the rest of its state.

    Args:
        num_experts: E.
        d_model: D.
        beta: Weight of the old value in the EMA.

    Attributes:
        default_ED: The default outputs (fp32, checkpointed).
    """

    def __init__(self, num_experts: int, d_model: int, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.register_buffer("default_ED", torch.zeros(num_experts, d_model, dtype=torch.float32))
        # [weighted output sums | weight sums] since the last step.
        self.register_buffer(
            "pending_ED1",
            torch.zeros(num_experts, d_model + 1, dtype=torch.float32),
            persistent=False,
        )

    @torch.no_grad()
    def add(self, output_sums_ED: Tensor, weight_sums_E: Tensor) -> None:
        """Add one training forward's per-expert sums of ``w * expert(x)`` and of ``w``."""
        self.pending_ED1[:, :-1] += output_sums_ED.float()
        self.pending_ED1[:, -1] += weight_sums_E.float()

    @torch.no_grad()
    def step(self) -> None:
        """Move each expert's default toward its weighted mean output since the last step."""
        totals_ED1 = all_reduce_sum(self.pending_ED1)
        weight_E1 = totals_ED1[:, -1:]
        mean_ED = totals_ED1[:, :-1] / weight_E1.clamp_min(1e-20)
        seen_E1 = (weight_E1 > 0) & mean_ED.isfinite().all(-1, keepdim=True)
        updated_ED = self.beta * self.default_ED + (1 - self.beta) * mean_ED
        self.default_ED.copy_(torch.where(seen_E1, updated_ED, self.default_ED))
        self.pending_ED1.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.default_ED.shape[0]}, beta={self.beta}"


class BalancedThresholds(RouterState):
    """``balanced_soft_topk``'s per-expert thresholds.

    In training the gate uses this batch's solution (:meth:`batch_mu`, warm-started from the
    previous batch's, both checkpointed so that a resumed run solves exactly as the
    uninterrupted one); at evaluation the running thresholds :attr:`mu_E`, so a token's
    routing never depends on the other tokens of its batch. Subclasses decide how ``step()``
    turns the training batches into :attr:`mu_E`.

    Args:
        config: The router's config.

    Attributes:
        mu_E: Evaluation thresholds (logit units, fp32, checkpointed).
        warm_mu_E: The latest training solution, the next one's warm start (checkpointed).
    """

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        num_experts = config.num_experts
        self.register_buffer("mu_E", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("warm_mu_E", torch.zeros(num_experts, dtype=torch.float32))

    def thresholds(
        self, gate_logits_TE: Tensor, token_mask_T: Tensor | None, tau: float | Tensor, k
    ) -> Tensor:
        """The gate's thresholds for this forward: :meth:`batch_mu` in training, else
        :attr:`mu_E`."""
        if not self.training:
            return self.mu_E
        return self.batch_mu(gate_logits_TE, token_mask_T, tau, k)

    def batch_mu(
        self, gate_logits_TE: Tensor, token_mask_T: Tensor | None, tau: float | Tensor, k
    ) -> Tensor:
        """This training batch's thresholds (recorded for ``step()`` unless under no_grad)."""
        record = torch.is_grad_enabled()
        with torch.no_grad():
            logits_TE = gate_logits_TE.detach()
            mu_E = balance_thresholds(
                logits_TE, self.config, tau, self.warm_mu_E, token_mask_T, k=k
            )
            # Never a non-finite threshold (e.g. a non-finite budget): keep the warm start.
            mu_E = torch.where(mu_E.isfinite(), mu_E, self.warm_mu_E)
            if record:
                self.warm_mu_E.copy_(mu_E)
                self._record(mu_E, logits_TE, token_mask_T, tau, k)
        return mu_E

    def _record(self, mu_E, gate_logits_TE, token_mask_T, tau, k) -> None:
        raise NotImplementedError

    def _share_warm_start(self) -> None:
        """Average the warm start over the data-parallel ranks (each solved its own batches),
        so that every rank holds, and a checkpoint saves, the same state."""
        totals_E1 = all_reduce_sum(torch.cat([self.warm_mu_E, self.warm_mu_E.new_ones(1)]))
        self.warm_mu_E.copy_(totals_E1[:-1] / totals_E1[-1])


class RunningThresholds(BalancedThresholds):
    """Evaluation thresholds as a running average (``balance_momentum``) of the mean batch
    solution of each optimizer step, over all ranks."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        # [sum of batch solutions, number of batches] since the last step.
        self.register_buffer(
            "pending_mu_E1",
            torch.zeros(config.num_experts + 1, dtype=torch.float32),
            persistent=False,
        )

    def _record(self, mu_E, gate_logits_TE, token_mask_T, tau, k) -> None:
        self.pending_mu_E1[:-1] += mu_E
        self.pending_mu_E1[-1] += 1

    @torch.no_grad()
    def step(self) -> None:
        """Move the running thresholds toward this step's mean solution (kept when none)."""
        totals_E1 = all_reduce_sum(self.pending_mu_E1)
        mean_mu_E = totals_E1[:-1] / totals_E1[-1].clamp_min(1.0)
        momentum = torch.where(totals_E1[-1] > 0, self.config.balance_momentum, 1.0)
        self.mu_E.mul_(momentum).add_((1 - momentum) * mean_mu_E)
        self.pending_mu_E1.zero_()
        self._share_warm_start()


class WindowThresholds(BalancedThresholds):
    """Evaluation thresholds from one solve over the last ``balance_window`` real training
    tokens' router logits (a checkpointed ring buffer; unused rows are masked out), warm-started
    from the current ones, with the temperature and budget of the latest training forward, and
    averaged over the data-parallel ranks."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        window, num_experts = config.balance_window, config.num_experts
        self.register_buffer(
            "window_logits_WE", torch.zeros(window, num_experts, dtype=torch.float32)
        )
        self.register_buffer("window_mask_W", torch.zeros(window, dtype=torch.bool))
        self.register_buffer("window_pos", torch.zeros((), dtype=torch.long))
        self.register_buffer(
            "solve_tau", torch.tensor(float(config.tau), dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "solve_k", torch.tensor(float(config.k), dtype=torch.float32), persistent=False
        )

    def _record(self, mu_E, gate_logits_TE, token_mask_T, tau, k) -> None:
        """Write the batch's logits into the window (its last ``balance_window`` tokens when
        the batch is larger), padding and non-finite tokens marked unused (stored as 0)."""
        window = self.window_logits_WE.shape[0]
        keep = min(window, gate_logits_TE.shape[0])  # static: shapes only
        logits_TE = gate_logits_TE[-keep:].float()
        # A token with a NaN or +inf logit is kept out (-inf marks an expert it may not use).
        mask_T = ~(logits_TE.isnan() | (logits_TE == float("inf"))).any(-1)
        if token_mask_T is not None:
            mask_T = mask_T & token_mask_T[-keep:]
        logits_TE = torch.where(mask_T.unsqueeze(-1), logits_TE, 0.0)
        index_T = (self.window_pos + torch.arange(keep, device=logits_TE.device)) % window
        self.window_logits_WE.index_copy_(0, index_T, logits_TE)
        self.window_mask_W.index_copy_(0, index_T, mask_T)
        self.window_pos.copy_((self.window_pos + keep) % window)
        self.solve_tau.copy_(torch.as_tensor(tau, dtype=torch.float32).detach())
        self.solve_k.copy_(torch.as_tensor(k, dtype=torch.float32).detach())

    @torch.no_grad()
    def step(self) -> None:
        """Solve over the window; kept as they are while no rank's window holds a token."""
        config = self.config
        tau = config.tau if config.tau_schedule == "fixed" else self.solve_tau
        k = float(config.k) if config.target_active is None else self.solve_k
        mu_E = balance_thresholds(
            self.window_logits_WE, config, tau, self.mu_E, self.window_mask_W, k=k
        )
        mu_E = torch.where(mu_E.isfinite(), mu_E, self.mu_E)
        filled = self.window_mask_W.any().float()
        totals_E1 = all_reduce_sum(torch.cat([mu_E * filled, filled.reshape(1)]))
        mean_mu_E = totals_E1[:-1] / totals_E1[-1].clamp_min(1.0)
        self.mu_E.copy_(torch.where(totals_E1[-1] > 0, mean_mu_E, self.mu_E))
        self._share_warm_start()


# Router state-dict keys of the earlier flat layout -> the component's key.
_FLAT_KEYS = {
    "schedule_step": "anneal.schedule_step",
    "budget": "budget_controller.budget",
    "balance_mu_E": "balance.mu_E",
    "window_logits_WE": "balance.window_logits_WE",
    "window_mask_W": "balance.window_mask_W",
    "window_pos": "balance.window_pos",
}


def upgrade_flat_state_dict(router: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A router's load-state-dict pre-hook: maps a checkpoint of the earlier flat layout
    (``budget``, ``balance_mu_E``, ...) onto the components, in place."""
    for old, new in _FLAT_KEYS.items():
        if prefix + old in state_dict:
            value = state_dict.pop(prefix + old)
            if getattr(router, new.split(".")[0]) is not None:  # else the state was unused
                state_dict[prefix + new] = value
    # The jitter's draw counter and the warm start became part of the checkpoint; an older one
    # resumes from their defaults.
    if getattr(router, "jitter_step", None) is not None:
        state_dict.setdefault(prefix + "jitter_step", router.jitter_step.clone())
    balance = getattr(router, "balance", None)
    if balance is not None and prefix + "balance.mu_E" in state_dict:
        state_dict.setdefault(prefix + "balance.warm_mu_E", balance.warm_mu_E.clone())
