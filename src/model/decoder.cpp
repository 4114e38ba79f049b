// The decode stack over paged KV caches: embedding, the decoder layers (decode_block), the final
// norm and the LM head, for many sequences at once; and token sampling.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/device_memory.h"
#include "decodelab/error.h"
#include "decodelab/router.h"
#include "decodelab/model.h"
#include "reference/elements.h"

namespace decodelab {
namespace {

// The layers that keep the activation-dtype cache: all without kv_quantization, else those it names.
std::vector<bool> f16_layers(const std::optional<KvQuantization>& q, int64_t layers) {
  std::vector<bool> f16(size_t(layers), !q.has_value());
  if (!q) return f16;
  for (size_t i = 0; i < q->f16_layers.size(); ++i) {
    const int l = q->f16_layers[i];
    if (l < 0 || l >= layers) {
      throw Error(fmt::format("LlamaDecoder: config.kv_quantization.f16_layers[{}]: expected a layer index in [0, {}), got {}",
                              i, layers, l));
    }
    f16[size_t(l)] = true;
  }
  return f16;
}

// One of kv_quantization's codec configs for this model (head_dim filled in), checked where the
// error can name the field.
kvquant::TurboQuantConfig codec_config(kvquant::TurboQuantConfig c, const char* name, int64_t head_dim) {
  if (c.head_dim != 0 && c.head_dim != head_dim) {
    throw Error(fmt::format("LlamaDecoder: config.kv_quantization.{}.head_dim: expected 0 or the model's head_dim {}, got {}",
                            name, head_dim, c.head_dim));
  }
  // A split width (kvquant.h) as the fused cpu kernel takes it: h a multiple of 16, bits + 1 <= 4.
  const int64_t h = c.high_bits_channels;
  if (c.bits < 1 || c.bits > 4 || h < 0 || h >= head_dim || h % 16 != 0 || (h > 0 && c.bits == 4)) {
    throw Error(fmt::format("LlamaDecoder: config.kv_quantization.{}: expected an integer width of 1-4 bits, or 1-3 bits "
                            "with high_bits_channels a multiple of 16 below head_dim {} (a split width), got bits {}, "
                            "high_bits_channels {}",
                            name, head_dim, c.bits, h));
  }
  c.head_dim = head_dim;
  return c;
}

}  // namespace

LlamaDecoder::LlamaDecoder(const LlamaModel& model, const Config& config) : model_(model), config_(config) {
  if (config.max_sequences < 1 || config.max_tokens < 1 || config.page_size < 1) {
    throw Error(fmt::format("LlamaDecoder: config: expected max_sequences, max_tokens and page_size >= 1, got {}, {}, {}",
                            config.max_sequences, config.max_tokens, config.page_size));
  }
  check_op_backends(config.run.per_op);  // before anything is allocated
  const DecodeLayerConfig& c = model.layer_config();
  PagedKVCache::Config cache;
  cache.page_size = config.page_size;
  cache.max_pages_per_sequence = (config.max_tokens + config.page_size - 1) / config.page_size;
  cache.num_pages = config.max_sequences * cache.max_pages_per_sequence;
  cache.num_kv_heads = c.num_kv_heads;
  cache.head_dim = c.head_dim;
  cache.dtype = model.options().dtype;
  cache.max_sequences = config.max_sequences;
  cache.device = model.options().device;
  const int64_t layers = int64_t(model.layers().size());
  const std::vector<bool> f16 = f16_layers(config.kv_quantization, layers);
  const int64_t f16_count = std::count(f16.begin(), f16.end(), true);
  caches_.reserve(size_t(f16_count + (f16_count < layers)));  // f16_caches_ points into it
  if (f16_count < layers) {
    const auto& q = *config.kv_quantization;
    const kvquant::TurboQuantConfig k = codec_config(q.k, "k", c.head_dim), v = codec_config(q.v, "v", c.head_dim);
    const kvquant::Codebook k_codebook = kvquant::Codebook::lloyd_max(k.head_dim, k.bits),
                            v_codebook = kvquant::Codebook::lloyd_max(v.head_dim, v.bits);
    PagedKVCache::Config pages = cache;
    pages.pools = false;
    caches_.emplace_back(pages);
    // Zero records (norm 0: a zero vector) where skip() reserved positions that nothing wrote.
    const auto pool = [&](const kvquant::TurboQuantMse& codec) {
      Array records(DType::u8, {cache.num_pages, cache.page_size, c.num_kv_heads, codec.record_bytes()}, cache.device);
      zero_bytes(records);
      return records;
    };
    turboquant_.resize(size_t(layers));
    for (int64_t l = 0; l < layers; ++l) {
      if (f16[size_t(l)]) continue;
      kvquant::TurboQuantConfig kl = k, vl = v;
      kl.seed += uint64_t(l);
      vl.seed += uint64_t(l);
      auto& layer = turboquant_[size_t(l)];
      layer.reset(new TurboQuantLayer{{kl, k_codebook}, {vl, v_codebook}, {}, {}});
      layer->k_records = pool(layer->k_codec);
      layer->v_records = pool(layer->v_codec);
    }
  }
  f16_caches_.assign(size_t(layers), nullptr);
  for (int64_t l = 0; l < layers; ++l) {
    if (f16[size_t(l)]) f16_caches_[size_t(l)] = &caches_.emplace_back(cache);
  }
  // The step's activations, for the most sequences a step can take, allocated once.
  const DType t = model.options().dtype;
  const int64_t rows = config.max_sequences, hidden = model.config().hidden_size;
  x_ = Array(t, {rows, hidden}, cache.device);
  normed_ = Array(t, {rows, hidden}, cache.device);
  logits_ = Array(t, {rows, model.config().vocab_size}, cache.device);
  host_page_table_ = Array(DType::i32, {rows, cache.max_pages_per_sequence});
  host_lengths_ = Array(DType::i32, {rows});
  page_table_ = Array(DType::i32, {rows, cache.max_pages_per_sequence}, cache.device);
  lengths_ = Array(DType::i32, {rows}, cache.device);
  // The caches' pages and lengths are valid by construction (PagedKVCache checks them as it
  // assigns them), so the ops need not copy them back to the host to check them every layer.
  config_.run.check_indices = false;
  backend_ = std::string(config.run.backend);
  for (const OpBackend& choice : config.run.per_op) per_op_names_.emplace_back(choice.op, choice.backend);
  for (const auto& [op, backend] : per_op_names_) per_op_.push_back({op, backend});
  config_.run.backend = backend_;
  config_.run.per_op = per_op_;
  if (config.cuda_graphs && cache.device == Device::cuda) {
    if (config.run.stream.handle != nullptr) {
      throw Error("LlamaDecoder: config.run.stream: expected null (the per-thread default stream) with cuda_graphs, got a stream");
    }
    graphs_.resize(size_t(rows));
  }
}

LlamaDecoder::~LlamaDecoder() = default;

// The layers' caches take the same calls in the same order, so their sequence ids and page
// assignments agree: one id names a sequence in all of them.
int LlamaDecoder::add_sequence() {
  int id = -1;
  for (PagedKVCache& cache : caches_) id = cache.add_sequence();
  return id;
}

void LlamaDecoder::free(int seq) {
  for (PagedKVCache& cache : caches_) cache.free(seq);
}

int LlamaDecoder::graphs_captured() const {
  int n = 0;
  for (const auto& graph : graphs_) n += graph && !graph->empty();
  return n;
}

int64_t LlamaDecoder::kv_bytes_per_token() const {
  const DecodeLayerConfig& c = model_.layer_config();
  int64_t bytes = 0;
  for (size_t l = 0; l < f16_caches_.size(); ++l) {
    bytes += f16_caches_[l] != nullptr
                 ? 2 * c.num_kv_heads * c.head_dim * int64_t(dtype_size(model_.options().dtype))
                 : c.num_kv_heads * (turboquant_[l]->k_codec.record_bytes() + turboquant_[l]->v_codec.record_bytes());
  }
  return bytes;
}

int64_t LlamaDecoder::length(int seq) const { return caches_.empty() ? 0 : caches_[0].length(seq); }

void LlamaDecoder::step(std::span<const int> seqs, std::span<const int32_t> tokens, const Tensor& logits) {
  const ModelConfig& mc = model_.config();
  const int64_t batch = int64_t(seqs.size()), hidden = mc.hidden_size, vocab = mc.vocab_size;
  const DType t = model_.options().dtype;
  const Device device = model_.options().device;
  if (tokens.size() != seqs.size() || batch < 1 || batch > config_.max_sequences) {
    throw Error(fmt::format("LlamaDecoder::step: tokens: expected one per sequence ({}, at most max_sequences = {}), got {}",
                            batch, config_.max_sequences, tokens.size()));
  }
  if (logits.dtype != DType::f32 || logits.device != Device::cpu || logits.rank != 2 || logits.dim(0) != batch ||
      logits.dim(1) != vocab || !logits.is_contiguous()) {
    throw Error(fmt::format("LlamaDecoder::step: logits: expected [{}, {}] f32 on the host, got {}", batch, vocab,
                            logits.describe()));
  }
  // The embedding rows of the tokens.
  const Tensor x = Tensor::contiguous(x_.data(), t, {batch, hidden}, device);
  const int64_t row_bytes = hidden * int64_t(dtype_size(t));
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t token = tokens[size_t(b)];
    if (token < 0 || token >= vocab) {
      throw Error(fmt::format("LlamaDecoder::step: tokens[{}]: expected a token id in [0, {}), got {}", b, vocab, token));
    }
    copy_bytes(Tensor::contiguous(static_cast<char*>(x.data) + b * row_bytes, t, {hidden}, device),
               Tensor::contiguous(static_cast<char*>(model_.embedding().data) + token * row_bytes, t, {hidden}, device));
  }
  // Room for the new token in every layer first: out of pages changes nothing. The layers' caches
  // hold the same pages for the same sequences, so one page table and one set of lengths serve all.
  for (PagedKVCache& cache : caches_) cache.reserve(seqs, 1);
  caches_[0].write_view(seqs, host_page_table_, host_lengths_);
  const int64_t width = page_table_.view().dim(1);
  copy_bytes(Tensor::contiguous(page_table_.data(), DType::i32, {batch, width}, device),
             Tensor::contiguous(host_page_table_.data(), DType::i32, {batch, width}));
  copy_bytes(Tensor::contiguous(lengths_.data(), DType::i32, {batch}, device),
             Tensor::contiguous(host_lengths_.data(), DType::i32, {batch}));
  // The first step of a batch size runs eagerly: it sets up what may not be set up while a stream
  // is captured (memory pools, kernel attributes). The second captures, and later ones replay.
  std::unique_ptr<detail::DeviceGraph>* graph = graphs_.empty() ? nullptr : &graphs_[size_t(batch - 1)];
  if (graph == nullptr || !*graph) {
    run_layers(batch);
    if (graph != nullptr) *graph = std::make_unique<detail::DeviceGraph>();
  } else {
    if ((*graph)->empty()) {
      try {
        (*graph)->capture([&] { run_layers(batch); });
      } catch (const Error& e) {
        throw Error(fmt::format("LlamaDecoder::step: capturing the step as a CUDA graph failed "
                                "(Config::cuda_graphs = false launches the ops one by one): {}", e.what()));
      }
    }
    (*graph)->launch();
  }
  for (PagedKVCache& cache : caches_) cache.advance(seqs, 1);
  const Tensor out = Tensor::contiguous(logits_.data(), t, {batch, vocab}, device);
  Array host(t, {batch, vocab});
  copy_bytes(host.view(), out);
  for (int64_t i = 0; i < batch * vocab; ++i) logits.ptr<float>()[i] = float(reference::load(host, i));
}

