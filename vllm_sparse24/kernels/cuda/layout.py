"""cuSPARSELt's compressed int8 2:4 buffer, as a formula (pure torch; no GPU needed).

``torch._cslt_compress(W)`` for an int8 W [N, K] (N % 64 == 0, K % 64 == 0) returns
``values ++ metadata``:
  * values: the two kept values of every group of 4 along K, row-major [N, K/2]
    (lower column first), bytes [0, N*K/2);
  * metadata: 4 bits per group, ``idx0 | idx1 << 2`` (column of each kept value inside
    the group), even groups in the low nibble. Tiles of 16 rows x 64 columns take 128 bytes:
    row r of the tile at ``(r % 8) * 16 + r // 8``, byte-pair p = (group % 16) // 2 at
    ``(p % 4) * 4 + (p // 4) * 2``. Tiles are stored row-tile fastest, in blocks of
    ``block_rows`` rows (see :func:`meta_block_rows`).
Derived from ../shared/notes/cslt_layout_probe.json (32x64 and 64x128, one flipped group at a
time) and checked on the GPU on random patterns at many shapes (tests/test_gpu_kernels.py).
The decode kernel (decode_kernel.py) reads this buffer directly, so prefill (cuSPARSELt) and
decode share ONE resident copy.
"""

from __future__ import annotations

import os

import torch

META_TILE_ROWS = 16
META_TILE_COLS = 64
META_TILE_BYTES = 128


def meta_block_rows(n: int) -> int:
    """Rows per block of metadata tiles: 64 (measured on H100, cuSPARSELt 0.8: blocks of
    64 rows x all K, each block holding its 16x64 tiles row-tile fastest); the env variable
    SPARSE24_CSLT_META_BLOCK_ROWS overrides it (used by the layout test to name the match)."""
    forced = int(os.environ.get("SPARSE24_CSLT_META_BLOCK_ROWS", "0"))
    return forced if forced > 0 else 64


def meta_byte_offset(row: torch.Tensor, group: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Byte offset, inside the metadata, of the byte holding (row, group); broadcasts."""
    block_rows = meta_block_rows(n)
    k_tiles = k // META_TILE_COLS
    tiles_per_block_col = block_rows // META_TILE_ROWS
    block = row // block_rows
    row_tile = (row % block_rows) // META_TILE_ROWS
    k_tile = group // (META_TILE_COLS // 4)
    tile = block * (k_tiles * tiles_per_block_col) + k_tile * tiles_per_block_col + row_tile
    r = row % META_TILE_ROWS
    p = (group % (META_TILE_COLS // 4)) // 2
    return tile * META_TILE_BYTES + (r % 8) * 16 + r // 8 + (p % 4) * 4 + (p // 4) * 2


def meta_nibble_shift(group: torch.Tensor) -> torch.Tensor:
    return (group % 2) * 4


def check_shape(n: int, k: int, layer_name: str) -> None:
    if n % 64 or k % 64:
        raise ValueError(
            f"{layer_name}: sparse24 CUDA kernels need N and K multiples of 64 "
            f"(cuSPARSELt int8 2:4 tiles), got weight [N={n}, K={k}]"
        )


def decompress(buf: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The dense int8 [N, K] that a cuSPARSELt compressed buffer holds (reference decoder)."""
    buf = buf.reshape(-1).view(torch.uint8)
    nvals = n * k // 2
    values = buf[:nvals].view(torch.int8).reshape(n, k // 4, 2)
    meta = buf[nvals:]
    rows = torch.arange(n, device=buf.device)[:, None]
    groups = torch.arange(k // 4, device=buf.device)[None, :]
    byte = meta[meta_byte_offset(rows, groups, n, k)].to(torch.int32)
    nib = (byte >> meta_nibble_shift(groups)) & 0xF
    idx = torch.stack([nib & 3, (nib >> 2) & 3], dim=-1).long()  # [N, K/4, 2]
    dense = torch.zeros(n, k // 4, 4, dtype=torch.int16, device=buf.device)
    dense.scatter_add_(-1, idx, values.to(torch.int16))
    return dense.reshape(n, k).to(torch.int8)
