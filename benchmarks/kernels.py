# ruff: noqa: B023  (the lambdas run inside the loop iteration that defines them)
"""Linear-layer kernel benchmark: bf16 / int8 / fp8 dense vs 2:4 sparse (issue 4).

Run on a GPU: python benchmarks/kernels.py [--quick] [--out DIR]
Writes DIR/kernels-<gpu>-<date>.json ({"gpu", "torch", "date", "command", "rows": [{layer, N, K,
M, impl, us}], ...}) and a PNG of speedup vs M, and prints host overhead per call and decode
bandwidth on compressed bytes.

Timing: median of repeats, CUDA events. Each timed unit runs R calls that rotate over C
copies of the weight (C * bytes >= 128 MB, so weights come from HBM, not the 50 MB L2).
  bf16 / int8_intmm / fp8 / sparse24_graph: the R calls captured in one CUDA graph, replayed
  (GPU time only). int8_intmm is torch._int_mm alone (int32 out, no quant, no dequant; M < 17
  padded to 32, as it requires); fp8 is torch._scaled_mm with row-wise scales (M padded to 16),
  bf16 is x @ W^T. int8_cutlass (only when vLLM is importable) is vLLM's cutlass_scaled_mm on int8
  operands with both scales fused (the dense W8A8 int8 GEMM vLLM serves with; no quant pass).
  cslt_naive and sparse24_eager: plain eager calls, host time included.
  sparse24_* include the activation quantization, the GEMM and the scales/bias.
  cslt_gemm_only: the cuSPARSELt GEMM of our plan alone (int8 x already quantized, w_scale as its
  alpha vector, bf16 out; no activation quant, no per-token scale pass), graph-replayed, at every M
  whose padded bucket has a plan (M >= 16): the floor of any design built on cuSPARSELt 0.8, whose
  int8 GEMM takes one scale vector (CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING) and no second one.
copy_same_bytes_us: per layer, a graph-replayed device copy that moves (reads + writes) as many bytes
as the compressed weight has, rotated the same way: what one launch can stream at that size.
read_same_bytes_us: per layer, a graph-replayed torch.sum over a buffer of the compressed weight's
size (read once, rotated the same way): a stock read-only kernel over those bytes, for scale. It is
not a floor: at these sizes (10-73 MB) torch's reduction is slower than our decode kernel on o, qkv
and down (H100, 2026-11-21).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_sparse24.kernels.cuda.cslt import time_graph_us  # noqa: E402
from vllm_sparse24.kernels.cuda.linear import Sparse24CudaKernel  # noqa: E402


def _vllm_ops():
    try:
        from vllm import _custom_ops as ops
        return ops if hasattr(ops, "cutlass_scaled_mm") else None
    except Exception as e:  # not installed (CPU dev machine) or its _C does not load
        print(f"vLLM not importable ({type(e).__name__}): no int8_cutlass rows", flush=True)
        return None

MODELS = {
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama3-70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
ROTATE_BYTES = 128 << 20
VLLM_OPS = None  # vllm._custom_ops when importable (main)
DEV = "cuda"


def prune24(n, k):
    w = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8)
    drop = torch.rand(n, k // 4, 4, device=DEV).topk(2, dim=-1).indices
    return w.reshape(n, k // 4, 4).scatter(-1, drop, 0).reshape(n, k)


def copies_for(nbytes):
    return max(1, min(8, -(-ROTATE_BYTES // nbytes)))


def median_us(fn, calls, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def reps_for(est_us):
    return int(max(3, min(30, 100_000 / max(est_us, 1))))


def bench_shape(model, layer, n, k, ms, rows, info):
    wb = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
    wi = [prune24(n, k) for _ in range(copies_for(n * k))]
    ws = torch.rand(n, 1, device=DEV) * 1e-3 + 1e-4
    wf8 = [w.to(torch.float8_e4m3fn) for w in wi[: copies_for(n * k)]]
    wsf8 = ws.reshape(1, n)
    wc = [torch._cslt_compress(w) for w in wi[: copies_for(n * k * 5 // 8)]]
    kern = Sparse24CudaKernel(n, k, True, f"{model}.{layer}")
    t0 = time.perf_counter()
    tens = [kern.prepare(w, ws) for w in wi[: copies_for(n * k * 5 // 8)]]
    info[f"{model}.{layer}"] = {"prepare_s": round(time.perf_counter() - t0, 2), **kern.describe()}
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        mi = max(m, 32) if m <= 16 else m
        xq = torch.randint(-127, 128, (mi, k), device=DEV, dtype=torch.int8)
        m16 = -(-m // 16) * 16
        xf8 = torch.randn(m16, k, device=DEV).to(torch.float8_e4m3fn)
        xsf8 = torch.rand(m16, 1, device=DEV)
        xqc = torch.randint(-127, 128, (m16, k), device=DEV, dtype=torch.int8)
        est = 2 * m * n * k / 400e12 * 1e6 + 5
        reps = reps_for(est * 4)
        impls = {
            "bf16": (wb, lambda w: x @ w.t()),
            "int8_intmm": (wi, lambda w: torch._int_mm(xq, w.t())),
            "fp8": (wf8, lambda w: torch._scaled_mm(xf8, w.t(), scale_a=xsf8, scale_b=wsf8, out_dtype=torch.bfloat16)),
            "sparse24_graph": (tens, lambda t: kern.apply(t, x, None)),
        }
        if VLLM_OPS is not None:
            xqm, xsm = xq[:m], torch.rand(m, 1, device=DEV)
            impls["int8_cutlass"] = (wi, lambda w: VLLM_OPS.cutlass_scaled_mm(xqm, w.t(), xsm, ws, torch.bfloat16))
        for impl, (ws_list, f) in impls.items():
            def calls(ws_list=ws_list, f=f):
                for w in ws_list:
                    f(w)
            try:
                us = time_graph_us(calls, len(ws_list), reps)
            except Exception as e:  # keep going; record nothing for this impl
                print(f"  {impl} M={m} failed: {repr(e)[:200]}", flush=True)
                continue
            rows.append({"layer": f"{model}.{layer}", "N": n, "K": k, "M": m, "impl": impl, "us": round(us, 2)})
        for impl, ws_list, f in [
            ("cslt_naive", wc, lambda w: torch._cslt_sparse_mm(w, xqc.t(), alpha=ws.reshape(-1),
                                                               out_dtype=torch.bfloat16, transpose_result=True)),
            ("sparse24_eager", tens, lambda t: kern.apply(t, x, None)),
        ]:
            def calls(ws_list=ws_list, f=f):
                for w in ws_list:
                    f(w)
            us = median_us(calls, len(ws_list), reps)
            rows.append({"layer": f"{model}.{layer}", "N": n, "K": k, "M": m, "impl": impl, "us": round(us, 2)})
        if m >= 16 and m16 in kern.state.plans:  # the cuSPARSELt GEMM alone (graph, rotated weights)
            plan = kern.state.plans[m16]
            d16 = torch.empty(m16, n, device=DEV, dtype=torch.bfloat16)

            def gemm_calls(plan=plan, d16=d16):
                for tt in tens:
                    plan.run(tt["weight_cslt"], xqc, tt["weight_scale"], d16)
            us = time_graph_us(gemm_calls, len(tens), reps)
            rows.append({"layer": f"{model}.{layer}", "N": n, "K": k, "M": m, "impl": "cslt_gemm_only", "us": round(us, 2)})
            del d16
        line = " ".join(f"{r['impl']}={r['us']}" for r in rows if r["layer"] == f"{model}.{layer}" and r["M"] == m)
        print(f"{model}.{layer} M={m}: {line}", flush=True)
    return kern, tens


def host_overhead(kern, t, k, m):
    """Host us per call: perf_counter_ns around 100 back-to-back calls, enqueued behind a ~25 ms
    GPU sleep so the GPU is busy and never stalls the host (pure enqueue cost); median of 5."""
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    labels = [("apply", lambda: kern.apply(t, x, None)),
              ("triton_path_custom_op", lambda: torch.ops.sparse24.cuda_w8a8_linear(
                  x, t["weight_cslt"], t["weight_scale"], None, kern.handle))]
    if kern._ext_set is not None:
        labels.insert(1, ("ext_op_dispatcher", lambda: torch.ops.sparse24_ext.linear.default(
            x, t["weight_cslt"], t["weight_scale"], None, kern._ext_set)))
        labels.insert(1, ("ext_direct", lambda: kern._ext_direct(
            x, t["weight_cslt"], t["weight_scale"], None, kern._ext_set)))
    res = {}
    for label, f in labels:
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            torch.cuda._sleep(50_000_000)
            n = 100
            t0 = time.perf_counter_ns()
            for _ in range(n):
                f()
            t1 = time.perf_counter_ns()
            torch.cuda.synchronize()
            samples.append((t1 - t0) / n / 1e3)
        res[label] = sorted(samples)[2]
    return res


def copy_same_bytes_us(nbytes, reps=30):
    """Graph-replayed device copies moving nbytes (nbytes / 2 read + written), rotated past L2."""
    half = nbytes // 2
    src = [torch.empty(half, dtype=torch.uint8, device=DEV) for _ in range(copies_for(nbytes))]
    dst = [torch.empty_like(a) for a in src]

    def calls():
        for a, b in zip(src, dst, strict=True):
            b.copy_(a)
    return time_graph_us(calls, len(src), reps)


def read_same_bytes_us(nbytes, reps=30):
    """Graph-replayed read-only passes (torch.sum) over nbytes, rotated past L2."""
    src = [torch.ones(nbytes // 4, dtype=torch.int32, device=DEV) for _ in range(copies_for(nbytes))]
    outs = [torch.empty((), dtype=torch.int32, device=DEV) for _ in src]

    def calls():
        for a, o in zip(src, outs, strict=True):
            torch.sum(a, 0, dtype=torch.int32, out=o)
    us = time_graph_us(calls, len(src), reps)
    assert int(outs[0]) == nbytes // 4, "read_same_bytes_us: the sum did not read every element"
    return us


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = median_us(lambda: b.copy_(a), 1, 10)
    return 2 * a.numel() / us / 1e6  # TB/s read + written


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(2, (len(layers) + 1) // 2, figsize=(5 * ((len(layers) + 1) // 2), 8), squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        t = {(r["impl"], r["M"]): r["us"] for r in rows if r["layer"] == layer}
        ms = sorted({m for (_, m) in t})
        for impl, base, style in [("sparse24_graph", "bf16", "-"), ("sparse24_eager", "bf16", "--"),
                                  ("sparse24_graph", "int8_intmm", "-"), ("sparse24_eager", "int8_intmm", "--"),
                                  ("fp8", "bf16", ":")]:
            xs = [m for m in ms if (impl, m) in t and (base, m) in t]
            ax.plot(xs, [t[(base, m)] / t[(impl, m)] for m in xs], style, marker=".", label=f"{base} / {impl}")
        ax.axhline(1, color="gray", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title(layer)
        ax.set_xlabel("M tokens")
        ax.set_ylabel("speedup")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--quick", action="store_true", help="fewer M values")
    ap.add_argument("--ms", default="", help="comma-separated M values (default: all)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_SPARSE24_MAX_TOKENS", "8192")
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0].lower()
    date = datetime.date.today().isoformat()
    rows, info = [], {}
    ms = [1, 16, 1024, 8192] if args.quick else MS
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    global VLLM_OPS
    VLLM_OPS = _vllm_ops()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.2f} TB/s (read+written)", flush=True)
    overhead, decode_bw, copy_same, read_same = {}, {}, {}, {}
    for model in args.models.split(","):
        for layer, (n, k) in MODELS[model].items():
            kern, tens = bench_shape(model, layer, n, k, ms if model.endswith("8b") else [m for m in ms], rows, info)
            name = f"{model}.{layer}"
            overhead[name] = {f"M{m}": host_overhead(kern, tens[0], k, m) for m in (1, 256)}
            overhead[name]["pieces_M1024"] = kern.host_profile(tens[0], torch.randn(1024, k, device=DEV, dtype=torch.bfloat16))
            g1 = [r["us"] for r in rows if r["layer"] == name and r["impl"] == "sparse24_graph" and r["M"] == 1]
            copy_same[name] = round(copy_same_bytes_us(n * k * 5 // 8), 2)
            read_same[name] = round(read_same_bytes_us(n * k * 5 // 8), 2)
            if g1:
                decode_bw[name] = n * k * 5 / 8 / g1[0] / 1e6
                print(f"{name}: decode M=1 {g1[0]} us; a copy moving the same {n * k * 5 // 8 / 1e6:.1f} MB "
                      f"{copy_same[name]} us, a read of them {read_same[name]} us", flush=True)
            gg = [r["us"] for r in rows if r["layer"] == name and r["impl"] == "cslt_gemm_only" and r["M"] == 16]
            if gg:
                decode_bw[name + " (GEMM alone, M=16)"] = n * k * 5 / 8 / gg[0] / 1e6
            print(f"{name}: host us/call {overhead[name]}; decode M=1 bandwidth "
                  f"{decode_bw.get(name, 0):.2f} TB/s = {decode_bw.get(name, 0) / bw:.0%} of copy", flush=True)
            del kern, tens
            torch.cuda.empty_cache()
            save(args, gpu, date, rows, bw, overhead, decode_bw, info, copy_same, read_same)  # partial results survive a timeout
    path = save(args, gpu, date, rows, bw, overhead, decode_bw, info, copy_same, read_same)
    plot(rows, path.replace(".json", ".png"))
    print("wrote", path)
    summarize(json.load(open(path)))


def save(args, gpu, date, rows, bw, overhead, decode_bw, info, copy_same, read_same):
    import triton
    vllm_version = None
    if VLLM_OPS is not None:
        import vllm
        vllm_version = vllm.__version__
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "date": date,
           "vllm": vllm_version,
           "command": " ".join(["python"] + sys.argv), "rows": rows,
           "copy_tbps": bw, "host_overhead_us": overhead, "decode_tbps_m1": decode_bw, "copy_same_bytes_us": copy_same,
           "read_same_bytes_us": read_same, "tuning": info,
           "notes": __doc__}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels-{gpu}-{date}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return path


def summarize(res):
    t = {(r["layer"], r["M"], r["impl"]): r["us"] for r in res["rows"]}
    print("\nacceptance (llama3-8b):")
    for layer in sorted({r["layer"] for r in res["rows"] if r["layer"].startswith("llama3-8b")}):
        pre = [(m, t[(layer, m, "int8_intmm")] / t[(layer, m, "sparse24_eager")], t[(layer, m, "bf16")] / t[(layer, m, "sparse24_eager")])
               for m in (1024, 2048, 4096, 8192, 16384) if (layer, m, "sparse24_eager") in t and (layer, m, "int8_intmm") in t]
        dec = [(m, t[(layer, m, "int8_intmm")] / t[(layer, m, "sparse24_graph")], t[(layer, m, "bf16")] / t[(layer, m, "sparse24_graph")])
               for m in (1, 2, 4, 8, 16) if (layer, m, "sparse24_graph") in t and (layer, m, "int8_intmm") in t]
        if pre:
            print(f"  {layer} prefill eager min vs int8 {min(p[1] for p in pre):.2f}x (need 1.8), vs bf16 {min(p[2] for p in pre):.2f}x (need 2.2)")
        if dec:
            print(f"  {layer} decode graph  min vs int8 {min(d[1] for d in dec):.2f}x (need 1.5), vs bf16 {min(d[2] for d in dec):.2f}x (need 2.5)")
        gem = [(t[(layer, m, "int8_intmm")] / t[(layer, m, "cslt_gemm_only")], t[(layer, m, "bf16")] / t[(layer, m, "cslt_gemm_only")])
               for m in (1024, 2048, 4096, 8192) if (layer, m, "cslt_gemm_only") in t and (layer, m, "int8_intmm") in t]
        if gem:
            print(f"  {layer} bare cuSPARSELt GEMM (no quant, no token scale), M 1024..8192: min vs int8 "
                  f"{min(g[0] for g in gem):.2f}x, vs bf16 {min(g[1] for g in gem):.2f}x (the ceiling of the prefill path)")
        for base in ("int8_cutlass", "fp8"):
            r = [t[(layer, m, base)] / t[(layer, m, "sparse24_eager")] for m in (1024, 2048, 4096, 8192, 16384)
                 if (layer, m, base) in t and (layer, m, "sparse24_eager") in t]
            d = [t[(layer, m, base)] / t[(layer, m, "sparse24_graph")] for m in (1, 2, 4, 8, 16)
                 if (layer, m, base) in t and (layer, m, "sparse24_graph") in t]
            if r and d:
                print(f"  {layer} vs {base}: prefill eager min {min(r):.2f}x, decode graph min {min(d):.2f}x")

    for name, bwv in res["decode_tbps_m1"].items():
        same = res.get("copy_same_bytes_us", {}).get(name)
        read = res.get("read_same_bytes_us", {}).get(name)
        ceiling = f"; a copy of the same bytes {same} us" if same else ""
        ceiling += f", a read of them {read} us" if read else ""
        print(f"  {name} decode M=1 {bwv:.2f} TB/s = {bwv / res['copy_tbps']:.0%} of copy (need 75%){ceiling}")
    for name, o in res["host_overhead_us"].items():
        print(f"  {name} host us/call {json.dumps({k: {a: round(b, 1) for a, b in v.items()} for k, v in o.items()})}"
              " (need <= 15)")


if __name__ == "__main__":
    main()
