"""The C++ CPU kernels: builds csrc/*.cpp into one extension on first use and loads it.

One source file per op family: `soft_topk.cpp` (the threshold soft top-k forward and backward),
`selections.cpp` (the balanced gate's top_values, rank_pair and margin_quantiles) and
`gated_silu.cpp` (the MoE layer's gated activation); `common.h` and `select_top.h` hold what
they share. Each source registers its own ops in the torch.ops.moe_router_cpu namespace.

`soft_topk(..., backend="auto")` runs CPU tensors through these kernels when they build, and
through the PyTorch path of `threshold_torch.py` (which they are tested against) otherwise.

The extension is compiled once with torch.utils.cpp_extension (a C++ compiler and ninja are
needed; a one-time build, cached) into one file of a cache folder: $MOE_ROUTER_CACHE, else
$XDG_CACHE_HOME/moe_router, else ~/.cache/moe_router. Its name hashes everything the binary
depends on: the sources and headers, the torch build, the Python ABI, the compiler (its
--version), the flags and the CPU's instruction-set flags (-march=native). It does not depend
on which checkout or virtual environment asks, so all of them share one build, and a changed
source, torch, compiler or machine gets its own. Later processes load the file directly,
without ninja or torch.utils.cpp_extension. A build happens in a private folder and is moved
into place atomically, so concurrent processes never see half a file. Set
MOE_ROUTER_CPU_KERNELS=0 to never build or use them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from moe_router.ops._vmap import batch_first
from moe_router.ops.threshold_torch import METHOD_CODES

__all__ = [
    "available",
    "backward",
    "build",
    "forward",
    "gated_silu_backward",
    "gated_silu_forward",
    "loaded",
    "margin_quantiles",
    "rank_pair",
    "top_values",
]

CSRC = Path(__file__).resolve().parent / "csrc"
# Every source is compiled into the one extension; the key hashes them and the headers.
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
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


@functools.cache
def _compiler_identity() -> str:
    """The compiler torch.utils.cpp_extension runs ($CXX, else c++): its path and --version."""
    compiler = os.environ.get("CXX", "c++")
    path = shutil.which(compiler)
    try:
        result = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        version = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    return f"{os.path.realpath(path) if path else compiler} {version}"


def _cache_dir() -> Path:
    if os.environ.get("MOE_ROUTER_CACHE"):
        return Path(os.environ["MOE_ROUTER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe_router"


def _build_name() -> str:
    """moe_router_cpu_<hash of everything the built library depends on>."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (
        torch.__version__,
        str(torch.version.git_version),
        sys.implementation.cache_tag,  # the library links libtorch_python
        _compiler_identity(),
        " ".join(_CFLAGS + _LDFLAGS),  # (tuples: cpp_extension appends to the lists it gets)
        _cpu_flags(),
    ):
        digest.update(b"\0" + part.encode())
    return f"moe_router_cpu_{digest.hexdigest()[:16]}"


def library_path() -> Path:
    """Where the built library of these sources, torch, compiler and machine lives."""
    name = _build_name()
    return _cache_dir() / f"{name}.so"


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


_LIBRARY: Path | None = None  # the library this process loaded


