"""The gates that make the gradient reach the experts they weight: support-exact
``sparse_soft_topk`` with its budget controller, and two-sided ``balanced_soft_topk``."""

import pytest
import torch

from moe_router import MoELayer, Router, RouterConfig, step_routers
from moe_router.gates import balance_thresholds, run_gate
from moe_router.ops import soft_topk, threshold_cpp

NEW_GATES = ("sparse_soft_topk", "balanced_soft_topk")


def config(gate, num_experts=8, k=2, **options):
    return RouterConfig(d_model=4, num_experts=num_experts, k=k, gate=gate, **options)


def max_violation(counts_E):
    return ((counts_E.max() - counts_E.mean()) / counts_E.mean()).item()


# ------------------------------------------------------------------ support-exact sparse gate


def test_support_exact_dispatch_or_counted_overflow():
    torch.manual_seed(0)
    logits = torch.randn(300, 8) * 0.5  # wide supports: many tokens exceed a small cap
    for max_active in (8, 3):
        cfg = config("sparse_soft_topk", k=2, max_active=max_active, tau=1.0)
        sel = run_gate(logits, cfg)
        support_T = (sel.scores_TE > 0).sum(-1).float()
        computed_T = sel.valid_TK.sum(-1).float()
        torch.testing.assert_close(computed_T + sel.overflow_T, support_T)
        # The computed experts are the largest p of the support.
        for t in range(0, 300, 37):
            chosen = set(sel.expert_ids_TK[t][sel.valid_TK[t]].tolist())
            support = torch.nonzero(sel.scores_TE[t] > 0).flatten()
            ranked = support[sel.scores_TE[t][support].argsort(descending=True)].tolist()
            assert chosen == set(ranked[:max_active])
        mass_outside_T = sel.scores_TE.sum(-1) - sel.weights_TK.sum(-1)
        torch.testing.assert_close(sel.overflow_mass_T, mass_outside_T, atol=1e-5, rtol=0)
        if max_active == 8:
            assert (sel.overflow_T == 0).all() and (sel.overflow_mass_T < 1e-6).all()
        else:
            assert (sel.overflow_T > 0).any()


def test_overflow_reaches_the_routing_record_and_padding_has_none():
    router = Router(16, 8, 2, gate="sparse_soft_topk", max_active=2, init_std=0.01)
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 2:] = True
    routing = router(x, padding_mask=padding)
    assert routing.overflow_T.shape == (10,) and (routing.overflow_T[~padding.flatten()] > 0).all()
    assert (routing.overflow_T[padding.flatten()] == 0).all()
    assert (routing.overflow_mass_T[padding.flatten()] == 0).all()


