// sparse24 prefill in ONE C++ op: per-token int8 quant -> cusparseLtMatmul (cached plan) -> epilogue.
//
// Built on first use by ext.py (torch.utils.cpp_extension.load: nvcc + ninja on the GPU machine).
// Needs no cuSPARSELt header or link: the plans (descriptors, searched alg_id / split-k, workspace)
// are built at prepare time by cslt.py (ctypes on the wheel's libcusparseLt.so.0), and Python hands
// this library the address of cusparseLtMatmul, of the handle and of each plan; the op only calls
// cusparseLtMatmul. So a serve-time call builds nothing.
//
// Ops (namespace sparse24_ext):
//   set_lib(int matmul_fn, int handle) -> ()
//   register_plans(int n, int k, int[] m_pads, int[] plans, int[] workspaces) -> int   (plan-set id)
//   linear(Tensor x, Tensor w_cslt, Tensor w_scale, Tensor? bias, int plan_set) -> Tensor
//   set_decode(int plan_set, int max_m, int meta_rows, int[] rows_per_block, int[] warps, int[] kinds) -> ()
//   decode(Tensor x, Tensor w_cslt, Tensor w_scale, Tensor? bias, int rows_per_block, int warps,
//          int meta_rows, int kind) -> Tensor  (the M <= 16 kernel alone: tuning, tests)
// linear with M <= the plan set's decode_max_m runs a decode kernel (W8A16, see decode_kernel and
// decode_sp_kernel) instead.
// linear: x [M, K] bf16/fp16 (unit stride in K) -> [M, N] in x's dtype; M padded to the smallest
// registered bucket >= M (chunks of the largest bucket above it). Numerics as the Triton path:
//   scale_m = max(absmax_m / 127, 1e-12) (IEEE division), q = rint(x / scale_m) (ties to even),
//   clamped to +-127; D = cuSPARSELt(q, W) * w_scale (bf16); out = D * scale_m + bias (fp32 math).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// Error messages are built with std::string, not c10::str/iostreams: on the GPU machines a failing
// TORCH_CHECK with a formatted message crashed the process (see sparse24_ext_py.cpp); TORCH_CHECK with
// ONE string argument passes it through without a stream.
void append(std::string& s, const char* v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& s, T v) { s += std::to_string(v); }
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (append(s, a), ...);
  return s;
}

using MatmulFn = int (*)(const void* handle, const void* plan, const void* alpha, const void* dA,
                         const void* dB, const void* beta, const void* dC, void* dD, void* workspace,
                         cudaStream_t* streams, int32_t num_streams);

struct PlanSet {
  int64_t n = 0, k = 0;
  std::vector<int64_t> m_pads;  // ascending
  std::vector<const void*> plans;
  std::vector<void*> workspaces;
  // decode kernel for M <= decode_max_m (0: cuSPARSELt for every M); config per n-tile count (M <= 8, <= 16)
  int64_t decode_max_m = 0, meta_rows = 64;
  int64_t dec_rows[2] = {16, 16}, dec_warps[2] = {8, 8}, dec_kind[2] = {0, 0};
};

MatmulFn g_matmul = nullptr;
const void* g_handle = nullptr;
std::mutex g_mutex;            // registration only
std::vector<PlanSet*> g_sets;  // never shrinks; entries never freed (plans live as long as Python's)
const float g_beta = 0.0f;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

constexpr int QUANT_THREADS = 256;

__device__ __forceinline__ float block_max(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? smem[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

__device__ __forceinline__ int8_t q8(float v, float scale) {
  float q = rintf(__fdiv_rn(v, scale));
  q = fminf(fmaxf(q, -127.0f), 127.0f);
  return static_cast<int8_t>(static_cast<int>(q));
}

// one block per token; VEC: 8 elements (16 bytes) per load, K % 8 == 0 and 16-byte aligned rows
template <typename T, bool VEC>
__global__ void __launch_bounds__(QUANT_THREADS) quant_kernel(const T* __restrict__ x, int64_t stride_x,
                                                              int8_t* __restrict__ q, float* __restrict__ s,
                                                              int k) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  int8_t* qr = q + row * (int64_t)k;
  float amax = 0.0f;
  if (VEC) {
    const int kv = k / 8;
    for (int i = threadIdx.x; i < kv; i += blockDim.x) {
      uint4 u = reinterpret_cast<const uint4*>(xr)[i];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_f<T>(e[j])));
    }
  } else {
    for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(to_f<T>(xr[i])));
  }
  amax = block_max(amax, smem);
  const float scale = fmaxf(__fdiv_rn(amax, 127.0f), 1e-12f);
  if (threadIdx.x == 0) s[row] = scale;
  if (VEC) {
    const int kv = k / 8;
    for (int i = threadIdx.x; i < kv; i += blockDim.x) {
      uint4 u = reinterpret_cast<const uint4*>(xr)[i];
      const T* e = reinterpret_cast<const T*>(&u);
      union { int8_t b[8]; uint2 v; } o;
#pragma unroll
      for (int j = 0; j < 8; ++j) o.b[j] = q8(to_f<T>(e[j]), scale);
      reinterpret_cast<uint2*>(qr)[i] = o.v;
    }
  } else {
    for (int i = threadIdx.x; i < k; i += blockDim.x) qr[i] = q8(to_f<T>(xr[i]), scale);
  }
}

