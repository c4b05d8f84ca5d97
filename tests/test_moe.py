"""MoE layer: every dispatch path against a naive per-token loop (outputs and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_router import dispatch, experts, moe
from moe_router.moe import MoEConfig, MoELayer
from moe_router.router import GATES
from tests.test_dispatch import BACKENDS, reference_capacity_keep
from tests.test_router import needs_neg_inf_support

D, FF, E, K = 16, 32, 4, 2


def naive_moe(layer, x, padding_mask=None, router_state=None):
    """The obvious implementation: for each token, for each slot, run that expert.

    ``router_state``: buffers to restore first, so that a router whose training forward
    warm-starts from its last solve (``balanced_soft_topk``) routes as in the layer's forward.
    """
    if router_state is not None:
        for name, buffer in layer.router.named_buffers():
            buffer.copy_(router_state[name])
    routing = layer.router(x, padding_mask=padding_mask)
    x_TD = x.reshape(-1, layer.config.d_model)
    weights, valid = routing.weights_TK, routing.valid_TK
    capacity = layer.config.capacity(x_TD.shape[0])
    if capacity is not None:
        priority = None
        if layer.config.drop_policy == "score":
            priority = routing.scores_TE.detach().gather(-1, routing.expert_ids_TK)
        valid = reference_capacity_keep(
            routing.expert_ids_TK, valid, priority, layer.config.num_experts, capacity
        )
    rows = []
    for t in range(x_TD.shape[0]):
        row = torch.zeros(layer.config.d_model)
        for s in range(routing.expert_ids_TK.shape[1]):
            if not valid[t, s]:
                continue
            e = int(routing.expert_ids_TK[t, s])
            x_t = x_TD[t].float()
            hidden = F.silu(x_t @ layer.w1_EDF[e].float()) * (x_t @ layer.w3_EDF[e].float())
            row = row + weights[t, s] * (hidden @ layer.w2_EFD[e].float())
        if layer.shared_expert is not None:
            shared = layer.shared_expert
            x_t = x_TD[t].float()
            hidden = F.silu(x_t @ shared.w1_DF.float()) * (x_t @ shared.w3_DF.float())
            row = row + hidden @ shared.w2_FD.float()
        rows.append(row)
    return torch.stack(rows).view(x.shape), valid


def gradients(layer, x, out, seed=0):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(out.device)
    tensors = [x, *layer.parameters()]
    grads = torch.autograd.grad((out.float() * grad_out).sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]


def router_state(layer):
    """Every buffer of the layer's router (persistent or not), cloned."""
    return {name: buffer.clone() for name, buffer in layer.router.named_buffers()}


