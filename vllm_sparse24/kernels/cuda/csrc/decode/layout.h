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
//
// The int4 weight of a w4a8 2:4 layer (the decode GEMM's S24_INT4 variant) keeps the SAME metadata
// and, instead of the 8-bit values, the int4 value of every kept element (int8 code at
// value_offset(n, j, k) = int4 value x the uint8 group scale of its 128-column block j / 64) and the
// group scales, both in the order the decode GEMM consumes them:
//
//   values: [row tile (64 rows)][k block (int4_kblocks(k))][warp 4][lane 32][16 bytes], 2048 bytes
//           per tile and block; lane (g, t) of warp w holds kept values 16t .. 16t+15 of the block
//           for rows 16w + g (bytes 0..7) and 16w + g + 8 (bytes 8..15); value 16t + i at nibble
//           int4_nibble_of(i) of those 8 bytes (nibble c is the low half of byte c / 2 when c is
//           even). A warp reads a block with one 16-byte load per lane, 512 contiguous bytes (no
//           bank conflicts), and a unit of the decode GEMM (64 rows x 4 blocks) is 8 contiguous TMA
//           box rows of 1 KB instead of 64 of 128 bytes (a tile's last unit may read on into the
//           next tile: those blocks are not used). Nibbles are offset binary: value + 8 (values in
//           [-7, 7]); padding (rows past n, the columns of a partial last block) holds 0.
//   group scales: 256 bytes per work unit of 64 rows x 4 k blocks (unit u = row tile x
//           int4_units_per_tile(k) + k block / 4), [64 rows][4 blocks] (a lane's two rows: two
//           4-byte words); padding holds 0.
//
// int4_nibble_of() is the order int4_codes() expands: it makes 16-bit lanes of nibble pairs
// (s, s + 4) of a word with one shift and mask each, and gathers the products' low bytes with one
// PRMT per 4 codes.

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

constexpr S24_HD int64_t meta_rows(int64_t n) { return (n + kMetaRowAlign - 1) / kMetaRowAlign * kMetaRowAlign; }

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

// ---- int4 values (w4a8) -----------------------------------------------------------------------

constexpr int kInt4UnitBlocks = 4;                                // 128-k blocks per work unit
constexpr int kInt4BlockBytes = kMetaRowAlign * kMetaBlockK / 4;    // 2048: one tile's block of values
constexpr int kInt4ScaleUnitBytes = kMetaRowAlign * kInt4UnitBlocks;  // 256

// k blocks of an int4 weight: the last one is partial when K is not a multiple of 128 (K = 576)
constexpr S24_HD int64_t int4_kblocks(int64_t k) { return (k + kMetaBlockK - 1) / kMetaBlockK; }
constexpr S24_HD int64_t int4_units_per_tile(int64_t k) { return (int4_kblocks(k) + kInt4UnitBlocks - 1) / kInt4UnitBlocks; }
constexpr S24_HD int64_t int4_units(int64_t n, int64_t k) { return meta_rows(n) / kMetaRowAlign * int4_units_per_tile(k); }
constexpr S24_HD int64_t int4_value_bytes(int64_t n, int64_t k) {
  return meta_rows(n) / kMetaRowAlign * int4_kblocks(k) * kInt4BlockBytes;
}
S24_HD int64_t int4_scale_bytes(int64_t n, int64_t k) { return int4_units(n, k) * kInt4ScaleUnitBytes; }

// Nibble (0..15) of a lane's 8 bytes of one row that holds its chunk value i (0..15): word i / 8,
// position bit0 = i bit0, bit1 = i bit2, bit2 = i bit1.
S24_HD int int4_nibble_of(int i) { return (i & 8) | (i & 1) | ((i >> 1) & 2) | ((i << 1) & 4); }

// Nibble index (byte = index / 2, high half when odd) of value j (the j-th kept element, as in
// value_offset) of row `row` in the resident int4 values.
S24_HD int64_t int4_value_nibble(int64_t row, int64_t j, int64_t k) {
  const int64_t kb = j / 64, t = (j % 64) / 16, i = j % 16;
  const int64_t r = row % kMetaRowAlign, warp = r / 16, g = r % 8, h = (r / 8) % 2;
  const int64_t byte = (row / kMetaRowAlign * int4_kblocks(k) + kb) * kInt4BlockBytes + warp * 512 + (4 * g + t) * 16 + h * 8;
  return 2 * byte + int4_nibble_of(static_cast<int>(i));
}

// Byte of the group scale of row `row` and 128-column block kb.
S24_HD int64_t int4_scale_offset(int64_t row, int64_t kb, int64_t k) {
  const int64_t unit = row / kMetaRowAlign * int4_units_per_tile(k) + kb / kInt4UnitBlocks;
  return unit * kInt4ScaleUnitBytes + (row % kMetaRowAlign) * kInt4UnitBlocks + kb % kInt4UnitBlocks;
}

// CUDA's __byte_perm without the sign-replicate mode (selector nibbles 0..7), on host and device.
S24_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t src = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<uint32_t>((src >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return out;
#endif
}

// The int8 codes (int4 value x g) of the 8 values of one resident word (8 offset-binary nibbles u =
// value + 8) with group scale g (0..18): out[0] = nibbles 0, 1, 4, 5 and out[1] = nibbles 2, 3, 6, 7,
// byte i of a word = the i-th of them, i.e. the 8-bit layout's words of values 4w .. 4w+3 for the
// nibble order above. In 16-bit lanes, u x g + 256 - 8g = value x g + 256 lies in [130, 382]: no
// lane carries or borrows into the next, and the low byte is value x g in two's complement (exact:
// |value x g| <= 126). One mask (and shift), one IMAD per two values and a PRMT per 4: ~13 integer
// ops per 8 weights, vs. a byte-wise multiply that the hardware does not have.
S24_HD void int4_codes(uint32_t word, uint32_t g, uint32_t (&out)[2]) {
  const uint32_t bias = 0x01000100u - g * 0x00080008u;  // 256 - 8g in each lane, >= 112: no borrow
  uint32_t p[4];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int s = 0; s < 4; ++s) p[s] = ((word >> (4 * s)) & 0x000f000fu) * g + bias;
  out[0] = byte_perm(p[0], p[1], 0x6240u);
  out[1] = byte_perm(p[2], p[3], 0x6240u);
}

}  // namespace sparse24::decode
