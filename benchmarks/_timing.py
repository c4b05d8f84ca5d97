"""Shared timing helpers for the benchmark scripts: medians, measured round-robin so that load
changes on a shared machine hit every contender alike.

Two clocks: ``wall`` (``time.perf_counter``) and ``cpu`` (``time.process_time``, user + system
time of this process). With one thread on a loaded machine the CPU clock leaves out the time
the process spends descheduled, which the wall clock charges to whichever contender was
running; page faults and memory stalls still count. With several threads the CPU clock sums
them, so it is only meaningful at one thread."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def default_clock(threads: int) -> str:
    """``cpu`` at one thread (robust to other jobs), ``wall`` otherwise."""
    return "cpu" if threads == 1 else "wall"


def add_clock_argument(parser: argparse.ArgumentParser) -> None:
    """``--clock {cpu,wall}``, resolved by :func:`default_clock` when left off."""
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="process CPU time (default at 1 thread: robust to other jobs) or wall time",
    )


def timed_ms(fn: Callable[[], object], clock: str = "wall") -> float:
    """Milliseconds of one fn() call on the given clock (synchronising CUDA around it)."""
    now = CLOCKS[clock]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = now()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (now() - start) * 1e3


def median_ms(
    fn: Callable[[], object], *, repeats: int, warmup: int = 2, clock: str = "wall"
) -> float:
    """Median time of fn() in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_ms(fn, clock) for _ in range(repeats))


def round_robin_ms(
    contenders: dict[str, tuple[Callable[[], object], int]],
    *,
    warmup: int = 1,
    clock: str = "wall",
) -> dict[str, float]:
    """Median milliseconds of each contender, timed in interleaved rounds.

    Round r times every contender whose repeat count exceeds r, one call each, in turn; slow
    contenders (the reference methods) ask for fewer repeats and drop out of later rounds.

    Args:
        contenders: ``name -> (fn, repeats)``.
        warmup: Untimed calls of each contender first.
        clock: ``wall`` or ``cpu`` (see the module docstring).

    Returns:
        ``name -> median ms``.
    """
    for fn, _ in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(max(repeats for _, repeats in contenders.values())):
        for name, (fn, repeats) in contenders.items():
            if round_index < repeats:
                times[name].append(timed_ms(fn, clock))
    return {name: statistics.median(values) for name, values in times.items()}


def machine_load() -> str:
    """``uptime``'s line (load averages over 1, 5, 15 minutes) and the core count."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        line = "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{line.strip()} ({os.cpu_count()} cores)"


# A 1-minute load average below this before a run: nothing else was running (the benchmark's
# own thread adds about 1 once it runs).
QUIET_LOAD = 0.5


def load_verdict(load_before: str) -> str:
    """What the load line measured before a run says about the figures, for the report.

    Args:
        load_before: :func:`machine_load`'s line taken before the run.
    """
    try:
        one_minute = float(load_before.split("load average:")[1].split(",")[0])
    except (IndexError, ValueError):
        return "Machine load unknown: read ratios between rows of one table, not absolute times."
    if one_minute < QUIET_LOAD:
        return (
            f"**A quiet machine** (1-minute load {one_minute:.2f} before the run, no other jobs): "
            "absolute times are meaningful for this machine; ratios between rows most of all."
        )
    return (
        f"**A shared, loaded machine** (1-minute load {one_minute:.2f} before the run: other "
        "jobs running): ratios between rows of one table are meaningful, absolute times are "
        "not quiet-machine figures."
    )


# glibc's allocator settings that decide whether large tensors are fresh, page-faulted memory.
MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
)


def malloc_settings() -> dict[str, str]:
    """The glibc malloc environment variables this process runs with (empty: the defaults)."""
    return {name: os.environ[name] for name in MALLOC_ENV if name in os.environ}


def malloc_note(settings: dict[str, str]) -> str:
    """One line for a report on what the allocator settings mean for the figures."""
    if not settings:
        return (
            "glibc malloc defaults: an allocation above its mmap threshold (adaptive, at most "
            "32 MiB) is mapped fresh and page-faulted on first touch on every call, so the "
            "paths with tensors of 32 MiB or more pay for page faults, and how much varies "
            "with the allocator's history."
        )
    pairs = ", ".join(f"`{name}={value}`" for name, value in settings.items())
    return f"glibc malloc settings: {pairs} (large tensors reuse heap memory)."


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(stem: Path, markdown: str, payload: dict) -> None:
    """Write <stem>.md and <stem>.json."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown + "\n")
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
