// decodelab_interop <dir>: runs one op of the reference backend for test_interop.py, which feeds
// the same random inputs to the owners' packages (mlx, gguf) and compares the results; or reads or
// writes a safetensors file for test_safetensors.py, which checks it against the safetensors package;
// or runs the Llama decode stack for test_llama_mlx_lm.py, which checks it against mlx-lm.
//
// <dir>/request.json = {"op": ..., "params": {...},
//                       "inputs": {name: {"file": "x.bin", "dtype": "f32", "shape": [...]}}}
// Files are raw little-endian arrays. Each output is written as <dir>/<name>.bin and listed in
// <dir>/response.json = {"outputs": {name: {"file", "dtype", "shape"}}}. Any error (a
// decodelab::Error from the library, or a malformed request) goes to stderr with exit status 1.
#include <fmt/format.h>

#include <bit>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "decodelab/attention.h"
#include "decodelab/checkpoint.h"
#include "decodelab/error.h"
#include "decodelab/layers.h"
#include "decodelab/model.h"
#include "decodelab/quant.h"

namespace {

using namespace decodelab;
namespace fs = std::filesystem;
using json = nlohmann::json;

// The files are read and written as the host lays arrays out in memory.
static_assert(std::endian::native == std::endian::little, "the interop files are little-endian");

const RunOptions kReference{"reference"};

using Inputs = std::map<std::string, Array>;
using Outputs = std::vector<std::pair<std::string, Array>>;

DType parse_dtype(const std::string& name) {
  for (DType t : {DType::f32, DType::f16, DType::bf16, DType::u32, DType::u8, DType::i32}) {
    if (dtype_name(t) == name) return t;
  }
  fail("interop", fmt::format("unknown dtype \"{}\"", name));
}

std::span<const int64_t> shape_of(const Tensor& t) { return {t.shape.data(), size_t(t.rank)}; }

Array read_array(const fs::path& dir, const std::string& name, const json& spec) {
  const auto shape = spec.at("shape").get<std::vector<int64_t>>();
  if (shape.empty() || shape.size() > size_t(kMaxRank)) {
    fail("interop", fmt::format("input {}: rank {} is not in [1, {}]", name, shape.size(), kMaxRank));
  }
  Array a(parse_dtype(spec.at("dtype").get<std::string>()), shape);
  const fs::path file = dir / spec.at("file").get<std::string>();
  std::ifstream in(file, std::ios::binary);
  if (!in || fs::file_size(file) != a.nbytes()) {
    fail("interop", fmt::format("input {}: {} must hold {} bytes", name, file.string(), a.nbytes()));
  }
  in.read(static_cast<char*>(a.data()), std::streamsize(a.nbytes()));
  return a;
}

const Tensor& input(const Inputs& inputs, const std::string& name) {
  const auto it = inputs.find(name);
  if (it == inputs.end()) fail("interop", fmt::format("missing input \"{}\"", name));
  return it->second.view();
}

// params {format: "mlx"|"q4_0"|"q8_0", bits, group_size}; the GGUF formats imply bits and group
// size, and the library rejects values that disagree with them.
QuantSpec parse_spec(const json& params) {
  const std::string format = params.at("format").get<std::string>();
  QuantSpec spec;
  if (format == "q4_0") {
    spec = QuantSpec::q4_0();
  } else if (format == "q8_0") {
    spec = QuantSpec::q8_0();
  } else if (format != "mlx") {
    fail("interop", fmt::format("unknown quantization format \"{}\"", format));
  }
  spec.bits = params.value("bits", spec.bits);
  spec.group_size = params.value("group_size", spec.group_size);
  return spec;
}

Outputs run_quantize(const Inputs& inputs, const json& params) {
  const QuantSpec spec = parse_spec(params);
  const Tensor& w = input(inputs, "w");
  if (w.rank != 2) fail("interop", fmt::format("quantize: w must be [N, K], got {}", w.describe()));
  // mlx.core.quantize returns scales and biases in the dtype of w.
  QuantizedArray q = make_quantized(spec, w.dim(0), w.dim(1), w.dtype);
  quantize(w, q.weight, kReference);
  Outputs out;
  out.emplace_back("packed", std::move(q.packed));
  if (spec.format == QuantFormat::mlx_affine) {
    out.emplace_back("scales", std::move(q.scales));
    out.emplace_back("biases", std::move(q.biases));
  }
  return out;
}

Outputs run_dequantize(const Inputs& inputs, const json& params) {
  const QuantSpec spec = parse_spec(params);
  QuantizedWeight w{spec, 0, 0, input(inputs, "packed"), {}, {}};
  if (w.packed.rank != 2) fail("interop", fmt::format("dequantize: packed must be 2-D, got {}", w.packed.describe()));
  // The matrix shape follows from the packed width; the library checks everything else.
  w.rows = w.packed.dim(0);
  if (spec.format == QuantFormat::mlx_affine) {
    w.cols = w.packed.dim(1) * 32 / spec.bits;
    w.scales = input(inputs, "scales");
    w.biases = input(inputs, "biases");
  } else {
    w.cols = w.packed.dim(1) / gguf_block_bytes(spec.format) * kGgufBlockSize;
  }
  Array out(parse_dtype(params.at("out_dtype").get<std::string>()), {w.rows, w.cols});
  dequantize(w, out, kReference);
  Outputs result;
  result.emplace_back("out", std::move(out));
  return result;
}

Outputs run_rms_norm(const Inputs& inputs, const json& params) {
  const Tensor& x = input(inputs, "x");
  Array out(x.dtype, shape_of(x));
  rms_norm(x, input(inputs, "weight"), params.at("eps").get<float>(), out, kReference);
  Outputs result;
  result.emplace_back("out", std::move(out));
  return result;
}

Outputs run_rope(const Inputs& inputs, const json& params) {
  RopeParams rope;
  rope.theta = params.at("theta").get<float>();
  const std::string style = params.at("style").get<std::string>();
  if (style == "half_split") {
    rope.style = RopeStyle::half_split;
  } else if (style == "interleaved") {
    rope.style = RopeStyle::interleaved;
  } else {
    fail("interop", fmt::format("unknown rope style \"{}\"", style));
  }
  rope.rotary_dim = params.value("rotary_dim", 0);
  if (params.contains("llama3")) {
    const json& l = params.at("llama3");
    rope.llama3_scaling = true;
    rope.llama3 = {l.at("factor").get<float>(), l.at("low_freq_factor").get<float>(),
                   l.at("high_freq_factor").get<float>(), l.at("original_max_position").get<int>()};
  }
  const Tensor& x = input(inputs, "x");
  Array out(x.dtype, shape_of(x));
  decodelab::rope(x, input(inputs, "positions"), rope, out, kReference);
  Outputs result;
  result.emplace_back("out", std::move(out));
  return result;
}

Outputs run_prefill_attention(const Inputs& inputs, const json& params) {
  const AttentionOptions options{params.at("causal").get<bool>(), params.at("scale").get<float>()};
  const Tensor& q = input(inputs, "q");
  Array out(q.dtype, shape_of(q));
  prefill_attention(q, input(inputs, "k"), input(inputs, "v"), out, options, kReference);
  Outputs result;
  result.emplace_back("out", std::move(out));
  return result;
}

// params {file}: writes every input, named by its input name, with write_safetensors.
Outputs run_safetensors_write(const Inputs& inputs, const fs::path& dir, const json& params) {
  std::vector<NamedTensor> tensors;
  for (const auto& [name, array] : inputs) tensors.emplace_back(name, array.view());
  write_safetensors(dir / params.at("file").get<std::string>(), tensors);
  return {};
}

// params {file, names (default: every tensor)}: each tensor as SafetensorsFile::tensor views it,
// copied out of the mapping.
Outputs run_safetensors_read(const fs::path& dir, const json& params) {
  const SafetensorsFile file(dir / params.at("file").get<std::string>());
  const std::vector<std::string> names =
      params.contains("names") ? params.at("names").get<std::vector<std::string>>() : file.names();
  Outputs result;
  for (const std::string& name : names) {
    const Tensor t = file.tensor(name);
    Array copy(t.dtype, shape_of(t));
    copy_bytes(copy, t);
    result.emplace_back(name, std::move(copy));
  }
  return result;
}

// params {checkpoint, tokens, quantize ("" or a spec name)}: the logits [T, vocab] f32 after each
// token, the tokens fed one decode step at a time through LlamaDecoder on the reference backend.
Outputs run_llama_logits(const json& params) {
  LoadOptions load;
  const std::string quantize = params.value("quantize", "");
  if (!quantize.empty()) load.quantize = parse_quant_spec(quantize);
  const LlamaModel model = LlamaModel::load(params.at("checkpoint").get<std::string>(), load);
  const auto tokens = params.at("tokens").get<std::vector<int32_t>>();
  const int64_t vocab = model.config().vocab_size;
  LlamaDecoder::Config config;
  config.max_tokens = int64_t(tokens.size());
  config.run = kReference;
  LlamaDecoder decoder(model, config);
  const int seq = decoder.add_sequence();
  Array logits(DType::f32, {int64_t(tokens.size()), vocab});
  for (size_t i = 0; i < tokens.size(); ++i) {
    const Tensor row = Tensor::contiguous(logits.ptr<float>() + int64_t(i) * vocab, DType::f32, {1, vocab});
    decoder.step({&seq, 1}, {&tokens[i], 1}, row);
  }
  Outputs result;
  result.emplace_back("logits", std::move(logits));
  return result;
}

void run(const fs::path& dir) {
  std::ifstream request_file(dir / "request.json");
  if (!request_file) fail("interop", fmt::format("cannot read {}", (dir / "request.json").string()));
  const json request = json::parse(request_file);
  Inputs inputs;
  for (const auto& [name, spec] : request.at("inputs").items()) inputs.emplace(name, read_array(dir, name, spec));
  const std::string op = request.at("op").get<std::string>();
  const json& params = request.at("params");
  Outputs outputs;
  if (op == "quantize") {
    outputs = run_quantize(inputs, params);
  } else if (op == "dequantize") {
    outputs = run_dequantize(inputs, params);
  } else if (op == "rms_norm") {
    outputs = run_rms_norm(inputs, params);
  } else if (op == "rope") {
    outputs = run_rope(inputs, params);
  } else if (op == "prefill_attention") {
    outputs = run_prefill_attention(inputs, params);
  } else if (op == "safetensors_write") {
    outputs = run_safetensors_write(inputs, dir, params);
  } else if (op == "safetensors_read") {
    outputs = run_safetensors_read(dir, params);
  } else if (op == "llama_logits") {
    outputs = run_llama_logits(params);
  } else {
    fail("interop", fmt::format("unknown op \"{}\"", op));
  }
  json response = {{"outputs", json::object()}};
  for (const auto& [name, array] : outputs) {
    const std::string file = name + ".bin";
    std::ofstream out(dir / file, std::ios::binary);
    out.write(static_cast<const char*>(array.data()), std::streamsize(array.nbytes()));
    if (!out) fail("interop", fmt::format("cannot write {}", (dir / file).string()));
    const Tensor& t = array.view();
    response["outputs"][name] = {{"file", file},
                                 {"dtype", std::string(dtype_name(t.dtype))},
                                 {"shape", std::vector<int64_t>(t.shape.begin(), t.shape.begin() + t.rank)}};
  }
  std::ofstream(dir / "response.json") << response.dump(1) << '\n';
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: decodelab_interop <dir>\n";
    return 2;
  }
  try {
    run(argv[1]);
  } catch (const std::exception& e) {  // decodelab::Error, or a malformed request (JSON, files)
    std::cerr << e.what() << '\n';
    return 1;
  }
  return 0;
}