void LlamaDecoder::run_layers(int64_t batch) {
  const ModelConfig& mc = model_.config();
  const DType t = model_.options().dtype;
  const Device device = model_.options().device;
  const Tensor x = Tensor::contiguous(x_.data(), t, {batch, mc.hidden_size}, device);
  PagedKV kv;
  kv.page_table = Tensor::contiguous(page_table_.data(), DType::i32, {batch, page_table_.view().dim(1)}, device);
  kv.lengths = Tensor::contiguous(lengths_.data(), DType::i32, {batch}, device);
  for (size_t l = 0; l < f16_caches_.size(); ++l) {
    if (const PagedKVCache* cache = f16_caches_[l]) {
      kv.k_pages = cache->k_pages();
      kv.v_pages = cache->v_pages();
      decode_block(x, model_.layers()[l], model_.layer_config(), kv, x, config_.run);
    } else {
      const TurboQuantLayer& tq = *turboquant_[l];
      const PagedTurboQuantKV records{tq.k_records.view(), tq.v_records.view(), kv.page_table, kv.lengths,
                                      &tq.k_codec, &tq.v_codec};
      decode_block_turboquant(x, model_.layers()[l], model_.layer_config(), records, x, config_.run);
    }
  }
  const Tensor normed = Tensor::contiguous(normed_.data(), t, {batch, mc.hidden_size}, device);
  const Tensor out = Tensor::contiguous(logits_.data(), t, {batch, mc.vocab_size}, device);
  rms_norm(x, model_.final_norm(), model_.layer_config().rms_eps, normed, config_.run);
  matvec(normed, model_.lm_head(), out, config_.run);
}

