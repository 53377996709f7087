"""benchmarks/throughput.py: which profiled kernels count as the layers' linear GEMMs, the GPU-busy timeline and the ratios' anchors.
Kernel names as torch.profiler reports them for vLLM 0.26 engines (sparse24 and vLLM fp8, decode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import throughput  # noqa: E402

GEMMS = [
    "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEENS1_10collective13CollectiveMma",
    "void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8<cutlass::float_e4m3_t, cutlass::bfloat16_t, "
    "vllm::c3x::ScaledEpilogue, cute::tuple<cute::C<64>, cute:",
    "void sparse24::decode::(anonymous namespace)::decode_kernel<signed char, __nv_bfloat16, 1, 2>(sparse24::decode::(anonymous namespace)::Params)",
]
NOT_GEMMS = [
    # Inductor's fused RMSNorm / SiLU-mul + activation quant, named after the GEMM op that consumes it
    "triton_red_fused__to_copy_abs_amax_clamp_clamp_min_cutlass_sparse_mm_div_mul_round_silu_slice_2",
    "triton_red_fused__to_copy_abs_clamp_cutlass_scaled_mm_div_fused_add_rms_norm_max_mul_reciprocal_unsqueeze_3",
    "void sparse24::quant_int8_kernel<__nv_bfloat16>(__nv_bfloat16 const*, long, signed char*, float*, int, int)",
    "kernel_unified_attention",
    "nvjet_sm90_tst_256x8_64x6_2x1_v_bz_TNT",
    "reduce_segments",
    # FlashAttention-3 (vLLM 0.26's build names its kernels cutlass::device_kernel<flash::...>)
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, "
    "cute::tuple<cute::C<1>, cute::C<1>, cute::C<",
    "void cutlass::device_kernel<flash::FlashAttnFwdCombine<cute::tuple<cute::C<8>, cute::C<128> >, 5, 256, 1, false, "
    "true, cutlass::bfloat16_t, float, cutlass::arch",
]


@pytest.mark.parametrize("name", GEMMS)
def test_linear_gemm_kernels_count(name):
    assert throughput.is_linear_gemm(name)


@pytest.mark.parametrize("name", NOT_GEMMS)
def test_other_kernels_do_not_count(name):
    assert not throughput.is_linear_gemm(name)


def test_timeline_merges_overlaps_and_sums_gaps_between_kernel_pairs():
    """GPU-busy share from merged kernel intervals (a kernel launched early under programmatic
    dependent launch overlaps its predecessor and counts once); idle gaps summed per kernel pair;
    runtime calls per step."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(name, start, end, dev=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(start=start, end=end))

    evs = [ev("norm", 0, 10), ev("gemm", 8, 30), ev("attn", 40, 50), ev("norm", 50, 60), ev("gemm", 65, 80),
           ev("cudaGraphLaunch", 0, 1, DeviceType.CPU), ev("cudaGraphLaunch", 2, 3, DeviceType.CPU),
           ev("aten::add", 0, 1, DeviceType.CPU)]
    tl = throughput.timeline(SimpleNamespace(events=lambda: evs), steps=2)
    assert tl["gpu_span_ms"] == 0.08 and tl["idle_ms"] == 0.015
    assert tl["gpu_busy_in_span"] == round(65 / 80, 4)
    assert tl["kernels_per_step"] == 2.5
    assert tl["runtime_calls_per_step"] == {"cudaGraphLaunch": 1.0}
    assert [(g["between"], g["count"], g["us_each"]) for g in tl["top_gaps"]] == [
        ("gemm -> attn", 1, 10.0), ("norm -> gemm", 1, 5.0)]


def test_ratios_take_the_faster_w4a16_engine_as_the_anchor():
    """vs_w4a16 divides by the faster of vLLM's two W4A16 kernels (Machete as chosen, Marlin forced);
    vs_fp8 by vLLM fp8; decode workloads compare output tokens per second."""
    def row(engine: str, out: float) -> dict:
        return {"engine": engine, "workload": "decode_8x128x512", "output_tok_s": out, "total_tok_s": 3 * out}

    rows = [row("fp8", 1000.0), row("w4a16", 800.0), row("w4a16_marlin", 1250.0), row("sparse24", 1500.0)]
    throughput.add_ratios(rows)
    ours = rows[-1]
    assert (ours["vs_fp8"], ours["vs_w4a16"]) == (1.5, 1.2)
    assert throughput.ENV_VARIANTS["w4a16_marlin"][0] == "w4a16"
    assert "MacheteLinearKernel" in throughput.ENV_VARIANTS["w4a16_marlin"][1]["VLLM_DISABLED_KERNELS"]


def test_w4a8_engine_checkpoint_reads_back_on_the_two_level_grid(tmp_path):
    """The sparse24_w4a8 engine's random checkpoint is a valid w4a8 checkpoint: every linear 2:4,
    its codes int4 values (|v| <= 7) times a group scale in 1..18."""
    from test_w4a8 import on_two_level_grid

    from vllm_sparse24.checkpoint.read import read_checkpoint

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
           "vocab_size": 300, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    throughput.build_checkpoints(cfg, tmp_path, ["sparse24_w4a8"], seed=0)
    ckpt = read_checkpoint(tmp_path / "sparse24_w4a8")
    assert ckpt.scheme.int4 and len(ckpt.linears) == 7
    for name, lin in ckpt.linears.items():
        assert lin.kind == "sparse" and on_two_level_grid(lin.codes, lin.group_scale), name
        assert int(lin.group_scale.min()) >= 1 and int(lin.group_scale.max()) <= 18, name


def test_w4a16_dummy_config_quantizes_every_linear_layer():
    """vLLM takes a GPTQ checkpoint's quantized layers from its safetensors headers unless the config
    lists them; the W4A16 anchor is a config-only folder (dummy weights), so its config must name every
    linear layer, or vLLM 0.26 serves them unquantized and the anchor measures bf16 (later releases read
    an empty list as "all layers")."""
    from vllm.model_executor.layers.quantization.utils.gptq_utils import is_layer_gptq_quantized

    quantized = throughput.DUMMY_QUANT["w4a16"]["modules_in_block_to_quantize"]
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert is_layer_gptq_quantized(f"model.layers.3.{name}", quantized, fused), name
    assert set(quantized) == set(throughput.linear_shapes(throughput.load_config("llama3-8b", None)))
