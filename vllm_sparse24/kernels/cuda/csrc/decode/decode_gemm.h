// C ABI of the few-token decode GEMM (decode_gemm.cu), linked into libsparse24 beside the CUTLASS
// GEMMs and read through ctypes (../../lib.py). Same math and operands as s24_gemm (sparse24.h):
//   out[t, n] = bf16/fp16( fma(float(acc[t, n]) * w_scale[n], x_scale[t], bias[n]) )
// with acc the int32 (int8) or float32 (e4m3) dot product of the quantized activations and the
// resident 2:4 weight (values + metadata in CUTLASS's sm90 layout, see layout.h).
// Every function returns 0 or a negative code; s24_decode_last_error() holds the message.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

extern "C" {
// Largest token count the decode kernel serves.
int s24_decode_max_m();
const char* s24_decode_last_error();
// Bytes of the workspace that lets a call at up to m tokens split K across CTAs as it prefers (layers
// with few output rows). The caller allocates it ZEROED once; every call leaves its tickets zeroed
// again (graph replays need no memset). One workspace must not serve two launches that run
// concurrently on different streams. A call given less (or none) picks a split that fits (or none).
int s24_decode_workspace_bytes(int m, int n, int k, int64_t* bytes);
// in_dtype: S24_INT8 or S24_E4M3 (values and x); out_dtype: S24_BF16 or S24_F16 (out and bias).
// x: [m, k] rows x_row_stride bytes apart (a multiple of 16), 16-byte aligned. k % 128 == 0.
int s24_decode_gemm(int in_dtype, int out_dtype, const void* values, const void* meta, const void* x,
                    int64_t x_row_stride, const float* x_scale, const float* w_scale, const void* bias,
                    void* out, int m, int n, int k, void* workspace, int64_t workspace_bytes,
                    cudaStream_t stream);
// The cross-CTA K split a call with these arguments uses (1 = none); for benchmarks and tests.
int s24_decode_splits(int m, int n, int k, int64_t workspace_bytes);
}
