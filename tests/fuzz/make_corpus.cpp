// Writes the fuzzers' seed corpora: into <dir> safetensors files written by write_safetensors, the
// same headers in the fuzz target's "length byte + header" form, and config.json files written by
// to_json; into <product_vq_dir> product VQ codebooks written by save_product_vq; so that mutation
// starts from inputs that pass every check.
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include "decodelab/checkpoint.h"
#include "decodelab/product_vq.h"

namespace {

using namespace decodelab;
namespace fs = std::filesystem;

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// `file` (a safetensors file of at most 255 data bytes) as the fuzz target's second form.
void write_wrapped(const fs::path& dir, const std::string& name, const fs::path& file) {
  const std::string bytes = read_file(file);
  const SafetensorsHeader h = parse_safetensors_header(
      std::span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), file.string());
  const std::string header = bytes.substr(8, h.data_offset - 8);
  write_file(dir / name, std::string(1, char(bytes.size() - h.data_offset)) + header);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: fuzz_make_corpus <dir> <product_vq_dir>\n";
    return 2;
  }
  const fs::path dir = argv[1];
  fs::create_directories(dir);

  Array w32(DType::f32, {2, 3}), w16(DType::f16, {3}), wbf(DType::bf16, {2, 2}), empty(DType::f16, {0, 4});
  for (const Array* a : {&w32, &w16, &wbf}) std::memset(a->data(), 0x3c, a->nbytes());
  write_safetensors(dir / "mixed.safetensors",
                    std::vector<NamedTensor>{{"model.norm.weight", w16}, {"lm_head.weight", w32},
                                             {"model.layers.0.mlp.up_proj.weight", wbf}, {"empty", empty}});
  write_safetensors(dir / "none.safetensors", std::vector<NamedTensor>{});
  write_wrapped(dir, "mixed.header", dir / "mixed.safetensors");

  ModelConfig llama;
  llama.hidden_size = 64;
  llama.intermediate_size = 176;
  llama.num_attention_heads = 4;
  llama.num_key_value_heads = 2;
  llama.head_dim = 16;
  llama.num_hidden_layers = 2;
  llama.vocab_size = 256;
  llama.max_position_embeddings = 8192 * 2;
  llama.rope_theta = 500000.0;
  llama.rope_scaling = Llama3Scaling{};
  llama.torch_dtype = "bfloat16";
  write_file(dir / "llama.json", to_json(llama));
  ModelConfig qwen2 = llama;
  qwen2.model_type = ModelType::qwen2;
  qwen2.rope_scaling.reset();
  qwen2.attention_bias = true;
  qwen2.tie_word_embeddings = true;
  write_file(dir / "qwen2.json", to_json(qwen2));

  // Small codebooks (the fuzzer's inputs stay short), smoothing on and off.
  const fs::path pvq_dir = argv[2];
  fs::create_directories(pvq_dir);
  std::vector<float> calibration(64 * 16);
  for (size_t i = 0; i < calibration.size(); ++i) calibration[i] = float(int(i * 37 % 23) - 11) * (i % 16 == 3 ? 8.0f : 1.0f);
  for (const bool smoothing : {true, false}) {
    const kvquant::ProductVqConfig c{.head_dim = 16, .subspaces = 4, .bits = 2, .smoothing = smoothing, .kmeans_iterations = 3};
    kvquant::save_product_vq(kvquant::train_product_vq(c, calibration, 64), pvq_dir / (smoothing ? "smoothed.pvq" : "plain.pvq"));
  }
  return 0;
}
