"""Multi-process test helpers: run a function on every rank of a gloo group on the CPU."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world_size: int, port: int | None = None, timeout_s: float = 60):
    """This process as ``rank`` of a gloo process group, destroyed on exit."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port or free_port()}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable[[int, str], None], out_dir: Path | str, world_size: int = 2):
    """Run ``worker(rank, out_dir)`` on ``world_size`` spawned processes in one gloo group
    (``worker`` must be a module-level function; it saves what the test reads to ``out_dir``)."""
    args = (worker, free_port(), str(out_dir), world_size)
    mp.spawn(_in_group, args=args, nprocs=world_size, join=True)


def _in_group(rank: int, worker: Callable, port: int, out_dir: str, world_size: int) -> None:
    with gloo_group(rank, world_size, port):
        worker(rank, out_dir)
