// Checkpoint loading: config.json of the Llama family, safetensors headers (every failure mode
// names the problem), memory-mapped reading, writing, and sharded checkpoints.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "decodelab/checkpoint.h"
#include "decodelab/error.h"
#include "error_of.h"
#include "verify/random.h"

namespace decodelab {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// config.json

// meta-llama/Meta-Llama-3-8B, as published.
constexpr const char* kLlama3_8B = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// mistralai/Mistral-7B-Instruct-v0.3: no window (v0.1 had a 4096-token one).
constexpr const char* kMistral7B = R"({
  "architectures": ["MistralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.0.dev0",
  "use_cache": true,
  "vocab_size": 32768
})";

// Qwen/Qwen2-7B-Instruct: a sliding_window that use_sliding_window turns off, no attention_bias
// key although its q/k/v projections have biases.
constexpr const char* kQwen2_7B = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 18944,
  "max_position_embeddings": 32768,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 28,
  "num_hidden_layers": 28,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.41.2",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 152064
})";

// Llama 3.1's frequency scaling, as in meta-llama/Llama-3.1-8B.
const json kLlama31Scaling = {{"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                              {"original_max_position_embeddings", 8192}, {"rope_type", "llama3"}};

// `base` with `edit` applied to its JSON, parsed under the name "config.json".
ModelConfig parse_edited(const char* base, const std::function<void(json&)>& edit) {
  json j = json::parse(base);
  edit(j);
  return parse_model_config(j.dump(), "config.json");
}

std::string config_error(const char* base, const std::function<void(json&)>& edit) {
  return error_of([&] { parse_edited(base, edit); });
}

TEST(ModelConfig, Llama3_8B) {
  const ModelConfig c = parse_model_config(kLlama3_8B, "config.json");
  EXPECT_EQ(c.model_type, ModelType::llama);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_FALSE(c.rope_scaling.has_value());
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
}

TEST(ModelConfig, Llama31RopeScaling) {
  const ModelConfig c = parse_edited(kLlama3_8B, [](json& j) {
    j["rope_scaling"] = kLlama31Scaling;
    j["max_position_embeddings"] = 131072;
    j["mlp_bias"] = false;
  });
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_EQ(c.rope_scaling->factor, 8.0f);
  EXPECT_EQ(c.rope_scaling->low_freq_factor, 1.0f);
  EXPECT_EQ(c.rope_scaling->high_freq_factor, 4.0f);
  EXPECT_EQ(c.rope_scaling->original_max_position, 8192);
  // transformers before 4.43 wrote "type" instead of "rope_type".
  const ModelConfig old = parse_edited(kLlama3_8B, [](json& j) {
    j["rope_scaling"] = kLlama31Scaling;
    j["rope_scaling"].erase("rope_type");
    j["rope_scaling"]["type"] = "llama3";
  });
  EXPECT_TRUE(old.rope_scaling.has_value());
}

TEST(ModelConfig, Mistral7B) {
  const ModelConfig c = parse_model_config(kMistral7B, "config.json");
  EXPECT_EQ(c.model_type, ModelType::mistral);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.vocab_size, 32768);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_FALSE(c.attention_bias);
}

TEST(ModelConfig, Qwen2_7B) {
  const ModelConfig c = parse_model_config(kQwen2_7B, "config.json");
  EXPECT_EQ(c.model_type, ModelType::qwen2);
  EXPECT_EQ(c.hidden_size, 3584);
  EXPECT_EQ(c.num_attention_heads, 28);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.vocab_size, 152064);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_TRUE(c.attention_bias);  // implied by the model type
}

TEST(ModelConfig, DefaultsAndExplicitHeadDim) {
  const ModelConfig c = parse_edited(kLlama3_8B, [](json& j) {
    for (const char* key : {"num_key_value_heads", "rope_theta", "tie_word_embeddings", "attention_bias", "torch_dtype"}) {
      j.erase(key);
    }
  });
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.torch_dtype, "");
  // Mistral-Nemo: head_dim 128 although 5120 / 32 = 160.
  const ModelConfig nemo = parse_edited(kMistral7B, [](json& j) {
    j["hidden_size"] = 5120;
    j["head_dim"] = 128;
  });
  EXPECT_EQ(nemo.head_dim, 128);
  // The newer transformers key for torch_dtype.
  const ModelConfig renamed = parse_edited(kLlama3_8B, [](json& j) {
    j.erase("torch_dtype");
    j["dtype"] = "float16";
  });
  EXPECT_EQ(renamed.torch_dtype, "float16");
}

