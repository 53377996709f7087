// Few-token (M <= 64) 2:4 sparse W8A8 GEMM that streams the resident CUTLASS layout (layout.h).
//
// At decode a linear layer is a weight stream: the kernel must keep enough weight bytes in flight on
// every SM to run at HBM bandwidth, start streaming as early as possible and end with little work
// after the last byte arrives. So:
//   * Persistent grid, one CTA per SM, each CTA an equal share of the work units (stream-K): a unit
//     is 64 rows (one metadata atom) x UB 128-k blocks (4 or 8, a launch knob: a unit is one ring
//     stage and three tensor copies, so UB sets the bytes each copy carries), numbered row tile
//     major. A row tile whose units span several CTAs is finished by the last of them (fixup below).
//   * Weight staged through a shared-memory ring by one producer thread with TMA tensor copies
//     (cp.async.bulk.tensor, completing on an mbarrier): bytes in flight cost no registers, up to
//     kMaxStages units per SM (~190 KB) are requested before any math, and the math of one stage
//     overlaps the loads of the next ones. Each stage also holds the activations of its k range.
//     A unit is THREE copies: values (64 box rows of 256 bytes), metadata (4 box rows of 1 KB: the
//     64-row atoms of consecutive k blocks are contiguous, so the map sees them as rows of 4-byte
//     words) and activations (8 NT box rows of 512 bytes, one per token). The TMA unit spends a
//     fixed time per box row, whatever its length or the bytes' source (HBM or L2): 16-byte box
//     rows for the metadata (352 box rows a unit) held every SM to one unit per ~1 us; 76 box rows
//     cost a fifth of that. Boxes past the tensor's edge (last row tile, K tail, tokens past m)
//     are filled with zeros by the TMA unit.
//   * Programmatic dependent launch: the weight does not depend on the previous kernel, so the
//     producer requests the first kEarlyUnits units' weight before `griddepcontrol.wait`, and the
//     activations (and every global write) only after it. Only a few: the TMA unit serves copies in
//     the order they were requested, so the first stage's activations wait behind every weight copy
//     issued before them (8 early units delayed the first stage to ~7 us after entry, 4 to ~2.8).
//     Launched without the attribute the wait is a no-op.
//   * Four consumer warps, 16 rows each: a lane expands 4 kept values into 8 dense 8-bit weights
//     with two PRMTs whose selectors come from a 256-entry table indexed by the metadata byte, then
//     a DENSE mma.sync m16n8k32 (int8 -> int32, e4m3 -> float32) covers 8 tokens.
//     (dp4a would cost 2 integer ops per 4 weights PER TOKEN; mma.sp would need the metadata in the
//     PTX sparse-fragment order; the dense fragments let a lane read whole 16-byte chunks.)
//   * Int4 weights (w4a8 2:4, in_dtype S24_INT4): the values are int4 with a uint8 scale per row and
//     128-k block, resident in the decode order of layout.h (8 KB of values + 256 bytes of group
//     scales a unit, each contiguous: 9 box rows instead of 64 for the values). A lane turns its
//     nibbles into the int8 codes (int4 value x group scale, int4_codes()) and from there runs the
//     int8 path unchanged: the same selector expansion, mma and epilogue, so the result is the int8
//     kernel's on the unpacked codes, bit for bit. The unit stage holds the values at half the bytes.
// K slots are permuted freely: a dot product does not care which logical k sits in which fragment
// slot as long as A and B agree. Lane (g = lane / 4, t = lane % 4) takes, per 128-k block, the
// 16-byte value chunk t of rows g and g + 8 (logical k 32t .. 32t+31) and word w of it
// (k 32t+8w .. +7) in k-step w; its activation fragment is then the 8 contiguous bytes
// x[token, 32t+8w ..]. No shuffles.
//
// Fixup: a warp whose row tile is not wholly in its CTA's range stores its partial sums in the
// caller's workspace (two slots per CTA and warp: the CTA's first and last tile), and the last warp
// to arrive (an atomic ticket per tile and warp) adds the slots in CTA order (deterministic), applies
// the epilogue and re-arms the ticket, so the workspace stays ready between calls and graph replays.
//
// Timing probe (built only with -DS24_DECODE_PROBE, into its own library by `python -m
// vllm_sparse24.build --decode-probe`): the kernel writes per-CTA %globaltimer stamps at the phase
// boundaries named in kProbeSlotNames into a buffer set by s24_decode_probe_set, so a run can show
// where a CTA spends its time before the first byte arrives and after the last. Without the macro
// the stamps, the Params field and the probe entry points do not exist: the serving kernel is the
// same code. The probe build can also leave kinds of copies out (s24_decode_probe_set_omit: values,
// metadata, activations, or the weight copies' L2 hint), a diagnostic of which copy paces the ring:
// the results are then wrong, the timing is what it measures.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "../sparse24.h"
#include "decode_gemm.h"
#include "layout.h"
#include "tma_plan.h"