// out[m, n] = d[m, n] * xs[m] + bias[n]; d bf16 [>= M, N] row-major, out [M, N] row stride N (may be d);
// 8 elements per thread, N % 8 == 0.
template <typename T, bool HAS_BIAS>
__global__ void epilogue_kernel(const __nv_bfloat16* d, const float* __restrict__ xs, const T* __restrict__ bias,
                                T* out, int64_t total_vec, int n) {
  const int nv = n / 8;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total_vec;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / nv;
    const int col = (int)(i - row * nv) * 8;
    uint4 u = reinterpret_cast<const uint4*>(d)[i];
    const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&u);
    const float sc = xs[row];
    float b[8];
    if (HAS_BIAS) {
      uint4 bu = *reinterpret_cast<const uint4*>(bias + col);
      const T* be = reinterpret_cast<const T*>(&bu);
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = to_f<T>(be[j]);
    }
    union { T h[8]; uint4 v; } o;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float y = __bfloat162float(e[j]) * sc;
      if (HAS_BIAS) y += b[j];
      o.h[j] = from_f<T>(y);
    }
    reinterpret_cast<uint4*>(out)[i] = o.v;
  }
}

void check_launch(const char* what);

// ---- decode (M <= 16 tokens): W8A16 on the resident cuSPARSELt buffer ------------------------------
// y[m, n] = (sum_k x[m, k] * W[n, k]) * w_scale[n] + bias[n], x in bf16/fp16 as given (no activation
// quantization: no extra pass, and the products are exact, so at least W8A8's accuracy), the int8
// 2:4 weight decoded in registers and fed to dense mma.m16n8k16 (tokens = n of the mma). Memory
// bound: each weight byte is read once, from the same buffer cuSPARSELt uses for prefill.
//
// Why no shuffles are needed: a warp takes a tile of 16 rows x 64 columns per step. In cuSPARSELt's
// buffer (layout.py), lane L = 4g + t finds at word L of the tile's 128 metadata bytes the nibbles of
// rows g and g+8 for groups 2t, 2t+1, 8+2t, 9+2t -- exactly the groups whose kept values are bytes
// [4t, 4t+4) and [16+4t, 16+4t+4) of those rows' 32 value bytes. A dot product may sum K in any
// order, so mma j (0..3) gives thread t's virtual k slots {2t, 2t+1, 2t+8, 2t+9} to its real group
// G(j, t) = {2t, 2t+1, 8+2t, 9+2t}[j] (its 4 columns in order), for the A rows g, g+8 and the B column
// g alike: each thread decodes only what it loaded and loads its B (x) words at those columns.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// one word of 4 int8 -> (v0, v1), (v2, v3) as pairs of T, exactly
template <typename T> __device__ __forceinline__ void i8x4_to_pairs(uint32_t w, uint32_t& p01, uint32_t& p23);
template <> __device__ __forceinline__ void i8x4_to_pairs<__nv_bfloat16>(uint32_t w, uint32_t& p01, uint32_t& p23) {
  // fp32 bits 0x4B0000uu = 2^23 + uu with uu = v + 128; minus (2^23 + 128) is v, and an integer
  // |v| <= 128 is exact in bf16 = the high half of its fp32
  const uint32_t u = w ^ 0x80808080u;
  const float m = 8388736.0f;
  const float f0 = __uint_as_float(prmt(u, 0x4B000000u, 0x7440u)) - m;
  const float f1 = __uint_as_float(prmt(u, 0x4B000000u, 0x7441u)) - m;
  const float f2 = __uint_as_float(prmt(u, 0x4B000000u, 0x7442u)) - m;
  const float f3 = __uint_as_float(prmt(u, 0x4B000000u, 0x7443u)) - m;
  p01 = prmt(__float_as_uint(f0), __float_as_uint(f1), 0x7632u);
  p23 = prmt(__float_as_uint(f2), __float_as_uint(f3), 0x7632u);
}
template <> __device__ __forceinline__ void i8x4_to_pairs<__half>(uint32_t w, uint32_t& p01, uint32_t& p23) {
  // fp16 bits 0x64uu = 1024 + uu; minus 1152 (0x6480) is v
  const uint32_t u = w ^ 0x80808080u;
  const uint32_t h01 = prmt(u, 0x64646464u, 0x5140u), h23 = prmt(u, 0x64646464u, 0x5342u);
  asm("sub.f16x2 %0, %1, %2;" : "=r"(p01) : "r"(h01), "r"(0x64806480u));
  asm("sub.f16x2 %0, %1, %2;" : "=r"(p23) : "r"(h23), "r"(0x64806480u));
}

