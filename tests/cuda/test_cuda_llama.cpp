// The decode stack on the GPU (backend "cuda" for every op, weights and caches in device memory)
// against the reference stack on the host: logits NMSE per step over 32 greedy steps and identical
// tokens. Without a GPU the tests skip and say so.
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace decodelab
