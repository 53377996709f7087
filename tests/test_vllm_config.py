"""The plugin as vLLM sees it, without starting an engine: registration, detection, errors."""

from __future__ import annotations

import pytest
import torch

from vllm_sparse24.kernels import LinearLayer, UnsupportedDeviceError, choose_kernel


@pytest.fixture(scope="module", autouse=True)
def plugins():
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # through the entry point, as every vLLM process does


def _model_config(path, quantization=None):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(path), quantization=quantization, dtype="float32")


def test_entry_point_registers_sparse24():
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        get_quantization_config,
    )

    from vllm_sparse24.config import Sparse24Config

    assert "sparse24" in QUANTIZATION_METHODS
    assert get_quantization_config("sparse24") is Sparse24Config


@pytest.mark.parametrize("flag", [None, "sparse24"])
def test_detected_with_and_without_flag(tiny, flag):
    assert _model_config(tiny.sparse24_dir, flag).quantization == "sparse24"


@pytest.mark.parametrize("flag", [None, "sparse24", "compressed-tensors"])
def test_legacy_checkpoint_claimed(tiny, flag):
    assert _model_config(tiny.legacy_dir, flag).quantization == "sparse24"


def test_quantization_flag_mismatch_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"\(sparse24\) does not match .* \(fp8\)"):
        _model_config(tiny.sparse24_dir, "fp8")


def test_fused_shards_must_share_a_kind():
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_sparse24.config import Sparse24Config
    from vllm_sparse24.schema import Sparse24ConfigError, Sparse24Scheme

    cfg = Sparse24Config(Sparse24Scheme(dense_layers=("model.layers.0.self_attn.k_proj",)))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    layer = LinearBase.__new__(LinearBase)
    with pytest.raises(Sparse24ConfigError, match="qkv_proj: vLLM fuses .* 'k_proj': 'dense'"):
        cfg.get_quant_method(layer, "model.layers.0.self_attn.qkv_proj")
    method = cfg.get_quant_method(layer, "model.layers.1.self_attn.qkv_proj")
    assert type(method).__name__ == "Sparse24LinearMethod" and method.sparse


def test_gpu_other_than_hopper_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    with pytest.raises(UnsupportedDeviceError, match=r"l0: .*Hopper .*Tesla T4 is 7.5"):
        choose_kernel(LinearLayer("l0", 256, 256, True, torch.bfloat16, device=torch.device("cuda", 0)))


@pytest.mark.parametrize("cap", [(8, 0), (7, 5)])
def test_vllm_lets_ampere_and_later_reach_the_kernel_choice(tiny, monkeypatch, cap):
    """vLLM checks the quantization method's minimum capability before a layer is built: an Ampere
    GPU must pass (VLLM_SPARSE24_KERNEL=torch runs the reference kernel there, and without it the
    kernel choice names Hopper); vLLM refuses older GPUs itself."""
    from vllm.config import LoadConfig, VllmConfig
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    monkeypatch.setattr(current_platform, "get_device_capability", lambda device_id=0: DeviceCapability(*cap))
    model_config = _model_config(tiny.sparse24_dir)
    if cap >= (8, 0):
        assert VllmConfig._get_quantization_config(model_config, LoadConfig()).get_name() == "sparse24"
    else:
        with pytest.raises(ValueError, match="Minimum capability: 80. Current capability: 75"):
            VllmConfig._get_quantization_config(model_config, LoadConfig())
