// cuda.tma: the tensor-core decode matvecs of matvec_mma.cu with the weights staged in shared
// memory by the copy engine (cp.async.bulk completing on an mbarrier) instead of loaded into
// registers, for the same ops (matvec, matvec_multi, output_projection, mlp_block), f16/bf16
// activations, batch 1..16.
//
// Why: in cuda.mma the bytes in flight are bounded by registers. Each lane holds the units it
// has loaded until it multiplies them, 143 registers a thread left room for two blocks per SM,
// and every warp loads and then multiplies in turn, so HBM idles while the SM computes (ncu,
// MLX q4 4096 x 14336: DRAM 25% busy, SM 34%, a third of the stalls waiting on loads). Here one
// thread asks the copy engine for whole row segments several stages ahead. Bytes in flight cost
// shared memory, not registers, and loading overlaps the multiply. The multiply is cuda.mma's
// (matvec_mma.cuh), reading each unit from the stage.
//
// Layout: a block owns a tile of 16 rows. A stage holds kStageUnits units of each of the 16 rows
// (the rows of every part for the MLP), each row's segment one bulk copy. Warp w multiplies units
// 4w..4w+3 of the stage, lane (g, t) unit 4w + t of rows g and g + 8. MLX's scales and biases for
// the whole tile come once, with the first stage. Rows past the matrix repeat its last row.
// Stages cycle through kStages buffers: stage c is copied into buffer c % kStages and waited on
// with parity (c / kStages) % 2, and the buffer is refilled with stage c + kStages once every warp
// has passed the block barrier after multiplying it.
#include "cuda/cuda.h"
#include "cuda/matvec_mma.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kStageUnits = kWarps * 4;  // units of each row per stage: one per lane of a row's four
static_assert(kStageUnits == kTmaStageUnits && kTileRows == kTmaTileRows, "the plan supports() checks (cuda.h)");
constexpr int kMinBlocks = 2;

// Shared memory for one block's stages: two blocks per SM keep up to 2 x kTmaStageBudget (40 KB) in
// flight, past what HBM's latency times its bandwidth asks of an SM (~4.4 TB/s x ~1 us / 132 = 33 KB).
template <class M, int kParts>
struct StagePlan {
  static constexpr int64_t kRowBytes = int64_t(kStageUnits) * M::kUnitBytes;
  static constexpr int64_t kPartBytes = kTileRows * kRowBytes;
  static constexpr int64_t kStageBytes = kParts * kPartBytes;
  static constexpr int kStages = tma_stages(kStageBytes);
};

// ------------------------------------------------------------------------------------------------
// The copy engine and the mbarrier (PTX ISA: cp.async.bulk, mbarrier).

__device__ __forceinline__ uint32_t shared_address(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// An mbarrier expecting one arrival per phase (the thread that issues the copies).
__device__ __forceinline__ void barrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(bar)) : "memory");
}
// Makes the initialized barriers visible to the copy engine and the other threads.
__device__ __forceinline__ void barrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// Arrives and adds `bytes` to the phase's pending transfer: the phase completes when they landed.
__device__ __forceinline__ void barrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}

// `bytes` (a multiple of 16, both ends 16-byte aligned) from global memory into shared memory,
// counted on `bar` when they land.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   shared_address(dst)),
               "l"(src), "r"(bytes), "r"(shared_address(bar))
               : "memory");
}

// Waits until the phase of `bar` with this parity has completed.
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n"
      "}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
}

// ------------------------------------------------------------------------------------------------
// The kernel.

