// The Python module of the sparse24 extension: eager entry points that skip the dispatcher.
//
// On the GPU machines (H100/H200, torch 2.11.0+cu130, extension built by g++ 13.3 / nvcc 13.0, the
// process mapping libstdc++.so.6.0.33) an error message formatted with iostreams INSIDE this extension
// crashed the process (segfault): a failing multi-argument TORCH_CHECK (c10::str) in sparse24_ext.cu,
// through the dispatcher op too, and std::ostringstream in this file even with nothing thrown; the
// same code raised RuntimeError in a CPU build. Cause not found. With messages built from std::string
// only (here and in the .cu, whose TORCH_CHECKs take one string), both paths raised RuntimeError on
// the H100 (benchmarks/probe_exceptions.py, 2026-11-21). These entry points also check their arguments
// themselves, throw nothing, and return None with the message in last_error() (ext.py / linear.py
// raise it in Python).
#include <torch/extension.h>

#include <string>

namespace sparse24_ext {
bool plan_set_shape(int64_t set_id, int64_t* n, int64_t* k);
at::Tensor linear_entry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                        const c10::optional<at::Tensor>& bias, int64_t set_id);
at::Tensor decode_entry(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                        const c10::optional<at::Tensor>& bias, int64_t rows_per_block, int64_t warps,
                        int64_t meta_rows, int64_t kind);
bool decode_rows_supported(int64_t rows_per_block);
}  // namespace sparse24_ext

namespace {
constexpr int64_t kDecodeMaxM = 16, kDecodeMaxWarps = 16;

std::string g_last_error;  // written and read under the GIL (pybind holds it)

void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
void append(std::string& s, int64_t v) { s += std::to_string(v); }
void append(std::string& s, int v) { s += std::to_string(v); }
void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
void append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}

// false (and the message in g_last_error) when ok is false
template <typename... Args>
bool require(bool ok, const char* where, const Args&... parts) {
  if (ok) return true;
  std::string msg = std::string("sparse24_ext.") + where + ": ";
  (append(msg, parts), ...);
  g_last_error = msg;
  return false;
}

bool check_common(const char* where, const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws, int64_t n,
                  int64_t k, const c10::optional<at::Tensor>& bias) {
  return require(x.is_cuda() && x.dim() == 2 && x.size(1) == k && x.stride(1) == 1, where,
                 "x must be a CUDA [M, ", k, "] tensor with unit stride in K, got ", x.sizes()) &&
         require(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, where,
                 "x must be bfloat16 or float16, got ", x.scalar_type()) &&
         require(w.is_cuda() && w.scalar_type() == at::kChar && w.is_contiguous() && w.numel() >= n * k * 5 / 8,
                 where, "w_cslt must be a contiguous CUDA int8 buffer of >= ", n * k * 5 / 8, " bytes (N=", n,
                 ", K=", k, ")") &&
         require(ws.is_cuda() && ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.numel() == n, where,
                 "w_scale must be a contiguous CUDA float32 [", n, "]") &&
         require(!bias.has_value() || !bias->defined() || (bias->is_cuda() && bias->numel() == n), where,
                 "bias must be a CUDA tensor of N=", n, " elements");
}

// None on bad arguments (message: last_error())
pybind11::object linear_py(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                           const c10::optional<at::Tensor>& bias, int64_t set_id) {
  int64_t n = 0, k = 0;
  if (!require(sparse24_ext::plan_set_shape(set_id, &n, &k), "linear", "unknown plan set ", set_id) ||
      !check_common("linear", x, w, ws, n, k, bias))
    return pybind11::none();
  return pybind11::cast(sparse24_ext::linear_entry(x, w, ws, bias, set_id));
}

pybind11::object decode_py(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                           const c10::optional<at::Tensor>& bias, int64_t rows_per_block, int64_t warps,
                           int64_t meta_rows, int64_t kind) {
  const int64_t n = ws.numel(), k = x.dim() == 2 ? x.size(1) : -1;
  const bool ok =
      check_common("decode", x, w, ws, n, k, bias) &&
      require(x.size(0) >= 1 && x.size(0) <= kDecodeMaxM, "decode", "needs 1 <= M <= ", kDecodeMaxM, ", got ",
              x.size(0)) &&
      require(kind == 0 || kind == 1, "decode", "kind must be 0 (dense mma) or 1 (mma.sp), got ", kind) &&
      require(warps >= 1 && warps <= kDecodeMaxWarps, "decode", "warps must be 1..", kDecodeMaxWarps, ", got ", warps) &&
      require(sparse24_ext::decode_rows_supported(rows_per_block) && n % rows_per_block == 0 &&
                  k % 64 == 0 && meta_rows > 0 && meta_rows % 16 == 0 && n % meta_rows == 0,
              "decode", "N=", n, " K=", k, " do not fit rows_per_block=", rows_per_block, " meta_rows=", meta_rows);
  if (!ok) return pybind11::none();
  return pybind11::cast(sparse24_ext::decode_entry(x, w, ws, bias, rows_per_block, warps, meta_rows, kind));
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("linear", &linear_py, "sparse24 2:4 linear (same as torch.ops.sparse24_ext.linear)");
  mod.def("decode", &decode_py, "the M <= 16 W8A16 kernels alone (same as torch.ops.sparse24_ext.decode)");
  mod.def("last_error", [] { return g_last_error; }, "why the last call of this thread returned None");
}
