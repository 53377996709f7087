"""The decode GEMM's reading of CUTLASS's resident 2:4 layout, checked without a GPU.

1. tests/layout_probe.cu (host code, built here with nvcc against csrc/) evaluates the CuTe layouts that
   CanonicalSparseConfig::fill_layoutA/fill_layoutE give for each shape, through the same sparse
   pointer views the compressor writes, and compares every value and metadata byte address with the
   closed forms of csrc/decode/layout.h; it also checks the mma.m16n8k32 register fragments the
   kernel assumes (int8 and e4m3) against CuTe's MMA_Traits of the instruction.
2. A Python transcription of decode_gemm.cu's per-lane work (addresses, PRMT expansion with the
   selectors the probe prints from layout.h, the producer's copies into a stage and the consumers'
   reads of it, the PTX mma.m16n8k32 fragment layouts, the stream-K partition and its fixup slots,
   the epilogue's thread per output element, each stored once) run on weights
   packed the way the compressor packs them (incl. its single-nonzero and all-zero groups) must
   give the exact int32 product.
Skipped when nvcc or the CUTLASS headers are missing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from vllm_sparse24.kernels.cuda import build

LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
SMALL_SHAPES = [(64, 128), (8, 128), (1, 128), (100, 256), (40, 2048), (96, 384), (72, 96)]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> str:
    try:
        nvcc, includes = build.find_nvcc(), build.find_cutlass()
    except build.BuildError as e:
        pytest.skip(f"no CUDA toolkit / CUTLASS headers: {e}")
    exe = tmp_path_factory.mktemp("probe") / "layout_probe"
    src = Path(__file__).parent / "layout_probe.cu"
    # its includes name csrc/decode/layout.h and csrc/sparse24_gemm.cuh ("../") as seen from csrc/decode
    cmd = [nvcc, "-std=c++17", "-O2", "--expt-relaxed-constexpr", *(f"-I{p}" for p in includes),
           f"-I{build.CSRC}", f"-I{build.CSRC / 'decode'}", str(src), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(exe)


def test_closed_form_and_fragments_match_cute(probe):
    args = [str(v) for shape in LLAMA_SHAPES + SMALL_SHAPES for v in shape]
    proc = subprocess.run([probe, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert proc.stdout.count(": ok") == len(LLAMA_SHAPES + SMALL_SHAPES), proc.stdout


# ---- the Python transcription ---------------------------------------------------------------------


def meta_rows(n: int) -> int:
    return -(-n // 64) * 64


def meta_offset(row: int, byte: int, rows_padded: int) -> int:
    return (byte // 16) * rows_padded * 16 + row * 16 + byte % 16


def compress_like_cutlass(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values [n, k/2] int8 and the flat metadata bytes, as sm90_sparse_gemm_compressor.hpp packs
    them: kept values in k order; one kept value -> paired with index 3 (or index 0 before a kept
    index 3); no kept value -> indices (0, 0) with zero values; 2-bit index j at bits [2j, 2j+2) of
    the group's nibble, groups in k order from the low nibble."""
    n, k = w.shape
    values = np.zeros((n, k // 2), dtype=np.int8)
    meta = np.zeros(meta_rows(n) * -(-k // 128) * 16, dtype=np.uint8)
    for r in range(n):
        for grp in range(k // 4):
            quad = w[r, 4 * grp:4 * grp + 4]
            nz = [i for i in range(4) if quad[i] != 0]
            assert len(nz) <= 2
            if len(nz) == 2:
                idx, vals = nz, [quad[nz[0]], quad[nz[1]]]
            elif len(nz) == 1 and nz[0] == 3:
                idx, vals = [0, 3], [0, quad[3]]
            elif len(nz) == 1:
                idx, vals = [nz[0], 3], [quad[nz[0]], 0]
            else:
                idx, vals = [0, 0], [0, 0]
            values[r, 2 * grp:2 * grp + 2] = vals
            nibble = idx[0] | (idx[1] << 2)
            meta[meta_offset(r, grp // 2, meta_rows(n))] |= nibble << (4 * (grp % 2))
    return values, meta


def byte_perm(x: int, y: int, s: int) -> int:
    """CUDA __byte_perm: result byte i = byte (s >> 4i) & 7 of {y:x}, sign-replicated if bit 3 is set."""
    src = (y << 32) | x
    out = 0
    for i in range(4):
        nib = (s >> (4 * i)) & 0xF
        b = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            b = 0xFF if b & 0x80 else 0
        out |= b << (8 * i)
    return out


def word(buf: np.ndarray, off: int) -> int:
    return int.from_bytes(buf[off:off + 4].astype(np.uint8).tobytes(), "little")


def signed_bytes(w: int) -> list[int]:
    return [int(b) for b in np.frombuffer(w.to_bytes(4, "little"), dtype=np.int8)]


# decode_gemm.cu's constants
TILE_ROWS, WARPS, STAGE_BLOCKS = 64, 4, 4
VALUE_PITCH, ACT_PITCH, ATOM = STAGE_BLOCKS * 64, STAGE_BLOCKS * 128, 64 * 16  # the TMA boxes' dense pitches


def partition(n: int, k: int, sms: int) -> tuple[int, int, int, int]:
    """make_partition: (k blocks, units per 64-row tile, units, CTAs)."""
    kblocks = k // 128
    per_tile = -(-kblocks // STAGE_BLOCKS)
    units = -(-n // TILE_ROWS) * per_tile
    return kblocks, per_tile, units, min(units, sms)


def emulate_decode(values: np.ndarray, meta: np.ndarray, x: np.ndarray, n: int, k: int, sms: int,
                   selectors: list[int]) -> np.ndarray:
    """decode_gemm.cu lane by lane: the producer's tensor copies into a stage buffer, the consumer
    warps' reads of it, the mma fragments, the stream-K partition and its fixup slots, and the
    epilogue's element per thread. Returns out [m, n] (int64) as the int32 sums the epilogue sees."""
    m = x.shape[0]
    nt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    vflat, xflat = values.reshape(-1).view(np.uint8), x.reshape(-1).view(np.uint8)
    rows_padded = meta_rows(n)
    kblocks, per_tile, units, ctas = partition(n, k, sms)
    begin = [c * units // ctas for c in range(ctas + 1)]

    def cta_of(u: int) -> int:
        return ((u + 1) * ctas - 1) // units

    out = np.zeros((m, n), dtype=np.int64)
    written = np.zeros((m, n), dtype=np.int64)
    slots: dict[tuple[int, int, int], np.ndarray] = {}  # (cta, which, warp) -> [token, 16 rows]
    tickets: dict[tuple[int, int], int] = {}
    accs: dict[tuple[int, int], np.ndarray] = {}  # (cta, warp) -> accumulators of its current tile
    order = [(c, i) for c in range(ctas) for i in range(begin[c + 1] - begin[c])]
    for cta, i in order:  # a CTA's units in order; CTAs one after another (any order must do)
        u = begin[cta] + i
        rt, ku = divmod(u, per_tile)
        kb0 = ku * STAGE_BLOCKS
        nkb = min(STAGE_BLOCKS, kblocks - kb0)
        # the producer's three tensor copies into one stage: whole boxes, zero past the tensor's edges
        # (rows past n, k blocks past K, tokens past m)
        stage_v = np.zeros(TILE_ROWS * VALUE_PITCH, dtype=np.uint8)
        stage_m = np.zeros(STAGE_BLOCKS * ATOM, dtype=np.uint8)
        stage_x = np.zeros(8 * nt * ACT_PITCH, dtype=np.uint8)
        for r in range(min(TILE_ROWS, n - rt * TILE_ROWS)):
            src = (rt * TILE_ROWS + r) * (k // 2) + kb0 * 64
            stage_v[r * VALUE_PITCH:r * VALUE_PITCH + nkb * 64] = vflat[src:src + nkb * 64]
        for b in range(nkb):
            src = meta_offset(rt * TILE_ROWS, (kb0 + b) * 16, rows_padded)
            stage_m[b * ATOM:(b + 1) * ATOM] = meta[src:src + ATOM]
        for tok in range(m):
            src = tok * k + kb0 * 128
            stage_x[tok * ACT_PITCH:tok * ACT_PITCH + nkb * 128] = xflat[src:src + nkb * 128]
        for warp in range(WARPS):
            key = (cta, warp)
            acc = np.zeros((nt, 32, 4), dtype=np.int64) if i == 0 or ku == 0 else accs[key]
            wrow = warp * 16
            for b in range(nkb):
                for w in range(4):
                    a_regs = np.zeros((32, 4), dtype=object)
                    b_regs = np.zeros((nt, 32, 2), dtype=object)
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for h in range(2):
                            v = word(stage_v, (wrow + g + 8 * h) * VALUE_PITCH + 16 * t + b * 64 + 4 * w)
                            mword = word(stage_m, (wrow + g + 8 * h) * 16 + 4 * t + b * ATOM)
                            sel = selectors[(mword >> (8 * w)) & 0xFF]
                            a_regs[lane, h] = byte_perm(v, 0, sel & 0xFFFF)
                            a_regs[lane, 2 + h] = byte_perm(v, 0, sel >> 16)
                        for j in range(nt):
                            base = (8 * j + g) * ACT_PITCH + b * 128 + 32 * t + 8 * w
                            b_regs[j, lane, 0] = word(stage_x, base)
                            b_regs[j, lane, 1] = word(stage_x, base + 4)
                    for j in range(nt):
                        acc[j] += mma_m16n8k32(a_regs, b_regs[j])
            accs[key] = acc
            if not (ku == per_tile - 1 or i == begin[cta + 1] - begin[cta] - 1):
                continue
            # finish(rt, whole): accumulator c of token tile j is row wrow + g + 8 (c >> 1), token 8 j + 2 t + (c & 1)
            frag = np.zeros((8 * nt, 16), dtype=np.int64)
            for j in range(nt):
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    for c in range(4):
                        frag[8 * j + 2 * t + (c & 1), g + 8 * (c >> 1)] = acc[j, lane, c]
            whole = u - ku >= begin[cta] and ku == per_tile - 1
            first = rt * per_tile
            c_first, c_last = cta_of(first), cta_of(first + per_tile - 1)
            if not whole:
                which = 0 if begin[cta] // per_tile == rt else 1
                assert (cta, which, warp) not in slots, "one partial slot per CTA, end and warp"
                slots[(cta, which, warp)] = frag
                tickets[(rt, warp)] = tickets.get((rt, warp), 0) + 1
                if tickets[(rt, warp)] != c_last - c_first + 1:
                    continue
                frag = sum(slots[(c, 0 if begin[c] // per_tile == rt else 1, warp)] for c in range(c_first, c_last + 1))
            for tok in range(m):
                for r in range(16):
                    row = rt * TILE_ROWS + wrow + r
                    if row < n:
                        written[tok, row] += 1
                        out[tok, row] = frag[tok, r]
    assert (written == 1).all(), "every output element stored exactly once"
    return out


def mma_m16n8k32(a_regs: np.ndarray, b_regs: np.ndarray) -> np.ndarray:
    """PTX mma.m16n8k32 (.s8, row.col) on per-lane registers: A reg q of lane (g, t) holds row
    g + 8 (q % 2), cols 4t + 16 (q // 2) + [0..3]; B reg q holds k rows 4t + 16 q + [0..3] of column
    g; C element c of a lane is row g + 8 (c >> 1), column 2t + (c & 1). Returns [lane, c]."""
    a = np.zeros((16, 32), dtype=np.int64)
    b = np.zeros((32, 8), dtype=np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for q in range(4):
            a[g + 8 * (q % 2), 4 * t + 16 * (q // 2):4 * t + 16 * (q // 2) + 4] = signed_bytes(int(a_regs[lane, q]))
        for q in range(2):
            b[4 * t + 16 * q:4 * t + 16 * q + 4, g] = signed_bytes(int(b_regs[lane, q]))
    c = a @ b
    return np.array([[c[lane // 4 + 8 * (i >> 1), 2 * (lane % 4) + (i & 1)] for i in range(4)] for lane in range(32)])


def random_24(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.integers(-127, 128, size=(n, k // 4, 4)).astype(np.int8)
    keep = np.argsort(rng.random((n, k // 4, 4)), axis=-1)[..., :2]
    mask = np.zeros_like(w, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    w = np.where(mask, w, 0).astype(np.int8)
    # the compressor's corner cases: one kept value (last, or not last) and an all-zero group
    w[0, 0] = [0, 0, 0, 5]
    w[0, 1] = [0, -7, 0, 0]
    w[min(1, n - 1), 2] = 0
    return w.reshape(n, k)


# sms: few, so that row tiles are split across CTAs (the fixup) and CTAs hold several units
@pytest.mark.parametrize("n,k,m,sms", [(96, 384, 1, 1), (40, 2048, 13, 3), (72, 1152, 30, 5),
                                       (33, 1024, 8, 2), (200, 2048, 17, 7), (128, 640, 3, 132), (64, 512, 41, 2)])
def test_transcription_gives_the_exact_product(probe, n, k, m, sms):
    proc = subprocess.run([probe, "--selectors"], capture_output=True, text=True, check=True)
    selectors = [int(s, 16) for s in proc.stdout.split()]
    assert len(selectors) == 256
    rng = np.random.default_rng(n * k + m)
    w = random_24(n, k, rng)
    x = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
    values, meta = compress_like_cutlass(w)
    got = emulate_decode(values, meta, x, n, k, sms, selectors)
    want = x.astype(np.int64) @ w.astype(np.int64).T
    np.testing.assert_array_equal(got, want)
