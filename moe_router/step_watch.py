"""The "trained without a step" warning of routers with per-step state.

A router whose components (:mod:`moe_router.state`) need stepping warns once when it keeps
training without :meth:`~moe_router.router.Router.step`:

- eager training forwards are counted on the host, and the warning comes after
  :data:`UNSTEPPED_WARN_AFTER` of them;
- forwards under ``torch.compile`` only add 1 to the router's ``compiled_forwards`` buffer
  (host-side counting would not run in the compiled graph); one global optimizer step hook
  reads it once, after :data:`UNSTEPPED_WARN_AFTER` optimizer steps without a router step. A
  stepped router is never read: no host sync in the hot path.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["UNSTEPPED_WARN_AFTER", "StepWatch"]

# Training forwards (or optimizer steps, compiled) without a step after which a router warns.
UNSTEPPED_WARN_AFTER = 64


class StepWatch:
    """Counts one router's training since its last step (see the module docstring).

    Args:
        router: The router; it owns the ``compiled_forwards`` buffer, and the warning names
            its components that need a step (``states()``). Held by a weak reference. The
            watch starts at once when the router already holds state.
    """

    def __init__(self, router: nn.Module) -> None:
        self._router = weakref.ref(router)
        self.forwards = 0
        self.optimizer_steps = 0
        self.warned = False
        self.watching = False
        if router.states():
            self.watch()

    def watch(self) -> None:
        """Start watching (the router holds state that needs a step)."""
        self.watching = True
        _WATCHED.add(self)
        if not _HOOK:
            _HOOK.append(register_optimizer_step_post_hook(_after_any_optimizer_step))

    def training_forward(self, router: nn.Module) -> None:
        """One training forward of ``router``."""
        if torch.compiler.is_compiling():
            router.compiled_forwards += 1  # (a stateless router's count is never read)
            return
        if not self.watching or self.warned:
            return
        self.forwards += 1
        if self.forwards >= UNSTEPPED_WARN_AFTER:
            self.warn(f"ran {self.forwards} training forwards")

    def stepped(self, router: nn.Module) -> None:
        """``router`` was stepped."""
        self.forwards = self.optimizer_steps = 0
        router.compiled_forwards.zero_()

    def warn(self, what: str) -> None:
        router = self._router()
        if self.warned or router is None:
            return
        self.warned = True
        components = ", ".join(type(s).__name__ for s in router.states() if s.needs_step)
        warnings.warn(
            f"Router (gate={router.config.gate!r}) {what} without a step: its {components} "
            "do not advance. Call "
            "moe_router.step_routers(model) after each optimizer step, or once "
            "moe_router.register_optimizer_hooks(optimizer, model).",
            stacklevel=5,
        )


_WATCHED: weakref.WeakSet[StepWatch] = weakref.WeakSet()
_HOOK: list = []


def _after_any_optimizer_step(*_args: object) -> None:
    for watch in list(_WATCHED):
        router = watch._router()
        if router is None or watch.warned or not router.training:
            continue
        watch.optimizer_steps += 1
        # One host read per router, only after this many optimizer steps without its step.
        if watch.optimizer_steps == UNSTEPPED_WARN_AFTER:
            compiled = int(router.compiled_forwards)
            if compiled > 0:
                watch.warn(
                    f"ran {compiled} compiled training forwards over "
                    f"{UNSTEPPED_WARN_AFTER} optimizer steps"
                )
