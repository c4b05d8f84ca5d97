"""One way to read what the routers of any model decided: our transformer, a user's own model
or a Hugging Face model patched by ``replace_routers``.

Every :class:`~moe_router.router.Router` keeps the record of its latest forward
(``Router.last_routing``; an ``MoELayer`` stores its record with the capacity drops applied).
After the model's forward::

    loss = lm_loss + moe_router.aux_loss(model)      # every layer's scaled aux losses
    for name, routing in moe_router.routings(model).items():
        ...                                          # loads, drops, overflow per layer

A stored record holds its autograd graph until the router's next forward replaces it (or the
graph is freed by ``backward``); it is never saved in a checkpoint, copied by ``deepcopy`` or
pickled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from moe_router.router import Router
from moe_router.routing import Routing

__all__ = ["aux_loss", "routings", "sum_aux_losses"]


def routings(model: nn.Module) -> dict[str, Routing]:
    """The record of each router's latest forward, in module order.

    Args:
        model: Any module holding routers (the router itself included).

    Returns:
        ``{name: record}`` keyed by the module that owns the router (its qualified name,
        without the trailing ``.router``); routers that have not run yet are left out.

    Raises:
        ValueError: If ``model`` holds no router.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]
    if not found:
        raise ValueError(f"model={type(model).__name__} holds no moe_router Router")
    return {
        _owner(name): router.last_routing
        for name, router in found
        if router.last_routing is not None
    }


def _owner(name: str) -> str:
    """``blocks.0.ffn.router`` -> ``blocks.0.ffn``; ``router`` -> ``""`` (the model itself)."""
    if name == "router" or name.endswith(".router"):
        return name[: -len("router")].rstrip(".")
    return name


def aux_loss(model: nn.Module) -> Tensor:
    """The sum of every router's auxiliary losses (already scaled) from its latest forward.

    Add it to the training loss: ``loss = task_loss + moe_router.aux_loss(model)``; it is 0
    when no aux loss coefficient is set.

    Args:
        model: Any module holding routers.

    Returns:
        A differentiable fp32 scalar.

    Raises:
        ValueError: If ``model`` holds no router or no router has run yet.
    """
    return sum_aux_losses(routings(model).values(), model)


def sum_aux_losses(records: Iterable[Routing], model: nn.Module) -> Tensor:
    """The sum of the records' scaled aux losses (on the first record's device).

    Args:
        records: Routing records (one per layer).
        model: The model they come from (for the error).

    Raises:
        ValueError: If there is no record.
    """
    records = list(records)
    if not records:
        raise ValueError(
            f"no routing recorded yet in model={type(model).__name__}: run a forward first"
        )
    device = records[0].logits_TE.device
    return torch.stack([record.aux_loss.to(device) for record in records]).sum()
