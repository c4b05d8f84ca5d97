"""Hyper-parameter sweep of the three gates of ``train.py compare`` on a held-out seed.

Each trial is one ``train.py fit`` process (one config plus ``--key value`` overrides) at the
token budget of the final comparison; its summary (final validation loss, per-layer load over
the whole validation set) is appended to ``experiments/results/tuning/trials.jsonl`` and the
table ``experiments/results/tuning/sweep.md`` is rebuilt from every trial so far, so the table
lists every trial run, not only the winners. A trial whose name is already in the JSONL file is
not run again (re-running resumes a sweep).

    OMP_NUM_THREADS=1 python experiments/tune_sweep.py --name topk-aux0.01 \
        --config configs/topk.yaml -- --model.model.moe.aux_loss_coef 0.01
    python experiments/tune_sweep.py --report_only

The seed (``--seed``, default 100) must not be one that the final comparison reports (0, 1, 2).
``--quick`` runs a 50-step trial (a smoke test of the script; its rows are marked quick).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.compare import TRAIN_SCRIPT, find_summary, run_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tuning"
TRIALS_FILE = "trials.jsonl"
TABLE_FILE = "sweep.md"


def load_trials(results: Path = RESULTS) -> list[dict]:
    """Every trial recorded under ``results`` so far, in run order."""
    path = results / TRIALS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_trial(
    name: str,
    config: str,
    seed: int,
    overrides: list[str],
    out: Path,
    threads: int | None = None,
) -> dict:
    """Runs one ``train.py fit`` and returns its trial record.

    Args:
        name: The trial's name (its run folder under ``out``).
        config: Its config file.
        seed: Its seed (``seed_everything``: initialisation and training order).
        overrides: Further ``train.py fit`` arguments.
        out: Where the trial's run folder goes.
        threads: CPU threads (``OMP_NUM_THREADS``); None leaves the environment's.

    Raises:
        RuntimeError: If the run fails or writes no finished summary.
    """
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(TRAIN_SCRIPT), "fit",
        "--config", config,
        "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with (run_dir / "train.log").open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall_s = time.perf_counter() - start
    summary = find_summary(run_dir)
    if code != 0 or summary is None:
        tail = "\n".join((run_dir / "train.log").read_text().splitlines()[-20:])
        raise RuntimeError(f"trial {name} failed (exit {code}):\n{tail}")
    layers = summary["final_val"]["layers"]
    metrics = run_metrics(summary)
    return {
        "name": name,
        "config": config,
        "overrides": overrides,
        "seed": seed,
        "gate": summary["gate"],
        "steps": summary["global_step"],
        "val_loss": metrics["loss"],
        "max_vio_worst": metrics["max_vio_worst"],
        "max_vio_layers": [v["max_vio_global"] for v in layers.values()],
        "max_vio_batch_worst": metrics["max_vio_batch_worst"],
        "dead_experts": metrics["dead_experts"],
        "active_per_token": [v["active_experts_per_token"] for v in layers.values()],
        "tokens_per_s": summary["tokens_per_s"],
        "wall_s": wall_s,
        "val_curve": [[p["step"], p["loss"]] for p in summary["val_curve"]],
        "train_curve": [[p["step"], p["loss"]] for p in summary.get("train_curve") or []],
    }


def _group(trial: dict) -> str:
    return trial.get("family") or trial["gate"]


def table(trials: list[dict], header: str) -> str:
    """Markdown: one row per trial, grouped by family (a record's ``family``, else its gate),
    best validation loss marked per group; a diverged trial (``diverged`` set) is marked and
    never the best."""
    lines = [header, ""]
    for name in dict.fromkeys(_group(t) for t in trials):
        rows = [t for t in trials if _group(t) == name]
        valid = [t for t in rows if not t.get("diverged") and t["val_loss"] is not None]
        best = min(valid, key=lambda t: t["val_loss"]) if valid else None
        lines += [
            f"## {name}",
            "",
            "| # | trial | seed | overrides (on top of the config) | val loss | "
            "MaxVio val (worst layer) | MaxVio per layer | dead | active/token | wall s |",
            "|--:|:--|--:|:--|--:|--:|--:|--:|--:|--:|",
        ]
        for i, t in enumerate(rows, 1):
            mark = " **(best loss)**" if t is best else ""
            overrides = " ".join(t.get("tuned") or t["overrides"]) or "-"
            overrides = overrides.replace("--model.model.moe.", "moe.").replace(
                "--model.optim.", "optim."
            )
            if t.get("diverged"):
                mark = f" **(diverged: {t['diverged']})**"
            if t["val_loss"] is None:  # stopped on a non-finite loss: no summary
                lines.append(
                    f"| {i} | {t['name']}{mark} | {t['seed']} | `{overrides}` | n/a | n/a | n/a "
                    f"| n/a | n/a | {t['wall_s']:.0f} |"
                )
                continue
            lines.append(
                f"| {i} | {t['name']}{mark} | {t['seed']} | `{overrides}` | "
                f"{t['val_loss']:.4f} | {t['max_vio_worst']:.3f} | "
                + " / ".join(f"{v:.3f}" for v in t["max_vio_layers"])
                + f" | {t['dead_experts']} | "
                + " / ".join(f"{v:.2f}" for v in t["active_per_token"])
                + f" | {t['wall_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="trial name (unique)")
    parser.add_argument("--config", help="base config, e.g. configs/topk.yaml")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/tuning"))
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder of trials.jsonl, sweep.md and header.md (default experiments/results/tuning)",
    )
    parser.add_argument("--quick", action="store_true", help="50-step smoke trial")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--header", default="# Tuning sweep (held-out seed)")
    parser.add_argument("overrides", nargs="*", help="train.py fit overrides (after --)")
    args = parser.parse_args()
    if args.seed in (0, 1, 2):
        parser.error(f"--seed={args.seed} is a seed of the final comparison (0, 1, 2)")
    args.results.mkdir(parents=True, exist_ok=True)
    header_path = args.results / "header.md"
    header = header_path.read_text() if header_path.exists() else args.header
    if not args.report_only:
        if not args.name or not args.config:
            parser.error("--name and --config are needed unless --report_only")
        if any(t["name"] == args.name for t in load_trials(args.results)):
            print(f"{args.name}: already recorded, skipped")
        else:
            overrides = list(args.overrides)
            if args.quick:
                overrides += ["--trainer.max_steps", "50", "--trainer.val_check_interval", "25"]
            record = run_trial(args.name, args.config, args.seed, overrides, args.out)
            record["quick"] = args.quick
            with (args.results / TRIALS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"{record['name']}: val loss {record['val_loss']:.4f}, MaxVio worst "
                f"{record['max_vio_worst']:.3f}, dead {record['dead_experts']}, "
                f"{record['wall_s']:.0f} s"
            )
    (args.results / TABLE_FILE).write_text(table(load_trials(args.results), header))


if __name__ == "__main__":
    main()
