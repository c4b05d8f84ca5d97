"""``train.py compare``: every config x seed, then ``report.md`` and ``report.png``.

Each run is a separate ``train.py fit`` process (a clean seed, no state shared between runs)
writing to ``<out>/<config stem>/seed<s>/``; its progress is shown as it trains. Every run is
keyed by its effective config (the config file, the seed and the extra arguments, resolved
with every default: ``train.py fit --print_config``), kept in ``run_config.yaml`` next to it.
A run whose ``summary.json`` says it finished, with the same effective config, is not run
again, so re-running the same command resumes an interrupted comparison; a run made with
another effective config is refused up front (naming each differing setting), never reused
or mixed into the report. ``--report_only`` rebuilds the report from the finished runs.

Each run is the checkout's own ``train.py`` (``TRAIN_SCRIPT``), so compare works from any
working directory; relative config paths are read from the working directory, as given. Runs
use one CPU thread unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise.

The report gives, per config (mean ± std over seeds): validation loss and perplexity at the
last step, MaxVio over the training batches of the last validation interval (MaxVio_batch) and
over the whole validation set (MaxVio_global), active experts per token, training throughput
(tokens/s, measured in the same session, validation excluded), CV and dead experts; then the
paired differences against the first config and the same metrics per MoE layer. compare prints
the first table; ``report.md`` holds all three.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.cli import load_yaml
from models.config import config_differences
from models.summary import SUMMARY_FILE

# The checkout's train.py: a child run finds the checkout's packages from any working directory.
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
RUN_CONFIG_FILE = "run_config.yaml"
# Arguments compare sets itself for every run (an override would break where it finds the run).
OWN_ARGUMENTS = ("--trainer.default_root_dir", "--seed_everything", "--ckpt_path")
PROGRESS_PREFIX = "[progress]"

# (key in the summary's final_val, column): "train_layers" are the training batches of the last
# validation interval, "layers" the whole validation set.
LAYER_KEYS = (
    (("train_layers", "max_vio_batch_mean"), "MaxVio_batch (train)"),
    (("layers", "max_vio_global"), "MaxVio_global (val)"),
    (("layers", "load_cv"), "CV"),
    (("layers", "dead_expert_fraction"), "dead experts"),
    (("layers", "active_experts_per_token"), "active / token"),
)
LEGEND = (
    "Mean ± std over seeds (the value alone for one seed), at the last training step. MaxVio = "
    "(max load − mean load) / mean load: MaxVio_batch per training batch, averaged over the "
    "batches since the previous validation (where batch-level gates act; n/a when the last "
    "validation was not at the last step), MaxVio_global over the whole validation set (each "
    "token routed on its own); worst layer. active = experts computed per token (validation, "
    "mean of layers); CV = std / mean of the per-expert validation load; dead = experts that got "
    "no validation token."
)
SUMMARY_COLUMNS = (
    "config", "gate", "seeds", "val loss", "perplexity", "MaxVio_batch (train)",
    "MaxVio_global (val)", "active experts / token", "train tokens/s", "CV (mean of layers)",
    "dead experts (all layers)",
)  # fmt: skip


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
        """One number of ``run_metrics`` over the runs that have it."""
        values = (run_metrics(summary)[key] for summary in self.summaries)
        return [value for value in values if value is not None]

    def layer_values(self, layer: str, key: tuple[str, str]) -> list[float]:
        """One metric of one layer (``(part of final_val, name)``), over the runs that have it."""
        part, name = key
        return [
            s["final_val"][part][layer][name]
            for s in self.summaries
            if name in (s["final_val"].get(part) or {}).get(layer, {})
        ]

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


def format_mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` with ``digits`` decimals; the value alone for one value (a spread of one
    seed is no spread), ``n/a`` for none."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def run_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one finished run that the reports show (worst or mean over MoE layers).

    ``max_vio_batch_worst`` is None for a run without training batches since its last
    validation (or from before they were recorded).
    """
    final = summary["final_val"]
    layers = final["layers"].values()
    train = [v["max_vio_batch_mean"] for v in (final.get("train_layers") or {}).values()]
    return {
        "seed": summary["seed"],
        "loss": final["loss"],
        "perplexity": math.exp(final["loss"]),
        "tokens_per_s": summary.get("tokens_per_s"),
        "max_vio_batch_worst": max(train) if train else None,
        "max_vio_worst": max(v["max_vio_global"] for v in layers),
        "active_mean": statistics.fmean(v["active_experts_per_token"] for v in layers),
        "cv_mean": statistics.fmean(v["load_cv"] for v in layers),
        "dead_experts": sum(
            round(v["dead_expert_fraction"] * len(v["tokens_per_expert"])) for v in layers
        ),
    }


