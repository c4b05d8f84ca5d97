"""Routers: hidden states in, a :class:`~moe_router.routing.Routing` record out.

Shape legend: T tokens, D model dim, E experts, K selected slots per token, G expert groups.

:class:`Router` is a thin module around the gate functions of :mod:`moe_router.gates`: it owns
the router weight and the per-step state (expert bias, temperature schedule, the budget
controller of ``sparse_soft_topk`` and the running per-expert thresholds of
``balanced_soft_topk``), computes fp32 logits, calls the gate and the auxiliary losses.

Per-step state advances in :meth:`Router.step`, which :func:`moe_router.stepping.step_routers`
(or the optimizer hook of :func:`moe_router.stepping.register_optimizer_hooks`) calls after
every optimizer step. Training forwards accumulate what the step needs (loads, mean support,
thresholds); a router with such state that runs many training forwards without ever being
stepped warns once.

Router math runs in fp32 whatever the dtype of the hidden states or of the router weight.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moe_router.balancing import (
    ExpertBias,
    load_balancing_loss,
    router_z_loss,
    sequence_load_balancing_loss,
)
from moe_router.config import GATES, SOFT_GATES, RouterConfig
from moe_router.gates import annealed_tau, balance_thresholds, run_gate, select_experts
from moe_router.routing import Routing

__all__ = ["GATES", "SOFT_GATES", "Router", "RouterConfig", "select_experts"]

# Training forwards without a step after which an unstepped stateful router warns.
UNSTEPPED_WARN_AFTER = 64


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over data-parallel ranks when torch.distributed is initialised (a copy)."""
    tensor = tensor.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class Router(nn.Module):
    """Linear router plus gate: ``[..., D]`` hidden states to a :class:`Routing` record.

    Build it from a config (``Router(RouterConfig(256, 8, 2, gate="soft_topk"))``) or, as a
    convenience, from the same arguments (``Router(256, 8, 2, gate="soft_topk", tau=0.5)``).

    Args:
        config: A :class:`RouterConfig`, or D (``d_model``) followed by ``num_experts``, ``k``
            and any other :class:`RouterConfig` field as keywords.

    Raises:
        ValueError: On an invalid setting (see :class:`RouterConfig`).

    Attributes:
        weight_ED: The router weight.
        expert_bias: DeepSeek-V3's selection bias (:class:`ExpertBias`) or None.
        schedule_step: Optimizer steps taken (drives the ``anneal`` schedule; checkpointed).
        budget: ``sparse_soft_topk`` with ``target_active``: the soft budget sum(p) the
            controller sets (checkpointed).
        balance_mu_E: ``balanced_soft_topk``: running per-expert thresholds used outside
            training (checkpointed).
    """

    def __init__(
        self,
        config: RouterConfig | int,
        num_experts: int | None = None,
        k: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(config, RouterConfig):
            config = RouterConfig(config, num_experts, k, **options)
        elif num_experts is not None or k is not None or options:
            raise ValueError(
                "Router(config) takes no further arguments: set them in the RouterConfig"
            )
        self.config = config
        num_experts = config.num_experts
        self.weight_ED = nn.Parameter(torch.empty(num_experts, config.d_model))
        if config.tau_schedule == "learned":
            self.log_tau = nn.Parameter(torch.tensor(math.log(config.tau)))
        # The schedule position is a buffer so that it travels in checkpoints.
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))
        self.expert_bias = (
            ExpertBias(num_experts, config.bias_update_rate) if config.expert_bias else None
        )
        if config.target_active is not None:
            self.register_buffer("budget", torch.tensor(float(config.k)))
            self.register_buffer("pending_support", torch.zeros(2), persistent=False)
        if config.gate == "balanced_soft_topk":
            self.register_buffer("balance_mu_E", torch.zeros(num_experts))
            # Warm start of the next training solve, and the step's sum of batch solutions.
            self.register_buffer("warm_mu_E", torch.zeros(num_experts), persistent=False)
            self.register_buffer("pending_mu_E1", torch.zeros(num_experts + 1), persistent=False)
            if config.balance_window is not None:
                # The last balance_window real training tokens' logits (a ring buffer; unused
                # rows are masked out), solved on in step() for the evaluation thresholds.
                window = config.balance_window
                self.register_buffer("window_logits_WE", torch.zeros(window, num_experts))
                self.register_buffer("window_mask_W", torch.zeros(window, dtype=torch.bool))
                self.register_buffer("window_pos", torch.zeros((), dtype=torch.long))
        # Loads of the training forwards since the last step (for the expert bias).
        self.register_buffer("pending_load_E", torch.zeros(num_experts), persistent=False)
        self._unstepped_forwards = 0
        self._warned_unstepped = False
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

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        # The controller and balance state stay fp32 under .to(bfloat16) / .half(): their
        # updates are small and every rank must hold the same values.
        super()._apply(fn, recurse)
        for name in (
            "budget",
            "pending_support",
            "balance_mu_E",
            "warm_mu_E",
            "pending_mu_E1",
            "window_logits_WE",
        ):
            buffer = getattr(self, name, None)
            if buffer is not None and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        if self.pending_load_E.dtype != torch.float32:
            self.pending_load_E = self.pending_load_E.float()
        return self

    # ------------------------------------------------------------------------ per-step state

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

    @property
    def soft_budget(self) -> float | Tensor:
        """The soft gates' sum of p: K, or the budget controller's value."""
        return self.budget if self.config.target_active is not None else float(self.config.k)

    @torch.no_grad()
    def step(self) -> None:
        """Advance every piece of per-step state after one optimizer step.

        - expert bias: ``b += u * sign(mean_load - load)`` from the loads of the training
          forwards since the last step, summed over data-parallel ranks;
        - temperature schedule: one step;
        - budget controller (``target_active``): ``log k += rate * (target - s) / target``
          with s the mean number of experts with p > 0 per real token since the last step,
          over all ranks; k stays in ``[1e-3, E_usable - 1e-3]``;
        - balanced thresholds: the running average takes the mean of the batch solutions
          since the last step, over all ranks.

        Every rank must call it after the same optimizer step (it all-reduces).
        """
        config = self.config
        self.update_expert_bias(self.pending_load_E)
        self.pending_load_E.zero_()
        self.step_schedule()
        if config.target_active is not None:
            support_sum, num_tokens = _all_reduce_sum(self.pending_support.double()).unbind()
            mean_support = support_sum / num_tokens.clamp_min(1.0)
            error = (config.target_active - mean_support) / config.target_active
            step = torch.where(num_tokens > 0, config.budget_update_rate * error, 0.0)
            usable = config.topk_groups * (config.num_experts // config.num_groups)
            new_budget = (self.budget.double().log() + step).exp()
            self.budget.copy_(new_budget.clamp(1e-3, usable - 1e-3).float())
            self.pending_support.zero_()
        if config.gate == "balanced_soft_topk" and config.balance_window is None:
            totals_E1 = _all_reduce_sum(self.pending_mu_E1)
            mean_mu_E = totals_E1[:-1] / totals_E1[-1].clamp_min(1.0)
            momentum = torch.where(totals_E1[-1] > 0, config.balance_momentum, 1.0)
            self.balance_mu_E.mul_(momentum).add_((1 - momentum) * mean_mu_E)
            self.pending_mu_E1.zero_()
        elif config.gate == "balanced_soft_topk":
            self._solve_window()
        self._unstepped_forwards = 0

    @torch.no_grad()
    def _solve_window(self) -> None:
        """The evaluation thresholds from one solve over the window of recent training
        logits (warm-started from the current ones), averaged over data-parallel ranks; kept
        as they are while the window holds no token."""
        mu_E = balance_thresholds(
            self.window_logits_WE,
            self.config,
            self.tau,
            self.balance_mu_E,
            self.window_mask_W,
            k=self.soft_budget,
        )
        filled = self.window_mask_W.any().float()
        totals_E1 = _all_reduce_sum(torch.cat([mu_E * filled, filled.reshape(1)]))
        mean_mu_E = totals_E1[:-1] / totals_E1[-1].clamp_min(1.0)
        self.balance_mu_E.copy_(torch.where(totals_E1[-1] > 0, mean_mu_E, self.balance_mu_E))

    @torch.no_grad()
    def _remember(self, gate_logits_TE: Tensor, token_mask_T: Tensor | None) -> None:
        """Writes this batch's logits into the window (the last ``balance_window`` tokens of
        it when the batch is larger), padding marked unused."""
        window = self.window_logits_WE.shape[0]
        keep = min(window, gate_logits_TE.shape[0])  # static: shapes only
        logits_TE = gate_logits_TE[-keep:].float()
        mask_T = torch.ones(keep, dtype=torch.bool, device=logits_TE.device)
        if token_mask_T is not None:
            mask_T = token_mask_T[-keep:]
        index_T = (self.window_pos + torch.arange(keep, device=logits_TE.device)) % window
        self.window_logits_WE.index_copy_(0, index_T, logits_TE)
        self.window_mask_W.index_copy_(0, index_T, mask_T)
        self.window_pos.copy_((self.window_pos + keep) % window)

    def step_schedule(self) -> None:
        """Advance the temperature schedule by one optimizer step (no-op unless ``anneal``).

        Prefer :meth:`step`, which advances every piece of per-step state.
        """
        if self.config.tau_schedule == "anneal":
            self.schedule_step += 1

    def update_expert_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Update the auxiliary-loss-free bias from explicit loads (no-op without a bias).

        Loads are summed over data-parallel ranks when torch.distributed is initialised, then
        ``b += u * sign(mean_load - load)`` and b is recentred to zero mean. Prefer
        :meth:`step`, which uses the loads the router accumulated itself.

        Args:
            tokens_per_expert_E: Assignments per expert on this rank since the last update.
        """
        if self.expert_bias is not None:
            self.expert_bias.update(tokens_per_expert_E)

    def _note_training_forward(self) -> None:
        if self._warned_unstepped or torch.compiler.is_compiling():
            return
        self._unstepped_forwards += 1
        if self._unstepped_forwards >= UNSTEPPED_WARN_AFTER and self.config.needs_stepping:
            self._warned_unstepped = True
            warnings.warn(
                f"Router (gate={self.config.gate!r}) ran {self._unstepped_forwards} training "
                "forwards without a step: its expert bias / temperature schedule / budget "
                "controller / balance thresholds do not advance. Call "
                "moe_router.step_routers(model) after each optimizer step, or once "
                "moe_router.register_optimizer_hooks(optimizer, model).",
                stacklevel=4,
            )

    # ------------------------------------------------------------------------------- forward

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

    def _balance_mu(self, gate_logits_TE: Tensor, token_mask_T: Tensor | None) -> Tensor:
        """``balanced_soft_topk``: this batch's thresholds in training, the running ones
        otherwise (so a token's routing never depends on other tokens at evaluation)."""
        if not self.training:
            return self.balance_mu_E
        mu_E = balance_thresholds(
            gate_logits_TE.detach(),
            self.config,
            self.tau,
            self.warm_mu_E,
            token_mask_T,
            k=self.soft_budget,
        )
        if torch.is_grad_enabled():
            self.warm_mu_E.copy_(mu_E)
            # step() averages the batch solutions, or solves once over the window instead
            if self.config.balance_window is None:
                self.pending_mu_E1[:-1] += mu_E
                self.pending_mu_E1[-1] += 1
            else:
                self._remember(gate_logits_TE.detach(), token_mask_T)
        return mu_E

    def _route(self, hidden_states: Tensor, padding_mask: Tensor | None = None) -> Routing:
        """Route a batch of tokens.

        Args:
            hidden_states: ``[..., D]`` in any float dtype; the leading dims are flattened to T
                (``[B, S, D]`` also defines the sequences of the per-sequence balance loss).
            padding_mask: Bool ``[...]`` (the leading dims of ``hidden_states``), True where a
                token is padding. Padding tokens get no assignment (``valid_TK`` False, weight
                0), count in no load and contribute to no auxiliary loss; whatever their
                hidden states hold (NaN included), they reach no output, loss or gradient.

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
        if padding_mask is not None:
            if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
                got = getattr(padding_mask, "dtype", type(padding_mask).__name__)
                raise ValueError(f"padding_mask must be a bool tensor, got {got}")
            if padding_mask.shape != lead_shape:
                raise ValueError(
                    f"padding_mask must have shape {tuple(lead_shape)}, "
                    f"got {tuple(padding_mask.shape)}"
                )
        x_TD = hidden_states.reshape(-1, config.d_model).float()  # (T, D)
        padding_mask_T = token_mask_T = None
        if padding_mask is not None:
            padding_mask_T = padding_mask.reshape(-1)
            token_mask_T = ~padding_mask_T
            # Selection, not multiplication: a NaN in a padding row must not reach anything.
            x_TD = torch.where(padding_mask_T.unsqueeze(-1), 0.0, x_TD)
        weight_ED = self.weight_ED.float()
        logits_TE = F.linear(x_TD, weight_ED)
        gate_logits_TE = logits_TE
        if self.training and config.jitter_eps > 0:
            # The gate sees the jittered input; the record (and the z-loss) keeps clean logits.
            noise_TD = torch.empty_like(x_TD).uniform_(
                1.0 - config.jitter_eps, 1.0 + config.jitter_eps
            )
            gate_logits_TE = F.linear(x_TD * noise_TD, weight_ED)
        gate_logits_TE = self.group_mask(gate_logits_TE)
        mu_E = None
        if config.gate == "balanced_soft_topk":
            mu_E = self._balance_mu(gate_logits_TE, token_mask_T)
        bias_E = None if self.expert_bias is None else self.expert_bias.bias_E
        selection = run_gate(
            gate_logits_TE, config, self.tau, bias_E, k=self.soft_budget, mu_E=mu_E
        )
        expert_ids_TK, weights_TK, scores_TE, valid_TK = selection[:4]
        overflow_T, overflow_mass_T = selection.overflow_T, selection.overflow_mass_T
        if padding_mask_T is not None:
            valid_TK = valid_TK & token_mask_T.unsqueeze(-1)
            weights_TK = torch.where(valid_TK, weights_TK, 0.0)
            if overflow_T is not None:
                overflow_T = torch.where(padding_mask_T, 0.0, overflow_T)
                overflow_mass_T = torch.where(padding_mask_T, 0.0, overflow_mass_T)
        aux_losses = self._aux_losses(
            lead_shape, logits_TE, scores_TE, expert_ids_TK, valid_TK, token_mask_T
        )
        routing = Routing(
            expert_ids_TK=expert_ids_TK,
            weights_TK=weights_TK,
            scores_TE=scores_TE,
            logits_TE=logits_TE,
            aux_losses=aux_losses,
            valid_TK=valid_TK,  # the record counts tokens_per_expert_E from the valid slots
            padding_mask_T=padding_mask_T,
            overflow_T=overflow_T,
            overflow_mass_T=overflow_mass_T,
        )
        if self.training and torch.is_grad_enabled():
            self._accumulate(routing, token_mask_T)
        return routing

    @torch.no_grad()
    def _accumulate(self, routing: Routing, token_mask_T: Tensor | None) -> None:
        """What :meth:`step` needs from a training forward (in-place buffer updates only)."""
        self.pending_load_E += routing.tokens_per_expert_E
        if self.config.target_active is not None:
            # The experts the gate dispatched plus those it could not (overflow): with an
            # expert bias this is the biased support, the compute the budget is about.
            support_T = routing.valid_TK.sum(-1).float() + routing.overflow_T
            if token_mask_T is None:
                support_sum, num_tokens = support_T.sum(), float(support_T.numel())
            else:
                support_sum = torch.where(token_mask_T, support_T, 0.0).sum()
                num_tokens = token_mask_T.sum()
            self.pending_support[0] += support_sum
            self.pending_support[1] += num_tokens
        self._note_training_forward()

    def _aux_losses(
        self,
        lead_shape: torch.Size,
        logits_TE: Tensor,
        scores_TE: Tensor,
        expert_ids_TK: Tensor,
        valid_TK: Tensor,
        token_mask_T: Tensor | None,
    ) -> dict[str, Tensor]:
        config = self.config
        losses: dict[str, Tensor] = {}
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
        return losses

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"d_model={c.d_model}, num_experts={c.num_experts}, k={c.k}, gate={c.gate!r}"]
        if c.gate == "topk":
            parts.append(f"score_func={c.score_func!r}")
        else:
            parts.append(f"method={c.soft_method!r}, tau={c.tau}, tau_schedule={c.tau_schedule!r}")
        if c.support_exact:
            parts.append(f"max_active={c.max_active}")
        if c.target_active is not None:
            parts.append(f"target_active={c.target_active}")
        if c.renormalize:
            parts.append("renormalize=True")
        if c.num_groups > 1:
            parts.append(f"num_groups={c.num_groups}, topk_groups={c.topk_groups}")
        return ", ".join(parts)