TEST(ModelConfig, RoundTrip) {
  for (const char* text : {kLlama3_8B, kMistral7B, kQwen2_7B}) {
    const ModelConfig c = parse_model_config(text, "config.json");
    const std::string written = to_json(c);
    EXPECT_EQ(to_json(parse_model_config(written, "written")), written);
  }
  ModelConfig c = parse_edited(kLlama3_8B, [](json& j) {
    j["rope_scaling"] = kLlama31Scaling;
    j["tie_word_embeddings"] = true;
    j["head_dim"] = 64;
    j["rms_norm_eps"] = 3e-7;
  });
  const ModelConfig back = parse_model_config(to_json(c), "written");
  EXPECT_EQ(to_json(back), to_json(c));
  EXPECT_EQ(back.head_dim, 64);
  EXPECT_EQ(back.rms_norm_eps, 3e-7);
  EXPECT_TRUE(back.tie_word_embeddings);
  ASSERT_TRUE(back.rope_scaling.has_value());
  EXPECT_EQ(back.rope_scaling->original_max_position, 8192);
}

TEST(ModelConfig, LoadFromDirectoryOrFile) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("decodelab-config-{}", ::getpid());
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << kMistral7B;
  EXPECT_EQ(load_model_config(dir).model_type, ModelType::mistral);
  EXPECT_EQ(load_model_config(dir / "config.json").vocab_size, 32768);
  const std::string missing = (dir / "nope.json").string();
  EXPECT_ERROR(load_model_config(missing), missing + ": file: expected a readable file, got a file that cannot be opened");
  fs::remove_all(dir);
}

TEST(ModelConfig, SizeErrors) {
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["num_key_value_heads"] = 5; }),
            "config.json: num_key_value_heads: expected a divisor of num_attention_heads (32), got 5");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["hidden_size"] = 4100; }),
            "config.json: hidden_size: expected a multiple of num_attention_heads (32) when head_dim is absent, got 4100");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["head_dim"] = 127; }),
            "config.json: head_dim: expected an even size (RoPE rotates pairs), got 127");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["hidden_size"] = 0; }),
            "config.json: hidden_size: expected a positive integer below 2^31, got 0");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["intermediate_size"] = -14336; }),
            "config.json: intermediate_size: expected a positive integer below 2^31, got -14336");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["vocab_size"] = 1ull << 31; }),
            "config.json: vocab_size: expected a positive integer below 2^31, got 2147483648");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j.erase("num_hidden_layers"); }),
            "config.json: num_hidden_layers: expected a positive integer below 2^31, got no value (the key is missing or null)");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["rms_norm_eps"] = 0; }),
            "config.json: rms_norm_eps: expected a finite number > 0, got 0");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["rope_theta"] = -1.0; }),
            "config.json: rope_theta: expected a finite number > 0, got -1.0");
}

TEST(ModelConfig, TypeErrors) {
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["hidden_size"] = "4096"; }),
            "config.json: hidden_size: expected a positive integer below 2^31, got \"4096\"");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["num_attention_heads"] = 32.5; }),
            "config.json: num_attention_heads: expected a positive integer below 2^31, got 32.5");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["tie_word_embeddings"] = "false"; }),
            "config.json: tie_word_embeddings: expected true or false, got \"false\"");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["rms_norm_eps"] = "1e-5"; }),
            "config.json: rms_norm_eps: expected a finite number > 0, got \"1e-5\"");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["model_type"] = 7; }),
            "config.json: model_type: expected a string, got 7");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["rope_scaling"] = 8; }),
            "config.json: rope_scaling: expected null or an object, got 8");
  EXPECT_EQ(error_of([] { parse_model_config("[1, 2]", "config.json"); }),
            "config.json: JSON: expected an object, got [1,2]");
  EXPECT_EQ(error_of([] { parse_model_config("{\"hidden_size\": 1, \"hidden_size\": 2}", "config.json"); }),
            "config.json: \"hidden_size\": expected a key that appears once in its object, got a duplicate key");
  EXPECT_EQ(error_of([] { parse_model_config("{\"hidden_size\": ", "config.json"); }).substr(0, 52),
            "config.json: JSON: expected valid JSON, got [json.ex");
  EXPECT_EQ(error_of([] { parse_model_config("{\"rms_norm_eps\": 1e999}", "config.json"); }).substr(0, 52),
            "config.json: JSON: expected valid JSON, got [json.ex");
}

