"""GPU tests of the sparse24 CUDA kernels (marker gpu; skipped without CUDA).

Tolerances (relative Frobenius error against a float64 computation on the same int8
operands): decode path <= 4e-3 (one bf16/fp16 rounding of the output, as the torch
reference); prefill path <= 8e-3 (cuSPARSELt rounds acc*w_scale to bf16, then the epilogue
rounds once more). A wrong metadata bit, scale or row gives O(1) errors.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

os.environ.setdefault("VLLM_SPARSE24_MAX_TOKENS", "1024")  # fewer plans to build in tests
os.environ.setdefault("VLLM_SPARSE24_COLD_SEARCH", "0")  # tested once below (test_cold_search)

from vllm_sparse24.kernels.cuda import ext, layout  # noqa: E402
from vllm_sparse24.kernels.cuda.linear import Sparse24CudaKernel  # noqa: E402
from vllm_sparse24.kernels.cuda.quant_kernel import quantize_per_token  # noqa: E402
from vllm_sparse24.quant import quantize_per_token as ref_quant  # noqa: E402

DEV = "cuda"


def random_24(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """int8 [N, K], 2 random positions of every 4 kept, values in [-127, 127] (some 0)."""
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int16).to(torch.int8)
    keys = torch.rand(n, k // 4, 4, generator=gen)
    drop = keys.topk(2, dim=-1).indices
    w = w.reshape(n, k // 4, 4).scatter(-1, drop, 0).reshape(n, k)
    return w.to(DEV)


def reference(x, w, ws, bias, quant_act=True):
    """float64 W8A8 (per-token int8 activations) or, quant_act=False, W8A16 (activations as given)."""
    if quant_act:
        xq, xs = ref_quant(x)
        out = (xq.double() @ w.double().t()) * xs.double()
    else:
        out = x.double() @ w.double().t()
    out = out * ws.double().reshape(1, -1)
    return out + bias.double() if bias is not None else out


def reference_for(kern, x, w, ws, bias):
    """The reference of the numerics the kernel uses at this M (W8A16 where the C++ decode kernel runs)."""
    return reference(x, w, ws, bias, quant_act=kern.activations_quantized(x.reshape(-1, x.shape[-1]).shape[0]))


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("n,k", [(64, 64), (64, 128), (128, 256), (256, 512), (960, 576), (512, 4096),
                                 (4096, 1024), (192, 14336)])
def test_cslt_layout_formula_random_patterns(n, k):
    gen = torch.Generator().manual_seed(n * 7 + k)
    for _ in range(3):
        w = random_24(n, k, gen)
        buf = torch._cslt_compress(w)
        assert buf.numel() >= n * k * 5 // 8
        got = layout.decompress(buf, n, k)
        if not torch.equal(got, w):
            matches = []
            for rows in (32, 64, 128, 256, 512):
                os.environ["SPARSE24_CSLT_META_BLOCK_ROWS"] = str(rows)
                if n % rows == 0 and torch.equal(layout.decompress(buf, n, k), w):
                    matches.append(rows)
                os.environ.pop("SPARSE24_CSLT_META_BLOCK_ROWS")
            pytest.fail(f"layout formula wrong at {n}x{k}; block rows that match: {matches}")


def test_quant_kernel_matches_reference():
    gen = torch.Generator().manual_seed(1)
    for m, k, dt in [(1, 4096, torch.bfloat16), (17, 576, torch.float16), (300, 14336, torch.bfloat16),
                     (5, 28672, torch.bfloat16)]:
        x = (torch.randn(m, k, generator=gen) * 3).to(dt).to(DEV)
        x[0, :] = 0  # zero row -> q = 0
        q, s = quantize_per_token(x)
        rq, rs = ref_quant(x)
        assert torch.allclose(s, rs.reshape(-1), rtol=1e-6, atol=0)
        diff = (q.int() - rq.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def _kernel(n, k, w, ws, name="test.layer"):
    kern = Sparse24CudaKernel(n, k, True, name)
    return kern, kern.prepare(w, ws)


def _random_layer(n: int, k: int, seed: int, ws_min: float = 1e-4):
    """(generator, random 2:4 int8 weight, per-channel scales in [ws_min, ws_min + 1e-3), kernel, its
    tensors); the generator goes on to make the test's inputs."""
    gen = torch.Generator().manual_seed(seed)
    w = random_24(n, k, gen)
    ws = (torch.rand(n, 1, generator=gen) * 1e-3 + ws_min).to(DEV)
    kern, t = _kernel(n, k, w, ws)
    return gen, w, ws, kern, t


