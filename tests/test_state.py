"""Per-step state components: one protocol, warnings, exact checkpoints, fp32."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from moe_router import Router, register_optimizer_hooks, step_routers
from moe_router.router import UNSTEPPED_WARN_AFTER
from moe_router.state import RouterState

# Every mechanism that holds per-step state, as router settings (E = 8, K = 2).
STATEFUL = {
    "expert_bias": {"gate": "topk", "expert_bias": True},
    "anneal": {"gate": "soft_topk", "tau_schedule": "anneal", "anneal_steps": 10},
    "budget": {"gate": "sparse_soft_topk", "target_active": 2.5},
    "balanced": {"gate": "balanced_soft_topk"},
    "balanced_mass": {"gate": "balanced_soft_topk", "balance_target": "mass"},
    "balanced_window": {"gate": "balanced_soft_topk", "balance_window": 48},
    "balanced_sparse_budget": {
        "gate": "balanced_soft_topk",
        "method": "sparse",
        "target_active": 2.5,
        "balance_window": 48,
    },
    "sparse_bias": {"gate": "sparse_soft_topk", "expert_bias": True},
    "relu": {"gate": "relu", "relu_l1_init": 1e-3},
}


def make(settings: dict, seed: int = 0) -> Router:
    torch.manual_seed(seed)
    return Router(16, 8, 2, init_std=0.5, **settings)


@pytest.mark.parametrize("name", STATEFUL)
def test_every_stateful_router_warns_when_never_stepped(name):
    router = make(STATEFUL[name])
    assert router.states() and all(state.needs_step for state in router.states())
    with pytest.warns(UserWarning, match="without a step"):
        for _ in range(UNSTEPPED_WARN_AFTER):
            router(torch.randn(32, 16))


@pytest.mark.parametrize("name", STATEFUL)
def test_stepped_routers_do_not_warn(name):
    router = make(STATEFUL[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(UNSTEPPED_WARN_AFTER + 2):
            router(torch.randn(32, 16))
            router.step()


def test_stateless_router_holds_no_component():
    assert make({"gate": "soft_topk", "tau": 0.5}).states() == []


def train(router: Router, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _ in range(2):  # two micro-batches per step
            x = torch.randn(32, 16, generator=generator) + torch.linspace(-1, 1, 16)
            router(x).weights_TK.sum().backward()
        step_routers(router)


@pytest.mark.parametrize("name", STATEFUL)
def test_resume_from_a_state_dict_is_bit_exact(name):
    uninterrupted = make(STATEFUL[name])
    train(uninterrupted, 3, seed=1)
    saved = copy.deepcopy(uninterrupted.state_dict())
    train(uninterrupted, 3, seed=2)

    resumed = make(STATEFUL[name], seed=123)  # another init: everything comes from the dict
    resumed.load_state_dict(saved)
    train(resumed, 3, seed=2)
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    x = torch.randn(16, 16)
    for mode in ("train", "eval"):
        getattr(uninterrupted, mode)()
        getattr(resumed, mode)()
        with torch.no_grad():
            a, b = uninterrupted(x), resumed(x)
        assert torch.equal(a.weights_TK, b.weights_TK) and torch.equal(
            a.expert_ids_TK, b.expert_ids_TK
        )


@pytest.mark.parametrize("name", STATEFUL)
def test_state_stays_fp32_under_a_cast(name):
    router = make(STATEFUL[name])
    train(router, 1, seed=0)
    before = {key: value.clone() for key, value in router.state_dict().items()}
    router = router.to(torch.bfloat16)
    assert router.weight_ED.dtype == torch.bfloat16
    for state in router.states():
        for key, buffer in state.named_buffers():
            if buffer.is_floating_point():
                assert buffer.dtype == torch.float32, (type(state).__name__, key)
    for key, value in router.state_dict().items():
        if key != "weight_ED":
            assert torch.equal(value, before[key]), key  # moved, never rounded


def test_the_earlier_flat_checkpoint_layout_loads():
    router = make(STATEFUL["balanced_window"])
    train(router, 2, seed=0)
    flat = {
        "weight_ED": router.weight_ED.detach().clone(),
        "schedule_step": torch.tensor(0),  # always saved before, read by nothing here
        "balance_mu_E": router.balance.mu_E.clone(),
        "window_logits_WE": router.balance.window_logits_WE.clone(),
        "window_mask_W": router.balance.window_mask_W.clone(),
        "window_pos": router.balance.window_pos.clone(),
    }
    loaded = make(STATEFUL["balanced_window"], seed=5)
    loaded.load_state_dict(flat)
    assert torch.equal(loaded.balance_mu_E, router.balance_mu_E)
    assert torch.equal(loaded.balance.window_logits_WE, router.balance.window_logits_WE)
    budget = make(STATEFUL["budget"])
    budget.load_state_dict({"weight_ED": budget.weight_ED.detach(), "budget": torch.tensor(1.7)})
    assert budget.budget.item() == pytest.approx(1.7)


def test_a_component_follows_device_moves_but_not_casts():
    class Counter(RouterState):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("total", torch.tensor(1.0 + 2**-20))

        def step(self) -> None:
            self.total += 1

    counter = Counter().to(torch.float16).to("meta")
    assert counter.total.dtype == torch.float32 and counter.total.is_meta
    counter = Counter().half()
    assert counter.total.item() == 1.0 + 2**-20


def test_a_compiled_stateful_router_never_stepped_warns():
    torch._dynamo.reset()
    router = make(STATEFUL["balanced"])
    optimizer = torch.optim.SGD(router.parameters(), lr=0.01)
    compiled = torch.compile(router, backend="aot_eager")
    with pytest.warns(UserWarning, match="compiled training forwards over 64 optimizer steps"):
        for _ in range(UNSTEPPED_WARN_AFTER):
            compiled(torch.randn(32, 16)).weights_TK.sum().backward()
            optimizer.step()


def test_a_compiled_router_stepped_by_the_hook_does_not_warn():
    torch._dynamo.reset()
    router = make(STATEFUL["budget"])
    optimizer = torch.optim.SGD(router.parameters(), lr=0.01)
    handle = register_optimizer_hooks(optimizer, router)
    compiled = torch.compile(router, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without a step")
        for _ in range(UNSTEPPED_WARN_AFTER + 2):
            compiled(torch.randn(32, 16)).weights_TK.sum().backward()
            optimizer.step()
    handle.remove()
