"""GPU tests of w4a8 2:4 layers on Hopper (marker gpu; skipped without a CUDA sm90 GPU and a built
library): the int4 values stay resident (csrc/decode/layout.h, kernels/cuda/int4_layout.py), the
decode GEMM's int4 variant streams them, and above its threshold one kernel unpacks them into the
shared int8 scratch for the int8 CUTLASS GEMM.

Reference as tests/test_gpu_decode.py: the float64 product of the int8 codes (int4 value x group
scale) and the quantized activations times both scales plus bias, relative Frobenius error < 5e-3
(bf16) / 1.5e-3 (fp16). Both int4 paths must also give the int8 path's bits on the unpacked codes:
the int8 decode GEMM and the int8 CUTLASS GEMM on the compressor's values (the same int32 sums and
the same epilogue). A wrong nibble, group scale or block gives O(1) errors.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
# importing test_gpu_kernels skips this module too when there is no Hopper GPU or no built library
from test_gpu_decode import kernels_run, quantized  # noqa: E402
from test_gpu_kernels import (  # noqa: E402
    DEV,
    TOL,
    assert_replay_equals_eager,
    compiled_with_targets,
    reference,
    rel_err,
)

from vllm_sparse24 import format as fmt  # noqa: E402
from vllm_sparse24.kernels.base import Int4Weight24, LinearLayer  # noqa: E402
from vllm_sparse24.kernels.cuda import int4_layout, lib, sparse24_linear  # noqa: E402
from vllm_sparse24.kernels.cuda.gemm_table import DECODE_ENV  # noqa: E402
from vllm_sparse24.kernels.cuda.sparse24_linear import (  # noqa: E402
    CutlassSparse24Kernel,
    _cutlass_mm,
    compress_24,
    decode_mm,
    make_plan,
    plan_of,
    sparse_mm_w4a8,
    unpack_int4,
)
from vllm_sparse24.kernels.torch_ref import TorchW4A8Kernel  # noqa: E402
from vllm_sparse24.linear_method import report_resident  # noqa: E402
from vllm_sparse24.quant import quantize_per_token as ref_quant  # noqa: E402

LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
# partial row tiles, a partial last 128-column block (K = 576, 2304 = 18 blocks: a partial unit),
# more CTAs than row tiles (the cross-CTA fixup)
ODD = [(200, 384), (72, 1152), (136, 576), (1000, 2304), (256, 4096)]


def random_w4a8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int4 values int8 [n, k] in [-7, 7], 0 outside a random 2:4 mask, some kept values 0; the
    mask; group scales uint8 [n, ceil(k/128)] in 1..18), on the GPU."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    v = torch.randint(-7, 8, (n, k), generator=gen, device=DEV, dtype=torch.int8)
    keep = torch.rand(n, k // 4, 4, generator=gen, device=DEV).topk(2, dim=-1).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=DEV).scatter(-1, keep, True).reshape(n, k)
    v = torch.where(mask, v, 0)
    gs = torch.randint(1, 19, (n, -(-k // 128)), generator=gen, device=DEV, dtype=torch.uint8)
    return v, mask, gs


def operands(n: int, k: int, seed: int):
    """The int8 codes, CUTLASS's values + metadata of them, and the int4 layout + group scales."""
    v, _, gs = random_w4a8(n, k, seed)
    codes = fmt.int4_to_int8(v, gs)
    values8, meta = compress_24(codes)
    values4, scales = int4_layout.pack(values8, gs)
    return codes, values8, meta, values4, scales


