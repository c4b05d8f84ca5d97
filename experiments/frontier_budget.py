"""``train.py frontier --budget``: runs x estimated minutes of every stage, nothing is run.

Each run's minutes are ``STARTUP_S`` plus its training tokens (steps x batch x sequence) and a
third of its validation tokens (a forward pass costs about a third of a training step) over its
training throughput: from ``benchmarks/bench_step_time.py``'s measured step time of the family
at the panel when there is one, else from ``--tokens_per_s`` (``N`` for every run, or
``FAMILY=N``, ``PANEL=N``, ``PANEL/FAMILY=N``). A rate given for every panel (``N`` or
``FAMILY=N``) is the rate at the spec's first panel; other shapes (the scale step's larger
model) get it scaled by their estimated FLOPs per token. Wall time is given one run after
another on one core, and on two cores with two runs side by side (longest first), each run at
its one-thread rate.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from experiments.frontier import Point, Spec

# Process start, data loading and model build of one run (on the 2-core machine: a tuning
# trial's wall time minus its training tokens over its tokens/s, 15-25 s).
STARTUP_S = 15.0
# A validation token (forward only) against a training token (forward, backward, step).
VALIDATION_COST = 1 / 3


@dataclass(frozen=True)
class RunShape:
    """What one run computes, read from its config and arguments.

    Attributes:
        steps: Optimizer steps.
        tokens_per_step: Training tokens per step (batch x sequence length).
        validation_tokens: Tokens of all its validation passes.
        flops_per_token: Estimated training FLOPs per token (6 x active parameters, plus
            attention).
    """

    steps: int
    tokens_per_step: int
    validation_tokens: int
    flops_per_token: float


def _setting(config: dict, overrides: list[str], dotted: str, default: Any) -> Any:
    """A setting of a run: the last ``--dotted value`` (or ``--dotted=value``) argument, else
    the config's value, else ``default``."""
    flag = f"--{dotted}"
    found = None
    for i, argument in enumerate(overrides):
        if argument == flag and i + 1 < len(overrides):
            found = overrides[i + 1]
        elif argument.startswith(flag + "="):
            found = argument.split("=", 1)[1]
    if found is not None:
        return yaml.safe_load(found)
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return default if value is None else value