namespace sparse24::decode {
namespace {

constexpr int kConsumerWarps = 4;
constexpr int kThreads = (kConsumerWarps + 1) * 32;  // + the producer warp
constexpr int kTileRows = 64;                        // one metadata atom
constexpr int kWarpRows = kTileRows / kConsumerWarps;
constexpr int kUnitBlocksDefault = 4;                // 128-k blocks per unit (= stage) unless tuned: 4 or 8
constexpr int kMaxM = 64;                            // 8 token tiles of 8
constexpr int kMaxStages = 8;
constexpr int kEarlyUnits = 2;                       // weight units requested before griddepcontrol.wait
constexpr int kMaxCtasPerSm = 2;                     // the workspace's partial slots allow this many
constexpr int kMetaAtomBytes = kTileRows * 16;       // one k block of one row tile's metadata
// Row pitches in a stage are those of the TMA boxes (dense): UB x 64 value bytes per weight row, UB x
// 128 activation bytes per token.
template <int UB>
constexpr int kValuePitch = UB * kMetaBlockK / 2;
template <int UB>
constexpr int kActPitch = UB * kMetaBlockK;
constexpr int kInt4KMultiple = 64;                   // int4 weights: K per rank a multiple of 64 (format.md)
constexpr int kMaxTickets = 16384;                   // (row tiles x warps) of the largest layer
constexpr int64_t kTicketBytes = kMaxTickets * 4;
constexpr size_t kErrLen = 512;

#ifdef S24_DECODE_PROBE
// One record of kProbeSlots uint64 per CTA: fixed events first, then per-unit stamps for the CTA's
// first kProbeUnits units (more would only repeat the steady state). A slot never written stays as
// the caller left it (zero): events a CTA does not reach (no split tile, fewer units) read 0.
enum ProbeSlot : int {
  kPrEntry, kPrInit, kPrSmid, kPrCount, kPrFinishCalls,
  kPrProdStart, kPrProdPreIssued, kPrProdGdc, kPrProdLast, kPrProdExit,
  kPrConsLut, kPrConsGdc, kPrFirstFull, kPrFirstMath, kPrLastFull, kPrLastMath,
  kPrFinFirstIn, kPrFinFirstOut, kPrFinLastIn, kPrFinLastOut, kPrFixupSum,
  kPrExit0, kPrExit1, kPrExit2, kPrExit3,
  kPrFixed,
};
constexpr int kProbeUnits = 32;
constexpr int kPrUnitIssue = 32, kPrUnitFull = kPrUnitIssue + kProbeUnits, kPrUnitMath = kPrUnitFull + kProbeUnits;
constexpr int kProbeSlots = kPrUnitMath + kProbeUnits;
static_assert(kPrFixed <= kPrUnitIssue, "fixed events overlap the per-unit stamps");
// Names of the fixed slots, in order (benchmarks/decode_probe.py reads them from the library).
const char* const kProbeSlotNames[kPrFixed] = {
    "entry", "init", "smid", "count", "finish_calls",
    "prod_start", "prod_pre_issued", "prod_gdc", "prod_last", "prod_exit",
    "cons_lut", "cons_gdc", "first_full", "first_math", "last_full", "last_math",
    "fin_first_in", "fin_first_out", "fin_last_in", "fin_last_out", "fixup_sum",
    "exit0", "exit1", "exit2", "exit3",
};
uint64_t* g_probe = nullptr;  // the buffer the next launches stamp into (s24_decode_probe_set)
int g_probe_omit = 0;  // ProbeOmit bits of the next launches (s24_decode_probe_set_omit)
#endif
// Copies the probe build can leave out (bits); the serving build never does
enum ProbeOmit : int { kOmitHint = 1, kOmitAct = 2, kOmitMeta = 4, kOmitValues = 8 };
thread_local char g_err[kErrLen] = "";

int fail(int code, const char* fmt, long long a = 0, long long b = 0, long long c = 0, long long d = 0) {
  std::snprintf(g_err, kErrLen, fmt, a, b, c, d);
  return code;
}

// Weight tag of the int4 variant: int4 values + group scales, int8 activations, int32 sums.
struct Int4 {};
template <class In>
constexpr bool kIsInt4 = std::is_same_v<In, Int4>;

template <class T>
struct Acc { using type = int32_t; };
template <>
struct Acc<__nv_fp8_e4m3> { using type = float; };

// Stage layout: values [64 rows][kValuePitch] (int4: UB blocks of layout.h's int4 values, half the
// bytes), metadata [UB][64 rows][16], int4 only: group scales [UB / 4 records][64 rows][4 blocks],
// activations [8 NT tokens][kActPitch]; 128-byte aligned.
template <int NT, bool Int4Weight, int UB>
struct Stage {
  static constexpr int kValues = 0;
  static constexpr int kMeta = Int4Weight ? UB * kInt4BlockBytes : kTileRows * kValuePitch<UB>;
  static constexpr int kScales = kMeta + UB * kMetaAtomBytes;
  static constexpr int kAct = kScales + (Int4Weight ? UB / kInt4UnitBlocks * kInt4ScaleUnitBytes : 0);
  static constexpr int kActBytes = 8 * NT * kActPitch<UB>;
  static constexpr int kLoadBytes = kAct + kActBytes;  // what one unit's copies deliver (int4: four)
  static constexpr int kBytes = (kLoadBytes + 127) / 128 * 128;
};
template <int UB>
constexpr bool kAlignedStages = Stage<1, false, UB>::kMeta % 128 == 0 && Stage<1, false, UB>::kAct % 128 == 0 &&
                                Stage<1, true, UB>::kMeta % 128 == 0 && Stage<1, true, UB>::kScales % 128 == 0 &&
                                Stage<1, true, UB>::kAct % 128 == 0 && UB % kInt4UnitBlocks == 0;
static_assert(kAlignedStages<4> && kAlignedStages<8>, "TMA destinations are 128-byte aligned; whole int4 records");
// The stage's byte layout (compile time) and tma_plan.h's boxes (the maps encoded at run time) describe
// the same copies: a box that does not fill its slot exactly would leave the stage's expect_tx unmet
// and hang the ring, so every stage shape is checked against the boxes of a unit of that shape.
template <int NT, bool Int4Weight, int UB>
constexpr bool stage_holds_unit_boxes() {
  using S = Stage<NT, Int4Weight, UB>;
  constexpr UnitMaps u = unit_maps(kTileRows, UB * kMetaBlockK, 8 * NT, UB, Int4Weight, UB * kMetaBlockK, 8 * NT);
  return box_bytes(u.values) == S::kMeta - S::kValues && box_bytes(u.meta) == S::kScales - S::kMeta &&
         box_bytes(u.scales) == S::kAct - S::kScales && box_bytes(u.x) == S::kActBytes;
}
static_assert(kTileRows == kMetaRowAlign && kWarpRows == 16, "the int4 layout's row tile is the kernel's");
// full + empty barriers, selector table, token scales
constexpr int kHeaderBytes = 2 * kMaxStages * 8 + 256 * 4 + kMaxM * 4;

// ---- PTX wrappers -----------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred p;\n"
      "WAIT:\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "\t@!p bra WAIT;\n}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// Weights are read once per call and exceed L2 many times over across a model's layers: first in
// line for eviction, so activations and partial sums stay cached.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
// TMA tensor copies: box at the given coordinates (innermost first) of the tensor map, completing
// on the stage's mbarrier.
__device__ __forceinline__ void tensor_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                               uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;"
      ::"r"(smem_addr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}
__device__ __forceinline__ void tensor_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];"
      ::"r"(smem_addr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
}
// Programmatic dependent launch: wait until the previous kernel in the stream has completed and its
// memory is visible (a no-op when launched without the attribute).
__device__ __forceinline__ void wait_previous_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumerWarps * 32)); }

