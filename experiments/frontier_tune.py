"""``train.py frontier --stage tune``: every family of a spec tuned alike on a held-out seed.

A spec's ``tuning`` section names the seed, the point (a panel and an active count) and the
peak learning rates; each router's ``tune`` names its own balancing knob and its values. Every
family runs every learning rate x every knob value (``plan``) at that point, as the grid would
run it (the family's config, the point's arguments, the extra arguments of the command), each
trial one ``train.py fit`` through ``experiments.tune_sweep.run_trial``. Each trial is
appended to ``<tuning.results>/trials.jsonl`` as it ends and ``sweep.md`` is rebuilt from all
of them, so the table lists every trial, not only the winners; re-running resumes (a trial
already recorded is not run again; one recorded with other arguments is refused).

A trial that stops on a non-finite loss, or that the spec's divergence rule flags, is recorded
as diverged and cannot win. ``winners`` picks each family's trial with the lowest validation
loss (a tie: the earlier in ``plan``'s order); ``apply_tuning`` adds its learning rate and
knob value to every run of the family, and refuses to run a grid before every trial is
recorded.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from experiments import tune_sweep
from experiments.compare import effective_config
from models.config import ModelConfig

if TYPE_CHECKING:
    from experiments.frontier import Family, Spec

TAG = "tune"


@dataclass(frozen=True)
class Trial:
    """One tuning trial of a family.

    Attributes:
        family: The family.
        name: ``<family>-lr<lr>-<knob><value>``: its run folder and its row.
        tuned: The arguments it tunes (learning rate, knob value): what the grid reuses.
        overrides: Every ``train.py fit`` argument on top of the family's config.
    """

    family: Family
    name: str
    tuned: tuple[str, ...]
    overrides: tuple[str, ...]


def _knob_name(option: str) -> str:
    return option.rsplit(".", 1)[-1]


def plan(spec: Spec, extra: list[str]) -> list[Trial]:
    """Every trial of the spec's tuning, family by family in the spec's order.

    Raises:
        ValueError: If the spec has no tuning section.
    """
    from experiments.frontier import Point

    tuning = spec.tuning
    if tuning is None:
        raise ValueError("the spec has no tuning section: nothing to tune")
    panel = next(p for p in spec.panels if p.name == tuning.panel)
    active_overrides = dict(spec.active_overrides).get(tuning.active, ())
    trials = []
    for family in spec.families:
        assert family.tune is not None  # parse_spec: every family has a knob with a tuning
        point = Point(panel, family, tuning.active, tuning.seed, active_overrides)
        for lr in tuning.lr:
            for value in family.tune.values:
                tuned = ("--model.optim.lr", f"{lr:g}", family.tune.option, str(value))
                name = f"{family.name}-lr{lr:g}-{_knob_name(family.tune.option)}{value}"
                trials.append(Trial(family, name, tuned, tuple(point.overrides([*tuned, *extra]))))
    return trials


def header(spec: Spec) -> str:
    """The heading of ``sweep.md``: what was tuned, how, and how the winner is chosen."""
    from experiments.frontier import preregistration

    tuning = spec.tuning
    assert tuning is not None
    lines = [
        f"# Tuning of the families (held-out seed {tuning.seed}; reported seeds "
        f"{list(spec.seeds)})",
        "",
        "Every trial of `train.py frontier --stage tune`, in the order they finished (raw "
        "records: `trials.jsonl`). The rule, as pre-registered in the spec's report:",
        "",
    ]
    rule = [line for line in preregistration(spec) if line.startswith("**Tuning**")]
    return "\n".join(lines + rule)


def diverged_trial(trial: Trial, seed: int, stop: str, wall_s: float) -> dict[str, Any]:
    """The record of a trial that stopped on a non-finite loss (it has no summary)."""
    return {
        "name": trial.name,
        "family": trial.family.name,
        "config": str(trial.family.config),
        "overrides": list(trial.overrides),
        "tuned": list(trial.tuned),
        "seed": seed,
        "gate": "?",
        "val_loss": None,
        "diverged": stop,
        "wall_s": wall_s,
    }


def tune_main(spec: Spec, extra: list[str], *, jobs: int = 1, threads: int | None = None) -> None:
    """Runs every trial of the spec's tuning not yet recorded, ``jobs`` side by side, then
    rebuilds ``sweep.md`` and prints each family's winner so far.

    Raises:
        ValueError: Before any trial runs, for a spec without tuning, or a trial recorded
            with other arguments than the plan's.
        RuntimeError: After every trial was tried, naming the trials that failed (other than
            by diverging).
    """
    from experiments.frontier import nonfinite_stop

    tuning = spec.tuning
    trials = plan(spec, extra)
    results = tuning.results if tuning is not None else None
    assert tuning is not None and results is not None
    results.mkdir(parents=True, exist_ok=True)
    recorded = {t["name"]: t for t in tune_sweep.load_trials(results)}
    stale = [
        trial.name
        for trial in trials
        if trial.name in recorded and recorded[trial.name]["overrides"] != list(trial.overrides)
    ]
    if stale:
        raise ValueError(
            f"{results}/{tune_sweep.TRIALS_FILE} records trials {stale} with other arguments "
            "than this spec and command give them: use another tuning.results, or delete them"
        )
    todo = [t for t in trials if t.name not in recorded]
    for trial in todo:  # a knob or value the config refuses stops the tuning before any trial
        config = effective_config(
            trial.family.config, tuning.seed, tuning.out / trial.name, list(trial.overrides)
        )
        try:
            ModelConfig(**config["model"]["model"])  # the gate's own checks of its options
        except ValueError as error:
            raise ValueError(f"tuning trial {trial.name}: {error}") from None
    lock = threading.Lock()
    print(f"[{TAG}] {len(trials) - len(todo)} of {len(trials)} trials recorded already", flush=True)

    def run(indexed: tuple[int, Trial]) -> None:
        index, trial = indexed
        label = f"{trial.name} ({index}/{len(todo)})"
        print(f"[{TAG}] {label} -> {tuning.out / trial.name}", flush=True)
        began = time.perf_counter()
        try:
            record = tune_sweep.run_trial(
                trial.name,
                str(trial.family.config),
                tuning.seed,
                list(trial.overrides),
                tuning.out,
                threads=threads,
            )
        except RuntimeError:
            stop = nonfinite_stop(tuning.out / trial.name)
            if stop is None:
                raise
            record = diverged_trial(trial, tuning.seed, stop, time.perf_counter() - began)
        else:
            record.update(family=trial.family.name, tuned=list(trial.tuned), quick=False)
            if spec.divergence is not None:
                curve = [{"step": s, "loss": v} for s, v in record["train_curve"]]
                record["diverged"] = spec.divergence.reason(curve, record["val_loss"])
        with lock:
            with (results / tune_sweep.TRIALS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
        loss = "diverged" if record.get("diverged") else f"val loss {record['val_loss']:.4f}"
        print(f"[{TAG}] {label}: {loss}, {record['wall_s']:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run, item) for item in enumerate(todo, start=1)]
    failures = [
        f"{trial.name}: {future.exception()}"
        for trial, future in zip(todo, futures, strict=True)
        if future.exception() is not None
    ]
    all_trials = tune_sweep.load_trials(results)
    (results / tune_sweep.TABLE_FILE).write_text(tune_sweep.table(all_trials, header(spec)))
    best = winners(spec, extra, required=False)
    for family in spec.families:
        chosen = best.get(family.name)
        print(
            f"[{TAG}] {family.name}: "
            + (f"{chosen['name']} ({chosen['val_loss']:.4f})" if chosen else "no winner yet"),
            flush=True,
        )
    print(f"[{TAG}] wrote {results}/{tune_sweep.TABLE_FILE}", flush=True)
    if failures:
        raise RuntimeError(f"{len(failures)} tuning trial(s) failed: " + " | ".join(failures))


def winners(spec: Spec, extra: list[str], *, required: bool = True) -> dict[str, dict]:
    """Each family's winning trial record (lowest validation loss of its trials that did not
    diverge; a tie: the earlier in ``plan``'s order).

    Args:
        spec: The spec.
        extra: The command's extra arguments (the trials were run with them).
        required: Raise if a family's trials are not all recorded (else leave it out).

    Raises:
        ValueError: With ``required``, naming the trials not recorded yet (or recorded with
            other arguments), or a family whose every trial diverged.
    """
    trials = plan(spec, extra)
    assert spec.tuning is not None
    recorded = {t["name"]: t for t in tune_sweep.load_trials(spec.tuning.results)}
    missing = [
        t.name
        for t in trials
        if t.name not in recorded or recorded[t.name]["overrides"] != list(t.overrides)
    ]
    if missing and required:
        raise ValueError(
            f"the tuning of {len(missing)} trial(s) is not recorded in "
            f"{spec.tuning.results} with these arguments (run `train.py frontier --spec ... "
            f"--stage tune` with the same extra arguments first): {missing}"
        )
    best: dict[str, dict] = {}
    for family in spec.families:
        mine = [recorded.get(t.name) for t in trials if t.family.name == family.name]
        if any(r is None or r["name"] in missing for r in mine):
            continue
        valid = [r for r in mine if r is not None and not r.get("diverged")]
        if not valid:
            if required:
                raise ValueError(f"every tuning trial of {family.name} diverged: no winner")
            continue
        best[family.name] = min(valid, key=lambda r: r["val_loss"])  # min keeps the first
    return best


def apply_tuning(spec: Spec, extra: list[str], *, required: bool = True) -> tuple[Spec, list[str]]:
    """The spec with each family's winning learning rate and knob value added to its runs.

    Args:
        spec: A spec with a tuning section.
        extra: The command's extra arguments.
        required: Raise if the tuning is not finished (else leave the unfinished families as
            configured, with a note).

    Returns:
        The tuned spec and the report's notes on what was chosen.

    Raises:
        ValueError: See ``winners``.
    """
    best = winners(spec, extra, required=required)
    families = []
    notes = []
    for family in spec.families:
        record = best.get(family.name)
        if record is None:
            families.append(family)
            continue
        families.append(
            dataclasses.replace(family, overrides=(*family.overrides, *record["tuned"]))
        )
        notes.append(
            f"tuned {family.name}: {' '.join(record['tuned'])} (trial {record['name']}, "
            f"val loss {record['val_loss']:.4f} on seed {record['seed']})"
        )
    if len(best) < len(spec.families):
        notes.append(
            "not tuned yet (no winning trial recorded): "
            + ", ".join(f.name for f in spec.families if f.name not in best)
            + " as configured"
        )
    return dataclasses.replace(spec, families=tuple(families)), notes
