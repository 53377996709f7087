"""GPU tests of the Hopper kernels (marker gpu; skipped without a CUDA sm90 GPU and a built library).

Reference: the float64 product of the SAME int8 operands (the activation quant is checked
bit-identical to vllm_sparse24/quant.py first), times both scales, plus bias. Tolerances are
relative Frobenius errors: 5e-3 for bf16 output (one bf16 rounding, 2^-9 relative at most,
~2e-3 in the norm), 1.5e-3 for fp16 (2^-11), 2e-2 for fp8 inputs (the e4m3 values are exact,
only the output rounding and float32 accumulation order differ; fp8 fast-accumulation is
float32 in the tensor core). A wrong metadata bit, scale or row gives O(1) errors.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs a Hopper (sm90) GPU", allow_module_level=True)

from vllm_sparse24.kernels.cuda import lib  # noqa: E402

try:
    lib.lib()
except lib.Sparse24LibraryError as e:
    pytest.skip(f"sparse24 CUDA library not built: {e}", allow_module_level=True)

from vllm_sparse24.kernels import LinearLayer  # noqa: E402
from vllm_sparse24.kernels.cuda.act_quant import quantize_per_token_cuda  # noqa: E402
from vllm_sparse24.kernels.cuda.gemm_table import GEMM_TABLE, GemmPlan  # noqa: E402
from vllm_sparse24.kernels.cuda.sparse24_linear import (  # noqa: E402
    CutlassSparse24Kernel,
    compress_24,
    make_plan,
    sparse_mm,
)
from vllm_sparse24.quant import FP8, INT8, quantize_weight_per_channel  # noqa: E402
from vllm_sparse24.quant import quantize_per_token as ref_quant  # noqa: E402

DEV = "cuda"
TOL = {torch.bfloat16: 5e-3, torch.float16: 1.5e-3}
FP8_MAX = 448.0


def random_24(n: int, k: int, gen: torch.Generator, dtype=torch.int8) -> torch.Tensor:
    """[N, K] with 2 random positions of every 4 kept; int8 values in [-127, 127] (some 0) or e4m3."""
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
    else:
        w = (torch.randn(n, k, generator=gen) * 100).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    drop = torch.rand(n, k // 4, 4, generator=gen).topk(2, dim=-1).indices
    w = w.view(torch.int8).reshape(n, k // 4, 4).scatter(-1, drop, 0).reshape(n, k).view(dtype)
    return w.to(DEV)


def reference(xq, xs, w, ws, bias):
    out = (xq.double() @ w.double().t()) * xs.double().reshape(-1, 1) * ws.double().reshape(1, -1)
    return out + bias.double() if bias is not None else out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 4096), (1000, 576), (17, 14336)])
def test_quant_kernel_bit_identical(m, k, dt):
    gen = torch.Generator().manual_seed(m + k)
    base = (torch.randn(m, k + 64, generator=gen) * torch.rand(m, 1, generator=gen) * 8).to(dt).to(DEV)
    base[0, :5] = 0
    x = base[:, 32:32 + k]  # strided rows
    if m > 1:
        x[1].zero_()  # a zero row: scale clamps to 1e-12, q = 0
    q, s = quantize_per_token_cuda(x)
    rq, rs = ref_quant(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("name", list(lib.config_ids()))
def test_every_config_matches_reference(name):
    """Every compiled config, called directly, at several M and two shapes (one not a tile multiple)."""
    cid = lib.config_ids()[name]
    in_dt = torch.int8 if name.startswith("i8_") else torch.float8_e4m3fn
    out_dt = torch.bfloat16 if "_bf16_" in name else torch.float16
    gen = torch.Generator().manual_seed(cid)
    so = lib.lib()
    for n, k in [(384, 512), (200, 192)]:
        w = random_24(n, k, gen, in_dt)
        values, meta = compress_24(w)
        ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
        bias = torch.randn(n, generator=gen).to(out_dt).to(DEV)
        for m in (1, 5, 64, 300):
            if in_dt == torch.int8:
                xq, xs = ref_quant(torch.randn(m, k, generator=gen).to(DEV))
            else:
                xf = torch.randn(m, k, generator=gen).to(DEV)
                xs = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
                xq = (xf / xs).to(in_dt)
            for splits in ((1, 2, 3) if name.endswith("coopsk") else (1,)):
                need = lib.workspace_bytes(cid, m, n, k, splits)
                ws_buf = torch.empty(max(need, 1), dtype=torch.uint8, device=DEV)
                out = torch.full((m, n), float("nan"), dtype=out_dt, device=DEV)
                for b in (bias, None):
                    rc = so.s24_gemm(cid, values.data_ptr(), meta.data_ptr(), xq.data_ptr(), xs.data_ptr(),
                                     ws.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(), m, n, k,
                                     splits, 2, ws_buf.data_ptr(), ws_buf.numel(), 1,
                                     torch.cuda.current_stream().cuda_stream)
                    lib.check(rc, name)
                    ref = reference(xq.float(), xs, w.float(), ws, b)
                    tol = 2e-2 if in_dt != torch.int8 else TOL[out_dt]
                    assert torch.isfinite(out).all(), (name, n, k, m, splits)
                    err = rel_err(out, ref)
                    assert err < tol, (name, n, k, m, splits, err)


def _layer(n, k, gen, dt, grid=INT8):
    w = random_24(n, k, gen, grid.dtype)
    scale = (torch.rand(n, 1, generator=gen) * 1e-2 + 1e-4).to(DEV)
    kern = CutlassSparse24Kernel(LinearLayer("layers.0.test", n, k, True, dt, grid))
    return kern, kern.prepare(w, scale), w, scale


def capture_apply(kern, tensors, static_x):
    """A CUDA graph of ``kern.apply`` on ``static_x`` (warmed up outside the capture) and its output."""
    kern.apply(tensors, static_x, None)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = kern.apply(tensors, static_x, None)
    return g, static_out


def assert_replay_equals_eager(kern, tensors, x, x2, replays: int = 1):
    """Captures ``kern.apply`` on a copy of ``x``; replayed ``replays`` times on ``x2`` it must equal the
    eager call on ``x2``, and replayed on ``x`` again the eager call on ``x``, bit for bit. Returns
    the eager output on ``x``."""
    eager = kern.apply(tensors, x, None)
    static_x = x.clone()
    g, static_out = capture_apply(kern, tensors, static_x)
    static_x.copy_(x2)
    for _ in range(replays):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, kern.apply(tensors, x2, None)), x.shape
    static_x.copy_(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager), x.shape
    return eager


def compiled_with_targets(kern, tensors, x):
    """``kern.apply(x)`` under torch.compile (fullgraph, dynamic) and the ops of the traced graphs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    f = torch.compile(lambda x: kern.apply(tensors, x, None), backend=backend, fullgraph=True, dynamic=True)
    out = f(x)
    return out, [str(nd.target) for g in graphs for nd in g.graph.nodes if nd.op in ("call_function", "call_method")]


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_linear_matches_reference_at_every_m(dt):
    """The layer path (quant kernel + dispatch) at the token counts serving produces, with bias and a
    strided input, against the float64 reference of the same int8 operands."""
    gen = torch.Generator().manual_seed(7)
    n, k = 1536, 1024
    kern, tensors, w, scale = _layer(n, k, gen, dt)
    bias = torch.randn(n, generator=gen).to(dt).to(DEV)
    for m in (1, 3, 8, 16, 17, 64, 1000, 8192):
        wide = (torch.randn(m, k + 128, generator=gen) * 3).to(dt).to(DEV)
        x = wide[:, 64:64 + k]
        for b in (bias, None):
            out = kern.apply(tensors, x, b)
            xq, xs = ref_quant(x)
            err = rel_err(out, reference(xq, xs, w, scale, b))
            assert out.dtype == dt and out.shape == (m, n) and err < TOL[dt], (m, err)


