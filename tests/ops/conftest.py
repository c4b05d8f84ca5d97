"""Fixtures of the ops tests."""

from __future__ import annotations

import pytest

from moe_router.ops import threshold_cpp


@pytest.fixture
def cpp_kernels():
    """The C++ kernels built and loaded (whatever order or subset of tests runs), for tests
    that call their ops directly; skips where they do not build."""
    if not threshold_cpp.available():
        pytest.skip("the C++ kernels do not build here")
