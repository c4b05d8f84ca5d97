"""Expert-parallel load balance of trained routers: stragglers and capacity drops by EP degree.

Each gate routes a small torchtitan qwen3 MoE model (2 layers, E = 64 experts, K = 8; the
debug flavor with 64-wide experts and causal SDPA attention) trained for ``--steps`` steps on
the embedded corpus (the stdlib's sources as bytes). A training step is ``8`` micro-batches of
``4 x 64`` tokens, each routed by its own forward as one EP rank routes its local batch (the
balanced gate solves its thresholds per micro-batch). For EP degree R the global batch is the
step's first R micro-batches, and rank r owns experts ``[r E / R, (r + 1) E / R)``:

- straggler factor: max over ranks of the tokens (slots) it receives / the mean over ranks, per
  batch and layer; mean and p99 over the training batches (and over a validation stream in
  evaluation mode: random blocks of the held-out files, the same for every gate);
- drop rate at capacity factor c: the assignments a per-expert capacity
  ``ceil(c * assignments / E)`` would drop, over all assignments (dropless runs, what-if);
- expert compute vs balanced: the dropless step's expert time, the sum over layers of the
  slowest rank's tokens, over the same sum with every rank at the mean (= the straggler cost);
  "vs balanced top-K" divides by the balanced load of a top-K gate instead, so that it also
  counts the zero-weight slots a variable-support gate dispatches (``sparse_soft_topk``
  computes ``max_active`` slots per token under torchtitan's fixed-K MoE).

Baselines measured in the same run: ``topk + aux loss`` (Switch loss, 0.01) and ``topk +
expert bias`` (DeepSeek's bias at torchtitan's u = 1e-3: the scores are softmax probabilities,
about 1 / E, and a larger step makes the selection oscillate). ``sparse_soft_topk`` holds 8
active experts per token (``target_active``) in 16 slots, with an expert bias of u = 0.01 (in
logit units: it shifts the thresholds inside the solve). Training figures are over the second
half of the steps (the first half measures the initialisation as much as the router). Routing
is computed once per gate; the EP degrees only regroup its loads (routing does not depend on
where the experts live).

    python benchmarks/bench_ep_balance.py [--steps 200] [--quick]

Writes benchmarks/results/ep_balance.{md,json}. Needs torchtitan (``pip install
'moe_router[titan]'``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _timing import markdown_table, save_results  # noqa: E402

from models.data import split_files, stdlib_source_files, to_blocks  # noqa: E402
from moe_router import step_routers  # noqa: E402
from moe_router.metrics import capacity_drops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ep_balance"
GATES: dict[str, tuple[str, dict]] = {
    "topk + aux loss": ("topk", {"expert_bias": False, "aux_loss_coef": 1e-2}),
    "topk + expert bias": ("topk", {"expert_bias": True, "bias_update_rate": 1e-3}),
    "balanced_soft_topk": ("balanced_soft_topk", {"expert_bias": False}),
    "sparse_soft_topk": (
        "sparse_soft_topk",
        {"target_active": 8.0, "max_active": 16, "expert_bias": True, "bias_update_rate": 1e-2},
    ),
}
EP_DEGREES = (2, 4, 8)
CAPACITY_FACTORS = (1.0, 1.25)
MICRO_BATCHES = 8  # = the largest EP degree
SEQUENCES, SEQ_LEN = 4, 64  # one micro-batch: 256 tokens
NUM_EXPERTS, K = 64, 8


def build_model(gate: str, options: dict):
    from torchtitan.models import qwen3
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    from torchtitan.models.common.moe import GroupedExperts

    from moe_router.integrations.torchtitan import replace_routers

    spec = qwen3.model_registry("debugmodel_moe")
    spec.model.layers = spec.model.layers[:2]
    for _, config, _, _ in spec.model.traverse(GroupedExperts.Config):
        config.hidden_dim = 64  # small experts: the routing is what is measured
    for _, _, parent, attr in list(spec.model.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())  # no flex backward on CPU
    replace_routers(spec.model, gate=gate, **options)
    torch.manual_seed(0)  # every gate starts from the same weights
    with torch.device("meta"):
        model = spec.model.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states(buffer_device=torch.device("cpu"))
    return model


def corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation blocks of SEQ_LEN + 1 bytes."""
    train_files, val_files = split_files(stdlib_source_files(), val_fraction=0.05)
    blocks = []
    for files in (train_files, val_files):
        texts, size = [], 0
        for path in files:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            size += len(texts[-1])
            if size >= max_bytes:
                break
        blocks.append(torch.from_numpy(to_blocks(texts, SEQ_LEN + 1).copy()).long())
    return blocks[0], blocks[1]