def test_three_dim_input_and_empty_batch():
    gen = torch.Generator().manual_seed(3)
    kern, tensors, w, scale = _layer(256, 512, gen, torch.bfloat16)
    x = torch.randn(2, 5, 512, generator=gen).to(torch.bfloat16).to(DEV)
    out = kern.apply(tensors, x, None)
    xq, xs = ref_quant(x.reshape(-1, 512))
    assert out.shape == (2, 5, 256)
    assert rel_err(out.reshape(10, 256), reference(xq, xs, w, scale, None)) < TOL[torch.bfloat16]
    assert kern.apply(tensors, x[:0], None).shape == (0, 5, 256)


def test_cuda_graph_replay_equals_eager():
    gen = torch.Generator().manual_seed(11)
    kern, tensors, _, _ = _layer(1024, 2048, gen, torch.bfloat16)
    for m in (1, 16, 300):
        x = torch.randn(m, 2048, generator=gen).to(torch.bfloat16).to(DEV)
        x2 = torch.randn(m, 2048, generator=gen).to(torch.bfloat16).to(DEV)
        assert_replay_equals_eager(kern, tensors, x, x2)


def test_torch_compile_puts_the_quant_in_the_graph():
    """Under torch.compile the quant is plain torch ops (Inductor fuses them) before ONE opaque GEMM op;
    the compiled result matches eager within the bf16 tolerance (Inductor may round x/scale
    differently at a tie, so not bit-exact)."""
    gen = torch.Generator().manual_seed(5)
    kern, tensors, w, scale = _layer(512, 1024, gen, torch.bfloat16)
    x = torch.randn(33, 1024, generator=gen).to(torch.bfloat16).to(DEV)
    out, targets = compiled_with_targets(kern, tensors, x)
    assert any("cutlass_sparse_mm" in t for t in targets), targets
    assert any("amax" in t for t in targets) and any("round" in t for t in targets), targets
    ref = kern.apply(tensors, x, None)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    inductor = torch.compile(lambda x: kern.apply(tensors, x, None), dynamic=True)
    for m in (1, 33, 1000):
        x = torch.randn(m, 1024, generator=gen).to(torch.bfloat16).to(DEV)
        xq, xs = ref_quant(x)
        assert rel_err(inductor(x), reference(xq, xs, w, scale, None)) < TOL[torch.bfloat16]