TEST(ModelConfig, UnsupportedFeatures) {
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["model_type"] = "gemma"; }),
            "config.json: model_type: expected one of llama, mistral, qwen2, got \"gemma\"");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["quantization_config"] = {{"bits", 4}}; }),
            "config.json: quantization_config: expected a key this library reads or knows to be informational, "
            "got an unknown key (a feature this library does not implement is refused, not ignored)");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["hidden_act"] = "gelu"; }),
            "config.json: hidden_act: expected \"silu\" (the SwiGLU MLP of the Llama family), got \"gelu\"");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["pretraining_tp"] = 2; }),
            "config.json: pretraining_tp: expected 1 (tensor-parallel slicing of the training run is not reproduced), got 2");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) { j["mlp_bias"] = true; }),
            "config.json: mlp_bias: expected false (the MLP projections have no biases), got true");
  // Mistral-7B-v0.1 slides a 4096-token window over a 32768-token context.
  EXPECT_EQ(config_error(kMistral7B, [](json& j) { j["sliding_window"] = 4096; }),
            "config.json: sliding_window: expected null or at least max_position_embeddings (32768): "
            "sliding-window attention is not supported, got 4096");
  EXPECT_EQ(config_error(kQwen2_7B, [](json& j) {
              j["use_sliding_window"] = true;
              j["sliding_window"] = 4096;
            }),
            "config.json: sliding_window: expected null or at least max_position_embeddings (32768): "
            "sliding-window attention is not supported, got 4096");
  EXPECT_EQ(config_error(kQwen2_7B, [](json& j) { j["attention_bias"] = false; }),
            "config.json: attention_bias: expected true or absent for qwen2 (its q/k/v projections always have "
            "biases), got false");
  EXPECT_EQ(config_error(kLlama3_8B, [](json& j) {
              j.erase("torch_dtype");
              j["torch_dtype"] = "bfloat16";
              j["dtype"] = "float32";
            }),
            "config.json: dtype: expected the value of torch_dtype (\"bfloat16\"), got \"float32\"");
}

TEST(ModelConfig, RopeScalingErrors) {
  const auto scaling_error = [](const std::function<void(json&)>& edit) {
    return config_error(kLlama3_8B, [&](json& j) {
      j["rope_scaling"] = kLlama31Scaling;
      edit(j["rope_scaling"]);
    });
  };
  EXPECT_EQ(scaling_error([](json& s) { s = {{"rope_type", "linear"}, {"factor", 2.0}}; }),
            "config.json: rope_scaling.rope_type: expected \"llama3\" (the only rope scaling implemented), got \"linear\"");
  EXPECT_EQ(scaling_error([](json& s) { s = {{"type", "dynamic"}, {"factor", 2.0}}; }),
            "config.json: rope_scaling.type: expected \"llama3\" (the only rope scaling implemented), got \"dynamic\"");
  EXPECT_EQ(scaling_error([](json& s) { s.erase("rope_type"); }),
            "config.json: rope_scaling.type: expected \"llama3\" (the only rope scaling implemented), got no value");
  EXPECT_EQ(scaling_error([](json& s) { s.erase("factor"); }),
            "config.json: rope_scaling.factor: expected a number, got no value (the key is missing or null)");
  EXPECT_EQ(scaling_error([](json& s) { s["factor"] = 0.5; }),
            "config.json: rope_scaling.factor: expected a finite number >= 1, got 0.5");
  EXPECT_EQ(scaling_error([](json& s) { s["high_freq_factor"] = 1.0; }),
            "config.json: rope_scaling.high_freq_factor: expected a finite number > 1, got 1.0");
  EXPECT_EQ(scaling_error([](json& s) { s["original_max_position_embeddings"] = 8192.5; }),
            "config.json: rope_scaling.original_max_position_embeddings: expected a positive integer below 2^31, got 8192.5");
  EXPECT_EQ(scaling_error([](json& s) { s["beta_fast"] = 32; }),
            "config.json: rope_scaling.beta_fast: expected a key this library reads or knows to be informational, "
            "got an unknown key (a feature this library does not implement is refused, not ignored)");
}

// ---------------------------------------------------------------------------------------------
// safetensors headers

// A whole file: the 8-byte length (of `header`, or `length` when given), the header, then
// `data_bytes` bytes of data.
std::vector<uint8_t> file_with(const std::string& header, size_t data_bytes, std::optional<uint64_t> length = {}) {
  std::vector<uint8_t> file(8 + header.size() + data_bytes, 0xA5);
  const uint64_t n = length.value_or(header.size());
  std::memcpy(file.data(), &n, 8);
  std::memcpy(file.data() + 8, header.data(), header.size());
  return file;
}

