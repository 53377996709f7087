"""GPU tests of the few-token decode GEMM (csrc/decode/) and of its dispatch inside the custom op
(marker gpu; skipped without a CUDA sm90 GPU and a built library).

Reference and tolerances as tests/test_gpu_kernels.py: the float64 product of the same quantized
operands times both scales plus bias; relative Frobenius error < 5e-3 for bf16 output, 1.5e-3 for
fp16, 2e-2 for e4m3 inputs (float32 accumulation in a different order than the reference). For
int8 the decode GEMM must also equal the CUTLASS GEMM bit for bit: the same int32 sums and the
same epilogue roundings. A wrong metadata bit, fragment slot, split or row gives O(1) errors.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
# importing test_gpu_kernels skips this module too when there is no Hopper GPU or no built library
from test_gpu_kernels import (  # noqa: E402
    DEV,
    FP8_MAX,
    TOL,
    _layer,
    assert_replay_equals_eager,
    capture_apply,
    compiled_with_targets,
    random_24,
    reference,
    rel_err,
)

from vllm_sparse24.kernels import LinearLayer  # noqa: E402
from vllm_sparse24.kernels.cuda import lib, sparse24_linear  # noqa: E402
from vllm_sparse24.kernels.cuda.gemm_table import DECODE_ENV  # noqa: E402
from vllm_sparse24.kernels.cuda.sparse24_linear import (  # noqa: E402
    CutlassSparse24Kernel,
    _cutlass_mm,
    compress_24,
    decode_mm,
    make_plan,
    plan_of,
    sparse_mm,
)
from vllm_sparse24.quant import quantize_per_token as ref_quant  # noqa: E402

LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
DECODE_MS = (1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24, 31, 32, 33, 50, 64)


def random_24_gpu(n: int, k: int, seed: int, dtype=torch.int8) -> torch.Tensor:
    """random_24 generated on the GPU (the 70B shapes are too large for the CPU generator)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), generator=gen, device=DEV, dtype=torch.int16).to(torch.int8)
    else:
        w = (torch.randn(n, k, generator=gen, device=DEV) * 100).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    drop = torch.rand(n, k // 4, 4, generator=gen, device=DEV).topk(2, dim=-1).indices
    return w.view(torch.int8).reshape(n, k // 4, 4).scatter(-1, drop, 0).reshape(n, k).view(dtype)


def quantized(m: int, k: int, gen: torch.Generator, dtype=torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(m, k, generator=gen).to(DEV) * 3
    if dtype == torch.int8:
        return ref_quant(x)
    xs = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (x / xs).to(dtype), xs


def kernels_run(fn) -> list[str]:
    """Names of the CUDA kernels fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.fixture
def forced_threshold(monkeypatch):
    """Plans made inside the test get a forced decode threshold (the env override); the plan cache
    starts empty so a shape planned by an earlier test is planned again (old plan ids stay valid)."""
    monkeypatch.setattr(sparse24_linear, "_PLAN_IDS", {})

    def force(value: int | str) -> None:
        monkeypatch.setenv(DECODE_ENV, str(value))
    return force


@pytest.mark.parametrize("out_dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(1536, 1024), (200, 384), (256, 4096), (72, 1152)])
def test_decode_matches_reference_at_every_m(n, k, out_dt):
    """Every M the kernel serves (odd ones too), bias and none; (200, 384) and (72, 1152) have a
    partial 64-row tile, (256, 4096) has more CTAs than row tiles, so its tiles are split across
    CTAs and finished by the fixup (asserted)."""
    gen = torch.Generator().manual_seed(n + k)
    w = random_24(n, k, gen)
    values, meta = compress_24(w)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    bias = torch.randn(n, generator=gen).to(out_dt).to(DEV)
    plan = make_plan(n, k, torch.int8, out_dt, torch.device(DEV))
    if (n, k) == (256, 4096):
        units, ctas, per_tile = lib.decode_partition(n, k)
        assert ctas > units // per_tile, "this shape is meant to cover the cross-CTA fixup"
    for m in DECODE_MS:
        xq, xs = quantized(m, k, gen)
        for b in (bias, None):
            out = decode_mm(xq, xs, values, meta, ws, b, plan)
            assert out.dtype == out_dt and out.shape == (m, n)
            assert torch.isfinite(out).all(), (n, k, m)
            err = rel_err(out, reference(xq, xs, w, ws, b))
            assert err < TOL[out_dt], (n, k, m, b is None, err)


@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_llama_shapes_equal_the_cutlass_gemm(n, k):
    """The 8 Llama-3 8B/70B shapes at M = 1, 5, 16, 32, 64: against the float64 reference, and bit-equal
    to the CUTLASS GEMM on the same operands (same int32 sums, same epilogue)."""
    w = random_24_gpu(n, k, seed=n ^ k)
    values, meta = compress_24(w)
    gen = torch.Generator().manual_seed(k)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV))
    for m in (1, 5, 16, 32, 64):
        xq, xs = quantized(m, k, gen)
        out = decode_mm(xq, xs, values, meta, ws, bias, plan)
        assert rel_err(out, reference(xq, xs, w, ws, bias)) < TOL[torch.bfloat16], (n, k, m)
        gemm = _cutlass_mm(xq, xs, values, meta, ws, bias, plan_of(plan))
        diff = (out.float() - gemm.float()).abs().max().item()
        assert torch.equal(out, gemm), f"[{n}, {k}] m={m}: decode differs from the CUTLASS GEMM (max {diff})"
    del w, values, meta
    torch.cuda.empty_cache()


def test_split_layers_of_different_shapes_share_the_workspace():
    """Two layers whose row tiles are split across CTAs, called alternately: each call must find its
    tickets zero although the other shape's partial sums went through the same workspace."""
    gen = torch.Generator().manual_seed(13)
    # two shapes whose units do not divide evenly over this GPU's CTAs (some tiles end mid-CTA range,
    # so the fixup runs), found among candidates since the partition depends on the SM count
    candidates = [(n, k) for k in (4096, 2048) for n in range(1024, 8192, 64)]
    split = [(n, k) for n, k in candidates if (lambda u, c, _: u > c and u % c)(*lib.decode_partition(n, k))]
    shapes = [next(s for s in split if s[1] == 4096), next(s for s in split if s[1] == 2048)]
    layers = []
    for n, k in shapes:
        w = random_24(n, k, gen)
        values, meta = compress_24(w)
        ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
        layers.append((w, values, meta, ws, make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV))))
    for m in (8, 3, 16, 1):
        for w, values, meta, ws, plan in layers * 2:
            xq, xs = quantized(m, w.shape[1], gen)
            out = decode_mm(xq, xs, values, meta, ws, None, plan)
            assert rel_err(out, reference(xq, xs, w, ws, None)) < TOL[torch.bfloat16], (w.shape, m)


def test_e4m3_weights_and_activations():
    gen = torch.Generator().manual_seed(21)
    for n, k in [(1024, 2048), (96, 4096)]:
        w = random_24(n, k, gen, torch.float8_e4m3fn)
        values, meta = compress_24(w)
        ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
        bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
        plan = make_plan(n, k, torch.float8_e4m3fn, torch.bfloat16, torch.device(DEV))
        for m in (1, 7, 16, 32, 64):
            xq, xs = quantized(m, k, gen, torch.float8_e4m3fn)
            out = decode_mm(xq, xs, values, meta, ws, bias, plan)
            assert rel_err(out, reference(xq.float(), xs, w.float(), ws, bias)) < 2e-2, (n, k, m)


def test_strided_and_misaligned_inputs():
    """Rows of a wider buffer (16-byte aligned stride) are read in place; a misaligned slice is
    copied first; non-contiguous scales and a float32 bias are converted. All equal the contiguous call."""
    gen = torch.Generator().manual_seed(5)
    n, k = 512, 1024
    w = random_24(n, k, gen)
    values, meta = compress_24(w)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    bias = torch.randn(n, generator=gen).to(DEV)
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV))
    for m in (1, 6, 16):
        xq, xs = quantized(m, k, gen)
        want = decode_mm(xq, xs, values, meta, ws, bias.to(torch.bfloat16), plan)
        wide = torch.zeros(m, k + 64, dtype=torch.int8, device=DEV)
        for off in (32, 8):  # 32: aligned rows read in place; 8: not 16-byte aligned, copied
            wide[:, off:off + k] = xq
            xs_strided = torch.zeros(m, 2, device=DEV)[:, :1]
            xs_strided.copy_(xs)
            got = decode_mm(wide[:, off:off + k], xs_strided, values, meta, ws, bias, plan)
            assert torch.equal(got, want), (m, off)


