"""The fp8 scheme (float8_e4m3fn weights per channel, e4m3 activations per token) on CPU: the grid,
the checkpoint format and its errors, the float32 reference kernel, the compressor, evaluation and
recovery, and the tiny model through vLLM's CPU engine against ``offline eval``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

from sparse24_tools.compress_options import CompressOptions  # noqa: E402
from sparse24_tools.evaluate import EvalError, load_for_eval, perplexity  # noqa: E402
from sparse24_tools.group import compress_group  # noqa: E402
from sparse24_tools.prune.sparsegpt import sparsegpt_24  # noqa: E402
from sparse24_tools.quantize import channel_scale  # noqa: E402
from sparse24_tools.stats import HessianAccumulator  # noqa: E402
from vllm_sparse24 import checkpoint as ckpt  # noqa: E402
from vllm_sparse24.format import is_24, pack_24, unpack_24  # noqa: E402
from vllm_sparse24.kernels import LinearLayer, TorchW8A8Kernel, choose_kernel  # noqa: E402
from vllm_sparse24.quant import (  # noqa: E402
    FP8,
    INT8,
    fake_quant_per_token,
    quantize_per_token,
    quantize_weight_per_channel,
)
from vllm_sparse24.schema import Sparse24ConfigError, Sparse24Scheme  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# every finite float8_e4m3fn value (the 256 bit patterns less the two NaNs), ascending
E4M3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[torch.isfinite(E4M3)].unique()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of an 8-bit tensor (torch.equal has no float8 kernel on the CPU)."""
    return t.view(torch.uint8)