std::string header_error(const std::string& header, size_t data_bytes, std::optional<uint64_t> length = {}) {
  const std::vector<uint8_t> file = file_with(header, data_bytes, length);
  return error_of([&] { parse_safetensors_header(file, "t.safetensors"); });
}

TEST(SafetensorsHeader, Valid) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[3],"data_offsets":[24,30]},)"
      R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"s":{"dtype":"I64","shape":[],"data_offsets":[30,38]},)"
      R"("e":{"dtype":"BF16","shape":[0,5],"data_offsets":[38,38]}}   )";
  const std::vector<uint8_t> file = file_with(header, 38);
  const SafetensorsHeader h = parse_safetensors_header(file, "t.safetensors");
  EXPECT_EQ(h.data_offset, 8 + header.size());
  EXPECT_EQ(h.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  ASSERT_EQ(h.entries.size(), 4u);
  EXPECT_EQ(h.entries[0].name, "a");  // sorted by name
  EXPECT_EQ(h.entries[0].dtype, SafetensorsDType::F32);
  EXPECT_EQ(h.entries[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(h.entries[0].begin, 0u);
  EXPECT_EQ(h.entries[0].end, 24u);
  EXPECT_EQ(h.find("s")->dtype, SafetensorsDType::I64);
  EXPECT_TRUE(h.find("s")->shape.empty());
  EXPECT_EQ(h.find("e")->shape, (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(h.find("zz"), nullptr);
  // No tensor at all: the reference writer's empty file.
  EXPECT_TRUE(parse_safetensors_header(file_with("{}      ", 0), "t").entries.empty());
}

TEST(SafetensorsHeader, LengthErrors) {
  const std::vector<uint8_t> truncated = {8, 0, 0, 0, 0};
  EXPECT_ERROR(parse_safetensors_header(truncated, "t.safetensors"),
               "t.safetensors: header length: expected an 8-byte little-endian prefix, got a file of 5 bytes");
  EXPECT_EQ(header_error("{}", 0, 3), "t.safetensors: header length: expected at most 2 bytes (the rest of the file), got 3");
  EXPECT_EQ(header_error("{}", 4, 7), "t.safetensors: header length: expected at most 6 bytes (the rest of the file), got 7");
  EXPECT_EQ(header_error("{}", 0, 100'000'001),
            "t.safetensors: header length: expected at most 100000000 bytes, got 100000001");
  EXPECT_EQ(header_error("{}", 0, uint64_t(-1)),
            "t.safetensors: header length: expected at most 100000000 bytes, got 18446744073709551615");
  EXPECT_EQ(header_error("", 0), "t.safetensors: header: expected a JSON object starting with '{', got an empty header");
  EXPECT_EQ(header_error(" {}", 0), "t.safetensors: header: expected a JSON object starting with '{', got first byte 0x20");
  EXPECT_EQ(header_error("[1]", 0), "t.safetensors: header: expected a JSON object starting with '{', got first byte 0x5b");
}

TEST(SafetensorsHeader, JsonErrors) {
  EXPECT_EQ(header_error(R"({"a":{"dtype":"F32",)", 0).substr(0, 68),
            "t.safetensors: header: JSON: expected valid JSON, got [json.exceptio");
  EXPECT_EQ(header_error("{\"\xff\":1}", 0).substr(0, 68),
            "t.safetensors: header: JSON: expected valid JSON, got [json.exceptio");
  EXPECT_EQ(header_error("{} x", 0).substr(0, 68), "t.safetensors: header: JSON: expected valid JSON, got [json.exceptio");
  EXPECT_EQ(header_error(R"({"a":1e500})", 0).substr(0, 68), "t.safetensors: header: JSON: expected valid JSON, got [json.exceptio");
  EXPECT_EQ(header_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4),
            "t.safetensors: header: \"a\": expected a key that appears once in its object, got a duplicate key");
  EXPECT_EQ(header_error(R"({"__metadata__":{"format":1}})", 0),
            "t.safetensors: __metadata__.\"format\": expected a string, got 1");
  EXPECT_EQ(header_error(R"({"__metadata__":["pt"]})", 0),
            "t.safetensors: __metadata__: expected an object of strings, got [\"pt\"]");
}

TEST(SafetensorsHeader, EntryErrors) {
  const auto entry_error = [](const std::string& entry, size_t data_bytes) {
    return header_error(R"({"w":)" + entry + "}", data_bytes);
  };
  EXPECT_EQ(entry_error("[1]", 0), "t.safetensors: tensor \"w\": entry: expected an object {dtype, shape, data_offsets}, got [1]");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","data_offsets":[0,4]})", 4),
            "t.safetensors: tensor \"w\": shape: expected a value, got none (the key is missing)");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4],"offset":0})", 4),
            "t.safetensors: tensor \"w\": \"offset\": expected only the keys dtype, shape, data_offsets, got another key");
  EXPECT_EQ(entry_error(R"({"dtype":"F17","shape":[1],"data_offsets":[0,4]})", 4),
            "t.safetensors: tensor \"w\": dtype: expected one of BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, "
            "F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64, got \"F17\"");
  EXPECT_EQ(entry_error(R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})", 4).substr(0, 55),
            "t.safetensors: tensor \"w\": dtype: expected one of BOOL,");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})", 4),
            "t.safetensors: tensor \"w\": shape: expected an array of non-negative integers, got [-1]");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})", 4),
            "t.safetensors: tensor \"w\": shape: expected an array of non-negative integers, got [1.0]");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":4,"data_offsets":[0,4]})", 4),
            "t.safetensors: tensor \"w\": shape: expected an array of non-negative integers, got 4");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,8]})", 4),
            "t.safetensors: tensor \"w\": data_offsets: expected [begin, end], two non-negative integers, got [0,4,8]");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})", 4),
            "t.safetensors: tensor \"w\": data_offsets: expected [begin, end], two non-negative integers, got [-4,0]");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,4]})", 4),
            "t.safetensors: tensor \"w\": shape: expected sizes below 2^63 and an element count below 2^64, "
            "got [4611686018427387904,4611686018427387904]");
  EXPECT_EQ(entry_error(R"({"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]})", 0),
            "t.safetensors: tensor \"w\": shape: expected sizes below 2^63 and an element count below 2^64, "
            "got [0,9223372036854775808]");
  EXPECT_EQ(entry_error(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,4]})", 4),
            "t.safetensors: tensor \"w\": shape: expected a byte size below 2^64, got [4611686018427387904]");
  EXPECT_EQ(entry_error(R"({"dtype":"F4","shape":[3],"data_offsets":[0,2]})", 2),
            "t.safetensors: tensor \"w\": shape: expected a whole number of bytes of F4, got [3]");
}

