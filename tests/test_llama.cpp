// The Llama decode stack: the cpu stack against the reference stack over 32 greedy steps (logits
// NMSE per step, identical tokens), checkpoint mapping errors, and sampling.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>
#include <filesystem>
#include <map>

#include "decodelab/error.h"
#include "error_of.h"
#include "llama_stack.h"
#include "decodelab/model.h"
#include "verify/random.h"

namespace decodelab {
namespace {

// The cpu stack against the reference stack on the same model.
void expect_matches_reference(const LlamaModel& model, double max_nmse, size_t min_distinct = 4) {
  expect_stack_matches(model, model, "cpu", max_nmse, min_distinct);
}

TEST(LlamaStack, CpuMatchesReferenceF32) {
  const auto dir = fresh_dir("llama-f32");
  write_random_llama(dir, tiny_config(), DType::f32, 7);
  expect_matches_reference(LlamaModel::load(dir), 1e-9);
}

TEST(LlamaStack, CpuMatchesReferenceQuantizedOnLoad) {
  const auto dir = fresh_dir("llama-q4");
  write_random_llama(dir, tiny_config(), DType::bf16, 8);
  for (const QuantSpec& spec : {QuantSpec::mlx(4, 64), QuantSpec::q8_0()}) {
    LoadOptions options;
    options.quantize = spec;
    expect_matches_reference(LlamaModel::load(dir, options), 1e-9);
  }
}

TEST(LlamaStack, TiedEmbeddingsNeedNoLmHead) {
  ModelConfig c = tiny_config();
  c.tie_word_embeddings = true;
  const auto dir = fresh_dir("llama-tied");
  write_random_llama(dir, c, DType::f32, 9);
  EXPECT_FALSE(Checkpoint(dir).contains("lm_head.weight"));
  const LlamaModel model = LlamaModel::load(dir);
  ASSERT_FALSE(model.lm_head().is_quantized);
  EXPECT_EQ(0, std::memcmp(model.lm_head().dense.data, model.embedding().data, model.embedding().nbytes()));
  // A random model with tied embeddings mostly predicts the token it was given: fewer distinct tokens.
  expect_matches_reference(model, 1e-9, 2);
}

// A checkpoint of `config` with some tensors replaced or dropped.
std::filesystem::path edited_checkpoint(const std::string& name, const std::map<std::string, std::vector<int64_t>>& reshape,
                                        const std::vector<std::string>& drop, const std::string& extra = "",
                                        bool nan = false, const ModelConfig& config = tiny_config()) {
  const auto src = fresh_dir(name + "-src");
  write_random_llama(src, config, DType::f32, 1);
  const Checkpoint original(src);
  std::vector<Array> arrays;
  std::vector<NamedTensor> named;
  verify::Rng rng(2);
  for (const std::string& n : original.names()) {
    if (std::find(drop.begin(), drop.end(), n) != drop.end()) continue;
    const Tensor t = original.tensor(n);
    std::vector<int64_t> shape(t.shape.begin(), t.shape.begin() + t.rank);
    if (auto it = reshape.find(n); it != reshape.end()) shape = it->second;
    arrays.push_back(verify::random_array(DType::f32, shape, rng, 0.02));
    if (nan) arrays.back().ptr<float>()[3] = std::nanf("");
    named.emplace_back(n, arrays.back().view());
  }
  if (!extra.empty()) {
    arrays.push_back(verify::random_array(DType::f32, {4}, rng));
    named.emplace_back(extra, arrays.back().view());
  }
  const auto dir = fresh_dir(name);
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(src / "config.json", dir / "config.json");
  write_safetensors(dir / "model.safetensors", named);
  return dir;
}

void expect_load_error(const std::filesystem::path& dir, const std::string& needle, const LoadOptions& options = {}) {
  const std::string message = error_of([&] { LlamaModel::load(dir, options); });
  EXPECT_NE(message.find(needle), std::string::npos) << "expected an error containing \"" << needle << "\", got \"" << message << "\"";
}

TEST(LlamaStack, CheckpointErrorsNameTheTensor) {
  expect_load_error(edited_checkpoint("missing", {}, {"model.layers.1.mlp.up_proj.weight"}),
                    "model.layers.1.mlp.up_proj.weight: missing (expected [256, 128])");
  expect_load_error(edited_checkpoint("shape", {{"model.layers.0.self_attn.k_proj.weight", {256, 128}}}, {}),
                    "model.layers.0.self_attn.k_proj.weight: expected [128, 128], got [256, 128]");
  expect_load_error(edited_checkpoint("extra", {}, {}, "model.layers.0.self_attn.q_proj.bias"),
                    "model.layers.0.self_attn.q_proj.bias: not a tensor of a llama model");
  LoadOptions finite;
  finite.check_finite = true;
  const auto nan_dir = edited_checkpoint("nan", {}, {}, "", true);
  expect_load_error(nan_dir, "expected finite weights", finite);
  EXPECT_NO_THROW(LlamaModel::load(nan_dir));  // flagged only on request
}

// Qwen2: the q/k/v biases are expected, loaded and added; a missing or misshapen one is named.
TEST(LlamaStack, Qwen2BiasesCpuMatchesReferenceF32) {
  const auto dir = fresh_dir("qwen2-f32");
  write_random_llama(dir, tiny_qwen2_config(), DType::f32, 11);
  EXPECT_TRUE(Checkpoint(dir).contains("model.layers.1.self_attn.k_proj.bias"));
  const LlamaModel model = LlamaModel::load(dir);
  for (const DecodeLayerWeights& w : model.layers()) {
    EXPECT_EQ(w.bq.numel(), 256);
    EXPECT_EQ(w.bk.numel(), 128);
    EXPECT_EQ(w.bv.numel(), 128);
  }
  expect_matches_reference(model, 1e-9);
}

TEST(LlamaStack, Qwen2CheckpointErrorsNameTheBias) {
  const ModelConfig qwen2 = tiny_qwen2_config();
  expect_load_error(edited_checkpoint("qwen2-missing", {}, {"model.layers.1.self_attn.v_proj.bias"}, "", false, qwen2),
                    "model.layers.1.self_attn.v_proj.bias: missing (expected [128])");
  expect_load_error(edited_checkpoint("qwen2-shape", {{"model.layers.0.self_attn.q_proj.bias", {128}}}, {}, "", false, qwen2),
                    "model.layers.0.self_attn.q_proj.bias: expected [256], got [128]");
  // Biases besides q/k/v are not Qwen2's either.
  expect_load_error(edited_checkpoint("qwen2-extra", {}, {}, "model.layers.0.self_attn.o_proj.bias", false, qwen2),
                    "model.layers.0.self_attn.o_proj.bias: not a tensor of a qwen2 model");
}

TEST(LlamaStack, BadTokensAndCapacityAreErrors) {
  const auto dir = fresh_dir("llama-errors");
  write_random_llama(dir, tiny_config(), DType::f32, 3);
  const LlamaModel model = LlamaModel::load(dir);
  LlamaDecoder::Config config;
  config.max_tokens = 2;
  config.page_size = 1;
  LlamaDecoder decoder(model, config);
  const int seq = decoder.add_sequence();
  Array logits(DType::f32, {1, 512});
  const int32_t bad = 512;
  EXPECT_THROW(decoder.step({&seq, 1}, {&bad, 1}, logits), Error);
  EXPECT_EQ(decoder.length(seq), 0);
  const std::vector<int32_t> prompt = {1, 2};
  decoder.prefill(seq, prompt, logits);
  const int32_t one = 1;
  EXPECT_THROW(decoder.step({&seq, 1}, {&one, 1}, logits), Error);  // the cache is full
  EXPECT_EQ(decoder.length(seq), 2);
}

TEST(Sampling, GreedyTopKTopPAndSeeds) {
  const std::vector<float> logits = {0.1f, 2.0f, 1.9f, -1.0f, 2.0f};
  std::mt19937_64 rng(1);
  EXPECT_EQ(sample_token(logits, {}, rng), 1);  // the first of the largest
  EXPECT_EQ(sample_token(logits, {1.0f, 1, 1.0f}, rng), 1);
  EXPECT_EQ(sample_token(logits, {1.0f, 0, 0.01f}, rng), 1);
  // Seeded: the same draws; top_k = 3 never yields the others.
  std::mt19937_64 a(5), b(5);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 3000; ++i) {
    const int32_t t = sample_token(logits, {1.0f, 3, 1.0f}, a);
    EXPECT_EQ(t, sample_token(logits, {1.0f, 3, 1.0f}, b));
    ++counts[t];
  }
  EXPECT_EQ(counts.size(), 3u);
  EXPECT_EQ(counts.count(0) + counts.count(3), 0u);
  // Tokens 1 and 4 (equal logits) are about equally likely, token 2 a little less.
  EXPECT_NEAR(double(counts[1]) / counts[4], 1.0, 0.15);
  EXPECT_LT(counts[2], counts[1] + counts[4]);
  EXPECT_THROW(sample_token(logits, {-1.0f, 0, 1.0f}, rng), Error);
  EXPECT_THROW(sample_token(logits, {1.0f, 0, 0.0f}, rng), Error);
}


// A model made in memory (no checkpoint) is a model like any other: cpu against reference, with
// dense weights and with quantized weights made straight in their format (f32 activations, so
// that the f32 tolerance applies).
TEST(LlamaStack, RandomModelCpuMatchesReference) {
  LoadOptions f32;
  expect_matches_reference(LlamaModel::random(tiny_config(), f32, 3), 1e-9, 2);
  for (const QuantSpec& spec : {QuantSpec::mlx(4, 64), QuantSpec::q4_0(), QuantSpec::q8_0()}) {
    LoadOptions options;
    options.quantize = spec;
    expect_matches_reference(LlamaModel::random(tiny_config(), options, 4), 1e-9, 2);
  }
}

// Qwen2's biases are made too: random values, not the ones of a norm, which is also 1-D.
TEST(LlamaStack, RandomQwen2ModelHasRandomBiases) {
  const LlamaModel model = LlamaModel::random(tiny_qwen2_config(), {}, 6);
  std::set<float> values;
  for (const DecodeLayerWeights& w : model.layers()) {
    for (const Tensor* bias : {&w.bq, &w.bk, &w.bv}) {
      ASSERT_TRUE(has_bias(*bias));
      for (int64_t i = 0; i < bias->numel(); ++i) {
        const float v = bias->ptr<const float>()[i];
        EXPECT_LE(std::fabs(v), 0.04f);
        values.insert(v);
      }
    }
  }
  EXPECT_GT(values.size(), 500u);  // of 1024
  ModelConfig without_biases = tiny_qwen2_config();
  without_biases.model_type = ModelType::llama;
  without_biases.attention_bias = false;
  EXPECT_EQ(model.weight_bytes_per_token(), LlamaModel::random(without_biases, {}, 6).weight_bytes_per_token() +
                                                2 * (256 + 128 + 128) * int64_t(sizeof(float)));
  expect_matches_reference(model, 1e-9, 2);
}

// skip() lengthens a sequence without computing it; the next step attends over the skipped (zero)
// positions and still gives finite logits.
TEST(LlamaStack, SkipLengthensTheSequence) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 5);
  LlamaDecoder::Config config;
  config.max_tokens = 40;
  config.page_size = 8;
  LlamaDecoder decoder(model, config);
  const int seq = decoder.add_sequence();
  decoder.skip(seq, 21);
  EXPECT_EQ(decoder.length(seq), 21);
  Array logits(DType::f32, {1, model.config().vocab_size});
  const int32_t token = 3;
  decoder.step({&seq, 1}, {&token, 1}, logits);
  EXPECT_EQ(decoder.length(seq), 22);
  for (int64_t i = 0; i < logits.numel(); ++i) ASSERT_TRUE(std::isfinite(logits.ptr<float>()[i])) << i;
  const std::string message = error_of([&] { decoder.skip(seq, 19); });  // 41 tokens need 6 pages of 8
  EXPECT_NE(message.find("at most 5 pages per sequence"), std::string::npos) << message;
  EXPECT_EQ(decoder.length(seq), 22);  // a failed skip changes nothing
}

// Per-op backends reach the ops inside the decode block: naming the D = 128 attention kernel for
// a model of head_dim 64 fails in that op, and an unknown name fails before any step.
TEST(LlamaStack, PerOpBackendsReachTheBlocksPieces) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 6);
  const OpBackend d128[] = {{"decode_attention_paged", "cpu.d128"}};
  LlamaDecoder::Config config;
  config.max_tokens = 8;
  config.run.per_op = d128;
  LlamaDecoder decoder(model, config);
  const int seq = decoder.add_sequence();
  Array logits(DType::f32, {1, model.config().vocab_size});
  const int32_t token = 1;
  const std::string message = error_of([&] { decoder.step({&seq, 1}, {&token, 1}, logits); });
  EXPECT_TRUE(message.starts_with("decode_attention_paged: backend 'cpu.d128' does not support this call")) << message;
  const OpBackend unknown[] = {{"mlp_block", "cpu.nonexistent"}};
  config.run.per_op = unknown;
  EXPECT_NE(error_of([&] { LlamaDecoder(model, config); }).find("check_op_backends: per_op[0].backend (for mlp_block)"), std::string::npos);
}

}  // namespace
}  // namespace decodelab
