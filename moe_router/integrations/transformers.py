"""Soft routing for Hugging Face ``transformers`` MoE models, one call to patch them.

Shape legend: T tokens, D model dim, E experts, K selected slots per token, G expert groups,
X experts per group.

``replace_routers(model, gate="soft_topk")`` finds every sparse MoE block of a supported model
and swaps its gate (the ``[E, D]`` linear router plus HF's softmax / sigmoid top-k) for a
:class:`~moe_router.router.Router`. The experts, their weights and the rest of the block stay
as they are: every supported block calls ``gate(hidden) -> (router_logits, weights_TK,
expert_ids_TK)`` and hands the last two to its experts module, so any gate with a static slot
count fits. The router takes the gate's weight (the same ``Parameter``), its scoring (softmax
or sigmoid, renormalisation, routed scaling factor, group limits) and DeepSeek-V3's score
correction bias, so ``gate="topk"`` reproduces the original model.

Supported gate classes (transformers 5.x): ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``,
``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``, ``DeepseekV3TopkRouter``.

What a patched model gives back:

* its forward returns what HF callers expect, ``router_logits`` included when asked for
  (the raw fp32 router logits);
* :func:`routings` and :func:`router_aux_loss`: each layer's :class:`~moe_router.routing.Routing`
  record and the sum of their auxiliary losses, for the model's latest forward. Add the aux
  loss to the training loss yourself; HF's ``load_balancing_loss_func`` recomputes softmax
  top-k from ``router_logits`` and so describes only the hard softmax gate (see
  :func:`replace_routers`);
* per-step router state (expert bias, temperature schedules) advances through
  ``moe_router.step_routers(model)`` like every other ``moe_router`` model;
* :class:`LoadBalanceMonitor` / :func:`load_balance_report`: per-layer load-balance metrics of
  a patched or unpatched model, as the markdown table + heatmap the CLI writes;
* ``save_pretrained`` writes the router weight (and DeepSeek-V3's correction bias) under HF's
  own key names, the router settings in ``config.json`` and the remaining router state under
  ``<gate>.router.*``; :func:`from_pretrained` loads it all back;
* HF's loading and initialisation work on it as on the HF model: the gate names the router's
  weight (and DeepSeek-V3's expert bias) as HF's gate does, so ``from_pretrained`` into a
  model class patched before loading (``replace_routers`` in its ``__init__``) fills the
  routers, and HF's ``_init_weights`` also sets the routers' state to its start values, so a
  model built on the meta device (``from_pretrained`` with a ``device_map``, or
  ``to_empty()`` + ``init_weights()``) starts as a new one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from safetensors import safe_open
from torch import Tensor, nn
from transformers import initialization as hf_init
from transformers.utils import cached_file

from moe_router.config import over_model_defaults
from moe_router.gates import top2_group_limit
from moe_router.metrics import LoadBalanceMetrics
from moe_router.records import sum_aux_losses
from moe_router.report import LoadBalanceReport, load_balance_table, write_load_balance_report
from moe_router.router import Router
from moe_router.routing import Routing

__all__ = [
    "SUPPORTED_GATE_CLASSES",
    "DeepseekV3GroupRouter",
    "GateSpec",
    "LoadBalanceMonitor",
    "RoutedGate",
    "from_pretrained",
    "gate_spec",
    "load_balance_report",
    "replace_routers",
    "router_aux_loss",
    "routings",
]

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"moe_router.integrations.transformers needs transformers 5.x (pip install "
        f"'moe_router[hf]'), found {transformers.__version__}"
    )

# Router settings the model fixes (the shape of its gate weight).
_FIXED_OPTIONS = ("d_model", "num_experts")
# Where ``replace_routers`` records its settings, so that a saved model can be patched again.
CONFIG_KEY = "moe_router"


# ---------------------------------------------------------------------------------------------
# What each supported HF gate does.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSpec:
    """How a Hugging Face MoE gate routes, in :class:`~moe_router.router.RouterConfig` terms.

    Attributes:
        d_model: D.
        num_experts: E.
        k: K, experts per token.
        score_func: ``softmax`` or ``sigmoid``.
        renormalize: Whether the selected weights are divided by their sum.
        score_scale: Factor on the combine weights (DeepSeek's routed scaling factor).
        num_groups: G, expert groups of group-limited routing (1 = none).
        topk_groups: Groups a token may use.
        group_rule: How a group is scored: ``max_logit`` (the ``Router`` default) or
            ``top2_score_sum`` (DeepSeek-V3: sum of the two largest biased sigmoid scores).
        correction_bias_E: DeepSeek-V3's selection-only ``e_score_correction_bias`` (fp32), or
            None for gates without one.
    """

    d_model: int
    num_experts: int
    k: int
    score_func: str
    renormalize: bool
    score_scale: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    group_rule: str = "max_logit"
    correction_bias_E: Tensor | None = None

    def router_options(self) -> dict[str, Any]:
        """The ``Router`` keyword options that reproduce this gate's scoring."""
        return {
            "k": self.k,
            "score_func": self.score_func,
            "renormalize": self.renormalize,
            "score_scale": self.score_scale,
            "num_groups": self.num_groups,
            "topk_groups": self.topk_groups,
            "expert_bias": self.correction_bias_E is not None,
        }


def _weight_shape(gate: nn.Module) -> tuple[int, int]:
    num_experts, d_model = gate.weight.shape
    if gate.num_experts != num_experts:
        raise ValueError(
            f"{type(gate).__name__}.num_experts={gate.num_experts} does not match its weight of "
            f"shape {tuple(gate.weight.shape)}"
        )
    return d_model, num_experts


def _softmax_spec(gate: nn.Module, renormalize: bool) -> GateSpec:
    d_model, num_experts = _weight_shape(gate)
    return GateSpec(d_model, num_experts, int(gate.top_k), "softmax", bool(renormalize))


def _mixtral_spec(gate: nn.Module) -> GateSpec:
    return _softmax_spec(gate, renormalize=True)  # Mixtral always renormalises


def _qwen_olmoe_spec(gate: nn.Module) -> GateSpec:
    return _softmax_spec(gate, renormalize=gate.norm_topk_prob)


def _deepseek_v3_spec(gate: nn.Module) -> GateSpec:
    d_model, num_experts = _weight_shape(gate)
    return GateSpec(
        d_model,
        num_experts,
        int(gate.top_k),
        "sigmoid",
        bool(gate.norm_topk_prob),
        score_scale=float(gate.routed_scaling_factor),
        num_groups=int(gate.num_group),
        topk_groups=int(gate.topk_group),
        group_rule="top2_score_sum",
        correction_bias_E=gate.e_score_correction_bias.detach().float(),
    )


# Gate class name -> (its modeling module, the reader of its routing). Keyed by name, so that
# recognising a gate imports no modeling module; the module rebuilds a patched class when a
# pickled model is loaded in a fresh process.
_SUPPORTED: dict[str, tuple[str, Callable[[nn.Module], GateSpec]]] = {
    "MixtralTopKRouter": ("transformers.models.mixtral.modeling_mixtral", _mixtral_spec),
    "Qwen2MoeTopKRouter": ("transformers.models.qwen2_moe.modeling_qwen2_moe", _qwen_olmoe_spec),
    "Qwen3MoeTopKRouter": ("transformers.models.qwen3_moe.modeling_qwen3_moe", _qwen_olmoe_spec),
    "OlmoeTopKRouter": ("transformers.models.olmoe.modeling_olmoe", _qwen_olmoe_spec),
    "DeepseekV3TopkRouter": (
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        _deepseek_v3_spec,
    ),
}
SUPPORTED_GATE_CLASSES = tuple(_SUPPORTED)


def gate_spec(gate: nn.Module) -> GateSpec:
    """Read how a supported Hugging Face gate routes.

    Args:
        gate: The ``gate`` module of a sparse MoE block (original or patched).

    Returns:
        Its :class:`GateSpec`.

    Raises:
        ValueError: If the gate's class is not supported.
    """
    if isinstance(gate, RoutedGate):
        return gate.spec
    if type(gate).__name__ not in _SUPPORTED:
        raise ValueError(
            f"gate class {type(gate).__name__!r} is not supported: one of {SUPPORTED_GATE_CLASSES}"
        )
    return _SUPPORTED[type(gate).__name__][1](gate)


# ---------------------------------------------------------------------------------------------
# The router that stands in for an HF gate.
# ---------------------------------------------------------------------------------------------


class DeepseekV3GroupRouter(Router):
    """A :class:`~moe_router.router.Router` whose group limit follows DeepSeek-V3.

    A group's score is the sum of its two largest selection scores ``sigmoid(logit) + bias``
    (the expert bias, when enabled); every expert outside the token's ``topk_groups`` best
    groups gets a ``-inf`` logit. Everything else is the plain ``Router``.

    Raises:
        ValueError: As ``Router``, and if a group holds fewer than two experts.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        experts_per_group = config.num_experts // config.num_groups
        if config.topk_groups < config.num_groups and experts_per_group < 2:
            raise ValueError(
                f"num_groups={config.num_groups} leaves {experts_per_group} expert per "
                "group: DeepSeek-V3 group scores need at least 2 experts per group"
            )

    def group_mask(self, logits_TE: Tensor) -> Tensor:
        """Mask the experts outside each token's ``topk_groups`` best groups with ``-inf``."""
        config = self.config
        if config.topk_groups == config.num_groups:
            return logits_TE
        scores_TE = logits_TE.detach().sigmoid()
        if self.expert_bias is not None:
            scores_TE = scores_TE + self.expert_bias.bias_E
        return top2_group_limit(logits_TE, scores_TE, config)


def _drop_router_keys(
    module: RoutedGate, state_dict: dict, prefix: str, local_metadata: Any
) -> None:
    """State-dict post-hook: a shared tensor once, under HF's name (the gate saved it so)."""
    for router_path in module.shared_tensor_names().values():
        state_dict.pop(f"{prefix}router.{router_path}", None)


def _add_router_keys(
    module: RoutedGate,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Load pre-hook: the router loads a shared tensor from HF's key too (``load_state_dict``
    works on a copy of the caller's dict)."""
    for hf_name, router_path in module.shared_tensor_names().items():
        if prefix + hf_name in state_dict:
            state_dict.setdefault(f"{prefix}router.{router_path}", state_dict[prefix + hf_name])


def _reshare_after_load(module: RoutedGate, incompatible_keys: Any) -> None:
    """Load post-hook (after the router loaded): ``assign=True`` gives the router new tensors."""
    module._share_router_tensors()


def _fp32_buffer(value: Tensor) -> Tensor:
    """``value`` as a plain fp32 tensor, keeping HF's mark of a loaded tensor (which tells its
    ``_init_weights`` to leave the tensor as loaded)."""
    tensor = value.detach().to(torch.float32)
    if getattr(value, "_is_hf_initialized", False):
        tensor._is_hf_initialized = True
    return tensor


# HF names a gate may share with its router (tested first: a gate sets attributes per call).
_SHARED_NAMES = ("weight", "e_score_correction_bias")


class RoutedGate(nn.Module):
    """Stands in for a Hugging Face MoE gate: same call, a ``moe_router`` router inside.

    ``forward(hidden_states) -> (router_logits_TE, weights_TK, expert_ids_TK)`` like the HF
    gate (logits and weights fp32), and it keeps the call's :class:`Routing` record in
    ``self.routing``. :func:`replace_routers` builds one per block from a subclass that also
    derives from the HF gate's class (see :func:`_routed_gate_class`), so HF's output
    recorder, which finds ``router_logits`` by that class, still does.

    The gate registers the router's weight as ``weight`` and, for DeepSeek-V3, the router's
    expert bias as ``e_score_correction_bias``: the same tensors under the HF gate's names.
    ``named_parameters``, ``named_buffers`` and ``state_dict`` list them under those names (the
    state dict once), so HF's loader, ``_init_weights`` and save / reload checks find them as
    in the HF gate; the rest of the router state sits under ``router.``. The router owns them:
    conversions (``to``, ``to_empty``, ...) follow its rules (the expert bias stays fp32), and
    assigning one of these names on the gate, as HF's loader does, assigns the router's. A
    DeepSeek-V3 router without an expert bias leaves the model's ``e_score_correction_bias`` a
    buffer of the gate, unused by the routing, so that a saved model still holds it.

    Args:
        router: The router.
        spec: What the replaced HF gate did.

    Attributes:
        router: The :class:`~moe_router.router.Router`.
        spec: The replaced gate's :class:`GateSpec`.
        weight: The router weight ``[E, D]`` (``router.weight_ED``).
        routing: The record of the latest call (None before the first one and at the start of
            each forward of the patched model).
    """

    replaces: ClassVar[str] = ""  # the HF gate class name, set per subclass

    def __init__(self, router: Router, spec: GateSpec) -> None:
        # nn.Module's __init__, not super()'s: next in the MRO is the HF gate, which needs a config.
        nn.Module.__init__(self)
        self.router = router
        self.spec = spec
        self.routing: Routing | None = None
        if spec.correction_bias_E is not None and router.expert_bias is None:
            self.register_buffer("e_score_correction_bias", spec.correction_bias_E.clone())
        self._share_router_tensors()
        self.register_state_dict_post_hook(_drop_router_keys)
        self.register_load_state_dict_pre_hook(_add_router_keys)
        self.register_load_state_dict_post_hook(_reshare_after_load)

    def shared_tensor_names(self) -> dict[str, str]:
        """HF's name -> the tensor's name in the router, for each shared tensor."""
        names = {"weight": "weight_ED"}
        if self.spec.correction_bias_E is not None and self.router.expert_bias is not None:
            names["e_score_correction_bias"] = "expert_bias.bias_E"
        return names

    def _owner(self, router_path: str) -> tuple[nn.Module, str]:
        """The router module holding a shared tensor, and its name there."""
        module_path, _, name = router_path.rpartition(".")
        return self.router.get_submodule(module_path), name

    def _share_router_tensors(self) -> None:
        """Register the router's current shared tensors under HF's names."""
        for hf_name, router_path in self.shared_tensor_names().items():
            owner, name = self._owner(router_path)
            if name in owner._parameters:
                self._parameters[hf_name] = owner._parameters[name]
            else:
                self._buffers[hf_name] = owner._buffers[name]

    def __setattr__(self, name: str, value: Any) -> None:
        router_path = None  # None: an attribute of the gate itself
        if name in _SHARED_NAMES and isinstance(value, Tensor) and "spec" in self.__dict__:
            router_path = self.shared_tensor_names().get(name)
        if router_path is None:
            super().__setattr__(name, value)
            return
        owner, owner_name = self._owner(router_path)
        if owner_name in owner._buffers:
            value = _fp32_buffer(value)  # the router's state stays fp32
        setattr(owner, owner_name, value)
        self._share_router_tensors()

    def _apply(self, fn: Callable, recurse: bool = True) -> RoutedGate:
        # The router converts each shared tensor, once and by its rules; then they are shared again.
        for hf_name in self.shared_tensor_names():
            self._parameters.pop(hf_name, None)
            self._buffers.pop(hf_name, None)
        try:
            super()._apply(fn, recurse)
        finally:
            self._share_router_tensors()
        return self

    # HF code reads these attributes of a gate.
    @property
    def top_k(self) -> int:
        """K."""
        return self.router.config.k

    @property
    def num_experts(self) -> int:
        """E."""
        return self.router.config.num_experts

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route ``[..., D]`` hidden states.

        Returns:
            ``(router_logits_TE, weights_TK, expert_ids_TK)``: raw fp32 logits, fp32 combine
            weights (0 on slots that carry no expert) and int64 expert ids.
        """
        routing = self.router(hidden_states)
        self.routing = routing
        return routing.logits_TE, routing.weights_TK, routing.expert_ids_TK

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


@functools.cache
def _routed_gate_class(hf_gate_class: type[nn.Module]) -> type[RoutedGate]:
    """``RoutedGate`` that is also an instance of ``hf_gate_class`` (one class per HF class).

    It is made a global of this module under its name, so that pickle finds it (see
    ``__getattr__`` for a fresh process).
    """
    name = f"Routed{hf_gate_class.__name__}"
    routed_class = type(
        name,
        (RoutedGate, hf_gate_class),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": RoutedGate.__doc__,
            "replaces": hf_gate_class.__name__,
        },
    )
    globals()[name] = routed_class
    return routed_class


def __getattr__(name: str) -> type[RoutedGate]:
    """``Routed<HF gate class>``, created on first use (unpickling a patched model)."""
    hf_name = name.removeprefix("Routed")
    if name.startswith("Routed") and hf_name in _SUPPORTED:
        module = importlib.import_module(_SUPPORTED[hf_name][0])
        return _routed_gate_class(getattr(module, hf_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Finding the blocks.
# ---------------------------------------------------------------------------------------------


def _layer_names(paths: list[str]) -> list[str]:
    """``layer<i>`` for a block under ``...layers.<i>.``, else its module path."""
    names = []
    for path in paths:
        match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", path)
        names.append(f"layer{match.group(1)}" if match else path)
    return names if len(set(names)) == len(names) else list(paths)


def _moe_gates(model: nn.Module) -> dict[str, nn.Module]:
    """Every MoE gate (supported HF class or ``RoutedGate``), by layer name, in module order.

    Raises:
        ValueError: If a block with ``experts`` has a ``gate`` of an unsupported class.
    """
    paths, gates = [], []
    for path, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if not isinstance(gate, nn.Module) or not isinstance(
            getattr(module, "experts", None), nn.Module
        ):
            continue
        if not isinstance(gate, RoutedGate) and type(gate).__name__ not in _SUPPORTED:
            raise ValueError(
                f"the MoE block {path!r} has a gate of class {type(gate).__name__!r}, which "
                f"is not supported: one of {SUPPORTED_GATE_CLASSES}"
            )
        paths.append(path)
        gates.append(gate)
    return dict(zip(_layer_names(paths), gates, strict=True))


def _routed_gates(model: nn.Module) -> dict[str, RoutedGate]:
    gates = {name: g for name, g in _moe_gates(model).items() if isinstance(g, RoutedGate)}
    if not gates:
        raise ValueError(
            f"model ({type(model).__name__}) has no moe_router router: call replace_routers first"
        )
    return gates


# ---------------------------------------------------------------------------------------------
# Patching.
# ---------------------------------------------------------------------------------------------


def _hf_aux_loss_matches(router: Router, spec: GateSpec) -> bool:
    """Whether HF's softmax top-k balance loss describes what this router selects."""
    config = router.config
    return (
        config.gate == "topk"
        and config.score_func == "softmax"
        and router.expert_bias is None
        and config.topk_groups == config.num_groups
        and config.k == spec.k
    )


def _before_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched model: forget the last forward's records, and refuse
    HF's balance loss where it would not describe the gate.

    A module-level function reading the model's attributes (not a closure), so that a deepcopy
    of the model clears and checks its own gates.
    """
    gates = model._moe_router_gates
    for gate in gates:
        gate.routing = None
    output_router_logits = kwargs.get("output_router_logits")
    if output_router_logits is None:
        output_router_logits = getattr(getattr(model, "config", None), "output_router_logits", 0)
    if not (output_router_logits and getattr(model, "router_aux_loss_coef", 0)):
        return
    labels = kwargs.get("labels")
    if labels is None and args:
        try:
            labels = inspect.signature(model.forward).bind_partial(*args).arguments.get("labels")
        except TypeError:
            labels = None
    if labels is None:
        return
    if not all(_hf_aux_loss_matches(gate.router, gate.spec) for gate in gates):
        raise ValueError(
            "output_router_logits=True with labels adds HF's load_balancing_loss_func to the loss; "
            "it recomputes softmax top-k from router_logits, which is not what this gate selects. "
            "Pass output_router_logits=False and add moe_router's aux loss instead "
            "(replace_routers(..., aux_loss_coef=...), then loss + router_aux_loss(model))"
        )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Torch's default dtype set to ``dtype`` inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _start_values(router: Router) -> dict[str, Tensor]:
    """A new router's buffers and temperature parameter by name: the values each starts from
    (the weight is HF's to initialise, as the gate's ``weight``)."""
    # On the CPU and in fp32 whatever the defaults, without drawing from the global generator
    # (HF's initialisation of the other weights must not depend on the routers).
    with torch.random.fork_rng(devices=[]), torch.device("cpu"), _default_dtype(torch.float32):
        fresh = type(router)(router.config)
    values = dict(fresh.named_buffers())
    values.update((name, p) for name, p in fresh.named_parameters() if name != "weight_ED")
    return values


def _init_router_state(router: Router) -> None:
    """Set every buffer of ``router`` (and a learned temperature) to its start value, except
    the tensors HF marked as loaded (``transformers.initialization.copy_`` skips those)."""
    start = _start_values(router)
    current = dict(router.named_buffers())
    current.update(router.named_parameters())
    for name, value in start.items():
        hf_init.copy_(current[name], value)


class _InitWeightsWithRouters:
    """A patched HF model's ``_init_weights``: HF's for every module, then a router's state.

    HF initialises a model built on the meta device (``from_pretrained`` with a
    ``device_map``, or ``to_empty()`` + ``init_weights()``) module by module through
    ``_init_weights``, which knows nothing of the router's state; without this, the expert
    bias, schedule position, budget and thresholds would keep whatever memory they were given.

    Args:
        hf_init_weights: The model's own ``_init_weights`` (bound).
    """

    def __init__(self, hf_init_weights: Callable[[nn.Module], None]) -> None:
        self.hf_init_weights = hf_init_weights

    def __call__(self, module: nn.Module) -> None:
        self.hf_init_weights(module)
        if isinstance(module, Router):
            _init_router_state(module)


def _init_routers_with_the_model(model: nn.Module) -> None:
    """Make HF's weight initialisation of ``model`` also initialise the routers' state.

    Every HF model inside ``model`` (e.g. the ``MixtralModel`` of a ``MixtralForCausalLM``)
    gets the wrapper, as HF initialises a sub-model's modules with the sub-model's
    ``_init_weights``.
    """
    for module in model.modules():
        init_weights = getattr(module, "_init_weights", None)
        if isinstance(module, transformers.PreTrainedModel) and not isinstance(
            init_weights, _InitWeightsWithRouters
        ):
            module._init_weights = _InitWeightsWithRouters(init_weights)


def _copy_forward_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register ``source``'s forward (pre-)hooks on ``target`` too.

    HF installs its output-capturing hooks (``router_logits``) once per model, on the first
    forward that asks for an output; a gate swapped in later must carry them over.
    """
    for hook_id, hook in source._forward_pre_hooks.items():
        with_kwargs = hook_id in source._forward_pre_hooks_with_kwargs
        target.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    for hook_id, hook in source._forward_hooks.items():
        target.register_forward_hook(
            hook,
            with_kwargs=hook_id in source._forward_hooks_with_kwargs,
            always_call=hook_id in source._forward_hooks_always_called,
        )


def replace_routers(model: nn.Module, gate: str = "soft_topk", **router_options: Any) -> nn.Module:
    """Swap the gate of every sparse MoE block of a Hugging Face model for a ``Router``.

    Each router starts from its block's gate: the same weight ``Parameter`` (so an optimizer
    built before the call still trains it), the gate's scoring as defaults (``score_func``,
    ``renormalize``, ``score_scale`` = routed scaling factor, ``num_groups`` /
    ``topk_groups``, ``k``) and, for DeepSeek-V3, ``expert_bias=True`` starting from the
    model's ``e_score_correction_bias`` (same sign: added to the selection scores). With
    ``gate="topk"`` and no other option the patched model computes what the original did.

    The settings are recorded in ``model.config.moe_router`` so that ``save_pretrained`` keeps
    them (see :func:`from_pretrained`).

    HF's own balance loss (``output_router_logits=True`` with labels and a nonzero
    ``router_aux_loss_coef``) recomputes softmax top-k from ``router_logits``; it is left in
    place where that is what the router selects (``topk`` with softmax scoring, no expert bias,
    no group limit, the model's K). For any other setting a forward that would add it raises a
    ``ValueError``: use ``aux_loss_coef`` / ``seq_aux_loss_coef`` / ``z_loss_coef`` /
    ``expert_bias`` here and add :func:`router_aux_loss` to the loss.

    Padding tokens are routed as the HF block routes them (the gate gets no attention mask),
    so they count in the loads and aux losses.

    Args:
        model: A Hugging Face model (or any module) holding supported MoE blocks.
        gate: The ``moe_router`` gate (``topk``, ``soft_topk``, ``sparse_soft_topk``, ...).
        **router_options: Any other :class:`~moe_router.router.RouterConfig` field; they
            override the defaults read from the model (``d_model`` and ``num_experts`` are
            fixed by the gate weight).

    Returns:
        ``model``, patched in place.

    Raises:
        ValueError: If the model has no supported MoE block, a block's gate class is not
            supported, the model is already patched, an option is fixed by the model, or the
            router rejects a setting. Nothing is changed then.
    """
    for name in _FIXED_OPTIONS:
        if name in router_options:
            raise ValueError(
                f"{name}={router_options[name]!r} cannot be set: the model's gate weight fixes it"
            )
    gates = _moe_gates(model)
    if not gates:
        raise ValueError(
            f"model ({type(model).__name__}) has no sparse MoE block with a supported gate "
            f"(one of {SUPPORTED_GATE_CLASSES})"
        )
    if any(isinstance(g, RoutedGate) for g in gates.values()):
        raise ValueError(
            "model already has moe_router routers; load the HF model again to choose another gate"
        )

    # Build every router first, so that a rejected setting leaves the model untouched.
    replacements: dict[int, RoutedGate] = {}
    for hf_gate in gates.values():
        spec = gate_spec(hf_gate)
        options = over_model_defaults(gate, spec.router_options(), router_options)
        k = options.pop("k")
        router_class = DeepseekV3GroupRouter if spec.group_rule == "top2_score_sum" else Router
        router = router_class(spec.d_model, spec.num_experts, k, gate=gate, **options)
        router.to(hf_gate.weight.device)
        router.weight_ED = hf_gate.weight  # the same Parameter, in the model's dtype
        if spec.correction_bias_E is not None and router.expert_bias is not None:
            with torch.no_grad():
                router.expert_bias.bias_E.copy_(spec.correction_bias_E)
        routed = _routed_gate_class(type(hf_gate))(router, spec)
        routed.train(hf_gate.training)
        _copy_forward_hooks(hf_gate, routed)
        replacements[id(hf_gate)] = routed

    for module in list(model.modules()):
        gate_module = getattr(module, "gate", None)
        if isinstance(gate_module, nn.Module) and id(gate_module) in replacements:
            module.gate = replacements[id(gate_module)]
    # A plain list (no submodule registration, no state_dict entry) that deepcopy remaps.
    model._moe_router_gates = list(replacements.values())
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    _init_routers_with_the_model(model)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"gate": gate, **router_options})
    return model


