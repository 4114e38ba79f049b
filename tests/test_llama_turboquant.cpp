// The Llama decode stack over a TurboQuant-compressed paged KV cache (LlamaDecoder::Config::
// kv_quantization): all-f16 layers are the plain stack bit for bit, the cpu stack matches the
// reference stack over the same codes, the compressed stack stays close to the f16 one and gets
// worse with fewer bits, and bad configurations name their field.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "decodelab/error.h"
#include "decodelab/model.h"
#include "error_of.h"
#include "llama_stack.h"

namespace decodelab {
namespace {

// The logits of every step of feeding `tokens` one by one to a fresh sequence on `backend`: the same
// inputs for every cache, so that two caches' logits are compared step for step (greedy tokens
// would diverge after the first difference and compare different contexts).
std::vector<std::vector<float>> teacher_forced(const LlamaModel& model, std::span<const int32_t> tokens,
                                               const std::optional<KvQuantization>& kv,
                                               std::string_view backend = "cpu") {
  LlamaDecoder::Config config;
  config.max_tokens = int64_t(tokens.size());
  config.page_size = 8;
  config.run.backend = backend;
  config.kv_quantization = kv;
  LlamaDecoder decoder(model, config);
  const int seq = decoder.add_sequence();
  Array logits(DType::f32, {1, model.config().vocab_size});
  std::vector<std::vector<float>> all;
  for (const int32_t token : tokens) {
    decoder.step({&seq, 1}, {&token, 1}, logits);
    all.emplace_back(logits.ptr<const float>(), logits.ptr<const float>() + logits.numel());
  }
  return all;
}

// With every layer kept in f16 nothing is quantized: the same ops on the same caches, so the same
// bits.
TEST(LlamaTurboQuantStack, AllLayersF16IsThePlainStack) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 21);
  const std::vector<int32_t> prompt = {1, 17, 300, 42, 7};
  std::vector<int32_t> plain_tokens, f16_tokens;
  const auto plain = greedy(model, "cpu", prompt, 16, plain_tokens);
  const auto f16 = greedy(model, "cpu", prompt, 16, f16_tokens, turboquant_kv(4, 4, {1, 0}));
  EXPECT_EQ(f16, plain);
  EXPECT_EQ(f16_tokens, plain_tokens);
  // One layer compressed is not the plain stack: the comparison above can fail.
  std::vector<int32_t> mixed_tokens;
  EXPECT_NE(greedy(model, "cpu", prompt, 16, mixed_tokens, turboquant_kv(4, 4, {1})), plain);
}

// The cpu stack against the reference stack, both over TurboQuant records, at the f32 stacks'
// tolerance (test_llama.cpp). Each backend encodes the same bytes from the same f32 values, but
// its K and V differ from the reference's in the last bits, so a coordinate within that distance
// of a codebook boundary would take the neighbouring code; with these seeds none does (measured:
// NMSE <= 5e-14 over the 32 steps of both cases), so the tokens and nearly the logits agree, and an
// error in any piece (a wrong position, a missing bias, a misread record) is far above 1e-9.
TEST(LlamaTurboQuantStack, CpuMatchesReference) {
  const LlamaModel llama = LlamaModel::random(tiny_config(), {}, 22);
  expect_stack_matches(llama, llama, "cpu", 1e-9, 2, turboquant_kv(4, 3, {}, kvquant::ScaleMode::norm_corrected));
  // A mixed stack (layer 0 f16) and Qwen2's biases in the projections before the encoder.
  const LlamaModel qwen2 = LlamaModel::random(tiny_qwen2_config(), {}, 23);
  expect_stack_matches(qwen2, qwen2, "cpu", 1e-9, 2, turboquant_kv(2, 4, {0}));
  // Split widths: K 2.5 bits, V 3.5 bits (kvquant.h), through the cpu kernel's two runs of codes.
  KvQuantization split = turboquant_kv(2, 3);
  split.k.high_bits_channels = split.v.high_bits_channels = 32;
  expect_stack_matches(llama, llama, "cpu", 1e-9, 2, split);
}