def make_layer(gate, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = MoELayer(D, FF, E, K, gate=gate, **kwargs)
    torch.nn.init.normal_(layer.router.weight_ED, std=0.5)  # well-separated routing
    return layer


VARIANTS = {
    "plain": {},
    "shared": {"shared_d_ff": 8},
    "capacity_score": {"capacity_factor": 0.75, "drop_policy": "score"},
    "capacity_position": {"capacity_factor": 0.75, "drop_policy": "position"},
    "renormalize": {"renormalize": True},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("gate", GATES)
def test_layer_matches_naive_loop(gate, variant, backend):
    layer = make_layer(gate, backend=backend, **VARIANTS[variant])
    x = torch.randn(3, 5, D, requires_grad=True)
    state = router_state(layer)
    y, routing = layer(x, return_routing=True)
    y_ref, valid_ref = naive_moe(layer, x, router_state=state)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(routing.valid_TK, valid_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(gradients(layer, x, y), gradients(layer, x, y_ref), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["topk", "soft_topk", "sparse_soft_topk"])
def test_layer_with_padding_matches_naive_loop(gate, backend):
    layer = make_layer(gate, backend=backend, shared_d_ff=8)
    x = torch.randn(2, 6, D, requires_grad=True)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 3:] = True
    y = layer(x, padding_mask=padding)
    y_ref, _ = naive_moe(layer, x, padding_mask=padding)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(gradients(layer, x, y), gradients(layer, x, y_ref), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_padding_tokens_get_zero_output_and_gradient_without_shared_expert():
    layer = make_layer("soft_topk")
    x = torch.randn(2, 6, D, requires_grad=True)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 2:] = True
    y, routing = layer(x, padding_mask=padding, return_routing=True)
    assert (y[padding] == 0).all()
    (y * torch.randn_like(y)).sum().backward()
    assert (x.grad[padding] == 0).all() and (x.grad[~padding] != 0).any()
    assert routing.tokens_per_expert_E.sum().item() == (~padding).sum().item() * K


class _NaNTail(torch.autograd.Function):
    """Identity on rows [0, end); NaN on the rows past it, in forward and in backward."""

    @staticmethod
    def forward(ctx, rows, end):
        ctx.end = end
        return torch.where(torch.arange(rows.shape[0]).unsqueeze(-1) < end, rows, torch.nan)

    @staticmethod
    def backward(ctx, grad):
        tail = torch.arange(grad.shape[0]).unsqueeze(-1) >= ctx.end
        return torch.where(tail, torch.nan, grad), None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("gate", "options"),
    [
        ("sparse_soft_topk", {"max_active": 4, "tau": 0.05}),
        ("topk", {"capacity_factor": 0.5}),
        ("soft_topk", {}),  # with padding below
    ],
)
def test_rows_past_the_slices_never_leak(gate, options, backend, monkeypatch):
    # The grouped kernel leaves rows past the last expert slice uninitialised, in forward and
    # backward. Make them NaN on purpose (both ways) and check that nothing reaches y or any
    # gradient, and that the result still matches the naive loop.
    real = experts.grouped_matmul

    def nan_tail_matmul(x, w, offsets, backend="auto", **kwargs):
        end = int(offsets[-1])
        return _NaNTail.apply(real(_NaNTail.apply(x, end), w, offsets, backend, **kwargs), end)

    monkeypatch.setattr(experts, "grouped_matmul", nan_tail_matmul)
    layer = make_layer(gate, backend=backend, **options)
    x = torch.randn(4, 16, D, requires_grad=True)
    padding = torch.zeros(4, 16, dtype=torch.bool)
    padding[:, 12:] = True
    y, routing = layer(x, padding_mask=padding, return_routing=True)
    assert (~routing.valid_TK).any()
    grads = gradients(layer, x, y)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    y_ref, _ = naive_moe(layer, x, padding_mask=padding)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, gradients(layer, x, y_ref), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "gate", ["topk", pytest.param("soft_topk_dense", marks=needs_neg_inf_support)]
)
def test_group_limited_layer_matches_naive_loop(gate):
    layer = make_layer(gate, num_groups=4, topk_groups=3)
    x = torch.randn(12, D, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    if gate == "soft_topk_dense":  # the masked group's expert carries no compute
        assert routing.valid_TK.sum(-1).eq(3).all()
    y_ref, _ = naive_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(gradients(layer, x, y), gradients(layer, x, y_ref), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_layer_module_reexports_its_parts():
    """``moe_router.moe`` stays the import path of the layer's public pieces."""
    assert moe.SwiGLU is experts.SwiGLU
    for name in ("capacity_keep_mask", "grouped_matmul", "grouped_mm_available", "slice_sizes"):
        assert getattr(moe, name) is getattr(dispatch, name), name
    assert set(moe.__all__) <= set(dir(moe))


def test_two_dim_input_and_from_config():
    cfg = MoEConfig(D, FF, E, K, gate="topk", shared_d_ff=4, score_func="sigmoid")
    layer = MoELayer.from_config(cfg)
    assert layer.router.config.score_func == "sigmoid" and layer.shared_expert is not None
    x = torch.randn(7, D)
    assert layer(x).shape == (7, D)


def test_bf16_layer_returns_bf16_close_to_fp32_reference():
    layer = make_layer("soft_topk").to(torch.bfloat16)
    x = torch.randn(4, 8, D, dtype=torch.bfloat16)
    y, routing = layer(x, return_routing=True)
    assert y.dtype == torch.bfloat16 and routing.weights_TK.dtype == torch.float32
    y_ref, _ = naive_moe(layer, x)  # same routing (router math is fp32), fp32 experts
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("policy", ["score", "position"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_are_counted_exactly(policy, capacity_factor):
    layer = make_layer("topk", capacity_factor=capacity_factor, drop_policy=policy)
    torch.nn.init.normal_(layer.router.weight_ED, std=2.0)  # unbalanced on purpose
    x = torch.randn(40, D)
    _, routing = layer(x, return_routing=True)
    capacity = math.ceil(capacity_factor * 40 * K / E)
    assert routing.capacity == capacity
    loads = routing.tokens_per_expert_E  # what the router asked for, before drops
    expected_dropped = (loads - capacity).clamp_min(0).sum()
    assert routing.num_dropped.item() == expected_dropped.item()
    kept = torch.zeros(E).index_add_(
        0, routing.expert_ids_TK.flatten(), routing.valid_TK.flatten().float()
    )
    torch.testing.assert_close(kept, loads.clamp_max(capacity))
    assert (routing.weights_TK[routing.dropped_TK] == 0).all()
    assert not (routing.dropped_TK & routing.valid_TK).any()


def test_dropless_layer_reports_no_drops():
    _, routing = make_layer("topk")(torch.randn(9, D), return_routing=True)
    assert routing.dropped_TK is None and routing.num_dropped.item() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_ff": 0}, "d_ff=0"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"capacity_factor": float("nan")}, "capacity_factor=nan"),
        ({"drop_policy": "random"}, "drop_policy='random'"),
        ({"backend": "cuda"}, "backend='cuda'"),
        ({"shared_d_ff": -1}, "shared_d_ff=-1"),
        ({"gate": "hash"}, "gate='hash'"),
        ({"k": 5}, "k=5"),
        ({"k": 0}, "k=0"),
        ({"tau": -1.0}, "tau=-1.0"),
    ],
)
def test_bad_layer_config_raises(kwargs, match):
    settings = {"d_model": D, "d_ff": FF, "num_experts": E, "k": K, **kwargs}
    positional = [settings.pop(name) for name in ("d_model", "d_ff", "num_experts", "k")]
    with pytest.raises(ValueError, match=match):
        MoELayer(*positional, **settings)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["topk", "soft_topk", "sparse_soft_topk"])
def test_cuda_grouped_kernel_matches_loop(gate):
    torch.manual_seed(0)
    layer = MoELayer(64, 128, 8, 2, gate=gate, backend="auto").cuda().to(torch.bfloat16)
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    grads = gradients(layer, x, y)
    layer.config.backend = "loop"
    y_loop = layer(x)
    grads_loop = gradients(layer, x, y_loop)
    torch.testing.assert_close(y, y_loop, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads, grads_loop, strict=True):
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("gate", ["topk", "sparse_soft_topk"])
def test_sum_backward_through_the_grouped_kernel(gate):
    # y.sum() hands the graph an expanded (stride-0) gradient, which the grouped kernel's
    # backward rejects if it ever reaches it unmaterialised.
    layer = make_layer(gate, backend="grouped_mm")
    x = torch.randn(10, D, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.w2_EFD.grad).all()


def test_topk_layer_compiles_without_graph_breaks():
    # Guards the "no host sync / no data-dependent Python" rule of the dispatch (capacity and
    # padding included); soft gates add only the soft_topk op, which is tested on its own.
    layer = make_layer("topk", capacity_factor=1.0)
    x = torch.randn(4, 6, D)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[0, 3:] = True
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, padding_mask=padding), layer(x, padding_mask=padding))


