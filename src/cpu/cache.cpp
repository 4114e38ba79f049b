// CPU KV appends and the QKV split family. Appends and splits are copies of whole head rows (D
// contiguous elements of one dtype); the RoPE variants rotate Q and K heads in f32 registers on
// the way (cos/sin computed once per distinct position of the call, shared by all heads).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/cache.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "cpu/simd.h"
#include "cpu/rope-inl.h"

#include <cstring>
#include <optional>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/element.h"
#include "cpu/thread_pool.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::cpu::HWY_NAMESPACE {

// Where token t of sequence b, KV head h, starts in a cache's K (and V): the layouts of kv_cache.h.
struct ContiguousSlots {
  const ContiguousKV& c;
  int64_t operator()(int64_t b, int64_t h, int64_t t) const {
    return ((b * c.k.dim(1) + h) * c.k.dim(2) + t) * c.k.dim(3);
  }
  const Tensor& k() const { return c.k; }
  const Tensor& v() const { return c.v; }
  int64_t heads() const { return c.k.dim(1); }
};

struct PagedSlots {
  const PagedKV& c;
  int64_t operator()(int64_t b, int64_t h, int64_t t) const {
    const int64_t page_size = c.k_pages.dim(1);
    const int64_t page = c.page_table.ptr<const int32_t>()[b * c.page_table.dim(1) + t / page_size];
    return ((page * page_size + t % page_size) * c.k_pages.dim(2) + h) * c.k_pages.dim(3);
  }
  const Tensor& k() const { return c.k_pages; }
  const Tensor& v() const { return c.v_pages; }
  int64_t heads() const { return c.k_pages.dim(2); }
};

// A range of tokens (or head rows), over the pool when there is enough of it.
template <class Fn>
void for_tokens(int64_t tokens, int64_t elements_per_token, Fn&& fn) {
  if (tokens * elements_per_token < (int64_t{1} << 16)) {
    fn(int64_t{0}, tokens);
  } else {
    parallel_ranges(tokens, 1, fn);
  }
}

template <class Slots>
void Append(const Tensor& k_new, const Tensor& v_new, const Tensor& lengths, const Slots& slots) {
  const int64_t batch = k_new.dim(0), steps = k_new.dim(1), hkv = k_new.dim(2), d = k_new.dim(3);
  const size_t row_bytes = size_t(d) * dtype_size(k_new.dtype);
  const auto* len = lengths.ptr<const int32_t>();
  for_tokens(batch * steps, hkv * d, [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / steps, s = token % steps;
      for (int64_t h = 0; h < hkv; ++h) {
        const size_t src = size_t((token * hkv + h) * d) * dtype_size(k_new.dtype);
        const size_t dst = size_t(slots(b, h, len[b] + s)) * dtype_size(k_new.dtype);
        std::memcpy(static_cast<char*>(slots.k().data) + dst, static_cast<const char*>(k_new.data) + src, row_bytes);
        std::memcpy(static_cast<char*>(slots.v().data) + dst, static_cast<const char*>(v_new.data) + src, row_bytes);
      }
    }
  });
}

// Splits qkv = [tokens, (Hq + 2 Hkv) D] head by head into destinations given by
// dst(part, token, head) -> T* (part 0, 1, 2 = Q, K, V), rotating Q and K at position_of(token)
// when `rope` is given. The work is split by (token, head) row, so a few tokens still spread
// over the pool; the cos/sin rows are computed once per distinct position, for Q and K alike.
template <class T, class Position, class Dst>
void Split(const T* qkv, int64_t tokens, int64_t hq, int64_t hkv, int64_t d, const RopeParams* rope,
           Position&& position_of, Dst&& dst) {
  std::optional<RopeTable> table;
  if (rope != nullptr) table.emplace(*rope, tokens, position_of);
  const int64_t heads = hq + 2 * hkv;
  for_tokens(tokens * heads, d, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / heads, j = r % heads;
      const int part = j < hq ? 0 : j < hq + hkv ? 1 : 2;
      T* out = dst(part, t, part == 0 ? j : part == 1 ? j - hq : j - hq - hkv);
      if (!table || part == 2) {
        std::memcpy(out, qkv + r * d, size_t(d) * sizeof(T));
      } else {
        table->Rotate(qkv + r * d, out, d, t);
      }
    }
  });
}

