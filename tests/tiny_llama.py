"""The tiny test model (built by vllm_sparse24.tiny) and its float64 reference forward."""

from __future__ import annotations

import torch

from vllm_sparse24.quant import fake_quant_per_token
from vllm_sparse24.tiny import (  # noqa: F401  (re-exported for the tests)
    LINEARS,
    build_dense,
    build_tokenizer,
    compress_state,
    legacy_quantization_config,
    write_checkpoint,
)


@torch.no_grad()
def reference_logprobs(model, dequant: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """float64 forward with the dequantized weights and per-token fake-quantized linear inputs;
    returns log p(token_i | tokens_<i) for i >= 1."""
    import copy

    ref = copy.deepcopy(model).double()
    state = ref.state_dict()
    for name, w in dequant.items():
        state[name].copy_(w)
    hooks = []
    for name, mod in ref.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            hooks.append(mod.register_forward_pre_hook(lambda m, args: (fake_quant_per_token(args[0]),)))
    ids = torch.tensor([token_ids])
    logits = ref(ids).logits[0].double()
    for h in hooks:
        h.remove()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