// Not volatile: pure register math the compiler may schedule around the shared-memory loads.
__device__ __forceinline__ void mma(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <class T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<int32_t>(int32_t v) { return __int2float_rn(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ---- work partition (host and device) ---------------------------------------------------------

struct Partition {
  int kblocks, unit_blocks, units_per_tile, units, ctas;
  S24_HD int begin(int cta) const { return static_cast<int>(static_cast<int64_t>(cta) * units / ctas); }
  // the CTA whose range holds unit u: the largest c with begin(c) <= u
  S24_HD int cta_of(int u) const { return static_cast<int>((static_cast<int64_t>(u + 1) * ctas - 1) / units); }
};

S24_HD Partition make_partition(int n, int k, int sms, int unit_blocks = kUnitBlocksDefault) {
  Partition p;
  p.kblocks = static_cast<int>(int4_kblocks(k));  // k / 128 but for an int4 weight's partial last block
  p.unit_blocks = unit_blocks;
  p.units_per_tile = (p.kblocks + unit_blocks - 1) / unit_blocks;
  p.units = (n + kTileRows - 1) / kTileRows * p.units_per_tile;
  p.ctas = std::min(p.units, sms);
  return p;
}

// The operands as TMA tensor maps: tma_plan.h (unit_maps, unit_coords).
struct alignas(64) Params {
  CUtensorMap values;
  CUtensorMap meta;
  CUtensorMap x;
  CUtensorMap scales;  // int4 only
  const float* x_scale;
  const float* w_scale;
  const void* bias;
  void* out;
  int m, n, k;
  Partition part;
  int stages;
  int* tickets;    // [kMaxTickets], zero between calls
  void* partials;  // [ctas][2][kConsumerWarps][kMaxM][kWarpRows] accumulator type
#ifdef S24_DECODE_PROBE
  uint64_t* probe;  // [ctas][kProbeSlots] stamps, or null (no stamps)
  int probe_omit;   // ProbeOmit bits
#endif
};

#ifdef S24_DECODE_PROBE
__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}
__device__ __forceinline__ void probe_put(const Params& p, int slot, uint64_t v) {
  if (p.probe) p.probe[static_cast<int64_t>(blockIdx.x) * kProbeSlots + slot] = v;
}
// "memory" clobbers keep the stamp between the operations it separates
#define S24_STAMP(slot) probe_put(p, (slot), globaltimer())
#define S24_STAMP_UNIT(base, i) \
  do {                          \
    if ((i) < kProbeUnits) S24_STAMP((base) + (i)); \
  } while (0)
#define S24_PUT(slot, v) probe_put(p, (slot), (v))
// thread 0's stamp of unit i into the per-unit slots at unit_base, and into first / last at the
// CTA's first and last unit
#define S24_STAMP_UNIT_EDGES(unit_base, first, last, i, count) \
  do {                                                         \
    if (tid == 0) {                                            \
      S24_STAMP_UNIT((unit_base), (i));                        \
      if ((i) == 0) S24_STAMP(first);                          \
      if ((i) == (count) - 1) S24_STAMP(last);                 \
    }                                                          \
  } while (0)
__global__ void probe_mark_kernel(uint64_t* dst) { *dst = globaltimer(); }
#else
#define S24_STAMP(slot) ((void)0)
#define S24_STAMP_UNIT(base, i) ((void)0)
#define S24_PUT(slot, v) ((void)0)
#define S24_STAMP_UNIT_EDGES(unit_base, first, last, i, count) ((void)0)
#endif

// The GEMM's epilogue, with the same roundings as the CUTLASS visitor tree (gemm_config.cu):
// float(acc) * w_scale rounded, then one fma with x_scale and the bias, then the output rounding.
// The scales and the bias come from registers and shared memory, never from a global load behind
// an output store (the compiler cannot move a load across a store that may alias it).
template <class Out, class A>
__device__ __forceinline__ void store_out(const Params& p, int t, int row, A acc, float w_scale, float x_scale,
                                          float bias) {
  const float v = __fmaf_rn(__fmul_rn(to_float(acc), w_scale), x_scale, bias);
  static_cast<Out*>(p.out)[static_cast<int64_t>(t) * p.n + row] = from_float<Out>(v);
}

// ---- the kernel -------------------------------------------------------------------------------

template <class In, class Out, int NT, int UB>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ Params p) {
  using A = typename Acc<In>::type;
  using S = Stage<NT, kIsInt4<In>, UB>;
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + kMaxStages;
  uint32_t* lut = reinterpret_cast<uint32_t*>(empty + kMaxStages);
  float* x_scale = reinterpret_cast<float*>(lut + 256);
  uint8_t* stages = smem + (kHeaderBytes + 127) / 128 * 128;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const Partition& part = p.part;
  const int u_begin = part.begin(blockIdx.x), u_end = part.begin(blockIdx.x + 1), count = u_end - u_begin;
#ifdef S24_DECODE_PROBE
  if (tid == 0) {
    S24_STAMP(kPrEntry);
    uint32_t smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    S24_PUT(kPrSmid, smid);
    S24_PUT(kPrCount, count);
  }
#endif
  if (tid == 0) {
    for (int s = 0; s < p.stages; ++s) mbar_init(full + s, 1), mbar_init(empty + s, kConsumerWarps);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (tid == 0) S24_STAMP(kPrInit);

  if (warp == kConsumerWarps) {  // ---- producer: one thread issues every copy -----------------------
    if (lane != 0) return;
    const uint64_t policy = evict_first_policy();
    prefetch_map(&p.values), prefetch_map(&p.meta), prefetch_map(&p.x);
    if constexpr (kIsInt4<In>) prefetch_map(&p.scales);
    auto coords = [&](int i) {  // the box origins of the CTA's unit i
      const int u = u_begin + i, rt = u / part.units_per_tile;
      return unit_coords(rt, (u - rt * part.units_per_tile) * UB, part.kblocks, kIsInt4<In>);
    };
#ifdef S24_DECODE_PROBE
    const int omit = p.probe_omit;
    const uint32_t load_bytes = S::kLoadBytes - (omit & kOmitAct ? S::kActBytes : 0) -
                                (omit & kOmitMeta ? S::kScales - S::kMeta : 0) -
                                (omit & kOmitValues ? S::kMeta + S::kAct - S::kScales : 0);
#else
    constexpr int omit = 0;
    constexpr uint32_t load_bytes = S::kLoadBytes;
#endif
    auto load = [&](void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
      if (omit & kOmitHint) tensor_load_2d(dst, map, c0, c1, bar);
      else tensor_load_2d(dst, map, c0, c1, bar, policy);
    };
    auto load_weight = [&](int i) {
      const UnitCoords c = coords(i);
      uint8_t* st = stages + (i % p.stages) * S::kBytes;
      uint64_t* bar = full + i % p.stages;
      mbar_expect_tx(bar, load_bytes);
      if (!(omit & kOmitValues)) {
        load(st + S::kValues, &p.values, c.values[0], c.values[1], bar);
        if constexpr (kIsInt4<In>) load(st + S::kScales, &p.scales, c.scales[0], c.scales[1], bar);
      }
      if (!(omit & kOmitMeta)) load(st + S::kMeta, &p.meta, c.meta[0], c.meta[1], bar);
    };
    auto load_act = [&](int i) {
      const UnitCoords c = coords(i);
      if (!(omit & kOmitAct))
        tensor_load_2d(stages + (i % p.stages) * S::kBytes + S::kAct, &p.x, c.x[0], c.x[1], full + i % p.stages);
    };
    const int pre = min(count, min(p.stages, kEarlyUnits)), fill = min(count, p.stages);
    S24_STAMP(kPrProdStart);
    for (int i = 0; i < pre; ++i) {
      load_weight(i);
      S24_STAMP_UNIT(kPrUnitIssue, i);
    }
    S24_STAMP(kPrProdPreIssued);
    wait_previous_grid();  // the activations are the previous kernel's output
    S24_STAMP(kPrProdGdc);
    for (int i = 0; i < pre; ++i) load_act(i);
    for (int i = pre; i < fill; ++i) {
      load_weight(i), load_act(i);
      S24_STAMP_UNIT(kPrUnitIssue, i);
    }
    for (int i = fill; i < count; ++i) {
      mbar_wait(empty + i % p.stages, ((i / p.stages) & 1) ^ 1);
      load_weight(i), load_act(i);
      S24_STAMP_UNIT(kPrUnitIssue, i);
    }
    S24_STAMP(kPrProdLast);
    S24_STAMP(kPrProdExit);
    return;
  }

  // ---- consumers: warp w computes rows 16 w .. 16 w + 15 of each unit's 64 --------------------------
  for (int i = tid; i < 256; i += kConsumerWarps * 32) lut[i] = expand_selector(i);
  consumer_sync();
  if (tid == 0) S24_STAMP(kPrConsLut);
  wait_previous_grid();  // before any global write (output, workspace) and the token scales
  if (tid == 0) S24_STAMP(kPrConsGdc);
  for (int i = tid; i < p.m; i += kConsumerWarps * 32) x_scale[i] = p.x_scale[i];
  consumer_sync();

  const int g = lane / 4, t = lane % 4, wrow = warp * kWarpRows;
  // Few tokens: one accumulator set per k-step (NT == 1: 4, NT == 2: 2), so a block's mmas do not
  // wait for each other. With one consumer warp per scheduler, a lane's instruction-level
  // parallelism is all that hides the latencies of the shared-memory loads and the mma.
  constexpr int kSets = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  A acc[kSets][NT][4];
  auto zero_acc = [&] {
#pragma unroll
    for (int q = 0; q < kSets; ++q)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[q][j][c] = A(0);
  };
  zero_acc();

  // The lane's two rows' weight scale and bias, loaded when a row tile starts so that the loads
  // overlap its math.
  float w_scale[2] = {0.f, 0.f}, bias[2] = {0.f, 0.f};
  auto load_row_params = [&](int rt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = rt * kTileRows + wrow + g + 8 * h;
      if (row < p.n) {
        w_scale[h] = p.w_scale[row];
        bias[h] = p.bias ? to_float(static_cast<const Out*>(p.bias)[row]) : 0.f;
      }
    }
  };
  // accumulator c of token tile j holds row wrow + g + 8 (c >> 1), token 8 j + 2 t + (c & 1)
  auto store_tile = [&](int row0, const A (&sum)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int tok = 8 * j + 2 * t + (c & 1), h = c >> 1, row = row0 + 8 * h;
        if (tok < p.m && row < p.n) store_out<Out>(p, tok, row, sum[j][c], w_scale[h], x_scale[tok], bias[h]);
      }
  };
  auto finish = [&](int rt, bool whole) {
#pragma unroll
    for (int q = 1; q < kSets; ++q)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[0][j][c] += acc[q][j][c];
    const int row0 = rt * kTileRows + wrow + g;
    if (whole) {
      store_tile(row0, acc[0]);
      return;
    }
    const int first_unit = rt * part.units_per_tile;
    const int c_first = part.cta_of(first_unit), c_last = part.cta_of(first_unit + part.units_per_tile - 1);
    auto slot = [&](int cta) {  // a CTA's first tile uses slot 0, its last slot 1
      const int which = part.begin(cta) / part.units_per_tile == rt ? 0 : 1;
      return static_cast<A*>(p.partials) + ((static_cast<int64_t>(cta) * 2 + which) * kConsumerWarps + warp) * (kMaxM * kWarpRows);
    };
    A* mine = slot(blockIdx.x);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) __stcg(mine + (8 * j + 2 * t + (c & 1)) * kWarpRows + g + 8 * (c >> 1), acc[0][j][c]);
    // The ticket as a release / acquire pair made by lane 0 alone (CUTLASS's split-K barrier does the
    // same): the warp barrier orders every lane's partial stores before lane 0's acq_rel fence, whose
    // relaxed atomic then publishes them; the last arriver's fence after the atomic, and the barrier
    // after it, order the other CTAs' partials before its lanes read them. (A __threadfence per lane
    // would be an SC fence in each of the 32.)
    __syncwarp();
    int last = 0;
    int* ticket = p.tickets + rt * kConsumerWarps + warp;
    if (lane == 0) {
      fence_acq_rel_gpu();
      last = atomicAdd(ticket, 1) == c_last - c_first;
      if (last) fence_acq_rel_gpu();
    }
    if (!__shfl_sync(0xffffffffu, last, 0)) return;
    __syncwarp();
    if (tid == 0) S24_STAMP(kPrFixupSum);
    // Added in CTA order (deterministic). The slots of kFixupBatch CTAs are loaded before any of them
    // is added, so their L2 round trips overlap (a tile of the 8B o_proj spans 2-4 CTAs); at >= 32
    // tokens the registers go to the accumulators and a batch is one slot.
    constexpr int kFixupBatch = NT >= 4 ? 1 : 4 / NT;
    A sum[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) sum[j][c] = A(0);
    for (int c0 = c_first; c0 <= c_last; c0 += kFixupBatch) {
      A part_sum[kFixupBatch][NT][4];
#pragma unroll
      for (int b = 0; b < kFixupBatch; ++b) {
        const A* src = slot(min(c0 + b, c_last));  // past c_last: c_last's slot again, not added
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            part_sum[b][j][c] = __ldcg(src + (8 * j + 2 * t + (c & 1)) * kWarpRows + g + 8 * (c >> 1));
      }
#pragma unroll
      for (int b = 0; b < kFixupBatch; ++b)
        if (c0 + b <= c_last)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) sum[j][c] += part_sum[b][j][c];
    }
    store_tile(row0, sum);
    if (lane == 0) *ticket = 0;  // re-armed for the next call (or graph replay)
  };

