"""Scaling of the operator and of the MoE layer with problem size, on CPU (1 thread).

Three series, each timed round-robin (medians of forward+backward):

1. ``soft_topk`` vs rows R = 10^3 ... 10^6 at N = 64, k = 8 (every threshold method on its
   default CPU path, and the hard softmax+topk path);
2. ``soft_topk`` vs entries N = 8 ... 1024 at R = 16384 and k = N / 8 (k / N fixed);
3. ``MoELayer`` (``topk``, ``soft_topk``) vs experts E = 8 ... 128 at fixed active parameters
   (K = 2, F = 512, T = 8192, D = 256), with the dense SwiGLU of width K*F as the floor.

Work is R*N for the operator and T*K*F*D for the layer (constant across series 3). Between
consecutive sizes the table gives the exponent ``log(t2 / t1) / log(w2 / w1)`` of time in work;
an exponent above 1.15 (cost growing faster than linear in the work) is flagged, and so is a
layer whose time at constant work grows more than 25 % over the smallest E.

    python benchmarks/bench_scaling.py [--quick] [--repeats N]

Writes benchmarks/results/scaling_cpu.{md,json}; run with glibc's allocator tuned
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=8589934592``: large tensors reuse heap memory
instead of fresh, page-faulted pages), scaling_cpu_malloc_tuned.{md,json} beside them.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _timing import (  # noqa: E402
    add_clock_argument,
    default_clock,
    load_verdict,
    machine_load,
    malloc_note,
    malloc_settings,
    markdown_table,
    round_robin_ms,
    save_results,
)

from moe_router import soft_topk  # noqa: E402
from moe_router.moe import MoELayer, SwiGLU  # noqa: E402
from moe_router.ops import threshold_cpp as _cpu_kernels  # noqa: E402
from moe_router.ops.soft_topk import THRESHOLD_METHODS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scaling_cpu"
EXPONENT_FLAG = 1.15
CONSTANT_WORK_FLAG = 1.25


def fwd_bwd(fn, x, grad):
    def run():
        leaf = x.detach().requires_grad_()
        fn(leaf).backward(grad)

    return run


def operator_contenders(num_rows: int, num_entries: int, k: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_rows, num_entries, generator=gen)
    grad = torch.randn(num_rows, num_entries, generator=gen)
    grad_k = grad[:, :k].contiguous()
    out = {"hard": (fwd_bwd(lambda a: torch.topk(a.softmax(-1), k, -1).values, x, grad_k), repeats)}
    for method in THRESHOLD_METHODS:
        out[method] = (fwd_bwd(lambda a, m=method: soft_topk(a, k, method=m), x, grad), repeats)
    return out


def exponents(sizes: list[float], series: list[float]) -> list[float | None]:
    """Exponent of time in work between each size and the previous one."""
    out: list[float | None] = [None]
    for i in range(1, len(sizes)):
        out.append(math.log(series[i] / series[i - 1]) / math.log(sizes[i] / sizes[i - 1]))
    return out


def operator_series(
    label: str, shapes: list[tuple[int, int, int]], repeats: int, clock: str
) -> dict:
    """Time every method at every shape; sizes = R*N."""
    times: dict[str, list[float]] = {}
    for num_rows, num_entries, k in shapes:
        # fewer rounds for the biggest shapes keeps the run short
        reps = max(3, repeats if num_rows * num_entries <= 2**22 else repeats // 2)
        medians = round_robin_ms(operator_contenders(num_rows, num_entries, k, reps), clock=clock)
        for name, ms in medians.items():
            times.setdefault(name, []).append(ms)
        print(f"  {label}: done R={num_rows} N={num_entries} k={k}", flush=True)
    work = [float(r * n) for r, n, _ in shapes]
    return {
        "label": label,
        "shapes": [list(s) for s in shapes],
        "work": work,
        "ms": times,
        "exponent": {name: exponents(work, ms) for name, ms in times.items()},
    }


def layer_series(experts: list[int], repeats: int, num_tokens: int, clock: str) -> dict:
    d_model, k, d_ff = 256, 2, 512
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, d_model, generator=gen)
    grad = torch.randn(num_tokens, d_model, generator=gen)
    times: dict[str, list[float]] = {}
    for num_experts in experts:
        contenders = {}
        for gate in ("topk", "soft_topk"):
            torch.manual_seed(0)
            layer = MoELayer(d_model, d_ff, num_experts, k, gate=gate)
            contenders[gate] = (fwd_bwd(layer, x, grad), repeats)
        torch.manual_seed(0)
        contenders["dense SwiGLU (K*F)"] = (fwd_bwd(SwiGLU(d_model, k * d_ff), x, grad), repeats)
        for name, ms in round_robin_ms(contenders, clock=clock).items():
            times.setdefault(name, []).append(ms)
        print(f"  layer: done E={num_experts}", flush=True)
    return {
        "label": f"MoELayer vs E (T={num_tokens}, D={d_model}, K={k}, F={d_ff})",
        "experts": experts,
        "ms": times,
        "vs_smallest": {name: [t / ms[0] for t in ms] for name, ms in times.items()},
    }


def operator_markdown(series: dict, size_label: str, sizes: list[str]) -> tuple[str, list[str]]:
    header = [size_label, *(f"{name} ms (exp.)" for name in series["ms"])]
    rows, flags = [], []
    for i, size in enumerate(sizes):
        row = [size]
        for name, ms in series["ms"].items():
            exponent = series["exponent"][name][i]
            cell = f"{ms[i]:.2f}"
            if exponent is not None:
                cell += f" ({exponent:.2f})"
                if exponent > EXPONENT_FLAG:
                    cell += " **!**"
                    flags.append(f"{series['label']}: {name} at {size} (exponent {exponent:.2f})")
            row.append(cell)
        rows.append(row)
    return markdown_table(header, rows), flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    add_clock_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = args.clock or default_clock(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    rows_list = [1000, 10000] if args.quick else [1000, 10000, 100000, 1000000]
    entries_list = [8, 64, 256] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1024]
    experts_list = [8, 16] if args.quick else [8, 16, 32, 64, 128]
    num_rows_n = 2048 if args.quick else 16384
    num_tokens = 1024 if args.quick else 8192

    payload = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "clock": clock,
        "cpu_kernels": _cpu_kernels.available(),
        "load_before": machine_load(),
        "malloc": malloc_settings(),
    }
    vs_rows = operator_series(
        "soft_topk vs R (N=64, k=8)", [(r, 64, 8) for r in rows_list], repeats, clock
    )
    vs_entries = operator_series(
        f"soft_topk vs N (R={num_rows_n}, k=N/8)",
        [(num_rows_n, n, max(1, n // 8)) for n in entries_list],
        repeats,
        clock,
    )
    layer = layer_series(experts_list, max(2, repeats - 2), num_tokens, clock)
    payload.update(
        {"vs_rows": vs_rows, "vs_entries": vs_entries, "layer": layer, "load_after": machine_load()}
    )

    table_r, flags_r = operator_markdown(vs_rows, "R", [f"{r:.0e}" for r in rows_list])
    table_n, flags_n = operator_markdown(
        vs_entries, "N (k)", [f"{n} ({max(1, n // 8)})" for n in entries_list]
    )
    layer_rows, flags_e = [], []
    for i, num_experts in enumerate(experts_list):
        row = [str(num_experts)]
        for name, ms in layer["ms"].items():
            growth = layer["vs_smallest"][name][i]
            cell = f"{ms[i]:.1f} ({growth:.2f}x)"
            if growth > CONSTANT_WORK_FLAG:
                cell += " **!**"
                flags_e.append(f"{layer['label']}: {name} at E={num_experts} ({growth:.2f}x E=8)")
            row.append(cell)
        layer_rows.append(row)
    table_e = markdown_table(["E", *(f"{n} ms (x smallest E)" for n in layer["ms"])], layer_rows)
    flags = flags_r + flags_n + flags_e
    text = "\n".join(
        [
            "# Scaling, CPU fp32 forward+backward",
            "",
            f"torch {payload['torch']}, {payload['machine']}, {payload['threads']} thread(s); "
            f"C++ kernels {'loaded' if payload['cpu_kernels'] else 'NOT available'}. Medians, "
            f"contenders timed round-robin at each size, {clock} clock (process CPU time at one "
            "thread: robust to the other jobs of a shared machine).",
            "",
            f"Machine load before: `{payload['load_before']}`; after: `{payload['load_after']}`. "
            + load_verdict(payload["load_before"])
            + " The exponents between neighbouring sizes carry the timing noise too.",
            "",
            malloc_note(payload["malloc"]),
            "",
            f"(exp.) = exponent of time in work (R*N) from the previous size; **!** = above "
            f"{EXPONENT_FLAG} (faster than linear). Layer: work is constant in E, (x) = time "
            f"over the smallest E; **!** = above {CONSTANT_WORK_FLAG}x.",
            "",
            f"## {vs_rows['label']}",
            "",
            table_r,
            "",
            f"## {vs_entries['label']}",
            "",
            table_n,
            "",
            f"## {layer['label']}",
            "",
            table_e,
            "",
            "## Flagged",
            "",
            *([f"- {line}" for line in flags] or ["- none"]),
        ]
    )
    payload["flags"] = flags
    print(text)
    if not args.quick:
        # a tuned allocator's figures go beside the defaults', not over them
        stem = RESULTS.with_name(RESULTS.name + "_malloc_tuned") if payload["malloc"] else RESULTS
        save_results(stem, text, payload)
        print(f"\nwrote {stem}.md and .json")


if __name__ == "__main__":
    main()
