"""``train.py frontier``: validation loss against compute, soft vs hard routing.

A spec (``configs/frontier.yaml``) names the panels (model shapes: experts E and their width F,
and the active-expert counts to run) and the router families (a config each, and the knob that
sets a point's active experts: ``k``, or ``target_active`` for the support-exact sparse gate,
whose ``k`` is then the same number). Every panel x family x active count x seed is one
``train.py fit`` process, run by ``experiments.compare.run_one`` (``--jobs`` at a time, each with
``cpu_count / jobs`` threads), so a finished run is reused and an interrupted one resumes, and a
run made with another effective config is refused up front. The report goes to ``--results``:

- ``report.md``: per point, target and measured active experts per token (mean and p99 over the
  validation set), validation loss, the paired difference against the baseline family at the
  same active count (mean ± std over seeds, seeds better), MaxVio over the validation set
  (worst layer), CV, dead experts, overflow rate and training throughput against the baseline;
- ``report.json``: the same, with every run's numbers and curves;
- ``frontier.png``: validation loss (mean ± std over seeds) against the measured active-expert
  FLOPs per token (relative to top-1 of the first panel), one line per family, one panel per E;
- ``curves.png``: training-loss curves per point; ``load.png``: per-layer load heatmaps.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from experiments.compare import (
    check_overrides,
    find_summary,
    format_mean_std,
    mean_std,
    resolve_runs,
    run_metrics,
    run_one,
)

Knob = Literal["k", "target_active"]
KNOBS = ("k", "target_active")
TAG = "frontier"


@dataclass(frozen=True)
class Panel:
    """One model shape of the frontier.

    Attributes:
        name: Panel name (e.g. ``E8``), used in run folders and the report.
        num_experts: Experts E per MoE layer.
        expert_d_ff: Hidden width F of each expert.
        active: Active experts per token of the points (K, or the budget target).
    """

    name: str
    num_experts: int
    expert_d_ff: int
    active: tuple[int, ...]


@dataclass(frozen=True)
class Family:
    """One router family (a line of the frontier).

    Attributes:
        name: Family name, used in run folders and the report.
        config: Its ``train.py fit`` config.
        knob: What sets a point's active experts: ``k``, or ``target_active`` (with ``k`` the
            same number).
        baseline: Whether this is the family the others are paired against.
        active: Per panel, the active counts to run (default: the panel's).
        overrides: Further ``train.py fit`` arguments of every run of the family.
    """

    name: str
    config: Path
    knob: Knob = "k"
    baseline: bool = False
    active: dict[str, tuple[int, ...]] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Point:
    """One run: a family at one active count on one panel, for one seed."""

    panel: Panel
    family: Family
    active: int
    seed: int
    active_overrides: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """``<panel>/<family>-<active>``: the point's folder and name in the report."""
        return f"{self.panel.name}/{self.family.name}-{self.active}"

    def run_dir(self, out: Path) -> Path:
        """Where the run writes."""
        return out / self.key / f"seed{self.seed}"

    def overrides(self, extra: list[str]) -> list[str]:
        """The ``train.py fit`` arguments that make this point of the family's config."""
        arguments = [
            "--model.model.num_experts", str(self.panel.num_experts),
            "--model.model.expert_d_ff", str(self.panel.expert_d_ff),
            "--model.model.k", str(self.active),
        ]  # fmt: skip
        if self.family.knob == "target_active":
            arguments += ["--model.model.moe.target_active", str(float(self.active))]
        return [*arguments, *self.active_overrides, *self.family.overrides, *extra]


@dataclass(frozen=True)
class Spec:
    """A frontier: panels, families and seeds (``configs/frontier.yaml``).

    ``active_overrides`` maps an active count to ``train.py fit`` arguments of every run at
    that count, whatever the family (e.g. no renormalisation at 1 active expert, where one
    renormalised weight is the constant 1 and the gate would get no gradient from the loss).
    """

    panels: tuple[Panel, ...]
    families: tuple[Family, ...]
    seeds: tuple[int, ...]
    active_overrides: tuple[tuple[int, tuple[str, ...]], ...] = ()

    @property
    def baseline(self) -> Family:
        """The family the paired differences are against."""
        return next(f for f in self.families if f.baseline)

    def points(self) -> list[Point]:
        """Every run, seed-major (an interrupted frontier has every point at the first seeds)."""
        at_active = dict(self.active_overrides)
        return [
            Point(panel, family, active, seed, at_active.get(active, ()))
            for seed in self.seeds
            for panel in self.panels
            for family in self.families
            for active in family.active.get(panel.name, panel.active)
        ]


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} is invalid: an int >= 1")
    return value


