// The C ABI of libsparse24 (declared in sparse24.h): config table, GEMM dispatch by config id, the
// load-time compressor (dense 2:4 -> CUTLASS values + metadata) and the eager per-token quant kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <utility>

#include "sparse24_gemm.cuh"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"

namespace sparse24 {
namespace {

constexpr int kAbiVersion = 5;  // 5: the decode GEMM's unit_blocks (tuning, partition)
constexpr size_t kErrLen = 512;
thread_local char g_err[kErrLen] = "";

int fail(int code, const char* msg) {
  std::snprintf(g_err, kErrLen, "%s", msg);
  return code;
}

int check_cuda(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return 0;
  std::snprintf(g_err, kErrLen, "%s: %s", what, cudaGetErrorString(e));
  return -10;
}

#define S24_CONFIG(ID, NAME, ...) #NAME,
constexpr const char* kConfigNames[] = {
#include "configs.inc"
};
#undef S24_CONFIG
#define S24_CONFIG(ID, ...) ID,
constexpr int kConfigIds[] = {
#include "configs.inc"
};
#undef S24_CONFIG
constexpr bool ids_in_order() {
  for (int i = 0; i < kNumConfigs; ++i)
    if (kConfigIds[i] != i) return false;
  return true;
}
static_assert(ids_in_order(), "configs.inc ids must be 0, 1, 2, ... in row order");

// Which rows this library holds: every S24_CONFIG row, and the S24_SEARCH_CONFIG rows only when
// built with --search-configs (S24_WITH_SEARCH_CONFIGS); the others have no kernel to point at.
#ifdef S24_WITH_SEARCH_CONFIGS
constexpr bool kSearchBuilt = true;
#else
constexpr bool kSearchBuilt = false;
#endif
#undef S24_SEARCH_CONFIG
#define S24_CONFIG(ID, ...) true,
#define S24_SEARCH_CONFIG(ID, ...) kSearchBuilt,
constexpr bool kBuilt[] = {
#include "configs.inc"
};
#undef S24_CONFIG
#undef S24_SEARCH_CONFIG
#define S24_SEARCH_CONFIG S24_CONFIG

using RunFn = int (*)(S24GemmArgs*, int, char*, size_t);
template <int I>
constexpr RunFn run_fn() {
  if constexpr (kBuilt[I]) return &run_config<I>;
  else return nullptr;
}
template <size_t... I>
constexpr std::array<RunFn, sizeof...(I)> make_table(std::index_sequence<I...>) {
  return {run_fn<static_cast<int>(I)>()...};
}
constexpr auto kRun = make_table(std::make_index_sequence<kNumConfigs>{});

int sm_count() {
  static int count = [] {
    int dev = 0, n = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n;
  }();
  return count;
}

// ---- compressor -------------------------------------------------------------------------------
using ProblemShape = cute::Shape<int, int, int, int>;
using Fp8SparseConfig = cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, cutlass::float_e4m3_t, cutlass::layout::RowMajor, 16,
    cutlass::float_e4m3_t, cutlass::layout::ColumnMajor, 16, float, Shape<_128, _128, _128>, Shape<_1, _1, _1>,
    cutlass::gemm::collective::StageCountAuto,
    cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum>::CollectiveOp::SparseConfig;
static_assert(same_metadata_layout<Fp8SparseConfig>(), "int8 and fp8 weights share one metadata layout");

template <class Element, class SparseConfig>
int compress(const void* dense, void* values, void* meta, int n, int k, cudaStream_t stream) {
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<
      ProblemShape, Element, cutlass::layout::RowMajor, SparseConfig, cutlass::arch::Sm90>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<Kernel>;
  using StrideA = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  ProblemShape problem{n, 1, k, 1};
  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(n, k, 1));
  cutlass::KernelHardwareInfo hw;
  hw.sm_count = sm_count();
  typename Compressor::Arguments args{problem, {dense, stride_a, values, meta}, hw};
  Compressor op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return fail(-2, "compressor: K must be a multiple of 4");
  cutlass::Status st = op.run(args, nullptr, stream);
  if (st != cutlass::Status::kSuccess) {
    std::snprintf(g_err, kErrLen, "compressor run failed: %s", cutlass::cutlassGetStatusString(st));
    return -4;
  }
  return check_cuda("compressor launch");
}

// ---- per-token int8 quant (eager path; under torch.compile the same math is plain torch ops) --
template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

constexpr int kQuantThreads = 256;

// One block per token row: exact absmax (max is order-independent), the scale as quant.py computes
// it, then IEEE division and round-half-even, as torch does.
template <class T>
__global__ void __launch_bounds__(kQuantThreads) quant_int8_kernel(const T* __restrict__ x, int64_t row_stride,
                                                                   int k, int8_t* __restrict__ q,
                                                                   float* __restrict__ scale) {
  const T* row = x + blockIdx.x * row_stride;
  float amax = 0.f;
  for (int i = threadIdx.x; i < k; i += kQuantThreads) amax = fmaxf(amax, fabsf(to_float(row[i])));
  __shared__ float warp_max[kQuantThreads / 32];
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    amax = threadIdx.x < kQuantThreads / 32 ? warp_max[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    // quant.py's Grid.scale of INT8: absmax * float32(1/127), then the 1e-12 floor
    if (threadIdx.x == 0) warp_max[0] = fmaxf(__fmul_rn(amax, static_cast<float>(1.0 / 127.0)), 1e-12f);
  }
  __syncthreads();
  const float s = warp_max[0];
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  int8_t* qrow = q + static_cast<int64_t>(blockIdx.x) * k;
  for (int i = threadIdx.x; i < k; i += kQuantThreads) {
    float v = rintf(__fdiv_rn(to_float(row[i]), s));
    qrow[i] = static_cast<int8_t>(fminf(fmaxf(v, -127.f), 127.f));
  }
}

}  // namespace
}  // namespace sparse24

