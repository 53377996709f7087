"""2:4 sparse W8A8 linear on Hopper: libsparse24's CUTLASS GEMM with both scales and the bias fused.
int8 or fp8 (e4m3 weights and activations), the checkpoint's scheme: the GEMM configs of that
input dtype (gemm_table.GEMM_TABLE), the compressor and the layout are shared.

Resident weight (one copy, made at load time on the GPU by CUTLASS's sm90 compressor from the
unpacked checkpoint weight): ``values`` [N, K/2] (the kept int8 / e4m3 values, row-major) and ``meta`` (2-bit
indices of the kept pair of every group of 4, in CUTLASS's reordered metadata layout; see
``Sm90GemmSparseConfig`` in CUTLASS's ``sm90_sparse_config.inl``: 64-row x 128-column atoms) =
0.625 bytes per weight for N a multiple of 64 and K a multiple of 128 (padded to those otherwise).

A call: per-token quant (act_quant.py: plain torch ops under torch.compile, so Inductor fuses
it into the previous norm / activation; in eager mode one CUDA kernel for int8, the torch ops for
e4m3), then the custom op ``sparse24::cutlass_sparse_mm``, which picks the kernel for its M
(gemm_table.GemmPlan, resolved at load time: the decode GEMM of csrc/decode/ up to the plan's measured
``decode_max_m`` tokens, a CUTLASS config above) and launches ONE kernel writing the bf16/fp16
output. Capture-safe under CUDA graphs: no allocation but the output; the split-K workspaces are
allocated at load time.
"""

from __future__ import annotations

import torch

from ..base import LinearLayer, W8A8LinearKernel
from . import lib
from .act_quant import quantize_activations
from .device import MODEL_DTYPES, hopper
from .gemm_table import DTYPE_NAMES, GEMM_TABLE, GemmPlan, cutlass_pdl, decode_max_m

_WEIGHT_DTYPES = {torch.int8: lib.INT8, torch.float8_e4m3fn: lib.E4M3}
# Largest M a workspace is sized for in the open-ended bucket (persistent configs need none there).
_WORKSPACE_M = 1 << 16

