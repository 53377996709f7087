"""Drive the decode GEMM through its edge cases under compute-sanitizer (needs a Hopper GPU and the
built library):

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/offline_host/memcheck.py

Partial 64-row tiles (N not a multiple of 64), odd token counts, every token tile instance (M 1..64),
row tiles split across CTAs (the fixup) with its ticket re-arm across two calls, a shallow ring and
few CTAs (the ring wraps around), PDL on and off, strided rows, bias and none, fp16 output, e4m3
inputs, and int4 (w4a8) weights: the int4 decode variant (a partial last 128-column block too) and the
unpack kernel. Prints one line per case; a memory error makes the sanitizer
exit non-zero. The decode threshold is forced (no load-time timing under the sanitizer).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("VLLM_SPARSE24_DECODE_MAX_M", "32")

from gemm_bench import random_w4a8  # noqa: E402

from vllm_sparse24.kernels.cuda import lib  # noqa: E402
from vllm_sparse24.kernels.cuda.sparse24_linear import (  # noqa: E402
    compress_24,
    decode_mm,
    make_plan,
    unpack_int4,
)

DEV = "cuda"
# default launch, no PDL with a 2-stage ring, 3 CTAs (long per-CTA ranges, ring wrap-around), and
# units of 8 blocks (default ring; 2 stages on 3 CTAs)
TUNINGS = [None, lib.DecodeTuning(2, 0, 0), lib.DecodeTuning(0, 3, 1), lib.DecodeTuning(0, 0, 1, 8),
           lib.DecodeTuning(2, 3, 0, 8)]
CASES = [  # (n, k, weight dtype, out dtype)
    (200, 384, torch.int8, torch.bfloat16),
    (72, 1152, torch.int8, torch.float16),
    (256, 4096, torch.int8, torch.bfloat16),     # split K across CTAs
    (4104, 2048, torch.int8, torch.bfloat16),    # many rows, partial last tile
    (96, 4096, torch.float8_e4m3fn, torch.bfloat16),
]
INT4_CASES = [(200, 384), (136, 576), (256, 4096), (1000, 2304)]  # (n, k): K = 576 ends in a partial block


def main() -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    for n, k, wdt, odt in CASES:
        # bytes 1..119: finite as int8 and as e4m3 (0x7f / 0xff would be e4m3 NaN)
        w = torch.randint(1, 120, (n, k), generator=gen, device=DEV, dtype=torch.int16).to(torch.int8)
        drop = torch.rand(n, k // 4, 4, generator=gen, device=DEV).topk(2, dim=-1).indices
        w = w.reshape(n, k // 4, 4).scatter(-1, drop, 0).reshape(n, k).view(wdt)
        values, meta = compress_24(w)
        ws = torch.rand(n, generator=gen, device=DEV) * 1e-2
        bias = torch.randn(n, generator=gen, device=DEV).to(odt)
        plan = make_plan(n, k, wdt, odt, torch.device(DEV))
        for m in (1, 3, 8, 9, 16, 17, 32, 33, 64):
            wide = torch.randint(1, 64, (m, k + 32), generator=gen, device=DEV, dtype=torch.int8)
            xq = wide[:, 16:16 + k].view(wdt)  # rows 16-byte aligned, k + 32 bytes apart
            xs = torch.rand(m, 1, generator=gen, device=DEV) * 1e-2
            for b in (bias, None):
                for tuning in TUNINGS:
                    for _ in range(2):  # the fixup re-arms its tickets between calls
                        out = decode_mm(xq, xs, values, meta, ws, b, plan, tuning)
            torch.cuda.synchronize()
            units, ctas, _ = lib.decode_partition(n, k)
            print(f"n={n} k={k} {wdt} -> {odt} m={m} ({units} units on {ctas} CTAs): "
                  f"finite={bool(torch.isfinite(out).all())}", flush=True)
    for n, k in INT4_CASES:
        values8, meta, values4, scales = random_w4a8(n, k, gen)
        ws = torch.rand(n, generator=gen, device=DEV) * 1e-2
        bias = torch.randn(n, generator=gen, device=DEV).to(torch.bfloat16)
        plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device(DEV), int4=True)
        for m in (1, 8, 9, 33, 64):
            xq = torch.randint(1, 64, (m, k), generator=gen, device=DEV, dtype=torch.int8)
            xs = torch.rand(m, 1, generator=gen, device=DEV) * 1e-2
            for tuning in TUNINGS:
                for _ in range(2):
                    out = decode_mm(xq, xs, values4, meta, ws, bias, plan, tuning, group_scale=scales)
            torch.cuda.synchronize()
            print(f"int4 n={n} k={k} m={m}: finite={bool(torch.isfinite(out).all())}", flush=True)
        unpacked = unpack_int4(values4, scales, plan)
        torch.cuda.synchronize()
        print(f"int4 unpack n={n} k={k}: equal={torch.equal(unpacked, values8)}", flush=True)
    print("memcheck driver done")


if __name__ == "__main__":
    main()
