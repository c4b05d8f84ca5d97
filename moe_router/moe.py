"""Dropless MoE layer: router, SwiGLU experts, sort-based dispatch and weighted combine.

Shape legend: T tokens, D model dim, E experts, K selected slots per token, F expert hidden,
P = T*K token-expert pairs (assignments).

Dispatch (megablocks / torchtitan style, no token dropped unless a capacity is set):

1. flatten the routing to P pairs and sort them by expert id (pairs that carry no compute —
   invalid slots of a sparse gate, padding tokens, capacity drops — sort behind every expert);
2. gather the token rows in that order, so each expert owns one contiguous slice;
3. run the experts as grouped matmuls over the slices (``torch.nn.functional.grouped_mm`` /
   ``torch._grouped_mm`` where torch supports the device and dtype, else one matmul per
   expert over its slice), gate and up projections as one [E, D, 2F] matmul;
4. scale each row by its combine weight and scatter-add it back to its token.

At fine-grained shapes the [P, D] and [P, F] intermediates, not the matmuls, dominate the
time outside the FLOP floor on CPU, so steps 3-4 use small autograd Functions
(``_GatedSiLU``, ``_WeightedScatterAdd``) that allocate fewer of them than the plain
composition. On CPU the experts run one at a time (``MoELayer._experts_per_slice``), with the
combine weight folded into the activation by a C++ kernel (``_WeightedGatedSiLU``, step 4's
scaling on [N, F] instead of [N, D]). All are checked by gradcheck and by the
layer-vs-naive-loop tests.
G = 2F below.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_router.config import DROP_POLICIES, GROUPED_MM_BACKENDS, MoEConfig, MoEOptions
from moe_router.ops import threshold_cpp
from moe_router.ops.soft_topk import cpp_kernels_serve
from moe_router.router import Router
from moe_router.routing import Routing

__all__ = [
    "DROP_POLICIES",
    "GROUPED_MM_BACKENDS",
    "MoEConfig",
    "MoEOptions",
    "MoELayer",
    "SwiGLU",
    "capacity_keep_mask",
    "grouped_matmul",
    "grouped_mm_available",
    "slice_sizes",
]

_grouped_mm_op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


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
    slot. Fully vectorised: two stable sorts, no host sync.

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
    rank_P = torch.empty_like(rank_sorted_P).scatter_(0, order_P, rank_sorted_P)
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
    slice on its own: one [P, D] block (64 MiB at T = 8192, K = 8, D = 256) is above glibc's
    largest mmap threshold (32 MiB), so every call would map it fresh and page-fault through
    it (measured 68 ms for that gather against 10 ms into reused memory, 1 thread), where the
    per-expert slices come from the allocator's reused heap.
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


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer: router + SwiGLU experts + dropless dispatch.

    Build it from a config (``MoELayer(MoEConfig(256, 512, 8, 2, gate="soft_topk"))``) or, as
    a convenience, from the same arguments (``MoELayer(256, 512, 8, 2, gate="soft_topk",
    tau=0.5)``).

    Args:
        config: A :class:`~moe_router.config.MoEConfig`, or D (``d_model``) followed by
            ``d_ff``, ``num_experts``, ``k`` and any other ``MoEConfig`` field as keywords
            (``gate``, ``shared_d_ff``, ``capacity_factor``, ``tau``, ``renormalize``,
            ``aux_loss_coef``, ``expert_bias``, ...).

    Raises:
        ValueError: On an invalid setting.

    Attributes:
        router: The :class:`~moe_router.router.Router`.
        w1_EDF, w3_EDF, w2_EFD: Routed expert weights (gate, up, down projections).
        shared_expert: The shared :class:`SwiGLU` or None.
    """

    def __init__(
        self,
        config: MoEConfig | int,
        d_ff: int | None = None,
        num_experts: int | None = None,
        k: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            config = MoEConfig(config, d_ff, num_experts, k, **options)
        elif d_ff is not None or num_experts is not None or k is not None or options:
            raise ValueError(
                "MoELayer(config) takes no further arguments: set them in the MoEConfig"
            )
        self.config = config
        d_model, d_ff, num_experts = config.d_model, config.d_ff, config.num_experts
        self.router = Router(config.router_config)
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.shared_expert = SwiGLU(d_model, config.shared_d_ff) if config.shared_d_ff > 0 else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: MoEConfig) -> MoELayer:
        """Build a layer from a :class:`MoEConfig` (the same as ``MoELayer(config)``)."""
        return cls(config)

    def reset_parameters(self) -> None:
        """Expert weights: uniform with nn.Linear's bounds per expert (1/sqrt(fan_in))."""
        for weight in (self.w1_EDF, self.w3_EDF, self.w2_EFD):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)

    def forward(
        self,
        x: Tensor,
        *,
        padding_mask: Tensor | None = None,
        return_routing: bool = False,
    ) -> Tensor | tuple[Tensor, Routing]:
        """Route, run the experts and combine.

        Args:
            x: ``[..., D]`` hidden states in any float dtype.
            padding_mask: Bool over the leading dims of x, True for padding tokens (they get
                no expert; their output is the shared expert's alone, or zero).
            return_routing: Also return the :class:`Routing` record (aux losses, loads, drops).

        Returns:
            y with x's shape and dtype, or ``(y, routing)``.
        """
        config = self.config
        routing = self.router(x, padding_mask=padding_mask)
        x_TD = x.reshape(-1, config.d_model)  # (T, D)
        capacity = config.capacity(x_TD.shape[0])
        if capacity is not None:
            routing = self._apply_capacity(routing, capacity)
        # Static knowledge that every slot carries compute lets the dispatch skip its masks.
        all_valid = (
            padding_mask is None and capacity is None and config.router_config.all_slots_valid
        )
        y_TD = self.experts(
            x_TD,
            routing.expert_ids_TK,
            routing.weights_TK,
            None if all_valid else routing.valid_TK,
        )
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        y = y_TD.view_as(x)
        return (y, routing) if return_routing else y

    def _apply_capacity(self, routing: Routing, capacity: int) -> Routing:
        config = self.config
        priority_TK = None
        if config.drop_policy == "score":
            priority_TK = routing.scores_TE.detach().gather(-1, routing.expert_ids_TK)
        keep_TK = capacity_keep_mask(
            routing.expert_ids_TK, routing.valid_TK, priority_TK, config.num_experts, capacity
        )
        return replace(
            routing,
            weights_TK=routing.weights_TK * keep_TK,
            valid_TK=keep_TK,
            dropped_TK=routing.valid_TK & ~keep_TK,
            capacity=capacity,
        )

    def experts(
        self,
        x_TD: Tensor,
        expert_ids_TK: Tensor,
        weights_TK: Tensor,
        valid_TK: Tensor | None = None,
    ) -> Tensor:
        """Dropless dispatch of the routed experts (the layer minus router and shared expert).

        Args:
            x_TD: Token rows.
            expert_ids_TK: Selected experts.
            weights_TK: fp32 combine weights.
            valid_TK: Slots that carry compute (the others cost no matmul); None when every
                slot does, which skips the masking.

        Returns:
            ``sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` over valid slots, in x's dtype.
        """
        num_tokens, num_slots = expert_ids_TK.shape
        num_experts = self.config.num_experts
        key_P = expert_ids_TK.reshape(-1)  # (T*K,)
        if valid_TK is not None:
            # Pairs with no compute get key E, so they sort behind every expert's slice.
            key_P = torch.where(valid_TK.reshape(-1), key_P, num_experts)
        order_P = key_P.argsort(stable=True)
        token_P = order_P.div(num_slots, rounding_mode="floor")
        counts_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=key_P.device)
        counts_E1.scatter_add_(0, key_P, torch.ones_like(key_P))
        weight_P = weights_TK.reshape(-1)[order_P]
        backend = self.config.backend
        if self._use_per_slice(x_TD):
            return self._experts_per_slice(x_TD, token_P, weight_P, counts_E1).to(x_TD.dtype)
        offsets_E = counts_E1[:num_experts].cumsum(0).to(torch.int32)

        xs_PD = x_TD.index_select(0, token_P)
        in_slice_P = None
        if valid_TK is not None:
            # Rows past the last slice are left uninitialised by the grouped kernel, in forward
            # and in backward. Selects (not multiplications, which would turn garbage into NaN)
            # fence them off: a `where` on the kernel's input, so that no garbage gradient
            # reaches x, and the combine's own select on its output, so that neither y nor the
            # weights' gradient (a dot product with the output row) sees garbage.
            in_slice_P = valid_TK.reshape(-1)[order_P]
            xs_PD = torch.where(in_slice_P.unsqueeze(-1), xs_PD, 0)
        # Gate and up projections as one [E, D, 2F] grouped matmul: one pass over the gathered
        # rows, and one input gradient in backward instead of two summed. `.to` is a no-op
        # unless autocast-style mixed precision keeps fp32 master weights.
        w13_EDG = torch.cat([self.w1_EDF, self.w3_EDF], dim=-1).to(x_TD.dtype)  # G = 2F
        w2_EFD = self.w2_EFD.to(x_TD.dtype)
        # The matmuls share one host read of the slice sizes where the loop runs (see
        # slice_sizes: reading them per call breaks inductor's backward).
        sizes = None
        if backend == "loop" or not grouped_mm_available(xs_PD, w13_EDG):
            sizes = slice_sizes(offsets_E, xs_PD.shape[0])
        h_PF = _GatedSiLU.apply(grouped_matmul(xs_PD, w13_EDG, offsets_E, backend, sizes=sizes))
        ys_PD = grouped_matmul(h_PF, w2_EFD, offsets_E, backend, sizes=sizes)
        # Combine in fp32 (the weights are fp32) and cast once at the end.
        y_TD = _WeightedScatterAdd.apply(ys_PD, weight_P, token_P, in_slice_P, num_tokens)
        return y_TD.to(x_TD.dtype)

    def _use_per_slice(self, x_TD: Tensor) -> bool:
        """``loop``, or ``auto`` on CPU: the per-expert path; else the grouped path."""
        backend = self.config.backend
        return backend == "loop" or (backend == "auto" and x_TD.device.type == "cpu")

    def _experts_per_slice(
        self, x_TD: Tensor, token_P: Tensor, weight_P: Tensor, counts_E1: Tensor
    ) -> Tensor:
        """Each expert's whole MLP on its slice of the sorted pairs, accumulated in place.

        The CPU path (and ``backend="loop"``): the slice sizes are read on the host once (free
        on CPU; one sync on an accelerator). Working one expert at a time keeps every
        intermediate at [pairs of one expert, ...], memory the allocator reuses, where the
        grouped path materialises [P, 2F] and [P, D] products that are fresh, page-faulted
        memory on every call; measured faster on CPU at every shape of the layer benchmark.
        The input rows go through one ``_GatherSlices``: per-expert gathers whose gradients
        land in one [T, D] tensor, where autograd's per-expert gathers would zero and sum E
        full [T, D] gradients (at E = 64 that was a third of the layer's time). Pairs without
        compute (key E) form the last split and are never touched.

        Args:
            x_TD: Token rows.
            token_P: Token of each pair, sorted by expert.
            weight_P: Combine weight of each pair, same order.
            counts_E1: Pairs per expert, then the count of pairs without compute.

        Returns:
            ``[T, D]`` in fp32 (fp64 for fp64 input).
        """
        num_experts = self.config.num_experts
        sizes = counts_E1.tolist()
        dtype = torch.promote_types(x_TD.dtype, weight_P.dtype)
        y_TD = torch.zeros(x_TD.shape, device=x_TD.device, dtype=dtype)
        # One [D, 2F] matmul per expert for gate and up is faster than two [D, F] ones, but
        # needs the [E, D, 2F] concatenation (a copy of those weights and of their gradients
        # per step): worth it while that copy is no bigger than the pairs' activations
        # (measured: fused faster at E=64, K=8, F=128; split at E=128, K=2, F=512).
        fuse = self.config.num_experts * x_TD.shape[-1] <= token_P.shape[0]
        w2_EFD = self.w2_EFD.to(x_TD.dtype)
        if fuse:
            w_up = (torch.cat([self.w1_EDF, self.w3_EDF], dim=-1).to(x_TD.dtype).unbind(0),)
        else:
            w_up = tuple(w.to(x_TD.dtype).unbind(0) for w in (self.w1_EDF, self.w3_EDF))
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
        for token_N, x_ND, weight_N, w2_FD, *w_up_D in slices:  # N = pairs of one expert
            if not fuse:
                h_NF = F.silu(x_ND @ w_up_D[0]) * (x_ND @ w_up_D[1])
            else:
                gate_up_NG = x_ND @ w_up_D[0]
                if fold and gate_up_NG.dtype == dtype:
                    h_NF = _WeightedGatedSiLU.apply(gate_up_NG, weight_N)
                    y_TD.index_add_(0, token_N, h_NF @ w2_FD)
                    continue
                h_NF = _GatedSiLU.apply(gate_up_NG)
            y_ND = h_NF @ w2_FD
            y_TD.index_add_(0, token_N, y_ND.to(dtype) * weight_N.unsqueeze(-1))
        return y_TD

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"d_model={c.d_model}, d_ff={c.d_ff}, num_experts={c.num_experts}, k={c.k}"]
        if c.shared_d_ff:
            parts.append(f"shared_d_ff={c.shared_d_ff}")
        if c.capacity_factor is not None:
            parts.append(f"capacity_factor={c.capacity_factor}, drop_policy={c.drop_policy!r}")
        return ", ".join(parts)