@pytest.mark.parametrize("n,k", [(512, 4096), (4096, 1024), (960, 576)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_linear_matches_reference(n, k, dt):
    gen, w, ws, kern, t = _random_layer(n, k, n + k)
    bias = (torch.randn(n, generator=gen)).to(dt).to(DEV)
    thr = kern.state.threshold
    for m in [1, 3, 16, 17, 64, 65, 1000, 1500]:
        for b in (None, bias):
            x = torch.randn(m, k, generator=gen).to(dt).to(DEV)
            out = kern.apply(t, x, b)
            assert out.shape == (m, n) and out.dtype == dt
            assert torch.isfinite(out).all()
            tol = 4e-3 if m <= thr or not kern.activations_quantized(m) else 8e-3
            err = rel_err(out, reference_for(kern, x, w, ws, b))
            assert err < tol, (m, thr, err)


def test_both_paths_at_every_small_m(monkeypatch):
    """Force the decode kernel and the cuSPARSELt path on the same inputs for M = 1..64."""
    monkeypatch.setenv("VLLM_SPARSE24_DECODE", "1")  # decode is opt-in; tune it for this shape
    n, k = 256, 1024
    gen, w, ws, kern, t = _random_layer(n, k, 5, ws_min=0.0)
    saved = kern.state.threshold
    try:
        for m in [1, 2, 3, 7, 8, 15, 16, 31, 33, 48, 63, 64]:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
            ref = reference(x, w, ws, None)
            kern.state.threshold = 64
            dec = kern.run(x, t["weight_cslt"], t["weight_scale"], None)  # the Triton path's dispatch
            kern.state.threshold = 0
            pre = kern.run(x, t["weight_cslt"], t["weight_scale"], None)
            assert rel_err(dec, ref) < 4e-3, m
            assert rel_err(pre, ref) < 8e-3, m
    finally:
        kern.state.threshold = saved


def test_cuda_graph_replay_equals_eager():
    n, k = 1024, 2048
    gen, w, ws, kern, t = _random_layer(n, k, 9, ws_min=0.0)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    for m in [1, 8, kern.state.threshold + 1, 300]:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        eager = kern.apply(t, x, bias)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kern.apply(t, x, bias)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = kern.apply(t, x, bias)
        x.copy_(torch.randn(m, k, generator=gen).to(torch.bfloat16))
        eager = kern.apply(t, x, bias)
        static_out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager), m


def test_torch_compile_fullgraph():
    n, k = 512, 1024
    gen, w, ws, kern, t = _random_layer(n, k, 11, ws_min=0.0)

    def f(x):
        return kern.apply(t, x * 2, None) + 1

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for m in [2, 200]:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        assert torch.equal(cf(x), f(x))


def test_memory_and_errors():
    n, k = 512, 1024
    gen = torch.Generator().manual_seed(3)
    w = random_24(n, k, gen)
    kern, t = _kernel(n, k, w, torch.ones(n, 1, device=DEV))
    resident = sum(v.numel() * v.element_size() for v in t.values())
    assert resident <= 0.63 * n * k
    with pytest.raises(ValueError, match="model.layers.0.q_proj.*multiples of 64"):
        Sparse24CudaKernel(100, 64, True, "model.layers.0.q_proj")
    with pytest.raises(TypeError, match="test.layer.*bfloat16 or float16"):
        kern.apply(t, torch.randn(4, k, device=DEV), None)


def _nvcc_present() -> bool:
    import shutil

    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def test_ext_path_used_and_matches_triton_path():
    """The C++ op (path ext) is built where nvcc is, and agrees with the Triton + ctypes path."""
    n, k = 768, 2048
    gen, w, ws, kern, t = _random_layer(n, k, 21)
    if kern.describe()["path"] != "ext":
        if _nvcc_present() and ext.enabled():
            pytest.fail(f"extension did not build: {ext.error()}")
        pytest.skip(f"no extension: {ext.error()}")
    for dt in (torch.bfloat16, torch.float16):
        bias = torch.randn(n, generator=gen).to(dt).to(DEV)
        for m in [1, 2, 5, 16, 31, 129, 1024, 1025, 2500]:
            for b in (None, bias):
                x = (torch.randn(m, k, generator=gen) * 2).to(dt).to(DEV)
                x[0] = 0  # an all-zero token
                got = kern.apply(t, x, b)
                tri = kern.run(x, t["weight_cslt"], t["weight_scale"], b)
                assert got.shape == (m, n) and got.dtype == dt and torch.isfinite(got).all()
                ref = reference_for(kern, x, w, ws, b)
                assert rel_err(got, ref) < 8e-3, (dt, m)
                if kern.activations_quantized(m):  # same quantization and GEMM: an output rounding apart
                    assert rel_err(got, tri) < 4e-3, (dt, m)
                else:  # W8A16 vs W8A8: the activation rounding apart, no more
                    assert rel_err(got, tri) < 3e-2, (dt, m)
    # a strided view (row stride > K) and a 3-D input
    for rows in (7, 70):
        xb = torch.randn(rows, 2 * k, generator=gen).to(torch.bfloat16).to(DEV)[:, :k]
        assert rel_err(kern.apply(t, xb, None), reference_for(kern, xb, w, ws, None)) < 8e-3
    x3 = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16).to(DEV)
    assert kern.apply(t, x3, None).shape == (2, 3, n)


