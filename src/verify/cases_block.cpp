// Verification cases for the decode block: a small Llama-shaped layer over a paged cache, with
// dense and quantized weights, and a Qwen2-shaped one (q/k/v projection biases).
#include <fmt/format.h>

#include "verify/weights.h"

namespace decodelab::verify {
namespace {

DecodeLayerConfig small_config() {
  DecodeLayerConfig c;
  c.hidden = 256;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;  // a head_dim every backend specializes (the CUDA attention takes 64, 128, 256)
  c.intermediate = 384;
  c.rms_eps = 1e-5f;
  c.rope = RopeParams{500000.0f, RopeStyle::half_split, 32, true, {}};
  return c;
}

}  // namespace

void add_block_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  const DecodeLayerConfig c = small_config();
  const int64_t page_size = 8, capacity = 32;
  const int64_t q_width = c.num_heads * c.head_dim, kv_width = c.num_kv_heads * c.head_dim;
  // (rows, cols) of wq, wk, wv, wo, gate, up, down, in that order.
  const std::pair<int64_t, int64_t> dims[] = {{q_width, c.hidden},      {kv_width, c.hidden},     {kv_width, c.hidden},
                                              {c.hidden, q_width},      {c.intermediate, c.hidden}, {c.intermediate, c.hidden},
                                              {c.hidden, c.intermediate}};
  // The biases change only what is added after the projections, not how the weights are read:
  // one weight kind with them is enough. One sequence takes another path (the projections write
  // their slices of the QKV row in place) than several (gathered by strided copies).
  const std::pair<WeightKind, bool> variants[] = {
      {WeightKind{}, false}, {WeightKind{QuantSpec::mlx(4, 64)}, false}, {WeightKind{QuantSpec::q8_0()}, false},
      {WeightKind{}, true}};
  for (const std::vector<int32_t>& lengths : {std::vector<int32_t>{7, 20}, std::vector<int32_t>{13}}) {
    for (const auto& variant : variants) {
      const int64_t batch = int64_t(lengths.size());
      const WeightKind kind = variant.first;
      const bool biases = variant.second;
      const std::string name = fmt::format("{} B={} hidden={} Hq={} Hkv={} D={} inter={} lengths [{}] page {}{}",
                                           kind.name(), batch, c.hidden, c.num_heads, c.num_kv_heads, c.head_dim,
                                           c.intermediate, fmt::join(lengths, ", "), page_size,
                                           biases ? " q/k/v biases" : "");
      // Every intermediate activation is stored in the output dtype (about ten roundings in a row).
      add_cases<DecodeBlockArgs>(
          grid, filter, name, [](DType t) { return rounding_tolerance(t, 30.0); },
          [=](DType t, uint64_t seed) {
            Rng rng(seed);
            CaseData d;
            d.inputs.push_back(random_array(t, {batch, c.hidden}, rng));
            d.inputs.push_back(random_array(t, {c.hidden}, rng, 0.1, 1.0));
            d.inputs.push_back(random_array(t, {c.hidden}, rng, 0.1, 1.0));
            for (const auto& [rows, cols] : dims) add_weight(d, kind, rows, cols, t, rng);
            KVFixture f = paged_fixture(t, lengths, capacity, page_size, c.num_kv_heads, c.head_dim, rng);
            const std::vector<int64_t> pool(f.k.view().shape.begin(), f.k.view().shape.end());
            d.inputs.push_back(std::move(f.k));  // 24
            d.inputs.push_back(std::move(f.v));  // 25
            d.inputs.push_back(std::move(f.page_table));
            d.inputs.push_back(std::move(f.lengths));
            if (biases) {  // 28, 29, 30
              for (const int64_t width : {q_width, kv_width, kv_width}) d.inputs.push_back(random_array(t, {width}, rng));
            }
            d.outputs.push_back({t, {batch, c.hidden}});
            d.outputs.push_back({t, pool, 24});
            d.outputs.push_back({t, pool, 25});
            return d;
          },
          [=](auto in, auto out) {
            DecodeLayerWeights w;
            Weight* slots[] = {&w.wq, &w.wk, &w.wv, &w.wo, &w.gate, &w.up, &w.down};
            for (int i = 0; i < 7; ++i) *slots[i] = weight_at(in, 3 + 3 * i, kind, dims[i].first, dims[i].second);
            w.attn_norm = in[1];
            w.mlp_norm = in[2];
            if (biases) {
              w.bq = in[28];
              w.bk = in[29];
              w.bv = in[30];
            }
            return DecodeBlockArgs{in[0], w, c, PagedKV{out[1], out[2], in[26], in[27]}, out[0], {}, {}};
          });
    }
  }
}

}  // namespace decodelab::verify
