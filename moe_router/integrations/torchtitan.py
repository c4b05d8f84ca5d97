"""``moe_router`` routers inside torchtitan's MoE models, one call to patch them.

Shape legend: B batch, L sequence length, T tokens (B * L), D model dim, E experts,
K slots per token, G expert groups, X experts per group.

``replace_routers(model_or_config, gate="balanced_soft_topk")`` swaps every
``TokenChoiceTopKRouter`` of a torchtitan model (0.3.x: qwen3, qwen3_5, deepseek_v3,
kimi_k2_7, gpt_oss) for a :class:`MoERouter`: a ``TokenChoiceTopKRouter`` subclass with its own
nested ``Config`` that keeps torchtitan's ``gate`` Linear (same Parameter, same state-dict key,
same initialisation and sharding config) and routes through a :class:`~moe_router.router.Router`
reading that weight. It works on a model config before ``build()`` (what torchtitan's trainer
builds from ``model_spec.model``), on a ``ModelSpec``, and on a built model.

With ``gate="topk"`` and no other option the patched model routes exactly as torchtitan's:
softmax or sigmoid scores, the expert bias added for selection only, node-limited groups
(group score = sum of the two largest biased scores), ``route_norm`` and ``route_scale``, and
gpt-oss's gate bias. torchtitan's settings become the router's defaults (``score_func``,
``renormalize`` = ``route_norm``, ``score_scale`` = ``route_scale``, ``num_groups`` /
``topk_groups``, and ``expert_bias=True`` with ``bias_update_rate`` = the MoE's
``load_balance_coeff``), kept only where the chosen gate reads them.

What changes in the model:

* ``MoE.load_balance_coeff`` is set to None and ``MoE.expert_bias_E`` removed: the expert
  bias, like every other per-step router state (budget controller, balanced thresholds,
  temperature schedule), lives in the router and is stepped by ``moe_router``
  (:func:`register_step_hook`, the ``post_optimizer_build_fn`` a patched ``ModelSpec`` gets, or
  ``moe_router.step_routers(model)``). torchtitan's ``register_moe_load_balancing_hook`` then
  registers nothing, so one mechanism alone steps the bias.
* Gates with a variable support (``sparse_soft_topk``, ``balanced_soft_topk`` with
  ``method="sparse"``) give torchtitan ``config.slots`` (``max_active``) ids per token with
  weight 0 on the slots that carry no expert; the token dispatcher's ``top_k`` becomes the slot
  count. torchtitan's MoE computes every slot, so those zero-weight slots cost expert compute;
  :func:`spread_padding` spreads them evenly over the experts (and so over the EP ranks).
* Auxiliary losses (``aux_loss_coef``, ``seq_aux_loss_coef``, ``z_loss_coef``) are in the
  routing records; add :func:`router_aux_loss` to the training loss (torchtitan's loss has no
  hook for them).

Checkpoints: the router state is in the model's ``state_dict`` (persistent buffers under
``<layer>.moe.router.moe_router.*``; the weight stays ``<layer>.moe.router.gate.weight``), so
torchtitan's DCP checkpointing saves and restores it. The per-step accumulators (loads since the
last step) are not persistent: a checkpoint taken between a forward and its step loses that
step's loads, as torchtitan's own ``tokens_per_expert_E`` does. Every persistent buffer is the
same on every rank after a step (``balanced_soft_topk``'s warm start is averaged over the ranks
then), so DCP's one copy restores every rank exactly. torchtitan's HF state-dict
adapters map ``moe.expert_bias_E`` (DeepSeek's ``e_score_correction_bias``); a patched model
keeps its bias under ``moe.router.moe_router.expert_bias.bias_E`` instead, which those adapters
do not know.

Parallelism: every router state component all-reduces over the default process group, which is
right for FSDP / DDP / CP and expert parallelism borrowed from them (every rank routes its own
tokens with the same router); pipeline parallelism (ranks holding different layers) and tensor
parallelism of the router input are refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import MoE, TokenChoiceTopKRouter
from torchtitan.protocols.model_spec import ModelSpec

from moe_router.config import RouterConfig, over_model_defaults
from moe_router.gates import top2_group_limit
from moe_router.records import sum_aux_losses
from moe_router.router import Router
from moe_router.routing import Routing
from moe_router.stepping import step_routers

__all__ = [
    "MoERouter",
    "TitanRouter",
    "register_step_hook",
    "replace_routers",
    "router_aux_loss",
    "routings",
    "spread_padding",
]

# Router settings the model fixes: the gate weight's shape and torchtitan's initialisation.
_FIXED_OPTIONS = ("d_model", "num_experts", "init_std")


# ---------------------------------------------------------------------------------------------
# The router that reads torchtitan's gate.
# ---------------------------------------------------------------------------------------------


class TitanRouter(Router):
    """A :class:`~moe_router.router.Router` whose weight is torchtitan's ``gate`` Linear and
    whose group limit follows torchtitan's ``TokenChoiceTopKRouter``.

    The weight is not a parameter of this module: :attr:`weight_ED` reads ``owner.gate.weight``
    (and ``owner.gate.bias``, appended as one more input column) at every forward, so FSDP's
    unsharded parameter, a converter's replaced Linear and torchtitan's initialisation all
    apply to it as to torchtitan's own router.

    Group limit (``topk_groups < num_groups``): a group's score is the sum of its two largest
    selection scores ``score_func(logit) + bias`` over all E experts; experts outside the
    token's ``topk_groups`` best groups get a ``-inf`` logit. torchtitan's softmax is over all E
    experts whatever the groups; for the ``topk`` gate with softmax scores the router therefore
    runs sigmoid scoring on ``logit(softmax(logits))``, whose sigmoid is that full softmax
    (``score_func`` in :attr:`config` then reads ``"sigmoid"``; :attr:`titan_score_func` keeps
    ``"softmax"``).

    Args:
        config: The router config (``d_model`` = D, plus one with a gate bias).
        owner: The :class:`MoERouter` holding the gate (kept as a plain reference, not a
            submodule).
        titan_score_func: torchtitan's ``score_func``, which scores the groups.
        softmax_logits: Whether the gate's sigmoid runs on ``logit(softmax(logits))`` (see
            above).

    Raises:
        ValueError: As ``Router``, and if a group holds fewer than two experts.
    """

    def __init__(
        self,
        config: RouterConfig,
        owner: nn.Module,
        *,
        titan_score_func: str,
        softmax_logits: bool = False,
    ) -> None:
        super().__init__(config)
        # The gate owns the weight; this module only reads it (see ``weight_ED``).
        del self._parameters["weight_ED"]
        self.__dict__["_owner"] = owner
        self.titan_score_func = titan_score_func
        self.softmax_logits = softmax_logits
        experts_per_group = config.num_experts // config.num_groups
        if config.topk_groups < config.num_groups and experts_per_group < 2:
            raise ValueError(
                f"num_groups={config.num_groups} leaves {experts_per_group} expert per group: "
                "torchtitan's group scores need at least 2 experts per group"
            )

    @property
    def weight_ED(self) -> Tensor:  # the Router's name for its weight
        """torchtitan's gate weight ``[E, D]`` (``[E, D + 1]`` with the gate bias appended)."""
        owner = self.__dict__.get("_owner")
        if owner is None:
            # Inside Router.__init__ only: nn.Module's lookup then finds its own parameter.
            raise AttributeError("weight_ED")
        gate = owner.gate
        weight_ED = _local(gate.weight)
        if gate.bias is None:
            return weight_ED
        return torch.cat([weight_ED, _local(gate.bias).unsqueeze(-1)], dim=-1)  # (E, D + 1)

    def reset_parameters(self) -> None:
        """Re-initialise the learned temperature; the weight is the gate's, torchtitan's."""
        if self.config.tau_schedule == "learned":
            with torch.no_grad():
                self.log_tau.fill_(math.log(self.config.tau))

    def group_mask(self, logits_TE: Tensor) -> Tensor:
        """torchtitan's node-limited routing: ``-inf`` outside each token's best groups."""
        config = self.config
        if self.softmax_logits:
            # sigmoid(log p - log(1 - p)) = p: the topk gate's sigmoid gives the full softmax.
            # The clamp keeps log(1 - p) finite (and its gradient) when one expert takes all.
            log_p_TE = logits_TE.log_softmax(-1)
            one_minus_p_TE = (1.0 - log_p_TE.exp()).clamp_min(1e-7)
            logits_TE = log_p_TE - one_minus_p_TE.log()
        if config.topk_groups == config.num_groups:
            return logits_TE
        scores_TE = logits_TE.detach()
        if self.softmax_logits or self.titan_score_func == "sigmoid":
            scores_TE = scores_TE.sigmoid()
        else:
            scores_TE = scores_TE.softmax(-1)
        if self.expert_bias is not None:
            scores_TE = scores_TE + self.expert_bias.bias_E
        return top2_group_limit(logits_TE, scores_TE, config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, titan_score_func={self.titan_score_func!r}"


def _local(tensor: Tensor) -> Tensor:
    """A replicated DTensor's local value (differentiable); plain tensors as they are."""
    if not isinstance(tensor, DTensor):
        return tensor
    if not all(isinstance(p, Replicate) for p in tensor.placements):
        raise NotImplementedError(
            f"the router gate is sharded ({tensor.placements}): moe_router routers need a "
            "replicated gate (tensor parallelism of the router is not supported)"
        )
    return tensor.to_local()


# ---------------------------------------------------------------------------------------------
# The torchtitan module.
# ---------------------------------------------------------------------------------------------


def _titan_defaults(router_config: TokenChoiceTopKRouter.Config, load_balance_coeff) -> dict:
    """torchtitan's routing settings as ``Router`` options (``k`` included)."""
    num_groups = router_config.num_expert_groups
    if num_groups is not None and router_config.num_limited_groups is None:
        raise ValueError("num_limited_groups must be set when num_expert_groups is set")
    defaults = {
        "k": router_config.top_k,
        "score_func": router_config.score_func,
        "renormalize": bool(router_config.route_norm),
        "score_scale": float(router_config.route_scale),
        "num_groups": 1 if num_groups is None else num_groups,
        "topk_groups": 1 if num_groups is None else router_config.num_limited_groups,
        "expert_bias": load_balance_coeff is not None,
    }
    if load_balance_coeff is not None:
        defaults["bias_update_rate"] = float(load_balance_coeff)
    return defaults


class MoERouter(TokenChoiceTopKRouter):
    """torchtitan's router slot with a ``moe_router`` gate: ``forward(x_BLD, expert_bias_E)
    -> (weights_BLK, expert_ids_BLK, scores_BLE)`` like ``TokenChoiceTopKRouter``.

    Built by :func:`replace_routers`; the ``Config`` holds torchtitan's router settings (which
    the router starts from) and the ``moe_router`` gate and options.

    Attributes:
        gate: torchtitan's gate Linear (``[E, D]`` weight, initialised and sharded by
            torchtitan).
        moe_router: The :class:`TitanRouter`; its ``last_routing`` is the latest record.
        slots: K of the returned tensors (``config.slots`` of the router).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        """``TokenChoiceTopKRouter.Config`` plus the ``moe_router`` settings.

        Attributes:
            moe_gate: The ``moe_router`` gate (``topk``, ``soft_topk``, ``sparse_soft_topk``,
                ``balanced_soft_topk``, ...).
            moe_options: Every other :class:`~moe_router.router.RouterConfig` option, already
                merged with torchtitan's defaults (see :func:`replace_routers`).
        """

        moe_gate: str = "topk"
        moe_options: dict[str, Any] = field(default_factory=dict)

        def router_config(self) -> RouterConfig:
            """The :class:`RouterConfig` this router builds (checks every option).

            Raises:
                ValueError: On an option the gate does not read, or a bad value.
            """
            options = dict(self.moe_options)
            k = options.pop("k", self.top_k)
            if _softmax_logits(self, options):
                options["score_func"] = "sigmoid"
            d_model = self.gate.in_features + (1 if self.gate.bias else 0)
            return RouterConfig(d_model, self.num_experts, k, self.moe_gate, **options)

    def __init__(self, config: Config) -> None:
        if config._debug_force_load_balance:
            raise ValueError("_debug_force_load_balance replaces the routing: not supported")
        router_config = config.router_config()  # before building anything: errors first
        super().__init__(config)
        self.moe_router = TitanRouter(
            router_config,
            self,
            titan_score_func=config.score_func,
            softmax_logits=_softmax_logits(config, config.moe_options),
        )
        self.slots = router_config.slots
        self.top_k = router_config.slots

    def _init_self_buffers(self, *, buffer_device: torch.device | None = None) -> None:
        """Reset the router state to a new router's (torchtitan's ``init_states`` after
        ``to_empty``), on ``buffer_device``; the gate weight is torchtitan's to initialise.

        Draws no random numbers, so a patched model initialises to the same weights as the
        original for the same seed.
        """
        device = buffer_device or self.gate.weight.device
        fresh = TitanRouter(self.moe_router.config, self, titan_score_func=self.score_func)
        with torch.no_grad():
            for name, value in fresh.named_buffers():
                module_name, _, leaf = name.rpartition(".")
                module = self.moe_router.get_submodule(module_name)
                module._buffers[leaf] = value.to(device)  # keeps the buffer's persistence
        self.moe_router.reset_parameters()

    def forward(
        self, x_BLD: Tensor, expert_bias_E: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Route ``(B, L, D)`` hidden states.

        Args:
            x_BLD: The MoE input.
            expert_bias_E: torchtitan's expert bias; must be None (the router holds its own).

        Returns:
            ``(weights_BLK, expert_ids_BLK, scores_BLE)``: fp32 combine weights (0 on slots
            that carry no expert), int64 ids, fp32 gate scores (the soft gates' p).

        Raises:
            ValueError: If torchtitan passes an expert bias (its balancing is still on).
        """
        if expert_bias_E is not None:
            raise ValueError(
                "torchtitan's expert bias is on (MoE.load_balance_coeff is set) next to the "
                "moe_router router: patch the model with replace_routers, which turns it off"
            )
        if isinstance(x_BLD, DTensor):
            raise NotImplementedError(
                "the MoE input is a DTensor (tensor / sequence parallelism): moe_router "
                "routers take local tokens (FSDP, DDP, CP and EP are supported)"
            )
        batch, seq_len, _ = x_BLD.shape
        hidden_BLD = x_BLD
        if self.gate.bias is not None:
            ones_BL1 = x_BLD.new_ones(batch, seq_len, 1)
            hidden_BLD = torch.cat([x_BLD, ones_BL1], dim=-1)  # (B, L, D + 1)
        routing = self.moe_router(hidden_BLD)
        expert_ids_TK = routing.expert_ids_TK
        if not self.moe_router.config.all_slots_valid:
            expert_ids_TK = spread_padding(expert_ids_TK, routing.valid_TK, self.num_experts)
        return (
            routing.weights_TK.view(batch, seq_len, -1),
            expert_ids_TK.view(batch, seq_len, -1),
            routing.scores_TE.view(batch, seq_len, -1),
        )

    def extra_repr(self) -> str:
        return f"slots={self.slots}"


