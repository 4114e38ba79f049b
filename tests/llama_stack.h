// Helpers of the decode-stack tests (tests/test_llama.cpp, tests/cuda/test_cuda_llama.cpp): tiny
// Llama and Qwen2 configs, a fresh directory for its checkpoint, and a greedy run of a stack compared with
// another's (logits NMSE per step, identical tokens).
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "decodelab/model.h"

namespace decodelab {

inline ModelConfig tiny_config() {
  ModelConfig c;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.num_hidden_layers = 2;
  c.vocab_size = 512;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling = Llama3Scaling{};
  return c;
}

// A tiny Qwen2: q/k/v projection biases, no Llama 3 frequency scaling, Qwen2's theta, and
// head_dim = hidden_size / num_attention_heads as every Qwen2 has it.
inline ModelConfig tiny_qwen2_config() {
  ModelConfig c = tiny_config();
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.model_type = ModelType::qwen2;
  c.attention_bias = true;
  c.rope_scaling.reset();
  c.rope_theta = 1000000.0;
  c.rms_norm_eps = 1e-6;
  return c;
}

inline std::filesystem::path fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("decodelab-test-" + name);
  std::filesystem::remove_all(dir);
  return dir;
}

inline double nmse(std::span<const float> got, std::span<const float> want) {
  double err = 0.0, ref = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    ref += double(want[i]) * want[i];
  }
  return err / ref;
}

// TurboQuant K and V records of these widths and scale mode; f16_layers stay in the activation dtype.
inline KvQuantization turboquant_kv(int k_bits, int v_bits, std::vector<int> f16_layers = {},
                                    kvquant::ScaleMode scale = kvquant::ScaleMode::plain) {
  KvQuantization q;
  q.k.bits = k_bits;
  q.v.bits = v_bits;
  q.k.scale = q.v.scale = scale;
  q.f16_layers = std::move(f16_layers);
  return q;
}

// Greedy decoding of `steps` tokens after `prompt`; every step's logits. kv: the decoder's KV
// quantization (none: the activation dtype's caches).
inline std::vector<std::vector<float>> greedy(const LlamaModel& model, std::string_view backend,
                                              std::vector<int32_t> prompt, int steps, std::vector<int32_t>& tokens,
                                              const std::optional<KvQuantization>& kv = std::nullopt) {
  LlamaDecoder::Config config;
  config.kv_quantization = kv;
  config.max_tokens = int64_t(prompt.size()) + steps;
  config.page_size = 8;  // several pages per sequence
  config.run.backend = backend;
  LlamaDecoder decoder(model, config);
  const int seq = decoder.add_sequence();
  const int64_t vocab = model.config().vocab_size;
  Array logits(DType::f32, {1, vocab});
  const std::span<const float> row(logits.ptr<const float>(), size_t(vocab));
  std::mt19937_64 rng(0);
  std::vector<std::vector<float>> all;
  decoder.prefill(seq, prompt, logits);
  for (int i = 0; i < steps; ++i) {
    all.emplace_back(row.begin(), row.end());
    tokens.push_back(sample_token(row, {}, rng));
    decoder.step({&seq, 1}, {&tokens.back(), 1}, logits);
  }
  EXPECT_EQ(decoder.length(seq), int64_t(prompt.size()) + steps);
  return all;
}

// 32 greedy steps of `model` on `backend` against `want_model` on the reference, both with the
// KV quantization `kv`: logits NMSE per step and identical tokens; min_distinct: the tokens are not all one (the model is not constant).
inline void expect_stack_matches(const LlamaModel& want_model, const LlamaModel& model, std::string_view backend,
                                 double max_nmse, size_t min_distinct = 4,
                                 const std::optional<KvQuantization>& kv = std::nullopt) {
  std::vector<int32_t> want_tokens, got_tokens;
  const std::vector<int32_t> prompt = {1, 17, 300, 42, 7};
  const auto want = greedy(want_model, "reference", prompt, 32, want_tokens, kv);
  const auto got = greedy(model, backend, prompt, 32, got_tokens, kv);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_LE(nmse(got[i], want[i]), max_nmse) << "step " << i;
  EXPECT_EQ(got_tokens, want_tokens);
  EXPECT_GE(std::set<int32_t>(want_tokens.begin(), want_tokens.end()).size(), min_distinct);
}

}  // namespace decodelab
