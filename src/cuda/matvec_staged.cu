// cuda.staged: the tensor-core decode matvecs of matvec_mma.cu with the weights staged in shared
// memory by asynchronous copies (cp.async, 16 bytes a thread) several stages ahead instead of
// loaded into registers, for the same ops (matvec, matvec_multi, output_projection, mlp_block),
// f16/bf16 activations, batch 1..16.
//
// Why: in cuda.mma the bytes in flight are bounded by registers. Each lane holds the units it
// has loaded until it multiplies them, 127 registers a thread leave room for two blocks per SM,
// and every warp loads and then multiplies in turn, so HBM idles while the SM computes (ncu,
// MLX q4 4096 x 14336: DRAM 35% busy, a third of the stalls waiting on loads). Copies in flight
// here cost shared memory, not registers, and loading overlaps the multiply. The multiply is
// cuda.mma's (matvec_mma.cuh), reading each unit from the stage. (A version with the copy
// engine's bulk copies, one per row segment, was measured only while the accumulators were in
// local memory, so how it compares is not known: docs/perf/NOTES.md.)
//
// Layout: a block owns a tile of 16 rows. A stage holds kStageUnits units of each of the 16 rows
// (the rows of every part for the MLP), the block's threads copying it in 16-byte pieces. Warp w
// multiplies units 4w..4w+3 of the stage, lane (g, t) unit 4w + t of rows g and g + 8. MLX's
// scales and biases for the whole tile come once, with the first stage. Rows past the matrix
// repeat its last row. Stages cycle through kStages buffers: stage c lands in buffer c % kStages,
// and the copies of stage c + kStages - 1 start once every warp is done with stage c - 1.
#include "cuda/cuda.h"
#include "cuda/matvec_mma.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kStageUnits = kWarps * 4;  // units of each row per stage: one per lane of a row's four
static_assert(kStageUnits == kStagedUnits && kTileRows == kStagedTileRows, "the plan supports() checks (cuda.h)");
constexpr int kMinBlocks = 2;

// Shared memory for one block's stages: two blocks per SM keep up to 2 x kStagedBudget (40 KB) in
// flight, past what HBM's latency times its bandwidth asks of an SM (~4.4 TB/s x ~1 us / 132 = 33 KB).
template <class M, int kParts>
struct StagePlan {
  static constexpr int64_t kRowBytes = int64_t(kStageUnits) * M::kUnitBytes;
  static constexpr int64_t kPartBytes = kTileRows * kRowBytes;
  static constexpr int64_t kStageBytes = kParts * kPartBytes;
  static constexpr int kStages = staged_stages(kStageBytes);
};

// ------------------------------------------------------------------------------------------------
// The kernel.

