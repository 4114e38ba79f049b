// config.json of the Llama family (Llama 2/3, Mistral, Qwen2), as transformers writes it
// (LlamaConfig, MistralConfig, Qwen2Config). Every key is either read, checked to hold the one
// value this library implements, or known to be informational; any other key is refused.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <set>
#include <span>

#include "decodelab/checkpoint.h"
#include "decodelab/error.h"
#include "model/json.h"

namespace decodelab {
namespace {

using json = nlohmann::json;
using detail::describe_json;

constexpr std::array<std::string_view, 3> kModelTypes = {"llama", "mistral", "qwen2"};
constexpr std::array<std::string_view, 3> kArchitectures = {"LlamaForCausalLM", "MistralForCausalLM",
                                                            "Qwen2ForCausalLM"};

// Keys that do not change the decode computation (token ids are the caller's business, dropout
// and initialization are for training, use_cache and the rest are bookkeeping).
// max_window_layers only matters with Qwen2's sliding window, which is refused below.
constexpr std::array<std::string_view, 10> kInformationalKeys = {
    "_name_or_path", "architectures",     "attention_dropout", "bos_token_id",        "eos_token_id",
    "initializer_range", "max_window_layers", "pad_token_id", "transformers_version", "use_cache"};

// Reads the fields of one JSON object and remembers which keys it consumed, so that the rest can
// be refused by name. `prefix` names nested objects in errors ("rope_scaling.").
class FieldReader {
 public:
  FieldReader(const json& object, std::string_view source, std::string prefix)
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  [[noreturn]] void fail(std::string_view key, std::string_view expected, std::string_view actual) const {
    decodelab::fail(source_, prefix_ + std::string(key), expected, actual);
  }

  // The value of `key`, or nullptr when it is absent or null (transformers reads null as "use
  // the default", and writes it for unset optional fields).
  const json* find(std::string_view key) {
    used_.insert(std::string(key));
    const auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }

  const json& require(std::string_view key, std::string_view expected) {
    const json* value = find(key);
    if (value == nullptr) fail(key, expected, "no value (the key is missing or null)");
    return *value;
  }

  // Sizes: integers in [1, 2^31 - 1], so that products of two of them cannot overflow int64.
  int64_t size(std::string_view key) { return size_value(key, require(key, kSizeExpected)); }
  int64_t size_or(std::string_view key, int64_t fallback) {
    const json* value = find(key);
    return value == nullptr ? fallback : size_value(key, *value);
  }

  // Finite numbers; `minimum_exclusive` gives "> minimum" instead of ">= minimum".
  double number(std::string_view key, double minimum, bool minimum_exclusive) {
    return number_value(key, require(key, "a number"), minimum, minimum_exclusive);
  }
  double number_or(std::string_view key, double fallback, double minimum, bool minimum_exclusive) {
    const json* value = find(key);
    return value == nullptr ? fallback : number_value(key, *value, minimum, minimum_exclusive);
  }

  bool boolean_or(std::string_view key, bool fallback) {
    const json* value = find(key);
    if (value == nullptr) return fallback;
    if (!value->is_boolean()) fail(key, "true or false", describe_json(*value));
    return value->get<bool>();
  }

  std::string string(std::string_view key) { return string_value(key, require(key, "a string")); }
  std::string string_or(std::string_view key, std::string fallback) {
    const json* value = find(key);
    return value == nullptr ? fallback : string_value(key, *value);
  }

  // A key that may be absent but, when given, must hold the only value this library implements.
  void only_value(std::string_view key, const json& expected, std::string_view why) {
    const json* value = find(key);
    if (value != nullptr && *value != expected) {
      fail(key, fmt::format("{} ({})", expected.dump(), why), describe_json(*value));
    }
  }