# ------------------------------------------------------------ nothing silent


def test_nan_in_a_padding_token_reaches_nothing():
    # Padding is excluded by selection, not by multiplication: a NaN there stays there.
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2, gate="soft_topk", z_loss_coef=1e-3, aux_loss_coef=1e-2)
    x = torch.randn(2, 5, 16)
    x[0, 3] = float("nan")
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3] = True
    y, routing = layer(x, padding_mask=padding, return_routing=True)
    assert torch.isfinite(y).all() and (y[0, 3] == 0).all()
    assert torch.isfinite(routing.weights_TK).all() and torch.isfinite(routing.logits_TE).all()
    assert all(torch.isfinite(v) for v in routing.aux_losses.values())
    loss = torch.where(padding.unsqueeze(-1), 0.0, y).sum() + routing.aux_loss
    loss.backward()
    for name, param in layer.named_parameters():
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("shape", [(0, D), (0, 4, D), (3, 0, D)])
def test_empty_batches_give_empty_outputs_and_zero_losses(shape):
    layer = MoELayer(D, FF, E, K, z_loss_coef=1e-3, aux_loss_coef=1e-2, seq_aux_loss_coef=1e-2)
    y, routing = layer(torch.randn(*shape), return_routing=True)
    assert y.shape == shape
    assert set(routing.aux_losses) == {"load_balance", "seq_load_balance", "z_loss"}
    for value in routing.aux_losses.values():
        assert value.item() == 0.0