template <typename T> __device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                                               uint32_t a3, uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                                             uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// the warps of a block add their [16 R rows x 8 NT tokens] fp32 tiles in shared memory; then
// out[tok, row] = sum * w_scale[row] (+ bias[row]) for the block's rows and the M tokens
template <typename T, int R, int NT>
__device__ __forceinline__ void reduce_store(const float (&acc)[R][NT][4], float* red, int warp, int nw, int g, int t,
                                             int m, int row0, int n, const float* __restrict__ ws,
                                             const T* __restrict__ bias, T* __restrict__ out) {
  constexpr int ROWS = 16 * R;
  float* my = red + warp * (NT * 8 * ROWS);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int rl = r * 16 + g, tk = nt * 8 + 2 * t;
      my[tk * ROWS + rl] = acc[r][nt][0];
      my[(tk + 1) * ROWS + rl] = acc[r][nt][1];
      my[tk * ROWS + rl + 8] = acc[r][nt][2];
      my[(tk + 1) * ROWS + rl + 8] = acc[r][nt][3];
    }
  __syncthreads();
  const int m_here = m < NT * 8 ? m : NT * 8;
  for (int i = threadIdx.x; i < ROWS * m_here; i += blockDim.x) {
    const int rl = i % ROWS, tk = i / ROWS;
    float s = 0.0f;
    for (int w = 0; w < nw; ++w) s += red[w * (NT * 8 * ROWS) + tk * ROWS + rl];
    const int col = row0 + rl;
    float y = s * ws[col];
    if (bias != nullptr) y += to_f<T>(bias[col]);
    out[(int64_t)tk * n + col] = from_f<T>(y);
  }
}

constexpr int DECODE_MAX_M = 16;
constexpr int DECODE_MAX_THREADS = 512;
// rows per block the decode kernels are instantiated for (launch_decode); 48 fills 128 SMs at N = 6144
constexpr bool decode_rows_ok(int64_t rows) { return rows == 16 || rows == 32 || rows == 48 || rows == 64; }

// grid: N / (16 R) blocks, each 16 R rows x all K; its warps split the 64-column steps (interleaved)
// and meet in shared memory. NT n-tiles of 8 tokens (M <= 8 NT).
template <typename T, int R, int NT>
__global__ void __launch_bounds__(DECODE_MAX_THREADS) decode_kernel(
    const T* __restrict__ x, int64_t stride_x, int m, const uint8_t* __restrict__ buf, const float* __restrict__ ws,
    const T* __restrict__ bias, T* __restrict__ out, int n, int k, int meta_rows) {
  constexpr int U = (R * NT >= 3) ? 2 : 4;  // steps in flight per warp (registers)
  constexpr int ROWS = 16 * R;
  extern __shared__ float red[];  // [warps][NT * 8][ROWS]
  __shared__ uint2 lut[16];       // nibble (i0 | i1 << 2) -> prmt selectors of dense positions 0-1, 2-3
  if (threadIdx.x < 16) {
    const int i0 = threadIdx.x & 3, i1 = threadIdx.x >> 2;
    uint32_t s[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) s[q] = q == i0 ? 0x10u : (q == i1 ? 0x32u : 0x44u);
    lut[threadIdx.x] = make_uint2(s[0] | s[1] << 8, s[2] | s[3] << 8);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kt_n = k >> 6;
  const int64_t half_k = k >> 1;
  const int row0 = blockIdx.x * ROWS;
  const uint8_t* meta = buf + (int64_t)n * half_k;
  const int64_t meta_step = (int64_t)(meta_rows >> 4) * 128;  // bytes between k-tiles of a row tile
  const uint8_t* vp[R];
  const uint8_t* mp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int rr = row0 + r * 16;
    vp[r] = buf + (int64_t)(rr + g) * half_k + 4 * t;
    mp[r] = meta + ((int64_t)(rr / meta_rows) * kt_n * (meta_rows >> 4) + (rr % meta_rows) / 16) * 128 + lane * 4;
  }
  const T* xp[NT];
  bool xv[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int tok = nt * 8 + g;
    xv[nt] = tok < m;
    xp[nt] = x + (int64_t)(xv[nt] ? tok : 0) * stride_x;
  }
  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.0f;

  for (int kt0 = warp; kt0 < kt_n; kt0 += nw * U) {
    uint32_t av[U][R][4], ev[U][R];
    uint2 xb[U][NT][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kt = kt0 + u * nw;
      const bool ok = kt < kt_n;  // a step past the end decodes zeros: contributes nothing
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = vp[r] + (int64_t)kt * 32;
        av[u][r][0] = ok ? __ldg(reinterpret_cast<const unsigned int*>(p)) : 0u;
        av[u][r][1] = ok ? __ldg(reinterpret_cast<const unsigned int*>(p + 16)) : 0u;
        av[u][r][2] = ok ? __ldg(reinterpret_cast<const unsigned int*>(p + 8 * half_k)) : 0u;
        av[u][r][3] = ok ? __ldg(reinterpret_cast<const unsigned int*>(p + 8 * half_k + 16)) : 0u;
        ev[u][r] = ok ? __ldg(reinterpret_cast<const unsigned int*>(mp[r] + kt * meta_step)) : 0u;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = kt * 64 + 4 * ((j >> 1) * 8 + 2 * t + (j & 1));
          xb[u][nt][j] = (ok && xv[nt]) ? __ldg(reinterpret_cast<const uint2*>(xp[nt] + col)) : make_uint2(0u, 0u);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        uint32_t pg[4], ph[4];  // row g / g+8: the kept pair of real group G(j, t)
        i8x4_to_pairs<T>(av[u][r][0], pg[0], pg[1]);
        i8x4_to_pairs<T>(av[u][r][1], pg[2], pg[3]);
        i8x4_to_pairs<T>(av[u][r][2], ph[0], ph[1]);
        i8x4_to_pairs<T>(av[u][r][3], ph[2], ph[3]);
        const uint32_t e = ev[u][r];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int sh = (j >> 1) * 16 + (j & 1) * 4;  // byte 0/2: row g, byte 1/3: row g+8
          const uint2 sg = lut[(e >> sh) & 15u], s8 = lut[(e >> (sh + 8)) & 15u];
          const uint32_t a0 = prmt(pg[j], 0u, sg.x), a2 = prmt(pg[j], 0u, sg.y);
          const uint32_t a1 = prmt(ph[j], 0u, s8.x), a3 = prmt(ph[j], 0u, s8.y);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[r][nt], a0, a1, a2, a3, xb[u][nt][j].x, xb[u][nt][j].y);
        }
      }
  }
  reduce_store<T, R, NT>(acc, red, warp, nw, g, t, m, row0, n, ws, bias, out);
}


