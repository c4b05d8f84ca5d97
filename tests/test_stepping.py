"""Routers step themselves: one call (or one optimizer hook) for all per-step router state."""

import warnings

import pytest
import torch
from torch import nn

import moe_router
from moe_router import (
    MoEConfig,
    MoELayer,
    Router,
    RouterConfig,
    register_optimizer_hooks,
    routers,
    step_routers,
)
from moe_router.router import UNSTEPPED_WARN_AFTER

STATEFUL = {
    "expert_bias": True,
    "bias_update_rate": 0.05,
    "tau_schedule": "anneal",
    "tau_final": 0.1,
    "anneal_steps": 10,
}


class TwoLayers(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.first = MoELayer(16, 32, 4, 1, gate="soft_topk", **options)
        self.second = MoELayer(16, 32, 4, 1, gate="soft_topk", **options)

    def forward(self, x):
        return self.second(self.first(x))


def test_hook_steps_every_router_like_a_manual_replay():
    torch.manual_seed(0)
    model = TwoLayers(**STATEFUL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = register_optimizer_hooks(optimizer, model)
    expected_bias = [torch.zeros(4), torch.zeros(4)]
    for _ in range(3):
        loads = []
        for _ in range(2):  # two micro-batches per optimizer step
            x = torch.randn(32, 16)
            y1, r1 = model.first(x, return_routing=True)
            _, r2 = model.second(y1, return_routing=True)
            loads.append((r1.tokens_per_expert_E, r2.tokens_per_expert_E))
            (y1.square().mean()).backward()
        for index in range(2):
            load_E = loads[0][index] + loads[1][index]
            bias_E = expected_bias[index] + 0.05 * torch.sign(load_E.mean() - load_E)
            expected_bias[index] = bias_E - bias_E.mean()
        optimizer.step()
        optimizer.zero_grad()
    for layer, bias_E in zip((model.first, model.second), expected_bias, strict=True):
        torch.testing.assert_close(layer.router.expert_bias.bias_E, bias_E)
        assert int(layer.router.schedule_step) == 3
        assert not layer.router.expert_bias.pending_load_E.any()
    handle.remove()
    optimizer.step()
    assert int(model.first.router.schedule_step) == 3  # removed: no more steps


def test_step_routers_finds_nested_routers_and_counts_them():
    model = TwoLayers(**STATEFUL)
    assert routers(model) == [model.first.router, model.second.router]
    assert step_routers(model) == 2
    assert int(model.second.router.schedule_step) == 1
    with pytest.raises(ValueError, match="holds no moe_router Router"):
        register_optimizer_hooks(
            torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), nn.Linear(2, 2)
        )


def test_an_unstepped_stateful_router_warns_once():
    router = Router(8, 4, 1, gate="topk", expert_bias=True)
    with pytest.warns(UserWarning, match="without a step"):
        for _ in range(UNSTEPPED_WARN_AFTER + 5):
            router(torch.randn(4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(UNSTEPPED_WARN_AFTER + 5):
            router(torch.randn(4, 8))  # once only


def test_stepped_or_stateless_routers_never_warn():
    stepped = Router(8, 4, 1, gate="topk", expert_bias=True)
    stateless = Router(8, 4, 1, gate="topk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3 * UNSTEPPED_WARN_AFTER):
            stepped(torch.randn(4, 8))
            stepped.step()
            stateless(torch.randn(4, 8))
        stepped.eval()
        for _ in range(3 * UNSTEPPED_WARN_AFTER):
            stepped(torch.randn(4, 8))  # evaluation forwards need no step


def test_modules_take_their_config():
    config = RouterConfig(8, 4, 1, gate="topk", score_func="sigmoid")
    assert Router(config).config is config
    layer_config = MoEConfig(8, 16, 4, 1, gate="sparse_soft_topk", target_active=1.5)
    layer = MoELayer(layer_config)
    assert layer.config is layer_config and layer.router.config.target_active == 1.5
    with pytest.raises(ValueError, match="takes no further arguments"):
        Router(config, 4, 1)
    with pytest.raises(ValueError, match="takes no further arguments"):
        MoELayer(layer_config, tau=0.5)


def test_a_second_hook_for_the_same_routers_is_refused():
    layer = MoELayer(8, 16, 4, 2, gate="soft_topk", tau_schedule="anneal", anneal_steps=10)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    handle = moe_router.register_optimizer_hooks(optimizer, layer)
    with pytest.raises(ValueError, match="already has routers stepped by an optimizer hook"):
        moe_router.register_optimizer_hooks(optimizer, layer)
    with pytest.raises(ValueError, match="already has routers stepped"):
        moe_router.register_optimizer_hooks(torch.optim.SGD(layer.parameters(), lr=0.1), layer)
    layer(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    assert int(layer.router.schedule_step) == 1  # once per optimizer step
    handle.remove()
    moe_router.register_optimizer_hooks(optimizer, layer).remove()  # free again


def test_stepping_something_that_is_not_a_module_is_a_clear_error():
    with pytest.raises(ValueError, match="model must be an nn.Module, got str"):
        moe_router.step_routers("str")
