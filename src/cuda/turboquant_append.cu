// CUDA append to the paged TurboQuant cache (turboquant_cache.h): each new token's K and V head
// vectors encoded into their records, codes bit-exact with TurboQuantMse::encode (kvquant.h).
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
//   - index_j = the number of boundaries <= y_j (what upper_bound over the boundaries returns);
//   - the norm rounded once to f32.
// Every product and sum is an explicit __dmul_rn / __dadd_rn: nvcc contracts a * b + c into a
// fused multiply-add unless told not to, which would round once where the host rounds twice. The
// host side is compiled with -ffp-contract=off for the same reason (src/CMakeLists.txt).
//
// One block per (token row, K or V) of D threads; the vector's doubles live in shared memory.
// Encode costs O(D^2) for a dense rotation, O(D log D) for Hadamard, once per token and layer.
//
// Non-finite inputs: the host encoder refuses them, but checking device data on the host would
// cost a copy and a synchronization per call; the kernel writes the record it computes (a NaN or
// infinite norm), which attention over the cache turns into NaN outputs rather than hiding.
#include "cuda/cuda.h"
#include "cuda/common.cuh"
#include "cuda/turboquant_tables.h"

namespace decodelab::cuda {
namespace {

constexpr int kMaxDim = 256;  // the ops' head_dim limit

// One side's codec, by value in the kernel parameters.
struct EncodeSide {
  const void* x;           // k_new or v_new, [B, Hkv, D]
  uint8_t* pages;          // [num_pages, page_size, Hkv, R]
  int record_bytes, bits;
  int boundary_count;      // 2^bits - 1
  double boundaries[15];   // ascending
  DeviceRotation rotation;
};

struct AppendParams {
  EncodeSide side[2];  // K, V
  const int32_t* lengths;
  const int32_t* page_table;
  int64_t table_stride;
  int page_size, hkv, dim;
};

// The blocked Walsh-Hadamard transform of v (kvquant's Rotation::hadamard_blocks): blocks of the
// powers of two in D, largest first, so block k starts at the sum of the larger ones. Thread i is
// the upper element of the butterflies it starts; one barrier per stage.
__device__ void hadamard_blocks(double* v, int d) {
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

template <class T>
__global__ void __launch_bounds__(kMaxDim) append_kernel(const __grid_constant__ AppendParams p) {
  __shared__ double u[kMaxDim], y[kMaxDim];
  __shared__ uint8_t index[kMaxDim];
  __shared__ double s_norm;
  const EncodeSide& s = p.side[blockIdx.y];
  const int64_t row = blockIdx.x;  // b * Hkv + h
  const int b = int(row / p.hkv), h = int(row % p.hkv), d = p.dim, i = threadIdx.x;
  const T* x = static_cast<const T*>(s.x) + row * d;

  if (i < d) u[i] = double(to_float(x[i]));  // f16 and bf16 widen exactly, as on the host
  __syncthreads();
  if (i == 0) {
    double norm2 = 0.0;
    for (int j = 0; j < d; ++j) norm2 = __dadd_rn(norm2, __dmul_rn(u[j], u[j]));
    s_norm = __dsqrt_rn(norm2);
  }
  __syncthreads();
  const double norm = s_norm;
  if (i < d) u[i] = norm > 0.0 ? __ddiv_rn(u[i], norm) : 0.0;
  __syncthreads();

  const DeviceRotation& r = s.rotation;
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

  if (i < d) {
    int cell = 0;
    for (int k = 0; k < s.boundary_count; ++k) cell += s.boundaries[k] <= y[i] ? 1 : 0;
    index[i] = uint8_t(cell);
  }
  __syncthreads();

  const int t = p.lengths[b];
  const int64_t page = p.page_table[int64_t(b) * p.table_stride + t / p.page_size];
  uint8_t* record = s.pages + ((page * p.page_size + t % p.page_size) * p.hkv + h) * s.record_bytes;
  // The norm as a little-endian f32, then byte k of the packed indices: stream bits [8k, 8k + 8),
  // bit m of it being bit m % bits of index m / bits (kvquant.h's layout; spare high bits 0).
  if (i < 4) record[i] = uint8_t(__float_as_uint(__double2float_rn(norm)) >> (8 * i));
  for (int k = i; k < s.record_bytes - 4; k += blockDim.x) {
    unsigned byte = 0;
    for (int m = 0; m < 8; ++m) {
      const int bit = 8 * k + m, j = bit / s.bits;
      if (j < d) byte |= ((unsigned(index[j]) >> (bit % s.bits)) & 1u) << m;
    }
    record[4 + k] = uint8_t(byte);
  }
}

EncodeSide make_side(const Tensor& x, const Tensor& pool, const kvquant::TurboQuantMse& codec, cudaStream_t stream,
                     const char* op) {
  EncodeSide s{};
  s.x = x.data;
  s.pages = static_cast<uint8_t*>(pool.data);
  s.record_bytes = int(codec.record_bytes());
  s.bits = codec.config().bits;
  const auto boundaries = codec.codebook().boundaries();
  s.boundary_count = int(boundaries.size());
  for (size_t k = 0; k < boundaries.size(); ++k) s.boundaries[k] = boundaries[k];
  check_launch(device_rotation(codec.rotation(), stream, &s.rotation), op);
  return s;
}

}  // namespace

void turboquant_append_paged(const TurboQuantAppendPagedArgs& a) {
  constexpr const char* kOp = "turboquant_append_paged";
  const cudaStream_t stream = stream_of(a.stream);
  const PagedTurboQuantKV& c = a.cache;
  AppendParams p{};
  p.side[0] = make_side(a.k_new, c.k_pages, *c.k_codec, stream, kOp);
  p.side[1] = make_side(a.v_new, c.v_pages, *c.v_codec, stream, kOp);
  p.lengths = c.lengths.ptr<const int32_t>();
  p.page_table = c.page_table.ptr<const int32_t>();
  p.table_stride = c.page_table.dim(1);
  p.page_size = int(c.k_pages.dim(1));
  p.hkv = int(a.k_new.dim(1));
  p.dim = int(a.k_new.dim(2));
  const dim3 grid(unsigned(a.k_new.dim(0) * a.k_new.dim(1)), 2);
  dispatch_activation(a.k_new.dtype, [&](auto tag) {
    using T = decltype(tag);
    append_kernel<T><<<grid, kMaxDim, 0, stream>>>(p);
  });
  check_launch(cudaGetLastError(), kOp);
}

}  // namespace decodelab::cuda
