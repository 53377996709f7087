// Few-token (M <= 32) 2:4 sparse W8A8 GEMM that streams the resident CUTLASS layout (layout.h).
//
// Why not the CUTLASS sparse GEMM at decode: its smallest tiles still stage the weight through TMA
// + shared memory with one CTA per 64/128-row tile, which at M <= 16 leaves too few bytes in flight
// to reach HBM bandwidth on narrow layers. Here every lane loads its weight bytes straight into
// registers with 16-byte streaming loads, expands them to dense 8-bit weights with one PRMT per 4
// weights (the selector comes from a 256-entry shared table indexed by the metadata byte, built once
// per CTA) and feeds a DENSE mma.sync m16n8k32 (tensor cores; int8 -> int32, e4m3 -> float32).
// Why dense mma over the expanded weights rather than mma.sp or dp4a:
//   * dp4a costs 2 integer ops per 4 weights PER TOKEN (PRMT to gather the activations + DP4A);
//     at 4.8 TB/s that exceeds the SM's 64 integer ops/clock from M ~ 4 on;
//   * the expansion here costs ~6 integer ops per 4 weights for ALL tokens, and one mma covers
//     8 tokens, so the kernel stays memory bound up to M = 32;
//   * mma.sp would skip the expansion but needs the metadata re-distributed across lanes in the
//     PTX sparse-fragment order; the dense fragments let each lane read whole 16-byte chunks.
// The dot product does not depend on which logical k sits in which fragment slot as long as A and
// B agree, so lane (g = lane / 4, t = lane % 4) takes, per 128-k block, the 16-byte value chunk t of
// its rows (logical k 32t .. 32t+31) and word w of it (k 32t+8w .. +7) in k-step w; its activation
// fragment is then the 8 contiguous bytes x[token, 32t+8w ..] (no shuffles anywhere).
//
// Work split: a CTA = 8 warps = 32 output rows (two 16-row mma tiles per warp, so each activation
// fragment is used twice); its warps take the K blocks round robin and are reduced in shared memory.
// Layers whose 32-row tiles do not spread evenly over the SMs also split K across CTAs (grid.y,
// choose_splits): each CTA stores its partial sums in the caller's workspace, and the last CTA of a
// row tile (an atomic ticket) adds them in split order, applies the epilogue and re-arms its
// ticket, so one launch does it all and graph replays need no memset.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "../sparse24.h"
#include "decode_gemm.h"
#include "layout.h"

namespace sparse24::decode {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;                 // rows of one mma tile
constexpr int kRowTiles = 2;                  // mma tiles per warp (share one activation fragment)
constexpr int kCtaRows = kTileRows * kRowTiles;
constexpr int kMaxM = 32;                     // 4 token tiles of 8
constexpr int kMaxSplits = 8;
constexpr int kRedPad = 36;                   // reduction row pitch: conflict-free fragment stores
constexpr size_t kErrLen = 512;
thread_local char g_err[kErrLen] = "";

int fail(int code, const char* fmt, long long a = 0, long long b = 0, long long c = 0) {
  std::snprintf(g_err, kErrLen, fmt, a, b, c);
  return code;
}

template <class T>
struct Acc { using type = int32_t; };
template <>
struct Acc<__nv_fp8_e4m3> { using type = float; };

// Weights are read once per call and the model's weights exceed L2 many times over: keep them out
// of L1 and first in line for L2 eviction, so the activations and partial sums stay cached.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ uint4 ld_stream16(const void* ptr, uint64_t policy) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(ptr), "l"(policy));
  return r;
}
__device__ __forceinline__ uint32_t ld_stream4(const void* ptr, uint64_t policy) {
  uint32_t r;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;" : "=r"(r) : "l"(ptr), "l"(policy));
  return r;
}
// Activations are re-read by every row tile: the default (L1-cached) read-only path.
__device__ __forceinline__ uint4 ld_act16(const void* ptr) { return __ldg(static_cast<const uint4*>(ptr)); }

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

struct Params {
  const uint8_t* values;
  const uint8_t* meta;
  const uint8_t* x;
  int64_t x_stride;  // bytes
  const float* x_scale;
  const float* w_scale;
  const void* bias;
  void* out;
  int m, n, k;
  int64_t meta_rows;
  int splits;
  int* tickets;      // [kMaxTickets], zero between calls
  void* partials;    // [splits, m, n] accumulator type
};

