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
// Layout of the work: a block owns a tile of 16 rows and its warps split K between them (chunks of
// 4 units, interleaved, so the block streams each row contiguously), and the warps' partial sums
// are added in shared memory at the end. Lane (g, t) = (lane / 4, lane % 4) loads unit 4c + t of
// chunk c for rows g and g + 8 of the tile: the four lanes of a row read consecutive units. The
// reduction index of a product may be permuted freely as long as A and B use the same permutation,
// and mma k-slots {2t, 2t + 1, 2t + 8, 2t + 9} belong to lane t of every group, so each lane feeds
// the slots with the inputs of its own unit in the order its format's pairs come out (pair_input),
// and picks the same inputs of x for the B operand with byte permutes. B's column g is input g of
// the batch (8 + g for the second n-tile); columns past the batch are zero.
#include "cuda/cuda.h"
#include "cuda/matvec_formats.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kWarps = 8;  // per 16-row tile: enough loads in flight for N = 4096 on 132 SMs
// Two blocks per SM (at most 128 registers a thread): one block of 8 warps cannot hide the load
// latency (measured on the H200: MLX q4 at 4096 x 14336 took 27 us at one block, 20 us at two).
constexpr int kMinBlocks = 2;
constexpr int kTileRows = 16;

// Unit u of one input row of x as the pairs of format M (M::pair_input), zeros when `live` is false.
template <class M, class T>
__device__ __forceinline__ void load_x_pairs(const T* __restrict__ row, int64_t u, bool live,
                                             uint32_t (&out)[M::kUnit / 2]) {
  constexpr int kWords = M::kUnit / 2;
  uint32_t words[kWords];
  if (live) {
    const T* p = row + u * M::kUnit;
    if constexpr (kWords % 4 == 0) {
#pragma unroll
      for (int v = 0; v < kWords / 4; ++v) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
        words[4 * v] = raw.x, words[4 * v + 1] = raw.y, words[4 * v + 2] = raw.z, words[4 * v + 3] = raw.w;
      }
    } else {
#pragma unroll
      for (int v = 0; v < kWords; ++v) words[v] = __ldg(reinterpret_cast<const uint32_t*>(p) + v);
    }
  } else {
#pragma unroll
    for (int v = 0; v < kWords; ++v) words[v] = 0;
  }
  [&]<int... kP>(std::integer_sequence<int, kP...>) {
    ((out[kP] = select_pair<M::pair_input(kP, 0), M::pair_input(kP, 1)>(words)), ...);
  }(std::make_integer_sequence<int, kWords>());
}