#ifdef S24_DECODE_PROBE
  int probe_fin = 0;  // finish calls so far
#endif
  for (int i = 0; i < count; ++i) {
    const int u = u_begin + i;
    const int rt = u / part.units_per_tile, ku = u - rt * part.units_per_tile;
    const uint8_t* st = stages + (i % p.stages) * S::kBytes;
    if (ku == 0 || i == 0) load_row_params(rt);
    mbar_wait(full + i % p.stages, (i / p.stages) & 1);
    S24_STAMP_UNIT_EDGES(kPrUnitFull, kPrFirstFull, kPrLastFull, i, count);
    const uint8_t* vrow = st + S::kValues + (wrow + g) * kValuePitch<UB> + 16 * t;
    const uint8_t* mrow = st + S::kMeta + (wrow + g) * 16 + 4 * t;
    const uint8_t* xrow = st + S::kAct + g * kActPitch<UB> + 32 * t;
    // int4: the lane's 16 bytes of each block (layout.h)
    const uint8_t* v4 = st + S::kValues + warp * 512 + lane * 16;
    // Four blocks at a time (one int4 group scale record), whatever UB: each group is the same
    // straight run of loads and 16 independent mmas, and UB = 8 does not double the live registers.
#pragma unroll 1
    for (int b0 = 0; b0 < UB; b0 += kInt4UnitBlocks) {
      // int4: the group scales of the lane's rows g, g + 8 in this record (byte bb = block b0 + bb)
      uint32_t scale_words[2] = {0u, 0u};
      if constexpr (kIsInt4<In>) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
          scale_words[h] = *reinterpret_cast<const uint32_t*>(st + S::kScales + b0 / kInt4UnitBlocks * kInt4ScaleUnitBytes +
                                                              (wrow + g + 8 * h) * kInt4UnitBlocks);
      }
      // Every block of the unit, also past K (no branch: the loads of all four can be issued ahead
      // of the math): the TMA unit zero-fills metadata and activations past the tensors' edges, and a
      // zero metadata byte expands to zero weights, so those blocks add zero.
#pragma unroll
      for (int bb = 0; bb < kInt4UnitBlocks; ++bb) {
        const int b = b0 + bb;
        // vw[h][w]: 4 kept 8-bit values (k 32t + 8w .. +7) of row g + 8h, as the 8-bit layout holds them
        uint32_t vw[2][4];
        if constexpr (kIsInt4<In>) {
          const uint4 q = *reinterpret_cast<const uint4*>(v4 + b * kInt4BlockBytes);
          const uint32_t nib[2][2] = {{q.x, q.y}, {q.z, q.w}};
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t gs = (scale_words[h] >> (8 * bb)) & 0xffu;
            uint32_t lo[2], hi[2];
            int4_codes(nib[h][0], gs, lo);
            int4_codes(nib[h][1], gs, hi);
            vw[h][0] = lo[0], vw[h][1] = lo[1], vw[h][2] = hi[0], vw[h][3] = hi[1];
          }
        } else {
          const uint4 v[2] = {*reinterpret_cast<const uint4*>(vrow + b * (kMetaBlockK / 2)),
                              *reinterpret_cast<const uint4*>(vrow + 8 * kValuePitch<UB> + b * (kMetaBlockK / 2))};
#pragma unroll
          for (int h = 0; h < 2; ++h) vw[h][0] = v[h].x, vw[h][1] = v[h].y, vw[h][2] = v[h].z, vw[h][3] = v[h].w;
        }
        const uint32_t met[2] = {*reinterpret_cast<const uint32_t*>(mrow + b * kMetaAtomBytes),
                                 *reinterpret_cast<const uint32_t*>(mrow + 128 + b * kMetaAtomBytes)};
        uint4 x[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q)
            x[j][q] = *reinterpret_cast<const uint4*>(xrow + 8 * j * kActPitch<UB> + b * kMetaBlockK + 16 * q);
#pragma unroll
        for (int w = 0; w < 4; ++w) {  // k-step w: logical k 32 t + 8 w .. + 7 of this block
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // rows g / g + 8
            const uint32_t word = vw[h][w];
            const uint32_t sel = lut[(met[h] >> (8 * w)) & 0xffu];
            a[h] = __byte_perm(word, 0u, sel);            // k slots 4t .. 4t+3
            a[2 + h] = __byte_perm(word, 0u, sel >> 16);  // k slots 16 + 4t ..
          }
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t* xw = reinterpret_cast<const uint32_t*>(&x[j][w / 2]);
            mma(acc[w % kSets][j], a, xw[2 * (w % 2)], xw[2 * (w % 2) + 1]);
          }
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + i % p.stages);
    S24_STAMP_UNIT_EDGES(kPrUnitMath, kPrFirstMath, kPrLastMath, i, count);
    if (ku == part.units_per_tile - 1 || i == count - 1) {
#ifdef S24_DECODE_PROBE
      // the first call's stamps are written once, the last call's overwritten by every later one
      if (tid == 0 && !probe_fin) S24_STAMP(kPrFinFirstIn);
      if (tid == 0) S24_STAMP(kPrFinLastIn);
#endif
      finish(rt, u - ku >= u_begin && ku == part.units_per_tile - 1);
#ifdef S24_DECODE_PROBE
      if (tid == 0 && !probe_fin) S24_STAMP(kPrFinFirstOut);
      if (tid == 0) S24_STAMP(kPrFinLastOut);
      ++probe_fin;
#endif
      zero_acc();
    }
  }
