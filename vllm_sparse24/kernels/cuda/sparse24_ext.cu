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
// linear: x [M, K] bf16/fp16 (unit stride in K) -> [M, N] in x's dtype; M padded to the smallest
// registered bucket >= M (chunks of the largest bucket above it). Numerics as the Triton path:
//   scale_m = max(absmax_m / 127, 1e-12) (IEEE division), q = rint(x / scale_m) (ties to even),
//   clamped to +-127; D = cuSPARSELt(q, W) * w_scale (bf16); out = D * scale_m + bias (fp32 math).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>  // pybind11: the eager entry point `linear` without the dispatcher
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace {

using MatmulFn = int (*)(const void* handle, const void* plan, const void* alpha, const void* dA,
                         const void* dB, const void* beta, const void* dC, void* dD, void* workspace,
                         cudaStream_t* streams, int32_t num_streams);

struct PlanSet {
  int64_t n = 0, k = 0;
  std::vector<int64_t> m_pads;  // ascending
  std::vector<const void*> plans;
  std::vector<void*> workspaces;
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

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, "sparse24_ext: ", what, " launch failed: ", cudaGetErrorString(e));
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

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws, const c10::optional<at::Tensor>& bias,
                  int64_t set_id) {
  PlanSet* ps;
  {
    std::lock_guard<std::mutex> lock(g_mutex);  // uncontended: ~20 ns
    TORCH_CHECK(set_id >= 0 && set_id < (int64_t)g_sets.size(), "sparse24_ext.linear: unknown plan set ", set_id);
    TORCH_CHECK(g_matmul != nullptr, "sparse24_ext.linear: set_lib was not called");
    ps = g_sets[set_id];
  }
  const int64_t n = ps->n, k = ps->k;
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(1) == k && x.stride(1) == 1,
              "sparse24_ext.linear: x must be a CUDA [M, ", k, "] tensor with unit stride in K");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "sparse24_ext.linear: x must be bfloat16 or float16");
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kChar && w.is_contiguous(), "sparse24_ext.linear: bad weight");
  TORCH_CHECK(ws.is_cuda() && ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.numel() == n,
              "sparse24_ext.linear: w_scale must be float32 [N] contiguous");
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t m = x.size(0);
  at::Tensor b;
  const at::Tensor* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "sparse24_ext.linear: bias must have N elements");
    b = bias->scalar_type() == dt && bias->is_contiguous() ? *bias : bias->to(dt).contiguous();
    if (reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 != 0) b = b.clone();  // 16-byte vector loads
    bp = &b;
  }
  if (m == 0) return at::empty({0, n}, x.options());
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
    TORCH_CHECK(st == 0, "sparse24_ext.linear: cusparseLtMatmul failed with status ", st, " (m_pad=", m_pad,
                ", n=", n, ", k=", k, ")");
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

}  // namespace

TORCH_LIBRARY(sparse24_ext, m) {
  m.def("set_lib(int matmul_fn, int handle) -> ()", &set_lib);
  m.def("register_plans(int n, int k, int[] m_pads, int[] plans, int[] workspaces) -> int", &register_plans);
  m.def("linear(Tensor x, Tensor w_cslt, Tensor w_scale, Tensor? bias, int plan_set) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse24_ext, CUDA, m) { m.impl("linear", &linear); }

// eager calls skip the dispatcher (several us of host time); torch.compile uses the op above
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("linear", &linear, "sparse24 W8A8 2:4 linear (same as torch.ops.sparse24_ext.linear)");
}