// kParts = 1: the tile's rows of the job that holds it. kParts = 2 (the MLP): the same rows of
// jobs 0 (gate) and 1 (up), silu(gate) * up stored into job 0's y. kNTiles: 8 inputs of the batch each.
template <class M, class T, int kNTiles, int kParts>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) matvec_mma_kernel(Jobs<M, T> jobs, const T* __restrict__ x, int64_t k,
                                                                 int batch) {
  constexpr int kUnit = M::kUnit, kPairs = kUnit / 2, kUnroll = M::kUnroll > kParts ? M::kUnroll / kParts : 1;
  __shared__ float partial[kWarps][kParts * kNTiles * 4][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;

  int64_t tile = blockIdx.x;
  int job = 0;
  int64_t n = jobs.first_row[1];
  while (kParts == 1 && tile * kTileRows >= n) {
    tile -= (n + kTileRows - 1) / kTileRows;
    ++job;
    n = jobs.first_row[job + 1] - jobs.first_row[job];
  }
  const int64_t row0 = tile * kTileRows;
  // Rows past the matrix repeat its last row: read, never stored.
  const int64_t rows[2] = {row0 + g < n ? row0 + g : n - 1, row0 + g + 8 < n ? row0 + g + 8 : n - 1};
  const int64_t units = k / kUnit, chunks = (units + 3) / 4;

  // kChains independent accumulators per output tile: consecutive mma of a unit go to different
  // ones, so they need not wait for each other's results (an mma takes tens of cycles).
  constexpr int kChains = 4;
  float acc[kChains][kParts][kNTiles][4] = {};
  using Raw = typename M::Raw[kUnroll][kParts][2];
  // This lane's units of chunks c0, c0 + kWarps, ... (kUnroll of them), for rows g and g + 8.
  const auto load = [&](Raw& raw, int64_t c0) {
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t u = (c0 + i * kWarps) * 4 + t;
      if (u >= units) continue;
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        raw[i][p][0] = jobs.m[job + p].load(rows[0], u);
        raw[i][p][1] = jobs.m[job + p].load(rows[1], u);
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
      uint32_t b[kNTiles][kPairs];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int input = nt * 8 + g;
        load_x_pairs<M>(x + int64_t(input < batch ? input : 0) * k, u, live && input < batch, b[nt]);
      }
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        uint32_t a[2][kPairs];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (live) {
            jobs.m[job + p].template pairs<T>(raw[i][p][r], a[r]);
          } else {
#pragma unroll
            for (int e = 0; e < kPairs; ++e) a[r][e] = 0;
          }
        }
#pragma unroll
        for (int s = 0; s < kUnit / 4; ++s) {
          const uint32_t frag[4] = {a[0][2 * s], a[1][2 * s], a[0][2 * s + 1], a[1][2 * s + 1]};
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
            const uint32_t col[2] = {b[nt][2 * s], b[nt][2 * s + 1]};
            mma_16816(acc[(i * (kUnit / 4) + s) % kChains][p][nt], frag, col, T{});
          }
        }
      }
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

  // The warps' partial tiles added in shared memory; warp 0 stores. Accumulator j of lane (g, t)
  // is row g (+ 8 for j >= 2), input 2t + (j & 1) of its n-tile.
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float sum = 0.0f;
#pragma unroll
        for (int chain = 0; chain < kChains; ++chain) sum += acc[chain][p][nt][j];
        partial[warp][(p * kNTiles + nt) * 4 + j][lane] = sum;
      }
    }
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t row = row0 + g + (j >= 2 ? 8 : 0);
      const int input = nt * 8 + 2 * t + (j & 1);
      if (row >= n || input >= batch) continue;
      float sum[kParts];
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        sum[p] = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum[p] += partial[w][(p * kNTiles + nt) * 4 + j][lane];
      }
      store_output<kParts>(jobs, job, n, input, row, sum);
    }
  }
}

template <int kNTiles, int kParts, class M, class T>
void launch(const Jobs<M, T>& jobs, const T* x, int64_t k, int batch, cudaStream_t s, const char* op) {
  int64_t tiles = 0;
  for (int i = 0; i < (kParts == 2 ? 1 : jobs.count); ++i) {
    tiles += (jobs.first_row[i + 1] - jobs.first_row[i] + kTileRows - 1) / kTileRows;
  }
  matvec_mma_kernel<M, T, kNTiles, kParts><<<unsigned(tiles), kWarps * 32, 0, s>>>(jobs, x, k, batch);
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
struct TensorCoreMatvec {
  template <int kParts>
  static void run(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                  Stream stream, const char* op) {
    if (x.dtype == DType::f16) return run_typed<kParts, __half>(x, w, y, residual, stream, op);
    run_typed<kParts, __nv_bfloat16>(x, w, y, residual, stream, op);  // supports() admits only f16 and bf16
  }
};

}  // namespace

void matvec_mma(const MatvecArgs& a) { run_matvec<TensorCoreMatvec>(a); }
void matvec_multi_mma(const MatvecMultiArgs& a) { run_matvec_multi<TensorCoreMatvec>(a); }
void output_projection_mma(const OutputProjectionArgs& a) { run_output_projection<TensorCoreMatvec>(a); }
void mlp_block_mma(const MlpBlockArgs& a) { run_mlp_block<TensorCoreMatvec>(a); }

}  // namespace decodelab::cuda