def test_op_switches_kernel_at_the_threshold(forced_threshold):
    """Through sparse_mm (the custom op's body): the decode GEMM up to the plan's threshold, the
    CUTLASS GEMM above; both match the reference at M around it."""
    forced_threshold(8)
    gen = torch.Generator().manual_seed(8)
    n, k = 520, 1280
    w = random_24(n, k, gen)
    values, meta = compress_24(w)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV))
    assert plan_of(plan).decode_max_m == 8
    for m in (1, 7, 8, 9, 16, 33, 100):
        xq, xs = quantized(m, k, gen)
        names = kernels_run(lambda xq=xq, xs=xs: sparse_mm(xq, xs, values, meta, ws, None, plan))
        uses_decode = any("decode_kernel" in s for s in names)
        assert uses_decode == (m <= 8), (m, names)
        out = sparse_mm(xq, xs, values, meta, ws, None, plan)
        assert rel_err(out, reference(xq, xs, w, ws, None)) < TOL[torch.bfloat16], m


def test_env_zero_turns_decode_off(forced_threshold):
    forced_threshold(0)
    plan = make_plan(528, 1280, torch.int8, torch.bfloat16, torch.device(DEV))
    assert plan_of(plan).decode_max_m == 0


def test_measured_threshold_is_a_candidate(forced_threshold):
    """With ``auto`` the threshold is measured at load: one of the timed token counts or 0, and the
    work unit one of the timed sizes (0 when the decode GEMM serves nothing); a call through the plan
    runs that unit and gives the CUTLASS GEMM's int32 result."""
    forced_threshold("auto")
    plan = make_plan(4096, 4096, torch.int8, torch.float16, torch.device(DEV))
    p = plan_of(plan)
    assert p.decode_max_m in (0, 1, 2, 4, 8, 16, 32, 64)
    unit_blocks = p.decode_tuning.unit_blocks if p.decode_tuning is not None else 0
    assert unit_blocks in ((4, 8) if p.decode_max_m else (0,))
    if p.decode_tuning is not None:
        gen = torch.Generator().manual_seed(5)
        w = random_24(4096, 4096, gen)
        values, meta = compress_24(w)
        ws = (torch.rand(4096, generator=gen) * 1e-2 + 1e-4).to(DEV)
        xq, xs = quantized(min(p.decode_max_m, 8), 4096, gen)
        assert torch.equal(decode_mm(xq, xs, values, meta, ws, None, plan),
                           _cutlass_mm(xq, xs, values, meta, ws, None, p))