TEST(SafetensorsHeader, OffsetErrors) {
  const auto entry_error = [](const std::string& entries, size_t data_bytes) {
    return header_error("{" + entries + "}", data_bytes);
  };
  // Shape and byte range disagree.
  EXPECT_EQ(entry_error(R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]})", 20),
            "t.safetensors: tensor \"w\": data_offsets: expected 24 bytes for shape [2,3] F32, got [0,20] (20 bytes)");
  // Offsets past the data section, or reversed.
  EXPECT_EQ(entry_error(R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 7),
            "t.safetensors: tensor \"w\": data_offsets: expected begin <= end <= 7 (the size of the data section), got [0,8]");
  EXPECT_EQ(entry_error(R"("w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]})", 8),
            "t.safetensors: tensor \"w\": data_offsets: expected begin <= end <= 8 (the size of the data section), got [8,4]");
  // Two tensors over the same bytes.
  EXPECT_EQ(entry_error(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]})", 12),
            "t.safetensors: tensor \"b\": data_offsets: expected bytes from 8 on, after tensor \"a\" ending there, "
            "got [4, 12], overlapping it");
  EXPECT_EQ(entry_error(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8),
            "t.safetensors: tensor \"b\": data_offsets: expected bytes from 8 on, after tensor \"a\" ending there, "
            "got [0, 8], overlapping it");
  // Bytes no tensor owns: between tensors, before the first, after the last.
  EXPECT_EQ(entry_error(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]})", 12),
            "t.safetensors: data section: expected tensors covering every byte, with no gap, got bytes [4, 8) covered by no tensor");
  EXPECT_EQ(entry_error(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]})", 8),
            "t.safetensors: data section: expected tensors covering every byte, with no gap, got bytes [0, 4) covered by no tensor");
  EXPECT_EQ(entry_error(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})", 6),
            "t.safetensors: data section: expected tensors covering all 6 bytes, with no gap, got bytes [4, 6) covered by no tensor");
  // Empty tensors may sit on a boundary, not inside another tensor.
  EXPECT_EQ(entry_error(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0],"data_offsets":[8,8]})", 8), "");
  EXPECT_EQ(entry_error(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]})", 8),
            "t.safetensors: tensor \"z\": data_offsets: expected bytes from 8 on, after tensor \"a\" ending there, "
            "got [4, 4], overlapping it");
}

