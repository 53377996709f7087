// The decode GEMM's tensor copies (decode_gemm.cu): how each operand is described to the TMA unit
// (as 4-byte words: dimensions, row stride, box; innermost first) and the box coordinates of one work
// unit's copies. One owner for both the kernel (host: the maps; device: the coordinates) and the
// layout probe (tests/layout_probe.cu --unit-copies), so the CPU transcription of the kernel
// (tests/test_decode_layout.py) copies its stage buffers with the kernel's own numbers.
//
//   values  8-bit: [n][k/2] bytes as 4-byte words, box UB x 64 bytes x 64 rows (a unit's values)
//           int4:  [tiles * kblocks * 2][1 KB] words, box 1 KB x 2 UB rows (UB blocks of 2 KB)
//   scales  int4 only: [records][256 B] words, box 256 B x UB / 4 records (a record per 4 blocks)
//   meta    [k/128][meta_rows(n) * 16 B] words, box 1 KB x UB rows (one row tile's atom per block)
//   x       [m][k] int8/e4m3 as words, rows x_stride bytes apart, box UB x 128 bytes x 8 NT tokens
// Boxes past a tensor's edge are zero-filled by the TMA unit.
#pragma once

#include <cstdint>

#include "layout.h"

namespace sparse24::decode {

constexpr int kUnitRows = kMetaRowAlign;  // rows of a work unit: one metadata atom

struct OperandMap {  // an operand read as 4-byte words
  int64_t dims[2];      // words, innermost first
  int64_t row_stride;   // bytes between rows of dims[1]
  int box[2];           // words, innermost first
};

struct UnitMaps {
  OperandMap values, scales, meta, x;  // scales: int4 only (else all zero)
};

constexpr S24_HD int64_t box_bytes(const OperandMap& o) { return int64_t{o.box[0]} * o.box[1] * 4; }

// token_rows: 8 x the token tiles the launch computes (8, 16, 32 or 64), the x box's height.
constexpr S24_HD UnitMaps unit_maps(int64_t n, int64_t k, int64_t m, int unit_blocks, bool int4, int64_t x_stride,
                          int token_rows) {
  UnitMaps u{};
  const int64_t kb = int4_kblocks(k), mr = meta_rows(n);
  if (int4) {
    u.values = {{256, int4_value_bytes(n, k) / 1024}, 1024, {256, unit_blocks * kInt4BlockBytes / 1024}};
    u.scales = {{kInt4ScaleUnitBytes / 4, int4_units(n, k)}, kInt4ScaleUnitBytes,
                {kInt4ScaleUnitBytes / 4, unit_blocks / kInt4UnitBlocks}};
  } else {
    u.values = {{k / 8, n}, k / 2, {unit_blocks * kMetaBlockK / 8, kUnitRows}};
  }
  u.meta = {{mr * 4, kb}, mr * 16, {kUnitRows * 4, unit_blocks}};
  u.x = {{k / 4, m}, x_stride, {unit_blocks * kMetaBlockK / 4, token_rows}};
  return u;
}

struct UnitCoords {
  int values[2], scales[2], meta[2], x[2];  // box origins in elements, innermost first
};

// The copies of the unit that starts at k block kb0 of row tile rt (kblocks: the weight's k blocks,
// a partial last one included). An int4 unit's record coordinate counts records of this row tile;
// a unit past the tile's last record reads the next tile's first one, whose blocks are past K:
// their metadata is zero-filled, and a zero metadata byte expands to zero weights.
S24_HD UnitCoords unit_coords(int rt, int kb0, int kblocks, bool int4) {
  UnitCoords c{};
  if (int4) {
    const int records_per_tile = (kblocks + kInt4UnitBlocks - 1) / kInt4UnitBlocks;
    c.values[0] = 0, c.values[1] = (rt * kblocks + kb0) * (kInt4BlockBytes / 1024);
    c.scales[0] = 0, c.scales[1] = rt * records_per_tile + kb0 / kInt4UnitBlocks;
  } else {
    c.values[0] = kb0 * (kMetaBlockK / 8), c.values[1] = rt * kUnitRows;  // 4-byte words of a row
  }
  c.meta[0] = rt * kUnitRows * 4, c.meta[1] = kb0;
  c.x[0] = kb0 * (kMetaBlockK / 4), c.x[1] = 0;
  return c;
}

}  // namespace sparse24::decode
