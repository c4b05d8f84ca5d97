"""How far the balanced gate's combine weights move for a tiny change of its input.

For each balanced variant (method x balance_target), on random router inputs (T tokens, D = 16,
E = 8, K = 2, router weight std 0.5), the largest change of any token's combine weight when the
input moves by ``--eps`` (Gaussian), in training (thresholds solved on the batch) and at
evaluation (running thresholds, a per-token function). Results: benchmarks/results/
balanced_sensitivity.{md,json}.

    python experiments/balanced_sensitivity.py --trials 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._timing import markdown_table, save_results  # noqa: E402
from moe_router import Router  # noqa: E402


def dense_weights(routing) -> torch.Tensor:
    """Combine weights as a [T, E] matrix."""
    num_tokens = routing.weights_TK.shape[0]
    dense_TE = torch.zeros(num_tokens, routing.num_experts)
    return dense_TE.scatter_add(1, routing.expert_ids_TK, routing.weights_TK)


def largest_move(method: str, target: str, mode: str, eps: float, tokens: int, seed: int) -> float:
    torch.manual_seed(seed)
    router = Router(
        d_model=16,
        num_experts=8,
        k=2,
        gate="balanced_soft_topk",
        method=method,
        balance_target=target,
        init_std=0.5,
    )
    router(torch.randn(tokens, 16))
    router.step()
    router.train(mode == "train")
    x_TD = torch.randn(tokens, 16)
    with torch.no_grad():
        before = dense_weights(router(x_TD))
        after = dense_weights(router(x_TD + eps * torch.randn_like(x_TD)))
    return (after - before).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="random batches per variant")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch")
    parser.add_argument("--eps", type=float, default=1e-6, help="input perturbation (std)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/balanced_sensitivity"
    )
    args = parser.parse_args()
    rows, payload = [], []
    for method in ("sigmoid", "sparse"):
        for target in ("load", "mass"):
            for mode in ("train", "eval"):
                moves = [
                    largest_move(method, target, mode, args.eps, args.tokens, seed)
                    for seed in range(args.trials)
                ]
                median, worst = statistics.median(moves), max(moves)
                rows.append([method, target, mode, f"{median:.2e}", f"{worst:.2e}"])
                payload.append({"method": method, "target": target, "mode": mode, "moves": moves})
    table = markdown_table(
        ["method", "balance_target", "mode", "median of max abs dw", "worst max abs dw"], rows
    )
    header = (
        f"# Balanced gate: combine-weight change for an input change of {args.eps:g}\n\n"
        f"{args.trials} random batches of {args.tokens} tokens per row (D 16, E 8, K 2).\n\n"
    )
    save_results(args.out, header + table + "\n", {"eps": args.eps, "results": payload})
    print(header + table)


if __name__ == "__main__":
    main()