// The GEMM's epilogue, with the same roundings as the CUTLASS visitor tree (gemm_config.cu):
// float(acc) * w_scale rounded, then one fma with x_scale and the bias, then the output rounding.
template <class Out, class A>
__device__ __forceinline__ void store_out(const Params& p, int t, int row, A acc) {
  const float bias = p.bias ? to_float(static_cast<const Out*>(p.bias)[row]) : 0.f;
  const float v = __fmaf_rn(__fmul_rn(to_float(acc), p.w_scale[row]), p.x_scale[t], bias);
  static_cast<Out*>(p.out)[static_cast<int64_t>(t) * p.n + row] = from_float<Out>(v);
}

// Brings a line into L1 (and L2) without a register: the epilogue's scale and bias loads, issued
// before the main loop, so the kernel's end does not wait for one more DRAM round trip after its
// last weight load (holding them in registers instead makes the M <= 16 int8 kernels spill).
__device__ __forceinline__ void prefetch_l1(const void* ptr) { asm volatile("prefetch.global.L1 [%0];" ::"l"(ptr)); }

// One K block of one lane, as loaded: 4 value chunks (rows g, g + 8, g + 16, g + 24), their 4
// metadata words and the NT x 32 activation bytes.
template <int NT>
struct Block {
  uint4 val[kRowTiles][2];
  uint32_t met[kRowTiles][2];
  uint4 act[NT][2];
};

// NT token tiles of 8 (M <= 8 * NT); U K blocks of 128 loaded per iteration (bytes in flight).
template <class In, class Out, int NT, int U>
__global__ void __launch_bounds__(kThreads, 2) decode_kernel(const Params p) {
  // The reduction and the epilogue give element (token warp + 8 i, row lane) of the CTA's
  // [8 NT tokens, 32 rows] output to thread (warp, lane): one output row per lane.
  static_assert(kCtaRows == 32 && kThreads == 256, "epilogue mapping: one CTA row per lane");
  using A = typename Acc<In>::type;
  constexpr int kTok = 8 * NT;
  __shared__ uint32_t lut[256];
  __shared__ A red[kWarps][kTok][kRedPad];
  __shared__ int last_cta;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  lut[tid] = expand_selector(tid);  // kThreads == 256: one entry per thread

  const int row0 = blockIdx.x * kCtaRows;
  const int m = p.m;
  const int kblocks = p.k / kMetaBlockK;
  const int kb_begin = static_cast<int>(static_cast<int64_t>(kblocks) * blockIdx.y / p.splits);
  const int kb_end = static_cast<int>(static_cast<int64_t>(kblocks) * (blockIdx.y + 1) / p.splits);
  const uint64_t policy = evict_first_policy();

  // The epilogue operands of this thread's output row and tokens, fetched into L1 now.
  const int erow = row0 + lane;
  const bool erow_ok = erow < p.n;
  if (erow_ok) {
    prefetch_l1(p.w_scale + erow);
    if (p.bias) prefetch_l1(static_cast<const Out*>(p.bias) + erow);
  }
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < NT; ++i)
      if (warp + 8 * i < m) prefetch_l1(p.x_scale + warp + 8 * i);

  // Per lane: rows row0 + 8 i + g (i = 2 r + h; r: mma tile, h: upper/lower 8 rows), tokens 8 j + g.
  // Running pointers at the warp's first K block, advanced by a constant per iteration (no 64-bit
  // multiplies in the loop); the four value rows of a lane are k/2 bytes * 8 apart, its metadata
  // rows 128 bytes apart (immediate offsets); rows past n and tokens past m are never loaded.
  const int row_g = row0 + g;
  const int kb_first = kb_begin + warp;
  const int64_t vrows8 = 8 * value_offset(1, 0, p.k);
  const int64_t mstep = p.meta_rows * 16 * kWarps;  // metadata bytes between a warp's K blocks
  const int64_t xrows8 = 8 * p.x_stride;
  const uint8_t* vp = p.values + value_offset(row_g, 16 * t + static_cast<int64_t>(kb_first) * (kMetaBlockK / 2), p.k);
  const uint8_t* mp = p.meta + meta_offset(row_g, 4 * t, p.meta_rows) + kb_first * (mstep / kWarps);
  const uint8_t* xp = p.x + static_cast<int64_t>(g) * p.x_stride + 32 * t + static_cast<int64_t>(kb_first) * kMetaBlockK;
  bool row_ok[2 * kRowTiles], tok_ok[NT];