// ---------------------------------------------------------------------------------------------
// Files: writing, mapping, viewing

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / fmt::format("decodelab-{}-{}-{}", test->test_suite_name(), test->name(), ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes raw bytes to dir/name.
  fs::path write_bytes(const std::string& name, const std::vector<uint8_t>& bytes) const {
    std::ofstream(dir_ / name, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    return dir_ / name;
  }

  fs::path dir_;
};

// An array of `shape` whose bytes are random: every bit pattern, NaN payloads included, must
// survive a round trip.
Array random_bits(DType dtype, std::initializer_list<int64_t> shape, uint64_t seed) {
  Array a(dtype, shape);
  verify::Rng rng(seed);
  for (size_t i = 0; i < a.nbytes(); ++i) static_cast<uint8_t*>(a.data())[i] = uint8_t(rng.engine()());
  return a;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && (a.nbytes() == 0 || std::memcmp(a.data, b.data, a.nbytes()) == 0);
}

using SafetensorsFileTest = TempDir;

TEST_F(SafetensorsFileTest, RoundTripBitExact) {
  Array w16 = random_bits(DType::f16, {3, 5}, 1), wbf = random_bits(DType::bf16, {2, 3, 7}, 2);
  Array w32 = random_bits(DType::f32, {7}, 3), scalar = random_bits(DType::f32, {}, 4);
  Array empty(DType::f16, {0, 4}), four_d = random_bits(DType::bf16, {2, 1, 3, 2}, 5);
  const std::vector<NamedTensor> tensors = {{"model.layers.0.w16", w16}, {"wbf", wbf},     {"w32", w32},
                                            {"scalar", scalar},          {"empty", empty}, {"four_d", four_d}};
  const fs::path path = dir_ / "model.safetensors";
  write_safetensors(path, tensors);

  const SafetensorsFile file(path);
  EXPECT_EQ(file.names(), (std::vector<std::string>{"empty", "four_d", "model.layers.0.w16", "scalar", "w32", "wbf"}));
  EXPECT_EQ(file.header().metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ(file.header().data_offset % 8, 0u);  // the header is padded to 8 bytes
  for (const auto& [name, original] : tensors) {
    SCOPED_TRACE(name);
    const Tensor t = file.tensor(name);
    EXPECT_EQ(t.dtype, original.dtype);
    EXPECT_EQ(t.describe(), original.describe());
    EXPECT_TRUE(same_bytes(t, original));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype), 0u);
    EXPECT_EQ(file.bytes(name).size(), original.nbytes());
  }
  // f32 first, then the 2-byte tensors by name: every tensor stays aligned.
  EXPECT_EQ(file.info("scalar").begin, 0u);
  EXPECT_EQ(file.info("w32").begin, 4u);
  EXPECT_EQ(file.info("empty").begin, 32u);
  EXPECT_EQ(file.info("four_d").begin, 32u);
  EXPECT_EQ(file.info("wbf").end, fs::file_size(path) - file.header().data_offset);
  EXPECT_EQ(file.info("wbf").dtype, SafetensorsDType::BF16);

  SafetensorsFile first(path);  // moves hand the mapping over
  SafetensorsFile moved(std::move(first));
  SafetensorsFile other(path);
  other = std::move(moved);
  EXPECT_TRUE(same_bytes(other.tensor("w32"), w32));
  EXPECT_ERROR(other.tensor("nope"), path.string() + ": \"nope\": expected a tensor of this file, got no such tensor");
}

TEST_F(SafetensorsFileTest, WriteRefusals) {
  Array a(DType::f32, {2}), i(DType::i32, {2});
  const fs::path path = dir_ / "x.safetensors";
  EXPECT_ERROR(write_safetensors(path, std::vector<NamedTensor>{{"a", a}, {"a", a}}),
               "write_safetensors: \"a\": expected distinct tensor names, got a duplicate");
  EXPECT_ERROR(write_safetensors(path, std::vector<NamedTensor>{{"__metadata__", a}}),
               "write_safetensors: \"__metadata__\": expected a non-empty tensor name other than __metadata__, got \"__metadata__\"");
  EXPECT_ERROR(write_safetensors(path, std::vector<NamedTensor>{{"i", i}}),
               "write_safetensors: \"i\": expected dtype f32, f16 or bf16, got [2] i32");
  Tensor strided = a.view();
  strided.strides[0] = 2;
  EXPECT_ERROR(write_safetensors(path, std::vector<NamedTensor>{{"s", strided}}),
               "write_safetensors: \"s\": expected a contiguous row-major tensor, got [2] f32 strides [2]");
  EXPECT_ERROR(write_safetensors(dir_ / "no" / "x.safetensors", std::vector<NamedTensor>{{"a", a}}),
               "write_safetensors: " + (dir_ / "no" / "x.safetensors").string() + ": expected a writable file, got a write that failed");
}

