"""``Sparse24Config``: the vLLM quantization config registered as ``sparse24``."""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from .checkpoint import validate_checkpoint
from .linear_method import Sparse24LinearMethod
from .lm_head_method import Sparse24LMHeadMethod
from .schema import EIGHT_BIT_SCHEMES, QUANT_METHOD, Sparse24ConfigError, Sparse24Scheme

# the scheme (int8 / fp8) that an unquantized 2:4 checkpoint is quantized to at load (w4a8 needs
# the compressor's group scales, so it is not offered here)
LOAD_SCHEME_ENV = "VLLM_SPARSE24_LOAD_SCHEME"


def load_scheme_from_env() -> str:
    value = os.environ.get(LOAD_SCHEME_ENV) or "int8"
    if value not in EIGHT_BIT_SCHEMES:
        raise Sparse24ConfigError(f"{LOAD_SCHEME_ENV}={value!r}: choose one of {sorted(EIGHT_BIT_SCHEMES)}")
    return value


@register_quantization_config(QUANT_METHOD)
class Sparse24Config(QuantizationConfig):
    def __init__(self, scheme: Sparse24Scheme | None = None) -> None:
        """``scheme`` None: vLLM found no quantization_config (``--quantization sparse24`` on a
        plain checkpoint), so the weights are float 2:4, quantized at load."""
        super().__init__()
        self.scheme = scheme if scheme is not None else Sparse24Scheme.unquantized_24(load_scheme_from_env())

    def __repr__(self) -> str:
        return f"Sparse24Config({self.scheme})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # the CUDA library holds sm_90a code (Hopper: wgmma.sp), which dispatch.py asks for and says so;
        # VLLM_SPARSE24_KERNEL=torch runs the reference kernel on earlier GPUs, which vLLM would
        # refuse first if this said 90
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Sparse24Config:
        if Sparse24Scheme.is_legacy_config(config):
            return cls(Sparse24Scheme.from_compressed_tensors(config, load_scheme_from_env()))
        return cls(Sparse24Scheme.from_dict(config))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        # compressed-tensors 2:4 checkpoints (llm-compressor): stock vLLM >= 0.19.1 refuses them, we claim them
        if Sparse24Scheme.is_legacy_config(hf_quant_cfg) and user_quant in (None, QUANT_METHOD, "compressed-tensors"):
            return QUANT_METHOD
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        # a local folder is checked by its safetensors headers before any weight is allocated
        if os.path.isdir(model_name):
            validate_checkpoint(model_name, self.scheme)

    def _shard_names(self, prefix: str) -> list[str]:
        """The checkpoint's module names of the layers vLLM fuses into ``prefix`` ([] if none)."""
        last = prefix.rsplit(".", 1)[-1]
        return [prefix[: -len(last)] + s for s in self.packed_modules_mapping.get(last) or ()]

    def _layer_kind(self, prefix: str) -> str:
        shards = self._shard_names(prefix)
        if not shards:
            return self.scheme.layer_kind(prefix)
        kinds = {s.rsplit(".", 1)[-1]: self.scheme.layer_kind(s) for s in shards}
        if len(set(kinds.values())) > 1:
            raise Sparse24ConfigError(
                f"{prefix}: vLLM fuses {shards} into one layer, so they must share one kind, "
                f"but the quantization_config makes them {kinds}"
            )
        return next(iter(kinds.values()))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):  # None: vLLM's float lm_head
            return Sparse24LMHeadMethod(self.scheme, prefix) if self.scheme.quantize_lm_head else None
        if not isinstance(layer, LinearBase):
            return None
        kind = self._layer_kind(prefix)
        if kind == "unquantized":
            return UnquantizedLinearMethod()
        return Sparse24LinearMethod(self.scheme, prefix, kind, self._shard_names(prefix))
