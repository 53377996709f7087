"""Per-architecture facts the tools walk a Hugging Face model by, one adapter per family, found by
``config.model_type``: the decoder-layer stack, the linears of a layer (in block order, grouped by
shared input: vLLM fuses each group into one layer), the modules that run before the first layer
(embeddings, rotary) and the norms. A new architecture is one entry in ``ARCHITECTURES`` and a
tiny-model test (tests/test_architectures.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# q/k/v share the attention input, gate/up the MLP input
ATTENTION_MLP: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
PRE_POST_NORMS = ("input_layernorm", "post_attention_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
SANDWICH_NORMS = (*PRE_POST_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")


class UnsupportedModelError(ValueError):
    """The model's architecture or layout is not one the offline tools handle."""


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # config.model_type values it covers
    layers: str = "model.layers"  # the decoder stack, an nn.ModuleList
    linear_groups: tuple[tuple[str, ...], ...] = ATTENTION_MLP  # names inside one decoder layer
    before_layers: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")  # run before layer 0
    layer_norms: tuple[str, ...] = PRE_POST_NORMS  # names inside one decoder layer
    final_norm: str = "model.norm"

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def fused_groups(self, num_layers: int) -> list[tuple[str, ...]]:
        """Full names of every group of linears that share one input, layer by layer in block order."""
        return [tuple(f"{self.layer_prefix(i)}.{n}" for n in g) for i in range(num_layers) for g in self.linear_groups]

    def linear_names(self, num_layers: int) -> list[str]:
        return [n for g in self.fused_groups(num_layers) for n in g]

    def norm_names(self, num_layers: int) -> list[str]:
        return [f"{self.layer_prefix(i)}.{n}" for i in range(num_layers) for n in self.layer_norms] + [self.final_norm]


LLAMA = Architecture("llama", ("llama", "mistral", "qwen2"))
QWEN3 = Architecture("qwen3", ("qwen3",), layer_norms=(*PRE_POST_NORMS, *QK_NORMS))
GEMMA2 = Architecture("gemma2", ("gemma2",), layer_norms=SANDWICH_NORMS)
GEMMA3 = Architecture("gemma3", ("gemma3_text",), layer_norms=(*SANDWICH_NORMS, *QK_NORMS))

ARCHITECTURES: dict[str, Architecture] = {t: a for a in (LLAMA, QWEN3, GEMMA2, GEMMA3) for t in a.model_types}


def architecture_of(config: Any) -> Architecture:
    """The adapter of a model config; UnsupportedModelError naming its model_type and the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        archs = getattr(config, "architectures", None)
        raise UnsupportedModelError(
            f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"offline compression supports {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]
