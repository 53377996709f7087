"""The decode GEMM's resident int4 layout of a w4a8 2:4 weight (csrc/decode/layout.h), made at load
with torch ops on the weight's device; pure torch, so it is checked on the CPU too.

The layout keeps the kept values of CUTLASS's 8-bit 2:4 layout (value j of a row = the j-th kept
element, in k order, the order ``compress_24`` writes) as int4, offset binary (value + 8), grouped by
the decode GEMM's work unit of 64 rows x 4 blocks of 128 columns, in the order a consumer lane reads
them, plus the uint8 group scales of each unit; the metadata stays CUTLASS's, unchanged. Values
are taken from the compressed int8 codes (code = int4 value x group scale), so they sit where the
compressor's metadata says, also in groups where it chose the kept positions itself (a kept
value that is 0).

values: [row tile of 64][k block of 128 columns][warp 4][lane 32][16 bytes]; lane (g, t) of warp w
holds kept values 16t .. 16t+15 of the block for rows 16w + g (bytes 0..7) and 16w + g + 8 (bytes
8..15), value 16t + i at nibble ``nibble_of(i)`` (even nibbles in the low half of a byte).
group scales: [row tile][work unit of 4 blocks][64 rows][4 blocks].
"""

from __future__ import annotations

import torch

UNIT_ROWS = 64  # rows of a work unit (one metadata atom)
UNIT_BLOCKS = 4  # 128-column blocks of a work unit
BLOCK_K = 128  # columns of a group scale and of a metadata block
BLOCK_VALUES = BLOCK_K // 2  # kept values of a row in one block
BLOCK_BYTES = UNIT_ROWS * BLOCK_VALUES // 2  # 2048: a tile's block of values, two per byte
SCALE_UNIT_BYTES = UNIT_ROWS * UNIT_BLOCKS  # 256
K_MULTIPLE = 64  # K of an int4 weight: a multiple of 64 (format.md); the last block may be partial
INT4_MAX = 7


def kblocks(k: int) -> int:
    return -(-k // BLOCK_K)


def units_per_tile(k: int) -> int:
    return -(-kblocks(k) // UNIT_BLOCKS)


def units(n: int, k: int) -> int:
    return -(-n // UNIT_ROWS) * units_per_tile(k)


def resident_bytes(n: int, k: int) -> tuple[int, int]:
    """(values bytes, group scale bytes) of the layout of an [n, k] weight (s24_decode_int4_bytes)."""
    return -(-n // UNIT_ROWS) * kblocks(k) * BLOCK_BYTES, units(n, k) * SCALE_UNIT_BYTES


def nibble_of(i: int) -> int:
    """layout.h int4_nibble_of: the nibble (0..15) of a lane's 8 bytes of a row holding its chunk
    value i (0..15)."""
    return (i & 8) | (i & 1) | ((i >> 1) & 2) | ((i << 1) & 4)


def value_nibble(row: int, j: int, k: int) -> int:
    """layout.h int4_value_nibble: nibble index (byte = index // 2, high half when odd) of value j of
    row ``row``."""
    kb, t, i = j // BLOCK_VALUES, (j % BLOCK_VALUES) // 16, j % 16
    r = row % UNIT_ROWS
    warp, g, h = r // 16, r % 8, (r // 8) % 2
    byte = (row // UNIT_ROWS * kblocks(k) + kb) * BLOCK_BYTES + warp * 512 + (4 * g + t) * 16 + h * 8
    return 2 * byte + nibble_of(i)


def scale_offset(row: int, kb: int, k: int) -> int:
    """layout.h int4_scale_offset: byte of the group scale of row ``row`` and block ``kb``."""
    unit = row // UNIT_ROWS * units_per_tile(k) + kb // UNIT_BLOCKS
    return unit * SCALE_UNIT_BYTES + (row % UNIT_ROWS) * UNIT_BLOCKS + kb % UNIT_BLOCKS


# position of the value that each nibble (0..15) of a lane's row bytes holds
_VALUE_AT_NIBBLE = [0] * 16
for _i in range(16):
    _VALUE_AT_NIBBLE[nibble_of(_i)] = _i


def pack(values: torch.Tensor, group_scale: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """CUTLASS's 8-bit values of a w4a8 2:4 weight (int8 codes [N, K/2], as ``compress_24`` returns
    them) and its group scales (uint8 [N, ceil(K/128)]) -> (int4 values uint8 [values bytes], group
    scales uint8 [scale bytes]) in the decode layout. Every code must be its group scale times an
    int4 value in [-7, 7]; a ValueError names ``name`` and the first row and value that is not."""
    if values.dtype != torch.int8 or values.dim() != 2:
        raise ValueError(f"{name}: expected int8 compressed values [N, K/2], got {values.dtype} {list(values.shape)}")
    n, half = values.shape
    k = 2 * half
    if k % K_MULTIPLE:
        raise ValueError(f"{name}: K={k} must be a multiple of {K_MULTIPLE} for the int4 layout")
    nkb = kblocks(k)
    if group_scale.dtype != torch.uint8 or tuple(group_scale.shape) != (n, nkb):
        raise ValueError(f"{name}: expected uint8 group scales [{n}, {nkb}], got {group_scale.dtype} "
                         f"{list(group_scale.shape)}")
    codes = values.to(torch.int16)
    g = group_scale.to(torch.int16).repeat_interleave(BLOCK_VALUES, dim=1)[:, :half]
    v = torch.div(codes, g.clamp_min(1), rounding_mode="trunc")
    bad = ((v * g != codes) | (v.abs() > INT4_MAX)).nonzero()
    if bad.numel():
        r, j = int(bad[0, 0]), int(bad[0, 1])
        raise ValueError(f"{name}: kept value {j} of row {r} is the int8 code {int(codes[r, j])}, not an int4 value "
                         f"in [-{INT4_MAX}, {INT4_MAX}] times its group scale {int(g[r, j])}; {bad.shape[0]} such values")
    tiles, per_tile = -(-n // UNIT_ROWS), units_per_tile(k)
    dev = values.device
    # padding (rows past N, the columns of a partial last block) holds value 0 (nibble 8)
    u = torch.full((tiles * UNIT_ROWS, nkb * BLOCK_VALUES), 8, dtype=torch.uint8, device=dev)
    u[:n, :half] = (v + 8).to(torch.uint8)
    # row = 16 warp + 8 h + g; value = 64 block + 16 t + i -> [tile, block, warp, g, t, h, i]
    u = u.reshape(tiles, 4, 2, 8, nkb, 4, 16).permute(0, 4, 1, 3, 5, 2, 6)
    nibbles = u[..., torch.tensor(_VALUE_AT_NIBBLE, device=dev)].reshape(-1, 16)
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).reshape(-1)
    gs = torch.zeros(tiles * UNIT_ROWS, per_tile * UNIT_BLOCKS, dtype=torch.uint8, device=dev)
    gs[:n, :nkb] = group_scale
    gs = gs.reshape(tiles, UNIT_ROWS, per_tile, UNIT_BLOCKS).permute(0, 2, 1, 3).reshape(-1)
    return packed.contiguous(), gs.contiguous()
