"""End-to-end vLLM throughput: dense bf16, dense W8A8 int8, vLLM fp8 and sparse24 (int8 and fp8).

    python benchmarks/throughput.py --out DIR [--config llama3-8b|CONFIG.json] [--num-layers 8]
        [--engines bf16,w8a8_int8,fp8,w4a16,w4a16_marlin,sparse24,sparse24_fp8,sparse24_lmq,sparse24_w4a8] [--workloads prefill_256x1024x16,...] [--tp 1]

One random Llama-shaped model (default: Llama-3-8B's shape; ``--num-layers`` changes the depth)
per engine (speed does not depend on the values):
  * ``bf16``: vLLM's dummy weights (``load_format="dummy"``) in a config-only folder; ``fp8`` = the
    same with vLLM's own ``--quantization fp8`` (dynamic W8A8, weights quantized at load);
  * ``w4a16``: dense 4-bit weights, bf16 activations (GPTQ, group 128, symmetric, no act order) on
    dummy weights: vLLM picks its Hopper kernel (Machete first; the results name it);
    ``w4a16_marlin``: the same with Machete disabled (``VLLM_DISABLED_KERNELS``), so Marlin serves:
    the ratios' W4A16 anchor is the faster of the two;
  * ``w8a8_int8``: dense int8 W8A8 compressed-tensors "int-quantized", written by the offline
    compressor's ``dense-w8a8`` writer (``sparse24_tools.export.write_dense_w8a8``), loaded by stock vLLM;
  * ``sparse24``: 2:4 magnitude-pruned + int8, packed on the GPU and written with
    ``vllm_sparse24.checkpoint`` as ``sparse24_tools.export.write_sparse24`` does;
  * ``sparse24_fp8``: the same in the fp8 scheme (float8_e4m3fn weights, e4m3 activations);
  * ``sparse24_lmq``: ``sparse24`` with an int8 lm_head (``compress --quantize-lm-head``, untied).
  * ``sparse24_w4a8``: the 2:4 weights in the w4a8 scheme (int4 values with two-level scales, int8
    activations; round to nearest on the two-level grid).
  * ``sparse24_pdl``: ``sparse24``'s checkpoint with ``VLLM_SPARSE24_PDL=1`` (its CUTLASS GEMMs
    launched with programmatic dependent launch): the knob's end-to-end A/B in one run.
  * the published 2:4 models' formats (docs/format.md), served by the plugin:
    ``sparse24_from_bf16``: the 2:4 weights in bf16 with the zeros in place and no quantization_config
    (as Sparse-Llama-3.1-8B-2of4), served with ``--quantization sparse24``, quantized to int8 at load;
    ``ct24_fp8_dynamic``: a compressed-tensors FP8-dynamic 2:4 checkpoint (e4m3 channel-wise weights
    stored dense, ``sparsity_config`` dense 2:4, as the Sparse-Llama FP8-dynamic models), loaded
    into the fp8 scheme.
Each engine runs in its own process (``--_engine``), every workload in that process, with the
same token-id prompts (``random.Random(seed)``) for all engines. Metrics follow
``vllm bench throughput``: requests/s = n / elapsed, total tok/s = (prompt + generated) / elapsed,
output tok/s = generated / elapsed, elapsed = the median of ``--repeats`` (3) ``LLM.generate`` calls
over all requests (``ignore_eos``, greedy, no detokenization) after a warm-up generate.
Writes throughput-<gpu>-<date>.json + .png + .md into --out.

``--measure-load`` runs each engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, tp 1) and adds to
its rows the seconds of vLLM's model load (weights read and processed) and the peak GPU memory
allocated during it (``torch.cuda.max_memory_allocated``).

``--profile`` then runs each of ``--profile-engines`` once more in an in-process engine
(VLLM_ENABLE_V1_MULTIPROCESSING=0, so torch.profiler sees the engine's kernels, CUDA graphs
included) on ``--profile-workloads`` and prints, per engine and workload, wall time, summed GPU
kernel time and the top kernels; written to profile-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("bf16", "w8a8_int8", "fp8", "w4a16", "w4a16_marlin", "sparse24", "sparse24_pdl", "sparse24_fp8", "sparse24_lmq",
           "sparse24_w4a8",
           "sparse24_from_bf16", "ct24_fp8_dynamic")
# engines that serve another engine's checkpoint under an environment of their own (an A/B of a
# launch knob in one run): name -> (that engine, its environment)
ENV_VARIANTS = {"sparse24_pdl": ("sparse24", {"VLLM_SPARSE24_PDL": "1"}),
                # vLLM's Hopper order for W4A16 is Machete, AllSpark (pre-Hopper only), Marlin
                "w4a16_marlin": ("w4a16", {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel,AllSparkLinearKernel"})}
# the W4A16 engines: the faster one is the ratios' anchor
W4A16_ENGINES = ("w4a16", "w4a16_marlin")
# the linear layers of a decoder block
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# engines on vLLM's dummy weights in a config-only folder: name -> the quantization_config it adds
# (w4a16: vLLM finds a GPTQ checkpoint's quantized layers in its safetensors headers unless the config names
# them; a config-only folder has none, so the config names every linear layer of a block)
DUMMY_QUANT = {"bf16": None, "w4a16": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                         "sym": True, "lm_head": False, "modules_in_block_to_quantize": list(LINEARS)}}
# sparse24 engines -> the quantization scheme of their checkpoint (vllm_sparse24.quant.GRIDS)
SPARSE_ENGINES = {"sparse24": "int8", "sparse24_fp8": "fp8", "sparse24_lmq": "int8", "sparse24_w4a8": "w4a8"}
LM_HEAD_ENGINES = ("sparse24_lmq",)  # lm_head quantized on the scheme's grid (quantize_lm_head)
# engines on the published 2:4 models' formats, served with --quantization sparse24
PUBLISHED_ENGINES = ("sparse24_from_bf16", "ct24_fp8_dynamic")
# quantization_config of a compressed-tensors FP8-dynamic 2:4 checkpoint (docs/format.md)
CT_FP8_DYNAMIC = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True},
    }},
    "ignore": ["lm_head"], "kv_cache_scheme": None,
    "sparsity_config": {"format": "dense", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"]},
}
WORKLOADS = {  # name -> (prompts, input tokens, output tokens)
    "prefill_256x1024x16": (256, 1024, 16),
    "decode_1x128x512": (1, 128, 512),
    "decode_8x128x512": (8, 128, 512),
    "decode_64x128x512": (64, 128, 512),
    "mixed_256x512x256": (256, 512, 256),
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}
# kernel names of the decoder layers' linear GEMMs in a profile: CUTLASS (ours, vLLM's
# cutlass_scaled_mm) and the 2:4 decode kernel (namespace sparse24). Not the eager quant kernel, and
# not Inductor's Triton kernels: it names a fused kernel after the ops around it, so the RMSNorm /
# SiLU-mul + activation-quant kernels read "triton_red_fused_..._cutlass_sparse_mm_..."
# (FlashAttention-3's kernels are cutlass::device_kernel<flash::...> too)
LINEAR_KERNEL = re.compile(r"^(?!triton_)(?!.*quant)(?!.*flash).*(cutlass|sparse24)", re.I | re.S)


def is_linear_gemm(kernel_name: str) -> bool:
    """Whether a profiled kernel is one of the decoder layers' linear GEMMs (``LINEAR_KERNEL``)."""
    return LINEAR_KERNEL.search(kernel_name) is not None