def dense_reference(layer, x_TD):
    """Every expert weighted by p: sum_e p_e * SwiGLU_e(x), no dispatch at all."""
    routing = layer.router(x_TD)
    p_TE = routing.scores_TE
    hidden_TEF = torch.nn.functional.silu(torch.einsum("td,edf->tef", x_TD, layer.w1_EDF))
    hidden_TEF = hidden_TEF * torch.einsum("td,edf->tef", x_TD, layer.w3_EDF)
    out_TED = torch.einsum("tef,efd->ted", hidden_TEF, layer.w2_EFD)
    return torch.einsum("te,ted->td", p_TE, out_TED)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_support_exact_layer_equals_the_dense_reference(k):
    torch.manual_seed(k)
    layer = MoELayer(12, 10, 6, k, gate="sparse_soft_topk", max_active=6, init_std=0.5)
    x = torch.randn(40, 12, requires_grad=True)
    y = layer(x)
    y_ref = dense_reference(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [x, layer.router.weight_ED, layer.w1_EDF, layer.w3_EDF, layer.w2_EFD]
    grads = torch.autograd.grad((y * g).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    for got, expected in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The gradient reaches every logit in the support: the experts they weight are computed.
    assert layer.router.weight_ED.grad is None  # autograd.grad does not accumulate


def stationary_stream(router, steps, batch=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    supports = []
    for _ in range(steps):
        x = torch.randn(batch, router.config.d_model, generator=gen)
        routing = router(x)
        supports.append((routing.scores_TE > 0).sum(-1).float().mean().item())
        step_routers(router)
    return supports


@pytest.mark.parametrize("target", [1.5, 2.0, 3.0])
def test_budget_controller_reaches_and_holds_the_target(target):
    torch.manual_seed(0)
    router = Router(
        16,
        8,
        2,
        gate="sparse_soft_topk",
        target_active=target,
        budget_update_rate=0.2,
        init_std=0.3,
    )
    supports = stationary_stream(router, 150)
    settled = sum(supports[-30:]) / 30
    assert abs(settled - target) <= 0.05 * target, (target, settled, router.budget.item())
    assert router.budget.item() < target  # support >= ceil(budget): the budget sits below

    # Resume: the budget is checkpointed and the controller holds the target from there.
    state = router.state_dict()
    assert "budget_controller.budget" in state
    resumed = Router(
        16,
        8,
        2,
        gate="sparse_soft_topk",
        target_active=target,
        budget_update_rate=0.2,
        init_std=0.3,
    )
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.budget, router.budget)
    after = stationary_stream(resumed, 30, seed=1)
    assert abs(sum(after) / 30 - target) <= 0.05 * target


def test_budget_controller_keeps_gradients_alive():
    torch.manual_seed(0)
    router = Router(16, 8, 2, gate="sparse_soft_topk", target_active=2.0, init_std=0.3)
    stationary_stream(router, 100)
    x = torch.randn(64, 16)
    routing = router(x)
    p = routing.scores_TE
    # Fractional entries exist (v = 1[0 < p < 1] does not vanish) and the gradient flows.
    assert ((p > 0) & (p < 1)).any(dim=-1).float().mean() > 0.5
    (routing.weights_TK * torch.randn_like(routing.weights_TK)).sum().backward()
    assert router.weight_ED.grad.abs().sum() > 0


def test_budget_is_not_stepped_by_eval_or_no_grad_forwards():
    router = Router(16, 8, 2, gate="sparse_soft_topk", target_active=2.0)
    with torch.no_grad():
        router(torch.randn(32, 16))
    router.eval()
    router(torch.randn(32, 16))
    step_routers(router)
    assert router.budget.item() == 2.0  # nothing measured, nothing moved


# ----------------------------------------------------------------- balanced soft top-k


def skewed_logits(num_tokens=512, num_experts=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # A strong per-expert preference shared by every token: hard top-k piles onto 2 experts.
    preference_E = torch.linspace(3.0, -3.0, num_experts)
    return torch.randn(num_tokens, num_experts, generator=gen) + preference_E


@pytest.mark.parametrize("method", ["sigmoid", "sparse"])
@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_balanced_rows_and_columns(method, kind):
    num_tokens, num_experts, k = 512, 8, 2
    if kind == "random":
        logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(1))
    else:
        logits = skewed_logits(num_tokens, num_experts)
        counts_E = torch.bincount(logits.topk(k).indices.flatten(), minlength=num_experts)
        assert max_violation(counts_E.float()) >= 1.0  # top-k is badly unbalanced here
    cfg = config(
        "balanced_soft_topk",
        num_experts=num_experts,
        k=k,
        method=method,
        tau=0.5,
        balance_target="mass",
    )
    sel = run_gate(logits, cfg)
    p = sel.scores_TE
    torch.testing.assert_close(p.sum(-1), torch.full((num_tokens,), float(k)), rtol=1e-3, atol=0)
    target = num_tokens * k / num_experts
    torch.testing.assert_close(p.sum(0), torch.full((num_experts,), target), rtol=1e-3, atol=0)


def test_balanced_respects_padding_and_masked_experts():
    logits = skewed_logits(256, 8)
    logits[:10, 3] = float("-inf")
    token_mask = torch.ones(256, dtype=torch.bool)
    token_mask[200:] = False
    logits_padded = logits.clone()
    logits_padded[200:] = 50.0  # garbage in padding rows must not move the thresholds
    cfg = config("balanced_soft_topk", k=2, tau=0.5, balance_target="mass")
    mu = balance_thresholds(logits_padded, cfg, 0.5, token_mask_T=token_mask)
    mu_real = balance_thresholds(logits[:200], cfg, 0.5)
    torch.testing.assert_close(mu, mu_real, rtol=1e-4, atol=1e-4)
    p = soft_topk(logits[:200] - mu, 2, tau=0.5)
    assert (p[:10, 3] == 0).all()
    torch.testing.assert_close(p.sum(0), torch.full((8,), 200 * 2 / 8), rtol=1e-3, atol=0)


def test_balanced_evaluation_is_per_token_and_uses_the_running_thresholds():
    torch.manual_seed(0)
    router = Router(16, 8, 2, gate="balanced_soft_topk", init_std=0.5, balance_momentum=0.0)
    for _ in range(3):
        router(torch.randn(128, 16))
        step_routers(router)
    assert router.balance_mu_E.abs().sum() > 0
    router.eval()
    x = torch.randn(32, 16)
    alone = router(x[:4])
    with_others = router(torch.cat([x[:4], torch.randn(60, 16) * 5]))
    torch.testing.assert_close(alone.weights_TK, with_others.weights_TK[:4])
    assert torch.equal(alone.expert_ids_TK, with_others.expert_ids_TK[:4])
    # It is the soft top-k of the logits shifted by the running thresholds.
    logits = alone.logits_TE
    torch.testing.assert_close(alone.scores_TE, soft_topk(logits - router.balance_mu_E, 2, tau=1.0))


@pytest.mark.parametrize("method", ["sigmoid", "sparse"])
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_balanced_load_reaches_max_violation_zero_on_skewed_batches(method, tau):
    # balance_target="load" (the default) equalises the dispatched assignments themselves.
    logits = skewed_logits(1024, 8, seed=3)
    top_counts_E = torch.bincount(logits.topk(2).indices.flatten(), minlength=8).float()
    assert max_violation(top_counts_E) >= 1.0
    sel = run_gate(logits, config("balanced_soft_topk", k=2, tau=tau, method=method))
    counts_E = torch.zeros(8).index_add_(
        0, sel.expert_ids_TK.flatten(), sel.valid_TK.flatten().float()
    )
    assert max_violation(counts_E) <= 0.05
    torch.testing.assert_close(sel.scores_TE.sum(-1), torch.full((1024,), 2.0))


def clustered_logits(seed, num_tokens=1024, num_experts=8, dim=16, num_clusters=64):
    """Router logits like a byte-level model's first layer: tokens in Zipf-distributed
    clusters of near-duplicates, so a small move of one threshold moves a whole cluster."""
    gen = torch.Generator().manual_seed(seed)
    centers_CD = torch.randn(num_clusters, dim, generator=gen)
    freq_C = 1.0 / torch.arange(1, num_clusters + 1).float()
    cluster_T = torch.multinomial(freq_C, num_tokens, replacement=True, generator=gen)
    hidden_TD = centers_CD[cluster_T] + 0.05 * torch.randn(num_tokens, dim, generator=gen)
    weight_DE = 0.3 * torch.randn(dim, num_experts, generator=gen)
    drifted_DE = weight_DE + 0.1 * torch.randn(dim, num_experts, generator=gen)
    return hidden_TD @ weight_DE, hidden_TD @ drifted_DE


def dispatched_max_violation(logits_TE, mu_E, k):
    counts_E = torch.bincount((logits_TE - mu_E).topk(k).indices.flatten(), minlength=8)
    return max_violation(counts_E.float())


@pytest.mark.parametrize("seed", range(6))
def test_balanced_load_converges_from_a_stale_warm_start_on_clustered_tokens(seed):
    # The warm start is the previous router's solution; the plain (undamped) quantile
    # iteration cycles here and ends at MaxVio 0.04-0.23 after 8 alternations (seeds 0, 2, 3).
    logits_TE, previous_TE = clustered_logits(seed)
    cfg = config("balanced_soft_topk", k=2)
    warm_mu_E = balance_thresholds(previous_TE, cfg, 1.0)
    assert dispatched_max_violation(logits_TE, warm_mu_E, 2) >= 0.3
    mu_E = balance_thresholds(logits_TE, cfg, 1.0, mu_E=warm_mu_E)
    assert dispatched_max_violation(logits_TE, mu_E, 2) <= 0.05


@pytest.mark.parametrize("num_iters", [1, 2, 3])
def test_balanced_load_never_returns_worse_than_its_warm_start(num_iters):
    for seed in range(4):
        logits_TE, previous_TE = clustered_logits(seed)
        cfg = config("balanced_soft_topk", k=2)
        warm_mu_E = balance_thresholds(previous_TE, cfg, 1.0, num_iters=num_iters)
        mu_E = balance_thresholds(logits_TE, cfg, 1.0, mu_E=warm_mu_E, num_iters=num_iters)
        after = dispatched_max_violation(logits_TE, mu_E, 2)
        assert after <= dispatched_max_violation(logits_TE, warm_mu_E, 2)


@pytest.mark.parametrize(
    ("num_experts", "k", "padded", "method"),
    [(8, 2, False, "sigmoid"), (64, 8, True, "sigmoid"), (5, 3, True, "sigmoid")]
    + [(8, 2, True, "sparse"), (64, 8, False, "sparse")],
)
def test_balanced_thresholds_selections_are_exactly_a_full_sort(
    monkeypatch, num_experts, k, padded, method
):
    """The selections of the alternations: on CPU the C++ kernels' (top_values for the rows'
    K-th / (K+1)-th scores, rank_pair for the columns' quantiles), elsewhere torch.topk and a
    partial selection of the ceil(T K / E) + 2 largest margins per column (when that bound
    exists). Each must give exactly what sorting whole rows and columns gives."""
    import moe_router.gates as gates

    logits = skewed_logits(999, num_experts, seed=5)
    mask = torch.rand(999, generator=torch.Generator().manual_seed(1)) > 0.3 if padded else None
    settings = config("balanced_soft_topk", k=k, num_experts=num_experts, method=method)
    if threshold_cpp.available():
        assert gates._use_cpp_selection(logits)
    selected = balance_thresholds(logits, settings, 1.0, token_mask_T=mask)
    monkeypatch.setattr(gates, "_use_cpp_selection", lambda x: False)
    partial = balance_thresholds(logits, settings, 1.0, token_mask_T=mask)
    full_sort = gates._largest_per_column
    monkeypatch.setattr(gates, "_largest_per_column", lambda x, count: full_sort(x, None))
    full = balance_thresholds(logits, settings, 1.0, token_mask_T=mask)
    torch.testing.assert_close(partial, full, rtol=0, atol=0)
    torch.testing.assert_close(selected, full, rtol=0, atol=0)


def test_balance_window_keeps_the_last_real_tokens_and_solves_on_them():
    router = Router(4, 8, 2, gate="balanced_soft_topk", balance_window=50, init_std=1.0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 16, 4, generator=gen) for _ in range(3)]  # 32 tokens each
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 10:] = True
    for x in batches:
        router(x, padding_mask=padding)
    with torch.no_grad():
        router.eval()  # no write in eval or without grad
        router(torch.randn(8, 4))
        router.train()
    # 96 tokens written into 50 slots: the window holds the last 50, in ring order.
    logits_TE = torch.cat([x.reshape(-1, 4) @ router.weight_ED.t() for x in batches])
    real_T = (~padding.reshape(-1)).repeat(3)
    slots = torch.arange(46, 96) % 50
    assert torch.equal(router.balance.window_mask_W[slots], real_T[46:])
    kept = real_T[46:]  # (padding rows hold whatever; they are masked out)
    torch.testing.assert_close(
        router.balance.window_logits_WE[slots][kept], logits_TE[46:][kept], atol=1e-5, rtol=0
    )
    assert router.balance.window_pos.item() == 96 % 50
    before = router.balance_mu_E.clone()
    router.step()
    expected = balance_thresholds(
        router.balance.window_logits_WE, router.config, 1.0, before, router.balance.window_mask_W
    )
    torch.testing.assert_close(router.balance_mu_E, expected)
    # The window travels in checkpoints, so a resumed run steps to the same thresholds.
    resumed = Router(4, 8, 2, gate="balanced_soft_topk", balance_window=50)
    resumed.load_state_dict(router.state_dict())
    x = torch.randn(40, 4, generator=gen)
    for r in (router, resumed):
        r(x)
        r.step()
    torch.testing.assert_close(resumed.balance_mu_E, router.balance_mu_E, rtol=0, atol=0)


