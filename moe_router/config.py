"""Typed configuration of routers and MoE layers.

Two layers of dataclasses, so that a model config can hold the *options* of its MoE layers
while the model decides their *sizes*:

=====================  ==========================================================================
class                  holds
=====================  ==========================================================================
:class:`RouterOptions`  every router setting that does not depend on the sizes (temperature,
                        method, balancing, budgets, ...); keyword-only.
:class:`RouterConfig`   ``RouterOptions`` + ``d_model``, ``num_experts``, ``k``, ``gate``: what a
                        :class:`~moe_router.router.Router` is built from.
:class:`MoEOptions`     ``RouterOptions`` + the layer's own settings (shared expert, capacity,
                        dispatch backend); what ``ModelConfig.moe`` holds.
:class:`MoEConfig`      ``MoEOptions`` + ``d_model``, ``d_ff``, ``num_experts``, ``k``, ``gate``:
                        what a :class:`~moe_router.moe.MoELayer` is built from.
=====================  ==========================================================================

Choices are ``Literal`` types, so LightningCLI / jsonargparse list the allowed values in
``--help`` and reject others before anything is built; ``__post_init__`` checks the same (and
the ranges) for users who build the dataclasses in Python. Every bad value raises a
``ValueError`` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any, Literal, get_args

__all__ = [
    "ANNEAL_SHAPES",
    "COMMON_OPTIONS",
    "GATE_SPECS",
    "MECHANISM_OPTIONS",
    "ROUTER_OPTION_DEFAULTS",
    "DROP_POLICIES",
    "GATES",
    "GROUPED_MM_BACKENDS",
    "SCORE_FUNCS",
    "SOFT_GATES",
    "SOFT_METHODS",
    "TAU_SCHEDULES",
    "AnnealShape",
    "BalanceTarget",
    "DropPolicy",
    "Gate",
    "GateSpec",
    "GroupedMMBackend",
    "MoEConfig",
    "MoEOptions",
    "RouterConfig",
    "RouterOptions",
    "ScoreFunc",
    "SoftMethod",
    "TauSchedule",
    "check_options_read",
    "config_from_arguments",
    "gates_reading",
    "is_support_exact",
    "option_is_read",
    "options_set",
    "over_model_defaults",
]

BalanceTarget = Literal["load", "mass"]
Gate = Literal[
    "topk",
    "soft_topk",
    "soft_topk_dense",
    "sparse_soft_topk",
    "balanced_soft_topk",
    "straight_through",
    "relu",
]
ScoreFunc = Literal["softmax", "sigmoid"]
SoftMethod = Literal["sigmoid", "laplace", "exp", "sparse"]
TauSchedule = Literal["fixed", "anneal", "learned"]
AnnealShape = Literal["exponential", "linear", "cosine"]
DropPolicy = Literal["score", "position"]
GroupedMMBackend = Literal["auto", "grouped_mm", "loop"]

GATES: tuple[str, ...] = get_args(Gate)
SCORE_FUNCS: tuple[str, ...] = get_args(ScoreFunc)
SOFT_METHODS: tuple[str, ...] = get_args(SoftMethod)
TAU_SCHEDULES: tuple[str, ...] = get_args(TauSchedule)
ANNEAL_SHAPES: tuple[str, ...] = get_args(AnnealShape)
DROP_POLICIES: tuple[str, ...] = get_args(DropPolicy)
GROUPED_MM_BACKENDS: tuple[str, ...] = get_args(GroupedMMBackend)


@dataclass(frozen=True)
class GateSpec:
    """What one gate is, for the config: the options it reads and how it dispatches.

    Attributes:
        options: The options this gate reads beyond :data:`COMMON_OPTIONS`.
        soft: Whether it solves a soft top-k (and so has a temperature).
        support_exact: Whether it computes every expert with p > 0 (``max_active`` static
            slots, the rest counted as overflow) instead of a fixed K; ``"sparse"`` when that
            holds only with ``method="sparse"``.
    """

    options: frozenset[str]
    soft: bool = True
    support_exact: bool | Literal["sparse"] = False


# Options every gate reads: the router's linear, scaling, groups and auxiliary losses.
COMMON_OPTIONS = frozenset(
    {
        "renormalize",
        "score_scale",
        "jitter_eps",
        "num_groups",
        "topk_groups",
        "aux_loss_coef",
        "seq_aux_loss_coef",
        "z_loss_coef",
        "init_std",
    }
)
_TEMPERATURE = {"tau", "tau_schedule", "tau_final", "anneal_steps", "anneal_shape", "tau_min"}
_BUDGET = {"max_active", "target_active", "budget_update_rate"}
_BIAS = {"expert_bias", "bias_update_rate"}
_BALANCE = {"balance_iters", "balance_target", "balance_momentum", "balance_window"}

#: One entry per gate (a new gate is a function in ``moe_router.gates`` and an entry here).
GATE_SPECS: dict[str, GateSpec] = {
    "topk": GateSpec(frozenset({"score_func", *_BIAS}), soft=False),
    "soft_topk": GateSpec(frozenset({"method", *_TEMPERATURE, *_BIAS})),
    # every expert is dispatched: no selection for a bias to shift
    "soft_topk_dense": GateSpec(frozenset({"method", *_TEMPERATURE})),
    "sparse_soft_topk": GateSpec(
        frozenset({"method", *_TEMPERATURE, *_BUDGET, *_BIAS}), support_exact=True
    ),
    "balanced_soft_topk": GateSpec(
        frozenset({"method", *_TEMPERATURE, *_BUDGET, *_BIAS, *_BALANCE}), support_exact="sparse"
    ),
    "straight_through": GateSpec(frozenset({"method", *_TEMPERATURE, *_BIAS})),
    # ReMoE: ReLU gates, sparsity held at 1 - K/E by an L1 penalty with an adaptive coefficient
    "relu": GateSpec(
        frozenset({"max_active", "relu_l1_init", "relu_l1_factor"}),
        soft=False,
        support_exact=True,
    ),
}

_SUPPORT_EXACT = (
    "a support-exact gate (sparse_soft_topk, or balanced_soft_topk with method='sparse')"
)

# Options a gate reads only while another setting enables their mechanism:
# option -> (the enabling setting, as the error names it; whether it holds for a config).
MECHANISM_OPTIONS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "tau_final": ("tau_schedule='anneal'", lambda c: c.tau_schedule == "anneal"),
    "anneal_steps": ("tau_schedule='anneal'", lambda c: c.tau_schedule == "anneal"),
    "anneal_shape": ("tau_schedule='anneal'", lambda c: c.tau_schedule == "anneal"),
    "tau_min": ("tau_schedule='learned'", lambda c: c.tau_schedule == "learned"),
    "bias_update_rate": ("expert_bias=True", lambda c: c.expert_bias),
    "budget_update_rate": ("target_active set", lambda c: c.target_active is not None),
    "balance_momentum": ("balance_window=None", lambda c: c.balance_window is None),
    "max_active": (_SUPPORT_EXACT, lambda c: is_support_exact(c.gate, c.method)),
    "target_active": (_SUPPORT_EXACT, lambda c: is_support_exact(c.gate, c.method)),
    # the support-exact balanced gate dispatches on its support alone
    "expert_bias": (
        "a method other than 'sparse' for balanced_soft_topk",
        lambda c: not _balanced_sparse(c),
    ),
    "method": (
        "'sparse' for sparse_soft_topk (its only method)",
        lambda c: c.gate != "sparse_soft_topk" or c.method == "sparse",
    ),
    "drop_policy": ("capacity_factor set", lambda c: c.capacity_factor is not None),
}


SOFT_GATES = tuple(gate for gate in GATES if GATE_SPECS[gate].soft)


def is_support_exact(gate: str, method: str) -> bool:
    """Whether ``gate`` with soft top-k ``method`` computes every expert with p > 0."""
    support_exact = GATE_SPECS[gate].support_exact
    return support_exact is True or (support_exact == "sparse" and method == "sparse")


def _balanced_sparse(config: Any) -> bool:
    return config.gate == "balanced_soft_topk" and config.method == "sparse"


def gates_reading(option: str) -> tuple[str, ...]:
    """The gates that read ``option`` (every gate for a common or layer option)."""
    if option in COMMON_OPTIONS or option not in _ROUTER_OPTION_NAMES:
        return GATES
    return tuple(gate for gate, spec in GATE_SPECS.items() if option in spec.options)


def option_is_read(config: Any, name: str) -> bool:
    """Whether the config's gate reads option ``name`` with the config's other settings.

    Args:
        config: Anything with the option attributes and ``gate`` (a :class:`RouterConfig`, a
            :class:`MoEConfig`, a ``types.SimpleNamespace``).
        name: The option.
    """
    if name in _ROUTER_OPTION_NAMES and name not in COMMON_OPTIONS:
        if name not in GATE_SPECS[config.gate].options:
            return False
    _, holds = MECHANISM_OPTIONS.get(name, ("", None))
    return holds is None or holds(config)


def over_model_defaults(
    gate: str, model_defaults: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """A user's router options over a host model's (an integration's), keeping a model default
    only where ``gate`` reads it (a soft gate takes no ``score_func``; every gate takes ``k``).

    Args:
        gate: The chosen gate (an unknown one keeps every default: its config refuses it).
        model_defaults: The options that reproduce the host model's own router.
        options: The user's options; they always win.
    """
    merged = {**model_defaults, **options}
    settings = SimpleNamespace(**{**ROUTER_OPTION_DEFAULTS, **merged, "gate": gate})
    for name in model_defaults.keys() - options.keys() - {"k"}:
        if gate in GATE_SPECS and not option_is_read(settings, name):
            del merged[name]
    return merged


def options_set(config: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The options of ``config`` away from their ``defaults``, in the defaults' order."""
    return {
        name: getattr(config, name) for name in defaults if getattr(config, name) != defaults[name]
    }


def check_options_read(config: Any, defaults: dict[str, Any]) -> None:
    """Refuse every option set away from its default that the config's gate does not read.

    An option left at its default is indistinguishable from an unset one, so it always passes.

    Args:
        config: A :class:`RouterConfig` or :class:`MoEConfig` (sizes and gate set).
        defaults: The options to check, with their defaults.

    Raises:
        ValueError: Naming the option, its value, the gate and what reads the option.
    """
    for name, value in options_set(config, defaults).items():
        if option_is_read(config, name):
            continue
        if config.gate not in gates_reading(name):
            raise ValueError(
                f"{name}={value!r} is not read by gate={config.gate!r}: it is an option of "
                f"{', '.join(gates_reading(name))}"
            )
        raise ValueError(
            f"{name}={value!r} is not read by gate={config.gate!r} with these settings: "
            f"it is read only with {MECHANISM_OPTIONS[name][0]}"
        )


def config_from_arguments(cls: type, args: tuple, kwargs: dict) -> object:
    """The config a module's constructor was given: ``cls`` itself, or built from positional
    sizes and keywords (``MoELayer(d_model=64, d_ff=128, num_experts=8, k=2)``).

    Raises:
        ValueError: If a ready config comes with further arguments.
    """
    config = kwargs.pop("config", None)
    if config is None and len(args) >= 1 and isinstance(args[0], cls):
        config, args = args[0], args[1:]
    if config is None:
        return cls(*args, **kwargs)
    if not isinstance(config, cls):
        raise ValueError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    if args or kwargs:
        raise ValueError(
            f"a {cls.__name__} takes no further arguments: set {sorted(kwargs) or list(args)} "
            "in the config"
        )
    return config


def _need(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(kw_only=True)
class RouterOptions:
    """Router settings that do not depend on the layer sizes.

    Attributes:
        score_func: ``topk`` gate scores: ``softmax`` (Switch/Mixtral) or ``sigmoid``
            (DeepSeek-V3).
        method: Soft top-k method of the soft gates (``sigmoid``, ``laplace``, ``exp``,
            ``sparse``); ``sparse_soft_topk`` always uses ``sparse``.
        renormalize: Divide the selected combine weights by their sum (Mixtral / DeepSeek-V3).
        score_scale: Multiplies the combine weights (DeepSeek's routed scaling factor).
        max_active: ``sparse_soft_topk`` / sparse ``balanced_soft_topk``: static slots per token
            (most experts one token may use). Default ``min(E, 2K)``, or ``min(E, 4 *
            ceil(target_active))`` with a budget controller. Experts with p > 0 beyond the cap
            are not computed; they are counted as overflow (``Routing.overflow_T``).
        target_active: Support-exact gates (``sparse_soft_topk``, sparse
            ``balanced_soft_topk``): hold the mean number of experts with p > 0 per token at
            this value with an integral controller on the soft budget (sum of p); None keeps
            the budget at K.
        budget_update_rate: Step of the budget controller, in log-budget per unit of relative
            error of the mean support, applied after each optimizer step.
        balance_iters: ``balanced_soft_topk``: alternating row / column solves per training
            forward.
        balance_target: ``balanced_soft_topk``: what the per-expert thresholds equalise:
            ``load`` (the dispatched assignments per expert, so MaxVio_batch is ~0 by
            construction) or ``mass`` (the column sums of p, ``sum_t p_te = T K / E``).
        balance_momentum: ``balanced_soft_topk``: weight of the old value in the running
            average of the per-expert thresholds used at evaluation.
        balance_window: ``balanced_soft_topk``: None, or the number of recent real training
            tokens whose router logits the router keeps (a ring buffer, checkpointed) to solve
            the evaluation thresholds on after each optimizer step, instead of averaging the
            per-batch solutions: one solve over many batches, so the thresholds carry less of
            one batch's noise.
        tau: Temperature (the start value for ``anneal`` / ``learned``).
        tau_schedule: ``fixed``, ``anneal`` (from ``tau`` to ``tau_final`` over
            ``anneal_steps`` optimizer steps) or ``learned`` (a parameter, log-parametrised).
        tau_final: End temperature of ``anneal``.
        anneal_steps: Length of ``anneal`` in optimizer steps; required by ``anneal``. The CLI
            sets it to ``trainer.max_steps`` when left None.
        anneal_shape: ``exponential`` (geometric), ``linear`` or ``cosine`` interpolation.
        tau_min: Floor of the learned temperature.
        jitter_eps: Multiplicative input jitter ``x * U(1 - eps, 1 + eps)`` in training
            (Switch Transformer); 0 disables it.
        num_groups: G, expert groups for group-limited routing (E must divide by G).
        topk_groups: Groups a token may use (DeepSeek-V3 node-limited routing); None = all.
            Group score = the largest logit in the group.
        aux_loss_coef: Coefficient of the micro-batch Switch/GShard balance loss (0 = off).
        seq_aux_loss_coef: Coefficient of the per-sequence balance loss (0 = off).
        z_loss_coef: Coefficient of the router z-loss (0 = off).
        expert_bias: Enable DeepSeek-V3's auxiliary-loss-free expert bias.
        bias_update_rate: u, the step of the expert bias.
        relu_l1_init: ``relu`` (ReMoE): the L1 penalty's starting coefficient.
        relu_l1_factor: ``relu``: after each optimizer step the coefficient is multiplied by
            this factor while the gates are denser than the target sparsity ``1 - K / E``
            (over all ranks) and divided by it otherwise.
        init_std: Standard deviation of the router weight at initialisation.
    """

    # gate
    score_func: ScoreFunc = "softmax"
    method: SoftMethod = "sigmoid"
    renormalize: bool = False
    score_scale: float = 1.0
    max_active: int | None = None
    # compute budget (sparse) and two-sided balance
    target_active: float | None = None
    budget_update_rate: float = 0.2
    balance_iters: int = 8
    balance_target: BalanceTarget = "load"
    balance_momentum: float = 0.9
    balance_window: int | None = None
    # temperature
    tau: float = 1.0
    tau_schedule: TauSchedule = "fixed"
    tau_final: float = 0.1
    anneal_steps: int | None = None
    anneal_shape: AnnealShape = "exponential"
    tau_min: float = 1e-2
    # Megatron / torchtitan options
    jitter_eps: float = 0.0
    num_groups: int = 1
    topk_groups: int | None = None
    # load balancing
    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    # ReMoE's L1 controller
    relu_l1_init: float = 1e-8
    relu_l1_factor: float = 1.2
    # init
    init_std: float = 0.02

    def __post_init__(self) -> None:
        """Checks every size-independent field (the sizes are checked by the subclasses)."""

        def need(ok: bool, name: str, allowed: str) -> None:
            _need(ok, name, getattr(self, name), allowed)

        need(self.score_func in SCORE_FUNCS, "score_func", f"one of {SCORE_FUNCS}")
        need(self.method in SOFT_METHODS, "method", f"one of {SOFT_METHODS}")
        need(isinstance(self.renormalize, bool), "renormalize", "a bool")
        need(
            _is_number(self.score_scale)
            and math.isfinite(self.score_scale)
            and self.score_scale > 0,
            "score_scale",
            "a finite float > 0",
        )
        need(
            self.target_active is None
            or (_is_number(self.target_active) and 1 <= self.target_active < math.inf),
            "target_active",
            "None or a finite float >= 1 (every token computes at least one expert)",
        )
        need(
            _is_number(self.budget_update_rate)
            and math.isfinite(self.budget_update_rate)
            and self.budget_update_rate >= 0,
            "budget_update_rate",
            "a finite float >= 0",
        )
        need(self.balance_target in ("load", "mass"), "balance_target", "one of ('load', 'mass')")
        need(
            _is_int(self.balance_iters) and self.balance_iters >= 1,
            "balance_iters",
            "an int >= 1",
        )
        need(
            _is_number(self.balance_momentum) and 0 <= self.balance_momentum < 1,
            "balance_momentum",
            "a float in [0, 1)",
        )
        need(
            self.balance_window is None
            or (_is_int(self.balance_window) and self.balance_window >= 1),
            "balance_window",
            "None or an int >= 1",
        )
        need(
            _is_number(self.tau) and math.isfinite(self.tau) and self.tau > 0,
            "tau",
            "a finite float > 0",
        )
        need(self.tau_schedule in TAU_SCHEDULES, "tau_schedule", f"one of {TAU_SCHEDULES}")
        need(
            _is_number(self.tau_final) and math.isfinite(self.tau_final) and self.tau_final > 0,
            "tau_final",
            "a finite float > 0",
        )
        need(
            (self.anneal_steps is None and self.tau_schedule != "anneal")
            or (_is_int(self.anneal_steps) and self.anneal_steps >= 1),
            "anneal_steps",
            "an int >= 1 (None only without tau_schedule='anneal')",
        )
        need(self.anneal_shape in ANNEAL_SHAPES, "anneal_shape", f"one of {ANNEAL_SHAPES}")
        need(
            _is_number(self.tau_min)
            and math.isfinite(self.tau_min)
            and 0 < self.tau_min <= self.tau,
            "tau_min",
            f"a float with 0 < tau_min <= tau={self.tau}",
        )
        need(
            _is_number(self.jitter_eps) and 0 <= self.jitter_eps < 1,
            "jitter_eps",
            "a float in [0, 1)",
        )
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            need(
                _is_number(value) and math.isfinite(value) and value >= 0,
                name,
                "a finite float >= 0",
            )
        need(isinstance(self.expert_bias, bool), "expert_bias", "a bool")
        need(
            _is_number(self.relu_l1_init)
            and math.isfinite(self.relu_l1_init)
            and self.relu_l1_init > 0,
            "relu_l1_init",
            "a finite float > 0",
        )
        need(
            _is_number(self.relu_l1_factor)
            and math.isfinite(self.relu_l1_factor)
            and self.relu_l1_factor > 1,
            "relu_l1_factor",
            "a finite float > 1",
        )
        need(
            _is_number(self.init_std) and math.isfinite(self.init_std) and self.init_std > 0,
            "init_std",
            "a finite float > 0",
        )

    def router_options(self) -> dict[str, object]:
        """The :class:`RouterOptions` fields of this object, as keywords."""
        return {f.name: getattr(self, f.name) for f in fields(RouterOptions)}


@dataclass
class RouterConfig(RouterOptions):
    """Settings of a :class:`~moe_router.router.Router`: sizes, gate and every option.

    Attributes:
        d_model: D, width of the hidden states.
        num_experts: E.
        k: K, experts per token (for ``sparse_soft_topk``: the soft budget, sum of p, unless a
            ``target_active`` controller moves it).
        gate: ``topk``, ``soft_topk``, ``soft_topk_dense``, ``sparse_soft_topk``,
            ``balanced_soft_topk``, ``straight_through`` or ``relu`` (ReMoE; see
            :mod:`moe_router.gates`).
    """

    d_model: int
    num_experts: int
    k: int
    gate: Gate = "soft_topk"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            _need(ok, name, getattr(self, name), allowed)

        need(self.gate in GATES, "gate", f"one of {GATES}")
        need(_is_int(self.d_model) and self.d_model >= 1, "d_model", "an int >= 1")
        need(_is_int(self.num_experts) and self.num_experts >= 1, "num_experts", "an int >= 1")
        need(
            _is_int(self.k) and 1 <= self.k <= self.num_experts,
            "k",
            f"an int with 1 <= k <= num_experts={self.num_experts}",
        )
        super().__post_init__()
        check_options_read(self, ROUTER_OPTION_DEFAULTS)
        if self.target_active is not None:
            need(
                self.target_active < self.num_experts,
                "target_active",
                f"a float < num_experts={self.num_experts}",
            )
        if self.max_active is None:
            if self.target_active is None:
                self.max_active = min(self.num_experts, 2 * self.k)
            else:
                self.max_active = min(self.num_experts, 4 * math.ceil(self.target_active))
        need(
            _is_int(self.max_active) and self.k <= self.max_active <= self.num_experts,
            "max_active",
            f"an int with k={self.k} <= max_active <= num_experts={self.num_experts}",
        )
        if self.target_active is not None:
            need(
                self.target_active <= self.max_active,
                "target_active",
                f"a float <= max_active={self.max_active} (the slots a token may compute)",
            )
        need(
            _is_int(self.num_groups)
            and self.num_groups >= 1
            and self.num_experts % self.num_groups == 0,
            "num_groups",
            f"an int >= 1 dividing num_experts={self.num_experts}",
        )
        if self.topk_groups is None:
            self.topk_groups = self.num_groups
        experts_per_group = self.num_experts // self.num_groups
        need(
            _is_int(self.topk_groups)
            and 1 <= self.topk_groups <= self.num_groups
            and self.topk_groups * experts_per_group >= self.k,
            "topk_groups",
            f"an int in [1, num_groups={self.num_groups}] whose groups hold >= k={self.k} "
            f"experts ({experts_per_group} per group)",
        )
        if self.gate in SOFT_GATES:
            # Soft top-k needs more candidates than its budget (with exactly k, p is all ones
            # and carries no gradient; the operator rejects such rows).
            need(
                self.topk_groups * experts_per_group > self.k,
                "k",
                f"smaller than the experts a token may use with a soft gate "
                f"({self.topk_groups * experts_per_group} = topk_groups x experts per group)",
            )

    @property
    def slots(self) -> int:
        """Static number of expert slots per token (the K of ``expert_ids_TK``)."""
        if self.gate == "soft_topk_dense":
            return self.num_experts
        if self.support_exact:
            return self.max_active
        return self.k

    @property
    def support_exact(self) -> bool:
        """Whether the gate computes every expert with p > 0 (up to ``max_active``, the rest
        counted as overflow) instead of a fixed K."""
        return is_support_exact(self.gate, self.method)

    @property
    def all_slots_valid(self) -> bool:
        """Whether every slot carries an assignment (before padding and capacity): false for
        the support-exact gates and for ``soft_topk_dense`` under group-limited routing."""
        if self.support_exact:
            return False
        return not (self.gate == "soft_topk_dense" and self.topk_groups < self.num_groups)

    @property
    def soft_method(self) -> str:
        """The soft top-k method this gate uses."""
        return "sparse" if self.gate == "sparse_soft_topk" else self.method

    @property
    def needs_stepping(self) -> bool:
        """Whether the router holds per-step state that must advance after every optimizer
        step (expert bias, annealed temperature, budget controller, balanced thresholds)."""
        return (
            self.expert_bias
            or self.tau_schedule == "anneal"
            or self.target_active is not None
            or self.gate in ("balanced_soft_topk", "relu")
        )


@dataclass(kw_only=True)
class MoEOptions(RouterOptions):
    """Settings of an MoE layer that do not depend on its sizes: the router's options plus
    the layer's own (what ``ModelConfig.moe`` holds).

    Attributes:
        shared_d_ff: Hidden width of an always-on shared expert (DeepSeek); 0 = none.
        capacity_factor: None = dropless; else each expert takes at most
            ``ceil(capacity_factor * T * K / E)`` assignments per forward.
        drop_policy: Which assignments a full expert drops: ``score`` (lowest gate score
            first) or ``position`` (latest tokens first).
        backend: Expert dispatch: ``auto`` (the per-expert-slice path on CPU, torch's grouped
            kernel on other devices where it applies), ``grouped_mm``, or ``loop`` (the
            per-expert-slice path on any device; reads the slice sizes on the host).
        default_moe_beta: Default MoE (any gate): None, or the EMA weight of the old value in
            each expert's default output, the combine-weighted mean of its outputs over the
            tokens dispatched to it (updated after each optimizer step, over all ranks). An
            expert a token was not computed on then passes the gradient of its gate weight
            times that default output to the router; the forward is unchanged.
    """

    # experts
    shared_d_ff: int = 0
    # dispatch
    capacity_factor: float | None = None
    drop_policy: DropPolicy = "score"
    backend: GroupedMMBackend = "auto"
    # dense router gradient
    default_moe_beta: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _need(
            _is_int(self.shared_d_ff) and self.shared_d_ff >= 0,
            "shared_d_ff",
            self.shared_d_ff,
            "an int >= 0",
        )
        _need(
            self.capacity_factor is None
            or (
                _is_number(self.capacity_factor)
                and math.isfinite(self.capacity_factor)
                and self.capacity_factor > 0
            ),
            "capacity_factor",
            self.capacity_factor,
            "None or a float > 0",
        )
        _need(
            self.drop_policy in DROP_POLICIES,
            "drop_policy",
            self.drop_policy,
            f"one of {DROP_POLICIES}",
        )
        _need(
            self.default_moe_beta is None
            or (_is_number(self.default_moe_beta) and 0 <= self.default_moe_beta < 1),
            "default_moe_beta",
            self.default_moe_beta,
            "None or a float in [0, 1)",
        )
        _need(
            self.backend in GROUPED_MM_BACKENDS,
            "backend",
            self.backend,
            f"one of {GROUPED_MM_BACKENDS}",
        )

    def layer_config(
        self, d_model: int, d_ff: int, num_experts: int, k: int, gate: str
    ) -> MoEConfig:
        """The :class:`MoEConfig` of a layer with these sizes and gate."""
        options = {f.name: getattr(self, f.name) for f in fields(MoEOptions)}
        return MoEConfig(d_model, d_ff, num_experts, k, gate, **options)


@dataclass
class MoEConfig(MoEOptions):
    """Settings of a :class:`~moe_router.moe.MoELayer`.

    Attributes:
        d_model: D.
        d_ff: F, hidden width of each routed expert.
        num_experts: E.
        k: K.
        gate: Router gate (see :mod:`moe_router.gates`).
    """

    d_model: int
    d_ff: int
    num_experts: int
    k: int
    gate: Gate = "soft_topk"

    def __post_init__(self) -> None:
        _need(_is_int(self.d_ff) and self.d_ff >= 1, "d_ff", self.d_ff, "an int >= 1")
        super().__post_init__()
        # Validates the sizes, the gate and every size-dependent router option.
        self.router_config = RouterConfig(
            self.d_model, self.num_experts, self.k, self.gate, **self.router_options()
        )
        check_options_read(self, _LAYER_DEFAULTS)

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for a batch of ``num_tokens`` tokens (None when dropless):
        ``ceil(capacity_factor * T * A / E)`` with A the assignments per token, K (the soft
        budget for support-exact gates), or every usable expert for ``soft_topk_dense``."""
        if self.capacity_factor is None:
            return None
        per_token = self.k
        if self.gate == "soft_topk_dense":
            per_token = self.router_config.topk_groups * (self.num_experts // self.num_groups)
        return math.ceil(self.capacity_factor * num_tokens * per_token / self.num_experts)


_ROUTER_OPTION_NAMES = frozenset(f.name for f in fields(RouterOptions))
ROUTER_OPTION_DEFAULTS = {f.name: f.default for f in fields(RouterOptions)}
_LAYER_DEFAULTS = {
    f.name: f.default for f in fields(MoEOptions) if f.name not in _ROUTER_OPTION_NAMES
}
