"""The portable W8A8 kernel (the CPU path and the GPU kernels' reference) vs float64."""

from __future__ import annotations

import pytest
import torch
from test_format import random_24

from vllm_sparse24.kernels import LinearLayer, TorchW8A8Kernel, choose_kernel
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
    kern = TorchW8A8Kernel(LinearLayer("l", n, k, True, torch.float32))
    tensors = kern.prepare(w, scale)
    out = kern.apply(tensors, x.reshape(1, m, k), bias)
    assert out.shape == (1, m, n) and out.dtype == x.dtype
    ref = float64_reference(x, w, scale, bias)
    rel = ((out.reshape(m, n).double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel


def test_custom_op_compiles_fullgraph():
    # vLLM compiles the model with fullgraph=True; the op must trace through its fake impl
    n, k = 64, 128
    kern = TorchW8A8Kernel(LinearLayer("l", n, k, True, torch.float32))
    tensors = kern.prepare(random_24(n, k), torch.full((n, 1), 0.01))
    fn = torch.compile(lambda x: kern.apply(tensors, x, None), fullgraph=True, backend="eager", dynamic=True)
    for m in (1, 5, 33):
        x = torch.randn(m, k)
        assert torch.equal(fn(x), kern.apply(tensors, x, None))


def _layer(name="l0", sparse=True, dtype=torch.bfloat16, device="cuda"):
    return LinearLayer(name, 256, 256, sparse, dtype, device=torch.device(device))


def test_choose_kernel_on_cpu_and_forced_unknown(force_kernel):
    assert choose_kernel(_layer(sparse=True, dtype=torch.float32, device="cpu")) is TorchW8A8Kernel
    assert choose_kernel(_layer(sparse=False, dtype=torch.float32, device="cpu")) is TorchW8A8Kernel
    force_kernel("nope")
    with pytest.raises(RuntimeError, match=r"VLLM_SPARSE24_KERNEL='nope' names no sparse24 kernel; choose one of "
                                           r"\['cutlass', 'torch'\]"):
        choose_kernel(_layer("layer.x", device="cpu"))
    force_kernel("cutlass")
    with pytest.raises(RuntimeError, match="layer.x: VLLM_SPARSE24_KERNEL=cutlass has no kernel for cpu devices"):
        choose_kernel(_layer("layer.x", device="cpu"))


def test_kernel_override_is_read_once(force_kernel, monkeypatch):
    from vllm_sparse24.kernels import dispatch

    force_kernel("torch")
    assert dispatch.kernel_override() == "torch"
    monkeypatch.setenv(dispatch.KERNEL_ENV, "cutlass")  # too late: the process has read it
    assert dispatch.kernel_override() == "torch"


def _fake_gpu(monkeypatch, cap, name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)


def test_choose_kernel_on_gpus(monkeypatch, tmp_path, force_kernel, caplog):
    """Hopper: the CUTLASS kernels, and a clear error when the library is not built; other GPUs are
    refused (sm_90a code only) unless the torch reference kernel is forced, which runs with a warning;
    float32 models take it on any GPU."""
    from vllm_sparse24.kernels import dispatch
    from vllm_sparse24.kernels.cuda.dense_linear import CutlassScaledMMKernel
    from vllm_sparse24.kernels.cuda.sparse24_linear import CutlassSparse24Kernel

    _fake_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"l0: sparse24's CUDA kernels are built for Hopper .*NVIDIA A100 is 8.0\. "
                                           r"VLLM_SPARSE24_KERNEL=torch runs the float32 reference kernel"):
        choose_kernel(_layer())
    with pytest.raises(RuntimeError, match=r"l0: sparse24's dense-layer kernel is built for Hopper .*A100 is 8.0"):
        choose_kernel(_layer(sparse=False))
    dispatch._warn_slow.cache_clear()
    force_kernel("torch")
    with caplog.at_level("WARNING", logger="vllm_sparse24.kernels.dispatch"):
        assert choose_kernel(_layer()) is TorchW8A8Kernel
        assert choose_kernel(_layer(sparse=False)) is TorchW8A8Kernel
    slow = [r.message for r in caplog.records]
    assert slow == ["sparse24: VLLM_SPARSE24_KERNEL=torch; running the float32 reference kernel on the GPU "
                    "(correct, slow: weights held in float32, no 2:4 speed-up)"]
    force_kernel(None)
    assert choose_kernel(_layer(dtype=torch.float32)) is TorchW8A8Kernel
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    assert choose_kernel(_layer(dtype=torch.float32)) is TorchW8A8Kernel
    monkeypatch.setenv("VLLM_SPARSE24_LIB", str(tmp_path / "missing.so"))
    from vllm_sparse24.kernels.cuda import lib

    lib.lib.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"l0: the sparse24 CUDA library is not built .*python -m vllm_sparse24.build"):
            choose_kernel(_layer())
    finally:
        lib.lib.cache_clear()
    monkeypatch.setattr(CutlassSparse24Kernel, "is_supported", classmethod(lambda cls, d: (True, None)))
    monkeypatch.setattr(CutlassScaledMMKernel, "is_supported", classmethod(lambda cls, d: (True, None)))
    assert choose_kernel(_layer()) is CutlassSparse24Kernel
    assert choose_kernel(_layer(sparse=False, dtype=torch.float16)) is CutlassScaledMMKernel
    force_kernel("cutlass")  # the CUDA kernels, each for its kind of layer
    assert choose_kernel(_layer()) is CutlassSparse24Kernel
    assert choose_kernel(_layer(sparse=False)) is CutlassScaledMMKernel
    with pytest.raises(RuntimeError, match=r"l0: no sparse24 kernel \(VLLM_SPARSE24_KERNEL=cutlass\) runs this dense "
                                           r"layer: cutlass_sparse24 serves 2:4 sparse layers only; cutlass_scaled_mm "
                                           r"runs bfloat16 and float16 models, the model is torch.float32"):
        choose_kernel(_layer(sparse=False, dtype=torch.float32))
