"""The experts' compute: SwiGLU MLPs over the expert slices of the sorted pairs.

Shape legend: T tokens, D model dim, E experts, F expert hidden, G = 2F (the fused gate|up
projection), P token-expert pairs sorted by expert (``moe_router.dispatch.sort_pairs``),
N pairs of one expert.

Two paths over the same slices, picked by ``MoELayer`` from its ``backend`` and the device:

- :func:`run_experts_grouped`: gather all P rows, gate and up projections as one [E, D, 2F]
  grouped matmul, the gated SiLU, the down projection, then the weighted combine
  (``moe_router.dispatch``). The accelerator path.
- :func:`run_experts_per_slice`: each expert's whole MLP on its own slice, accumulated in
  place. The CPU path (and ``backend="loop"``), with the combine weight folded into the
  activation by a C++ kernel (``_WeightedGatedSiLU``: step 4's scaling on [N, F] instead of
  [N, D]).

The gated SiLU is a small autograd Function (``_GatedSiLU``) that allocates fewer [P, F]
intermediates than the plain composition; both Functions are checked by gradcheck, and the
paths by the layer-vs-naive-loop tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_router.dispatch import (
    SortedPairs,
    _GatherSlices,
    _WeightedScatterAdd,
    grouped_matmul,
    grouped_mm_available,
    slice_sizes,
)
from moe_router.ops import threshold_cpp
from moe_router.ops.soft_topk import cpp_kernels_serve

__all__ = ["SwiGLU", "run_experts_grouped", "run_experts_per_slice"]


class _GatedSiLU(torch.autograd.Function):
    """``silu(gate) * up`` of a fused ``[P, 2F]`` gate|up projection, without the copies.

    Autograd's composition of ``chunk``, ``silu`` and ``*`` keeps ``silu(gate)`` and ``up``,
    and in backward allocates three [P, F] products plus a [P, 2F] concatenation of the two
    halves' gradients. This keeps only its input and writes both halves' gradients straight
    into one [P, 2F] buffer.
    """

    @staticmethod
    def forward(ctx, gate_up_PG):
        gate_PF, up_PF = gate_up_PG.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up_PG)
        return F.silu(gate_PF).mul_(up_PF)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_PF):
        (gate_up_PG,) = ctx.saved_tensors
        gate_PF, up_PF = gate_up_PG.chunk(2, dim=-1)
        grad_PG = torch.empty_like(gate_up_PG)
        grad_gate_PF, grad_up_PF = grad_PG.chunk(2, dim=-1)
        sig_PF = torch.sigmoid(gate_PF)
        # In-place on the halves of one buffer (copy_ then mul_: `out=` a strided view is what
        # torch.compile cannot trace).
        grad_up_PF.copy_(gate_PF).mul_(sig_PF).mul_(grad_PF)  # d up = grad * silu(gate)
        # d gate = grad * up * silu'(gate), silu' = s + gate * s * (1 - s), s = sigmoid(gate)
        grad_gate_PF.copy_(gate_PF).mul_(sig_PF)
        one_minus_sig_PF = sig_PF.neg_().add_(1)
        grad_gate_PF.mul_(one_minus_sig_PF).sub_(one_minus_sig_PF).add_(1)
        grad_gate_PF.mul_(up_PF).mul_(grad_PF)
        return grad_PG


class _WeightedGatedSiLU(torch.autograd.Function):
    """``silu(gate) * up * weight[:, None]``: :class:`_GatedSiLU` with the combine weight
    folded in, through the C++ kernels (CPU float32 / float64) in one pass each way.

    Scaling the [N, F] hidden by the weight instead of the [N, D] expert output is the same
    product (``(h w) W2 = (h W2) w``), on fewer entries when F < D, and its weight gradient is
    a dot product over F. The reference is ``_GatedSiLU.apply(gate_up) * weight[:, None]``
    (tested against it and by gradcheck).
    """

    @staticmethod
    def forward(ctx, gate_up_NG, weight_N):
        ctx.weight_dtype = weight_N.dtype  # its gradient goes back in it (fp32 weights, fp64 x)
        weight_N = weight_N.to(gate_up_NG.dtype)
        ctx.save_for_backward(gate_up_NG, weight_N)
        return threshold_cpp.gated_silu_forward(gate_up_NG, weight_N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_NF):
        gate_up_NG, weight_N = ctx.saved_tensors
        grad_NG, grad_weight_N = threshold_cpp.gated_silu_backward(gate_up_NG, weight_N, grad_NF)
        return grad_NG, grad_weight_N.to(ctx.weight_dtype)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward ``(silu(x W1) * (x W3)) W2`` (the shared expert).

    Args:
        d_model: D.
        d_ff: F.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1_DF = nn.Parameter(torch.empty(d_model, d_ff))
        self.w3_DF = nn.Parameter(torch.empty(d_model, d_ff))
        self.w2_FD = nn.Parameter(torch.empty(d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform init with nn.Linear's bounds (1/sqrt(fan_in))."""
        for weight in (self.w1_DF, self.w3_DF, self.w2_FD):
            bound = 1.0 / math.sqrt(weight.shape[0])
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``."""
        return (F.silu(x @ self.w1_DF) * (x @ self.w3_DF)) @ self.w2_FD

    def extra_repr(self) -> str:
        return f"d_model={self.w1_DF.shape[0]}, d_ff={self.w1_DF.shape[1]}"


def run_experts_grouped(
    x_TD: Tensor,
    pairs: SortedPairs,
    valid_TK: Tensor | None,
    w1_EDF: Tensor,
    w3_EDF: Tensor,
    w2_EFD: Tensor,
    backend: str,
    sums_ED: Tensor | None = None,
) -> Tensor:
    """Every expert's MLP as grouped matmuls over all the sorted pairs, then the combine.

    Args:
        x_TD: Token rows.
        pairs: The pairs sorted by expert.
        valid_TK: Slots that carry compute; None when every slot does (no masking).
        w1_EDF, w3_EDF, w2_EFD: Expert weights (gate, up, down projections).
        backend: ``auto`` or ``grouped_mm`` (see :func:`~moe_router.dispatch.grouped_matmul`).
        sums_ED: None, or an fp32 ``[E, D]`` tensor that receives each expert's sum of
            ``weight * output`` over its pairs (no gradient).

    Returns:
        ``[T, D]`` in fp32 (fp64 for fp64 input).
    """
    num_experts = w1_EDF.shape[0]
    offsets_E = pairs.counts_E1[:num_experts].cumsum(0).to(torch.int32)
    xs_PD = x_TD.index_select(0, pairs.token_P)
    in_slice_P = None
    if valid_TK is not None:
        # Rows past the last slice are left uninitialised by the grouped kernel, in forward
        # and in backward. Selects (not multiplications, which would turn garbage into NaN)
        # fence them off: a `where` on the kernel's input, so that no garbage gradient
        # reaches x, and the combine's own select on its output, so that neither y nor the
        # weights' gradient (a dot product with the output row) sees garbage.
        in_slice_P = valid_TK.reshape(-1)[pairs.order_P]
        xs_PD = torch.where(in_slice_P.unsqueeze(-1), xs_PD, 0)
    # Gate and up projections as one [E, D, 2F] grouped matmul: one pass over the gathered
    # rows, and one input gradient in backward instead of two summed. `.to` is a no-op
    # unless autocast-style mixed precision keeps fp32 master weights.
    w13_EDG = torch.cat([w1_EDF, w3_EDF], dim=-1).to(x_TD.dtype)
    w2_EFD = w2_EFD.to(x_TD.dtype)
    # The matmuls share one host read of the slice sizes where the kernel does not apply and
    # grouped_matmul loops (see slice_sizes: reading them per call breaks inductor's backward).
    sizes = None
    if not grouped_mm_available(xs_PD, w13_EDG):
        sizes = slice_sizes(offsets_E, xs_PD.shape[0])
    h_PF = _GatedSiLU.apply(grouped_matmul(xs_PD, w13_EDG, offsets_E, backend, sizes=sizes))
    ys_PD = grouped_matmul(h_PF, w2_EFD, offsets_E, backend, sizes=sizes)
    # Combine in fp32 (the weights are fp32) and cast once at the end.
    num_tokens = x_TD.shape[0]
    if sums_ED is not None:
        with torch.no_grad():
            weighted_PD = ys_PD.float() * pairs.weight_P.float().unsqueeze(-1)
            if in_slice_P is not None:
                weighted_PD = torch.where(in_slice_P.unsqueeze(-1), weighted_PD, 0)
            expert_P = torch.repeat_interleave(
                torch.arange(num_experts + 1, device=x_TD.device),
                pairs.counts_E1,
                output_size=ys_PD.shape[0],
            )
            sums_E1D = torch.zeros(num_experts + 1, sums_ED.shape[-1], device=x_TD.device)
            sums_ED += sums_E1D.index_add_(0, expert_P, weighted_PD)[:num_experts]
    return _WeightedScatterAdd.apply(ys_PD, pairs.weight_P, pairs.token_P, in_slice_P, num_tokens)


def run_experts_per_slice(
    x_TD: Tensor,
    pairs: SortedPairs,
    w1_EDF: Tensor,
    w3_EDF: Tensor,
    w2_EFD: Tensor,
    sums_ED: Tensor | None = None,
) -> Tensor:
    """Each expert's whole MLP on its slice of the sorted pairs, accumulated in place.

    The CPU path (and ``backend="loop"``): the slice sizes are read on the host once (free
    on CPU; one sync on an accelerator). Working one expert at a time keeps every
    intermediate at [pairs of one expert, ...], memory the allocator reuses, where the
    grouped path materialises [P, 2F] and [P, D] products that are fresh, page-faulted
    memory on every call; faster on CPU at every shape of the layer benchmark
    (docs/results.md).
    The input rows go through one ``_GatherSlices``: per-expert gathers whose gradients
    land in one [T, D] tensor, where autograd's per-expert gathers would zero and sum E
    full [T, D] gradients (a large share of the layer's time at E = 64). Pairs without
    compute (key E) form the last split and are never touched.

    Args:
        x_TD: Token rows.
        pairs: The pairs sorted by expert.
        w1_EDF, w3_EDF, w2_EFD: Expert weights (gate, up, down projections).
        sums_ED: As for :func:`run_experts_grouped`.

    Returns:
        ``[T, D]`` in fp32 (fp64 for fp64 input).
    """
    num_experts = w1_EDF.shape[0]
    token_P, weight_P = pairs.token_P, pairs.weight_P
    sizes = pairs.counts_E1.tolist()
    dtype = torch.promote_types(x_TD.dtype, weight_P.dtype)
    y_TD = torch.zeros(x_TD.shape, device=x_TD.device, dtype=dtype)
    # One [D, 2F] matmul per expert for gate and up is faster than two [D, F] ones, but
    # needs the [E, D, 2F] concatenation (a copy of those weights and of their gradients
    # per step): worth it while that copy is no bigger than the pairs' activations (the
    # rule the layer benchmark's shapes bear out, docs/results.md).
    fuse = num_experts * x_TD.shape[-1] <= token_P.shape[0]
    w2_EFD = w2_EFD.to(x_TD.dtype)
    if fuse:
        w_up = (torch.cat([w1_EDF, w3_EDF], dim=-1).to(x_TD.dtype).unbind(0),)
    else:
        w_up = tuple(w.to(x_TD.dtype).unbind(0) for w in (w1_EDF, w3_EDF))
    # split / unbind: their backward concatenates / stacks once instead of adding E
    # zero-padded full-size gradients.
    # The rows of every computed pair, one slice per expert, with one [T, D] gradient.
    computed = token_P.shape[0] - sizes[-1]
    x_slices = _GatherSlices.apply(x_TD, token_P[:computed], sizes[:num_experts])
    slices = zip(
        token_P.split(sizes)[:num_experts],
        x_slices,
        weight_P.split(sizes)[:num_experts],
        w2_EFD.unbind(0),
        *w_up,
        strict=True,
    )
    # The combine weight folded into the activation (a [N, F] scaling, not [N, D]) where
    # the C++ kernel serves the projection's dtype (fp32 / fp64, i.e. the combine's dtype;
    # not under a bf16 autocast, whose matmuls return bf16).
    fold = fuse and cpp_kernels_serve(x_TD)
    for expert, (token_N, x_ND, weight_N, w2_FD, *w_up_D) in enumerate(slices):
        # N = pairs of one expert
        if not fuse:
            h_NF = F.silu(x_ND @ w_up_D[0]) * (x_ND @ w_up_D[1])
        else:
            gate_up_NG = x_ND @ w_up_D[0]
            if fold and gate_up_NG.dtype == dtype:
                h_NF = _WeightedGatedSiLU.apply(gate_up_NG, weight_N)
                weighted_ND = h_NF @ w2_FD
                y_TD.index_add_(0, token_N, weighted_ND)
                if sums_ED is not None:
                    sums_ED[expert] += weighted_ND.detach().float().sum(0)
                continue
            h_NF = _GatedSiLU.apply(gate_up_NG)
        weighted_ND = (h_NF @ w2_FD).to(dtype) * weight_N.unsqueeze(-1)
        y_TD.index_add_(0, token_N, weighted_ND)
        if sums_ED is not None:
            sums_ED[expert] += weighted_ND.detach().float().sum(0)
    return y_TD