def test_padding_mask_must_be_a_bool_tensor():
    layer = MoELayer(D, FF, E, K)
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor, got list"):
        layer(torch.randn(2, D), padding_mask=[False, True])
    with pytest.raises(ValueError, match="got torch.float32"):
        layer(torch.randn(2, D), padding_mask=torch.zeros(2))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gate", "options", "grouped_path"),
    [("topk", {"capacity_factor": 1.0}, False), ("soft_topk", {}, False), ("topk", {}, True)],
)
def test_layer_compiles_with_inductor_forward_and_backward(
    gate, options, grouped_path, monkeypatch
):
    # The loops over expert slices (the CPU per-expert path; the grouped path's fallback where
    # torch's grouped kernel does not trace, e.g. fp32) use host-side slice sizes. Reading them
    # once per matmul gave inductor unrelated sets of unbacked sizes and its backward codegen
    # failed ("expected [u6, u7] to have been codegen-ed"); the layer reads them once.
    torch._dynamo.reset()
    if grouped_path:
        monkeypatch.setattr(MoELayer, "_use_per_slice", lambda self, x: False, raising=False)
    layer = make_layer(gate, **options)
    x = torch.randn(4, 6, D, requires_grad=True)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[0, 3:] = True
    compiled = torch.compile(layer, fullgraph=True)  # the default backend, inductor
    y = compiled(x, padding_mask=padding)
    y_ref = layer(x, padding_mask=padding)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(gradients(layer, x, y), gradients(layer, x, y_ref), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("drop_policy", ["score", "position"])
def test_inductor_keeps_the_capacity_drops(drop_policy):
    """A compiled layer drops what the eager one drops, in training and under no_grad (the
    inverse permutation of capacity_keep_mask was once a scatter that inductor scheduled after
    its reader, so every assignment was kept)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 8, 2, gate="topk", capacity_factor=1.0, drop_policy=drop_policy)
    x = torch.randn(24, 16)
    compiled = torch.compile(layer)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            y, routing = layer(x, return_routing=True)
            y_compiled, routing_compiled = compiled(x, return_routing=True)
        assert routing.num_dropped > 0
        assert torch.equal(routing_compiled.dropped_TK, routing.dropped_TK), mode
        torch.testing.assert_close(y_compiled, y, rtol=1e-5, atol=1e-6)
