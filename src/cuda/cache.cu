// CUDA KV appends, the QKV split family and RoPE: all are one kernel that copies head rows of D
// elements from a source (a fused qkv row, k_new/v_new, or x) to destinations (q/k/v tensors, the
// contiguous or paged cache at lengths[b] + s, or out), rotating Q and K heads on the way when RoPE
// is on. A block takes kHeadsPerBlock heads of one token; its threads first compute the token's
// cos/sin table in shared memory (angles in double: positions reach 10^5 and an f32 angle would
// lose the phase), then each thread moves one pair of elements (a rotary pair, or two elements
// that are only copied). Lengths and page tables are read on the device; the op layer has checked
// them on the host before the launch.
#include <algorithm>

#include "core/device_memory.h"
#include "cuda/common.cuh"
#include "cuda/cuda.h"
#include "decodelab/layers.h"

namespace decodelab::cuda {
namespace {

constexpr int kHeadsPerBlock = 4;
constexpr int kMaxPairs = 128;  // head_dim <= 256 (supports() checks)

struct Rope {
  bool on = false;
  bool interleaved = false;
  int rotary_dim = 0;
  double inv_freq[kMaxPairs] = {};
};

Rope make_rope(const RopeParams* p) {
  Rope r;
  if (p == nullptr) return r;
  r.on = true;
  r.interleaved = p->style == RopeStyle::interleaved;
  r.rotary_dim = p->rotary_dim;
  for (int i = 0; i < p->rotary_dim / 2; ++i) r.inv_freq[i] = rope_inv_frequency(*p, p->rotary_dim, i);
  return r;
}

// Head j of a token, j in [0, hq + 2 hkv): Q heads, then K heads, then V heads. part: 0, 1, 2.
struct Head {
  int part, h;
};

// Sources: where head j of token t is read.
template <class T>
struct FusedQkv {  // [tokens, (hq + 2 hkv) D]
  const T* qkv;
  int64_t row;
  __device__ const T* operator()(int64_t t, int j, Head, int d) const { return qkv + t * row + int64_t(j) * d; }
};
template <class T>
struct SeparateKv {  // k_new, v_new = [tokens, hkv, D]; no Q heads
  const T *k, *v;
  int hkv;
  __device__ const T* operator()(int64_t t, int, Head head, int d) const {
    return (head.part == 1 ? k : v) + (t * hkv + head.h) * d;
  }
};

// Destinations.
template <class T>
struct Tensors {  // q, k, v = [tokens, H, D] (rope: out as q)
  T *q, *k, *v;
  int hq, hkv;
  __device__ T* operator()(int64_t t, Head head, int d) const {
    if (head.part == 0) return q + (t * hq + head.h) * d;
    return (head.part == 1 ? k : v) + (t * hkv + head.h) * d;
  }
};
template <class T>
struct ContiguousCache {  // q_out [B, S, hq, D]; cache [B, hkv, S_max, D] at lengths[b] + s
  T *q, *k, *v;
  const int32_t* lengths;
  int hq, hkv, steps;
  int64_t max_len;
  __device__ T* operator()(int64_t t, Head head, int d) const {
    if (head.part == 0) return q + (t * hq + head.h) * d;
    const int64_t b = t / steps, pos = lengths[b] + t % steps;
    return (head.part == 1 ? k : v) + ((b * hkv + head.h) * max_len + pos) * d;
  }
};
template <class T>
struct PagedCache {  // q_out [B, S, hq, D]; pages [num_pages, page_size, hkv, D] through the page table
  T *q, *k, *v;
  const int32_t *lengths, *page_table;
  int hq, hkv, steps, page_size;
  int64_t max_pages;
  __device__ T* operator()(int64_t t, Head head, int d) const {
    if (head.part == 0) return q + (t * hq + head.h) * d;
    const int64_t b = t / steps, pos = lengths[b] + t % steps;
    const int64_t page = page_table[b * max_pages + pos / page_size];
    return (head.part == 1 ? k : v) + ((page * page_size + pos % page_size) * hkv + head.h) * d;
  }
};

// Positions: given per token, or the token's place in its cache.
struct GivenPositions {
  const int32_t* positions;
  __device__ int64_t operator()(int64_t t) const { return positions != nullptr ? positions[t] : 0; }
};
struct CachePositions {
  const int32_t* lengths;
  int steps;
  __device__ int64_t operator()(int64_t t) const { return lengths[t / steps] + t % steps; }
};

template <class T, class Src, class Dst, class Pos>
__global__ void rope_scatter_kernel(Src src, Dst dst, Pos position, int hq, int hkv, int d, Rope rope) {
  __shared__ float2 cos_sin[kMaxPairs];
  const int64_t t = blockIdx.x;
  const int half = rope.rotary_dim / 2;
  if (rope.on) {
    const double p = double(position(t));
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      double s, c;
      sincos(p * rope.inv_freq[i], &s, &c);
      cos_sin[i] = make_float2(float(c), float(s));
    }
    __syncthreads();
  }
  const int pairs = d / 2, heads = hq + 2 * hkv;
  for (int idx = threadIdx.x; idx < kHeadsPerBlock * pairs; idx += blockDim.x) {
    const int j = int(blockIdx.y) * kHeadsPerBlock + idx / pairs, p = idx % pairs;
    if (j >= heads) break;
    const Head head = j < hq ? Head{0, j} : j < hq + hkv ? Head{1, j - hq} : Head{2, j - hq - hkv};
    const T* in = src(t, j, head, d);
    T* out = dst(t, head, d);
    if (rope.on && head.part != 2 && p < half) {
      const int a = rope.interleaved ? 2 * p : p, b = rope.interleaved ? 2 * p + 1 : p + half;
      const float xa = to_float(in[a]), xb = to_float(in[b]);
      const float2 cs = cos_sin[p];
      out[a] = from_float<T>(xa * cs.x - xb * cs.y);
      out[b] = from_float<T>(xb * cs.x + xa * cs.y);
    } else {
      // Copied elements: all of them, or those past the rotary dims of a rotated head.
      const int e = rope.on && head.part != 2 ? rope.rotary_dim + 2 * (p - half) : 2 * p;
      const T xa = in[e], xb = in[e + 1];
      out[e] = xa;
      out[e + 1] = xb;
    }
  }
}

template <class T, class Src, class Dst, class Pos>
void launch(int64_t tokens, Src src, Dst dst, Pos pos, int hq, int hkv, int d, const RopeParams* rope, Stream stream,
            const char* op) {
  if (tokens == 0) return;
  const int heads = hq + 2 * hkv;
  const dim3 grid(unsigned(tokens), unsigned((heads + kHeadsPerBlock - 1) / kHeadsPerBlock));
  rope_scatter_kernel<T><<<grid, 128, 0, stream_of(stream)>>>(src, dst, pos, hq, hkv, d, make_rope(rope));
  check_launch(cudaGetLastError(), op);
}

// qkv [tokens, (hq + 2 hkv) D] into q, k, v [..., H, D], rotated at `positions` when rope is given.
void split(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* positions,
           const RopeParams* rope, Stream stream, const char* op) {
  dispatch_activation(q.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int hq = int(q.dim(q.rank - 2)), hkv = int(k.dim(k.rank - 2)), d = int(q.dim(q.rank - 1));
    const int64_t tokens = q.numel() / (int64_t(hq) * d);
    launch<T>(tokens, FusedQkv<T>{qkv.ptr<const T>(), int64_t(hq + 2 * hkv) * d},
              Tensors<T>{q.ptr<T>(), k.ptr<T>(), v.ptr<T>(), hq, hkv},
              GivenPositions{positions != nullptr ? positions->ptr<const int32_t>() : nullptr}, hq, hkv, d, rope, stream,
              op);
  });
}