void KvAppend(const KvAppendArgs& a) { Append(a.k_new, a.v_new, a.cache.lengths, ContiguousSlots{a.cache}); }
void KvAppendPaged(const KvAppendPagedArgs& a) { Append(a.k_new, a.v_new, a.cache.lengths, PagedSlots{a.cache}); }

// qkv_split with or without RoPE: q, k, v = [..., H, D] rows of the same tokens.
void SplitInto(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* positions,
               const RopeParams* rope) {
  dispatch_activation(q.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t hq = q.dim(q.rank - 2), hkv = k.dim(k.rank - 2), d = q.dim(q.rank - 1);
    const int64_t tokens = q.numel() / (hq * d);
    T* outs[] = {q.ptr<T>(), k.ptr<T>(), v.ptr<T>()};
    const int64_t heads[] = {hq, hkv, hkv};
    Split(
        qkv.ptr<const T>(), tokens, hq, hkv, d, rope,
        [&](int64_t t) { return positions != nullptr ? int64_t(positions->ptr<const int32_t>()[t]) : int64_t{0}; },
        [&](int part, int64_t t, int64_t h) { return outs[part] + (t * heads[part] + h) * d; });
  });
}

void QkvSplit(const QkvSplitArgs& a) { SplitInto(a.qkv, a.q, a.k, a.v, nullptr, nullptr); }
void QkvSplitRope(const QkvSplitRopeArgs& a) { SplitInto(a.qkv, a.q, a.k, a.v, &a.positions, &a.rope); }

// The fused decode step: Q to q_out, K and V into the cache at lengths[b] + s.
template <class Slots>
void RopeAppend(const Tensor& qkv, const Tensor& q_out, const Tensor& lengths, const Slots& slots, const RopeParams& rope) {
  dispatch_activation(q_out.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t steps = q_out.dim(1), hq = q_out.dim(2), d = q_out.dim(3);
    const int64_t hkv = slots.heads();
    const auto* len = lengths.ptr<const int32_t>();
    T* q = q_out.ptr<T>();
    T* caches[] = {nullptr, slots.k().template ptr<T>(), slots.v().template ptr<T>()};
    Split(
        qkv.ptr<const T>(), q_out.dim(0) * steps, hq, hkv, d, &rope,
        [&](int64_t t) { return int64_t(len[t / steps]) + t % steps; },
        [&](int part, int64_t t, int64_t h) {
          if (part == 0) return q + (t * hq + h) * d;
          return caches[part] + slots(t / steps, h, len[t / steps] + t % steps);
        });
  });
}

void QkvRopeAppend(const QkvRopeAppendArgs& a) {
  RopeAppend(a.qkv, a.q_out, a.cache.lengths, ContiguousSlots{a.cache}, a.rope);
}
void QkvRopeAppendPaged(const QkvRopeAppendPagedArgs& a) {
  RopeAppend(a.qkv, a.q_out, a.cache.lengths, PagedSlots{a.cache}, a.rope);
}

}  // namespace decodelab::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab::cpu {

HWY_EXPORT(KvAppend);
HWY_EXPORT(KvAppendPaged);
HWY_EXPORT(QkvSplit);
HWY_EXPORT(QkvSplitRope);
HWY_EXPORT(QkvRopeAppend);
HWY_EXPORT(QkvRopeAppendPaged);

void kv_append(const KvAppendArgs& a) { HWY_DYNAMIC_DISPATCH(KvAppend)(a); }
void kv_append_paged(const KvAppendPagedArgs& a) { HWY_DYNAMIC_DISPATCH(KvAppendPaged)(a); }
void qkv_split(const QkvSplitArgs& a) { HWY_DYNAMIC_DISPATCH(QkvSplit)(a); }
void qkv_split_rope(const QkvSplitRopeArgs& a) { HWY_DYNAMIC_DISPATCH(QkvSplitRope)(a); }
void qkv_rope_append(const QkvRopeAppendArgs& a) { HWY_DYNAMIC_DISPATCH(QkvRopeAppend)(a); }
void qkv_rope_append_paged(const QkvRopeAppendPagedArgs& a) { HWY_DYNAMIC_DISPATCH(QkvRopeAppendPaged)(a); }

}  // namespace decodelab::cpu
#endif  // HWY_ONCE
