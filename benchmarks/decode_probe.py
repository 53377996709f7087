"""Where a decode GEMM call spends its time, CTA by CTA: runs the decode GEMM's timing-probe build
(``python -m vllm_sparse24.build --decode-probe`` builds libsparse24_decode_probe.so; the kernel of
csrc/decode/decode_gemm.cu with per-CTA %globaltimer stamps) on a few Llama-3 shapes at M = 1 and 8.

Each case runs the sequence  mark, decode x CALLS, mark  (a mark is a one-thread kernel stamping
%globaltimer: when the work before it ended) three ways: eager on a warm stream ("warm", the second
run), replayed from a CUDA graph ("graph") and the graph after a 256 MB memset that evicts the weight
from L2 ("graph-cold"). Printed per call: each stamp's median and max over CTAs in us after the
call's earliest kernel entry, the per-unit stream (first units' full-barrier and math stamps), the
gaps between calls and to the marks; then graph-replay times of the normal decode GEMM, the probe
build and the CUTLASS GEMM on the same operands (the probe's own cost), and whether the probe's
output equals the normal library's bit for bit. --out gets one PNG timeline per case (a row per
CTA, colored phases) and the raw stamps (stamps.npz) for reading again without a GPU.

    python benchmarks/decode_probe.py --out probe_out [--lib path/to/libsparse24_decode_probe.so] [--int4]

--int4 runs the int4 (w4a8) variant on int4 values x group scales (the CUTLASS time beside it is the
int8 GEMM on the same int8 codes). --omit 2,4,8,14 also times the probe build with kinds of copies left
out (bits: 1 the weight copies' L2 hint, 2 activations, 4 metadata, 8 values; the outputs are then
wrong): per call and the ring's full-to-full interval, to see which copy paces the ring.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

# csrc/decode/decode_gemm.cu kProbeSlotNames, in slot order (checked against the library on load)
FIXED = ["entry", "init", "smid", "count", "finish_calls",
         "prod_start", "prod_pre_issued", "prod_gdc", "prod_last", "prod_exit",
         "cons_lut", "cons_gdc", "first_full", "first_math", "last_full", "last_math",
         "fin_first_in", "fin_first_out", "fin_last_in", "fin_last_out", "fixup_sum",
         "exit0", "exit1", "exit2", "exit3"]
RAW = {"smid", "count", "finish_calls"}  # values, not times
PROBE_UNITS = 32
UNIT_ISSUE, UNIT_FULL, UNIT_MATH = 32, 32 + PROBE_UNITS, 32 + 2 * PROBE_UNITS
SLOTS = 32 + 3 * PROBE_UNITS
SLOT = {name: i for i, name in enumerate(FIXED)}
TIMES = [n for n in FIXED if n not in RAW]
# The timeline's phases: (label, from stamp, to stamp), drawn in this order
PHASES = [
    ("prologue (entry -> barriers init)", "entry", "init"),
    ("LUT + consumer sync", "init", "cons_lut"),
    ("griddepcontrol.wait (consumers)", "cons_lut", "cons_gdc"),
    ("wait for first stage", "cons_gdc", "first_full"),
    ("stream (first stage full -> last math)", "first_full", "last_math"),
    ("finish / fixup (last)", "fin_last_in", "fin_last_out"),
    ("tail (-> warp 0 exit)", "fin_last_out", "exit0"),
]

# csrc/decode/decode_gemm.cu ProbeOmit
OMIT_BITS = {1: "hint", 2: "act", 4: "meta", 8: "values"}


def omit_label(bits: int) -> str:
    return "+".join(name for b, name in OMIT_BITS.items() if bits & b) or "nothing"


SHAPES = {  # name: (n, k)
    "8b-o": (4096, 4096),
    "8b-gate_up": (28672, 4096),
    "70b-o": (8192, 8192),
}


# ---- parsing (no GPU) ----------------------------------------------------------------------------

def call_origin(rec: np.ndarray) -> int:
    """The call's earliest kernel entry (ns), over CTAs that stamped one: rec [ctas, SLOTS] uint64."""
    entries = rec[:, SLOT["entry"]]
    entries = entries[entries > 0]
    if entries.size == 0:
        raise ValueError("no CTA stamped its entry: was the probe buffer set before the launch?")
    return int(entries.min())