def scales_and_bias(n: int, seed: int, out_dt=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    ws = (torch.rand(n, generator=gen) * 1e-2 + 1e-4).to(DEV)
    return ws, torch.randn(n, generator=gen).to(out_dt).to(DEV), gen


@pytest.fixture
def threshold(monkeypatch):
    """Plans made inside the test see VLLM_SPARSE24_DECODE_MAX_M as given (None: unset); the plan
    cache starts empty so earlier plans of the same shape do not answer."""
    monkeypatch.setattr(sparse24_linear, "_PLAN_IDS", {})

    def set_env(value: int | str | None) -> None:
        if value is None:
            monkeypatch.delenv(DECODE_ENV, raising=False)
        else:
            monkeypatch.setenv(DECODE_ENV, str(value))
    return set_env


@pytest.mark.parametrize("out_dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", ODD)
def test_int4_decode_every_m_against_float64_and_the_int8_paths(n, k, out_dt):
    """Every M 1..64 (all four token-tile instances), bias and none: float64 reference; bit-equal to
    the int8 decode GEMM (where K allows it) and to the int8 CUTLASS GEMM on the unpacked codes."""
    codes, values8, meta, values4, scales = operands(n, k, n + k)
    ws, bias, gen = scales_and_bias(n, k, out_dt)
    plan4 = make_plan(n, k, torch.int8, out_dt, torch.device(DEV), int4=True)
    plan8 = make_plan(n, k, torch.int8, out_dt, torch.device(DEV))
    if (n, k) == (256, 4096):
        units, ctas, per_tile = lib.decode_partition(n, k)
        assert ctas > units // per_tile, "this shape is meant to cover the cross-CTA fixup"
    for m in range(1, 65):
        xq, xs = quantized(m, k, gen)
        for b in (bias, None) if m % 8 in (1, 0) else (bias,):
            out = decode_mm(xq, xs, values4, meta, ws, b, plan4, group_scale=scales)
            assert out.dtype == out_dt and out.shape == (m, n) and torch.isfinite(out).all(), (n, k, m)
            err = rel_err(out, reference(xq, xs, codes, ws, b))
            assert err < TOL[out_dt], (n, k, m, b is None, err)
            assert torch.equal(out, _cutlass_mm(xq, xs, values8, meta, ws, b, plan_of(plan8))), (n, k, m)
            if k % 128 == 0:
                assert torch.equal(out, decode_mm(xq, xs, values8, meta, ws, b, plan8)), (n, k, m)


@pytest.mark.parametrize("n,k", LLAMA_8B)
def test_llama_8b_shapes_bit_equal_to_the_int8_paths(n, k):
    codes, values8, meta, values4, scales = operands(n, k, n ^ k)
    ws, bias, gen = scales_and_bias(n, k)
    plan4 = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)
    plan8 = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV))
    for m in (1, 2, 5, 8, 9, 16, 17, 32, 33, 64):
        xq, xs = quantized(m, k, gen)
        out = decode_mm(xq, xs, values4, meta, ws, bias, plan4, group_scale=scales)
        assert rel_err(out, reference(xq, xs, codes, ws, bias)) < TOL[torch.bfloat16], (n, k, m)
        assert torch.equal(out, decode_mm(xq, xs, values8, meta, ws, bias, plan8)), (n, k, m)
        assert torch.equal(out, _cutlass_mm(xq, xs, values8, meta, ws, bias, plan_of(plan8))), (n, k, m)
    del codes, values8, meta, values4, scales
    torch.cuda.empty_cache()


@pytest.mark.parametrize("n,k", [(4096, 4096), (136, 576), (1000, 2304), (28672, 4096)])
def test_unpack_gives_the_compressor_values(n, k):
    _, values8, _, values4, scales = operands(n, k, 3 * n + k)
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)
    assert torch.equal(unpack_int4(values4, scales, plan), values8)
    assert lib.decode_int4_bytes(n, k) == int4_layout.resident_bytes(n, k) == (values4.numel(), scales.numel())


@pytest.mark.parametrize("n,k", [(4096, 4096), (136, 576), (4096, 14336)])
def test_prefill_unpack_path_against_float64_and_the_int8_gemm(n, k, threshold):
    """Above the decode threshold (and at every M with the decode GEMM off): unpack into the shared
    scratch, then the int8 CUTLASS config, bit-equal to that config on the compressor's values."""
    threshold(8)
    codes, values8, meta, values4, scales = operands(n, k, 7 * n + k)
    ws, bias, gen = scales_and_bias(n, k)
    plan4 = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)
    plan8 = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV))
    assert plan_of(plan4).decode_max_m == 8
    for m in (1, 8, 9, 64, 65, 300, 2048):
        xq, xs = quantized(m, k, gen)
        names = kernels_run(lambda xq=xq, xs=xs: sparse_mm_w4a8(xq, xs, values4, meta, scales, ws, bias, plan4))
        assert any("decode_kernel" in s for s in names) == (m <= 8), (m, names)
        assert any("unpack_int4_kernel" in s for s in names) == (m > 8), (m, names)
        out = sparse_mm_w4a8(xq, xs, values4, meta, scales, ws, bias, plan4)
        assert rel_err(out, reference(xq, xs, codes, ws, bias)) < TOL[torch.bfloat16], (n, k, m)
        assert torch.equal(out, _cutlass_mm(xq, xs, values8, meta, ws, bias, plan_of(plan8))), (n, k, m)