using namespace sparse24;

extern "C" {

int s24_abi_version() { return kAbiVersion; }
int s24_num_configs() { return kNumConfigs; }
const char* s24_config_name(int id) { return id >= 0 && id < kNumConfigs && kBuilt[id] ? kConfigNames[id] : nullptr; }
const char* s24_last_error() { return g_err; }

int s24_compressed_bytes(int n, int k, int64_t* values_bytes, int64_t* meta_bytes) {
  if (n <= 0 || k <= 0 || k % 4) return fail(-1, "n and k must be positive, k a multiple of 4");
  using Utility = cutlass::transform::kernel::StructuredSparseCompressorUtility<
      ProblemShape, int8_t, cutlass::layout::RowMajor, CanonicalSparseConfig>;
  using StrideA = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  ProblemShape problem{n, 1, k, 1};
  Utility u(problem, cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(n, k, 1)));
  *values_bytes = static_cast<int64_t>(u.get_tensorA_m_physical()) * u.get_tensorA_k_physical();
  *meta_bytes = static_cast<int64_t>(u.get_metadata_m_physical()) * u.get_metadata_k_physical();
  return 0;
}

int s24_compress(int dtype, const void* dense, void* values, void* meta, int n, int k, cudaStream_t stream) {
  if (dtype == S24_INT8) return compress<int8_t, CanonicalSparseConfig>(dense, values, meta, n, k, stream);
  if (dtype == S24_E4M3) return compress<cutlass::float_e4m3_t, Fp8SparseConfig>(dense, values, meta, n, k, stream);
  return fail(-1, "compress: dtype must be int8 or float8_e4m3fn");
}

int s24_workspace_bytes(int config, int m, int n, int k, int splits, int64_t* bytes) {
  if (config < 0 || config >= kNumConfigs || !kRun[config])
    return fail(-1, "config id out of range, or a search-only config this library was built without");
  *bytes = 0;
  for (int swizzle : {1, 2, 4, 8}) {  // the stream-K workspace depends on the raster swizzle
    S24GemmArgs a{};
    a.m = m, a.n = n, a.k = k, a.splits = splits, a.swizzle = swizzle, a.sm_count = sm_count();
    int rc = kRun[config](&a, 1, g_err, kErrLen);
    if (rc) return rc;
    *bytes = std::max(*bytes, static_cast<int64_t>(a.workspace_bytes));
  }
  return 0;
}

int s24_gemm(int config, const void* values, const void* meta, const void* x, const float* x_scale,
             const float* w_scale, const void* bias, void* out, int m, int n, int k, int splits, int swizzle,
             void* workspace, int64_t workspace_bytes, int pdl, cudaStream_t stream) {
  if (config < 0 || config >= kNumConfigs || !kRun[config])
    return fail(-1, "config id out of range, or a search-only config this library was built without");
  S24GemmArgs a{values, meta, x, x_scale, w_scale, bias, out, m, n, k, splits, swizzle,
                workspace, static_cast<size_t>(workspace_bytes), stream, sm_count(), pdl};
  return kRun[config](&a, 0, g_err, kErrLen);
}

int s24_quant_int8(int in_dtype, const void* x, int64_t row_stride, int m, int k, int8_t* q, float* scale,
                   cudaStream_t stream) {
  if (m == 0) return 0;
  if (in_dtype == S24_BF16) {
    quant_int8_kernel<<<m, kQuantThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), row_stride, k, q, scale);
  } else if (in_dtype == S24_F16) {
    quant_int8_kernel<<<m, kQuantThreads, 0, stream>>>(static_cast<const __half*>(x), row_stride, k, q, scale);
  } else {
    return fail(-1, "quant: activations must be bfloat16 or float16");
  }
  return check_cuda("quant launch");
}

}  // extern "C"
