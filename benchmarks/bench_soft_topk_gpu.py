"""Fused Triton soft top-k against the PyTorch path, the original implementation and softmax + topk.

For each shape (R rows x N entries) it times, with ``triton.testing.do_bench`` medians:

- forward and backward of the Triton kernels (``moe_router.ops.threshold_triton``),
- forward and backward (autograd) of the PyTorch path ``moe_router.soft_topk``,
- forward and backward of the original implementation (``benchmarks/seed_topk.py``, sigmoid only),
- ``torch.softmax`` + ``torch.topk`` (what a hard top-k router computes) and its backward,

and reports the Triton kernels' achieved memory bandwidth (bytes they must move / time) and
each baseline's time as a multiple of the Triton time, all measured in the same run.

Usage:
    python benchmarks/bench_soft_topk_gpu.py            # full shapes, writes results/
    python benchmarks/bench_soft_topk_gpu.py --quick    # small shapes, a quick look
    python benchmarks/bench_soft_topk_gpu.py --smoke    # no GPU: tiny shapes on Triton's CPU
                                                        # interpreter, wall-clock timing, to check
                                                        # the script itself; writes nothing

Shape legend: R rows (tokens), N entries per row (experts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

FULL_SHAPES = [(1_000_000, 8), (1_000_000, 64), (1_000_000, 256), (16_384, 64)]
QUICK_SHAPES = [(100_000, 64), (16_384, 64)]
SMOKE_SHAPES = [(64, 8), (48, 64)]


@dataclass
class Row:
    """Timings (ms, medians) for one shape and method; None where a baseline does not apply."""

    rows: int
    n: int
    k: float
    method: str
    triton_fwd_ms: float
    triton_bwd_ms: float
    triton_fwd_gbps: float
    triton_bwd_gbps: float
    torch_fwd_ms: float | None = None
    torch_bwd_ms: float | None = None
    seed_fwd_ms: float | None = None
    seed_bwd_ms: float | None = None
    softmax_topk_fwd_ms: float | None = None
    softmax_topk_bwd_ms: float | None = None
    notes: list[str] = field(default_factory=list)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small shapes, fewer repetitions")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="no GPU needed: tiny shapes on the Triton interpreter; writes nothing",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated soft top-k methods (default: every threshold method)",
    )
    parser.add_argument("--k", type=float, default=2.0, help="budget per row (default 2)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="score dtype (default float32)",
    )
    parser.add_argument("--skip-torch", action="store_true", help="skip the PyTorch path")
    parser.add_argument("--skip-seed", action="store_true", help="skip the original implementation")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="output folder for soft_topk_gpu.{md,json}"
    )
    return parser.parse_args(argv)


def check_environment(script: str, smoke: bool) -> bool:
    """For a smoke run, switch Triton to its CPU interpreter; otherwise check for a CUDA device.
    Then check for triton. Prints why not and returns False where the script cannot run."""
    if smoke:
        # Must precede the first import of triton (the interpreter replaces triton.language).
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not smoke and not torch.cuda.is_available():
        print(
            f"{script}: no CUDA device found. It times GPU kernels; run it on a machine with an "
            "NVIDIA GPU (or use --smoke to check the script on CPU).",
            file=sys.stderr,
        )
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        print(f"{script}: the `triton` package is not installed.", file=sys.stderr)
        return False
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if not check_environment("bench_soft_topk_gpu", args.smoke):
        return 2
    import torch

    sys.path.insert(0, str(ROOT))
    from moe_router.ops import threshold_triton as kernels
    from moe_router.ops.soft_topk import THRESHOLD_METHODS, soft_topk

    seed_soft_topk = None
    if not args.skip_seed:
        try:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from seed_topk import seed_soft_topk
        except ImportError:
            print("note: benchmarks/seed_topk.py not found; the seed baseline is skipped")

    device = "cpu" if args.smoke else "cuda"
    dtype = getattr(torch, args.dtype)
    shapes = SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else FULL_SHAPES
    methods = list(THRESHOLD_METHODS)
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        if method not in THRESHOLD_METHODS:
            print(
                f"--methods: {method!r} has no Triton kernel; allowed: {THRESHOLD_METHODS}",
                file=sys.stderr,
            )
            return 2
    timer = wall_clock if args.smoke else gpu_timer(quick=args.quick)

    results: list[Row] = []
    for n_rows, n in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(n_rows, n, device=device, generator=gen) * 2).to(dtype)
        g = torch.randn(n_rows, n, device=device, generator=gen)
        k_R = torch.full((n_rows,), args.k, device=device)
        tau_R = torch.ones(n_rows, device=device)
        for method in methods:
            row = _bench_shape(
                kernels, soft_topk, seed_soft_topk, timer, x, g, k_R, tau_R, args, method
            )
            results.append(row)
            print(_line(row), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()

    meta = _environment(torch, device)
    meta.update({"quick": args.quick, "dtype": args.dtype, "k": args.k})
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    report(_markdown(results, args, torch, device), payload, args.out / "soft_topk_gpu", args.smoke)
    return 0


def report(table: str, payload: dict, stem: Path, smoke: bool) -> None:
    """Print the markdown table; unless this is a smoke run, write it and the JSON payload to
    stem.md and stem.json."""
    print()
    print(table)
    if smoke:
        print("(smoke run: interpreter wall-clock times, nothing written)")
        return
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")


def _bench_shape(kernels, soft_topk, seed_soft_topk, timer, x, g, k_R, tau_R, args, method):
    import torch

    n_rows, n = x.shape
    k = args.k
    p = kernels.triton_soft_topk_forward(x, k_R, tau_R, method)
    fwd_ms = timer(lambda: kernels.triton_soft_topk_forward(x, k_R, tau_R, method))
    bwd_ms = timer(lambda: kernels.triton_soft_topk_backward(p, g, tau_R, method, False, False))
    # The minimum traffic: forward reads x, k, tau and writes p (fp32); backward reads p and g,
    # reads tau and writes grad_x (fp32).
    fwd_bytes = n_rows * n * (x.element_size() + 4) + n_rows * 8
    bwd_bytes = n_rows * n * (p.element_size() + g.element_size() + 4) + n_rows * 4
    row = Row(
        rows=n_rows,
        n=n,
        k=k,
        method=method,
        triton_fwd_ms=fwd_ms,
        triton_bwd_ms=bwd_ms,
        triton_fwd_gbps=fwd_bytes / fwd_ms / 1e6,
        triton_bwd_gbps=bwd_bytes / bwd_ms / 1e6,
    )

    def autograd_pair(fn, inputs, out_grad):
        """(forward ms, backward ms) of fn(*inputs) with autograd, backward timed alone."""
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        fwd = timer(lambda: fn(*leaves))
        out = fn(*leaves)
        grad = out_grad(out)
        bwd = timer(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
        return fwd, bwd

    if not args.skip_torch:
        try:
            row.torch_fwd_ms, row.torch_bwd_ms = autograd_pair(
                # backend="torch": the readable PyTorch path, not the public op's default
                # (which is these same Triton kernels on CUDA)
                lambda xx: soft_topk(xx, k, method=method, backend="torch"),
                [x],
                lambda out: g.to(out.dtype),
            )
        except torch.cuda.OutOfMemoryError:
            row.notes.append("torch path: out of memory")
    if seed_soft_topk is not None and method == "sigmoid" and float(k).is_integer():
        try:
            row.seed_fwd_ms, row.seed_bwd_ms = autograd_pair(
                lambda xx: seed_soft_topk(xx, int(k)), [x.float()], lambda out: g.to(out.dtype)
            )
        except torch.cuda.OutOfMemoryError:
            row.notes.append("seed: out of memory")

    def softmax_topk(xx):
        return torch.topk(torch.softmax(xx.float(), dim=-1), int(round(k)), dim=-1).values

    row.softmax_topk_fwd_ms, row.softmax_topk_bwd_ms = autograd_pair(
        softmax_topk, [x], lambda out: torch.ones_like(out)
    )
    if x.is_cuda:
        torch.cuda.synchronize()
    return row


def gpu_timer(quick: bool) -> Callable[[Callable[[], object]], float]:
    """Median ms of a callable by ``triton.testing.do_bench`` (fewer repetitions if quick)."""
    from triton.testing import do_bench

    warmup, rep = (10, 50) if quick else (25, 200)
    return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def wall_clock(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall-clock ms of a callable over a few calls after one warm-up (smoke runs)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _fmt(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.3f}"


def _ratio(baseline: float | None, ours: float) -> str:
    return "—" if baseline is None else f"{baseline / ours:.1f}×"


def _line(r: Row) -> str:
    return (
        f"R={r.rows} N={r.n} {r.method}: triton fwd {r.triton_fwd_ms:.3f} ms "
        f"({r.triton_fwd_gbps:.0f} GB/s), bwd {r.triton_bwd_ms:.3f} ms "
        f"({r.triton_bwd_gbps:.0f} GB/s); torch {_fmt(r.torch_fwd_ms)}/{_fmt(r.torch_bwd_ms)}"
        f"; seed {_fmt(r.seed_fwd_ms)}/{_fmt(r.seed_bwd_ms)}; softmax+topk "
        f"{_fmt(r.softmax_topk_fwd_ms)}/{_fmt(r.softmax_topk_bwd_ms)}"
    )


def _environment(torch, device: str) -> dict:
    import triton

    env = {
        "device": (
            torch.cuda.get_device_name()
            if device == "cuda"
            else f"CPU ({platform.machine()}), Triton interpreter"
        ),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    return env


def _markdown(results: list[Row], args, torch, device: str) -> str:
    env = _environment(torch, device)
    lines = [
        "# Soft top-k on the GPU: fused Triton kernels vs baselines",
        "",
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; "
        f"{env['date_utc']} UTC. Scores {args.dtype}, k = {args.k:g}, tau = 1. Times are "
        "medians in ms (`triton.testing.do_bench`); GB/s is the Triton kernels' minimum traffic "
        "(fwd: read x, write fp32 p; bwd: read p and g, write fp32 grad) over their time.",
        "",
        "## Times (ms)",
        "",
        "| R | N | method | triton fwd | triton bwd | fwd GB/s | bwd GB/s | torch fwd | torch bwd"
        " | seed fwd | seed bwd | softmax+topk fwd | softmax+topk bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.rows} | {r.n} | {r.method} | {r.triton_fwd_ms:.3f} | {r.triton_bwd_ms:.3f} | "
            f"{r.triton_fwd_gbps:.0f} | {r.triton_bwd_gbps:.0f} | {_fmt(r.torch_fwd_ms)} | "
            f"{_fmt(r.torch_bwd_ms)} | {_fmt(r.seed_fwd_ms)} | {_fmt(r.seed_bwd_ms)} | "
            f"{_fmt(r.softmax_topk_fwd_ms)} | {_fmt(r.softmax_topk_bwd_ms)} |"
        )
    lines += [
        "",
        "## Baseline time / Triton time (higher is better for Triton)",
        "",
        "| R | N | method | torch fwd | torch bwd | seed fwd | seed bwd | softmax+topk fwd"
        " | softmax+topk bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.rows} | {r.n} | {r.method} | {_ratio(r.torch_fwd_ms, r.triton_fwd_ms)} | "
            f"{_ratio(r.torch_bwd_ms, r.triton_bwd_ms)} | {_ratio(r.seed_fwd_ms, r.triton_fwd_ms)}"
            f" | {_ratio(r.seed_bwd_ms, r.triton_bwd_ms)} | "
            f"{_ratio(r.softmax_topk_fwd_ms, r.triton_fwd_ms)} | "
            f"{_ratio(r.softmax_topk_bwd_ms, r.triton_bwd_ms)} |"
        )
    notes = [f"- R={r.rows} N={r.n} {r.method}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += [
        "",
        "Targets (H100, R = 10^6, N = 64): forward <= 0.25 ms, backward <= 0.35 ms, "
        "within 1.5x of softmax + topk, >= 10x faster than the original implementation.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
