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

A decision spec (``configs/frontier_decide.yaml``) adds, all optional:

- ``tuning``: equal tuning of every family on a held-out seed at one point, the same peak
  learning rates x two values of each family's own balancing knob (``tune`` of a router),
  run by ``--stage tune`` (``experiments.frontier_tune``); the grid then runs each family with
  its best trial's settings and refuses to start before every trial is recorded;
- ``verdict`` and ``divergence``: the pre-registered rule (``experiments.verdict``), stated in
  the report's header before any run (``--report_only`` writes it with every point pending),
  and the report's *diverged*, *Δ counted* and *verdict* columns;
- ``scale``: one step up in model size for the baseline and a list of families, its own seeds,
  run by ``--stage scale`` and reported as a panel of its own;
- ``out`` / ``results``: where its runs and report go (so it never overwrites another's).

``--budget`` prints runs x estimated minutes per stage without running anything
(``experiments.frontier_budget``). ``frontier.png`` gets a second row, validation loss against
training time, where each family's time per step comes from ``benchmarks/bench_step_time.py``
(``--step_time``), not from the grid's runs, which share the machine unevenly.
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

from experiments.compare import (
    check_overrides,
    find_summary,
    format_mean_std,
    mean_std,
    resolve_runs,
    run_metrics,
    run_one,
    runs_parser,
)
from experiments.verdict import DivergenceRule, VerdictRule, verdict_of
from models.cli import load_yaml

Knob = Literal["k", "target_active"]
KNOBS = ("k", "target_active")
TAG = "frontier"
STAGES = ("grid", "scale", "tune")
# Written next to a run that stopped on a non-finite loss (it has no finished summary).
DIVERGED_FILE = "diverged.json"
STEP_TIME = Path("benchmarks/results/step_time.json")


@dataclass(frozen=True)
class Panel:
    """One model shape of the frontier.

    Attributes:
        name: Panel name (e.g. ``E8``), used in run folders and the report.
        num_experts: Experts E per MoE layer.
        expert_d_ff: Hidden width F of each expert.
        active: Active experts per token of the points (K, or the budget target).
        overrides: Further ``train.py fit`` arguments of every run of the panel (the scale
            step's model size and steps).
        width_ratio: Its ``d_model`` over the baseline config's (the active-expert FLOPs of
            a token grow with it).
    """

    name: str
    num_experts: int
    expert_d_ff: int
    active: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    width_ratio: float = 1.0


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
        overrides: Further ``train.py fit`` arguments of every run of the family (with a
            tuning section, the best trial's settings are added by ``frontier_main``).
        tune: Its own balancing knob for the tuning (None without a tuning section).
    """

    name: str
    config: Path
    knob: Knob = "k"
    baseline: bool = False
    active: dict[str, tuple[int, ...]] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    tune: TuneKnob | None = None


@dataclass(frozen=True)
class TuneKnob:
    """A family's own balancing knob and the values its tuning tries.

    Attributes:
        option: The ``train.py fit`` flag, e.g. ``--model.model.moe.aux_loss_coef``.
        values: The values tried (each with every learning rate of the tuning).
    """

    option: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Tuning:
    """Equal tuning of every family at one point on a held-out seed (``--stage tune``).

    Attributes:
        seed: The held-out seed (not one the frontier reports).
        panel: The panel of the tuning point.
        active: Its active count.
        lr: The peak learning rates tried by every family.
        out: Where the trials' runs go.
        results: Where ``trials.jsonl`` and ``sweep.md`` go.
    """

    seed: int
    panel: str
    active: int
    lr: tuple[float, ...]
    out: Path
    results: Path


@dataclass(frozen=True)
class Scale:
    """One step up in model size: the baseline and a few families on a panel of their own.

    Attributes:
        panel: The panel (its ``overrides`` set the model size and the steps).
        routers: The families run (the baseline among them).
        seeds: Its seeds.
    """

    panel: Panel
    routers: tuple[str, ...]
    seeds: tuple[int, ...]


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
        return [
            *arguments,
            *self.panel.overrides,
            *self.active_overrides,
            *self.family.overrides,
            *extra,
        ]


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
    tuning: Tuning | None = None
    verdict: VerdictRule | None = None
    divergence: DivergenceRule | None = None
    scale: Scale | None = None
    out: Path | None = None
    results: Path | None = None

    @property
    def baseline(self) -> Family:
        """The family the paired differences are against."""
        return next(f for f in self.families if f.baseline)

    def points(self, stage: str = "grid") -> list[Point]:
        """Every run of a stage (``grid`` or ``scale``), seed-major (an interrupted frontier
        has every point at the first seeds)."""
        at_active = dict(self.active_overrides)
        if stage == "scale":
            if self.scale is None:
                return []
            panel = self.scale.panel
            return [
                Point(panel, family, active, seed, at_active.get(active, ()))
                for seed in self.scale.seeds
                for family in self.families
                if family.name in self.scale.routers
                for active in panel.active
            ]
        return [
            Point(panel, family, active, seed, at_active.get(active, ()))
            for seed in self.seeds
            for panel in self.panels
            for family in self.families
            for active in family.active.get(panel.name, panel.active)
        ]

    @property
    def all_panels(self) -> tuple[Panel, ...]:
        """The grid's panels, then the scale step's."""
        return self.panels + ((self.scale.panel,) if self.scale is not None else ())

    def all_points(self) -> list[Point]:
        """The grid's points, then the scale step's."""
        return self.points("grid") + self.points("scale")

    def seeds_of(self, panel: str) -> tuple[int, ...]:
        """The seeds of a panel's points (the scale step has its own)."""
        if self.scale is not None and panel == self.scale.panel.name:
            return self.scale.seeds
        return self.seeds


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
    raw = load_yaml(path.read_text(), str(path))  # a syntax error or a key given twice
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
    unknown = set(raw) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (allowed: {', '.join(SPEC_KEYS)})")
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
    seeds = list(_seed_list(raw.get("seeds", [0, 1, 2]), "seeds"))
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
        allowed = {"name", "config", "knob", "baseline", "active", "overrides", "tune"}
        if not isinstance(entry, dict) or not {"name", "config"} <= set(entry) <= allowed:
            raise ValueError(
                f"{where}={entry!r} is invalid: keys name, config (required), knob, baseline, "
                "active, overrides, tune"
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
                _tune_knob(entry.get("tune"), f"{where}.tune"),
            )
        )
    if sum(f.baseline for f in families) != 1:
        raise ValueError(
            f"routers must have exactly one `baseline: true` family, got "
            f"{[f.name for f in families if f.baseline]}"
        )
    family_names = [f.name for f in families]
    if len(set(family_names)) < len(family_names):
        raise ValueError(f"routers: two families share a name {family_names}")
    scale = _scale(raw.get("scale"), families, seeds)
    if scale is not None and scale.panel.name in names:
        raise ValueError(f"scale.name={scale.panel.name!r} is invalid: a grid panel's name")
    tuning = _tuning(raw.get("tuning"), panels, families, [*seeds, *(scale.seeds if scale else [])])
    for key in ("out", "results"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"{key}={raw[key]!r} is invalid: a path")
    return Spec(
        tuple(panels),
        tuple(families),
        tuple(seeds),
        tuple(active_overrides),
        tuning=tuning,
        verdict=_section(raw, "verdict", VerdictRule),
        divergence=_section(raw, "divergence", DivergenceRule),
        scale=scale,
        out=Path(raw["out"]) if raw.get("out") else None,
        results=Path(raw["results"]) if raw.get("results") else None,
    )


SPEC_KEYS = (
    "panels", "routers", "seeds", "active_overrides", "tuning", "verdict", "divergence",
    "scale", "out", "results",
)  # fmt: skip
SCALE_KEYS = (
    "name", "num_experts", "expert_d_ff", "active", "d_model", "n_layers", "n_heads",
    "max_steps", "routers", "seeds",
)  # fmt: skip
TUNING_KEYS = ("seed", "panel", "active", "lr", "out", "results")


def _section(raw: dict, key: str, kind: type) -> Any:
    """A mapping section of the spec as its dataclass (None when absent)."""
    value = raw.get(key)
    if value is None:
        return None
    allowed = [f.name for f in dataclasses.fields(kind)]
    if not isinstance(value, dict) or not set(value) <= set(allowed):
        raise ValueError(f"{key}={value!r} is invalid: a mapping with keys among {allowed}")
    return kind(**value)


def _seed_list(value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value)
    ):
        raise ValueError(f"{what}={value!r} is invalid: a non-empty list of ints >= 0")
    return tuple(value)