// ---- the same product on the SPARSE tensor cores: mma.sp.m16n8k16, no decompression ----------------
// mma.sp m16n8k16 (bf16/fp16) takes A as the kept pair of one 4-column chunk per thread (chunk t of
// rows g, g+8) and ONE metadata word per quad, from the lane the selector F names: nibble c of bits
// 15:0 for row g's chunk c, bits 31:16 for row g+8. Lane (g, F)'s cuSPARSELt word holds exactly the
// nibbles of groups {2F, 2F+1, 8+2F, 9+2F} of rows g, g+8 (byte 0: row g groups 2F|2F+1, byte 1:
// row g+8, bytes 2, 3: groups 8+2F|9+2F); prmt 0x3120 turns it into that format. So mma F of a
// 64-column tile gives virtual chunk c to real group G_F(c) = {2F, 2F+1, 8+2F, 9+2F}[c]: thread t
// needs the kept pair of group G_F(t) = the (t & 1) half of word F of value bytes [16 (t >> 1), +16),
// one 16-byte load per row per tile for all four mma; its B words are x at columns 8F + 2t and
// 32 + 8F + 2t (virtual k 2t, 2t+1 -> chunk t >> 1, positions 2 (t & 1) + {0, 1}; k 2t+8 -> chunk 2 + ...).
template <typename T> __device__ __forceinline__ uint32_t i8_pair(uint32_t w, uint32_t half);
template <> __device__ __forceinline__ uint32_t i8_pair<__nv_bfloat16>(uint32_t w, uint32_t half) {
  // bf16 0x43mm = 128 + m (m < 128): (128 + (b & 0x7f)) - (128 or 256 when b's sign bit is set) = b,
  // exact; fma with 1.0 as the subtraction (bf16x2 sub needs sm_90, fma.bf16x2 is sm_80)
  const uint32_t sel = half ? 0x4342u : 0x4140u;
  const uint32_t v = prmt(w & 0x7f7f7f7fu, 0x43434343u, sel);
  const uint32_t neg_off = prmt(w & 0x80808080u, 0xC3C3C3C3u, sel) | 0xC300C300u;
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(v), "r"(0x3F803F80u), "r"(neg_off));
  return d;
}
template <> __device__ __forceinline__ uint32_t i8_pair<__half>(uint32_t w, uint32_t half) {
  const uint32_t v = prmt(w ^ 0x80808080u, 0x64646464u, half ? 0x5342u : 0x5140u);  // 1024 + b + 128
  uint32_t d;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(v), "r"(0x64806480u));
  return d;
}

// F: the sparsity selector (which lane of each quad supplies the metadata), an immediate operand
template <typename T, int F>
__device__ __forceinline__ void mma_sp16816(float* c, uint32_t a0, uint32_t a1, uint32_t b0, uint32_t b1, uint32_t e) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm("mma.sp.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6,%7}, {%0,%1,%2,%3}, %8, %9;"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e), "n"(F));
  else
    asm("mma.sp.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6,%7}, {%0,%1,%2,%3}, %8, %9;"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e), "n"(F));
}

template <typename T, int NT>
__device__ __forceinline__ void sp_tile(float (&acc)[NT][4], const uint4& ag, const uint4& ah, uint32_t e,
                                        const uint32_t (&xb)[NT][8], uint32_t half) {
  const uint32_t em = prmt(e, 0u, 0x3120u);
  const uint32_t wg[4] = {ag.x, ag.y, ag.z, ag.w}, wh[4] = {ah.x, ah.y, ah.z, ah.w};
#define S24_F(F)                                                                                   \
  {                                                                                                \
    const uint32_t a0 = i8_pair<T>(wg[F], half), a1 = i8_pair<T>(wh[F], half);                     \
    _Pragma("unroll") for (int nt = 0; nt < NT; ++nt)                                              \
        mma_sp16816<T, F>(acc[nt], a0, a1, xb[nt][2 * F], xb[nt][2 * F + 1], em);                   \
  }
  S24_F(0) S24_F(1) S24_F(2) S24_F(3)
#undef S24_F
}

