"""Fuzz harness of the public op: bad and edge inputs, every method and CPU backend.

Each example draws scores (any of four dtypes, extreme scales, ties, -inf / NaN / +inf
entries, empty and odd shapes, `dim` not last), a k (number or per-row tensor: 0, n, n + 1,
fractional, negative, NaN, inf, bool, int) and a tau (number or tensor: tiny, huge, subnormal,
0, negative, NaN). An independent oracle (ops_testing.expected_error) says whether the
documented contract calls that an error; then either the op raises a ValueError naming the
argument, or its result (ops_testing.check_result) is:

- NaN exactly on the rows with a NaN or +inf score or a NaN k;
- on the other rows finite, 0 on -inf scores, in [0, 1] (the seed's "iterative" may exceed
  1, as documented), summing to k, or 1 on the finite scores where there are at most k of
  them, or 0 where k <= 0;
- for the threshold methods, equal to the PyTorch backend's within 1e-5 (the C++ kernels and
  backend="auto"), with a gradient free of NaN on those rows (finite unless 1 / tau
  overflows).

500 examples, derandomized (the same ones in every run). The Triton kernels get the same
harness under the interpreter in test_soft_topk_triton.py.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from ops_testing import run_fuzz_case, soft_topk_inputs


@settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=soft_topk_inputs())
def test_fuzz_public_op(case):
    event(run_fuzz_case(case))