#ifdef S24_DECODE_PROBE
  if (tid == 0) S24_PUT(kPrFinishCalls, probe_fin);
  if (lane == 0) S24_STAMP(kPrExit0 + warp);
#endif
}

// ---- int4 -> the 8-bit layout (the prefill path of w4a8 layers) --------------------------------

// One thread per 16 resident bytes (one lane's chunk of one tile's block, rows g and g + 8): the same
// int4_codes() as the decode kernel, stored as the 16 contiguous int8 values 16t .. 16t+15 of the
// block of each row, i.e. at value_offset(row, 64 kb + 16 t, k) of CUTLASS's [n, k/2] values.
__global__ void unpack_int4_kernel(const uint4* __restrict__ values, const uint32_t* __restrict__ scales,
                                   uint8_t* __restrict__ out, int n, int k, int kblocks, int units_per_tile,
                                   int64_t chunks) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  constexpr int kChunksPerBlock = kInt4BlockBytes / 16;
  const int64_t tile_block = c / kChunksPerBlock, rt = tile_block / kblocks, kb = tile_block % kblocks;
  const int rem = static_cast<int>(c % kChunksPerBlock);
  const int warp = rem / 32, lane = rem % 32, g = lane / 4, t = lane % 4;
  const int64_t u = rt * units_per_tile + kb / kInt4UnitBlocks;  // the group scales' unit
  const int b = static_cast<int>(kb % kInt4UnitBlocks);
  const int64_t j0 = kb * 64 + 16 * t;  // first of the chunk's 16 values in a row
  if (j0 >= k / 2) return;            // padding past K (k % 32 == 0: a chunk is all in or all out)
  const uint4 q = values[c];
  const uint32_t nib[2][2] = {{q.x, q.y}, {q.z, q.w}};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = rt * kTileRows + warp * kWarpRows + g + 8 * h;
    if (row >= n) continue;
    const uint32_t gs = (scales[u * (kInt4ScaleUnitBytes / 4) + row % kTileRows] >> (8 * b)) & 0xffu;
    uint32_t lo[2], hi[2];
    int4_codes(nib[h][0], gs, lo);
    int4_codes(nib[h][1], gs, hi);
    *reinterpret_cast<uint4*>(out + value_offset(row, j0, k)) = make_uint4(lo[0], lo[1], hi[0], hi[1]);
  }
}