TEST_F(SafetensorsFileTest, ViewRefusals) {
  // The reference writer would align these; a file laid out by name is not: "a" (F16, 1 element)
  // pushes "b" (F32) to data offset 2. Also an I64 tensor and a rank-5 tensor.
  std::string header =
      R"({"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},)"
      R"("c":{"dtype":"I64","shape":[1],"data_offsets":[6,14]},"d":{"dtype":"F16","shape":[1,1,1,1,1],"data_offsets":[14,16]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  const fs::path path = write_bytes("odd.safetensors", file_with(header, 16));
  const SafetensorsFile file(path);
  const std::string p = path.string();
  EXPECT_EQ(file.tensor("a").dtype, DType::f16);
  EXPECT_ERROR(file.tensor("b"), p + ": tensor \"b\": data_offsets: expected data aligned to 4 bytes for F32 (copy its bytes() "
                                     "into an Array instead), got file offset " + std::to_string(8 + header.size() + 2));
  EXPECT_EQ(file.bytes("b").size(), 4u);
  EXPECT_ERROR(file.tensor("c"), p + ": tensor \"c\": dtype: expected F32, F16 or BF16 to view it as a Tensor, got I64 (read its "
                                     "raw bytes() instead)");
  EXPECT_EQ(file.info("c").dtype, SafetensorsDType::I64);
  EXPECT_EQ(file.bytes("c").size(), 8u);
  EXPECT_ERROR(file.tensor("d"), p + ": tensor \"d\": shape: expected rank <= 4 to view it as a Tensor, got rank 5");
}

