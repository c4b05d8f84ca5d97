"""``train.py compare``: every config x seed, then ``report.md`` and ``report.png``.

Each run is a separate ``train.py fit`` process (a clean seed, no state shared between runs)
writing to ``<out>/<config stem>/seed<s>/``. A run whose ``summary.json`` says it finished is
not run again, so re-running the same command resumes an interrupted comparison; ``--report_only``
rebuilds the report from whatever runs have finished.

The report gives, per config (mean ± std over seeds): validation loss and perplexity at the
last step, training throughput (tokens/s, measured in the same session, validation excluded),
and per MoE layer the load balance over the whole validation set: MaxVio, CV, dead experts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.summary import SUMMARY_FILE

LAYER_KEYS = (
    ("max_vio_global", "MaxVio (val set)"),
    ("load_cv", "CV"),
    ("dead_expert_fraction", "dead experts"),
    ("active_experts_per_token", "active / token"),
)


@dataclass
class ConfigResult:
    """The finished runs of one config.

    Attributes:
        name: Config name (file stem).
        summaries: One run summary per finished seed, in seed order.
    """

    name: str
    summaries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gate(self) -> str:
        """The gate of the runs (from their summaries)."""
        return self.summaries[0]["gate"] if self.summaries else "?"

    def values(self, key: str) -> list[float]:
        """A top-level scalar of every run (``final_val.loss`` for ``"loss"``)."""
        if key == "loss":
            return [s["final_val"]["loss"] for s in self.summaries]
        return [s[key] for s in self.summaries if s.get(key) is not None]

    def layer_values(self, layer: str, key: str) -> list[float]:
        """One validation metric of one layer, over the runs."""
        return [s["final_val"]["layers"][layer][key] for s in self.summaries]

    @property
    def layers(self) -> list[str]:
        """MoE layer names, in block order."""
        return list(self.summaries[0]["final_val"]["layers"]) if self.summaries else []


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def _fmt(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def find_summary(run_dir: Path) -> dict[str, Any] | None:
    """The newest finished ``summary.json`` under ``run_dir`` (None if there is none)."""
    finished = []
    for path in run_dir.glob(f"**/{SUMMARY_FILE}"):
        summary = json.loads(path.read_text())
        if summary.get("finished") and (summary.get("final_val") or {}).get("loss") is not None:
            finished.append((path.stat().st_mtime, summary))
    return max(finished, key=lambda item: item[0])[1] if finished else None


def run_dir_for(out: Path, config: Path, seed: int) -> Path:
    """Where the run of ``config`` with ``seed`` writes."""
    return out / config.stem / f"seed{seed}"


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``last.ckpt`` of an interrupted run under ``run_dir`` (None if none)."""
    checkpoints = list(run_dir.glob("**/checkpoints/last.ckpt"))
    return max(checkpoints, key=lambda path: path.stat().st_mtime) if checkpoints else None


