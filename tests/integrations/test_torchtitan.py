"""moe_router routers inside torchtitan's MoE models (torchtitan 0.3.x, CPU).

The ``topk`` gate must reproduce torchtitan's router in every shipped family's settings, on
configs before ``build()`` and on built models; the soft gates must run through torchtitan's
MoE (fixed slot count) and its expert-parallel dispatch; one mechanism alone steps the expert
bias; the router state survives torchtitan's DCP checkpointing.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

torchtitan = pytest.importorskip("torchtitan")

import titan_testing as tt  # noqa: E402
from distributed_testing import gloo_group, run_ranks  # noqa: E402
from torchtitan.models.common.moe import MoE, TokenChoiceTopKRouter  # noqa: E402

import moe_router  # noqa: E402
from moe_router.integrations.torchtitan import (  # noqa: E402
    MoERouter,
    register_step_hook,
    replace_routers,
    router_aux_loss,
    routings,
    spread_padding,
)

# (family, flavor) whose router settings the topk gate must reproduce: every routing feature
# torchtitan 0.3 ships (softmax / sigmoid, route_norm, route_scale, node-limited groups with
# either score, gpt-oss's gate bias). qwen3_5 is left out: importing it needs
# flash-linear-attention (fla), whose kernels are Triton-only; its router is qwen3's.
FLAVORS = [
    ("qwen3", "30B-A3B"),  # softmax, route_norm, E 128, K 8
    ("deepseek_v3", "debugmodel"),  # softmax, E 8, K 3
    ("deepseek_v3", "236B"),  # softmax over all E, groups 8 / 3, route_scale 16
    ("deepseek_v3", "671B"),  # sigmoid, groups 8 / 4, route_norm, route_scale 2.5
    ("kimi_k2_7", "moonlight-16B-A3B"),  # sigmoid, route_norm, route_scale 2.446
    ("gpt_oss", "20b"),  # softmax, route_norm, gate with a bias
]
ATOL = RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def first_moe_config(family: str, flavor: str):
    """The config of a flavor's first MoE layer."""
    spec = tt.model_spec(family, flavor)
    _, moe_config, _, _ = next(iter(spec.model.traverse(MoE.Config)))
    return moe_config


def assert_same_routing(ours: tuple, theirs: tuple) -> None:
    """Compare two routers' ``(weights, ids, scores)`` up to the order of the K slots."""
    order_ours, order_theirs = ours[1].argsort(-1), theirs[1].argsort(-1)
    assert torch.equal(ours[1].gather(-1, order_ours), theirs[1].gather(-1, order_theirs))
    torch.testing.assert_close(
        ours[0].gather(-1, order_ours), theirs[0].gather(-1, order_theirs), atol=ATOL, rtol=RTOL
    )


# --------------------------------------------------------------------------------- packaging