def _tune_knob(value: Any, where: str) -> TuneKnob | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"option", "values"}:
        raise ValueError(f"{where}={value!r} is invalid: a mapping with keys option, values")
    option, values = value["option"], value["values"]
    if not isinstance(option, str) or not option.startswith("--"):
        raise ValueError(f"{where}.option={option!r} is invalid: a train.py fit flag (--...)")
    if option == "--model.optim.lr":
        raise ValueError(f"{where}.option={option!r} is invalid: the tuning's lr list sets it")
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, (int, float, str)) for v in values)
        or len(set(map(str, values))) < len(values)
    ):
        raise ValueError(f"{where}.values={values!r} is invalid: a list of distinct values")
    return TuneKnob(option, tuple(values))


def _tuning(
    value: Any, panels: list[Panel], families: list[Family], reported: list[int]
) -> Tuning | None:
    """The tuning section: every family tuned alike at one point of the grid."""
    if value is None:
        if any(f.tune is not None for f in families):
            raise ValueError("routers have `tune` knobs but the spec has no tuning section")
        return None
    if not isinstance(value, dict) or set(value) != set(TUNING_KEYS):
        raise ValueError(f"tuning={value!r} is invalid: keys {', '.join(TUNING_KEYS)}")
    seed = value["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed in reported:
        raise ValueError(
            f"tuning.seed={seed!r} is invalid: an int >= 0 that no reported run uses "
            f"(not in {sorted(set(reported))})"
        )
    panel = next((p for p in panels if p.name == value["panel"]), None)
    if panel is None:
        names = [p.name for p in panels]
        raise ValueError(f"tuning.panel={value['panel']!r} is invalid: one of {names}")
    active = _positive_int(value["active"], "tuning.active")
    if active not in panel.active:
        raise ValueError(
            f"tuning.active={active} is invalid: one of panel {panel.name}'s {list(panel.active)}"
        )
    lr = value["lr"]
    if (
        not isinstance(lr, list)
        or not lr
        or not all(_is_positive_number(x) for x in lr)
        or len(set(lr)) < len(lr)
    ):
        raise ValueError(f"tuning.lr={lr!r} is invalid: a list of distinct floats > 0")
    untuned = [f.name for f in families if f.tune is None]
    if untuned:
        raise ValueError(f"routers {untuned} have no `tune` knob: every family is tuned alike")
    counts = {f.name: len(f.tune.values) for f in families if f.tune is not None}
    if len(set(counts.values())) > 1:
        raise ValueError(f"every family's tune.values must be as many (equal tuning): {counts}")
    for key in ("out", "results"):
        if not isinstance(value[key], str):
            raise ValueError(f"tuning.{key}={value[key]!r} is invalid: a path")
    return Tuning(
        seed, panel.name, active, tuple(float(x) for x in lr), Path(value["out"]),
        Path(value["results"]),
    )  # fmt: skip


def _is_positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _scale(value: Any, families: list[Family], grid_seeds: list[int]) -> Scale | None:
    """The scale section: a panel of a larger model for the baseline and a few families."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(SCALE_KEYS):
        raise ValueError(f"scale={value!r} is invalid: keys {', '.join(SCALE_KEYS)}")
    name = str(value["name"])
    sizes = {
        key: _positive_int(value[key], f"scale.{key}")
        for key in ("num_experts", "expert_d_ff", "active", "d_model", "n_layers", "n_heads")
    }
    max_steps = _positive_int(value["max_steps"], "scale.max_steps")
    if sizes["active"] > sizes["num_experts"]:
        raise ValueError(
            f"scale.active={sizes['active']} is invalid: at most num_experts={sizes['num_experts']}"
        )
    names = {f.name for f in families}
    routers = value["routers"]
    if not isinstance(routers, list) or not routers or not set(routers) <= names:
        raise ValueError(f"scale.routers={routers!r} is invalid: a list among {sorted(names)}")
    baseline = next(f for f in families if f.baseline)
    if baseline.name not in routers:
        raise ValueError(
            f"scale.routers={routers!r} is invalid: the baseline {baseline.name!r} must be one "
            "(the scale step is paired against it)"
        )
    base_d_model = _config_d_model(baseline.config)
    overrides = (
        "--model.model.d_model", str(sizes["d_model"]),
        "--model.model.n_layers", str(sizes["n_layers"]),
        "--model.model.n_heads", str(sizes["n_heads"]),
        "--trainer.max_steps", str(max_steps),
    )  # fmt: skip
    panel = Panel(
        name,
        sizes["num_experts"],
        sizes["expert_d_ff"],
        (sizes["active"],),
        overrides,
        sizes["d_model"] / base_d_model,
    )
    return Scale(panel, tuple(routers), _seed_list(value["seeds"], "scale.seeds"))


def _config_d_model(config: Path) -> int:
    """``model.model.d_model`` of a fit config (the model's default when it sets none)."""
    from models.config import ModelConfig

    raw = load_yaml(config.read_text(), str(config)) or {}
    model = ((raw.get("model") or {}).get("model") or {}) if isinstance(raw, dict) else {}
    return int(model.get("d_model", ModelConfig().d_model))


# ------------------------------------------------------------------------------------ report


def point_run_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one finished run that the frontier report shows: ``run_metrics`` plus
    the p99 of active experts, the overflow rate, the per-layer load and the curves."""
    layers = summary["final_val"]["layers"]
    metrics = run_metrics(summary)
    return {
        **metrics,
        "val_loss": metrics.pop("loss"),
        "steps": summary.get("global_step"),
        "active_p99": max(v["active_experts_p99"] for v in layers.values()),
        "overflow_rate": max(v["overflow_rate"] for v in layers.values()),
        "load": {name: v["tokens_per_expert"] for name, v in layers.items()},
        "train_curve": summary.get("train_curve") or [],
        "val_curve": summary["val_curve"],
    }


def read_diverged(run_dir: Path) -> dict[str, Any] | None:
    """The record of a run that stopped on a non-finite loss (None if there is none)."""
    path = run_dir / DIVERGED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def nonfinite_stop(run_dir: Path) -> str | None:
    """The line of a failed run's log that says it stopped on a non-finite loss or gradient
    (``models.callbacks.NonFiniteGuard``), or None if it failed for another reason."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    lines = [line for line in log.read_text().splitlines() if "NonFiniteLossError" in line]
    return lines[-1].strip() if lines else None


def collect(spec: Spec, out: Path) -> list[dict[str, Any]]:
    """One record per point (the grid's, then the scale step's) with its finished runs (seed
    order), baseline pairing included; with a divergence rule, each run's divergence and the
    runs that stopped on a non-finite loss (``crashed``); with a verdict rule, the verdict."""
    records: dict[str, dict[str, Any]] = {}
    for point in spec.all_points():
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
                "flops_rel": point.active
                * point.panel.expert_d_ff
                * point.panel.width_ratio
                / spec.panels[0].expert_d_ff,
                "seeds_expected": len(spec.seeds_of(point.panel.name)),
                "runs": [],
                "crashed": [],
            },
        )
        summary = find_summary(point.run_dir(out))
        if summary is not None:
            metrics = point_run_metrics(summary)
            if spec.divergence is not None:
                metrics["diverged"] = spec.divergence.reason(
                    metrics["train_curve"], metrics["val_loss"]
                )
            record["runs"].append(metrics)
        elif spec.divergence is not None and (stop := read_diverged(point.run_dir(out))):
            record["crashed"].append({"seed": point.seed, "diverged": stop["reason"]})
    baseline = spec.baseline.name
    for record in records.values():
        base = records.get(f"{record['panel']}/{baseline}-{record['active']}")
        base_runs = {r["seed"]: r for r in base["runs"]} if base else {}
        pairs = [(r, base_runs[r["seed"]]) for r in record["runs"] if r["seed"] in base_runs]
        pairs = [(r, b) for r, b in pairs if _finite(r["val_loss"]) and _finite(b["val_loss"])]
        record["delta_vs_baseline"] = [r["val_loss"] - b["val_loss"] for r, b in pairs]
        record["speed_vs_baseline"] = [
            r["tokens_per_s"] / b["tokens_per_s"]
            for r, b in pairs
            if r["tokens_per_s"] and b["tokens_per_s"]
        ]
        if spec.divergence is not None and base is not None:
            counted = _counted(spec.divergence, record)
            base_counted = _counted(spec.divergence, base)
            seeds = [s for s in spec.seeds_of(record["panel"]) if s in counted]
            record["delta_counted"] = [
                counted[s] - base_counted[s] for s in seeds if s in base_counted
            ]
        if spec.verdict is not None and record["family"] != baseline:
            verdict, interval = verdict_of(
                record.get("delta_counted", record["delta_vs_baseline"]),
                record["seeds_expected"],
                spec.verdict,
            )
            record["verdict"] = verdict
            record["interval"] = None if interval is None else dataclasses.asdict(interval)
    return list(records.values())


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _counted(rule: DivergenceRule, record: dict[str, Any]) -> dict[int, float]:
    """Seed -> the validation loss each run of a point counts with (diverged runs charged)."""
    counted = {
        r["seed"]: rule.counted_loss(r["val_loss"], r.get("diverged") is not None)
        for r in record["runs"]
    }
    counted.update({c["seed"]: rule.counted_loss(None, True) for c in record["crashed"]})
    return counted


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