def nearest_e4m3(r: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest over the table of e4m3 values, in float64 (ties: the even mantissa)."""
    r = r.double().clamp(-448, 448)
    grid = E4M3.double()
    idx = torch.searchsorted(grid, r.reshape(-1)).clamp(1, grid.numel() - 1)
    lo, hi = grid[idx - 1], grid[idx]
    d_lo, d_hi = r.reshape(-1) - lo, hi - r.reshape(-1)
    # at a tie take the even code (its last mantissa bit 0)
    hi_even = (hi.float().to(torch.float8_e4m3fn).view(torch.uint8) & 1) == 0
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & hi_even)
    return torch.where(pick_hi, hi, lo).reshape(r.shape)


# -- the grid -------------------------------------------------------------------------------------


def test_fp8_grid_is_round_to_nearest_e4m3_with_scale_absmax_over_448():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[3] = 0  # a zero row: scale clamps, codes are 0
    q, s = quantize_weight_per_channel(w, FP8)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (64, 1)
    ref_s = w.double().abs().amax(1, keepdim=True) / 448
    nz = ref_s.squeeze(1) > 0
    torch.testing.assert_close(s.double()[nz], ref_s[nz], rtol=1e-6, atol=0)
    assert float(s[3]) > 0 and (q[3].float() == 0).all()
    assert (q.float()[nz].abs().amax(1) == 448).all()  # each row's absmax lands on the grid end
    assert torch.equal(q.float(), nearest_e4m3(w.double() / s.double()).float())
    x = torch.randn(5, 3, 128, generator=g) * 10
    xq, xs = quantize_per_token(x, FP8)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (5, 3, 1)
    assert torch.equal(xq.float(), nearest_e4m3(x / xs).float())
    fq = fake_quant_per_token(x, FP8)
    assert torch.equal(fq, (xq.float() * xs).to(x.dtype))
    # e4m3 keeps 3 mantissa bits: the relative error is at most 2^-4 away from the subnormals
    big = (x / xs).abs() >= 2 ** -6
    assert ((fq - x).abs()[big] <= x.abs()[big] * 2 ** -4 + 1e-7).all()
    assert not torch.equal(fq, fake_quant_per_token(x, INT8))


# -- the checkpoint format ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_tiny(tmp_path_factory):
    """A tiny random Llama written in the fp8 scheme by vllm_sparse24.tiny (magnitude 2:4)."""
    import tiny_llama as tl

    root = tmp_path_factory.mktemp("fp8")
    model = tl.build_dense(root / "dense", hidden=128, intermediate=256, layers=2)
    model.save_pretrained(root / "dense")
    cfg = json.loads((root / "dense" / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (root / "dense" / "config.json").write_text(json.dumps(cfg))
    dequant = tl.write_sparse24(model, root / "dense", root / "fp8", grid=FP8)
    return root, model, dequant


def test_fp8_checkpoint_round_trip_is_bit_exact(fp8_tiny):
    from vllm_sparse24.sparsity import magnitude_24

    root, model, dequant = fp8_tiny
    folder = root / "fp8"
    scheme = ckpt.load_scheme(folder)
    assert scheme.quant == "fp8" and scheme.grid is FP8
    q_cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q_cfg["weights"]["type"] == "float" and q_cfg["input_activations"]["type"] == "float"
    kinds = ckpt.validate_checkpoint(folder, scheme)
    assert set(kinds.values()) == {"sparse"} and len(kinds) == 14
    t = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    w = model.state_dict()[f"{name}.weight"]
    q, s = quantize_weight_per_channel(magnitude_24(w, name=name), FP8)
    values, bitmask = pack_24(q, name=name)
    assert t[f"{name}.weight_packed"].dtype == torch.float8_e4m3fn
    assert torch.equal(bits(t[f"{name}.weight_packed"]), bits(values))
    assert torch.equal(t[f"{name}.weight_bitmask"], bitmask) and torch.equal(t[f"{name}.weight_scale"], s)
    dense = unpack_24(t[f"{name}.weight_packed"], t[f"{name}.weight_bitmask"], name=name)
    # the kept values bit for bit; pruned positions read back as +0 (a pruned negative weight may
    # have been -0 before packing)
    kept = dense.float() != 0
    assert torch.equal(bits(dense)[kept], bits(q)[kept]) and torch.equal(dense.float(), q.float())
    assert is_24(dense.float())
    torch.testing.assert_close(dense.double() * s.double(), dequant[f"{name}.weight"], rtol=0, atol=0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, fn) -> None:
    t = load_file(str(folder / "model.safetensors"))
    fn(t)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


_FP8_W = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
_FP8_A = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"weights": _FP8_W | {"num_bits": 4}}, r"quantization_config\['weights'\]: num_bits=4 is not supported"),
        ({"weights": _FP8_W | {"strategy": "tensor"}}, r"'weights'\]: strategy='tensor' is not supported"),
        ({"input_activations": _FP8_A | {"dynamic": False, "strategy": "tensor"}},
         r"'input_activations'\]: strategy='tensor' is not supported"),
        ({"input_activations": _FP8_A | {"type": "int"}},
         r"mixes schemes: weights are fp8 \(type 'float'\) but input_activations are int8"),
        ({"weights": _FP8_W | {"type": "complex"}}, r"'weights'\] is not valid QuantizationArgs"),
    ],
)
def test_fp8_config_errors_name_the_field(change, match):
    cfg = Sparse24Scheme(quant="fp8").to_dict() | change
    with pytest.raises(Sparse24ConfigError, match=match):
        Sparse24Scheme.from_dict(cfg)


def test_fp8_scheme_round_trips_and_int8_stays_the_default():
    s = Sparse24Scheme(quant="fp8", dense_layers=("re:.*down_proj$",))
    assert Sparse24Scheme.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert Sparse24Scheme.from_dict(Sparse24Scheme().to_dict()).quant == "int8"
    with pytest.raises(Sparse24ConfigError, match="unknown quantization scheme 'fp4'"):
        Sparse24Scheme(quant="fp4")


def test_mixed_int8_and_fp8_layers_are_refused_naming_the_layers(fp8_tiny, tmp_path):
    root, model, _ = fp8_tiny
    bad = _copy(root / "fp8", tmp_path / "mixed")
    int8_layer = "model.layers.0.mlp.up_proj"
    int8_tensors, _ = __import__("tiny_llama").compress_state(model, INT8)

    def to_int8(t):
        for suffix in ("weight_packed", "weight_bitmask", "weight_scale"):
            t[f"{int8_layer}.{suffix}"] = int8_tensors[f"{int8_layer}.{suffix}"]

    _rewrite(bad, to_int8)
    with pytest.raises(ckpt.CheckpointError, match=(
            r"scheme fp8 \(torch.float8_e4m3fn weights\), but the tensors hold int8 \(torch.int8\) in "
            r"model\.layers\.0\.mlp\.up_proj while model\.layers\.0\.mlp\.down_proj, .* hold torch.float8_e4m3fn"
            r".*int8 and fp8 layers cannot be mixed")):
        ckpt.validate_checkpoint(bad, ckpt.load_scheme(bad))
    # the same from the other side: an int8 config over fp8 tensors
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = Sparse24Scheme().to_dict()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match=r"scheme int8 \(torch.int8 weights\), but the tensors hold "
                                                   r"fp8 \(torch.float8_e4m3fn\) in model\.layers\.0\.mlp\.down_proj"):
        ckpt.validate_checkpoint(bad, ckpt.load_scheme(bad))
    with pytest.raises(EvalError, match="one checkpoint holds one scheme"):
        load_for_eval(bad)


def test_wrong_dtype_of_weight_packed_names_the_tensor(fp8_tiny, tmp_path):
    root, _, _ = fp8_tiny
    bad = _copy(root / "fp8", tmp_path / "f16")
    key = "model.layers.1.self_attn.o_proj.weight_packed"

    def to_f16(t):
        t[key] = t[key].float().half()

    _rewrite(bad, to_f16)
    with pytest.raises(ckpt.CheckpointError, match=rf"model.safetensors: tensor '{key}' has dtype torch.float16, "
                                                   r"expected torch.float8_e4m3fn"):
        ckpt.validate_checkpoint(bad, ckpt.load_scheme(bad))


# -- the float32 reference kernel -----------------------------------------------------------------


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (17, 192, 576), (64, 576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_kernel_fp8_matches_float64(m, n, k, with_bias):
    """The reference kernel against the float64 product of the same e4m3 operands: every code and
    every product of two is exact in float32, only the float32 sum rounds (~1e-7 relative per
    term): bound 1e-6 relative in the Frobenius norm."""
    g = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    from vllm_sparse24.sparsity import magnitude_24

    q, scale = quantize_weight_per_channel(magnitude_24(w), FP8)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(m, k, generator=g) * 3
    kern = TorchW8A8Kernel(LinearLayer("l", n, k, True, torch.float32, FP8))
    out = kern.apply(kern.prepare(q, scale), x.reshape(1, m, k), bias)
    assert out.shape == (1, m, n) and out.dtype == x.dtype
    xq, xs = quantize_per_token(x, FP8)
    ref = (xq.double() @ q.double().t()) * xs.double() * scale.double().reshape(1, -1)
    ref = ref + (bias.double() if bias is not None else 0)
    rel = ((out.reshape(m, n).double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel
    # and it is the fp8 computation, not the int8 one (a wrong grid is far outside the bound)
    int8 = TorchW8A8Kernel(LinearLayer("l", n, k, True, torch.float32))
    qi, si = quantize_weight_per_channel(q.float() * scale)
    other = int8.apply(int8.prepare(qi, si), x, bias).double()
    assert ((other - ref).norm() / ref.norm()).item() > 100 * max(rel, 1e-9)


def test_torch_kernel_refuses_codes_of_the_other_grid():
    kern = TorchW8A8Kernel(LinearLayer("model.layers.2.mlp.up_proj", 8, 64, True, torch.float32, FP8))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj: expected torch.float8_e4m3fn weight "
                                         r"codes \(fp8\), got torch.int8"):
        kern.prepare(torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 1))


def test_fp8_custom_op_compiles_fullgraph():
    n, k = 64, 128
    q, s = quantize_weight_per_channel(torch.randn(n, k), FP8)
    kern = TorchW8A8Kernel(LinearLayer("l", n, k, False, torch.float32, FP8))
    tensors = kern.prepare(q, s)
    fn = torch.compile(lambda x: kern.apply(tensors, x, None), fullgraph=True, backend="eager", dynamic=True)
    for m in (1, 5, 33):
        x = torch.randn(m, k)
        assert torch.equal(fn(x), kern.apply(tensors, x, None))


def test_fp8_activation_quant_traces_as_plain_torch_ops():
    """The GPU layers quantize with these ops under torch.compile (kernels/cuda/act_quant.py), so
    Inductor can fuse them; they must trace in one graph and give the eager bits."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    fn = torch.compile(lambda x: quantize_per_token(x, FP8), backend=backend, fullgraph=True, dynamic=True)
    x = torch.randn(7, 96) * 5
    q, s = fn(x)
    rq, rs = quantize_per_token(x, FP8)
    assert torch.equal(bits(q), bits(rq)) and torch.equal(s, rs)
    targets = " ".join(str(nd.target) for g in graphs for nd in g.graph.nodes if nd.op != "placeholder")
    assert "amax" in targets and "clamp" in targets, targets


def test_dispatch_fp8(monkeypatch, caplog, force_kernel):
    """CPU: the reference kernel. Hopper: the CUTLASS kernel for bf16 models (the e4m3 GEMM configs);
    fp16 models have no e4m3 config and take the reference kernel, said once in a warning, or fail
    when the CUDA kernels are forced."""
    from vllm_sparse24.kernels import dispatch
    from vllm_sparse24.kernels.cuda.sparse24_linear import CutlassSparse24Kernel

    def layer(name, dtype, device="cuda", grid=FP8):
        return LinearLayer(name, 256, 256, True, dtype, grid, torch.device(device))

    assert choose_kernel(layer("l0", torch.float32, "cpu")) is TorchW8A8Kernel
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(CutlassSparse24Kernel, "is_supported", classmethod(lambda cls, d: (True, None)))
    assert choose_kernel(layer("l0", torch.bfloat16)) is CutlassSparse24Kernel
    dispatch._warn_slow.cache_clear()
    with caplog.at_level("WARNING", logger="vllm_sparse24.kernels.dispatch"):
        assert choose_kernel(layer("l0", torch.float16)) is TorchW8A8Kernel
        assert choose_kernel(layer("l1", torch.float16)) is TorchW8A8Kernel
    slow = [r.message for r in caplog.records if "reference kernel on the GPU" in r.message]
    assert len(slow) == 1 and "has no fp8 2:4 GEMM for torch.float16" in slow[0]
    assert choose_kernel(layer("l0", torch.float16, grid=INT8)) is CutlassSparse24Kernel
    force_kernel("cutlass")
    with pytest.raises(RuntimeError, match=r"l0: no sparse24 kernel \(VLLM_SPARSE24_KERNEL=cutlass\) runs this 2:4 "
                                           r"layer: cutlass_sparse24 has no fp8 2:4 GEMM for torch.float16"):
        choose_kernel(layer("l0", torch.float16))


# -- the compressor -------------------------------------------------------------------------------


def _correlated(n: int = 32, k: int = 128, t: int = 512):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    w = torch.randn(n, k, generator=g)
    acc = HessianAccumulator(k)
    acc.add(fake_quant_per_token(x, FP8))
    return w, x, acc


@pytest.mark.parametrize("method,joint", [("magnitude", True), ("wanda", True), ("sparsegpt", True),
                                          ("sparsegpt", False)])
def test_compressor_fp8_outputs_lie_on_the_e4m3_grid_and_are_24(method, joint):
    w, x, acc = _correlated()
    (r,) = compress_group([("model.layers.0.mlp.up_proj", w)], acc.h, kind="sparse", grid=FP8,
                          opts=CompressOptions(method=method, joint=joint))
    assert r.q.dtype == torch.float8_e4m3fn and r.scale.dtype == torch.float32
    assert is_24(r.q.float()) and r.err_after < r.err_before * 1.001
    if method != "sparsegpt" or not joint:  # prune, then round to nearest with scale = absmax / 448
        assert (r.q.float().abs().amax(1) == 448).all()
        torch.testing.assert_close(r.scale, channel_scale(r.dequantized(), FP8), rtol=1e-6, atol=0)
    pq, _ = pack_24(r.q)
    assert pq.dtype == torch.float8_e4m3fn


def test_sparsegpt_joint_rounds_to_the_e4m3_grid_inside_the_obs_loop():
    w, x, acc = _correlated()
    scale = channel_scale(sparsegpt_24(w, acc.h), FP8)
    out = sparsegpt_24(w, acc.h, scale=scale, grid=FP8)
    steps = out.double() / scale.double()  # e4m3 values up to the float32 rounding of code * scale
    torch.testing.assert_close(steps, nearest_e4m3(steps), rtol=1e-6, atol=0)
    assert steps.abs().max() <= 448 * (1 + 1e-6)
    # the OBS updates compensated the e4m3 rounding: better than pruning, then rounding
    pruned = sparsegpt_24(w, acc.h)
    separate = FP8.round(pruned, scale)
    xt = x.t()

    def err(a):
        return float((w @ xt - a @ xt).norm() / (w @ xt).norm())

    assert err(out) < err(separate)
    # and the int8 grid gives other values (the grid parameter is used)
    assert not torch.allclose(out, sparsegpt_24(w, acc.h, scale=channel_scale(pruned), grid=INT8))


def _dense_model(folder: Path) -> None:
    import tiny_llama as tl

    model = tl.build_dense(folder, hidden=128, intermediate=256, layers=2)
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(cfg))


