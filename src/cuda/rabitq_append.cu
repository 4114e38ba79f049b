// CUDA append to the paged RaBitQ-key / TurboQuant-value cache (rabitq_cache.h): each new token's
// key encoded into its RaBitQ record bit-exact with RabitqKeys::encode, its value by
// turboquant_encode.cuh's kernel (bit-exact with TurboQuantMse::encode). Two launches on the
// call's stream, one block per new token row each.
//
// A key record is n = ||k - c||, the correction <o_bar, o> and B bit planes of the codes u of the
// grid point nearest o' = R (k - c) / n in direction. Bit-exactness is by repeating the encoder's
// double arithmetic (turboquant_encode.cuh says why; src/kvquant/rabitq.cpp is compiled with
// -ffp-contract=off):
//   - n: one thread sums (k_j - c_j)^2, j ascending, as checked_distance(); o' = R v / n;
//   - B = 1: u_j = 1 where o'_j >= 0;
//   - B > 1, nearest_codes()' rescaling search: the steps t = s / |o'_j| (s = 1 .. 2^(B-1) - 1,
//     o'_j != 0) in ascending (t, j) order (a bitonic sort in shared memory: the pairs are
//     distinct, so any correct sort gives std::sort's order), then one thread walks them in that
//     order with the encoder's running <|y|, |o'|> and ||y||^2, keeping the first step count of
//     the largest cosine; u_j = 2^(B-1) + level_j or 2^(B-1) - 1 - level_j by the sign of o'_j,
//     level_j the number of j's steps among that count;
//   - the correction <y, o'> / ||y||: one thread, j ascending;
//   - n and the correction rounded once to f32; plane a's byte k holds bit a of u_{8k .. 8k+7}.
// The walk is the serial part: up to 7 D steps (B = 4), a few microseconds per token.
#include "cuda/turboquant_encode.cuh"

