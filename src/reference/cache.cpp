// Reference KV-cache appends and QKV splitting (with RoPE, and with the append fused in).
#include "reference/kv_layout.h"
#include "reference/reference.h"

namespace decodelab::reference {
namespace {

// k_new, v_new = [B, S, Hkv, D] into the cache at lengths[b] + s.
template <class Layout>
void append(const Tensor& k_new, const Tensor& v_new, const Layout& cache) {
  const int64_t batch = k_new.dim(0), steps = k_new.dim(1), hkv = k_new.dim(2), d = k_new.dim(3);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = cache.length(b);
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t src = ((b * steps + s) * hkv + h) * d;
        const int64_t dst = cache.offset(b, h, start + s);
        for (int64_t i = 0; i < d; ++i) {
          store(cache.k, dst + i, load(k_new, src + i));
          store(cache.v, dst + i, load(v_new, src + i));
        }
      }
    }
  }
}

// Splits token t of qkv = [T, (Hq + 2 Hkv) D] into head vectors, rotating Q and K heads at
// `position` when `rope` is given, and hands each head to `emit(part, head index, values)` with
// part 0, 1, 2 for Q, K, V.
template <class Emit>
void split_token(const Tensor& qkv, int64_t t, int64_t hq, int64_t hkv, int64_t d,
                 const RopeParams* rope, int64_t position, Emit&& emit) {
  std::vector<double> head(static_cast<size_t>(d));
  const int64_t row = t * (hq + 2 * hkv) * d;
  for (int64_t j = 0; j < hq + 2 * hkv; ++j) {
    for (int64_t i = 0; i < d; ++i) head[size_t(i)] = load(qkv, row + j * d + i);
    const int part = j < hq ? 0 : j < hq + hkv ? 1 : 2;
    if (rope != nullptr && part < 2) rotate_head(head.data(), position, *rope);
    emit(part, part == 0 ? j : part == 1 ? j - hq : j - hq - hkv, head);
  }
}

template <class Layout>
void rope_append(const Tensor& qkv, const Tensor& q_out, const Layout& cache, const RopeParams& rope) {
  const int64_t batch = q_out.dim(0), steps = q_out.dim(1), hq = q_out.dim(2), d = q_out.dim(3);
  const int64_t hkv = cache.heads();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = cache.length(b);
    for (int64_t s = 0; s < steps; ++s) {
      split_token(qkv, b * steps + s, hq, hkv, d, &rope, start + s,
                  [&](int part, int64_t h, const std::vector<double>& head) {
                    const int64_t dst = part == 0 ? ((b * steps + s) * hq + h) * d
                                                  : cache.offset(b, h, start + s);
                    const Tensor& target = part == 0 ? q_out : part == 1 ? cache.k : cache.v;
                    for (int64_t i = 0; i < d; ++i) store(target, dst + i, head[size_t(i)]);
                  });
    }
  }
}

void split(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v,
           const Tensor* positions, const RopeParams* rope) {
  const int64_t hq = q.dim(q.rank - 2), hkv = k.dim(k.rank - 2), d = q.dim(q.rank - 1);
  const int64_t tokens = q.numel() / (hq * d);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t position = positions != nullptr ? load_index(*positions, t) : 0;
    split_token(qkv, t, hq, hkv, d, rope, position,
                [&](int part, int64_t h, const std::vector<double>& head) {
                  const Tensor& target = part == 0 ? q : part == 1 ? k : v;
                  const int64_t heads = part == 0 ? hq : hkv;
                  for (int64_t i = 0; i < d; ++i) store(target, (t * heads + h) * d + i, head[size_t(i)]);
                });
  }
}

}  // namespace

void kv_append(const KvAppendArgs& a) { append(a.k_new, a.v_new, ContiguousKVLayout(a.cache)); }
void kv_append_paged(const KvAppendPagedArgs& a) { append(a.k_new, a.v_new, PagedKVLayout(a.cache)); }
void qkv_split(const QkvSplitArgs& a) { split(a.qkv, a.q, a.k, a.v, nullptr, nullptr); }
void qkv_split_rope(const QkvSplitRopeArgs& a) { split(a.qkv, a.q, a.k, a.v, &a.positions, &a.rope); }
void qkv_rope_append(const QkvRopeAppendArgs& a) {
  rope_append(a.qkv, a.q_out, ContiguousKVLayout(a.cache), a.rope);
}
void qkv_rope_append_paged(const QkvRopeAppendPagedArgs& a) {
  rope_append(a.qkv, a.q_out, PagedKVLayout(a.cache), a.rope);
}

}  // namespace decodelab::reference