def test_balance_window_must_be_a_positive_int():
    with pytest.raises(ValueError, match="balance_window=0 is invalid"):
        Router(4, 8, 2, gate="balanced_soft_topk", balance_window=0)


def test_balanced_backward_gradcheck():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    cfg = config("balanced_soft_topk", num_experts=5, k=2, tau=0.7)
    mu = balance_thresholds(logits.detach(), cfg, 0.7)

    def weights(z):
        return run_gate(z, cfg, mu_E=mu.double()).weights_TK

    assert torch.autograd.gradcheck(weights, (logits,))


def test_running_thresholds_checkpoint_and_fp32():
    router = Router(16, 8, 2, gate="balanced_soft_topk")
    router(torch.randn(64, 16))
    step_routers(router)
    assert "balance.mu_E" in router.state_dict()
    router = router.to(torch.bfloat16)
    assert router.balance_mu_E.dtype == torch.float32


# ------------------------------------------------------------------------- both gates


@pytest.mark.parametrize("gate", NEW_GATES)
def test_compiles_fullgraph_forward_and_backward(gate):
    torch.manual_seed(0)
    router = Router(16, 8, 2, gate=gate, init_std=0.5, method="sparse", target_active=2.0)
    x = torch.randn(64, 16)

    # Every call starts from the same router state (balanced warm starts, budgets).
    start = {name: buffer.clone() for name, buffer in router.named_buffers()}

    def loss(x_TD):
        for name, buffer in router.named_buffers():
            buffer.copy_(start[name])
        routing = router(x_TD)
        return (routing.weights_TK * routing.expert_ids_TK.float().cos()).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    torch.testing.assert_close(compiled(x1), loss(x2), rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(compiled(x1), x1)[0]
    g2 = torch.autograd.grad(loss(x2), x2)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", NEW_GATES)
def test_router_math_is_fp32_under_bf16_autocast(gate):
    layer = MoELayer(16, 32, 8, 2, gate=gate).to(torch.bfloat16)
    x = torch.randn(4, 8, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, routing = layer(x, return_routing=True)
    assert y.dtype == torch.bfloat16
    assert routing.logits_TE.dtype == torch.float32 and routing.weights_TK.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("method", ["sigmoid", "sparse"])
@pytest.mark.parametrize("target", ["load", "mass"])
def test_balanced_weights_move_continuously_where_the_solve_is_continuous(method, target):
    """At evaluation (fixed running thresholds) a token's weights are a continuous function of
    its input for every variant; in training only the non-sparse row solve is. The support-
    exact training solve counts supports (integers), so its thresholds can jump: measured in
    experiments/balanced_sensitivity.py, documented in docs/results.md."""
    torch.manual_seed(0)
    router = Router(16, 8, 2, gate="balanced_soft_topk", method=method, balance_target=target)
    router.weight_ED.data.mul_(25)  # std 0.5
    router(torch.randn(256, 16))
    router.step()
    modes = ["eval"] if method == "sparse" else ["train", "eval"]
    x = torch.randn(256, 16)
    for mode in modes:
        router.train(mode == "train")
        with torch.no_grad():
            a, b = router(x), router(x + 1e-6 * torch.randn_like(x))
        dense = [torch.zeros(256, 8).scatter_add(1, r.expert_ids_TK, r.weights_TK) for r in (a, b)]
        assert (dense[0] - dense[1]).abs().max() < 1e-4, mode


@pytest.mark.parametrize("gate", ["topk", "soft_topk", "soft_topk_dense", "sparse_soft_topk"])
def test_a_nan_token_gets_a_nan_output_from_every_gate(gate):
    """The same for every gate: a NaN token's weights are NaN (never a silent zero output as
    if it were padding), and the other tokens are untouched."""
    torch.manual_seed(0)
    router = Router(16, 8, 2, gate=gate)
    x = torch.randn(8, 16)
    clean = router(x)
    x[3] = float("nan")
    routing = router(x)
    assert routing.weights_TK[3].isnan().any()
    others = torch.arange(8) != 3
    torch.testing.assert_close(routing.weights_TK[others], clean.weights_TK[others])


@pytest.mark.parametrize("method", ["sigmoid", "sparse"])
@pytest.mark.parametrize("target", ["load", "mass"])
@pytest.mark.parametrize("window", [None, 32])
def test_a_non_finite_token_reaches_only_its_own_balanced_output(method, target, window):
    torch.manual_seed(0)
    router = Router(
        16,
        8,
        2,
        gate="balanced_soft_topk",
        method=method,
        balance_target=target,
        balance_window=window,
    )
    x = torch.randn(64, 16)
    x[3], x[5] = float("nan"), float("inf")
    routing = router(x)
    router.step()
    others = torch.ones(64, dtype=torch.bool)
    others[[3, 5]] = False
    assert routing.weights_TK[others].isfinite().all()
    assert routing.weights_TK[3].isnan().any()
    for name, buffer in router.named_buffers():
        if buffer.is_floating_point():
            assert buffer.isfinite().all(), name
    assert router(torch.randn(64, 16)).weights_TK.isfinite().all()
    router.eval()
    assert router(torch.randn(64, 16)).weights_TK.isfinite().all()


@pytest.mark.parametrize("method", ["sigmoid", "sparse"])
@pytest.mark.parametrize("target", ["load", "mass"])
def test_balanced_gates_route_an_empty_batch(method, target):
    router = Router(16, 8, 2, gate="balanced_soft_topk", method=method, balance_target=target)
    routing = router(torch.randn(0, 16))
    assert routing.weights_TK.shape == (0, router.config.slots)
    assert routing.tokens_per_expert_E.sum() == 0
    router.step()
    assert router.balance_mu_E.isfinite().all()


def test_selection_without_padding_clears_exactly_the_padding_rows():
    torch.manual_seed(0)
    config = RouterConfig(8, 8, 2, gate="sparse_soft_topk", max_active=4)
    selection = run_gate(torch.randn(6, 8), config)
    padding_T = torch.tensor([False, True, False, False, True, False])
    cleared = selection.without_padding(padding_T)
    assert not cleared.valid_TK[padding_T].any() and (cleared.weights_TK[padding_T] == 0).all()
    assert (cleared.overflow_T[padding_T] == 0).all()
    assert (cleared.overflow_mass_T[padding_T] == 0).all()
    real_T = ~padding_T
    for name in ("expert_ids_TK", "weights_TK", "scores_TE", "valid_TK", "overflow_T"):
        assert torch.equal(getattr(cleared, name)[real_T], getattr(selection, name)[real_T])


def test_router_logits_jitter_only_the_gate_and_nan_a_non_finite_token():
    from moe_router.gates import input_jitter, router_logits

    torch.manual_seed(0)
    x_TD, weight_ED = torch.randn(5, 8), torch.randn(4, 8)
    x_TD[2, 3] = float("inf")
    clean_TE, same_TE = router_logits(x_TD, weight_ED)
    assert same_TE is clean_TE
    assert clean_TE[2].isnan().all() and clean_TE[[0, 1, 3, 4]].isfinite().all()
    torch.testing.assert_close(clean_TE[0], weight_ED @ x_TD[0])
    counter = torch.tensor(7)
    logits_TE, gate_TE = router_logits(x_TD, weight_ED, 0.1, counter)
    torch.testing.assert_close(logits_TE, clean_TE, equal_nan=True)
    jittered_TD = input_jitter(x_TD, 0.1, counter)
    torch.testing.assert_close(gate_TE[0], weight_ED @ jittered_TD[0])
    assert gate_TE[2].isnan().all() and not torch.equal(gate_TE[0], clean_TE[0])
    ratio_TD = jittered_TD[[0, 1, 3, 4]] / x_TD[[0, 1, 3, 4]]
    assert ratio_TD.min() >= 0.9 and ratio_TD.max() <= 1.1
