// Validation and routing of the cache ops: appends and the QKV split family.
#include <fmt/format.h>

#include "decodelab/kv_cache.h"
#include "ops/common.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

namespace {

// k_new, v_new = [B, S, Hkv, D].
void check_new_tokens(const ArgCheck& c, const Tensor& k_new, const Tensor& v_new) {
  c.shape(k_new, "k_new", {kAny, kAny, kAny, kAny}, "[B, S, Hkv, D]");
  c.activation(k_new, "k_new");
  c.usable(k_new, "k_new", k_new.device);
  c.same_shape(v_new, "v_new", k_new, "k_new");
  c.same_dtype(v_new, "v_new", k_new.dtype, "the dtype of k_new");
  c.usable(v_new, "v_new", k_new.device);
  if (k_new.dim(0) < 1 || k_new.dim(1) < 1) c.fail("k_new", "B >= 1 and S >= 1", k_new.describe());
  c.head_dim(k_new.dim(3), "k_new");
}

struct QkvHeads {
  int64_t hq, hkv, d, tokens;
};

// qkv = [..., (Hq + 2 Hkv) D] against q = [..., Hq, D] (or q_out = [B, S, Hq, D]) and the KV
// head count; returns the head geometry.
QkvHeads check_qkv(const ArgCheck& c, const Tensor& qkv, const Tensor& q, const char* q_name, int64_t hkv) {
  c.activation(q, q_name);
  c.usable(q, q_name, q.device);
  if (q.rank < 3) c.fail(q_name, "rank >= 3 [..., Hq, D]", q.describe());
  const int64_t hq = q.dim(q.rank - 2), d = q.dim(q.rank - 1);
  c.head_dim(d, q_name);
  c.gqa(hq, hkv);
  const int64_t tokens = q.numel() / (hq * d);
  c.rows_of(qkv, "qkv", 1, (hq + 2 * hkv) * d, "[..., (Hq + 2 Hkv) D]");
  c.same_dtype(qkv, "qkv", q.dtype, fmt::format("the dtype of {}", q_name));
  c.usable(qkv, "qkv", q.device);
  if (qkv.numel() != tokens * (hq + 2 * hkv) * d) {
    c.fail("qkv", fmt::format("{} tokens like {} {}", tokens, q_name, q.describe()), qkv.describe());
  }
  if (tokens < 1) c.fail(q_name, "at least one token", q.describe());
  return {hq, hkv, d, tokens};
}

// k, v = [..., Hkv, D] with as many tokens as q.
void check_kv_outputs(const ArgCheck& c, const Tensor& q, const Tensor& k, const Tensor& v) {
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    if (t->rank != q.rank) c.fail(name, fmt::format("rank {} like q", q.rank), t->describe());
    c.same_dtype(*t, name, q.dtype, "the dtype of q");
    c.usable(*t, name, q.device);
  }
  c.same_shape(v, "v", k, "k");
  for (int i = 0; i < q.rank - 2; ++i) {
    if (k.dim(i) != q.dim(i)) c.fail("k", fmt::format("the leading dimensions of q {}", q.describe()), k.describe());
  }
  if (k.dim(k.rank - 1) != q.dim(q.rank - 1)) c.fail("k", "head_dim D like q", k.describe());
}


void check_q_out(const ArgCheck& c, const Tensor& q_out) {
  c.shape(q_out, "q_out", {kAny, kAny, kAny, kAny}, "[B, S, Hq, D]");
  if (q_out.dim(0) < 1 || q_out.dim(1) < 1) c.fail("q_out", "B >= 1 and S >= 1", q_out.describe());
}

}  // namespace

void kv_append(const Tensor& k_new, const Tensor& v_new, const ContiguousKV& cache, const RunOptions& run) {
  const ArgCheck c("kv_append");
  check_new_tokens(c, k_new, v_new);
  detail::check_contiguous_kv(c, cache, k_new.dim(0), k_new.dim(2), k_new.dim(3), k_new.dtype,
                              k_new.device, k_new.dim(1), 0, run.check_indices);
  dispatch(KvAppendArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void kv_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedKV& cache, const RunOptions& run) {
  const ArgCheck c("kv_append_paged");
  check_new_tokens(c, k_new, v_new);
  detail::check_paged_kv(c, cache, k_new.dim(0), k_new.dim(2), k_new.dim(3), k_new.dtype, k_new.device,
                         k_new.dim(1), 0, run.check_indices);
  dispatch(KvAppendPagedArgs{k_new, v_new, cache, run.stream}, run, k_new.device);
}

void qkv_split(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v, const RunOptions& run) {
  const ArgCheck c("qkv_split");
  if (k.rank < 2) c.fail("k", "rank >= 2 [..., Hkv, D]", k.describe());
  check_qkv(c, qkv, q, "q", k.dim(k.rank - 2));
  check_kv_outputs(c, q, k, v);
  dispatch(QkvSplitArgs{qkv, q, k, v, run.stream}, run, q.device);
}

void qkv_split_rope(const Tensor& qkv, const Tensor& positions, const RopeParams& rope, const Tensor& q,
                    const Tensor& k, const Tensor& v, const RunOptions& run) {
  const ArgCheck c("qkv_split_rope");
  if (k.rank < 2) c.fail("k", "rank >= 2 [..., Hkv, D]", k.describe());
  const QkvHeads heads = check_qkv(c, qkv, q, "q", k.dim(k.rank - 2));
  check_kv_outputs(c, q, k, v);
  detail::check_positions(c, positions, heads.tokens, q.device, run.check_indices);
  dispatch(QkvSplitRopeArgs{qkv, positions, q, k, v, detail::check_rope(c, rope, heads.d), run.stream}, run,
           q.device);
}

void qkv_rope_append(const Tensor& qkv, const RopeParams& rope, const ContiguousKV& cache, const Tensor& q_out,
                     const RunOptions& run) {
  const ArgCheck c("qkv_rope_append");
  check_q_out(c, q_out);
  if (cache.k.rank != 4) c.fail("cache.k", "rank 4 [B, Hkv, S_max, D]", cache.k.describe());
  const QkvHeads heads = check_qkv(c, qkv, q_out, "q_out", cache.k.dim(1));
  detail::check_contiguous_kv(c, cache, q_out.dim(0), heads.hkv, heads.d, q_out.dtype, q_out.device,
                              q_out.dim(1), 0, run.check_indices);
  dispatch(QkvRopeAppendArgs{qkv, q_out, cache, detail::check_rope(c, rope, heads.d), run.stream}, run,
           q_out.device);
}

void qkv_rope_append_paged(const Tensor& qkv, const RopeParams& rope, const PagedKV& cache, const Tensor& q_out,
                           const RunOptions& run) {
  const ArgCheck c("qkv_rope_append_paged");
  check_q_out(c, q_out);
  if (cache.k_pages.rank != 4) c.fail("cache.k_pages", "rank 4 [num_pages, page_size, Hkv, D]", cache.k_pages.describe());
  const QkvHeads heads = check_qkv(c, qkv, q_out, "q_out", cache.k_pages.dim(2));
  detail::check_paged_kv(c, cache, q_out.dim(0), heads.hkv, heads.d, q_out.dtype, q_out.device, q_out.dim(1), 0, run.check_indices);
  dispatch(QkvRopeAppendPagedArgs{qkv, q_out, cache, detail::check_rope(c, rope, heads.d), run.stream}, run,
           q_out.device);
}

}  // namespace decodelab
