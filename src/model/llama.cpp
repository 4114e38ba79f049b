// A Llama-family model from a Hugging Face checkpoint: the weight mapping (Hugging Face names to
// decode_block's layout), the dtype conversion and optional quantization on load, and the random
// toy checkpoint of `decodelab generate --toy`.
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <set>
#include <string>

#include "decodelab/error.h"
#include "decodelab/model.h"
#include "reference/elements.h"
#include "verify/random.h"

namespace decodelab {
namespace {

// The tensors of a Llama checkpoint and their shapes: (name, [rows, cols] or [n]).
struct Expected {
  std::string name;
  std::vector<int64_t> shape;
  bool is_bias = false;  // [n] like a norm weight, but centred on 0 where a norm's is on 1
};

std::string layer_name(int64_t layer, std::string_view what) { return fmt::format("model.layers.{}.{}.weight", layer, what); }
std::string bias_name(int64_t layer, std::string_view what) { return fmt::format("model.layers.{}.{}.bias", layer, what); }

std::vector<Expected> expected_tensors(const ModelConfig& c) {
  const int64_t q_width = c.num_attention_heads * c.head_dim, kv_width = c.num_key_value_heads * c.head_dim;
  std::vector<Expected> e = {{"model.embed_tokens.weight", {c.vocab_size, c.hidden_size}},
                             {"model.norm.weight", {c.hidden_size}}};
  if (!c.tie_word_embeddings) e.push_back({"lm_head.weight", {c.vocab_size, c.hidden_size}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    e.push_back({layer_name(l, "input_layernorm"), {c.hidden_size}});
    e.push_back({layer_name(l, "self_attn.q_proj"), {q_width, c.hidden_size}});
    e.push_back({layer_name(l, "self_attn.k_proj"), {kv_width, c.hidden_size}});
    e.push_back({layer_name(l, "self_attn.v_proj"), {kv_width, c.hidden_size}});
    if (c.attention_bias) {  // Qwen2; LlamaModel::build reads them in this order, after v_proj
      e.push_back({bias_name(l, "self_attn.q_proj"), {q_width}, true});
      e.push_back({bias_name(l, "self_attn.k_proj"), {kv_width}, true});
      e.push_back({bias_name(l, "self_attn.v_proj"), {kv_width}, true});
    }
    e.push_back({layer_name(l, "self_attn.o_proj"), {c.hidden_size, q_width}});
    e.push_back({layer_name(l, "post_attention_layernorm"), {c.hidden_size}});
    e.push_back({layer_name(l, "mlp.gate_proj"), {c.intermediate_size, c.hidden_size}});
    e.push_back({layer_name(l, "mlp.up_proj"), {c.intermediate_size, c.hidden_size}});
    e.push_back({layer_name(l, "mlp.down_proj"), {c.hidden_size, c.intermediate_size}});
  }
  return e;
}

std::string shape_text(std::span<const int64_t> shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

}  // namespace

// Where a model's tensors come from: a checkpoint (CheckpointSource) or random values
// (RandomSource). dense() and weight() give a tensor in options.dtype on options.device, keeping
// what they allocate in `storage`.
class detail::WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual Array dense(const Expected& e) = 0;
  virtual Weight weight(const Expected& e, std::vector<Array>& storage) = 0;
};

namespace {

// Keeps `parts` (packed codes, scales, biases) on `device` in storage; the quantized weight over them.
Weight store_quantized(QuantizedArray& q, Device device, std::vector<Array>& storage) {
  Tensor views[3];
  Array* parts[3] = {&q.packed, &q.scales, &q.biases};
  for (int i = 0; i < 3; ++i) {
    if (parts[i]->data() == nullptr) continue;
    storage.push_back(parts[i]->to(device));
    views[i] = storage.back().view();
  }
  return Weight::of(QuantizedWeight{q.weight.spec, q.weight.rows, q.weight.cols, views[0], views[1], views[2]});
}

// Every tensor converted on the host, checked, quantized if asked, then moved.
class CheckpointSource : public detail::WeightSource {
 public:
  CheckpointSource(const Checkpoint& checkpoint, const LoadOptions& options) : checkpoint_(checkpoint), options_(options) {}

  Array dense(const Expected& e) override { return host(e).to(options_.device); }

  // A projection: dense, or quantized on load.
  Weight weight(const Expected& e, std::vector<Array>& storage) override {
    Array values = host(e);
    if (!options_.quantize) {
      storage.push_back(values.to(options_.device));
      return Weight::of(storage.back().view());
    }
    QuantizedArray q = make_quantized(*options_.quantize, e.shape[0], e.shape[1], options_.dtype);
    quantize(values, q.weight, {"cpu"});
    return store_quantized(q, options_.device, storage);
  }

