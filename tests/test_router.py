"""Routers: gate semantics, gradients, temperature, bias, groups, padding, config errors."""

import pytest
import torch

from moe_router.gates import run_gate
from moe_router.ops import soft_topk
from moe_router.router import GATES, Router, RouterConfig, select_experts

SOFT_GATES = ("soft_topk", "soft_topk_dense", "sparse_soft_topk", "straight_through")


def soft_topk_handles_neg_inf() -> bool:
    """Whether the installed soft_topk meets its -inf contract (p = 0, finite gradient). The
    placeholder in main before the real solver lands does not; group-limited soft routing
    relies on it."""
    scores = torch.tensor([[0.5, float("-inf"), 0.1, -0.3]], requires_grad=True)
    p = soft_topk(scores, 2)
    p.backward(torch.ones_like(p))
    return bool(p[0, 1] == 0 and torch.isfinite(scores.grad).all() and torch.isfinite(p).all())


needs_neg_inf_support = pytest.mark.skipif(
    not soft_topk_handles_neg_inf(), reason="installed soft_topk does not handle -inf yet"
)


def spaced_logits(num_tokens, num_experts, gap=0.5, seed=0):
    """Logits whose entries per row are a permutation of a grid, so no two are closer than
    ``gap`` and the top-k set is unambiguous."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)])
    return ranks.float() * gap - num_experts * gap / 2


def config(gate, num_experts=8, k=2, **options):
    return RouterConfig(d_model=4, num_experts=num_experts, k=k, gate=gate, **options)


# ---------------------------------------------------------------- gate semantics


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_matches_reference(score_func, renormalize):
    logits = torch.randn(10, 8)
    ids, weights, scores, valid = select_experts(
        logits, config("topk", score_func=score_func, renormalize=renormalize)
    )
    ref_scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    ref_weights, ref_ids = ref_scores.topk(2, dim=-1)
    if renormalize:
        ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
    torch.testing.assert_close(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(scores, ref_scores)
    assert valid.all()


@pytest.mark.parametrize("method", ["sigmoid", "laplace", "exp"])
def test_soft_topk_selects_largest_p_and_weights_are_p(method):
    logits = torch.randn(10, 8)
    ids, weights, p, valid = select_experts(logits, config("soft_topk", method=method, tau=0.7))
    torch.testing.assert_close(p, soft_topk(logits, 2, tau=0.7, method=method))
    torch.testing.assert_close(ids, p.topk(2, dim=-1).indices)
    torch.testing.assert_close(weights, p.gather(-1, ids))
    assert valid.all()


def test_soft_topk_dense_uses_every_expert():
    logits = torch.randn(6, 5)
    ids, weights, p, valid = select_experts(logits, config("soft_topk_dense", num_experts=5))
    torch.testing.assert_close(ids, torch.arange(5).expand(6, 5))
    torch.testing.assert_close(weights, p)
    torch.testing.assert_close(p.sum(-1), torch.full((6,), 2.0))
    assert valid.all()


def test_sparse_soft_topk_dispatches_exactly_the_support():
    # k=1, tau=1: row 0 solves clip(2 - lam) + clip(1.8 - lam) = 1 at lam = 1.4, so
    # p = (0.6, 0.4, 0, 0); row 1 at lam = 1.25, so p = (0, 0, 0.75, 0.25).
    logits = torch.tensor([[2.0, 1.8, 0.0, -1.0], [-1.0, 0.0, 2.0, 1.5]])
    cfg = config("sparse_soft_topk", num_experts=4, k=1, max_active=3)
    ids, weights, p, valid = select_experts(logits, cfg)
    assert ids.shape == (2, 3)
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.75, 0.25]]))
    assert valid.tolist() == [[True, True, False], [True, True, False]]
    assert ids[:, :2].tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.4, 0.0], [0.75, 0.25, 0.0]]))
    assert config("sparse_soft_topk", num_experts=8, k=3).slots == 6  # min(E, 2k)


def test_sparse_soft_topk_cap():
    logits = torch.tensor([[2.0, 1.8, 0.0, -1.0]])
    ids, weights, _, valid = select_experts(
        logits, config("sparse_soft_topk", num_experts=4, k=1, max_active=1)
    )
    assert ids.tolist() == [[0]] and valid.tolist() == [[True]]
    torch.testing.assert_close(weights, torch.tensor([[0.6]]))


def test_sparse_soft_topk_variable_count_against_reference():
    logits = torch.randn(50, 8) * 2
    cfg = config("sparse_soft_topk", k=2, max_active=8, tau=1.0)
    ids, weights, p, valid = select_experts(logits, cfg)
    torch.testing.assert_close(valid.sum(-1), (p > 0).sum(-1))
    for t in range(50):
        chosen = set(ids[t][valid[t]].tolist())
        assert chosen == set(torch.nonzero(p[t] > 0).flatten().tolist())
    torch.testing.assert_close(weights, p.gather(-1, ids) * valid)


def test_straight_through_forward_is_hard_backward_is_soft():
    logits = torch.randn(12, 8, requires_grad=True)
    coeff = torch.randn(12, 2)
    ids, weights, _, _ = select_experts(logits, config("straight_through", tau=0.5))
    assert torch.equal(weights, torch.ones_like(weights))
    (weights * coeff).sum().backward()
    grad_st = logits.grad.clone()

    logits.grad = None
    ids_soft, weights_soft, _, _ = select_experts(logits, config("soft_topk", tau=0.5))
    assert torch.equal(ids, ids_soft)
    (weights_soft * coeff).sum().backward()
    torch.testing.assert_close(grad_st, logits.grad)


def test_straight_through_renormalised_is_uniform():
    logits = torch.randn(4, 8)
    _, weights, _, _ = select_experts(logits, config("straight_through", renormalize=True))
    torch.testing.assert_close(weights, torch.full((4, 2), 0.5))


@pytest.mark.parametrize("gate", GATES)
def test_score_scale_multiplies_the_weights(gate):
    logits = torch.randn(5, 8)
    _, weights, _, _ = select_experts(logits, config(gate))
    _, scaled, _, _ = select_experts(logits, config(gate, score_scale=2.5))
    torch.testing.assert_close(scaled, 2.5 * weights)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("gate", ["soft_topk", "soft_topk_dense", "straight_through"])
@pytest.mark.parametrize("method", ["sigmoid", "laplace", "exp"])
def test_gradient_reaches_unselected_logits_for_soft_gates(gate, method):
    logits = (torch.randn(16, 8) * 0.5).requires_grad_()
    ids, weights, _, _ = select_experts(logits, config(gate, method=method, tau=1.0))
    (weights * torch.randn_like(weights)).sum().backward()
    unselected = torch.ones(16, 8, dtype=torch.bool).scatter_(1, ids[:, :2], False)
    if gate == "soft_topk_dense":
        unselected = torch.ones(16, 8, dtype=torch.bool).scatter_(
            1, logits.detach().topk(2, -1).indices, False
        )
    assert (logits.grad[unselected].abs() > 0).all()


def test_sparse_gate_gradient_reaches_the_support_only():
    logits = (torch.randn(16, 8) * 2).requires_grad_()
    ids, weights, p, valid = select_experts(logits, config("sparse_soft_topk", max_active=8))
    (weights * torch.randn_like(weights)).sum().backward()
    inside = (p > 0) & (p < 1)
    assert (logits.grad[p == 0] == 0).all()
    # Rows with at least two fractional entries carry a gradient on them.
    rows = inside.sum(-1) >= 2
    assert (logits.grad[rows].abs().sum(-1) > 0).all()


@pytest.mark.parametrize(
    ("score_func", "renormalize"), [("sigmoid", False), ("sigmoid", True), ("softmax", True)]
)
def test_topk_gives_no_gradient_to_unselected_logits(score_func, renormalize):
    logits = torch.randn(16, 8, requires_grad=True)
    ids, weights, _, _ = select_experts(
        logits, config("topk", score_func=score_func, renormalize=renormalize)
    )
    (weights * torch.randn_like(weights)).sum().backward()
    unselected = torch.ones(16, 8, dtype=torch.bool).scatter_(1, ids, False)
    assert (logits.grad[unselected] == 0).all()
    assert (logits.grad[~unselected].abs() > 0).any()


@pytest.mark.parametrize("method", ["sigmoid", "laplace"])
def test_renormalisation_jacobian_has_the_off_diagonal_term(method):
    # w = q / sum(q) over the selected q = p[ids]; dL/dq_j = (c_j - sum_i c_i w_i) / sum(q)
    # Chain it through soft_topk's own Jacobian and compare with the gate.
    logits = torch.randn(6, 8, requires_grad=True)
    coeff = torch.randn(6, 2)
    ids, weights, _, _ = select_experts(
        logits, config("soft_topk", method=method, renormalize=True, tau=0.8)
    )
    (weights * coeff).sum().backward()

    x = logits.detach().requires_grad_()
    p = soft_topk(x, 2, tau=0.8, method=method)
    q = p.detach().gather(-1, ids)
    w = q / q.sum(-1, keepdim=True)
    grad_q = (coeff - (coeff * w).sum(-1, keepdim=True)) / q.sum(-1, keepdim=True)
    grad_p = torch.zeros(6, 8).scatter_(1, ids, grad_q)
    (expected,) = torch.autograd.grad(p, x, grad_outputs=grad_p)
    torch.testing.assert_close(logits.grad, expected)
    # The diagonal-only Jacobian (1/sum(q)) would give a different answer.
    (diagonal_only,) = torch.autograd.grad(
        soft_topk(x, 2, tau=0.8, method=method),
        x,
        grad_outputs=torch.zeros(6, 8).scatter_(1, ids, coeff / q.sum(-1, keepdim=True)),
    )
    assert not torch.allclose(logits.grad, diagonal_only, atol=1e-4)


# ---------------------------------------------------------------- tau -> 0


@pytest.mark.parametrize(
    ("gate", "method"),
    [
        ("soft_topk", "sigmoid"),
        ("soft_topk", "laplace"),
        ("soft_topk", "exp"),
        ("straight_through", "sigmoid"),
        ("sparse_soft_topk", "sparse"),
        ("soft_topk_dense", "sigmoid"),
    ],
)
def test_soft_gates_equal_topk_as_tau_goes_to_zero(gate, method):
    logits = spaced_logits(20, 8, gap=0.5)
    hard_ids, _, _, _ = select_experts(logits, config("topk"))
    hard_mask = torch.zeros(20, 8).scatter_(1, hard_ids, 1.0)
    ids, weights, p, valid = select_experts(logits, config(gate, method=method, tau=0.01))
    torch.testing.assert_close(p, hard_mask, atol=1e-6, rtol=0)
    # Every gate's weighted dispatch collapses to "weight 1 on each top-k expert".
    dispatched = torch.zeros(20, 8).scatter_add_(1, ids, weights * valid)
    torch.testing.assert_close(dispatched, hard_mask, atol=1e-5, rtol=0)
    if gate == "sparse_soft_topk":
        assert (valid.sum(-1) == 2).all()


# ---------------------------------------------------------------- temperature


def test_annealed_tau_schedule_and_checkpoint():
    router = Router(4, 8, 2, tau=1.0, tau_schedule="anneal", tau_final=0.1, anneal_steps=10)
    assert router.tau.item() == pytest.approx(1.0)
    for _ in range(5):
        router.step_schedule()
    assert router.tau.item() == pytest.approx(0.1**0.5, rel=1e-5)  # geometric midpoint
    restored = Router(4, 8, 2, tau=1.0, tau_schedule="anneal", tau_final=0.1, anneal_steps=10)
    restored.load_state_dict(router.state_dict())
    assert restored.tau.item() == pytest.approx(router.tau.item())
    for _ in range(20):
        router.step_schedule()
    assert router.tau.item() == pytest.approx(0.1, rel=1e-5)  # held at the end


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_other_anneal_shapes_hit_the_endpoints(shape):
    router = Router(
        4, 8, 2, tau=2.0, tau_schedule="anneal", tau_final=0.5, anneal_steps=4, anneal_shape=shape
    )
    values = []
    for _ in range(5):
        values.append(router.tau.item())
        router.step_schedule()
    assert values[0] == pytest.approx(2.0) and values[-1] == pytest.approx(0.5)
    assert values == sorted(values, reverse=True)
    if shape == "linear":
        assert values[2] == pytest.approx(1.25)


def test_fixed_tau_step_is_a_no_op():
    router = Router(4, 8, 2, tau=0.3)
    router.step_schedule()
    assert router.tau == 0.3 and router.schedule_step.item() == 0


def test_learned_tau_gets_a_gradient():
    router = Router(4, 8, 2, tau=0.5, tau_schedule="learned")
    routing = router(torch.randn(10, 4))
    (routing.weights_TK * torch.randn(10, 2)).sum().backward()
    assert router.log_tau.grad is not None and router.log_tau.grad.abs().item() > 0
    assert router.tau.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- router module


def test_router_math_is_fp32_for_bf16_inputs_and_weights():
    router = Router(16, 8, 2, gate="soft_topk").to(torch.bfloat16)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    routing = router(x)
    assert routing.logits_TE.dtype == torch.float32
    assert routing.weights_TK.dtype == torch.float32
    assert routing.scores_TE.dtype == torch.float32
    expected = torch.nn.functional.linear(x.reshape(-1, 16).float(), router.weight_ED.float())
    torch.testing.assert_close(routing.logits_TE, expected, rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["topk", "soft_topk"])
def test_expert_bias_is_selection_only(gate):
    router = Router(16, 8, 2, gate=gate, expert_bias=True, init_std=1.0)
    x = torch.randn(32, 16)
    baseline = router(x)
    router.expert_bias.bias_E[3] = 100.0  # every token must now pick expert 3
    routing = router(x)
    assert ((routing.expert_ids_TK == 3) & routing.valid_TK).any(-1).all()
    # Combine weights are the unbiased scores at the chosen experts.
    torch.testing.assert_close(routing.scores_TE, baseline.scores_TE)
    expected = routing.scores_TE.gather(-1, routing.expert_ids_TK) * routing.valid_TK
    torch.testing.assert_close(routing.weights_TK, expected)


def test_sparse_expert_bias_shifts_the_solve_and_stays_support_exact():
    """The support-exact gate solves on logits + bias: the weights are that p, every computed
    expert has p > 0 and every expert with p > 0 is computed (no zero-weight compute, no
    silently dropped mass), and the gradient reaches the logits, not the bias."""
    router = Router(16, 8, 2, gate="sparse_soft_topk", expert_bias=True, init_std=1.0)
    router.expert_bias.bias_E.copy_(torch.linspace(-0.5, 0.5, 8))
    router.expert_bias.bias_E[3] = 100.0  # every token must now compute expert 3
    x = torch.randn(32, 16)
    routing = router(x)
    assert ((routing.expert_ids_TK == 3) & routing.valid_TK).any(-1).all()
    expected_TE = soft_topk(routing.logits_TE + router.expert_bias.bias_E, 2, method="sparse")
    torch.testing.assert_close(routing.scores_TE, expected_TE)
    weights_TK = routing.scores_TE.gather(-1, routing.expert_ids_TK)
    assert (weights_TK[routing.valid_TK] > 0).all()
    torch.testing.assert_close(routing.weights_TK, weights_TK * routing.valid_TK)
    support_T = (routing.scores_TE > 0).sum(-1).float()
    torch.testing.assert_close(routing.valid_TK.sum(-1).float() + routing.overflow_T, support_T)
    (routing.weights_TK * torch.randn_like(routing.weights_TK)).sum().backward()
    assert router.weight_ED.grad.abs().sum() > 0


def test_update_expert_bias_and_no_op_when_disabled():
    router = Router(4, 4, 1, expert_bias=True, bias_update_rate=0.5)
    router.update_expert_bias(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(router.expert_bias.bias_E, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    assert "expert_bias.bias_E" in router.state_dict()
    plain = Router(4, 4, 1)
    plain.update_expert_bias(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    assert plain.expert_bias is None


@pytest.mark.parametrize(
    "gate", [g if g == "topk" else pytest.param(g, marks=needs_neg_inf_support) for g in GATES]
)
def test_group_limited_routing(gate):
    # E=8 in 4 groups of 2, tokens may use the best 2 groups (by largest logit).
    router = Router(16, 8, 2, gate=gate, num_groups=4, topk_groups=2, init_std=1.0)
    x = torch.randn(24, 16, requires_grad=True)
    routing = router(x)
    group_scores = routing.logits_TE.view(24, 4, 2).amax(-1)
    allowed_groups = group_scores.topk(2, -1).indices
    allowed = torch.zeros(24, 4, dtype=torch.bool).scatter_(1, allowed_groups, True)
    allowed = allowed.repeat_interleave(2, dim=1)  # (T, E)
    chosen_allowed = allowed.gather(1, routing.expert_ids_TK)
    assert (chosen_allowed | ~routing.valid_TK).all()
    assert (routing.scores_TE[~allowed] == 0).all()
    (routing.weights_TK * torch.randn_like(routing.weights_TK)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(router.weight_ED.grad).all()


@pytest.mark.parametrize("gate", GATES)
def test_padding_tokens_get_nothing_and_count_nowhere(gate):
    torch.manual_seed(0)
    options = {"aux_loss_coef": 0.1, "seq_aux_loss_coef": 0.1, "z_loss_coef": 0.01}
    router = Router(16, 8, 2, gate=gate, init_std=0.5, **options)
    x = torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    padding[1, 1:] = True
    routing = router(x, padding_mask=padding)
    pad_T = padding.flatten()
    assert not routing.valid_TK[pad_T].any() and (routing.weights_TK[pad_T] == 0).all()
    torch.testing.assert_close(routing.padding_mask_T, pad_T)

    real = router(x[~padding])  # the 5 real tokens alone, as one micro-batch
    torch.testing.assert_close(routing.tokens_per_expert_E, real.tokens_per_expert_E)
    for name in ("load_balance", "z_loss"):
        torch.testing.assert_close(routing.aux_losses[name], real.aux_losses[name])
    if gate == "balanced_soft_topk":
        # In training its thresholds come from the whole batch (padding excluded, checked
        # above): route each sequence with the batch's thresholds, i.e. as at evaluation.
        router.balance.mu_E.copy_(router.balance.warm_mu_E)
        router.eval()
    per_sequence = [router(x[b][~padding[b]]).aux_losses["seq_load_balance"] for b in range(2)]
    torch.testing.assert_close(routing.aux_losses["seq_load_balance"], sum(per_sequence) / 2)


def test_aux_losses_are_scaled_and_absent_when_off():
    router = Router(16, 8, 2, gate="topk")
    assert router(torch.randn(5, 16)).aux_losses == {}
    scaled = Router(16, 8, 2, gate="topk", aux_loss_coef=0.5, z_loss_coef=0.25)
    scaled.load_state_dict(router.state_dict())
    plain = Router(16, 8, 2, gate="topk", aux_loss_coef=1.0, z_loss_coef=1.0)
    plain.load_state_dict(router.state_dict())
    x = torch.randn(5, 16)
    a, b = scaled(x).aux_losses, plain(x).aux_losses
    torch.testing.assert_close(a["load_balance"], 0.5 * b["load_balance"])
    torch.testing.assert_close(a["z_loss"], 0.25 * b["z_loss"])


def test_jitter_only_in_training_and_logits_stay_clean():
    router = Router(16, 8, 2, jitter_eps=0.1, init_std=1.0)
    x = torch.randn(10, 16)
    router.eval()
    torch.testing.assert_close(router(x).scores_TE, router(x).scores_TE)
    clean = router(x).logits_TE
    router.train()
    first, second = router(x), router(x)
    assert not torch.allclose(first.scores_TE, second.scores_TE)
    torch.testing.assert_close(first.logits_TE, clean)


def test_from_config_and_repr():
    cfg = RouterConfig(d_model=16, num_experts=8, k=2, gate="topk", score_func="sigmoid")
    router = Router.from_config(cfg)
    assert router.config == cfg
    assert "gate='topk'" in repr(router) and "sigmoid" in repr(router)


def test_routing_shapes_for_every_gate():
    for gate in GATES:
        router = Router(16, 8, 2, gate=gate)
        routing = router(torch.randn(3, 4, 16))
        slots = router.config.slots
        assert routing.expert_ids_TK.shape == (12, slots)
        assert routing.weights_TK.shape == (12, slots)
        assert routing.scores_TE.shape == (12, 8)
        assert routing.tokens_per_expert_E.sum().item() == routing.valid_TK.sum().item()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"gate": "hard"}, "gate='hard'"),
        ({"k": 9}, "k=9"),
        ({"k": 0}, "k=0"),
        ({"k": -1}, "k=-1"),
        ({"num_experts": 0, "k": 1}, "num_experts=0"),
        ({"d_model": 0}, "d_model=0"),
        ({"tau": 0.0}, "tau=0.0"),
        ({"tau": -1.0}, "tau=-1.0"),
        ({"tau": float("nan")}, "tau=nan"),
        ({"tau": float("inf")}, "tau=inf"),
        ({"tau_schedule": "warm"}, "tau_schedule"),
        ({"tau_schedule": "learned", "gate": "topk"}, "tau_schedule='learned'"),
        ({"tau_final": 0.0}, "tau_final"),
        ({"anneal_steps": 0}, "anneal_steps"),
        ({"anneal_shape": "step"}, "anneal_shape"),
        ({"tau_min": 2.0}, "tau_min"),
        ({"score_func": "relu"}, "score_func"),
        ({"method": "softmax"}, "method"),
        ({"max_active": 1}, "max_active=1"),
        ({"max_active": 9}, "max_active=9"),
        ({"jitter_eps": 1.0}, "jitter_eps"),
        ({"num_groups": 3}, "num_groups=3"),
        ({"num_groups": 4, "topk_groups": 5}, "topk_groups=5"),
        ({"num_groups": 8, "topk_groups": 1}, "topk_groups=1"),  # 1 expert/group < k=2
        ({"k": 8, "num_experts": 8}, "k=8"),  # soft gate over exactly k experts
        ({"num_groups": 4, "topk_groups": 1}, "k=2"),  # 2 usable experts for k=2, soft gate
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
        ({"z_loss_coef": float("nan")}, "z_loss_coef"),
        ({"score_scale": 0.0}, "score_scale"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_config_raises(options, match):
    settings = {"d_model": 16, "num_experts": 8, "k": 2, **options}
    with pytest.raises(ValueError, match=match):
        RouterConfig(**settings)
    with pytest.raises(ValueError, match=match):
        Router(settings.pop("d_model"), settings.pop("num_experts"), settings.pop("k"), **settings)


def test_topk_may_use_every_expert():
    # Only the soft gates need more candidates than k.
    assert RouterConfig(d_model=4, num_experts=4, k=4, gate="topk").k == 4
    assert RouterConfig(d_model=4, num_experts=8, k=2, gate="topk", num_groups=4, topk_groups=1)


def test_bad_inputs_raise():
    router = Router(16, 8, 2)
    with pytest.raises(ValueError, match="d_model=16"):
        router(torch.randn(4, 15))
    with pytest.raises(ValueError, match="padding_mask"):
        router(torch.randn(2, 3, 16), padding_mask=torch.zeros(6, dtype=torch.bool))


def test_integer_hidden_states_and_a_dict_config_are_clear_errors():
    router = Router(16, 8, 2, gate="topk")
    with pytest.raises(ValueError, match="hidden_states must be a float tensor"):
        router(torch.randint(0, 5, (4, 16)))
    with pytest.raises(ValueError, match="config must be a RouterConfig, got dict"):
        run_gate(torch.randn(4, 8), {"k": 2})


def test_jitter_noise_is_uniform_in_its_band_and_resumes_from_its_counter():
    from moe_router.gates import hashed_uniform

    u = hashed_uniform((4096, 64), torch.tensor(3))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12**-0.5) < 0.01
    assert torch.equal(u, hashed_uniform((4096, 64), torch.tensor(3)))
    assert not torch.equal(u, hashed_uniform((4096, 64), torch.tensor(4)))
    router = Router(16, 8, 2, jitter_eps=0.1, init_std=1.0)
    x = torch.randn(10, 16)
    router(x)
    copy_state = {key: value.clone() for key, value in router.state_dict().items()}
    expected = router(x).scores_TE
    resumed = Router(16, 8, 2, jitter_eps=0.1, init_std=1.0)
    resumed.load_state_dict(copy_state)
    torch.testing.assert_close(resumed(x).scores_TE, expected, rtol=0, atol=0)
