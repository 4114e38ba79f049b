// Validation and routing of the decode block.
#include <fmt/format.h>

#include "decodelab/model.h"
#include "ops/common.h"
#include "router/registry.h"

namespace decodelab {

using detail::ArgCheck;
using detail::kAny;

namespace {

// Everything but the cache: the config, x and out, the weights and biases. Returns the config with
// rope.rotary_dim resolved.
DecodeLayerConfig check_layer(const ArgCheck& c, const Tensor& x, const DecodeLayerWeights& weights,
                              const DecodeLayerConfig& config, const Tensor& out) {
  const DecodeLayerConfig& k = config;
  if (k.hidden < 1 || k.num_heads < 1 || k.intermediate < 1) {
    c.fail("config", "hidden, num_heads and intermediate >= 1",
           fmt::format("hidden {}, num_heads {}, intermediate {}", k.hidden, k.num_heads, k.intermediate));
  }
  c.head_dim(k.head_dim, "config.head_dim");
  c.gqa(k.num_heads, k.num_kv_heads);
  c.shape(x, "x", {kAny, k.hidden}, "[B, hidden]");
  c.activation(x, "x");
  c.usable(x, "x", x.device);
  if (x.dim(0) < 1) c.fail("x", "a batch B >= 1", x.describe());
  c.same_shape(out, "out", x, "x");
  c.same_dtype(out, "out", x.dtype, "the dtype of x");
  c.usable(out, "out", x.device);
  for (auto [norm, name] : {std::pair{&weights.attn_norm, "weights.attn_norm"}, std::pair{&weights.mlp_norm, "weights.mlp_norm"}}) {
    c.shape(*norm, name, {k.hidden}, "[hidden]");
    c.same_dtype(*norm, name, x.dtype, "the dtype of x");
    c.usable(*norm, name, x.device);
  }
  const int64_t q_width = k.num_heads * k.head_dim, kv_width = k.num_kv_heads * k.head_dim;
  const struct {
    const Weight* w;
    const char* name;
    int64_t rows, cols;
  } expected[] = {{&weights.wq, "weights.wq", q_width, k.hidden},         {&weights.wk, "weights.wk", kv_width, k.hidden},
                  {&weights.wv, "weights.wv", kv_width, k.hidden},        {&weights.wo, "weights.wo", k.hidden, q_width},
                  {&weights.gate, "weights.gate", k.intermediate, k.hidden}, {&weights.up, "weights.up", k.intermediate, k.hidden},
                  {&weights.down, "weights.down", k.hidden, k.intermediate}};
  for (const auto& e : expected) {
    detail::check_weight(c, *e.w, e.name, e.cols, x.device);
    if (e.w->rows() != e.rows) c.fail(e.name, fmt::format("{} rows", e.rows), std::to_string(e.w->rows()));
  }
  const struct {
    const Tensor* bias;
    const char* name;
    int64_t width;
    const char* layout;
  } biases[] = {{&weights.bq, "weights.bq", q_width, "[num_heads * head_dim]"},
                {&weights.bk, "weights.bk", kv_width, "[num_kv_heads * head_dim]"},
                {&weights.bv, "weights.bv", kv_width, "[num_kv_heads * head_dim]"}};
  for (const auto& b : biases) {
    if (!has_bias(*b.bias)) continue;
    c.shape(*b.bias, b.name, {b.width}, b.layout);
    c.same_dtype(*b.bias, b.name, x.dtype, "the dtype of x");
    c.usable(*b.bias, b.name, x.device);
  }
  DecodeLayerConfig resolved = config;
  resolved.rope = detail::check_rope(c, config.rope, k.head_dim);
  return resolved;
}

}  // namespace

void decode_block(const Tensor& x, const DecodeLayerWeights& weights, const DecodeLayerConfig& config,
                  const PagedKV& cache, const Tensor& out, const RunOptions& run) {
  const ArgCheck c("decode_block");
  const DecodeLayerConfig resolved = check_layer(c, x, weights, config, out);
  detail::check_paged_kv(c, cache, x.dim(0), config.num_kv_heads, config.head_dim, x.dtype, x.device, 1, 0,
                         run.check_indices);
  dispatch(DecodeBlockArgs{x, weights, resolved, cache, out, run.stream, run.per_op}, run, x.device);
}

void decode_block_turboquant(const Tensor& x, const DecodeLayerWeights& weights, const DecodeLayerConfig& config,
                             const PagedTurboQuantKV& cache, const Tensor& out, const RunOptions& run) {
  const ArgCheck c("decode_block_turboquant");
  const DecodeLayerConfig resolved = check_layer(c, x, weights, config, out);
  // The cache's checks (codecs for head_dim, pools, page table) are the append's and the
  // attention's, made before each writes anything; the block writes `out` only after both.
  detail::composed_decode_block_turboquant(x, weights, resolved, cache, out, run);
}

}  // namespace decodelab