def spread_padding(expert_ids_TK: Tensor, valid_TK: Tensor, num_experts: int) -> Tensor:
    """Expert ids for the slots that carry no expert, spread evenly over the experts.

    torchtitan's MoE computes every slot, the zero-weight ones included; left at the gate's
    ids (``topk`` over the zeros of p) they pile up on a few experts, and so on one
    expert-parallel rank. Each padding slot gets instead an expert the token does not use,
    taken in an order that starts at a different expert for each token (round robin). Valid
    slots keep their ids; every token's ids stay distinct, as torchtitan's count of tokens per
    expert needs.

    Args:
        expert_ids_TK: The gate's ids (distinct per token).
        valid_TK: Which slots carry an expert.
        num_experts: E.

    Returns:
        int64 ``[T, K]``.
    """
    num_tokens = expert_ids_TK.shape[0]
    used_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=valid_TK.device)
    used_TE.scatter_(-1, expert_ids_TK, valid_TK)
    experts_E = torch.arange(num_experts, device=valid_TK.device)
    tokens_T1 = torch.arange(num_tokens, device=valid_TK.device).unsqueeze(-1)
    rotated_TE = (experts_E + tokens_T1) % num_experts  # token t starts at expert t mod E
    free_TE = (rotated_TE + used_TE * num_experts).argsort(-1)  # unused experts first
    padding_index_TK = (~valid_TK).cumsum(-1) - 1  # j-th padding slot of the token
    padding_ids_TK = free_TE.gather(-1, padding_index_TK.clamp_min(0))
    return torch.where(valid_TK, expert_ids_TK, padding_ids_TK)