// (its setup repeats decode_kernel's on purpose: moving it into shared inline helpers changed the code
// ptxas made for the configs gate_up and down use, and measured 5-14% slower there (H100, 2026-11-21);
// a struct of per-thread arrays made ptxas spill in 6 of the 24 instantiations)
template <typename T, int R, int NT>
__global__ void __launch_bounds__(DECODE_MAX_THREADS) decode_sp_kernel(
    const T* __restrict__ x, int64_t stride_x, int m, const uint8_t* __restrict__ buf, const float* __restrict__ ws,
    const T* __restrict__ bias, T* __restrict__ out, int n, int k, int meta_rows) {
  // steps in flight per warp, ~(9 R + 8 NT) load registers each, under the 128-register cap; 4 where it
  // fits, so that a 4096-wide K over 16 warps is one round of loads (ptxas: no or a few bytes of spill)
  constexpr int U = R * NT <= 2 ? 4 : (R * NT <= 4 ? 2 : 1);
  extern __shared__ float red[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kt_n = k >> 6;
  const int64_t half_k = k >> 1;
  const int row0 = blockIdx.x * (16 * R);
  const uint8_t* meta = buf + (int64_t)n * half_k;
  const int64_t meta_step = (int64_t)(meta_rows >> 4) * 128;
  const uint8_t* vp[R];
  const uint8_t* mp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int rr = row0 + r * 16;
    vp[r] = buf + (int64_t)(rr + g) * half_k + (t >> 1) * 16;
    mp[r] = meta + ((int64_t)(rr / meta_rows) * kt_n * (meta_rows >> 4) + (rr % meta_rows) / 16) * 128 + lane * 4;
  }
  const T* xp[NT];
  bool xv[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int tok = nt * 8 + g;
    xv[nt] = tok < m;
    xp[nt] = x + (int64_t)(xv[nt] ? tok : 0) * stride_x + 2 * t;
  }
  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.0f;

  for (int kt0 = warp; kt0 < kt_n; kt0 += nw * U) {
    uint4 ag[U][R], ah[U][R];
    uint32_t ev[U][R];
    uint32_t xb[U][NT][8];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kt = kt0 + u * nw;
      const bool ok = kt < kt_n;  // past the end: zero values and valid metadata (keep 0, 1)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = vp[r] + (int64_t)kt * 32;
        ag[u][r] = ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
        ah[u][r] = ok ? __ldg(reinterpret_cast<const uint4*>(p + 8 * half_k)) : make_uint4(0u, 0u, 0u, 0u);
        ev[u][r] = ok ? __ldg(reinterpret_cast<const unsigned int*>(mp[r] + kt * meta_step)) : 0x44444444u;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          const T* q = xp[nt] + kt * 64 + 8 * f;
          xb[u][nt][2 * f] = (ok && xv[nt]) ? __ldg(reinterpret_cast<const unsigned int*>(q)) : 0u;
          xb[u][nt][2 * f + 1] = (ok && xv[nt]) ? __ldg(reinterpret_cast<const unsigned int*>(q + 32)) : 0u;
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) sp_tile<T, NT>(acc[r], ag[u][r], ah[u][r], ev[u][r], xb[u], (uint32_t)(t & 1));
  }
  reduce_store<T, R, NT>(acc, red, warp, nw, g, t, m, row0, n, ws, bias, out);
}

template <typename T, int R, int NT>
void launch_decode_t(const at::Tensor& x, const at::Tensor& w, const float* ws, const T* bias, T* out, int n, int k,
                     int warps, int meta_rows, int kind, cudaStream_t st) {
  auto kern = kind == 1 ? decode_sp_kernel<T, R, NT> : decode_kernel<T, R, NT>;
  const size_t smem = (size_t)warps * NT * 8 * 16 * R * sizeof(float);
  if (smem + 1024 > 48 * 1024) {  // over the default 48 KB with decode_kernel's static lut (48 rows x 8 tokens x 16 warps: 48 KB)
    static bool raised[2] = {false, false};
    if (!raised[kind]) {
      TORCH_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) == cudaSuccess, cat("sparse24_ext.decode: cannot get ", smem, " bytes of shared memory"));
      raised[kind] = true;
    }
  }
  kern<<<(unsigned)(n / (16 * R)), warps * 32, smem, st>>>(
      reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), (int)x.size(0),
      reinterpret_cast<const uint8_t*>(w.data_ptr()), ws, bias, out, n, k, meta_rows);
  check_launch("decode");
}

// kind 0: dense mma on registers-decoded tiles; kind 1: sparse mma.sp (no decode of the 2:4 pattern)
template <typename T>
void launch_decode(const at::Tensor& x, const at::Tensor& w, const float* ws, const T* bias, T* out, int n, int k,
                   int rows_per_block, int warps, int meta_rows, int kind, cudaStream_t st) {
  const bool two = x.size(0) > 8;
#define S24_DEC(RR)                                                                                   \
  if (rows_per_block == 16 * RR) {                                                                    \
    if (two) launch_decode_t<T, RR, 2>(x, w, ws, bias, out, n, k, warps, meta_rows, kind, st);        \
    else launch_decode_t<T, RR, 1>(x, w, ws, bias, out, n, k, warps, meta_rows, kind, st);            \
    return;                                                                                           \
  }
  S24_DEC(1) S24_DEC(2) S24_DEC(3) S24_DEC(4)
#undef S24_DEC
  TORCH_CHECK(false, cat("sparse24_ext.decode: rows_per_block must be 16, 32, 48 or 64, got ", rows_per_block));
}

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, cat("sparse24_ext: ", what, " launch failed: ", cudaGetErrorString(e)));
}

