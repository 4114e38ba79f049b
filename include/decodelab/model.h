// The Llama-family decode stack: one decoder layer for a decode step (decode_block), and on top
// of it a model loaded from a Hugging Face checkpoint (LlamaModel), a decoder that runs it over
// paged KV caches for many sequences (LlamaDecoder), and token sampling.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "decodelab/attention.h"
#include "decodelab/checkpoint.h"
#include "decodelab/kv_cache.h"
#include "decodelab/kvquant.h"
#include "decodelab/layers.h"
#include "decodelab/quant.h"
#include "decodelab/turboquant_cache.h"

namespace decodelab {

struct DecodeLayerConfig {
  int64_t hidden = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate = 0;
  float rms_eps = 1e-5f;
  RopeParams rope{};
};

struct DecodeLayerWeights {
  Tensor attn_norm;  // [hidden]
  Tensor mlp_norm;   // [hidden]
  Weight wq, wk, wv, wo;
  Weight gate, up, down;
  // The q/k/v projections' output biases (Qwen2): [num_heads * head_dim], [num_kv_heads * head_dim]
  // twice, in x's dtype. A default Tensor (no data, rank 0) for a model without them; each one
  // independently (see has_bias).
  Tensor bq, bk, bv;
};

// Whether an optional bias is given. Anything but a default Tensor counts, so that a shaped bias
// with null data is an error rather than silently skipped.
inline bool has_bias(const Tensor& bias) { return bias.data != nullptr || bias.rank != 0; }

// One decode step of one layer for B sequences, one new token each (x, out = [B, hidden]):
//   h = x + Wo attention(rope(Wq n + bq), cache + rope(Wk n + bk), Wv n + bv),  n = rms_norm(x)
//   out = h + mlp(rms_norm(h))
// (each bias term only where the weights have it).
// The new token's K and V are written at lengths[b] (its position) and attention covers
// lengths[b] + 1 tokens; the caller advances the lengths afterwards. out may alias x.
void decode_block(const Tensor& x, const DecodeLayerWeights& weights,
                  const DecodeLayerConfig& config, const PagedKV& cache, const Tensor& out,
                  const RunOptions& run = {});

// decode_block over a TurboQuant cache (turboquant_cache.h): the new token's K and V, rotated by
// RoPE as in decode_block, are encoded into the records at lengths[b] (turboquant_append_paged) and
// attention runs over the records (turboquant_decode_attention_paged), never over decoded f16 K/V.
// The other pieces are decode_block's. There is no fused kernel: the pieces run on run.backend
// ("reference" composes the reference's ops, "cpu" and "cuda" their own). out may alias x.
void decode_block_turboquant(const Tensor& x, const DecodeLayerWeights& weights,
                             const DecodeLayerConfig& config, const PagedTurboQuantKV& cache,
                             const Tensor& out, const RunOptions& run = {});

// ---------------------------------------------------------------------------------------------
// A Llama-family model (Llama 2/3, Mistral, Qwen2 with its q/k/v projection biases).

namespace detail {
class WeightSource;
class DeviceGraph;
}

struct LoadOptions {
  Device device = Device::cpu;
  DType dtype = DType::f32;            // activations, norms, embeddings and dense weights
  std::optional<QuantSpec> quantize;   // quantize-on-load of every projection and the LM head
  bool check_finite = false;           // refuse NaN or Inf weights (reads every weight once)
};

// The weights in decode_block's layout, converted to options.dtype (and quantized on request) on
// options.device. Every tensor of the checkpoint must be used and every expected one present:
// the error names each missing, extra or misshapen tensor (Hugging Face names, e.g.
// "model.layers.3.self_attn.k_proj.weight: expected [1024, 4096], got [4096, 4096]").
class LlamaModel {
 public:
  // config.json and the safetensors weights of a checkpoint directory.
  static LlamaModel load(const std::filesystem::path& dir, const LoadOptions& options = {});
  static LlamaModel from_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint,
                                    const LoadOptions& options = {});
  // A model of this shape with random weights made in memory, already in the layout (and the
  // quantized format) of `options`: no checkpoint is written or read, so a full-size model (an
  // 8B one) is ready in seconds. For speed measurements; its tokens mean nothing (with
  // tie_word_embeddings the LM head has the embedding's shape but values of its own).
  static LlamaModel random(const ModelConfig& config, const LoadOptions& options, uint64_t seed);

  const ModelConfig& config() const { return config_; }
  const LoadOptions& options() const { return options_; }
  const DecodeLayerConfig& layer_config() const { return layer_config_; }
  const Tensor& embedding() const { return embed_.view(); }  // [vocab, hidden]
  std::span<const DecodeLayerWeights> layers() const { return layers_; }
  const Tensor& final_norm() const { return final_norm_.view(); }
  const Weight& lm_head() const { return lm_head_; }
  // Bytes a decode step must read for the weights (all layers, the LM head, one embedding row).
  int64_t weight_bytes_per_token() const;

 private:
  static LlamaModel build(const ModelConfig& config, const LoadOptions& options, detail::WeightSource& source);

  ModelConfig config_;
  LoadOptions options_;
  DecodeLayerConfig layer_config_;
  std::vector<Array> storage_;  // every array the views below point into
  Array embed_, final_norm_;
  std::vector<DecodeLayerWeights> layers_;
  Weight lm_head_;
};

// Writes a random Llama model of `config` (weights and q/k/v biases N(0, 0.02), norms near 1, in
// `dtype`) as config.json and model.safetensors into `dir`: the toy checkpoint of
// `decodelab generate --toy`.
void write_random_llama(const std::filesystem::path& dir, const ModelConfig& config, DType dtype,
                        uint64_t seed);

