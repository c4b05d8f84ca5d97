"""Configs: every option belongs to the gates (or mechanism) that read it; keyword building."""

from __future__ import annotations

import re

import pytest
import torch

from moe_router import MoEConfig, MoELayer, Router, RouterConfig
from moe_router.config import (
    COMMON_OPTIONS,
    GATE_SPECS,
    GATES,
    MECHANISM_OPTIONS,
    ROUTER_OPTION_DEFAULTS,
    gates_reading,
    over_model_defaults,
)

# A valid value away from the default for every router option (E = 8, K = 2).
SET_VALUES = {
    "score_func": "sigmoid",
    "method": "laplace",
    "renormalize": True,
    "score_scale": 2.0,
    "max_active": 3,
    "target_active": 1.5,
    "budget_update_rate": 0.1,
    "balance_iters": 4,
    "balance_target": "mass",
    "balance_momentum": 0.5,
    "balance_window": 64,
    "tau": 0.5,
    "tau_schedule": "learned",
    "tau_final": 0.05,
    "anneal_steps": 10,
    "anneal_shape": "linear",
    "tau_min": 0.005,
    "jitter_eps": 0.1,
    "num_groups": 2,
    "topk_groups": 1,
    "aux_loss_coef": 0.01,
    "seq_aux_loss_coef": 0.01,
    "z_loss_coef": 0.001,
    "expert_bias": True,
    "bias_update_rate": 0.01,
    "relu_l1_init": 1e-6,
    "relu_l1_factor": 1.5,
    "init_std": 0.1,
}

# What a gate needs beside an option for the option's mechanism to be on.
ENABLING = {
    "tau_final": {"tau_schedule": "anneal", "anneal_steps": 10},
    "anneal_steps": {"tau_schedule": "anneal"},
    "anneal_shape": {"tau_schedule": "anneal", "anneal_steps": 10},
    "tau_min": {"tau_schedule": "learned"},
    "bias_update_rate": {"expert_bias": True},
    "budget_update_rate": {"target_active": 1.5},
    "topk_groups": {"num_groups": 2},
}


def test_every_option_has_a_value_here():
    assert set(SET_VALUES) == set(ROUTER_OPTION_DEFAULTS)
    for name, value in SET_VALUES.items():
        assert value != ROUTER_OPTION_DEFAULTS[name], name


UNREAD = [
    (gate, name)
    for gate in GATES
    for name in SET_VALUES
    if name not in COMMON_OPTIONS and name not in GATE_SPECS[gate].options
]


@pytest.mark.parametrize(("gate", "name"), UNREAD, ids=[f"{g}-{n}" for g, n in UNREAD])
def test_an_option_the_gate_does_not_read_is_refused(gate, name):
    message = (
        rf"^{name}={SET_VALUES[name]!r} is not read by gate='{gate}': it is an option of "
        + re.escape(", ".join(gates_reading(name)))
        + "$"
    )
    with pytest.raises(ValueError, match=message):
        RouterConfig(d_model=16, num_experts=8, k=2, gate=gate, **{name: SET_VALUES[name]})
    # the same through the layer's config
    with pytest.raises(ValueError, match=message):
        MoEConfig(16, 32, 8, 2, gate=gate, **{name: SET_VALUES[name]})


def test_the_issue_example_is_refused():
    with pytest.raises(ValueError, match="method='sparse' is not read by gate='topk'"):
        RouterConfig(8, 4, 1, gate="topk", method="sparse", balance_window=100)


# (gate, option, value, the other settings): read by the gate, but not with these settings.
MECHANISM_CASES = [
    ("soft_topk", "tau_final", 0.05, {}),
    ("soft_topk", "anneal_steps", 10, {}),
    ("soft_topk", "anneal_shape", "cosine", {}),
    ("soft_topk", "tau_min", 0.005, {}),
    ("soft_topk", "tau_min", 0.005, {"tau_schedule": "anneal", "anneal_steps": 5}),
    ("topk", "bias_update_rate", 0.01, {}),
    ("sparse_soft_topk", "budget_update_rate", 0.1, {}),
    ("balanced_soft_topk", "balance_momentum", 0.5, {"balance_window": 64}),
    ("balanced_soft_topk", "max_active", 3, {}),
    ("balanced_soft_topk", "target_active", 1.5, {"method": "exp"}),
    ("balanced_soft_topk", "expert_bias", True, {"method": "sparse"}),
    ("sparse_soft_topk", "method", "laplace", {}),
]


@pytest.mark.parametrize(("gate", "name", "value", "others"), MECHANISM_CASES)
def test_an_option_whose_mechanism_is_off_is_refused(gate, name, value, others):
    enabling = MECHANISM_OPTIONS[name][0]
    message = (
        rf"^{name}={value!r} is not read by gate='{gate}' with these settings: it is read "
        rf"only with {re.escape(enabling)}$"
    )
    with pytest.raises(ValueError, match=message):
        RouterConfig(16, 8, 2, gate=gate, **{name: value, **others})


