"""The quantized lm_head (``quantize_lm_head``, ``compress --quantize-lm-head``): schema, vLLM's
ParallelLMHead with the plugin's method (vocab padding, tensor-parallel rows, tied embeddings, bad
tensors), and a tiny model, tied and untied, through the CPU engine and the offline evaluation
against a float64 reference of the same quantized weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LOGPROB_ATOL, run_engine
from safetensors.torch import load_file, save_file

from vllm_sparse24.checkpoint import CheckpointError, load_scheme, validate_checkpoint
from vllm_sparse24.format import Sparse24FormatError, unpack_24
from vllm_sparse24.quant import FP8, INT8, fake_quant_per_token, quantize_weight_per_channel
from vllm_sparse24.schema import Sparse24ConfigError, Sparse24Scheme

REPO = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 1000, 64  # vLLM pads the vocabulary to a multiple of 64: 1024 rows


# -- schema ---------------------------------------------------------------------------------------


def test_schema_round_trip_and_flag_off_writes_nothing_new():
    s = Sparse24Scheme(ignore=(), quantize_lm_head=True, quant="fp8")
    assert Sparse24Scheme.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.layer_kind("lm_head") == "dense"
    assert "quantize_lm_head" not in Sparse24Scheme().to_dict()
    assert Sparse24Scheme(ignore=()).layer_kind("model.layers.0.mlp.up_proj") == "sparse"


@pytest.mark.parametrize("change,match", [
    ({"quantize_lm_head": 1}, r"quantize_lm_head=1 must be true or false"),
    ({"quantize_lm_head": "true"}, r"quantize_lm_head='true' must be true or false"),
    ({"quantize_lm_head": True}, r"quantize_lm_head is true but ignore \['lm_head'\] leaves lm_head unquantized"),
])
def test_schema_errors_name_the_field(change, match):
    with pytest.raises(Sparse24ConfigError, match=match):
        Sparse24Scheme.from_dict(Sparse24Scheme().to_dict() | change)


# -- vLLM's ParallelLMHead with the plugin's method ----------------------------------------------


@pytest.fixture()
def tp(monkeypatch):
    """vLLM's tensor-parallel rank and size as the layer constructors see them, settable."""
    import vllm.model_executor.layers.vocab_parallel_embedding as vpe
    import vllm.model_executor.parameter as P
    from vllm.config import VllmConfig, set_current_vllm_config

    state = {"rank": 0, "size": 1}
    for mod in (vpe, P):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: state["rank"])
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: state["size"])
    with set_current_vllm_config(VllmConfig()):
        yield state


def _head(scheme: Sparse24Scheme, cls_name: str = "ParallelLMHead"):
    import vllm.model_executor.layers.vocab_parallel_embedding as vpe

    from vllm_sparse24.config import Sparse24Config

    return getattr(vpe, cls_name)(VOCAB, HIDDEN, params_dtype=torch.float32, quant_config=Sparse24Config(scheme),
                                  prefix="lm_head" if cls_name == "ParallelLMHead" else "model.embed_tokens")


def _load(head, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        param = getattr(head, name)
        param.weight_loader(param, t)


def _reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, grid) -> torch.Tensor:
    """float64 logits: the per-token fake-quantized input times the dequantized weight."""
    return fake_quant_per_token(x, grid).double() @ (codes.double() * scale.double()).t()


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("grid", [INT8, FP8], ids=["int8", "fp8"])
def test_head_rows_per_rank_padding_and_logits(tp, size, grid):
    torch.manual_seed(size)
    w = torch.randn(VOCAB, HIDDEN)
    codes, scale = quantize_weight_per_channel(w, grid)
    x = torch.randn(5, HIDDEN)
    ref = _reference(x, codes, scale, grid)
    rows = 1024 // size
    for rank in range(size):
        tp.update(rank=rank, size=size)
        head = _head(Sparse24Scheme(ignore=(), quant=grid.name, quantize_lm_head=True))
        assert type(head.quant_method).__name__ == "Sparse24LMHeadMethod"
        _load(head, {"weight": codes, "weight_scale": scale})
        real = min(VOCAB - rank * rows, rows)  # the last rank's rows past the vocabulary are padding
        # raw bytes: torch.equal has no float8 kernel on the CPU
        assert torch.equal(head.weight.data[:real].view(torch.uint8), codes[rank * rows:][:real].view(torch.uint8))
        assert not head.weight.data[real:].view(torch.uint8).any() and not head.weight_scale.data[real:].any()
        head.quant_method.process_weights_after_loading(head)
        logits = head.quant_method.apply(head, x).double()
        assert logits.shape == (5, rows)
        # float32 GEMM of exact products vs float64: rounding ~1e-7 of the largest term
        torch.testing.assert_close(logits[:, :real], ref[:, rank * rows:][:, :real], rtol=1e-5, atol=1e-4)
        assert not logits[:, real:].any()