def _softmax_logits(config: TokenChoiceTopKRouter.Config, options: dict) -> bool:
    """Whether the topk gate must take torchtitan's softmax over all experts under a group
    limit (see :class:`TitanRouter`)."""
    if config.moe_gate != "topk":
        return False
    score_func = options.get("score_func", config.score_func)
    num_groups = options.get("num_groups", config.num_expert_groups or 1)
    topk_groups = options.get("topk_groups", config.num_limited_groups or num_groups)
    return score_func == "softmax" and topk_groups < num_groups


# ---------------------------------------------------------------------------------------------
# Patching.
# ---------------------------------------------------------------------------------------------


def _check_options(router_options: dict[str, Any]) -> None:
    for name in _FIXED_OPTIONS:
        if name in router_options:
            raise ValueError(
                f"{name}={router_options[name]!r} cannot be set: the model's gate fixes it (its "
                "weight's shape, torchtitan's initialisation)"
            )


def _moe_router_config(
    router_config: TokenChoiceTopKRouter.Config,
    load_balance_coeff: float | None,
    gate: str,
    router_options: dict[str, Any],
) -> MoERouter.Config:
    """The :class:`MoERouter` config that replaces ``router_config`` (checked)."""
    if isinstance(router_config, MoERouter.Config):
        raise ValueError(
            "the model already has moe_router routers; start from torchtitan's config again "
            "to choose another gate"
        )
    if type(router_config) is not TokenChoiceTopKRouter.Config:
        raise ValueError(
            f"router config {type(router_config).__qualname__} is not supported: only "
            "torchtitan's TokenChoiceTopKRouter.Config"
        )
    defaults = _titan_defaults(router_config, load_balance_coeff)
    options = over_model_defaults(gate, defaults, router_options)
    torchtitan_fields = {
        f.name: getattr(router_config, f.name) for f in dataclasses.fields(router_config)
    }
    config = MoERouter.Config(**torchtitan_fields, moe_gate=gate, moe_options=options)
    config.router_config()  # every setting checked before the model changes
    return config