void LlamaDecoder::prefill(int seq, std::span<const int32_t> prompt, const Tensor& logits) {
  if (prompt.empty()) throw Error("LlamaDecoder::prefill: prompt: expected at least one token, got none");
  for (const int32_t token : prompt) step({&seq, 1}, {&token, 1}, logits);
}

void LlamaDecoder::skip(int seq, int64_t tokens) {
  if (tokens < 0) throw Error(fmt::format("LlamaDecoder::skip: tokens: expected >= 0, got {}", tokens));
  for (PagedKVCache& cache : caches_) cache.reserve({&seq, 1}, tokens);
  for (PagedKVCache& cache : caches_) cache.advance({&seq, 1}, tokens);
}

int32_t sample_token(std::span<const float> logits, const SamplingOptions& o, std::mt19937_64& rng) {
  if (logits.empty()) throw Error("sample_token: logits: expected at least one value, got none");
  if (!(o.temperature >= 0.0f) || o.top_k < 0 || !(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    throw Error(fmt::format("sample_token: options: expected temperature >= 0, top_k >= 0, 0 < top_p <= 1, got {}, {}, {}",
                            o.temperature, o.top_k, o.top_p));
  }
  // Greedy: the first of the largest.
  if (o.temperature == 0.0f) return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  // Token ids by falling logit (ties by id), cut to top_k.
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[size_t(a)] > logits[size_t(b)]; });
  if (o.top_k > 0 && size_t(o.top_k) < order.size()) order.resize(size_t(o.top_k));
  std::vector<double> p(order.size());
  const double top = logits[size_t(order[0])];
  double sum = 0.0;
  for (size_t i = 0; i < order.size(); ++i) sum += p[i] = std::exp((double(logits[size_t(order[i])]) - top) / o.temperature);
  // The smallest prefix whose probability reaches top_p.
  size_t keep = order.size();
  double mass = 0.0;
  for (size_t i = 0; i < order.size(); ++i) {
    mass += p[i] / sum;
    if (mass >= double(o.top_p)) {
      keep = i + 1;
      break;
    }
  }
  std::discrete_distribution<size_t> pick(p.begin(), p.begin() + ptrdiff_t(keep));
  return order[pick(rng)];
}

}  // namespace decodelab
