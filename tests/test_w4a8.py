"""The w4a8 scheme on CPU (2:4 int4 weights with a float scale per channel and a uint8 scale per
group of 128 along K; int8 activations per token): the two-level grid against float64, the exact
int4 -> int8 step, the checkpoint format and its load errors, the reference kernel and its
resident size, the compressor, recover on the int4 grid, and the tiny model through vLLM's CPU engine
against ``offline eval``."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import LOGPROB_ATOL, run_engine  # noqa: E402

from sparse24_tools.compress_options import CompressError, CompressOptions  # noqa: E402
from sparse24_tools.prune import METHODS, round_to_nearest  # noqa: E402
from sparse24_tools.prune.sparsegpt import prune as sparsegpt_prune  # noqa: E402
from vllm_sparse24 import checkpoint as ckpt  # noqa: E402
from vllm_sparse24 import format as fmt  # noqa: E402
from vllm_sparse24.kernels import LinearLayer, TorchW8A8Kernel, choose_kernel  # noqa: E402
from vllm_sparse24.kernels.base import Int4Weight24  # noqa: E402
from vllm_sparse24.kernels.torch_ref import TorchW4A8Kernel  # noqa: E402
from vllm_sparse24.quant import (  # noqa: E402
    GROUP_SCALE_MAX,
    GROUP_SIZE,
    INT8,
    W4A8,
    expand_group_scale,
    quantize_per_token,
)
from vllm_sparse24.schema import Sparse24ConfigError, Sparse24Scheme  # noqa: E402
from vllm_sparse24.sparsity import magnitude_24  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PREFIX = "model.layers.0.mlp.down_proj"
# float32 engine vs float32 transformers eval of the same dequantized weights (the int8 scheme's bound)


def int4_of(codes: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The int4 values of w4a8 int8 codes (exact division; the caller checks divisibility)."""
    return (codes.to(torch.int64) // expand_group_scale(group_scale, codes.shape[1]).to(torch.int64)).to(torch.int8)


def random_w4a8(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes 2:4, scale [N, 1], group scales, the 2:4 float weight) of a random weight."""
    g = torch.Generator().manual_seed(seed)
    w = magnitude_24(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    codes, scale, group_scale = W4A8.quantize(w)
    return codes, scale, group_scale, w


# -- the two-level grid ------------------------------------------------------------------------


def test_two_level_grid_against_float64():
    codes, scale, group_scale, w = random_w4a8(48, 320)  # 320 = 2.5 groups: the last one partial
    assert group_scale.dtype == torch.uint8 and group_scale.shape == (48, 3)
    ref_scale = w.double().abs().amax(1, keepdim=True) / 126
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    assert int(group_scale.min()) >= 1 and int(group_scale.max()) <= GROUP_SCALE_MAX
    g = expand_group_scale(group_scale, 320).double()
    step = (scale.float() * g.float()).double()  # the grid's step is a float32 product
    values = torch.round(w.double() / step).clamp(-7, 7)
    assert torch.equal(codes.double(), values * g)  # int8 code = int4 value x group scale
    assert int(codes.abs().max()) <= 126
    # every group's scale has the least squared error of the 18 candidates (float64)
    wg = torch.nn.functional.pad(w.double(), (0, 64)).reshape(48, 3, GROUP_SIZE)
    errors = []
    for cand in range(1, GROUP_SCALE_MAX + 1):
        st = (scale.float() * cand).double().unsqueeze(-1)
        errors.append(((wg - torch.round(wg / st).clamp(-7, 7) * st) ** 2).sum(-1))
    errors = torch.stack(errors, -1)
    chosen = errors.gather(-1, group_scale.long().unsqueeze(-1) - 1).squeeze(-1)
    # (float32 in the grid, float64 here: a near-tie may go either way)
    assert torch.all(chosen <= errors.min(-1).values * (1 + 1e-5) + 1e-30)


def test_int4_to_int8_is_exact_integer_arithmetic():
    v = torch.arange(-7, 8, dtype=torch.int8).repeat(GROUP_SCALE_MAX, 1)  # [18, 15]: every int4 value
    g = torch.arange(1, GROUP_SCALE_MAX + 1, dtype=torch.uint8).reshape(-1, 1)  # one group per row
    codes = fmt.int4_to_int8(v, g)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.to(torch.int64), v.to(torch.int64) * g.to(torch.int64))
    assert int(codes.abs().max()) == 7 * GROUP_SCALE_MAX <= 127


def test_nibble_order_is_low_nibble_first_twos_complement():
    # one row, two groups of 4: kept (col 1: -3, col 2: 5) and (col 4: 7, col 7: -7)
    values = torch.tensor([[0, -3, 5, 0, 7, 0, 0, -7]], dtype=torch.int8)
    packed, bitmask = fmt.pack_int4_24(values, values != 0)
    assert packed.tolist() == [[0x5D, 0x97]]  # -3 = 0xD low, 5 high; 7 low, -7 = 0x9 high
    assert bitmask.tolist() == [[0b10010110]]
    back, mask = fmt.unpack_int4_24(packed, bitmask)
    assert torch.equal(back, values) and torch.equal(mask, values != 0)


# -- the checkpoint format ------------------------------------------------------------------------


def write_layer(folder: Path, codes, scale, group_scale) -> Path:
    tensors = ckpt.layer_tensors(PREFIX, codes, scale, sparse=True, group_scale=group_scale)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_checkpoint(folder, tensors, {"model_type": "llama"}, Sparse24Scheme(quant="w4a8"))
    return folder


@pytest.fixture(scope="module")
def layer_dir(tmp_path_factory):
    codes, scale, group_scale, _ = random_w4a8(64, 320)
    return write_layer(tmp_path_factory.mktemp("w4a8") / "ckpt", codes, scale, group_scale), codes, scale, group_scale


def test_checkpoint_round_trip_against_float64(layer_dir):
    folder, codes, scale, group_scale = layer_dir
    stored = load_file(folder / "model.safetensors")
    packed = stored[f"{PREFIX}.weight_packed"]
    assert packed.dtype == torch.uint8 and packed.shape == (64, 80)
    assert stored[f"{PREFIX}.weight_group_scale"].shape == (64, 3) and stored[f"{PREFIX}.weight_scale"].shape == (64, 1)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["weights"]["num_bits"] == 4
    read = ckpt.read_checkpoint(folder)
    layer = read.linears[PREFIX]
    assert read.scheme.quant == "w4a8" and torch.equal(layer.codes, codes) and torch.equal(layer.group_scale, group_scale)
    # float64 reference from the stored bytes alone: nibbles, bitmask, scales
    kept = packed.to(torch.int64)
    nibbles = torch.stack((kept & 0xF, kept >> 4), -1).reshape(64, -1)
    nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles).double()
    bits = (stored[f"{PREFIX}.weight_bitmask"].to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1
    mask = bits.reshape(64, -1).bool()
    dense = torch.zeros(64, 320, dtype=torch.float64)
    dense[mask] = nibbles.reshape(-1)
    ref = dense * expand_group_scale(stored[f"{PREFIX}.weight_group_scale"], 320).double() * scale.double()
    torch.testing.assert_close(layer.dequantized().double(), ref, rtol=1e-7, atol=0)


@pytest.mark.parametrize("bad,match", [
    (0, r"row 3, columns 128\.\.255 have group scale 0; expected 1\.\.18"),
    (19, r"row 3, columns 128\.\.255 have group scale 19; expected 1\.\.18"),
])
def test_bad_group_scale_is_named_on_load(layer_dir, tmp_path, bad, match):
    folder = copy_with(layer_dir[0], tmp_path / "c", lambda t: t[f"{PREFIX}.weight_group_scale"].__setitem__((3, 1), bad))
    with pytest.raises(ckpt.CheckpointError, match=rf"model\.safetensors: {PREFIX}\.weight_group_scale: {match}"):
        ckpt.read_checkpoint(folder)


def test_24_violation_and_minus_8_are_named_on_load(layer_dir, tmp_path):
    flipped = copy_with(layer_dir[0], tmp_path / "a", lambda t: t[f"{PREFIX}.weight_bitmask"][5].__ixor__(
        torch.tensor([1] + [0] * 39, dtype=torch.uint8)))
    with pytest.raises(ckpt.CheckpointError, match=rf"model\.safetensors: {PREFIX}\.weight_packed .*bitmask row 5, "
                       r"columns 0\.\.3 has [13] bits set"):
        ckpt.read_checkpoint(flipped)
    minus8 = copy_with(layer_dir[0], tmp_path / "b", lambda t: t[f"{PREFIX}.weight_packed"][2].__setitem__(
        7, 0x80 | (int(t[f"{PREFIX}.weight_packed"][2, 7]) & 0xF)))
    with pytest.raises(ckpt.CheckpointError, match=r"row 2, byte 7 \(high nibble, columns 28\.\.31\) holds 0x8"):
        ckpt.read_checkpoint(minus8)


def test_header_errors_name_the_tensor_and_what_was_expected(layer_dir, tmp_path):
    as_int8 = copy_with(layer_dir[0], tmp_path / "a", lambda t: t.__setitem__(
        f"{PREFIX}.weight_packed", t[f"{PREFIX}.weight_packed"].view(torch.int8)))
    with pytest.raises(ckpt.CheckpointError, match=rf"'{PREFIX}\.weight_packed' has dtype torch\.int8, expected "
                       r"torch\.uint8 \(the w4a8 scheme stores two int4 values per byte"):
        ckpt.validate_checkpoint(as_int8, Sparse24Scheme(quant="w4a8"))
    missing = copy_with(layer_dir[0], tmp_path / "b", lambda t: t.pop(f"{PREFIX}.weight_group_scale"))
    with pytest.raises(ckpt.CheckpointError, match=rf"missing tensor '{PREFIX}\.weight_group_scale' \(expected dtype "
                       r"torch\.uint8, shape \[64, 3\]"):
        ckpt.validate_checkpoint(missing, Sparse24Scheme(quant="w4a8"))
    # the same tensors under an int8 quantization_config
    with pytest.raises(ckpt.CheckpointError, match=r"weight_packed' has dtype torch\.uint8, expected torch\.int8"):
        ckpt.validate_checkpoint(layer_dir[0], Sparse24Scheme())


def copy_with(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_writer_refuses_codes_off_the_two_level_grid():
    codes, scale, group_scale, _ = random_w4a8(8, 128)
    odd = group_scale.clone()
    g = int(odd[0, 0])  # g + 1 (or 17 for 18) divides no non-zero int4 value x g of row 0
    odd[0, 0] = g + 1 if g < GROUP_SCALE_MAX else GROUP_SCALE_MAX - 1
    with pytest.raises(fmt.Sparse24FormatError, match=r"is not a multiple of its group scale"):
        ckpt.layer_tensors(PREFIX, codes, scale, sparse=True, group_scale=odd)


def test_scheme_config_round_trip_and_errors(monkeypatch):
    s = Sparse24Scheme.from_dict(Sparse24Scheme(quant="w4a8").to_dict())
    assert s.quant == "w4a8" and s.int4 and s.grid == INT8 and s.sparse_weight_grid == W4A8
    cfg = Sparse24Scheme(quant="w4a8").to_dict()
    with pytest.raises(Sparse24ConfigError, match=r"group_size=64 is not supported; sparse24 runs group_size=128 "
                       r"\(weights of the w4a8 scheme"):
        Sparse24Scheme.from_dict(cfg | {"weights": cfg["weights"] | {"group_size": 64}})
    with pytest.raises(Sparse24ConfigError, match="mixes schemes"):
        Sparse24Scheme.from_dict(cfg | {"input_activations": cfg["input_activations"] | {"type": "float"}})
    from vllm_sparse24.config import LOAD_SCHEME_ENV, load_scheme_from_env

    monkeypatch.setenv(LOAD_SCHEME_ENV, "w4a8")
    with pytest.raises(Sparse24ConfigError, match=r"VLLM_SPARSE24_LOAD_SCHEME='w4a8': choose one of \['fp8', 'int8'\]"):
        load_scheme_from_env()


# -- the reference kernel and the dispatch ---------------------------------------------------------


def test_reference_kernel_is_the_int8_kernel_on_the_same_codes_and_float64():
    n, k = 96, 320
    codes, scale, group_scale, _ = random_w4a8(n, k, seed=1)
    values, bitmask = fmt.pack_int4_24(int4_of(codes, group_scale), fmt.mask_24(codes))
    layer = LinearLayer("l0", n, k, True, torch.float32, int4=True)
    assert choose_kernel(layer) is TorchW4A8Kernel
    assert choose_kernel(LinearLayer("l1", n, k, True, torch.float32)) is TorchW8A8Kernel
    w4 = TorchW4A8Kernel(layer)
    resident = w4.prepare_int4(Int4Weight24(values, bitmask, group_scale), scale)
    assert "weight_int" not in resident  # no float copy of the weight stays resident
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    out = w4.apply(resident, x, bias)
    int8 = TorchW8A8Kernel(LinearLayer("l1", n, k, True, torch.float32))
    assert torch.equal(out, int8.apply(int8.prepare(codes, scale), x, bias))
    xq, xs = quantize_per_token(x)
    ref = (xq.double() @ codes.double().T) * xs.double() * scale.double().T + bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_w4a8_custom_op_compiles_fullgraph():
    n, k = 64, 256
    codes, scale, group_scale, _ = random_w4a8(n, k, seed=7)
    values, bitmask = fmt.pack_int4_24(int4_of(codes, group_scale), fmt.mask_24(codes))
    kern = TorchW4A8Kernel(LinearLayer("l", n, k, True, torch.float32, int4=True))
    tensors = kern.prepare_int4(Int4Weight24(values, bitmask, group_scale), scale)
    fn = torch.compile(lambda x: kern.apply(tensors, x, None), fullgraph=True, backend="eager", dynamic=True)
    for m in (1, 5, 33):
        x = torch.randn(m, k)
        assert torch.equal(fn(x), kern.apply(tensors, x, None))


def test_resident_bytes_per_weight_at_a_real_shape():
    n, k = 576, 1536  # SmolLM2-135M's down_proj
    codes, scale, group_scale, _ = random_w4a8(n, k, seed=4)
    values, bitmask = fmt.pack_int4_24(int4_of(codes, group_scale), fmt.mask_24(codes))
    kern = TorchW4A8Kernel(LinearLayer("down", n, k, True, torch.float32, int4=True))
    resident = kern.prepare_int4(Int4Weight24(values, bitmask, group_scale), scale)
    per_weight = sum(t.numel() * t.element_size() for t in resident.values()) / (n * k)
    assert per_weight == pytest.approx(0.25 + 0.125 + 1 / 128 + 4 / k)
    assert per_weight <= 0.40


def load_in_linear_method(n: int, k: int, tensors: dict[str, torch.Tensor]):
    """A w4a8 2:4 layer loaded by the plugin's linear method as vLLM's loader drives it (every
    tensor through its parameter's loader; the last one finishes the layer)."""
    from vllm_sparse24.linear_method import Sparse24LinearMethod

    method = Sparse24LinearMethod(Sparse24Scheme(quant="w4a8"), PREFIX, "sparse")
    layer = torch.nn.Module()
    method.create_weights(layer, k, [n], k, n, torch.float32, weight_loader=lambda p, w, *a: p.data.copy_(w))
    for name, t in tensors.items():
        param = getattr(layer, name.rpartition(".")[2])
        param.weight_loader(param, t)
    return method, layer


def test_linear_method_names_a_bad_group_scale_and_a_24_violation_on_load(monkeypatch):
    import vllm.model_executor.parameter as P

    # one tensor-parallel rank, without starting vLLM's distributed state
    monkeypatch.setattr(P, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(P, "get_tensor_model_parallel_world_size", lambda: 1)
    n, k = 64, 320
    codes, scale, group_scale, _ = random_w4a8(n, k, seed=8)
    tensors = ckpt.layer_tensors(PREFIX, codes, scale, sparse=True, group_scale=group_scale)
    method, layer = load_in_linear_method(n, k, tensors)
    assert isinstance(method.kernel, TorchW4A8Kernel)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9))
    int8 = TorchW8A8Kernel(LinearLayer("l1", n, k, True, torch.float32))
    assert torch.equal(method.apply(layer, x), int8.apply(int8.prepare(codes, scale), x, None))

    bad_group = dict(tensors)
    bad_group[f"{PREFIX}.weight_group_scale"] = group_scale.clone()
    bad_group[f"{PREFIX}.weight_group_scale"][7, 2] = 0
    with pytest.raises(fmt.Sparse24FormatError, match=rf"{PREFIX}\.weight_group_scale: row 7, columns 256\.\.319 "
                       r"have group scale 0; expected 1\.\.18"):
        load_in_linear_method(n, k, bad_group)
    flipped = dict(tensors)
    flipped[f"{PREFIX}.weight_bitmask"] = tensors[f"{PREFIX}.weight_bitmask"].clone()
    flipped[f"{PREFIX}.weight_bitmask"][9, 3] ^= 0b10000
    with pytest.raises(fmt.Sparse24FormatError, match=rf"{PREFIX}: bitmask row 9, columns 28\.\.31 has [13] bits set"):
        load_in_linear_method(n, k, flipped)


def test_a_kernel_that_takes_int8_codes_gets_them_from_the_checked_int4_weight(monkeypatch):
    """The linear method makes a w4a8 layer's [N, K] int8 codes only for a kernel without
    int4_resident, after the kernel is chosen."""
    import vllm.model_executor.parameter as P

    from vllm_sparse24.kernels import dispatch

    monkeypatch.setattr(P, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(P, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(dispatch, "PORTABLE", (TorchW8A8Kernel,))
    n, k = 64, 256
    codes, scale, group_scale, _ = random_w4a8(n, k, seed=5)
    method, layer = load_in_linear_method(n, k, ckpt.layer_tensors(PREFIX, codes, scale, sparse=True,
                                                                   group_scale=group_scale))
    assert isinstance(method.kernel, TorchW8A8Kernel) and method._int4_weight is None
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(6))
    int8 = TorchW8A8Kernel(LinearLayer("l1", n, k, True, torch.float32))
    assert torch.equal(method.apply(layer, x), int8.apply(int8.prepare(codes, scale), x, None))


# -- the compressor ------------------------------------------------------------------------------


def on_two_level_grid(codes: torch.Tensor, group_scale: torch.Tensor) -> bool:
    g = expand_group_scale(group_scale, codes.shape[1]).to(torch.int16)
    v = codes.to(torch.int16)
    return bool((v % g == 0).all() and ((v // g).abs() <= 7).all() and fmt.is_24(codes))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_method_writes_the_two_level_grid(method):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=g)
    x = torch.randn(512, 256, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    p = METHODS[method].function()(w, h, W4A8, CompressOptions(method=method), "l0")
    assert p.codes.dtype == torch.int8 and p.group_scale.shape == (32, 2) and on_two_level_grid(p.codes, p.group_scale)


def test_sparsegpt_joint_rounds_to_the_int4_grid_inside_the_obs_loop():
    """On a weight that is already 2:4 pruning costs nothing, so what joint gains over
    prune-then-round is the OBS compensation of the int4 rounding (GPTQ), large on correlated
    inputs (low rank plus noise, as LLM activations are): measured 0.052 against 0.082."""
    g = torch.Generator().manual_seed(6)
    w = magnitude_24(torch.randn(64, 384, generator=g))
    x = torch.randn(1024, 48, generator=g) @ torch.randn(48, 384, generator=g) + 0.3 * torch.randn(1024, 384, generator=g)
    h = 2 * x.T @ x / x.shape[0]

    def output_error(p) -> float:
        d = (w - p.codes.float() * p.scale).double()
        return float((torch.trace(d @ h.double() @ d.T) / torch.trace(w.double() @ h.double() @ w.double().T)).sqrt())

    joint = sparsegpt_prune(w, h, W4A8, CompressOptions(joint=True), "l0")
    rtn = round_to_nearest(w, W4A8)
    assert joint.label == "sparsegpt-joint" and on_two_level_grid(joint.codes, joint.group_scale)
    print(f"output error: joint {output_error(joint):.4f}, round to nearest {output_error(rtn):.4f}")
    assert output_error(joint) < 0.8 * output_error(rtn)


def test_dense_w8a8_export_refuses_w4a8():
    with pytest.raises(CompressError, match="--export dense-w8a8 writes 8-bit layers"):
        CompressOptions(scheme="w4a8", export="dense-w8a8").validate()


# -- compress, recover, and the CPU engine against offline eval ------------------------------------

@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The tiny model through ``vllm-sparse24 compress --scheme w4a8`` (SparseGPT-joint)."""
    import tiny_llama as tl

    from sparse24_tools import cli

    root = tmp_path_factory.mktemp("w4a8c")
    dense = root / "dense"
    model = tl.build_dense(dense, hidden=128, intermediate=256, layers=2)
    model.save_pretrained(dense)
    calib = root / "calib.txt"
    calib.write_text("the sparse model keeps two of every four weights and the quick brown fox " * 300)
    out = root / "w4a8"
    assert cli.main(["compress", "--model", str(dense), "--out", str(out), "--scheme", "w4a8", "--calib", str(calib),
                     "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--no-progress",
                     "--dense-layers", r"model\.layers\.1\.mlp\.down_proj"]) == 0
    return out


def test_compress_cli_writes_the_w4a8_scheme(compressed):
    report = json.loads((compressed / "compress_report.json").read_text())
    assert report["scheme"] == "w4a8" and report["totals"]["sparse"] == 13 and report["totals"]["dense"] == 1
    assert {r["method"] for r in report["linears"].values() if r["kind"] == "sparse"} == {"sparsegpt-joint"}
    read = ckpt.read_checkpoint(compressed)
    for prefix, layer in read.linears.items():
        if layer.kind == "sparse":
            assert layer.group_scale is not None and on_two_level_grid(layer.codes, layer.group_scale), prefix
        else:  # dense layers of a w4a8 checkpoint are int8 per channel
            assert layer.group_scale is None and layer.codes.dtype == torch.int8, prefix


# 30 steps of 4 x 64 tokens at the lr a tiny random model needs to move; no time budget
RECOVER = {"tokens": 30 * 4 * 64, "seqlen": 64, "batch_size": 4, "lr": 1e-3, "eval_every": 10, "eval_windows": 4,
           "eval_seqlen": 64, "generate_tokens": 192, "gen_prompt_len": 16, "gen_batch_size": 4, "loss": "kl",
           "max_minutes": None, "device": "cpu", "progress": False}
# float32 recover evaluation vs float32 offline eval of the written checkpoint (as test_tools_recover.py)
PPL_RTOL = 1e-4


def test_recover_trains_a_w4a8_student_on_its_grid_and_writes_what_it_evaluated(compressed, tmp_path):
    """``compressed`` for its dense teacher."""
    from sparse24_tools.compress import compress
    from sparse24_tools.evaluate import load_for_eval, perplexity
    from sparse24_tools.recover import RecoverOptions, recover

    words = "the sparse model keeps two of every four weights and the quick brown fox jumps".split()
    g = torch.Generator().manual_seed(5)
    calib, ev = tmp_path / "calib.txt", tmp_path / "eval.txt"  # the same words, other random orders
    for path, n in ((calib, 3000), (ev, 1500)):
        path.write_text(" ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist()))
    # a magnitude-pruned student (round to nearest on the int4 grid): far enough from the teacher to
    # leave the training something to recover in 30 steps
    dense, student, out = compressed.parent / "dense", tmp_path / "student", tmp_path / "recovered"
    compress(dense, student, CompressOptions(method="magnitude", scheme="w4a8", calib=calib, nsamples=4, seqlen=64,
                                             dense_layers=(r"model\.layers\.1\.mlp\.down_proj",), progress=False))
    rep = recover(dense, student, out, calib, RecoverOptions(**RECOVER, eval_text=str(ev)))
    kl = [r["kl"] for r in rep["loss_curve"]]
    assert len(kl) == 30 and sum(kl[-5:]) / 5 < 0.7 * kl[0], kl
    # closer to the teacher on text it did not train on (a random tiny teacher: KL, not perplexity)
    assert rep["evals"][-1]["kl"] < 0.8 * rep["evals"][0]["kl"], [e["kl"] for e in rep["evals"]]

    before, after = ckpt.read_checkpoint(student), ckpt.read_checkpoint(out)  # validated on load
    assert after.scheme.quant == "w4a8" and after.linears.keys() == before.linears.keys()
    moved = 0
    for prefix, b in before.linears.items():
        a = after.linears[prefix]
        assert a.kind == b.kind, prefix
        if a.kind == "dense":  # int8 per channel as an int8 student's: its scale widens where a row outgrows it
            assert a.group_scale is None and a.codes.dtype == torch.int8 and bool((a.scale >= b.scale).all()), prefix
            continue
        assert torch.equal(a.scale, b.scale), prefix  # the int4 grid's scales are frozen
        assert torch.equal(a.mask, b.mask) and torch.equal(a.group_scale, b.group_scale), prefix
        assert on_two_level_grid(a.codes, a.group_scale) and not bool(a.codes[~a.mask].any()), prefix
        moved += int((a.codes != b.codes).sum())
    assert moved > 0
    # what recover evaluated (its fake-quant forward) is what the written checkpoint computes, and
    # training started from exactly the student
    for folder, want in ((out, rep["final_eval"]["perplexity"]), (student, rep["evals"][0]["perplexity"])):
        model, tok = load_for_eval(folder)
        got = perplexity(model, tok, ev, seqlen=64, windows=4, progress=False)["perplexity"]
        assert got == pytest.approx(want, rel=PPL_RTOL), folder


@pytest.mark.engine
def test_w4a8_tiny_model_in_the_plugin_matches_offline_eval(compressed, tmp_path):
    ids = list(range(2, 40))
    got, proc = run_engine(compressed, tmp_path / "engine.json", ids, "--quantization", "sparse24")
    assert len(got["completion_ids"]) > 0
    # the resident size printed at load: int4 values, bitmask, group and channel scales, nothing else
    printed = dict(re.findall(r"sparse24: \S+ \[(\d+, \d+)\] \(w4a8 2:4, kernel torch_w4a8\): resident ([\d.]+) "
                              r"bytes per weight", proc.stdout))
    assert printed, proc.stdout[-3000:]
    for shape, per_weight in printed.items():
        k = int(shape.split(", ")[1])
        assert float(per_weight) == pytest.approx(0.25 + 0.125 + 1 / 128 + 4 / k, abs=1e-3), shape

    from sparse24_tools.evaluate import load_for_eval

    ev, _ = load_for_eval(compressed)
    with torch.no_grad():
        lp = torch.log_softmax(ev(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    ref = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    diff = (torch.tensor(got["prompt_logprobs"], dtype=torch.float64) - ref).abs().max()
    assert diff < LOGPROB_ATOL, f"plugin vs offline eval: max |logprob diff| {diff}"


def test_cuda_kernel_keeps_the_int4_values_of_the_compressed_codes(monkeypatch):
    """CutlassSparse24Kernel.prepare_int4 without a GPU (the library's compressor and the plan
    stubbed: the compressor by its transcription in test_decode_layout): the int4 layout holds
    value j of every compressed row (CUTLASS's order, its metadata unchanged) divided by its group
    scale, the plan is an int4 plan on those tensors, and the layer keeps <= 0.40 bytes per weight."""
    import numpy as np
    from test_decode_layout import compress_like_cutlass

    from vllm_sparse24.kernels.cuda import int4_layout, sparse24_linear

    n, k = 128, 1024
    codes, scale, group_scale, _ = random_w4a8(n, k, seed=9)
    values, bitmask = fmt.pack_int4_24(int4_of(codes, group_scale), fmt.mask_24(codes))
    compressed = compress_like_cutlass(codes.numpy())
    monkeypatch.setattr(sparse24_linear, "compress_24",
                        lambda w: tuple(torch.from_numpy(a) for a in compress_like_cutlass(w.numpy())))
    plans = []
    monkeypatch.setattr(sparse24_linear, "make_plan", lambda *a, **kw: plans.append((a, kw)) or 7)
    kern = sparse24_linear.CutlassSparse24Kernel(LinearLayer("layers.0.down", n, k, True, torch.bfloat16, int4=True))
    tensors = kern.prepare_int4(Int4Weight24(values, bitmask, group_scale), scale)
    assert set(tensors) == {"values", "meta", "group_scale", "weight_scale"} and kern.plan_id == 7
    (args, kw), = plans
    assert args[:4] == (n, k, torch.int8, torch.bfloat16) and kw["int4"]
    assert args[5] is tensors["values"] and args[6] is tensors["meta"] and args[7] is tensors["group_scale"]
    assert np.array_equal(tensors["meta"].numpy(), compressed[1])
    nib = torch.stack((tensors["values"] & 0xF, tensors["values"] >> 4), dim=-1).reshape(-1)
    for r in range(0, n, 13):
        for j in range(0, k // 2, 7):
            g = int(tensors["group_scale"][int4_layout.scale_offset(r, j // 64, k)])
            assert g == int(group_scale[r, j // 64])
            assert (int(nib[int4_layout.value_nibble(r, j, k)]) - 8) * g == int(compressed[0][r, j]), (r, j)
    per_weight = sum(t.numel() * t.element_size() for t in tensors.values()) / (n * k)
    assert per_weight == pytest.approx(0.25 + 0.125 + 1 / 128 + 4 / k) and per_weight <= 0.40
    with pytest.raises(ValueError, match=r"layers.0.down: expected uint8 int4 values \[128, 256\]"):
        kern.prepare_int4(Int4Weight24(values[:, :-1], bitmask, group_scale), scale)
