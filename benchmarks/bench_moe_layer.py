"""Forward+backward throughput of ``MoELayer`` per gate against naive baselines (same run).

Baselines, all with the same expert weights and the same number of active parameters:

* ``naive per-token loop`` — for each token, for each selected slot, run that expert on the
  token (one row at a time) and add the weighted result; the obvious implementation and the
  reference of the tests. It is timed on the first ``--naive-tokens`` tokens and its time is
  scaled linearly to T (its cost is per token by construction); the table says so.
* ``per-expert loop`` — Hugging Face Mixtral style: for each expert, find its tokens with
  ``torch.where``, run it on them, ``index_add_`` back. Full T.
* ``dense SwiGLU`` — one SwiGLU FFN with hidden width K*F (same active parameters per token,
  no routing). Full T.

Targets on CPU: ``soft_topk`` layer time <= 1.1x ``topk`` layer time; the dropless layer >= 3x
faster than the naive per-token loop.

Usage::

    python benchmarks/bench_moe_layer.py            # full sizes, results/moe_layer_cpu.{md,json}
    python benchmarks/bench_moe_layer.py --quick    # small T, a smoke run (results/*_quick.*)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_router.moe import MoELayer, SwiGLU  # noqa: E402
from moe_router.router import GATES, Router  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = [
    {"name": "E8_K2", "T": 8192, "D": 256, "E": 8, "K": 2, "F": 512},
    {"name": "E64_K8", "T": 8192, "D": 256, "E": 64, "K": 8, "F": 128},
]


def split_experts(layer: MoELayer) -> nn.ModuleList:
    """The layer's experts as separate SwiGLU modules (copies of the same weights), the way a
    naive implementation holds them: indexing one stacked [E, ...] parameter per token would
    make every backward step allocate a full-size [E, ...] gradient, an unfair handicap."""
    experts = nn.ModuleList()
    for e in range(layer.config.num_experts):
        expert = SwiGLU(layer.config.d_model, layer.config.d_ff)
        with torch.no_grad():
            expert.w1_DF.copy_(layer.w1_EDF[e])
            expert.w3_DF.copy_(layer.w3_EDF[e])
            expert.w2_FD.copy_(layer.w2_EFD[e])
        experts.append(expert)
    return experts


def naive_token_loop(router: Router, experts: nn.ModuleList, x_TD: torch.Tensor) -> torch.Tensor:
    """For each token, for each selected slot: run that expert on the token, add it weighted."""
    routing = router(x_TD)
    ids, valid = routing.expert_ids_TK.tolist(), routing.valid_TK.tolist()
    rows = []
    for t in range(x_TD.shape[0]):
        row = torch.zeros(1, x_TD.shape[1])
        for s, expert in enumerate(ids[t]):
            if valid[t][s]:
                row = row + routing.weights_TK[t, s] * experts[expert](x_TD[t : t + 1])
        rows.append(row)
    return torch.cat(rows)


def per_expert_loop(router: Router, experts: nn.ModuleList, x_TD: torch.Tensor) -> torch.Tensor:
    """Hugging Face Mixtral style: one masked gather / expert / index_add per expert."""
    routing = router(x_TD)
    ids_TK = torch.where(routing.valid_TK, routing.expert_ids_TK, -1)
    y_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(experts):
        token_idx, slot_idx = torch.where(ids_TK == e)
        weight_N1 = routing.weights_TK[token_idx, slot_idx].unsqueeze(-1)
        y_TD = y_TD.index_add(0, token_idx, weight_N1 * expert(x_TD[token_idx]))
    return y_TD


def time_fwd_bwd(fn: Callable, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds of one forward + backward."""
    xi = x.detach().requires_grad_()
    start = time.perf_counter()
    fn(xi).backward(grad)
    return time.perf_counter() - start