#pragma unroll
  for (int i = 0; i < 2 * kRowTiles; ++i) row_ok[i] = row_g + 8 * i < p.n;
#pragma unroll
  for (int j = 0; j < NT; ++j) tok_ok[j] = 8 * j + g < p.m;

  A acc[kRowTiles][NT][4];
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][j][i] = A(0);

  const uint4 zero = make_uint4(0, 0, 0, 0);
  // Loads the warp's K block `u` strides (of kWarps blocks) past the running pointers; a block past
  // the CTA's K range (ok false) is zero and adds nothing.
  auto load = [&](Block<NT>& b, int u, bool ok) {
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * r + h;
        const bool row_in = ok && row_ok[i];
        b.val[r][h] = row_in ? ld_stream16(vp + i * vrows8 + u * kWarps * (kMetaBlockK / 2), policy) : zero;
        b.met[r][h] = row_in ? ld_stream4(mp + 128 * i + u * mstep, policy) : 0u;
      }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 2; ++q)
        b.act[j][q] = ok && tok_ok[j] ? ld_act16(xp + j * xrows8 + u * kWarps * kMetaBlockK + 16 * q) : zero;
  };
  auto compute = [&](const Block<NT>& b) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {  // k-step w: logical k 32 t + 8 w .. + 7 of this block
      uint32_t a[kRowTiles][4];
#pragma unroll
      for (int r = 0; r < kRowTiles; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t v = reinterpret_cast<const uint32_t*>(&b.val[r][h])[w];
          const uint32_t sel = lut[(b.met[r][h] >> (8 * w)) & 0xffu];
          a[r][h] = __byte_perm(v, 0u, sel);            // rows g / g + 8, k slots 4t .. 4t+3
          a[r][2 + h] = __byte_perm(v, 0u, sel >> 16);  // rows g / g + 8, k slots 16 + 4t ..
        }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&b.act[j][w / 2]);
        const uint32_t b0 = xw[2 * (w % 2)], b1 = xw[2 * (w % 2) + 1];
#pragma unroll
        for (int r = 0; r < kRowTiles; ++r) mma(acc[r][j], a[r], b0, b1);
      }
    }
  };
  // The first iteration is peeled so that its loads leave before the barrier that publishes the lut
  // (a warp without K blocks multiplies zeros); then all loads of the U blocks of an iteration first
  // (bytes in flight), then the math. Keeping blocks live across the loop's back edge (a rotating
  // double buffer refilled right after each block's math, or the next iteration's loads issued at
  // the end of the body) would overlap the math with loads, but spilled every int8 kernel under the
  // 128-register cap of two CTAs per SM (ptxas -v).
  {
    Block<NT> blk[U];
#pragma unroll
    for (int u = 0; u < U; ++u) load(blk[u], u, kb_first + kWarps * u < kb_end);
    __syncthreads();  // lut
#pragma unroll
    for (int u = 0; u < U; ++u) compute(blk[u]);
  }
  for (int kb0 = kb_first + kWarps * U; kb0 < kb_end; kb0 += kWarps * U) {
    vp += kWarps * U * (kMetaBlockK / 2), mp += U * mstep, xp += kWarps * U * kMetaBlockK;
    Block<NT> blk[U];
#pragma unroll
    for (int u = 0; u < U; ++u) load(blk[u], u, u == 0 || kb0 + kWarps * u < kb_end);
#pragma unroll
    for (int u = 0; u < U; ++u) compute(blk[u]);
  }

  // Reduce the warps' K slices: red[warp][token][row]; accumulator c of tile (r, j) holds
  // row 16 r + g (+ 8 for c >= 2), token 8 j + 2 t + (c & 1).
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[warp][8 * j + 2 * t + (c & 1)][kTileRows * r + g + 8 * (c >> 1)] = acc[r][j][c];
  __syncthreads();

  if (p.splits == 1) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int tok = warp + 8 * i;
      if (tok >= m || !erow_ok) continue;
      A s = red[0][tok][lane];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) s += red[w][tok][lane];
      store_out<Out>(p, tok, erow, s);
    }
    return;
  }

  A* part = static_cast<A*>(p.partials);
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int tok = warp + 8 * i;
    if (tok >= m || !erow_ok) continue;
    A s = red[0][tok][lane];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s += red[w][tok][lane];
    __stcg(part + (static_cast<int64_t>(blockIdx.y) * m + tok) * p.n + erow, s);
  }
  __threadfence();  // partials visible device-wide before the ticket
  __syncthreads();
  if (tid == 0) last_cta = atomicAdd(p.tickets + blockIdx.x, 1) == p.splits - 1;
  __syncthreads();
  if (!last_cta) return;
  __threadfence();  // acquire side: read the other CTAs' partials after seeing the full ticket count
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int tok = warp + 8 * i;
    if (tok >= m || !erow_ok) continue;
    A s = A(0);
    for (int sp = 0; sp < p.splits; ++sp) s += __ldcg(part + (static_cast<int64_t>(sp) * m + tok) * p.n + erow);
    store_out<Out>(p, tok, erow, s);
  }
  if (tid == 0) p.tickets[blockIdx.x] = 0;  // re-armed for the next call (or graph replay)
}