template <class T>
ContiguousCache<T> contiguous_cache(const Tensor& q, const ContiguousKV& c, int steps) {
  return {q.data != nullptr ? q.ptr<T>() : nullptr, c.k.ptr<T>(), c.v.ptr<T>(), c.lengths.ptr<const int32_t>(),
          q.data != nullptr ? int(q.dim(2)) : 0, int(c.k.dim(1)), steps, c.k.dim(2)};
}
template <class T>
PagedCache<T> paged_cache(const Tensor& q, const PagedKV& c, int steps) {
  return {q.data != nullptr ? q.ptr<T>() : nullptr, c.k_pages.ptr<T>(), c.v_pages.ptr<T>(), c.lengths.ptr<const int32_t>(),
          c.page_table.ptr<const int32_t>(), q.data != nullptr ? int(q.dim(2)) : 0, int(c.k_pages.dim(2)), steps,
          int(c.k_pages.dim(1)), c.page_table.dim(1)};
}

// k_new, v_new [B, S, hkv, D] into a cache.
template <class MakeDst>
void append(const Tensor& k_new, const Tensor& v_new, const Tensor& lengths, Stream stream, const char* op,
            MakeDst&& make_dst) {
  dispatch_activation(k_new.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int steps = int(k_new.dim(1)), hkv = int(k_new.dim(2)), d = int(k_new.dim(3));
    launch<T>(k_new.dim(0) * steps, SeparateKv<T>{k_new.ptr<const T>(), v_new.ptr<const T>(), hkv},
              make_dst(T{}), CachePositions{lengths.ptr<const int32_t>(), steps}, 0, hkv, d, nullptr, stream, op);
  });
}

