"""Hugging Face transformers' MoE blocks with our layer's weights, for the layer benchmark.

Each block is built from a small config of the benchmark's shape, gets the router and expert
weights of one of our ``topk`` layers copied in, and is checked to give the same output as
that layer (forward, and the input gradient) before it is timed:

* Mixtral (``MixtralSparseMoeBlock``): softmax, top-K, renormalised (our ``renormalize=True``);
  experts ``eager`` (a Python loop over the experts hit, gather / matmuls / ``index_add_``) and
  ``grouped_mm`` (sort by expert, ``torch.nn.functional.grouped_mm``, un-permute, sum over K).
* Qwen2-MoE (``Qwen2MoeSparseMoeBlock``): softmax, top-K, not renormalised; its shared expert
  is given width 0 so that the block computes exactly the routed layer (it still runs the
  shared expert's sigmoid gate, a [T, D] x [D, 1] product).
* OLMoE (``OlmoeSparseMoeBlock``): softmax, top-K, not renormalised.

Shape legend: T tokens, D model dim, E experts, K selected, F expert hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_router.moe import MoELayer


def transformers_version() -> str | None:
    """The installed transformers version, or None."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _copy_weights(block: nn.Module, layer: MoELayer) -> None:
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight_ED)
        experts = block.experts
        # HF stores [E, 2F, D] (gate rows then up rows) and [E, D, F]; ours [E, D, F] / [E, F, D].
        experts.gate_up_proj.copy_(
            torch.cat([layer.w1_EDF.transpose(1, 2), layer.w3_EDF.transpose(1, 2)], dim=1)
        )
        experts.down_proj.copy_(layer.w2_EFD.transpose(1, 2))


def build_hf_blocks(shape: dict, make_layer) -> tuple[list[tuple[str, nn.Module, str]], list[str]]:
    """HF blocks of one shape with our weights, each checked against our layer.

    Args:
        shape: ``{"T", "D", "E", "K", "F"}``.
        make_layer: ``(gate, **options) -> MoELayer`` with the benchmark's seeded weights.

    Returns:
        ``[(name, block taking [T, D] and returning [T, D], note)]`` and the lines describing
        the checks (max |y - ours|, max |grad x - ours|).

    Raises:
        AssertionError: If a block's output or input gradient differs from our layer's.
    """
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    D, E, K, Fh = shape["D"], shape["E"], shape["K"], shape["F"]
    common = {"hidden_size": D, "num_experts_per_tok": K, "hidden_act": "silu"}
    specs = [
        (
            "HF Mixtral (eager)",
            lambda: MixtralSparseMoeBlock(
                MixtralConfig(
                    **common,
                    intermediate_size=Fh,
                    num_local_experts=E,
                    router_jitter_noise=0.0,
                    experts_implementation="eager",
                )
            ),
            True,
        ),
        (
            "HF Mixtral (grouped_mm)",
            lambda: MixtralSparseMoeBlock(
                MixtralConfig(
                    **common,
                    intermediate_size=Fh,
                    num_local_experts=E,
                    router_jitter_noise=0.0,
                    experts_implementation="grouped_mm",
                )
            ),
            True,
        ),
        (
            "HF Qwen2-MoE (eager)",
            lambda: Qwen2MoeSparseMoeBlock(
                Qwen2MoeConfig(
                    **common,
                    moe_intermediate_size=Fh,
                    num_experts=E,
                    norm_topk_prob=False,
                    shared_expert_intermediate_size=0,
                    experts_implementation="eager",
                )
            ),
            False,
        ),
        (
            "HF OLMoE (eager)",
            lambda: OlmoeSparseMoeBlock(
                OlmoeConfig(
                    **common,
                    intermediate_size=Fh,
                    num_experts=E,
                    norm_topk_prob=False,
                    experts_implementation="eager",
                )
            ),
            False,
        ),
    ]
    gen = torch.Generator().manual_seed(1)
    x_TD = torch.randn(min(shape["T"], 512), D, generator=gen)
    grad_TD = torch.randn(x_TD.shape, generator=gen)
    blocks, checks = [], []
    for name, build, renormalize in specs:
        ours = make_layer("topk", renormalize=renormalize)
        block = build()
        _copy_weights(block, ours)
        block.train()

        def run(xi: torch.Tensor, block=block) -> torch.Tensor:
            return block(xi.unsqueeze(0)).squeeze(0)  # HF blocks take [B, S, D]

        x_ours, x_hf = x_TD.clone().requires_grad_(), x_TD.clone().requires_grad_()
        y_ours, y_hf = ours(x_ours), run(x_hf)
        y_ours.backward(grad_TD)
        y_hf.backward(grad_TD)
        y_err = float((y_hf - y_ours).abs().max())
        grad_err = float((x_hf.grad - x_ours.grad).abs().max())
        assert y_err < 1e-5 and grad_err < 1e-5, f"{name} differs from ours: {y_err}, {grad_err}"
        note = "renormalised top-K" if renormalize else ""
        checks.append(
            f"{name}: max |y - ours| {y_err:.1e}, max |grad x - ours| {grad_err:.1e} "
            f"(our topk{', renormalize=True' if renormalize else ''}, {x_TD.shape[0]} tokens)"
        )
        blocks.append((name, run, note))
    return blocks, checks
