// Host-only check of the closed-form index math the decode kernel uses (layout.h) against the CuTe
// layouts CUTLASS builds for the resident weight: CanonicalSparseConfig::fill_layoutA/fill_layoutE
// of the transposed problem (N, tokens, K, 1), exactly as run_gemm (sparse24_gemm.cuh) and the
// compressor (sm90_sparse_gemm_compressor.hpp) address them; and of the mma fragment layout the
// kernel assumes against CuTe's traits of the instruction. No GPU needed.
//   layout_probe N K [N K ...]   -> prints one line per shape, exit status 0 iff all match
//   layout_probe --selectors     -> the 256 expand_selector() words, one per metadata byte (hex)
//   layout_probe --int4 N K      -> the int4 layout's closed forms (layout.h): per row, the nibble
//                                   index of each kept value, then the byte of each group scale;
//                                   then a line with the values and group scale bytes
//   layout_probe --int4-codes G WORD [WORD ...] -> int4_codes(WORD, G) of each word (hex WORD in,
//                                   two hex words out)
//   layout_probe --unit-copies N K M UB INT4 X_STRIDE TOKEN_ROWS -> the decode GEMM's tensor maps
//                                   (tma_plan.h unit_maps, in 4-byte words: "map NAME dim0 dim1
//                                   row_stride box0 box1") and each unit's box origins ("unit RT
//                                   KB0" + 8 numbers)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "../sparse24_gemm.cuh"
#include "cute/atom/mma_traits_sm80.hpp"
#include "cute/atom/mma_traits_sm89.hpp"
#include "layout.h"
#include "tma_plan.h"

using namespace cute;
using sparse24::CanonicalSparseConfig;

namespace {

// The 2-bit fields of a metadata byte, as the compressor packs them: chunk i of a row's tile lives
// in the i-th 4-bit element of recast<uint4_t>(bytes), and inside a chunk the kept element j's
// logical index sits at bits [2j, 2j + 2).
bool nibble_order_matches() {
  uint8_t bytes[2] = {0, 0};
  Tensor t = recast<uint4_t>(make_tensor(&bytes[0], make_layout(make_shape(Int<2>{}))));
  t(0) = uint4_t(0x1);
  t(1) = uint4_t(0x2);
  t(2) = uint4_t(0x3);
  return bytes[0] == 0x21 && bytes[1] == 0x03;
}

// The mma.m16n8k32 register fragments decode_gemm.cu assumes, against CuTe's MMA_Traits of the same
// instruction (int8 and e4m3): A register q of lane (g, t) = row g + 8 (q % 2), k 4t + 16 (q / 2)
// + byte; B register q = k 4t + 16 q + byte of column g; C element c = row g + 8 (c / 2), column
// 2t + c % 2. ALayout / BLayout / CLayout map (lane, value) to a column-major (M x K), (N x K),
// (M x N) index.
template <class Traits>
bool mma_fragments_match() {
  bool ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int v = 0; v < 16; ++v) {
      const int q = v / 4, b = v % 4;
      ok &= typename Traits::ALayout{}(lane, v) == (g + 8 * (q % 2)) + 16 * (4 * t + 16 * (q / 2) + b);
    }
    for (int v = 0; v < 8; ++v) {
      const int q = v / 4, b = v % 4;
      ok &= typename Traits::BLayout{}(lane, v) == g + 8 * (4 * t + 16 * q + b);
    }
    for (int c = 0; c < 4; ++c) ok &= typename Traits::CLayout{}(lane, c) == (g + 8 * (c / 2)) + 16 * (2 * t + c % 2);
  }
  return ok;
}

int check_shape(int n, int k) {
  auto problem = make_tuple(n, 1, k, 1);
  auto layout_a = CanonicalSparseConfig::fill_layoutA(problem);
  auto layout_e = CanonicalSparseConfig::fill_layoutE(problem);
  using ElementAMma = typename CanonicalSparseConfig::ElementAMma;
  using ElementEMma = typename CanonicalSparseConfig::ElementEMma;
  static_assert(ElementAMma::sparsity == 2 && ElementEMma::sparsity == 8,
                "one metadata byte covers 8 logical weights (two 4-element chunks)");
  static_assert(int(typename CanonicalSparseConfig::TensorEAtomM{}) == sparse24::decode::kMetaRowAlign &&
                    int(typename CanonicalSparseConfig::TensorEAtomK{}) == sparse24::decode::kMetaBlockK,
                "metadata atom is 64 rows x 128 logical k");
  // The same views the compressor writes through: sparse pointers, recast to raw elements.
  std::vector<int8_t> a_buf(1);
  std::vector<uint8_t> e_buf(1);
  Tensor gA = recast<int8_t>(make_tensor(recast_ptr<ElementAMma>(a_buf.data()), layout_a));
  Tensor gE = recast<uint8_t>(make_tensor(recast_ptr<ElementEMma>(e_buf.data()), layout_e));
  const int kc = k / 2, kb = k / 8;
  if (size<0>(gA) != n || size<1>(gA) != kc || size<0>(gE) < n || size<1>(gE) != (k + 127) / 128 * 16) {
    std::printf("n=%d k=%d: unexpected extents A %d x %d, E %d x %d\n", n, k, int(size<0>(gA)),
                int(size<1>(gA)), int(size<0>(gE)), int(size<1>(gE)));
    return 1;
  }
  int bad = 0;
  const int64_t meta_rows = sparse24::decode::meta_rows(n);
  for (int r = 0; r < n; ++r) {
    for (int j = 0; j < kc; ++j) {
      int64_t got = &gA(r, j, 0) - a_buf.data();
      if (got != sparse24::decode::value_offset(r, j, k) && bad++ < 5)
        std::printf("n=%d k=%d: value (%d, %d) at %lld, closed form %lld\n", n, k, r, j, (long long)got,
                    (long long)sparse24::decode::value_offset(r, j, k));
    }
    for (int b = 0; b < kb; ++b) {
      int64_t got = &gE(r, b, 0) - e_buf.data();
      if (got != sparse24::decode::meta_offset(r, b, meta_rows) && bad++ < 5)
        std::printf("n=%d k=%d: metadata byte (%d, %d) at %lld, closed form %lld\n", n, k, r, b,
                    (long long)got, (long long)sparse24::decode::meta_offset(r, b, meta_rows));
    }
  }
  int64_t e_bytes = cosize(layout_e) / 8;
  if (e_bytes != sparse24::decode::meta_bytes(n, k) && bad++ < 5)
    std::printf("n=%d k=%d: metadata holds %lld bytes, closed form %lld\n", n, k, (long long)e_bytes,
                (long long)sparse24::decode::meta_bytes(n, k));
  std::printf("n=%d k=%d: %s\n", n, k, bad ? "MISMATCH" : "ok");
  return bad != 0;
}

}  // namespace