def bench_shape(shape: dict, gates: list[str], reps: int, naive_tokens: int) -> list[dict]:
    """Time every path on one shape. The paths are timed round-robin (rep 1 of each, then
    rep 2 of each, ...) so that load changes on a shared machine hit them all alike."""
    T, D, E, K, Fh = shape["T"], shape["D"], shape["E"], shape["K"], shape["F"]
    print(f"{shape['name']}: T={T} D={D} E={E} K={K} F={Fh}", flush=True)
    torch.manual_seed(0)
    x = torch.randn(T, D)

    def layer(gate: str, **kwargs) -> MoELayer:
        torch.manual_seed(0)  # identical router and expert weights on every path
        return MoELayer(D, Fh, E, K, gate=gate, **kwargs)

    paths: list[tuple[str, str, Callable, str]] = []
    for gate in gates:
        note = "dense compute over all E experts" if gate == "soft_topk_dense" else ""
        paths.append((gate, "layer", layer(gate), note))
    loop_layer = layer("topk", backend="loop")
    paths.append(("topk (loop backend)", "layer", loop_layer, "one matmul per expert slice"))
    router, experts = loop_layer.router, split_experts(loop_layer)
    paths.append(
        (
            "per-expert loop (HF)",
            "baseline",
            lambda xi: per_expert_loop(router, experts, xi),
            "topk routing",
        )
    )
    torch.manual_seed(0)
    paths.append(("dense SwiGLU (K*F)", "baseline", SwiGLU(D, K * Fh), f"d_ff={K * Fh}"))

    grad_TD = torch.randn(T, D)
    times: dict[str, list[float]] = {name: [] for name, *_ in paths}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for name, _, fn, _ in paths:
            seconds = time_fwd_bwd(fn, x, grad_TD)
            if rep:
                times[name].append(seconds)

    rows = []
    for name, kind, _, note in paths:
        seconds = statistics.median(times[name])
        rows.append({"name": name, "kind": kind, "seconds": seconds, "note": note})

    # The naive loop costs the same per token by construction: time a prefix, scale to T.
    subset = min(naive_tokens, T)
    naive_times = [
        time_fwd_bwd(lambda xi: naive_token_loop(router, experts, xi), x[:subset], grad_TD[:subset])
        for _ in range(max(2, reps // 2) + 1)
    ][1:]
    note = f"timed on {subset} tokens, scaled x{T / subset:g}" if subset < T else ""
    seconds = statistics.median(naive_times) * T / subset
    rows.append(
        {"name": "naive per-token loop", "kind": "baseline", "seconds": seconds, "note": note}
    )

    for row in rows:
        row["tokens_per_s"] = T / row["seconds"]
        print(
            f"  {row['name']:<24} {row['seconds'] * 1e3:10.1f} ms "
            f"{row['tokens_per_s']:12.0f} tok/s  {row['note']}",
            flush=True,
        )
    return rows


def markdown(results: dict) -> str:
    lines = [
        "# MoE layer forward+backward, CPU",
        "",
        f"torch {results['torch']}, {results['threads']} threads, {results['machine']}; "
        f"median of {results['reps']} reps after a warm-up, paths timed round-robin; "
        f"soft_topk implementation: "
        f"`{results['soft_topk_impl']}`.",
        "",
    ]
    for shape_name, entry in results["shapes"].items():
        s = entry["shape"]
        rows = entry["rows"]
        by_name = {r["name"]: r for r in rows}
        topk = by_name.get("topk")
        naive = by_name["naive per-token loop"]
        lines += [
            f"## {shape_name}: T={s['T']}, D={s['D']}, E={s['E']}, K={s['K']}, F={s['F']}",
            "",
            "| path | ms / fwd+bwd | tokens/s | time vs topk | speed-up vs naive loop | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            vs_topk = f"{r['seconds'] / topk['seconds']:.2f}x" if topk else "-"
            vs_naive = f"{naive['seconds'] / r['seconds']:.1f}x"
            lines.append(
                f"| {r['name']} | {r['seconds'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {vs_topk} "
                f"| {vs_naive} | {r['note']} |"
            )
        targets = entry["targets"]
        lines += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in targets.items()), ""]
    return "\n".join(lines)


def targets(rows: list[dict]) -> dict[str, str]:
    by_name = {r["name"]: r for r in rows}
    out = {}
    if "topk" in by_name and "soft_topk" in by_name:
        ratio = by_name["soft_topk"]["seconds"] / by_name["topk"]["seconds"]
        out["soft_topk / topk <= 1.1x"] = f"{ratio:.2f}x ({'met' if ratio <= 1.1 else 'MISSED'})"
    if "topk" in by_name:
        speedup = by_name["naive per-token loop"]["seconds"] / by_name["topk"]["seconds"]
        out["dropless topk >= 3x naive loop"] = (
            f"{speedup:.1f}x ({'met' if speedup >= 3 else 'MISSED'})"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=1024, 3 reps (smoke run)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    parser.add_argument("--gates", nargs="+", default=list(GATES), choices=GATES)
    parser.add_argument(
        "--naive-tokens", type=int, default=256, help="tokens the naive loop is timed on"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    shapes = [dict(s, T=1024) if args.quick else s for s in SHAPES]
    naive_tokens = min(args.naive_tokens, 128) if args.quick else args.naive_tokens

    from moe_router.ops import soft_topk

    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}",
        "reps": reps,
        "quick": args.quick,
        "soft_topk_impl": f"{soft_topk.__module__}.{soft_topk.__qualname__}",
        "shapes": {},
    }
    for shape in shapes:
        rows = bench_shape(shape, args.gates, reps, naive_tokens)
        results["shapes"][shape["name"]] = {"shape": shape, "rows": rows, "targets": targets(rows)}
        print("  targets:", results["shapes"][shape["name"]]["targets"], flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "moe_layer_cpu_quick" if args.quick else "moe_layer_cpu"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