# ---------------------------------------------------------------------------------------------
# Records and aux losses.
# ---------------------------------------------------------------------------------------------


def routings(model: nn.Module) -> dict[str, Routing]:
    """Each patched layer's :class:`Routing` record of the model's latest forward.

    Args:
        model: A model patched by :func:`replace_routers`.

    Returns:
        Layer name (``layer<i>``) -> record, in layer order; layers that have not run since the
        patched model's latest forward began are left out.

    Raises:
        ValueError: If the model has no ``moe_router`` router.
    """
    gates = _routed_gates(model)
    return {name: gate.routing for name, gate in gates.items() if gate.routing is not None}


def router_aux_loss(model: nn.Module) -> Tensor:
    """Sum of every layer's auxiliary losses (already scaled) from the model's latest forward.

    Add it to the training loss: ``loss = out.loss + router_aux_loss(model)``. It is 0 when
    no aux loss coefficient is set.

    Args:
        model: A model patched by :func:`replace_routers`.

    Returns:
        A scalar fp32 tensor (differentiable).

    Raises:
        ValueError: If the model has no ``moe_router`` router or no layer has routed yet.
    """
    return sum_aux_losses(routings(model).values(), model)


# ---------------------------------------------------------------------------------------------
# Load-balance metrics of a patched or unpatched model.
# ---------------------------------------------------------------------------------------------