def test_plan_covers_every_table_entry():
    """Every table row names a compiled config, and its buckets ascend."""
    ids = lib.config_ids()
    for (in_name, out_name), classes in GEMM_TABLE.items():
        in_dt = {"int8": torch.int8, "e4m3": torch.float8_e4m3fn}[in_name]
        out_dt = {"bf16": torch.bfloat16, "f16": torch.float16}[out_name]
        for rows in classes.values():
            bounds = [b for b, _ in rows[:-1]]
            assert bounds == sorted(bounds) and rows[-1][0] is None
        GemmPlan(4096, 4096, in_dt, out_dt, ids)


def test_fp8_layer_level():
    """fp8 e4m3 weights and per-token e4m3 activations: the plan path, then the layer path of the fp8
    scheme (CutlassSparse24Kernel with the FP8 grid: e4m3 compress at load, the per-token e4m3 quant
    of vllm_sparse24/quant.py, the e4m3 GEMM_TABLE rows) at the token counts serving produces, with
    bias and a strided input, against the float64 product of the same e4m3 operands."""
    gen = torch.Generator().manual_seed(9)
    n, k = 1024, 2048
    w = random_24(n, k, gen, torch.float8_e4m3fn)
    values, meta = compress_24(w)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    plan = make_plan(n, k, torch.float8_e4m3fn, torch.bfloat16, torch.device(DEV))
    for m in (1, 16, 200, 4096):
        xf = torch.randn(m, k, generator=gen).to(DEV)
        xs = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        xq = (xf / xs).to(torch.float8_e4m3fn)
        out = sparse_mm(xq, xs, values, meta, ws, None, plan)
        assert rel_err(out, reference(xq.float(), xs, w.float(), ws, None)) < 2e-2
    kern, tensors, w, scale = _layer(n, k, gen, torch.bfloat16, FP8)
    assert tensors["values"].dtype == torch.float8_e4m3fn
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    for m in (1, 3, 8, 16, 17, 64, 1000, 8192):
        wide = (torch.randn(m, k + 128, generator=gen) * 3).to(torch.bfloat16).to(DEV)
        x = wide[:, 64:64 + k]
        for b in (bias, None):
            out = kern.apply(tensors, x, b)
            xq, xs = ref_quant(x, FP8)
            assert xq.dtype == torch.float8_e4m3fn
            err = rel_err(out, reference(xq.float(), xs, w.float(), scale, b))
            assert out.dtype == torch.bfloat16 and out.shape == (m, n) and err < 2e-2, (m, err)
    with pytest.raises(ValueError, match="layers.0.test: expected e4m3 weight"):
        kern.prepare(random_24(n, k, gen), scale)


