// C ABI of the few-token decode GEMM (decode_gemm.cu), linked into libsparse24 beside the CUTLASS
// GEMMs and read through ctypes (../../lib.py). Same math and operands as s24_gemm (sparse24.h):
//   out[t, n] = bf16/fp16( fma(float(acc[t, n]) * w_scale[n], x_scale[t], bias[n]) )
// with acc the int32 (int8) or float32 (e4m3) dot product of the quantized activations and the
// resident 2:4 weight (values + metadata in CUTLASS's sm90 layout, see layout.h).
// Every function returns 0 or a negative code; s24_decode_last_error() holds the message.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

// Weight dtype of the int4 variant (w4a8 2:4: int4 values + uint8 group scales, int8 activations),
// beside S24Dtype's codes (sparse24.h, whose bytes key the CUTLASS objects' build cache: declared
// here, only the decode unit recompiles).
enum : int { S24_INT4 = 4 };

extern "C" {
// Launch knobs; a null pointer means the defaults (0 fields too): as many pipeline stages as the
// shared memory holds, one CTA per SM, programmatic dependent launch on.
struct S24DecodeTuning {
  int stages;       // shared-memory ring depth (work units), 0 = as many as fit
  int ctas;         // persistent CTAs, 0 = one per SM (capped at the work units and 2 per SM)
  int pdl;          // 1: launch with programmatic stream serialization (overlaps the previous kernel's tail)
  int unit_blocks;  // 128-k blocks per work unit (64 rows x 128 unit_blocks k; one ring stage): 4 or 8, 0 = 4
};
// Largest token count the decode kernel serves.
int s24_decode_max_m();
const char* s24_decode_last_error();
// Bytes of the workspace every call needs (tickets + partial sums of row tiles split across CTAs).
// The caller allocates it ZEROED once; every call leaves its tickets zeroed again (graph replays
// need no memset). One workspace must not serve two launches that run concurrently on different
// streams.
int s24_decode_workspace_bytes(int m, int n, int k, int64_t* bytes);
// The work partition of an [n, k] layer on `sms` SMs (0: this GPU's) with units of 64 rows x 128
// unit_blocks k (0: the default, 4): the units, the persistent CTAs that share them, and the units
// per 64-row tile. For benchmarks and tests.
int s24_decode_partition(int n, int k, int sms, int unit_blocks, int* units, int* ctas, int* units_per_tile);
// in_dtype: the weight's: S24_INT8 or S24_E4M3 (values and x of that dtype, k % 128 == 0), or
// S24_INT4 (values and group_scale in layout.h's int4 layout, x int8, k % 64 == 0); group_scale is
// null for the 8-bit weights. out_dtype: S24_BF16 or S24_F16 (out and bias). x: [m, k] rows
// x_row_stride bytes apart (a multiple of 16), 16-byte aligned. meta: CUTLASS's sm90 metadata.
int s24_decode_gemm(int in_dtype, int out_dtype, const void* values, const void* meta, const void* group_scale,
                    const void* x, int64_t x_row_stride, const float* x_scale, const float* w_scale,
                    const void* bias, void* out, int m, int n, int k, void* workspace, int64_t workspace_bytes,
                    const S24DecodeTuning* tuning, cudaStream_t stream);
// Bytes of the int4 layout (layout.h) of an [n, k] w4a8 2:4 weight: values and group scales.
int s24_decode_int4_bytes(int n, int k, int64_t* values_bytes, int64_t* scale_bytes);
// The int4 layout -> the 8-bit layout's values (int8 codes, [n, k/2], value_offset), on the GPU, so
// that the int8 CUTLASS GEMM can run on them with the same metadata (the prefill path).
int s24_decode_unpack_int4(const void* values, const void* group_scale, void* out, int n, int k,
                           cudaStream_t stream);
}