template <typename T>
void launch_quant(const at::Tensor& x, int64_t start, int64_t mc, int8_t* q, float* s, int k, cudaStream_t st) {
  const T* xp = reinterpret_cast<const T*>(x.data_ptr()) + start * x.stride(0);
  const bool vec = (k % 8 == 0) && (x.stride(0) % 8 == 0) && (reinterpret_cast<uintptr_t>(xp) % 16 == 0);
  if (vec)
    quant_kernel<T, true><<<(unsigned)mc, QUANT_THREADS, 0, st>>>(xp, x.stride(0), q, s, k);
  else
    quant_kernel<T, false><<<(unsigned)mc, QUANT_THREADS, 0, st>>>(xp, x.stride(0), q, s, k);
  check_launch("quant");
}

template <typename T>
void launch_epilogue(const at::Tensor& d, const float* xs, const at::Tensor* bias, T* out, int64_t mc, int n,
                     cudaStream_t st) {
  const int64_t total_vec = mc * (int64_t)(n / 8);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total_vec + threads - 1) / threads, 132 * 16);
  const auto* dp = reinterpret_cast<const __nv_bfloat16*>(d.data_ptr());
  if (bias)
    epilogue_kernel<T, true><<<(unsigned)blocks, threads, 0, st>>>(dp, xs, reinterpret_cast<const T*>(bias->data_ptr()),
                                                                   out, total_vec, n);
  else
    epilogue_kernel<T, false><<<(unsigned)blocks, threads, 0, st>>>(dp, xs, nullptr, out, total_vec, n);
  check_launch("epilogue");
}

void set_lib(int64_t matmul_fn, int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_matmul = reinterpret_cast<MatmulFn>(static_cast<uintptr_t>(matmul_fn));
  g_handle = reinterpret_cast<const void*>(static_cast<uintptr_t>(handle));
}

int64_t register_plans(int64_t n, int64_t k, c10::IntArrayRef m_pads, c10::IntArrayRef plans,
                       c10::IntArrayRef workspaces) {
  TORCH_CHECK(m_pads.size() > 0 && m_pads.size() == plans.size() && plans.size() == workspaces.size(),
              "sparse24_ext.register_plans: need equal, non-empty lists");
  TORCH_CHECK(n % 64 == 0 && k % 64 == 0, "sparse24_ext.register_plans: N, K must be multiples of 64");
  auto* ps = new PlanSet();
  ps->n = n;
  ps->k = k;
  for (size_t i = 0; i < m_pads.size(); ++i) {
    TORCH_CHECK(m_pads[i] % 16 == 0 && (i == 0 || m_pads[i] > m_pads[i - 1]),
                "sparse24_ext.register_plans: m_pads must be ascending multiples of 16");
    ps->m_pads.push_back(m_pads[i]);
    ps->plans.push_back(reinterpret_cast<const void*>(static_cast<uintptr_t>(plans[i])));
    ps->workspaces.push_back(reinterpret_cast<void*>(static_cast<uintptr_t>(workspaces[i])));
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  g_sets.push_back(ps);
  return static_cast<int64_t>(g_sets.size()) - 1;
}

// Each op checks its arguments once: the dispatcher ops (linear, decode) with TORCH_CHECK, the pybind
// entries in sparse24_ext_py.cpp with their own checks; both then call linear_run / decode_run, which
// assume valid arguments.

// bias in x's dtype, contiguous, 16-byte aligned (vector loads); undefined when there is none
at::Tensor prep_bias(const c10::optional<at::Tensor>& bias, at::ScalarType dt) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  at::Tensor b = bias->scalar_type() == dt && bias->is_contiguous() ? *bias : bias->to(dt).contiguous();
  if (reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 != 0) b = b.clone();
  return b;
}

// x [1 <= M <= 16, K] (unit stride in K), config valid for (n, k)
at::Tensor decode_impl(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& ws, const at::Tensor* bias,
                       int64_t n, int64_t k, int64_t rows_per_block, int64_t warps, int64_t meta_rows,
                       int64_t kind, cudaStream_t stream) {
  const int64_t m = x_in.size(0);
  // 8-byte loads of x: rows 8-byte aligned
  const at::Tensor x = (x_in.stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(x_in.data_ptr()) % 8 == 0)
                           ? x_in : x_in.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());
  const float* wsp = ws.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16)
    launch_decode<__nv_bfloat16>(x, w, wsp, bias ? reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr()) : nullptr,
                                 reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), (int)n, (int)k, (int)rows_per_block,
                                 (int)warps, (int)meta_rows, (int)kind, stream);
  else
    launch_decode<__half>(x, w, wsp, bias ? reinterpret_cast<const __half*>(bias->data_ptr()) : nullptr,
                          reinterpret_cast<__half*>(out.data_ptr()), (int)n, (int)k, (int)rows_per_block, (int)warps,
                          (int)meta_rows, (int)kind, stream);
  return out;
}

