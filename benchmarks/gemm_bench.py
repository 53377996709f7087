# ruff: noqa: B023  (the lambdas run inside the loop iteration that defines them)
"""Linear-layer GEMM benchmark on a Hopper GPU: vLLM's dense kernels vs the sparse24 CUTLASS GEMM.

    python benchmarks/gemm_bench.py [--models llama3-8b,llama3-70b] [--ms 1,2,...] [--search] [--out DIR]

Impls (per layer shape and token count M; every GEMM takes operands already quantized, as both
vLLM's fp8 path and ours get their activation quant fused into the previous op under torch.compile):
  bf16          cuBLAS bf16 (x @ W^T)
  int8_cutlass  vLLM cutlass_scaled_mm, int8 x int8, per-token x per-channel scales fused
  fp8_cutlass   vLLM cutlass_scaled_mm, e4m3 x e4m3, per-token x per-channel scales fused
  sparse24      ours: 2:4 int8, both scales + bias fused, the kernel gemm_table.py picks for M (the
                decode GEMM up to the plan's measured decode_max_m, a CUTLASS config above)
  sparse24_fp8  ours: 2:4 e4m3, the same
  sparse24_pdl  ours: the CUTLASS config of sparse24's plan launched with programmatic dependent launch
                (back to back: a call's CTAs get resident and through their prologue while the
                previous call, which signals its dependents after its last mainloop, finishes)
  sparse24_decode  ours: the decode GEMM alone (csrc/decode/), at every M it serves (<= 64);
                _nopdl: launched without programmatic dependent launch (back to back, PDL lets a call
                start streaming its weight while the previous call finishes); _ub8: work units of
                8 blocks of 128 k instead of 4 (twice the bytes per tensor copy and ring stage)
  sparse24_fp8_decode  the same for e4m3
  w4a8          ours: a w4a8 2:4 layer (int4 values + group scales resident), as dispatched: the
                int4 decode GEMM up to its plan's decode_max_m (64 unless VLLM_SPARSE24_DECODE_MAX_M
                says otherwise), unpack into the shared scratch + the int8 CUTLASS config above
  w4a8_decode   ours: the int4 decode GEMM alone, at every M it serves (<= 64); _ub8: units of 8 blocks
  w4a8_unpack   ours: the prefill path alone (unpack kernel + int8 CUTLASS config) at every M
TB/s ("tbps") is bytes of the weight as stored over time: values + metadata for the sparse impls
(w4a8: int4 values + metadata + group scales), the dense weight for vLLM's; the summary prints both
per shape for the decode token counts.
With --search, every library config of the input dtype is also timed per shape and M (rows with
"impl": "cfg:<name>[/s<splits>][/w<swizzle>]"), and the best per cell is printed as a table to
paste into gemm_table.GEMM_TABLE.

Timing: CUDA-graph replay of R calls (R from a first estimate, >= 10), median of 5 replays, CUDA
events. Calls rotate over C copies of the weight (C x bytes >= 256 MB, several times the 60 MB L2),
so weights come from HBM as in serving. Writes DIR/kernels-<gpu>-<date>.json
({"gpu", "date", "torch", "vllm", "command", "rows": [{model, layer, N, K, M, impl, us, tbps}]})
and a PNG of speedup over fp8_cutlass vs M.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_sparse24 import format as fmt  # noqa: E402
from vllm_sparse24.kernels.cuda import build, int4_layout, lib  # noqa: E402
from vllm_sparse24.kernels.cuda.gemm_table import DTYPE_NAMES, cutlass_pdl  # noqa: E402
from vllm_sparse24.kernels.cuda.sparse24_linear import (  # noqa: E402
    _cutlass_mm,
    _unpack_mm,
    compress_24,
    decode_mm,
    make_plan,
    plan_of,
    sparse_mm,
    sparse_mm_w4a8,
)
from vllm_sparse24.quant import FP8, INT8, quantize_per_token  # noqa: E402

MODELS = {
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama3-70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
# decode GEMM launch variants timed beside the default launch (impl "sparse24_decode<tag>")
DECODE_TUNINGS: dict[str, lib.DecodeTuning | None] = {"": None, "_nopdl": lib.DecodeTuning(0, 0, 0),
                                                      "_ub8": lib.DecodeTuning(0, 0, 1, 8)}
ROTATE_BYTES = 256 << 20
FP8_MAX = 448.0
DEV = "cuda"


def vllm_ops():
    try:
        from vllm import _custom_ops as ops

        return ops
    except Exception as e:  # vLLM not installed here
        print(f"vLLM not importable ({type(e).__name__}: {e}): no int8_cutlass / fp8_cutlass rows", flush=True)
        return None


def graph_us(calls, reps: int) -> float:
    """GPU us per call: `calls()` issues `reps` calls; captured once, replayed, median of 5."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls()  # warm up (lazy init outside capture)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        calls()
    times = []
    for _ in range(6):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    del g
    return sorted(times[1:])[2]