def _active_list(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what}={value!r} is invalid: a non-empty list of ints >= 1")
    return tuple(_positive_int(v, what) for v in value)


def load_spec(path: Path) -> Spec:
    """Reads and checks a frontier spec.

    Raises:
        ValueError: Naming the file or the entry, for a missing file, a file that is not YAML
            or not a mapping, an unknown or missing key, a bad value, a missing config file,
            an active count above a panel's experts, or not exactly one baseline family.
    """
    if not path.is_file():
        raise ValueError(f"--spec={str(path)!r}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    try:
        return parse_spec(raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def parse_spec(raw: Any) -> Spec:
    """Checks a frontier spec read from YAML (see ``load_spec``).

    Raises:
        ValueError: Naming the entry (``load_spec`` adds the file).
    """
    if not isinstance(raw, dict):
        raise ValueError(f"a frontier spec is a mapping with panels and routers, got {raw!r}")
    unknown = set(raw) - {"panels", "routers", "seeds", "active_overrides"}
    if unknown:
        raise ValueError(
            f"unknown keys {sorted(unknown)} (allowed: panels, routers, seeds, active_overrides)"
        )
    for key, kind in (("active_overrides", dict), ("panels", list), ("routers", list)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            what = "a mapping" if kind is dict else "a list of mappings"
            raise ValueError(f"{key}={raw[key]!r} is invalid: {what}")
    active_overrides = []
    for active, arguments in (raw.get("active_overrides") or {}).items():
        _positive_int(active, "active_overrides key")
        if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
            raise ValueError(
                f"active_overrides[{active}]={arguments!r} is invalid: a list of strings"
            )
        active_overrides.append((active, tuple(arguments)))
    seeds = raw.get("seeds", [0, 1, 2])
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise ValueError(f"seeds={seeds!r} is invalid: a non-empty list of ints >= 0")
    panels = []
    for i, entry in enumerate(raw.get("panels") or []):
        where = f"panels[{i}]"
        if not isinstance(entry, dict) or set(entry) != {
            "name",
            "num_experts",
            "expert_d_ff",
            "active",
        }:
            raise ValueError(
                f"{where}={entry!r} is invalid: keys name, num_experts, expert_d_ff, active"
            )
        panel = Panel(
            str(entry["name"]),
            _positive_int(entry["num_experts"], f"{where}.num_experts"),
            _positive_int(entry["expert_d_ff"], f"{where}.expert_d_ff"),
            _active_list(entry["active"], f"{where}.active"),
        )
        if max(panel.active) > panel.num_experts:
            raise ValueError(
                f"{where}.active={list(panel.active)} is invalid: at most "
                f"num_experts={panel.num_experts}"
            )
        panels.append(panel)
    if not panels:
        raise ValueError("no panels")
    names = {p.name for p in panels}
    families = []
    for i, entry in enumerate(raw.get("routers") or []):
        where = f"routers[{i}]"
        allowed = {"name", "config", "knob", "baseline", "active", "overrides"}
        if not isinstance(entry, dict) or not {"name", "config"} <= set(entry) <= allowed:
            raise ValueError(
                f"{where}={entry!r} is invalid: keys name, config (required), knob, baseline, "
                "active, overrides"
            )
        config = Path(entry["config"])
        if not config.is_file():
            raise ValueError(f"{where}.config={str(config)!r}: no such file")
        knob = entry.get("knob", "k")
        if knob not in KNOBS:
            raise ValueError(f"{where}.knob={knob!r} is invalid: one of {KNOBS}")
        active = {}
        for panel_name, counts in (entry.get("active") or {}).items():
            if panel_name not in names:
                raise ValueError(
                    f"{where}.active: panel {panel_name!r} is not one of {sorted(names)}"
                )
            active[panel_name] = _active_list(counts, f"{where}.active.{panel_name}")
        if entry.get("active"):  # a subset: the panels it leaves out are not run
            active.update({name: () for name in names - set(active)})
        overrides = entry.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ValueError(f"{where}.overrides={overrides!r} is invalid: a list of strings")
        families.append(
            Family(
                str(entry["name"]),
                config,
                knob,
                bool(entry.get("baseline", False)),
                active,
                tuple(overrides),
            )
        )
    if sum(f.baseline for f in families) != 1:
        raise ValueError(
            f"routers must have exactly one `baseline: true` family, got "
            f"{[f.name for f in families if f.baseline]}"
        )
    return Spec(tuple(panels), tuple(families), tuple(seeds), tuple(active_overrides))


# ------------------------------------------------------------------------------------ report


def point_run_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one finished run that the frontier report shows: ``run_metrics`` plus
    the p99 of active experts, the overflow rate, the per-layer load and the curves."""
    layers = summary["final_val"]["layers"]
    metrics = run_metrics(summary)
    return {
        **metrics,
        "val_loss": metrics.pop("loss"),
        "active_p99": max(v["active_experts_p99"] for v in layers.values()),
        "overflow_rate": max(v["overflow_rate"] for v in layers.values()),
        "load": {name: v["tokens_per_expert"] for name, v in layers.items()},
        "train_curve": summary.get("train_curve") or [],
        "val_curve": summary["val_curve"],
    }


def collect(spec: Spec, out: Path) -> list[dict[str, Any]]:
    """One record per point with its finished runs (seed order), baseline pairing included."""
    records: dict[str, dict[str, Any]] = {}
    for point in spec.points():
        record = records.setdefault(
            point.key,
            {
                "key": point.key,
                "panel": point.panel.name,
                "num_experts": point.panel.num_experts,
                "expert_d_ff": point.panel.expert_d_ff,
                "family": point.family.name,
                "config": str(point.family.config),
                "knob": point.family.knob,
                "active": point.active,
                # active-expert FLOPs per token relative to top-1 of the first panel
                "flops_rel": point.active * point.panel.expert_d_ff / spec.panels[0].expert_d_ff,
                "runs": [],
            },
        )
        summary = find_summary(point.run_dir(out))
        if summary is not None:
            record["runs"].append(point_run_metrics(summary))
    baseline = spec.baseline.name
    for record in records.values():
        base = records.get(f"{record['panel']}/{baseline}-{record['active']}")
        base_runs = {r["seed"]: r for r in base["runs"]} if base else {}
        pairs = [(r, base_runs[r["seed"]]) for r in record["runs"] if r["seed"] in base_runs]
        record["delta_vs_baseline"] = [r["val_loss"] - b["val_loss"] for r, b in pairs]
        record["speed_vs_baseline"] = [
            r["tokens_per_s"] / b["tokens_per_s"]
            for r, b in pairs
            if r["tokens_per_s"] and b["tokens_per_s"]
        ]
    return list(records.values())


COLUMNS = (
    "E",
    "router",
    "target active",
    "active (mean)",
    "active (p99)",
    "seeds",
    "val loss",
    "Δ vs topk (paired)",
    "seeds better",
    "MaxVio val (worst layer)",
    "CV",
    "dead experts",
    "overflow rate",
    "tokens/s vs topk",
)


def report_markdown(spec: Spec, records: list[dict[str, Any]], notes: list[str]) -> str:
    """The frontier table and its notes, as markdown."""
    baseline = spec.baseline.name
    header = [c.replace("topk", baseline) for c in COLUMNS]
    lines = ["# Loss vs compute: soft vs hard routing at matched active experts", ""]
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        f"Mean ± std over seeds. Δ is the validation loss minus {baseline}'s at the same E and "
        "active count, paired by seed (negative = better). Validation metrics are at the last "
        "step over the whole validation set; active = experts computed per token (mean of "
        "layers; p99: worst layer); MaxVio = (max load − mean load) / mean load; dead = "
        "experts with no validation token (all layers); overflow = tokens with p > 0 on more "
        "experts than the slots (worst layer).",
        "",
        "![frontier](frontier.png)",
        "",
        "| " + " | ".join(header) + " |",
        "|:--|:--|" + "--:|" * (len(header) - 2),
    ]
    for r in records:
        runs = r["runs"]
        if not runs:
            lines.append(
                f"| {r['num_experts']} | {r['family']} | {r['active']} | "
                + " | ".join(["n/a"] * (len(header) - 3))
                + " |"
            )
            continue
        deltas = r["delta_vs_baseline"]
        is_base = r["family"] == baseline
        cells = [
            str(r["num_experts"]),
            r["family"],
            str(r["active"]),
            format_mean_std([x["active_mean"] for x in runs], 2),
            format_mean_std([x["active_p99"] for x in runs], 1),
            str(len(runs)),
            format_mean_std([x["val_loss"] for x in runs]),
            "—" if is_base else format_mean_std(deltas),
            "—" if is_base else f"{sum(d < 0 for d in deltas)}/{len(deltas)}",
            format_mean_std([x["max_vio_worst"] for x in runs], 3),
            format_mean_std([x["cv_mean"] for x in runs], 3),
            format_mean_std([x["dead_experts"] for x in runs], 1),
            format_mean_std([x["overflow_rate"] for x in runs], 4),
            "—" if is_base else format_mean_std(r["speed_vs_baseline"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training-loss curves per point: ![curves](curves.png)",
        "",
        "Per-layer load over the validation set (load / mean load, mean over seeds): "
        "![load](load.png)",
        "",
    ]
    return "\n".join(lines)


def _family_colors(spec: Spec) -> dict[str, str]:
    return {f.name: f"C{i}" for i, f in enumerate(spec.families)}


def frontier_figure(spec: Spec, records: list[dict[str, Any]]):
    """Validation loss (mean ± std over seeds) against the measured active-expert FLOPs per
    token (mean over seeds; ticks at the spec's active counts), one panel per E."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(spec.panels), 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(spec.panels), squeeze=False, sharey=True)[0]
    colors = _family_colors(spec)
    for ax, panel in zip(axes, spec.panels, strict=True):
        for family in spec.families:
            points = [
                r
                for r in records
                if r["panel"] == panel.name and r["family"] == family.name and r["runs"]
            ]
            if not points:
                continue
            # at the measured compute (a support-exact gate may run below or above its target)
            xs = [
                statistics.fmean(x["active_mean"] for x in r["runs"])
                * panel.expert_d_ff
                / spec.panels[0].expert_d_ff
                for r in points
            ]
            stats = [mean_std([x["val_loss"] for x in r["runs"]]) for r in points]
            ax.errorbar(
                xs,
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                color=colors[family.name],
                label=family.name,
            )
        ax.set_xscale("log", base=2)
        ticks = sorted({r["flops_rel"] for r in records if r["panel"] == panel.name})
        ax.set_xticks(
            ticks,
            [
                f"{t:g}\n({round(t * spec.panels[0].expert_d_ff / panel.expert_d_ff)} active)"
                for t in ticks
            ],
        )
        ax.minorticks_off()
        ax.set_title(f"E = {panel.num_experts}, F = {panel.expert_d_ff}")
        first = spec.panels[0].num_experts
        ax.set_xlabel(f"active-expert FLOPs / token (1 = top-1 at E = {first})")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss (nats / byte)")
    return figure


def curves_figure(spec: Spec, records: list[dict[str, Any]]):
    """Training-loss curves (mean over seeds) per panel and active count, one line per family."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = sorted(
        {(r["panel"], r["active"]) for r in records if r["runs"]},
        key=lambda c: ([p.name for p in spec.panels].index(c[0]), c[1]),
    )
    columns = max(1, max((len(p.active) for p in spec.panels), default=1))
    rows = max(1, math.ceil(len(cells) / columns))
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colors = _family_colors(spec)
    for ax, (panel, active) in zip(axes, cells, strict=False):
        for r in records:
            if r["panel"] != panel or r["active"] != active or not r["runs"]:
                continue
            curves = [x["train_curve"] for x in r["runs"] if x["train_curve"]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [p["step"] for p in curves[0][:length]]
            mean = np.mean([[p["loss"] for p in c[:length]] for c in curves], axis=0)
            ax.plot(steps, mean, color=colors[r["family"]], label=r["family"], lw=1.2)
        ax.set_title(f"{panel}, {active} active", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            low = min(float(np.min(line.get_ydata())) for line in ax.lines)
            ax.set_ylim(low - 0.02, low + 0.6)
            ax.legend(fontsize=8)
    for ax in axes[len(cells) :]:
        ax.set_visible(False)
    return figure


def load_figure(spec: Spec, records: list[dict[str, Any]]):
    """Per panel, one heatmap: rows = point x layer, columns = experts, load / mean load."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    panels = [p for p in spec.panels if any(r["panel"] == p.name and r["runs"] for r in records)]
    heights = []
    matrices = []
    for panel in panels:
        labels, rows = [], []
        for r in records:
            if r["panel"] != panel.name or not r["runs"]:
                continue
            for layer in r["runs"][0]["load"]:
                loads_SE = np.array([x["load"][layer] for x in r["runs"]], dtype=np.float64)
                rel_SE = loads_SE / np.maximum(loads_SE.mean(-1, keepdims=True), 1e-12)
                rows.append(rel_SE.mean(0))
                labels.append(f"{r['family']}-{r['active']} {layer}")
        matrices.append((panel, labels, np.array(rows)))
        heights.append(max(2.0, 0.22 * len(rows) + 1.2))
    figure = Figure(figsize=(11, sum(heights) + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    if not matrices:
        return figure
    axes = figure.subplots(len(matrices), 1, squeeze=False, height_ratios=heights)[:, 0]
    vmax = max([2.0] + [float(m.max()) for _, _, m in matrices if m.size])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    image = None
    for ax, (panel, labels, matrix) in zip(axes, matrices, strict=True):
        image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"E = {panel.num_experts}: load / mean load (1 = balanced)", fontsize=10)
    if image is not None:
        figure.colorbar(image, ax=list(axes), shrink=0.8)
    return figure


def write_report(
    spec: Spec, out: Path, results: Path, notes: list[str]
) -> tuple[Path, list[dict[str, Any]]]:
    """Writes report.md, report.json, frontier.png, curves.png and load.png to ``results``.

    Raises:
        ValueError: If no run under ``out`` has finished.
    """
    records = collect(spec, out)
    if not any(r["runs"] for r in records):
        raise ValueError(f"no finished frontier run under {str(out)!r} to report on")
    results.mkdir(parents=True, exist_ok=True)
    md_path = results / "report.md"
    md_path.write_text(report_markdown(spec, records, notes))
    payload = {"notes": notes, "columns": list(COLUMNS), "points": records}
    (results / "report.json").write_text(json.dumps(payload, indent=1))
    for name, make in (
        ("frontier.png", frontier_figure),
        ("curves.png", curves_figure),
        ("load.png", load_figure),
    ):
        make(spec, records).savefig(results / name, dpi=120)
    return md_path, records


# --------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``train.py frontier``; anything it does not know goes to every run."""
    parser = argparse.ArgumentParser(
        prog="train.py frontier",
        description="Run every point of a loss-vs-compute frontier, then write its report. "
        "Unknown arguments (e.g. --trainer.max_steps 100) are passed to every run.",
    )
    parser.add_argument("--spec", type=Path, default=Path("configs/frontier.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"), help="run folders")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("benchmarks/results/frontier"),
        help="where report.md / report.json / *.png go",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per run (default: the CPU count divided by --jobs)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (default: the spec's)"
    )
    parser.add_argument(
        "--points",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="run only the points whose <panel>/<family>-<active> matches one of these shell "
        "patterns (e.g. 'E8/*' 'E32/*-8'); the report still covers the whole spec",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="only rebuild the report from finished runs"
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the report's notes (repeatable)"
    )
    return parser


def frontier_main(argv: list[str]) -> None:
    """``train.py frontier`` (see the module docstring).

    Raises:
        ValueError: Before any run starts, for a bad spec, ``--jobs`` < 1, a negative seed, an
            argument that the frontier sets itself, overrides that do not parse, or a run
            under ``--out`` made with other settings.
    """
    args, extra = build_parser().parse_known_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs} is invalid: an int >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} is invalid: an int >= 1")
    spec = load_spec(args.spec)
    if args.seeds is not None:
        if any(s < 0 for s in args.seeds):
            raise ValueError(f"--seeds={args.seeds} is invalid: ints >= 0")
        spec = dataclasses.replace(spec, seeds=tuple(args.seeds))
    check_overrides(extra)
    for name in ("--model.model.num_experts", "--model.model.expert_d_ff", "--model.model.k"):
        if any(a.split("=", 1)[0] == name for a in extra):
            raise ValueError(f"{name} is set per point by the spec's panels; not allowed here")
    points = spec.points()
    if args.points is not None:
        points = [p for p in points if any(fnmatch.fnmatchcase(p.key, pat) for pat in args.points)]
        if not points:
            keys = sorted({p.key for p in spec.points()})
            raise ValueError(f"--points={args.points} matches none of the spec's points {keys}")
    expected = resolve_runs(
        [
            (
                (point.key, point.seed),
                point.run_dir(args.out),
                point.family.config,
                point.seed,
                point.overrides(extra),
            )
            for point in points
        ],
        args.out,
        "the frontier",
        args.report_only,
    )
    start = time.perf_counter()
    if not args.report_only:
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

        def run(indexed: tuple[int, Point]) -> None:
            index, point = indexed
            label = f"{point.key} seed {point.seed} ({index}/{len(points)})"
            if find_summary(point.run_dir(args.out)) is not None:
                print(f"[{TAG}] {label}: done already", flush=True)
                return
            began = time.perf_counter()
            print(f"[{TAG}] {label} -> {point.run_dir(args.out)}", flush=True)
            run_one(
                point.family.config,
                point.seed,
                point.run_dir(args.out),
                point.overrides(extra),
                label=label,
                expected=expected[point.key, point.seed],
                threads=threads,
                tag=TAG,
            )
            print(f"[{TAG}] {label}: {time.perf_counter() - began:.0f} s", flush=True)

        # A failed run must not cancel the others (Executor.map would): every run is tried,
        # the report covers the finished ones, and the failures are raised after it.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run, item) for item in enumerate(points, start=1)]
        failures = [
            f"{point.key} seed {point.seed}: {future.exception()}"
            for point, future in zip(points, futures, strict=True)
            if future.exception() is not None
        ]
    else:
        failures = []
    notes = [
        f"spec {args.spec}, seeds {list(spec.seeds)}, "
        + ", ".join(f"{f.name}: {f.config}" for f in spec.families),
    ]
    if extra:
        notes.append(f"overrides of every run: {' '.join(extra)}")
    notes += args.note
    md_path, _ = write_report(spec, args.out, args.results, notes)
    print(md_path.read_text(), flush=True)
    print(
        f"[{TAG}] wrote {args.results}/report.md, report.json, frontier.png, curves.png, "
        f"load.png ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    if failures:
        raise RuntimeError(f"{len(failures)} frontier run(s) failed: " + " | ".join(failures))
