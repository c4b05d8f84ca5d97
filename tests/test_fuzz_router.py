"""Fuzzing above the operator: random gates x options x dtypes x masks x non-finite tokens x
empty batches through the router and the layer. Every input either routes correctly or is a
clear ``ValueError``; nothing is silent.

Checked for every routed input: fp32 records; padding tokens get nothing and count nowhere;
finite real tokens get finite, non-negative weights on distinct experts, and exactly what they
get when the non-finite tokens are masked out instead (a non-finite token reaches only its own
output); a non-finite real token is visible (a NaN weight), never a silent empty routing; the
loads count the valid slots; the layer's outputs follow the same rules; after ``step()`` every
piece of router state is finite.
"""

from __future__ import annotations

import random

import pytest
import torch

from moe_router import MoELayer
from moe_router.config import COMMON_OPTIONS, GATE_SPECS, GATES

CASES = 240
D, E = 16, 8

# Values to draw for each option (the first is the default).
CHOICES = {
    "score_func": ["softmax", "sigmoid"],
    "method": ["sigmoid", "laplace", "exp", "sparse"],
    "renormalize": [False, True],
    "score_scale": [1.0, 2.5],
    "max_active": [None, 4, 8],
    "target_active": [None, 1.5, 3.0],
    "balance_target": ["load", "mass"],
    "balance_window": [None, 40],
    "tau": [1.0, 0.3],
    "tau_schedule": ["fixed", "anneal", "learned"],
    "anneal_steps": [None, 5],
    "jitter_eps": [0.0, 0.1],
    "num_groups": [1, 2],
    "topk_groups": [None, 1],
    "aux_loss_coef": [0.0, 0.01],
    "seq_aux_loss_coef": [0.0, 0.01],
    "z_loss_coef": [0.0, 0.001],
    "expert_bias": [False, True],
}


def draw_settings(rng: random.Random) -> dict:
    gate = rng.choice(GATES)
    readable = GATE_SPECS[gate].options | COMMON_OPTIONS
    settings = {"gate": gate, "k": rng.choice([1, 2, 3])}
    for name, values in CHOICES.items():
        if name in readable and rng.random() < 0.35:
            settings[name] = rng.choice(values)
    return settings


def draw_input(rng: random.Random, dtype: torch.dtype):
    batch, seq = rng.choice([(0, 5), (1, 1), (2, 5), (3, 13), (1, 64)])
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(batch, seq, D, generator=generator)
    padding = None
    if batch * seq and rng.random() < 0.5:
        padding = torch.rand(batch, seq, generator=generator) < 0.3
    bad = torch.zeros(batch, seq, dtype=torch.bool)
    if batch * seq and rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            b, s = rng.randrange(batch), rng.randrange(seq)
            x[b, s, rng.randrange(D)] = rng.choice([float("nan"), float("inf"), -float("inf")])
            bad[b, s] = True
    return x.to(dtype), padding, bad


def check_record(routing, padding_T, bad_T, reference):
    assert routing.weights_TK.dtype == torch.float32 and routing.scores_TE.dtype == torch.float32
    valid_TK, weights_TK = routing.valid_TK, routing.weights_TK
    if padding_T is not None:
        assert not valid_TK[padding_T].any() and (weights_TK[padding_T] == 0).all()
    real_T = ~bad_T if padding_T is None else ~bad_T & ~padding_T
    good_TK = weights_TK[real_T]
    assert good_TK.isfinite().all() and (good_TK >= 0).all()
    ids_TK = torch.where(valid_TK, routing.expert_ids_TK, -1 - torch.arange(valid_TK.shape[1]))
    assert (ids_TK.sort(-1).values.diff(dim=-1) != 0).all()  # distinct experts per token
    loads = torch.zeros(routing.num_experts).index_add_(
        0, routing.expert_ids_TK[valid_TK], torch.ones(int(valid_TK.sum()))
    )
    torch.testing.assert_close(routing.tokens_per_expert_E, loads)
    poisoned_T = bad_T if padding_T is None else bad_T & ~padding_T
    for t in poisoned_T.nonzero().flatten().tolist():
        # visible, or routed as a finite token (an inf that cancelled to a finite logit)
        assert not weights_TK[t].isfinite().all() or valid_TK[t].any(), t
    if reference is not None:
        torch.testing.assert_close(weights_TK[real_T], reference.weights_TK[real_T])


def run_case(rng: random.Random) -> str:
    torch.manual_seed(rng.randrange(2**31))  # the layer's init, whatever ran before
    settings = draw_settings(rng)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float64])
    try:
        layer = MoELayer(d_model=D, d_ff=8, num_experts=E, **settings)
    except ValueError:
        return "refused"
    router = layer.router
    x, padding, bad = draw_input(rng, dtype)
    padding_T = None if padding is None else padding.reshape(-1)
    bad_T = bad.reshape(-1)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            # The batch with its non-finite tokens masked out: what the others must still get.
            reference = None
            if bad_T.any() and not router.config.jitter_eps:
                masked = bad if padding is None else bad | padding
                state = {key: value.clone() for key, value in router.state_dict().items()}
                reference = router(torch.where(masked.unsqueeze(-1), 0.0, x), masked)
                router.load_state_dict(state)
            y, routing = layer(x, padding_mask=padding, return_routing=True)
        check_record(routing, padding_T, bad_T, reference)
        y_TD = y.reshape(-1, D).float()
        real_T = ~bad_T if padding_T is None else ~bad_T & ~padding_T
        assert y.dtype == x.dtype and y_TD[real_T].isfinite().all()
        if padding_T is not None:
            assert (y_TD[padding_T] == 0).all()
        if mode == "train":
            router.step()
            for name, buffer in router.named_buffers():
                if buffer.is_floating_point():
                    # -inf in the window's logits marks an expert outside a token's groups
                    allowed = buffer == -float("inf") if "window_logits" in name else False
                    assert (buffer.isfinite() | allowed).all(), name
    return "routed"


@pytest.mark.parametrize("block", range(4))
def test_router_and_layer_fuzz(block):
    rng = random.Random(1000 + block)
    outcomes = [run_case(rng) for _ in range(CASES // 4)]
    assert outcomes.count("routed") >= len(outcomes) // 2  # most draws are valid settings
