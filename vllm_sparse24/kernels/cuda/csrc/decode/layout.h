// Closed-form addressing of the resident 2:4 weight (CUTLASS sm90 sparse layout of an 8-bit weight,
// tile K >= 128), shared by the decode kernel and the host probe that checks it against the CuTe
// layouts (tests/layout_probe.cu). Written out so the decode kernel needs no CuTe:
//
//   values: row-major [N, K/2]; value j of row n (the j-th kept element, in k order) at n*K/2 + j.
//           Kept pair of group g (logical k 4g..4g+3) = values 2g, 2g+1.
//   meta:   [ceil(K/128), round_up(N, 64), 16] bytes; byte b of row n (b = k/8) at
//           (b/16) * round_up(N, 64) * 16 + n * 16 + b % 16. A byte covers logical k 8b..8b+7:
//           low nibble = group 2b' (k 8b..8b+3), high nibble = group 2b'+1; inside a nibble,
//           bits [1:0] = logical index (0..3) of the first kept value, bits [3:2] of the second.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define S24_HD __host__ __device__ __forceinline__
#else
#define S24_HD inline
#endif

namespace sparse24::decode {

constexpr int kMetaRowAlign = 64;  // metadata rows are padded to the 64-row atom
constexpr int kMetaBlockK = 128;   // logical k per 16-byte metadata row of one K block

S24_HD int64_t meta_rows(int64_t n) { return (n + kMetaRowAlign - 1) / kMetaRowAlign * kMetaRowAlign; }

S24_HD int64_t value_offset(int64_t row, int64_t j, int64_t k) { return row * (k / 2) + j; }

S24_HD int64_t meta_offset(int64_t row, int64_t byte, int64_t rows_padded) {
  return (byte / 16) * rows_padded * 16 + row * 16 + byte % 16;
}

S24_HD int64_t meta_bytes(int64_t n, int64_t k) {
  return meta_rows(n) * ((k + kMetaBlockK - 1) / kMetaBlockK) * 16;
}

// __byte_perm selector that expands one compressed word (4 kept values v0..v3, two groups) and its
// metadata byte into the dense 8 weights: low 16 bits -> dense k 0..3 from v0, v1; high 16 bits ->
// dense k 4..7 from v2, v3. Each selector nibble picks a source byte: 0..3 = v0..v3 of the word,
// 4..7 = bytes of a zero word. Start from "all zero" (0x4444) and flip the kept positions:
// 4 ^ 4 = 0 (v0), 4 ^ 5 = 1 (v1), 4 ^ 6 = 2 (v2), 4 ^ 7 = 3 (v3). The compressor writes an
// all-zero group as indices (0, 0) with zero values; the nibble then reads 4 ^ 4 ^ 5 = 5 (zero).
S24_HD uint32_t expand_selector(uint32_t meta_byte) {
  const uint32_t i0 = meta_byte & 3, i1 = (meta_byte >> 2) & 3, i2 = (meta_byte >> 4) & 3, i3 = meta_byte >> 6;
  const uint32_t lo = 0x4444u ^ (4u << (4 * i0)) ^ (5u << (4 * i1));
  const uint32_t hi = 0x4444u ^ (6u << (4 * i2)) ^ (7u << (4 * i3));
  return lo | (hi << 16);
}

}  // namespace sparse24::decode
