"""The demo model: a tiny random Llama, pruned 2:4 by magnitude and quantized W8A8, written as
a sparse24 checkpoint in seconds and without downloads (``vllm-sparse24 demo``; the tests build
their models with it too). Real models go through ``vllm-sparse24 compress``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .quant import INT8, Grid, quantize_weight_per_channel
from .schema import Sparse24Scheme
from .sparsity import magnitude_24

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
_WORDS = (
    "the sparse model runs fast on tensor cores and every group of four weights keeps two "
    "values while int8 activations are quantized per token with one scale a row the quick "
    "brown fox jumps over the lazy dog in the city of paris which is the capital of france "
).split()


def build_tokenizer(folder: Path, vocab_size: int = 384) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    g = torch.Generator().manual_seed(0)
    text = [" ".join(_WORDS[i] for i in torch.randint(len(_WORDS), (40,), generator=g).tolist()) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def build_dense(folder: Path, *, hidden: int = 256, intermediate: int = 512, layers: int = 2, seed: int = 0):
    """Random dense Llama (float32) + tokenizer in ``folder``; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # larger weights than HF's init so the logits are not near-uniform
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08 if "embed" not in name else 1.0)
    return model


def compress_state(model, grid: Grid = INT8) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(sparse24 checkpoint tensors, dequantized dense weights by HF name) of ``model`` pruned
    2:4 by magnitude and quantized W8A8 on ``grid`` (int8 or fp8)."""
    tensors: dict[str, torch.Tensor] = {}
    dequant: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in LINEARS:
            w = magnitude_24(p, name=prefix)
            q, scale = quantize_weight_per_channel(w, grid)
            tensors.update(ckpt.layer_tensors(prefix, q, scale, sparse=True))
            dequant[name] = q.double() * scale.double()
        else:
            tensors[name] = p.detach().float().contiguous()
    return tensors, dequant


def copy_tokenizer(dense_dir: Path, out: Path) -> None:
    for f in dense_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)


def hf_config(model) -> dict:
    """The tiny model's config.json (float32, the rope_theta vLLM reads)."""
    cfg = model.config.to_dict()
    cfg["rope_theta"] = 10000.0
    cfg["torch_dtype"] = "float32"
    return cfg


def write_checkpoint(model, dense_dir: Path, out: Path, grid: Grid = INT8) -> dict[str, torch.Tensor]:
    """Write ``model`` compressed on ``grid`` as a checkpoint in ``out``, tokenizer copied from
    ``dense_dir``; returns the dequantized weights."""
    tensors, dequant = compress_state(model, grid)
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(dense_dir, out)
    ckpt.write_checkpoint(out, tensors, hf_config(model), Sparse24Scheme(quant=grid.name))
    return dequant
