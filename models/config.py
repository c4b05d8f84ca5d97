"""Typed configuration of the small MoE transformer and its optimiser.

Every field is type-hinted so that LightningCLI can set it from YAML (``model.model.d_model``,
``model.optim.lr``). Bad values raise ``ValueError`` naming the field, the value and what is
allowed, at construction time, i.e. before any training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_router.config import Gate, MoEConfig, MoEOptions, RouterConfig, RouterOptions

UNSET = "<unset>"


def flatten_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (dataclasses, dicts) as one ``{"dotted.key": value}`` dict.

    Lists become tuples, since YAML gives lists where a dataclass default is a tuple.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten_config(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, list):
        value = tuple(value)
    return {prefix.rstrip("."): value}


def config_differences(
    saved: Any, given: Any, defaults: Any = None, labels: tuple[str, str] = ("checkpoint", "given")
) -> list[str]:
    """The fields in which a recorded config and the config of this run differ.

    This is the one rule for resuming or reusing a run made by an older version: a field the
    record does not have (an option added after it was made) is no difference while this run
    leaves it at its default, since that reproduces what the older version ran.

    Args:
        saved: The recorded config (a checkpoint's hyperparameters, a run's effective config).
        given: The config of this run. Dataclasses and dicts, nested, on either side.
        defaults: Every field's default, in the same nesting (None: ``type(given)()`` when
            ``given`` is a dataclass, else no defaults, so a missing field always differs).
        labels: How the message names the two sides.

    Returns:
        One ``"field: <saved label> X, <given label> Y"`` entry per differing dotted field, sorted.
    """
    if defaults is None and dataclasses.is_dataclass(given) and not isinstance(given, type):
        defaults = type(given)()
    saved_flat, given_flat = flatten_config(saved), flatten_config(given)
    defaults_flat = flatten_config(defaults) if defaults is not None else {}
    differences = []
    for key in sorted(saved_flat.keys() | given_flat.keys()):
        old, new = saved_flat.get(key, UNSET), given_flat.get(key, UNSET)
        if old is UNSET and key in defaults_flat and new == defaults_flat[key]:
            continue
        if old != new:
            differences.append(f"{key}: {labels[0]} {old!r}, {labels[1]} {new!r}")
    return differences


def _require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be > 0")


@dataclass
class ModelConfig:
    """Sizes and gate of the decoder-only MoE transformer.

    Attributes:
        vocab_size: Number of token ids (256 for the byte-level corpora of ``models.data``).
        max_seq_len: Longest sequence the rotary tables are built for.
        d_model: Residual stream width D.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads; must divide ``d_model``.
        rope_base: Base of the rotary position frequencies.
        moe_every: Block ``i`` (0-based) uses the MoE FFN when ``(i + 1) % moe_every == 0``;
            1 means every block, 2 every second block (dense SwiGLU FFNs elsewhere).
        num_experts: Experts E per MoE layer.
        k: Experts K selected per token (the active-parameter budget).
        expert_d_ff: Hidden width F of each expert.
        dense_d_ff: Hidden width of the dense SwiGLU FFNs; None gives ``k * expert_d_ff`` so a
            dense block has the same active parameters as an MoE block.
        gate: Gate of every MoE layer: ``topk``, ``soft_topk``, ``sparse_soft_topk``,
            ``balanced_soft_topk``, ... (see ``moe_router.gates``).
        moe: Every other setting of the MoE layers and their routers (temperature, method,
            auxiliary-loss coefficients, expert bias, budgets, capacity, ...):
            ``moe_router.config.MoEOptions``; set from the CLI as ``--model.model.moe.tau``.
        init_std: Standard deviation of the normal initialisation of embeddings and linears.
    """

    # vocabulary and context
    vocab_size: int = 256
    max_seq_len: int = 128
    # trunk
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    rope_base: float = 10_000.0
    # feed-forward: mixture of experts and dense
    moe_every: int = 1
    num_experts: int = 8
    k: int = 2
    expert_d_ff: int = 128
    dense_d_ff: int | None = None
    gate: Gate = "soft_topk"
    moe: MoEOptions = field(default_factory=MoEOptions)
    # initialisation
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "max_seq_len",
            "d_model",
            "n_layers",
            "n_heads",
            "moe_every",
            "num_experts",
            "k",
            "expert_d_ff",
            "init_std",
            "rope_base",
        ):
            _require_positive(name, getattr(self, name))
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"d_model / n_heads = {self.d_model // self.n_heads} must be even for rotary "
                f"positions (d_model={self.d_model}, n_heads={self.n_heads})"
            )
        if self.k > self.num_experts:
            raise ValueError(
                f"k={self.k} is not allowed: it must be <= num_experts={self.num_experts}"
            )
        if self.moe_every > self.n_layers:
            raise ValueError(
                f"moe_every={self.moe_every} must be <= n_layers={self.n_layers}, "
                "otherwise no block has an MoE FFN"
            )
        if isinstance(self.moe, dict):  # a plain mapping from Python code or an old checkpoint
            self.moe = MoEOptions(**self.moe)
        if not isinstance(self.moe, MoEOptions):
            raise ValueError(f"moe={self.moe!r} is invalid: a MoEOptions (or a dict of its fields)")
        self.moe_layer_config()  # validates the gate and every option against the sizes
        if self.dense_d_ff is not None:
            _require_positive("dense_d_ff", self.dense_d_ff)
        # dense_d_ff stays None when unset (see dense_width): LightningCLI reads the defaults of
        # the model config from a ModelConfig() instance, so a value filled in here would
        # become a fixed default that ignores the k and expert_d_ff given on the command line.

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense FFNs: ``dense_d_ff``, or ``k * expert_d_ff`` when unset."""
        return self.k * self.expert_d_ff if self.dense_d_ff is None else self.dense_d_ff

    def moe_layer_config(self) -> MoEConfig:
        """The ``MoEConfig`` of every MoE layer of this model."""
        return self.moe.layer_config(
            self.d_model, self.expert_d_ff, self.num_experts, self.k, self.gate
        )

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) uses the MoE FFN."""
        return (index + 1) % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        """Number of blocks with an MoE FFN."""
        return sum(self.is_moe_block(i) for i in range(self.n_layers))


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay.

    Attributes:
        lr: Peak learning rate, reached after ``warmup_steps``.
        weight_decay: Decoupled weight decay of matrices (norms, biases and the router's
            selection bias are never decayed).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Optimizer steps of linear warmup from 0.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` at ``trainer.max_steps``.
    """

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _require_positive("lr", self.lr)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas!r} must both be in [0, 1)")


# Checkpoints carry these configs as hyper-parameters; let `torch.load(weights_only=True)`
# (the default, used by Lightning when resuming) rebuild them.
torch.serialization.add_safe_globals(
    [ModelConfig, OptimConfig, MoEOptions, MoEConfig, RouterOptions, RouterConfig]
)