// kParts = 1: the tile's rows of the job that holds it. kParts = 2 (the MLP): the same rows of
// jobs 0 (gate) and 1 (up), silu(gate) * up stored into job 0's y. kNTiles: 8 inputs of the batch each.
template <class M, class T, int kNTiles, int kParts>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) matvec_tma_kernel(Jobs<M, T> jobs, const T* __restrict__ x,
                                                                             int64_t k, int batch) {
  using Plan = StagePlan<M, kParts>;
  constexpr int kStages = Plan::kStages;
  extern __shared__ __align__(16) uint8_t smem[];  // kStages stage buffers, then the side arrays
  __shared__ uint64_t full[kStages];
  __shared__ float partial[kWarps][kParts * kNTiles * 4][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;

  int job;
  int64_t row0, n;
  find_tile<kParts>(jobs, blockIdx.x, job, row0, n);
  const int64_t stages = k / (kStageUnits * M::kUnit);  // supports(): K is a whole number of stages
  const int64_t tile_side = jobs.m[job].side_bytes(kTileRows);  // per side array, as laid out
  uint8_t* side = smem + kStages * Plan::kStageBytes;          // [kParts][M::kSideArrays][tile_side]

  // Issued by thread 0: stage c into its buffer, with stage 0 the tile's side arrays.
  const auto issue = [&](int64_t c) {
    uint8_t* buffer = smem + (c % kStages) * Plan::kStageBytes;
    uint64_t* bar = &full[c % kStages];
    const int64_t side_copy = jobs.m[job].side_bytes(n - row0 < kTileRows ? n - row0 : kTileRows);
    barrier_expect_bytes(bar, uint32_t(Plan::kStageBytes + (c == 0 ? kParts * M::kSideArrays * side_copy : 0)));
    for (int p = 0; p < kParts; ++p) {
      const M m = jobs.m[job + p];
      for (int r = 0; r < kTileRows; ++r) {
        const int64_t row = row0 + r < n ? row0 + r : n - 1;
        bulk_copy(buffer + p * Plan::kPartBytes + r * Plan::kRowBytes, m.unit_ptr(row, c * kStageUnits),
                  uint32_t(Plan::kRowBytes), bar);
      }
      for (int a = 0; a < M::kSideArrays && c == 0; ++a) {
        bulk_copy(side + (p * M::kSideArrays + a) * tile_side, m.side_ptr(a, row0), uint32_t(side_copy), bar);
      }
    }
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) barrier_init(&full[s]);
    barrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int64_t c = 0; c < kStages && c < stages; ++c) issue(c);
  }

  MmaAccumulators<kParts, kNTiles> acc = {};
  const int u = warp * 4 + t;  // this lane's unit in every stage
  for (int64_t c = 0; c < stages; ++c) {
    barrier_wait(&full[c % kStages], uint32_t(c / kStages) & 1);
    const uint8_t* buffer = smem + (c % kStages) * Plan::kStageBytes;
    using Staged = decltype(jobs.m[0].staged(buffer, kStageUnits, side, 0, kTileRows));
    Staged m[kParts];
    typename Staged::Raw raw[kParts][2];
#pragma unroll
    for (int p = 0; p < kParts; ++p) {
      m[p] = jobs.m[job + p].staged(buffer + p * Plan::kPartBytes, kStageUnits, side + p * M::kSideArrays * tile_side,
                                    c * kStageUnits, kTileRows);
      raw[p][0] = m[p].load(g, u);
      raw[p][1] = m[p].load(g + 8, u);
    }
    mma_unit<Staged, T, kNTiles, kParts>(m, raw, x, k, batch, c * kStageUnits + u, true, g, int(c % kChains), acc);
    __syncthreads();  // every warp is done with this buffer
    if (threadIdx.x == 0 && c + kStages < stages) issue(c + kStages);
  }
  reduce_and_store<kWarps, kParts, kNTiles>(jobs, job, n, row0, batch, acc, partial);
}

// ------------------------------------------------------------------------------------------------
// Host side.

template <int kNTiles, int kParts, class M, class T>
void launch(const Jobs<M, T>& jobs, const T* x, int64_t k, int batch, cudaStream_t s, const char* op) {
  using Plan = StagePlan<M, kParts>;
  const auto kernel = matvec_tma_kernel<M, T, kNTiles, kParts>;
  // Past 48 KB a kernel's dynamic shared memory must be allowed explicitly, once.
  static const cudaError_t allowed =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kTmaSharedLimit));
  check_launch(allowed, op);
  const int64_t bytes = Plan::kStages * Plan::kStageBytes + kParts * M::kSideArrays * jobs.m[0].side_bytes(kTileRows);
  kernel<<<tile_count<kParts>(jobs), kWarps * 32, size_t(bytes), s>>>(jobs, x, k, batch);
  check_launch(cudaGetLastError(), op);
}

template <int kParts, class T>
void run_typed(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
               Stream stream, const char* op) {
  dispatch_format<T>(w[0], [&](auto make) {
    using M = decltype(make(w[0]));
    const Jobs<M, T> jobs = make_jobs<M, T>(make, w, y, residual, kParts == 2);
    const int batch = int(x.dim(0));
    const cudaStream_t s = stream_of(stream);
    if (batch <= 8) return launch<1, kParts>(jobs, x.ptr<const T>(), x.dim(1), batch, s, op);
    return launch<2, kParts>(jobs, x.ptr<const T>(), x.dim(1), batch, s, op);
  });
}

// The kernel family of the matvec ops (matvec_formats.cuh): f16 and bf16 activations only.
struct StagedTensorCoreMatvec {
  template <int kParts>
  static void run(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                  Stream stream, const char* op) {
    if (x.dtype == DType::f16) return run_typed<kParts, __half>(x, w, y, residual, stream, op);
    run_typed<kParts, __nv_bfloat16>(x, w, y, residual, stream, op);  // supports() admits only f16 and bf16
  }
};

}  // namespace

void matvec_tma(const MatvecArgs& a) { run_matvec<StagedTensorCoreMatvec>(a); }
void matvec_multi_tma(const MatvecMultiArgs& a) { run_matvec_multi<StagedTensorCoreMatvec>(a); }
void output_projection_tma(const OutputProjectionArgs& a) { run_output_projection<StagedTensorCoreMatvec>(a); }
void mlp_block_tma(const MlpBlockArgs& a) { run_mlp_block<StagedTensorCoreMatvec>(a); }

}  // namespace decodelab::cuda