// ---- host side --------------------------------------------------------------------------------

int device_attr(cudaDeviceAttr attr, int fallback) {
  static int cache[2][64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  const int slot = attr == cudaDevAttrMultiProcessorCount ? 0 : 1;
  if (dev < 0 || dev >= 64) return fallback;
  if (!cache[slot][dev]) {
    int v = 0;
    cudaDeviceGetAttribute(&v, attr, dev);
    cache[slot][dev] = v > 0 ? v : fallback;
  }
  return cache[slot][dev];
}
int sm_count() { return device_attr(cudaDevAttrMultiProcessorCount, 132); }
int smem_optin() { return device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 227 * 1024); }

int token_tiles(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

// tickets, then two partial-sum slots per CTA and consumer warp (a CTA's first and last row tile)
int64_t workspace_need(int sms) {
  return kTicketBytes + static_cast<int64_t>(kMaxCtasPerSm) * sms * 2 * kConsumerWarps * kMaxM * kWarpRows * 4;
}

template <int NT, bool Int4Weight, int UB>
int stages_for(int requested) {
  const int fit = (smem_optin() - (kHeaderBytes + 127) / 128 * 128) / Stage<NT, Int4Weight, UB>::kBytes;
  const int s = requested > 0 ? requested : kMaxStages;
  return std::max(1, std::min({s, fit, kMaxStages}));
}

template <class In, class Out, int NT, int UB>
int launch(Params& p, int stages, int ctas, bool pdl, cudaStream_t stream) {
  auto kernel = decode_kernel<In, Out, NT, UB>;
  using S = Stage<NT, kIsInt4<In>, UB>;
  static_assert(stage_holds_unit_boxes<NT, kIsInt4<In>, UB>(), "a stage slot and its TMA box differ in size");
  p.stages = stages_for<NT, kIsInt4<In>, UB>(stages);
  if (ctas > 0) p.part.ctas = std::min({ctas, p.part.units, kMaxCtasPerSm * sm_count()});
  const int smem = (kHeaderBytes + 127) / 128 * 128 + p.stages * S::kBytes;
  static int configured = 0;  // the largest dynamic shared memory this instance was allowed
  if (smem > configured) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
      return fail(-10, "decode kernel: cannot allow %lld bytes of shared memory", smem);
    configured = smem;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.part.ctas);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, p);
  if (e == cudaSuccess) e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::snprintf(g_err, kErrLen, "decode kernel launch: %s", cudaGetErrorString(e));
    return -10;
  }
  return 0;
}

