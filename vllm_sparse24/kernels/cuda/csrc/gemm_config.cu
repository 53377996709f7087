// One row of configs.inc, compiled on its own (nvcc -DS24_CONFIG_ID=<id>): a CUTLASS sm90 sparse
// GEMM takes ~100 s and ~5 GB to compile, so each config is its own translation unit. api.cu only
// declares run_config<Id>; the explicit instantiation at the end provides this row's symbol.
#include "sparse24_gemm.cuh"

#ifndef S24_CONFIG_ID
#error "compile with -DS24_CONFIG_ID=<id of a configs.inc row>"
#endif

namespace sparse24 {
namespace {
using R = Row<S24_CONFIG_ID>;
using ElementIn = R::In;
using ElementOut = R::Out;
using ElementAcc = std::conditional_t<std::is_same_v<ElementIn, int8_t>, int32_t, float>;
using TileShape = Shape<Int<R::TM>, Int<R::TN>, Int<R::TK>>;
using ClusterShape = Shape<Int<R::CM>, Int<R::CN>, _1>;
using Traits = ScheduleTraits<ElementIn, R::kSchedule>;
constexpr int kAlignIn = 128 / cutlass::sizeof_bits<ElementIn>::value;
constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// Epilogue visitor tree: fma(acc * w_scale[n], x_scale[t], bias[n]) -> ElementOut.
using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
using WScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float>;
using XScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float>;
using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, ElementOut, float>;
using AccTimesWScale = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, Acc, WScale>;
using Evt = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, float, kRound>,
    AccTimesWScale, XScale, Bias>;

using CollectiveEpilogue = cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
    void, cutlass::layout::ColumnMajor, kAlignOut,        // no source tensor C
    ElementOut, cutlass::layout::ColumnMajor, kAlignOut,  // D: [N, tokens] column-major
    Traits::Epilogue, Evt>::CollectiveOp;

using CollectiveMainloop = cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
    ElementIn, cutlass::layout::RowMajor, kAlignIn,       // A: the 2:4 weight
    ElementIn, cutlass::layout::ColumnMajor, kAlignIn,    // B: the activations
    ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(CollectiveEpilogue::SharedStorage))>,
    Traits::Kernel>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                    CollectiveEpilogue, Traits::TileScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
}  // namespace

template <int Id>
int run_config(S24GemmArgs* args, int query_workspace, char* err, size_t err_len) {
  return run_gemm<Gemm, ElementIn, ElementOut, R::kSchedule>(args, query_workspace, err, err_len);
}
template int run_config<S24_CONFIG_ID>(S24GemmArgs*, int, char*, size_t);
}  // namespace sparse24
