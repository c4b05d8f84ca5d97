"""Forward+backward time of every soft top-k method against two baselines, on CPU.

Every threshold method runs twice: through the default CPU path (the fused C++ kernels of
moe_router/ops/csrc) and through the readable PyTorch path (backend="torch").

Baselines, measured in the same run on the same inputs:
  hard  - the hard router path: softmax -> topk -> gather, forward + backward;
  seed  - seed 000's implementation (64-step bisection, vmap-of-grad backward),
          reproduced in benchmarks/seed_topk.py.

Prints a ratio table (medians) and writes benchmarks/results/soft_topk_cpu.{md,json}.
Targets (issue 2): every threshold method <= 1.5x hard at 16384 x 64, k = 8, and >= 4x faster
than the seed.

    python benchmarks/bench_soft_topk.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import markdown_table, median_ms, save_results  # noqa: E402
from seed_topk import seed_soft_topk  # noqa: E402

from moe_router import soft_topk  # noqa: E402
from moe_router.ops import _cpu_kernels  # noqa: E402
from moe_router.ops.soft_topk import METHODS, THRESHOLD_METHODS  # noqa: E402

SHAPES = [(16384, 64, 8), (16384, 8, 2), (4096, 256, 8)]
RESULTS = Path(__file__).resolve().parent / "results" / "soft_topk_cpu"


def hard_path(x, k):
    weights, _ = torch.topk(torch.softmax(x, dim=-1), k, dim=-1)  # topk's values are the gather
    return weights


def fwd_bwd(fn, x, grad_out):
    def run():
        leaf = x.detach().requires_grad_()
        out = fn(leaf)
        out.backward(grad_out if out.shape == grad_out.shape else torch.ones_like(out))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, small shapes only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    shapes = [(2048, 64, 8), (2048, 8, 2)] if args.quick else SHAPES

    rows, payload = (
        [],
        {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "results": [],
        },
    )
    # build (or load) the C++ kernels before any timing; without them "auto" is the torch path
    payload["cpu_kernels"] = _cpu_kernels.available()
    print(f"C++ CPU kernels: {'loaded' if payload['cpu_kernels'] else 'NOT available'}")
    torch.manual_seed(0)
    for num_rows, num_entries, k in shapes:
        x = torch.randn(num_rows, num_entries)
        grad_out = torch.randn(num_rows, num_entries)
        hard_ms = median_ms(fwd_bwd(lambda a, k=k: hard_path(a, k), x, grad_out), repeats=repeats)
        seed_ms = median_ms(
            fwd_bwd(lambda a, k=k: seed_soft_topk(a, k), x, grad_out), repeats=max(3, repeats // 3)
        )
        shape = f"{num_rows}x{num_entries}, k={k}"
        rows.append(
            [
                shape,
                "hard (softmax+topk+gather)",
                f"{hard_ms:.2f}",
                "1.00",
                f"{seed_ms / hard_ms:.1f}",
            ]
        )
        rows.append(
            [
                shape,
                "seed 000 (bisection, vmap grad)",
                f"{seed_ms:.2f}",
                f"{seed_ms / hard_ms:.2f}",
                "1.0",
            ]
        )
        entry = {
            "shape": [num_rows, num_entries],
            "k": k,
            "hard_ms": hard_ms,
            "seed_ms": seed_ms,
            "methods": {},
        }
        # threshold methods: the default CPU path (the fused C++ kernels) and the PyTorch path;
        # the reference methods are O(n) Python steps, fewer repeats keep the run short
        variants = [(m, "auto", m) for m in THRESHOLD_METHODS]
        variants += [(m, "torch", f"{m} (torch path)") for m in THRESHOLD_METHODS]
        variants += [(m, "auto", m) for m in METHODS if m not in THRESHOLD_METHODS]
        for method, backend, label in variants:
            reps = repeats if method in THRESHOLD_METHODS else max(3, repeats // 5)
            ms = median_ms(
                fwd_bwd(
                    lambda a, m=method, b=backend, k=k: soft_topk(a, k, method=m, backend=b),
                    x,
                    grad_out,
                ),
                repeats=reps,
            )
            rows.append([shape, label, f"{ms:.2f}", f"{ms / hard_ms:.2f}", f"{seed_ms / ms:.1f}"])
            entry["methods"][label] = {
                "ms": ms,
                "vs_hard": ms / hard_ms,
                "speedup_vs_seed": seed_ms / ms,
            }
        payload["results"].append(entry)
        print(f"done {shape}", flush=True)

    header = ["shape", "method", "fwd+bwd ms (median)", "x hard", "seed / this"]
    table = markdown_table(header, rows)
    title = (
        f"# soft_topk forward+backward, CPU fp32, {payload['threads']} threads, "
        f"torch {torch.__version__}\n\n"
        "Ratios come from the same run. Targets: threshold methods <= 1.5x hard at 16384x64 k=8; "
        ">= 4x faster than seed. `method` = the default CPU path (fused C++ kernels, "
        f"{'loaded' if payload['cpu_kernels'] else 'NOT available: torch path'}); "
        "`method (torch path)` = backend='torch'.\n\n"
    )
    print(title + table)
    if not args.quick:
        save_results(RESULTS, title + table, payload)
        print(f"\nwrote {RESULTS}.md and .json")


if __name__ == "__main__":
    main()