def relative_us(rec: np.ndarray, t0: int | None = None) -> np.ndarray:
    """Stamps as float us after t0 (default: the call's earliest entry); NaN where a slot is unset (0).
    Raw-value slots are NaN too."""
    t0 = call_origin(rec) if t0 is None else t0
    rel = np.where(rec > 0, (rec.astype(np.int64) - np.int64(t0)) / 1e3, np.nan)
    for name in RAW:
        rel[:, SLOT[name]] = np.nan
    return rel


def summarize(rec: np.ndarray, t0: int | None = None) -> dict[str, tuple[float, float, int]]:
    """Per fixed time stamp: (median us, max us, CTAs that stamped it), times after t0."""
    rel = relative_us(rec, t0)
    out = {}
    for name in TIMES:
        col = rel[:, SLOT[name]]
        col = col[~np.isnan(col)]
        out[name] = (float(np.median(col)), float(col.max()), int(col.size)) if col.size else (np.nan, np.nan, 0)
    return out


def unit_stream(rec: np.ndarray, t0: int | None = None, units: int = 8) -> dict[str, list[float]]:
    """Median over CTAs of the first ``units`` units' producer issue, full barrier and math-done stamps
    (us after t0), and the median per-unit interval of full-barrier completions past the first."""
    rel = relative_us(rec, t0)
    res = {}
    for name, base in (("issue", UNIT_ISSUE), ("full", UNIT_FULL), ("math", UNIT_MATH)):
        block = rel[:, base:base + min(units, PROBE_UNITS)]
        res[name] = [float(np.nanmedian(c)) if np.isfinite(c).any() else np.nan for c in block.T]
    full = rel[:, UNIT_FULL:UNIT_FULL + PROBE_UNITS]
    steps = np.diff(full, axis=1)[:, 1:]  # past the first unit (which includes the prologue)
    steps = steps[np.isfinite(steps)]
    res["full_interval"] = [float(np.median(steps))] if steps.size else [np.nan]
    return res


def phase_durations(rec: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per timeline phase, each CTA's own duration (its two stamps' difference): (median, max) us over
    CTAs, so launch skew between CTAs does not enter; plus entry -> warp 0 exit."""
    rel = relative_us(rec)
    out = {}
    for label, a, b in PHASES + [("whole CTA (entry -> warp 0 exit)", "entry", "exit0")]:
        d = rel[:, SLOT[b]] - rel[:, SLOT[a]]
        d = d[np.isfinite(d)]
        out[label] = (float(np.median(d)), float(d.max())) if d.size else (np.nan, np.nan)
    return out


def timer_step_ns(recs: list[np.ndarray]) -> int:
    """The globaltimer's apparent resolution: the smallest positive difference among all time stamps
    (coarse, e.g. 1000 ns, where the GPU updates the timer slowly: read per-CTA phases as +- one step)."""
    vals = np.concatenate([r[:, [SLOT[n] for n in TIMES]].ravel() for r in recs]
                          + [r[:, 32:].ravel() for r in recs])
    vals = np.unique(vals[vals > 0].astype(np.int64))
    d = np.diff(vals)
    return int(d[d > 0].min()) if d.size and (d > 0).any() else 0


def gaps_us(recs: list[np.ndarray], marks: tuple[int, int]) -> dict[str, float]:
    """Between consecutive calls and the marks, in us: mark before -> first call's earliest entry,
    call c's last exit -> call c+1's earliest entry, call period (earliest entry to earliest entry),
    last call's last exit -> mark after."""
    def last_exit(r):
        ex = r[:, [SLOT[f"exit{w}"] for w in range(4)] + [SLOT["prod_exit"]]]
        return int(ex[ex > 0].max())
    out = {"mark->entry0": (call_origin(recs[0]) - marks[0]) / 1e3}
    for c in range(len(recs) - 1):
        out[f"exit{c}->entry{c + 1}"] = (call_origin(recs[c + 1]) - last_exit(recs[c])) / 1e3
        out[f"period{c}"] = (call_origin(recs[c + 1]) - call_origin(recs[c])) / 1e3
    out[f"exit{len(recs) - 1}->mark"] = (marks[1] - last_exit(recs[-1])) / 1e3
    out["mark->mark"] = (marks[1] - marks[0]) / 1e3
    return out


