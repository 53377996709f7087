"""GPU test of the decode GEMM's timing-probe build (marker gpu; skipped without a Hopper GPU, the
plugin's library or libsparse24_decode_probe.so from `python -m vllm_sparse24.build --decode-probe`):
its output equals the plugin's decode GEMM bit for bit, with and without stamps, and every CTA's
stamps are in program order."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
from test_gpu_decode import quantized, random_24_gpu  # noqa: E402  (skips like it without a GPU / library)

from vllm_sparse24.kernels.cuda import build, lib  # noqa: E402
from vllm_sparse24.kernels.cuda.sparse24_linear import compress_24, decode_mm, make_plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decode_probe as dp  # noqa: E402

PROBE = build.probe_library_path(lib.library_path())
if not PROBE.is_file():
    pytest.skip(f"{PROBE} not built (python -m vllm_sparse24.build --decode-probe)", allow_module_level=True)

# each CTA's stamps in the order its threads pass them (thread 0 = consumer warp 0 lane 0)
PRODUCER = ["entry", "init", "prod_start", "prod_pre_issued", "prod_gdc", "prod_last", "prod_exit"]
CONSUMER = ["entry", "init", "cons_lut", "cons_gdc", "first_full", "first_math", "last_full", "last_math",
            "fin_last_in", "fin_last_out", "exit0"]
FINISH = ["first_math", "fin_first_in", "fin_first_out", "fin_last_in", "fin_last_out", "exit0"]


@pytest.mark.parametrize("n,k,m", [(4096, 4096, 1), (4096, 4096, 8), (256, 4096, 5), (28672, 4096, 16)])
def test_probe_build_matches_and_stamps_in_order(n, k, m):
    so = dp.load_probe(PROBE)
    w = random_24_gpu(n, k, seed=n + k)
    values, meta = compress_24(w)
    ws = torch.rand(n, device="cuda") * 1e-2 + 1e-4
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device("cuda"))
    xq, xs = quantized(m, k, torch.Generator().manual_seed(m))
    ref = decode_mm(xq, xs, values, meta, ws, None, plan)
    probe = dp.ProbeGemm(so, values, meta, ws, n, k)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    stamps = torch.zeros(probe.ctas, dp.SLOTS, dtype=torch.int64, device="cuda")
    xs1 = xs.reshape(-1).float().contiguous()
    probe(xq, xs1, out)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    assert not stamps.any()  # no buffer set: nothing written
    out.zero_()
    probe(xq, xs1, out, stamps)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    rec = stamps.cpu().numpy().astype(np.uint64)
    units, ctas, per_tile = lib.decode_partition(n, k)
    assert rec.shape[0] == ctas
    assert rec[:, dp.SLOT["count"]].sum() == units
    assert (rec[:, dp.SLOT["smid"]] < torch.cuda.get_device_properties(0).multi_processor_count).all()
    for c in range(ctas):
        # one unit: its full barrier is both the first and the last, then its math
        consumer = CONSUMER if rec[c, dp.SLOT["count"]] > 1 else [s for s in CONSUMER if s != "first_math"]
        for chain in (PRODUCER, consumer, FINISH):
            t = [int(rec[c, dp.SLOT[s]]) for s in chain]
            assert all(t) and t == sorted(t), (c, dict(zip(chain, t, strict=True)))
        cnt = min(int(rec[c, dp.SLOT["count"]]), dp.PROBE_UNITS)
        full = rec[c, dp.UNIT_FULL:dp.UNIT_FULL + cnt].astype(np.int64)
        math = rec[c, dp.UNIT_MATH:dp.UNIT_MATH + cnt].astype(np.int64)
        issue = rec[c, dp.UNIT_ISSUE:dp.UNIT_ISSUE + cnt].astype(np.int64)
        assert (full > 0).all() and (math >= full).all() and (full[1:] >= math[:-1]).all(), c
        assert (issue > 0).all() and (np.diff(issue) >= 0).all(), c
        assert not rec[c, dp.UNIT_FULL + cnt:dp.UNIT_FULL + dp.PROBE_UNITS].any()
        assert rec[c, dp.SLOT["first_full"]] == rec[c, dp.UNIT_FULL]
        # the fixup's sum is stamped only by a CTA that finished a split tile, inside a finish call
        fs = int(rec[c, dp.SLOT["fixup_sum"]])
        if fs:
            assert rec[c, dp.SLOT["fin_first_in"]] <= fs <= rec[c, dp.SLOT["fin_last_out"]]
    # a CTA's math and issue stamps are not ordered against each other, but both follow its entry
    assert (rec[:, dp.UNIT_ISSUE] >= rec[:, dp.SLOT["entry"]]).all()


def test_omitting_the_cache_hint_keeps_the_result_and_the_knob_resets():
    """Omit bit 1 (no L2 hint) changes no byte that arrives: same output; after bit 2 (no activation
    copies, wrong output by design), setting the knob back to 0 gives the exact output again."""
    n, k, m = 4096, 4096, 8
    so = dp.load_probe(PROBE)
    values, meta = compress_24(random_24_gpu(n, k, seed=7))
    ws = torch.rand(n, device="cuda") * 1e-2 + 1e-4
    plan = make_plan(n, k, torch.int8, torch.bfloat16, torch.device("cuda"))
    xq, xs = quantized(m, k, torch.Generator().manual_seed(3))
    ref = decode_mm(xq, xs, values, meta, ws, None, plan)
    probe = dp.ProbeGemm(so, values, meta, ws, n, k)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    xs1 = xs.reshape(-1).float().contiguous()
    so.s24_decode_probe_set_omit(1)
    probe(xq, xs1, out)
    so.s24_decode_probe_set_omit(2)
    out2 = torch.empty_like(out)
    probe(xq, xs1, out2)
    so.s24_decode_probe_set_omit(0)
    out3 = torch.empty_like(out)
    probe(xq, xs1, out3)
    torch.cuda.synchronize()
    assert torch.equal(out, ref) and torch.equal(out3, ref)
