"""Dropless token dispatch: pairs sorted by expert, gathered into slices, combined back.

Shape legend: T tokens, D model dim, E experts, K selected slots per token, P = T*K
token-expert pairs (assignments), N pairs of one expert, I / O a matmul's input / output width.

The layer (``moe_router.moe.MoELayer``) flattens the routing to P pairs and sorts them by
expert id (:func:`sort_pairs`: pairs that carry no compute, i.e. invalid slots of a sparse gate,
padding tokens and capacity drops, sort behind every expert), so that the token rows gathered
in that order give each expert one contiguous slice. The experts (``moe_router.experts``) run
on the slices, either as grouped matmuls (:func:`grouped_matmul`: torch's ``grouped_mm`` kernel
where it supports the device and dtype, else one matmul per slice) or one expert at a time;
each row is then scaled by its combine weight and scatter-added back to its token.

At fine-grained shapes the [P, D] intermediates, not the matmuls, dominate the time outside
the FLOP floor on CPU, so the gather and the combine are small autograd Functions
(``_GatherSlices``, ``_WeightedScatterAdd``) that allocate fewer of them than the plain
composition; both are checked by gradcheck and by the layer-vs-naive-loop tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_router.config import GROUPED_MM_BACKENDS

__all__ = [
    "SortedPairs",
    "capacity_keep_mask",
    "grouped_matmul",
    "grouped_mm_available",
    "slice_sizes",
    "sort_pairs",
]

_grouped_mm_op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class SortedPairs(NamedTuple):
    """The token-expert pairs in expert order (see :func:`sort_pairs`).

    Attributes:
        order_P: Flat ``T*K`` index of each pair, sorted by expert (stable: token order within
            an expert).
        token_P: Token of each pair, same order.
        weight_P: Combine weight of each pair, same order.
        counts_E1: Pairs per expert, then the count of pairs without compute (key E).
    """

    order_P: Tensor
    token_P: Tensor
    weight_P: Tensor
    counts_E1: Tensor


def sort_pairs(
    expert_ids_TK: Tensor, weights_TK: Tensor, valid_TK: Tensor | None, num_experts: int
) -> SortedPairs:
    """Sort the token-expert pairs by expert, the pairs without compute last.

    Args:
        expert_ids_TK: Selected experts.
        weights_TK: Combine weights.
        valid_TK: Slots that carry compute, or None when every slot does (skips the masking).
        num_experts: E.

    Returns:
        The :class:`SortedPairs`; no host sync.
    """
    num_slots = expert_ids_TK.shape[1]
    key_P = expert_ids_TK.reshape(-1)  # (T*K,)
    if valid_TK is not None:
        # Pairs with no compute get key E, so they sort behind every expert's slice.
        key_P = torch.where(valid_TK.reshape(-1), key_P, num_experts)
    order_P = key_P.argsort(stable=True)
    token_P = order_P.div(num_slots, rounding_mode="floor")
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=key_P.device)
    counts_E1.scatter_add_(0, key_P, torch.ones_like(key_P))
    weight_P = weights_TK.reshape(-1)[order_P]
    return SortedPairs(order_P, token_P, weight_P, counts_E1)


def grouped_mm_available(x: Tensor, w_EIO: Tensor) -> bool:
    """Whether torch's grouped matmul kernel handles these operands.

    CUDA kernels need bf16 on compute capability >= 8.0; the CPU kernel takes fp32 / bf16 /
    fp16. Both need the row strides to be multiples of 16 bytes.

    Args:
        x: The ``[P, I]`` left operand.
        w_EIO: The ``[E, I, O]`` expert weights.
    """
    if _grouped_mm_op is None or x.dtype != w_EIO.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # the kernel's meta function (what torch.compile traces) demands bf16
    itemsize = x.element_size()
    if (x.shape[-1] * itemsize) % 16 or (w_EIO.shape[-1] * itemsize) % 16:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return False


def slice_sizes(offsets_E: Tensor, num_rows: int) -> list[int]:
    """Host-side row counts of the expert slices, then of the tail past the last one.

    Reads ``offsets_E`` once (free on CPU, one sync on an accelerator). A layer that runs
    several grouped matmuls over the same slices reads them once and passes the list to each:
    under ``torch.compile`` every read creates fresh unbacked sizes, and inductor cannot
    generate the backward of a graph whose saved slices are differences of sizes read apart
    (``expected [u6, u7] to have been codegen-ed``).

    Args:
        offsets_E: int32 end offset of each expert's slice.
        num_rows: P, rows of the left operand.

    Returns:
        E + 1 sizes summing to P.
    """
    ends = offsets_E.tolist()
    return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)] + [
        num_rows - ends[-1]
    ]


def grouped_matmul(
    x_PI: Tensor,
    w_EIO: Tensor,
    offsets_E: Tensor,
    backend: str = "auto",
    *,
    sizes: list[int] | None = None,
) -> Tensor:
    """``out[rows of expert e] = x[rows of expert e] @ w[e]`` for contiguous expert slices.

    Rows ``offsets[e-1]:offsets[e]`` belong to expert e. Rows past ``offsets[-1]`` are
    unspecified in the output (the kernel leaves them uninitialised): callers mask them.

    Args:
        x_PI: Rows sorted by expert.
        w_EIO: One ``[I, O]`` matrix per expert.
        offsets_E: int32 end offset of each expert's slice (inclusive cumsum of the counts).
        backend: ``grouped_mm`` (torch's kernel), ``loop`` (one matmul per expert slice; the
            CPU reference, and the fallback where the kernel does not apply) or ``auto``.
        sizes: ``slice_sizes(offsets_E, P)`` when the caller already read them; the loop
            reads them from ``offsets_E`` otherwise.

    Returns:
        ``[P, O]`` in x's dtype.

    Raises:
        ValueError: If ``backend`` is unknown, or ``grouped_mm`` is requested but unavailable.
    """
    if backend not in GROUPED_MM_BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: one of {GROUPED_MM_BACKENDS}")
    use_kernel = grouped_mm_available(x_PI, w_EIO)
    if backend == "grouped_mm" and not use_kernel:
        raise ValueError(
            f"backend='grouped_mm' is unavailable for dtype={x_PI.dtype} on {x_PI.device} "
            f"(I={x_PI.shape[-1]}, O={w_EIO.shape[-1]})"
        )
    if use_kernel and backend != "loop":
        return _grouped_mm_op(x_PI, w_EIO, offs=offsets_E)
    # One matmul per expert slice. Slice bounds must live on the host: free on CPU, one sync
    # on an accelerator without a grouped kernel.
    if sizes is None:
        sizes = slice_sizes(offsets_E, x_PI.shape[0])
    # split / unbind rather than slicing and indexing: their backward concatenates / stacks
    # the pieces once instead of adding E zero-padded full-size gradients.
    *x_slices, x_tail = x_PI.split(sizes)
    pieces = [x_NI @ w_IO for x_NI, w_IO in zip(x_slices, w_EIO.unbind(0), strict=True)]
    tail = x_tail.new_zeros(x_tail.shape[0], w_EIO.shape[-1])
    return torch.cat([*pieces, tail])


def capacity_keep_mask(
    expert_ids_TK: Tensor,
    valid_TK: Tensor,
    priority_TK: Tensor | None,
    num_experts: int,
    capacity: int,
) -> Tensor:
    """Which assignments fit under a per-expert capacity.

    Each expert keeps its ``capacity`` assignments of highest priority; ties (and
    ``priority_TK=None``, the "by position" policy) go to the earlier token, then the earlier
    slot. Fully vectorised: three sorts, no host sync.

    Args:
        expert_ids_TK: Selected experts.
        valid_TK: Assignments that exist (invalid ones are never kept and take no room).
        priority_TK: Higher is kept first (e.g. the gate score), or None for token order.
        num_experts: E.
        capacity: Assignments each expert can take.

    Returns:
        Bool ``[T, K]``: valid assignments that fit.
    """
    num_pairs = expert_ids_TK.numel()
    key_P = torch.where(valid_TK, expert_ids_TK, num_experts).reshape(-1)
    order_P = torch.arange(num_pairs, device=key_P.device)
    if priority_TK is not None:
        # Stable sorts: by priority (descending) first, then by expert keeps that order within
        # each expert and breaks ties by position.
        order_P = priority_TK.reshape(-1).argsort(descending=True, stable=True)
    order_P = order_P[key_P[order_P].argsort(stable=True)]
    key_sorted_P = key_P[order_P]
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=key_P.device)
    counts_E1.scatter_add_(0, key_P, torch.ones_like(key_P))
    starts_E1 = counts_E1.cumsum(0) - counts_E1
    rank_sorted_P = torch.arange(num_pairs, device=key_P.device) - starts_E1[key_sorted_P]
    # Back to pair order by a gather through the inverse permutation: inductor scheduled the
    # equivalent scatter after the comparison that reads it (torch 2.13, CPU), so a compiled
    # layer kept every assignment.
    rank_P = rank_sorted_P[order_P.argsort()]
    return valid_TK & (rank_P.view_as(valid_TK) < capacity)


# Rows of the combine's fp32 temporary per step: small blocks stay in the allocator's reused
# heap, where one [P, D] temporary would be fresh (page-faulted) memory on every call.
_COMBINE_BLOCK_BYTES = 4 << 20


class _WeightedScatterAdd(torch.autograd.Function):
    """``y[token[p]] += weight[p] * rows[p]`` in fp32, over the rows where ``valid[p]``.

    The plain composition (``rows * weight`` then ``index_add_``) allocates a [P, D] product in
    forward and three more [P, D] tensors in backward (the gathered gradient, its product with
    the weights, its product with the rows). Here forward accumulates block by block, and
    backward gathers the gradient once, takes the weights' gradient as a batched dot product
    and scales the gathered gradient in place.
    """

    @staticmethod
    def forward(ctx, rows_PD, weight_P, token_P, valid_P, num_tokens):
        num_rows, width = rows_PD.shape
        # fp32 at least (bf16 rows, fp32 weights); fp64 stays fp64.
        dtype = torch.promote_types(rows_PD.dtype, weight_P.dtype)
        y_TD = torch.zeros(num_tokens, width, device=rows_PD.device, dtype=dtype)
        block = max(1, _COMBINE_BLOCK_BYTES // (4 * width))
        for start in range(0, num_rows, block):
            stop = min(start + block, num_rows)
            part_ND = rows_PD[start:stop].to(dtype) * weight_P[start:stop].unsqueeze(-1)
            if valid_P is not None:
                part_ND = torch.where(valid_P[start:stop].unsqueeze(-1), part_ND, 0)
            y_TD.index_add_(0, token_P[start:stop], part_ND)
        ctx.save_for_backward(rows_PD, weight_P, token_P, valid_P)
        return y_TD

    @staticmethod
    def backward(ctx, grad_TD):
        rows_PD, weight_P, token_P, valid_P = ctx.saved_tensors
        grad_PD = grad_TD.index_select(0, token_P)
        grad_weight_P = None
        if ctx.needs_input_grad[1]:
            rows_P1D = rows_PD.to(grad_PD.dtype).unsqueeze(1)
            grad_weight_P = torch.bmm(rows_P1D, grad_PD.unsqueeze(-1)).view(-1)
            if valid_P is not None:
                grad_weight_P = torch.where(valid_P, grad_weight_P, 0)
        grad_rows_PD = None
        if ctx.needs_input_grad[0]:
            grad_rows_PD = grad_PD.mul_(weight_P.unsqueeze(-1))
            if valid_P is not None:
                grad_rows_PD.masked_fill_(~valid_P.unsqueeze(-1), 0)
            grad_rows_PD = grad_rows_PD.to(rows_PD.dtype)
        return grad_rows_PD, grad_weight_P, None, None, None


class _GatherSlices(torch.autograd.Function):
    """``x[token[p]]`` for the pairs of each expert: one ``[N_e, D]`` tensor per expert.

    The composition (one ``index_select``, then ``split``) has a backward that concatenates
    the E slices' gradients into a fresh [P, D] tensor and then scatters it; here each slice's
    gradient is scattered straight into the [T, D] input gradient. The forward gathers each
    slice on its own: one [P, D] block at layer sizes is above glibc's largest mmap threshold
    (32 MiB), so every call would map it fresh and page-fault through it, where the
    per-expert slices come from the allocator's reused heap (timings: docs/results.md).
    """

    @staticmethod
    def forward(ctx, x_TD, token_P, sizes):
        ctx.save_for_backward(token_P)
        ctx.sizes = sizes
        ctx.num_tokens = x_TD.shape[0]
        return tuple(x_TD.index_select(0, token_N) for token_N in token_P.split(sizes))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads_ND):
        (token_P,) = ctx.saved_tensors
        grad_TD = None
        for token_N, grad_ND in zip(token_P.split(ctx.sizes), grads_ND, strict=True):
            if grad_ND is None:
                continue
            if grad_TD is None:
                grad_TD = grad_ND.new_zeros(ctx.num_tokens, grad_ND.shape[-1])
            grad_TD.index_add_(0, token_N, grad_ND)
        return grad_TD, None, None
