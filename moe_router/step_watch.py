"""The "trained without a step" warning of routers with per-step state.

A router whose components (:mod:`moe_router.state`) need stepping warns once when it keeps
training without :meth:`~moe_router.router.Router.step`:

- eager training forwards are counted on the host, and the warning comes after
  :data:`UNSTEPPED_WARN_AFTER` of them;
- forwards under ``torch.compile`` only add 1 to a buffer (host-side counting would not run
  in the compiled graph); one global optimizer step hook reads it once, after
  :data:`UNSTEPPED_WARN_AFTER` optimizer steps without a router step. A stepped router is never
  read: no host sync in the hot path.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["UNSTEPPED_WARN_AFTER", "StepWatch"]

# Training forwards (or optimizer steps, compiled) without a step after which a router warns.
UNSTEPPED_WARN_AFTER = 64


class StepWatch(nn.Module):
    """Counts one router's training since its last step (see the module docstring).

    Args:
        describe: Called when warning: the router's gate and the components that do not
            advance, e.g. ``"Router (gate='topk') ... its ExpertBias"``.
    """

    def __init__(self, describe: Callable[[], tuple[str, str]]) -> None:
        super().__init__()
        self._describe = describe
        self.register_buffer("compiled_forwards", torch.zeros((), dtype=torch.long), False)
        self.forwards = 0
        self.optimizer_steps = 0
        self.warned = False
        self.watching = False

    def watch(self) -> None:
        """Start watching (the router holds state that needs a step)."""
        self.watching = True
        _WATCHED.add(self)
        if not _HOOK:
            _HOOK.append(register_optimizer_step_post_hook(_after_any_optimizer_step))

    def training_forward(self) -> None:
        """One training forward of the router."""
        if not self.watching or self.warned:
            return
        if torch.compiler.is_compiling():
            self.compiled_forwards += 1
            return
        self.forwards += 1
        if self.forwards >= UNSTEPPED_WARN_AFTER:
            self.warn(f"ran {self.forwards} training forwards")

    def stepped(self) -> None:
        """The router was stepped."""
        self.forwards = self.optimizer_steps = 0
        self.compiled_forwards.zero_()

    def warn(self, what: str) -> None:
        if self.warned:
            return
        self.warned = True
        router, names = self._describe()
        warnings.warn(
            f"{router} {what} without a step: its {names} do not advance. Call "
            "moe_router.step_routers(model) after each optimizer step, or once "
            "moe_router.register_optimizer_hooks(optimizer, model).",
            stacklevel=5,
        )


_WATCHED: weakref.WeakSet[StepWatch] = weakref.WeakSet()
_HOOK: list = []


def _after_any_optimizer_step(*_args: object) -> None:
    for watch in list(_WATCHED):
        if watch.warned or not watch.training:
            continue
        watch.optimizer_steps += 1
        # One host read per router, only after this many optimizer steps without its step.
        if watch.optimizer_steps == UNSTEPPED_WARN_AFTER:
            compiled = int(watch.compiled_forwards)
            if compiled > 0:
                watch.warn(
                    f"ran {compiled} compiled training forwards over "
                    f"{UNSTEPPED_WARN_AFTER} optimizer steps"
                )
