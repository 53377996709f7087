"""cuSPARSELt int8 2:4 GEMM through ctypes on libcusparseLt.so.0, with cached plans.

Why ctypes: no compiler at install or first use (a pip user needs only the
nvidia-cusparselt-cu1x wheel that torch already depends on), and a call costs a few us of
host time: descriptors, algorithm (alg_id + split-k, chosen by cusparseLtMatmulSearch) and
plan are built once per (padded M, N, K) and reused; a matmul is one foreign call.

Computes D[M_pad, N] = (Xq[M_pad, K] @ W^T) * alpha[N] in bf16 with the same descriptors
``torch._cslt_sparse_mm(W_c, Xq.t(), alpha, transpose_result=True)`` uses, so the buffer
from ``torch._cslt_compress`` is the one resident weight.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import torch

# enums from cusparseLt.h / cusparse.h / library_types.h
CUDA_R_8I, CUDA_R_16BF = 3, 14
CUSPARSE_ORDER_COL, CUSPARSE_ORDER_ROW = 1, 2
OP_N, OP_T = 0, 1
CUSPARSE_COMPUTE_32I = 0
SPARSITY_50 = 0
MATMUL_ALPHA_VECTOR_SCALING = 5
ALG_CONFIG_ID, ALG_CONFIG_MAX_ID, ALG_SEARCH_ITERATIONS, ALG_SPLIT_K, ALG_SPLIT_K_MODE = 0, 1, 2, 3, 4
ALIGN = 16
_OPAQUE = 512


def _raw_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _raw_stream)  # noqa: F811


class CusparseLtError(RuntimeError):
    pass


def _find_library() -> str:
    try:
        import nvidia.cusparselt as pkg  # the wheel torch depends on

        for root in pkg.__path__:
            hits = glob.glob(os.path.join(root, "lib", "libcusparseLt.so*"))
            if hits:
                return sorted(hits)[0]
    except ImportError:
        pass
    return "libcusparseLt.so.0"


class _Opaque:
    """A 16-byte aligned 512-byte struct owned by Python."""

    def __init__(self) -> None:
        self._raw = ctypes.create_string_buffer(_OPAQUE + 16)
        addr = ctypes.addressof(self._raw)
        self.ptr = ctypes.c_void_p(addr + (-addr) % 16)


class _Lib:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(_find_library())
        vp, i64, u32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int32
        sz = ctypes.c_size_t
        sig = {
            "cusparseLtInit": [vp],
            "cusparseLtGetErrorString": [i32],
            "cusparseLtDenseDescriptorInit": [vp, vp, i64, i64, i64, u32, i32, i32],
            "cusparseLtStructuredDescriptorInit": [vp, vp, i64, i64, i64, u32, i32, i32, i32],
            "cusparseLtMatmulDescriptorInit": [vp, vp, i32, i32, vp, vp, vp, vp, i32],
            "cusparseLtMatmulDescSetAttribute": [vp, vp, i32, vp, sz],
            "cusparseLtMatmulAlgSelectionInit": [vp, vp, vp, i32],
            "cusparseLtMatmulAlgSetAttribute": [vp, vp, i32, vp, sz],
            "cusparseLtMatmulAlgGetAttribute": [vp, vp, i32, vp, sz],
            "cusparseLtMatmulPlanInit": [vp, vp, vp, vp],
            "cusparseLtMatmulGetWorkspace": [vp, vp, vp],
            "cusparseLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32],
            "cusparseLtMatmulSearch": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32],
            "cusparseLtMatmulPlanDestroy": [vp],
        }
        for name, args in sig.items():
            fn = getattr(self.lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int if name != "cusparseLtGetErrorString" else ctypes.c_char_p
        self.handle = _Opaque()
        self.check(self.lib.cusparseLtInit(self.handle.ptr), "cusparseLtInit")
        self.matmul = self.lib.cusparseLtMatmul

    def check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self.lib.cusparseLtGetErrorString(status)
            raise CusparseLtError(f"{what} failed: status {status} ({msg.decode() if msg else '?'})")


_LIB: _Lib | None = None
_LOCK = threading.Lock()


def lib() -> _Lib:
    global _LIB
    with _LOCK:
        if _LIB is None:
            _LIB = _Lib()
    return _LIB


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer twice the L2 size (>= 64 MiB): reading it evicts whatever the L2 held."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.ones(max(2 * l2, 64 << 20) // 4, dtype=torch.float32, device=device)


def time_cold_us(fn, flush: torch.Tensor, reps: int = 7, warm: bool = True) -> float:
    """GPU us of one call of fn with the L2 flushed before it (a layer's weight is never L2-resident
    when serving; back-to-back runs on one weight that then sits in L2 mislead for small M):
    CUDA events around each call, median of reps. warm: one untimed call first."""
    if warm:
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        flush.max()  # evict by reading (a memset left dirty lines whose write-back slowed the run)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(flush.device)
    return sorted(s.elapsed_time(e) * 1e3 for s, e in ev)[reps // 2]


def weight_rotation(buf: torch.Tensor) -> list[torch.Tensor]:
    """buf and clones of it, together >= 2x the L2 size (at most 7 clones, extra memory < 2x L2): calls
    that rotate over them read the weight from HBM, as serving does (one layer's weight is not
    L2-resident when its turn comes)."""
    l2 = torch.cuda.get_device_properties(buf.device).L2_cache_size
    copies = max(1, min(8, -(-2 * l2 // max(buf.numel() * buf.element_size(), 1))))
    return [buf] + [buf.clone() for _ in range(copies - 1)]


def time_graph_us(fn, calls: int, reps: int = 5) -> float:
    """GPU us per call: fn (which makes `calls` calls) captured once in a CUDA graph, its replays timed
    with CUDA events, median of reps (launch gaps as under vLLM's CUDA graphs, no host time)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up outside the capture (lazy init, workspace growth)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    del g
    return sorted(a.elapsed_time(b) * 1e3 / calls for a, b in ev)[reps // 2]


class SparseInt8Plan:
    """A cuSPARSELt plan for D[m_pad, n] (bf16) = Xq[m_pad, k] @ W^T * alpha[n]."""

    def __init__(self, m_pad: int, n: int, k: int, device: torch.device) -> None:
        L = lib()
        self.m_pad, self.n, self.k = m_pad, n, k
        h = L.handle.ptr
        self.a, self.b, self.c, self.mm, self.alg, self.plan = (_Opaque() for _ in range(6))
        f = L.lib
        L.check(f.cusparseLtStructuredDescriptorInit(h, self.a.ptr, n, k, k, ALIGN, CUDA_R_8I,
                                                     CUSPARSE_ORDER_ROW, SPARSITY_50), "sparse descriptor")
        L.check(f.cusparseLtDenseDescriptorInit(h, self.b.ptr, m_pad, k, k, ALIGN, CUDA_R_8I,
                                                CUSPARSE_ORDER_ROW), "dense descriptor")
        L.check(f.cusparseLtDenseDescriptorInit(h, self.c.ptr, n, m_pad, n, ALIGN, CUDA_R_16BF,
                                                CUSPARSE_ORDER_COL), "output descriptor")
        L.check(f.cusparseLtMatmulDescriptorInit(h, self.mm.ptr, OP_N, OP_T, self.a.ptr, self.b.ptr,
                                                 self.c.ptr, self.c.ptr, CUSPARSE_COMPUTE_32I), "matmul descriptor")
        one = ctypes.c_int(1)
        L.check(f.cusparseLtMatmulDescSetAttribute(h, self.mm.ptr, MATMUL_ALPHA_VECTOR_SCALING,
                                                   ctypes.byref(one), 4), "alpha vector")
        L.check(f.cusparseLtMatmulAlgSelectionInit(h, self.alg.ptr, self.mm.ptr, 0), "alg selection")
        L.check(f.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.mm.ptr, self.alg.ptr), "plan")
        self.device = device
        self.workspace = self._workspace()
        self._ws_ptr = self.workspace.data_ptr()
        self._beta = ctypes.c_float(0.0)
        self._stream = ctypes.c_void_p(0)
        self._beta_ref = ctypes.byref(self._beta)
        self._stream_ref = ctypes.byref(self._stream)
        self._dev_index = device.index if device.index is not None else torch.cuda.current_device()
        self.alg_id, self.split_k = 0, 1

    def _workspace(self) -> torch.Tensor:
        L = lib()
        size = ctypes.c_size_t(0)
        L.check(L.lib.cusparseLtMatmulGetWorkspace(L.handle.ptr, self.plan.ptr, ctypes.byref(size)), "workspace")
        return torch.empty(max(int(size.value), 16), dtype=torch.uint8, device=self.device)

    def search(self, w_buf: torch.Tensor, alpha: torch.Tensor) -> None:
        """Pick alg_id and split-k by timing (cusparseLtMatmulSearch) on random activations."""
        L = lib()
        h = L.handle.ptr
        xq = torch.randint(-127, 128, (self.m_pad, self.k), dtype=torch.int8, device=self.device)
        d = torch.empty(self.m_pad, self.n, dtype=torch.bfloat16, device=self.device)
        iters = ctypes.c_int(3)
        L.check(L.lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, ALG_SEARCH_ITERATIONS,
                                                      ctypes.byref(iters), 4), "search iterations")
        self._stream.value = torch.cuda.current_stream(self.device).cuda_stream
        L.check(L.lib.cusparseLtMatmulSearch(
            h, self.plan.ptr, alpha.data_ptr(), w_buf.data_ptr(), xq.data_ptr(), ctypes.byref(self._beta),
            d.data_ptr(), d.data_ptr(), self.workspace.data_ptr(), ctypes.byref(self._stream), 1), "search")
        alg_id, split_k, mode = ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(0)
        for attr, val, what in [(ALG_CONFIG_ID, alg_id, "alg id"), (ALG_SPLIT_K, split_k, "split k"),
                                (ALG_SPLIT_K_MODE, mode, "split k mode")]:
            L.check(L.lib.cusparseLtMatmulAlgGetAttribute(h, self.alg.ptr, attr, ctypes.byref(val), 4), what)
        self.alg_id, self.split_k = int(alg_id.value), int(split_k.value)
        # rebuild the plan with the chosen algorithm, as torch does after its search
        L.check(L.lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, ALG_CONFIG_ID, ctypes.byref(alg_id), 4), "set alg id")
        if self.split_k > 1:
            L.check(L.lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, ALG_SPLIT_K, ctypes.byref(split_k), 4), "set split k")
            L.check(L.lib.cusparseLtMatmulAlgSetAttribute(h, self.alg.ptr, ALG_SPLIT_K_MODE, ctypes.byref(mode), 4), "set split k mode")
        self.plan = _Opaque()
        L.check(L.lib.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.mm.ptr, self.alg.ptr), "plan")
        self.workspace = self._workspace()
        self._ws_ptr = self.workspace.data_ptr()
        torch.cuda.synchronize(self.device)

    def _configure(self, alg_id: int, split_k: int) -> bool:
        """Rebuild alg selection + plan for (alg_id, split_k); False (state unchanged) if rejected."""
        L = lib()
        h, f = L.handle.ptr, L.lib
        alg, plan = _Opaque(), _Opaque()
        L.check(f.cusparseLtMatmulAlgSelectionInit(h, alg.ptr, self.mm.ptr, 0), "alg selection")
        a, s = ctypes.c_int(alg_id), ctypes.c_int(split_k)
        if f.cusparseLtMatmulAlgSetAttribute(h, alg.ptr, ALG_CONFIG_ID, ctypes.byref(a), 4):
            return False
        if split_k > 1 and f.cusparseLtMatmulAlgSetAttribute(h, alg.ptr, ALG_SPLIT_K, ctypes.byref(s), 4):
            return False
        if f.cusparseLtMatmulPlanInit(h, plan.ptr, self.mm.ptr, alg.ptr):
            return False
        self.alg, self.plan = alg, plan
        self.workspace = self._workspace()
        self._ws_ptr = self.workspace.data_ptr()
        self.alg_id, self.split_k = alg_id, split_k
        return True

    def max_alg_id(self) -> int:
        L = lib()
        v = ctypes.c_int(0)
        L.check(L.lib.cusparseLtMatmulAlgGetAttribute(L.handle.ptr, self.alg.ptr, ALG_CONFIG_MAX_ID,
                                                      ctypes.byref(v), 4), "max alg id")
        return int(v.value)

    def search_cold(self, w_buf: torch.Tensor, alpha: torch.Tensor, split_ks=(1, 2, 3, 4, 6, 8), reps: int = 7) -> dict:
        """Pick (alg_id, split_k) by timing each with the weight evicted from L2 before every run
        (as in serving, where a layer's weight is never L2-resident). cusparseLtMatmulSearch times
        back-to-back runs on one weight that then sits in L2, which misleads for small M (memory
        bound). Used for the small (decode) buckets. Returns {(alg, split_k): us}."""
        xq = torch.randint(-127, 128, (self.m_pad, self.k), dtype=torch.int8, device=self.device)
        d = torch.empty(self.m_pad, self.n, dtype=torch.bfloat16, device=self.device)
        flush = l2_flush_buffer(self.device)
        timings, best = {}, None
        for alg_id in range(self.max_alg_id()):
            for sk in split_ks:
                if not self._configure(alg_id, sk):
                    continue
                try:
                    self.run(w_buf, xq, alpha, d)
                except CusparseLtError:
                    continue
                us = time_cold_us(lambda: self.run(w_buf, xq, alpha, d), flush, reps, warm=False)
                timings[(alg_id, sk)] = us
                if best is None or us < best[0]:
                    best = (us, alg_id, sk)
        if best is None or not self._configure(best[1], best[2]):
            raise CusparseLtError(f"no usable cuSPARSELt algorithm for m_pad={self.m_pad}, n={self.n}, k={self.k}")
        torch.cuda.synchronize(self.device)
        return timings

    def run(self, w_buf: torch.Tensor, xq: torch.Tensor, alpha: torch.Tensor, d: torch.Tensor) -> None:
        """xq int8 [m_pad, k], d bf16 [m_pad, n]; enqueued on the current stream, no sync.
        Host cost: one foreign call with prebuilt by-reference arguments (the plan, handle,
        beta and stream cells are fixed; only the stream handle's value is refreshed)."""
        self._stream.value = _raw_stream(self._dev_index)
        L = _LIB
        dp = d.data_ptr()
        status = L.matmul(L.handle.ptr, self.plan.ptr, alpha.data_ptr(), w_buf.data_ptr(), xq.data_ptr(),
                          self._beta_ref, dp, dp, self._ws_ptr, self._stream_ref, 1)
        if status:
            L.check(status, f"cusparseLtMatmul (m_pad={self.m_pad}, n={self.n}, k={self.k})")


def compress(weight: torch.Tensor) -> torch.Tensor:
    """int8 2:4 [N, K] on the GPU -> cuSPARSELt's compressed buffer (values ++ metadata)."""
    return torch._cslt_compress(weight.contiguous())