# With a verdict rule, after "seeds better".
VERDICT_COLUMNS = ("diverged", "Δ counted: mean [CI]", "verdict")


def report_columns(spec: Spec) -> tuple[str, ...]:
    """The table's columns: ``COLUMNS``, with ``VERDICT_COLUMNS`` for a spec with a verdict."""
    if spec.verdict is None:
        return COLUMNS
    at = COLUMNS.index("seeds better") + 1
    return (*COLUMNS[:at], *VERDICT_COLUMNS, *COLUMNS[at:])


def preregistration(spec: Spec) -> list[str]:
    """The design and the decision rule of a spec with a verdict, as markdown lines: the
    report's header, the same before any run as after."""
    baseline = spec.baseline.name
    points = ", ".join(
        f"E = {p.num_experts} with {'/'.join(map(str, p.active))} active" for p in spec.panels
    )
    lines = [
        "## Pre-registered before any run",
        "",
        f"Families: {', '.join(f'{f.name} (`{f.config}`)' for f in spec.families)}; "
        f"baseline {baseline}. Points: {points}; seeds {list(spec.seeds)}, paired: a seed "
        "sets the initialisation (`seed_everything`) and the training order (`data.seed`, "
        "linked to it), the same for every family.",
        "",
    ]
    tuning = spec.tuning
    if tuning is not None:
        knobs = "; ".join(
            f"{f.name}: `{f.tune.option.removeprefix('--model.model.')}` in {list(f.tune.values)}"
            for f in spec.families
            if f.tune is not None
        )
        trials = len(tuning.lr) * len(spec.families[0].tune.values)
        lines += [
            f"**Tuning** (equal for every family, held-out seed {tuning.seed}, at "
            f"{tuning.panel} with {tuning.active} active, the grid's budget): peak learning "
            f"rate in {list(tuning.lr)} x two values of the family's own balancing knob = "
            f"{trials} trials each, every trial recorded in `{tuning.results}/`. Knobs: "
            f"{knobs}. The trial with the lowest validation loss among those that did not "
            "diverge wins (a tie: the earlier in the spec's order); its learning rate and "
            "knob value are used at every point and seed of the family, the scale step "
            "included.",
            "",
        ]
    if spec.verdict is not None:
        lines += ["**Verdict** of each family against tuned " + baseline + ":", ""]
        lines += spec.verdict.text(baseline, len(spec.seeds))
        lines.append("")
    if spec.divergence is not None:
        lines += [*spec.divergence.text(), ""]
    if spec.scale is not None:
        scale = spec.scale
        lines += [
            f"**Scale step** (panel {scale.panel.name}, reported apart): "
            + ", ".join(
                f"{flag.rsplit('.', 1)[-1]} {value}"
                for flag, value in zip(
                    scale.panel.overrides[::2], scale.panel.overrides[1::2], strict=True
                )
            )
            + f", E = {scale.panel.num_experts} with {scale.panel.active[0]} active, "
            f"F = {scale.panel.expert_d_ff}; seeds {list(scale.seeds)}; {baseline} and the two "
            "best families of the grid, chosen after it: the lowest mean Δ counted over the "
            "grid's points, a family *worse* at any point left out (the spec runs "
            f"{list(scale.routers)}); the same rule, on its own seeds.",
            "",
        ]
    return lines


