"""Sparse24CudaKernel: 2:4 W8A8 linear on NVIDIA sm80+ with ONE resident weight copy.

The resident weight is cuSPARSELt's compressed buffer (values ++ metadata, 0.625 B/weight).
Default (every M): cuSPARSELt through cached plans (cslt.py), M padded to a bucket; plans of the
small (decode) buckets get their alg_id / split-k from a cold-weight search (search_cold), the
others from cusparseLtMatmulSearch. Two implementations of one call, chosen at prepare():
  * path "ext" (ext.py, sparse24_ext.cu): ONE C++ op ``sparse24_ext::linear`` = CUDA per-token
    quant + cusparseLtMatmul + CUDA epilogue; needs nvcc + ninja once (built on first use).
    For M <= 16, where measured faster per shape (``ext_decode``), the op runs its decode kernel
    instead: W8A16 (activations stay bf16/fp16, int8 weight decoded in registers, dense mma), one
    launch on the same compressed buffer (see sparse24_ext.cu);
  * path "triton" (fallback, no compiler): Triton quant (quant_kernel.py) + ctypes
    cusparseLtMatmul + Triton epilogue (epilogue_kernel.py) inside ``sparse24::cuda_w8a8_linear``.
VLLM_SPARSE24_DECODE=0 turns the C++ decode kernel off. Opt-in (=1, path "triton" only): Triton decode kernel reading the same buffer
for M <= threshold (decode_kernel.py; correct but slower than cuSPARSELt on H100). The threshold,
the decode config and every prefill plan (with its searched alg_id / split-k) are measured
and built in prepare(), per (N, K), so serving never builds a plan. The dispatch happens at
run time inside the custom op ``sparse24::cuda_w8a8_linear`` (torch.compile sees one opaque
op; a CUDA graph captures whichever branch its token count takes).
"""

from __future__ import annotations

import bisect
import os

import torch

from ..base import W8A8LinearKernel
from . import cslt, ext
from .decode_kernel import DecodeConfig, candidate_configs, sparse24_decode
from .epilogue_kernel import token_scale_bias
from .layout import check_shape, meta_block_rows
from .quant_kernel import quantize_per_token_into

