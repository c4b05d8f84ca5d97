"""Shared timing helpers for the benchmark scripts: medians of wall-clock times, measured
round-robin so that load changes on a shared machine hit every contender alike."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def median_ms(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn) for _ in range(repeats))


def round_robin_ms(
    contenders: dict[str, tuple[Callable[[], object], int]], *, warmup: int = 1
) -> dict[str, float]:
    """Median milliseconds of each contender, timed in interleaved rounds.

    Round r times every contender whose repeat count exceeds r, one call each, in turn; slow
    contenders (the reference methods) ask for fewer repeats and drop out of later rounds.

    Args:
        contenders: ``name -> (fn, repeats)``.
        warmup: Untimed calls of each contender first.

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
                times[name].append(_timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def machine_load() -> str:
    """``uptime``'s line (load averages over 1, 5, 15 minutes) and the core count."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        line = "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{line.strip()} ({os.cpu_count()} cores)"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(stem: Path, markdown: str, payload: dict) -> None:
    """Write <stem>.md and <stem>.json."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown + "\n")
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
