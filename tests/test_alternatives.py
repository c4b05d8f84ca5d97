"""The routers users try instead of ours: ReMoE (``gate="relu"``) and Default MoE
(``default_moe_beta``, any gate). Loss-free balancing is ``topk`` + ``expert_bias``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import moe_router
from moe_router import MoELayer, Router
from moe_router.balancing import relu_l1_loss


def test_relu_gate_computes_exactly_the_positive_gates_up_to_its_slots():
    torch.manual_seed(0)
    router = Router(d_model=16, num_experts=8, k=2, gate="relu", init_std=0.5, max_active=4)
    routing = router(torch.randn(64, 16))
    gates_TE = routing.logits_TE.relu()
    torch.testing.assert_close(routing.scores_TE, gates_TE)
    computed_TE = torch.zeros(64, 8, dtype=torch.bool).scatter_(
        -1, routing.expert_ids_TK, routing.valid_TK
    )
    positive_T = (gates_TE > 0).sum(-1)
    # every computed expert has a positive gate; the positive ones past the 4 slots overflow
    assert (gates_TE[computed_TE] > 0).all()
    torch.testing.assert_close(computed_TE.sum(-1) + routing.overflow_T.long(), positive_T)
    assert (computed_TE.sum(-1) == positive_T.clamp_max(4)).all()
    weights_TE = torch.zeros(64, 8).scatter_add(-1, routing.expert_ids_TK, routing.weights_TK)
    torch.testing.assert_close(weights_TE, torch.where(computed_TE, gates_TE, 0.0))


def test_relu_l1_is_the_switch_formula_on_relu_gates():
    gates_TE = torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.0, 2.0, 0.5, 0.0]], requires_grad=True)
    loss = relu_l1_loss(gates_TE, k=2)
    # E * sum_e (sum_t g / T) * (n_e / (T K)) by hand: n = [1, 1, 2, 0], T = 2, K = 2
    mean_gate = torch.tensor([0.25, 1.0, 0.75, 0.0])
    expected = 4 * (mean_gate * torch.tensor([1.0, 1.0, 2.0, 0.0]) / 4).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (gates_TE.grad[:, :3] > 0).all()  # pushes every used gate down


def test_relu_controller_moves_its_coefficient_toward_the_target_sparsity():
    router = Router(16, 8, 2, gate="relu", init_std=0.5, relu_l1_init=1.0)
    router(torch.randn(64, 16))  # random logits: about half the gates > 0, denser than 2/8
    router.step()
    assert router.relu_sparsity.l1_coef.item() == pytest.approx(1.2)
    router.weight_ED.data.fill_(-1.0)  # every gate 0: sparser than the target
    router(torch.ones(64, 16))
    router.step()
    router.step()  # a step without tokens does not move it
    assert router.relu_sparsity.l1_coef.item() == pytest.approx(1.0)


def test_relu_training_reaches_the_target_sparsity():
    """With a task that wants open gates against the adaptive L1 penalty, the mean number of
    positive gates per token settles near K. (The inputs have a mean: with zero-mean inputs
    a linear router without bias opens about half the gates whatever its weight.)"""
    torch.manual_seed(0)
    router = Router(16, 8, 2, gate="relu", init_std=0.5, relu_l1_init=1e-3, relu_l1_factor=1.2)
    optimizer = torch.optim.SGD(router.parameters(), lr=0.05)
    target_TE = torch.randn(256, 8)
    x = torch.randn(256, 16) + 1.0
    active = []
    for _ in range(400):
        routing = router(x)
        task = -(routing.scores_TE * target_TE.sigmoid()).sum(-1).mean()
        (task + routing.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        router.step()
        active.append((routing.scores_TE > 0).float().sum(-1).mean().item())
    settled = sum(active[-100:]) / 100
    assert abs(settled - 2.0) < 0.3, settled


def make_layers(gate: str, **options):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2, gate=gate, default_moe_beta=0.5, **options)
    plain = MoELayer(16, 32, 8, 2, gate=gate, **options)
    plain.load_state_dict(layer.state_dict(), strict=False)
    return layer, plain


def expert_outputs_TED(layer: MoELayer, x_TD):
    """Every expert on every token: [T, E, D], the slow reference."""
    h_TEF = F.silu(torch.einsum("td,edf->tef", x_TD, layer.w1_EDF)) * torch.einsum(
        "td,edf->tef", x_TD, layer.w3_EDF
    )
    return torch.einsum("tef,efd->ted", h_TEF, layer.w2_EFD)


@pytest.mark.parametrize("gate", ["topk", "soft_topk", "sparse_soft_topk", "relu"])
@pytest.mark.parametrize("backend", ["auto", "grouped_mm"])
def test_default_moe_keeps_the_forward_and_fills_every_experts_gradient(gate, backend):
    layer, plain = make_layers(gate, backend=backend)
    if backend == "grouped_mm":  # the grouped path on CPU
        layer._use_per_slice = plain._use_per_slice = lambda x: False
    x_TD = torch.randn(48, 16)
    layer(x_TD).sum().backward()
    layer.router.step()  # the defaults now hold each expert's weighted mean output
    default_ED = layer.router.default_outputs.default_ED.clone()
    assert default_ED.abs().sum() > 0
    layer.zero_grad()
    y = layer(x_TD)
    y_plain = plain(x_TD)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)  # the forward is unchanged
    # Slow reference: the plain layer plus sum over non-computed experts of p * default.
    routing = moe_router.routings(plain)[""]
    computed_TE = torch.zeros(48, 8, dtype=torch.bool).scatter_(
        -1, routing.expert_ids_TK, routing.valid_TK
    )
    reference = y_plain + torch.where(computed_TE, 0.0, routing.scores_TE) @ default_ED
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    plain.zero_grad()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(layer.router.weight_ED.grad, plain.router.weight_ED.grad)
    for name in ("w1_EDF", "w3_EDF", "w2_EFD"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(plain, name).grad)


@pytest.mark.parametrize("backend", ["auto", "grouped_mm"])
def test_default_outputs_are_the_ema_of_each_experts_weighted_mean_output(backend):
    layer, _ = make_layers("topk", backend=backend)
    if backend == "grouped_mm":
        layer._use_per_slice = lambda x: False
    x_TD = torch.randn(40, 16)
    expected_ED = torch.zeros(8, 16)
    for _ in range(2):  # two micro-batches in one step
        _, routing = layer(x_TD, return_routing=True)
        with torch.no_grad():
            outputs_TED = expert_outputs_TED(layer, x_TD)
            weights_TE = torch.zeros(40, 8).scatter_add(
                -1, routing.expert_ids_TK, routing.weights_TK
            )
            expected_ED += torch.einsum("te,ted->ed", weights_TE, outputs_TED)
    weight_E = 2 * weights_TE.sum(0)
    layer.router.step()
    mean_ED = expected_ED / weight_E.unsqueeze(-1)
    expected = torch.where(weight_E.unsqueeze(-1) > 0, 0.5 * mean_ED, 0.0)
    torch.testing.assert_close(layer.router.default_outputs.default_ED, expected)


def test_default_moe_state_is_checkpointed_fp32_and_never_syncs_under_compile():
    layer, _ = make_layers("soft_topk")
    layer(torch.randn(32, 16)).sum().backward()
    layer.router.step()
    state = layer.state_dict()
    assert "router.default_outputs.default_ED" in state
    resumed = copy.deepcopy(layer)
    resumed.router.default_outputs.default_ED.zero_()
    resumed.load_state_dict(state)
    assert torch.equal(
        resumed.router.default_outputs.default_ED, state["router.default_outputs.default_ED"]
    )
    layer = layer.to(torch.bfloat16)
    assert layer.router.default_outputs.default_ED.dtype == torch.float32
    torch._dynamo.reset()
    layer = make_layers("topk")[0]
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(32, 16)).sum().backward()
    layer.router.step()
    assert layer.router.default_outputs.default_ED.abs().sum() > 0


def test_default_moe_is_a_layer_option_only():
    with pytest.raises(TypeError):
        Router(16, 8, 2, gate="topk", default_moe_beta=0.9)
    with pytest.raises(
        ValueError, match=r"default_moe_beta=1.0 is invalid: None or a float in \[0, 1\)"
    ):
        MoELayer(16, 32, 8, 2, gate="topk", default_moe_beta=1.0)
