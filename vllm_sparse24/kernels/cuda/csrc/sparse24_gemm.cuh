// The 2:4 sparse W8A8 GEMM on Hopper: CUTLASS 3.x sm90 sparse mainloop + an epilogue visitor tree
// that applies both scales and the bias, so one kernel writes the final bf16/fp16 output.
//
// Transposed problem: the 2:4 weight is the sparse A operand (row-major [N, K], compressed), the
// activations are B ([tokens, K] row-major == column-major K x tokens), and D is column-major
// [N, tokens] == row-major [tokens, N], the layout vLLM expects. So CUTLASS's M is the layer's
// output features and CUTLASS's N the tokens:
//   D[n, t] = fma(acc[n, t] * w_scale[n], x_scale[t], bias[n])
//   w_scale, bias: Sm90ColBroadcast (vary along CUTLASS M); x_scale: Sm90RowBroadcast (along N).
//
// The CUTLASS types of a config are spelled at namespace scope (gemm_config.cu), never as member
// typedefs of a class template: nvcc 13.0 + g++ 12 fail to compile the collective builders' host
// code when they are instantiated inside a class template (seen here, 2026-11-30).
#pragma once

#include <cstdio>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "sparse24.h"

namespace sparse24 {

using namespace cute;

enum class Schedule { Ws, Pp, Coop, CoopSk };

template <class ElementIn, Schedule S>
struct ScheduleTraits;

#define S24_SCHEDULE(S, INT8_KERNEL, FP8_KERNEL, EPILOGUE, SCHEDULER)                 \
  template <class ElementIn>                                                         \
  struct ScheduleTraits<ElementIn, Schedule::S> {                                    \
    static constexpr bool kFp8 = !std::is_same_v<ElementIn, int8_t>;                 \
    using Kernel = std::conditional_t<kFp8, cutlass::gemm::FP8_KERNEL,               \
                                      cutlass::gemm::INT8_KERNEL>;                   \
    using Epilogue = cutlass::epilogue::EPILOGUE;                                    \
    using TileScheduler = SCHEDULER;                                                 \
  };
S24_SCHEDULE(Ws, KernelTmaWarpSpecialized, KernelTmaWarpSpecializedFP8FastAccum, TmaWarpSpecialized, void)
S24_SCHEDULE(Pp, KernelTmaWarpSpecializedPingpong, KernelTmaWarpSpecializedPingpongFP8FastAccum,
             TmaWarpSpecialized, cutlass::gemm::PersistentScheduler)
S24_SCHEDULE(Coop, KernelTmaWarpSpecializedCooperative, KernelTmaWarpSpecializedCooperativeFP8FastAccum,
             TmaWarpSpecializedCooperative, cutlass::gemm::PersistentScheduler)
S24_SCHEDULE(CoopSk, KernelTmaWarpSpecializedCooperative, KernelTmaWarpSpecializedCooperativeFP8FastAccum,
             TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler)
#undef S24_SCHEDULE

// The table rows (configs.inc) as plain parameter records.
template <int Id>
struct Row;
#define S24_CONFIG(ID, NAME, IN, OUT, TM_, TN_, TK_, CM_, CN_, SCHED) \
  template <>                                                         \
  struct Row<ID> {                                                    \
    using In = IN;                                                    \
    using Out = OUT;                                                  \
    static constexpr int TM = TM_, TN = TN_, TK = TK_, CM = CM_, CN = CN_; \
    static constexpr Schedule kSchedule = Schedule::SCHED;            \
    static constexpr const char* kName = #NAME;                       \
  };
#include "configs.inc"
#undef S24_CONFIG
#define S24_CONFIG(ID, ...) +1
constexpr int kNumConfigs = 0
#include "configs.inc"
    ;
#undef S24_CONFIG

// The one resident layout (values + metadata): what a tile-K-128 int8 mainloop reads.
using CanonicalMainloop = cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
    cutlass::layout::ColumnMajor, 16, int32_t, Shape<_128, _128, _128>, Shape<_1, _1, _1>,
    cutlass::gemm::collective::StageCountAuto, cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
using CanonicalSparseConfig = CanonicalMainloop::SparseConfig;

template <class SparseConfig>
constexpr bool same_metadata_layout() {
  return std::is_same_v<decltype(SparseConfig::deduce_layoutE()), decltype(CanonicalSparseConfig::deduce_layoutE())> &&
         std::is_same_v<typename SparseConfig::TensorEAtom, typename CanonicalSparseConfig::TensorEAtom>;
}

// Runs (or sizes the workspace of) one GEMM. Gemm: a GemmUniversalAdapter built from a Row.
template <class Gemm, class ElementIn, class ElementOut, Schedule kSchedule>
int run_gemm(S24GemmArgs* a, int query_workspace, char* err, size_t err_len) {
  using Mainloop = typename Gemm::GemmKernel::CollectiveMainloop;
  using SparseConfig = typename Mainloop::SparseConfig;
  static_assert(same_metadata_layout<SparseConfig>(),
                "every config must read the one resident metadata layout (tile K >= 128)");

  auto problem = cute::make_tuple(a->n, a->m, a->k, 1);  // CUTLASS (M, N, K, L) = (out, tokens, in, 1)
  auto layout_a = SparseConfig::fill_layoutA(problem);
  auto layout_e = SparseConfig::fill_layoutE(problem);
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(a->m, a->k, 1));
  auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(a->n, a->m, 1));
  using ElementE = typename Mainloop::ElementE;

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {static_cast<ElementIn const*>(a->values), layout_a, static_cast<ElementIn const*>(a->x), stride_b,
       static_cast<ElementE const*>(a->meta), layout_e},
      {{}, nullptr, stride_d, static_cast<ElementOut*>(a->out), stride_d}};
  args.epilogue.thread = {
      {{}, {a->w_scale, 0.f, {}}, {}},                               // acc * w_scale
      {a->x_scale, 0.f, {}},                                         // x_scale
      {static_cast<ElementOut const*>(a->bias), ElementOut(0), {}},  // bias (nullptr reads as 0)
      {}};
  args.hw_info.device_id = 0;
  args.hw_info.sm_count = a->sm_count;
  if constexpr (kSchedule == Schedule::CoopSk) {
    using Params = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams;
    args.scheduler.splits = a->splits;
    args.scheduler.decomposition_mode =
        a->splits > 1 ? Params::DecompositionMode::SplitK : Params::DecompositionMode::Heuristic;
    args.scheduler.max_swizzle_size = a->swizzle;
  } else if constexpr (kSchedule != Schedule::Ws) {
    args.scheduler.max_swizzle_size = a->swizzle;
  }

  cutlass::Status st = Gemm::can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    std::snprintf(err, err_len, "CUTLASS can_implement failed: %s (m=%d n=%d k=%d)",
                  cutlass::cutlassGetStatusString(st), a->m, a->n, a->k);
    return -2;
  }
  size_t need = Gemm::get_workspace_size(args);
  if (query_workspace) {
    a->workspace_bytes = need;
    return 0;
  }
  if (need > a->workspace_bytes) {
    std::snprintf(err, err_len, "workspace too small: need %zu bytes, have %zu", need, a->workspace_bytes);
    return -3;
  }
  Gemm op;
  st = op.initialize(args, a->workspace, a->stream);
  if (st != cutlass::Status::kSuccess) {
    std::snprintf(err, err_len, "CUTLASS initialize failed: %s", cutlass::cutlassGetStatusString(st));
    return -4;
  }
  st = op.run(a->stream, nullptr, a->pdl != 0);
  if (st != cutlass::Status::kSuccess) {
    std::snprintf(err, err_len, "CUTLASS run failed: %s (%s)", cutlass::cutlassGetStatusString(st),
                  cudaGetErrorString(cudaGetLastError()));
    return -5;
  }
  return 0;
}

}  // namespace sparse24