// Two sequences of different lengths stepped together on the cpu (the batched path: q/k/v gathered
// by strided copies, a position and a length per sequence) against each alone on the reference,
// at the stacks' tolerance.
TEST(LlamaTurboQuantStack, BatchedSequencesMatchEachAloneOnReference) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 28);
  const KvQuantization kv = turboquant_kv(4, 3, {1});
  const std::vector<int32_t> a = {1, 17, 300, 42, 7, 9, 11, 13, 5, 6, 400, 3}, b = {99, 98, 97, 96, 95, 94, 93, 92, 91};
  const auto a_alone = teacher_forced(model, a, kv, "reference"), b_alone = teacher_forced(model, b, kv, "reference");
  LlamaDecoder::Config config;
  config.max_sequences = 2;
  config.max_tokens = int64_t(a.size());
  config.page_size = 8;
  config.run.backend = "cpu";
  config.kv_quantization = kv;
  LlamaDecoder decoder(model, config);
  const int seqs[] = {decoder.add_sequence(), decoder.add_sequence()};
  const int64_t vocab = model.config().vocab_size;
  Array logits(DType::f32, {2, vocab});
  const size_t lead = a.size() - b.size();  // a's first tokens alone: the lengths then differ
  const Tensor first_row = Tensor::contiguous(logits.data(), DType::f32, {1, vocab});
  for (size_t i = 0; i < lead; ++i) decoder.step({seqs, 1}, {&a[i], 1}, first_row);
  for (size_t i = 0; i < b.size(); ++i) {
    const int32_t tokens[] = {a[lead + i], b[i]};
    decoder.step(seqs, tokens, logits);
    const std::span<const float> row_a(logits.ptr<const float>(), size_t(vocab));
    EXPECT_LE(nmse(row_a, a_alone[lead + i]), 1e-9) << "step " << i;
    EXPECT_LE(nmse({logits.ptr<const float>() + vocab, size_t(vocab)}, b_alone[i]), 1e-9) << "step " << i;
  }
}

// Compressed K and V change the logits a little at 4 bits and more at 2 and 1. TurboQuant's
// relative MSE per vector is 0.0093 at 4 bits, 0.116 at 2 and 0.36 at 1 (D times the Lloyd-Max
// distortion, kvquant.h). In this random model the attention output is a large part of the
// residual stream (the embedding rows are small, the value path starts from the normed row), and a
// mean over independent random values keeps their relative error, so the logits' NMSE is of the order of the vectors' error, not far
// below it. Measured (32 steps, mean): 0.014, 0.18, 0.53. The bound 3e-2 at 4 bits leaves 2x
// margin and is far below a broken cache's (logits unrelated to the f16 ones: NMSE ~ 1 or more);
// 2 bits must be several times worse (the distortions' ratio is 12.5) and 1 bit worse still.
TEST(LlamaTurboQuantStack, LogitsCloseToF16AndWorseWithFewerBits) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 24);
  std::vector<int32_t> tokens;
  greedy(model, "cpu", {1, 17, 300, 42, 7}, 27, tokens);
  tokens.insert(tokens.begin(), {1, 17, 300, 42, 7});
  const auto f16 = teacher_forced(model, tokens, std::nullopt);
  // bits, and high_bits_channels of D = 64 at bits + 1 (a split width: 32 is half a bit more).
  const auto mean_nmse = [&](int bits, int64_t high = 0) {
    // Built in place in the optional (a copy into one tripped GCC 12's -Wmaybe-uninitialized at -O1).
    std::optional<KvQuantization> kv(turboquant_kv(bits, bits));
    kv->k.high_bits_channels = kv->v.high_bits_channels = high;
    const auto got = teacher_forced(model, tokens, kv);
    double sum = 0.0;
    for (size_t i = 0; i < f16.size(); ++i) sum += nmse(got[i], f16[i]);
    return sum / double(f16.size());
  };
  const double nmse4 = mean_nmse(4), nmse3 = mean_nmse(3), nmse25 = mean_nmse(2, 32), nmse2 = mean_nmse(2),
               nmse1 = mean_nmse(1);
  std::printf("logits NMSE against f16 over %zu steps: 4-bit %.3g, 3-bit %.3g, 2.5-bit %.3g, 2-bit %.3g, 1-bit %.3g\n",
              f16.size(), nmse4, nmse3, nmse25, nmse2, nmse1);
  EXPECT_GT(nmse4, 0.0);  // the cache is compressed at all
  EXPECT_LT(nmse4, 3e-2);
  EXPECT_GT(nmse2, 4.0 * nmse4);
  EXPECT_GT(nmse1, nmse2);
  // 2.5 bits between 2 and 3 (vector errors 0.116, ~0.075 and 0.034 of D times the distortion).
  EXPECT_LT(nmse3, nmse25);
  EXPECT_LT(nmse25, nmse2);
}