def _patch_config(model_config: Any, gate: str, router_options: dict[str, Any]) -> Any:
    moe_configs = [cfg for _, cfg, _, _ in model_config.traverse(MoE.Config)]
    if not moe_configs:
        raise ValueError(
            f"model config {type(model_config).__qualname__} has no MoE layer (MoE.Config)"
        )
    new_configs = [
        _moe_router_config(cfg.router, cfg.load_balance_coeff, gate, router_options)
        for cfg in moe_configs
    ]
    for moe_config, new_config in zip(moe_configs, new_configs, strict=True):
        slots = new_config.router_config().slots
        moe_config.router = new_config
        moe_config.load_balance_coeff = None  # the router holds the bias: one mechanism steps it
        moe_config.routed_experts.token_dispatcher.top_k = slots
    return model_config


def _patch_model(model: nn.Module, gate: str, router_options: dict[str, Any]) -> nn.Module:
    moes = [module for module in model.modules() if isinstance(module, MoE)]
    if not moes:
        raise ValueError(f"model ({type(model).__name__}) has no torchtitan MoE layer")
    replacements = []
    for moe in moes:
        router = moe.router
        if isinstance(router, MoERouter):
            raise ValueError(
                "the model already has moe_router routers; build torchtitan's model again to "
                "choose another gate"
            )
        if type(router) is not TokenChoiceTopKRouter:
            raise ValueError(f"router {type(router).__qualname__} is not supported")
        linear = router.gate
        titan_config = TokenChoiceTopKRouter.Config(
            num_experts=router.num_experts,
            gate=Linear.Config(
                in_features=linear.in_features,
                out_features=linear.out_features,
                bias=linear.bias is not None,
            ),
            num_expert_groups=router.num_expert_groups,
            num_limited_groups=router.num_limited_groups,
            top_k=router.top_k,
            score_func=router.score_func,
            route_norm=router.route_norm,
            route_scale=router.route_scale,
            _debug_force_load_balance=router._debug_force_load_balance,
        )
        config = _moe_router_config(titan_config, moe.load_balance_coeff, gate, router_options)
        with torch.device("meta"):  # draws no random numbers; the gate is the model's
            new_router = config.build()
        new_router.gate = linear  # the same Parameter: an optimizer built before still trains it
        new_router.moe_router.to_empty(device=linear.weight.device)
        new_router._init_self_buffers(buffer_device=linear.weight.device)
        if moe.expert_bias_E is not None and new_router.moe_router.expert_bias is not None:
            with torch.no_grad():
                new_router.moe_router.expert_bias.bias_E.copy_(_local(moe.expert_bias_E))
        new_router.train(router.training)
        replacements.append((moe, new_router))
    for moe, new_router in replacements:
        moe.router = new_router
        moe.load_balance_coeff = None
        moe.expert_bias_E = None
        moe.routed_experts.token_dispatcher.top_k = new_router.slots
    return model


