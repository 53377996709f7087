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
    monkeypatch.setenv("VLLM_SPARSE24_KERNEL", "nope")
    with pytest.raises(RuntimeError, match="layer.x: no sparse24 kernel.*VLLM_SPARSE24_KERNEL=nope"):
        choose_kernel(torch.device("cpu"), sparse=True, layer_name="layer.x")


def test_choose_kernel_skips_kernels_without_the_model_dtype(monkeypatch):
    import vllm_sparse24.kernels as K

    class Bf16Only(TorchW8A8Kernel):
        name = "bf16_only"
        act_dtypes = (torch.bfloat16,)

    monkeypatch.setattr(K, "_candidates", lambda: [Bf16Only, TorchW8A8Kernel])
    assert choose_kernel(torch.device("cpu"), True, "l", torch.bfloat16) is Bf16Only
    assert choose_kernel(torch.device("cpu"), True, "l", torch.float32) is TorchW8A8Kernel
    monkeypatch.setenv("VLLM_SPARSE24_KERNEL", "bf16_only")
    with pytest.raises(RuntimeError, match=r"l: no sparse24 kernel .*bf16_only: runs \['torch.bfloat16'\], the model is torch.float32"):
        choose_kernel(torch.device("cpu"), True, "l", torch.float32)
