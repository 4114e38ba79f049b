// The decode stack on the GPU (backend "cuda" for every op, weights and caches in device memory)
// against the reference stack on the host: logits NMSE per step over 32 greedy steps and identical
// tokens, over plain and TurboQuant caches. Without a GPU the tests skip and say so.
#include <gtest/gtest.h>

#include <algorithm>

#include "decodelab/router.h"
#include "llama_stack.h"

namespace decodelab {
namespace {

void expect_cuda_matches_reference(const std::filesystem::path& dir, LoadOptions options, double max_nmse) {
  const LlamaModel host = LlamaModel::load(dir, options);
  options.device = Device::cuda;
  const LlamaModel gpu = LlamaModel::load(dir, options);
  expect_stack_matches(host, gpu, "cuda", max_nmse);
}

TEST(CudaLlamaStack, MatchesReferenceF32) {
  if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: the CUDA stack did not run";
  const auto dir = fresh_dir("cuda-llama-f32");
  write_random_llama(dir, tiny_config(), DType::f32, 7);
  expect_cuda_matches_reference(dir, {}, 1e-9);
}

// Qwen2's q/k/v biases, added on the GPU by the cuda bias_add.
TEST(CudaLlamaStack, Qwen2BiasesMatchReferenceF32) {
  if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: the CUDA stack did not run";
  const auto dir = fresh_dir("cuda-qwen2-f32");
  write_random_llama(dir, tiny_qwen2_config(), DType::f32, 11);
  expect_cuda_matches_reference(dir, {}, 1e-9);
}

// f16 activations and caches with MLX q4 and GGUF Q8_0 weights: both stacks round every op's output
// to f16, so their logits differ by f16 rounding flips carried through two layers (a looser bound
// than f32's), and the greedy tokens must still agree.
TEST(CudaLlamaStack, MatchesReferenceF16Quantized) {
  if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: the CUDA stack did not run";
  const auto dir = fresh_dir("cuda-llama-f16");
  write_random_llama(dir, tiny_config(), DType::f16, 8);
  for (const QuantSpec& spec : {QuantSpec::mlx(4, 64), QuantSpec::q8_0()}) {
    LoadOptions options;
    options.dtype = DType::f16;
    options.quantize = spec;
    expect_cuda_matches_reference(dir, options, 1e-4);
  }
}

// The stack over TurboQuant records (the cuda append encoder and fused attention) against the
// reference stack over its own records, f32 weights and activations. The two encoders see K and V
// that differ in the last bits, so a coordinate that close to a codebook boundary would take the
// neighbouring code on one side only; the bound leaves room for a few such flips, each far below
// what a misread record or a wrong position costs.
TEST(CudaLlamaStack, TurboQuantCacheMatchesReference) {
  if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: the CUDA stack did not run";
  const auto dir = fresh_dir("cuda-llama-turboquant");
  write_random_llama(dir, tiny_config(), DType::f32, 9);
  const LlamaModel host = LlamaModel::load(dir, {});
  LoadOptions options;
  options.device = Device::cuda;
  const LlamaModel gpu = LlamaModel::load(dir, options);
  expect_stack_matches(host, gpu, "cuda", 1e-6, 4, turboquant_kv(4, 3, {}, kvquant::ScaleMode::norm_corrected));
  expect_stack_matches(host, gpu, "cuda", 1e-6, 4, turboquant_kv(2, 4, {0}));
}

// Steps replayed from CUDA graphs (captured at the first step of each batch size, then replayed as
// lengths grow, pages are added and batch sizes alternate) give exactly the logits of the same ops
// launched one by one.
TEST(CudaLlamaStack, GraphReplayMatchesEagerLaunches) {
  if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: the CUDA stack did not run";
  LoadOptions options;
  options.device = Device::cuda;
  options.dtype = DType::f16;
  options.quantize = QuantSpec::mlx(4, 64);
  const LlamaModel model = LlamaModel::random(tiny_config(), options, 11);
  const int64_t vocab = model.config().vocab_size;
  std::vector<std::vector<float>> runs[2];
  for (const bool graphs : {true, false}) {
    LlamaDecoder::Config config;
    config.max_sequences = 2;
    config.max_tokens = 40;
    config.page_size = 8;
    config.cuda_graphs = graphs;
    LlamaDecoder decoder(model, config);
    const int a = decoder.add_sequence(), b = decoder.add_sequence();
    Array one(DType::f32, {1, vocab}), two(DType::f32, {2, vocab});
    decoder.prefill(a, std::vector<int32_t>{1, 2, 3}, one);
    decoder.prefill(b, std::vector<int32_t>{4, 5, 6, 7, 8, 9}, one);
    std::vector<int32_t> tokens = {10, 11};
    const int seqs[2] = {a, b};
    for (int step = 0; step < 12; ++step) {
      decoder.step(seqs, tokens, two);
      const float* row = two.ptr<const float>();
      runs[graphs ? 0 : 1].emplace_back(row, row + 2 * vocab);
      for (int s = 0; s < 2; ++s) tokens[size_t(s)] = int32_t(std::max_element(row + s * vocab, row + (s + 1) * vocab) - (row + s * vocab));
      if (step % 4 == 3) {  // a batch-1 step in between
        decoder.step({&b, 1}, {&tokens[1], 1}, one);
        runs[graphs ? 0 : 1].emplace_back(one.ptr<const float>(), one.ptr<const float>() + vocab);
      }
    }
    EXPECT_EQ(decoder.length(a), 3 + 12);
    EXPECT_EQ(decoder.length(b), 6 + 12 + 3);
    EXPECT_EQ(decoder.graphs_captured(), graphs ? 2 : 0);  // batch sizes 1 and 2 were replayed
  }
  ASSERT_EQ(runs[0].size(), runs[1].size());
  size_t zeros = 0;
  for (const float v : runs[0].back()) zeros += v == 0.0f;
  EXPECT_LT(zeros, runs[0].back().size() / 10) << "mostly zero logits";
  for (size_t i = 0; i < runs[0].size(); ++i) EXPECT_EQ(runs[0][i], runs[1][i]) << "step " << i;
}

}  // namespace
}  // namespace decodelab
