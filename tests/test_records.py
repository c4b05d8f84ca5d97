"""moe_router.routings / moe_router.aux_loss: one way to read every model's routing."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import moe_router
from moe_router import MoELayer, Router


class TwoLayers(nn.Module):
    """A user's own model: two MoE layers and a plain router, no records threaded by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.first = MoELayer(d_model=16, d_ff=32, num_experts=8, k=2, gate="topk", z_loss_coef=0.1)
        self.second = MoELayer(
            d_model=16, d_ff=32, num_experts=8, k=2, gate="soft_topk", aux_loss_coef=0.01
        )

    def forward(self, x):
        return self.second(self.first(x))


def test_records_of_a_users_model_in_module_order():
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(2, 6, 16)
    y = model(x)
    records = moe_router.routings(model)
    assert list(records) == ["first", "second"]
    _, first = model.first(x, return_routing=True)
    torch.testing.assert_close(records["first"].weights_TK, first.weights_TK)
    # the aux loss is the sum of both layers' scaled losses, with its graph
    model(x)
    expected = sum(routing.aux_loss for routing in moe_router.routings(model).values())
    loss = moe_router.aux_loss(model)
    torch.testing.assert_close(loss, expected)
    assert set(moe_router.routings(model)["first"].aux_losses) == {"z_loss"}
    (y.sum() + loss).backward()
    assert model.first.router.weight_ED.grad.abs().sum() > 0


def test_the_layer_stores_the_record_with_its_capacity_drops():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, 2, gate="topk", capacity_factor=0.5)
    _, returned = layer(torch.randn(24, 16), return_routing=True)
    stored = moe_router.routings(layer)[""]
    assert stored is returned and stored.num_dropped > 0 and stored.capacity is not None


def test_no_router_or_no_forward_is_a_clear_error():
    with pytest.raises(ValueError, match="holds no moe_router Router"):
        moe_router.routings(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no routing recorded yet"):
        moe_router.aux_loss(Router(d_model=16, num_experts=8, k=2))


def test_a_model_with_records_deepcopies_and_pickles():
    model = TwoLayers()
    model(torch.randn(4, 16)).sum()  # records now hold autograd graphs
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert moe_router.routings(clone) == {}
        clone(torch.randn(4, 16))
        assert list(moe_router.routings(clone)) == ["first", "second"]
    assert list(moe_router.routings(model)) == ["first", "second"]  # the original keeps its own
