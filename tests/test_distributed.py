"""Two gloo processes on CPU: the expert bias stays identical across data-parallel ranks."""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expected_bias() -> torch.Tensor:
    """The single-process computation on the loads summed over ranks."""
    bias = torch.zeros(NUM_EXPERTS)
    for step in LOADS:
        load = torch.tensor(step).sum(0)
        bias += UPDATE_RATE * torch.sign(load.mean() - load)
        bias -= bias.mean()
    return bias


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=20),
    )
    try:
        router = Router(
            8, NUM_EXPERTS, 1, gate="topk", expert_bias=True, bias_update_rate=UPDATE_RATE
        )
        for step in LOADS:
            local_load = torch.tensor(step[rank])
            router.update_expert_bias(local_load)
            torch.testing.assert_close(local_load, torch.tensor(step[rank]))  # not reduced in place
        gathered = [torch.empty(NUM_EXPERTS) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, router.expert_bias.bias_E)
        torch.save(torch.stack(gathered), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_expert_bias_identical_across_ranks(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
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