// ---------------------------------------------------------------------------------------------
// Decoding many sequences over paged KV caches (one pool per layer, pages of `page_size`).

// K and V of some layers as TurboQuant (MSE) records instead of the activation dtype
// (turboquant_cache.h): every layer but those in f16_layers. Each such layer has its own K
// and V codec of these configs with the rotation seed k.seed + layer (v.seed + layer), so that
// no two layers share a rotation; the codebooks are computed once for all. head_dim: 0 (the
// model's) or the model's; bits 1-4, or a split width (bits 1-3, high_bits_channels a multiple of
// 16: 2.5 or 3.5 bits per coordinate; kvquant.h). The cuda backend takes fewer (its kernels: 2-4
// bits of one integer width, head_dim 64, 96, 128 or 256, no unbiased scale in the append;
// src/cuda/supports.cpp) and says so at the first step.
// The record pools have the f16 caches' pages (max_sequences * max_tokens / page_size).
// With cuda_graphs, the eager first step of a batch size uploads each codec's rotation, which
// a capture may not do (src/cuda/turboquant_tables.cpp); the captured steps reuse them.
struct KvQuantization {
  kvquant::TurboQuantConfig k{.head_dim = 0}, v{.head_dim = 0};
  std::vector<int> f16_layers;  // layer indices that keep the activation-dtype cache
};

class LlamaDecoder {
 public:
  struct Config {
    int64_t max_sequences = 1;
    int64_t max_tokens = 4096;  // per sequence
    int64_t page_size = 16;
    // The backend of every op of the stack ("auto", "reference", ...), and per-op choices over it
    // (run.per_op, checked by check_op_backends; the decoder keeps copies of the names). The
    // decoder turns check_indices off: its own caches keep page tables and lengths valid.
    RunOptions run{};
    // On the GPU, the layers, the final norm and the LM head of a step are one CUDA graph per
    // batch size: the first step of a size runs eagerly, the second is captured, later ones
    // replay it (on the per-thread default stream; run.stream must be null). Off: every op is
    // launched on its own.
    bool cuda_graphs = true;
    // K and V of every layer but kv_quantization->f16_layers as TurboQuant records (KvQuantization).
    std::optional<KvQuantization> kv_quantization;
  };
  LlamaDecoder(const LlamaModel& model, const Config& config);
  ~LlamaDecoder();
  LlamaDecoder(const LlamaDecoder&) = delete;
  LlamaDecoder& operator=(const LlamaDecoder&) = delete;

  int add_sequence();
  void free(int seq);
  int64_t length(int seq) const;

  // One decode step: tokens[i] is appended to sequence seqs[i]; logits = [len(seqs), vocab] f32
  // on the host, the next-token distribution of each sequence.
  void step(std::span<const int> seqs, std::span<const int32_t> tokens, const Tensor& logits);
  // Feeds a prompt to one sequence (a decode step per token); logits of its last token.
  void prefill(int seq, std::span<const int32_t> prompt, const Tensor& logits);
  // Lengthens a sequence by `tokens` positions that are not computed: decode speed at a context
  // length without paying for its prefill. For benchmarks only: their K and V are whatever the
  // pages hold (zeros in pages no sequence has used; stale values in pages freed by free()).
  void skip(int seq, int64_t tokens);
  // How many batch sizes have a captured CUDA graph (config.cuda_graphs on the GPU; else 0).
  int graphs_captured() const;
  // Bytes of K and V that one token of context takes over all layers (what attention reads per
  // token of context): the activation dtype's in f16 layers, the records' in TurboQuant ones.
  int64_t kv_bytes_per_token() const;

 private:
  // The layers, final norm and LM head of a step over the first `batch` rows of the buffers below.
  void run_layers(int64_t batch);

  // A layer's TurboQuant codecs and record pools (u8 [num_pages, page_size, Hkv, R]).
  struct TurboQuantLayer {
    kvquant::TurboQuantMse k_codec, v_codec;
    Array k_records, v_records;
  };

  const LlamaModel& model_;
  Config config_;
  // The page tables and lengths of every layer, driven in lockstep: one cache per f16 layer, and
  // with TurboQuant layers one more without pools whose pages their records follow.
  std::vector<PagedKVCache> caches_;
  // Per layer: its f16 cache in caches_, or (null there) its TurboQuant records.
  std::vector<const PagedKVCache*> f16_caches_;
  std::vector<std::unique_ptr<TurboQuantLayer>> turboquant_;
  Array x_, normed_, logits_;         // a step's activations, max_sequences rows
  // The step's page table and lengths (all layers share them) at fixed addresses: filled on the
  // host, copied to the model's device.
  Array host_page_table_, host_lengths_, page_table_, lengths_;
  std::vector<std::unique_ptr<detail::DeviceGraph>> graphs_;  // per batch size - 1, once it ran eagerly
  // The names that config_.run views.
  std::string backend_;
  std::vector<std::pair<std::string, std::string>> per_op_names_;
  std::vector<OpBackend> per_op_;
};

// Token sampling over one row of logits: greedy when temperature is 0, else softmax at
// `temperature`, restricted to the top_k most likely tokens (0: all) and then to the smallest
// set whose probability reaches top_p (1: all), drawn with `rng`.
struct SamplingOptions {
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
};
int32_t sample_token(std::span<const float> logits, const SamplingOptions& options, std::mt19937_64& rng);

}  // namespace decodelab
