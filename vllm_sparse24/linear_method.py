"""vLLM linear method for sparse24 (2:4 + W8A8) and dense W8A8 layers, int8 or fp8 (e4m3)."""

from __future__ import annotations

from typing import Literal

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)

from .checkpoint import SCALE, WEIGHT, sparse_names
from .format import Sparse24FormatError, unpack_24
from .kernels import LinearLayer, choose_kernel
from .schema import K_MULTIPLE, Sparse24Scheme


@register_weight_loader_v2_supported_method
class Sparse24LinearMethod(LinearMethodBase):
    """Loads values + bitmask (sparse) or the weight codes (dense) + per-channel scale, checks
    them, and hands the dense codes (int8 or float8_e4m3fn, the checkpoint's scheme) to the
    kernel chosen for the device."""

    def __init__(self, scheme: Sparse24Scheme, layer_name: str, kind: Literal["sparse", "dense"]):
        self.scheme = scheme
        self.layer_name = layer_name
        self.sparse = kind == "sparse"
        self.names = sparse_names(scheme.legacy)  # the parameters take the checkpoint's tensor names
        self.grid = scheme.grid
        self.kernel = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs["weight_loader"]
        n, k = sum(output_partition_sizes), input_size_per_partition
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = k
        layer.output_size_per_partition = n
        if self.sparse:
            if k % K_MULTIPLE:
                tp = input_size // k
                raise Sparse24FormatError(
                    f"{self.layer_name}: K per tensor-parallel rank is {k} (K={input_size}, tp={tp}); "
                    f"sparse24 needs a multiple of {K_MULTIPLE}. Use a smaller tensor-parallel size "
                    "or keep this layer dense (dense_layers)"
                )
            layer.register_parameter(
                self.names.packed,
                PackedvLLMParameter(
                    data=torch.empty(n, k // 2, dtype=self.grid.dtype),
                    input_dim=1, output_dim=0, packed_dim=1, packed_factor=2, weight_loader=loader,
                ),
            )
            layer.register_parameter(
                self.names.bitmask,
                PackedvLLMParameter(
                    data=torch.empty(n, k // 8, dtype=torch.uint8),
                    input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=loader,
                ),
            )
            if self.scheme.legacy:
                # compressed-tensors stored each shard's dense [N, K]; kept for checking K only
                layer.register_parameter(
                    self.names.shape,
                    BasevLLMParameter(data=torch.zeros(2, 1, dtype=torch.int64), weight_loader=_load_shape),
                )
        else:
            layer.register_parameter(
                WEIGHT,
                ModelWeightParameter(
                    data=torch.empty(n, k, dtype=self.grid.dtype), input_dim=1, output_dim=0, weight_loader=loader
                ),
            )
        layer.register_parameter(
            SCALE,
            ChannelQuantScaleParameter(data=torch.empty(n, 1, dtype=torch.float32), output_dim=0, weight_loader=loader),
        )
        layer.sparse24_full_k = input_size
        layer.sparse24_act_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        n, k = layer.output_size_per_partition, layer.input_size_per_partition
        if self.sparse:
            if self.scheme.legacy:
                shape_k = int(getattr(layer, self.names.shape).data.reshape(-1)[1])
                if shape_k != layer.sparse24_full_k:
                    raise Sparse24FormatError(
                        f"{self.layer_name}.{self.names.shape}: says K={shape_k}, the model expects K={layer.sparse24_full_k}"
                    )
                delattr(layer, self.names.shape)
            values = getattr(layer, self.names.packed).data
            bitmask = getattr(layer, self.names.bitmask).data
            weight = unpack_24(values, bitmask, k, name=self.layer_name)
            delattr(layer, self.names.packed)
            delattr(layer, self.names.bitmask)
        else:
            weight = getattr(layer, WEIGHT).data
            delattr(layer, WEIGHT)
        scale = getattr(layer, SCALE).data.to(torch.float32)
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise Sparse24FormatError(f"{self.layer_name}.{SCALE}: has negative, inf or NaN entries")
        delattr(layer, SCALE)
        spec = LinearLayer(self.layer_name, n, k, self.sparse, layer.sparse24_act_dtype, self.grid, weight.device)
        self.kernel = choose_kernel(spec)(spec)
        try:
            resident = self.kernel.prepare(weight, scale)
        except torch.OutOfMemoryError as e:
            need = n * k * (5 / 8 if self.sparse else 1) / 2**20
            raise torch.OutOfMemoryError(
                f"{self.layer_name}: out of GPU memory preparing the {'2:4 sparse' if self.sparse else 'dense'} "
                f"{self.grid.name} weight [{n}, {k}]: it needs {need:.1f} MiB resident plus {n * k / 2**20:.1f} MiB "
                "while it is converted (freed after). The weights load before vLLM sizes its KV cache, so "
                "gpu_memory_utilization does not help here: free the GPU (other processes) or shard the model "
                f"over more GPUs (tensor_parallel_size). ({e})"
            ) from e
        del weight
        self.resident_names = list(resident)
        for name, t in resident.items():
            layer.register_parameter(f"s24_{name}", torch.nn.Parameter(t, requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tensors = {name: getattr(layer, f"s24_{name}") for name in self.resident_names}
        return self.kernel.apply(tensors, x, bias)


def _load_shape(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
    if loaded_weight.numel() != 2:
        raise Sparse24FormatError(f"legacy '.shape' tensor must hold 2 values [N, K], got {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight.reshape(2, 1))