def report(case: str, recs: list[np.ndarray], marks: tuple[int, int]) -> str:
    lines = [f"== {case}: {recs[0].shape[0]} CTAs, units per CTA {int(recs[0][:, SLOT['count']].min())}.."
             f"{int(recs[0][:, SLOT['count']].max())}, timer step {timer_step_ns(recs)} ns"]
    for c, rec in enumerate(recs):
        s = summarize(rec)
        cells = [f"{n} {med:.2f}/{mx:.2f}" + (f" ({cnt})" if cnt != rec.shape[0] else "")
                 for n, (med, mx, cnt) in s.items() if cnt]
        lines.append(f"  call {c} (median/max us after the earliest entry): " + ", ".join(cells))
        d = phase_durations(rec)
        lines.append("    per-CTA phases (median/max us): " + ", ".join(
            f"{label.split(' (')[0]} {med:.2f}/{mx:.2f}" for label, (med, mx) in d.items()))
        u = unit_stream(rec)
        lines.append("    units (median us) issued " + " ".join(f"{v:.2f}" for v in u["issue"])
                     + " | full " + " ".join(f"{v:.2f}" for v in u["full"])
                     + " | math " + " ".join(f"{v:.2f}" for v in u["math"])
                     + f" | full-to-full {u['full_interval'][0]:.3f}")
    lines.append("  gaps (us): " + ", ".join(f"{k} {v:.2f}" for k, v in gaps_us(recs, marks).items()))
    return "\n".join(lines)