PROFILE_WORKLOADS = "prefill_64x1024x1,decode_8x128x256"


def workload_shape(name: str) -> tuple[int, int, int]:
    """The issue's names, or any ``<label>_<prompts>x<in>x<out>`` (smoke runs)."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    n, i, o = name.rsplit("_", 1)[-1].split("x")
    return int(n), int(i), int(o)


def load_config(spec: str, num_layers: int | None) -> dict:
    cfg = dict(LLAMA3_8B) if spec == "llama3-8b" else json.loads(Path(spec).read_text())
    if num_layers:
        cfg["num_hidden_layers"] = num_layers
    return cfg


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i)}


# -- checkpoints ----------------------------------------------------------------------------


class _StubTokenizer:
    """Prompts are token ids (``skip_tokenizer_init``): the writers' tokenizer step is a no-op."""

    def save_pretrained(self, folder):
        return None


def _stub_model(cfg: dict, state: dict):
    """What the offline writers read from a model: ``.config`` and ``.state_dict()``."""
    import torch
    from transformers import LlamaConfig

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            hf = {k: v for k, v in cfg.items() if k not in ("model_type",)}
            self.config = LlamaConfig(**hf)
            self.config.architectures = ["LlamaForCausalLM"]
            self.generation_config = None

        def state_dict(self, *a, **k):  # noqa: D102
            return state

    return _Model()