def test_drop_policy_needs_a_capacity():
    with pytest.raises(ValueError, match="drop_policy='position' is not read by gate='topk'"):
        MoEConfig(16, 32, 8, 2, gate="topk", drop_policy="position")
    MoEConfig(16, 32, 8, 2, gate="topk", drop_policy="position", capacity_factor=1.0)


READ = [
    (gate, name)
    for gate in GATES
    for name in SET_VALUES
    if name in COMMON_OPTIONS or name in GATE_SPECS[gate].options
]


@pytest.mark.parametrize(("gate", "name"), READ, ids=[f"{g}-{n}" for g, n in READ])
def test_every_option_the_gate_reads_is_taken(gate, name):
    settings = {name: SET_VALUES[name], **ENABLING.get(name, {})}
    if gate == "balanced_soft_topk" and name in ("max_active", "target_active"):
        settings["method"] = "sparse"
    if gate == "sparse_soft_topk" and name == "method":
        settings["method"] = "sparse"
    if name == "budget_update_rate" and gate not in ("sparse_soft_topk", "balanced_soft_topk"):
        pytest.skip("a budget controller needs a support-exact gate")
    if name == "budget_update_rate" and gate == "balanced_soft_topk":
        settings["method"] = "sparse"
    config = RouterConfig(16, 8, 2, gate=gate, **settings)
    assert getattr(config, name) == settings[name]
    router = Router(config)
    router.train()
    routing = router(torch.randn(32, 16))
    assert routing.weights_TK.isfinite().all()


def test_keyword_construction():
    router = Router(d_model=16, num_experts=8, k=2, gate="soft_topk", tau=0.5)
    assert (router.config.d_model, router.config.num_experts, router.config.tau) == (16, 8, 0.5)
    layer = MoELayer(d_model=16, d_ff=32, num_experts=8, k=2, gate="topk")
    assert layer(torch.randn(3, 16)).shape == (3, 16)
    # positional sizes and a ready config still work, and give the same config
    assert MoELayer(16, 32, 8, 2, gate="topk").config == layer.config
    assert Router(RouterConfig(16, 8, 2, gate="soft_topk", tau=0.5)).config == router.config
    assert Router(config=router.config).config == router.config


def test_a_config_with_more_arguments_is_refused():
    config = RouterConfig(16, 8, 2)
    with pytest.raises(ValueError, match=r"takes no further arguments: set \['tau'\]"):
        Router(config, tau=0.5)
    with pytest.raises(ValueError, match="config must be a MoEConfig, got RouterConfig"):
        MoELayer(config=config)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (0.5, r"target_active=0.5 is invalid: None or a finite float >= 1"),
        (4.5, r"target_active=4.5 is invalid: a float <= max_active=4"),
    ],
)
def test_a_budget_target_outside_what_a_token_can_compute_is_refused(target, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(16, 8, 2, gate="sparse_soft_topk", target_active=target, max_active=4)


def test_soft_topk_dense_sizes_its_capacity_from_every_expert_it_dispatches():
    dense = MoEConfig(16, 32, 8, 2, gate="soft_topk_dense", capacity_factor=1.0)
    assert dense.capacity(64) == 64  # 64 tokens x 8 slots / 8 experts
    limited = MoEConfig(
        16, 32, 8, 2, gate="soft_topk_dense", capacity_factor=1.0, num_groups=4, topk_groups=2
    )
    assert limited.capacity(64) == 32  # 4 usable experts per token
    assert MoEConfig(16, 32, 8, 2, gate="topk", capacity_factor=1.0).capacity(64) == 16
    torch.manual_seed(0)
    layer = MoELayer(dense)
    _, routing = layer(torch.randn(64, 16), return_routing=True)
    assert routing.num_dropped == 0  # equal capacity for all: nothing dropped


def test_over_model_defaults_keeps_a_model_default_only_where_the_gate_reads_it():
    defaults = {"k": 2, "score_func": "sigmoid", "renormalize": True, "aux_loss_coef": 0.01}
    # topk reads all of them; the user's value wins.
    assert over_model_defaults("topk", defaults, {"aux_loss_coef": 0.0}) == {
        **defaults,
        "aux_loss_coef": 0.0,
    }
    # A soft gate reads no score_func: the model's value is dropped; the common options stay.
    assert over_model_defaults("soft_topk", defaults, {"tau": 0.5}) == {
        "k": 2,
        "renormalize": True,
        "aux_loss_coef": 0.01,
        "tau": 0.5,
    }
    # What the user sets is never dropped: the config refuses it, naming the gates that read it.
    kept = over_model_defaults("soft_topk", {"k": 2}, {"score_func": "sigmoid"})
    assert kept["score_func"] == "sigmoid"
    with pytest.raises(ValueError, match="score_func"):
        RouterConfig(8, 8, gate="soft_topk", **kept)