def test_decode_threshold_of_int4_plans(threshold):
    """Unset: the int4 decode GEMM serves every M it can (its other path unpacks the weight first);
    a count or 0 overrides it as for 8-bit layers; ``auto`` measures decode against unpack + GEMM."""
    threshold(None)
    assert plan_of(make_plan(4096, 4096, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)).decode_max_m == 64
    assert plan_of(make_plan(4096, 4096, torch.int8, torch.bfloat16, torch.device(DEV))).decode_max_m == 0
    threshold(0)
    assert plan_of(make_plan(1024, 576, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)).decode_max_m == 0
    threshold("auto")
    plan = make_plan(4096, 4096, torch.int8, torch.float16, torch.device(DEV), int4=True)
    assert plan_of(plan).decode_max_m in (0, 1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 2304)])
def test_pdl_stages_and_ctas_do_not_change_the_result(n, k):
    codes, _, meta, values4, scales = operands(n, k, 11 * n + k)
    ws, bias, gen = scales_and_bias(n, k)
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)
    tunings = [lib.DecodeTuning(0, 0, 1), lib.DecodeTuning(0, 0, 0), lib.DecodeTuning(2, 0, 1),
               lib.DecodeTuning(1, 0, 0), lib.DecodeTuning(3, 7, 1), lib.DecodeTuning(0, 200, 1),
               lib.DecodeTuning(0, 0, 1, 8), lib.DecodeTuning(2, 7, 0, 8), lib.DecodeTuning(1, 200, 1, 8)]
    for m in (1, 8, 13, 32, 64):
        xq, xs = quantized(m, k, gen)
        first = decode_mm(xq, xs, values4, meta, ws, bias, plan, tunings[0], group_scale=scales)
        assert rel_err(first, reference(xq, xs, codes, ws, bias)) < TOL[torch.bfloat16], m
        for tuning in tunings[1:]:
            xq2 = torch.empty_like(xq)
            xq2.copy_(xq)  # written by the kernel right before the GEMM
            got = decode_mm(xq2, xs, values4, meta, ws, bias, plan, tuning, group_scale=scales)
            assert torch.equal(got, first), (m, tuning.stages, tuning.ctas, tuning.pdl, tuning.unit_blocks)


def checkpoint_weight(n: int, k: int, seed: int) -> tuple[Int4Weight24, torch.Tensor, torch.Tensor]:
    """A w4a8 2:4 weight as the checkpoint stores it (on the GPU), its int8 codes and channel scales."""
    v, mask, gs = random_w4a8(n, k, seed)
    values, bitmask = fmt.pack_int4_24(v, mask)
    scale = (torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) * 1e-2 + 1e-4).to(DEV)
    return Int4Weight24(values, bitmask, gs), fmt.int4_to_int8(v, gs), scale


def prepared_layer(n: int, k: int, seed: int) -> tuple[CutlassSparse24Kernel, dict[str, torch.Tensor]]:
    """A bf16 w4a8 2:4 layer on the CUDA kernel and its resident tensors."""
    weight, _, scale = checkpoint_weight(n, k, seed)
    kern = CutlassSparse24Kernel(LinearLayer("layers.0.w4a8", n, k, True, torch.bfloat16, int4=True,
                                             device=torch.device(DEV)))
    return kern, kern.prepare_int4(weight, scale)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1536, 576), (6144, 4096)])
def test_layer_matches_the_reference_kernel(n, k, dt):
    """The whole w4a8 layer: CutlassSparse24Kernel.prepare_int4 keeps <= 0.40 bytes per weight
    (0.39 + 4/K at K % 512 == 0) and its apply matches TorchW4A8Kernel on the same checkpoint
    tensors and the float64 product, at decode and prefill token counts."""
    weight, codes, scale = checkpoint_weight(n, k, n + 5 * k)
    spec = LinearLayer("layers.0.w4a8", n, k, True, dt, int4=True, device=torch.device(DEV))
    kern = CutlassSparse24Kernel(spec)
    tensors = kern.prepare_int4(weight, scale)
    assert tensors["values"].dtype == torch.uint8 and "group_scale" in tensors
    per_weight = report_resident(spec.name, "w4a8 2:4", n, k, kern.name, tensors)
    if k % 512 == 0:
        assert per_weight == pytest.approx(0.25 + 0.125 + 1 / 128 + 4 / k) and per_weight <= 0.40
    ref_kern = TorchW4A8Kernel(spec)
    ref_tensors = ref_kern.prepare_int4(weight, scale)
    gen = torch.Generator().manual_seed(n)
    for m in (1, 7, 64, 65, 512):
        x = (torch.randn(m, k, generator=gen) * 3).to(dt).to(DEV)
        out = kern.apply(tensors, x, None)
        want = ref_kern.apply(ref_tensors, x, None)
        assert rel_err(out, want) < 2 * TOL[dt], (n, k, m)
        xq, xs = ref_quant(x)  # bit-identical to the layer's activation quant (test_gpu_kernels)
        assert rel_err(out, reference(xq, xs, codes, scale, None)) < TOL[dt], (n, k, m)


