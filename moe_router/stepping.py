"""One call for all per-step router state.

Routers hold state that must advance after every optimizer step: the auxiliary-loss-free
expert bias, an annealed temperature, the budget controller of ``sparse_soft_topk`` with
``target_active`` and the running thresholds of ``balanced_soft_topk``. Training forwards
accumulate what the step needs; :meth:`moe_router.router.Router.step` applies it.

In your own training loop, either register the hook once::

    handle = moe_router.register_optimizer_hooks(optimizer, model)
    ...
    loss.backward(); optimizer.step()   # the hook steps every router after each step

or call :func:`step_routers` yourself after each ``optimizer.step()``. With gradient
accumulation, the loads and support of every micro-batch of the step are used. A router with
such state that runs many training forwards without being stepped warns once.

Under data parallelism every rank must step after the same optimizer step (the step
all-reduces loads and controller statistics so that every rank holds the same state).
Activation checkpointing that recomputes a router's forward counts its loads twice; the
sign-based bias update and the ratio-based controller are insensitive to that uniform factor.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from moe_router.router import Router

__all__ = ["register_optimizer_hooks", "routers", "step_routers"]


def routers(model: nn.Module) -> list[Router]:
    """Every :class:`Router` inside ``model`` (the model itself included), in module order.

    Raises:
        ValueError: If ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    return [module for module in model.modules() if isinstance(module, Router)]


# id(router) -> the handle of the optimizer hook that steps it (while registered).
_HOOKS: dict[int, RemovableHandle] = {}


def _is_registered(handle: RemovableHandle) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def step_routers(model: nn.Module) -> int:
    """Advance the per-step state of every router in ``model`` after one optimizer step.

    Args:
        model: Any module holding routers (an ``MoELayer``, a transformer, a patched Hugging
            Face model, ...).

    Returns:
        The number of routers stepped.
    """
    found = routers(model)
    for router in found:
        router.step()
    return len(found)


def register_optimizer_hooks(optimizer: Optimizer, model: nn.Module) -> RemovableHandle:
    """Step every router of ``model`` after each ``optimizer.step()``.

    A step post-hook on the optimizer (torch's ``Optimizer.register_step_post_hook``), so
    nothing else in the training loop changes. A step the loop skips (e.g. a ``GradScaler``
    step skipped on inf gradients) does not step the routers either: their loads keep
    accumulating into the next step.

    Args:
        optimizer: The optimizer that updates the model's parameters.
        model: The module holding the routers.

    Returns:
        The hook's handle; ``handle.remove()`` unregisters it.

    Raises:
        ValueError: If ``model`` holds no router, or a router of it is already stepped by a
            registered hook (it would step twice per optimizer step; ``remove()`` the first
            handle to register again).
    """
    found = routers(model)
    if not found:
        raise ValueError(
            f"model={type(model).__name__} holds no moe_router Router: nothing to step"
        )
    if any(_is_registered(_HOOKS[id(r)]) for r in found if id(r) in _HOOKS):
        raise ValueError(
            f"model={type(model).__name__} already has routers stepped by an optimizer hook: "
            "a second hook would step them twice per optimizer step (remove the first handle)"
        )

    def hook(_optimizer: Optimizer, _args: tuple, _kwargs: dict) -> None:
        step_routers(model)

    handle = optimizer.register_step_post_hook(hook)
    for router in found:
        _HOOKS[id(router)] = handle
    return handle