def run_one(config: Path, seed: int, run_dir: Path, overrides: list[str]) -> None:
    """Runs ``train.py fit`` for one config and seed in a fresh process (log in ``train.log``).

    An interrupted run (a ``last.ckpt`` but no finished summary) resumes from its checkpoint,
    which gives the same result as an uninterrupted run.

    Raises:
        RuntimeError: If the run fails (the log's tail is in the message).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = last_checkpoint(run_dir)
    resume = ["--ckpt_path", str(checkpoint)] if checkpoint is not None else []
    command = [
        sys.executable, "-m", "models.cli", "fit",
        "--config", str(config),
        "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        *overrides,
        *resume,
    ]  # fmt: skip
    log_path = run_dir / "train.log"
    with log_path.open("a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"run {config} seed {seed} failed (exit {code}); log tail:\n{tail}")


def collect(out: Path, configs: list[Path], seeds: list[int]) -> list[ConfigResult]:
    """The finished runs of every config, seed order kept."""
    results = []
    for config in configs:
        result = ConfigResult(config.stem)
        for seed in seeds:
            summary = find_summary(run_dir_for(out, config, seed))
            if summary is not None:
                result.summaries.append(summary)
        results.append(result)
    return results


def report_markdown(results: list[ConfigResult], *, title: str, notes: list[str]) -> str:
    """The comparison as markdown: overall table, per-layer table, paired differences."""
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "Mean ± std over seeds. Validation metrics are at the last training step, over the "
        "whole validation set; MaxVio = (max load − mean load) / mean load, CV = std / mean "
        "of the per-expert load, dead = experts that got no token of the validation set.",
        "",
        "| config | gate | seeds | val loss | perplexity | train tokens/s | "
        "MaxVio (val, worst layer) | CV (mean of layers) | dead experts (all layers) |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for result in results:
        if not result.summaries:
            lines.append(f"| {result.name} | ? | 0 | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        losses = result.values("loss")
        worst_vio, mean_cv, dead = [], [], []
        for summary in result.summaries:
            layers = summary["final_val"]["layers"].values()
            worst_vio.append(max(v["max_vio_global"] for v in layers))
            mean_cv.append(statistics.fmean(v["load_cv"] for v in layers))
            dead.append(
                sum(round(v["dead_expert_fraction"] * len(v["tokens_per_expert"])) for v in layers)
            )
        lines.append(
            f"| {result.name} | {result.gate} | {len(result.summaries)} | {_fmt(losses)} | "
            f"{_fmt([math.exp(x) for x in losses], 3)} | "
            f"{_fmt(result.values('tokens_per_s'), 0)} | {_fmt(worst_vio, 3)} | "
            f"{_fmt(mean_cv, 3)} | {_fmt(dead, 1)} |"
        )

    baseline = next((r for r in results if r.summaries), None)
    if baseline is not None and len(results) > 1:
        lines += [
            "",
            f"Validation loss minus {baseline.name}'s, paired by seed (negative = better):",
            "",
            "| config | Δ val loss | seeds better |",
            "|:--|--:|--:|",
        ]
        base_by_seed = {s["seed"]: s["final_val"]["loss"] for s in baseline.summaries}
        for result in results:
            if result is baseline:
                continue
            deltas = [
                s["final_val"]["loss"] - base_by_seed[s["seed"]]
                for s in result.summaries
                if s["seed"] in base_by_seed
            ]
            better = sum(d < 0 for d in deltas)
            lines.append(f"| {result.name} | {_fmt(deltas)} | {better}/{len(deltas)} |")

    lines += [
        "",
        "Per MoE layer (validation set):",
        "",
        "| config | layer | " + " | ".join(header for _, header in LAYER_KEYS) + " |",
        "|:--|:--|" + "--:|" * len(LAYER_KEYS),
    ]
    for result in results:
        for layer in result.layers:
            cells = []
            for key, _ in LAYER_KEYS:
                values = result.layer_values(layer, key)
                if key == "dead_expert_fraction":
                    num_experts = result.summaries[0]["num_experts"]
                    values = [v * num_experts for v in values]
                    cells.append(_fmt(values, 1))
                else:
                    cells.append(_fmt(values, 3))
            lines.append(f"| {result.name} | {layer} | " + " | ".join(cells) + " |")
    lines += ["", "![validation loss and expert load](report.png)", ""]
    return "\n".join(lines)


def plot_report(results: list[ConfigResult], path: Path) -> Path:
    """Validation-loss curves (mean and min-max band over seeds), then one load heatmap per
    config: layers x experts, each row over its mean load (1 = balanced), averaged over seeds."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    shown = [r for r in results if r.summaries]
    figure = Figure(figsize=(5 + 3.6 * len(shown), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 1 + len(shown), squeeze=False)[0]
    curves_ax = axes[0]
    for result in shown:
        steps = [p["step"] for p in result.summaries[0]["val_curve"]]
        runs = [[p["loss"] for p in s["val_curve"]] for s in result.summaries]
        length = min(len(run) for run in runs)
        values = np.array([run[:length] for run in runs])
        (line,) = curves_ax.plot(
            steps[:length], values.mean(0), marker="o", ms=3, label=f"{result.name} ({result.gate})"
        )
        curves_ax.fill_between(
            steps[:length], values.min(0), values.max(0), alpha=0.2, color=line.get_color()
        )
    curves_ax.set_xlabel("optimizer step")
    curves_ax.set_ylabel("validation loss (nats / byte)")
    curves_ax.set_title("validation loss (mean, min-max over seeds)")
    curves_ax.legend(fontsize=8)
    curves_ax.grid(alpha=0.3)

    relative = {}
    for result in shown:
        loads_SLE = np.array(
            [
                [s["final_val"]["layers"][layer]["tokens_per_expert"] for layer in result.layers]
                for s in result.summaries
            ],
            dtype=np.float64,
        )
        relative_SLE = loads_SLE / np.maximum(loads_SLE.mean(-1, keepdims=True), 1e-12)
        relative[result.name] = relative_SLE.mean(0)
    vmax = max([2.0] + [float(r.max()) for r in relative.values()])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    image = None
    for ax, result in zip(axes[1:], shown, strict=True):
        relative_LE = relative[result.name]
        image = ax.imshow(
            relative_LE, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest"
        )
        ax.set_title(f"{result.name}: load / mean load")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(result.layers)), result.layers)
        ax.set_xticks(range(relative_LE.shape[1]))
        for row in range(relative_LE.shape[0]):
            for expert in range(relative_LE.shape[1]):
                ax.text(
                    expert,
                    row,
                    f"{relative_LE[row, expert]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                )
    if image is not None:
        figure.colorbar(image, ax=list(axes[1:]), shrink=0.9, label="1 = balanced")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    return path


def write_report(
    out: Path, configs: list[Path], seeds: list[int], notes: list[str] | None = None
) -> tuple[Path, Path]:
    """Collects the finished runs under ``out`` and writes ``report.md`` and ``report.png``."""
    results = collect(out, configs, seeds)
    if not any(result.summaries for result in results):
        raise ValueError(f"no finished run under {str(out)!r} to report on")
    summary = next(r.summaries[0] for r in results if r.summaries)
    notes = list(notes or [])
    notes.append(
        f"{summary['max_steps']} optimizer steps per run, seeds {seeds}, "
        f"configs: {', '.join(str(c) for c in configs)}"
    )
    markdown = report_markdown(results, title="Soft vs hard top-k gating", notes=notes)
    md_path = out / "report.md"
    md_path.write_text(markdown)
    png_path = plot_report(results, out / "report.png")
    (out / "report.json").write_text(json.dumps({r.name: r.summaries for r in results}, indent=1))
    return md_path, png_path


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``train.py compare``; anything it does not know goes to every run."""
    parser = argparse.ArgumentParser(
        prog="train.py compare",
        description="Run every config for every seed, then write report.md and report.png. "
        "Unknown arguments (e.g. --trainer.max_steps 100) are passed to every run.",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        required=True,
        type=Path,
        help="YAML configs to compare (the first is the baseline of the deltas)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per config")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    parser.add_argument(
        "--report_only", action="store_true", help="only rebuild the report from the finished runs"
    )
    return parser


def compare_main(argv: list[str]) -> None:
    """``train.py compare`` (see the module docstring).

    Raises:
        ValueError: For a missing config file or ``--seeds`` < 1, before any run starts.
    """
    args, overrides = build_parser().parse_known_args(argv)
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        raise ValueError(f"--configs: no such file {missing}")
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds} is not allowed: it must be >= 1")
    seeds = list(range(args.seeds))
    if not args.report_only:
        for seed in seeds:
            # Seed-major order: an interrupted comparison still has every config at seed 0.
            for config in args.configs:
                run_dir = run_dir_for(args.out, config, seed)
                if find_summary(run_dir) is not None:
                    print(f"[compare] {config.stem} seed {seed}: done already", flush=True)
                    continue
                start = time.perf_counter()
                print(f"[compare] {config.stem} seed {seed} -> {run_dir}", flush=True)
                run_one(config, seed, run_dir, overrides)
                print(
                    f"[compare] {config.stem} seed {seed}: {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    notes = [f"overrides: {' '.join(overrides)}"] if overrides else []
    md_path, png_path = write_report(args.out, args.configs, seeds, notes)
    print(md_path.read_text(), flush=True)
    print(f"[compare] wrote {md_path} and {png_path}", flush=True)