# The op's `plan_id` argument indexes _PLANS. It is a graph constant, so layers of one shape share
# one plan: vLLM's compiled pieces of identical layers stay identical (one compilation, cached).
_PLANS: list[GemmPlan] = []
_PLAN_IDS: dict[tuple, int] = {}
_WORKSPACES: dict[int, torch.Tensor] = {}  # device index -> split-K / stream-K workspace
# device index -> the decode GEMM's workspace: zeroed once here, every call leaves it zeroed again
_DECODE_WORKSPACES: dict[int, torch.Tensor] = {}
_OUT_DTYPES = {torch.bfloat16: lib.BF16, torch.float16: lib.F16}
_TIMING_REPS = 5
_HEAD_START_CYCLES = 200_000  # ~0.1 ms: longer than the host side of one call


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 weight [N, K] (int8 or float8_e4m3fn, on the GPU) -> (values [N, K/2], meta uint8 [...])."""
    if weight.dtype not in _WEIGHT_DTYPES or weight.dim() != 2 or weight.device.type != "cuda":
        raise ValueError(f"compress_24: expected a 2-D int8/float8_e4m3fn CUDA tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    n, k = weight.shape
    values_bytes, meta_bytes = lib.compressed_bytes(n, k)
    if values_bytes != n * k // 2:
        raise ValueError(f"compress_24: K={k} must be a multiple of 32")
    weight = weight.contiguous()
    values = torch.empty(n, k // 2, dtype=weight.dtype, device=weight.device)
    meta = torch.empty(meta_bytes, dtype=torch.uint8, device=weight.device)
    stream = torch.cuda.current_stream(weight.device).cuda_stream
    lib.check(lib.lib().s24_compress(_WEIGHT_DTYPES[weight.dtype], weight.data_ptr(), values.data_ptr(),
                                     meta.data_ptr(), n, k, stream), f"compress [{n}, {k}]")
    return values, meta


def make_plan(n: int, k: int, weight_dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device,
              values: torch.Tensor | None = None, meta: torch.Tensor | None = None) -> int:
    """Resolve the GEMM configs of one layer shape, size the shared workspaces and measure up to which
    token count the decode GEMM beats them (on ``values``/``meta`` when given, else on a synthetic
    weight of the shape); returns the plan id that ``sparse_mm`` / the custom op take."""
    idx = torch.device(device).index or 0
    key = (n, k, weight_dtype, out_dtype, idx)
    if key in _PLAN_IDS:
        return _PLAN_IDS[key]
    plan = GemmPlan(n, k, weight_dtype, out_dtype, lib.config_ids())
    need = max(lib.workspace_bytes(cfg, m, n, k, splits) for m, (cfg, splits, _) in plan.buckets(_WORKSPACE_M))
    if need > 0 and (idx not in _WORKSPACES or _WORKSPACES[idx].numel() < need):
        _WORKSPACES[idx] = torch.empty(need, dtype=torch.uint8, device=device)
    kernel_max_m = lib.decode_max_m()
    if k % 128 == 0:
        need = lib.decode_workspace_bytes(kernel_max_m, n, k)
        if need > 0 and (idx not in _DECODE_WORKSPACES or _DECODE_WORKSPACES[idx].numel() < need):
            _DECODE_WORKSPACES[idx] = torch.zeros(need, dtype=torch.uint8, device=device)
    bufs: list[torch.Tensor] = []  # made on the first timing only (none when the env var decides)

    def measure(m: int) -> tuple[float, float]:
        if not bufs:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            bufs.append(torch.empty(2 * l2, dtype=torch.uint8, device=device))
            if values is None or meta is None:  # a synthetic weight (any metadata byte is valid)
                bufs.append(torch.randint(0, 64, (n, k // 2), dtype=torch.int8, device=device).view(weight_dtype))
                bufs.append(torch.zeros(lib.compressed_bytes(n, k)[1], dtype=torch.uint8, device=device))
            else:
                bufs.extend((values, meta))
        return _time_decode_vs_gemm(plan, m, device, bufs[1], bufs[2], bufs[0])

    plan.decode_max_m = decode_max_m(n, k, weight_dtype, kernel_max_m, measure)
    _PLANS.append(plan)
    _PLAN_IDS[key] = len(_PLANS) - 1
    return _PLAN_IDS[key]


def _time_decode_vs_gemm(plan: GemmPlan, m: int, device: torch.device, values: torch.Tensor,
                         meta: torch.Tensor, flush: torch.Tensor) -> tuple[float, float]:
    """(decode GEMM seconds, CUTLASS GEMM seconds) at M tokens on this plan's shape: median of a few
    CUDA-event timed calls, each after overwriting twice the L2, so the weight streams from HBM as in
    serving (where the other layers evict it), and after a short GPU sleep, so the events see the
    kernel and not the host's launch latency."""
    xq = torch.randint(0, 64, (m, plan.k), dtype=torch.int8, device=device).view(plan.in_dtype)
    xs = torch.full((m,), 1e-2, dtype=torch.float32, device=device)
    ws = torch.full((plan.n,), 1e-3, dtype=torch.float32, device=device)

    def seconds(decode: bool) -> float:
        run = (lambda: _decode_mm(xq, xs, values, meta, ws, None, plan)) if decode else (
            lambda: _cutlass_mm(xq, xs, values, meta, ws, None, plan))
        run()  # warm up
        times = []
        for _ in range(_TIMING_REPS):
            flush.zero_()
            # keep the GPU busy while Python enqueues the call, so the events time the kernel only
            torch.cuda._sleep(_HEAD_START_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        return sorted(times)[len(times) // 2]

    return seconds(True), seconds(False)


def _prepare_operands(x_scale: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not x_scale.is_contiguous():
        x_scale = x_scale.contiguous()
    if bias is not None and (bias.dtype != out_dtype or not bias.is_contiguous()):
        bias = bias.to(out_dtype).contiguous()
    return x_scale, bias


def _cutlass_mm(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                w_scale: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan,
                pdl: bool | None = None) -> torch.Tensor:
    """The plan's CUTLASS config at this M; ``pdl`` overrides ``VLLM_SPARSE24_PDL`` (tests, benchmarks)."""
    m = xq.shape[0]
    out = torch.empty(m, plan.n, dtype=plan.out_dtype, device=xq.device)
    if m == 0:
        return out
    if not xq.is_contiguous():
        xq = xq.contiguous()
    x_scale, bias = _prepare_operands(x_scale, bias, plan.out_dtype)
    cfg, splits, swizzle = plan.pick(m)
    ws = _WORKSPACES.get(xq.device.index or 0)
    rc = lib.lib().s24_gemm(
        cfg, values.data_ptr(), meta.data_ptr(), xq.data_ptr(), x_scale.data_ptr(), w_scale.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), m, plan.n, plan.k, splits, swizzle,
        None if ws is None else ws.data_ptr(), 0 if ws is None else ws.numel(),
        int(cutlass_pdl() if pdl is None else pdl),
        torch.cuda.current_stream().cuda_stream)
    if rc:
        lib.check(rc, f"sparse24 GEMM m={m} n={plan.n} k={plan.k}")
    return out


def _decode_mm(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
               w_scale: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan,
               tuning: lib.DecodeTuning | None = None) -> torch.Tensor:
    m = xq.shape[0]
    out = torch.empty(m, plan.n, dtype=plan.out_dtype, device=xq.device)
    if m == 0:
        return out
    # rows of x may be strided (a slice of a wider buffer) if they stay 16-byte aligned
    if xq.stride(-1) != 1 or (m > 1 and xq.stride(0) % 16) or xq.data_ptr() % 16:
        # a fresh allocation: .contiguous() returns a misaligned one-row slice unchanged
        xq = torch.empty(xq.shape, dtype=xq.dtype, device=xq.device).copy_(xq)
    x_scale, bias = _prepare_operands(x_scale, bias, plan.out_dtype)
    ws = _DECODE_WORKSPACES.get(xq.device.index or 0)
    rc = lib.lib().s24_decode_gemm(
        _WEIGHT_DTYPES[plan.in_dtype], _OUT_DTYPES[plan.out_dtype], values.data_ptr(), meta.data_ptr(), xq.data_ptr(),
        xq.stride(0) if m > 1 else plan.k, x_scale.data_ptr(), w_scale.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), m, plan.n, plan.k,
        None if ws is None else ws.data_ptr(), 0 if ws is None else ws.numel(), tuning,
        torch.cuda.current_stream().cuda_stream)
    if rc:
        lib.check_decode(rc, f"sparse24 decode GEMM m={m} n={plan.n} k={plan.k}")
    return out


def sparse_mm(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              w_scale: torch.Tensor, bias: torch.Tensor | None, plan_id: int) -> torch.Tensor:
    """out [M, N] = (xq @ W^T) * x_scale * w_scale + bias, in the plan's output dtype: the decode GEMM
    up to the plan's ``decode_max_m`` tokens, the plan's CUTLASS config above."""
    plan = _PLANS[plan_id]
    mm = _decode_mm if plan.use_decode(xq.shape[0]) else _cutlass_mm
    return mm(xq, x_scale, values, meta, w_scale, bias, plan)


def decode_mm(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              w_scale: torch.Tensor, bias: torch.Tensor | None, plan_id: int,
              tuning: lib.DecodeTuning | None = None) -> torch.Tensor:
    """``sparse_mm`` through the decode GEMM whatever the plan's threshold (benchmarks, tests);
    M <= lib.decode_max_m() and K a multiple of 128. ``tuning``: launch knobs (None: the kernel's
    defaults)."""
    return _decode_mm(xq, x_scale, values, meta, w_scale, bias, _PLANS[plan_id], tuning)


def plan_of(plan_id: int) -> GemmPlan:
    return _PLANS[plan_id]


@torch.library.custom_op("sparse24::cutlass_sparse_mm", mutates_args=())
def cutlass_sparse_mm(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                      w_scale: torch.Tensor, bias: torch.Tensor | None, plan_id: int) -> torch.Tensor:
    return sparse_mm(xq, x_scale, values, meta, w_scale, bias, plan_id)


@cutlass_sparse_mm.register_fake
def _(xq, x_scale, values, meta, w_scale, bias, plan_id):
    plan = _PLANS[plan_id]
    return xq.new_empty((xq.shape[0], plan.n), dtype=plan.out_dtype)


class CutlassSparse24Kernel(W8A8LinearKernel):
    name = "cutlass_sparse24"
    backend = "cutlass"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str | None]:
        ok, why = hopper(device)
        if not ok:
            return False, f"sparse24's CUDA kernels are {why}"
        try:
            lib.lib()
        except lib.Sparse24LibraryError as e:
            return False, str(e)
        return True, None

    @classmethod
    def can_implement(cls, layer: LinearLayer) -> tuple[bool, str | None]:
        if not layer.sparse:
            return False, "serves 2:4 sparse layers only"
        if layer.act_dtype not in MODEL_DTYPES:
            return False, f"runs bfloat16 and float16 models, the model is {layer.act_dtype}"
        gemm = (DTYPE_NAMES.get(layer.grid.dtype), DTYPE_NAMES.get(layer.act_dtype))
        if gemm not in GEMM_TABLE:
            return False, f"has no {layer.grid.name} 2:4 GEMM for {layer.act_dtype} models (there are {sorted(GEMM_TABLE)})"
        return True, None

    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        want = self.grid.dtype
        if weight.dtype != want or tuple(weight.shape) != (self.n, self.k):
            raise ValueError(f"{self.layer_name}: expected {DTYPE_NAMES[want]} weight [{self.n}, {self.k}] "
                             f"({self.grid.name} scheme), got {weight.dtype} {tuple(weight.shape)}")
        if self.n % 8:
            raise ValueError(f"{self.layer_name}: N={self.n} output features must be a multiple of 8 "
                             "(16-byte rows of the bf16/fp16 output); keep this layer dense (dense_layers)")
        if self.act_dtype not in MODEL_DTYPES:
            raise ValueError(f"{self.layer_name}: the model dtype must be bfloat16 or float16, got {self.act_dtype}")
        values, meta = compress_24(weight)
        self.plan_id = make_plan(self.n, self.k, want, self.act_dtype, weight.device, values, meta)
        ws = weight_scale.reshape(-1).to(device=weight.device, dtype=torch.float32).contiguous()
        return {"values": values, "meta": meta, "weight_scale": ws}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_activations(x.reshape(-1, self.k), self.grid)
        args = (xq, xs, tensors["values"], tensors["meta"], tensors["weight_scale"], bias, self.plan_id)
        # eager: call the implementation directly (no dispatcher round trip); compiled: the opaque op
        out = cutlass_sparse_mm(*args) if torch.compiler.is_compiling() else sparse_mm(*args)
        return out.reshape(*shape[:-1], self.n)