// Positions that skip() reserves hold zero records (norm 0: a zero key and value), as the f16
// cache holds zeros: finite logits, and the sequence goes on.
TEST(LlamaTurboQuantStack, SkipReadsZeroRecords) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 25);
  LlamaDecoder::Config config;
  config.max_tokens = 40;
  config.page_size = 8;
  config.kv_quantization = turboquant_kv(4, 4);
  LlamaDecoder decoder(model, config);
  const int seq = decoder.add_sequence();
  decoder.skip(seq, 21);
  Array logits(DType::f32, {1, model.config().vocab_size});
  const int32_t token = 3;
  decoder.step({&seq, 1}, {&token, 1}, logits);
  EXPECT_EQ(decoder.length(seq), 22);
  for (int64_t i = 0; i < logits.numel(); ++i) ASSERT_TRUE(std::isfinite(logits.ptr<float>()[i])) << i;
}

// KV bytes per token: 2 layers x 2 KV heads; a 4-bit record of D = 64 is 4 + 32 bytes, a 2-bit
// one 4 + 16; f32 K and V are 2 x 64 x 4 bytes per head.
TEST(LlamaTurboQuantStack, KvBytesPerToken) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 26);
  // kv null: the activation dtype's cache. (An empty optional passed by value or reference trips
  // GCC 12's -Wmaybe-uninitialized under ASan at -O1.)
  const auto bytes = [&](const KvQuantization* kv) {
    LlamaDecoder::Config config;
    config.max_tokens = 8;
    if (kv != nullptr) config.kv_quantization = *kv;
    return LlamaDecoder(model, config).kv_bytes_per_token();
  };
  const KvQuantization k4v2 = turboquant_kv(4, 2), k4v2_f16 = turboquant_kv(4, 2, {1});
  EXPECT_EQ(bytes(nullptr), 2 * 2 * 2 * 64 * 4);
  EXPECT_EQ(bytes(&k4v2), 2 * 2 * (36 + 20));
  EXPECT_EQ(bytes(&k4v2_f16), 2 * (36 + 20) + 2 * 2 * 64 * 4);
}

TEST(LlamaTurboQuantStack, BadConfigurationsNameTheField) {
  const LlamaModel model = LlamaModel::random(tiny_config(), {}, 27);
  const auto message = [&](const KvQuantization& kv) {
    LlamaDecoder::Config config;
    config.max_tokens = 8;
    config.kv_quantization = kv;
    return error_of([&] { LlamaDecoder(model, config); });
  };
  const auto expect_contains = [](const std::string& got, const std::string& needle) {
    EXPECT_NE(got.find(needle), std::string::npos) << "expected \"" << needle << "\" in \"" << got << "\"";
  };
  expect_contains(message(turboquant_kv(4, 4, {0, 2})),
                  "LlamaDecoder: config.kv_quantization.f16_layers[1]: expected a layer index in [0, 2), got 2");
  expect_contains(message(turboquant_kv(4, 4, {-1})), "f16_layers[0]: expected a layer index in [0, 2), got -1");
  KvQuantization d128 = turboquant_kv(4, 4);
  d128.k.head_dim = 128;
  expect_contains(message(d128), "config.kv_quantization.k.head_dim: expected 0 or the model's head_dim 64, got 128");
  expect_contains(message(turboquant_kv(4, 5)), "config.kv_quantization.v: expected an integer width of 1-4 bits");
  expect_contains(message(turboquant_kv(0, 4)), "config.kv_quantization.k: expected an integer width of 1-4 bits");
  KvQuantization split = turboquant_kv(2, 2);
  split.k.high_bits_channels = 24;  // not a multiple of 16 (32 would be 2.5 bits at D = 64)
  expect_contains(message(split), "got bits 2, high_bits_channels 24");
  // The decoder's page bookkeeping for its TurboQuant layers has no pools to copy on write.
  PagedKVCache::Config pages;
  pages.num_pages = 4;
  pages.pools = false;
  PagedKVCache cache(pages);
  EXPECT_TRUE(cache.k_pages().data == nullptr);
  const int seq = cache.add_sequence();
  expect_contains(error_of([&] { cache.fork(seq); }), "PagedKVCache::fork: config.pools");
}

}  // namespace
}  // namespace decodelab
