"""The gates: fp32 router logits in, a routing decision out.

Shape legend: T tokens, E experts, K selected slots per token (``config.slots``).

Every gate is one function in :data:`GATE_FUNCTIONS`, called as
``gate(logits_TE, config, k=..., tau=..., bias_E=..., mu_E=...)`` and returning a
:class:`Selection`; :func:`run_gate` looks the gate up in the table (:func:`select_experts` is
the same with the four-tuple result). A new gate is a new
function and a new entry (plus its name in :data:`moe_router.config.Gate`).

============================  ==========================================================
gate                          what it does
============================  ==========================================================
``topk``                      hard baseline: softmax / sigmoid scores, top-K, optional
                              renormalisation. Unselected logits get no gradient from the
                              combine weights (softmax without renormalisation leaks one
                              through its normaliser only).
``soft_topk``                 p = soft_topk(logits, K, tau); compute on the K largest p,
                              combine weights = p there; gradient reaches all E logits
                              through the threshold, but the experts outside the K largest
                              get no output, so dL/dp is unknown there.
``soft_topk_dense``           every expert weighted by p (K slots = E; small-E reference).
``sparse_soft_topk``          method ``sparse`` (capped-simplex projection, exact zeros):
                              support-exact, i.e. computes every expert with p > 0, up to
                              ``max_active`` static slots (the rest is counted overflow).
                              Its budget sum(p) is K, or a controller's ``k`` that holds the
                              mean support at ``target_active`` (see ``Router``).
``balanced_soft_topk``        two-sided: p = f((x - lambda_t - mu_e) / tau) with sum_e p = K
                              per token and sum_t p = T K / E per expert, found by
                              alternating row and column solves (:func:`balance_thresholds`);
                              compute on the K largest p, or on the support (``sparse``).
``straight_through``          forward weights are the hard 0/1 top-K mask (1/K each when
                              renormalised), backward is the soft top-k Jacobian.
``relu``                      ReMoE: weights ReLU(logits); an expert is computed where its
                              weight is > 0 (up to ``max_active`` slots, the rest counted
                              as overflow). Its sparsity is held near 1 - K/E by an L1
                              penalty whose coefficient a controller adapts after each
                              step (:class:`~moe_router.state.ReLUSparsity`).
============================  ==========================================================

Why the support-exact gate is trainable and why its support is at least ceil(k): p_i =
clip((z_i - lambda) / tau, 0, 1) with sum p = k and p <= 1 needs at least ceil(k) non-zero
entries. Its Jacobian lives on the "free" entries v = 1[0 < p < 1]: an expert with p in (0, 1)
is computed (it is in the support), so dL/dp_i is known for every expert whose logit gets a
gradient. The gradient vanishes only when every p is 0 or 1 (support = k exactly, an integer
k); a controller that keeps the budget below the target support keeps fractional entries, so
the gradient stays alive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_router.config import RouterConfig
from moe_router.ops import soft_topk, threshold_cpp
from moe_router.ops.soft_topk import cpp_kernels_serve
from moe_router.ops.threshold_torch import apply_f, f_prime_from_p

__all__ = [
    "GATE_FUNCTIONS",
    "Selection",
    "annealed_tau",
    "balance_thresholds",
    "group_limit",
    "hashed_uniform",
    "input_jitter",
    "router_logits",
    "run_gate",
    "top2_group_limit",
    "select_experts",
]


class Selection(NamedTuple):
    """One gate's decision for a batch of tokens.

    Attributes:
        expert_ids_TK: Selected expert per token and slot.
        weights_TK: Combine weight per slot (0 on invalid slots).
        scores_TE: Full scores (softmax / sigmoid for ``topk``, the soft top-k p otherwise).
        valid_TK: Which slots carry compute.
        overflow_T: Support-exact gates: experts with p > 0 that did not fit in the slots;
            None for the others.
        overflow_mass_T: The p mass on those experts; None with ``overflow_T``.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    scores_TE: Tensor
    valid_TK: Tensor
    overflow_T: Tensor | None = None
    overflow_mass_T: Tensor | None = None

    def without_padding(self, padding_mask_T: Tensor) -> Selection:
        """This selection with no slot, weight or overflow on the padding tokens (True)."""
        valid_TK = self.valid_TK & ~padding_mask_T.unsqueeze(-1)
        overflow = [self.overflow_T, self.overflow_mass_T]
        if self.overflow_T is not None:
            overflow = [torch.where(padding_mask_T, 0.0, count_T) for count_T in overflow]
        weights_TK = torch.where(valid_TK, self.weights_TK, 0.0)
        return Selection(self.expert_ids_TK, weights_TK, self.scores_TE, valid_TK, *overflow)