TEST_F(SafetensorsFileTest, OpenRefusals) {
  const fs::path missing = dir_ / "missing.safetensors";
  EXPECT_ERROR(SafetensorsFile{missing}, missing.string() + ": file: expected a readable safetensors file, got No such file or directory");
  EXPECT_ERROR(SafetensorsFile{dir_}, dir_.string() + ": file: expected a regular file, got something else (a directory?)");
  const fs::path empty = write_bytes("empty.safetensors", {});
  EXPECT_ERROR(SafetensorsFile{empty}, empty.string() + ": header length: expected an 8-byte little-endian prefix, got a file of 0 bytes");
  const fs::path bad = write_bytes("bad.safetensors", file_with("{}", 4));
  EXPECT_ERROR(SafetensorsFile{bad}, bad.string() + ": data section: expected tensors covering all 4 bytes, with no gap, got bytes "
                                     "[0, 4) covered by no tensor");
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

using CheckpointTest = TempDir;

struct Shards {
  Array a = random_bits(DType::bf16, {4, 8}, 10), b = random_bits(DType::f32, {3}, 11), c = random_bits(DType::f16, {5}, 12);
};

TEST_F(CheckpointTest, SingleFileOrDirectory) {
  Shards s;
  write_safetensors(dir_ / "model.safetensors", std::vector<NamedTensor>{{"a", s.a}, {"b", s.b}});
  for (const fs::path& path : {dir_, dir_ / "model.safetensors"}) {
    const Checkpoint ckpt(path);
    EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a", "b"}));
    EXPECT_TRUE(ckpt.contains("a"));
    EXPECT_FALSE(ckpt.contains("c"));
    EXPECT_TRUE(same_bytes(ckpt.tensor("a"), s.a));
    EXPECT_EQ(ckpt.info("b").dtype, SafetensorsDType::F32);
    EXPECT_ERROR(ckpt.tensor("c"), path.string() + ": \"c\": expected a tensor of this checkpoint, got no such tensor");
  }
}

class ShardedCheckpoint : public TempDir {
 protected:
  // Shards 1 {a, b} and 2 {c}, and an index mapping each tensor to its shard.
  void SetUp() override {
    TempDir::SetUp();
    write_safetensors(dir_ / kShard1, std::vector<NamedTensor>{{"a", s.a}, {"b", s.b}});
    write_safetensors(dir_ / kShard2, std::vector<NamedTensor>{{"c", s.c}});
    index = {{"metadata", {{"total_size", 82}}}, {"weight_map", {{"a", kShard1}, {"b", kShard1}, {"c", kShard2}}}};
  }

  std::string open_error() const {
    std::ofstream(dir_ / "model.safetensors.index.json") << index.dump(2);
    return error_of([&] { Checkpoint{dir_}; });
  }

  std::string index_path() const { return (dir_ / "model.safetensors.index.json").string(); }

  static constexpr const char* kShard1 = "model-00001-of-00002.safetensors";
  static constexpr const char* kShard2 = "model-00002-of-00002.safetensors";
  Shards s;
  json index;
};

TEST_F(ShardedCheckpoint, Loads) {
  ASSERT_EQ(open_error(), "");
  const Checkpoint ckpt(dir_);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(same_bytes(ckpt.tensor("a"), s.a));
  EXPECT_TRUE(same_bytes(ckpt.tensor("b"), s.b));
  EXPECT_TRUE(same_bytes(ckpt.tensor("c"), s.c));
  EXPECT_EQ(ckpt.info("c").shape, (std::vector<int64_t>{5}));
}

TEST_F(ShardedCheckpoint, MissingShard) {
  index["weight_map"]["c"] = "model-00003-of-00002.safetensors";
  EXPECT_EQ(open_error(), index_path() + ": weight_map[\"c\"]: expected an existing shard file, got "
                                         "\"model-00003-of-00002.safetensors\", which is missing");
}

TEST_F(ShardedCheckpoint, ShardNamesStayInTheDirectory) {
  for (const char* name : {"../model-00001-of-00002.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""}) {
    index["weight_map"]["c"] = name;
    EXPECT_EQ(open_error(), index_path() + ": weight_map[\"c\"]: expected the name of a file in the checkpoint directory, got " +
                                json(name).dump());
  }
  index["weight_map"]["c"] = 2;
  EXPECT_EQ(open_error(), index_path() + ": weight_map[\"c\"]: expected the name of a file in the checkpoint directory, got 2");
}

TEST_F(ShardedCheckpoint, DuplicateAcrossShards) {
  write_safetensors(dir_ / kShard2, std::vector<NamedTensor>{{"b", s.b}, {"c", s.c}});
  EXPECT_EQ(open_error(), dir_.string() + ": tensor \"b\": expected a tensor in one shard only, got a tensor in " +
                              kShard1 + " and in " + kShard2);
}

TEST_F(ShardedCheckpoint, IndexDisagreesWithShards) {
  index["weight_map"]["b"] = kShard2;
  EXPECT_EQ(open_error(), index_path() + ": weight_map[\"b\"]: expected a tensor of \"" + kShard2 + "\", got a tensor of \"" +
                              kShard1 + "\"");
  index["weight_map"]["b"] = kShard1;
  index["weight_map"]["x"] = kShard2;
  EXPECT_EQ(open_error(), index_path() + ": weight_map[\"x\"]: expected a tensor of \"" + kShard2 + "\", got a tensor of no shard");
  index["weight_map"].erase("x");
  index["weight_map"].erase("a");
  EXPECT_EQ(open_error(), index_path() + ": weight_map: expected an entry for every tensor of the shards, got none for tensor \"a\" of \"" +
                              kShard1 + "\"");
}

TEST_F(ShardedCheckpoint, MalformedIndex) {
  index.erase("weight_map");
  EXPECT_EQ(open_error(), index_path() + ": weight_map: expected an object {tensor name: shard file}, got none (the key is missing)");
  index["weight_map"] = json::array();
  EXPECT_EQ(open_error(), index_path() + ": weight_map: expected an object {tensor name: shard file}, got []");
  index["weight_map"] = json::object();
  index["shards"] = 2;
  EXPECT_EQ(open_error(), index_path() + ": \"shards\": expected only the keys metadata and weight_map, got another key");
}

TEST_F(CheckpointTest, NothingToLoad) {
  EXPECT_ERROR(Checkpoint{dir_}, dir_.string() + ": checkpoint: expected a directory holding model.safetensors or "
                                                 "model.safetensors.index.json, got neither");
  EXPECT_ERROR(Checkpoint{dir_ / "x"}, (dir_ / "x").string() + ": checkpoint: expected a directory or a .safetensors file, got no "
                                                               "such file or directory");
}

}  // namespace
}  // namespace decodelab
