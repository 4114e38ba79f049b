// CUDA append to the paged QJL-key / TurboQuant-value cache (qjl_cache.h): each new token's key
// encoded into its QJL record bit-exact with QjlKeys::encode, its value by turboquant_encode.cuh's
// kernel (bit-exact with TurboQuantMse::encode). Two launches on the call's stream, one block per
// new token row each.
//
// A key record is n = ||k|| and the signs of S k. Bit-exactness is by repeating the encoder's
// double arithmetic (turboquant_encode.cuh says why): the norm summed by one thread, j ascending,
// as checked_norm(); (S k)_i = sum_j S[i][j] k_j with j ascending, thread i of the block taking
// i, i + 256, ...; its bit 1 where (S k)_i < 0 (pack_signs' layout: bit i % 8 of byte 4 + i / 8);
// the norm rounded once to f32. The host encoder is compiled with -ffp-contract=off
// (src/CMakeLists.txt), the kernel spells every operation out (__dmul_rn, __dadd_rn). Encode costs
// m * D double multiply-adds per token and layer (32k at D = 128, m = 256).
#include "cuda/turboquant_encode.cuh"

namespace decodelab::cuda {
namespace {

using namespace turboquant;

constexpr int kKeyThreads = 256;

struct QjlEncodeParams {
  const void* x;           // k_new, [B, S, Hkv, D]
  uint8_t* pages;          // [num_pages, page_size, Hkv, Rk]
  const double* sketch_t;  // S^T, [D, m]
  int record_bytes, dim, m;
  AppendTarget target;
};

// Dynamic shared memory: m bytes, the sign bits before packing.
template <class T>
__global__ void __launch_bounds__(kKeyThreads) qjl_encode_kernel(const __grid_constant__ QjlEncodeParams p) {
  extern __shared__ uint8_t negative[];
  __shared__ double k[kMaxDim];
  __shared__ double s_norm;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.dim;
  for (int j = tid; j < p.dim; j += kKeyThreads) k[j] = double(to_float(x[j]));  // widened exactly
  __syncthreads();
  const double norm = sequential_norm(k, p.dim, &s_norm);
  for (int i = tid; i < p.m; i += kKeyThreads) {
    double projection = 0.0;
    for (int j = 0; j < p.dim; ++j) projection = __dadd_rn(projection, __dmul_rn(p.sketch_t[int64_t(j) * p.m + i], k[j]));
    negative[i] = projection < 0.0 ? 1 : 0;
  }
  __syncthreads();
  uint8_t* record = record_of(p.target, p.pages, p.record_bytes, row);
  if (tid < 4) record[tid] = uint8_t(__float_as_uint(__double2float_rn(norm)) >> (8 * tid));
  for (int byte = tid; byte < p.m / 8; byte += kKeyThreads) {
    unsigned bits = 0;
    for (int b = 0; b < 8; ++b) bits |= unsigned(negative[8 * byte + b]) << b;
    record[4 + byte] = uint8_t(bits);
  }
}

}  // namespace

void qjl_append_paged(const QjlAppendPagedArgs& a) {
  constexpr const char* kOp = "qjl_append_paged";
  const cudaStream_t stream = stream_of(a.stream);
  const PagedQjlKV& c = a.cache;
  const kvquant::QjlKeys& k_codec = *c.k_codec;
  DeviceSketch sketch;
  check_launch(device_sketch(k_codec, stream, &sketch), kOp);
  const unsigned rows = unsigned(token_rows(a.k_new));

  QjlEncodeParams k{};
  k.x = a.k_new.data;
  k.pages = static_cast<uint8_t*>(c.k_pages.data);
  k.sketch_t = sketch.encode_t;
  k.record_bytes = int(k_codec.record_bytes());
  k.dim = int(k_codec.config().head_dim);
  k.m = int(k_codec.config().sketch_dim);
  k.target = append_target(a.k_new, c);
  const EncodeParams v = value_encode_params(a.v_new, c.v_pages, *c.v_codec, k.target, stream, kOp);
  dispatch_activation(a.k_new.dtype, [&](auto tag) {
    using T = decltype(tag);
    qjl_encode_kernel<T><<<rows, kKeyThreads, size_t(k.m), stream>>>(k);
    encode_kernel<T><<<dim3(rows, 1), kMaxDim, 0, stream>>>(v);
  });
  check_launch(cudaGetLastError(), kOp);
}

}  // namespace decodelab::cuda