def annealed_tau(config: RouterConfig, step: Tensor) -> Tensor:
    """Temperature of the ``anneal`` schedule after ``step`` optimizer steps (fp32 scalar)."""
    progress = (step.float() / config.anneal_steps).clamp(0.0, 1.0)
    start, end = config.tau, config.tau_final
    if config.anneal_shape == "exponential":
        return start * (end / start) ** progress
    if config.anneal_shape == "linear":
        return start + (end - start) * progress
    return end + 0.5 * (start - end) * (1 + torch.cos(math.pi * progress))


# ------------------------------------------------------------------------------ shared helpers


def group_limit(logits_TE: Tensor, config: RouterConfig) -> Tensor:
    """Set the logits of every expert outside the token's ``topk_groups`` best groups to
    ``-inf`` (group score = the largest logit of the group); no-op without a group limit."""
    if config.topk_groups == config.num_groups:
        return logits_TE
    logits_TGX = logits_TE.unflatten(-1, (config.num_groups, -1))  # X = E // G
    group_scores_TG = logits_TGX.detach().amax(-1)
    keep_groups_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_groups_TG.scatter_(-1, group_scores_TG.topk(config.topk_groups, -1).indices, True)
    masked_TGX = logits_TGX.masked_fill(~keep_groups_TG.unsqueeze(-1), float("-inf"))
    return masked_TGX.flatten(-2)  # (T, E)


def _signed(constant: int) -> int:
    return constant - (1 << 64) if constant >= 1 << 63 else constant