def build(verbose: bool = False) -> Path:
    """Load the cached build of the extension, compiling it first if there is none.

    Registers torch.ops.moe_router_cpu and returns the library's path. Once per process: later
    calls return the library already loaded.

    Raises:
        Whatever torch.utils.cpp_extension raises when the build fails.
    """
    global _LIBRARY
    if _LIBRARY is not None:  # a second library of the same ops would abort the process
        return _LIBRARY
    path = library_path()
    if path.exists():
        try:
            torch.ops.load_library(str(path))
            _LIBRARY = path
            return path
        except OSError:  # a damaged file: build it again
            path.unlink(missing_ok=True)
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"moe_router: building the CPU soft top-k kernels (once, ~10-30 s) into {path}",
        file=sys.stderr,
        flush=True,
    )
    name = path.stem
    with tempfile.TemporaryDirectory(prefix=f"{name}.", dir=path.parent) as build_dir:
        # load() builds and loads the library; the loaded file keeps its inode when moved
        load(
            name=name,
            sources=[str(path) for path in SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=build_dir,
            is_python_module=False,
            verbose=verbose,
        )
        os.replace(Path(build_dir) / f"{name}.so", path)
    _LIBRARY = path
    return path


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
    except Exception as error:  # any build failure means: use the torch path
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
    The forward op only ever runs inside moe_router::soft_topk_threshold, which has both.
    The selections (top_values, rank_pair, margin_quantiles) and the MoE layer's gated SiLU
    get fake rules: the balanced gate and the layer call them in code that torch.compile
    traces."""

    @torch.library.register_fake("moe_router_cpu::top_values")
    def _(rows_RN, num):
        return rows_RN.new_empty(rows_RN.shape[0], num)

    @torch.library.register_fake("moe_router_cpu::rank_pair")
    def _(rows_RN, rank_R):
        return rows_RN.new_empty(rows_RN.shape[0], 2)

    @torch.library.register_fake("moe_router_cpu::margin_quantiles")
    def _(z_TE, mu_E, lam_T, k, rank_E):
        return z_TE.new_empty(z_TE.shape[1], 3)

    @torch.library.register_fake("moe_router_cpu::gated_silu_forward")
    def _(gate_up_NG, weight_N):
        return gate_up_NG.new_empty(gate_up_NG.shape[0], gate_up_NG.shape[1] // 2)

    @torch.library.register_fake("moe_router_cpu::gated_silu_backward")
    def _(gate_up_NG, weight_N, grad_NF):
        return torch.empty_like(gate_up_NG), torch.empty_like(weight_N)

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
    scores_RN: Tensor,
    k_R: Tensor,
    tau_R: Tensor,
    method: str,
    sparse_newton_steps: int = 12,
    narrow: bool = True,
) -> tuple[Tensor, Tensor]:
    """(p_RN, lam_R) of the threshold operator for CPU float32/float64 rows (lam in z units).

    sparse_newton_steps: the Newton budget of "sparse" before a row takes the exact sorted
    path; tests set 0 to run that path on every row. narrow: float32 rows of at most 16
    entries run 8 rows at a time, one SIMD lane each (sigmoid, laplace, exp); tests set False
    to run the row path on them.
    """
    dtype = scores_RN.dtype
    return torch.ops.moe_router_cpu.threshold_forward(
        scores_RN.contiguous(),
        k_R.to(dtype).contiguous(),
        tau_R.to(dtype).contiguous(),
        METHOD_CODES[method],
        sparse_newton_steps,
        narrow,
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
        METHOD_CODES[method],
        need_tau_grad,
    )
    return grad_x_RN, grad_k_R, grad_tau_R if need_tau_grad else None


def top_values(rows_RN: Tensor, num: int) -> Tensor:
    """The ``num`` largest entries of each row, descending: ``rows_RN.topk(num).values`` for
    CPU float32/float64 rows without NaN (NaN entries count as -inf, where torch.topk takes
    them first), at a few compares per entry. No gradient.

    Raises:
        RuntimeError: Unless ``1 <= num <= N``.
    """
    return torch.ops.moe_router_cpu.top_values(rows_RN.detach().contiguous(), num)


def rank_pair(rows_RN: Tensor, rank_R: Tensor) -> Tensor:
    """``[R, 2]``: per row, the entries at descending positions ``rank`` and
    ``min(rank + 1, N - 1)`` (0-based; rank clamped to [0, N - 1]), i.e. those of
    ``rows_RN.sort(descending=True)``, by a selection in O(N) per row. NaN entries count as
    -inf. No gradient."""
    return torch.ops.moe_router_cpu.rank_pair(
        rows_RN.detach().contiguous(), rank_R.to(torch.int64).contiguous()
    )


def margin_quantiles(
    z_TE: Tensor, mu_E: Tensor, lam_T: Tensor | None, k: int, rank_E: Tensor | None
) -> Tensor:
    """One alternation of the balanced gate's load target in one call: ``[E, 3]``, per expert
    the dispatch margins of ``s = z - mu`` at descending positions ``rank`` and
    ``min(rank + 1, T - 1)`` of its column, and its load (the number of positive margins).

    The margin of a pair is ``s - lam_t`` when ``lam_T`` is given (support-exact gates), else
    ``s`` minus the best score it competes with: the token's (K+1)-th largest ``s`` for a
    selected expert, its K-th for the others (``gates._dispatch_margin``); ``-inf`` where ``s``
    is not finite. ``rank_E`` None: every expert's rank is ``ceil(total load / E) - 1``. CPU
    float32 / float64, no gradient.

    Raises:
        RuntimeError: On shapes or dtypes that do not fit, or ``k`` outside ``[1, E - 1]``
            without ``lam_T``.
    """
    dtype = z_TE.dtype
    empty = z_TE.new_empty(0)
    return torch.ops.moe_router_cpu.margin_quantiles(
        z_TE.detach().contiguous(),
        mu_E.detach().to(dtype).contiguous(),
        empty if lam_T is None else lam_T.detach().to(dtype).contiguous(),
        k,
        empty.long() if rank_E is None else rank_E.to(torch.int64).contiguous(),
    )


def gated_silu_forward(gate_up_NG: Tensor, weight_N: Tensor) -> Tensor:
    """``silu(gate) * up * weight[:, None]`` of a fused ``[N, 2F]`` gate|up projection (gate
    the first F columns) in one pass: the MoE layer's expert activation with the combine
    weight folded in. CPU float32 / float64, weight in the same dtype; no autograd (see
    ``moe_router.experts._WeightedGatedSiLU``)."""
    return torch.ops.moe_router_cpu.gated_silu_forward(
        gate_up_NG.contiguous(), weight_N.to(gate_up_NG.dtype).contiguous()
    )


def gated_silu_backward(
    gate_up_NG: Tensor, weight_N: Tensor, grad_NF: Tensor
) -> tuple[Tensor, Tensor]:
    """``(grad_gate_up_NG, grad_weight_N)`` of :func:`gated_silu_forward` in one pass."""
    dtype = gate_up_NG.dtype
    return torch.ops.moe_router_cpu.gated_silu_backward(
        gate_up_NG.contiguous(), weight_N.to(dtype).contiguous(), grad_NF.to(dtype).contiguous()
    )