 private:
  Array host(const Expected& e) {
    if (!checkpoint_.contains(e.name)) throw Error(fmt::format("checkpoint: {}: missing (expected {})", e.name, shape_text(e.shape)));
    const Tensor src = checkpoint_.tensor(e.name);
    const std::span<const int64_t> shape(src.shape.data(), size_t(src.rank));
    if (!std::equal(shape.begin(), shape.end(), e.shape.begin(), e.shape.end())) {
      throw Error(fmt::format("checkpoint: {}: expected {}, got {}", e.name, shape_text(e.shape), shape_text(shape)));
    }
    Array out(options_.dtype, e.shape);
    const int64_t n = src.numel();
    if (src.dtype == options_.dtype) {
      std::memcpy(out.data(), src.data, src.nbytes());
    } else {
      for (int64_t i = 0; i < n; ++i) reference::store(out, i, reference::load(src, i));
    }
    if (options_.check_finite) {
      for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(reference::load(out, i))) {
          throw Error(fmt::format("checkpoint: {}: expected finite weights, got {} at element {}", e.name,
                                  reference::load(out, i), i));
        }
      }
    }
    return out;
  }

  const Checkpoint& checkpoint_;
  const LoadOptions& options_;
};

// Random tensors made straight in their final layout: norms of ones; dense values and q/k/v
// biases uniform in +-0.04 (about the N(0, 0.02) of a fresh Hugging Face model); quantized
// weights as random codes under scales and biases that decode to about the same range.
// xorshift64, one stream per tensor.
class RandomSource : public detail::WeightSource {
 public:
  RandomSource(const LoadOptions& options, uint64_t seed) : options_(options), state_(seed * 0x9E3779B97F4A7C15ull + 1) {}

  Array dense(const Expected& e) override {
    Array out(options_.dtype, e.shape);
    const bool norm = e.shape.size() == 1 && !e.is_bias;
    for (int64_t i = 0; i < out.numel(); ++i) reference::store(out, i, norm ? 1.0 : 0.04 * uniform());
    return out.to(options_.device);
  }

  Weight weight(const Expected& e, std::vector<Array>& storage) override {
    if (!options_.quantize) {
      storage.push_back(dense(e));
      return Weight::of(storage.back().view());
    }
    const QuantSpec& spec = *options_.quantize;
    QuantizedArray q = make_quantized(spec, e.shape[0], e.shape[1], options_.dtype);
    fill_bytes(q.packed);
    const double step = 0.08 / double((1 << spec.bits) - 1);  // codes span +-0.04
    if (spec.format == QuantFormat::mlx_affine) {
      for (int64_t i = 0; i < q.scales.numel(); ++i) {
        reference::store(q.scales, i, step);
        reference::store(q.biases, i, -0.04);
      }
    } else {
      // Each GGUF block starts with its f16 scale d, of random sign as a quantizer's would be: Q4_0's
      // codes q - 8 in [-8, 7] average -0.5, and one sign for all would bias every output by the
      // same amount, which 32 layers of residuals grow past f16's range.
      const int64_t block = gguf_block_bytes(spec.format), blocks = q.packed.numel() / block;
      const float d = float(spec.format == QuantFormat::gguf_q4_0 ? 0.04 / 8 : 0.04 / 128);
      const uint16_t d_bits[2] = {f32_to_f16(d), f32_to_f16(-d)};
      for (int64_t b = 0; b < blocks; ++b) {
        std::memcpy(q.packed.ptr<uint8_t>() + b * block, &d_bits[next() & 1], sizeof(uint16_t));
      }
    }
    return store_quantized(q, options_.device, storage);
  }

 private:
  uint64_t next() {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return state_;
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-52 - 1.0; }  // [-1, 1)
  void fill_bytes(const Array& a) {
    auto* bytes = static_cast<unsigned char*>(a.data());
    const size_t n = a.nbytes();
    for (size_t i = 0; i < n; i += 8) {
      const uint64_t r = next();
      std::memcpy(bytes + i, &r, std::min<size_t>(8, n - i));
    }
  }

  const LoadOptions& options_;
  uint64_t state_;
};

}  // namespace

LlamaModel LlamaModel::load(const std::filesystem::path& dir, const LoadOptions& options) {
  return from_checkpoint(load_model_config(dir), Checkpoint(dir), options);
}

LlamaModel LlamaModel::from_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint,
                                       const LoadOptions& options) {
  // Every tensor of the checkpoint must be one we use (rotary inv_freq buffers that old Llama
  // checkpoints carry are recomputed, not weights).
  std::set<std::string, std::less<>> names;
  for (const Expected& e : expected_tensors(config)) names.insert(e.name);
  for (const std::string& name : checkpoint.names()) {
    if (!names.contains(name) && !name.ends_with("self_attn.rotary_emb.inv_freq")) {
      throw Error(fmt::format("checkpoint: {}: not a tensor of a {} model with this config", name,
                              model_type_name(config.model_type)));
    }
  }
  CheckpointSource source(checkpoint, options);
  return build(config, options, source);
}