  // Refuses every key that was not read and is not in `ignored`.
  void refuse_unknown_keys(std::span<const std::string_view> ignored) const {
    for (const auto& [key, value] : object_.items()) {
      if (used_.contains(key)) continue;
      if (std::find(ignored.begin(), ignored.end(), key) != ignored.end()) continue;
      fail(key, "a key this library reads or knows to be informational",
           "an unknown key (a feature this library does not implement is refused, not ignored)");
    }
  }

 private:
  static constexpr std::string_view kSizeExpected = "a positive integer below 2^31";

  int64_t size_value(std::string_view key, const json& value) const {
    // Integers parse as unsigned when non-negative, as signed when negative.
    if (!value.is_number_unsigned() || value.get<uint64_t>() < 1 || value.get<uint64_t>() > INT32_MAX) {
      fail(key, kSizeExpected, describe_json(value));
    }
    return int64_t(value.get<uint64_t>());
  }

  double number_value(std::string_view key, const json& value, double minimum, bool minimum_exclusive) const {
    const std::string expected = fmt::format("a finite number {} {}", minimum_exclusive ? ">" : ">=", minimum);
    if (!value.is_number()) fail(key, expected, describe_json(value));
    const double x = value.get<double>();
    if (!std::isfinite(x) || x < minimum || (minimum_exclusive && x == minimum)) {
      fail(key, expected, describe_json(value));
    }
    return x;
  }

  std::string string_value(std::string_view key, const json& value) const {
    if (!value.is_string()) fail(key, "a string", describe_json(value));
    return value.get<std::string>();
  }

