"""LightningModule: next-token loss + routing auxiliary losses, per-layer load-balance logging.

Shape legend: B batch, S sequence, V vocabulary, E experts, L block length (S + 1).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from models.config import ModelConfig, OptimConfig, config_differences
from models.transformer import MoETransformer
from moe_router.metrics import LoadBalanceMetrics, scalar_metrics
from moe_router.records import routings
from moe_router.routing import Routing
from moe_router.stepping import register_optimizer_hooks

# Scalars logged per layer at every training step; the full set is logged for validation.
TRAIN_STEP_KEYS = ("max_vio_batch_last", "load_cv", "router_entropy", "active_experts_per_token")
# Kept per layer at each validation over the training batches since the previous one.
TRAIN_TABLE_KEYS = ("max_vio_batch_mean", "max_vio_global", "active_experts_per_token")


# What a checkpoint must hold for this module, key -> what it is: to be evaluated (`validate`),
# and also to be resumed (`fit`).
CHECKPOINT_KEYS = {
    "pytorch-lightning_version": "the Lightning version that wrote it",
    "state_dict": "the weights and router state",
    "hyper_parameters": "the model and optimiser config it was made with",
    "global_step": "the step it was saved at",
}
RESUME_KEYS = {
    **CHECKPOINT_KEYS,
    "optimizer_states": "the AdamW state",
    "lr_schedulers": "the learning-rate schedule's position",
    "loops": "the training loop's progress",
}


def checkpoint_problem(checkpoint: Any, fitting: bool) -> str | None:
    """Why a loaded checkpoint cannot be evaluated (or, ``fitting``, resumed) by
    ``MoELanguageModel``, or None if it can.

    A checkpoint without ``hyper_parameters`` could not be checked against the run's config;
    one without the optimizer or loop state would resume from step 0 or with a fresh AdamW.

    Args:
        checkpoint: What ``torch.load`` returned.
        fitting: Whether it is to be resumed by ``fit`` (else evaluated by ``validate``).

    Returns:
        A phrase that follows the checkpoint's name (``"is ..."`` / ``"lacks ..."``), or None.
    """
    how = "resumed" if fitting else "evaluated"
    if not isinstance(checkpoint, dict):
        return f"holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict)"
    if checkpoint and all(isinstance(value, Tensor) for value in checkpoint.values()):
        return (
            f"is a bare state_dict ({len(checkpoint)} tensors such as {next(iter(checkpoint))!r}), "
            f"not a Lightning checkpoint, so it cannot be {how} (use a .ckpt written by "
            "train.py fit)"
        )
    needed = RESUME_KEYS if fitting else CHECKPOINT_KEYS
    missing = [f"{key!r} ({what})" for key, what in needed.items() if key not in checkpoint]
    hparams = checkpoint.get("hyper_parameters", {})
    groups = ("model", "optim") if fitting else ("model",)
    missing += [
        f"'hyper_parameters.{group}' (the {group} config it was made with)"
        for group in groups
        if "hyper_parameters" in checkpoint and not (isinstance(hparams, dict) and group in hparams)
    ]
    if missing:
        return (
            f"lacks {'; '.join(missing)}, so it cannot be {how} (use a .ckpt written by "
            "train.py fit)"
        )
    return None


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup from 0, then cosine decay to ``min_ratio``.

    Args:
        step: Optimizer steps taken so far.
        warmup_steps: Length of the warmup.
        total_steps: Step at which the decay reaches ``min_ratio``.
        min_ratio: Final multiplier.

    Returns:
        The multiplier in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MoELanguageModel(L.LightningModule):
    """Byte-level MoE language model trained with Lightning.

    The loss is next-token cross entropy plus the sum of every MoE layer's auxiliary losses
    (already scaled by their coefficients in the router). After each optimizer step every
    router steps itself (``moe_router.register_optimizer_hooks``, registered in
    ``configure_optimizers``): expert biases from the loads of that step's micro-batches
    (all-reduced over data-parallel ranks), temperature schedules, budget controllers and
    balance thresholds.

    Args:
        model: Transformer sizes and gate.
        optim: AdamW and learning-rate schedule.
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),  # noqa: B008 - read-only default, as in LightningCLI docs
        optim: OptimConfig = OptimConfig(),  # noqa: B008
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = model
        self.optim_config = optim
        self.net = MoETransformer(model)
        self.moe_layer_names = [f"layer{i}" for i in range(model.n_layers) if model.is_moe_block(i)]
        num_moe = len(self.moe_layer_names)
        self.train_balance = nn.ModuleList(
            LoadBalanceMetrics(model.num_experts) for _ in range(num_moe)
        )
        self.val_balance = nn.ModuleList(
            LoadBalanceMetrics(model.num_experts) for _ in range(num_moe)
        )
        # Loads since the last routing log (models.callbacks.RoutingLogger reads and zeroes it).
        self.register_buffer(
            "interval_loads_LE", torch.zeros(num_moe, model.num_experts), persistent=False
        )
        # global_step of the checkpoint last loaded: `validate --ckpt_path` labels its table
        # with it (the trainer's own step is 0 outside fit).
        self._loaded_step: int | None = None
        # Last validation pass, for the final table and the run summary.
        self.last_val: dict[str, Any] | None = None
        self._summary_callback = None
        self._default_callbacks: list[L.Callback] | None = None

    # -------------------------------------------------------------------------------- forward

    def forward(self, tokens_BS: Tensor) -> Tensor:
        """Logits, see ``MoETransformer.forward``."""
        return self.net(tokens_BS)

    def _loss(self, blocks_BL: Tensor) -> tuple[Tensor, list[Routing]]:
        """The LM loss of a batch and each MoE layer's routing record, in block order."""
        inputs_BS, targets_BS = blocks_BL[:, :-1], blocks_BL[:, 1:].long()
        logits_BSV = self.net(inputs_BS)
        # Cross entropy in fp32 even under bf16 autocast (F.cross_entropy autocasts to fp32).
        lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
        return lm_loss, list(routings(self.net).values())

    # ------------------------------------------------------------------------------- training

    def training_step(self, blocks_BL: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """Next-token loss + auxiliary losses of one micro-batch; logs per-layer metrics.

        Returns:
            ``loss`` (what is optimised) and ``lm_loss`` (detached; callbacks record it).
        """
        lm_loss, routings = self._loss(blocks_BL)
        batch_size = blocks_BL.shape[0]
        aux_total = lm_loss.new_zeros(())
        logs: dict[str, Tensor] = {"train/lm_loss": lm_loss}
        for index, (name, routing) in enumerate(zip(self.moe_layer_names, routings, strict=False)):
            aux_total = aux_total + routing.aux_loss
            for aux_name, value in routing.aux_losses.items():
                logs[f"train/{name}/aux_{aux_name}"] = value.detach()
            self.interval_loads_LE[index] += routing.tokens_per_expert_E.detach().float()
            batch_values = self.train_balance[index](routing)
            for key in TRAIN_STEP_KEYS:
                logs[f"train/{name}/{key}"] = batch_values[key]
        loss = lm_loss + aux_total
        logs["train/aux_loss"] = aux_total.detach()
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, batch_size=batch_size)
        self.log(
            "train/lm_loss_bar",
            lm_loss.detach(),
            prog_bar=True,
            logger=False,
            batch_size=batch_size,
        )
        return {"loss": loss, "lm_loss": lm_loss.detach()}

    def on_train_epoch_end(self) -> None:
        for metric in self.train_balance:
            metric.reset()

    # ----------------------------------------------------------------------------- validation

    def validation_step(self, blocks_BL: Tensor, batch_idx: int) -> None:
        """LM loss and load-balance state of one validation batch."""
        lm_loss, routings = self._loss(blocks_BL)
        batch_size = blocks_BL.shape[0]
        self.log("val/loss", lm_loss, batch_size=batch_size, prog_bar=True, sync_dist=True)
        for index, (name, routing) in enumerate(zip(self.moe_layer_names, routings, strict=False)):
            self.val_balance[index].update(routing)
            for aux_name, value in routing.aux_losses.items():
                self.log(f"val/{name}/aux_{aux_name}", value, batch_size=batch_size, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """Logs each layer's metrics over the whole validation pass and keeps them."""
        layers: dict[str, dict[str, Any]] = {}
        for name, metric in zip(self.moe_layer_names, self.val_balance, strict=False):
            values = metric.compute()
            # compute() already reduced over ranks: sync_dist averages equal values (and keeps
            # Lightning from warning once per key under DDP).
            self.log_dict(scalar_metrics(values, prefix=f"val/{name}/"), sync_dist=True)
            layers[name] = {key: value.detach().cpu() for key, value in values.items()}
            metric.reset()
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            self.log("val/perplexity", torch.exp(val_loss), sync_dist=True)
        step = self.global_step
        if self.trainer.state.fn != TrainerFn.FITTING and self._loaded_step is not None:
            step = self._loaded_step
        self.last_val = {
            "step": step,
            "loss": None if val_loss is None else float(val_loss),
            "layers": layers,
            "train_layers": self._train_balance_since_last_validation(),
        }

    def _train_balance_since_last_validation(self) -> dict[str, dict[str, Any]]:
        """Each layer's load balance over the training batches since the previous validation
        (empty outside fit), then starts the next interval. Training batches are where the
        batch-level gates (``balanced_soft_topk``'s per-batch thresholds) act; validation
        routes every token on its own."""
        if self.trainer.state.fn != TrainerFn.FITTING:
            return {}
        layers: dict[str, dict[str, Any]] = {}
        for name, metric in zip(self.moe_layer_names, self.train_balance, strict=False):
            if metric.num_batches > 0:  # this rank's count: every rank trains the same steps
                values = metric.compute()
                layers[name] = {key: values[key].detach().cpu() for key in TRAIN_TABLE_KEYS}
                layers[name]["batches"] = int(metric.num_batches)
            metric.reset()
        return layers

    # ---------------------------------------------------------------------------- checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a corrupted or incomplete checkpoint, or one whose config differs from this
        run's.

        ``fit`` compares the model and optimiser configs (the weights, the optimizer state and
        the schedule all come from the checkpoint, so a differing flag would be ignored
        silently); ``validate`` compares the model config. A checkpoint without the config
        (or another key of ``checkpoint_problem``) is refused, since it could not be compared.

        Raises:
            ValueError: Naming every differing field with both values, the missing keys, or the
                corrupted tensor.
        """
        from models.callbacks import check_checkpoint_finite

        trainer = self._trainer
        source = repr(str(trainer.ckpt_path)) if trainer is not None else "(in memory)"
        fitting = trainer is None or trainer.state.fn == TrainerFn.FITTING
        problem = checkpoint_problem(checkpoint, fitting)
        if problem is not None:
            raise ValueError(f"checkpoint {source} {problem}")
        hparams = checkpoint["hyper_parameters"]
        pairs = [("model", self.model_config)]
        if fitting:
            pairs.append(("optim", self.optim_config))
        differences = [
            f"{group}.{difference}"
            for group, given in pairs
            for difference in config_differences(hparams[group], given)
        ]
        if differences:
            raise ValueError(
                f"checkpoint {source} was made with another config: {'; '.join(differences)} "
                "(drop these flags to resume, or train from scratch without --ckpt_path)"
            )
        check_checkpoint_finite(checkpoint, source)
        self._loaded_step = checkpoint.get("global_step")

    # ------------------------------------------------------------------------------ optimizer

    def configure_optimizers(self):
        """AdamW (no decay for norms, biases and 1-d parameters) with warmup + cosine."""
        optim = self.optim_config
        decay, no_decay = [], []
        for param in self.parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
        )
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 0:
            total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, optim.warmup_steps, total_steps, optim.min_lr_ratio),
        )
        # The routers' per-step state advances after every optimizer step, as in a plain loop
        # (one hook: a previous fit's optimizer no longer steps them).
        if getattr(self, "_router_hook", None) is not None:
            self._router_hook.remove()
        self._router_hook = register_optimizer_hooks(optimizer, self.net)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_callbacks(self):
        """The run summary (throughput, validation curve, final table) is always on; so are
        ``models.callbacks``' non-finite guard, checkpoint on SIGINT / SIGTERM and routing logs,
        unless the trainer already has one of that type (a config's own settings win).

        One instance each for the module's lifetime, so that a ``validate`` after ``fit`` on
        the same module extends the run's summary instead of starting a new one; callbacks
        already attached to the trainer are not returned again.
        """
        from models.callbacks import CheckpointOnSignal, NonFiniteGuard, RoutingLogger
        from models.summary import RunSummary

        if self._summary_callback is None:
            self._summary_callback = RunSummary()
        if self._default_callbacks is None:
            self._default_callbacks = [NonFiniteGuard(), CheckpointOnSignal(), RoutingLogger()]
        attached = self.trainer.callbacks if self._trainer is not None else []
        wanted = [self._summary_callback] + [
            callback
            for callback in self._default_callbacks
            if not any(
                isinstance(other, type(callback)) and other is not callback for other in attached
            )
        ]
        return [callback for callback in wanted if not any(c is callback for c in attached)]