def _text(path: Path, n: int, seed: int) -> Path:
    words = ("the sparse model keeps two of every four weights and rounds each row to the e4m3 grid "
             "while the quick brown fox jumps over the lazy dog near the river").split()
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist()))
    return path


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """``vllm-sparse24 compress --scheme fp8`` (SparseGPT-joint, one dense layer) on a tiny model."""
    from sparse24_tools.__main__ import main

    root = tmp_path_factory.mktemp("fp8c")
    _dense_model(root / "dense")
    calib, ev = _text(root / "calib.txt", 4000, 1), _text(root / "eval.txt", 3000, 2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["compress", "--model", str(root / "dense"), "--out", str(root / "fp8"), "--scheme", "fp8",
              "--method", "sparsegpt", "--calib", str(calib), "--nsamples", "8", "--seqlen", "64",
              "--dense-layers", r"model\.layers\.1\.mlp\.down_proj", "--device", "cpu"])
    finally:
        torch.set_num_threads(n)
    return root, calib, ev


def test_compress_cli_writes_the_fp8_scheme(compressed):
    root, _, ev = compressed
    out = root / "fp8"
    scheme = ckpt.load_scheme(out)
    kinds = ckpt.validate_checkpoint(out, scheme)
    assert scheme.quant == "fp8" and kinds["model.layers.1.mlp.down_proj"] == "dense"
    assert sum(k == "sparse" for k in kinds.values()) == 13
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.float8_e4m3fn
    report = json.loads((out / "compress_report.json").read_text())
    assert report["scheme"] == "fp8" and report["linears"]["model.layers.1.mlp.down_proj"]["method"] == "fp8-rtn"
    # offline eval computes in fp8: dequantized weights, e4m3 activations per token
    model, tok = load_for_eval(out)
    x = torch.randn(2, 5, 128)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    got = q(x)
    want = torch.nn.functional.linear(fake_quant_per_token(x, FP8), q.weight)
    assert torch.equal(got, want)
    assert not torch.equal(got, torch.nn.functional.linear(fake_quant_per_token(x, INT8), q.weight))
    assert perplexity(model, tok, ev, seqlen=64, windows=4, progress=False)["perplexity"] > 1


