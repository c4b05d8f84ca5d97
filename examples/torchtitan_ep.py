"""A torchtitan MoE model trained with expert parallelism and moe_router's balanced router.

torchtitan's deepseek_v3 debug model (4 layers: one dense, three MoE with 8 experts, K 3) gets
``balanced_soft_topk`` routers through ``replace_routers`` on its ``ModelSpec``, is
parallelized by torchtitan's own ``parallelize_fn`` (FSDP over all ranks, the experts sharded
over EP = all ranks, all-to-all token dispatch), and trains on the embedded corpus (the Python
standard library's sources as bytes, ``models/data.py``). Every ``--log-every`` steps it logs
the loss, the tokens each EP rank received relative to the mean (per-rank load) and each
layer's MaxVio; at the end, the validation loss and MaxVio with the evaluation thresholds.

CPU, gloo (from the repository root; about 1.5 s a step on 2 shared cores, 8 min)::

    .venv/bin/torchrun --nproc_per_node 2 examples/torchtitan_ep.py --steps 300

GPU, NCCL, bf16 parameters under FSDP and torchtitan's flex attention (8 GPUs: EP 8)::

    torchrun --nproc_per_node 8 examples/torchtitan_ep.py --steps 300 --batch-size 16 \\
        --seq-len 512

On the CPU two torchtitan defaults are changed, both marked "CPU:" below: its meshes are built
on "cpu" (torchtitan picks "cuda" when no accelerator is present), and FSDP reduces with a sum
(gloo has no PREMUL_SUM; torchtitan turns FSDP's gradient division off, so a sum is what it
computes anyway). The language model's flex attention has no CPU backward, so on the CPU it
becomes torchtitan's causal SDPA attention.

Gradients follow torchtitan's trainer: each rank's loss is its token losses summed and divided
by the global token count, and FSDP sums over ranks. The routers' per-step state (running
thresholds) is stepped by the optimizer hook the patched ``ModelSpec`` registers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# models/ (the byte corpus) lives in the repository, not in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from models.data import split_files, stdlib_source_files, to_blocks  # noqa: E402
from moe_router.metrics import LoadBalanceMetrics, max_violation  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gate", default="balanced_soft_topk")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--corpus-bytes", type=int, default=4 << 20, help="stdlib bytes read")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# ------------------------------------------------------------------------------------ data


def corpus(block_len: int, max_bytes: int) -> tuple[Tensor, Tensor]:
    """Train and validation blocks ``[N, seq_len + 1]`` of the stdlib's sources (bytes)."""
    files, texts, size = stdlib_source_files(), [], 0
    train_files, val_files = split_files(files, val_fraction=0.05)
    blocks = []
    for subset in (train_files, val_files):
        texts, size = [], 0
        for path in subset:
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            size += len(text)
            if size >= max_bytes:
                break
        blocks.append(torch.from_numpy(to_blocks(texts, block_len).copy()).long())
    return blocks[0], blocks[1]


def batches(blocks_NL: Tensor, batch_size: int, rank: int, world: int, seed: int):
    """An endless stream of this rank's slice of global batches (seeded permutations)."""
    epoch = 0
    while True:
        order = torch.randperm(
            len(blocks_NL), generator=torch.Generator().manual_seed(seed + epoch)
        )
        global_batch = batch_size * world
        for start in range(0, len(order) - global_batch + 1, global_batch):
            ids = order[start + rank * batch_size : start + (rank + 1) * batch_size]
            yield blocks_NL[ids]
        epoch += 1


