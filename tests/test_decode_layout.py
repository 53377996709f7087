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
3. The int4 weights of w4a8 layers (S24_INT4): the torch packer (kernels/cuda/int4_layout.py)
   against the closed forms, those against layout.h's (through the probe), layout.h's int4_codes()
   against its transcription and the exact codes, and the transcription of the int4 kernel (its
   copies, lane reads and expansion, then the int8 path) must give the exact product of the codes.
Skipped when nvcc or the CUTLASS headers are missing (the packer's tests need neither).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_sparse24.kernels.cuda import build, int4_layout

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
TILE_ROWS, WARPS, ATOM = 64, 4, 64 * 16
RECORD_BLOCKS = 4  # blocks per int4 group scale record (and per consumer pass over a stage)


def partition(n: int, k: int, sms: int, ub: int = 4) -> tuple[int, int, int, int]:
    """make_partition with units of ``ub`` blocks: (k blocks, units per 64-row tile, units, CTAs)."""
    kblocks = -(-k // 128)  # an int4 weight's last block may be partial
    per_tile = -(-kblocks // ub)
    units = -(-n // TILE_ROWS) * per_tile
    return kblocks, per_tile, units, min(units, sms)


def int4_codes(word: int, g: int) -> tuple[int, int]:
    """layout.h int4_codes: 16-bit lanes of nibble pairs (s, s + 4) times g plus 256 - 8g (32-bit
    arithmetic), then the products' low bytes gathered by PRMT."""
    bias = (0x01000100 - g * 0x00080008) & 0xFFFFFFFF
    p = [((((word >> (4 * s)) & 0x000F000F) * g) + bias) & 0xFFFFFFFF for s in range(4)]
    return byte_perm(p[0], p[1], 0x6240), byte_perm(p[2], p[3], 0x6240)


INT4_BLOCK = int4_layout.BLOCK_BYTES


def token_tiles(m: int) -> int:
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def unit_copies(probe: str, n: int, k: int, m: int, ub: int, int4: bool) -> tuple[dict, dict]:
    """The kernel's tensor maps and every unit's box origins, from csrc/decode/tma_plan.h through the
    layout probe: ({operand: (dims, row stride, box)}, {(rt, kb0): {operand: (c0, c1)}}), dims and
    boxes in 4-byte words, for contiguous activations [m, k]."""
    out = subprocess.run([probe, "--unit-copies", *map(str, (n, k, m, ub, int(int4), k, 8 * token_tiles(m)))],
                         capture_output=True, text=True, check=True).stdout
    maps, coords = {}, {}
    for line in out.splitlines():
        f = line.split()
        if f[0] == "map":
            d0, d1, stride, b0, b1 = map(int, f[2:])
            maps[f[1]] = ((d0, d1), stride, (b0, b1))
        else:
            c = list(map(int, f[3:]))
            coords[(int(f[1]), int(f[2]))] = {name: (c[2 * i], c[2 * i + 1])
                                              for i, name in enumerate(("values", "scales", "meta", "x"))}
    return maps, coords


def tma_box(buf: np.ndarray, spec: tuple, origin: tuple[int, int]) -> np.ndarray:
    """What a 2-D TMA tensor copy of 4-byte words writes to shared memory: the box's rows one after
    another (dense), words outside the tensor's dims zero. ``buf``: the tensor's bytes from its base
    address."""
    e = 4
    dims, stride, box = spec
    flat = buf.reshape(-1).view(np.uint8)
    out = np.zeros((box[1], box[0] * e), dtype=np.uint8)
    for r in range(box[1]):
        row = origin[1] + r
        if not 0 <= row < dims[1]:
            continue
        lo, hi = max(origin[0], 0), min(origin[0] + box[0], dims[0])
        if hi > lo:
            src = row * stride + lo * e
            out[r, (lo - origin[0]) * e:(hi - origin[0]) * e] = flat[src:src + (hi - lo) * e]
    return out.reshape(-1)


def emulate_decode(values: np.ndarray, meta: np.ndarray, x: np.ndarray, n: int, k: int, sms: int,
                   selectors: list[int], copies: tuple[dict, dict],
                   int4: tuple[np.ndarray, np.ndarray] | None = None, ub: int = 4) -> np.ndarray:
    """decode_gemm.cu lane by lane: the producer's tensor copies into a stage buffer (with the
    kernel's maps and box origins, ``copies`` = unit_copies(...)), the consumer warps' reads of it,
    the mma fragments, the stream-K partition and its fixup slots, and the epilogue's element per
    thread. Returns out [m, n] (int64) as the int32 sums the epilogue sees. ``int4``: the int4
    variant on (values, group scales) of int4_layout.pack (``values`` unused); ``ub``: 128-k blocks
    per work unit (the kernel's UB, 4 or 8)."""
    value_pitch, act_pitch = ub * 64, ub * 128  # the stage's row pitches the consumers read with
    maps, coords = copies
    m = x.shape[0]
    nt = token_tiles(m)
    vflat, xflat = values.reshape(-1).view(np.uint8), x.reshape(-1).view(np.uint8)
    kblocks, per_tile, units, ctas = partition(n, k, sms, ub)
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
        kb0 = ku * ub
        # the producer's tensor copies into one stage, as tma_plan.h describes them: whole boxes,
        # zero past the tensors' edges (rows past n, k blocks past K, tokens past m)
        origin = coords[(rt, kb0)]
        if int4 is not None:  # ub x 2 KB of values and ub / 4 group scale records of 256 bytes
            stage_v4 = tma_box(int4[0], maps["values"], origin["values"])
            stage_s = tma_box(int4[1], maps["scales"], origin["scales"])
            assert stage_v4.size == ub * INT4_BLOCK and stage_s.size == ub // RECORD_BLOCKS * 256
        else:
            stage_v = tma_box(vflat, maps["values"], origin["values"])
            assert stage_v.size == TILE_ROWS * value_pitch
        stage_m = tma_box(meta, maps["meta"], origin["meta"])
        stage_x = tma_box(xflat, maps["x"], origin["x"])
        assert stage_m.size == ub * ATOM and stage_x.size == 8 * nt * act_pitch
        for warp in range(WARPS):
            key = (cta, warp)
            acc = np.zeros((nt, 32, 4), dtype=np.int64) if i == 0 or ku == 0 else accs[key]
            wrow = warp * 16
            # every block of the unit, also past K: the stage holds zeros there (metadata and
            # activations; int4 values may be the next tile's), and a zero metadata byte expands to
            # zero weights
            for b in range(ub):
                for w in range(4):
                    a_regs = np.zeros((32, 4), dtype=object)
                    b_regs = np.zeros((nt, 32, 2), dtype=object)
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for h in range(2):
                            if int4 is not None:  # the lane's 8 bytes of row g + 8h, its group scale of block b
                                off = b * INT4_BLOCK + warp * 512 + lane * 16 + 8 * h + 4 * (w // 2)
                                rec_off = b // RECORD_BLOCKS * 256 + (wrow + g + 8 * h) * 4
                                gs = (word(stage_s, rec_off) >> (8 * (b % RECORD_BLOCKS))) & 0xFF
                                v = int4_codes(word(stage_v4, off), gs)[w % 2]
                            else:
                                v = word(stage_v, (wrow + g + 8 * h) * value_pitch + 16 * t + b * 64 + 4 * w)
                            mword = word(stage_m, (wrow + g + 8 * h) * 16 + 4 * t + b * ATOM)
                            sel = selectors[(mword >> (8 * w)) & 0xFF]
                            a_regs[lane, h] = byte_perm(v, 0, sel & 0xFFFF)
                            a_regs[lane, 2 + h] = byte_perm(v, 0, sel >> 16)
                        for j in range(nt):
                            base = (8 * j + g) * act_pitch + b * 128 + 32 * t + 8 * w
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
@pytest.mark.parametrize("n,k,m,sms,ub", [(96, 384, 1, 1, 4), (40, 2048, 13, 3, 4), (72, 1152, 30, 5, 4),
                                          (33, 1024, 8, 2, 4), (200, 2048, 17, 7, 4), (128, 640, 3, 132, 4),
                                          (64, 512, 41, 2, 4),
                                          # units of 8 blocks: a partial last unit (K = 1152: 9 blocks), K
                                          # shorter than one unit, row tiles split across CTAs
                                          (72, 1152, 9, 3, 8), (96, 384, 2, 1, 8), (200, 4096, 17, 7, 8)])
def test_transcription_gives_the_exact_product(probe, n, k, m, sms, ub):
    proc = subprocess.run([probe, "--selectors"], capture_output=True, text=True, check=True)
    selectors = [int(s, 16) for s in proc.stdout.split()]
    assert len(selectors) == 256
    rng = np.random.default_rng(n * k + m)
    w = random_24(n, k, rng)
    x = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
    values, meta = compress_like_cutlass(w)
    got = emulate_decode(values, meta, x, n, k, sms, selectors, unit_copies(probe, n, k, m, ub, False), ub=ub)
    want = x.astype(np.int64) @ w.astype(np.int64).T
    np.testing.assert_array_equal(got, want)


# ---- the int4 weights of w4a8 layers ------------------------------------------------------------


def random_w4a8_24(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [n, k] = int4 value x group scale, 2:4; group scales uint8 [n, ceil(k/128)]), with
    kept values that are 0 (the compressor then picks the positions) and the corner cases of
    random_24."""
    kb = -(-k // 128)
    v = rng.integers(-7, 8, size=(n, k // 4, 4))
    keep = np.argsort(rng.random((n, k // 4, 4)), axis=-1)[..., :2]
    mask = np.zeros_like(v, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    v = np.where(mask, v, 0).reshape(n, k)
    v[0, 0:4] = [0, 0, 0, 5]
    v[0, 4:8] = [0, -7, 0, 0]
    v[min(1, n - 1), 8:12] = 0
    gs = rng.integers(1, 19, size=(n, kb)).astype(np.uint8)
    gs[0, 0] = 18
    codes = (v * np.repeat(gs.astype(np.int64), 128, axis=1)[:, :k]).astype(np.int8)
    return codes, gs


INT4_SHAPES = [(64, 128), (100, 576), (200, 1536), (72, 2304), (130, 512), (8, 192)]


@pytest.mark.parametrize("n,k", INT4_SHAPES)
def test_int4_packing_matches_the_closed_forms(n, k):
    """int4_layout.pack puts kept value j of row r (the compressor's order) at value_nibble(r, j, k) as
    value + 8, and the group scale of (r, block) at scale_offset; padding is value 0."""
    rng = np.random.default_rng(n + k)
    codes, gs = random_w4a8_24(n, k, rng)
    values8, _ = compress_like_cutlass(codes)
    packed, scales = int4_layout.pack(torch.from_numpy(values8), torch.from_numpy(gs))
    assert (packed.numel(), scales.numel()) == int4_layout.resident_bytes(n, k)
    nib = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1).numpy().astype(np.int64)
    rows, js = np.meshgrid(np.arange(n), np.arange(k // 2), indexing="ij")
    where = np.vectorize(lambda r, j: int4_layout.value_nibble(int(r), int(j), k))(rows, js)
    g_of = np.repeat(gs.astype(np.int64), 64, axis=1)[:, :k // 2]
    np.testing.assert_array_equal(nib[where], values8.astype(np.int64) // g_of + 8)
    assert (np.delete(nib, where.reshape(-1)) == 8).all(), "padding holds value 0"
    assert len(set(where.reshape(-1).tolist())) == where.size
    for r in range(n):
        for kb in range(gs.shape[1]):
            assert int(scales[int4_layout.scale_offset(r, kb, k)]) == gs[r, kb]


def test_int4_packing_names_a_code_off_the_grid():
    codes, gs = random_w4a8_24(64, 256, np.random.default_rng(1))
    values8, _ = compress_like_cutlass(codes)
    values8[3, 70] = 7 * int(gs[3, 1]) + 1 if gs[3, 1] > 1 else 8  # not value x g with |value| <= 7
    with pytest.raises(ValueError, match=r"layer.q: kept value 70 of row 3 is the int8 code"):
        int4_layout.pack(torch.from_numpy(values8), torch.from_numpy(gs), "layer.q")
    with pytest.raises(ValueError, match=r"layer.q: expected uint8 group scales \[64, 2\]"):
        int4_layout.pack(torch.from_numpy(values8), torch.from_numpy(gs[:, :1]), "layer.q")


@pytest.mark.parametrize("n,k", INT4_SHAPES)
def test_int4_closed_forms_match_layout_h(probe, n, k):
    proc = subprocess.run([probe, "--int4", str(n), str(k)], capture_output=True, text=True, check=True)
    lines = proc.stdout.split("\n")
    kb = -(-k // 128)
    for r in range(n):
        got = [int(v) for v in lines[r].split()]
        assert got[:k // 2] == [int4_layout.value_nibble(r, j, k) for j in range(k // 2)], r
        assert got[k // 2:] == [int4_layout.scale_offset(r, b, k) for b in range(kb)], r
    assert tuple(int(v) for v in lines[n].split()) == int4_layout.resident_bytes(n, k)


def test_int4_codes_match_layout_h_and_the_exact_codes(probe):
    """int4_codes() as compiled from layout.h (host build), its transcription here and value x g
    agree for every group scale 0..18 on words holding every nibble of a value in [-7, 7] (1..15)."""
    rng = np.random.default_rng(7)
    nibbles = rng.integers(1, 16, size=(40, 8))
    words = [0x12345678, 0x9ABCDEF1, 0xFEDCBA98, 0x88888888, 0x11111111, 0xFFFFFFFF,
             *(sum(int(v) << (4 * i) for i, v in enumerate(row)) for row in nibbles)]
    order = [int4_layout.nibble_of(i) for i in range(8)]  # word 0 of a lane's row: chunk values 0..7
    for g in range(19):
        proc = subprocess.run([probe, "--int4-codes", str(g), *(f"{w:08x}" for w in words)],
                              capture_output=True, text=True, check=True)
        for w, line in zip(words, proc.stdout.split("\n"), strict=False):
            lo, hi = (int(v, 16) for v in line.split())
            assert (lo, hi) == int4_codes(w, g), (g, hex(w))
            want = [(((w >> (4 * order[i])) & 0xF) - 8) * g for i in range(8)]
            assert signed_bytes(lo) + signed_bytes(hi) == want, (g, hex(w))


@pytest.mark.parametrize("n,k,m,sms,ub", [(96, 384, 1, 1, 4), (40, 2048, 13, 3, 4), (100, 576, 9, 2, 4),
                                          (130, 1536, 33, 5, 4), (72, 2304, 2, 4, 4), (64, 512, 64, 2, 4),
                                          # units of 8 blocks: two group scale records a unit; K = 2304 has 5
                                          # records a tile, so a tile's last unit also reads the next tile's first
                                          (72, 2304, 2, 4, 8), (100, 576, 9, 2, 8), (130, 1536, 17, 5, 8)])
def test_int4_transcription_gives_the_exact_product(probe, n, k, m, sms, ub):
    """The int4 kernel on int4_layout.pack's layout (incl. a partial last block, K = 576 / 2304, and
    partial row tiles) computes x @ codes^T exactly, as the int8 kernel on the compressor's values."""
    proc = subprocess.run([probe, "--selectors"], capture_output=True, text=True, check=True)
    selectors = [int(s, 16) for s in proc.stdout.split()]
    rng = np.random.default_rng(n * k + m)
    codes, gs = random_w4a8_24(n, k, rng)
    x = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
    values8, meta = compress_like_cutlass(codes)
    packed, scales = int4_layout.pack(torch.from_numpy(values8), torch.from_numpy(gs))
    got = emulate_decode(values8, meta, x, n, k, sms, selectors, unit_copies(probe, n, k, m, ub, True),
                         int4=(packed.numpy(), scales.numpy()), ub=ub)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ codes.astype(np.int64).T)
