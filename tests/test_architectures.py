"""Architecture adapters (sparse24_tools/architectures.py) on tiny random models of every family
beyond Llama: the adapter's facts match the model, walking the decoder layers with the per-layer
arguments the capture records reproduces the model's own forward (Gemma's sliding and full
layers get different masks and rotary embeddings), and compress and eval run through them, and
block-wise recovery through Gemma 3's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sparse24_tools.architectures import ARCHITECTURES, architecture_of  # noqa: E402
from sparse24_tools.compress import compress  # noqa: E402
from sparse24_tools.compress_options import CompressOptions  # noqa: E402
from sparse24_tools.evaluate import load_for_eval  # noqa: E402
from sparse24_tools.model_walk import capture_layer0_inputs, decoder_layers, layer_forward  # noqa: E402
from vllm_sparse24 import checkpoint as ckpt  # noqa: E402

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256}
# sliding window shorter than the calibration windows, so sliding and full layers see different masks
CONFIGS = {
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
}


def _model(model_type: str, vocab: int):
    import transformers

    cls, extra = CONFIGS[model_type]
    cfg = getattr(transformers, cls)(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                     **SHAPE, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08 if "embed" not in name else 1.0)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    from vllm_sparse24.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp(request.param) / "dense"
    vocab = build_tokenizer(folder)
    model = _model(request.param, vocab)
    model.save_pretrained(folder)
    calib = folder.parent / "calib.txt"
    calib.write_text(" ".join(["the quick brown fox jumps over the lazy dog in the city of paris"] * 200))
    return request.param, folder, model, calib


def test_every_model_type_beyond_llama_has_a_tiny_model_here():
    assert set(ARCHITECTURES) - {"llama", "mistral", "qwen2"} == set(CONFIGS)


def test_the_adapter_names_the_models_linears_and_norms(tiny):
    model_type, _, model, _ = tiny
    arch = architecture_of(model.config)
    n = len(decoder_layers(model))
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    assert set(arch.linear_names(n)) == linears and len(linears) == 7 * n
    norms = {name for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    assert set(arch.norm_names(n)) == norms


@torch.no_grad()
def test_walking_the_layers_with_the_captured_arguments_is_the_models_forward(tiny):
    _, _, model, _ = tiny
    arch = architecture_of(model.config)
    ids = torch.randint(2, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    hidden, layer_kwargs = capture_layer0_inputs(model, [ids, ids], torch.device("cpu"))
    assert hidden.shape == (2, 40, 128) and len(layer_kwargs) == 2
    x = hidden[:1]
    for layer, kwargs in zip(decoder_layers(model), layer_kwargs, strict=True):
        x = layer_forward(layer, x, kwargs)
    want = model.get_submodule(arch.layers.rpartition(".")[0])(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(model.get_submodule(arch.final_norm)(x), want, rtol=1e-5, atol=1e-5)
    # the same with layer 0's arguments for every layer is not the model (where layers differ by type)
    if len(set(model.config.layer_types)) > 1:
        y = hidden[:1]
        for layer in decoder_layers(model):
            y = layer_forward(layer, y, layer_kwargs[0])
        assert not torch.allclose(model.get_submodule(arch.final_norm)(y), want, atol=1e-3)


def test_compress_eval_and_recovery_run_through_the_adapter(tiny, tmp_path):
    from sparse24_tools.recover import RecoverOptions, recover

    model_type, folder, model, calib = tiny
    opts = CompressOptions(method="sparsegpt", calib=str(calib), nsamples=4, seqlen=48, batch_size=2, progress=False)
    rep = compress(folder, tmp_path / "student", opts)
    linears = ckpt.read_checkpoint(tmp_path / "student").linears
    assert len(linears) == 14 and {q.kind for q in linears.values()} == {"sparse"}
    assert rep["totals"]["mean_rel_error_after"] < rep["totals"]["mean_rel_error_before"]
    evaluated, _ = load_for_eval(tmp_path / "student")
    assert evaluated.config.model_type == model_type
    for prefix, q in linears.items():
        torch.testing.assert_close(evaluated.get_submodule(prefix).weight, q.dequantized())
    if model_type != "gemma3_text":  # recovery walks the layers as the compressor does: one family suffices
        return
    rec = recover(folder, tmp_path / "student", tmp_path / "recovered", calib,
                  RecoverOptions(mode="blocks", tokens=2 * 2 * 32, seqlen=32, batch_size=2, block_pool_tokens=256,
                                 generate_tokens=0, max_minutes=None, train_extra=("norms",), device="cpu",
                                 progress=False))
    assert rec["train"]["layers"] == 2 and rec["linears"]["mask_unchanged"]
    recovered = ckpt.read_checkpoint(tmp_path / "recovered").linears
    assert all(torch.equal(recovered[p].mask, q.mask) for p, q in linears.items())