def build_checkpoints(cfg: dict, root: Path, engines: list[str], seed: int = 0) -> dict[str, float]:
    """Write bf16/ (for bf16 and fp8), w8a8_int8/, sparse24/, sparse24_fp8/ and sparse24_lmq/ under
    root (those the engines need); returns seconds."""
    engines = [ENV_VARIANTS.get(e, (e,))[0] for e in engines]
    import torch

    from sparse24_tools.export import write_dense_w8a8
    from sparse24_tools.group import LinearResult
    from sparse24_tools.model_walk import hf_config_dict
    from vllm_sparse24 import checkpoint as ckpt
    from vllm_sparse24.quant import GRIDS, W4A8, quantize_weight_per_channel
    from vllm_sparse24.schema import Sparse24Scheme
    from vllm_sparse24.sparsity import magnitude_24

    want = {"bf16": "bf16" in engines or "fp8" in engines, "w4a16": "w4a16" in engines,
            "w8a8_int8": "w8a8_int8" in engines}
    sparse = [e for e in SPARSE_ENGINES if e in engines]
    published = [e for e in PUBLISHED_ENGINES if e in engines]
    need_weights = want["w8a8_int8"] or bool(sparse) or bool(published)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    t0 = time.time()
    h, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(torch.bfloat16)

    common = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if need_weights:
        common["model.embed_tokens.weight"] = rnd(v, h).cpu()
    if need_weights and not cfg.get("tie_word_embeddings"):
        common["lm_head.weight"] = rnd(v, h).cpu()
    int8_res: dict = {}
    sparse_tensors: dict = {e: {} for e in sparse + published}
    for layer in range(n_layers if need_weights else 0):
        p = f"model.layers.{layer}"
        common[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        common[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        for lin, (n, k) in linear_shapes(cfg).items():
            name = f"{p}.{lin}"
            wf = rnd(n, k).float()
            if want["w8a8_int8"]:
                q, s = quantize_weight_per_channel(wf)
                int8_res[name] = LinearResult(name, "dense", "rtn", q.cpu(), s.cpu(), 0.0, 0.0, 0.0)
            pruned = magnitude_24(wf, name=name) if sparse or published else None
            if "sparse24_from_bf16" in published:
                sparse_tensors["sparse24_from_bf16"][f"{name}.weight"] = pruned.to(torch.bfloat16).cpu()
            if "ct24_fp8_dynamic" in published:
                q, s = quantize_weight_per_channel(pruned, GRIDS["fp8"])
                sparse_tensors["ct24_fp8_dynamic"][f"{name}.weight"] = q.cpu()
                sparse_tensors["ct24_fp8_dynamic"][f"{name}.weight_scale"] = s.to(torch.bfloat16).cpu()
            for e in sparse:
                gs = None
                if SPARSE_ENGINES[e] == W4A8.name:  # int4 values x group scale, as compress --scheme w4a8 rounds
                    q, s, gs = W4A8.quantize(pruned)
                else:
                    q, s = quantize_weight_per_channel(pruned, GRIDS[SPARSE_ENGINES[e]])
                # packed on the GPU (the 2:4 mask's topk is slow on CPU)
                for key, t in ckpt.layer_tensors(name, q, s, sparse=True, group_scale=gs).items():
                    sparse_tensors[e][key] = t.cpu()
    secs = {"generate_s": round(time.time() - t0, 1)}
    report = {"note": "random weights for throughput (benchmarks/throughput.py)", "seed": seed}
    for name, quant_config in DUMMY_QUANT.items():  # vLLM's dummy weights: a config-only folder
        if not want[name]:
            continue
        t = time.time()
        hf = hf_config_dict(_stub_model(cfg, common), torch.bfloat16)
        if quant_config:
            hf["quantization_config"] = quant_config
        with ckpt.atomic_output_dir(root / name, overwrite=True) as tmp:
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        secs[f"{name}_write_s"] = round(time.time() - t, 1)
    if want["w8a8_int8"]:
        t = time.time()
        write_dense_w8a8(root / "w8a8_int8", _stub_model(cfg, common), _StubTokenizer(), int8_res,
                         ignore=("lm_head",), report=report, dtype=torch.bfloat16, overwrite=True)
        secs["w8a8_int8_write_s"] = round(time.time() - t, 1)
    for e in sparse:
        t = time.time()
        # what sparse24_tools.export.write_sparse24 does, minus its CPU pack_24 (packed above on the GPU)
        lmq = e in LM_HEAD_ENGINES
        untied_lmq = lmq and "lm_head.weight" in common  # tied: the plugin quantizes the embedding at load
        scheme = Sparse24Scheme(quant=SPARSE_ENGINES[e], ignore=() if lmq else ("lm_head",), quantize_lm_head=lmq)
        if untied_lmq:  # as sparse24_tools.lm_head writes it: codes + per-row scale in place of the bf16 weight
            q, s = quantize_weight_per_channel(common["lm_head.weight"].to(dev), scheme.grid)
            sparse_tensors[e] |= {k: t.cpu() for k, t in ckpt.layer_tensors("lm_head", q, s, sparse=False).items()}
        with ckpt.atomic_output_dir(root / e, overwrite=True) as tmp:
            kinds = ckpt.write_checkpoint(tmp, {**common, **sparse_tensors.pop(e)},
                                          hf_config_dict(_stub_model(cfg, common), torch.bfloat16), scheme)
            assert kinds.pop("lm_head", None) == ("dense" if untied_lmq else None), kinds
            assert set(kinds.values()) == {"sparse"} and len(kinds) == 7 * n_layers, kinds
            (tmp / "compress_report.json").write_text(json.dumps(report, indent=2))
        secs[f"{e}_write_s"] = round(time.time() - t, 1)
    for e in published:  # sharded with an index, as the Hub has them
        t = time.time()
        hf = hf_config_dict(_stub_model(cfg, common), torch.bfloat16)
        if e == "ct24_fp8_dynamic":
            hf["quantization_config"] = CT_FP8_DYNAMIC
        with ckpt.atomic_output_dir(root / e, overwrite=True) as tmp:
            ckpt.save_safetensors_shards({**common, **sparse_tensors.pop(e)}, tmp)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            scheme = ckpt.load_scheme(tmp) if e == "ct24_fp8_dynamic" else Sparse24Scheme.unquantized_24()
            kinds = ckpt.validate_checkpoint(tmp, scheme)
            assert set(kinds.values()) == {"sparse"} and len(kinds) == 7 * n_layers, kinds
        secs[f"{e}_write_s"] = round(time.time() - t, 1)
    return secs


# -- one engine (child process) --------------------------------------------------------------


def make_prompts(n: int, inp: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    hi = min(vocab, 100_000)
    return [[rng.randrange(1000, hi) for _ in range(inp)] for _ in range(n)]


def make_engine(args, eng: str):
    """The vLLM engine of ``eng`` on the checkpoints in --ckpt-dir (bf16 / fp8: vLLM's dummy weights);
    returns (LLM, the model's config.json)."""
    from vllm import LLM

    # engine_facts runs functions of engine_probe.py in the workers (LLM.apply_model): vLLM pickles
    # them only when allowed, by reference, so the workers must be able to import that module
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    eng, env = ENV_VARIANTS.get(eng, (eng, {}))
    os.environ.update(env)  # before the first layer call reads it
    here = str(Path(__file__).resolve().parent)
    if here not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    model = {"fp8": "bf16"}.get(eng, eng)
    quant = {"fp8": "fp8", **dict.fromkeys((*SPARSE_ENGINES, *PUBLISHED_ENGINES), "sparse24")}.get(eng)
    cfg = json.loads((Path(args.ckpt_dir) / model / "config.json").read_text())
    llm = LLM(model=str(Path(args.ckpt_dir) / model), quantization=quant, dtype=args.dtype,
              load_format="dummy" if model in DUMMY_QUANT else "auto",
              skip_tokenizer_init=True, max_model_len=args.max_model_len, seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tp,
              max_num_seqs=256, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, enforce_eager=args.enforce_eager)
    return llm, cfg


def run_engine(args) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = args._engine
    load = probe_model_load() if args.measure_load else {}
    t0 = time.time()
    llm, cfg = make_engine(args, eng)
    load_s = time.time() - t0
    facts = engine_facts(llm)
    print(f"[{eng}] engine ready in {load_s:.1f}s: {facts}", flush=True)
    if eng != "bf16" and facts.get("linear") == ["UnquantizedLinearMethod"]:
        raise SystemExit(f"[{eng}] every linear layer is unquantized: the engine would measure bf16, not {eng}")
    if load:
        print(f"[{eng}] model load {load['load_model_s']:.1f}s, peak GPU memory while loading "
              f"{load['load_peak_gib']:.2f} GiB, {load['load_end_gib']:.2f} GiB after", flush=True)
    warm = make_prompts(8, min(256, args.max_model_len // 2), cfg["vocab_size"], seed=12345)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in warm],
                 SamplingParams(max_tokens=32, ignore_eos=True, temperature=0, detokenize=False),
                 use_tqdm=False)
    rows = []
    for wi, wl in enumerate(args.workloads.split(",")):
        n, inp, out = workload_shape(wl)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in make_prompts(n, inp, cfg["vocab_size"], args.seed + wi)]
        sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0, detokenize=False)
        times = []
        for _ in range(args.repeats):  # the same requests again: the median run is reported
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
            gen = sum(len(o.outputs[0].token_ids) for o in outs)
        dt = statistics.median(times)
        row = {"engine": eng, "workload": wl, "requests_s": round(n / dt, 3),
               "total_tok_s": round((n * inp + gen) / dt, 1), "output_tok_s": round(gen / dt, 1),
               "elapsed_s": round(dt, 3), "elapsed_all_s": [round(v, 3) for v in times],
               "generated_tokens": gen, "engine_load_s": round(load_s, 1), **facts, **load}
        print("ROW " + json.dumps(row), flush=True)
        rows.append(row)
        Path(args.result_json).write_text(json.dumps(rows))


def engine_facts(llm) -> dict:
    """What the engine chose, for the results: attention backend, linear kernels, CUDA-graph mode."""
    from engine_probe import attention_backends, linear_kernels

    facts = {}
    for key, probe in (("attention", attention_backends), ("linear", linear_kernels)):
        try:
            facts[key] = sorted({b for per_worker in llm.apply_model(probe) for b in per_worker})
        except Exception as e:  # an engine that cannot run functions in its workers: say why
            facts[key] = f"unknown ({type(e).__name__}: {str(e)[:100]})"
    try:
        facts["cudagraph_mode"] = str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)
    except AttributeError:
        pass
    return facts


# CUDA runtime calls counted per decode step in a profile (host work that is not a graph replay)
RUNTIME_CALLS = ("cudaGraphLaunch", "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaMemcpyAsync", "cudaMemsetAsync", "cudaStreamSynchronize", "cudaEventSynchronize",
                 "cudaDeviceSynchronize", "cudaStreamWaitEvent", "cudaEventRecord")


def timeline(prof, steps: int) -> dict:
    """GPU-busy share and where the GPU waits: kernel intervals merged (overlapping kernels count
    once), the idle gaps between them summed by the pair of kernels around them, and the CUDA
    runtime calls per step."""
    from torch.autograd import DeviceType

    evs = prof.events()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in evs if e.device_type == DeviceType.CUDA),
                     key=lambda k: k[0])
    if not kernels:
        return {}
    busy, gaps, cur_end, prev = 0.0, {}, kernels[0][0], kernels[0][2]
    for start, end, name in kernels:
        if start > cur_end:
            key = f"{prev[:60]} -> {name[:60]}"
            gap = gaps.setdefault(key, [0.0, 0])
            gap[0] += start - cur_end
            gap[1] += 1
        busy += max(0.0, end - max(start, cur_end))
        if end >= cur_end:
            cur_end, prev = end, name
    span = cur_end - kernels[0][0]
    calls = {}
    for e in evs:
        if e.device_type == DeviceType.CPU and e.name in RUNTIME_CALLS:
            calls[e.name] = calls.get(e.name, 0) + 1
    top_gaps = sorted(gaps.items(), key=lambda kv: -kv[1][0])[:12]
    return {"kernels_per_step": round(len(kernels) / steps, 1), "gpu_span_ms": round(span / 1e3, 3),
            "gpu_busy_in_span": round(busy / span, 4), "idle_ms": round((span - busy) / 1e3, 3),
            "runtime_calls_per_step": {k: round(v / steps, 2) for k, v in sorted(calls.items())},
            "top_gaps": [{"between": k, "ms": round(v[0] / 1e3, 3), "count": v[1],
                          "us_each": round(v[0] / max(v[1], 1), 2)} for k, v in top_gaps]}


