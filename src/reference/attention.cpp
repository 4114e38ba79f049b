// Reference scaled dot-product attention (Vaswani et al. 2017) for prefill and for queries over
// contiguous and paged KV caches. Scores and softmax in double, two passes, no streaming tricks.
#include <algorithm>
#include <cmath>

#include "reference/kv_layout.h"
#include "reference/reference.h"

namespace decodelab::reference {
namespace {

// q, out = [B, Sq, Hq, D]; query head h reads KV head h / (Hq / Hkv).
template <class Layout>
void attend(const Tensor& q, const Layout& kv, const Tensor& out,
            const AttentionOptions& options) {
  const int64_t batch = q.dim(0), sq = q.dim(1), hq = q.dim(2), d = q.dim(3);
  const int64_t group = hq / kv.heads();
  std::vector<double> scores, acc(static_cast<size_t>(d));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = kv.length(b);
    for (int64_t i = 0; i < sq; ++i) {
      // Causal: the last query lines up with the last key.
      const int64_t visible = options.causal ? std::min(length, i + 1 + (length - sq)) : length;
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t q_at = ((b * sq + i) * hq + h) * d;
        scores.assign(size_t(visible), 0.0);
        for (int64_t t = 0; t < visible; ++t) {
          const int64_t k_at = kv.offset(b, h / group, t);
          double dot = 0.0;
          for (int64_t c = 0; c < d; ++c) dot += load(q, q_at + c) * load(kv.k, k_at + c);
          scores[size_t(t)] = dot * options.scale;
        }
        const double max_score = *std::max_element(scores.begin(), scores.end());
        double denominator = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t t = 0; t < visible; ++t) {
          const double p = std::exp(scores[size_t(t)] - max_score);
          denominator += p;
          const int64_t v_at = kv.offset(b, h / group, t);
          for (int64_t c = 0; c < d; ++c) acc[size_t(c)] += p * load(kv.v, v_at + c);
        }
        for (int64_t c = 0; c < d; ++c) store(out, q_at + c, acc[size_t(c)] / denominator);
      }
    }
  }
}

}  // namespace

void prefill_attention(const PrefillAttentionArgs& a) {
  attend(a.q, PrefillKVLayout{a.k, a.v}, a.out, a.options);
}

void decode_attention(const DecodeAttentionArgs& a) {
  attend(a.q, ContiguousKVLayout(a.cache), a.out, a.options);
}

void decode_attention_paged(const DecodeAttentionPagedArgs& a) {
  attend(a.q, PagedKVLayout(a.cache), a.out, a.options);
}

}  // namespace decodelab::reference