def test_dense_w8a8_export_in_fp8_is_compressed_tensors_float_quantized(compressed, tmp_path):
    from sparse24_tools.compress import compress

    root, _, ev = compressed
    compress(root / "dense", tmp_path / "dense-fp8", CompressOptions(scheme="fp8", export="dense-w8a8", progress=False))
    cfg = json.loads((tmp_path / "dense-fp8" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "float-quantized" and cfg["config_groups"]["group_0"]["weights"]["type"] == "float"
    t = load_file(str(tmp_path / "dense-fp8" / "model.safetensors"))
    assert t["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    model, tok = load_for_eval(tmp_path / "dense-fp8")
    assert perplexity(model, tok, ev, seqlen=64, windows=2, progress=False)["perplexity"] > 1
    with pytest.raises(ValueError, match="unknown --scheme 'fp4'"):
        compress(root / "dense", tmp_path / "x", CompressOptions(scheme="fp4"))


# -- recovery -------------------------------------------------------------------------------------


def test_recovery_of_an_fp8_student_keeps_the_mask_and_the_grid(compressed, tmp_path):
    from sparse24_tools.recover import RecoverOptions, recover

    root, calib, ev = compressed
    student, out = root / "fp8", tmp_path / "recovered"
    opts = RecoverOptions(tokens=12 * 4 * 64, seqlen=64, batch_size=4, lr=1e-3, eval_every=6, eval_windows=4,
                          eval_seqlen=64, eval_text=str(ev), generate_tokens=0, save_every=1000, max_minutes=None,
                          device="cpu", progress=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = recover(root / "dense", student, out, calib, opts)
    finally:
        torch.set_num_threads(n)
    assert ckpt.load_scheme(out).quant == "fp8"
    before, after = load_file(str(student / "model.safetensors")), load_file(str(out / "model.safetensors"))
    kinds = ckpt.validate_checkpoint(out, ckpt.load_scheme(out))
    changed = 0
    for prefix, kind in kinds.items():
        key = f"{prefix}.weight_packed" if kind == "sparse" else f"{prefix}.weight"
        assert after[key].dtype == torch.float8_e4m3fn, prefix
        if kind == "sparse":
            assert torch.equal(after[f"{prefix}.weight_bitmask"], before[f"{prefix}.weight_bitmask"]), prefix
        # scale = max(row absmax / 448, the student's scale)
        assert bool((after[f"{prefix}.weight_scale"] >= before[f"{prefix}.weight_scale"]).all()), prefix
        changed += int(not torch.equal(bits(after[key]), bits(before[key])))
    assert changed == len(kinds)  # every quantized linear was trained
    # what recover evaluated (its fp8 QAT forward) is what the written checkpoint computes
    model, tok = load_for_eval(out)
    ppl = perplexity(model, tok, ev, seqlen=64, windows=4, progress=False)["perplexity"]
    assert ppl == pytest.approx(rep["final_eval"]["perplexity"], rel=1e-4)
    model, tok = load_for_eval(student)
    ppl0 = perplexity(model, tok, ev, seqlen=64, windows=4, progress=False)["perplexity"]
    assert ppl0 == pytest.approx(rep["evals"][0]["perplexity"], rel=1e-4)


def test_qat_fp8_forward_and_export_are_the_plugin_arithmetic():
    from sparse24_tools.qat import QATLinear, ste_fake_quant_per_token

    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    mask = torch.rand(16, 16, 4, generator=g).argsort(-1) < 2
    lin = QATLinear(w, mask.reshape(16, 64), None, "l", grid=FP8)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    y = lin(x)
    q, s = lin.export()
    assert q.dtype == torch.float8_e4m3fn and is_24(q.float())
    assert torch.equal(y, torch.nn.functional.linear(fake_quant_per_token(x.detach(), FP8), q.float() * s))
    y.sum().backward()  # straight-through: the gradient of x is that of a plain linear
    torch.testing.assert_close(x.grad, lin.effective_weight().detach().sum(0).expand(3, 64))
    assert torch.equal(ste_fake_quant_per_token(x.detach(), FP8), fake_quant_per_token(x.detach(), FP8))


# -- through vLLM's CPU engine --------------------------------------------------------------------


def _tie_free(model, ids: list[int], rel: float) -> bool:
    """No quantized linear's input (x / its per-token scale) lies within ``rel`` (relative) of an
    e4m3 rounding tie: a float32 engine and float32 transformers differ by ~1e-7 relative, and an
    input closer to a tie may round the other way in one of them."""
    ok = [True]

    def hook(_m, args):
        x = args[0].double()
        r = x / (x.abs().amax(-1, keepdim=True) / 448)
        one = torch.ones(())
        ok[0] &= torch.equal(FP8.codes(r * (1 - rel), one).float(), FP8.codes(r * (1 + rel), one).float())

    hooks = [m.register_forward_pre_hook(hook, prepend=True) for n, m in model.named_modules() if n.endswith("_proj")]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return ok[0]


@pytest.mark.engine
def test_fp8_tiny_model_in_the_plugin_matches_offline_eval(compressed, tmp_path):
    from conftest import LOGPROB_ATOL, run_engine

    root, _, _ = compressed
    out = root / "fp8"
    ev, _ = load_for_eval(out)
    prompts = [list(range(2 + o, 40 + o)) for o in range(0, 300, 7)]
    ids = next((p for p in prompts if _tie_free(ev, p, 2e-6)), None)
    assert ids is not None, "every prompt has an activation within 2e-6 (relative) of an e4m3 rounding tie"
    got, _ = run_engine(out, tmp_path / "engine.json", ids)
    assert got["quantization"] == "sparse24" and len(got["completion_ids"]) > 0
    with torch.no_grad():
        lp = torch.log_softmax(ev(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    ref = lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    diff = float((torch.tensor(got["prompt_logprobs"], dtype=torch.float64) - ref).abs().max())
    print(f"fp8: max |logprob plugin - offline eval| = {diff:.2e}")
    assert diff < LOGPROB_ATOL
    # the engine computed fp8: int8 activations on the same weights give other log-probs
    for m in ev.modules():
        m._forward_pre_hooks.clear()
    for n, m in ev.named_modules():
        if n.endswith("_proj"):
            m.register_forward_pre_hook(lambda _m, a: (fake_quant_per_token(a[0], INT8),))
    with torch.no_grad():
        lp8 = torch.log_softmax(ev(torch.tensor([ids])).logits[0].double(), -1)[:-1]
    assert float((lp8.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1) - ref).abs().max()) > 10 * LOGPROB_ATOL


def test_fp8_pack_moves_bytes_and_treats_minus_zero_as_zero():
    """fp8 values are packed by their bytes (device-independent): -0 counts as 0 when the mask is
    inferred, and is kept bit for bit where the mask keeps it."""
    from vllm_sparse24.format import mask_24, nonzero_mask, pack_24_with_mask

    w = torch.tensor([[1.5, -0.0, 0.0, -2.0, -0.0, 0.0, 0.0, 3.0]]).to(torch.float8_e4m3fn)
    assert nonzero_mask(w).tolist() == [[True, False, False, True, False, False, False, True]]
    values, bitmask = pack_24(w)
    assert values.dtype == torch.float8_e4m3fn and values.float().tolist() == [[1.5, -2.0, 0.0, 3.0]]
    assert mask_24(w)[0, 4:].tolist() == [True, False, False, True]  # padding: the first zero
    mask = torch.tensor([[True, True, False, False, True, False, False, True]])
    w2 = torch.where(mask, w.float(), torch.zeros(())).to(torch.float8_e4m3fn)
    w2[0, 4] = torch.tensor(-0.0).to(torch.float8_e4m3fn)
    v2, b2 = pack_24_with_mask(w2, mask)
    assert bits(v2).tolist() == [[bits(w2)[0, 0].item(), bits(w2)[0, 1].item(), 0x80, bits(w2)[0, 7].item()]]
    assert torch.equal(bits(unpack_24(v2, b2)), bits(w2))
    with pytest.raises(Exception, match="non-zero value at row 0, column 3"):
        pack_24_with_mask(w, mask)
