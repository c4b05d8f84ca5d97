"""The router: hidden states in, a :class:`~moe_router.routing.Routing` record out.

Shape legend: T tokens, D model dim, E experts, K selected slots per token.

:class:`Router` is a thin module: it owns the router weight, computes fp32 logits, calls the
gate (:func:`moe_router.gates.run_gate`) and the auxiliary losses
(:func:`moe_router.balancing.router_aux_losses`), and drives the per-step state components its
config enables (:mod:`moe_router.state`: expert bias, annealed temperature, budget controller,
balanced thresholds). Training forwards let every component accumulate; :meth:`Router.step`
(called by :func:`moe_router.step_routers` or the optimizer hook of
:func:`moe_router.register_optimizer_hooks`) steps them all. A router with such state that
runs many training forwards without a step warns once.

Router math runs in fp32 whatever the dtype of the hidden states or of the router weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moe_router.balancing import ExpertBias, router_aux_losses
from moe_router.config import (
    GATES,
    ROUTER_OPTION_DEFAULTS,
    SOFT_GATES,
    RouterConfig,
    config_from_arguments,
    option_is_read,
    options_set,
)
from moe_router.gates import group_limit, router_logits, run_gate, select_experts
from moe_router.routing import Routing
from moe_router.state import (
    AnnealedTau,
    BudgetController,
    DefaultOutputs,
    ReLUSparsity,
    RouterState,
    RunningThresholds,
    WindowThresholds,
    upgrade_flat_state_dict,
)
from moe_router.step_watch import UNSTEPPED_WARN_AFTER, StepWatch

__all__ = [
    "GATES",
    "SOFT_GATES",
    "UNSTEPPED_WARN_AFTER",
    "Router",
    "RouterConfig",
    "select_experts",
]


# The per-step state components a router may hold, in stepping order.
_STATE_NAMES = (
    "expert_bias", "anneal", "budget_controller", "relu_sparsity", "balance", "default_outputs"
)  # fmt: skip


def _component_value(component: str, name: str, doc: str) -> property:
    """A read-only property for ``router.<component>.<name>`` (AttributeError without it)."""

    def read(router: Router) -> Tensor:
        state = getattr(router, component)
        if state is None:
            raise AttributeError(f"Router(gate={router.config.gate!r}) has no {component}")
        return getattr(state, name)

    return property(read, doc=doc)


class Router(nn.Module):
    """Linear router plus gate: ``[..., D]`` hidden states to a :class:`Routing` record.

    Build it with keywords (``Router(d_model=256, num_experts=8, k=2, gate="soft_topk",
    tau=0.5)``) or from a config (``Router(RouterConfig(...))``).

    Args:
        config: A :class:`RouterConfig`; or, instead of one, its fields as keywords
            (``d_model``, ``num_experts`` and ``k`` may also come positionally, in that order).

    Raises:
        ValueError: On an invalid setting (see :class:`RouterConfig`).

    Attributes:
        weight_ED: The router weight.
        expert_bias: DeepSeek-V3's selection bias (:class:`ExpertBias`) or None.
        anneal: The ``anneal`` schedule's position (:class:`~moe_router.state.AnnealedTau`)
            or None.
        budget_controller: ``target_active``'s controller
            (:class:`~moe_router.state.BudgetController`) or None.
        balance: ``balanced_soft_topk``'s thresholds
            (:class:`~moe_router.state.BalancedThresholds`) or None.
        last_routing: The record of the latest forward (None before the first). It holds its
            autograd graph until the next forward replaces it; see :func:`moe_router.routings`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = config_from_arguments(RouterConfig, args, kwargs)
        self.weight_ED = nn.Parameter(torch.empty(c.num_experts, c.d_model))
        if c.tau_schedule == "learned":
            self.log_tau = nn.Parameter(torch.tensor(math.log(c.tau)))
        self.expert_bias = ExpertBias(c.num_experts, c.bias_update_rate) if c.expert_bias else None
        self.anneal = AnnealedTau(c) if c.tau_schedule == "anneal" else None
        self.budget_controller = BudgetController(c) if c.target_active is not None else None
        self.relu_sparsity = ReLUSparsity(c) if c.gate == "relu" else None
        thresholds = WindowThresholds if c.balance_window is not None else RunningThresholds
        self.balance = thresholds(c) if c.gate == "balanced_soft_topk" else None
        # A layer may hand its router more per-step state (MoELayer's Default MoE outputs).
        self.default_outputs: DefaultOutputs | None = None
        self.last_routing: Routing | None = None
        if c.jitter_eps > 0:
            self.register_buffer("jitter_step", torch.zeros((), dtype=torch.long))
        # Compiled training forwards count here (no host read in the hot path; step_watch.py).
        # A tensor of the router's own, which also keeps HF's loading initialising it.
        self.register_buffer("compiled_forwards", torch.zeros((), dtype=torch.long), False)
        self._step_watch = StepWatch(self)
        self._register_load_state_dict_pre_hook(upgrade_flat_state_dict, with_module=True)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: RouterConfig) -> Router:
        """Build a router from a :class:`RouterConfig` (the same as ``Router(config)``)."""
        return cls(config)

    def reset_parameters(self) -> None:
        """Re-initialise the router weight (normal, ``init_std``) and tau."""
        nn.init.normal_(self.weight_ED, std=self.config.init_std)
        if self.config.tau_schedule == "learned":
            with torch.no_grad():
                self.log_tau.fill_(math.log(self.config.tau))

    def __getstate__(self) -> dict[str, Any]:
        # The latest record holds an autograd graph, which deepcopy and pickle cannot take;
        # the watch refers to this router, so a copy gets its own.
        return {**self.__dict__, "last_routing": None, "_step_watch": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._step_watch = StepWatch(self)

    # ------------------------------------------------------------------------ per-step state

    def states(self) -> list[RouterState]:
        """The per-step state components this router holds, in stepping order."""
        found = (getattr(self, name) for name in _STATE_NAMES)
        return [state for state in found if state is not None]

    def add_default_outputs(self, state: DefaultOutputs) -> None:
        """Take the layer's Default MoE outputs as one more component (stepped with the rest)."""
        self.default_outputs = state
        self._step_watch.watch()

    @property
    def tau(self) -> float | Tensor:
        """Current temperature: a float when fixed, else an fp32 scalar tensor (differentiable
        when learned, read from the schedule when annealed)."""
        if self.config.tau_schedule == "learned":
            return self.log_tau.float().exp().clamp_min(self.config.tau_min)
        if self.anneal is not None:
            return self.anneal.tau
        return self.config.tau

    @property
    def soft_budget(self) -> float | Tensor:
        """The soft gates' sum of p: K, or the budget controller's value."""
        if self.budget_controller is None:
            return float(self.config.k)
        return self.budget_controller.budget

    budget = _component_value("budget_controller", "budget", "``target_active``: the soft budget")
    balance_mu_E = _component_value("balance", "mu_E", "``balanced_soft_topk``: eval thresholds")

    @property
    def schedule_step(self) -> Tensor:
        """Optimizer steps along the ``anneal`` schedule (0 without one)."""
        if self.anneal is None:
            return torch.zeros((), dtype=torch.long, device=self.weight_ED.device)
        return self.anneal.schedule_step

    @torch.no_grad()
    def step(self) -> None:
        """Advance every per-step state component after one optimizer step.

        Every rank must call it after the same optimizer step (components all-reduce).
        """
        for state in self.states():
            state.step()
        self._step_watch.stepped(self)

    def step_schedule(self) -> None:
        """Advance the ``anneal`` schedule alone (no-op without one); prefer :meth:`step`."""
        if self.anneal is not None:
            self.anneal.step()

    def update_expert_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Update the bias from explicit loads (:meth:`ExpertBias.update`; no-op without a
        bias); prefer :meth:`step`, which uses the loads the forwards accumulated."""
        if self.expert_bias is not None:
            self.expert_bias.update(tokens_per_expert_E)

    # ------------------------------------------------------------------------------- forward

    def group_mask(self, logits_TE: Tensor) -> Tensor:
        """:func:`moe_router.gates.group_limit` with this router's groups."""
        return group_limit(logits_TE, self.config)

    def forward(self, hidden_states: Tensor, padding_mask: Tensor | None = None) -> Routing:
        """Route a batch of tokens, in fp32 even inside the caller's autocast region.

        Args:
            hidden_states: ``[..., D]`` in any float dtype; the leading dims are flattened to T
                (``[B, S, D]`` also defines the sequences of the per-sequence balance loss).
            padding_mask: Bool ``[...]`` (the leading dims of ``hidden_states``), True where a
                token is padding. Padding tokens get no assignment (``valid_TK`` False, weight
                0), count in no load and contribute to no auxiliary loss; whatever their
                hidden states hold (NaN included), they reach no output, loss or gradient.

        Returns:
            The :class:`Routing` record (fp32 tensors; ``aux_losses`` already scaled by their
            coefficients), also kept as :attr:`last_routing`.

        Raises:
            ValueError: If the last dim is not D or the padding mask does not fit.
        """
        # Autocast would run the linear in bf16/fp16; the router math is precision-sensitive.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            routing = self._route(hidden_states, padding_mask)
        self.last_routing = routing
        return routing

    def _route(self, hidden_states: Tensor, padding_mask: Tensor | None) -> Routing:
        config = self.config
        lead_shape, x_TD, padding_mask_T = _flat_inputs(hidden_states, padding_mask, config)
        token_mask_T = None if padding_mask_T is None else ~padding_mask_T
        # Jitter (training only) is drawn from the checkpointed forward count: a resumed run
        # draws the same noise.
        jitter_eps = config.jitter_eps if self.training else 0.0
        jitter_step = getattr(self, "jitter_step", None)
        logits_TE, gate_logits_TE = router_logits(x_TD, self.weight_ED, jitter_eps, jitter_step)
        if jitter_eps > 0 and torch.is_grad_enabled():
            self.jitter_step += 1
        gate_logits_TE = self.group_mask(gate_logits_TE)
        tau, budget = self.tau, self.soft_budget
        mu_E = None
        if self.balance is not None:
            mu_E = self.balance.thresholds(gate_logits_TE, token_mask_T, tau, budget)
        bias_E = None if self.expert_bias is None else self.expert_bias.bias_E
        selection = run_gate(gate_logits_TE, config, tau, bias_E, k=budget, mu_E=mu_E)
        if padding_mask_T is not None:
            selection = selection.without_padding(padding_mask_T)
        l1_coef = None if self.relu_sparsity is None else self.relu_sparsity.l1_coef
        ids_TK, weights_TK, scores_TE, valid_TK, overflow_T, overflow_mass_T = selection
        aux_losses = router_aux_losses(
            config, lead_shape, logits_TE, scores_TE, ids_TK, valid_TK, token_mask_T, l1_coef
        )
        routing = Routing(
            ids_TK, weights_TK, scores_TE, logits_TE, aux_losses,
            valid_TK=valid_TK,  # the record counts tokens_per_expert_E from the valid slots
            padding_mask_T=padding_mask_T,
            overflow_T=overflow_T,
            overflow_mass_T=overflow_mass_T,
        )  # fmt: skip
        if self.training and torch.is_grad_enabled():
            for state in self.states():
                state.accumulate(routing, token_mask_T)
            self._step_watch.training_forward(self)
        return routing

    def extra_repr(self) -> str:
        c = self.config
        sizes = f"d_model={c.d_model}, num_experts={c.num_experts}, k={c.k}, gate={c.gate!r}"
        options = options_set(c, ROUTER_OPTION_DEFAULTS)  # what was set (or resolved) and read
        options = {name: v for name, v in options.items() if option_is_read(c, name)}
        if c.topk_groups == c.num_groups:  # resolved from None: no group limit
            del options["topk_groups"]
        return ", ".join([sizes, *(f"{name}={value!r}" for name, value in options.items())])


def _flat_inputs(
    hidden_states: Tensor, padding_mask: Tensor | None, config: RouterConfig
) -> tuple[tuple[int, ...], Tensor, Tensor | None]:
    """Check the router's inputs; return the leading shape, fp32 ``x_TD`` (zero on padding
    tokens: a NaN there must reach nothing) and the flat ``padding_mask_T``."""
    d_model = config.d_model
    if not isinstance(hidden_states, Tensor) or not hidden_states.is_floating_point():
        got = getattr(hidden_states, "dtype", type(hidden_states).__name__)
        raise ValueError(f"hidden_states must be a float tensor [..., D], got {got}")
    if hidden_states.shape[-1] != d_model:
        raise ValueError(
            f"hidden_states must end in d_model={d_model}, got shape {tuple(hidden_states.shape)}"
        )
    lead_shape = tuple(hidden_states.shape[:-1])
    if padding_mask is not None:
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            got = getattr(padding_mask, "dtype", type(padding_mask).__name__)
            raise ValueError(f"padding_mask must be a bool tensor, got {got}")
        if tuple(padding_mask.shape) != lead_shape:
            raise ValueError(
                f"padding_mask must have shape {lead_shape}, got {tuple(padding_mask.shape)}"
            )
    x_TD = hidden_states.reshape(-1, d_model).float()  # (T, D)
    if padding_mask is None:
        return lead_shape, x_TD, None
    padding_mask_T = padding_mask.reshape(-1)
    # Selection, not multiplication: a NaN in a padding row must not reach anything.
    return lead_shape, torch.where(padding_mask_T.unsqueeze(-1), 0.0, x_TD), padding_mask_T