# ----------------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, device: torch.device, world: int):
    """torchtitan's deepseek_v3 debug model with moe_router routers, parallelized by
    torchtitan (FSDP + EP over every rank)."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models import deepseek_v3
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    from moe_router.integrations.torchtitan import replace_routers

    spec = deepseek_v3.model_registry("debugmodel")
    spec.model.layers = spec.model.layers[:4]
    on_cpu = device.type == "cpu"
    if on_cpu:  # flex attention has no CPU backward
        for _, _, parent, attr in list(spec.model.traverse(FlexAttention.Config)):
            setattr(parent, attr, ScaledDotProductAttention.Config())
    replace_routers(spec, gate=args.gate)  # every MoE layer; post_optimizer_build_fn too

    backend = "partial_dtensor"  # DTensor on the model-parallel axes, plain FSDP tensors
    set_spmd_backend(backend)
    parallelism = ParallelismConfig(
        data_parallel_shard_degree=world, expert_parallel_degree=world, spmd_backend=backend
    )
    spec.model.update_from_config(config=SimpleNamespace(parallelism=parallelism))
    if on_cpu:  # CPU: torchtitan builds its meshes on "cuda" when no accelerator is present
        parallel_dims_module.device_type = "cpu"
    parallel_dims = parallel_dims_module.ParallelDims(
        dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=world, world_size=world,
        spmd_backend=backend,
    )  # fmt: skip
    parallel_dims.build_mesh()
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = spec.model.build()
    param_dtype = "float32" if on_cpu else "bfloat16"
    model = spec.parallelize_fn(
        model,
        parallel_dims=parallel_dims,
        training=TrainingConfig(mixed_precision_param=param_dtype),
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder="",
    )
    if on_cpu:  # CPU: gloo has no PREMUL_SUM; FSDP's division is off, so a sum is the same
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=device)
    return spec, model, parallel_dims


def logits_of(model: nn.Module, tokens_BL: Tensor) -> Tensor:
    positions_BL = torch.arange(tokens_BL.shape[1], device=tokens_BL.device).expand_as(tokens_BL)
    masks = None
    if tokens_BL.device.type != "cpu":
        masks = model.get_attention_masks(positions_BL)  # flex attention: causal mask
    return model(tokens_BL, positions_BL, masks)


# --------------------------------------------------------------------------------- metrics


def dispatched_loads(model: nn.Module) -> Tensor:
    """Slots dispatched to each expert by each MoE layer in the latest forward, over every
    rank: fp32 ``[L, E]`` (what torchtitan's all-to-all moves and its experts compute)."""
    from moe_router.integrations.torchtitan import routings

    records = list(routings(model).values())
    num_experts = records[0].num_experts
    loads_LE = torch.stack(
        [torch.bincount(r.expert_ids_TK.flatten(), minlength=num_experts) for r in records]
    ).float()
    dist.all_reduce(loads_LE)
    return loads_LE


def per_rank_load(loads_LE: Tensor, world: int) -> Tensor:
    """Tokens each EP rank receives (its contiguous block of experts), over the mean: [L, EP]."""
    received_LR = loads_LE.unflatten(-1, (world, -1)).sum(-1)  # (L, EP)
    return received_LR / received_LR.mean(-1, keepdim=True)


@torch.no_grad()
def validate(model, val_blocks, args, rank, world, device) -> tuple[float, list[float]]:
    """Validation loss and MaxVio per layer (evaluation thresholds, all ranks' tokens)."""
    from moe_router.integrations.torchtitan import routings

    model.eval()
    metrics = None
    loss_sum = torch.zeros(2, device=device, dtype=torch.float64)
    stream = batches(val_blocks, args.batch_size, rank, world, seed=12345)
    for _ in range(args.val_batches):
        block_BL = next(stream).to(device)
        logits = logits_of(model, block_BL[:, :-1])
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), block_BL[:, 1:].flatten(), reduction="sum"
        )
        loss_sum += torch.stack(
            [loss.double(), torch.tensor(block_BL[:, 1:].numel(), device=device)]
        )
        records = routings(model)
        if metrics is None:
            metrics = [LoadBalanceMetrics(r.num_experts).to(device) for r in records.values()]
        for metric, record in zip(metrics, records.values(), strict=True):
            metric.update(record)
    dist.all_reduce(loss_sum)
    model.train()
    max_vios = [metric.compute()["max_vio_global"].item() for metric in metrics]  # synced
    return (loss_sum[0] / loss_sum[1]).item(), max_vios


# ------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    log = print if rank == 0 else (lambda *_, **__: None)

    spec, model, parallel_dims = build_model(args, device, world)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / args.warmup)
        * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)),
    )  # fmt: skip
    spec.post_optimizer_build_fn(optimizer, [model], parallel_dims)  # steps the routers

    train_blocks, val_blocks = corpus(args.seq_len + 1, args.corpus_bytes)
    log(
        f"{world} ranks ({device.type}), gate={args.gate}, {len(train_blocks)} train / "
        f"{len(val_blocks)} val blocks of {args.seq_len + 1} bytes, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    )
    from torchtitan.distributed.utils import clip_grad_norm_

    from moe_router.integrations.torchtitan import router_aux_loss

    stream = batches(train_blocks, args.batch_size, rank, world, seed=args.seed)
    global_tokens = args.batch_size * args.seq_len * world
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        block_BL = next(stream).to(device)
        logits = logits_of(model, block_BL[:, :-1])
        token_loss = F.cross_entropy(
            logits.flatten(0, 1).float(), block_BL[:, 1:].flatten(), reduction="sum"
        )
        loss = token_loss / global_tokens + router_aux_loss(model) / world
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0, ep_enabled=True)  # experts: their own mesh
        if step % args.log_every == 0 or step == 1:
            loads_LE = dispatched_loads(model)  # before the step: this batch's routing
            mean_loss = token_loss.detach().clone()
            dist.all_reduce(mean_loss)
            load_LR = per_rank_load(loads_LE, world)
            log(
                f"step {step:4d} | loss {mean_loss.item() / global_tokens:.3f} | "
                f"per-rank load {[round(v, 3) for v in load_LR.mean(0).tolist()]} "
                f"(straggler {load_LR.amax(-1).max().item():.3f}) | "
                f"MaxVio {[round(v, 3) for v in max_violation(loads_LE).tolist()]} | "
                f"{(time.perf_counter() - start) / step:.2f} s/step"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    val_loss, val_max_vio = validate(model, val_blocks, args, rank, world, device)
    log(f"validation | loss {val_loss:.3f} | MaxVio (global) {[round(v, 3) for v in val_max_vio]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