def run_shape(config: Path, overrides: list[str]) -> RunShape:
    """The shape of the run of ``config`` with ``overrides`` (the model's defaults where the
    config sets nothing)."""
    from models.config import ModelConfig

    raw = yaml.safe_load(config.read_text()) or {}
    defaults = ModelConfig()

    def get(dotted: str, default: Any) -> Any:
        return _setting(raw, overrides, dotted, default)

    steps = int(get("trainer.max_steps", 1000))
    seq_len = int(get("data.seq_len", 128))
    batch = int(get("data.batch_size", 16))
    every = int(get("trainer.val_check_interval", steps) or steps)
    val_blocks = int(get("data.max_val_blocks", 64))
    d_model = int(get("model.model.d_model", defaults.d_model))
    layers = int(get("model.model.n_layers", defaults.n_layers))
    experts = int(get("model.model.num_experts", defaults.num_experts))
    k = int(get("model.model.k", defaults.k))
    width = int(get("model.model.expert_d_ff", defaults.expert_d_ff))
    vocab = int(get("model.model.vocab_size", defaults.vocab_size))
    # attention projections 4 D^2, K SwiGLU experts 3 D F, the router E D; the unembedding
    active_parameters = layers * (4 * d_model**2 + 3 * k * d_model * width + experts * d_model)
    active_parameters += vocab * d_model
    # causal attention scores and values: about 6 S D per token and layer, forward + backward
    flops = 6 * active_parameters + 6 * layers * seq_len * d_model
    passes = max(1, -(-steps // max(1, every)))
    return RunShape(steps, batch * seq_len, passes * val_blocks * seq_len, float(flops))


def parse_rates(entries: list[str] | None, spec: Spec) -> dict[str, float]:
    """``--tokens_per_s`` entries as ``{"": N, "FAMILY": N, "PANEL": N, "PANEL/FAMILY": N}``.

    Raises:
        ValueError: For an entry that is not a rate > 0, or names no panel or family of the
            spec.
    """
    panels = {p.name for p in spec.all_panels}
    families = {f.name for f in spec.families}
    rates: dict[str, float] = {}
    for entry in entries or []:
        key, _, value = entry.rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if rate <= 0:
            raise ValueError(f"--tokens_per_s {entry!r} is invalid: N, or NAME=N with N > 0")
        panel, _, family = key.partition("/")
        known = (
            key == ""
            or (family and panel in panels and family in families)
            or (not family and (key in panels or key in families))
        )
        if not known:
            raise ValueError(
                f"--tokens_per_s {entry!r}: {key!r} is not a panel ({sorted(panels)}), a "
                f"family ({sorted(families)}) or PANEL/FAMILY"
            )
        rates[key] = rate
    return rates


def point_rate(
    point: Point,
    shape: RunShape,
    reference: RunShape,
    rates: dict[str, float],
    step_ms: dict[tuple[str, str], float],
) -> tuple[float, str]:
    """Training tokens/s of one run and where it comes from.

    Args:
        point: The run.
        shape: Its shape.
        reference: The family's shape at the spec's first panel (what a rate for every
            panel is measured at).
        rates: ``parse_rates``' result.
        step_ms: Measured milliseconds per step by ``(panel, family)``.

    Raises:
        ValueError: If nothing gives a rate for the run.
    """
    panel, family = point.panel.name, point.family.name
    if (panel, family) in step_ms:
        return shape.tokens_per_step / (step_ms[panel, family] / 1e3), "step time"
    scaled = reference.flops_per_token / shape.flops_per_token
    for key, factor in ((f"{panel}/{family}", 1.0), (family, scaled), (panel, 1.0), ("", scaled)):
        if key in rates:
            source = f"--tokens_per_s {key or 'N'}"
            if factor != 1:
                source += f" x {factor:.2f}: its FLOPs per token against the first panel's"
            return rates[key] * factor, source
    raise ValueError(
        f"no throughput for {panel}/{family}: pass --tokens_per_s (e.g. 20000) or run "
        "benchmarks/bench_step_time.py"
    )


def two_side_by_side_minutes(minutes: list[float]) -> float:
    """Wall minutes of the runs on two workers, longest first, each to the first free one."""
    workers = [0.0, 0.0]
    for run in sorted(minutes, reverse=True):
        heapq.heappush(workers, heapq.heappop(workers) + run)
    return max(workers)


def _span(values: list[float]) -> str:
    low, high = f"{min(values):.1f}", f"{max(values):.1f}"
    return low if low == high else f"{low}-{high}"


def budget_report(
    spec: Spec,
    extra: list[str],
    tokens_per_s: list[str] | None,
    step_time: Path | None,
    name: str = "the spec",
) -> str:
    """The budget table of every stage of ``spec`` (markdown), titled with its ``name``.

    Raises:
        ValueError: For bad ``--tokens_per_s`` entries or a run without any rate.
    """
    from experiments.frontier import Point, load_step_times
    from experiments.frontier_tune import plan

    rates = parse_rates(tokens_per_s, spec)
    step_ms, step_source = load_step_times(step_time)
    first = spec.panels[0]
    at_active = dict(spec.active_overrides)

    def reference(family) -> RunShape:
        point = Point(first, family, first.active[0], 0, at_active.get(first.active[0], ()))
        return run_shape(family.config, point.overrides(extra))

    stages: list[tuple[str, list[tuple[Point, list[str]]]]] = []
    if spec.tuning is not None:
        tuning = spec.tuning
        panel = next(p for p in spec.panels if p.name == tuning.panel)
        trials = plan(spec, extra)
        point_of = {
            f.name: Point(panel, f, tuning.active, tuning.seed, at_active.get(tuning.active, ()))
            for f in spec.families
        }
        stages.append(
            (
                f"tune: {len(spec.families)} families x {len(trials) // len(spec.families)} "
                f"trials at {tuning.panel}/{tuning.active}, seed {tuning.seed}",
                [(point_of[t.family.name], list(t.overrides)) for t in trials],
            )
        )
    grid = spec.points("grid")
    stages.append(
        (
            f"grid: {len({p.key for p in grid})} points x {len(spec.seeds)} seeds",
            [(p, p.overrides(extra)) for p in grid],
        )
    )
    if spec.scale is not None:
        scale = spec.points("scale")
        stages.append(
            (
                f"scale: {len(spec.scale.routers)} families x {len(spec.scale.seeds)} seeds at "
                f"{spec.scale.panel.name}",
                [(p, p.overrides(extra)) for p in scale],
            )
        )
    lines = [
        f"Budget of {name}, with the extra arguments {extra} (estimates; nothing is run)"
        if extra
        else f"Budget of {name} (estimates; nothing is run)",
        "",
        "| stage | runs | tokens / run | min / run | run-hours | one core | two side by side |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    used: dict[str, tuple[float, str]] = {}
    all_minutes: list[float] = []
    references = {f.name: reference(f) for f in spec.families}
    for title, runs in stages:
        minutes = []
        tokens = set()
        for point, overrides in runs:
            shape = run_shape(point.family.config, overrides)
            rate, source = point_rate(point, shape, references[point.family.name], rates, step_ms)
            used[f"{point.panel.name}/{point.family.name}"] = (rate, source)
            work = shape.steps * shape.tokens_per_step + VALIDATION_COST * shape.validation_tokens
            minutes.append((STARTUP_S + work / rate) / 60)
            tokens.add(shape.steps * shape.tokens_per_step)
        all_minutes += minutes
        lines.append(
            f"| {title} | {len(runs)} | {'/'.join(f'{t / 1e6:.1f}M' for t in sorted(tokens))} | "
            f"{_span(minutes)} | {sum(minutes) / 60:.1f} | "
            f"{sum(minutes) / 60:.1f} h | {two_side_by_side_minutes(minutes) / 60:.1f} h |"
        )
    lines.append(
        f"| total | {len(all_minutes)} | | | {sum(all_minutes) / 60:.1f} | "
        f"{sum(all_minutes) / 60:.1f} h | {two_side_by_side_minutes(all_minutes) / 60:.1f} h |"
    )
    lines += [
        "",
        f"Per run: {STARTUP_S:.0f} s to start, then (training tokens + validation tokens / 3) "
        "/ tokens per s. One core: one run after another; two side by side: two runs at a "
        "time, longest first, each at its one-thread rate (no slowdown from sharing assumed).",
        "",
        "Training tokens/s of one run at one thread:",
        "",
    ]
    grouped: dict[tuple[float, str], list[str]] = {}
    for key, rate_source in used.items():
        grouped.setdefault(rate_source, []).append(key)
    for (rate, source), keys in grouped.items():
        lines.append(f"- {', '.join(keys)}: {rate:.0f} ({source})")
    if step_source:
        lines += ["", step_source]
    return "\n".join(lines)