def scale_candidates(spec: Spec, records: list[dict[str, Any]]) -> list[str] | None:
    """The two families the scale step should run by the spec's rule: the lowest mean
    counted Δ over the grid's points, a family judged worse at any of them left out. None
    while a grid point has no verdict yet."""
    grid = {p.name for p in spec.panels}
    means: dict[str, list[float]] = {}
    for record in records:
        if record["panel"] not in grid or record["family"] == spec.baseline.name:
            continue
        if record.get("interval") is None:
            return None
        if record["verdict"] != "worse":
            means.setdefault(record["family"], []).append(record["interval"]["mean"])
        else:
            means[record["family"]] = [math.inf]
    ranked = sorted(
        (statistics.fmean(v), f) for f, v in means.items() if math.isfinite(statistics.fmean(v))
    )
    return [family for _, family in ranked[:2]]


def report_markdown(spec: Spec, records: list[dict[str, Any]], notes: list[str]) -> str:
    """The frontier table and its notes, as markdown (a spec with a verdict rule: its
    pre-registered design and rule first, and the verdict columns)."""
    baseline = spec.baseline.name
    header = [c.replace("topk", baseline) for c in report_columns(spec)]
    if spec.verdict is None:
        lines = ["# Loss vs compute: soft vs hard routing at matched active experts", ""]
    else:
        lines = [f"# Router families against tuned {baseline} at matched active experts", ""]
    lines += [f"- {note}" for note in notes]
    if spec.verdict is not None:
        lines += ["", *preregistration(spec)]
    lines += [
        "",
        f"Mean ± std over seeds. Δ is the validation loss minus {baseline}'s at the same E and "
        "active count, paired by seed (negative = better). Validation metrics are at the last "
        "step over the whole validation set; active = experts computed per token (mean of "
        "layers; p99: worst layer); MaxVio = (max load − mean load) / mean load; dead = "
        "experts with no validation token (all layers); overflow = tokens with p > 0 on more "
        "experts than the slots (worst layer).",
    ]
    if spec.verdict is not None:
        level = f"{spec.verdict.confidence * 100:g} %"
        lines.append(
            f"Δ counted: diverged runs charged as the rule says, mean and {level} t-interval "
            "over the paired seeds; diverged: diverged runs / runs (the rule above)."
        )
    has_runs = any(r["runs"] for r in records)
    lines += [
        "",
        "![frontier](frontier.png)" if has_runs else "No run has finished yet.",
        "",
        "| " + " | ".join(header) + " |",
        "|:--|:--|" + "--:|" * (len(header) - 2),
    ]
    grid_panels = {p.name for p in spec.panels}
    for r in records:
        runs = r["runs"]
        is_base = r["family"] == baseline
        experts = str(r["num_experts"])
        if r["panel"] not in grid_panels:
            experts += f" ({r['panel']})"
        verdict_cells = []
        if spec.verdict is not None:
            crashed = r.get("crashed", [])
            diverged = sum(x.get("diverged") is not None for x in runs) + len(crashed)
            interval = r.get("interval")
            done = len(runs) + len(crashed)
            verdict_cells = [
                f"{diverged}/{done}" if done else "—",
                "—"
                if is_base or interval is None
                else f"{interval['mean']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]",
                "—" if is_base else f"**{r['verdict']}**",
            ]
        if not runs:
            cells = [experts, r["family"], str(r["active"])] + ["n/a"] * (len(COLUMNS) - 3)
        else:
            deltas = r["delta_vs_baseline"]
            finite = [x for x in runs if _finite(x["val_loss"])]
            cells = [
                experts,
                r["family"],
                str(r["active"]),
                format_mean_std([x["active_mean"] for x in runs], 2),
                format_mean_std([x["active_p99"] for x in runs], 1),
                str(len(runs)),
                format_mean_std([x["val_loss"] for x in finite]),
                "—" if is_base else format_mean_std(deltas),
                "—" if is_base else f"{sum(d < 0 for d in deltas)}/{len(deltas)}",
                format_mean_std([x["max_vio_worst"] for x in runs], 3),
                format_mean_std([x["cv_mean"] for x in runs], 3),
                format_mean_std([x["dead_experts"] for x in runs], 1),
                format_mean_std([x["overflow_rate"] for x in runs], 4),
                "—" if is_base else format_mean_std(r["speed_vs_baseline"], 2),
            ]
        at = COLUMNS.index("seeds better") + 1
        cells = [*cells[:at], *verdict_cells, *cells[at:]]
        lines.append("| " + " | ".join(cells) + " |")
    if spec.verdict is not None:
        lines += ["", "Verdicts against " + baseline + ":", ""]
        for family in spec.families:
            if family.baseline:
                continue
            mine = [r for r in records if r["family"] == family.name]
            if mine:
                lines.append(
                    f"- {family.name}: "
                    + "; ".join(f"{r['panel']} {r['active']} active: {r['verdict']}" for r in mine)
                )
    if spec.scale is not None:
        best = scale_candidates(spec, records)
        if best is not None:
            chosen = [f for f in spec.scale.routers if f != baseline]
            lines += [
                "",
                f"Scale step, by the rule: {', '.join(best)}"
                + ("" if sorted(best) == sorted(chosen) else f" (the spec runs {chosen})"),
            ]
    if has_runs:
        lines += [
            "",
            "Training-loss curves per point: ![curves](curves.png)",
            "",
            "Per-layer load over the validation set (load / mean load, mean over seeds): "
            "![load](load.png)",
        ]
    lines.append("")
    return "\n".join(lines)


