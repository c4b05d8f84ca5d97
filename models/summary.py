"""Run summary: training throughput, the loss curves and per-layer load balance.

``RunSummary`` (a Lightning callback the model always installs) writes ``summary.json`` next to
the run's logs after every validation and at the end of training, prints the final table of
validation loss and per-layer load balance, and at the end of ``fit`` writes the validation
load heatmap (``load_balance.png`` / ``.md`` / ``.json``, as ``train.py compare`` draws it).
``experiments.compare`` and ``experiments.frontier`` read these files.
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

from moe_router.report import UNSELECTED_MASS_NOTE, load_balance_table, write_load_balance_report

SUMMARY_FILE = "summary.json"
HEATMAP_STEM = "load_balance"

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


def _as_dict(value: Any) -> dict[str, Any]:

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value)


def format_table(summary: dict[str, Any]) -> str:
    """The final table: validation loss, perplexity, throughput and per-layer load balance.

    Args:
        summary: A run summary as written to ``summary.json``.

    Returns:
        A headline, the per-layer table of ``moe_router.report.load_balance_table`` (metrics
        over the whole validation pass), each layer's load share per expert and, after
        ``fit``, each layer's balance over the training batches since the previous validation.
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
        lines.append(UNSELECTED_MASS_NOTE)
        lines.append("")
        lines.append("Load per expert (% of the layer's assignments):")
        for name, values in layers.items():
            counts = values["tokens_per_expert"]
            total = sum(counts) or 1.0
            lines.append(f"  {name}: " + " ".join(f"{100 * c / total:4.1f}" for c in counts))
    train_layers = final.get("train_layers") or {}
    if train_layers:
        lines.append("")
        lines.append(
            "Training batches since the previous validation (batch-level gates act here; "
            "validation routes each token on its own):"
        )
        for name, values in train_layers.items():
            lines.append(
                f"  {name}: {values['batches']} batches, MaxVio (batch mean) "
                f"{values['max_vio_batch_mean']:.3f}, MaxVio (over them) "
                f"{values['max_vio_global']:.3f}, active experts/token "
                f"{values['active_experts_per_token']:.3f}"
            )
    return "\n".join(lines)


class RunSummary(L.Callback):
    """Measures throughput, records the loss curves, writes ``summary.json``, prints the table.

    Throughput counts training tokens (all ranks) per second of training time, validation
    excluded, from the ``WARMUP_BATCHES``-th batch of the run on. The training curve holds
    the mean LM loss (rank 0's micro-batches) over each ``trainer.log_every_n_steps`` steps,
    summed on the device and read once per interval.

    Attributes:
        path: The ``summary.json`` last written (None before the first write).
        heatmap_path: The load heatmap written at the end of ``fit`` (None before).
    """

    def __init__(self) -> None:
        self.curve: list[dict[str, float]] = []
        self.train_curve: list[dict[str, float]] = []
        self._loss_sum = None
        self._loss_count = 0
        self._train_curve_step = -1
        self.path: Path | None = None
        self.heatmap_path: Path | None = None
        self._heatmap_step: int | None = None
        self._batches = 0
        self._tokens = 0
        self._start: float | None = None
        self._val_start: float | None = None
        self._val_seconds = 0.0
        self.tokens_per_s: float | None = None
        self._fit_done = False

    def state_dict(self) -> dict[str, Any]:
        """The loss curves, so that a resumed run keeps them."""
        return {"curve": self.curve, "train_curve": self.train_curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the loss curves from a checkpoint."""
        self.curve = list(state_dict.get("curve", []))
        self.train_curve = list(state_dict.get("train_curve", []))

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

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed run's curve continues after the step it resumed at."""
        self._train_curve_step = trainer.global_step
        self._loss_sum, self._loss_count = None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Adds the micro-batch's LM loss; closes a training-curve point every log interval."""
        lm_loss = outputs.get("lm_loss") if isinstance(outputs, dict) else None
        if lm_loss is None:
            return
        lm_loss = lm_loss.detach().float()
        self._loss_sum = lm_loss if self._loss_sum is None else self._loss_sum + lm_loss
        self._loss_count += 1
        step = trainer.global_step
        every = max(1, trainer.log_every_n_steps)
        if step != self._train_curve_step and (step % every == 0 or step == trainer.max_steps):
            self._train_curve_step = step
            mean = float(self._loss_sum) / self._loss_count  # one host sync per interval
            self.train_curve.append({"step": step, "loss": mean})
            self._loss_sum, self._loss_count = None, 0

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
        step = trainer.global_step
        last = pl_module.last_val
        if trainer.state.fn == TrainerFn.VALIDATING and not self._fit_done and last is not None:
            step = last["step"]  # `validate --ckpt_path`: the checkpoint's step
        moe = config.moe
        moe = dict(moe) if isinstance(moe, dict) else _to_builtin(_as_dict(moe))
        return {
            "gate": config.gate,
            "moe": moe,
            "num_experts": config.num_experts,
            "k": config.k,
            "global_step": step,
            "max_steps": trainer.max_steps,
            "seed": getattr(datamodule, "seed", None),
            "tokens_per_s": self.tokens_per_s,
            "train_curve": self.train_curve,
            "val_curve": self.curve,
            "final_val": _to_builtin(last),
        }

    def _write(self, trainer, pl_module, *, finished: bool) -> None:
        # `trainer.log_dir` broadcasts from rank 0 under DDP: every rank must ask for it.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        summary = self.summary(trainer, pl_module)
        summary["finished"] = finished and trainer.global_step >= trainer.max_steps
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / SUMMARY_FILE
        self.path.write_text(json.dumps(summary, indent=1))
        last = pl_module.last_val
        if (
            summary["finished"]
            and last is not None
            and last["step"] == trainer.global_step
            and last["layers"]
            and self._heatmap_step != last["step"]
        ):
            report = write_load_balance_report(
                last["layers"],
                log_dir,
                title=f"Validation load balance, gate {summary['gate']}, step {last['step']}",
                stem=HEATMAP_STEM,
            )
            self.heatmap_path, self._heatmap_step = report.heatmap_path, last["step"]

    @rank_zero_only
    def _print(self, trainer, pl_module) -> None:
        print("\n" + format_table(self.summary(trainer, pl_module)) + "\n", flush=True)