def test_tied_head_quantizes_a_copy_and_the_embedding_stays_float(tp):
    scheme = Sparse24Scheme(ignore=(), quantize_lm_head=True)
    embed = _head(scheme, "VocabParallelEmbedding")
    assert type(embed.quant_method).__name__ == "UnquantizedEmbeddingMethod"
    w = torch.randn(VOCAB, HIDDEN)
    _load(embed, {"weight": w})
    head = _head(scheme).tie_weights(embed)
    head.quant_method.process_weights_after_loading(head)
    assert embed.weight.dtype == torch.float32 and torch.equal(embed.weight.data[:VOCAB], w)
    codes, scale = quantize_weight_per_channel(w)
    x = torch.randn(3, HIDDEN)
    logits = head.quant_method.apply(head, x).double()
    torch.testing.assert_close(logits[:, :VOCAB], _reference(x, codes, scale, INT8), rtol=1e-5, atol=1e-4)
    assert torch.equal(embed(torch.tensor([3, 999])), w[[3, 999]])  # the gather reads the float weight


def test_flag_off_gives_vllm_float_head(tp):
    assert type(_head(Sparse24Scheme()).quant_method).__name__ == "UnquantizedEmbeddingMethod"


@pytest.mark.parametrize("tensors,match", [
    ({"weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16)},
     r"lm_head\.weight: the checkpoint holds torch\.bfloat16 \[1000, 64\], expected torch\.int8 \[1000, 64\]"),
    ({"weight": torch.zeros(VOCAB, HIDDEN + 8, dtype=torch.int8)},
     r"lm_head\.weight: the checkpoint holds torch\.int8 \[1000, 72\], expected torch\.int8 \[1000, 64\]"),
    ({"weight_scale": torch.ones(VOCAB)}, r"lm_head\.weight_scale: the checkpoint holds torch\.float32 \[1000\], "
                                          r"expected .* \[1000, 1\]"),
])
def test_bad_head_tensor_is_refused_naming_it(tp, tensors, match):
    head = _head(Sparse24Scheme(ignore=(), quantize_lm_head=True))
    with pytest.raises(Sparse24FormatError, match=match):
        _load(head, tensors)


def test_missing_head_tensors_are_named(tp):
    head = _head(Sparse24Scheme(ignore=(), quantize_lm_head=True))
    _load(head, {"weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.int8)})
    with pytest.raises(Sparse24FormatError, match=r"lm_head: the checkpoint has no lm_head\.weight_scale"):
        head.quant_method.process_weights_after_loading(head)


# -- checkpoint headers ---------------------------------------------------------------------------


def test_float_lm_head_under_the_flag_is_refused_naming_it(tiny, tmp_path):
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(tiny.sparse24_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] |= {"ignore": [], "quantize_lm_head": True}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'lm_head\.weight' has dtype torch\.float32, "
                                              r"but quantization_config\.quantize_lm_head asks for torch\.int8 codes"):
        validate_checkpoint(out, load_scheme(out))
    tensors = load_file(out / "model.safetensors")
    codes, scale = quantize_weight_per_channel(tensors["lm_head.weight"])
    tensors |= {"lm_head.weight": codes, "lm_head.weight_scale": scale}
    save_file(tensors, str(out / "model.safetensors"))
    assert validate_checkpoint(out, load_scheme(out))["lm_head"] == "dense"


# -- a tiny model, compressed with --quantize-lm-head, in the engine and offline -----------------


def _dense_model(folder: Path, tied: bool):
    import tiny_llama as tl

    model = tl.build_dense(folder, hidden=128, intermediate=256, layers=2)
    if tied:
        with torch.no_grad():  # a smaller embedding keeps the tied logits from saturating the softmax
            model.model.embed_tokens.weight.mul_(0.3)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(cfg))
    return model


def _dequantized(folder: Path, tied: bool) -> dict[str, torch.Tensor]:
    """float64 weights of every quantized layer of a checkpoint, lm_head included (a tied one: the
    embedding rounded per row, as the plugin does at load)."""
    t = load_file(folder / "model.safetensors")
    out = {}
    for key in t:
        prefix, _, suffix = key.rpartition(".")
        if suffix == "weight_packed":
            codes = unpack_24(t[key], t[f"{prefix}.weight_bitmask"], name=prefix)
        elif suffix == "weight" and t[key].dtype == torch.int8:
            codes = t[key]
        else:
            continue
        out[f"{prefix}.weight"] = codes.double() * t[f"{prefix}.weight_scale"].double()
    if tied:
        codes, scale = quantize_weight_per_channel(t["model.embed_tokens.weight"])
        out["lm_head.weight"] = codes.double() * scale.double()
    return out


@pytest.fixture(scope="module", params=["untied", "tied"])
def lmq(request, tmp_path_factory):
    import tiny_llama as tl

    tied = request.param == "tied"
    root = tmp_path_factory.mktemp(f"lmq-{request.param}")
    model = _dense_model(root / "dense", tied)
    out = root / "lmq"
    subprocess.run([sys.executable, "-m", "sparse24_tools", "compress", "--model", str(root / "dense"),
                    "--out", str(out), "--method", "magnitude", "--quantize-lm-head", "--device", "cpu"],
                   check=True, cwd=REPO, timeout=600)
    ids = list(range(2, 40))
    dequant = _dequantized(out, tied)
    ref = tl.reference_logprobs(model, dequant, ids)
    float_head = tl.reference_logprobs(model, {k: v for k, v in dequant.items() if k != "lm_head.weight"}, ids)
    return {"tied": tied, "out": out, "ids": ids, "ref": ref, "float_head_ref": float_head}


def test_checkpoint_holds_the_quantized_head(lmq):
    cfg = json.loads((lmq["out"] / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quantize_lm_head"] is True and "lm_head" not in q["ignore"]
    assert cfg.get("tie_word_embeddings", False) is lmq["tied"]
    t = load_file(lmq["out"] / "model.safetensors")
    if lmq["tied"]:
        assert not any(k.startswith("lm_head.") for k in t)
        assert t["model.embed_tokens.weight"].dtype == torch.float32
    else:
        assert t["lm_head.weight"].dtype == torch.int8 and t["lm_head.weight_scale"].shape == (t["lm_head.weight"].shape[0], 1)
    report = json.loads((lmq["out"] / "compress_report.json").read_text())
    assert report["lm_head"]["tied"] is lmq["tied"] and report["lm_head"]["kind"] == "dense"
    # the check below can fail: a float lm_head moves the logprobs well past the tolerance
    assert (lmq["float_head_ref"] - lmq["ref"]).abs().max() > 10 * LOGPROB_ATOL


def test_offline_eval_matches_reference(lmq):
    from sparse24_tools.evaluate import load_for_eval

    model, _ = load_for_eval(lmq["out"])
    ids = lmq["ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    got = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert (got - lmq["ref"]).abs().max() < LOGPROB_ATOL


@pytest.mark.engine
def test_engine_matches_reference(lmq, tmp_path):
    result, _ = run_engine(lmq["out"], tmp_path / "r.json", lmq["ids"], "--quantization", "sparse24")
    got = torch.tensor(result["prompt_logprobs"], dtype=torch.float64)
    diff = (got - lmq["ref"]).abs().max().item()
    print(f"{'tied' if lmq['tied'] else 'untied'}: max |logprob - float64 reference| = {diff:.2e}")
    assert diff < LOGPROB_ATOL


def test_flag_off_leaves_lm_head_as_before(tmp_path):
    from sparse24_tools.compress import compress
    from sparse24_tools.compress_options import CompressOptions

    model_dir = tmp_path / "dense"
    model = _dense_model(model_dir, tied=False)
    for flag in (False, True):
        compress(model_dir, tmp_path / str(flag), CompressOptions(method="magnitude", dtype="bfloat16",
                                                                  quantize_lm_head=flag, progress=False))
    off, on = (load_file(tmp_path / str(flag) / "model.safetensors") for flag in (False, True))
    assert torch.equal(off["lm_head.weight"], model.lm_head.weight.detach().bfloat16())
    assert "lm_head.weight_scale" not in off
    cfg = json.loads((tmp_path / "False" / "config.json").read_text())["quantization_config"]
    assert cfg == Sparse24Scheme().to_dict()
    assert on["lm_head.weight"].dtype == torch.int8
    assert {k: v for k, v in off.items() if not k.startswith("lm_head.")}.keys() == \
        {k for k in on if not k.startswith("lm_head.")}
    assert all(torch.equal(off[k], on[k]) for k in off if not k.startswith("lm_head."))