@pytest.mark.parametrize("n,k", [(1024, 2048), (256, 4096)])
def test_cuda_graph_replay_equals_eager(n, k, forced_threshold):
    """The layer path at decode token counts, captured and replayed several times (the split path of
    (256, 4096) re-arms its tickets in the kernel: every replay must give the same output)."""
    forced_threshold(64)
    gen = torch.Generator().manual_seed(n)
    w = random_24(n, k, gen)
    scale = (torch.rand(n, 1, generator=gen) * 1e-2 + 1e-4).to(DEV)
    kern = CutlassSparse24Kernel(LinearLayer("layers.0.decode", n, k, True, torch.bfloat16))
    tensors = kern.prepare(w, scale)
    for m in (1, 5, 16, 33, 64):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        x2 = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        eager = assert_replay_equals_eager(kern, tensors, x, x2, replays=3)
        xq, xs = ref_quant(x)
        assert rel_err(eager, reference(xq, xs, w, scale, None)) < TOL[torch.bfloat16]


def test_bad_shapes_are_refused_with_a_message():
    so = lib.lib()
    x = torch.zeros(80, 256, dtype=torch.int8, device=DEV)
    f = torch.ones(64, device=DEV)
    out = torch.empty(80, 64, dtype=torch.bfloat16, device=DEV)
    ws = torch.zeros(lib.decode_workspace_bytes(64, 64, 256), dtype=torch.uint8, device=DEV)
    stream = torch.cuda.current_stream().cuda_stream

    def call(m, n, k, stride):
        return so.s24_decode_gemm(lib.INT8, lib.BF16, x.data_ptr(), x.data_ptr(), None, x.data_ptr(), stride,
                                  f.data_ptr(), f.data_ptr(), None, out.data_ptr(), m, n, k, ws.data_ptr(),
                                  ws.numel(), None, stream)

    with pytest.raises(lib.Sparse24LibraryError, match="multiple of 128"):
        lib.check_decode(call(4, 64, 96, 96), "k=96")
    with pytest.raises(lib.Sparse24LibraryError, match="m=65 tokens"):
        lib.check_decode(call(65, 64, 256, 256), "m=65")
    with pytest.raises(lib.Sparse24LibraryError, match="row stride"):
        lib.check_decode(call(4, 64, 256, 200), "stride 200")
    with pytest.raises(lib.Sparse24LibraryError, match="workspace"):
        lib.check_decode(so.s24_decode_gemm(lib.INT8, lib.BF16, x.data_ptr(), x.data_ptr(), None, x.data_ptr(), 256,
                                            f.data_ptr(), f.data_ptr(), None, out.data_ptr(), 4, 64, 256, None, 0,
                                            None, stream), "no workspace")


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 2048), (6144, 4096)])
def test_pdl_stages_and_ctas_do_not_change_the_result(n, k):
    """Programmatic dependent launch on / off, shallow and deep rings, fewer CTAs (more units each,
    other fixup splits), units of 8 blocks: bit-equal outputs, also after a kernel that writes the activations just
    before (the PDL wait must order the activation reads after it)."""
    gen = torch.Generator().manual_seed(n + 3 * k)
    w = random_24(n, k, gen)
    values, meta = compress_24(w)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV))
    tunings = [lib.DecodeTuning(0, 0, 1), lib.DecodeTuning(0, 0, 0), lib.DecodeTuning(2, 0, 1),
               lib.DecodeTuning(1, 0, 0), lib.DecodeTuning(3, 7, 1), lib.DecodeTuning(0, 200, 1),
               lib.DecodeTuning(0, 0, 1, 8), lib.DecodeTuning(2, 7, 0, 8), lib.DecodeTuning(1, 200, 1, 8)]
    for m in (1, 8, 13, 32, 64):
        xq, xs = quantized(m, k, gen)
        want = reference(xq, xs, w, ws, bias)
        first = decode_mm(xq, xs, values, meta, ws, bias, plan, tunings[0])
        assert rel_err(first, want) < TOL[torch.bfloat16], m
        for tuning in tunings[1:]:
            xq2 = torch.empty_like(xq)
            xq2.copy_(xq)  # written by the kernel right before the GEMM
            got = decode_mm(xq2, xs, values, meta, ws, bias, plan, tuning)
            assert torch.equal(got, first), (m, tuning.stages, tuning.ctas, tuning.pdl, tuning.unit_blocks)