def test_layers_share_one_scratch_sized_for_the_largest(threshold):
    threshold(None)
    shapes = [(1024, 2048), (4096, 1024), (512, 576)]
    layers = []
    for i, (n, k) in enumerate(shapes):
        codes, _, meta, values4, scales = operands(n, k, 100 + i)
        ws, _, _ = scales_and_bias(n, i)
        layers.append((codes, meta, values4, scales, ws, make_plan(n, k, torch.int8, torch.bfloat16,
                                                                   torch.device(DEV), int4=True)))
    assert sparse24_linear._INT4_SCRATCH[torch.device(DEV).index or 0].numel() >= max(n * k // 2 for n, k in shapes)
    gen = torch.Generator().manual_seed(3)
    for m in (100, 3, 70):
        for codes, meta, values4, scales, ws, plan in layers * 2:
            xq, xs = quantized(m, codes.shape[1], gen)
            out = sparse_mm_w4a8(xq, xs, values4, meta, scales, ws, None, plan)
            assert rel_err(out, reference(xq, xs, codes, ws, None)) < TOL[torch.bfloat16], (codes.shape, m)


@pytest.mark.parametrize("m", [1, 16, 64, 100])
def test_cuda_graph_replay_equals_eager(m, threshold):
    """The layer captured and replayed at decode and prefill token counts (the unpack into the
    shared scratch is inside the graph: no allocation in a call)."""
    threshold(None)
    n, k = 1024, 2048
    kern, tensors = prepared_layer(n, k, 9)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    x2 = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    assert_replay_equals_eager(kern, tensors, x, x2, replays=3)


def test_layer_compiles_to_one_opaque_op(threshold):
    threshold(None)
    n, k = 512, 1024
    kern, tensors = prepared_layer(n, k, 4)
    for m in (1, 80):
        x = torch.randn(m, k).to(torch.bfloat16).to(DEV)
        out, targets = compiled_with_targets(kern, tensors, x)
        assert sum("cutlass_sparse_mm_w4a8" in t for t in targets) == 1, targets
        assert torch.equal(out, kern.apply(tensors, x, None)), m


def test_bad_calls_are_refused_with_a_message():
    so = lib.lib()
    x = torch.zeros(8, 256, dtype=torch.int8, device=DEV)
    f = torch.ones(64, device=DEV)
    out = torch.empty(8, 64, dtype=torch.bfloat16, device=DEV)
    ws = torch.zeros(lib.decode_workspace_bytes(64, 64, 256), dtype=torch.uint8, device=DEV)
    stream = torch.cuda.current_stream().cuda_stream

    def call(dtype, scales, k=256):
        return so.s24_decode_gemm(dtype, lib.BF16, x.data_ptr(), x.data_ptr(), scales, x.data_ptr(), 256,
                                  f.data_ptr(), f.data_ptr(), None, out.data_ptr(), 4, 64, k, ws.data_ptr(),
                                  ws.numel(), None, stream)

    with pytest.raises(lib.Sparse24LibraryError, match="int4 weight needs its group scales"):
        lib.check_decode(call(lib.INT4, None), "no group scales")
    with pytest.raises(lib.Sparse24LibraryError, match="group scales are for int4 weights only"):
        lib.check_decode(call(lib.INT8, x.data_ptr()), "int8 with group scales")
    with pytest.raises(lib.Sparse24LibraryError, match="weight dtype 7"):
        lib.check_decode(call(7, None), "dtype 7")
    with pytest.raises(lib.Sparse24LibraryError, match="multiple of 64"):
        lib.check_decode(call(lib.INT4, x.data_ptr(), k=96), "k=96")
    with pytest.raises(lib.Sparse24LibraryError, match="multiple of 64"):
        lib.decode_int4_bytes(64, 100)