// kParts = 1: the tile's rows of the job that holds it. kParts = 2 (the MLP): the same rows of
// jobs 0 (gate) and 1 (up), silu(gate) * up stored into job 0's y. kNTiles: 8 inputs of the batch each.
template <class M, class T, int kNTiles, int kParts>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) matvec_staged_kernel(Jobs<M, T> jobs, const T* __restrict__ x,
                                                                             int64_t k, int batch) {
  using Plan = StagePlan<M, kParts>;
  constexpr int kStages = Plan::kStages;
  extern __shared__ __align__(16) uint8_t smem[];  // kStages stage buffers, then the side arrays
  __shared__ float partial[kWarps][kParts * kNTiles * 4][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;

  int job;
  int64_t row0, n;
  find_tile<kParts>(jobs, blockIdx.x, job, row0, n);
  const int64_t stages = k / (kStageUnits * M::kUnit);  // supports(): K is a whole number of stages
  const int64_t tile_side = jobs.m[job].side_bytes(kTileRows);  // per side array, as laid out
  uint8_t* side = smem + kStages * Plan::kStageBytes;          // [kParts][M::kSideArrays][tile_side]

  // Every thread copies its share of stage c into the stage's buffer, with stage 0 the tile's side
  // arrays, and commits them as one group (an empty group past the last stage keeps the count).
  const auto issue = [&](int64_t c) {
    if (c < stages) {
      uint8_t* buffer = smem + (c % kStages) * Plan::kStageBytes;
      constexpr int kPieces = int(Plan::kRowBytes / 16);  // 16-byte pieces of a row's segment
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        const M& m = jobs.m[job + p];
        for (int i = threadIdx.x; i < kTileRows * kPieces; i += kWarps * 32) {
          const int r = i / kPieces, piece = i % kPieces;
          const int64_t row = row0 + r < n ? row0 + r : n - 1;
          copy_async<16>(buffer + p * Plan::kPartBytes + r * Plan::kRowBytes + piece * 16,
                       m.unit_ptr(row, c * kStageUnits) + piece * 16);
        }
        const int64_t side_copy = m.side_bytes(n - row0 < kTileRows ? n - row0 : kTileRows);
        for (int a = 0; a < M::kSideArrays && c == 0; ++a) {
          for (int64_t i = threadIdx.x; i < side_copy / 16; i += kWarps * 32) {
            copy_async<16>(side + (p * M::kSideArrays + a) * tile_side + i * 16, m.side_ptr(a, row0) + i * 16);
          }
        }
      }
    }
    commit_copies();
  };
  for (int c = 0; c < kStages - 1; ++c) issue(c);

  using Staged = decltype(jobs.m[0].staged(smem, kStageUnits, side, 0, kTileRows));  // M over a stage
  MmaAccumulators<kParts, kNTiles> acc = {};
  const int u = warp * 4 + t;  // this lane's unit in every stage
  // x comes through L1 from L2, one unit a lane per stage: loaded a stage ahead, so that its round
  // trip overlaps the stage before. (Measured only as part of the whole kernel: docs/perf/NOTES.md.)
  XPairs<Staged, T, kNTiles> b_next;
  load_x_unit<Staged, T, kNTiles>(x, k, batch, u, true, g, b_next);
  for (int64_t c = 0; c < stages; ++c) {
    XPairs<Staged, T, kNTiles> b;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < Staged::kUnit / 2; ++e) b[nt][e] = b_next[nt][e];
    }
    if (c + 1 < stages) load_x_unit<Staged, T, kNTiles>(x, k, batch, (c + 1) * kStageUnits + u, true, g, b_next);
    wait_copies<kStages - 2>();  // this thread's copies of stage c have landed
    __syncthreads();             // everyone's have, and every warp is done with stage c - 1's buffer
    issue(c + kStages - 1);      // into that buffer
    const uint8_t* buffer = smem + (c % kStages) * Plan::kStageBytes;
    Staged m[kParts];
    typename Staged::Raw raw[kParts][2];
#pragma unroll
    for (int p = 0; p < kParts; ++p) {
      m[p] = jobs.m[job + p].staged(buffer + p * Plan::kPartBytes, kStageUnits, side + p * M::kSideArrays * tile_side,
                                    c * kStageUnits, kTileRows);
      raw[p][0] = m[p].load(g, u);
      raw[p][1] = m[p].load(g + 8, u);
    }
    mma_unit<Staged, T, kNTiles, kParts>(m, raw, b, true, 0, acc);  // a constant chain: acc stays in registers
  }
  wait_copies<0>();  // no copy may still be landing when the block's shared memory is reused
  reduce_and_store<kWarps, kParts, kNTiles>(jobs, job, n, row0, batch, acc, partial);
}

// ------------------------------------------------------------------------------------------------
// Host side.

struct StagedLauncher {
  template <int kNTiles, int kParts, class M, class T>
  static void launch(const Jobs<M, T>& jobs, const T* x, int64_t k, int batch, cudaStream_t s, const char* op) {
    using Plan = StagePlan<M, kParts>;
    constexpr auto kernel = matvec_staged_kernel<M, T, kNTiles, kParts>;
    // Past 48 KB a kernel's dynamic shared memory must be allowed explicitly (once per device).
    check_launch(allow_dynamic_smem<kernel>(int(kStagedSharedLimit)), op);
    const int64_t bytes =
        Plan::kStages * Plan::kStageBytes + kParts * M::kSideArrays * jobs.m[0].side_bytes(kTileRows);
    kernel<<<tile_count<kParts>(jobs), kWarps * 32, size_t(bytes), s>>>(jobs, x, k, batch);
    check_launch(cudaGetLastError(), op);
  }
};
using StagedTensorCoreMatvec = TensorCoreFamily<StagedLauncher>;

}  // namespace

void matvec_staged(const MatvecArgs& a) { run_matvec<StagedTensorCoreMatvec>(a); }
void matvec_multi_staged(const MatvecMultiArgs& a) { run_matvec_multi<StagedTensorCoreMatvec>(a); }
void output_projection_staged(const OutputProjectionArgs& a) { run_output_projection<StagedTensorCoreMatvec>(a); }
void mlp_block_staged(const MlpBlockArgs& a) { run_mlp_block<StagedTensorCoreMatvec>(a); }

}  // namespace decodelab::cuda
