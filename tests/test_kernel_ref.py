"""The portable W8A8 kernel (the CPU path and the GPU kernels' reference) vs float64."""

from __future__ import annotations

import pytest
import torch
from test_format import random_24

from vllm_sparse24.kernels import TorchW8A8Kernel, choose_kernel
from vllm_sparse24.quant import quantize_per_token


def float64_reference(x, w_int8, w_scale, bias):
    xq, xs = quantize_per_token(x)
    out = (xq.double() @ w_int8.double().t()) * xs.double() * w_scale.double().reshape(1, -1)
    return out + (bias.double() if bias is not None else 0)


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (3, 192, 576), (17, 1536, 576), (64, 576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_kernel_matches_float64(m, n, k, with_bias):
    torch.manual_seed(m + n + k)
    w = random_24(n, k, seed=n)
    scale = torch.rand(n, 1) * 0.01 + 1e-3
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(m, k) * 3
    kern = TorchW8A8Kernel(n, k, sparse=True, layer_name="l")
    tensors = kern.prepare(w, scale)
    out = kern.apply(tensors, x.reshape(1, m, k), bias)
    assert out.shape == (1, m, n) and out.dtype == x.dtype
    ref = float64_reference(x, w, scale, bias)
    rel = ((out.reshape(m, n).double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel


def test_custom_op_compiles_fullgraph():
    # vLLM compiles the model with fullgraph=True; the op must trace through its fake impl
    n, k = 64, 128
    kern = TorchW8A8Kernel(n, k, sparse=True, layer_name="l")
    tensors = kern.prepare(random_24(n, k), torch.full((n, 1), 0.01))
    fn = torch.compile(lambda x: kern.apply(tensors, x, None), fullgraph=True, backend="eager", dynamic=True)
    for m in (1, 5, 33):
        x = torch.randn(m, k)
        assert torch.equal(fn(x), kern.apply(tensors, x, None))


def test_choose_kernel_on_cpu_and_forced_unknown(monkeypatch):
    assert choose_kernel(torch.device("cpu"), sparse=True) is TorchW8A8Kernel
    assert choose_kernel(torch.device("cpu"), sparse=False) is TorchW8A8Kernel
    monkeypatch.setenv("VLLM_SPARSE24_KERNEL", "nope")
    with pytest.raises(RuntimeError, match=r"layer.x: no sparse24 kernel named VLLM_SPARSE24_KERNEL=nope; choose one of \['cutlass', 'torch', 'vllm_cutlass_int8'\]"):
        choose_kernel(torch.device("cpu"), sparse=True, layer_name="layer.x")
    monkeypatch.setenv("VLLM_SPARSE24_KERNEL", "cutlass")
    with pytest.raises(RuntimeError, match="layer.x: VLLM_SPARSE24_KERNEL=cutlass needs a CUDA device, got cpu"):
        choose_kernel(torch.device("cpu"), sparse=True, layer_name="layer.x")


def _fake_gpu(monkeypatch, cap, name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)


def test_choose_kernel_on_gpus(monkeypatch, tmp_path):
    """Hopper: the CUTLASS kernel, and a clear error when its library is not built; other GPUs are
    refused (sm_90a code only) unless the torch reference kernel is forced; float32 models take it."""
    from vllm_sparse24.kernels.cuda.dense_linear import VllmCutlassInt8Kernel
    from vllm_sparse24.kernels.cuda.sparse24_linear import CutlassSparse24Kernel

    cuda0 = torch.device("cuda", 0)
    _fake_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"l0: sparse24's CUDA kernels are built for Hopper .*NVIDIA A100 is 8.0"):
        choose_kernel(cuda0, sparse=True, layer_name="l0")
    monkeypatch.setenv("VLLM_SPARSE24_KERNEL", "torch")
    assert choose_kernel(cuda0, sparse=True, layer_name="l0") is TorchW8A8Kernel
    monkeypatch.delenv("VLLM_SPARSE24_KERNEL")
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    assert choose_kernel(cuda0, True, "l0", torch.float32) is TorchW8A8Kernel
    monkeypatch.setenv("VLLM_SPARSE24_LIB", str(tmp_path / "missing.so"))
    from vllm_sparse24.kernels.cuda import lib

    lib.lib.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"l0: the sparse24 CUDA library is not built .*python -m vllm_sparse24.build"):
            choose_kernel(cuda0, True, "l0", torch.bfloat16)
    finally:
        lib.lib.cache_clear()
    monkeypatch.setattr(CutlassSparse24Kernel, "is_supported", classmethod(lambda cls, d, s: (True, None)))
    monkeypatch.setattr(VllmCutlassInt8Kernel, "is_supported", classmethod(lambda cls, d, s: (True, None)))
    assert choose_kernel(cuda0, True, "l0", torch.bfloat16) is CutlassSparse24Kernel
    assert choose_kernel(cuda0, False, "l0", torch.float16) is VllmCutlassInt8Kernel
    monkeypatch.setenv("VLLM_SPARSE24_KERNEL", "cutlass")
    with pytest.raises(RuntimeError, match="l0: VLLM_SPARSE24_KERNEL=cutlass does not serve dense layers"):
        choose_kernel(cuda0, False, "l0", torch.bfloat16)
