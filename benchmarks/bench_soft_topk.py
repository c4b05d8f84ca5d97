"""Forward+backward time of every soft top-k method against baselines and peers, on CPU.

Every threshold method runs twice: through the default CPU path (the fused C++ kernels of
moe_router/ops/csrc) and through the readable PyTorch path (backend="torch").

Measured in the same run on the same inputs, round-robin (one call of each contender per
round, medians over the rounds):
  hard  - the hard router path: softmax -> topk -> gather, forward + backward;
  seed  - the original implementation (64-step bisection, vmap-of-grad backward),
          reproduced in benchmarks/seed_topk.py;
  peers - torchsort, entmax budget_bisect, LapSum, difftopk (benchmarks/_peers.py says which
          function each computes and how its temperature maps to ours). A peer that is not
          installed is a skipped row with the reason (`pip install -e .[bench]`; torchsort
          needs a build, see the README).

Accuracy columns (fp32, the timed inputs): max |sum p - k| for everything that returns p, and
for peers computing one of our functions max |p - ours| and max |grad - ours| (same upstream
gradient), at tau = --tau.

Goals: every threshold method <= 1.0x hard at 16384x64 k=8 and 4096x256 k=8,
<= 1.5x at 16384x8 k=2; >= 4x faster than the fastest peer computing the same function.

Prints the tables and writes benchmarks/results/soft_topk_cpu.{md,json} (all thread counts).

    python benchmarks/bench_soft_topk.py [--quick] [--threads 1 2] [--repeats N] [--tau T]
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _peers import Peer, load_peers  # noqa: E402
from _timing import (  # noqa: E402
    add_clock_argument,
    default_clock,
    load_verdict,
    machine_load,
    markdown_table,
    round_robin_ms,
    save_results,
)
from seed_topk import seed_soft_topk  # noqa: E402

from moe_router import soft_topk  # noqa: E402
from moe_router.ops import threshold_cpp as _cpu_kernels  # noqa: E402
from moe_router.ops.soft_topk import METHODS, THRESHOLD_METHODS  # noqa: E402

SHAPES = [(16384, 64, 8), (16384, 8, 2), (4096, 256, 8)]
QUICK_SHAPES = [(2048, 64, 8), (2048, 8, 2)]
RESULTS = Path(__file__).resolve().parent / "results" / "soft_topk_cpu"
# Goal on "x hard" per shape (num_entries -> ratio), and the speed-up over peers.
HARD_GOAL = {64: 1.0, 256: 1.0, 8: 1.5}
PEER_SPEEDUP_GOAL = 4.0


def hard_path(x, k):
    weights, _ = torch.topk(torch.softmax(x, dim=-1), k, dim=-1)  # topk's values are the gather
    return weights


def fwd_bwd(fn, x, grad_out):
    """A closure timing one forward + backward of fn on a fresh leaf copy of x."""

    def run():
        leaf = x.detach().requires_grad_()
        out = fn(leaf)
        out.backward(grad_out if out.shape == grad_out.shape else torch.ones_like(out))

    return run


def value_and_grad(fn, x, grad_out):
    leaf = x.detach().requires_grad_()
    p = fn(leaf)
    p.backward(grad_out)
    return p.detach(), leaf.grad


@dataclass
class Contender:
    """One timed row: what it is, the function of the scores, and how to time it."""

    kind: str  # baseline / ours / peer
    fn: Callable[[torch.Tensor], torch.Tensor]
    repeats: int
    note: str = ""
    rows: int | None = None  # time on the first `rows` rows and scale to R (None = all rows)


def contenders_for(num_rows, num_entries, k, tau, peers, repeats) -> dict[str, Contender]:
    """Every contender of one shape; slow ones get fewer repeats."""
    few = max(3, repeats // 3)
    out = {
        "hard (softmax+topk+gather)": Contender("baseline", lambda a: hard_path(a, k), repeats),
        "bisection baseline (vmap grad)": Contender(
            "baseline", lambda a: seed_soft_topk(a, k), few
        ),
    }
    for method in THRESHOLD_METHODS:
        out[method] = Contender(
            "ours", lambda a, m=method: soft_topk(a, k, tau=tau, method=m), repeats
        )
    for method in THRESHOLD_METHODS:
        out[f"{method} (torch path)"] = Contender(
            "ours", lambda a, m=method: soft_topk(a, k, tau=tau, method=m, backend="torch"), few
        )
    for method in METHODS:
        if method not in THRESHOLD_METHODS:
            out[method] = Contender(
                "ours", lambda a, m=method: soft_topk(a, k, tau=tau, method=m), 3, "reference"
            )
    for peer in peers:
        if peer.fn is None:
            continue
        rows = num_rows if peer.max_rows is None else min(num_rows, peer.max_rows(num_entries))
        note = peer.mapping
        if rows < num_rows:
            note += f"; timed on {rows} rows, scaled x{num_rows / rows:g}"
        out[peer.name] = Contender(
            "peer",
            lambda a, fn=peer.fn: fn(a, k, tau),
            few,
            note,
            rows if rows < num_rows else None,
        )
    return out


def accuracy(contenders, x, grad_out, k, peers: list[Peer]) -> dict[str, dict[str, float]]:
    """max |sum p - k| of everything returning p; max |p - ours|, |grad - ours| for peers
    computing one of our functions (on the rows each is timed on)."""
    same_as = {peer.name: peer.same_as for peer in peers}
    ours = {
        method: value_and_grad(contenders[method].fn, x, grad_out)
        for method in THRESHOLD_METHODS
        if method in same_as.values()
    }
    result = {}
    for label, contender in contenders.items():
        if label.startswith("hard"):
            continue
        rows = contender.rows
        xs, gs = (x, grad_out) if rows is None else (x[:rows], grad_out[:rows])
        p, grad = value_and_grad(contender.fn, xs, gs)
        entry = {"sum_err": float((p.sum(-1) - k).abs().max())}
        reference = same_as.get(label)
        if reference is not None:
            p_ours, grad_ours = ours[reference]
            n = p.shape[0]
            entry["p_err"] = float((p - p_ours[:n]).abs().max())
            entry["grad_err"] = float((grad - grad_ours[:n]).abs().max())
        result[label] = entry
    return result


def bench_threads(threads, shapes, repeats, tau, peers, accuracies, clock) -> dict:
    torch.set_num_threads(threads)
    entries = []
    for num_rows, num_entries, k in shapes:
        torch.manual_seed(0)
        x = torch.randn(num_rows, num_entries)
        grad_out = torch.randn(num_rows, num_entries)
        contenders = contenders_for(num_rows, num_entries, k, tau, peers, repeats)
        key = f"{num_rows}x{num_entries}, k={k}"
        if key not in accuracies:
            accuracies[key] = accuracy(contenders, x, grad_out, k, peers)
        timed = {}
        for label, c in contenders.items():
            xs, gs = (x, grad_out) if c.rows is None else (x[: c.rows], grad_out[: c.rows])
            timed[label] = (fwd_bwd(c.fn, xs, gs), c.repeats)
        medians = round_robin_ms(timed, clock=clock)
        rows_out = []
        for label, c in contenders.items():
            scale = 1.0 if c.rows is None else num_rows / c.rows
            row = {"label": label, "kind": c.kind, "ms": medians[label] * scale}
            rows_out.append({**row, "repeats": c.repeats, "note": c.note})
        for peer in peers:
            if peer.fn is None:
                row = {"label": peer.name, "kind": "peer", "ms": None, "repeats": 0}
                rows_out.append({**row, "note": "skipped: " + peer.skip_reason})
        entries.append({"shape": [num_rows, num_entries], "k": k, "key": key, "rows": rows_out})
        print(f"  [{threads} thread(s)] done {key}", flush=True)
    return {"threads": threads, "clock": clock, "load_after": machine_load(), "shapes": entries}


def goals(entry: dict, peers: list[Peer]) -> list[str]:
    by_label = {r["label"]: r for r in entry["rows"]}
    hard = by_label["hard (softmax+topk+gather)"]["ms"]
    limit = HARD_GOAL.get(entry["shape"][1])
    lines = []
    if limit is not None:
        worst = max(THRESHOLD_METHODS, key=lambda m: by_label[m]["ms"])
        ratio = by_label[worst]["ms"] / hard
        lines.append(
            f"threshold methods <= {limit:g}x hard: worst {worst} {ratio:.2f}x "
            f"({'met' if ratio <= limit else 'MISSED'})"
        )
    for method in sorted({p.same_as for p in peers if p.same_as}):
        timed = [by_label[p.name]["ms"] for p in peers if p.same_as == method and p.fn]
        if not timed:
            lines.append(f"{method} vs peers: no peer available")
            continue
        speedup = min(timed) / by_label[method]["ms"]
        lines.append(
            f"{method} >= {PEER_SPEEDUP_GOAL:g}x faster than the fastest same-function peer: "
            f"{speedup:.1f}x ({'met' if speedup >= PEER_SPEEDUP_GOAL else 'MISSED'})"
        )
    return lines


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(payload: dict, peers: list[Peer]) -> str:
    same_as = {p.name: p.same_as for p in peers}
    parts = [
        "# soft_topk forward+backward, CPU fp32",
        "",
        f"torch {payload['torch']}, {payload['machine']}, tau = {payload['tau']}; C++ kernels "
        f"{'loaded' if payload['cpu_kernels'] else 'NOT available (torch path)'}. Medians, "
        "contenders timed round-robin in the same run; the clock is process CPU time at one "
        "thread (robust to the other jobs of a shared machine), wall time otherwise. "
        "`method` = the default CPU path (fused "
        "C++ kernels); `method (torch path)` = backend='torch'.",
        "",
        f"Machine load before: `{payload['load_before']}`. " + load_verdict(payload["load_before"]),
        "",
        "Peers: "
        + "; ".join(
            f"**{p.name}**: {p.mapping}"
            + (f" (same function as our `{p.same_as}`)" if p.same_as else "")
            for p in peers
        )
        + ". Accuracy columns: max over the rows of |sum p - k|, and for "
        "peers computing one of our functions the max |p - ours| and |grad_x - ours| (same "
        "random upstream gradient), fp32. A large max|grad-ours| beside a tiny max|p-ours| "
        "marks an entry on a kink of the capped-simplex projection (p exactly 0 or 1 in fp32) "
        "that the peer's rounding put on the other side: a different subgradient, not a "
        "different function (ours matches the fp64 result there).",
    ]
    for run in payload["runs"]:
        parts += [
            "",
            f"## {run['threads']} thread(s), {run['clock']} clock",
            "",
            f"Load after: `{run['load_after']}`",
        ]
        for entry in run["shapes"]:
            by_label = {r["label"]: r for r in entry["rows"]}
            hard = by_label["hard (softmax+topk+gather)"]["ms"]
            seed = by_label["bisection baseline (vmap grad)"]["ms"]
            acc = payload["accuracy"][entry["key"]]
            table_rows = []
            for r in entry["rows"]:
                ms = r["ms"]
                ours = same_as.get(r["label"])
                a = acc.get(r["label"], {})
                table_rows.append(
                    [
                        r["label"],
                        fmt(ms, ".2f"),
                        "-" if ms is None else f"{ms / hard:.2f}",
                        "-" if ms is None else f"{seed / ms:.1f}",
                        "-" if ms is None or not ours else f"{ms / by_label[ours]['ms']:.1f}",
                        fmt(a.get("sum_err"), ".1e"),
                        fmt(a.get("p_err"), ".1e"),
                        fmt(a.get("grad_err"), ".1e"),
                        r["note"],
                    ]
                )
            header = [
                "method",
                "fwd+bwd ms",
                "x hard",
                "seed / this",
                "peer / ours",
                "max|sum p-k|",
                "max|p-ours|",
                "max|grad-ours|",
                "note",
            ]
            parts += ["", f"### {entry['key']}", "", markdown_table(header, table_rows), ""]
            parts += [f"- {line}" for line in goals(entry, peers)]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, small shapes only")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="thread counts to run, e.g. 1 2"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--tau", type=float, default=1.0)
    add_clock_argument(parser)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 15)
    shapes = QUICK_SHAPES if args.quick else SHAPES

    peers = load_peers()
    for peer in peers:
        print(f"peer {peer.name}: {'ok' if peer.fn else 'SKIPPED, ' + peer.skip_reason}")
    payload = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "tau": args.tau,
        "load_before": machine_load(),
        # build (or load) the C++ kernels before any timing
        "cpu_kernels": _cpu_kernels.available(),
        "peers": [
            {"name": p.name, "same_as": p.same_as, "mapping": p.mapping, "skipped": p.skip_reason}
            for p in peers
        ],
        "accuracy": {},
        "runs": [],
    }
    print(f"C++ CPU kernels: {'loaded' if payload['cpu_kernels'] else 'NOT available'}")
    for threads in args.threads:
        clock = args.clock or default_clock(threads)
        run = bench_threads(threads, shapes, repeats, args.tau, peers, payload["accuracy"], clock)
        payload["runs"].append(run)
    text = markdown(payload, peers)
    print(text)
    if not args.quick:
        save_results(RESULTS, text, payload)
        print(f"\nwrote {RESULTS}.md and .json")


if __name__ == "__main__":
    main()