namespace decodelab::cuda {
namespace {

using namespace turboquant;

constexpr int kMaxSteps = 2048;  // 7 * 256 steps at most, rounded up to a power of 2
// The record's fields (kvquant.h; src/kvquant/rabitq_record.h, which nvcc cannot compile: fmt).
constexpr int kCorrectionOffset = 4, kPlanesOffset = 8;

struct RabitqEncodeParams {
  const void* x;        // k_new, [B, S, Hkv, D]
  uint8_t* pages;       // [num_pages, page_size, Hkv, Rk]
  DeviceRotation rotation;
  int record_bytes, dim, bits;
  bool has_centroid;
  float centroid[kMaxDim];
  AppendTarget target;
};

// Sorts the first n of (t, j) pairs ascending by (t, j) in place; n <= kMaxSteps. The array is
// padded to a power of 2 with (+inf, kMaxDim), which sorts last.
__device__ void sort_steps(double* t, int* j, int n) {
  int size = 1;
  while (size < n) size *= 2;
  for (int e = n + int(threadIdx.x); e < size; e += blockDim.x) t[e] = INFINITY, j[e] = kMaxDim;
  __syncthreads();
  const auto less = [&](int a, int b) { return t[a] < t[b] || (t[a] == t[b] && j[a] < j[b]); };
  for (int run = 2; run <= size; run *= 2) {
    for (int stride = run / 2; stride > 0; stride /= 2) {
      for (int e = int(threadIdx.x); e < size; e += blockDim.x) {
        const int partner = e ^ stride;
        if (partner <= e) continue;
        const bool ascending = (e & run) == 0;
        if (less(partner, e) == ascending) {
          const double tt = t[e];
          t[e] = t[partner], t[partner] = tt;
          const int jj = j[e];
          j[e] = j[partner], j[partner] = jj;
        }
      }
      __syncthreads();
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kMaxDim) rabitq_encode_kernel(const __grid_constant__ RabitqEncodeParams p) {
  __shared__ double u[kMaxDim], o[kMaxDim];
  __shared__ double step_t[kMaxSteps];
  __shared__ int step_j[kMaxSteps];
  __shared__ int level[kMaxDim];
  __shared__ uint8_t code[kMaxDim];
  __shared__ double s_norm, s_correction;
  __shared__ int s_steps, s_best;
  const int64_t row = blockIdx.x;
  const int d = p.dim, i = threadIdx.x, half = 1 << (p.bits - 1);
  const T* x = static_cast<const T*>(p.x) + row * d;

  if (i < d) u[i] = __dsub_rn(double(to_float(x[i])), p.has_centroid ? double(p.centroid[i]) : 0.0);
  if (i == 0) s_steps = 0;
  __syncthreads();
  const double norm = sequential_norm(u, d, &s_norm);
  if (i < d) u[i] = norm > 0.0 ? __ddiv_rn(u[i], norm) : 0.0;
  __syncthreads();
  rotate(p.rotation, u, o, d);

  // The steps of coordinate i, at slots claimed together (their order is the sort's to fix).
  if (i < d) {
    level[i] = 0;
    const double a = fabs(o[i]);
    if (a != 0.0 && half > 1) {
      const int first = atomicAdd(&s_steps, half - 1);
      for (int s = 1; s < half; ++s) step_t[first + s - 1] = __ddiv_rn(double(s), a), step_j[first + s - 1] = i;
    }
  }
  __syncthreads();
  const int steps = s_steps;
  if (steps > 0) sort_steps(step_t, step_j, steps);
  if (i == 0) {
    // At t -> 0 every |y_j| is 1/2; each step raises one |y_j| by 1: <|y|, |o'|> grows by |o'_j|,
    // ||y||^2 by 2 level_j (exact).
    double along = 0.0;
    for (int j = 0; j < d; ++j) along = __dadd_rn(along, __dmul_rn(0.5, fabs(o[j])));
    double length2 = __dmul_rn(0.25, double(d));
    double best = __ddiv_rn(along, __dsqrt_rn(length2));
    int best_steps = 0;
    for (int k = 0; k < steps; ++k) {
      const int j = step_j[k];
      ++level[j];
      along = __dadd_rn(along, fabs(o[j]));
      length2 = __dadd_rn(length2, __dmul_rn(2.0, double(level[j])));
      const double cosine = __ddiv_rn(along, __dsqrt_rn(length2));
      if (cosine > best) best = cosine, best_steps = k + 1;
    }
    s_best = best_steps;
  }
  __syncthreads();
  if (i < d) level[i] = 0;
  __syncthreads();
  for (int k = i; k < s_best; k += blockDim.x) atomicAdd(&level[step_j[k]], 1);
  __syncthreads();
  if (i < d) code[i] = uint8_t(o[i] >= 0.0 ? half + level[i] : half - 1 - level[i]);
  __syncthreads();
  if (i == 0) {
    double along = 0.0, length2 = 0.0;
    const double offset = __dmul_rn(0.5, double((1 << p.bits) - 1));
    for (int j = 0; j < d; ++j) {
      const double y = __dsub_rn(double(code[j]), offset);
      along = __dadd_rn(along, __dmul_rn(y, o[j]));
      length2 = __dadd_rn(length2, __dmul_rn(y, y));
    }
    s_correction = norm > 0.0 ? __ddiv_rn(along, __dsqrt_rn(length2)) : 1.0;
  }
  __syncthreads();

  uint8_t* record = record_of(p.target, p.pages, p.record_bytes, row);
  const uint32_t norm_bits = __float_as_uint(__double2float_rn(norm));
  const uint32_t correction_bits = __float_as_uint(__double2float_rn(s_correction));
  if (i < 4) {
    record[i] = uint8_t(norm_bits >> (8 * i));
    record[kCorrectionOffset + i] = uint8_t(correction_bits >> (8 * i));
  }
  const int plane_bytes = (d + 7) / 8;
  for (int k = i; k < p.bits * plane_bytes; k += blockDim.x) {
    const int a = k / plane_bytes, first = 8 * (k % plane_bytes);
    unsigned byte = 0;
    for (int m = 0; m < 8 && first + m < d; ++m) byte |= ((unsigned(code[first + m]) >> a) & 1u) << m;
    record[kPlanesOffset + k] = uint8_t(byte);
  }
}

}  // namespace

void rabitq_append_paged(const RabitqAppendPagedArgs& a) {
  constexpr const char* kOp = "rabitq_append_paged";
  const cudaStream_t stream = stream_of(a.stream);
  const PagedRabitqKV& c = a.cache;
  const kvquant::RabitqConfig& config = c.k_codec->config();
  const unsigned rows = unsigned(token_rows(a.k_new));

  RabitqEncodeParams k{};
  k.x = a.k_new.data;
  k.pages = static_cast<uint8_t*>(c.k_pages.data);
  check_launch(device_rotation(c.k_codec->rotation(), stream, &k.rotation), kOp);
  k.record_bytes = int(c.k_codec->record_bytes());
  k.dim = int(config.head_dim);
  k.bits = config.bits;
  k.has_centroid = !config.centroid.empty();
  std::copy(config.centroid.begin(), config.centroid.end(), k.centroid);
  k.target = append_target(a.k_new, c);
  const EncodeParams v = value_encode_params(a.v_new, c.v_pages, *c.v_codec, k.target, stream, kOp);
  dispatch_activation(a.k_new.dtype, [&](auto tag) {
    using T = decltype(tag);
    rabitq_encode_kernel<T><<<rows, kMaxDim, 0, stream>>>(k);
    encode_kernel<T><<<dim3(rows, 1), kMaxDim, 0, stream>>>(v);
  });
  check_launch(cudaGetLastError(), kOp);
}

}  // namespace decodelab::cuda
