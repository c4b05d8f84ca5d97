"""`soft_topk`: the differentiable top-k operator (public API).

p = soft_topk(scores, k) maps each row of scores (along `dim`) to p in [0, 1]^n with sum k:
a smooth, monotone, shift-invariant relaxation of the hard top-k mask that tends to it as
tau -> 0 (docs/design.md, "The soft top-k operator").

Threshold methods ("sigmoid", "laplace", "exp", "sparse") run as one registered custom op
(`moe_router::soft_topk_threshold`, forward with a fake and a vmap rule) inside an
autograd.Function with the hand-written one-pass backward, so they work under
`torch.compile(fullgraph=True)`, `torch.func.vmap` and `torch.func.grad`. Three
implementations, checked against each other: the readable PyTorch path (`threshold_torch.py`),
fused C++ CPU kernels (`threshold_cpp.py`) and Triton GPU kernels (`threshold_triton.py`).
`soft_topk` picks one per call (`_resolve_backend`) and the op's forward and backward both run
that one. The reference methods ("iterative", "grad", `reference.py`) are plain PyTorch
differentiated by autograd.

First call: with the C++ build cached, the first call of soft_topk costs about what any small
op's first call does (mostly loading the kernels' library and asking the compiler for its
version, which is part of the cache key). It imports no torch._dynamo (the op is registered
through torch.library.Library for that reason: the custom_op decorator imports it on the
first call, which takes seconds) and runs no compiler or ninja. What remains is a cold cache
(one build per source, torch, compiler and machine, shared by every checkout and virtual
environment; see threshold_cpp.py) and the imports: torch itself, and `import moe_router`,
which also imports torchmetrics for moe_router.metrics.

Shape legend: R rows (all dims but `dim`, flattened), N entries per row.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os

import torch
from torch import Tensor

from moe_router.ops._vmap import batch_first
from moe_router.ops.reference import GRAD_MAX_SPREAD, REFERENCE_METHODS, reference_soft_topk
from moe_router.ops.threshold_torch import THRESHOLD_METHODS, solve_threshold, threshold_backward

METHODS = THRESHOLD_METHODS + REFERENCE_METHODS
BACKENDS = ("auto", "torch", "cpp", "triton")

__all__ = ["BACKENDS", "METHODS", "soft_topk"]


# --------------------------------------------------------------------------------------------
# the backend switch


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpp_kernels_ready() -> bool:
    """Whether the C++ kernels can run: built and loaded here (building them on the first call).

    Code that torch.compile traces cannot build them, so there this only reads whether they
    are loaded; an eager call builds them first.
    """
    from moe_router.ops import threshold_cpp

    if torch.compiler.is_compiling():
        return threshold_cpp.loaded()
    return threshold_cpp.available()


def cpp_kernels_serve(x: Tensor) -> bool:
    """Whether the C++ kernels run on this tensor: CPU float32 / float64, and built."""
    on_cpu = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    return on_cpu and cpp_kernels_ready()


def _resolve_backend(scores_RN: Tensor, method: str, backend: str) -> str:
    """The one implementation this call runs: "torch", "cpp" or "triton".

    Decided once per call and handed to the op, so that its forward and its backward always
    run the same implementation. "auto": the C++ kernels for CPU float32/float64 rows when they
    build, the Triton kernels for CUDA rows they support (N <= 1024, not float64), else PyTorch.
    An explicit backend was validated by soft_topk.
    """
    if backend != "auto":
        return backend
    if scores_RN.device.type == "cpu":
        return "cpp" if cpp_kernels_serve(scores_RN) else "torch"
    if scores_RN.is_cuda and _triton_available():
        from moe_router.ops.threshold_triton import is_supported

        if is_supported(scores_RN, method):
            return "triton"
    return "torch"


# --------------------------------------------------------------------------------------------
# the custom op (threshold family)


def _check_tau(tau_R: Tensor) -> None:
    """tau > 0 and finite. Only called on CPU, where reading a value costs no device sync."""
    bad_R = ~((tau_R > 0) & torch.isfinite(tau_R))
    if bool(bad_R.any()):
        raise ValueError(
            f"tau must be positive and finite, got a tau value of {tau_R[bad_R][0].item()}"
        )


def _check_enough_finite(scores_RN: Tensor, k_R: Tensor, short_R: Tensor) -> None:
    """A number k needs more than k finite scores per row; `short_R` marks the rows that have
    too few (the solvers find them anyway, so this reads [R] values, not a second [R, N]
    count). CPU only; on CUDA the documented fallback applies instead of an error."""
    if bool(short_R.any()):
        row = int(short_R.nonzero()[0, 0])
        raise ValueError(
            f"k={k_R[row].item():g} needs more than k finite scores per row, but row {row} "
            f"has only {int(torch.isfinite(scores_RN[row]).sum())} (the others are -inf)"
        )


# Defined with torch.library.Library rather than the torch.library.custom_op decorator: the
# decorator wraps the kernel in torch._disable_dynamo, whose first call imports torch._dynamo
# (seconds) even in a program that never compiles. The op is the same to torch.compile, vmap
# and opcheck: a schema, a kernel, a fake and a vmap rule.
_LIB = torch.library.Library("moe_router", "DEF")
_LIB.define(
    "soft_topk_threshold(Tensor scores, Tensor k, Tensor tau, str method, float? max_k, "
    "str backend, bool check_tau) -> Tensor"
)


def _soft_topk_threshold(
    scores_RN: Tensor,
    k_R: Tensor,
    tau_R: Tensor,
    method: str,
    max_k: float | None,
    backend: str,
    check_tau: bool,
) -> Tensor:
    """The forward of the threshold family on [R, N] rows; `backend` is already resolved.

    check_tau: whether tau came as a tensor (a number was checked by soft_topk already).
    """
    # Value checks that read data run on CPU only, where that costs no device sync.
    on_cpu = scores_RN.device.type == "cpu"
    check_finite = on_cpu and max_k is not None
    if on_cpu and check_tau:
        _check_tau(tau_R)
    if backend == "cpp":
        from moe_router.ops import threshold_cpp

        p_RN, lam_R = threshold_cpp.forward(scores_RN, k_R, tau_R, method)
    elif backend == "triton":
        from moe_router.ops.threshold_triton import triton_soft_topk_forward

        out = triton_soft_topk_forward(
            scores_RN.contiguous(), k_R, tau_R, method, return_threshold=check_finite
        )
        p_RN, lam_R = out if check_finite else (out, None)
        p_RN = p_RN.to(scores_RN.dtype)
    elif backend == "torch":
        p_RN, lam_R = solve_threshold(scores_RN, k_R, tau_R, method, max_k)
    else:
        raise ValueError(f"backend={backend!r} is not a resolved backend; use torch, cpp, triton")
    if check_finite:
        _check_enough_finite(scores_RN, k_R, torch.isneginf(lam_R))  # lam = -inf marks them
    return p_RN


_LIB.impl("soft_topk_threshold", _soft_topk_threshold, "CompositeExplicitAutograd")


@torch.library.register_fake("moe_router::soft_topk_threshold", lib=_LIB)
def _(scores_RN, k_R, tau_R, method, max_k, backend, check_tau):
    return torch.empty_like(scores_RN)


class _SoftTopKThreshold(torch.autograd.Function):
    """Autograd for the custom op: the one-pass implicit backward from the saved output.

    An autograd.Function with setup_context (rather than register_autograd on the op) so that
    torch.func transforms (vmap of grad, jacrev) compose with it; the op stays opaque to
    torch.compile, which traces this Function's backward as plain torch ops. The backward runs
    the backend the forward ran (a resolved name, an input of the op).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(scores_RN, k_R, tau_R, method, max_k, backend, check_tau):
        return torch.ops.moe_router.soft_topk_threshold(
            scores_RN, k_R, tau_R, method, max_k, backend, check_tau
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, tau_R, method, _, backend, _ = inputs
        ctx.save_for_backward(output, tau_R)
        ctx.method = method
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_RN):
        p_RN, tau_R = ctx.saved_tensors
        _, need_k_grad, need_tau_grad = ctx.needs_input_grad[:3]
        # The fused backwards are first-order only; double backward takes the torch formula,
        # which is written in differentiable ops on the saved output.
        if ctx.backend == "cpp" and not torch.is_grad_enabled():
            from moe_router.ops import threshold_cpp

            grad_x_RN, grad_k_R, grad_tau_R = threshold_cpp.backward(
                p_RN, grad_RN, tau_R, ctx.method, need_tau_grad
            )
            grad_k_R = grad_k_R if need_k_grad else None
        elif ctx.backend == "triton" and not torch.is_grad_enabled():
            from moe_router.ops.threshold_triton import triton_soft_topk_backward

            grad_x_RN, grad_k_R, grad_tau_R = triton_soft_topk_backward(
                p_RN, grad_RN.contiguous(), tau_R, ctx.method, need_k_grad, need_tau_grad
            )
            grad_x_RN = grad_x_RN.to(p_RN.dtype)
        else:
            grad_x_RN, grad_k_R, grad_tau_R = threshold_backward(
                p_RN, grad_RN, tau_R, ctx.method, need_k_grad, need_tau_grad
            )
        return grad_x_RN, grad_k_R, grad_tau_R, None, None, None, None


