"""Two gloo processes on CPU: the expert bias stays identical across data-parallel ranks."""

import math

import pytest
import torch
import torch.distributed as dist
from distributed_testing import run_ranks

from moe_router.moe import MoELayer
from moe_router.router import Router

WORLD_SIZE = 2
NUM_EXPERTS = 4
UPDATE_RATE = 0.1
# Per-rank loads per step, chosen so that each rank's local sign differs from the global one
# (step 0: rank 0 alone would push expert 3 up, the sum pushes it down).
LOADS = [
    [[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 20.0]],
    [[1.0, 2.0, 3.0, 4.0], [8.0, 1.0, 1.0, 1.0]],
    [[0.0, 5.0, 0.0, 5.0], [5.0, 0.0, 5.0, 0.0]],
]


def expected_bias() -> torch.Tensor:
    """The single-process computation on the loads summed over ranks."""
    bias = torch.zeros(NUM_EXPERTS)
    for step in LOADS:
        load = torch.tensor(step).sum(0)
        bias += UPDATE_RATE * torch.sign(load.mean() - load)
        bias -= bias.mean()
    return bias


def worker(rank: int, out_dir: str) -> None:
    router = Router(8, NUM_EXPERTS, 1, gate="topk", expert_bias=True, bias_update_rate=UPDATE_RATE)
    for step in LOADS:
        local_load = torch.tensor(step[rank])
        router.update_expert_bias(local_load)
        torch.testing.assert_close(local_load, torch.tensor(step[rank]))  # not reduced in place
    gathered = [torch.empty(NUM_EXPERTS) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, router.expert_bias.bias_E)
    torch.save(torch.stack(gathered), f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_expert_bias_identical_across_ranks(tmp_path):
    run_ranks(worker, tmp_path, WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        biases = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(biases[0], biases[1], rtol=0, atol=0)
        torch.testing.assert_close(biases[0], expected_bias())
        # A rank that skipped the all_reduce would hold a different bias.
        local_only = torch.zeros(NUM_EXPERTS)
        for step in LOADS:
            load = torch.tensor(step[0])
            local_only += UPDATE_RATE * torch.sign(load.mean() - load)
            local_only -= local_only.mean()
        assert not torch.allclose(biases[0], local_only)


def controller_worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)  # identical weights on both ranks
    sparse = Router(8, 8, 2, gate="sparse_soft_topk", target_active=2.0, init_std=0.3)
    balanced = Router(8, 8, 2, gate="balanced_soft_topk", init_std=0.3)
    windowed = Router(8, 8, 2, gate="balanced_soft_topk", init_std=0.3, balance_window=100)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own tokens
    supports, budgets = [], []
    for _ in range(5):
        x = torch.randn(64 * (rank + 1), 8, generator=gen)
        routing = sparse(x)
        supports.append(float(routing.valid_TK.sum() + routing.overflow_T.sum()))
        balanced(x)
        windowed(x)
        sparse.step()
        balanced.step()
        windowed.step()
        budgets.append(float(sparse.budget))
    state = torch.cat(
        [
            sparse.budget.view(1),
            balanced.balance_mu_E,
            windowed.balance_mu_E,
            balanced.balance.warm_mu_E,  # the warm starts too: a checkpoint saves one copy
            windowed.balance.warm_mu_E,
        ]
    )
    gathered = [torch.empty_like(state) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, state)
    torch.save(
        {
            "states": torch.stack(gathered),
            "supports": torch.tensor(supports, dtype=torch.float64),
            "budgets": torch.tensor(budgets, dtype=torch.float64),
        },
        f"{out_dir}/controller{rank}.pt",
    )


@pytest.mark.distributed
def test_budget_controller_and_balance_thresholds_identical_across_ranks(tmp_path):
    run_ranks(controller_worker, tmp_path, WORLD_SIZE)
    results = [torch.load(tmp_path / f"controller{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in results:  # every rank holds the same budget and running thresholds
        torch.testing.assert_close(result["states"][0], result["states"][1], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["budgets"], results[1]["budgets"], rtol=0, atol=0)
    # Slow replay of the controller on the supports of both ranks together (64 + 128 tokens
    # per step): log k += 0.2 * (2 - mean support) / 2.
    budget = 2.0
    for step in range(5):
        mean_support = (results[0]["supports"][step] + results[1]["supports"][step]) / 192
        budget = min(max(budget * math.exp(0.2 * (2.0 - mean_support) / 2.0), 1e-3), 8 - 1e-3)
        assert results[0]["budgets"][step].item() == pytest.approx(budget, rel=1e-5)
    # One rank's supports alone would have given another budget.
    alone = 2.0 * math.exp(0.2 * (2.0 - results[0]["supports"][0].item() / 64) / 2.0)
    assert results[0]["budgets"][0].item() != pytest.approx(alone, rel=1e-6)


def alternatives_worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)  # identical weights on both ranks
    relu = Router(8, 8, 2, gate="relu", init_std=0.3)
    layer = MoELayer(8, 16, 8, 2, gate="topk", default_moe_beta=0.5)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees its own tokens
    actives, sums = [], []
    for _ in range(3):
        x = torch.randn(64 * (rank + 1), 8, generator=gen)
        routing = relu(x)
        actives.append([float((routing.scores_TE > 0).sum()), float(routing.scores_TE.numel())])
        _, layer_routing = layer(x, return_routing=True)
        sums.append(layer.router.default_outputs.pending_ED1.clone())
        relu.step()
        layer.router.step()
    state = torch.cat(
        [relu.relu_sparsity.l1_coef.view(1), layer.router.default_outputs.default_ED.flatten()]
    )
    gathered = [torch.empty_like(state) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, state)
    torch.save(
        {"states": torch.stack(gathered), "actives": torch.tensor(actives), "sums": sums},
        f"{out_dir}/alternatives{rank}.pt",
    )


@pytest.mark.distributed
def test_relu_controller_and_default_outputs_identical_across_ranks(tmp_path):
    run_ranks(alternatives_worker, tmp_path, WORLD_SIZE)
    results = [torch.load(tmp_path / f"alternatives{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in results:
        torch.testing.assert_close(result["states"][0], result["states"][1], rtol=0, atol=0)
    # Slow replay on both ranks' counts together: x1.2 while denser than 1 - 2/8, else /1.2.
    coef = 1e-8
    for step in range(3):
        active = results[0]["actives"][step][0] + results[1]["actives"][step][0]
        total = results[0]["actives"][step][1] + results[1]["actives"][step][1]
        coef = coef * 1.2 if 1 - active / total < 0.75 else coef / 1.2
    assert results[0]["states"][0][0].item() == pytest.approx(coef, rel=1e-5)
    # The defaults: EMA (beta 0.5) of the weighted mean over both ranks' tokens.
    default = torch.zeros(8, 8)
    for step in range(3):
        totals = results[0]["sums"][step] + results[1]["sums"][step]
        mean = totals[:, :-1] / totals[:, -1:].clamp_min(1e-20)
        default = torch.where(totals[:, -1:] > 0, 0.5 * default + 0.5 * mean, default)
    torch.testing.assert_close(results[0]["states"][0][1:].view(8, 8), default)