def step_loads(model, micro_batches, *, train: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Route one step's micro-batches: dispatched slots and valid assignments per micro-batch,
    layer and expert ``[M, L, E]``, and the mean loss."""
    from moe_router.integrations.torchtitan import router_aux_loss, routings, spread_padding

    dispatched, valid, losses = [], [], []
    for block_BL in micro_batches:
        tokens_BL, targets_BL = block_BL[:, :-1], block_BL[:, 1:]
        positions_BL = torch.arange(SEQ_LEN).expand_as(tokens_BL)
        logits = model(tokens_BL, positions_BL, None)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets_BL.flatten())
        if train:
            ((loss + router_aux_loss(model)) / len(micro_batches)).backward()
        losses.append(loss.item())
        records = list(routings(model).values())
        slots = [spread_padding(r.expert_ids_TK, r.valid_TK, NUM_EXPERTS) for r in records]
        dispatched.append(
            torch.stack([torch.bincount(s.flatten(), minlength=NUM_EXPERTS) for s in slots])
        )
        valid.append(torch.stack([r.tokens_per_expert_E for r in records]))
    return torch.stack(dispatched).double(), torch.stack(valid).double(), sum(losses) / len(losses)


def run_gate(name, gate, options, train_blocks, val_blocks, args) -> dict:
    model = build_model(gate, options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    per_step = MICRO_BATCHES * SEQUENCES
    train_dispatched, train_valid, start = [], [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        ids = torch.randint(0, len(train_blocks), (per_step,), generator=gen)
        micro = train_blocks[ids].split(SEQUENCES)
        dispatched, valid, loss = step_loads(model, micro, train=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step_routers(model)
        train_dispatched.append(dispatched)
        train_valid.append(valid)
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(
                f"  {name}: step {step + 1} loss {loss:.3f} ({time.perf_counter() - start:.0f} s)"
            )
    model.eval()
    val_dispatched, val_valid, val_losses = [], [], []
    val_gen = torch.Generator().manual_seed(1)  # the same validation batches for every gate
    with torch.no_grad():
        for _ in range(args.val_steps):
            ids = torch.randint(0, len(val_blocks), (per_step,), generator=val_gen)
            dispatched, valid, loss = step_loads(
                model, val_blocks[ids].split(SEQUENCES), train=False
            )
            val_dispatched.append(dispatched)
            val_valid.append(valid)
            val_losses.append(loss)
    return {
        "train": stats(
            torch.stack(train_dispatched[args.steps // 2 :]),
            torch.stack(train_valid[args.steps // 2 :]),
        ),
        "val": stats(torch.stack(val_dispatched), torch.stack(val_valid)),
        "val_loss": sum(val_losses) / len(val_losses),
        "slots_per_token": float(
            train_dispatched[-1].sum() / (MICRO_BATCHES * SEQUENCES * SEQ_LEN * 2)
        ),
    }


def stats(dispatched_BMLE: torch.Tensor, valid_BMLE: torch.Tensor) -> dict:
    """Straggler, drop and compute figures per EP degree, over the batches B."""
    out = {}
    num_layers = dispatched_BMLE.shape[2]
    for ep in EP_DEGREES:
        loads_BLE = dispatched_BMLE[:, :ep].sum(1)
        received_BLR = loads_BLE.unflatten(-1, (ep, -1)).sum(-1)
        straggler_BL = received_BLR.amax(-1) / received_BLR.mean(-1)
        slowest_B = received_BLR.amax(-1).sum(-1)
        balanced_topk = num_layers * ep * SEQUENCES * SEQ_LEN * K / ep
        valid_BLE = valid_BMLE[:, :ep].sum(1)
        entry = {
            "straggler_mean": straggler_BL.mean().item(),
            "straggler_p99": straggler_BL.flatten().quantile(0.99).item(),
            "compute_vs_balanced": (slowest_B / received_BLR.mean(-1).sum(-1)).mean().item(),
            "compute_vs_balanced_topk": (slowest_B / balanced_topk).mean().item(),
        }
        for factor in CAPACITY_FACTORS:
            drops = capacity_drops(valid_BLE, factor).sum() / valid_BLE.sum()
            entry[f"drop_rate_cf{factor:g}"] = drops.item()
        out[str(ep)] = entry
    return out


def table(results: dict, split: str) -> str:
    header = ["gate", "EP", "straggler mean", "straggler p99", "drop @1.0", "drop @1.25"]
    header += ["compute vs balanced", "vs balanced top-K"]
    rows = []
    for name, result in results.items():
        for ep, entry in result[split].items():
            rows.append(
                [name, ep, f"{entry['straggler_mean']:.3f}", f"{entry['straggler_p99']:.3f}"]
                + [f"{100 * entry[f'drop_rate_cf{f:g}']:.2f} %" for f in CAPACITY_FACTORS]
                + [
                    f"{entry['compute_vs_balanced']:.3f}",
                    f"{entry['compute_vs_balanced_topk']:.3f}",
                ]
            )
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--quick", action="store_true", help="20 steps, 4 validation batches")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.val_steps = 20, 4
    torch.set_num_threads(1)
    train_blocks, val_blocks = corpus(4 << 20)
    results = {}
    for name, (gate, options) in GATES.items():
        print(f"{name} ({gate}, {options})")
        results[name] = run_gate(name, gate, options, train_blocks, val_blocks, args)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    machine = f"{platform.machine()} {platform.system()}, torch {torch.__version__}, 1 thread"
    markdown = "\n\n".join(
        [
            "# Expert-parallel load balance of trained routers",
            f"Commit {commit}, {datetime.date.today()}, {machine}; {args.steps} training steps "
            f"of {MICRO_BATCHES} x {SEQUENCES * SEQ_LEN} tokens per gate, {args.val_steps} "
            "validation batches. See benchmarks/bench_ep_balance.py for the definitions.",
            "## Training batches (second half of the steps)",
            table(results, "train"),
            "## Validation stream (evaluation mode)",
            table(results, "val"),
            "## Per gate",
            markdown_table(
                ["gate", "validation loss", "dispatched slots per token (K = 8)"],
                [
                    [name, f"{r['val_loss']:.3f}", f"{r['slots_per_token']:.2f}"]
                    for name, r in results.items()
                ],
            ),
        ]
    )
    print(markdown)
    save_results(
        RESULTS,
        markdown,
        {"args": vars(args), "gates": {n: list(g) for n, g in GATES.items()}, "results": results},
    )


if __name__ == "__main__":
    main()
