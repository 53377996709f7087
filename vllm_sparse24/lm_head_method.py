"""The quantized lm_head (``quantize_lm_head``): vLLM's ``ParallelLMHead`` as a dense W8A8 layer.

The logits are the dense-layer computation of :class:`Sparse24LinearMethod` (per-token activation
quant, the kernel chosen for the device: vLLM's ``cutlass_scaled_mm`` on Hopper, the reference
kernel elsewhere). vLLM's own vocab loader shards the rows over tensor-parallel ranks and zeroes
the padding rows past the vocabulary. With tied embeddings the embedding keeps its float weight
for the gather, and the logits use codes quantized from it at load, rounded as the compressor
rounds (``quant.quantize_weight_per_channel``).
"""

from __future__ import annotations

import torch

from .checkpoint import SCALE, SCALE_DTYPES, WEIGHT
from .format import Sparse24FormatError
from .linear_method import Sparse24LinearMethod
from .quant import Grid, quantize_weight_per_channel
from .schema import Sparse24Scheme

# rows quantized at a time from a tied embedding: bounds the float32 temporaries on the GPU
_ROWS_PER_CHUNK = 8192


class Sparse24LMHeadMethod(Sparse24LinearMethod):
    """Dense W8A8 logits for a ``ParallelLMHead``: int8 (or e4m3) codes + per-row scale from the
    checkpoint, or quantized at load from the embedding it is tied to."""

    # vLLM ties the embedding after loading (tie_weights): the layer is finished after that
    finish_on_load = False

    def __init__(self, scheme: Sparse24Scheme, layer_name: str):
        super().__init__(scheme, layer_name, "dense")
        self.tied = False
        self.loaded: set[str] = set()

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        vocab_loader = extra_weight_attrs["weight_loader"]

        def load_checked(param: torch.nn.Parameter, loaded: torch.Tensor, *args, **kwargs) -> None:
            # vLLM's vocab loader copies into the parameter's dtype: a float lm_head would be cast
            # into the code tensor unscaled, so dtype and shape are checked first
            name = WEIGHT if param is getattr(layer, WEIGHT, None) else SCALE
            dtypes = (self.grid.dtype,) if name == WEIGHT else SCALE_DTYPES
            shape = (layer.org_vocab_size, input_size if name == WEIGHT else 1)
            if loaded.dtype not in dtypes or tuple(loaded.shape) != shape:
                raise Sparse24FormatError(
                    f"{self.layer_name}.{name}: the checkpoint holds {loaded.dtype} {list(loaded.shape)}, expected "
                    f"{' or '.join(map(str, dtypes))} {list(shape)} (quantize_lm_head, {self.grid.name} scheme: "
                    "codes [vocab, hidden] + weight_scale [vocab, 1])"
                )
            vocab_loader(param, loaded, *args, **kwargs)
            self.loaded.add(name)

        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **{**extra_weight_attrs, "weight_loader": load_checked})

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        # the checkpoint has no lm_head tensors: the float embedding is quantized after loading
        del layer.weight_scale
        layer.weight = embed_tokens.weight
        self.tied = True
        return layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.tied:
            codes, scale = _quantize_rows(layer.weight.data, self.grid, self.layer_name)
            layer.weight = torch.nn.Parameter(codes, requires_grad=False)  # the embedding keeps its own
            layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        else:
            missing = sorted({WEIGHT, SCALE} - self.loaded)
            if missing:
                raise Sparse24FormatError(
                    f"{self.layer_name}: the checkpoint has no {', '.join(f'{self.layer_name}.{m}' for m in missing)}; "
                    "quantize_lm_head with untied embeddings needs both (vllm-sparse24 compress --quantize-lm-head "
                    "writes them)"
                )
        super().process_weights_after_loading(layer)


def _quantize_rows(weight: torch.Tensor, grid: Grid, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes + scales of a float [V, H] weight, a chunk of rows at a time (rows are independent)."""
    if not weight.is_floating_point() or weight.dtype == grid.dtype:
        raise Sparse24FormatError(f"{name}: tied to an embedding of dtype {weight.dtype}; expected a float "
                                  "embedding to quantize")
    parts = [quantize_weight_per_channel(weight[i : i + _ROWS_PER_CHUNK], grid)
             for i in range(0, weight.shape[0], _ROWS_PER_CHUNK)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])