def test_cold_search(monkeypatch):
    monkeypatch.setenv("VLLM_SPARSE24_COLD_SEARCH", "1")
    n, k = 320, 640
    gen, w, ws, kern, t = _random_layer(n, k, 23)
    assert set(kern.state.cold) == {16, 32, 48, 64}
    for m in [1, 9, 16, 40, 64]:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        assert rel_err(kern.apply(t, x, None), reference_for(kern, x, w, ws, None)) < 8e-3, m


def _ext_or_skip():
    if not ext.build():
        if _nvcc_present() and ext.enabled():
            pytest.fail(f"extension did not build: {ext.error()}")
        pytest.skip(f"no extension: {ext.error()}")


@pytest.mark.parametrize("n,k", [(64, 64), (128, 256), (960, 576), (4096, 1024), (192, 14336)])
def test_ext_decode_kernel_every_config(n, k):
    """The C++ decode kernel alone (W8A16, reads the cuSPARSELt buffer) vs float64, for every
    config the tuner may pick, M = 1..16, bf16 and fp16, with and without bias. Tolerance 4e-3:
    products and fp32 sums are exact to ~1e-6, what is left is the output rounding."""
    _ext_or_skip()
    ext.register_fake()
    gen = torch.Generator().manual_seed(n * 3 + k)
    w = random_24(n, k, gen)
    ws = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(DEV)
    buf = torch._cslt_compress(w)
    dec = ext.decode_direct()
    for dt in (torch.bfloat16, torch.float16):
        bias = torch.randn(n, generator=gen).to(dt).to(DEV)
        for m in (1, 3, 8, 9, 16):
            x = (torch.randn(m, k, generator=gen) * 2).to(dt).to(DEV)
            for kind in (0, 1):  # dense mma on decoded tiles / sparse mma.sp
                for rows in (16, 32, 48, 64):
                    if n % rows:
                        continue
                    for warps in (1, 4, 16):
                        for b in (None, bias):
                            got = dec(x, buf, ws, b, rows, warps, 64, kind)
                            assert got.shape == (m, n) and got.dtype == dt
                            err = rel_err(got, reference(x, w, ws, b, quant_act=False))
                            assert err < 4e-3, (dt, m, kind, rows, warps, b is not None, err)
    # the dispatcher op (torch.compile / CUDA graphs use it), a strided x, bad M / kind
    x = torch.randn(5, 2 * k, generator=gen).to(torch.bfloat16).to(DEV)[:, :k]
    for kind in (0, 1):
        got = torch.ops.sparse24_ext.decode(x, buf, ws, None, 16, 4, 64, kind)
        assert rel_err(got, reference(x, w, ws, None, quant_act=False)) < 4e-3
    with pytest.raises(RuntimeError, match="M <= 16"):
        dec(torch.randn(17, k, device=DEV, dtype=torch.bfloat16), buf, ws, None, 16, 4, 64, 0)
    with pytest.raises(RuntimeError, match="kind must be"):
        dec(x, buf, ws, None, 16, 4, 64, 2)


def test_ext_decode_dispatch_and_graph():
    """linear() takes the decode kernel for M <= the tuned max_m, under a CUDA graph too."""
    n, k = 2048, 4096
    gen, w, ws, kern, t = _random_layer(n, k, 31)
    if kern.describe()["path"] != "ext":
        _ext_or_skip()
    info = kern.describe()["ext_decode"]
    assert info["max_m"] >= 1, info  # at this size the decode kernel must beat cuSPARSELt at M = 1
    assert info["kinds"] == [0, 1], kern.describe()["timings"]  # mma.sp agrees with the dense kernel
    for m in (1, 8, 16):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        eager = kern.apply(t, x, None)
        assert rel_err(eager, reference_for(kern, x, w, ws, None)) < 8e-3
        g = torch.cuda.CUDAGraph()
        out = kern.apply(t, x, None)
        with torch.cuda.graph(g):
            out = kern.apply(t, x, None)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), m