def probe_model_load() -> dict:
    """Filled by vLLM's next model load in this process: its seconds and the peak GPU memory
    allocated during it (the engine must run in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    import torch
    from vllm.model_executor.model_loader import base_loader

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    stats: dict = {}
    load_model = base_loader.BaseModelLoader.load_model

    cuda = torch.cuda.is_available()  # a CPU smoke run records the seconds only (memory 0)

    def measured_load_model(self, *args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model = load_model(self, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        stats.update(load_model_s=round(time.perf_counter() - t, 2),
                     load_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, 3),
                     load_end_gib=round(torch.cuda.memory_allocated() / 2**30 if cuda else 0.0, 3))
        return model

    base_loader.BaseModelLoader.load_model = measured_load_model
    return stats


def run_profile(args) -> None:
    """In-process engine (set by the parent): time each workload, then profile one more run of it
    (GPU kernels and the host's CUDA runtime calls)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = args._profile
    llm, cfg = make_engine(args, eng)
    result = {"engine": engine_facts(llm)}
    for wi, wl in enumerate(args.profile_workloads.split(",")):
        n, inp, out = workload_shape(wl)
        ps = [TokensPrompt(prompt_token_ids=p) for p in make_prompts(n, inp, cfg["vocab_size"], args.seed + wi)]
        sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0, detokenize=False)
        llm.generate(ps, sp, use_tqdm=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(ps, sp, use_tqdm=False)
            torch.cuda.synchronize()
        # kernels only: an eager custom op's CPU event also carries its kernel's device time
        evs = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type == DeviceType.CUDA]
        gpu_ms = sum(e.self_device_time_total for e in evs) / 1e3
        # the decoder layers' linear GEMMs (ours and vLLM's W8A8 ones; the bf16 lm_head runs in cuBLAS,
        # sparse24_lmq's int8 lm_head in cutlass_scaled_mm, so there it counts here too)
        linear_ms = sum(e.self_device_time_total for e in evs if is_linear_gemm(e.key)) / 1e3
        evs.sort(key=lambda e: -e.self_device_time_total)
        steps = out if out > 1 else 1
        top = [{"kernel": e.key[:160], "ms": round(e.self_device_time_total / 1e3, 3), "calls": e.count,
                "us_per_call": round(e.self_device_time_total / max(e.count, 1), 2),
                "share": round(e.self_device_time_total / 1e3 / gpu_ms, 4)} for e in evs[: args.profile_top]]
        layers = cfg["num_hidden_layers"]
        linear_us = linear_ms * 1e3 / (steps * layers)
        tl = timeline(prof, steps)
        result[wl] = {"wall_ms": round(wall_ms, 1), "gpu_kernel_ms": round(gpu_ms, 1), "steps": steps,
                      "gpu_busy": round(gpu_ms / wall_ms, 3), "layers": layers,
                      "linear_gemm_ms": round(linear_ms, 2), "linear_us_per_layer_step": round(linear_us, 2),
                      "timeline": tl, "top": top}
        print(f"PROFILE {eng} {wl}: wall {wall_ms:.1f} ms, GPU kernels {gpu_ms:.1f} ms "
              f"({gpu_ms / wall_ms * 100:.0f}% busy; {gpu_ms / steps:.3f} ms/step over {steps} steps); "
              f"linear GEMMs {linear_ms:.1f} ms = {linear_us:.1f} us per layer and step; "
              f"{tl.get('kernels_per_step')} kernels/step, idle {tl.get('idle_ms')} ms in the GPU span; "
              f"runtime calls/step {tl.get('runtime_calls_per_step')}", flush=True)
        for g in tl.get("top_gaps", [])[:6]:
            print(f"  gap {g['ms']:8.2f} ms  n={g['count']:6d} {g['us_each']:7.2f} us  {g['between'][:120]}", flush=True)
        for row in top:
            print(f"  {row['ms']:9.2f} ms {row['share'] * 100:5.1f}%  n={row['calls']:6d} "
                  f"{row['us_per_call']:9.2f} us/call  {row['kernel'][:110]}", flush=True)
    Path(args.result_json).write_text(json.dumps(result))