_MIX = [_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def hashed_uniform(shape: tuple[int, ...], counter: Tensor) -> Tensor:
    """Uniform [0, 1) fp32 noise from a splitmix64 hash of (``counter``, position).

    Stateless: the same counter gives the same noise, so a checkpointed counter resumes the
    same draws (torch's global generator is not in a checkpoint), in pure tensor ops on the
    counter's device (no host sync; traceable by ``torch.compile``).

    Args:
        shape: The noise's shape.
        counter: An int64 scalar tensor (e.g. the router's training-forward count).
    """

    def logical_shift(z: Tensor, bits: int) -> Tensor:  # >> on int64 is arithmetic
        return (z >> bits) & ((1 << (64 - bits)) - 1)

    num = math.prod(shape)
    z = torch.arange(num, device=counter.device, dtype=torch.int64) + counter * num + _MIX[0]
    z = (z ^ logical_shift(z, 30)) * _MIX[1]
    z = (z ^ logical_shift(z, 27)) * _MIX[2]
    z = z ^ logical_shift(z, 31)
    return (logical_shift(z, 40).float() / (1 << 24)).view(shape)


def input_jitter(x_TD: Tensor, eps: float, counter: Tensor) -> Tensor:
    """Switch's multiplicative input jitter: ``x * u`` with ``u ~ U[1 - eps, 1 + eps]`` drawn
    by :func:`hashed_uniform` from ``counter`` (the same counter, the same noise)."""
    uniform_TD = hashed_uniform(tuple(x_TD.shape), counter).to(x_TD.device)
    return x_TD * (1.0 + eps * (2.0 * uniform_TD - 1.0))


def router_logits(
    x_TD: Tensor, weight_ED: Tensor, jitter_eps: float = 0.0, jitter_counter: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """fp32 router logits, clean and as the gate sees them.

    The gate's logits come from the :func:`input_jitter`-ed input when ``jitter_eps > 0``
    (drawn from ``jitter_counter``); the clean ones are for the record and the z-loss. A token
    with a NaN or inf in its hidden state gets NaN logits in both: its own routing is NaN
    (visible, as every gate gives it), and it can neither fail the batch's solve (a row of
    ``-inf`` has no top-K) nor reach another token.

    Returns:
        ``(logits_TE, gate_logits_TE)``; the same tensor twice without jitter.
    """
    weight_ED = weight_ED.float()
    logits_TE = F.linear(x_TD, weight_ED)
    finite_T1 = logits_TE.isfinite().all(-1, keepdim=True)
    logits_TE = torch.where(finite_T1, logits_TE, math.nan)
    if jitter_eps == 0:
        return logits_TE, logits_TE
    gate_logits_TE = F.linear(input_jitter(x_TD, jitter_eps, jitter_counter), weight_ED)
    return logits_TE, torch.where(finite_T1, gate_logits_TE, math.nan)


def top2_group_limit(logits_TE: Tensor, scores_TE: Tensor, config: RouterConfig) -> Tensor:
    """DeepSeek-V3's node-limited routing: ``-inf`` on the logits of every expert outside the
    token's ``topk_groups`` best groups, a group scored by the sum of its two largest
    selection scores (``scores_TE``: e.g. the biased sigmoid scores; no gradient)."""
    scores_TGX = scores_TE.detach().unflatten(-1, (config.num_groups, -1))  # X = E // G
    group_scores_TG = scores_TGX.topk(2, dim=-1).values.sum(-1)
    keep_groups_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_groups_TG.scatter_(-1, group_scores_TG.topk(config.topk_groups, -1).indices, True)
    logits_TGX = logits_TE.unflatten(-1, (config.num_groups, -1))
    masked_TGX = logits_TGX.masked_fill(~keep_groups_TG.unsqueeze(-1), float("-inf"))
    return masked_TGX.flatten(-2)  # (T, E)


def _guard_masked(selection_TE: Tensor, logits_TE: Tensor, config: RouterConfig) -> Tensor:
    """Keeps experts outside the token's groups (-inf logits) unselectable, whatever a bias
    added to their selection scores."""
    if config.topk_groups < config.num_groups:
        return selection_TE.masked_fill(logits_TE == float("-inf"), float("-inf"))
    return selection_TE


def _renormalize(weights_TK: Tensor) -> Tensor:
    """Divides each token's weights by their sum. Plain differentiable ops, so autograd
    carries the off-diagonal ``-w w^T / s^2`` term."""
    return weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)


def _finish(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    scores_TE: Tensor,
    valid_TK: Tensor,
    config: RouterConfig,
    overflow_T: Tensor | None = None,
    overflow_mass_T: Tensor | None = None,
) -> Selection:
    if config.renormalize:
        weights_TK = _renormalize(weights_TK)
    return Selection(
        expert_ids_TK,
        weights_TK * config.score_scale,
        scores_TE,
        valid_TK,
        overflow_T,
        overflow_mass_T,
    )


def _largest_p(
    logits_TE: Tensor, p_TE: Tensor, config: RouterConfig, bias_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute on the K largest p (+ the selection-only bias): ids, weights p, all valid."""
    selection_TE = p_TE.detach() if bias_E is None else p_TE.detach() + bias_E
    expert_ids_TK = _guard_masked(selection_TE, logits_TE, config).topk(config.k, dim=-1).indices
    weights_TK = p_TE.gather(-1, expert_ids_TK)
    return expert_ids_TK, weights_TK, torch.ones_like(expert_ids_TK, dtype=torch.bool)


def _support(
    p_TE: Tensor, selection_TE: Tensor, config: RouterConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Support-exact dispatch: the experts with ``selection > 0``, at most ``max_active`` of
    them (largest first) in static slots.

    Returns:
        ``(expert_ids_TK, weights_TK, valid_TK, overflow_T, overflow_mass_T)``: the overflow
        counts the experts in the support beyond the cap and their p mass.
    """
    top = selection_TE.topk(config.max_active, dim=-1)
    # A NaN row (a NaN token) fills its slots with NaN weights, as the fixed-K gates give it a
    # NaN output; it must not pass for a token without experts.
    expert_ids_TK, valid_TK = top.indices, (top.values > 0) | top.values.isnan()
    weights_TK = torch.where(valid_TK, p_TE.gather(-1, expert_ids_TK), 0.0)
    with torch.no_grad():
        in_support_TE = (selection_TE > 0) | selection_TE.isnan()
        overflow_T = in_support_TE.sum(-1).float() - valid_TK.sum(-1).float()
        support_mass_T = torch.where(in_support_TE, p_TE, 0.0).sum(-1)
        overflow_mass_T = (support_mass_T - weights_TK.sum(-1)).clamp_min(0.0)
    return expert_ids_TK, weights_TK, valid_TK, overflow_T, overflow_mass_T


# -------------------------------------------------------------------------------------- gates


def _topk_gate(logits_TE, config, *, k, tau, bias_E, mu_E) -> Selection:
    if config.score_func == "softmax":
        scores_TE = logits_TE.softmax(-1)
    else:
        scores_TE = logits_TE.sigmoid()
    selection_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E
    expert_ids_TK = _guard_masked(selection_TE, logits_TE, config).topk(config.k, dim=-1).indices
    valid_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
    if config.renormalize and config.score_func == "softmax":
        # Same value as renormalising the gathered softmax, but (Mixtral style) leaves the
        # unselected logits out of the graph instead of giving them a rounding-error grad.
        weights_TK = logits_TE.gather(-1, expert_ids_TK).softmax(-1)
    else:
        weights_TK = scores_TE.gather(-1, expert_ids_TK)
    return _finish(expert_ids_TK, weights_TK, scores_TE, valid_TK, config)


def _soft_topk_gate(logits_TE, config, *, k, tau, bias_E, mu_E) -> Selection:
    p_TE = soft_topk(logits_TE, k, tau=tau, method=config.soft_method)
    expert_ids_TK, weights_TK, valid_TK = _largest_p(logits_TE, p_TE, config, bias_E)
    return _finish(expert_ids_TK, weights_TK, p_TE, valid_TK, config)


def _straight_through_gate(logits_TE, config, *, k, tau, bias_E, mu_E) -> Selection:
    p_TE = soft_topk(logits_TE, k, tau=tau, method=config.soft_method)
    expert_ids_TK, weights_TK, valid_TK = _largest_p(logits_TE, p_TE, config, bias_E)
    # Value 1 per selected expert, gradient of the soft p (p_hard + p - sg(p)).
    weights_TK = (weights_TK - weights_TK.detach()) + 1.0
    return _finish(expert_ids_TK, weights_TK, p_TE, valid_TK, config)


def _soft_topk_dense_gate(logits_TE, config, *, k, tau, bias_E, mu_E) -> Selection:
    p_TE = soft_topk(logits_TE, k, tau=tau, method=config.soft_method)
    expert_ids_TK = torch.arange(config.num_experts, device=logits_TE.device)
    expert_ids_TK = expert_ids_TK.expand(logits_TE.shape[0], -1)
    # Experts outside the token's groups (-inf) get no compute; a NaN token keeps its (NaN)
    # slots, so it is visible rather than an empty routing.
    valid_TK = logits_TE != float("-inf")
    return _finish(expert_ids_TK, p_TE, p_TE, valid_TK, config)


def _sparse_soft_topk_gate(logits_TE, config, *, k, tau, bias_E, mu_E) -> Selection:
    # The expert bias shifts each expert's threshold inside the solve, as the balanced gate's
    # mu does: p = clip((x + b - lambda) / tau, 0, 1). Support and weights then come from the
    # same p, so every computed expert carries weight and every expert with p > 0 is computed
    # (a selection-only bias would compute experts whose unbiased p is 0 and silently drop
    # others with p > 0). The gradient goes to the logits; the bias is a constant.
    shifted_TE = logits_TE if bias_E is None else logits_TE + bias_E.detach()
    p_TE = soft_topk(_guard_masked(shifted_TE, logits_TE, config), k, tau=tau, method="sparse")
    expert_ids_TK, weights_TK, valid_TK, overflow_T, overflow_mass_T = _support(
        p_TE, p_TE.detach(), config
    )
    return _finish(expert_ids_TK, weights_TK, p_TE, valid_TK, config, overflow_T, overflow_mass_T)


def _balanced_soft_topk_gate(logits_TE, config, *, k, tau, bias_E, mu_E) -> Selection:
    if mu_E is None:
        mu_E = balance_thresholds(logits_TE.detach(), config, tau, k=k)
    # The gradient goes through the row solve with the per-expert thresholds held fixed.
    shifted_TE = logits_TE - mu_E.detach()
    p_TE = soft_topk(shifted_TE, k, tau=tau, method=config.method)
    if config.method != "sparse":
        expert_ids_TK, weights_TK, valid_TK = _largest_p(shifted_TE, p_TE, config, bias_E)
        return _finish(expert_ids_TK, weights_TK, p_TE, valid_TK, config)
    expert_ids_TK, weights_TK, valid_TK, overflow_T, overflow_mass_T = _support(
        p_TE, p_TE.detach(), config
    )
    return _finish(expert_ids_TK, weights_TK, p_TE, valid_TK, config, overflow_T, overflow_mass_T)


def _relu_gate(logits_TE, config, *, k, tau, bias_E, mu_E) -> Selection:
    # relu(-inf) = 0: experts outside a token's groups are never computed.
    gates_TE = logits_TE.relu()
    expert_ids_TK, weights_TK, valid_TK, overflow_T, overflow_mass_T = _support(
        gates_TE, gates_TE.detach(), config
    )
    return _finish(
        expert_ids_TK, weights_TK, gates_TE, valid_TK, config, overflow_T, overflow_mass_T
    )


GateFunction = Callable[..., Selection]

GATE_FUNCTIONS: dict[str, GateFunction] = {
    "topk": _topk_gate,
    "soft_topk": _soft_topk_gate,
    "soft_topk_dense": _soft_topk_dense_gate,
    "sparse_soft_topk": _sparse_soft_topk_gate,
    "balanced_soft_topk": _balanced_soft_topk_gate,
    "straight_through": _straight_through_gate,
    "relu": _relu_gate,
}


# --------------------------------------------------------------------- two-sided thresholds


def _newton_threshold(
    z_RN: Tensor, target_R: Tensor, lam_R: Tensor, method: str, steps: int
) -> Tensor:
    """A few safeguarded Newton steps on ``sum_n f(z_n - lam) = target`` per row.

    ``-inf`` entries give p = 0. A flat row (no entry on the slope of f, possible for the
    piecewise methods) moves by at most one unit of z toward the solution instead of dividing
    by zero; once an entry is on the slope the piecewise-linear ``sparse`` is exact.
    """
    for _ in range(steps):
        u_RN = z_RN - lam_R.unsqueeze(-1)
        p_RN = apply_f(u_RN, method)
        slope_R = f_prime_from_p(p_RN, method).sum(-1)
        excess_R = p_RN.sum(-1) - target_R
        step_R = excess_R / slope_R.clamp_min(1e-6)
        lam_R = lam_R + step_R.clamp(-1.0, 1.0)
    return lam_R


@torch.no_grad()
def balance_thresholds(
    logits_TE: Tensor,
    config: RouterConfig,
    tau: float | Tensor,
    mu_E: Tensor | None = None,
    token_mask_T: Tensor | None = None,
    num_iters: int | None = None,
    k: float | Tensor | None = None,
) -> Tensor:
    """Per-expert thresholds mu that balance the soft top-k over the batch.

    Finds mu (logit units) such that ``p = f((x - lambda_t - mu_e) / tau)`` has row sums K
    (lambda_t: the per-token threshold) and, over the real tokens, balanced columns, by
    alternating the two threshold problems, rows (tokens) then columns (experts), a fixed
    number of alternations, no host sync, no gradient:

    - ``balance_target="mass"``: column sums ``T_real K / E``, two safeguarded Newton steps on
      each side per alternation;
    - ``balance_target="load"``: ``T_real K / E`` dispatched assignments per expert (support
      sizes shared equally for support-exact gates, whose rows take two Newton steps per
      alternation), each expert moved to its quantile of dispatch margins
      (:func:`_balance_load`). Solving those rows exactly instead trained worse on the
      quickstart sparse run (docs/results.md, the balanced gate).

    Without a warm start the columns start from the hard quantile (the ``T_real K / E``-th
    largest of each column), which is the exact answer as tau -> 0.

    The gate then solves the rows exactly with the operator (``soft_topk(x - mu, K)``), so row
    sums are exact and the column sums are as good as mu.

    Args:
        logits_TE: fp32 router logits; ``-inf`` marks experts a token may not use.
        config: The gate settings (``k``, ``method``, ``balance_iters``).
        tau: Temperature (float or scalar tensor).
        mu_E: Warm start (logit units); the hard quantiles when None.
        token_mask_T: True for real tokens; padding tokens take no part in the column sums.
        num_iters: Alternations; ``config.balance_iters`` when None.
        k: Row budget (a number or a scalar tensor, e.g. a budget controller's);
            ``config.k`` when None.

    Returns:
        ``mu_E`` in logit units, fp32, with zero mean (only differences matter).
    """
    num_tokens, num_experts = logits_TE.shape
    if num_tokens == 0:  # nothing to balance: the warm start, or zeros
        return logits_TE.new_zeros(num_experts) if mu_E is None else mu_E.float().clone()
    # A token with a NaN or +inf logit takes no part in the column solve, so it reaches its own
    # output only (-inf marks an expert the token may not use and is fine).
    finite_T = ~(logits_TE.isnan() | (logits_TE == math.inf)).any(-1)
    token_mask_T = finite_T if token_mask_T is None else token_mask_T & finite_T
    method = config.method
    budget = float(config.k) if k is None else k
    k = config.k  # the integer K of the hard initial guesses
    iters = config.balance_iters if num_iters is None else num_iters
    tau_t = torch.as_tensor(tau, dtype=torch.float32, device=logits_TE.device)
    z_TE = logits_TE.float() / tau_t
    if token_mask_T is not None:
        z_TE = z_TE.masked_fill(~token_mask_T.unsqueeze(-1), -math.inf)
        num_real = token_mask_T.float().sum()
    else:
        num_real = torch.tensor(float(num_tokens), device=z_TE.device)
    budget_t = torch.as_tensor(budget, dtype=torch.float32, device=z_TE.device)
    col_target_E = (num_real * budget_t / num_experts).expand(num_experts)
    row_target_T = budget_t.expand(num_tokens)
    if token_mask_T is not None:
        row_target_T = torch.where(token_mask_T, row_target_T, 0.0)
    # A static bound on the per-expert load targets (T K / E) where the budget is K itself; a
    # support-exact gate's support has no such bound.
    max_target = None
    if not config.support_exact and not torch.is_tensor(budget):
        max_target = num_tokens * float(budget) / num_experts
    if mu_E is None:
        # Hard quantile: the (T_real K / E)-th largest z of each column (padding is -inf).
        rank_E = col_target_E.ceil().long() - 1
        count = None if max_target is None else math.ceil(max_target) + 2
        mu_z_E, _ = _column_ranks(z_TE, rank_E, count)
        mu_z_E = torch.where(torch.isfinite(mu_z_E), mu_z_E, 0.0)
    else:
        mu_z_E = mu_E.float() / tau_t
    # Rows start from the hard K-th / (K+1)-th midpoint of z - mu.
    lam_T = None  # the rows' thresholds, where the alternations use them
    if config.balance_target == "mass" or config.support_exact:
        top_TK1 = _top_values(z_TE - mu_z_E, min(k + 1, num_experts))
        lam_T = top_TK1[:, k - 1 : k + 1].mean(-1) if k < num_experts else top_TK1[:, -1] - 1.0
        lam_T = torch.where(torch.isfinite(lam_T), lam_T, 0.0)
    if config.balance_target == "load":
        mu_z_E = _balance_load(
            z_TE, mu_z_E, lam_T, row_target_T, col_target_E, config, iters, token_mask_T, max_target
        )
    else:
        z_ET = z_TE.t().contiguous()
        for _ in range(iters):
            lam_T = _newton_threshold(z_TE - mu_z_E, row_target_T, lam_T, method, steps=2)
            mu_z_E = _newton_threshold(z_ET - lam_T, col_target_E, mu_z_E, method, steps=2)
    mu_z_E = mu_z_E - mu_z_E.mean()
    return mu_z_E * tau_t


def _balance_load(
    z_TE: Tensor,
    mu_z_E: Tensor,
    lam_T: Tensor | None,
    row_target_T: Tensor,
    col_target_E: Tensor,
    config: RouterConfig,
    iters: int,
    token_mask_T: Tensor | None,
    max_target: float | None,
) -> Tensor:
    """The ``load`` target's alternations: each moves every expert's threshold to where its
    own dispatched count would be on target with the others held (a quantile of its margins).

    Moved all at once, those shifts overshoot: a token pushed out of one expert lands in
    another that moved too, and on real router logits the plain iteration can cycle (MaxVio
    0.3-0.6 after 8 alternations on some training batches of the quickstart model). So the
    step is damped adaptively, halved whenever an alternation did not lower the batch's MaxVio
    and grown back toward 1 when it did, and the thresholds with the lowest MaxVio seen are
    returned (the warm start included). All of it in tensors: no host sync. On CPU each
    alternation's margins, loads and quantiles are one C++ call (``margin_quantiles``).
    """
    cpp = _use_cpp_selection(z_TE)
    # The support's total is set by the row budgets (and the budget controller), not by T K:
    # support-exact gates share the current total equally (rank None in the C++ call).
    rank_E = None if config.support_exact else col_target_E.ceil().long() - 1
    # The PyTorch path selects only the count largest margins per expert where the target has
    # a static bound (+ 2: the next largest after the target-th, and one for fp32 rounding).
    count = None if max_target is None else math.ceil(max_target) + 2
    best_mu_z_E = mu_z_E
    best_vio = prev_vio = torch.full((), math.inf, device=z_TE.device)
    scale = torch.ones((), device=z_TE.device)
    for it in range(iters + 1):  # the last pass only scores the last thresholds
        if config.support_exact:
            lam_T = _newton_threshold(z_TE - mu_z_E, row_target_T, lam_T, config.method, 2)
        if cpp:
            stats_E3 = threshold_cpp.margin_quantiles(z_TE, mu_z_E, lam_T, config.k, rank_E)
            inside_E, outside_E, load_E = stats_E3.unbind(-1)
        else:
            margin_TE = _dispatch_margin(z_TE - mu_z_E, lam_T, config, token_mask_T)
            load_E = (margin_TE > 0).sum(0).float()
            target_rank_E = rank_E
            if rank_E is None:
                target_rank_E = load_E.mean().ceil().long().expand_as(load_E) - 1
            inside_E, outside_E = _column_ranks(margin_TE, target_rank_E, count)
        mean_load = load_E.mean()
        vio = (load_E.max() - mean_load) / mean_load.clamp_min(1.0)
        improved = vio < best_vio
        best_mu_z_E = torch.where(improved, mu_z_E, best_mu_z_E)
        best_vio = torch.minimum(vio, best_vio)
        if it == iters:
            break
        scale = torch.where(vio < prev_vio, (1.5 * scale).clamp_max(1.0), 0.5 * scale)
        prev_vio = vio
        mu_z_E = mu_z_E + scale * _quantile_shift(inside_E, outside_E)
    return best_mu_z_E


def _dispatch_margin(
    s_TE: Tensor, lam_T: Tensor, config: RouterConfig, token_mask_T: Tensor | None
) -> Tensor:
    """How far each (token, expert) pair is inside the gate's dispatch: > 0 iff dispatched.

    Support-exact gates dispatch ``p > 0``, i.e. ``s - lambda > 0``; the others dispatch the K
    largest ``s`` of the token, so the margin is ``s`` minus the best score it competes with
    (the (K+1)-th largest for a selected expert, the K-th for the others). Padding: ``-inf``.
    """
    if config.support_exact:
        margin_TE = s_TE - lam_T.unsqueeze(-1)
    else:
        k = config.k
        top_TK1 = _top_values(s_TE, k + 1)
        kth_T1, next_T1 = top_TK1[:, k - 1 : k], top_TK1[:, k : k + 1]
        margin_TE = s_TE - torch.where(s_TE >= kth_T1, next_T1, kth_T1)
    keep_TE = torch.isfinite(s_TE)
    if token_mask_T is not None:
        keep_TE = keep_TE & token_mask_T.unsqueeze(-1)
    return torch.where(keep_TE, margin_TE, -math.inf)


def _use_cpp_selection(x: Tensor) -> bool:
    """Whether the C++ kernels' selections serve this tensor (CPU float32 / float64, loaded):
    torch.topk costs about 1 us per short row on CPU and the quantiles a full column sort,
    the alternations' main costs. One name for the gate's selections, so that tests can
    switch them to the PyTorch path alone."""
    return cpp_kernels_serve(x)


def _top_values(x_TE: Tensor, num: int) -> Tensor:
    """``x_TE.topk(num).values`` (the C++ selection on CPU)."""
    if _use_cpp_selection(x_TE):
        return threshold_cpp.top_values(x_TE, num)
    return x_TE.topk(num, dim=-1).values


def _column_ranks(x_TE: Tensor, rank_E: Tensor, count: int | None) -> tuple[Tensor, Tensor]:
    """Per column e, the entries at descending positions ``rank_E[e]`` and the next one
    (0-based; ranks clamped to the ``count`` largest, all T when None; the next one past the
    last is the last itself). The C++ selection on CPU, else a partial or full sort."""
    if _use_cpp_selection(x_TE):
        limit = x_TE.shape[0] if count is None else min(count, x_TE.shape[0])
        pair_E2 = threshold_cpp.rank_pair(x_TE.t(), rank_E.clamp(0, limit - 1))
        return pair_E2[:, 0], pair_E2[:, 1]
    sorted_ET = _largest_per_column(x_TE, count)
    last = sorted_ET.shape[-1] - 1
    rank_E1 = rank_E.clamp(0, last).unsqueeze(-1)
    inside_E = sorted_ET.gather(-1, rank_E1).squeeze(-1)
    return inside_E, sorted_ET.gather(-1, (rank_E1 + 1).clamp(max=last)).squeeze(-1)


def _largest_per_column(x_TE: Tensor, count: int | None) -> Tensor:
    """The ``count`` largest entries of each column, descending, as ``[E, count]`` (every
    entry when ``count`` is None or not smaller than T). ``count`` is static (from shapes and
    the config), so this is a partial selection, not a full sort, with no host sync."""
    num_tokens = x_TE.shape[0]
    if count is None or count >= num_tokens:
        return x_TE.t().sort(dim=-1, descending=True).values
    return x_TE.t().topk(count, dim=-1, sorted=True).values


def _quantile_shift(inside_E: Tensor, outside_E: Tensor) -> Tensor:
    """Per expert, the shift of its threshold that leaves ``ceil(target)`` tokens with a
    positive margin: midway between the target-th largest margin (``inside_E``) and the next
    (``outside_E``; one unit below when there is none)."""
    outside_E = torch.where(torch.isfinite(outside_E), outside_E, inside_E - 1.0)
    shift_E = 0.5 * (inside_E + outside_E)
    return torch.where(torch.isfinite(shift_E), shift_E, 0.0)


# ---------------------------------------------------------------------------- entry point


def run_gate(
    logits_TE: Tensor,
    config: RouterConfig,
    tau: float | Tensor | None = None,
    bias_E: Tensor | None = None,
    *,
    k: float | Tensor | None = None,
    mu_E: Tensor | None = None,
) -> Selection:
    """The gate itself, as a function of fp32 logits (group masking already applied).

    Args:
        logits_TE: fp32 router logits; ``-inf`` marks experts a token may not use.
        config: Gate settings.
        tau: Temperature of the soft gates (float or scalar tensor, possibly learned);
            ``config.tau`` when None.
        bias_E: Expert bias: selection-only (added to the scores used to pick experts) for
            every gate except ``sparse_soft_topk``, which adds it to the logits inside its
            solve so that support and weights stay one p.
        k: Soft budget (sum of p) of the soft gates: a number or a scalar tensor (a budget
            controller's); ``config.k`` when None. The slot count stays ``config.slots``.
        mu_E: ``balanced_soft_topk``: per-expert thresholds (logit units); solved from this
            batch when None.

    Returns:
        A :class:`Selection` with K = ``config.slots``.
    """
    if not isinstance(config, RouterConfig):
        raise ValueError(f"config must be a RouterConfig, got {type(config).__name__}")
    gate = GATE_FUNCTIONS[config.gate]
    return gate(
        logits_TE,
        config,
        k=config.k if k is None else k,
        tau=config.tau if tau is None else tau,
        bias_E=bias_E,
        mu_E=mu_E,
    )


def select_experts(
    logits_TE: Tensor,
    config: RouterConfig,
    tau: float | Tensor | None = None,
    bias_E: Tensor | None = None,
    *,
    k: float | Tensor | None = None,
    mu_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`run_gate` without the overflow counts.

    Returns:
        ``(expert_ids_TK, weights_TK, scores_TE, valid_TK)`` with K = ``config.slots``.
    """
    selection = run_gate(logits_TE, config, tau, bias_E, k=k, mu_E=mu_E)
    return selection.expert_ids_TK, selection.weights_TK, selection.scores_TE, selection.valid_TK