DECODE_MAX_TOKENS = 64  # the Triton decode kernel's largest BLOCK_M; the measured threshold is <= this
EXT_DECODE_MAX = 16  # the C++ decode kernel: two n-tiles of 8 tokens
DECODE_MARGIN = 0.97  # the decode kernel replaces cuSPARSELt where it is >= 3% faster (graph timing spread ~1%)
THRESHOLD_CANDIDATES = (8, 16, 32, 48, 64)
COLD_SEARCH_MAX = 64  # buckets <= this (memory bound) get their algorithm from search_cold
MODEL_DTYPES = (torch.bfloat16, torch.float16)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Padded-M buckets: every 16 up to 256, then 4 per octave (<= 25% padding)."""
    out = list(range(16, 257, 16))
    base = 256
    while out[-1] < max_tokens:
        out += [base * 5 // 4, base * 3 // 2, base * 7 // 4, base * 2]
        base *= 2
    return [b for b in out if b <= max(max_tokens, 16)] or [16]


def max_prefill_tokens() -> int:
    return int(os.environ.get("VLLM_SPARSE24_MAX_TOKENS", "8192"))


def _time_us(fn, iters: int = 10) -> float:
    """GPU us per call of fn, from replays of a CUDA graph of `iters` calls (host launch cost
    excluded, as in serving under CUDA graphs; eager timing was host-bound and misled the tuner)."""
    return cslt.time_graph_us(lambda: [fn() for _ in range(iters)], iters, reps=3)


class _ShapeState:
    """Per (N, K, device): plans, decode config, threshold (shared by layers of that shape)."""

    def __init__(self) -> None:
        self.plans: dict[int, cslt.SparseInt8Plan] = {}
        self.buckets: list[int] = []
        self.decode_cfg: DecodeConfig | None = None
        self.threshold = 0
        self.timings: dict[str, float] = {}
        self.ext_set: int | None = None  # plan-set id in the C++ extension (path "ext")
        self.cold: dict[int, float] = {}  # bucket -> us of the cold-searched algorithm
        self.ext_decode: dict = {}  # the C++ decode kernel: max_m and (rows per block, warps) per n-tiles


_SHAPES: dict[tuple[int, int, int], _ShapeState] = {}
_WORKSPACES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_KERNELS: list[Sparse24CudaKernel] = []


def _workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared split-K accumulators (int32, all zero between calls) and tile counters."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    acc_need, cnt_need = DECODE_MAX_TOKENS * n, (n // 16) * (DECODE_MAX_TOKENS // 16)
    acc, cnt = _WORKSPACES.get(idx, (None, None))
    if acc is None or acc.numel() < acc_need or cnt.numel() < cnt_need:
        acc = torch.zeros(max(acc_need, acc.numel() if acc is not None else 0), dtype=torch.int32, device=device)
        cnt = torch.zeros(max(cnt_need, cnt.numel() if cnt is not None else 0), dtype=torch.int32, device=device)
        _WORKSPACES[idx] = (acc, cnt)
    return acc, cnt


class Sparse24CudaKernel(W8A8LinearKernel):
    name = "sparse24_cuda"
    act_dtypes = MODEL_DTYPES

    def __init__(self, n: int, k: int, sparse: bool, layer_name: str) -> None:
        super().__init__(n, k, sparse, layer_name)
        check_shape(n, k, layer_name)
        self.handle = len(_KERNELS)
        _KERNELS.append(self)
        self.state: _ShapeState | None = None
        self._ext_set: int | None = None
        self.meta_block_rows = meta_block_rows(n)

    @classmethod
    def is_supported(cls, device: torch.device, sparse: bool) -> tuple[bool, str | None]:
        if not sparse:
            return False, "only 2:4 sparse layers (dense layers use another kernel)"
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return False, "needs a CUDA device"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False, "needs compute capability >= 8.0 (sparse tensor cores)"
        try:
            cslt.lib()
        except (OSError, cslt.CusparseLtError) as e:
            return False, f"cuSPARSELt unavailable: {e}"
        return True, None

    # ---- load time ----------------------------------------------------------------------
    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.dtype != torch.int8 or tuple(weight.shape) != (self.n, self.k):
            raise ValueError(f"{self.layer_name}: expected int8 weight [{self.n}, {self.k}], "
                             f"got {weight.dtype} {tuple(weight.shape)}")
        if weight.device.type != "cuda":
            raise ValueError(f"{self.layer_name}: weight must be on a CUDA device, got {weight.device}")
        buf = cslt.compress(weight)
        ws = weight_scale.reshape(-1).to(device=weight.device, dtype=torch.float32).contiguous()
        _workspace(weight.device, self.n)
        key = (self.n, self.k, weight.device.index or 0)
        if key not in _SHAPES:
            st = self._tune(buf, ws, weight.device)
            if st.threshold == 0 and ext.build():
                ext.register_fake()
                st.ext_set = ext.register(self.n, self.k, st.plans)
                if os.environ.get("VLLM_SPARSE24_DECODE", "") != "0":
                    self._tune_ext_decode(st, buf, ws, weight.device)
            _SHAPES[key] = st
        self.state = _SHAPES[key]
        self._ext_set = self.state.ext_set
        if self._ext_set is not None:
            self._ext_op = torch.ops.sparse24_ext.linear.default
            self._ext_direct = ext.direct()
        return {"weight_cslt": buf, "weight_scale": ws}

    def _tune(self, buf: torch.Tensor, ws: torch.Tensor, device: torch.device) -> _ShapeState:
        st = _ShapeState()
        st.buckets = prefill_buckets(max_prefill_tokens())
        for m_pad in st.buckets:
            plan = cslt.SparseInt8Plan(m_pad, self.n, self.k, device)
            if m_pad <= COLD_SEARCH_MAX and os.environ.get("VLLM_SPARSE24_COLD_SEARCH", "1") != "0":
                t = plan.search_cold(buf, ws)
                st.cold[m_pad] = round(t[(plan.alg_id, plan.split_k)], 2)
            else:
                plan.search(buf, ws)
            st.plans[m_pad] = plan
        # The Triton decode kernel is correct (memcheck-clean, tests pass on H100) but slower than
        # cuSPARSELt on the Llama-3-8B shapes (kernels-h100-2026-11-21.json), and the eager timing
        # below is host-bound and picked it wrongly for o_proj; so it is opt-in (=1) for now.
        if os.environ.get("VLLM_SPARSE24_DECODE", "0") != "1":  # cuSPARSELt for every M
            return st
        acc, cnt = _workspace(device, self.n)
        xq = torch.randint(-127, 128, (DECODE_MAX_TOKENS, self.k), dtype=torch.int8, device=device)
        xs = torch.rand(DECODE_MAX_TOKENS, device=device) * 1e-2
        out = torch.empty(DECODE_MAX_TOKENS, self.n, dtype=torch.bfloat16, device=device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        best = None
        for cfg in candidate_configs(self.n, self.k, sms):
            t = _time_us(lambda c=cfg: sparse24_decode(xq[:16], xs, buf, ws, None, out[:16], self.n, self.k,
                                                       c, self.meta_block_rows, acc, cnt))
            if best is None or t < best[0]:
                best = (t, cfg)
        st.decode_cfg = best[1]
        d = torch.empty(st.buckets[-1], self.n, dtype=torch.bfloat16, device=device)
        for m in THRESHOLD_CANDIDATES:
            t_dec = _time_us(lambda m=m: sparse24_decode(xq[:m], xs, buf, ws, None, out[:m], self.n, self.k,
                                                         st.decode_cfg, self.meta_block_rows, acc, cnt))
            plan = st.plans[self._bucket_of(st, m)]

            def prefill(m=m, plan=plan):
                plan.run(buf, xq[: plan.m_pad] if plan.m_pad <= DECODE_MAX_TOKENS else xq, ws, d[: plan.m_pad])
                token_scale_bias(d, xs[:m], None, out[:m])

            t_pre = _time_us(prefill)
            st.timings[f"decode_m{m}"], st.timings[f"prefill_m{m}"] = t_dec, t_pre
            if t_dec > t_pre:
                break
            st.threshold = m
        torch.cuda.synchronize(device)
        return st

    def _tune_ext_decode(self, st: _ShapeState, buf: torch.Tensor, ws: torch.Tensor, device: torch.device) -> None:
        """The C++ op's decode kernels (M <= 16): pick (kind, rows per block, warps) for M <= 8 and M <= 16,
        then the largest M in (1, 2, 4, 8, 16) up to which the pick beats the cuSPARSELt path (which pads
        M to 16, so its time hardly changes below 16 while the decode kernel's grows with M). Timed as
        serving runs them: CUDA-graph replays of calls that rotate over copies of the weight (read from
        HBM, not L2); single cold calls (the first tuner) were too noisy for configs a few % apart. The
        plan set keeps the result, so serving only compares M with a number. A kind whose output
        disagrees with the dense-mma kernel (kind 0, the tested one) on this weight is not used."""
        dec, lin = ext.decode_direct(), ext.direct()  # lin: arguments made here, never None
        x = torch.randn(EXT_DECODE_MAX, self.k, dtype=torch.bfloat16, device=device)
        rot = cslt.weight_rotation(buf)
        rounds = -(-8 // len(rot))  # >= 8 calls per graph

        def graph_us(call) -> float:  # call(b): one layer call on weight copy b
            return cslt.time_graph_us(lambda: [call(b) for _ in range(rounds) for b in rot], rounds * len(rot))

        mb = self.meta_block_rows
        kinds = [0]
        ref = dec(x, buf, ws, None, 16, 4, mb, 0).double()
        got = dec(x, buf, ws, None, 16, 4, mb, 1).double()
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        st.timings["ext_decode_sp_vs_dense_rel_err"] = err
        if err < 1e-2:
            kinds.append(1)
        configs = [(kd, r, w) for kd in kinds for r in (16, 32, 48, 64) if self.n % r == 0 for w in (4, 8, 16)]
        best, t_dec, t_cslt = {}, {}, {}
        for m in (8, EXT_DECODE_MAX):
            times = {c: graph_us(lambda b, c=c, m=m: dec(x[:m], b, ws, None, c[1], c[2], mb, c[0])) for c in configs}
            best[m] = min(times, key=times.get)
            t_dec[m] = times[best[m]]
            st.timings[f"ext_decode_m{m}_dense_best"] = round(min(v for c, v in times.items() if c[0] == 0), 2)
        for m in (1, 2, 4):
            c = best[8]
            t_dec[m] = graph_us(lambda b, c=c, m=m: dec(x[:m], b, ws, None, c[1], c[2], mb, c[0]))
        max_m = 0
        for m in (1, 2, 4, 8, EXT_DECODE_MAX):
            t_cslt[m] = graph_us(lambda b, m=m: lin(x[:m], b, ws, None, st.ext_set))
            st.timings[f"ext_decode_m{m}"], st.timings[f"ext_cslt_m{m}"] = round(t_dec[m], 2), round(t_cslt[m], 2)
            if t_dec[m] >= DECODE_MARGIN * t_cslt[m]:
                break
            max_m = m
        rot.clear()  # free the clones
        b8, b16 = best[8], best[EXT_DECODE_MAX]
        ext.set_decode(st.ext_set, max_m, mb, (b8[1], b16[1]), (b8[2], b16[2]), (b8[0], b16[0]))
        st.ext_decode = {"max_m": max_m, "m8": b8, f"m{EXT_DECODE_MAX}": b16, "kinds": kinds}
        torch.cuda.synchronize(device)

    def activations_quantized(self, m: int) -> bool:
        """False where M tokens take the C++ decode kernel (W8A16: bf16/fp16 activations, exact
        products), True for the W8A8 paths (per-token int8 activations)."""
        st = self.state
        return not (self._ext_set is not None and st is not None and m <= st.ext_decode.get("max_m", 0))

    @staticmethod
    def _bucket_of(st: _ShapeState, m: int) -> int:
        return st.buckets[bisect.bisect_left(st.buckets, m)]

    # ---- run time -----------------------------------------------------------------------
    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._ext_set is not None:  # one C++ op (the pybind entry when eager: no dispatcher)
            if x.dtype not in MODEL_DTYPES:
                raise TypeError(f"{self.layer_name}: activations must be bfloat16 or float16, got {x.dtype}")
            x2 = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, x.shape[-1]).contiguous()
            if torch.compiler.is_compiling():
                out = self._ext_op(x2, tensors["weight_cslt"], tensors["weight_scale"], bias, self._ext_set)
            else:
                out = self._ext_direct(x2, tensors["weight_cslt"], tensors["weight_scale"], bias, self._ext_set)
                if out is None:  # bad arguments (the entry point throws nothing)
                    raise RuntimeError(f"{self.layer_name}: {ext.last_error()}")
            return out if x2 is x else out.reshape(*x.shape[:-1], self.n)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if torch.compiler.is_compiling():
            out = torch.ops.sparse24.cuda_w8a8_linear(
                x2, tensors["weight_cslt"], tensors["weight_scale"], bias, self.handle)
        else:  # eager: skip the dispatcher round trip, same function
            out = self.run(x2, tensors["weight_cslt"], tensors["weight_scale"], bias)
        return out.reshape(*shape[:-1], self.n)

    def run(self, x: torch.Tensor, buf: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] model dtype -> [M, N]; dispatch by M (decode kernel or cuSPARSELt).

        Host cost is kept to a few torch.empty calls, two pre-compiled Triton launches
        (launch.FastLauncher) and one ctypes call; the prefill epilogue runs in place on the
        cuSPARSELt output when the model dtype is bf16 (one allocation less)."""
        st = self.state
        if st is None:
            raise RuntimeError(f"{self.layer_name}: prepare() was not called")
        if x.dtype not in MODEL_DTYPES:
            raise TypeError(f"{self.layer_name}: activations must be bfloat16 or float16, got {x.dtype}")
        if x.shape[-1] != self.k:
            raise ValueError(f"{self.layer_name}: expected activations [..., {self.k}], got {tuple(x.shape)}")
        if x.stride(-1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        dev = x.device
        if m == 0:
            return torch.empty(0, self.n, dtype=x.dtype, device=dev)
        if m <= st.threshold:
            out = torch.empty(m, self.n, dtype=x.dtype, device=dev)
            xq = torch.empty(m, self.k, dtype=torch.int8, device=dev)
            xs = torch.empty(m, dtype=torch.float32, device=dev)
            quantize_per_token_into(x, xq, xs)
            acc, cnt = _WORKSPACES[dev.index or 0]
            sparse24_decode(xq, xs, buf, ws, bias, out, self.n, self.k, st.decode_cfg,
                            self.meta_block_rows, acc, cnt)
            return out
        top = st.buckets[-1]
        if m <= top:  # one chunk (the common case)
            plan = st.plans[st.buckets[bisect.bisect_left(st.buckets, m)]]
            xq = torch.empty(plan.m_pad, self.k, dtype=torch.int8, device=dev)
            xs = torch.empty(m, dtype=torch.float32, device=dev)
            quantize_per_token_into(x, xq, xs)
            d = torch.empty(plan.m_pad, self.n, dtype=torch.bfloat16, device=dev)
            plan.run(buf, xq, ws, d)
            if x.dtype == torch.bfloat16:
                out = d[:m] if plan.m_pad != m else d
                token_scale_bias(d, xs, bias, out)
                return out
            out = torch.empty(m, self.n, dtype=x.dtype, device=dev)
            token_scale_bias(d, xs, bias, out)
            return out
        out = torch.empty(m, self.n, dtype=x.dtype, device=dev)
        for start in range(0, m, top):
            mc = min(top, m - start)
            plan = st.plans[self._bucket_of(st, mc)]
            xq = torch.empty(plan.m_pad, self.k, dtype=torch.int8, device=dev)
            xs = torch.empty(mc, dtype=torch.float32, device=dev)
            quantize_per_token_into(x[start:start + mc], xq, xs)
            d = torch.empty(plan.m_pad, self.n, dtype=torch.bfloat16, device=dev)
            plan.run(buf, xq, ws, d)
            token_scale_bias(d, xs, bias, out[start:start + mc])
        return out

    def host_profile(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, iters: int = 200) -> dict[str, float]:
        """Host microseconds per call of each piece of the prefill path (benchmark aid)."""
        import time

        st, buf, ws = self.state, tensors["weight_cslt"], tensors["weight_scale"]
        m = x.shape[0]
        plan = st.plans[self._bucket_of(st, m)]
        xq = torch.empty(plan.m_pad, self.k, dtype=torch.int8, device=x.device)
        xs = torch.empty(m, dtype=torch.float32, device=x.device)
        d = torch.empty(plan.m_pad, self.n, dtype=torch.bfloat16, device=x.device)
        pieces = {
            "empty_x3": lambda: (torch.empty(plan.m_pad, self.k, dtype=torch.int8, device=x.device),
                                 torch.empty(m, dtype=torch.float32, device=x.device),
                                 torch.empty(plan.m_pad, self.n, dtype=torch.bfloat16, device=x.device)),
            "quant_launch": lambda: quantize_per_token_into(x, xq, xs),
            "cslt_matmul": lambda: plan.run(buf, xq, ws, d),
            "epilogue_launch": lambda: token_scale_bias(d, xs, None, d[:m]),
            "run_total": lambda: self.run(x, buf, ws, None),
        }
        if self._ext_set is not None:
            pieces["ext_op"] = lambda: self._ext_op(x, buf, ws, None, self._ext_set)
        res = {}
        for name, f in pieces.items():
            for _ in range(10):
                f()
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)  # keep the GPU busy: pure enqueue cost
            t0 = time.perf_counter_ns()
            for _ in range(iters):
                f()
            t1 = time.perf_counter_ns()
            torch.cuda.synchronize()
            res[name] = (t1 - t0) / iters / 1e3
        return res

    def describe(self) -> dict:
        st = self.state
        return {"path": "ext" if self._ext_set is not None else "triton", "ext_error": ext.error(),
                "ext_decode": st.ext_decode,
                "cold_us": st.cold, "threshold": st.threshold, "decode_cfg": vars(st.decode_cfg) if st.decode_cfg else None,
                "algs": {m: (p.alg_id, p.split_k) for m, p in st.plans.items()}, "timings": st.timings}


@torch.library.custom_op("sparse24::cuda_w8a8_linear", mutates_args=())
def cuda_w8a8_linear(x: torch.Tensor, weight_cslt: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    """x [M, K]; weight_cslt: cuSPARSELt compressed int8; weight_scale f32 [N] -> [M, N]."""
    return _KERNELS[handle].run(x, weight_cslt, weight_scale, bias)


@cuda_w8a8_linear.register_fake
def _(x, weight_cslt, weight_scale, bias, handle):
    return x.new_empty((x.shape[0], weight_scale.shape[0]))