# autograd.Function.apply binds its arguments to forward's signature on every call, and
# inspect.signature is not cached (tens of microseconds per call): give it the answer.
_SoftTopKThreshold.forward.__signature__ = inspect.signature(_SoftTopKThreshold.forward)


def _vmap_rule(info, in_dims, scores_RN, k_R, tau_R, method, max_k, backend, check_tau):
    # Rows are independent: fold the vmapped dim into the rows and call the op once.
    batch = info.batch_size

    def batched(tensor: Tensor, in_dim: int | None) -> Tensor:
        return batch_first(tensor, in_dim, batch)

    scores_BRN = batched(scores_RN, in_dims[0])
    num_rows, num_entries = scores_BRN.shape[1:]
    p_BRN = torch.ops.moe_router.soft_topk_threshold(
        scores_BRN.reshape(batch * num_rows, num_entries),
        batched(k_R, in_dims[1]).reshape(batch * num_rows),
        batched(tau_R, in_dims[2]).reshape(batch * num_rows),
        method,
        max_k,
        backend,
        check_tau,
    )
    return p_BRN.reshape(batch, num_rows, num_entries), 0


torch.library.register_vmap("moe_router::soft_topk_threshold", _vmap_rule, lib=_LIB)


# --------------------------------------------------------------------------------------------
# the public function


