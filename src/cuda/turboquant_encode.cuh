// The CUDA TurboQuant encoder of the paged-cache appends (turboquant_append.cu; qjl_append.cu for
// the values of the QJL-key cache): each new token's head vector encoded into its record, codes
// bit-exact with TurboQuantMse::encode (kvquant.h).
//
// Bit-exactness is by repeating the encoder's arithmetic, not by tolerance: the host encoder works
// in double, and a nearest-centroid decision next to a cell boundary flips with the last bit of a
// rotated coordinate, so the kernel does the same IEEE double operations in the same order:
//   - the norm: one thread sums x_j^2 for j = 0, 1, ... and takes the square root, as
//     checked_norm() does (a parallel tree sum would round differently);
//   - u_j = x_j / n (0 for the zero vector);
//   - dense: y_i = sum_j R[i][j] u_j, j ascending, each thread one i; hadamard: S1, the blocked
//     Walsh-Hadamard butterflies stage by stage (each butterfly is one rounding, independent of
//     the order within a stage), the block's 1 / sqrt(n), P and S2, the butterflies again;
//   - index_j = the number of boundaries <= y_j (what upper_bound over the boundaries returns),
//     with the wider codebook's for the first h coordinates of a split width;
//   - the unbiased scale n / <y, y~>: one thread sums y_j c[index_j], j ascending;
//   - the norm (or scale) rounded once to f32; the indices packed in one run, or a split width's
//     two (the first h at bits + 1 bits, then the rest), each starting on a byte.
// Every product and sum is an explicit __dmul_rn / __dadd_rn: nvcc contracts a * b + c into a
// fused multiply-add unless told not to, which would round once where the host rounds twice. The
// host side is compiled with -ffp-contract=off for the same reason (src/CMakeLists.txt).
//
// One block per (new token row, side) of kMaxDim threads; the vector's doubles live in shared
// memory. Encode costs O(D^2) for a dense rotation, O(D log D) for Hadamard, once per token and
// layer.
//
// Non-finite inputs: the host encoder refuses them, but checking device data on the host would
// cost a copy and a synchronization per call; the kernel writes the record it computes (a NaN or
// infinite norm), which attention over the cache turns into NaN outputs rather than hiding.
#pragma once

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/cuda.h"
#include "cuda/turboquant_tables.h"

