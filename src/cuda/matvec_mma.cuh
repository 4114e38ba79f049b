// The tensor-core pieces of the decode matvecs shared by matvec_mma.cu (weights loaded into
// registers) and matvec_staged.cu (weights staged in shared memory by cp.async): a block owns
// a tile of 16 rows of one job, and lane (g, t) = (lane / 4, lane % 4) multiplies one unit of rows
// g and g + 8 of the tile into its accumulators per step; the warps' partial tiles are added in
// shared memory at the end.
//
// The reduction index of a product may be permuted freely as long as A and B use the same
// permutation, and mma k-slots {2t, 2t + 1, 2t + 8, 2t + 9} belong to lane t of every group, so
// each lane feeds the slots with the inputs of its own unit in the order its format's pairs come
// out (pair_input), and picks the same inputs of x for the B operand with byte permutes. B's
// column g is input g of the batch (8 + g for the second n-tile); columns past the batch are zero.
#pragma once

#include "cuda/matvec_formats.cuh"

namespace decodelab::cuda {
namespace {

constexpr int kTileRows = 16;
// Independent accumulators per output tile: consecutive mma of a unit go to different ones, so
// they need not wait for each other's results (an mma takes tens of cycles).
constexpr int kChains = 4;

// The accumulators of one lane: kChains chains of kParts x kNTiles mma output fragments.
template <int kParts, int kNTiles>
using MmaAccumulators = float[kChains][kParts][kNTiles][4];

// The tile of block `tile` in the jobs' rows: its job, first row and the job's row count.
template <int kParts, class M, class T>
__device__ __forceinline__ void find_tile(const Jobs<M, T>& jobs, int64_t tile, int& job, int64_t& row0, int64_t& n) {
  job = 0;
  n = jobs.first_row[1];
  while (kParts == 1 && tile * kTileRows >= n) {
    tile -= (n + kTileRows - 1) / kTileRows;
    ++job;
    n = jobs.first_row[job + 1] - jobs.first_row[job];
  }
  row0 = tile * kTileRows;
}

// The formats of parts job, job + 1, ... of a launch, read in place from the kernel's parameters
// (a local copy of a runtime-indexed parameter would cost registers or stack).
template <class M, class T>
struct JobFormats {
  const Jobs<M, T>& jobs;
  int job;
  __device__ __forceinline__ const M& operator[](int p) const { return jobs.m[job + p]; }
};

// Blocks of a launch: one per tile of every job (the MLP's two parts share their tiles).
template <int kParts, class M, class T>
unsigned tile_count(const Jobs<M, T>& jobs) {
  int64_t tiles = 0;
  for (int i = 0; i < (kParts == 2 ? 1 : jobs.count); ++i) {
    tiles += (jobs.first_row[i + 1] - jobs.first_row[i] + kTileRows - 1) / kTileRows;
  }
  return unsigned(tiles);
}

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

// The B operand of one unit: input (nt * 8 + g)'s x over unit u as format M's pairs, zeros for
// inputs past the batch or when `live` is false (past the row's end).
template <class M, class T, int kNTiles>
using XPairs = uint32_t[kNTiles][M::kUnit / 2];
template <class M, class T, int kNTiles>
__device__ __forceinline__ void load_x_unit(const T* __restrict__ x, int64_t k, int batch, int64_t u, bool live, int g,
                                            XPairs<M, T, kNTiles>& b) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    const int input = nt * 8 + g;
    load_x_pairs<M>(x + int64_t(input < batch ? input : 0) * k, u, live && input < batch, b[nt]);
  }
}

// One unit of rows g and g + 8 of the tile for every part: m[p] is part p's format M, raw[p][r]
// its unit of row g + 8r (already loaded), b the unit's x (load_x_unit), `live` false past the
// row's end (then A is zero too). The mma of step s go to chain (chain0 + s) % kChains.
template <class M, class T, int kNTiles, int kParts, class Formats>
__device__ __forceinline__ void mma_unit(const Formats& m, const typename M::Raw (&raw)[kParts][2],
                                         const XPairs<M, T, kNTiles>& b, bool live, int chain0,
                                         MmaAccumulators<kParts, kNTiles>& acc) {
  constexpr int kUnit = M::kUnit, kPairs = kUnit / 2;
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
    uint32_t a[2][kPairs];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (live) {
        m[p].template pairs<T>(raw[p][r], a[r]);
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
        mma_16816(acc[(chain0 + s) % kChains][p][nt], frag, col, T{});
      }
    }
  }
}

// The warps' partial tiles added in `partial` (shared, [kWarps][kParts * kNTiles * 4][32]); warp
// 0 stores. Accumulator j of lane (g, t) is row g (+ 8 for j >= 2), input 2t + (j & 1) of its n-tile.
template <int kWarps, int kParts, int kNTiles, class M, class T>
__device__ __forceinline__ void reduce_and_store(const Jobs<M, T>& jobs, int job, int64_t n, int64_t row0, int batch,
                                                 const MmaAccumulators<kParts, kNTiles>& acc,
                                                 float (&partial)[kWarps][kParts * kNTiles * 4][32]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
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

// The host side of a tensor-core kernel family (matvec_formats.cuh's Family): f16 and bf16
// activations only (supports() admits no other), batches up to 8 on one n-tile of the mma and
// more on two. Launcher::launch<kNTiles, kParts>(jobs, x, k, batch, stream, op) runs the kernel.
template <class Launcher>
struct TensorCoreFamily {
  template <int kParts>
  static void run(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                  Stream stream, const char* op) {
    if (x.dtype == DType::f16) return run_typed<kParts, __half>(x, w, y, residual, stream, op);
    run_typed<kParts, __nv_bfloat16>(x, w, y, residual, stream, op);
  }

  template <int kParts, class T>
  static void run_typed(const Tensor& x, std::span<const Weight> w, std::span<const Tensor> y, const Tensor* residual,
                        Stream stream, const char* op) {
    dispatch_format<T>(w[0], [&](auto make) {
      using M = decltype(make(w[0]));
      const Jobs<M, T> jobs = make_jobs<M, T>(make, w, y, residual, kParts == 2);
      const int batch = int(x.dim(0));
      const cudaStream_t s = stream_of(stream);
      if (batch <= 8) return Launcher::template launch<1, kParts>(jobs, x.ptr<const T>(), x.dim(1), batch, s, op);
      return Launcher::template launch<2, kParts>(jobs, x.ptr<const T>(), x.dim(1), batch, s, op);
    });
  }
};

}  // namespace
}  // namespace decodelab::cuda
