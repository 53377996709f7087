"""2:4 sparse W8A8 linear on Hopper: libsparse24's CUTLASS GEMM with both scales and the bias fused.
int8 or fp8 (e4m3 weights and activations), the checkpoint's scheme: the GEMM configs of that
input dtype (gemm_table.GEMM_TABLE), the compressor and the layout are shared.

Resident weight (one copy, made at load time on the GPU by CUTLASS's sm90 compressor from the
unpacked checkpoint weight): ``values`` [N, K/2] (the kept int8 / e4m3 values, row-major) and ``meta`` (2-bit
indices of the kept pair of every group of 4, in CUTLASS's reordered metadata layout; see
``Sm90GemmSparseConfig`` in CUTLASS's ``sm90_sparse_config.inl``: 64-row x 128-column atoms) =
0.625 bytes per weight for N a multiple of 64 and K a multiple of 128 (padded to those otherwise).

w4a8 2:4 layers (``prepare_int4``) keep the int4 values instead (0.25 bytes per weight, the decode
GEMM's order: int4_layout.py, csrc/decode/layout.h) + the same metadata + the uint8 group scales
(1/128): ~0.39 bytes per weight. The decode GEMM streams them (custom op
``sparse24::cutlass_sparse_mm_w4a8``); above its threshold, one CUDA kernel unpacks the layer's
int4 values into the int8 values of CUTLASS's layout, in ONE scratch buffer per device sized at
load for the largest w4a8 layer and shared by all of them, and the int8 CUTLASS config runs on it
with the resident metadata. No allocation in a call but the output (capture-safe).

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

from ... import format as fmt
from ..base import Int4Weight24, LinearLayer, W8A8LinearKernel
from . import int4_layout, lib
from .act_quant import quantize_activations
from .device import MODEL_DTYPES, hopper
from .gemm_table import (
    DECODE_BLOCK_K,
    DECODE_UNIT_BLOCKS,
    DTYPE_NAMES,
    GEMM_TABLE,
    GemmPlan,
    cutlass_pdl,
    decode_max_m,
    decode_unit_blocks,
)

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
# device index -> int8 scratch of the largest w4a8 layer's values ([N, K/2]): the prefill path unpacks
# a layer's int4 values into it right before its CUTLASS GEMM (stream order keeps layers apart)
_INT4_SCRATCH: dict[int, torch.Tensor] = {}
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
              values: torch.Tensor | None = None, meta: torch.Tensor | None = None,
              group_scale: torch.Tensor | None = None, int4: bool = False) -> int:
    """Resolve the GEMM configs of one layer shape, size the shared workspaces and measure up to which
    token count the decode GEMM beats them (on ``values``/``meta`` when given, else on a synthetic
    weight of the shape); returns the plan id that ``sparse_mm`` / the custom op take. ``int4``: a
    w4a8 layer (``weight_dtype`` int8, the CUTLASS configs' input; ``values`` / ``group_scale`` in
    the int4 layout): the plan also sizes the shared unpack scratch, and its ``decode_max_m``
    compares the int4 decode GEMM with unpack + CUTLASS."""
    idx = torch.device(device).index or 0
    key = (n, k, weight_dtype, out_dtype, idx, int4)
    if key in _PLAN_IDS:
        return _PLAN_IDS[key]
    if int4 and weight_dtype != torch.int8:
        raise ValueError(f"make_plan: an int4 (w4a8) layer runs the int8 CUTLASS configs, got {weight_dtype}")
    plan = GemmPlan(n, k, weight_dtype, out_dtype, lib.config_ids())
    plan.int4 = int4
    need = max(lib.workspace_bytes(cfg, m, n, k, splits) for m, (cfg, splits, _) in plan.buckets(_WORKSPACE_M))
    if need > 0 and (idx not in _WORKSPACES or _WORKSPACES[idx].numel() < need):
        _WORKSPACES[idx] = torch.empty(need, dtype=torch.uint8, device=device)
    if int4 and (idx not in _INT4_SCRATCH or _INT4_SCRATCH[idx].numel() < n * k // 2):
        _INT4_SCRATCH[idx] = torch.empty(n * k // 2, dtype=torch.int8, device=device)
    kernel_max_m = lib.decode_max_m()
    if k % DECODE_BLOCK_K == 0 or int4:
        # the workspace depends on the GPU only; an int4 weight's K may end in a partial block
        need = lib.decode_workspace_bytes(kernel_max_m, n, -(-k // DECODE_BLOCK_K) * DECODE_BLOCK_K)
        if need > 0 and (idx not in _DECODE_WORKSPACES or _DECODE_WORKSPACES[idx].numel() < need):
            _DECODE_WORKSPACES[idx] = torch.zeros(need, dtype=torch.uint8, device=device)
    # flush, values, meta, group scales: made on the first timing only (none when the env var decides)
    bufs: list[torch.Tensor | None] = []
    unit_seconds: dict[int, dict[int, float]] = {ub: {} for ub in DECODE_UNIT_BLOCKS}

    def measure(m: int) -> tuple[float, float]:
        """(the decode GEMM's seconds with its faster work unit, CUTLASS's) at m tokens."""
        if not bufs:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            bufs.append(torch.empty(2 * l2, dtype=torch.uint8, device=device))
            meta_bytes = lib.compressed_bytes(n, k)[1]
            if values is not None and meta is not None and (group_scale is not None or not int4):
                bufs.extend((values, meta, group_scale))
            elif int4:  # a synthetic int4 weight (only timed: any nibble, metadata byte and scale does)
                value_bytes, scale_bytes = lib.decode_int4_bytes(n, k)
                bufs.append(torch.randint(0, 256, (value_bytes,), dtype=torch.uint8, device=device))
                bufs.append(torch.zeros(meta_bytes, dtype=torch.uint8, device=device))
                bufs.append(torch.randint(1, 19, (scale_bytes,), dtype=torch.uint8, device=device))
            else:
                bufs.append(torch.randint(0, 64, (n, k // 2), dtype=torch.int8, device=device).view(weight_dtype))
                bufs.append(torch.zeros(meta_bytes, dtype=torch.uint8, device=device))
                bufs.append(None)
        gemm_s = None
        for ub in DECODE_UNIT_BLOCKS:
            unit_seconds[ub][m], gemm_s = _time_decode_vs_gemm(plan, m, device, bufs[1], bufs[2], bufs[0], bufs[3],
                                                               lib.DecodeTuning(0, 0, 1, ub), gemm_s)
        return min(t[m] for t in unit_seconds.values()), gemm_s

    plan.decode_max_m = decode_max_m(n, k, weight_dtype, kernel_max_m, measure, int4=int4)
    unit_blocks = decode_unit_blocks(unit_seconds, plan.decode_max_m)
    plan.decode_tuning = lib.DecodeTuning(0, 0, 1, unit_blocks) if unit_blocks else None
    _PLANS.append(plan)
    _PLAN_IDS[key] = len(_PLANS) - 1
    return _PLAN_IDS[key]


def _time_decode_vs_gemm(plan: GemmPlan, m: int, device: torch.device, values: torch.Tensor,
                         meta: torch.Tensor, flush: torch.Tensor, group_scale: torch.Tensor | None = None,
                         tuning: lib.DecodeTuning | None = None, gemm_s: float | None = None) -> tuple[float, float]:
    """(decode GEMM seconds with ``tuning``, CUTLASS GEMM seconds) at M tokens on this plan's shape:
    median of a few CUDA-event timed calls, each after overwriting twice the L2, so the weight
    streams from HBM as in serving (where the other layers evict it), and after a short GPU sleep, so
    the events see the kernel and not the host's launch latency. An int4 plan's CUTLASS side is the
    unpack + GEMM; ``gemm_s``: its time when already measured (not timed again)."""
    xq = torch.randint(0, 64, (m, plan.k), dtype=torch.int8, device=device).view(plan.in_dtype)
    xs = torch.full((m,), 1e-2, dtype=torch.float32, device=device)
    ws = torch.full((plan.n,), 1e-3, dtype=torch.float32, device=device)

    def seconds(decode: bool) -> float:
        if plan.int4:
            run = (lambda: _decode_mm(xq, xs, values, meta, ws, None, plan, tuning, group_scale)) if decode else (
                lambda: _unpack_mm(xq, xs, values, meta, group_scale, ws, None, plan))
        else:
            run = (lambda: _decode_mm(xq, xs, values, meta, ws, None, plan, tuning)) if decode else (
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

    return seconds(True), gemm_s if gemm_s is not None else seconds(False)


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


def _unpack_int4(values: torch.Tensor, group_scale: torch.Tensor, plan: GemmPlan, out: torch.Tensor) -> None:
    """An int4 weight's values -> CUTLASS's int8 values [N, K/2] in ``out`` (the library's kernel)."""
    rc = lib.lib().s24_decode_unpack_int4(values.data_ptr(), group_scale.data_ptr(), out.data_ptr(), plan.n, plan.k,
                                          torch.cuda.current_stream().cuda_stream)
    if rc:
        lib.check_decode(rc, f"sparse24 int4 unpack n={plan.n} k={plan.k}")


def _unpack_mm(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
               group_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan,
               pdl: bool | None = None) -> torch.Tensor:
    """A w4a8 layer above the decode threshold: unpack into the device's shared scratch, then the
    plan's int8 CUTLASS config on it with the resident metadata."""
    scratch = _INT4_SCRATCH[xq.device.index or 0][: plan.n * plan.k // 2].view(plan.n, plan.k // 2)
    if xq.shape[0]:
        _unpack_int4(values, group_scale, plan, scratch)
    return _cutlass_mm(xq, x_scale, scratch, meta, w_scale, bias, plan, pdl)


def _decode_mm(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
               w_scale: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan,
               tuning: lib.DecodeTuning | None = None, group_scale: torch.Tensor | None = None) -> torch.Tensor:
    m = xq.shape[0]
    out = torch.empty(m, plan.n, dtype=plan.out_dtype, device=xq.device)
    if m == 0:
        return out
    # rows of x may be strided (a slice of a wider buffer) if they stay 16-byte aligned
    if xq.stride(-1) != 1 or (m > 1 and xq.stride(0) % 16) or xq.data_ptr() % 16:
        # a fresh allocation: .contiguous() returns a misaligned one-row slice unchanged
        xq = torch.empty(xq.shape, dtype=xq.dtype, device=xq.device).copy_(xq)
    x_scale, bias = _prepare_operands(x_scale, bias, plan.out_dtype)
    if tuning is None:
        tuning = plan.decode_tuning  # the work unit ``auto`` measured faster (None: the kernel's defaults)
    ws = _DECODE_WORKSPACES.get(xq.device.index or 0)
    rc = lib.lib().s24_decode_gemm(
        lib.INT4 if plan.int4 else _WEIGHT_DTYPES[plan.in_dtype], _OUT_DTYPES[plan.out_dtype], values.data_ptr(),
        meta.data_ptr(), None if group_scale is None else group_scale.data_ptr(), xq.data_ptr(),
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
              tuning: lib.DecodeTuning | None = None, group_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``sparse_mm`` (``group_scale`` given: ``sparse_mm_w4a8`` on an int4 plan) through the decode GEMM
    whatever the plan's threshold (benchmarks, tests); M <= lib.decode_max_m() and K a multiple of
    128 (int4: 64). ``tuning``: launch knobs (None: the plan's, i.e. the work unit ``auto`` measured
    faster, else the kernel's defaults)."""
    return _decode_mm(xq, x_scale, values, meta, w_scale, bias, _PLANS[plan_id], tuning, group_scale)


def sparse_mm_w4a8(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                   group_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   plan_id: int) -> torch.Tensor:
    """``sparse_mm`` of a w4a8 layer (an int4 plan; values and group scales in the int4 layout): the
    int4 decode GEMM up to the plan's ``decode_max_m`` tokens, unpack + the int8 CUTLASS config above."""
    plan = _PLANS[plan_id]
    if plan.use_decode(xq.shape[0]):
        return _decode_mm(xq, x_scale, values, meta, w_scale, bias, plan, group_scale=group_scale)
    return _unpack_mm(xq, x_scale, values, meta, group_scale, w_scale, bias, plan)


def unpack_int4(values: torch.Tensor, group_scale: torch.Tensor, plan_id: int) -> torch.Tensor:
    """An int4 plan's weight as CUTLASS's int8 values [N, K/2] in a new tensor (tests, benchmarks;
    a call uses the shared scratch instead)."""
    plan = _PLANS[plan_id]
    out = torch.empty(plan.n, plan.k // 2, dtype=torch.int8, device=values.device)
    _unpack_int4(values, group_scale, plan, out)
    return out


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


@torch.library.custom_op("sparse24::cutlass_sparse_mm_w4a8", mutates_args=())
def cutlass_sparse_mm_w4a8(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           group_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                           plan_id: int) -> torch.Tensor:
    # the unpack scratch it writes is private to the op (no tensor of the graph aliases it)
    return sparse_mm_w4a8(xq, x_scale, values, meta, group_scale, w_scale, bias, plan_id)


@cutlass_sparse_mm_w4a8.register_fake
def _(xq, x_scale, values, meta, group_scale, w_scale, bias, plan_id):
    plan = _PLANS[plan_id]
    return xq.new_empty((xq.shape[0], plan.n), dtype=plan.out_dtype)


class CutlassSparse24Kernel(W8A8LinearKernel):
    name = "cutlass_sparse24"
    backend = "cutlass"
    int4_resident = True

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

    def _check_layer(self) -> None:
        if self.n % 8:
            raise ValueError(f"{self.layer_name}: N={self.n} output features must be a multiple of 8 "
                             "(16-byte rows of the bf16/fp16 output); keep this layer dense (dense_layers)")
        if self.act_dtype not in MODEL_DTYPES:
            raise ValueError(f"{self.layer_name}: the model dtype must be bfloat16 or float16, got {self.act_dtype}")

    def prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        want = self.grid.dtype
        if weight.dtype != want or tuple(weight.shape) != (self.n, self.k):
            raise ValueError(f"{self.layer_name}: expected {DTYPE_NAMES[want]} weight [{self.n}, {self.k}] "
                             f"({self.grid.name} scheme), got {weight.dtype} {tuple(weight.shape)}")
        self._check_layer()
        values, meta = compress_24(weight)
        self.plan_id = make_plan(self.n, self.k, want, self.act_dtype, weight.device, values, meta)
        ws = weight_scale.reshape(-1).to(device=weight.device, dtype=torch.float32).contiguous()
        return {"values": values, "meta": meta, "weight_scale": ws}

    def prepare_int4(self, weight: Int4Weight24, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The int4 values in the decode GEMM's layout + CUTLASS's metadata of the int8 codes (int4
        value x group scale, compressed on the GPU as an int8 layer's) + the group scales."""
        want = (self.n, self.k // 4)
        if weight.values.dtype != torch.uint8 or tuple(weight.values.shape) != want or self.k % int4_layout.K_MULTIPLE:
            raise ValueError(f"{self.layer_name}: expected uint8 int4 values {list(want)} with K a multiple of "
                             f"{int4_layout.K_MULTIPLE}, got {weight.values.dtype} {list(weight.values.shape)} "
                             f"(K={self.k})")
        self._check_layer()
        int4, _ = fmt.unpack_int4_24(weight.values, weight.bitmask, self.k, name=self.layer_name)
        codes = fmt.int4_to_int8(int4, weight.group_scale)
        del int4
        values8, meta = compress_24(codes)
        del codes
        values, group_scale = int4_layout.pack(values8, weight.group_scale.contiguous(), self.layer_name)
        del values8
        device = weight.values.device
        self.plan_id = make_plan(self.n, self.k, torch.int8, self.act_dtype, device, values, meta, group_scale,
                                 int4=True)
        ws = weight_scale.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
        return {"values": values, "meta": meta, "group_scale": group_scale, "weight_scale": ws}

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_activations(x.reshape(-1, self.k), self.grid)
        compiling = torch.compiler.is_compiling()
        # eager: call the implementation directly (no dispatcher round trip); compiled: the opaque op
        if "group_scale" in tensors:
            args = (xq, xs, tensors["values"], tensors["meta"], tensors["group_scale"], tensors["weight_scale"], bias,
                    self.plan_id)
            out = cutlass_sparse_mm_w4a8(*args) if compiling else sparse_mm_w4a8(*args)
        else:
            args = (xq, xs, tensors["values"], tensors["meta"], tensors["weight_scale"], bias, self.plan_id)
            out = cutlass_sparse_mm(*args) if compiling else sparse_mm(*args)
        return out.reshape(*shape[:-1], self.n)