// qkv [B * S, (hq + 2 hkv) D]: Q rotated into q_out [B, S, hq, D], K rotated and V into a cache.
template <class MakeDst>
void rope_append(const Tensor& qkv, const Tensor& q_out, int hkv, const Tensor& lengths, const RopeParams& rope,
                 Stream stream, const char* op, MakeDst&& make_dst) {
  dispatch_activation(q_out.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int steps = int(q_out.dim(1)), hq = int(q_out.dim(2)), d = int(q_out.dim(3));
    launch<T>(q_out.dim(0) * steps, FusedQkv<T>{qkv.ptr<const T>(), int64_t(hq + 2 * hkv) * d}, make_dst(T{}),
              CachePositions{lengths.ptr<const int32_t>(), steps}, hq, hkv, d, &rope, stream, op);
  });
}

}  // namespace

void kv_append(const KvAppendArgs& a) {
  append(a.k_new, a.v_new, a.cache.lengths, a.stream, "kv_append",
         [&](auto tag) { return contiguous_cache<decltype(tag)>(Tensor{}, a.cache, int(a.k_new.dim(1))); });
}

void kv_append_paged(const KvAppendPagedArgs& a) {
  append(a.k_new, a.v_new, a.cache.lengths, a.stream, "kv_append_paged",
         [&](auto tag) { return paged_cache<decltype(tag)>(Tensor{}, a.cache, int(a.k_new.dim(1))); });
}

void qkv_split(const QkvSplitArgs& a) { split(a.qkv, a.q, a.k, a.v, nullptr, nullptr, a.stream, "qkv_split"); }

void qkv_split_rope(const QkvSplitRopeArgs& a) {
  split(a.qkv, a.q, a.k, a.v, &a.positions, &a.rope, a.stream, "qkv_split_rope");
}

void qkv_rope_append(const QkvRopeAppendArgs& a) {
  rope_append(a.qkv, a.q_out, int(a.cache.k.dim(1)), a.cache.lengths, a.rope, a.stream, "qkv_rope_append",
              [&](auto tag) { return contiguous_cache<decltype(tag)>(a.q_out, a.cache, int(a.q_out.dim(1))); });
}

void qkv_rope_append_paged(const QkvRopeAppendPagedArgs& a) {
  rope_append(a.qkv, a.q_out, int(a.cache.k_pages.dim(2)), a.cache.lengths, a.rope, a.stream, "qkv_rope_append_paged",
              [&](auto tag) { return paged_cache<decltype(tag)>(a.q_out, a.cache, int(a.q_out.dim(1))); });
}

// RoPE alone: x [..., H, D] as the Q heads of the same kernel, out as their destination.
void rope(const RopeArgs& a) {
  dispatch_activation(a.x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int h = int(a.x.dim(a.x.rank - 2)), d = int(a.x.dim(a.x.rank - 1));
    launch<T>(a.x.numel() / (int64_t(h) * d), FusedQkv<T>{a.x.ptr<const T>(), int64_t(h) * d},
              Tensors<T>{a.out.ptr<T>(), nullptr, nullptr, h, 0}, GivenPositions{a.positions.ptr<const int32_t>()}, h,
              0, d, &a.params, a.stream, "rope");
  });
}

}  // namespace decodelab::cuda

namespace decodelab::detail {
namespace {

__global__ void add_i32_kernel(int32_t* out, const int32_t* in, int64_t n, int32_t add) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = in[i] + add;
  }
}

}  // namespace

// Cache lengths plus the new tokens, without a round trip through the host (core/device_memory.h).
void device_add_i32(int32_t* out, const int32_t* in, int64_t n, int32_t add, void* stream) {
  const cudaStream_t s = stream != nullptr ? static_cast<cudaStream_t>(stream) : cudaStreamPerThread;
  const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 1024));
  if (n > 0) add_i32_kernel<<<blocks, 256, 0, s>>>(out, in, n, add);
  cuda::check_launch(cudaGetLastError(), "device_add_i32");
}

}  // namespace decodelab::detail