// Two K blocks in flight per warp where the registers allow it without spilling (ptxas -v).
template <class In, class Out, int NT>
constexpr auto kernel_ptr() {
  constexpr bool kInt8 = std::is_same_v<In, int8_t>;
  return &decode_kernel<In, Out, NT, (NT == 1 || (NT == 2 && kInt8) ? 2 : 1)>;
}

int sm_count() {
  static int counts[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 132;
  if (!counts[dev]) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    counts[dev] = n > 0 ? n : 132;
  }
  return counts[dev];
}

int token_tiles(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : 4; }

// Workspace: a fixed ticket array first (one int per 32-row tile), then the partial sums. The layout
// must not depend on the shape: layers of different shapes share one workspace, and each relies on
// the tickets being zero, which every call restores for its own tiles.
constexpr int kMaxTickets = 1024;
constexpr int64_t kTicketBytes = kMaxTickets * 4;

int64_t workspace_need(int m, int n, int splits) {
  return splits <= 1 ? 0 : kTicketBytes + static_cast<int64_t>(splits) * m * n * 4;
}

// Cross-CTA K split: the s with the least estimated time, in units of one 32-row x 128-k weight tile
// (2.5 KB with its metadata) streamed at one SM's share of the HBM bandwidth (~0.08 us). Model
// (fitted to H200 timings of s = 1, 2, 4 on the Llama-3 shapes, roughly):
//   * the busiest SM runs c = ceil(ctas / sms) CTAs of B = ceil(kblocks / s) tiles; two resident
//     CTAs stream at the SM's share, a CTA alone (c odd: its last round) ~25% slower;
//   * every further round of CTAs in a slot (ceil(c / 2) - 1) exposes one CTA's start and end (first
//     load latency, reduction, epilogue): ~1 us = 12 tiles. This is what many small split CTAs lose:
//     6144 x 4096 at s = 4 (768 CTAs of one K block per warp, three rounds) took 13 us, where this
//     model puts one round of 192 unsplit CTAs at ~5 us of streaming plus the same fixed cost;
//   * a split adds the partial sums' hand-off (store, fence, ticket, reload by the last CTA),
//     ~0.5 us = 6 tiles, plus their L2 traffic (2 s m n 4 bytes, counted at half the HBM cost).
// So layers with few row tiles split until two CTAs fill every SM (8B o / down), and layers whose
// row tiles leave some SMs a third CTA (10240 rows: 320 tiles on 132 SMs) split to even the bytes.
int choose_splits(int m, int n, int k, int64_t workspace_bytes) {
  const int row_ctas = (n + kCtaRows - 1) / kCtaRows;
  if (row_ctas > kMaxTickets) return 1;
  const int sms = sm_count();
  const int kblocks = k / kMetaBlockK;
  constexpr double kTileBytes = kCtaRows * (kMetaBlockK / 2 + 16);
  constexpr double kRoundCost = 12.0, kSplitCost = 6.0, kAloneSlowdown = 0.25;
  int best = 1;
  double best_cost = 0;
  for (int s = 1; s <= kMaxSplits; ++s) {
    if (s > 1 && (kblocks < s * kWarps || workspace_need(m, n, s) > workspace_bytes)) break;
    const int64_t ctas = static_cast<int64_t>(row_ctas) * s;
    const int64_t c = (ctas + sms - 1) / sms;
    const int64_t tiles = (kblocks + s - 1) / s;
    double cost = tiles * (c + kAloneSlowdown * (c % 2)) + kRoundCost * ((c + 1) / 2 - 1);
    if (s > 1) cost += kSplitCost + 0.5 * (2.0 * s * m * n * 4) / sms / kTileBytes;
    if (s == 1 || cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

template <class In, class Out>
int launch(const Params& p, cudaStream_t stream) {
  const dim3 grid((p.n + kCtaRows - 1) / kCtaRows, p.splits);
  switch (token_tiles(p.m)) {
    case 1: kernel_ptr<In, Out, 1>()<<<grid, kThreads, 0, stream>>>(p); break;
    case 2: kernel_ptr<In, Out, 2>()<<<grid, kThreads, 0, stream>>>(p); break;
    default: kernel_ptr<In, Out, 4>()<<<grid, kThreads, 0, stream>>>(p); break;
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::snprintf(g_err, kErrLen, "decode kernel launch: %s", cudaGetErrorString(e));
    return -10;
  }
  return 0;
}

bool aligned(const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

int check_shape(int m, int n, int k) {
  if (m < 0 || m > kMaxM) return fail(-1, "decode GEMM: m=%lld tokens, the kernel serves 0 <= m <= %lld", m, kMaxM);
  if (n <= 0 || k <= 0 || k % kMetaBlockK)
    return fail(-1, "decode GEMM: n=%lld, k=%lld; needs n > 0 and k a positive multiple of %lld", n, k, kMetaBlockK);
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
  *bytes = 0;  // the largest split any token count up to m picks when the workspace is no limit
  for (int mm = 1; mm <= std::max(m, 1); ++mm)
    *bytes = std::max(*bytes, workspace_need(mm, n, choose_splits(mm, n, k, INT64_MAX)));
  return 0;
}

int s24_decode_splits(int m, int n, int k, int64_t workspace_bytes) {
  if (int rc = check_shape(m, n, k)) return rc;
  return choose_splits(std::max(m, 1), n, k, workspace_bytes);
}

int s24_decode_gemm(int in_dtype, int out_dtype, const void* values, const void* meta, const void* x,
                    int64_t x_row_stride, const float* x_scale, const float* w_scale, const void* bias,
                    void* out, int m, int n, int k, void* workspace, int64_t workspace_bytes,
                    cudaStream_t stream) {
  if (int rc = check_shape(m, n, k)) return rc;
  if (m == 0) return 0;
  if (in_dtype != S24_INT8 && in_dtype != S24_E4M3)
    return fail(-1, "decode GEMM: input dtype %lld, expected int8 (%lld) or float8_e4m3fn (%lld)", in_dtype,
                S24_INT8, S24_E4M3);
  if (out_dtype != S24_BF16 && out_dtype != S24_F16)
    return fail(-1, "decode GEMM: output dtype %lld, expected bfloat16 (%lld) or float16 (%lld)", out_dtype,
                S24_BF16, S24_F16);
  if (!values || !meta || !x || !x_scale || !w_scale || !out) return fail(-1, "decode GEMM: null operand pointer");
  if (!aligned(values, 16) || !aligned(x, 16) || !aligned(meta, 4) || x_row_stride % 16 || x_row_stride < k)
    return fail(-1,
                "decode GEMM: values and x must be 16-byte aligned, meta 4-byte aligned, and the x row stride "
                "(%lld bytes) a multiple of 16 that is >= k=%lld",
                x_row_stride, k);
  if (!aligned(out, 2) || (bias && !aligned(bias, 2))) return fail(-1, "decode GEMM: out/bias misaligned");
  Params p{static_cast<const uint8_t*>(values), static_cast<const uint8_t*>(meta), static_cast<const uint8_t*>(x),
           x_row_stride, x_scale, w_scale, bias, out, m, n, k, meta_rows(n), 1, nullptr, nullptr};
  p.splits = workspace && aligned(workspace, 16) ? choose_splits(m, n, k, workspace_bytes) : 1;
  if (p.splits > 1) {
    p.tickets = static_cast<int*>(workspace);
    p.partials = static_cast<char*>(workspace) + kTicketBytes;
  }
  if (in_dtype == S24_INT8)
    return out_dtype == S24_BF16 ? launch<int8_t, __nv_bfloat16>(p, stream) : launch<int8_t, __half>(p, stream);
  return out_dtype == S24_BF16 ? launch<__nv_fp8_e4m3, __nv_bfloat16>(p, stream)
                               : launch<__nv_fp8_e4m3, __half>(p, stream);
}

}  // extern "C"