def copies(nbytes: int) -> int:
    return max(1, -(-ROTATE_BYTES // max(nbytes, 1)))


def prune24(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    drop = g.float().abs().topk(2, dim=-1, largest=False).indices
    return g.scatter(-1, drop, torch.zeros_like(g[..., :2])).reshape(n, k)


def random_w4a8(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A random w4a8 2:4 weight on the GPU: int4 values in [-7, 7] pruned 2:4 (prune24) times a group
    scale 1..18 per row and 128 columns. Returns (CUTLASS's int8 values of the codes, their metadata,
    the int4 layout's values, its group scales)."""
    v4 = prune24(torch.randint(-7, 8, (n, k), device=DEV, dtype=torch.int8, generator=gen))
    gs = torch.randint(1, 19, (n, -(-k // 128)), device=DEV, dtype=torch.uint8, generator=gen)
    values8, meta = compress_24(fmt.int4_to_int8(v4, gs))
    return (values8, meta, *int4_layout.pack(values8, gs))


class Shape:
    """Operands of one layer shape, the weights in `copies` rotated copies."""

    def __init__(self, n: int, k: int, ops, gen: torch.Generator):
        self.n, self.k, self.ops = n, k, ops
        wf = torch.randn(n, k, device=DEV, generator=gen)
        self.ws = (torch.rand(n, device=DEV, generator=gen) * 1e-2 + 1e-4)
        self.bias = torch.randn(n, device=DEV, generator=gen).to(torch.bfloat16)
        w8 = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int16, generator=gen).to(torch.int8)
        wf8 = (wf * 100).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        self.c_bf16 = copies(n * k * 2)
        self.c_dense8 = copies(n * k)
        self.c_sparse = copies(n * k * 5 // 8)
        self.bf16 = [wf.to(torch.bfloat16) for _ in range(self.c_bf16)]
        self.i8 = [w8.clone() for _ in range(self.c_dense8)] if ops else []
        self.f8 = [wf8.clone() for _ in range(self.c_dense8)] if ops else []
        s8 = compress_24(prune24(w8))
        sf8 = compress_24(prune24(wf8.view(torch.int8)).view(torch.float8_e4m3fn))
        self.s8 = [(s8[0].clone(), s8[1].clone()) for _ in range(self.c_sparse)]
        self.sf8 = [(sf8[0].clone(), sf8[1].clone()) for _ in range(self.c_sparse)]
        # w4a8: the int4 layout of a random w4a8 weight
        values8, meta, values4, scales = random_w4a8(n, k, gen)
        self.w4_bytes = values4.numel() + meta.numel() + scales.numel()
        self.c_w4 = copies(self.w4_bytes)
        self.w4 = [(values4.clone(), meta.clone(), scales.clone()) for _ in range(self.c_w4)]
        self.ws2 = self.ws.reshape(-1, 1)
        del wf, values8

    def free(self):
        for name in ("bf16", "i8", "f8", "s8", "sf8", "w4"):
            setattr(self, name, [])


def time_impl(calls_one, ncopies: int) -> float:
    """calls_one(i) issues one call on weight copy i; R calls per graph, R chosen from one timed call."""
    calls_one(0)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    calls_one(min(1, ncopies - 1))
    b.record()
    b.synchronize()
    est_us = a.elapsed_time(b) * 1e3  # eager: an upper bound of the GPU time
    reps = max(10, ncopies, min(200, int(3000 / max(est_us, 1.0))))
    reps = -(-reps // ncopies) * ncopies
    return graph_us(lambda: [calls_one(i % ncopies) for i in range(reps)], reps)


def bench_shape(model, layer, sh: Shape, ms, search: str | None, plans, rows, gen):
    n, k, ops = sh.n, sh.k, sh.ops
    ids = lib.config_ids()
    so = lib.lib()
    sparse_bytes = sum(lib.compressed_bytes(n, k))  # values + metadata, as resident
    for m in ms:
        x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
        # the plugin's per-token quant (vllm_sparse24.quant), outside the timed calls as for every row
        xq8, xs = quantize_per_token(x, INT8)
        xqf8, xs8 = quantize_per_token(x, FP8)
        impls = {"bf16": (lambda i: torch.nn.functional.linear(x, sh.bf16[i]), sh.c_bf16, n * k * 2)}
        if ops is not None:
            impls["int8_cutlass"] = (lambda i: ops.cutlass_scaled_mm(xq8, sh.i8[i].t(), xs, sh.ws2, torch.bfloat16,
                                                                     sh.bias), sh.c_dense8, n * k)
            impls["fp8_cutlass"] = (lambda i: ops.cutlass_scaled_mm(xqf8, sh.f8[i].t(), xs8, sh.ws2, torch.bfloat16,
                                                                    sh.bias), sh.c_dense8, n * k)
        impls["sparse24"] = (lambda i: sparse_mm(xq8, xs, *sh.s8[i], sh.ws, sh.bias, plans["int8"]),
                             sh.c_sparse, sparse_bytes)
        impls["sparse24_fp8"] = (lambda i: sparse_mm(xqf8, xs8, *sh.sf8[i], sh.ws, sh.bias, plans["e4m3"]),
                                 sh.c_sparse, sparse_bytes)
        impls["sparse24_pdl"] = (lambda i: _cutlass_mm(xq8, xs, *sh.s8[i], sh.ws, sh.bias, plan_of(plans["int8"]),
                                                       pdl=True), sh.c_sparse, sparse_bytes)
        if m <= lib.decode_max_m() and k % 128 == 0:
            for tag, tuning in DECODE_TUNINGS.items():
                impls[f"sparse24_decode{tag}"] = (
                    lambda i, tuning=tuning: decode_mm(xq8, xs, *sh.s8[i], sh.ws, sh.bias, plans["int8"], tuning),
                    sh.c_sparse, sparse_bytes)
            impls["sparse24_fp8_decode"] = (
                lambda i: decode_mm(xqf8, xs8, *sh.sf8[i], sh.ws, sh.bias, plans["e4m3"]), sh.c_sparse, sparse_bytes)
        impls["w4a8"] = (lambda i: sparse_mm_w4a8(xq8, xs, *sh.w4[i], sh.ws, sh.bias, plans["w4a8"]),
                         sh.c_w4, sh.w4_bytes)
        impls["w4a8_unpack"] = (lambda i: _unpack_mm(xq8, xs, *sh.w4[i], sh.ws, sh.bias, plan_of(plans["w4a8"])),
                                sh.c_w4, sh.w4_bytes)
        if m <= lib.decode_max_m():
            for tag, tuning in (("", None), ("_ub8", DECODE_TUNINGS["_ub8"])):
                impls[f"w4a8_decode{tag}"] = (
                    lambda i, tuning=tuning: decode_mm(xq8, xs, sh.w4[i][0], sh.w4[i][1], sh.ws, sh.bias, plans["w4a8"],
                                                       tuning, group_scale=sh.w4[i][2]), sh.c_w4, sh.w4_bytes)
        if search:
            for name, cid in ids.items():
                if "_bf16_" not in name or not re.search(search, name):
                    continue
                fp8 = name.startswith("e4m3")
                xq_, xs_, w_ = (xqf8, xs8, sh.sf8) if fp8 else (xq8, xs, sh.s8)
                variants = [(1, 1)]
                if name.endswith("coopsk") and m <= 256:
                    variants = [(1, 1), (2, 1), (4, 1)]
                elif not name.endswith("_ws") and m >= 1024:
                    variants = [(1, 1), (1, 4)]
                for splits, swz in variants:
                    out = torch.empty(m, n, dtype=torch.bfloat16, device=DEV)
                    wsb = []  # sized on the first call (a config that cannot run the shape fails there)

                    def call(i, cid=cid, xq_=xq_, xs_=xs_, w_=w_, splits=splits, swz=swz, wsb=wsb, out=out):
                        if not wsb:
                            need = lib.workspace_bytes(cid, m, n, k, splits)
                            wsb.append(torch.empty(max(need, 1), dtype=torch.uint8, device=DEV))
                        rc = so.s24_gemm(cid, w_[i][0].data_ptr(), w_[i][1].data_ptr(), xq_.data_ptr(),
                                         xs_.data_ptr(), sh.ws.data_ptr(), sh.bias.data_ptr(), out.data_ptr(),
                                         m, n, k, splits, swz, wsb[0].data_ptr(), wsb[0].numel(),
                                         int(cutlass_pdl()),  # launched as serving launches them
                                         torch.cuda.current_stream().cuda_stream)
                        if rc:
                            lib.check(rc, name)
                    tag = f"cfg:{name}" + (f"/s{splits}" if splits > 1 else "") + (f"/w{swz}" if swz > 1 else "")
                    impls[tag] = (call, sh.c_sparse, n * k * 5 // 8)
        for impl, (fn, nc, nbytes) in impls.items():
            try:
                us = time_impl(fn, nc)
            except Exception as e:  # a config that cannot run this shape: record why, go on
                rows.append({"model": model, "layer": layer, "N": n, "K": k, "M": m, "impl": impl,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            rows.append({"model": model, "layer": layer, "N": n, "K": k, "M": m, "impl": impl, "us": round(us, 2),
                         "tbps": round(nbytes / us / 1e6, 3)})
        cells = {r["impl"]: r.get("us") for r in rows if r["layer"] == layer and r["M"] == m and r["model"] == model}
        fp8 = cells.get("fp8_cutlass")
        line = " ".join(f"{i}={cells[i]}" for i in ("bf16", "int8_cutlass", "fp8_cutlass", "sparse24", "sparse24_fp8",
                                                    *(f"sparse24_decode{t}" for t in DECODE_TUNINGS),
                                                    "sparse24_fp8_decode", "w4a8", "w4a8_decode", "w4a8_decode_ub8",
                                                    "w4a8_unpack")
                        if cells.get(i))
        ratio = f" sparse24/fp8={fp8 / cells['sparse24']:.2f}x" if fp8 and cells.get("sparse24") else ""
        print(f"{model} {layer} M={m}: {line}{ratio}", flush=True)


def best_configs(rows):
    """Per (model, layer, M): the fastest cfg:* row for int8 and for fp8."""
    best = {}
    for r in rows:
        if not r["impl"].startswith("cfg:") or "us" not in r:
            continue
        kind = "e4m3" if r["impl"].startswith("cfg:e4m3") else "int8"
        key = (r["model"], r["layer"], r["M"], kind)
        if key not in best or r["us"] < best[key][1]:
            best[key] = (r["impl"][4:], r["us"])
    return best


def propose_table(res: dict, classes: dict[str, list[str]]) -> dict:
    """From a --search result: per shape class (layers of MODELS) and measured M, the searched config
    (name[/s<splits>][/w<swizzle>]) with the least summed time over the class's layers, relative to
    each layer's best; adjacent M with the same pick merge into one bucket."""
    times: dict[tuple, dict[str, float]] = {}
    for r in res["rows"]:
        if r["impl"].startswith("cfg:i8_bf16") and "us" in r:
            times.setdefault((r["model"], r["layer"], r["M"]), {})[r["impl"][4:]] = r["us"]
    table = {}
    for cls, layers in classes.items():
        picks = []
        for m in sorted({key[2] for key in times}):
            cells = [times[(mo, la, m)] for mo, la in (x.split(":") for x in layers) if (mo, la, m) in times]
            common = set.intersection(*(set(c) for c in cells)) if cells else set()
            if not common:
                continue
            best = min(common, key=lambda cfg: sum(c[cfg] / min(c.values()) for c in cells))
            loss = max(c[best] / min(c.values()) for c in cells)
            picks.append((m, best, round(loss, 3)))
        merged = []
        for m, cfg, loss in picks:
            if merged and merged[-1][1] == cfg:
                merged[-1] = (m, cfg, max(loss, merged[-1][2]))
            else:
                merged.append((m, cfg, loss))
        table[cls] = merged
    return table


def table_report(paths: list[str]) -> list[dict]:
    """What gemm_table.GEMM_TABLE picks for every (layer, M) of --search results, timed in those runs
    beside vLLM's fp8 and int8 kernels (a later file's cell replaces an earlier one's)."""
    from vllm_sparse24.kernels.cuda.gemm_table import GEMM_TABLE, shape_class

    cells = {}
    for path in paths:
        res = json.load(open(path))
        runs = {}
        for r in res["rows"]:
            if "us" in r:
                runs.setdefault((r["model"], r["layer"], r["N"], r["K"], r["M"]), {})[r["impl"]] = r["us"]
        for key, impls in runs.items():
            cells[key] = {**impls, "_file": os.path.basename(path)}
    out = []
    for (model, layer, n, k, m), impls in sorted(cells.items()):
        rows = GEMM_TABLE[("int8", "bf16")][shape_class(n, k)]
        choice = next(c for b, c in rows if b is None or m <= b)
        tag = f"cfg:{choice.config}" + (f"/s{choice.splits}" if choice.splits > 1 else "") + (
            f"/w{choice.swizzle}" if choice.swizzle > 1 else "")
        if tag not in impls or "fp8_cutlass" not in impls:
            continue
        out.append({"model": model, "layer": layer, "N": n, "K": k, "M": m, "config": tag[4:], "us": impls[tag],
                    "fp8_cutlass_us": impls["fp8_cutlass"], "int8_cutlass_us": impls.get("int8_cutlass"),
                    "bf16_us": impls.get("bf16"), "vs_fp8": round(impls["fp8_cutlass"] / impls[tag], 3),
                    "tbps_compressed": round(n * k * 5 / 8 / impls[tag] / 1e6, 3), "file": impls["_file"]})
    return out


def _cells(rows) -> dict[tuple, float]:
    """(model, layer, M, impl) -> us of the rows that ran."""
    return {(r["model"], r["layer"], r["M"], r["impl"]): r["us"] for r in rows if "us" in r}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(rows)
    keys = sorted({(r["model"], r["layer"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, (model, layer) in zip(axes[0], keys, strict=True):
        ms = sorted({r["M"] for r in rows if (r["model"], r["layer"]) == (model, layer)})
        for impl, style in (("bf16", ":"), ("int8_cutlass", "--"), ("sparse24", "-o"), ("sparse24_fp8", "-x"),
                            ("sparse24_decode", "-+")):
            pts = [(m, cells[(model, layer, m, "fp8_cutlass")] / cells[(model, layer, m, impl)]) for m in ms
                   if (model, layer, m, impl) in cells and (model, layer, m, "fp8_cutlass") in cells]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl, markersize=3)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {layer}", fontsize=9)
        ax.set_xlabel("tokens M")
    axes[0][0].set_ylabel("speedup over vLLM fp8 (cutlass_scaled_mm)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--ms-70b", default="1,8,16,64,2048,8192", help="token counts for the 70B shapes")
    ap.add_argument("--search", nargs="?", const=".", default=None, metavar="REGEX",
                    help="also time every library config (whose name matches REGEX; see module doc)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--propose", default=None, metavar="SEARCH_JSON",
                    help="print a GEMM_TABLE proposal from a --search result (no GPU) and exit")
    ap.add_argument("--classes", default="narrow=llama3-8b:qkv,llama3-8b:o,llama3-8b:down,llama3-70b:qkv,llama3-70b:o;"
                    "wide=llama3-8b:gate_up,llama3-70b:gate_up,llama3-70b:down",
                    help="shape classes for --propose: name=model:layer,...;name=...")
    ap.add_argument("--table-report", nargs="+", default=None, metavar="SEARCH_JSON",
                    help="print (and write to --out) what gemm_table.GEMM_TABLE picks, timed in these --search results")
    args = ap.parse_args()
    if args.table_report:
        rep = table_report(args.table_report)
        for r in rep:
            print(f"{r['model']:10s} {r['layer']:8s} M={r['M']:5d} {r['config']:38s} {r['us']:9.2f} us  "
                  f"fp8 {r['fp8_cutlass_us']:9.2f} us  {r['vs_fp8']:.2f}x  {r['tbps_compressed']:.2f} TB/s")
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, os.path.basename(args.table_report[0]).replace("-search", "-table").replace(".json", ""))
        with open(stem + ".json", "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "sources": [os.path.basename(p) for p in args.table_report],
                       "note": "times measured in the source runs (same GPU run as the fp8/int8 baselines)",
                       "rows": rep}, f, indent=1)
        return
    if args.propose:
        classes = {c.split("=")[0]: c.split("=")[1].split(",") for c in args.classes.split(";")}
        for cls, rows in propose_table(json.load(open(args.propose)), classes).items():
            print(f"{cls}:")
            for m, cfg, loss in rows:
                print(f"  M <= {m:5d}: {cfg:42s} (worst layer {loss:.3f}x its own best)")
        return
    if args.search and len(lib.config_ids()) < len(build.config_rows()):
        print(f"note: the library holds {len(lib.config_ids())} of {len(build.config_rows())} configs; "
              "`python -m vllm_sparse24.build --search-configs` adds the search-only rows", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=DEV).manual_seed(0)
    ops = vllm_ops()
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    date = datetime.date.today().isoformat()
    ms = [int(m) for m in args.ms.split(",")]
    rows = []
    decode_max_m = {}  # "model:layer" -> the int8 plan's measured decode threshold
    t0 = time.time()
    for model in args.models.split(","):
        for layer, (n, k) in MODELS[model].items():
            if time.time() - t0 > args.budget_s:
                print(f"time budget spent: {model} {layer} not run", flush=True)
                continue
            sh = Shape(n, k, ops, gen)
            plans = {"int8": make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV)),
                     "e4m3": make_plan(n, k, torch.float8_e4m3fn, torch.bfloat16, torch.device(DEV)),
                     "w4a8": make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)}
            decode_max_m[f"{model}:{layer}"] = plan_of(plans["int8"]).decode_max_m
            model_ms = [int(m) for m in args.ms_70b.split(",")] if model == "llama3-70b" else ms
            bench_shape(model, layer, sh, model_ms, args.search, plans, rows, gen)
            sh.free()
            torch.cuda.empty_cache()
    vllm_version = None
    if ops is not None:
        import vllm

        vllm_version = vllm.__version__
    res = {"gpu": torch.cuda.get_device_name(), "date": date, "torch": torch.__version__, "cuda": torch.version.cuda,
           "vllm": vllm_version, "command": "python " + " ".join(sys.argv), "seconds": round(time.time() - t0),
           "dtype_names": sorted(set(DTYPE_NAMES.values())), "decode_max_m": decode_max_m, "rows": rows}
    if args.search:
        res["best"] = [{"model": a, "layer": b, "M": m, "kind": kind, "config": c, "us": us}
                       for (a, b, m, kind), (c, us) in sorted(best_configs(rows).items())]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kernels-{gpu}-{date}" + ("-search" if args.search else ""))
    with open(stem + ".json.tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    plot(rows, stem + ".png")
    print(f"wrote {stem}.json/.png ({res['seconds']} s)")
    summarize(res)


def summarize(res):
    cells = _cells(res["rows"])
    print("acceptance (sparse24 vs fp8_cutlass, fused scales+bias):")
    for (model, layer, m, impl), us in sorted(cells.items()):
        if impl == "sparse24" and (model, layer, m, "fp8_cutlass") in cells:
            r = cells[(model, layer, m, "fp8_cutlass")] / us
            rf = cells.get((model, layer, m, "sparse24_fp8"))
            extra = f"  fp8-sparse {cells[(model, layer, m, 'fp8_cutlass')] / rf:.2f}x" if rf else ""
            print(f"  {model:10s} {layer:8s} M={m:5d}: {r:.2f}x{extra}")
    tbps = {(r["model"], r["layer"], r["M"], r["impl"]): r["tbps"] for r in res["rows"] if "tbps" in r}
    print("decode (M <= 64): us and TB/s of the weight as stored; sparse24 = the dispatched kernel "
          "(decode GEMM up to decode_max_m)")
    for (model, layer, m, impl), us in sorted(cells.items()):
        if impl != "sparse24" or m > 64:
            continue
        thr = res.get("decode_max_m", {}).get(f"{model}:{layer}")
        parts = [f"{i} {cells[(model, layer, m, i)]:8.2f} us {tbps[(model, layer, m, i)]:5.2f} TB/s"
                 for i in ("sparse24", "sparse24_pdl", "sparse24_decode", "sparse24_decode_nopdl", "sparse24_decode_ub8",
                           "sparse24_fp8_decode", "w4a8", "w4a8_decode", "w4a8_decode_ub8", "w4a8_unpack", "fp8_cutlass")
                 if (model, layer, m, i) in cells]
        fp8 = cells.get((model, layer, m, "fp8_cutlass"))
        ratio = f"  time/fp8 {us / fp8:.2f}" if fp8 else ""
        print(f"  {model:10s} {layer:8s} M={m:3d} (decode_max_m {thr}): " + " | ".join(parts) + ratio)
    if "best" in res:
        print("best configs (int8):")
        for b in res["best"]:
            if b["kind"] == "int8":
                print(f"  {b['model']} {b['layer']} M={b['M']}: {b['config']} {b['us']}")
    errs = [r for r in res["rows"] if "error" in r]
    if errs:
        print(f"{len(errs)} rows failed, e.g. {errs[0]}")


if __name__ == "__main__":
    main()