# host work that would stall a decode step: a synchronization, a device -> host copy, a Python scalar read
SYNCING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
           "aten::item", "aten::_local_scalar_dense")


def test_decode_layer_call_neither_syncs_nor_splits_the_graph(forced_threshold):
    """The layer call at decode token counts: one graph under torch.compile (fullgraph: a graph break
    raises) with one opaque GEMM op, no host synchronization or scalar read in eager calls, and a
    captured call replays from the graph launch alone (no kernel launched from the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    forced_threshold(64)
    gen = torch.Generator().manual_seed(77)
    n, k = 1024, 2048
    kern, tensors, _, _ = _layer(n, k, gen, torch.bfloat16)
    for m in (1, 8, 64):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
        _, targets = compiled_with_targets(kern, tensors, x)
        assert sum("sparse24" in t for t in targets) == 1, targets
        kern.apply(tensors, x, None)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function("layer_call"):
                kern.apply(tensors, x, None)
        # only what runs inside the call: the profiler synchronizes the device itself when it stops
        call = next(e for e in prof.events() if e.name == "layer_call" and e.device_type == DeviceType.CPU)
        names = [e.name for e in prof.events() if e.device_type == DeviceType.CPU and e.name != "layer_call"
                 and call.time_range.start <= e.time_range.start <= call.time_range.end]
        assert "cudaLaunchKernelExC" in names or "cudaLaunchKernel" in names or names, names
        assert not [s for s in names if s in SYNCING], names
        g, _ = capture_apply(kern, tensors, x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        runtime = {e.name for e in prof.events() if e.device_type == DeviceType.CPU and e.name.startswith("cu")}
        assert "cudaGraphLaunch" in runtime and not {s for s in runtime if "Launch" in s and "Graph" not in s}, runtime
        kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
        assert any("decode_kernel" in s for s in kernels), kernels


@pytest.mark.parametrize("n,k", [(4096, 4096), (28672, 4096), (1000, 2048)])
def test_cutlass_gemm_with_pdl_equals_a_plain_launch(n, k):
    """The CUTLASS configs launched with programmatic dependent launch (the default) read the
    activations the kernel right before them wrote (their griddepcontrol.wait comes before the first
    load) and give the same bits as a plain launch, at every token-count bucket of the table, eagerly
    and replayed from a CUDA graph (where the launch attribute becomes a programmatic graph edge)."""
    gen = torch.Generator().manual_seed(5 * n + k)
    w = random_24(n, k, gen)
    values, meta = compress_24(w)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEV)
    plan = plan_of(make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV)))
    for m in (1, 8, 16, 64, 200, 1024):
        xq, xs = quantized(m, k, gen)
        plain = _cutlass_mm(xq, xs, values, meta, ws, bias, plan, pdl=False)
        assert rel_err(plain, reference(xq, xs, w, ws, bias)) < TOL[torch.bfloat16], m
        src = torch.zeros_like(xq)

        def step(src=src, xq=xq, xs=xs):
            src.copy_(xq)  # the kernel right before the GEMM writes its activations
            return _cutlass_mm(src, xs, values, meta, ws, bias, plan, pdl=True)

        assert torch.equal(step(), plain), m
        src.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(3):
            src.zero_()
            out.zero_()
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain), m
