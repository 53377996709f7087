"""vLLM linear method for sparse24 (2:4 + W8A8) and dense W8A8 layers, int8 or fp8 (e4m3), and the
w4a8 scheme's 2:4 layers (int4 values x uint8 group scale; its dense layers are int8).

A layer is finished (checked, unpacked, quantized where the checkpoint holds float weights, and
handed to the kernel) as soon as its last checkpoint tensor is loaded, so loading holds the source
tensors of one layer at a time: float weights are created on the meta device and materialized
when their first shard arrives, so an unquantized 2:4 checkpoint never needs a float copy of
every layer at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

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
    PerTensorScaleParameter,
)

from . import format as fmt
from .checkpoint import SCALE, WEIGHT, sparse_names
from .kernels import LinearLayer, choose_kernel
from .kernels.base import Int4Weight24
from .quant import GROUP_SIZE, group_count, quantize_weight_per_channel
from .schema import K_MULTIPLE, Sparse24Scheme

# vLLM's shard ids of fused q/k/v layers -> index into packed_modules_mapping["qkv_proj"]
_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
# a child of vLLM's logger: vLLM gives handlers to the "vllm" tree only, so this prints at INFO in
# every engine process where a logger of our own package would not
log = logging.getLogger("vllm.sparse24")
_REPORTED: set[tuple] = set()  # (kind, N, K, kernel) whose resident size was printed


def report_resident(layer_name: str, what: str, n: int, k: int, kernel: str, tensors: dict[str, torch.Tensor]) -> float:
    """Print once per layer kind, shape and kernel the resident bytes per weight of a layer (all
    its resident tensors: values, metadata, scales); returns them."""
    nbytes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    per_weight = sum(nbytes.values()) / (n * k)
    key = (what, n, k, kernel)
    if key not in _REPORTED:
        _REPORTED.add(key)
        parts = ", ".join(f"{name} {b / (n * k):.3f}" for name, b in nbytes.items())
        log.info("sparse24: %s [%d, %d] (%s, kernel %s): resident %.3f bytes per weight (%s)",
                 layer_name, n, k, what, kernel, per_weight, parts)
    return per_weight


@register_weight_loader_v2_supported_method
class Sparse24LinearMethod(LinearMethodBase):
    """Loads a layer's checkpoint tensors (sparse24 values + bitmask, compressed-tensors values +
    bitmask + shape, or a dense [N, K] weight; quantized codes + weight scale, or float weights),
    checks them, and hands the dense codes (int8 or float8_e4m3fn, the checkpoint's scheme) with
    per-channel scales to the kernel chosen for the device."""

    # finish a layer as soon as its last tensor is loaded (False: in process_weights_after_loading)
    finish_on_load: ClassVar[bool] = True

    def __init__(self, scheme: Sparse24Scheme, layer_name: str, kind: Literal["sparse", "dense"],
                 shard_names: Sequence[str] = ()):
        """``shard_names``: the checkpoint's module names of the layers vLLM fused into this one
        (q/k/v, gate/up), in vLLM's shard order; empty for a layer that is not fused."""
        self.scheme = scheme
        self.layer_name = layer_name
        self.shard_names = tuple(shard_names)
        self.sparse = kind == "sparse"
        self.grid = scheme.grid
        # a w4a8 2:4 layer: int4 values (two per byte) + group scales in the checkpoint
        self.int4 = self.sparse and scheme.int4
        # where the weights of this layer come from: sparse24 / compressed-tensors bitmask / dense
        self.layout = self.scheme.layout if self.sparse else "dense"
        # the parameters take the checkpoint's tensor names
        self.names = sparse_names(self.layout == "bitmask", self.int4)
        self.kernel = None
        self._int4_weight: Int4Weight24 | None = None  # w4a8: the checked int4 weight, until prepared
        self.resident_names: list[str] = []
        self.finished = False
        self._seen: dict[str, set] = {}  # checkpoint parameter -> the shard ids loaded into it
        self._shards = 1
        self._device = torch.device("cpu")

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
        layer.sparse24_full_k = input_size
        layer.sparse24_act_dtype = params_dtype
        self._shards = len(output_partition_sizes)
        self._device = torch.empty(0).device  # vLLM builds the model under its target device
        if self.sparse and k % K_MULTIPLE:
            tp = input_size // k
            raise fmt.Sparse24FormatError(
                f"{self.layer_name}: K per tensor-parallel rank is {k} (K={input_size}, tp={tp}); "
                f"sparse24 needs a multiple of {K_MULTIPLE}. Use a smaller tensor-parallel size "
                "or keep this layer dense (dense_layers)"
            )
        if self.int4 and k != input_size and k % GROUP_SIZE:
            raise fmt.Sparse24FormatError(
                f"{self.layer_name}: K per tensor-parallel rank is {k} (K={input_size}, tp={input_size // k}); "
                f"a w4a8 layer split along K needs a multiple of {GROUP_SIZE} per rank (whole groups of its "
                "group scales). Use a smaller tensor-parallel size"
            )
        # float weights (quantized at load) wait on the meta device for their first shard
        values_dtype, values_device = (
            (self.grid.dtype, None) if self.scheme.quantized else (params_dtype, "meta")
        )
        params: dict[str, BasevLLMParameter] = {}
        if self.layout == "dense":
            params[WEIGHT] = ModelWeightParameter(
                data=torch.empty(n, k, dtype=values_dtype, device=values_device),
                input_dim=1, output_dim=0, weight_loader=loader,
            )
        elif self.int4:  # two int4 values per byte: 4 dense columns per byte
            params[self.names.packed] = PackedvLLMParameter(
                data=torch.empty(n, k // 4, dtype=torch.uint8),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=4, weight_loader=loader,
            )
            params[self.names.bitmask] = PackedvLLMParameter(
                data=torch.empty(n, k // 8, dtype=torch.uint8),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=loader,
            )
            params[self.names.group_scale] = ModelWeightParameter(
                data=torch.empty(n, group_count(k), dtype=torch.uint8), input_dim=1, output_dim=0, weight_loader=loader,
            )
        else:
            params[self.names.packed] = PackedvLLMParameter(
                data=torch.empty(n, k // 2, dtype=values_dtype, device=values_device),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=2, weight_loader=loader,
            )
            params[self.names.bitmask] = PackedvLLMParameter(
                data=torch.empty(n, k // 8, dtype=torch.uint8),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=8, weight_loader=loader,
            )
            if self.layout == "bitmask":
                # compressed-tensors stores each shard's dense [N, K]; kept for checking K only
                params[self.names.shape] = BasevLLMParameter(
                    data=torch.zeros(2, 1, dtype=torch.int64), weight_loader=_load_shape
                )
        if self.scheme.quantized:
            if self.scheme.weight_strategy == "tensor":  # one scale per fused shard
                params[SCALE] = PerTensorScaleParameter(
                    data=torch.empty(self._shards, dtype=torch.float32), weight_loader=loader
                )
            else:
                params[SCALE] = ChannelQuantScaleParameter(
                    data=torch.empty(n, 1, dtype=torch.float32), output_dim=0, weight_loader=loader
                )
        for name, param in params.items():
            param.weight_loader = self._tracking_loader(layer, name, param.weight_loader)
            layer.register_parameter(name, param)
            self._seen[name] = set()

    # -- loading, one layer at a time ------------------------------------------------------
    def _tracking_loader(self, layer: torch.nn.Module, name: str, load: Callable) -> Callable:
        def tracking_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
            shard = args[0] if args else next(iter(kwargs.values()), None)
            if self.finished:
                raise fmt.Sparse24FormatError(
                    f"{self.layer_name}: {name} (shard {shard}) loaded again after the layer was complete; "
                    "the checkpoint holds the tensor twice"
                )
            if name == WEIGHT and self.sparse:  # 2:4 stored dense: check it as the checkpoint holds it
                fmt.check_24(loaded_weight, self._source_name(shard))
            param = getattr(layer, name)  # the materialized one after the first shard
            if param.is_meta:
                param = _materialize(param, self._device)
                layer.register_parameter(name, param)
            load(param, loaded_weight, *args, **kwargs)
            self._seen[name].add(shard)
            if self.finish_on_load and all(self._complete(n) for n in self._seen):
                self._finish(layer)

        return tracking_loader

    def _complete(self, name: str) -> bool:
        seen = self._seen[name]
        return None in seen or len(seen) >= self._shards

    def _source_name(self, shard) -> str:
        """The checkpoint's module name of one shard of this (possibly fused) layer."""
        if shard is None or not self.shard_names:
            return self.layer_name
        return self.shard_names[_QKV_SHARDS.get(shard, shard) if isinstance(shard, str) else shard]

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.finished:
            return
        partial = {name: sorted(map(str, seen)) for name, seen in self._seen.items() if seen and not self._complete(name)}
        if partial:
            raise fmt.Sparse24FormatError(
                f"{self.layer_name}: the checkpoint gave only some of this layer's tensors (loaded: {partial}; "
                f"expected {sorted(self._seen)} for each of {self._shards} shard(s))"
            )
        never = [name for name in self._seen if getattr(layer, name).is_meta]
        if never:
            raise fmt.Sparse24FormatError(f"{self.layer_name}: the checkpoint has no {never}")
        self._finish(layer)  # weights put in place without loaders (e.g. vLLM's dummy weights)

    def _finish(self, layer: torch.nn.Module) -> None:
        self._int4_weight = None
        codes, scale = self._codes_and_scale(layer)
        for name in self._seen:  # free now: vLLM's loader still holds the parameters
            param = getattr(layer, name)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            delattr(layer, name)
        self._prepare_kernel(layer, codes, scale)
        self.finished = True

    def _codes_and_scale(self, layer: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Dense codes [N, K] of the scheme's grid (2:4 when sparse) + float32 scale [N, 1]. A w4a8 2:4
        layer's codes are None here: its checked int4 weight waits in ``_int4_weight`` until the
        kernel is known (one that keeps int4 values resident never needs the [N, K] codes)."""
        k = layer.input_size_per_partition
        if self.layout == "dense":
            weight = getattr(layer, WEIGHT).data
        else:
            if self.names.shape:
                shape_k = int(getattr(layer, self.names.shape).data.reshape(-1)[1])
                if shape_k != layer.sparse24_full_k:
                    raise fmt.Sparse24FormatError(
                        f"{self.layer_name}.{self.names.shape}: says K={shape_k}, the model expects "
                        f"K={layer.sparse24_full_k}"
                    )
            values = getattr(layer, self.names.packed).data
            bitmask = getattr(layer, self.names.bitmask).data
            if self.int4:
                self._check_int4(values, bitmask, getattr(layer, self.names.group_scale).data, k)
                weight = None
            else:
                weight = fmt.unpack_24(values, bitmask, k, name=self.layer_name)
        if not self.scheme.quantized:
            return quantize_weight_per_channel(weight, self.grid)
        scale = getattr(layer, SCALE).data.to(torch.float32)
        if self.scheme.weight_strategy == "tensor":
            widths = torch.tensor(layer.logical_widths, device=scale.device)
            scale = scale.reshape(-1).repeat_interleave(widths).reshape(-1, 1)
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise fmt.Sparse24FormatError(f"{self.layer_name}.{SCALE}: has negative, inf or NaN entries")
        return weight, scale

    def _check_int4(self, values: torch.Tensor, bitmask: torch.Tensor, group_scale: torch.Tensor, k: int) -> None:
        """w4a8: checks the int4 values (2:4, no -8) and the group scales (1..18) and keeps them for
        the kernel (``_int4_weight``)."""
        fmt.unpack_int4_24(values, bitmask, k, name=self.layer_name)
        fmt.check_group_scale(group_scale, values.shape[0], k, f"{self.layer_name}.{self.names.group_scale}")
        self._int4_weight = Int4Weight24(values, bitmask, group_scale)

    def _prepare_kernel(self, layer: torch.nn.Module, weight: torch.Tensor | None, scale: torch.Tensor) -> None:
        n, k = layer.output_size_per_partition, layer.input_size_per_partition
        spec = LinearLayer(self.layer_name, n, k, self.sparse, layer.sparse24_act_dtype, self.grid, scale.device,
                           int4=self.int4)
        self.kernel = choose_kernel(spec)(spec)
        try:
            if self.int4 and self.kernel.int4_resident:
                resident = self.kernel.prepare_int4(self._int4_weight, scale)
            else:
                if weight is None:  # w4a8 on a kernel that takes int8 codes: int4 value x group scale
                    w4 = self._int4_weight
                    weight = fmt.int4_to_int8(fmt.unpack_int4_24(w4.values, w4.bitmask, k, name=self.layer_name)[0],
                                              w4.group_scale)
                resident = self.kernel.prepare(weight, scale)
        except torch.OutOfMemoryError as e:
            # int4 values + metadata + group scales, or 8-bit values + metadata, or dense codes
            per_weight = 0.39 if self.int4 and self.kernel.int4_resident else 5 / 8 if self.sparse else 1
            need = n * k * per_weight / 2**20
            raise torch.OutOfMemoryError(
                f"{self.layer_name}: out of GPU memory preparing the {'2:4 sparse' if self.sparse else 'dense'} "
                f"{self.grid.name} weight [{n}, {k}]: it needs {need:.1f} MiB resident plus {n * k / 2**20:.1f} MiB "
                "while it is converted (freed after). The weights load before vLLM sizes its KV cache, so "
                "gpu_memory_utilization does not help here: free the GPU (other processes) or shard the model "
                f"over more GPUs (tensor_parallel_size). ({e})"
            ) from e
        self._int4_weight = None
        what = ("w4a8 2:4" if self.int4 else f"{self.grid.name} 2:4") if self.sparse else f"{self.grid.name} dense"
        report_resident(self.layer_name, what, n, k, self.kernel.name, resident)
        self.resident_names = list(resident)
        for name, t in resident.items():
            layer.register_parameter(f"s24_{name}", torch.nn.Parameter(t, requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tensors = {name: getattr(layer, f"s24_{name}") for name in self.resident_names}
        return self.kernel.apply(tensors, x, bias)


def _materialize(param: torch.nn.Parameter, device: torch.device) -> torch.nn.Parameter:
    """A zeroed copy on ``device`` of a meta parameter, of the same vLLM parameter class and
    attributes (its loader included)."""
    t = torch.zeros(param.shape, dtype=param.dtype, device=device)
    t.__class__ = param.__class__
    t.__dict__ = param.__dict__.copy()
    return t


def _load_shape(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
    if loaded_weight.numel() != 2:
        raise fmt.Sparse24FormatError(f"legacy '.shape' tensor must hold 2 values [N, K], got {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight.reshape(2, 1))
