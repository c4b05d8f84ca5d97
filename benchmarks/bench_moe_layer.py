"""Forward+backward time of ``MoELayer`` per gate against baselines and real HF blocks.

Baselines, all with the same expert weights and the same number of active parameters:

* ``dense SwiGLU (K*F)`` — one SwiGLU FFN with hidden width K*F (same active parameters per
  token, no routing): the FLOP floor. Full T.
* HF blocks (when ``transformers`` is installed, ``pip install -e .[bench]``): Mixtral with its
  ``eager`` and ``grouped_mm`` experts, Qwen2-MoE and OLMoE, built from small configs with our
  weights copied in and checked equal to our ``topk`` layer first (see ``_hf_blocks.py``).
  Without transformers, ``per-expert loop (HF style)`` stands in: a Mixtral-style loop written
  here.
* ``naive per-token loop`` — for each token, for each selected slot, run that expert on the
  token and add the weighted result; timed on the first ``--naive-tokens`` tokens and scaled
  linearly to T (its cost is per token by construction); the table says so.

Everything is timed round-robin (one fwd+bwd of each path per round, medians), one thread by
default; the load of the machine (``uptime``) before and after goes into the results.

Targets, for ``topk`` and ``soft_topk``: <= 1.2x the dense floor and <= 1.0x the
fastest HF block, at E=64, K=8, F=128 and E=8, K=2, F=512 (T=8192, D=256, 1 thread).

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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _hf_blocks import build_hf_blocks, transformers_version  # noqa: E402
from _timing import (  # noqa: E402
    CLOCKS,
    add_clock_argument,
    default_clock,
    load_verdict,
    machine_load,
    malloc_note,
    malloc_settings,
)

from moe_router.moe import MoELayer, SwiGLU  # noqa: E402
from moe_router.router import GATES, Router  # noqa: E402
from moe_router.stepping import step_routers  # noqa: E402

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


def settle_budget(layer: MoELayer, x_TD: torch.Tensor, steps: int = 40) -> float:
    """Runs the layer's budget controller to its target on this input (training forwards and
    router steps, no weight update); returns the mean experts per token it then computes."""
    for _ in range(steps):
        routing = layer.router(x_TD)
        step_routers(layer)
    active_T = routing.valid_TK.sum(-1).float() + routing.overflow_T
    return float(active_T.mean())


def time_fwd_bwd(fn: Callable, x: torch.Tensor, grad: torch.Tensor, clock: str = "wall") -> float:
    """Seconds of one forward + backward on the given clock (see _timing.py)."""
    now = CLOCKS[clock]
    xi = x.detach().requires_grad_()
    start = now()
    fn(xi).backward(grad)
    return now() - start


def bench_shape(shape: dict, gates: list[str], reps: int, naive_tokens: int, clock: str) -> dict:
    """Time every path on one shape, round-robin (rep 1 of each, then rep 2 of each, ...) so
    that load changes on a shared machine hit them all alike."""
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
    # The support-exact gates at the compute of top-K: their budget controllers settle first.
    for gate, options in (
        ("sparse_soft_topk", {"target_active": float(K)}),
        ("balanced_soft_topk", {"method": "sparse", "target_active": float(K)}),
    ):
        if gate in gates:
            settled = layer(gate, **options)
            active = settle_budget(settled, x)
            note = f"{active:.2f} experts/token after 40 controller steps (target {K})"
            paths.append((f"{gate} (target_active={K})", "layer", settled, note))
    loop_layer = layer("topk", backend="loop")
    router, experts = loop_layer.router, split_experts(loop_layer)
    checks: list[str] = []
    if transformers_version() is not None:
        hf_blocks, checks = build_hf_blocks(shape, layer)
        paths += [(name, "hf", block, note) for name, block, note in hf_blocks]
        for line in checks:
            print("  check", line, flush=True)
    else:
        paths.append(
            (
                "per-expert loop (HF style)",
                "baseline",
                lambda xi: per_expert_loop(router, experts, xi),
                "written here; transformers not installed",
            )
        )
    torch.manual_seed(0)
    paths.append(("dense SwiGLU (K*F)", "floor", SwiGLU(D, K * Fh), f"d_ff={K * Fh}"))

    grad_TD = torch.randn(T, D)
    times: dict[str, list[float]] = {name: [] for name, *_ in paths}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for name, _, fn, _ in paths:
            seconds = time_fwd_bwd(fn, x, grad_TD, clock)
            if rep:
                times[name].append(seconds)

    rows = []
    for name, kind, _, note in paths:
        seconds = statistics.median(times[name])
        rows.append({"name": name, "kind": kind, "seconds": seconds, "note": note})

    # The naive loop costs the same per token by construction: time a prefix, scale to T.
    subset = min(naive_tokens, T)
    naive_times = [
        time_fwd_bwd(
            lambda xi: naive_token_loop(router, experts, xi), x[:subset], grad_TD[:subset], clock
        )
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
            f"  {row['name']:<26} {row['seconds'] * 1e3:10.1f} ms "
            f"{row['tokens_per_s']:12.0f} tok/s  {row['note']}",
            flush=True,
        )
    return {"shape": shape, "rows": rows, "checks": checks, "targets": targets(rows)}


def markdown(results: dict) -> str:
    lines = [
        "# MoE layer forward+backward, CPU",
        "",
        f"torch {results['torch']}, transformers {results['transformers'] or 'not installed'}, "
        f"{results['threads']} thread(s), {results['machine']}; median of {results['reps']} "
        f"reps after a warm-up, paths timed round-robin, {results['clock']} clock (process CPU "
        "time at one thread: robust to the other jobs of a shared machine); soft_topk "
        "implementation: "
        f"`{results['soft_topk_impl']}`.",
        "",
        f"Machine load before: `{results['load_before']}`; after: `{results['load_after']}`. "
        + load_verdict(results["load_before"]),
        "",
        malloc_note(results.get("malloc", {})),
        "",
    ]
    for shape_name, entry in results["shapes"].items():
        s = entry["shape"]
        rows = entry["rows"]
        by_name = {r["name"]: r for r in rows}
        topk = by_name.get("topk")
        floor = by_name["dense SwiGLU (K*F)"]
        naive = by_name["naive per-token loop"]
        lines += [
            f"## {shape_name}: T={s['T']}, D={s['D']}, E={s['E']}, K={s['K']}, F={s['F']}",
            "",
            "| path | ms / fwd+bwd | tokens/s | x dense floor | x topk | speed-up vs naive "
            "loop | note |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            vs_topk = f"{r['seconds'] / topk['seconds']:.2f}x" if topk else "-"
            lines.append(
                f"| {r['name']} | {r['seconds'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} "
                f"| {r['seconds'] / floor['seconds']:.2f}x | {vs_topk} "
                f"| {naive['seconds'] / r['seconds']:.1f}x | {r['note']} |"
            )
        if entry["checks"]:
            lines += ["", "Checked before timing: " + "; ".join(entry["checks"]) + "."]
        lines += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in entry["targets"].items())]
        lines.append("")
    lines += [
        "`sparse_soft_topk` dispatches up to `max_active` = 2K experts per token (all of them "
        "while the router is near-uniform at initialisation), so it does up to 2x the expert "
        "work of the other gates.",
        "",
    ]
    return "\n".join(lines)


def targets(rows: list[dict]) -> dict[str, str]:
    by_name = {r["name"]: r for r in rows}
    floor = by_name["dense SwiGLU (K*F)"]["seconds"]
    hf = [
        r["seconds"] for r in rows if r["kind"] in ("hf", "baseline") and "naive" not in r["name"]
    ]
    fastest_hf = min(hf) if hf else None
    out = {}
    for gate in ("topk", "soft_topk"):
        if gate not in by_name:
            continue
        seconds = by_name[gate]["seconds"]
        ratio = seconds / floor
        out[f"{gate} <= 1.2x dense floor"] = f"{ratio:.2f}x ({'met' if ratio <= 1.2 else 'MISSED'})"
        if fastest_hf is not None:
            ratio = seconds / fastest_hf
            out[f"{gate} <= 1.0x fastest HF block"] = (
                f"{ratio:.2f}x ({'met' if ratio <= 1.0 else 'MISSED'})"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=1024, 3 reps (smoke run)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    parser.add_argument(
        "--gates",
        nargs="+",
        default=["topk", "soft_topk", "sparse_soft_topk", "balanced_soft_topk"],
        choices=GATES,
        help="gates to time (soft_topk_dense computes all E experts: minutes at E=64)",
    )
    parser.add_argument(
        "--naive-tokens", type=int, default=256, help="tokens the naive loop is timed on"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--shapes", nargs="+", default=[s["name"] for s in SHAPES])
    add_clock_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    clock = args.clock or default_clock(args.threads)
    shapes = [dict(s, T=1024) if args.quick else s for s in SHAPES if s["name"] in args.shapes]
    naive_tokens = min(args.naive_tokens, 128) if args.quick else args.naive_tokens

    from moe_router.ops import soft_topk

    results = {
        "torch": torch.__version__,
        "transformers": transformers_version(),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}",
        "reps": reps,
        "clock": clock,
        "quick": args.quick,
        "soft_topk_impl": f"{soft_topk.__module__}.{soft_topk.__qualname__}",
        "load_before": machine_load(),
        "malloc": malloc_settings(),
        "shapes": {},
    }
    for shape in shapes:
        entry = bench_shape(shape, args.gates, reps, naive_tokens, clock)
        results["shapes"][shape["name"]] = entry
        print("  targets:", entry["targets"], flush=True)
    results["load_after"] = machine_load()

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "moe_layer_cpu_quick" if args.quick else "moe_layer_cpu"
    if results["malloc"]:
        stem += "_malloc_tuned"  # a second set of figures, beside the default allocator's
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
