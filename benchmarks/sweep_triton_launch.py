"""Launch-tile sweep of the fused Triton soft top-k kernels: (ROWS, num_warps) per row width.

The Triton forward misses its goal (10^6 x 64, k = 2 in <= 0.25 ms on an H100-class GPU;
docs/results.md, Triton kernels on an H200) and does not reach the memory bound. Its
tile, _TILE_ELEMENTS elements of rows at 4 or 8 warps (threshold_triton._launch_config), was
chosen without a GPU. This script times the forward and the backward for every
(ROWS, num_warps) in the grid, each against the default tile measured in the same run, next to a
one-pass Triton softmax on the same tile (read, row max, exp, row sum, write): the floor of any
kernel that reduces each row once, so "forward / one pass" is the solve's cost in passes.

Usage (on a CUDA machine, from the repository root):
    python benchmarks/sweep_triton_launch.py                  # N = 64, all four methods
    python benchmarks/sweep_triton_launch.py --n 8 64 256     # more widths
    python benchmarks/sweep_triton_launch.py --max-seconds 200  # stop early, keep what ran
    python benchmarks/sweep_triton_launch.py --smoke          # no GPU: the interpreter on tiny
                                                              # rows, to check the script

Writes benchmarks/results/gpu/launch_sweep.{md,json} (not in --smoke). Every configuration
compiles its own kernels (about a second each), so the full grid at one width and four methods
takes about 3 minutes; --max-seconds bounds it for a short device lease.

Shape legend: R rows, N entries per row, ROWS rows per program (the tile).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_soft_topk_gpu import check_environment, gpu_timer, report, wall_clock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu"

ROWS_GRID = (1, 2, 4, 8, 16, 32, 64, 128)
WARPS_GRID = (1, 2, 4, 8)
# Tiles outside this many elements are not timed: smaller ones leave most lanes idle, larger
# ones spill registers.
MIN_TILE, MAX_TILE = 256, 8192


@dataclass
class Point:
    """Medians (ms) of one method at one tile; ratios are against the default tile's times."""

    n: int
    method: str
    rows: int
    num_warps: int
    default: bool
    fwd_ms: float
    bwd_ms: float
    one_pass_ms: float
    fwd_vs_default: float = float("nan")
    bwd_vs_default: float = float("nan")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[64], help="row widths (default 64)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows R (default 10^6)")
    parser.add_argument("--k", type=float, default=2.0, help="budget per row (default 2)")
    parser.add_argument(
        "--methods", default=None, help="comma-separated methods (default: every one)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop starting new configurations after this long; the report says so",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="no GPU: tiny rows on the interpreter; writes nothing"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    return parser.parse_args(argv)


def tiles(block_n: int) -> list[tuple[int, int]]:
    """The (ROWS, num_warps) grid for rows padded to block_n entries (at least a warp's worth
    of elements per tile)."""
    return [
        (rows, warps)
        for rows in ROWS_GRID
        for warps in WARPS_GRID
        if MIN_TILE <= rows * block_n <= MAX_TILE and rows * block_n >= 32 * warps
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not check_environment("sweep_triton_launch", args.smoke):
        return 2
    import torch
    import triton
    import triton.language as tl

    sys.path.insert(0, str(ROOT))
    from moe_router.ops import threshold_triton as kernels
    from moe_router.ops.soft_topk import THRESHOLD_METHODS

    methods = list(THRESHOLD_METHODS)
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in THRESHOLD_METHODS]
    if unknown:
        print(f"--methods: {unknown} have no Triton kernel; allowed: {THRESHOLD_METHODS}")
        return 2
    bad_n = [n for n in args.n if not 1 <= n <= kernels.MAX_N]
    if bad_n:
        print(f"--n: {bad_n} out of range; allowed: 1 to {kernels.MAX_N}")
        return 2

    @triton.jit
    def one_pass_kernel(x_ptr, out_ptr, R, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < R)[:, None] & (cols < N)[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=float("-inf"))
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        tl.store(out_ptr + offsets, e / tl.sum(e, axis=1)[:, None], mask=mask)

    device = "cpu" if args.smoke else "cuda"
    n_rows = 64 if args.smoke else args.rows
    timer = wall_clock if args.smoke else gpu_timer(quick=True)
    started = time.monotonic()
    stopped_early = False
    points: list[Point] = []
    for n in args.n:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n_rows, n, device=device, generator=gen) * 2
        g = torch.randn(n_rows, n, device=device, generator=gen)
        k_R = torch.full((n_rows,), args.k, device=device)
        tau_R = torch.ones(n_rows, device=device)
        out = torch.empty_like(x)
        block_n, default_rows, default_warps = kernels._launch_config(n)
        grid = tiles(block_n)
        if args.smoke:
            grid = grid[:2]
        # the default first: every other tile's ratio needs it, also after an early stop
        grid = [(default_rows, default_warps)] + [
            t for t in grid if t != (default_rows, default_warps)
        ]
        for method in methods:
            p = kernels.triton_soft_topk_forward(x, k_R, tau_R, method)
            for rows, warps in grid:
                if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
                    stopped_early = True
                    break
                launch = (rows, warps)
                fwd_ms, bwd_ms, one_pass_ms = _time_tile(
                    kernels, one_pass_kernel, timer, (x, g, p, k_R, tau_R, out), method, launch
                )
                point = Point(
                    n=n,
                    method=method,
                    rows=rows,
                    num_warps=warps,
                    default=launch == (default_rows, default_warps),
                    fwd_ms=fwd_ms,
                    bwd_ms=bwd_ms,
                    one_pass_ms=one_pass_ms,
                )
                points.append(point)
                print(_line(point), flush=True)
            if stopped_early:
                break
        if stopped_early:
            break
    _ratios(points)
    payload = {
        "meta": {
            "device": "interpreter (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "rows": n_rows,
            "k": args.k,
            "stopped_early": stopped_early,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        },
        "points": [asdict(p) for p in points],
    }
    table = _markdown(points, args, n_rows, torch, stopped_early)
    report(table, payload, args.out / "launch_sweep", args.smoke)
    return 0