def _family_colors(spec: Spec) -> dict[str, str]:
    return {f.name: f"C{i}" for i, f in enumerate(spec.families)}


def frontier_figure(spec: Spec, records: list[dict[str, Any]]):
    """Validation loss (mean ± std over seeds), one column per panel: against the measured
    active-expert FLOPs per token (mean over seeds; ticks at the spec's active counts) on the
    first row, against the training time on the second (the run's steps at the family's
    median step time of ``benchmarks/bench_step_time.py``, ``record["step_ms"]``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = spec.all_panels
    figure = Figure(figsize=(5.2 * len(panels), 8.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(panels), squeeze=False, sharey="row")
    colors = _family_colors(spec)
    first = spec.panels[0]
    for column, panel in enumerate(panels):
        flops_ax, time_ax = axes[0, column], axes[1, column]
        timed = False
        for family in spec.families:
            points = [
                r
                for r in records
                if r["panel"] == panel.name
                and r["family"] == family.name
                and any(_finite(x["val_loss"]) for x in r["runs"])
            ]
            if not points:
                continue
            # at the measured compute (a support-exact gate may run below or above its target)
            xs = [
                statistics.fmean(x["active_mean"] for x in r["runs"])
                * panel.expert_d_ff
                * panel.width_ratio
                / first.expert_d_ff
                for r in points
            ]
            stats = [
                mean_std([x["val_loss"] for x in r["runs"] if _finite(x["val_loss"])])
                for r in points
            ]
            style = {"marker": "o", "capsize": 3, "color": colors[family.name]}
            flops_ax.errorbar(
                xs, [m for m, _ in stats], yerr=[s for _, s in stats], label=family.name, **style
            )
            minutes = [
                (statistics.median(x["steps"] or 0 for x in r["runs"]) * r["step_ms"] / 60e3, m, sd)
                for r, (m, sd) in zip(points, stats, strict=True)
                if r.get("step_ms")
            ]
            if minutes:
                timed = True
                time_ax.errorbar(
                    [t for t, _, _ in minutes],
                    [m for _, m, _ in minutes],
                    yerr=[sd for _, _, sd in minutes],
                    label=family.name,
                    **style,
                )
        if timed:  # after the points: set_xlim first would freeze the axis at [0, 1]
            time_ax.set_xlim(left=0)
        flops_ax.set_xscale("log", base=2)
        ticks = sorted({r["flops_rel"] for r in records if r["panel"] == panel.name})
        scale = first.expert_d_ff / (panel.expert_d_ff * panel.width_ratio)
        flops_ax.set_xticks(ticks, [f"{t:g}\n({round(t * scale)} active)" for t in ticks])
        flops_ax.minorticks_off()
        title = f"E = {panel.num_experts}, F = {panel.expert_d_ff}"
        if panel.overrides:
            title = f"{panel.name}: {title}, d_model x{panel.width_ratio:g}"
        flops_ax.set_title(title)
        flops_ax.set_xlabel(f"active-expert FLOPs / token (1 = top-1 at E = {first.num_experts})")
        time_ax.set_xlabel("training time (min, one thread, quiet step-time benchmark)")
        for ax in (flops_ax, time_ax):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        if not timed:
            time_ax.text(
                0.5,
                0.5,
                "no step time for this panel:\nrun benchmarks/bench_step_time.py",
                ha="center",
                va="center",
                transform=time_ax.transAxes,
            )
    axes[0, 0].set_ylabel("validation loss (nats / byte)")
    axes[1, 0].set_ylabel("validation loss (nats / byte)")
    return figure


def curves_figure(spec: Spec, records: list[dict[str, Any]]):
    """Training-loss curves (mean over seeds) per panel and active count, one line per family."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = sorted(
        {(r["panel"], r["active"]) for r in records if r["runs"]},
        key=lambda c: ([p.name for p in spec.all_panels].index(c[0]), c[1]),
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

    panels = [
        p for p in spec.all_panels if any(r["panel"] == p.name and r["runs"] for r in records)
    ]
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