int main(int argc, char** argv) {
  namespace d = sparse24::decode;
  if (argc == 2 && std::string(argv[1]) == "--selectors") {
    for (uint32_t b = 0; b < 256; ++b) std::printf("%08x\n", d::expand_selector(b));
    return 0;
  }
  if (argc == 4 && std::string(argv[1]) == "--int4") {
    const int64_t n = std::atoll(argv[2]), k = std::atoll(argv[3]);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < k / 2; ++j) std::printf("%lld ", static_cast<long long>(d::int4_value_nibble(r, j, k)));
      for (int64_t kb = 0; kb < d::int4_kblocks(k); ++kb)
        std::printf("%lld ", static_cast<long long>(d::int4_scale_offset(r, kb, k)));
      std::printf("\n");
    }
    std::printf("%lld %lld\n", static_cast<long long>(d::int4_value_bytes(n, k)),
                static_cast<long long>(d::int4_scale_bytes(n, k)));
    return 0;
  }
  if (argc >= 3 && std::string(argv[1]) == "--int4-codes") {
    const uint32_t g = static_cast<uint32_t>(std::strtoul(argv[2], nullptr, 10));
    for (int i = 3; i < argc; ++i) {
      uint32_t out[2];
      d::int4_codes(static_cast<uint32_t>(std::strtoul(argv[i], nullptr, 16)), g, out);
      std::printf("%08x %08x\n", out[0], out[1]);
    }
    return 0;
  }
  if (argc == 9 && std::string(argv[1]) == "--unit-copies") {
    const int64_t n = std::atoll(argv[2]), k = std::atoll(argv[3]), m = std::atoll(argv[4]);
    const int ub = std::atoi(argv[5]), token_rows = std::atoi(argv[8]);
    const bool int4 = std::atoi(argv[6]) != 0;
    const d::UnitMaps u = d::unit_maps(n, k, m, ub, int4, std::atoll(argv[7]), token_rows);
    const std::pair<const char*, const d::OperandMap*> maps[] = {
        {"values", &u.values}, {"scales", &u.scales}, {"meta", &u.meta}, {"x", &u.x}};
    for (const auto& [name, o] : maps)
      std::printf("map %s %lld %lld %lld %d %d\n", name, static_cast<long long>(o->dims[0]),
                  static_cast<long long>(o->dims[1]), static_cast<long long>(o->row_stride), o->box[0], o->box[1]);
    const int kblocks = static_cast<int>(d::int4_kblocks(k)), tiles = static_cast<int>((n + 63) / 64);
    for (int rt = 0; rt < tiles; ++rt)
      for (int kb0 = 0; kb0 < kblocks; kb0 += ub) {
        const d::UnitCoords c = d::unit_coords(rt, kb0, kblocks, int4);
        std::printf("unit %d %d %d %d %d %d %d %d %d %d\n", rt, kb0, c.values[0], c.values[1], c.scales[0],
                    c.scales[1], c.meta[0], c.meta[1], c.x[0], c.x[1]);
      }
    return 0;
  }
  if (argc < 3 || argc % 2 == 0) {
    std::fprintf(stderr, "usage: %s N K [N K ...]\n", argv[0]);
    return 2;
  }
  int fails = 0;
  if (!nibble_order_matches()) {
    std::printf("uint4_t recast: chunk 0 is not the low nibble of byte 0\n");
    ++fails;
  }
  if (!mma_fragments_match<MMA_Traits<SM80_16x8x32_S32S8S8S32_TN>>() ||
      !mma_fragments_match<MMA_Traits<SM89_16x8x32_F32E4M3E4M3F32_TN>>()) {
    std::printf("mma.m16n8k32 fragments: CuTe's traits differ from the layout decode_gemm.cu assumes\n");
    ++fails;
  }
  for (int i = 1; i + 1 < argc; i += 2) fails += check_shape(std::atoi(argv[i]), std::atoi(argv[i + 1]));
  return fails ? 1 : 0;
}
