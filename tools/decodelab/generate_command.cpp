// `decodelab generate`: token ids in, token ids and timings out, for a local Hugging Face
// checkpoint or a generated toy one, beside the bandwidth floor of this model on this machine.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>
#include <random>

#include "commands.h"
#include "decodelab/bench.h"
#include "decodelab/error.h"
#include "decodelab/model.h"

namespace decodelab::cli {
namespace {

// A small model of realistic proportions (GQA 4:1, head_dim 64, Llama 3 RoPE).
ModelConfig toy_config() {
  ModelConfig c;
  c.hidden_size = 512;
  c.intermediate_size = 1536;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.num_hidden_layers = 4;
  c.vocab_size = 4096;
  c.max_position_embeddings = 8192;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  return c;
}

// The shapes --synthetic names: Llama 3 8B (Meta-Llama-3-8B's config.json).
ModelConfig synthetic_config(const std::string& name) {
  if (name != "llama3-8b") throw Error(fmt::format("generate: --synthetic: expected llama3-8b, got {}", name));
  ModelConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.num_hidden_layers = 32;
  c.vocab_size = 128256;
  c.max_position_embeddings = 8192;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling = Llama3Scaling{};
  return c;
}

DType parse_dtype(const std::string& name) {
  for (DType t : {DType::f32, DType::f16, DType::bf16}) {
    if (dtype_name(t) == name) return t;
  }
  throw Error(fmt::format("generate: --dtype: expected f32, f16 or bf16, got {}", name));
}

// `bits` per coordinate as a codec width: an integer, or b + h / D for a split width (kvquant.h),
// whose h the fused kernels take in multiples of 16 (2.5 and 3.5 at head_dim 64, 128, ...).
void set_width(kvquant::TurboQuantConfig& config, double bits, const char* flag, int64_t head_dim) {
  const int whole = int(std::floor(bits));
  const double high = (bits - whole) * double(head_dim);
  if (whole < 1 || whole > 4 || (high != 0 && whole == 4) || high != std::round(high) || int64_t(high) % 16 != 0) {
    throw Error(fmt::format("generate: {}: expected 1, 2, 3, 4 or b + h / {} (head_dim) with b in 1..3 and h a multiple "
                            "of 16 (e.g. 2.5), got {:g}",
                            flag, head_dim, bits));
  }
  config.bits = whole;
  config.high_bits_channels = int64_t(high);
}

// The decoder's KV quantization from --kv-quant and its companions (none without --kv-quant:
// its companions alone are an error rather than silently ignored), for the model's head_dim.
std::optional<KvQuantization> kv_quantization(const GenerateCommandOptions& o, int64_t head_dim) {
  if (o.kv_quant.empty()) {
    if (o.k_bits != 0 || o.v_bits != 0 || !o.f16_layers.empty() || o.kv_scale != "plain") {
      throw Error("generate: --k-bits, --v-bits, --kv-scale and --f16-layers: expected --kv-quant turboquant beside them");
    }
    return std::nullopt;
  }
  KvQuantization q;
  set_width(q.k, o.k_bits != 0 ? o.k_bits : o.kv_bits, o.k_bits != 0 ? "--k-bits" : "--kv-bits", head_dim);
  set_width(q.v, o.v_bits != 0 ? o.v_bits : o.kv_bits, o.v_bits != 0 ? "--v-bits" : "--kv-bits", head_dim);
  const kvquant::ScaleMode scale = o.kv_scale == "unbiased"         ? kvquant::ScaleMode::unbiased
                                   : o.kv_scale == "norm_corrected" ? kvquant::ScaleMode::norm_corrected
                                                                    : kvquant::ScaleMode::plain;
  q.k.scale = q.v.scale = scale;
  q.f16_layers = o.f16_layers;
  return q;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int run_generate(const GenerateCommandOptions& o) {
  LoadOptions load;
  load.device = o.device == "cuda" ? Device::cuda : Device::cpu;
  load.dtype = parse_dtype(o.dtype);
  if (!o.quantize.empty()) load.quantize = parse_quant_spec(o.quantize);
  load.check_finite = o.check_finite;
  std::filesystem::path dir = o.checkpoint;
  if (!o.synthetic.empty() && (o.toy || !dir.empty())) {
    throw Error("generate: --synthetic: expected no checkpoint and no --toy beside it");
  }
  if (o.toy) {
    if (dir.empty()) dir = std::filesystem::temp_directory_path() / "decodelab-toy";
    write_random_llama(dir, toy_config(), DType::bf16, o.seed);
    fmt::print("toy checkpoint: {}\n", dir.string());
  } else if (dir.empty() && o.synthetic.empty()) {
    throw Error("generate: checkpoint: expected a checkpoint directory (or --toy, or --synthetic), got none");
  }
  const auto t_load = std::chrono::steady_clock::now();
  const LlamaModel model = o.synthetic.empty() ? LlamaModel::load(dir, load) : LlamaModel::random(synthetic_config(o.synthetic), load, o.seed);
  if (!o.synthetic.empty()) fmt::print("synthetic {} (random weights, made in {:.1f} s)\n", o.synthetic, seconds_since(t_load));
  const ModelConfig& c = model.config();
  std::vector<int32_t> prompt = o.tokens;
  if (prompt.empty()) prompt = {1};

  LlamaDecoder::Config dc;
  dc.max_tokens = o.context + int64_t(prompt.size()) + o.steps;
  dc.run.backend = o.backend;
  std::vector<OpBackend> per_op;
  for (const std::string& choice : o.op_backends) {
    const size_t eq = choice.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == choice.size()) {
      throw Error(fmt::format("generate: --op-backend: expected OP=BACKEND, got '{}'", choice));
    }
    per_op.push_back({std::string_view(choice).substr(0, eq), std::string_view(choice).substr(eq + 1)});
  }
  dc.run.per_op = per_op;
  dc.kv_quantization = kv_quantization(o, c.head_dim);
  LlamaDecoder decoder(model, dc);
  const int seq = decoder.add_sequence();
  decoder.skip(seq, o.context);
  Array logits(DType::f32, {1, c.vocab_size});
  const std::span<const float> row(logits.ptr<const float>(), size_t(c.vocab_size));
  std::mt19937_64 rng(o.seed);
  const SamplingOptions sampling{o.temperature, o.top_k, o.top_p};

  const auto t0 = std::chrono::steady_clock::now();
  decoder.prefill(seq, prompt, logits);
  const double prefill_s = seconds_since(t0);
  // Decode steps are timed from the second on: on the GPU the first steps of a batch size run
  // eagerly and then capture the CUDA graph, and with a one-token prompt the first decode step is
  // the capture.
  std::vector<int32_t> generated;
  auto t1 = std::chrono::steady_clock::now();
  for (int i = 0; i < o.steps; ++i) {
    generated.push_back(sample_token(row, sampling, rng));
    if (i + 1 < o.steps) decoder.step({&seq, 1}, {&generated.back(), 1}, logits);
    if (i == 0) t1 = std::chrono::steady_clock::now();
  }
  const double decode_s = seconds_since(t1);

  // The floor: a decode step reads every weight once and the K and V of its context in every layer.
  const BandwidthProbe limits = measure_limits(load.device);
  const double mean_context = double(o.context) + double(prompt.size()) + double(o.steps) / 2.0;
  const double kv_bytes = mean_context * double(decoder.kv_bytes_per_token());
  const double bytes_per_token = double(model.weight_bytes_per_token()) + kv_bytes;
  const double floor_tokens_per_s = limits.read_gbps * 1e9 / bytes_per_token;
  const double decode_tps = o.steps > 2 ? double(o.steps - 2) / decode_s : 0.0;  // steps 2..steps-1

  fmt::print("model: {} layers, hidden {}, heads {}/{} (head_dim {}), vocab {}; {} {}{} on {}, backend {}\n",
             c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size,
             model_type_name(c.model_type), dtype_name(load.dtype), load.quantize ? fmt::format(" {}", quant_spec_name(*load.quantize)) : "",
             o.device, o.backend);
  for (const std::string& choice : o.op_backends) fmt::print("op backend: {}\n", choice);
  const int64_t dtype_kv_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * int64_t(dtype_size(load.dtype));
  if (dc.kv_quantization) {
    const KvQuantization& q = *dc.kv_quantization;
    const auto width = [&](const kvquant::TurboQuantConfig& w) { return w.bits + double(w.high_bits_channels) / double(c.head_dim); };
    fmt::print("kv cache: turboquant K {:g}-bit, V {:g}-bit, {} scale, layers kept in {}: [{}]; {} bytes per token of context "
               "({} in {}, {:.2f}x smaller)\n",
               width(q.k), width(q.v), o.kv_scale, dtype_name(load.dtype), fmt::join(q.f16_layers, ", "),
               decoder.kv_bytes_per_token(), dtype_kv_bytes, dtype_name(load.dtype),
               double(dtype_kv_bytes) / double(decoder.kv_bytes_per_token()));
  } else {
    fmt::print("kv cache: {}, {} bytes per token of context\n", dtype_name(load.dtype), dtype_kv_bytes);
  }
  if (o.context > 0) fmt::print("context: {} positions skipped before the prompt (uncomputed K/V)\n", o.context);
  fmt::print("prompt: [{}]\n", fmt::join(prompt, ", "));
  fmt::print("generated: [{}]\n", fmt::join(generated, ", "));
  fmt::print("prefill: {} tokens in {:.3f} s ({:.1f} tokens/s, a decode step per token)\n", prompt.size(), prefill_s,
             double(prompt.size()) / prefill_s);
  if (o.steps <= 2) {
    fmt::print("decode: not timed (the first decode step is not timed; --steps 3 or more)\n");
    return 0;
  }
  fmt::print("decode: {:.1f} tokens/s; floor {:.1f} tokens/s ({:.1f} MB read per token at the measured {:.1f} GB/s): {:.1f}% of the floor\n",
             decode_tps, floor_tokens_per_s, bytes_per_token * 1e-6, limits.read_gbps,
             floor_tokens_per_s > 0 ? 100.0 * decode_tps / floor_tokens_per_s : 0.0);
  return 0;
}

}  // namespace decodelab::cli