def replace_routers(model_or_config: Any, gate: str = "soft_topk", **router_options: Any) -> Any:
    """Put a ``moe_router`` router into every MoE layer of a torchtitan model.

    Each layer's ``TokenChoiceTopKRouter`` becomes a :class:`MoERouter` that keeps its gate
    Linear and starts from its settings: ``score_func``, ``renormalize`` = ``route_norm``,
    ``score_scale`` = ``route_scale``, ``num_groups`` / ``topk_groups`` =
    ``num_expert_groups`` / ``num_limited_groups``, ``k`` = ``top_k``, and, where the MoE has
    ``load_balance_coeff``, ``expert_bias=True`` with ``bias_update_rate`` = that coefficient
    (on a built model, starting from its ``expert_bias_E``). With ``gate="topk"`` and no other
    option the model routes as before. torchtitan's own expert bias is switched off
    (``load_balance_coeff=None``): the router's state is stepped by ``moe_router`` alone. Patch
    before torchtitan builds the optimizers: its balancing hook, once registered for a model
    with an expert bias, asserts on a patched one.

    Args:
        model_or_config: A torchtitan model config (``model_spec.model``, before ``build()``;
            patched in place), a ``ModelSpec`` (its model config is patched and its
            ``post_optimizer_build_fn`` becomes :func:`register_step_hook`), or a built model
            (patched in place; the gate weights are kept).
        gate: The ``moe_router`` gate (``topk``, ``soft_topk``, ``sparse_soft_topk``,
            ``balanced_soft_topk``, ...).
        **router_options: Any other :class:`~moe_router.router.RouterConfig` option; they
            override the defaults read from the model (``d_model``, ``num_experts`` and
            ``init_std`` are the gate's; ``k`` may differ from ``top_k``, the slot count
            torchtitan dispatches follows the router's ``config.slots``).

    Returns:
        ``model_or_config``, patched.

    Raises:
        ValueError: If there is no MoE layer, a router is not torchtitan's
            ``TokenChoiceTopKRouter``, the model is already patched, an option is fixed by the
            model, or the router rejects a setting. Nothing is changed then.
    """
    _check_options(router_options)
    if isinstance(model_or_config, ModelSpec):
        _patch_config(model_or_config.model, gate, router_options)
        model_or_config.post_optimizer_build_fn = register_step_hook
        return model_or_config
    if isinstance(model_or_config, nn.Module):
        return _patch_model(model_or_config, gate, router_options)
    return _patch_config(model_or_config, gate, router_options)


