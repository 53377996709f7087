"""Localize faults: each kernel alone, synchronized. Run under compute-sanitizer (memcheck):
  compute-sanitizer --error-exitcode 9 python benchmarks/debug_decode.py [--ext]
--ext: only the C++ extension op (sparse24_ext::linear) at small shapes, odd M, bias, fp16.
"""
import os
import sys

import torch

sys.path.insert(0, ".")
if "--ext" in sys.argv:
    os.environ.update(VLLM_SPARSE24_MAX_TOKENS="64", VLLM_SPARSE24_COLD_SEARCH="0")
    from vllm_sparse24.kernels.cuda import ext
    from vllm_sparse24.kernels.cuda.linear import Sparse24CudaKernel
    from vllm_sparse24.quant import quantize_per_token

    n, k = 768, 1024  # 768 rows: every rows-per-block config (16, 32, 48, 64) divides it
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    drop = torch.rand(n, k // 4, 4, device="cuda").topk(2, dim=-1).indices
    w = w.reshape(n, k // 4, 4).scatter(-1, drop, 0).reshape(n, k)
    ws = torch.rand(n, 1, device="cuda") * 1e-3
    kern = Sparse24CudaKernel(n, k, True, "dbg")
    t = kern.prepare(w, ws)
    print("path", kern.describe()["path"], ext.error(), flush=True)
    for dt in (torch.bfloat16, torch.float16):
        for m in (1, 3, 16, 17, 255, 300):
            x = torch.randn(m, k, device="cuda").to(dt)
            bias = torch.randn(n, device="cuda").to(dt)
            out = kern.apply(t, x, bias)
            torch.cuda.synchronize()
            if kern.activations_quantized(m):
                q, s = quantize_per_token(x)
                acc = (q.double() @ w.double().t()) * s.double()
            else:  # the C++ decode kernel: W8A16
                acc = x.double() @ w.double().t()
            ref = acc * ws.double().reshape(1, -1) + bias.double()
            print(dt, m, "rel err", float((out.double() - ref).norm() / ref.norm()), flush=True)
    print("ext_decode", kern.describe()["ext_decode"], flush=True)
    worst = [0.0, 0.0]
    for dt in (torch.bfloat16, torch.float16):  # the decode kernel alone, every config
        for m in (1, 5, 16):
            x = torch.randn(m, k, device="cuda").to(dt)
            bias = torch.randn(n, device="cuda").to(dt)
            ref = (x.double() @ w.double().t()) * ws.double().reshape(1, -1) + bias.double()
            for kind in (0, 1):
                for rows in (16, 32, 48, 64):
                    for warps in (1, 3, 16):
                        out = ext.decode_direct()(x, t["weight_cslt"], t["weight_scale"], bias, rows, warps, 64, kind)
                        torch.cuda.synchronize()
                        err = float((out.double() - ref).norm() / ref.norm())
                        worst[kind] = max(worst[kind], err)
    print("decode kernels (0: dense mma, 1: mma.sp), every config: worst rel err", worst, flush=True)
    sys.exit(0)
from vllm_sparse24.kernels.cuda import cslt, layout  # noqa: E402
from vllm_sparse24.kernels.cuda.decode_kernel import DecodeConfig, sparse24_decode  # noqa: E402

n, k = 512, 1024
w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
drop = torch.rand(n, k // 4, 4, device="cuda").topk(2, dim=-1).indices
w = w.reshape(n, k // 4, 4).scatter(-1, drop, 0).reshape(n, k)
buf = torch._cslt_compress(w)
print("decompress ok", torch.equal(layout.decompress(buf, n, k), w), flush=True)
ws = torch.rand(n, device="cuda") * 1e-3
x = torch.randint(-127, 128, (16, k), device="cuda", dtype=torch.int8)
xs = torch.rand(16, device="cuda")
ref = (x.double() @ w.double().t()) * xs.double()[:, None] * ws.double()[None, :]
acc = torch.zeros(64 * n, dtype=torch.int32, device="cuda")
cnt = torch.zeros(4 * n // 16, dtype=torch.int32, device="cuda")
for cfg in [DecodeConfig(16, 128, 1), DecodeConfig(16, 256, 1), DecodeConfig(32, 256, 2), DecodeConfig(64, 128, 4),
            DecodeConfig(16, 512, 2), DecodeConfig(128, 128, 8, 8)]:
  for m in (1, 3, 16):
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    try:
        sparse24_decode(x[:m], xs[:m], buf, ws, None, out, n, k, cfg, 64, acc, cnt)
        torch.cuda.synchronize()
        err = float((out.double() - ref[:m]).norm() / ref[:m].norm())
        print(cfg, "rel err", err, "acc zero", int(acc.abs().sum()), "cnt zero", int(cnt.abs().sum()), flush=True)
        assert err < 4e-3 and int(acc.abs().sum()) == 0 and int(cnt.abs().sum()) == 0, cfg
    except Exception as e:
        print(cfg, "FAILED", repr(e)[:300], flush=True)
        raise
for m_pad in (16, 256):
    p = cslt.SparseInt8Plan(m_pad, n, k, torch.device("cuda"))
    p.search(buf, ws)
    xq = torch.randint(-127, 128, (m_pad, k), device="cuda", dtype=torch.int8)
    d = torch.empty(m_pad, n, dtype=torch.bfloat16, device="cuda")
    p.run(buf, xq, ws, d)
    torch.cuda.synchronize()
    r = (xq.double() @ w.double().t()) * ws.double()[None, :]
    print("cslt", m_pad, p.alg_id, p.split_k, "ws bytes", p.workspace.numel(), "rel err", float((d.double() - r).norm() / r.norm()), flush=True)
