"""The C++ CPU path of the threshold family: loads csrc/threshold_cpp.cpp, built on first use.

`soft_topk(..., backend="auto")` runs CPU tensors through these kernels when they build, and
through the PyTorch path of `threshold_torch.py` (which they are tested against) otherwise.

The extension is compiled once per machine with torch.utils.cpp_extension (a C++ compiler and
ninja are needed; the build takes about 10 s) into a cache folder: $MOE_ROUTER_CACHE, else
$XDG_CACHE_HOME/moe_router, else ~/.cache/moe_router. The folder name hashes the source, the
torch version and the CPU's instruction-set flags (the kernels are built with -march=native),
so a changed source, torch or machine gets its own build. Set MOE_ROUTER_CPU_KERNELS=0 to
never build or use them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from moe_router.ops._vmap import batch_first

__all__ = ["available", "backward", "build", "forward"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "threshold_cpp.cpp"
METHOD_IDS = {"sigmoid": 0, "laplace": 1, "exp": 2, "sparse": 3}
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_ENV_SWITCH = "MOE_ROUTER_CPU_KERNELS"


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), else the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    if os.environ.get("MOE_ROUTER_CACHE"):
        return Path(os.environ["MOE_ROUTER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe_router"


def _build_name() -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(_CFLAGS).encode()):
        digest.update(part)
    digest.update(_cpu_flags().encode())
    return f"moe_router_cpu_{digest.hexdigest()[:12]}"


def _put_ninja_on_path() -> None:
    """torch.utils.cpp_extension runs `ninja` from PATH; the ninja wheel (a dependency) puts it
    beside the interpreter, which is not on PATH when a venv's python runs unactivated."""
    if shutil.which("ninja"):
        return
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", "")])


def build(verbose: bool = False) -> None:
    """Compile (or load the cached build of) the extension; registers torch.ops.moe_router_cpu.

    Raises whatever torch.utils.cpp_extension raises when the build fails.
    """
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    name = _build_name()
    build_dir = _cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").exists():
        print(
            "moe_router: building the CPU soft top-k kernels (once per machine, ~10 s) in "
            f"{build_dir}",
            file=sys.stderr,
            flush=True,
        )
    load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )


_LOADED = False


def loaded() -> bool:
    """Whether available() has loaded the kernels in this process (a plain read, which
    torch.compile can trace; available() itself cannot be traced)."""
    return _LOADED


@functools.cache
def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call).

    False when MOE_ROUTER_CPU_KERNELS=0 or the build fails (then with one warning that names
    the cause; soft_topk falls back to the PyTorch path).
    """
    if os.environ.get(_ENV_SWITCH, "1") == "0":
        return False
    try:
        build()
    except Exception as error:  # noqa: BLE001 - any build failure means: use the torch path
        lines = str(error).strip().splitlines() or [repr(error)]
        cause = next((line for line in lines if "error" in line.lower()), lines[-1])
        warnings.warn(
            f"moe_router: could not build the CPU soft top-k kernels ({type(error).__name__}: "
            f"{cause.strip()}); "
            f"using the PyTorch path instead (set {_ENV_SWITCH}=0 to skip the build)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    global _LOADED
    if not _LOADED:
        _register_transform_rules()
        _LOADED = True
    return True


def _register_transform_rules() -> None:
    """Fake and vmap rules of the backward op, which autograd.Function runs under
    torch.compile (traced with fake tensors) and under torch.func.vmap (vmapped backward).
    The forward op only ever runs inside moe_router::soft_topk_threshold, which has both."""

    @torch.library.register_fake("moe_router_cpu::threshold_backward")
    def _(p_RN, grad_RN, tau_R, method, need_tau_grad):
        num_rows = p_RN.shape[0]
        grad_tau_R = p_RN.new_empty(num_rows if need_tau_grad else 0)
        return torch.empty_like(p_RN), p_RN.new_empty(num_rows), grad_tau_R

    def vmap_rule(info, in_dims, p_RN, grad_RN, tau_R, method, need_tau_grad):
        # rows are independent: fold the vmapped dim into the rows
        batch = info.batch_size

        def batched(tensor: Tensor, in_dim: int | None) -> Tensor:
            return batch_first(tensor, in_dim, batch)

        p_BRN = batched(p_RN, in_dims[0])
        num_rows, num_entries = p_BRN.shape[1:]
        grad_x_RN, grad_k_R, grad_tau_R = torch.ops.moe_router_cpu.threshold_backward(
            p_BRN.reshape(-1, num_entries).contiguous(),
            batched(grad_RN, in_dims[1]).reshape(-1, num_entries).contiguous(),
            batched(tau_R, in_dims[2]).reshape(-1).contiguous(),
            method,
            need_tau_grad,
        )
        outputs = (
            grad_x_RN.reshape(batch, num_rows, num_entries),
            grad_k_R.reshape(batch, num_rows),
            grad_tau_R.reshape(batch, -1),
        )
        return outputs, (0, 0, 0)

    torch.library.register_vmap("moe_router_cpu::threshold_backward", vmap_rule)


def forward(
    scores_RN: Tensor, k_R: Tensor, tau_R: Tensor, method: str, sparse_newton_steps: int = 12
) -> tuple[Tensor, Tensor]:
    """(p_RN, lam_R) of the threshold operator for CPU float32/float64 rows (lam in z units).

    sparse_newton_steps: the Newton budget of "sparse" before a row takes the exact sorted
    path; tests set 0 to run that path on every row.
    """
    dtype = scores_RN.dtype
    return torch.ops.moe_router_cpu.threshold_forward(
        scores_RN.contiguous(),
        k_R.to(dtype).contiguous(),
        tau_R.to(dtype).contiguous(),
        METHOD_IDS[method],
        sparse_newton_steps,
    )


def backward(
    p_RN: Tensor, grad_RN: Tensor, tau_R: Tensor, method: str, need_tau_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(grad_scores_RN, grad_k_R, grad_tau_R or None): threshold_backward in one fused pass."""
    dtype = p_RN.dtype
    grad_x_RN, grad_k_R, grad_tau_R = torch.ops.moe_router_cpu.threshold_backward(
        p_RN.contiguous(),
        grad_RN.to(dtype).contiguous(),
        tau_R.to(dtype).contiguous(),
        METHOD_IDS[method],
        need_tau_grad,
    )
    return grad_x_RN, grad_k_R, grad_tau_R if need_tau_grad else None
