"""Routers: hidden states in, a :class:`~moe_router.routing.Routing` record out.

Shape legend: T tokens, D model dim, E experts, K selected slots per token, G expert groups.

Every gate sits behind the same interface (``Router.forward(hidden_states, padding_mask)``):

============================  ==========================================================
gate                          what it does
============================  ==========================================================
``topk``                      hard baseline: softmax / sigmoid scores, top-K, optional
                              renormalisation. Unselected logits get no gradient from the
                              combine weights (softmax without renormalisation leaks one
                              through its normaliser only).
``soft_topk``                 p = soft_topk(logits, K, tau); compute on the K largest p,
                              combine weights = p there; gradient reaches all E logits
                              through the threshold.
``soft_topk_dense``           every expert weighted by p (K slots = E; small-E reference).
``sparse_soft_topk``          method ``sparse``: dispatch to exactly the experts with p > 0,
                              at most ``max_active`` of them (static slot count, invalid
                              slots masked by ``valid_TK``).
``straight_through``          forward weights are the hard 0/1 top-K mask (1/K each when
                              renormalised), backward is the soft top-k Jacobian.
============================  ==========================================================

Router math runs in fp32 whatever the dtype of the hidden states or of the router weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_router.balancing import (
    ExpertBias,
    load_balancing_loss,
    router_z_loss,
    sequence_load_balancing_loss,
)
from moe_router.ops import soft_topk
from moe_router.routing import Routing

__all__ = ["GATES", "Router", "RouterConfig", "select_experts"]

GATES = ("topk", "soft_topk", "soft_topk_dense", "sparse_soft_topk", "straight_through")
SOFT_GATES = ("soft_topk", "soft_topk_dense", "sparse_soft_topk", "straight_through")
SCORE_FUNCS = ("softmax", "sigmoid")
SOFT_METHODS = ("sigmoid", "laplace", "exp", "sparse")
TAU_SCHEDULES = ("fixed", "anneal", "learned")
ANNEAL_SHAPES = ("exponential", "linear", "cosine")


@dataclass
class RouterConfig:
    """Settings of a :class:`Router`.

    Attributes:
        d_model: D, width of the hidden states.
        num_experts: E.
        k: K, experts per token (for ``sparse_soft_topk``: the soft budget, sum of p).
        gate: One of ``topk``, ``soft_topk``, ``soft_topk_dense``, ``sparse_soft_topk``,
            ``straight_through``.
        score_func: ``topk`` gate scores: ``softmax`` (Switch/Mixtral) or ``sigmoid``
            (DeepSeek-V3).
        method: Soft top-k method of the soft gates (``sigmoid``, ``laplace``, ``exp``,
            ``sparse``); ``sparse_soft_topk`` always uses ``sparse``.
        renormalize: Divide the selected combine weights by their sum (Mixtral / DeepSeek-V3).
        score_scale: Multiplies the combine weights (DeepSeek's routed scaling factor).
        max_active: ``sparse_soft_topk`` only: most experts one token may use (slots);
            default ``min(E, 2K)``. Experts beyond the cap are dropped from the dispatch
            (smallest p first).
        tau: Temperature (the start value for ``anneal`` / ``learned``).
        tau_schedule: ``fixed``, ``anneal`` (from ``tau`` to ``tau_final`` over
            ``anneal_steps`` optimizer steps) or ``learned`` (a parameter, log-parametrised).
        tau_final: End temperature of ``anneal``.
        anneal_steps: Length of ``anneal`` in optimizer steps (``Router.step_schedule``).
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
        bias_update_rate: u, its update step.
        init_std: Standard deviation of the router weight at initialisation.
    """

    d_model: int
    num_experts: int
    k: int
    # gate
    gate: str = "soft_topk"
    score_func: str = "softmax"
    method: str = "sigmoid"
    renormalize: bool = False
    score_scale: float = 1.0
    max_active: int | None = None
    # temperature
    tau: float = 1.0
    tau_schedule: str = "fixed"
    tau_final: float = 0.1
    anneal_steps: int = 1000
    anneal_shape: str = "exponential"
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
    # init
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        need(isinstance(self.d_model, int) and self.d_model >= 1, "d_model", "an int >= 1")
        need(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            "num_experts",
            "an int >= 1",
        )
        need(
            isinstance(self.k, int) and 1 <= self.k <= self.num_experts,
            "k",
            f"an int with 1 <= k <= num_experts={self.num_experts}",
        )
        need(self.gate in GATES, "gate", f"one of {GATES}")
        need(self.score_func in SCORE_FUNCS, "score_func", f"one of {SCORE_FUNCS}")
        need(self.method in SOFT_METHODS, "method", f"one of {SOFT_METHODS}")
        need(math.isfinite(self.score_scale) and self.score_scale > 0, "score_scale", "> 0")
        if self.max_active is None:
            self.max_active = min(self.num_experts, 2 * self.k)
        need(
            isinstance(self.max_active, int) and self.k <= self.max_active <= self.num_experts,
            "max_active",
            f"an int with k={self.k} <= max_active <= num_experts={self.num_experts}",
        )
        need(math.isfinite(self.tau) and self.tau > 0, "tau", "a finite float > 0")
        need(self.tau_schedule in TAU_SCHEDULES, "tau_schedule", f"one of {TAU_SCHEDULES}")
        # A learned tau the topk gate never reads would be an unused parameter (DDP errors).
        need(
            self.tau_schedule != "learned" or self.gate in SOFT_GATES,
            "tau_schedule",
            f"'learned' needs a soft gate ({SOFT_GATES}), not gate={self.gate!r}",
        )
        need(
            math.isfinite(self.tau_final) and self.tau_final > 0,
            "tau_final",
            "a finite float > 0",
        )
        need(
            isinstance(self.anneal_steps, int) and self.anneal_steps >= 1,
            "anneal_steps",
            "an int >= 1",
        )
        need(self.anneal_shape in ANNEAL_SHAPES, "anneal_shape", f"one of {ANNEAL_SHAPES}")
        need(
            math.isfinite(self.tau_min) and 0 < self.tau_min <= self.tau,
            "tau_min",
            f"a float with 0 < tau_min <= tau={self.tau}",
        )
        need(0 <= self.jitter_eps < 1, "jitter_eps", "a float in [0, 1)")
        need(
            isinstance(self.num_groups, int)
            and self.num_groups >= 1
            and self.num_experts % self.num_groups == 0,
            "num_groups",
            f"an int >= 1 dividing num_experts={self.num_experts}",
        )
        if self.topk_groups is None:
            self.topk_groups = self.num_groups
        experts_per_group = self.num_experts // self.num_groups
        need(
            isinstance(self.topk_groups, int)
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
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, ">= 0")
        need(math.isfinite(self.init_std) and self.init_std > 0, "init_std", "> 0")

    @property
    def slots(self) -> int:
        """Static number of dispatch slots per token (the K of ``expert_ids_TK``)."""
        if self.gate == "soft_topk_dense":
            return self.num_experts
        if self.gate == "sparse_soft_topk":
            return self.max_active
        return self.k

    @property
    def all_slots_valid(self) -> bool:
        """Whether every slot carries an assignment (before padding and capacity): false for
        ``sparse_soft_topk`` and for ``soft_topk_dense`` under group-limited routing."""
        if self.gate == "sparse_soft_topk":
            return False
        return not (self.gate == "soft_topk_dense" and self.topk_groups < self.num_groups)

    @property
    def soft_method(self) -> str:
        """The soft top-k method this gate uses."""
        return "sparse" if self.gate == "sparse_soft_topk" else self.method


def annealed_tau(config: RouterConfig, step: Tensor) -> Tensor:
    """Temperature of the ``anneal`` schedule after ``step`` optimizer steps (fp32 scalar)."""
    progress = (step.float() / config.anneal_steps).clamp(0.0, 1.0)
    start, end = config.tau, config.tau_final
    if config.anneal_shape == "exponential":
        return start * (end / start) ** progress
    if config.anneal_shape == "linear":
        return start + (end - start) * progress
    return end + 0.5 * (start - end) * (1 + torch.cos(math.pi * progress))


def select_experts(
    logits_TE: Tensor,
    config: RouterConfig,
    tau: float | Tensor | None = None,
    bias_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gate itself, as a function of fp32 logits (group masking already applied).

    Args:
        logits_TE: fp32 router logits; ``-inf`` marks experts a token may not use.
        config: Gate settings.
        tau: Temperature of the soft gates (float or scalar tensor, possibly learned);
            ``config.tau`` when None.
        bias_E: Selection-only expert bias (added to the scores used to pick experts).

    Returns:
        ``(expert_ids_TK, weights_TK, scores_TE, valid_TK)`` with K = ``config.slots``.
    """
    k = config.k
    tau = config.tau if tau is None else tau
    if config.gate == "topk":
        if config.score_func == "softmax":
            scores_TE = logits_TE.softmax(-1)
        else:
            scores_TE = logits_TE.sigmoid()
        selection_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E
        if config.topk_groups < config.num_groups:  # a bias must not revive a masked expert
            selection_TE = selection_TE.masked_fill(logits_TE == float("-inf"), float("-inf"))
        expert_ids_TK = selection_TE.topk(k, dim=-1).indices
        valid_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        if config.renormalize and config.score_func == "softmax":
            # Same value as renormalising the gathered softmax, but (Mixtral style) leaves the
            # unselected logits out of the graph instead of giving them a rounding-error grad.
            weights_TK = logits_TE.gather(-1, expert_ids_TK).softmax(-1)
        else:
            weights_TK = scores_TE.gather(-1, expert_ids_TK)
        if config.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        return expert_ids_TK, weights_TK * config.score_scale, scores_TE, valid_TK

    p_TE = soft_topk(logits_TE, k, tau=tau, method=config.soft_method)
    if config.gate == "soft_topk_dense":
        expert_ids_TK = torch.arange(config.num_experts, device=logits_TE.device)
        expert_ids_TK = expert_ids_TK.expand(logits_TE.shape[0], -1)
        weights_TK = p_TE
        # Experts outside the token's groups (-inf) get no compute.
        valid_TK = logits_TE > float("-inf")
    elif config.gate == "sparse_soft_topk":
        # Support = {p > 0}, a variable count per token: take a static number of slots
        # (max_active) by value and mark the slots beyond the count invalid. With a bias the
        # support comes from a biased solve (no gradient), the weights from the unbiased p.
        if bias_E is None:
            selection_TE = p_TE.detach()
        else:
            with torch.no_grad():
                selection_TE = soft_topk(logits_TE + bias_E, k, tau=tau, method="sparse")
        top = selection_TE.topk(config.max_active, dim=-1)
        expert_ids_TK, valid_TK = top.indices, top.values > 0
        weights_TK = p_TE.gather(-1, expert_ids_TK) * valid_TK
    else:  # soft_topk, straight_through: compute on the K largest p (+ bias)
        selection_TE = p_TE.detach() if bias_E is None else p_TE.detach() + bias_E
        if config.topk_groups < config.num_groups:  # a bias must not revive a masked expert
            selection_TE = selection_TE.masked_fill(logits_TE == float("-inf"), float("-inf"))
        expert_ids_TK = selection_TE.topk(k, dim=-1).indices
        weights_TK = p_TE.gather(-1, expert_ids_TK)
        valid_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        if config.gate == "straight_through":
            # Value 1 per selected expert, gradient of the soft p (p_hard + p - sg(p)).
            weights_TK = (weights_TK - weights_TK.detach()) + 1.0
    if config.renormalize:
        # Plain differentiable ops, so autograd carries the off-diagonal -w w^T / s^2 term.
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return expert_ids_TK, weights_TK * config.score_scale, p_TE, valid_TK


class Router(nn.Module):
    """Linear router plus gate: ``[..., D]`` hidden states to a :class:`Routing` record.

    Build it with keywords (``Router(256, 8, 2, gate="soft_topk", tau=0.5)``; every
    :class:`RouterConfig` field is accepted) or from a config (``Router.from_config(cfg)``).

    Args:
        d_model: D.
        num_experts: E.
        k: K.
        gate: The gate (see the module docstring).
        **options: Any other :class:`RouterConfig` field.

    Raises:
        ValueError: On an invalid setting (see :class:`RouterConfig`).
    """

    def __init__(
        self, d_model: int, num_experts: int, k: int, gate: str = "soft_topk", **options: Any
    ) -> None:
        super().__init__()
        self.config = config = RouterConfig(d_model, num_experts, k, gate=gate, **options)
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        if config.tau_schedule == "learned":
            self.log_tau = nn.Parameter(torch.tensor(math.log(config.tau)))
        # The schedule position is a buffer so that it travels in checkpoints.
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))
        self.expert_bias = (
            ExpertBias(num_experts, config.bias_update_rate) if config.expert_bias else None
        )
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: RouterConfig) -> Router:
        """Build a router from a :class:`RouterConfig`."""
        fields = asdict(config)
        return cls(fields.pop("d_model"), fields.pop("num_experts"), fields.pop("k"), **fields)

    def reset_parameters(self) -> None:
        """Re-initialise the router weight (normal, ``init_std``) and tau."""
        nn.init.normal_(self.weight_ED, std=self.config.init_std)
        if self.config.tau_schedule == "learned":
            with torch.no_grad():
                self.log_tau.fill_(math.log(self.config.tau))

    @property
    def tau(self) -> float | Tensor:
        """Current temperature: a float when fixed, else an fp32 scalar tensor (differentiable
        when learned, read from the schedule buffer when annealed)."""
        config = self.config
        if config.tau_schedule == "learned":
            return self.log_tau.float().exp().clamp_min(config.tau_min)
        if config.tau_schedule == "anneal":
            return annealed_tau(config, self.schedule_step)
        return config.tau

    def step_schedule(self) -> None:
        """Advance the temperature schedule by one optimizer step (no-op unless ``anneal``)."""
        if self.config.tau_schedule == "anneal":
            self.schedule_step += 1

    def update_expert_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Update the auxiliary-loss-free bias after an optimizer step.

        Loads are summed over data-parallel ranks when torch.distributed is initialised, then
        ``b += u * sign(mean_load - load)`` and b is recentred to zero mean. A no-op when the
        expert bias is disabled.

        Args:
            tokens_per_expert_E: Assignments per expert on this rank since the last update.
        """
        if self.expert_bias is not None:
            self.expert_bias.update(tokens_per_expert_E)

    def group_mask(self, logits_TE: Tensor) -> Tensor:
        """Set the logits of every expert outside the token's ``topk_groups`` best groups to
        ``-inf`` (group score = the largest logit of the group)."""
        config = self.config
        if config.topk_groups == config.num_groups:
            return logits_TE
        logits_TGX = logits_TE.unflatten(-1, (config.num_groups, -1))  # X = E // G
        group_scores_TG = logits_TGX.detach().amax(-1)
        keep_groups_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_groups_TG.scatter_(-1, group_scores_TG.topk(config.topk_groups, -1).indices, True)
        masked_TGX = logits_TGX.masked_fill(~keep_groups_TG.unsqueeze(-1), float("-inf"))
        return masked_TGX.flatten(-2)  # (T, E)

    def forward(self, hidden_states: Tensor, padding_mask: Tensor | None = None) -> Routing:
        """Route a batch of tokens, in fp32 even inside the caller's autocast region.

        Autocast would otherwise run the router's linear in bf16/fp16 whatever the input dtype;
        the router math (logits, gate, aux losses) is precision-sensitive, so it is disabled here.
        """
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return self._route(hidden_states, padding_mask)

    def _route(self, hidden_states: Tensor, padding_mask: Tensor | None = None) -> Routing:
        """Route a batch of tokens.

        Args:
            hidden_states: ``[..., D]`` in any float dtype; the leading dims are flattened to T
                (``[B, S, D]`` also defines the sequences of the per-sequence balance loss).
            padding_mask: Bool ``[...]`` (the leading dims of ``hidden_states``), True where a
                token is padding. Padding tokens get no assignment (``valid_TK`` False, weight
                0), count in no load and contribute to no auxiliary loss.

        Returns:
            The :class:`Routing` record (fp32 tensors; ``aux_losses`` already scaled by their
            coefficients).

        Raises:
            ValueError: If the last dim is not D or the padding mask does not fit.
        """
        config = self.config
        if hidden_states.shape[-1] != config.d_model:
            raise ValueError(
                f"hidden_states must end in d_model={config.d_model}, "
                f"got shape {tuple(hidden_states.shape)}"
            )
        lead_shape = hidden_states.shape[:-1]
        if padding_mask is not None and padding_mask.shape != lead_shape:
            raise ValueError(
                f"padding_mask must have shape {tuple(lead_shape)}, got {tuple(padding_mask.shape)}"
            )
        x_TD = hidden_states.reshape(-1, config.d_model).float()  # (T, D)
        weight_ED = self.weight_ED.float()
        logits_TE = F.linear(x_TD, weight_ED)
        gate_logits_TE = logits_TE
        if self.training and config.jitter_eps > 0:
            # The gate sees the jittered input; the record (and the z-loss) keeps clean logits.
            noise_TD = torch.empty_like(x_TD).uniform_(
                1.0 - config.jitter_eps, 1.0 + config.jitter_eps
            )
            gate_logits_TE = F.linear(x_TD * noise_TD, weight_ED)
        bias_E = None if self.expert_bias is None else self.expert_bias.bias_E
        expert_ids_TK, weights_TK, scores_TE, valid_TK = select_experts(
            self.group_mask(gate_logits_TE), config, tau=self.tau, bias_E=bias_E
        )

        padding_mask_T = None
        if padding_mask is not None:
            padding_mask_T = padding_mask.reshape(-1).to(torch.bool)
            valid_TK = valid_TK & ~padding_mask_T.unsqueeze(-1)
            weights_TK = weights_TK * valid_TK
        aux_losses = self._aux_losses(
            lead_shape, logits_TE, scores_TE, expert_ids_TK, valid_TK, padding_mask_T
        )
        return Routing(
            expert_ids_TK=expert_ids_TK,
            weights_TK=weights_TK,
            scores_TE=scores_TE,
            logits_TE=logits_TE,
            aux_losses=aux_losses,
            valid_TK=valid_TK,  # the record counts tokens_per_expert_E from the valid slots
            padding_mask_T=padding_mask_T,
        )

    def _aux_losses(
        self,
        lead_shape: torch.Size,
        logits_TE: Tensor,
        scores_TE: Tensor,
        expert_ids_TK: Tensor,
        valid_TK: Tensor,
        padding_mask_T: Tensor | None,
    ) -> dict[str, Tensor]:
        config = self.config
        losses: dict[str, Tensor] = {}
        token_mask_T = None if padding_mask_T is None else ~padding_mask_T
        if config.aux_loss_coef > 0 or config.seq_aux_loss_coef > 0:
            # P_i needs a distribution per token: softmax already is one, sigmoid scores and
            # soft top-k p (which sums to K) are normalised by their row sum (DeepSeek-V3).
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        if config.aux_loss_coef > 0:
            losses["load_balance"] = config.aux_loss_coef * load_balancing_loss(
                probs_TE, expert_ids_TK, valid_TK, token_mask_T
            )
        if config.seq_aux_loss_coef > 0:
            # [B, S, D] input: one sequence per leading row; [T, D] input: one sequence.
            batch = lead_shape[0] if len(lead_shape) >= 2 else 1
            token_mask_BS = None if token_mask_T is None else token_mask_T.view(batch, -1)
            losses["seq_load_balance"] = config.seq_aux_loss_coef * sequence_load_balancing_loss(
                probs_TE.view(batch, -1, config.num_experts),
                expert_ids_TK.view(batch, -1, expert_ids_TK.shape[-1]),
                valid_TK.view(batch, -1, valid_TK.shape[-1]),
                token_mask_BS,
            )
        if config.z_loss_coef > 0:
            losses["z_loss"] = config.z_loss_coef * router_z_loss(logits_TE, token_mask_T)
        return losses

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"d_model={c.d_model}, num_experts={c.num_experts}, k={c.k}, gate={c.gate!r}"]
        if c.gate == "topk":
            parts.append(f"score_func={c.score_func!r}")
        else:
            parts.append(f"method={c.soft_method!r}, tau={c.tau}, tau_schedule={c.tau_schedule!r}")
        if c.renormalize:
            parts.append("renormalize=True")
        if c.num_groups > 1:
            parts.append(f"num_groups={c.num_groups}, topk_groups={c.topk_groups}")
        return ", ".join(parts)