# -- report ----------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    by = {(r["engine"], r["workload"]): r for r in rows}
    for r in rows:
        metric = "output_tok_s" if r["workload"].startswith("decode") else "total_tok_s"
        r["metric"] = metric
        base = by.get(("bf16", r["workload"]))
        dense = [by[(e, r["workload"])][metric] for e in ("w8a8_int8", "fp8") if (e, r["workload"]) in by]
        r["vs_bf16"] = round(r[metric] / base[metric], 3) if base else None
        r["vs_best_w8a8"] = round(r[metric] / max(dense), 3) if dense else None
        b = by.get(("fp8", r["workload"]))
        r["vs_fp8"] = round(r[metric] / b[metric], 3) if b else None
        w4 = [by[(e, r["workload"])][metric] for e in W4A16_ENGINES if (e, r["workload"]) in by]
        r["vs_w4a16"] = round(r[metric] / max(w4), 3) if w4 else None


def table(rows: list[dict]) -> str:
    lines = ["| workload | engine | req/s | total tok/s | output tok/s | metric | vs bf16 | vs vLLM fp8 | vs W4A16 "
             "| vs best dense W8A8 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['engine']} | {r['requests_s']:.2f} | {r['total_tok_s']:,.0f} | "
                     f"{r['output_tok_s']:,.0f} | {r['metric']} | {r['vs_bf16']} | {r.get('vs_fp8')} | "
                     f"{r.get('vs_w4a16')} | {r['vs_best_w8a8']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", flush=True)
        return
    wls = list(dict.fromkeys(r["workload"] for r in rows))
    engs = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    by = {(r["engine"], r["workload"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / max(len(engs), 1)
    for i, e in enumerate(engs):
        vals = [by[(e, wl)]["vs_bf16"] or 0 if (e, wl) in by else 0 for wl in wls]
        bars = ax.bar([x + i * w for x in range(len(wls))], vals, w, label=e)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([x + w * (len(engs) - 1) / 2 for x in range(len(wls))])
    ax.set_xticklabels([f"{wl}\n({'output' if wl.startswith('decode') else 'total'} tok/s)" for wl in wls], fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("throughput / bf16")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama3-8b", help="'llama3-8b' or an HF config.json path")
    ap.add_argument("--num-layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ckpt-dir", default="/tmp/s24_throughput_ckpts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each workload per engine; the median is reported")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (float32 only for CPU smoke runs)")
    ap.add_argument("--engine-timeout", type=int, default=300, help="seconds per engine process")
    ap.add_argument("--time-budget", type=float, default=1e9,
                    help="seconds for the whole run (checkpoint build included); later engines are skipped")
    ap.add_argument("--skip-build", action="store_true", help="reuse checkpoints in --ckpt-dir")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--replot", default=None, help="redraw the PNG (+ MD) of a results JSON and exit")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="date stamped on the results (default: today)")
    ap.add_argument("--measure-load", action="store_true",
                    help="engines in-process (tp 1): record the model load's seconds and peak GPU memory")
    ap.add_argument("--profile", action="store_true", help="after the throughput runs, profile --profile-engines")
    ap.add_argument("--profile-engines", default="sparse24,fp8")
    ap.add_argument("--profile-workloads", default=PROFILE_WORKLOADS)
    ap.add_argument("--profile-top", type=int, default=15, help="kernels listed per engine and workload")
    ap.add_argument("--_profile", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]  # empty with --profile: the profile only
    profiled = [e for e in args.profile_engines.split(",") if e] if args.profile else []
    for e in engines + profiled:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r} (choose from {ENGINES})")
    for w in args.workloads.split(","):
        try:
            workload_shape(w)
        except ValueError:
            ap.error(f"unknown workload {w!r} (choose from {list(WORKLOADS)} or <label>_NxINxOUT)")
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        title = (f"{res['gpu']}, Llama-3-8B shape x {res['model']['num_hidden_layers']} layers, vLLM {res['vllm']}, "
                 f"torch {res['torch']}, {res['date']}")
        stem = args.replot.removesuffix(".json")
        plot(res["rows"], Path(f"{stem}.png"), title)
        Path(f"{stem}.md").write_text(f"{title}\n\n{table(res['rows'])}\n")
        return 0
    cfg = load_config(args.config, args.num_layers)
    if args._engine:
        run_engine(args)
        return 0
    if args._profile:
        run_profile(args)
        return 0
    deadline = time.time() + args.time_budget
    root = Path(args.ckpt_dir)
    if args._build:
        print("BUILD " + json.dumps(build_checkpoints(cfg, root, engines, args.seed)), flush=True)
        return 0
    me = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--ckpt-dir", str(root),
          "--seed", str(args.seed), "--tp", str(args.tp)] + (
        ["--num-layers", str(args.num_layers)] if args.num_layers else [])
    if not args.skip_build:  # own process: the engines get a GPU with nothing else on it
        built = engines + [e for e in profiled if e not in engines]
        subprocess.run(me + ["--_build", "--engines", ",".join(built)], check=True)
    if args.build_only:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], {}
    for e in engines:
        remaining = deadline - time.time()
        if remaining < 30:
            failed[e] = "skipped: --time-budget spent"
            print(f"[{e}] skipped, {remaining:.0f}s of --time-budget left", flush=True)
            continue
        rj = out / f".rows-{e}.json"
        rj.unlink(missing_ok=True)
        cmd = me + ["--_engine", e, "--workloads", args.workloads, "--result-json", str(rj),
                    "--max-model-len", str(args.max_model_len),
                    "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                    "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--dtype", args.dtype,
                    "--repeats", str(args.repeats)] + (
            ["--enforce-eager"] if args.enforce_eager else []) + (["--measure-load"] if args.measure_load else [])
        t = time.time()
        rc = run_group(cmd, min(args.engine_timeout, remaining - 5))
        print(f"[{e}] process done rc={rc} in {time.time() - t:.0f}s", flush=True)
        if rj.exists():  # rows written after each workload: a killed engine keeps what it measured
            rows += json.loads(rj.read_text())
            rj.unlink()
        if rc != 0:
            failed[e] = rc
        report(args, argv, cfg, rows, failed, out, final=e == engines[-1])
    if args.profile:
        profile_all(args, argv, me, out, deadline, failed)
    return 1 if failed else 0


def profile_all(args, argv, me: list[str], out: Path, deadline: float, failed: dict) -> None:
    profiles = {}
    for e in args.profile_engines.split(","):
        remaining = deadline - time.time()
        if remaining < 30:
            failed[f"profile:{e}"] = "skipped: --time-budget spent"
            continue
        rj = out / f".profile-{e}.json"
        rj.unlink(missing_ok=True)
        cmd = me + ["--_profile", e, "--result-json", str(rj), "--profile-workloads", args.profile_workloads,
                    "--profile-top", str(args.profile_top), "--max-model-len", str(args.max_model_len),
                    "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                    "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--dtype", args.dtype]
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # torch.profiler must see the engine's kernels
        try:
            rc = run_group(cmd, min(args.engine_timeout, remaining - 5))
        finally:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        if rj.exists():
            profiles[e] = json.loads(rj.read_text())
            rj.unlink()
        if rc != 0:
            failed[f"profile:{e}"] = rc
    gpu = gpu_name()
    tag = gpu.lower().replace("nvidia", "").strip().split()[0] if gpu not in ("cpu", "unknown") else gpu
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"gpu": gpu, "date": args.date, "command": command, "profiles": profiles}
    (out / f"profile-{tag}-{args.date}.json").write_text(json.dumps(res, indent=2))


def run_group(cmd: list[str], timeout: float):
    """Run cmd in its own process group; on timeout kill the whole group (vLLM's engine-core
    child too, so the next engine gets a free GPU). Returns the rc or "timeout"."""
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(3)
        return "timeout"


def report(args, argv, cfg, rows, failed, out: Path, final: bool) -> None:
    """(Re)write JSON/MD/PNG after every engine, so a killed run keeps what it measured."""
    add_ratios(rows)
    try:
        import torch
        import vllm

        versions = {"vllm": vllm.__version__, "torch": torch.__version__}
    except Exception:
        versions = {"vllm": "?", "torch": "?"}
    gpu = gpu_name()
    tag = gpu.lower().replace("nvidia", "").strip().split()[0] if gpu not in ("cpu", "unknown") else gpu
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"gpu": gpu, **versions, "date": args.date, "command": command,
              "model": {"config": args.config, "num_hidden_layers": cfg["num_hidden_layers"],
                        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
                        "vocab_size": cfg["vocab_size"]},
              "settings": {"tp": args.tp, "dtype": args.dtype, "max_num_seqs": 256,
                           "max_num_batched_tokens": args.max_num_batched_tokens,
                           "max_model_len": args.max_model_len, "prefix_caching": False,
                           "enforce_eager": args.enforce_eager, "repeats": args.repeats,
                           "bf16_fp8_weights": "vLLM dummy (load_format=dummy)",
                           "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if args.measure_load else
                           os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")},
              "rows": rows, "failed_engines": failed}
    stem = out / f"throughput-{tag}-{args.date}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    title = (f"{gpu}, Llama-3-8B shape x {cfg['num_hidden_layers']} layers, vLLM {versions['vllm']}, "
             f"torch {versions['torch']}, {args.date}")
    md = f"{title}\n\n{table(rows)}\n"
    Path(f"{stem}.md").write_text(md)
    if rows:
        plot(rows, Path(f"{stem}.png"), title)
    if final:
        print(md, flush=True)
        if failed:
            print(f"FAILED engines: {failed}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
