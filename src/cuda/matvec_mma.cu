// cuda.mma: the decode matvecs on the tensor cores, for f16 and bf16 activations over dense
// weights of the same dtype or quantized ones (MLX affine 4/8-bit, GGUF Q4_0/Q8_0), batch 1..16,
// with matvec_multi, output_projection and mlp_block on the same kernel as in matvec.cu.
//
// Why: the CUDA-core kernel spends about four instructions per weight (place the code, dequantize,
// widen x, multiply-add) and as many again per extra input of the batch, which a 4-bit weight
// stream at HBM speed cannot afford. Here the weights become 16-bit operands in packed pairs (a
// LOP3, a subtraction and a multiply-add per two 4-bit codes, mma.cuh) and one mma.m16n8k16
// multiplies 16 rows by up to 8 inputs of the batch, so the batch is nearly free.
//
// Layout of the work (the shared pieces are in matvec_mma.cuh): a block owns a tile of 16 rows
// and its warps split K between them (chunks of 4 units, interleaved, so the block streams each row
// contiguously). Lane (g, t) loads unit 4c + t of chunk c for rows g and g + 8 of the tile: the four
// lanes of a row read consecutive units.
#include "cuda/cuda.h"
#include "cuda/matvec_mma.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 8;  // per 16-row tile: enough loads in flight for N = 4096 on 132 SMs
// Two blocks per SM (at most 128 registers a thread): one block of 8 warps cannot hide the load
// latency (measured on the H200: MLX q4 at 4096 x 14336 took 27 us at one block, 20 us at two).
constexpr int kMinBlocks = 2;

// kParts = 1: the tile's rows of the job that holds it. kParts = 2 (the MLP): the same rows of
// jobs 0 (gate) and 1 (up), silu(gate) * up stored into job 0's y. kNTiles: 8 inputs of the batch each.
template <class M, class T, int kNTiles, int kParts>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) matvec_mma_kernel(Jobs<M, T> jobs, const T* __restrict__ x, int64_t k,
                                                                 int batch) {
  constexpr int kUnit = M::kUnit, kUnroll = M::kUnroll > kParts ? M::kUnroll / kParts : 1;
  __shared__ float partial[kWarps][kParts * kNTiles * 4][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;

  int job;
  int64_t row0, n;
  find_tile<kParts>(jobs, blockIdx.x, job, row0, n);
  // Rows past the matrix repeat its last row: read, never stored.
  const int64_t rows[2] = {row0 + g < n ? row0 + g : n - 1, row0 + g + 8 < n ? row0 + g + 8 : n - 1};
  const int64_t units = k / kUnit, chunks = (units + 3) / 4;
  const JobFormats<M, T> m{jobs, job};

  MmaAccumulators<kParts, kNTiles> acc = {};
  using Raw = typename M::Raw[kUnroll][kParts][2];
  // This lane's units of chunks c0, c0 + kWarps, ... (kUnroll of them), for rows g and g + 8.
  const auto load = [&](Raw& raw, int64_t c0) {
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t u = (c0 + i * kWarps) * 4 + t;
      if (u >= units) continue;
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        raw[i][p][0] = m[p].load(rows[0], u);
        raw[i][p][1] = m[p].load(rows[1], u);
      }
    }
  };
  const auto multiply = [&](const Raw& raw, int64_t c0) {
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t c = c0 + i * kWarps;
      if (c >= chunks) break;  // the same for the whole warp
      const int64_t u = c * 4 + t;
      const bool live = u < units;  // the last chunk may hold fewer than 4 units
      XPairs<M, T, kNTiles> b;
      load_x_unit<M, T, kNTiles>(x, k, batch, u, live, g, b);
      mma_unit<M, T, kNTiles, kParts>(m, raw[i], b, live, i * (kUnit / 4), acc);
    }
  };
  constexpr int64_t kStride = kWarps * kUnroll;
  // (A register double buffer, the next chunks' loads issued before these are multiplied, measured
  // no faster on the H200 and costs registers.)
  for (int64_t c0 = warp; c0 < chunks; c0 += kStride) {
    Raw raw;
    load(raw, c0);
    multiply(raw, c0);
  }
  reduce_and_store<kWarps, kParts, kNTiles>(jobs, job, n, row0, batch, acc, partial);
}

struct MmaLauncher {
  template <int kNTiles, int kParts, class M, class T>
  static void launch(const Jobs<M, T>& jobs, const T* x, int64_t k, int batch, cudaStream_t s, const char* op) {
    matvec_mma_kernel<M, T, kNTiles, kParts><<<tile_count<kParts>(jobs), kWarps * 32, 0, s>>>(jobs, x, k, batch);
    check_launch(cudaGetLastError(), op);
  }
};
using TensorCoreMatvec = TensorCoreFamily<MmaLauncher>;

}  // namespace

void matvec_mma(const MatvecArgs& a) { run_matvec<TensorCoreMatvec>(a); }
void matvec_multi_mma(const MatvecMultiArgs& a) { run_matvec_multi<TensorCoreMatvec>(a); }
void output_projection_mma(const OutputProjectionArgs& a) { run_output_projection<TensorCoreMatvec>(a); }
void mlp_block_mma(const MlpBlockArgs& a) { run_mlp_block<TensorCoreMatvec>(a); }

}  // namespace decodelab::cuda