def plot(path: Path, title: str, recs: list[np.ndarray], marks: tuple[int, int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = marks[0]
    ctas = recs[0].shape[0]
    fig, ax = plt.subplots(figsize=(14, max(4.0, ctas * 0.06)))
    colors = plt.get_cmap("tab10").colors
    for c, rec in enumerate(recs):
        rel = relative_us(rec, t0)
        for pi, (label, a, b) in enumerate(PHASES):
            x0, x1 = rel[:, SLOT[a]], rel[:, SLOT[b]]
            ok = np.isfinite(x0) & np.isfinite(x1)
            ax.barh(np.arange(ctas)[ok], (x1 - x0)[ok], left=x0[ok], height=0.9, color=colors[pi],
                    label=label if c == 0 else None, linewidth=0)
        for name, marker, color in (("prod_gdc", "|", "k"), ("prod_last", "x", "k"), ("fixup_sum", "*", "r")):
            x = rel[:, SLOT[name]]
            ok = np.isfinite(x)
            ax.scatter(x[ok], np.arange(ctas)[ok], marker=marker, s=6, color=color,
                       label=f"producer {name}" if c == 0 and name != "fixup_sum" else (
                           "fixup: last arriver sums" if c == 0 else None))
    for m in marks:
        ax.axvline((m - t0) / 1e3, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("us after the mark kernel before the first call")
    ax.set_ylabel("CTA")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the GPU run ---------------------------------------------------------------------------------

def load_probe(path: Path):
    from vllm_sparse24.kernels.cuda import lib

    if not path.is_file():
        sys.exit(f"{path} is missing: build it with `python -m vllm_sparse24.build --decode-probe`")
    so = ctypes.CDLL(str(path))
    if not hasattr(so, "s24_decode_probe_set"):
        sys.exit(f"{path} is not a probe build (no s24_decode_probe_set)")
    lib.declare_decode(so)
    for fn in (so.s24_decode_probe_slots, so.s24_decode_probe_units, so.s24_decode_probe_fixed):
        fn.restype = ctypes.c_int
    so.s24_decode_probe_slot_name.restype = ctypes.c_char_p
    so.s24_decode_probe_slot_name.argtypes = [ctypes.c_int]
    so.s24_decode_probe_set.argtypes = [ctypes.c_void_p]
    so.s24_decode_probe_set.restype = None
    so.s24_decode_probe_mark.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    so.s24_decode_probe_mark.restype = ctypes.c_int
    so.s24_decode_probe_set_omit.argtypes = [ctypes.c_int]
    so.s24_decode_probe_set_omit.restype = None
    names = [so.s24_decode_probe_slot_name(i).decode() for i in range(so.s24_decode_probe_fixed())]
    if (names, so.s24_decode_probe_slots(), so.s24_decode_probe_units()) != (FIXED, SLOTS, PROBE_UNITS):
        sys.exit(f"{path}: stamp layout {names}, {so.s24_decode_probe_slots()} slots differs from this script's")
    return so


class ProbeGemm:
    """The probe library's decode GEMM on one layer's operands, writing into a fixed output."""

    def __init__(self, so, values, meta, w_scale, n: int, k: int, group_scale=None, unit_blocks: int = 0):
        import torch

        from vllm_sparse24.kernels.cuda import lib

        self.tuning = lib.DecodeTuning(0, 0, 1, unit_blocks)  # the default launch but for the unit size

        self.so, self.values, self.meta, self.w_scale, self.n, self.k = so, values, meta, w_scale, n, k
        self.group_scale = group_scale  # int4 values when given
        self.in_dtype = 0 if group_scale is None else lib.INT4
        need = ctypes.c_int64()
        lib.check_decode(so.s24_decode_workspace_bytes(64, n, k, ctypes.byref(need)), "probe workspace")
        self.ws = torch.zeros(need.value, dtype=torch.uint8, device=values.device)
        units, ctas, per_tile = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        lib.check_decode(so.s24_decode_partition(n, k, 0, unit_blocks, ctypes.byref(units), ctypes.byref(ctas),
                                                 ctypes.byref(per_tile)), "probe partition")
        self.ctas = ctas.value

    def __call__(self, xq, xs, out, stamps=None) -> None:
        import torch

        self.so.s24_decode_probe_set(None if stamps is None else stamps.data_ptr())
        rc = self.so.s24_decode_gemm(
            self.in_dtype, 2, self.values.data_ptr(), self.meta.data_ptr(),
            None if self.group_scale is None else self.group_scale.data_ptr(), xq.data_ptr(), self.k, xs.data_ptr(),
            self.w_scale.data_ptr(), None, out.data_ptr(), xq.shape[0], self.n, self.k, self.ws.data_ptr(),
            self.ws.numel(), ctypes.byref(self.tuning), torch.cuda.current_stream().cuda_stream)
        self.so.s24_decode_probe_set(None)
        if rc:
            raise RuntimeError(f"probe decode GEMM: {self.so.s24_decode_last_error().decode()} ({rc})")


def graph_us(fn, reps: int = 20) -> float:
    """Median per-call us of a CUDA graph of `reps` calls (gemm_bench's timing)."""
    from gemm_bench import graph_us as graph_us_of_calls

    return graph_us_of_calls(lambda: [fn() for _ in range(reps)], reps)


def run_case(so, name: str, n: int, k: int, ms: list[int], calls: int, out_dir: Path, flush, raw: dict,
             int4: bool = False, omits: tuple[int, ...] = (), unit_blocks: int = 0) -> list[str]:
    import torch
    from gemm_bench import prune24, random_w4a8

    from vllm_sparse24.kernels.cuda.sparse24_linear import compress_24, make_plan

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(n ^ k)
    if int4:  # the int4 layout of a random w4a8 weight; CUTLASS runs on its int8 codes
        values8, meta, values, scales = random_w4a8(n, k, gen)
    else:
        w = prune24(torch.randint(-127, 128, (n, k), generator=gen, device=dev, dtype=torch.int16).to(torch.int8))
        values8, meta = compress_24(w)
        values, scales = values8, None
        del w
    ws = torch.rand(n, generator=gen, device=dev) * 1e-2 + 1e-4
    plan8 = make_plan(n, k, torch.int8, torch.bfloat16, dev)
    plan = make_plan(n, k, torch.int8, torch.bfloat16, dev, int4=True) if int4 else plan8
    probe = ProbeGemm(so, values, meta, ws, n, k, scales, unit_blocks)
    lines, tag = [], ("int4 " if int4 else "") + (f"ub{unit_blocks} " if unit_blocks else "")
    for m in ms:
        xq, xs = quantize(m, k, gen)
        key = f"{name}{'_int4' if int4 else ''}{f'_ub{unit_blocks}' if unit_blocks else ''}_m{m}"
        lines += run_m(so, probe, key, f"{tag}{name} [{n}x{k}] M={m}", xq, xs,
                       plan, (values8, plan8), calls, out_dir, flush, raw, omits)
    return lines


def quantize(m: int, k: int, gen):
    import torch

    from vllm_sparse24.quant import quantize_per_token

    return quantize_per_token(torch.randn(m, k, generator=gen, device=gen.device))


def run_m(so, probe: ProbeGemm, key: str, title: str, xq, xs, plan, cutlass: tuple, calls: int, out_dir: Path,
          flush, raw: dict, omits: tuple[int, ...] = ()) -> list[str]:
    """``cutlass``: (int8 values, plan) of the CUTLASS GEMM timed beside the decode GEMM; ``omits``:
    ProbeOmit bit sets timed after it."""
    import torch

    from vllm_sparse24.kernels.cuda.sparse24_linear import _cutlass_mm, decode_mm, plan_of

    dev = xq.device
    m, n = xq.shape[0], probe.n
    values, meta, ws, gs = probe.values, probe.meta, probe.w_scale, probe.group_scale
    xs1 = xs.reshape(-1).float().contiguous()  # the C ABI's [m] float32 scales
    out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
    stamps = torch.zeros(calls, probe.ctas, SLOTS, dtype=torch.int64, device=dev)
    marks = torch.zeros(2, dtype=torch.int64, device=dev)

    def mark(i: int) -> None:
        so.s24_decode_probe_mark(marks[i:].data_ptr(), torch.cuda.current_stream().cuda_stream)

    def sequence():
        mark(0)
        for c in range(calls):
            probe(xq, xs1, out, stamps[c])
        mark(1)

    def flushed():
        flush.zero_()
        sequence()

    def recorded():
        return stamps.cpu().numpy().astype(np.uint64), marks.cpu().numpy().astype(np.uint64)

    results = {}
    sequence()  # first call: module load, lazy init
    torch.cuda.synchronize()
    stamps.zero_()
    marks.zero_()
    sequence()
    torch.cuda.synchronize()
    results["warm"] = recorded()
    for mode, fn in (("graph", sequence), ("graph-cold", flushed)):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(2):  # the second replay is recorded
            stamps.zero_()
            marks.zero_()
            g.replay()
            torch.cuda.synchronize()
        results[mode] = recorded()
    lines = []
    for mode, (st, mk) in results.items():
        recs = [st[c] for c in range(calls)]
        lines.append(report(f"{title} {mode}", recs, (int(mk[0]), int(mk[1]))))
        plot(out_dir / f"{key}_{mode}.png", f"{title} {mode}", recs, (int(mk[0]), int(mk[1])))
        raw[f"{key}_{mode}_stamps"] = st
        raw[f"{key}_{mode}_marks"] = mk
    # the probe's output equals the normal library's; per-call times for context
    ref = decode_mm(xq, xs, values, meta, ws, None, plan, probe.tuning, group_scale=gs)
    probe(xq, xs1, out)
    torch.cuda.synchronize()
    same = torch.equal(out, ref)
    scratch = torch.zeros(probe.ctas, SLOTS, dtype=torch.int64, device=dev)
    t_dec = graph_us(lambda: decode_mm(xq, xs, values, meta, ws, None, plan, probe.tuning, group_scale=gs))
    t_probe_off = graph_us(lambda: probe(xq, xs1, out))
    t_probe_on = graph_us(lambda: probe(xq, xs1, out, scratch))
    # the plan's CUTLASS config whatever VLLM_SPARSE24_DECODE_MAX_M says
    t_cut = graph_us(lambda: _cutlass_mm(xq, xs, cutlass[0], meta, ws, None, plan_of(cutlass[1])))
    lines.append(f"  per call (graph of 20, L2-warm weight): decode {t_dec:.2f} us, probe build {t_probe_off:.2f} "
                 f"(stamps off) / {t_probe_on:.2f} (on), CUTLASS {t_cut:.2f}; probe output == decode output: {same}")
    raw[f"{key}_times"] = np.array([t_dec, t_probe_off, t_probe_on, t_cut])
    for bits in omits:
        so.s24_decode_probe_set_omit(bits)
        try:
            t = graph_us(lambda: probe(xq, xs1, out))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                probe(xq, xs1, out, scratch)
            for _ in range(2):  # the second replay is read
                scratch.zero_()
                g.replay()
                torch.cuda.synchronize()
        finally:
            so.s24_decode_probe_set_omit(0)
        interval = unit_stream(scratch.cpu().numpy().astype(np.uint64))["full_interval"][0]
        lines.append(f"  without {omit_label(bits)}: {t:.2f} us per call (probe build, stamps off), "
                     f"full-to-full {interval:.3f} us")
        raw[f"{key}_omit{bits}"] = np.array([t, interval])
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNG timelines, stamps.npz and report.txt")
    ap.add_argument("--lib", type=Path, default=None, help="the probe library (default: beside the plugin's library)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--ms", default="1,8", help="token counts (default 1,8)")
    ap.add_argument("--calls", type=int, default=3, help="decode calls per recorded sequence (default 3)")
    ap.add_argument("--int4", action="store_true", help="the int4 (w4a8) variant instead of the int8 one")
    ap.add_argument("--unit-blocks", type=int, default=0, choices=(0, 4, 8),
                    help="128-k blocks per work unit (0: the kernel's default, 4)")
    ap.add_argument("--omit", default="", help="ProbeOmit bit sets to time too, e.g. 1,2,4,8,14 (see above)")
    args = ap.parse_args(argv)
    omits = tuple(int(b) for b in args.omit.split(",") if b)
    if any(not 0 < b < 16 for b in omits):
        ap.error(f"--omit takes bit sets 1..15 (1 hint, 2 act, 4 meta, 8 values), got {args.omit}")

    import torch

    from vllm_sparse24.kernels.cuda import build, lib

    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    so = load_probe(args.lib or build.probe_library_path(lib.library_path()))
    props = torch.cuda.get_device_properties(0)
    head = f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}"
    print(head, flush=True)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    raw: dict[str, np.ndarray] = {}
    lines = [head]
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for line in run_case(so, name, n, k, [int(x) for x in args.ms.split(",")], args.calls, args.out, flush, raw,
                             args.int4, omits, args.unit_blocks):
            print(line, flush=True)
            lines.append(line)
    np.savez_compressed(args.out / "stamps.npz", **raw)
    (args.out / "report.txt").write_text("\n".join(lines) + "\n")
    (args.out / "layout.json").write_text(json.dumps({"fixed": FIXED, "slots": SLOTS, "units": PROBE_UNITS,
                                                      "unit_issue": UNIT_ISSUE, "unit_full": UNIT_FULL,
                                                      "unit_math": UNIT_MATH}))
    print(f"done in {time.time() - t_start:.0f} s; {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