def read_summary(path: Path) -> dict[str, Any]:
    """One ``summary.json``.

    Raises:
        ValueError: Naming the file, if it is not a JSON object or has a ``final_val`` without
            per-layer metrics (a corrupted or hand-edited file).
    """
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable run summary ({error})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is not a run summary (a JSON object)")
    final = summary.get("final_val")
    if final is not None and not (
        isinstance(final, dict) and isinstance(final.get("layers"), dict)
    ):
        raise ValueError(f"{path} has a final_val without per-layer metrics")
    return summary


def find_summary(run_dir: Path) -> dict[str, Any] | None:
    """The newest finished ``summary.json`` under ``run_dir`` (None if there is none).

    Raises:
        ValueError: Naming the file, for a summary that cannot be read (``read_summary``).
    """
    finished = []
    for path in run_dir.glob(f"**/{SUMMARY_FILE}"):
        try:
            summary = read_summary(path)
        except ValueError as error:
            # Deleting only the file would resume from the last checkpoint, without throughput.
            raise ValueError(f"{error}: delete {run_dir} to run it again") from None
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


def fit_arguments(config: Path, seed: int, run_dir: Path, overrides: list[str]) -> list[str]:
    """The ``train.py fit`` arguments of one run (without ``--ckpt_path``)."""
    return [
        "fit",
        "--config", str(config),
        "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        *overrides,
    ]  # fmt: skip


def check_overrides(overrides: list[str]) -> None:
    """Refuses the arguments that compare sets itself, before anything runs.

    Raises:
        ValueError: Naming the argument.
    """
    for argument in overrides:
        name = argument.split("=", 1)[0]
        if name in OWN_ARGUMENTS:
            raise ValueError(
                f"{name} is not allowed with compare: each run writes to "
                "<out>/<config>/seed<s>, is seeded with s and resumes by itself (use --out and "
                "--seeds instead)"
            )