def _per_row(
    value, name: str, batch_shape: torch.Size, dim: int, ndim: int, like: Tensor
) -> Tensor:
    """Broadcast a number or tensor k / tau to one value per row, [R], in the compute dtype."""
    if not torch.is_tensor(value):
        return like.new_full((math.prod(batch_shape),), float(value))
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got dtype={value.dtype}")
    if value.device != like.device:
        if value.dim() > 0 or value.device.type != "cpu":  # (a CPU scalar goes anywhere)
            raise ValueError(
                f"{name} is on device {value.device}, but scores are on {like.device}; "
                "pass it on the scores' device"
            )
        value = value.to(like.device)
    if not value.is_floating_point():
        value = value.to(like.dtype)
    # accept the keepdim form too: shape of scores with size 1 along dim
    if value.dim() == ndim and value.shape[dim] == 1:
        value = value.squeeze(dim)
    try:
        value_B = torch.broadcast_to(value, batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to the batch shape "
            f"{tuple(batch_shape)} (scores without dim {dim})"
        ) from None
    return value_B.reshape(-1).to(like.dtype)


def soft_topk(
    scores: Tensor,
    k: int | float | Tensor,
    *,
    tau: float | Tensor = 1.0,
    dim: int = -1,
    method: str = "sigmoid",
    backend: str = "auto",
) -> Tensor:
    """Differentiable soft top-k: p in [0, 1] with sum k along `dim`.

    Threshold methods compute p_i = f((x_i - lambda) / tau) with lambda chosen so that the row
    sums to k (docs/design.md): "sigmoid" (smooth everywhere), "laplace" (C^1, closed form), "exp"
    (min(1, e^z): k = 1 gives softmax), "sparse" (clip(z, 0, 1): exact zeros, the projection
    onto the capped simplex). Their backward is the implicit-function formula in one pass over
    the saved output. The threshold is solved next to itself (a pivot score plus an offset in
    units of tau), so p is exact to ~1e-6 in the row's own frame at any scale of the scores
    and of tau. "iterative" (softmax applied k times) and "grad" (gradient of the log-sum-exp
    over all k-subsets) are two reference constructions, computed in float64 and
    differentiated by autograd; they need an integer k, and follow the same contract for
    checks, masking and special rows as the threshold methods.

    Args:
        scores: Float tensor of any shape. fp16/bf16 are solved in fp32 and returned in their
            dtype; float64 is solved in float64. -inf entries get p = 0 exactly and zero
            gradient (the same result as dropping them). A NaN (or +inf) in a row makes that
            row NaN, other rows are unaffected. An empty tensor gives an empty result.
        k: Budget per row. A number with 0 < k < n (n = scores.shape[dim]; fractional k is
            valid for the threshold methods), or a tensor broadcastable to the batch shape
            (scores without `dim`, or with size 1 there) for per-row budgets; a tensor k that
            requires grad receives dL/dk. Rows of a tensor k with k <= 0 give p = 0, and rows
            with at most k finite scores give p = 1 on their finite entries (sum < k): the
            nearest the constraint allows. With a number k such rows raise ValueError on CPU;
            on CUDA they take the same fallback, as checking would need a device sync. A NaN k
            makes its row NaN. The reference methods round a tensor k to integers.
        tau: Temperature > 0 and finite, a number or a tensor broadcastable like k (learned or
            per-row temperatures receive gradients). tau -> 0 gives the hard top-k mask; the
            gradient scales as 1 / tau and is +-inf where that overflows. Tensor values are
            checked on CPU only (on CUDA the check would be a device sync).
        dim: The dimension to select along (an int).
        method: One of "sigmoid", "laplace", "exp", "sparse", "iterative", "grad".
        backend: Implementation of the threshold methods. "auto": the fused C++ kernels for
            CPU tensors (built once on first use; PyTorch if they cannot be built), Triton for
            CUDA tensors when Triton is installed, else PyTorch. "torch": the readable PyTorch
            path. "cpp": the C++ kernels (CPU only). "triton": the Triton kernels (CUDA, or
            CPU under TRITON_INTERPRET=1; float16/bfloat16/float32, at most 1024 entries).
            Forward and backward of one call always run the same implementation.

    Returns:
        Tensor of the shape and dtype of `scores`.

    Raises:
        ValueError: for non-float scores, a `dim` that is not an int or out of range, an
            unknown method or backend, a backend that cannot run here, a number k outside
            (0, n) or with too few finite scores in a row (CPU), a non-integer k for a
            reference method, tau <= 0 or not finite, a bool, complex or misplaced k / tau
            tensor or one that does not broadcast, or (CPU) a row whose finite scores span
            more than 1e8 tau with method "grad", whose float64 sums cannot hold k beyond that.
    """
    if not torch.is_tensor(scores):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must have a floating-point dtype, got dtype={scores.dtype}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {METHODS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension, got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise ValueError(f"dim must be an int, got dim={dim!r}")
    dim = int(dim)
    if not -scores.dim() <= dim < scores.dim():
        raise ValueError(
            f"dim={dim} is out of range for scores with {scores.dim()} dims "
            f"(allowed: {-scores.dim()} to {scores.dim() - 1})"
        )
    dim = dim % scores.dim()
    num_entries = scores.shape[dim]
    k_is_number = not torch.is_tensor(k)
    if k_is_number:
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            raise ValueError(f"k must be a number or a tensor, got {k!r}")
        if not 0 < k < num_entries:
            raise ValueError(
                f"k={k} is out of range: need 0 < k < n, with n={num_entries} the size of "
                f"scores along dim={dim}"
            )
    if method in REFERENCE_METHODS and k_is_number and float(k) != int(k):
        raise ValueError(f"method={method!r} needs an integer k, got k={k}")
    if not torch.is_tensor(tau) and (
        isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau < math.inf
    ):
        raise ValueError(f"tau must be a positive finite number or a tensor, got tau={tau!r}")
    if backend == "cpp":
        if method not in THRESHOLD_METHODS:
            raise ValueError(f"backend='cpp' supports {THRESHOLD_METHODS}, not {method!r}")
        if scores.device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got device={scores.device}")
        if not cpp_kernels_ready():
            raise ValueError(
                "backend='cpp' needs the C++ kernels, which could not be built here (see the "
                "warning above, or MOE_ROUTER_CPU_KERNELS=0 is set); use backend='torch'"
            )
    if backend == "triton":
        if method not in THRESHOLD_METHODS:
            raise ValueError(f"backend='triton' supports {THRESHOLD_METHODS}, not {method!r}")
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if not scores.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels "
                f"on CPU through Triton's interpreter), got device={scores.device}"
            )
        from moe_router.ops.threshold_triton import INPUT_DTYPES, MAX_N, dtype_names

        if scores.dtype not in INPUT_DTYPES:
            raise ValueError(
                f"backend='triton' supports {dtype_names()} scores, got dtype={scores.dtype} "
                "(use backend='torch')"
            )
        if num_entries > MAX_N:
            raise ValueError(
                f"backend='triton' supports up to {MAX_N} entries per row, got n={num_entries} "
                "along dim (use backend='torch')"
            )

    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    # (identity moves and reshapes skipped: each would be one more autograd node, ~10 us of
    # a call whose kernels take about as long at router sizes)
    last = dim == scores.dim() - 1
    scores_BN = scores if last else scores.movedim(dim, -1)
    batch_shape = scores_BN.shape[:-1]
    # (R, N); R spelled out: -1 is ambiguous for N = 0
    flat = scores_BN.dim() == 2
    scores_RN = scores_BN if flat else scores_BN.reshape(math.prod(batch_shape), num_entries)
    scores_RN = scores_RN.to(compute_dtype)
    k_R = _per_row(k, "k", batch_shape, dim, scores.dim(), scores_RN)
    tau_R = _per_row(tau, "tau", batch_shape, dim, scores.dim(), scores_RN)

    if method in THRESHOLD_METHODS:
        max_k = float(k) if k_is_number else None
        resolved = _resolve_backend(scores_RN, method, backend)
        p_RN = _SoftTopKThreshold.apply(
            scores_RN, k_R, tau_R, method, max_k, resolved, torch.is_tensor(tau)
        )
    else:
        # the threshold family's contract: the same checks, masking and special rows
        on_cpu = scores_RN.device.type == "cpu"
        if on_cpu and torch.is_tensor(tau):
            _check_tau(tau_R)
        max_k = int(k) if k_is_number else None
        p_RN, short_R, spread_R = reference_soft_topk(scores_RN, k_R, tau_R, method, max_k)
        if on_cpu and k_is_number:
            _check_enough_finite(scores_RN, k_R, short_R)
        if on_cpu and method == "grad" and bool((spread_R > GRAD_MAX_SPREAD).any()):
            row = int((spread_R > GRAD_MAX_SPREAD).nonzero()[0, 0])
            raise ValueError(
                f"method='grad' holds its budget only for rows whose finite scores span at most "
                f"{GRAD_MAX_SPREAD:g} * tau, but row {row} spans {spread_R[row].item():.3g} * tau "
                "(use a threshold method, or a larger tau)"
            )
    p_BN = p_RN if flat else p_RN.reshape(scores_BN.shape)
    return (p_BN if last else p_BN.movedim(-1, dim)).to(scores.dtype)