def test_fp8_layer_under_torch_compile_and_cuda_graphs():
    """fp8 layer: under torch.compile the e4m3 quant is plain torch ops before the one opaque GEMM op;
    CUDA graph replay equals eager."""
    gen = torch.Generator().manual_seed(12)
    kern, tensors, w, scale = _layer(512, 1024, gen, torch.bfloat16, FP8)
    x = torch.randn(33, 1024, generator=gen).to(torch.bfloat16).to(DEV)
    out, targets = compiled_with_targets(kern, tensors, x)
    assert any("cutlass_sparse_mm" in t for t in targets) and any("amax" in t for t in targets), targets
    assert rel_err(out, kern.apply(tensors, x, None)) < 2e-2
    inductor = torch.compile(lambda x: kern.apply(tensors, x, None), dynamic=True)
    for m in (1, 33, 1000):
        x = torch.randn(m, 1024, generator=gen).to(torch.bfloat16).to(DEV)
        xq, xs = ref_quant(x, FP8)
        assert rel_err(inductor(x), reference(xq.float(), xs, w.float(), scale, None)) < 2e-2
    x = torch.randn(16, 1024, generator=gen).to(torch.bfloat16).to(DEV)
    static_x = x.clone()
    g, static_out = capture_apply(kern, tensors, static_x)
    x2 = torch.randn(16, 1024, generator=gen).to(torch.bfloat16).to(DEV)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, kern.apply(tensors, x2, None))


def test_fp8_dense_layers_use_vllm_cutlass():
    """Dense layers of the fp8 scheme: vLLM's cutlass_scaled_mm with e4m3 operands."""
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
    except Exception as e:  # vLLM not installed on this GPU host
        pytest.skip(f"vLLM CUDA ops unavailable: {e}")
    from vllm_sparse24.kernels.cuda.dense_linear import CutlassScaledMMKernel

    gen = torch.Generator().manual_seed(14)
    n, k = 768, 1024
    w, scale = quantize_weight_per_channel(torch.randn(n, k, generator=gen).to(DEV), FP8)
    kern = CutlassScaledMMKernel(LinearLayer("layers.0.dense", n, k, False, torch.bfloat16, FP8))
    tensors = kern.prepare(w, scale)
    assert tensors["weight"].dtype == torch.float8_e4m3fn
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    for m in (1, 17, 1000):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        xq, xs = ref_quant(x, FP8)
        assert rel_err(kern.apply(tensors, x, bias), reference(xq.float(), xs, w.float(), scale, bias)) < 2e-2


def test_errors_name_the_layer():
    gen = torch.Generator().manual_seed(2)
    kern = CutlassSparse24Kernel(LinearLayer("layers.3.mlp", 100, 128, True, torch.bfloat16))
    with pytest.raises(ValueError, match="layers.3.mlp: N=100"):
        kern.prepare(random_24(100, 128, gen), torch.ones(100, 1, device=DEV))
    kern = CutlassSparse24Kernel(LinearLayer("layers.4.mlp", 128, 128, True, torch.bfloat16))
    with pytest.raises(ValueError, match="layers.4.mlp: expected int8 weight"):
        kern.prepare(torch.zeros(128, 64, dtype=torch.int8, device=DEV), torch.ones(128, 1, device=DEV))


def test_dense_layers_use_cutlass_scaled_mm():
    """Dense W8A8 layers: vLLM's cutlass_scaled_mm when vLLM's CUDA ops are loaded."""
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
    except Exception as e:  # vLLM not installed on this GPU host
        pytest.skip(f"vLLM CUDA ops unavailable: {e}")
    from vllm_sparse24.kernels.cuda.dense_linear import CutlassScaledMMKernel

    gen = torch.Generator().manual_seed(4)
    n, k = 768, 1024
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8).to(DEV)
    scale = (torch.rand(n, 1, generator=gen) * 1e-2 + 1e-4).to(DEV)
    kern = CutlassScaledMMKernel(LinearLayer("layers.0.dense", n, k, False, torch.bfloat16))
    tensors = kern.prepare(w, scale)
    assert tensors["weight"].dtype == torch.int8  # int8 resident, not the float32 reference
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    for m in (1, 17, 1000):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        xq, xs = ref_quant(x)
        assert rel_err(kern.apply(tensors, x, bias), reference(xq, xs, w, scale, bias)) < TOL[torch.bfloat16]