def load_step_times(path: Path | None) -> tuple[dict[tuple[str, str], float], str | None]:
    """The median milliseconds per training step of each ``(panel, family)`` measured by
    ``benchmarks/bench_step_time.py``, and a line saying where they come from.

    Returns:
        ``({}, None)`` when ``path`` is None or not a file; a smoke run's times are not used
        (its line says so).
    """
    if path is None or not path.is_file():
        return {}, None
    payload = json.loads(path.read_text())
    if payload.get("smoke"):
        return {}, f"step times: {path} is a smoke run, not used"
    times = {(row["panel"], row["family"]): row["step_ms"] for row in payload["rows"]}
    line = (
        f"step times (loss-vs-time row): {path}, medians of {payload.get('repeats')} "
        f"interleaved steps at {payload.get('threads')} thread(s), "
        f"{payload.get('load_before', 'machine load unknown')}"
    )
    return times, line


def write_report(
    spec: Spec, out: Path, results: Path, notes: list[str], step_time: Path | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    """Writes report.md, report.json, frontier.png, curves.png and load.png to ``results``.

    A spec with a verdict rule gets its report before any run (its pre-registered header,
    every point pending; no figures yet).

    Raises:
        ValueError: If no run under ``out`` has finished (and the spec has no verdict rule).
    """
    records = collect(spec, out)
    if not any(r["runs"] for r in records) and spec.verdict is None:
        raise ValueError(f"no finished frontier run under {str(out)!r} to report on")
    times, source = load_step_times(step_time)
    for record in records:
        record["step_ms"] = times.get((record["panel"], record["family"]))
    notes = [*notes, source] if source else notes
    results.mkdir(parents=True, exist_ok=True)
    md_path = results / "report.md"
    md_path.write_text(report_markdown(spec, records, notes))
    payload = {"notes": notes, "columns": list(report_columns(spec)), "points": records}
    (results / "report.json").write_text(json.dumps(payload, indent=1))
    if not any(r["runs"] for r in records):  # the pre-registered report: nothing to plot yet
        return md_path, records
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
    parser = runs_parser(
        "train.py frontier", "Run every point of a loss-vs-compute frontier, then write its report."
    )
    parser.add_argument("--spec", type=Path, default=Path("configs/frontier.yaml"))
    parser.add_argument(
        "--out", type=Path, default=None, help="run folders (default: the spec's, runs/frontier)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where report.md / report.json / *.png go (default: the spec's, "
        "benchmarks/results/frontier)",
    )
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="grid",
        help="grid: the spec's panels (default); scale: its scale step; tune: its tuning trials",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per run (default: the CPU count divided by --jobs)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds of the grid (default: the spec's)"
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
        "--report_only",
        action="store_true",
        help="only rebuild the report from finished runs (a spec with a verdict rule: also "
        "before any run, its pre-registered header with every point pending)",
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the report's notes (repeatable)"
    )
    parser.add_argument(
        "--step_time",
        type=Path,
        default=STEP_TIME,
        help=f"benchmarks/bench_step_time.py's results, for the loss-vs-time row and the "
        f"budget (default {STEP_TIME})",
    )
    parser.add_argument(
        "--budget",
        action="store_true",
        help="print runs x estimated minutes of every stage, and run nothing",
    )
    parser.add_argument(
        "--tokens_per_s",
        nargs="+",
        default=None,
        metavar="RATE",
        help="with --budget: training tokens/s of one run at one thread, N for every run, "
        "or FAMILY=N, PANEL=N, PANEL/FAMILY=N (first match of PANEL/FAMILY, FAMILY, PANEL, N; "
        "--step_time's measurements win over all)",
    )
    return parser


def frontier_main(argv: list[str]) -> None:
    """``train.py frontier`` (see the module docstring).

    Raises:
        ValueError: Before any run starts, for a bad spec, ``--jobs`` < 1, a negative seed, an
            argument that the frontier sets itself, overrides that do not parse, a spec's
            tuning not finished before its grid, or a run under ``--out`` made with other
            settings.
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
        if spec.tuning is not None and spec.tuning.seed in args.seeds:
            raise ValueError(f"--seeds={args.seeds} is invalid: {spec.tuning.seed} is the tuning's")
        spec = dataclasses.replace(spec, seeds=tuple(args.seeds))
    check_overrides(extra)
    for name in ("--model.model.num_experts", "--model.model.expert_d_ff", "--model.model.k"):
        if any(a.split("=", 1)[0] == name for a in extra):
            raise ValueError(f"{name} is set per point by the spec's panels; not allowed here")
    out = args.out or spec.out or Path("runs/frontier")
    results = args.results or spec.results or Path("benchmarks/results/frontier")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.budget:
        from experiments.frontier_budget import budget_report

        budget = budget_report(spec, extra, args.tokens_per_s, args.step_time, str(args.spec))
        print(budget, flush=True)
        return
    if args.tokens_per_s is not None:
        raise ValueError("--tokens_per_s goes with --budget")
    if args.stage == "tune":
        from experiments.frontier_tune import tune_main

        tune_main(spec, extra, jobs=args.jobs, threads=threads)
        return
    tuned_notes: list[str] = []
    if spec.tuning is not None:
        from experiments.frontier_tune import apply_tuning

        spec, tuned_notes = apply_tuning(spec, extra, required=not args.report_only)
    points = spec.points(args.stage)
    if not points:
        raise ValueError(f"--stage {args.stage}: {args.spec} has no scale section")
    if args.points is not None:
        stage_points = points
        points = [p for p in points if any(fnmatch.fnmatchcase(p.key, pat) for pat in args.points)]
        if not points:
            keys = sorted({p.key for p in stage_points})
            raise ValueError(f"--points={args.points} matches none of the spec's points {keys}")
    expected = resolve_runs(
        [
            (
                (point.key, point.seed),
                point.run_dir(out),
                point.family.config,
                point.seed,
                point.overrides(extra),
            )
            for point in points
        ],
        out,
        "the frontier",
        args.report_only,
    )
    start = time.perf_counter()
    if not args.report_only:

        def run(indexed: tuple[int, Point]) -> None:
            index, point = indexed
            label = f"{point.key} seed {point.seed} ({index}/{len(points)})"
            run_dir = point.run_dir(out)
            if find_summary(run_dir) is not None:
                print(f"[{TAG}] {label}: done already", flush=True)
                return
            if spec.divergence is not None and read_diverged(run_dir) is not None:
                print(f"[{TAG}] {label}: diverged already (counted, not run again)", flush=True)
                return
            began = time.perf_counter()
            print(f"[{TAG}] {label} -> {run_dir}", flush=True)
            try:
                run_one(
                    point.family.config,
                    point.seed,
                    run_dir,
                    point.overrides(extra),
                    label=label,
                    expected=expected[point.key, point.seed],
                    threads=threads,
                    tag=TAG,
                )
            except RuntimeError:
                # A stop on a non-finite loss is a result of the run (it diverged), not a
                # failure to run it: recorded, counted against its family, never re-run.
                stop = nonfinite_stop(run_dir) if spec.divergence is not None else None
                if stop is None:
                    raise
                (run_dir / DIVERGED_FILE).write_text(json.dumps({"reason": stop}, indent=1))
                print(f"[{TAG}] {label}: diverged ({stop})", flush=True)
                return
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
        *tuned_notes,
    ]
    if extra:
        notes.append(f"overrides of every run: {' '.join(extra)}")
    notes += args.note
    md_path, _ = write_report(spec, out, results, notes, args.step_time)
    print(md_path.read_text(), flush=True)
    print(
        f"[{TAG}] wrote {results}/report.md, report.json, frontier.png, curves.png, "
        f"load.png ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    if failures:
        raise RuntimeError(f"{len(failures)} frontier run(s) failed: " + " | ".join(failures))