  const json& object_;
  std::string_view source_;
  std::string prefix_;
  std::set<std::string, std::less<>> used_;
};

// rope_scaling {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
// "original_max_position_embeddings"}; transformers before 4.43 spelled rope_type "type".
Llama3Scaling parse_rope_scaling(const json& value, std::string_view source) {
  if (!value.is_object()) fail(source, "rope_scaling", "null or an object", describe_json(value));
  FieldReader r(value, source, "rope_scaling.");
  const std::string rope_type = r.string_or("rope_type", "");
  const std::string type = r.string_or("type", "");
  if (!rope_type.empty() && !type.empty() && rope_type != type) {
    r.fail("type", fmt::format("the value of rope_type ({})", json(rope_type).dump()), json(type).dump());
  }
  const std::string kind = rope_type.empty() ? type : rope_type;
  if (kind != "llama3") {
    r.fail(rope_type.empty() ? "type" : "rope_type", "\"llama3\" (the only rope scaling implemented)",
           kind.empty() ? "no value" : json(kind).dump());
  }
  Llama3Scaling s;
  s.factor = float(r.number("factor", 1.0, false));
  s.low_freq_factor = float(r.number("low_freq_factor", 0.0, true));
  // The smooth interpolation between the two divides by high - low.
  s.high_freq_factor = float(r.number("high_freq_factor", s.low_freq_factor, true));
  s.original_max_position = int(r.size("original_max_position_embeddings"));
  r.refuse_unknown_keys({});
  return s;
}

}  // namespace

std::string_view model_type_name(ModelType t) { return kModelTypes[size_t(t)]; }

ModelConfig parse_model_config(std::string_view text, std::string_view source) {
  const json root = detail::parse_json_strict(text, source);
  FieldReader r(root, source, "");
  if (!root.is_object()) fail(source, "JSON", "an object", describe_json(root));
  ModelConfig c;

  const std::string model_type = r.string("model_type");
  const auto type = std::find(kModelTypes.begin(), kModelTypes.end(), model_type);
  if (type == kModelTypes.end()) r.fail("model_type", "one of llama, mistral, qwen2", json(model_type).dump());
  c.model_type = ModelType(type - kModelTypes.begin());

  c.hidden_size = r.size("hidden_size");
  c.intermediate_size = r.size("intermediate_size");
  c.num_attention_heads = r.size("num_attention_heads");
  c.num_key_value_heads = r.size_or("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    r.fail("num_key_value_heads", fmt::format("a divisor of num_attention_heads ({})", c.num_attention_heads),
           std::to_string(c.num_key_value_heads));
  }
  if (r.find("head_dim") == nullptr && c.hidden_size % c.num_attention_heads != 0) {
    r.fail("hidden_size", fmt::format("a multiple of num_attention_heads ({}) when head_dim is absent",
                                      c.num_attention_heads),
           std::to_string(c.hidden_size));
  }
  c.head_dim = r.size_or("head_dim", c.hidden_size / c.num_attention_heads);
  if (c.head_dim % 2 != 0) r.fail("head_dim", "an even size (RoPE rotates pairs)", std::to_string(c.head_dim));
  c.num_hidden_layers = r.size("num_hidden_layers");
  c.vocab_size = r.size("vocab_size");
  c.max_position_embeddings = r.size("max_position_embeddings");
  c.rms_norm_eps = r.number("rms_norm_eps", 0.0, true);
  c.rope_theta = r.number_or("rope_theta", 10000.0, 0.0, true);
  if (const json* scaling = r.find("rope_scaling")) c.rope_scaling = parse_rope_scaling(*scaling, source);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);

  // Qwen2's attention always has q/k/v biases (transformers hardcodes them), with or without the key.
  const bool is_qwen2 = c.model_type == ModelType::qwen2;
  c.attention_bias = r.boolean_or("attention_bias", is_qwen2);
  if (is_qwen2 && !c.attention_bias) {
    r.fail("attention_bias", "true or absent for qwen2 (its q/k/v projections always have biases)", "false");
  }

  // transformers 4.56 renamed torch_dtype to dtype; a config may carry both.
  c.torch_dtype = r.string_or("torch_dtype", "");
  const std::string dtype = r.string_or("dtype", c.torch_dtype);
  if (!c.torch_dtype.empty() && dtype != c.torch_dtype) {
    r.fail("dtype", fmt::format("the value of torch_dtype ({})", json(c.torch_dtype).dump()), json(dtype).dump());
  }
  c.torch_dtype = dtype;

  // Sliding-window attention is not implemented: refuse a window that would ever slide.
  const bool use_sliding_window = r.boolean_or("use_sliding_window", false);
  const bool window_used = !is_qwen2 || use_sliding_window;
  const int64_t window = r.size_or("sliding_window", c.max_position_embeddings);
  if (window_used && window < c.max_position_embeddings) {
    r.fail("sliding_window",
           fmt::format("null or at least max_position_embeddings ({}): sliding-window attention is not supported",
                       c.max_position_embeddings),
           std::to_string(window));
  }

  r.only_value("hidden_act", "silu", "the SwiGLU MLP of the Llama family");
  r.only_value("pretraining_tp", 1, "tensor-parallel slicing of the training run is not reproduced");
  r.only_value("mlp_bias", false, "the MLP projections have no biases");
  r.refuse_unknown_keys(kInformationalKeys);
  return c;
}

ModelConfig load_model_config(const std::filesystem::path& path) {
  const std::filesystem::path file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  return parse_model_config(detail::read_text_file(file), file.string());
}

std::string to_json(const ModelConfig& c) {
  json j = {
      {"architectures", json::array({kArchitectures[size_t(c.model_type)]})},
      {"model_type", model_type_name(c.model_type)},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"num_hidden_layers", c.num_hidden_layers},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", nullptr},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"attention_bias", c.attention_bias},
      {"hidden_act", "silu"},
      // transformers' Mistral defaults to a 4096-token window when the key is absent.
      {"sliding_window", nullptr},
  };
  if (c.rope_scaling) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope_scaling->factor},
                         {"low_freq_factor", c.rope_scaling->low_freq_factor},
                         {"high_freq_factor", c.rope_scaling->high_freq_factor},
                         {"original_max_position_embeddings", c.rope_scaling->original_max_position}};
  }
  if (!c.torch_dtype.empty()) j["torch_dtype"] = c.torch_dtype;
  return j.dump(2) + "\n";
}

}  // namespace decodelab