void set_decode(int64_t set_id, int64_t max_m, int64_t meta_rows, c10::IntArrayRef rows_per_block,
                c10::IntArrayRef warps, c10::IntArrayRef kinds) {
  std::lock_guard<std::mutex> lock(g_mutex);
  TORCH_CHECK(set_id >= 0 && set_id < (int64_t)g_sets.size(), cat("sparse24_ext.set_decode: unknown plan set ", set_id));
  TORCH_CHECK(max_m >= 0 && max_m <= DECODE_MAX_M && rows_per_block.size() == 2 && warps.size() == 2 &&
                  kinds.size() == 2, cat("sparse24_ext.set_decode: max_m in [0, ", DECODE_MAX_M, "], two configs (M <= 8, M <= 16)"));
  PlanSet* ps = g_sets[set_id];
  TORCH_CHECK(meta_rows > 0 && meta_rows % 16 == 0 && ps->n % meta_rows == 0, cat("sparse24_ext.set_decode: bad meta_rows ", meta_rows));
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(decode_rows_ok(rows_per_block[i]) &&
                    ps->n % rows_per_block[i] == 0 && warps[i] >= 1 && warps[i] * 32 <= DECODE_MAX_THREADS &&
                    (kinds[i] == 0 || kinds[i] == 1),
                "sparse24_ext.set_decode: bad config");
    ps->dec_rows[i] = rows_per_block[i];
    ps->dec_warps[i] = warps[i];
    ps->dec_kind[i] = kinds[i];
  }
  ps->meta_rows = meta_rows;
  ps->decode_max_m = max_m;
}

// the decode kernel alone, with an explicit config (tuning, tests); arguments checked by the caller
at::Tensor decode_run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                      const c10::optional<at::Tensor>& bias, int64_t rows_per_block, int64_t warps, int64_t meta_rows,
                      int64_t kind) {
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const at::Tensor b = prep_bias(bias, x.scalar_type());
  return decode_impl(x, w, ws, b.defined() ? &b : nullptr, ws.numel(), x.size(1), rows_per_block, warps, meta_rows,
                     kind, stream);
}

at::Tensor decode(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws, const c10::optional<at::Tensor>& bias,
                  int64_t rows_per_block, int64_t warps, int64_t meta_rows, int64_t kind) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "sparse24_ext.decode: x must be CUDA [M, K], unit stride in K");
  const int64_t n = ws.numel(), k = x.size(1), m = x.size(0);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "sparse24_ext.decode: x must be bfloat16 or float16");
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kChar && w.is_contiguous(), "sparse24_ext.decode: bad weight");
  TORCH_CHECK(ws.is_cuda() && ws.scalar_type() == at::kFloat && ws.is_contiguous(), "sparse24_ext.decode: bad w_scale");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->is_cuda() && bias->numel() == n), "sparse24_ext.decode: bias must have N elements");
  TORCH_CHECK(m >= 1 && m <= DECODE_MAX_M, cat("sparse24_ext.decode: needs 1 <= M <= ", DECODE_MAX_M, ", got ", m));
  TORCH_CHECK(warps >= 1 && warps * 32 <= DECODE_MAX_THREADS, cat("sparse24_ext.decode: warps must be 1..", DECODE_MAX_THREADS / 32));
  TORCH_CHECK(kind == 0 || kind == 1, cat("sparse24_ext.decode: kind must be 0 (dense mma) or 1 (mma.sp), got ", kind));
  TORCH_CHECK(decode_rows_ok(rows_per_block) && n % rows_per_block == 0 &&
                  k % 64 == 0 && meta_rows > 0 && meta_rows % 16 == 0 && n % meta_rows == 0,
              cat("sparse24_ext.decode: N=", n, " K=", k, " do not fit rows_per_block=", rows_per_block, " meta_rows=", meta_rows));
  TORCH_CHECK(w.numel() >= n * k * 5 / 8, cat("sparse24_ext.decode: compressed weight has ", w.numel(), " bytes, expected >= ", n * k * 5 / 8));
  return decode_run(x, w, ws, bias, rows_per_block, warps, meta_rows, kind);
}

PlanSet* plan_set(int64_t set_id) {
  std::lock_guard<std::mutex> lock(g_mutex);  // uncontended: ~20 ns
  return set_id >= 0 && set_id < (int64_t)g_sets.size() ? g_sets[set_id] : nullptr;
}

