"""Run summary: training throughput, the validation-loss curve and per-layer load balance.

``RunSummary`` (a Lightning callback the model always installs) writes ``summary.json`` next to
the run's logs after every validation and at the end of training, and prints the final table
of validation loss and per-layer load balance. ``models.compare`` reads these files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from moe_router.report import load_balance_table

SUMMARY_FILE = "summary.json"

# Leading training batches left out of the throughput (allocator warm-up, lazy init).
WARMUP_BATCHES = 2


def _sync(module: L.LightningModule) -> None:
    # Timing boundaries only (a few per run), never per step.
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def _to_builtin(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.ndim else float(value)
    if isinstance(value, dict):
        return {key: _to_builtin(item) for key, item in value.items()}
    return value


def format_table(summary: dict[str, Any]) -> str:
    """The final table: validation loss, perplexity, throughput and per-layer load balance.

    Args:
        summary: A run summary as written to ``summary.json``.

    Returns:
        A headline, the per-layer table of ``moe_router.report.load_balance_table`` (metrics
        over the whole validation pass) and each layer's load share per expert.
    """
    final = summary.get("final_val") or {}
    loss = final.get("loss")
    headline = [f"gate {summary.get('gate', '?')}"]
    if loss is not None:
        headline.append(f"validation loss {loss:.4f} (perplexity {math.exp(loss):.3f})")
    headline.append(f"step {final.get('step', '?')}")
    if summary.get("tokens_per_s"):
        headline.append(f"{summary['tokens_per_s']:.0f} training tokens/s")
    lines = [", ".join(headline), ""]
    layers = final.get("layers") or {}
    if layers:
        lines.append(load_balance_table(layers).rstrip())
        lines.append("")
        lines.append("Load per expert (% of the layer's assignments):")
        for name, values in layers.items():
            counts = values["tokens_per_expert"]
            total = sum(counts) or 1.0
            lines.append(f"  {name}: " + " ".join(f"{100 * c / total:4.1f}" for c in counts))
    return "\n".join(lines)


class RunSummary(L.Callback):
    """Measures throughput, records validation passes, writes ``summary.json``, prints the table.

    Throughput counts training tokens (all ranks) per second of training time, validation
    excluded, from the ``WARMUP_BATCHES``-th batch of the run on.
    """

    def __init__(self) -> None:
        self.curve: list[dict[str, float]] = []
        self._batches = 0
        self._tokens = 0
        self._start: float | None = None
        self._val_start: float | None = None
        self._val_seconds = 0.0
        self.tokens_per_s: float | None = None
        self._fit_done = False

    def state_dict(self) -> dict[str, Any]:
        """The validation curve, so that a resumed run keeps it."""
        return {"curve": self.curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the validation curve from a checkpoint."""
        self.curve = list(state_dict.get("curve", []))

    # ----------------------------------------------------------------------------- throughput

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Starts the clock after the warm-up batches; counts tokens."""
        self._batches += 1
        if self._batches == WARMUP_BATCHES + 1:
            _sync(pl_module)
            self._start = time.perf_counter()
            self._val_seconds = 0.0
        if self._start is not None:
            self._tokens += batch[:, 1:].numel() * trainer.world_size

    def on_validation_start(self, trainer, pl_module) -> None:
        """Pauses the throughput clock during validation in fit."""
        if trainer.state.fn == TrainerFn.FITTING:
            _sync(pl_module)
            self._val_start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        """Training tokens per second, validation time excluded."""
        if self._start is not None:
            _sync(pl_module)
            seconds = time.perf_counter() - self._start - self._val_seconds
            self.tokens_per_s = self._tokens / seconds if seconds > 0 else None

    # ----------------------------------------------------------------------------- validation

    def on_validation_end(self, trainer, pl_module) -> None:
        """Extends the curve, writes the summary (prints it in validate)."""
        if self._val_start is not None:
            self._val_seconds += time.perf_counter() - self._val_start
            self._val_start = None
        if trainer.sanity_checking or pl_module.last_val is None:
            return
        if trainer.state.fn == TrainerFn.FITTING or self._fit_done:
            point = {"step": pl_module.last_val["step"], "loss": pl_module.last_val["loss"]}
            if not self.curve or self.curve[-1]["step"] != point["step"]:
                self.curve.append(point)
        self._write(trainer, pl_module, finished=self._fit_done)
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._print(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Writes the final summary and prints the table if it is current."""
        # A validation pass right after fit (the CLI's, at the last step) still extends the curve.
        self._fit_done = True
        self._write(trainer, pl_module, finished=True)
        last = pl_module.last_val
        if last is not None and last["step"] == trainer.global_step:
            self._print(trainer, pl_module)

    # ---------------------------------------------------------------------------------- output

    def summary(self, trainer, pl_module) -> dict[str, Any]:
        """The run summary as plain Python values."""
        config = pl_module.model_config
        datamodule = trainer.datamodule
        return {
            "gate": config.gate,
            "moe": dataclasses.asdict(config.moe),
            "num_experts": config.num_experts,
            "k": config.k,
            "global_step": trainer.global_step,
            "max_steps": trainer.max_steps,
            "seed": getattr(datamodule, "seed", None),
            "tokens_per_s": self.tokens_per_s,
            "val_curve": self.curve,
            "final_val": _to_builtin(pl_module.last_val),
        }

    def _write(self, trainer, pl_module, *, finished: bool) -> None:
        # `trainer.log_dir` broadcasts from rank 0 under DDP: every rank must ask for it.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        summary = self.summary(trainer, pl_module)
        summary["finished"] = finished and trainer.global_step >= trainer.max_steps
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))

    @rank_zero_only
    def _print(self, trainer, pl_module) -> None:
        print("\n" + format_table(self.summary(trainer, pl_module)) + "\n", flush=True)