template <class In, class Out, int UB>
int dispatch_tokens(Params& p, int stages, int ctas, bool pdl, cudaStream_t stream) {
  switch (token_tiles(p.m)) {
    case 1: return launch<In, Out, 1, UB>(p, stages, ctas, pdl, stream);
    case 2: return launch<In, Out, 2, UB>(p, stages, ctas, pdl, stream);
    case 4: return launch<In, Out, 4, UB>(p, stages, ctas, pdl, stream);
    default: return launch<In, Out, 8, UB>(p, stages, ctas, pdl, stream);
  }
}

template <class In, class Out>
int dispatch_tiles(Params& p, int stages, int ctas, bool pdl, cudaStream_t stream) {
  return p.part.unit_blocks == 8 ? dispatch_tokens<In, Out, 8>(p, stages, ctas, pdl, stream)
                                 : dispatch_tokens<In, Out, 4>(p, stages, ctas, pdl, stream);
}

bool aligned(const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 2-D tensor map of one operand (tma_plan.h: 4-byte words, dims and box innermost first, the row
// stride in bytes).
int encode(CUtensorMap* map, const OperandMap& o, const void* base, const char* what) {
  constexpr int R = 2;
  const cuuint64_t dims[R] = {static_cast<cuuint64_t>(o.dims[0]), static_cast<cuuint64_t>(o.dims[1])};
  const cuuint64_t strides[R - 1] = {static_cast<cuuint64_t>(o.row_stride)};
  const cuuint32_t box[R] = {static_cast<cuuint32_t>(o.box[0]), static_cast<cuuint32_t>(o.box[1])};
  const auto fn = encode_fn();
  if (!fn) return fail(-10, "decode GEMM: the CUDA driver offers no cuTensorMapEncodeTiled (needs CUDA 12+)");
  cuuint32_t ones[R];
  for (int i = 0; i < R; ++i) ones[i] = 1;
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT32, R, const_cast<void*>(base), dims, strides, box, ones,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::snprintf(g_err, kErrLen, "decode GEMM: cannot describe the %s operand to the TMA unit (CUresult %d)", what,
                  static_cast<int>(r));
    return -10;
  }
  return 0;
}

int encode_operands(Params& p, const void* values, const void* meta, const void* scales, const void* x,
                    int64_t x_stride) {
  const UnitMaps u = unit_maps(p.n, p.k, p.m, p.part.unit_blocks, scales != nullptr, x_stride, 8 * token_tiles(p.m));
  if (int rc = encode(&p.values, u.values, values, scales ? "int4 values" : "values")) return rc;
  if (scales)
    if (int rc = encode(&p.scales, u.scales, scales, "group scale")) return rc;
  if (int rc = encode(&p.meta, u.meta, meta, "metadata")) return rc;
  return encode(&p.x, u.x, x, "activation");
}

// k_multiple: 128 (8-bit weights: whole metadata blocks), 64 (int4 weights, whose layout pads the
// last block: K = 576)
int check_shape(int m, int n, int k, int k_multiple = kMetaBlockK) {
  if (m < 0 || m > kMaxM) return fail(-1, "decode GEMM: m=%lld tokens, the kernel serves 0 <= m <= %lld", m, kMaxM);
  if (n <= 0 || k <= 0 || k % k_multiple)
    return fail(-1, "decode GEMM: n=%lld, k=%lld; needs n > 0 and k a positive multiple of %lld", n, k, k_multiple);
  if ((n + kTileRows - 1) / kTileRows * kConsumerWarps > kMaxTickets)
    return fail(-1, "decode GEMM: n=%lld rows exceed the %lld the workspace's tickets cover", n,
                static_cast<long long>(kMaxTickets) / kConsumerWarps * kTileRows);
  return 0;
}

int check_unit_blocks(int unit_blocks) {
  if (unit_blocks != 0 && unit_blocks != 4 && unit_blocks != 8)
    return fail(-1, "decode GEMM: unit_blocks=%lld; the kernel is built for 4 or 8 (0: 4)", unit_blocks);
  return 0;
}

}  // namespace
}  // namespace sparse24::decode

using namespace sparse24::decode;