// x [M, K] of the plan set's K, arguments checked by the caller
at::Tensor linear_run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                      const c10::optional<at::Tensor>& bias, PlanSet* ps) {
  TORCH_CHECK(g_matmul != nullptr, "sparse24_ext.linear: set_lib was not called");
  const int64_t n = ps->n, k = ps->k;
  const auto dt = x.scalar_type();
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t m = x.size(0);
  if (m == 0) return at::empty({0, n}, x.options());
  const at::Tensor b = prep_bias(bias, dt);
  const at::Tensor* bp = b.defined() ? &b : nullptr;
  if (m <= ps->decode_max_m) {
    const int nt = m > 8 ? 1 : 0;
    return decode_impl(x, w, ws, bp, n, k, ps->dec_rows[nt], ps->dec_warps[nt], ps->meta_rows, ps->dec_kind[nt],
                       stream);
  }
  const int64_t top = ps->m_pads.back();
  auto opts8 = x.options().dtype(at::kChar);
  auto optsb = x.options().dtype(at::kBFloat16);
  at::Tensor out;
  const bool single = m <= top;
  for (int64_t start = 0; start < m; start += top) {
    const int64_t mc = std::min(top, m - start);
    const size_t bi = std::lower_bound(ps->m_pads.begin(), ps->m_pads.end(), mc) - ps->m_pads.begin();
    const int64_t m_pad = ps->m_pads[bi];
    // one allocation for xq [m_pad, k] int8 and xs [mc] f32 (at a 16-byte aligned offset);
    // xq rows >= mc are left unwritten: cuSPARSELt reads them, their output rows are dropped
    const int64_t xq_bytes = (m_pad * k + 15) / 16 * 16;
    at::Tensor scratch = at::empty({xq_bytes + 4 * mc}, opts8);
    int8_t* xq_ptr = scratch.data_ptr<int8_t>();
    float* xs_ptr = reinterpret_cast<float*>(xq_ptr + xq_bytes);
    at::Tensor d = at::empty({m_pad, n}, optsb);
    if (dt == at::kBFloat16)
      launch_quant<__nv_bfloat16>(x, start, mc, xq_ptr, xs_ptr, (int)k, stream);
    else
      launch_quant<__half>(x, start, mc, xq_ptr, xs_ptr, (int)k, stream);
    void* dp = d.data_ptr();
    int st = g_matmul(g_handle, ps->plans[bi], ws.data_ptr(), w.data_ptr(), xq_ptr, &g_beta, dp, dp,
                      ps->workspaces[bi], &stream, 1);
    TORCH_CHECK(st == 0, cat("sparse24_ext.linear: cusparseLtMatmul failed with status ", st, " (m_pad=", m_pad, ", n=", n, ", k=", k, ")"));
    if (single && dt == at::kBFloat16) {  // in place on D, no extra allocation
      launch_epilogue<__nv_bfloat16>(d, xs_ptr, bp, reinterpret_cast<__nv_bfloat16*>(dp), mc, (int)n,
                                     stream);
      return m_pad == m ? d : d.narrow(0, 0, m);
    }
    if (!out.defined()) out = at::empty({m, n}, x.options());
    if (dt == at::kBFloat16)
      launch_epilogue<__nv_bfloat16>(d, xs_ptr, bp,
                                     reinterpret_cast<__nv_bfloat16*>(out.data_ptr()) + start * n, mc, (int)n, stream);
    else
      launch_epilogue<__half>(d, xs_ptr, bp, reinterpret_cast<__half*>(out.data_ptr()) + start * n, mc,
                              (int)n, stream);
  }
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws, const c10::optional<at::Tensor>& bias,
                  int64_t set_id) {
  PlanSet* ps = plan_set(set_id);
  TORCH_CHECK(ps != nullptr, cat("sparse24_ext.linear: unknown plan set ", set_id));
  const int64_t n = ps->n, k = ps->k;
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(1) == k && x.stride(1) == 1, cat("sparse24_ext.linear: x must be a CUDA [M, ", k, "] tensor with unit stride in K"));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "sparse24_ext.linear: x must be bfloat16 or float16");
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kChar && w.is_contiguous() && w.numel() >= n * k * 5 / 8,
              cat("sparse24_ext.linear: w_cslt must be a contiguous CUDA int8 buffer of >= ", n * k * 5 / 8, " bytes"));
  TORCH_CHECK(ws.is_cuda() && ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.numel() == n,
              "sparse24_ext.linear: w_scale must be float32 [N] contiguous");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->is_cuda() && bias->numel() == n), "sparse24_ext.linear: bias must have N elements");
  return linear_run(x, w, ws, bias, ps);
}

}  // namespace

TORCH_LIBRARY(sparse24_ext, m) {
  m.def("set_lib(int matmul_fn, int handle) -> ()", &set_lib);
  m.def("register_plans(int n, int k, int[] m_pads, int[] plans, int[] workspaces) -> int", &register_plans);
  m.def("linear(Tensor x, Tensor w_cslt, Tensor w_scale, Tensor? bias, int plan_set) -> Tensor");
  m.def("set_decode(int plan_set, int max_m, int meta_rows, int[] rows_per_block, int[] warps, int[] kinds) -> ()",
        &set_decode);
  m.def("decode(Tensor x, Tensor w_cslt, Tensor w_scale, Tensor? bias, int rows_per_block, int warps, "
        "int meta_rows, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse24_ext, CUDA, m) {
  m.impl("linear", &linear);
  m.impl("decode", &decode);
}

// entry points for the pybind module (sparse24_ext_py.cpp): eager calls skip the dispatcher (several us
// of host time). That module checks the arguments itself (see there) before calling these.
namespace sparse24_ext {
bool plan_set_shape(int64_t set_id, int64_t* n, int64_t* k) {
  PlanSet* ps = plan_set(set_id);
  if (ps == nullptr) return false;
  *n = ps->n;
  *k = ps->k;
  return true;
}
at::Tensor linear_entry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                        const c10::optional<at::Tensor>& bias, int64_t set_id) {
  return linear_run(x, w, ws, bias, plan_set(set_id));
}
at::Tensor decode_entry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                        const c10::optional<at::Tensor>& bias, int64_t rows_per_block, int64_t warps,
                        int64_t meta_rows, int64_t kind) {
  return decode_run(x, w, ws, bias, rows_per_block, warps, meta_rows, kind);
}
bool decode_rows_supported(int64_t rows_per_block) { return decode_rows_ok(rows_per_block); }
}  // namespace sparse24_ext