def _hf_routing(spec: GateSpec, output: tuple[Tensor, Tensor, Tensor]) -> Routing:
    """The ``Routing`` record of an unpatched HF gate's output (detached, fp32)."""
    logits, weights, expert_ids = output
    logits_TE = logits.detach().float().reshape(-1, spec.num_experts)
    scores_TE = logits_TE.softmax(-1) if spec.score_func == "softmax" else logits_TE.sigmoid()
    return Routing(
        expert_ids_TK=expert_ids.detach().reshape(logits_TE.shape[0], -1),
        weights_TK=weights.detach().float().reshape(logits_TE.shape[0], -1),
        scores_TE=scores_TE,
        logits_TE=logits_TE,
    )


class LoadBalanceMonitor:
    """Per-layer :class:`~moe_router.metrics.LoadBalanceMetrics` of an HF MoE model.

    Works for patched and unpatched models alike: forward hooks on the MoE gates feed every
    gate call (training, evaluation or ``generate``) into that layer's metrics while the
    monitor is open. Use it as a context manager, or call :meth:`close`::

        with LoadBalanceMonitor(model) as monitor:
            model(input_ids)
        print(monitor.table())

    Args:
        model: The model.
        capacity_factor: For the drop rate (see ``LoadBalanceMetrics``); None for none.

    Raises:
        ValueError: If the model has no MoE gate of a supported class.

    Attributes:
        metrics: Layer name -> its ``LoadBalanceMetrics``, in layer order.
    """

    def __init__(self, model: nn.Module, capacity_factor: float | None = None) -> None:
        gates = _moe_gates(model)
        if not gates:
            raise ValueError(
                f"model ({type(model).__name__}) has no MoE gate of a supported class "
                f"(one of {SUPPORTED_GATE_CLASSES})"
            )
        self.metrics: dict[str, LoadBalanceMetrics] = {}
        self._handles = []
        for name, gate in gates.items():
            spec = gate_spec(gate)
            metric = LoadBalanceMetrics(spec.num_experts, capacity_factor=capacity_factor)
            self.metrics[name] = metric.to(gate.weight.device)
            self._handles.append(gate.register_forward_hook(self._hook(metric, spec)))

    @staticmethod
    def _hook(metric: LoadBalanceMetrics, spec: GateSpec) -> Callable:
        def on_gate(module: nn.Module, args: tuple, output: tuple) -> None:
            with torch.no_grad():
                routing = module.routing if isinstance(module, RoutedGate) else None
                metric.update(routing if routing is not None else _hf_routing(spec, output))

        return on_gate

    def close(self) -> None:
        """Remove the hooks (the metrics keep their values)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> LoadBalanceMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset(self) -> None:
        """Start a new window."""
        for metric in self.metrics.values():
            metric.reset()

    def compute(self) -> dict[str, dict[str, Tensor]]:
        """Layer name -> ``LoadBalanceMetrics.compute()``."""
        return {name: metric.compute() for name, metric in self.metrics.items()}

    def loads(self) -> Tensor:
        """Assignments per layer and expert so far, fp32 ``[L, E]`` (for ``plot_load_heatmaps``).

        Raises:
            ValueError: If the layers differ in E.
        """
        loads = [values["tokens_per_expert"].cpu() for values in self.compute().values()]
        if len({load.shape for load in loads}) != 1:
            raise ValueError(f"layers differ in E: {[tuple(load.shape) for load in loads]}")
        return torch.stack(loads)

    def table(self, digits: int = 3) -> str:
        """The markdown load-balance table, one row per layer (``load_balance_table``)."""
        return load_balance_table(self.metrics, digits=digits)

    def write_report(
        self, out_dir: str | os.PathLike, *, title: str = "Load balance", stem: str = "load_balance"
    ) -> LoadBalanceReport:
        """Write ``<stem>.md`` (table), ``<stem>.png`` (heatmap), ``<stem>.json`` to ``out_dir``."""
        return write_load_balance_report(self.metrics, out_dir, title=title, stem=stem)


def load_balance_report(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    title: str = "Load balance",
    stem: str = "load_balance",
) -> LoadBalanceReport:
    """Run ``model`` over ``batches`` (no grad, eval mode) and write its load-balance report.

    The same markdown table + layers × experts heatmap (+ JSON) the training CLI writes, for a
    patched or an unpatched model.

    Args:
        model: The HF model.
        batches: ``input_ids`` tensors, or dicts of forward keyword arguments.
        out_dir: Folder for ``<stem>.md``, ``<stem>.png`` and ``<stem>.json``.
        title: Heading of the report and title of the heatmap.
        stem: File name stem.

    Returns:
        The paths written and the table (``report.table``).

    Raises:
        ValueError: If the model has no supported MoE gate or ``batches`` is empty.
    """
    was_training = model.training
    model.eval()
    try:
        with LoadBalanceMonitor(model) as monitor, torch.no_grad():
            num_batches = 0
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**batch)
                else:
                    model(input_ids=batch)
                num_batches += 1
    finally:
        model.train(was_training)
    if num_batches == 0:
        raise ValueError("batches is empty: nothing to measure")
    return monitor.write_report(out_dir, title=title, stem=stem)


# ---------------------------------------------------------------------------------------------
# Loading a saved patched model.
# ---------------------------------------------------------------------------------------------


_ROUTER_STATE = re.compile(r"^(?P<block>.*)\.gate\.(?P<rest>router\..*)$")


def _router_state_key(key: str) -> tuple[str, str] | None:
    """``(layer name, key inside the gate)`` of a router-state key, or None for another key.

    Checkpoint and model may name a block differently (transformers renames Mixtral's ``mlp``
    to ``block_sparse_moe`` on save and back on load), so keys are matched by layer.
    """
    match = _ROUTER_STATE.match(key)
    if match is None:
        return None
    return _layer_names([match["block"]])[0], match["rest"]


def _checkpoint_router_state(path: str | os.PathLike, **hub_kwargs: Any) -> dict:
    """The router-state tensors of a saved model (local folder or hub id), by layer and key."""
    index_file = cached_file(
        path,
        "model.safetensors.index.json",
        _raise_exceptions_for_missing_entries=False,
        **hub_kwargs,
    )
    if index_file is not None:
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        file_names = sorted({file for key, file in weight_map.items() if _router_state_key(key)})
    else:
        file_names = ["model.safetensors"]
    state = {}
    for file_name in file_names:
        with safe_open(cached_file(path, file_name, **hub_kwargs), framework="pt") as file:
            for key in file.keys():  # safe_open has keys(), no __iter__
                layer_key = _router_state_key(key)
                if layer_key is not None:
                    state[layer_key] = file.get_tensor(key)
    return state


def from_pretrained(model_class: Any, path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a model saved (``save_pretrained``) after :func:`replace_routers`, patched again.

    ``model_class.from_pretrained`` loads the model with HF's routing (the router weights and
    DeepSeek-V3's correction bias are stored under HF's key names, so a plain HF load gets
    the trained router weights; its load report lists the other ``*.gate.router.*`` keys as
    unexpected). Then :func:`replace_routers` runs with the settings saved in
    ``config.moe_router``, and the rest of the router state (temperature schedule position,
    learned temperature, expert bias of models without a correction bias) is read from the
    checkpoint.

    Args:
        model_class: A transformers model class (``AutoModelForCausalLM``,
            ``MixtralForCausalLM``, ...).
        path: The saved folder (or a hub id).
        **kwargs: Passed to ``model_class.from_pretrained``. With
            ``output_loading_info=True`` the result is ``(model, loading_info)`` as HF's, its
            ``unexpected_keys`` without the router state read here.

    Returns:
        The patched model (and HF's loading info when asked for).

    Raises:
        ValueError: If the saved config has no ``moe_router`` settings, or the checkpoint's
            router state does not match what the settings need.
    """
    loaded = model_class.from_pretrained(path, **kwargs)
    model, loading_info = loaded if kwargs.get("output_loading_info") else (loaded, None)
    options = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(options, Mapping) or "gate" not in options:
        raise ValueError(
            f"{str(path)!r} has no config.{CONFIG_KEY} settings: it was not saved from a model "
            "patched by replace_routers (patch a plain HF model with replace_routers instead)"
        )
    options = dict(options)
    replace_routers(model, options.pop("gate"), **options)
    wanted = {}  # (layer, key in the gate) -> model key
    for key in model.state_dict():
        layer_key = _router_state_key(key)
        if layer_key is not None:
            wanted[layer_key] = key
    hub_kwargs = {
        name: kwargs[name]
        for name in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
        if name in kwargs
    }
    saved = _checkpoint_router_state(path, **hub_kwargs)
    if set(saved) != set(wanted):
        raise ValueError(
            f"the router state in {str(path)!r} does not fit config.{CONFIG_KEY}="
            f"{getattr(model.config, CONFIG_KEY)}: missing {sorted(set(wanted) - set(saved))}, "
            f"unexpected {sorted(set(saved) - set(wanted))}"
        )
    model.load_state_dict(
        {wanted[layer_key]: saved[layer_key] for layer_key in wanted}, strict=False
    )
    if loading_info is None:
        return model
    unexpected = loading_info["unexpected_keys"]
    loading_info["unexpected_keys"] = type(unexpected)(
        key for key in unexpected if _router_state_key(key) not in wanted
    )
    return model, loading_info