def _print_config(arguments: list[str]) -> dict:
    """``train.py <arguments> --print_config``, parsed in-process.

    Raises:
        ValueError: If the arguments do not parse (the parser's message included).
    """
    from models.cli import MoECLI

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both argv and args are set
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            MoECLI(args=[*arguments, "--print_config"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            message = " ".join(err.getvalue().split())[-600:]
            raise ValueError(f"does not parse: {message}") from None
    finally:
        sys.argv = argv
    return yaml.safe_load(out.getvalue())


def effective_config(config: Path, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    """The full config ``train.py fit`` would run with (``--print_config``, parsed in-process).

    Raises:
        ValueError: If the config and overrides do not parse (the parser's message included).
    """
    try:
        return _print_config(fit_arguments(config, seed, run_dir, overrides))
    except ValueError as error:
        overridden = " ".join(overrides) or "no overrides"
        raise ValueError(f"{config} with {overridden} {error}") from None


@functools.cache
def default_config() -> dict:
    """Every setting of ``train.py fit`` at its default (no config file, no flags)."""
    return _print_config(["fit"])


def config_mismatch(run_dir: Path, expected: dict) -> str | None:
    """Why the run under ``run_dir`` cannot be reused for ``expected`` (None if it can).

    A run with no record of its effective config (made by an older compare, or by hand) cannot
    be matched, so it is refused too. A setting the record lacks while it is at its default now
    (an option added since, left off) is no difference (``models.config.config_differences``).
    """
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return f"{run_dir} holds a run without {RUN_CONFIG_FILE} (its settings are unknown)"
    recorded = load_yaml(path.read_text(), str(path)) or {}
    differences = config_differences(recorded, expected, default_config(), ("recorded", "now"))
    if differences:
        return f"{run_dir} was run with other settings: {'; '.join(differences)}"
    return None


def resolve_runs(
    runs: list[tuple[Any, Path, Path, int, list[str]]], out: Path, command: str, report_only: bool
) -> dict[Any, dict]:
    """The effective config of every run, refusing up front runs made with other settings.

    Args:
        runs: ``(key, run_dir, config, seed, overrides)`` per run.
        out: The output folder (for the message).
        command: ``"compare"`` or ``"the frontier"`` (for the message).
        report_only: Skip the runs that have not been made.

    Returns:
        ``{key: effective config}`` for every run resolved.

    Raises:
        ValueError: Naming every existing run made with other settings and each difference.
    """
    expected, mismatches = {}, []
    for key, run_dir, config, seed, overrides in runs:
        if report_only and not has_run(run_dir):
            continue
        expected[key] = effective_config(config, seed, run_dir, overrides)
        if has_run(run_dir):
            mismatch = config_mismatch(run_dir, expected[key])
            if mismatch is not None:
                mismatches.append(mismatch)
    if mismatches:
        raise ValueError(
            f"--out {out} holds runs made with other settings, which {command} neither "
            f"reuses nor overwrites (use another --out, or delete them): {' | '.join(mismatches)}"
        )
    return expected


def has_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any trace of a run (a summary, a checkpoint, its config)."""
    return (
        (run_dir / RUN_CONFIG_FILE).is_file()
        or any(run_dir.glob(f"**/{SUMMARY_FILE}"))
        or last_checkpoint(run_dir) is not None
    )


def run_one(
    config: Path,
    seed: int,
    run_dir: Path,
    overrides: list[str],
    *,
    label: str | None = None,
    expected: dict | None = None,
    threads: int | None = None,
    tag: str = "compare",
) -> None:
    """Runs ``train.py fit`` for one config and seed in a fresh process (log in ``train.log``).

    An interrupted run (a ``last.ckpt`` but no finished summary) resumes from its checkpoint,
    which gives the same result as an uninterrupted run. The run's ``[progress]`` lines are
    shown on stdout, prefixed with ``label``.

    Args:
        config: The YAML config.
        seed: Its seed.
        run_dir: Where the run writes.
        overrides: Further ``train.py fit`` arguments.
        label: Prefix of the progress lines (default: config stem and seed).
        expected: The run's effective config, recorded in ``run_config.yaml`` first.
        threads: CPU threads of the run (``OMP_NUM_THREADS``); None leaves the environment.
        tag: The progress lines' prefix, ``[<tag>] <label>: ...``.

    Raises:
        RuntimeError: If the run fails, or ends without a finished summary under ``run_dir``
            (the log's tail is in the message).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if expected is not None:
        (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(expected, sort_keys=False))
    checkpoint = last_checkpoint(run_dir)
    resume = ["--ckpt_path", str(checkpoint)] if checkpoint is not None else []
    command = [
        sys.executable,
        str(TRAIN_SCRIPT),
        *fit_arguments(config, seed, run_dir, overrides),
        *resume,
    ]
    label = label or f"{config.stem} seed {seed}"
    log_path = run_dir / "train.log"
    with log_path.open("a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if line.startswith(PROGRESS_PREFIX):
                print(f"[{tag}] {label}: {line[len(PROGRESS_PREFIX) :].strip()}", flush=True)
        code = process.wait()
    tail = "\n".join(log_path.read_text().splitlines()[-25:])
    if code != 0:
        raise RuntimeError(f"run {config} seed {seed} failed (exit {code}); log tail:\n{tail}")
    if find_summary(run_dir) is None:
        raise RuntimeError(
            f"run {config} seed {seed} ended without a finished {SUMMARY_FILE} under {run_dir} "
            f"(does the config send its logs elsewhere, e.g. trainer.logger?); log tail:\n{tail}"
        )


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


def summary_table(results: list[ConfigResult]) -> list[str]:
    """The overall table (``SUMMARY_COLUMNS``), one row per config, as markdown lines."""
    lines = [
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|:--|:--|" + "--:|" * (len(SUMMARY_COLUMNS) - 2),
    ]
    for result in results:
        if not result.summaries:
            cells = ["?", "0"] + ["n/a"] * (len(SUMMARY_COLUMNS) - 3)
        else:
            cells = [
                result.gate,
                str(len(result.summaries)),
                format_mean_std(result.values("loss")),
                format_mean_std(result.values("perplexity"), 3),
                format_mean_std(result.values("max_vio_batch_worst"), 3),
                format_mean_std(result.values("max_vio_worst"), 3),
                format_mean_std(result.values("active_mean"), 2),
                format_mean_std(result.values("tokens_per_s"), 0),
                format_mean_std(result.values("cv_mean"), 3),
                format_mean_std(result.values("dead_experts"), 1),
            ]
        lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(results: list[ConfigResult], *, title: str, notes: list[str]) -> str:
    """The comparison as markdown: overall table, paired differences, per-layer table."""
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", LEGEND, "", *summary_table(results)]

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
            lines.append(f"| {result.name} | {format_mean_std(deltas)} | {better}/{len(deltas)} |")

    lines += [
        "",
        "Per MoE layer:",
        "",
        "| config | layer | " + " | ".join(header for _, header in LAYER_KEYS) + " |",
        "|:--|:--|" + "--:|" * len(LAYER_KEYS),
    ]
    for result in results:
        for layer in result.layers:
            cells = []
            for key, _ in LAYER_KEYS:
                values = result.layer_values(layer, key)
                if key[1] == "dead_expert_fraction":
                    num_experts = result.summaries[0]["num_experts"]
                    cells.append(format_mean_std([v * num_experts for v in values], 1))
                else:
                    cells.append(format_mean_std(values, 3))
            lines.append(f"| {result.name} | {layer} | " + " | ".join(cells) + " |")
    lines += ["", "![validation loss and expert load](report.png)", ""]
    return "\n".join(lines)


def _mean_curve(runs: list[list[dict[str, float]]]):
    """Steps, mean, min and max over runs of loss curves, cut to the shortest run."""
    import numpy as np

    length = min(len(run) for run in runs)
    steps = [point["step"] for point in runs[0][:length]]
    values = np.array([[point["loss"] for point in run[:length]] for run in runs])
    return steps, values.mean(0), values.min(0), values.max(0)


def report_figure(results: list[ConfigResult]):
    """The figure of ``report.png``: training-loss and validation-loss curves per config (mean
    and min-max band over seeds; one legend below them), then one load heatmap per config:
    layers x experts, each row over its mean load (1 = balanced), averaged over seeds, with
    each cell's value in black or white, whichever reads better on its colour.

    Returns:
        A ``matplotlib.figure.Figure`` on the Agg canvas (not saved).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from moe_router.report import annotate_cells

    shown = [r for r in results if r.summaries]
    figure = Figure(figsize=(9.5 + 3.6 * len(shown), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 + len(shown), squeeze=False)[0]
    train_ax, val_ax = axes[0], axes[1]
    handles = []
    for result in shown:
        seeds = len(result.summaries)
        label = f"{result.name} ({result.gate}, {seeds} seed{'s' * (seeds != 1)})"
        color = None
        train_runs = [s.get("train_curve") or [] for s in result.summaries]
        if all(train_runs):
            steps, mean, low, high = _mean_curve(train_runs)
            (line,) = train_ax.plot(steps, mean, label=label)
            color = line.get_color()
            train_ax.fill_between(steps, low, high, alpha=0.2, color=color)
            handles.append(line)
        steps, mean, low, high = _mean_curve([s["val_curve"] for s in result.summaries])
        (line,) = val_ax.plot(steps, mean, marker="o", ms=3, label=label, color=color)
        val_ax.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
        if color is None:
            handles.append(line)
    for ax, what in ((train_ax, "training"), (val_ax, "validation")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{what} LM loss (nats / byte)")
        ax.set_title(f"{what} loss (mean, min-max over seeds)")
        ax.grid(alpha=0.3)
    if not train_ax.lines:
        train_ax.text(
            0.5, 0.5, "no training curve recorded", ha="center", transform=train_ax.transAxes
        )
    if handles:
        # Below the curves, not over them.
        figure.legend(
            handles=handles,
            loc="outside lower left",
            ncols=min(3, len(handles)),
            fontsize=9,
            frameon=False,
        )

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
    for ax, result in zip(axes[2:], shown, strict=True):
        relative_LE = relative[result.name]
        image = ax.imshow(
            relative_LE, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest"
        )
        ax.set_title(f"{result.name}: load / mean load")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(result.layers)), result.layers)
        ax.set_xticks(range(relative_LE.shape[1]))
        annotate_cells(ax, relative_LE, image, fontsize=7)
    if image is not None:
        figure.colorbar(image, ax=list(axes[2:]), shrink=0.9, label="1 = balanced")
    return figure


def plot_report(results: list[ConfigResult], path: Path) -> Path:
    """Saves ``report_figure(results)`` to ``path`` (parent folders created)."""
    figure = report_figure(results)
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


def runs_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a driver of runs: what it does not know goes to every ``train.py fit``."""
    passed_on = "Unknown arguments (e.g. --trainer.max_steps 100) are passed to every run."
    return argparse.ArgumentParser(prog=prog, description=f"{description} {passed_on}")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``train.py compare``; anything it does not know goes to every run."""
    parser = runs_parser(
        "train.py compare", "Run every config for every seed, then write report.md and report.png."
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
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each run (OMP_NUM_THREADS; default: the environment's "
        "OMP_NUM_THREADS if set, else 1: the example configs run no faster on more, and on a "
        "busy machine several threads per run slow down several-fold)",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="only rebuild the report from the finished runs"
    )
    return parser


def compare_main(argv: list[str]) -> None:
    """``train.py compare`` (see the module docstring).

    Raises:
        ValueError: Before any run starts: for a missing config file, ``--seeds`` < 1, an
            argument that compare sets itself, overrides that do not parse, or a run under
            ``--out`` made with another effective config.
    """
    args, overrides = build_parser().parse_known_args(argv)
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        raise ValueError(f"--configs: no such file {missing}")
    stems = [config.stem for config in args.configs]
    if len(set(stems)) < len(stems):
        # Each config's runs go to <out>/<stem>/: two configs of one name would share them.
        raise ValueError(f"--configs: two configs share a file name {stems}: rename one")
    if args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds} is not allowed: it must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} is not allowed: it must be >= 1")
    threads = args.threads or (None if os.environ.get("OMP_NUM_THREADS") else 1)
    check_overrides(overrides)
    seeds = list(range(args.seeds))
    # Seed-major order: an interrupted comparison still has every config at seed 0.
    plan = [(config, seed) for seed in seeds for config in args.configs]
    expected = resolve_runs(
        [
            ((config, seed), run_dir_for(args.out, config, seed), config, seed, overrides)
            for config, seed in plan
        ],
        args.out,
        "compare",
        args.report_only,
    )
    if not args.report_only:
        for index, (config, seed) in enumerate(plan, start=1):
            run_dir = run_dir_for(args.out, config, seed)
            label = f"{config.stem} seed {seed} ({index}/{len(plan)})"
            if find_summary(run_dir) is not None:
                print(f"[compare] {label}: done already", flush=True)
                continue
            start = time.perf_counter()
            print(f"[compare] {label} -> {run_dir}", flush=True)
            run_one(
                config,
                seed,
                run_dir,
                overrides,
                label=label,
                expected=expected[config, seed],
                threads=threads,
            )
            print(f"[compare] {label}: {time.perf_counter() - start:.0f} s", flush=True)
    notes = [f"overrides: {' '.join(overrides)}"] if overrides else []
    md_path, png_path = write_report(args.out, args.configs, seeds, notes)
    table = "\n".join(summary_table(collect(args.out, args.configs, seeds)))
    print(f"\n{table}\n\n{textwrap.fill(LEGEND, 100)}\n", flush=True)
    print(
        f"[compare] wrote {md_path} (with the paired differences and every layer) and {png_path}",
        flush=True,
    )
