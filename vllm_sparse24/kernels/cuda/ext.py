"""The C++/CUDA prefill op (sparse24_ext.cu): quant + cusparseLtMatmul + epilogue in ONE op.

Which path a layer uses (Sparse24CudaKernel.describe()["path"] says it):
  * ``ext``: this extension; for M <= 16 (where it measured faster than cuSPARSELt, per shape) its
    decode kernel: W8A16 dense mma on the same compressed buffer, one launch, no quant pass. Needs, on the serving machine: nvcc (CUDA toolkit, matching torch's
    CUDA major version) and ninja, used once by ``torch.utils.cpp_extension.load`` on the first
    prepare() (~1 min; cached in $VLLM_SPARSE24_EXT_DIR or ~/.cache/vllm_sparse24/ext, keyed by
    source hash, torch version and GPU arch). No cuSPARSELt header or link: the plans are built
    by cslt.py (ctypes) and handed over as addresses. Host cost ~one dispatcher call.
  * ``triton``: the fallback when the build fails or VLLM_SPARSE24_EXT=0: Triton quant and
    epilogue kernels + ctypes cusparseLtMatmul (needs only triton and the nvidia-cusparselt wheel
    torch depends on); ~35 us of host time per call.
Nothing here builds or touches CUDA at import time; build() runs lazily, on a GPU only.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from . import cslt

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(_HERE, "sparse24_ext.cu")
_SRCS = [_SRC, os.path.join(_HERE, "sparse24_ext_py.cpp")]
_STATE: dict = {"tried": False, "ok": False, "error": None, "mod": None}
_LOCK = threading.Lock()


def enabled() -> bool:
    return os.environ.get("VLLM_SPARSE24_EXT", "1") != "0"


def _build_dir() -> str:
    import hashlib

    sha = hashlib.sha1()
    for src in _SRCS:
        with open(src, "rb") as f:
            sha.update(f.read())
    h = sha.hexdigest()[:10]
    cap = torch.cuda.get_device_capability()
    tag = f"{torch.__version__.replace('+', '_')}_sm{cap[0]}{cap[1]}_{h}"
    root = os.environ.get("VLLM_SPARSE24_EXT_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vllm_sparse24", "ext"))
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    return path


def build(verbose: bool = False) -> bool:
    """Build (or load the cached build of) the extension and register its ops; True on success."""
    with _LOCK:
        if _STATE["tried"]:
            return _STATE["ok"]
        _STATE["tried"] = True
        if not enabled() or not torch.cuda.is_available():
            _STATE["error"] = "disabled (VLLM_SPARSE24_EXT=0)" if not enabled() else "no CUDA"
            return False
        try:
            from torch.utils.cpp_extension import load

            cap = torch.cuda.get_device_capability()
            # this GPU's arch only (one nvcc pass, ~1 min); the build dir is keyed by it
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}")
            # a Python module (pybind entry `linear` for eager calls, no dispatcher) that also
            # registers the TORCH_LIBRARY ops (torch.compile, CUDA graphs via torch.ops)
            _STATE["mod"] = load(name="sparse24_ext", sources=_SRCS, build_directory=_build_dir(),
                                 extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=verbose)
            L = cslt.lib()
            torch.ops.sparse24_ext.set_lib(_addr(L.lib.cusparseLtMatmul), int(L.handle.ptr.value))
            _STATE["ok"] = True
        except Exception as e:  # no nvcc / ninja / compiler error: use the Triton + ctypes path
            _STATE["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
            warnings.warn(f"sparse24: C++ extension unavailable, using Triton + ctypes path ({_STATE['error'][:300]})",
                          stacklevel=2)
        return _STATE["ok"]


def _addr(fn) -> int:
    import ctypes

    return ctypes.cast(fn, ctypes.c_void_p).value


def direct():
    """The pybind entry point: same function as torch.ops.sparse24_ext.linear, no dispatcher. It returns
    None on bad arguments (it throws nothing, see sparse24_ext_py.cpp): callers raise ``last_error()``."""
    return _STATE["mod"].linear


def last_error() -> str:
    return _STATE["mod"].last_error()


def decode_direct():
    """The M <= 16 kernels alone (tuning, tests), raising RuntimeError on bad arguments."""
    mod = _STATE["mod"]

    def decode(*args):
        out = mod.decode(*args)
        if out is None:
            raise RuntimeError(mod.last_error())
        return out

    return decode


def set_decode(plan_set: int, max_m: int, meta_rows: int, rows_per_block: tuple[int, int],
               warps: tuple[int, int], kinds: tuple[int, int]) -> None:
    """Make ``linear`` of this plan set run the decode kernel for M <= max_m (configs for M <= 8, <= 16;
    kind 0: dense mma on register-decoded tiles, 1: sparse mma.sp)."""
    torch.ops.sparse24_ext.set_decode(plan_set, max_m, meta_rows, list(rows_per_block), list(warps), list(kinds))


def error() -> str | None:
    return _STATE["error"]


def register(n: int, k: int, plans: dict[int, cslt.SparseInt8Plan]) -> int:
    """Hand the prepared plans of one (N, K) to the extension; returns the plan-set id."""
    buckets = sorted(plans)
    return int(torch.ops.sparse24_ext.register_plans(
        n, k, buckets, [int(plans[b].plan.ptr.value) for b in buckets], [plans[b]._ws_ptr for b in buckets]))


_FAKE_REGISTERED = False


def register_fake() -> None:
    """Shape function for torch.compile (call after build())."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return

    @torch.library.register_fake("sparse24_ext::linear")
    def _(x, w_cslt, w_scale, bias, plan_set):
        return x.new_empty((x.shape[0], w_scale.shape[0]))

    @torch.library.register_fake("sparse24_ext::decode")
    def _(x, w_cslt, w_scale, bias, rows_per_block, warps, meta_rows, kind):
        return x.new_empty((x.shape[0], w_scale.shape[0]))

    _FAKE_REGISTERED = True
