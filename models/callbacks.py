"""Callbacks of a training run: nothing goes wrong silently, and the run says where it stands.

- ``NonFiniteGuard``: a non-finite loss or gradient stops training before the optimizer step
  (or skips that step), so the weights never take a NaN.
- ``CheckpointOnSignal``: SIGINT / SIGTERM finish the current optimizer step, save
  ``last.ckpt`` and stop, so an interrupted run loses no step.
- ``StepProgressBar``: the Rich bar counts optimizer steps of ``trainer.max_steps``.
- ``TextProgress``: a line every tenth of the run when there is no progress bar (logs, compare).
- ``RoutingLogger``: per MoE layer tau, expert bias and load share per expert, over time.
- ``MoEModelSummary``: parameter counts with the MoE-aware active parameters per token.

``MoELanguageModel.configure_callbacks`` installs the guard, the signal handler and the routing
logger unless the trainer already has one of them (a YAML config can add its own to change
their settings); ``models.cli.MoECLI`` picks the progress display and the summary.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

NONFINITE_ACTIONS = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient and was stopped before the optimizer step."""


def _human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f}"


# ------------------------------------------------------------------------------ non-finite


class NonFiniteGuard(L.Callback):
    """Checks every optimizer step for a non-finite loss or gradient, before the step is taken.

    The losses of the step's micro-batches and the infinity norms of the gradients are reduced
    on the device; one scalar pair is then read on the host per optimizer step (the same single
    sync per step that ``torch.amp.GradScaler`` makes to skip steps). The decision is reduced
    over data-parallel ranks, so every rank stops or skips together. Under fp16 with a gradient
    scaler only the loss is checked (the scaler owns overflowing gradients).

    Args:
        action: ``"stop"`` raises ``NonFiniteLossError`` (the weights stay the last finite ones);
            ``"skip"`` drops the step's gradients so the optimizer leaves the weights and its
            state unchanged (the learning-rate schedule and the routers' step still advance),
            with a warning naming the step.
        max_skipped_in_a_row: With ``"skip"``, stop anyway after this many consecutive skipped
            steps (a model that only produces NaN must not train on silently).

    Raises:
        ValueError: For an unknown ``action`` or ``max_skipped_in_a_row`` < 1.
    """

    def __init__(self, action: str = "stop", max_skipped_in_a_row: int = 10) -> None:
        if action not in NONFINITE_ACTIONS:
            raise ValueError(f"action={action!r} is not allowed: use one of {NONFINITE_ACTIONS}")
        if isinstance(max_skipped_in_a_row, bool) or max_skipped_in_a_row < 1:
            raise ValueError(f"max_skipped_in_a_row={max_skipped_in_a_row!r} must be an int >= 1")
        self.action = action
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self.skipped_steps: list[int] = []
        self._in_a_row = 0
        self._loss_bad: Tensor | None = None
        self._loss_value: Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        """Accumulates, on the device, whether a micro-batch loss of this step is non-finite."""
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        if self._loss_bad is None:
            self._loss_bad, self._loss_value = bad, loss
        else:
            self._loss_bad = self._loss_bad | bad
            self._loss_value = torch.where(bad, loss, self._loss_value)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Stops or skips the step if its loss or a gradient is non-finite."""
        device = pl_module.device
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=bool)
        loss_value = self._loss_value if self._loss_value is not None else torch.zeros(())
        self._loss_bad = self._loss_value = None
        grads = [
            param.grad
            for group in optimizer.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            # The infinity norm is finite for every finite tensor (no overflow) and NaN / inf
            # otherwise.
            norms = torch._foreach_norm(grads, math.inf)
            grad_bad = ~torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()
        flags = torch.stack(
            [loss_bad.to(device).float(), grad_bad.float(), loss_value.to(device).float()]
        ).cpu()  # the one host sync per optimizer step
        local_bad = bool(flags[0]) or bool(flags[1])
        if not trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            self._in_a_row = 0
            return
        step = trainer.global_step + 1
        if not local_bad:
            what = "a non-finite loss or gradient on another rank"
        elif bool(flags[0]):
            what = f"the loss is {float(flags[2])}"
        else:
            what = "a gradient is not finite (the loss is finite)"
        self._in_a_row += 1
        if self.action == "skip" and self._in_a_row <= self.max_skipped_in_a_row:
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without grad alone
            self.skipped_steps.append(step)
            rank_zero_warn(f"optimizer step {step} skipped: {what}")
            return
        if self.action == "skip":
            raise NonFiniteLossError(
                f"optimizer step {step}: {what}, and the {self.max_skipped_in_a_row} steps before "
                "it were skipped for the same reason; training stopped (weights are the last "
                "finite ones)"
            )
        optim = getattr(pl_module, "optim_config", None)
        lr = f" (now {optim.lr:g})" if getattr(optim, "lr", None) is not None else ""
        raise NonFiniteLossError(
            f"optimizer step {step}: {what}: training diverged and stopped before this step, so "
            f"the weights are the last finite ones; lower --model.optim.lr{lr}, or set "
            "NonFiniteGuard action: skip in trainer.callbacks to skip such steps"
        )


def check_checkpoint_finite(checkpoint: dict[str, Any], source: str) -> None:
    """Refuses a checkpoint whose weights or optimizer state hold non-finite values.

    Also refuses a negative Adam second moment (``exp_avg_sq``), which no real run produces
    and which turns into NaN at the next step.

    Args:
        checkpoint: The loaded checkpoint dictionary.
        source: Where it came from (for the message).

    Raises:
        ValueError: Naming the first bad tensor.
    """

    def check(name: str, value: Any) -> None:
        if not isinstance(value, Tensor) or not value.is_floating_point():
            return
        if not torch.isfinite(value).all():
            raise ValueError(
                f"checkpoint {source} is corrupted: {name} holds non-finite values "
                f"({int((~torch.isfinite(value)).sum())} of {value.numel()})"
            )
        if name.endswith("exp_avg_sq") and (value < 0).any():
            raise ValueError(
                f"checkpoint {source} is corrupted: {name} (an Adam second moment) holds "
                f"{int((value < 0).sum())} negative values"
            )

    for name, value in checkpoint.get("state_dict", {}).items():
        check(f"state_dict[{name!r}]", value)
    for index, optimizer_state in enumerate(checkpoint.get("optimizer_states", [])):
        for param_id, state in optimizer_state.get("state", {}).items():
            for key, value in state.items():
                check(f"optimizer_states[{index}] parameter {param_id} {key}", value)


# ------------------------------------------------------------------------------- signals


class CheckpointOnSignal(L.Callback):
    """SIGINT or SIGTERM during ``fit``: finish the optimizer step, save ``last.ckpt``, stop.

    The checkpoint goes where the (first) ``ModelCheckpoint`` writes, else to
    ``<log dir>/checkpoints``; resuming from it continues exactly where the run stopped (the
    data order restarts at the saved step). A second signal stops at once, without saving.
    Under data parallelism the ranks agree on the step to stop at (one small all-reduce per
    optimizer step, only when there are several ranks).

    Attributes:
        received: The signal number this rank received, or None.
        checkpoint_path: Where the checkpoint was saved when a signal stopped the run (on
            every rank, also those that did not receive it), or None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.checkpoint_path: Path | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\nReceived {signal.Signals(signum).name}: saving a checkpoint after the current "
            "optimizer step (send it again to stop at once, without saving)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        """Installs the handlers (after Lightning's own, which they replace during training)."""
        self.received, self.checkpoint_path = None, None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def on_train_end(self, trainer, pl_module) -> None:
        """Gives the signals back to their previous handlers."""
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Gives the signals back to their previous handlers."""
        self._restore()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Remembers the step, to tell a completed optimizer step from an accumulating batch."""
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """At the end of an optimizer step: saves and stops if a signal came."""
        if trainer.global_step != self._step_at_batch_start:
            self._save_and_stop_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """A signal during a validation pass of fit is served right after it."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save_and_stop_if_signalled(trainer)

    def _save_and_stop_if_signalled(self, trainer) -> None:
        signalled = self.received is not None
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled or self.checkpoint_path is not None:
            return
        path = self.checkpoint_path_for(trainer)
        if trainer.is_global_zero and path.is_symlink():
            path.unlink()  # `save_last: link` points at an older step's file: do not overwrite it
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        self.checkpoint_path = path
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        rank_zero_info(
            f"{name}: saved {path} at step {trainer.global_step}/{trainer.max_steps}; "
            f"resume with --ckpt_path {path}"
        )

    @staticmethod
    def checkpoint_path_for(trainer) -> Path:
        """``last.ckpt`` in the first ``ModelCheckpoint``'s folder, else under the log dir."""
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            name = f"{callback.CHECKPOINT_NAME_LAST or 'last'}{callback.FILE_EXTENSION}"
            return Path(callback.dirpath) / name
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------------ progress


class StepProgressBar(RichProgressBar):
    """Rich progress bar counting optimizer steps of ``trainer.max_steps`` (the training
    stream is endless, so epochs mean nothing); no ``v_num``."""

    @property
    def total_train_batches(self) -> int | float:
        """The bar's total: ``max_steps`` optimizer steps."""
        max_steps = self.trainer.max_steps
        return max_steps if max_steps is not None and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        description = "Training steps"
        return f"{description:{max(len(description), len(self.validation_description))}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Shows the optimizer step reached (not the micro-batch index)."""
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a run resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        """The logged progress-bar metrics, without the logger version ``v_num``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class TextProgress(L.Callback):
    """Prints ``[progress] step s/max ...`` lines: every ``1 / num_updates`` of the run and
    after each validation pass. For runs without a progress bar (logs, ``train.py compare``).

    Args:
        num_updates: Lines over the run (besides the validation lines).
    """

    PREFIX = "[progress]"

    def __init__(self, num_updates: int = 10) -> None:
        if isinstance(num_updates, bool) or num_updates < 1:
            raise ValueError(f"num_updates={num_updates!r} must be an int >= 1")
        self.num_updates = num_updates
        self._start: float | None = None
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        """Starts the clock."""
        self._start = time.perf_counter()
        self._last_step = trainer.global_step

    def _line(self, trainer, text: str) -> None:
        if trainer.is_global_zero:
            elapsed = time.perf_counter() - (self._start or time.perf_counter())
            print(
                f"{self.PREFIX} step {trainer.global_step}/{trainer.max_steps}, {text}, "
                f"{elapsed:.0f} s",
                flush=True,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """A line every ``max_steps / num_updates`` optimizer steps (one host sync each)."""
        step = trainer.global_step
        every = max(1, trainer.max_steps // self.num_updates) if trainer.max_steps > 0 else 100
        if step == self._last_step or (step % every and step != trainer.max_steps):
            return
        self._last_step = step
        lm_loss = outputs.get("lm_loss") if isinstance(outputs, dict) else None
        self._line(trainer, "training loss " + ("n/a" if lm_loss is None else f"{lm_loss:.4f}"))

    def on_validation_end(self, trainer, pl_module) -> None:
        """A line with the validation loss of a pass during fit."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        last = getattr(pl_module, "last_val", None) or {}
        loss = last.get("loss")
        self._line(trainer, "validation loss " + ("n/a" if loss is None else f"{loss:.4f}"))


# -------------------------------------------------------------------------------- routing


def routing_tags(layer: str) -> dict[str, str]:
    """TensorBoard tag prefixes of one layer's routing logs (``RoutingLogger``)."""
    return {
        "tau": f"routing/{layer}/tau",
        "budget": f"routing/{layer}/budget",
        "bias": f"routing/{layer}/expert_bias/",
        "load": f"routing/{layer}/load_share/",
    }


class RoutingLogger(L.Callback):
    """Routing state over training, every ``trainer.log_every_n_steps`` optimizer steps.

    Per MoE layer: tau of a soft gate (every logger), and, in TensorBoard, the expert bias of
    each expert and each expert's share of the layer's assignments since the previous log
    (``routing/<layer>/expert_bias/e<i>``, ``routing/<layer>/load_share/e<i>``), with a
    Custom Scalars layout that draws all experts of a layer in one chart. Per-expert values go
    to TensorBoard only (E columns per layer would swamp the CSV). Loads are rank 0's.

    Reads ``interval_loads_LE`` of the module (assignments per layer and expert since the last
    log) and zeroes it; one device-to-host copy per log.
    """

    def __init__(self) -> None:
        self._last_step = -1

    @staticmethod
    def _tensorboards(trainer) -> list[TensorBoardLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def on_train_start(self, trainer, pl_module) -> None:
        """Writes the Custom Scalars layout (one multi-line chart per layer and quantity)."""
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        layout = {}
        for name in pl_module.moe_layer_names:
            tags = routing_tags(name)
            layout[f"routing {name}"] = {
                "load share per expert": ["Multiline", [tags["load"] + r"e\d+"]],
                "expert bias per expert": ["Multiline", [tags["bias"] + r"e\d+"]],
            }
        for logger in self._tensorboards(trainer):
            logger.experiment.add_custom_scalars(layout)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Logs at every ``log_every_n_steps``-th optimizer step and at the last one."""
        step = trainer.global_step
        every = max(1, trainer.log_every_n_steps)
        if step == self._last_step or (step % every and step != trainer.max_steps):
            return
        self._last_step = step
        loads_LE = pl_module.interval_loads_LE
        shares_LE = loads_LE / loads_LE.sum(-1, keepdim=True).clamp_min(1.0)
        layers = pl_module.net.moe_layers
        num_experts = loads_LE.shape[-1]
        biases_LE = torch.stack(
            [
                layer.router.expert_bias.bias_E.float()
                if layer.router.expert_bias is not None
                else torch.zeros(num_experts, device=loads_LE.device)
                for layer in layers
            ]
        )
        taus_L = torch.stack(
            [
                torch.as_tensor(layer.router.tau, dtype=torch.float32).detach().cpu()
                for layer in layers
            ]
        )
        shares_LE, biases_LE = shares_LE.cpu(), biases_LE.cpu()
        pl_module.interval_loads_LE.zero_()
        if not trainer.is_global_zero:
            return
        scalars: dict[str, float] = {}
        for index, (name, layer) in enumerate(zip(pl_module.moe_layer_names, layers, strict=True)):
            if layer.router.config.gate != "topk":  # topk never reads tau
                scalars[routing_tags(name)["tau"]] = float(taus_L[index])
            if layer.router.config.target_active is not None:  # the budget controller's k'
                scalars[routing_tags(name)["budget"]] = float(layer.router.budget)
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=step)
        for logger in self._tensorboards(trainer):
            writer = logger.experiment
            for index, (name, layer) in enumerate(
                zip(pl_module.moe_layer_names, layers, strict=True)
            ):
                tags = routing_tags(name)
                for expert in range(num_experts):
                    writer.add_scalar(
                        f"{tags['load']}e{expert}", float(shares_LE[index, expert]), step
                    )
                    if layer.router.expert_bias is not None:
                        writer.add_scalar(
                            f"{tags['bias']}e{expert}", float(biases_LE[index, expert]), step
                        )


# -------------------------------------------------------------------------------- summary


def parameter_summary(pl_module) -> str:
    """Parameter counts with the MoE-aware active parameters per token.

    Active parameters count every parameter outside the experts plus, per MoE layer, the
    experts a token is dispatched to: ``k`` of ``E`` (``sparse_soft_topk`` may use up to its
    ``max_active`` slots, ``soft_topk_dense`` all E; the bound is shown when it differs).

    Args:
        pl_module: A ``MoELanguageModel``.

    Returns:
        One line.
    """
    params = list(pl_module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    expert = active_k = active_slots = 0
    layers = pl_module.net.moe_layers
    for layer in layers:
        layer_expert = sum(getattr(layer, name).numel() for name in ("w1_EDF", "w3_EDF", "w2_EFD"))
        config = layer.router.config
        expert += layer_expert
        active_k += layer_expert * config.k // config.num_experts
        active_slots += layer_expert * config.slots // config.num_experts
    dense = total - expert
    config = pl_module.model_config
    text = (
        f"Parameters: {_human(total)} ({_human(trainable)} trainable); "
        f"{len(layers)} MoE layers x {config.num_experts} experts hold {_human(expert)}; "
        f"active per token {_human(dense + active_k)} (everything outside the experts + "
        f"k={config.k} of {config.num_experts} experts per MoE layer)"
    )
    if active_slots != active_k:
        text += f", up to {_human(dense + active_slots)} with gate {config.gate}'s slots"
    return text


class MoEModelSummary(ModelSummary):
    """The model summary of ``fit``: total, trainable, expert and active parameters per token
    (Lightning's table reports FLOPs as 0 for this model and counts every expert as active)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        """Prints ``parameter_summary`` on rank 0."""
        if trainer.is_global_zero:
            print(parameter_summary(pl_module), flush=True)