# ---------------------------------------------------------------------------------------------
# Records, aux losses, stepping.
# ---------------------------------------------------------------------------------------------


def _moe_routers(model: nn.Module) -> dict[str, MoERouter]:
    found = {name: m for name, m in model.named_modules() if isinstance(m, MoERouter)}
    if not found:
        raise ValueError(
            f"model ({type(model).__name__}) has no moe_router router: call replace_routers first"
        )
    return found


def routings(model: nn.Module) -> dict[str, Routing]:
    """Each patched layer's :class:`Routing` record of its latest forward.

    Args:
        model: A torchtitan model patched by :func:`replace_routers` (or a part of one).

    Returns:
        Router module path (``layers.0.moe.router``) -> record, in module order; layers that
        have not run yet are left out.

    Raises:
        ValueError: If the model has no ``moe_router`` router.
    """
    found = _moe_routers(model)
    return {
        name: router.moe_router.last_routing
        for name, router in found.items()
        if router.moe_router.last_routing is not None
    }


def router_aux_loss(model: nn.Module) -> Tensor:
    """Sum of every layer's auxiliary losses (already scaled) from its latest forward.

    Add it to the training loss (``loss = loss_fn(pred, labels) + router_aux_loss(model)``);
    it is 0 when no aux loss coefficient is set.

    Args:
        model: A patched torchtitan model.

    Returns:
        A differentiable fp32 scalar.

    Raises:
        ValueError: If the model has no ``moe_router`` router or no layer has routed yet.
    """
    return sum_aux_losses(routings(model).values(), model)


