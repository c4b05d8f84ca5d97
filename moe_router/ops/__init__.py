"""Parameter-free operators: the differentiable soft top-k.

Files, by role:

- `soft_topk.py`: the public op `soft_topk`: argument checks, the backend switch (resolved
  once per call and handed to the custom op, so forward and backward run the same
  implementation), the custom op `moe_router::soft_topk_threshold` and its autograd.
- `threshold_torch.py`: the threshold methods in plain PyTorch: the readable reference that
  the other two implementations are tested against, and the one-pass backward formula.
- `threshold_cpp.py`: builds (once, cached) and loads the fused C++ CPU kernels, one source
  per op family in `csrc/` (`soft_topk.cpp`, the default for CPU tensors; `selections.cpp`,
  the balanced gate's selections; `gated_silu.cpp`, the MoE layer's activation).
- `threshold_triton.py`: the Triton GPU kernels, the default for CUDA tensors (a different
  algorithm, suited to rows held in registers; its header says why).
- `reference.py`: two other constructions kept as references, methods "iterative" and "grad".
- `_vmap.py`: the shared piece of the vmap rules.
"""

from moe_router.ops.soft_topk import soft_topk

__all__ = ["soft_topk"]