LlamaModel LlamaModel::random(const ModelConfig& config, const LoadOptions& options, uint64_t seed) {
  RandomSource source(options, seed);
  return build(config, options, source);
}

LlamaModel LlamaModel::build(const ModelConfig& config, const LoadOptions& options, detail::WeightSource& source) {
  if (!is_float_activation(options.dtype)) {
    throw Error(fmt::format("LlamaModel: options.dtype: expected f32, f16 or bf16, got {}", dtype_name(options.dtype)));
  }
  const std::vector<Expected> expected = expected_tensors(config);
  LlamaModel m;
  m.config_ = config;
  m.options_ = options;
  DecodeLayerConfig& lc = m.layer_config_;
  lc.hidden = config.hidden_size;
  lc.num_heads = config.num_attention_heads;
  lc.num_kv_heads = config.num_key_value_heads;
  lc.head_dim = config.head_dim;
  lc.intermediate = config.intermediate_size;
  lc.rms_eps = float(config.rms_norm_eps);
  lc.rope = RopeParams{float(config.rope_theta), RopeStyle::half_split, int(config.head_dim),
                       config.rope_scaling.has_value(), config.rope_scaling.value_or(Llama3Scaling{})};

  size_t at = 0;
  m.embed_ = source.dense(expected[at++]);
  m.final_norm_ = source.dense(expected[at++]);
  if (config.tie_word_embeddings) {
    m.lm_head_ = source.weight(Expected{"model.embed_tokens.weight", {config.vocab_size, config.hidden_size}}, m.storage_);
  } else {
    m.lm_head_ = source.weight(expected[at++], m.storage_);
  }
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    DecodeLayerWeights w;
    m.storage_.push_back(source.dense(expected[at++]));
    w.attn_norm = m.storage_.back().view();
    w.wq = source.weight(expected[at++], m.storage_);
    w.wk = source.weight(expected[at++], m.storage_);
    w.wv = source.weight(expected[at++], m.storage_);
    if (config.attention_bias) {
      for (Tensor* bias : {&w.bq, &w.bk, &w.bv}) {
        m.storage_.push_back(source.dense(expected[at++]));
        *bias = m.storage_.back().view();
      }
    }
    w.wo = source.weight(expected[at++], m.storage_);
    m.storage_.push_back(source.dense(expected[at++]));
    w.mlp_norm = m.storage_.back().view();
    w.gate = source.weight(expected[at++], m.storage_);
    w.up = source.weight(expected[at++], m.storage_);
    w.down = source.weight(expected[at++], m.storage_);
    m.layers_.push_back(w);
  }
  return m;
}

int64_t LlamaModel::weight_bytes_per_token() const {
  const auto bytes = [](const Weight& w) -> int64_t {
    if (!w.is_quantized) return int64_t(w.dense.nbytes());
    return int64_t(w.quantized.packed.nbytes() + w.quantized.scales.nbytes() + w.quantized.biases.nbytes());
  };
  int64_t total = bytes(lm_head_) + int64_t(final_norm_.nbytes()) + config_.hidden_size * int64_t(dtype_size(options_.dtype));
  for (const DecodeLayerWeights& w : layers_) {
    total += int64_t(w.attn_norm.nbytes() + w.mlp_norm.nbytes());
    for (const Tensor* bias : {&w.bq, &w.bk, &w.bv}) {
      if (has_bias(*bias)) total += int64_t(bias->nbytes());
    }
    for (const Weight* p : {&w.wq, &w.wk, &w.wv, &w.wo, &w.gate, &w.up, &w.down}) total += bytes(*p);
  }
  return total;
}

void write_random_llama(const std::filesystem::path& dir, const ModelConfig& config, DType dtype, uint64_t seed) {
  std::filesystem::create_directories(dir);
  verify::Rng rng(seed);
  std::vector<Array> arrays;
  std::vector<NamedTensor> named;
  for (const Expected& e : expected_tensors(config)) {
    const bool norm = e.shape.size() == 1 && !e.is_bias;
    // Hugging Face's initialization scale; norms near 1 so that every layer matters.
    arrays.push_back(verify::random_array(dtype, e.shape, rng, 0.02, norm ? 1.0 : 0.0));
  }
  size_t i = 0;
  for (const Expected& e : expected_tensors(config)) named.emplace_back(e.name, arrays[i++].view());
  write_safetensors(dir / "model.safetensors", named);
  FILE* f = std::fopen((dir / "config.json").c_str(), "wb");
  if (f == nullptr) throw Error(fmt::format("write_random_llama: {}: cannot be written", (dir / "config.json").string()));
  const std::string text = to_json(config);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
}

}  // namespace decodelab