def register_step_hook(
    optimizers: torch.optim.Optimizer,
    model_parts: nn.Module | Iterable[nn.Module],
    parallel_dims: Any = None,
) -> torch.utils.hooks.RemovableHandle:
    """Step every ``moe_router`` router after each optimizer step (torchtitan's
    ``post_optimizer_build_fn`` signature, so a ``ModelSpec`` can take it as is).

    After the routers, each MoE's ``tokens_per_expert_E`` (torchtitan's count of dispatched
    slots, which its own balancing hook would reset) is zeroed, so it keeps meaning "since the
    last step" for whoever reads it.

    Args:
        optimizers: torchtitan's ``OptimizersContainer`` or any torch optimizer.
        model_parts: The model, or torchtitan's list of model parts.
        parallel_dims: torchtitan's ``ParallelDims`` (checked: no pipeline parallelism).

    Returns:
        The hook's handle.

    Raises:
        ValueError: If the model parts hold no ``moe_router`` router, or under pipeline
            parallelism (the router state all-reduces over the default process group, whose
            ranks would hold different layers).
    """
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    if parallel_dims is not None and getattr(parallel_dims, "pp_enabled", False):
        raise ValueError(
            "pipeline parallelism is not supported: moe_router's router state all-reduces "
            "over the default process group, whose ranks hold different layers under PP"
        )
    for part in parts:
        _moe_routers(part)
    moes = [module for part in parts for module in part.modules() if isinstance(module, MoE)]

    def hook(_optimizer: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:
        for part in parts:
            step_routers(part)
        with torch.no_grad():
            for moe in moes:
                moe.tokens_per_expert_E.zero_()

    return optimizers.register_step_post_hook(hook)