def _time_tile(kernels, one_pass_kernel, timer, tensors, method: str, launch: tuple[int, int]):
    """(forward, backward, one pass) medians in ms at one (ROWS, num_warps) tile."""
    x, g, p, k_R, tau_R, out = tensors
    n_rows, n = x.shape
    block_n, rows, warps = kernels._launch_config(n, launch)
    programs = (-(-n_rows // rows),)
    fwd_ms = timer(lambda: kernels.triton_soft_topk_forward(x, k_R, tau_R, method, launch=launch))
    bwd_ms = timer(
        lambda: kernels.triton_soft_topk_backward(p, g, tau_R, method, False, False, launch=launch)
    )
    one_pass_ms = timer(
        lambda: one_pass_kernel[programs](
            x, out, n_rows, n, ROWS=rows, BLOCK_N=block_n, num_warps=warps
        )
    )
    return fwd_ms, bwd_ms, one_pass_ms


def _ratios(points: list[Point]) -> None:
    """Each point's times over the default tile's, same width and method (NaN if not timed)."""
    defaults = {(p.n, p.method): p for p in points if p.default}
    for point in points:
        base = defaults.get((point.n, point.method))
        if base is not None:
            point.fwd_vs_default = point.fwd_ms / base.fwd_ms
            point.bwd_vs_default = point.bwd_ms / base.bwd_ms


def _line(p: Point) -> str:
    return (
        f"N={p.n} {p.method} ROWS={p.rows} warps={p.num_warps}{' (default)' if p.default else ''}"
        f": fwd {p.fwd_ms:.3f} ms, bwd {p.bwd_ms:.3f} ms, one pass {p.one_pass_ms:.3f} ms"
    )


def _markdown(points: list[Point], args, n_rows: int, torch, stopped_early: bool) -> str:
    lines = [
        "# Triton soft top-k: launch-tile sweep",
        "",
        f"R = {n_rows}, k = {args.k:g}, tau = 1, float32; "
        f"{'interpreter (smoke)' if args.smoke else torch.cuda.get_device_name()}. Medians in "
        "ms (`triton.testing.do_bench`). `x default`: time over the default tile's, same "
        "width and method, in this run. `one pass`: a Triton softmax on the same tile (read, "
        "row max, exp, row sum, write), the floor of a kernel that reduces each row once.",
        "",
    ]
    if stopped_early:
        lines += [f"**Stopped early** (--max-seconds {args.max_seconds:g}): not all tiles ran.", ""]
    for n in sorted({p.n for p in points}):
        for method in dict.fromkeys(p.method for p in points):  # (in the order timed)
            rows = sorted(
                (p for p in points if p.n == n and p.method == method), key=lambda p: p.fwd_ms
            )
            if not rows:
                continue
            lines += [
                f"## N = {n}, {method}",
                "",
                "| ROWS | warps | fwd ms | x default | fwd / one pass | bwd ms | x default |",
                "|--:|--:|--:|--:|--:|--:|--:|",
            ]
            for p in rows:
                mark = " (default)" if p.default else ""
                lines.append(
                    f"| {p.rows}{mark} | {p.num_warps} | {p.fwd_ms:.3f} | "
                    f"{p.fwd_vs_default:.2f} | {p.fwd_ms / p.one_pass_ms:.1f} | "
                    f"{p.bwd_ms:.3f} | {p.bwd_vs_default:.2f} |"
                )
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