extern "C" {

int s24_decode_max_m() { return kMaxM; }
const char* s24_decode_last_error() { return g_err; }

int s24_decode_workspace_bytes(int m, int n, int k, int64_t* bytes) {
  if (int rc = check_shape(m, n, k)) return rc;
  *bytes = workspace_need(sm_count());
  return 0;
}

int s24_decode_partition(int n, int k, int sms, int unit_blocks, int* units, int* ctas, int* units_per_tile) {
  if (int rc = check_shape(1, n, k)) return rc;
  if (int rc = check_unit_blocks(unit_blocks)) return rc;
  if (sms <= 0) sms = sm_count();
  const Partition part = make_partition(n, k, sms, unit_blocks ? unit_blocks : kUnitBlocksDefault);
  *units = part.units, *ctas = part.ctas, *units_per_tile = part.units_per_tile;
  return 0;
}

int s24_decode_int4_bytes(int n, int k, int64_t* values_bytes, int64_t* scale_bytes) {
  if (int rc = check_shape(1, n, k, kInt4KMultiple)) return rc;
  *values_bytes = int4_value_bytes(n, k), *scale_bytes = int4_scale_bytes(n, k);
  return 0;
}

int s24_decode_unpack_int4(const void* values, const void* group_scale, void* out, int n, int k,
                           cudaStream_t stream) {
  if (int rc = check_shape(1, n, k, kInt4KMultiple)) return rc;
  if (!values || !group_scale || !out) return fail(-1, "int4 unpack: null operand pointer");
  if (!aligned(values, 16) || !aligned(group_scale, 4) || !aligned(out, 16))
    return fail(-1, "int4 unpack: the int4 values and the int8 output must be 16-byte aligned, the group scales 4-byte");
  const int64_t chunks = int4_value_bytes(n, k) / 16;
  constexpr int kBlock = 256;
  unpack_int4_kernel<<<static_cast<unsigned>((chunks + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      static_cast<const uint4*>(values), static_cast<const uint32_t*>(group_scale), static_cast<uint8_t*>(out), n, k,
      static_cast<int>(int4_kblocks(k)), static_cast<int>(int4_units_per_tile(k)), chunks);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::snprintf(g_err, kErrLen, "int4 unpack launch: %s", cudaGetErrorString(e));
    return -10;
  }
  return 0;
}

int s24_decode_gemm(int in_dtype, int out_dtype, const void* values, const void* meta, const void* group_scale,
                    const void* x, int64_t x_row_stride, const float* x_scale, const float* w_scale,
                    const void* bias, void* out, int m, int n, int k, void* workspace, int64_t workspace_bytes,
                    const S24DecodeTuning* tuning, cudaStream_t stream) {
  const bool int4 = in_dtype == S24_INT4;
  if (int rc = check_shape(m, n, k, int4 ? kInt4KMultiple : kMetaBlockK)) return rc;
  if (m == 0) return 0;
  if (in_dtype != S24_INT8 && in_dtype != S24_E4M3 && !int4)
    return fail(-1, "decode GEMM: weight dtype %lld, expected int8 (%lld), float8_e4m3fn (%lld) or int4 (%lld)",
                in_dtype, S24_INT8, S24_E4M3, S24_INT4);
  if (int4 != (group_scale != nullptr))
    return fail(-1, int4 ? "decode GEMM: an int4 weight needs its group scales (null pointer)"
                         : "decode GEMM: group scales are for int4 weights only (weight dtype %lld)",
                in_dtype);
  if (int4 && !aligned(group_scale, 16)) return fail(-1, "decode GEMM: the group scales must be 16-byte aligned");
  if (out_dtype != S24_BF16 && out_dtype != S24_F16)
    return fail(-1, "decode GEMM: output dtype %lld, expected bfloat16 (%lld) or float16 (%lld)", out_dtype,
                S24_BF16, S24_F16);
  if (!values || !meta || !x || !x_scale || !w_scale || !out) return fail(-1, "decode GEMM: null operand pointer");
  if (!aligned(values, 16) || !aligned(x, 16) || !aligned(meta, 16) || x_row_stride % 16 || x_row_stride < k)
    return fail(-1,
                "decode GEMM: values, meta and x must be 16-byte aligned, and the x row stride (%lld bytes) a "
                "multiple of 16 that is >= k=%lld",
                x_row_stride, k);
  if (!aligned(out, 2) || (bias && !aligned(bias, 2))) return fail(-1, "decode GEMM: out/bias misaligned");
  const int sms = sm_count();
  if (!workspace || !aligned(workspace, 16) || workspace_bytes < workspace_need(sms))
    return fail(-1, "decode GEMM: needs a zeroed, 16-byte aligned workspace of %lld bytes (got %lld)",
                workspace_need(sms), workspace_bytes);
  Params p{};
#ifdef S24_DECODE_PROBE
  p.probe = g_probe, p.probe_omit = g_probe_omit;
#endif
  p.x_scale = x_scale, p.w_scale = w_scale, p.bias = bias, p.out = out, p.m = m, p.n = n, p.k = k;
  const int unit_blocks = tuning && tuning->unit_blocks ? tuning->unit_blocks : kUnitBlocksDefault;
  if (int rc = check_unit_blocks(unit_blocks)) return rc;
  p.part = make_partition(n, k, sms, unit_blocks);
  p.tickets = static_cast<int*>(workspace), p.partials = static_cast<char*>(workspace) + kTicketBytes;
  if (int rc = encode_operands(p, values, meta, group_scale, x, x_row_stride)) return rc;
  const int stages = tuning ? tuning->stages : 0, ctas = tuning ? tuning->ctas : 0;
  const bool pdl = tuning ? tuning->pdl != 0 : true;
  if (int4)
    return out_dtype == S24_BF16 ? dispatch_tiles<Int4, __nv_bfloat16>(p, stages, ctas, pdl, stream)
                                 : dispatch_tiles<Int4, __half>(p, stages, ctas, pdl, stream);
  if (in_dtype == S24_INT8)
    return out_dtype == S24_BF16 ? dispatch_tiles<int8_t, __nv_bfloat16>(p, stages, ctas, pdl, stream)
                                 : dispatch_tiles<int8_t, __half>(p, stages, ctas, pdl, stream);
  return out_dtype == S24_BF16 ? dispatch_tiles<__nv_fp8_e4m3, __nv_bfloat16>(p, stages, ctas, pdl, stream)
                               : dispatch_tiles<__nv_fp8_e4m3, __half>(p, stages, ctas, pdl, stream);
}

#ifdef S24_DECODE_PROBE
// Probe build only (see the top of this file).
int s24_decode_probe_slots() { return kProbeSlots; }
int s24_decode_probe_units() { return kProbeUnits; }
int s24_decode_probe_fixed() { return kPrFixed; }
const char* s24_decode_probe_slot_name(int i) { return i >= 0 && i < kPrFixed ? kProbeSlotNames[i] : nullptr; }
// Later launches stamp [ctas][s24_decode_probe_slots()] uint64 into buf (device memory; null: no
// stamps). The pointer is a kernel parameter, so a CUDA graph keeps the one set at capture.
void s24_decode_probe_set(void* buf) { g_probe = static_cast<uint64_t*>(buf); }
// Later launches leave out the copies named by ProbeOmit bits (0: none): 1 the weight copies' L2
// evict-first hint, 2 the activation copies, 4 the metadata copies, 8 the values (and int4 group
// scales). Their stage bytes keep whatever they held, so the outputs are wrong: timing only.
void s24_decode_probe_set_omit(int bits) { g_probe_omit = bits; }

// One thread writes %globaltimer to dst: launched before and after decode calls (plain stream
// order) it stamps when the previous work ended and when the next kernel could start.
int s24_decode_probe_mark(void* dst, cudaStream_t stream) {
  probe_mark_kernel<<<1, 1, 0, stream>>>(static_cast<uint64_t*>(dst));
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(-10, "decode probe mark launch failed");
  return 0;
}
#endif

}  // extern "C"