namespace decodelab::cuda::turboquant {

constexpr int kMaxDim = 256;  // the ops' head_dim limit

// Where the new tokens go: S new tokens per sequence, token s of sequence b into the records of
// token lengths[b] + s, in pools [num_pages, page_size, Hkv, R].
struct AppendTarget {
  const int32_t* lengths;
  const int32_t* page_table;
  int64_t table_stride;
  int page_size, hkv, tokens;
};

// The record of new-token row `row` (of [B, S, Hkv]: (b * S + s) * Hkv + h) in `pages`.
__device__ __forceinline__ uint8_t* record_of(const AppendTarget& t, uint8_t* pages, int record_bytes, int64_t row) {
  const int64_t per_sequence = int64_t(t.tokens) * t.hkv;
  const int64_t b = row / per_sequence, s = row / t.hkv % t.tokens, h = row % t.hkv;
  const int64_t token = t.lengths[b] + s;
  const int64_t page = t.page_table[b * t.table_stride + token / t.page_size];
  return pages + ((page * t.page_size + token % t.page_size) * t.hkv + h) * record_bytes;
}

// One side's codec, by value in the kernel parameters: its codebook, and a split width's wider one
// for the first high_channels coordinates.
struct EncodeSide {
  const void* x;           // k_new or v_new, [B, S, Hkv, D]
  uint8_t* pages;          // [num_pages, page_size, Hkv, R]
  int record_bytes, bits;
  bool unbiased;           // ScaleMode::unbiased: the record holds n / <y, y~>
  int high_channels;       // h: 0 at an integer width
  int boundary_count, high_boundary_count;  // 2^bits - 1, 2^(bits + 1) - 1
  double boundaries[15], high_boundaries[15];  // ascending
  double centroids[16], high_centroids[16];
  DeviceRotation rotation;
};

struct EncodeParams {
  EncodeSide side[2];  // K, V (or V alone: then a grid of height 1)
  AppendTarget target;
  int dim;
};

// The blocked Walsh-Hadamard transform of v (kvquant's Rotation::hadamard_blocks): blocks of the
// powers of two in D, largest first, so block k starts at the sum of the larger ones. Thread i is
// the upper element of the butterflies it starts; one barrier per stage.
__device__ inline void hadamard_blocks(double* v, int d) {
  const int i = threadIdx.x;
  int start = 0, size = 0;
  for (int b = 1 << 8; b > 0; b >>= 1) {  // D <= 256: the binary digits of d, largest first
    if ((d & b) == 0 || size != 0) continue;
    if (i < start + b) {
      size = b;  // i's block: [start, start + b)
    } else {
      start += b;
    }
  }
  // Every thread takes part in each barrier, whichever block it is in.
  for (int half = 1; half < kMaxDim; half *= 2) {
    if (i < d && half < size && ((i - start) & half) == 0) {
      const double a = v[i], b = v[i + half];
      v[i] = __dadd_rn(a, b);
      v[i + half] = __dsub_rn(a, b);
    }
    __syncthreads();
  }
  if (i < d) v[i] = __dmul_rn(v[i], __ddiv_rn(1.0, __dsqrt_rn(double(size))));
  __syncthreads();
}

// y = R u (kvquant's Rotation::apply) for u and y of d doubles in shared memory, u overwritten:
// dense, y_i = sum_j R[i][j] u_j with j ascending, thread i; hadamard, S1, the blocked butterflies,
// P and S2, the butterflies again. Every thread of the block takes part (barriers inside).
__device__ inline void rotate(const DeviceRotation& r, double* u, double* y, int d) {
  const int i = threadIdx.x;
  if (r.kind == kvquant::RotationKind::dense) {
    if (i < d) {
      double sum = 0.0;
      for (int j = 0; j < d; ++j) sum = __dadd_rn(sum, __dmul_rn(r.dense_t[int64_t(j) * d + i], u[j]));
      y[i] = sum;
    }
    __syncthreads();
  } else {
    if (i < d) u[i] = __dmul_rn(u[i], r.signs1[i]);
    __syncthreads();
    hadamard_blocks(u, d);
    if (i < d) y[i] = __dmul_rn(u[r.permutation[i]], r.signs2[i]);
    __syncthreads();
    hadamard_blocks(y, d);
  }
}

// ||x|| of d doubles in shared memory as checked_norm() computes it: thread 0, j ascending.
__device__ inline double sequential_norm(const double* x, int d, double* s_norm) {
  if (threadIdx.x == 0) {
    double norm2 = 0.0;
    for (int j = 0; j < d; ++j) norm2 = __dadd_rn(norm2, __dmul_rn(x[j], x[j]));
    *s_norm = __dsqrt_rn(norm2);
  }
  __syncthreads();
  return *s_norm;
}

template <class T>
__global__ void __launch_bounds__(kMaxDim) encode_kernel(const __grid_constant__ EncodeParams p) {
  __shared__ double u[kMaxDim], y[kMaxDim];
  __shared__ uint8_t index[kMaxDim];
  __shared__ double s_norm, s_scale;
  const EncodeSide& s = p.side[blockIdx.y];
  const int64_t row = blockIdx.x;
  const int d = p.dim, i = threadIdx.x;
  const T* x = static_cast<const T*>(s.x) + row * d;

  if (i < d) u[i] = double(to_float(x[i]));  // f16 and bf16 widen exactly, as on the host
  __syncthreads();
  const double norm = sequential_norm(u, d, &s_norm);
  if (i < d) u[i] = norm > 0.0 ? __ddiv_rn(u[i], norm) : 0.0;
  __syncthreads();

  rotate(s.rotation, u, y, d);

  const int h = s.high_channels;
  if (i < d) {
    const bool high = i < h;
    const double* boundaries = high ? s.high_boundaries : s.boundaries;
    const int count = high ? s.high_boundary_count : s.boundary_count;
    int cell = 0;
    for (int k = 0; k < count; ++k) cell += boundaries[k] <= y[i] ? 1 : 0;
    index[i] = uint8_t(cell);
  }
  __syncthreads();
  if (i == 0) {
    double scale = norm;
    if (s.unbiased && norm > 0.0) {
      double agreement = 0.0;
      for (int j = 0; j < d; ++j) {
        agreement = __dadd_rn(agreement, __dmul_rn(y[j], (j < h ? s.high_centroids : s.centroids)[index[j]]));
      }
      scale = __ddiv_rn(norm, agreement);
    }
    s_scale = scale;
  }
  __syncthreads();

  uint8_t* record = record_of(p.target, s.pages, s.record_bytes, row);
  // The scale as a little-endian f32, then byte k of the packed indices: in a run of n indices of
  // w bits, stream bits [8k, 8k + 8), bit m of it being bit m % w of index m / w (kvquant.h's
  // layout; spare high bits 0). A split width's wide run comes first.
  if (i < 4) record[i] = uint8_t(__float_as_uint(__double2float_rn(s_scale)) >> (8 * i));
  const int high_bytes = (h * (s.bits + 1) + 7) / 8;
  for (int k = i; k < s.record_bytes - 4; k += blockDim.x) {
    const bool high = k < high_bytes;
    const int w = high ? s.bits + 1 : s.bits, first = high ? 0 : h, n = high ? h : d - h;
    const int start = 8 * (high ? k : k - high_bytes);
    unsigned byte = 0;
    for (int m = 0; m < 8; ++m) {
      const int bit = start + m, j = bit / w;
      if (j < n) byte |= ((unsigned(index[first + j]) >> (bit % w)) & 1u) << m;
    }
    record[4 + k] = uint8_t(byte);
  }
}

// The side of x (new tokens [B, S, Hkv, D] or [B, Hkv, D]) into `pool` with `codec`; its rotation
// uploaded on first use (a failure throws, naming `op`).
inline EncodeSide make_encode_side(const Tensor& x, const Tensor& pool, const kvquant::TurboQuantMse& codec,
                                   cudaStream_t stream, const char* op) {
  EncodeSide s{};
  s.x = x.data;
  s.pages = static_cast<uint8_t*>(pool.data);
  s.record_bytes = int(codec.record_bytes());
  s.bits = codec.config().bits;
  s.unbiased = codec.config().scale == kvquant::ScaleMode::unbiased;
  s.high_channels = int(codec.config().high_bits_channels);
  const auto copy = [](const kvquant::Codebook& book, int& count, double (&boundaries)[15], double (&centroids)[16]) {
    count = int(book.boundaries().size());
    std::copy(book.boundaries().begin(), book.boundaries().end(), boundaries);
    std::copy(book.centroids().begin(), book.centroids().end(), centroids);
  };
  copy(codec.codebook(), s.boundary_count, s.boundaries, s.centroids);
  if (const kvquant::Codebook* high = codec.high_codebook(); high != nullptr) {
    copy(*high, s.high_boundary_count, s.high_boundaries, s.high_centroids);
  }
  check_launch(device_rotation(codec.rotation(), stream, &s.rotation), op);
  return s;
}

// The encoder's parameters for the values alone (a grid of height 1: the key side is another
// codec's kernel), into `pool` at `target`.
inline EncodeParams value_encode_params(const Tensor& v_new, const Tensor& pool, const kvquant::TurboQuantMse& codec,
                                        const AppendTarget& target, cudaStream_t stream, const char* op) {
  EncodeParams v{};
  v.side[0] = make_encode_side(v_new, pool, codec, stream, op);
  v.target = target;
  v.dim = int(codec.config().head_dim);
  return v;
}

// The target of new tokens x ([B, S, Hkv, D] or [B, Hkv, D]) in a paged record cache `c`.
template <class Cache>
AppendTarget append_target(const Tensor& x, const Cache& c) {
  const bool one_token = x.rank == 3;
  return {c.lengths.template ptr<const int32_t>(), c.page_table.template ptr<const int32_t>(), c.page_table.dim(1),
          int(c.k_pages.dim(1)), int(x.dim(one_token ? 1 : 2)), one_token ? 1 : int(x.dim(1))};
}

// Rows of new tokens in x: B * S * Hkv.
inline int64_t token_rows(const Tensor& x) { return x.numel() / x.dim(x.rank - 1); }

}  // namespace decodelab::cuda::turboquant