def test_import_moe_router_does_not_import_torchtitan():
    code = (
        "import sys, moe_router, moe_router.integrations; "
        "assert 'torchtitan' not in sys.modules, 'torchtitan imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ reproduction


@pytest.mark.parametrize(("family", "flavor"), FLAVORS)
def test_topk_reproduces_torchtitans_router(family, flavor):
    """Selection, weights and their gradients (to the input, the gate weight and bias), with a
    non-zero expert bias, against torchtitan's TokenChoiceTopKRouter of that flavor."""
    moe_config = first_moe_config(family, flavor)
    config = moe_config.router
    torch.manual_seed(0)
    theirs = config.build()
    theirs.init_states()
    new_config = replace_routers(moe_config, gate="topk").router
    assert isinstance(new_config, MoERouter.Config)
    ours = new_config.build()
    ours.gate = copy.deepcopy(theirs.gate)
    bias_E = 0.02 * torch.randn(config.num_experts, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours.moe_router.expert_bias.bias_E.copy_(bias_E)
    x_BLD = torch.randn(4, 16, config.gate.in_features, generator=torch.Generator().manual_seed(1))
    results = []
    for router, bias in ((ours, None), (theirs, bias_E)):
        x = x_BLD.clone().requires_grad_()
        weights_BLK, ids_BLK, scores_BLE = router(x, bias)
        order = ids_BLK.argsort(-1)  # torchtitan's topk is unsorted
        cotangent_BLK = torch.arange(1.0, ids_BLK.shape[-1] + 1)
        (weights_BLK.gather(-1, order) * cotangent_BLK).sum().backward()
        params = [router.gate.weight] + ([router.gate.bias] if router.gate.bias is not None else [])
        results.append((weights_BLK, ids_BLK, x.grad, [p.grad for p in params]))
    (w_ours, ids_ours, gx_ours, gp_ours), (w_theirs, ids_theirs, gx_theirs, gp_theirs) = results
    assert_same_routing((w_ours, ids_ours), (w_theirs, ids_theirs))
    torch.testing.assert_close(gx_ours, gx_theirs, atol=ATOL, rtol=RTOL)
    for g_ours, g_theirs in zip(gp_ours, gp_theirs, strict=True):
        torch.testing.assert_close(g_ours, g_theirs, atol=ATOL, rtol=RTOL)


MODELS = [("deepseek_v3", "debugmodel", 2), ("qwen3", "debugmodel_moe", 1)]


@pytest.mark.parametrize(("family", "flavor", "num_layers"), MODELS)
@pytest.mark.parametrize("path", ["built", "config"])
def test_topk_reproduces_the_model(family, flavor, num_layers, path):
    """Logits and every gradient of a whole torchtitan model, patched after ``build()`` (the
    gate weights kept) or on its config before (same seed, same weights)."""
    spec = tt.model_spec(family, flavor, num_layers)
    theirs = tt.build(spec.model, seed=0)
    tt.randomize_expert_bias(theirs)
    if path == "built":
        ours = replace_routers(copy.deepcopy(theirs), gate="topk")
    else:
        spec_ours = tt.model_spec(family, flavor, num_layers)
        ours = tt.build(replace_routers(spec_ours.model, gate="topk"), seed=0)
        assert all(m.expert_bias_E is None for m in ours.modules() if isinstance(m, MoE))
        with torch.no_grad():  # the bias torchtitan would have reached, in its new home
            for ours_moe, their_moe in zip(_moes(ours), _moes(theirs), strict=True):
                ours_moe.router.moe_router.expert_bias.bias_E.copy_(their_moe.expert_bias_E)
    assert all(isinstance(m.router, MoERouter) for m in _moes(ours))
    tokens_BL = tt.tokens()
    outputs = []
    for model in (ours, theirs):
        logits = tt.forward(model, tokens_BL)
        tt.loss_of(logits).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        outputs.append((logits.detach(), grads))
    (logits_ours, grads_ours), (logits_theirs, grads_theirs) = outputs
    torch.testing.assert_close(logits_ours, logits_theirs, atol=ATOL, rtol=RTOL)
    assert grads_ours.keys() == grads_theirs.keys()
    for name, grad in grads_ours.items():
        torch.testing.assert_close(grad, grads_theirs[name], atol=ATOL, rtol=RTOL, msg=name)


def test_gpt_oss_moe_runs_in_bf16():
    """gpt-oss's own MoE and experts with a soft gate. Its experts return bf16 whatever the
    input, which torchtitan's combine cannot add into fp32 activations, so the layer runs in
    bf16 as under FSDP's bf16 parameters (its router is checked in fp32 above)."""
    moe_config = first_moe_config("gpt_oss", "debugmodel")
    replace_routers(moe_config, gate="balanced_soft_topk")
    moe = tt.build(moe_config, seed=0).to(torch.bfloat16)
    x_BLD = torch.randn(2, 16, moe_config.router.gate.in_features, dtype=torch.bfloat16)
    x_BLD.requires_grad_()
    out_BLD = moe(x_BLD)
    out_BLD.float().square().sum().backward()
    assert out_BLD.dtype == torch.bfloat16 and torch.isfinite(out_BLD).all()
    assert moe.router.gate.bias.grad.abs().sum() > 0
    assert moe.router.moe_router.last_routing.weights_TK.dtype == torch.float32


def _moes(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


# ---------------------------------------------------------------------------- other gates


def test_config_path_replaces_every_router():
    spec = tt.model_spec("qwen3", "debugmodel_moe")
    num_moe = len(list(spec.model.traverse(MoE.Config)))
    replace_routers(spec, gate="sparse_soft_topk", max_active=12)
    routers = [cfg for _, cfg, _, _ in spec.model.traverse(TokenChoiceTopKRouter.Config)]
    assert len(routers) == num_moe == 8
    assert all(isinstance(cfg, MoERouter.Config) for cfg in routers)
    for _, moe_config, _, _ in spec.model.traverse(MoE.Config):
        assert moe_config.load_balance_coeff is None
        assert moe_config.routed_experts.token_dispatcher.top_k == 12
        assert moe_config.router.moe_options["renormalize"] is True  # route_norm kept
        assert "score_func" not in moe_config.router.moe_options  # not read by a soft gate
    assert spec.post_optimizer_build_fn is register_step_hook


def test_variable_support_pads_to_the_slot_count():
    """sparse_soft_topk gives torchtitan max_active slots, zero weight where no expert is;
    the MoE output is the weighted sum over the valid slots only."""
    spec = tt.model_spec("deepseek_v3", "debugmodel", 2)
    replace_routers(spec.model, gate="sparse_soft_topk", tau=0.05, max_active=6)
    model = tt.build(spec.model, seed=0)
    moe = model.layers["1"].moe
    assert moe.routed_experts.token_dispatcher.top_k == moe.router.slots == 6
    x_BLD = torch.randn(2, 16, 256, requires_grad=True)
    out_BLD = moe(x_BLD)
    out_BLD.square().sum().backward()
    routing = moe.router.moe_router.last_routing
    assert (routing.weights_TK[~routing.valid_TK] == 0).all()
    assert (~routing.valid_TK).any() and routing.valid_TK.sum(-1).min() >= 1
    ids_TK = routing.expert_ids_TK
    # What torchtitan dispatches: the padding slots moved to experts the token does not use.
    dispatched_TK = spread_padding(ids_TK, routing.valid_TK, 8)
    assert torch.equal(dispatched_TK[routing.valid_TK], ids_TK[routing.valid_TK])
    assert (dispatched_TK.sort(-1).values.diff(dim=-1) > 0).all()  # distinct per token
    # The same layer by hand, bf16 experts as GroupedExperts runs them.
    experts = moe.routed_experts.inner_experts
    x_TD = x_BLD.detach().reshape(-1, 256)
    expected_TD = moe.shared_experts(x_BLD.detach()).reshape(-1, 256)
    for slot in range(ids_TK.shape[1]):
        w1, w2, w3 = (
            w[ids_TK[:, slot]].bfloat16() for w in (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)
        )
        xb = x_TD.bfloat16().unsqueeze(-1)
        h = torch.nn.functional.silu(w1 @ xb) * (w3 @ xb)
        y_TD = (w2 @ h).squeeze(-1).float()
        expected_TD += routing.weights_TK[:, slot, None].detach() * y_TD
    torch.testing.assert_close(out_BLD.detach().reshape(-1, 256), expected_TD, atol=2e-2, rtol=2e-2)
    assert torch.isfinite(x_BLD.grad).all()


def test_padding_slots_are_spread_over_the_experts():
    """topk over p's zeros would put every padding slot on a few experts (one EP rank)."""
    gen = torch.Generator().manual_seed(0)
    valid_TK = torch.rand(4096, 6, generator=gen).sort(-1, descending=True).values > 0.5
    ids_TK = torch.rand(4096, 64, generator=gen).argsort(-1)[:, :6]  # distinct per token
    spread_TK = spread_padding(ids_TK, valid_TK, 64)
    assert torch.equal(spread_TK[valid_TK], ids_TK[valid_TK])
    assert (spread_TK.sort(-1).values.diff(dim=-1) > 0).all()
    padding_load_E = torch.bincount(spread_TK[~valid_TK], minlength=64).float()
    assert padding_load_E.max() / padding_load_E.mean() < 1.2


def test_aux_loss_and_records():
    spec = tt.model_spec("deepseek_v3", "debugmodel", 2)
    replace_routers(spec.model, gate="topk", aux_loss_coef=0.01, z_loss_coef=1e-3)
    model = tt.build(spec.model, seed=0)
    tt.forward(model, tt.tokens())
    records = routings(model)
    assert list(records) == ["layers.1.moe.router"]
    aux = router_aux_loss(model)
    assert aux > 0 and aux.requires_grad


# ------------------------------------------------------------------------------ stepping


def _train(model, steps, *, titan_hook):
    """SGD steps on fixed batches; the bias stepped by torchtitan's hook or by ours."""
    from torchtitan.components.optimizer import register_moe_load_balancing_hook
    from torchtitan.distributed.parallel_dims import ParallelDims

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    register_moe_load_balancing_hook(optimizer, [model], parallel_dims)
    torchtitan_hooks = len(optimizer._optimizer_step_pre_hooks)
    if not titan_hook:
        register_step_hook(optimizer, [model], parallel_dims)
    for step in range(steps):
        tt.loss_of(tt.forward(model, tt.tokens(seed=10 + step))).backward()
        optimizer.step()
        optimizer.zero_grad()
    return torchtitan_hooks


@pytest.fixture
def one_process_group(monkeypatch):
    """A world of one gloo process: torchtitan's balancing hook builds device meshes."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module

    monkeypatch.setattr(parallel_dims_module, "device_type", "cpu")
    with gloo_group(rank=0, world_size=1):
        yield


def test_one_mechanism_steps_the_expert_bias(one_process_group):
    """torchtitan's hook registers nothing on a patched model; ours then moves the bias exactly
    as torchtitan's moves it on the original (a second mechanism would double every step)."""
    spec = tt.model_spec("deepseek_v3", "debugmodel", 2)
    theirs = tt.build(spec.model, seed=0)
    ours = replace_routers(copy.deepcopy(theirs), gate="topk")
    assert _train(theirs, 3, titan_hook=True) == 1
    assert _train(ours, 3, titan_hook=False) == 0  # torchtitan's hook found nothing to step
    bias_theirs = theirs.layers["1"].moe.expert_bias_E
    bias_ours = ours.layers["1"].moe.router.moe_router.expert_bias.bias_E
    assert bias_theirs.abs().max() > 0
    torch.testing.assert_close(bias_ours, bias_theirs, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="expert bias is on"):
        ours.layers["1"].moe.router(torch.randn(1, 4, 256), bias_theirs)


def test_router_state_survives_dcp(tmp_path):
    """torchtitan's checkpointing (DCP on ModelWrapper's state dict) restores the balanced
    thresholds, the budget controller and the expert bias into a fresh model."""
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpointer.base import ModelWrapper

    def patched(seed):
        spec = tt.model_spec("deepseek_v3", "debugmodel", 3)
        replace_routers(spec.model.layers[1], gate="balanced_soft_topk", expert_bias=True)
        replace_routers(spec.model.layers[2], gate="sparse_soft_topk", target_active=2.5)
        return tt.build(spec.model, seed=seed)

    model = patched(seed=0)
    _train(model, 2, titan_hook=False)
    saved = tt.router_state(model)
    assert {key.rsplit(".", 1)[-1] for key in saved} >= {"bias_E", "mu_E", "budget"}
    dcp.save(ModelWrapper([model]).state_dict(), checkpoint_id=str(tmp_path))
    restored = patched(seed=1)
    wrapper = ModelWrapper([restored])
    state = wrapper.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    wrapper.load_state_dict(state)
    for key, value in tt.router_state(restored).items():
        assert torch.equal(value, saved[key]), key
    model.eval()
    restored.eval()
    with torch.no_grad():
        tokens_BL = tt.tokens(seed=9)
        assert torch.equal(tt.forward(model, tokens_BL), tt.forward(restored, tokens_BL))


# -------------------------------------------------------------------------------- errors


def test_bad_settings_change_nothing():
    spec = tt.model_spec("deepseek_v3", "debugmodel", 2)
    with pytest.raises(ValueError, match="d_model=8 cannot be set"):
        replace_routers(spec.model, gate="topk", d_model=8)
    with pytest.raises(ValueError, match="tau=0.5 is not read by gate='topk'"):
        replace_routers(spec.model, gate="topk", tau=0.5)
    assert not isinstance(spec.model.layers[1].moe.router, MoERouter.Config)
    replace_routers(spec.model, gate="soft_topk")
    with pytest.raises(ValueError, match="already has moe_router routers"):
        replace_routers(spec.model, gate="soft_topk")
    with pytest.raises(ValueError, match="no MoE layer"):
        replace_routers(spec.model.layers[0], gate="soft_topk")
    with pytest.raises(ValueError, match="no torchtitan MoE layer"):
        replace_routers(torch.nn.Linear(2, 2), gate="soft_topk")
    assert moe_router.step_routers(tt.build(spec.model)) == 1


# ---------------------------------------------------------------------- expert parallelism


def _replay_step(routers_by_rank):
    """One step of every state component of the reference's per-rank routers, from their
    summed accumulators: what the all-reduce in ``step()`` does across ranks."""
    first = routers_by_rank[0]
    for states in zip(*(router.states() for router in routers_by_rank), strict=True):
        for name, buffer in states[0].named_buffers():
            if name in states[0]._non_persistent_buffers_set and name.startswith("pending"):
                for other in states[1:]:
                    buffer += other.get_buffer(name)
        states[0].step()
    return first


@pytest.mark.distributed
def test_expert_parallel_matches_one_rank(tmp_path):
    """torchtitan's parallelize path (FSDP 2 + EP 2, all-to-all over gloo) with the soft,
    balanced and sparse routers: each rank's logits and the gradients of every parameter equal
    one process running both ranks' tokens; the router state after each step equals that
    process's (bias, budget, running thresholds) and is bitwise equal across ranks; DCP
    restores it."""
    run_ranks(tt.ep_worker, tmp_path, tt.WORLD_SIZE)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(tt.WORLD_SIZE)]

    # The reference: the same model, one replica per rank's batch, in this process.
    reference = tt.build(tt.ep_spec().model, seed=0)
    replicas = [reference, copy.deepcopy(reference)]
    for rank, replica in enumerate(replicas):
        replica.train()
        logits = tt.forward(replica, tt.tokens(seed=rank))
        torch.testing.assert_close(results[rank]["logits"], logits.detach(), atol=ATOL, rtol=RTOL)
        tt.loss_of(logits).backward()
    for name, param in reference.named_parameters():
        total = param.grad + replicas[1].get_parameter(name).grad
        ep_grad = results[0]["grads"][name]
        # torchtitan turns FSDP's division off (its trainer scales the loss): sums.
        torch.testing.assert_close(ep_grad, total, atol=ATOL, rtol=RTOL, msg=name)
        torch.testing.assert_close(results[1]["grads"][name], ep_grad, atol=0, rtol=0)

    for layer in tt.EP_GATES:
        routers = [r.layers[str(layer)].moe.router.moe_router for r in replicas]
        _replay_step(routers)
        prefix = f"layers.{layer}.moe.router.moe_router."
        for key, value in routers[0].state_dict().items():
            if key.endswith("warm_mu_E"):
                continue  # the replay's warm start is not averaged over the replicas
            got = results[0]["states"][0][prefix + key]
            torch.testing.assert_close(got, value, atol=1e-6, rtol=1e-6, msg=key)

    for step in range(tt.EP_STEPS):
        states = [result["states"][step] for result in results]
        for key, value in states[0].items():  # warm starts too: averaged over the ranks
            assert torch.equal(value, states[1][key]), (step, key)

    for result in results:
        for key, value in result["restored_state"].items():
            assert torch.equal(value, result["states"][-1][key]), key
        torch.testing.assert_close(
            result["restored_eval_logits"], result["eval_logits"], atol=0, rtol=0
        )
