// C ABI of libsparse24 (called from Python through ctypes, see ../lib.py). No torch, no exceptions
// across the boundary: every function returns 0 on success or a negative code, and
// s24_last_error() holds the message of the last failure on the calling thread.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

// Element types, as passed by Python.
enum S24Dtype : int { S24_INT8 = 0, S24_E4M3 = 1, S24_BF16 = 2, S24_F16 = 3 };

// One GEMM call: out[t, n] = (sum_k x[t, k] * W[n, k]) * w_scale[n] * x_scale[t] + bias[n]
// with W the 2:4 weight held as (values, meta) in CUTLASS's sm90 compressed layout.
struct S24GemmArgs {
  const void* values;    // [n, k/2] compressed weight values (int8 or e4m3)
  const void* meta;      // CUTLASS sm90 metadata of the same weight
  const void* x;         // [m, k] quantized activations, row-major, contiguous
  const float* x_scale;  // [m] per-token scale
  const float* w_scale;  // [n] per-output-channel scale
  const void* bias;      // [n] in the output dtype, or nullptr
  void* out;             // [m, n] row-major, output dtype
  int m, n, k;
  int splits;            // split-K factor for stream-K configs (1: the scheduler's heuristic)
  int swizzle;           // max tile-raster swizzle for persistent configs (1, 2, 4, 8)
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
  int sm_count;
  // Launch with programmatic stream serialization: the GEMM's CTAs become resident and run their
  // prologue while the previous kernel in the stream finishes; the kernel waits for that kernel's
  // results (griddepcontrol.wait, compiled in with CUTLASS_ENABLE_GDC_FOR_SM90) before its first
  // global load. 0: an ordinary launch.
  int pdl;
};

namespace sparse24 {
// Defined once per config id in gemm_config.cu (one translation unit each): runs the GEMM, or with
// query_workspace != 0 only stores the workspace it needs in args->workspace_bytes.
template <int Id>
int run_config(S24GemmArgs* args, int query_workspace, char* err, size_t err_len);
}  // namespace sparse24

extern "C" {
int s24_abi_version();
int s24_num_configs();
const char* s24_config_name(int id);
const char* s24_last_error();
// Bytes of the compressed values and of the metadata for an [n, k] 2:4 weight.
int s24_compressed_bytes(int n, int k, int64_t* values_bytes, int64_t* meta_bytes);
// dense [n, k] (2:4 pattern, 8-bit dtype) -> values + meta, on the GPU.
int s24_compress(int dtype, const void* dense, void* values, void* meta, int n, int k, cudaStream_t stream);
// Workspace a GEMM call needs (the largest over the swizzle values 1, 2, 4, 8).
int s24_workspace_bytes(int config, int m, int n, int k, int splits, int64_t* bytes);
int s24_gemm(int config, const void* values, const void* meta, const void* x, const float* x_scale,
             const float* w_scale, const void* bias, void* out, int m, int n, int k, int splits, int swizzle,
             void* workspace, int64_t workspace_bytes, int pdl, cudaStream_t stream);
// Dynamic per-token int8 quantization, bit-identical to vllm_sparse24/quant.py:
// scale = max(absmax * float(1/127), 1e-12), q = clamp(rint(x / scale), -127, 127).
int s24_quant_int8(int in_dtype, const void* x, int64_t row_stride, int m, int k, int8_t* q, float* scale,
                   cudaStream_t stream);
}
