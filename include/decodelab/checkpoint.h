// Hugging Face checkpoints: the Llama-family config.json and safetensors weights, memory-mapped.
//
// Everything read from disk is validated before it is used, and every refusal is a
// decodelab::Error naming the file, the field or tensor, what was expected and what was found:
//   "config.json: num_key_value_heads: expected a divisor of num_attention_heads (32), got 5"
//
// safetensors (https://github.com/huggingface/safetensors, format in its README):
//   8 bytes   N, the header length, unsigned little-endian
//   N bytes   a JSON object {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...} plus an
//             optional "__metadata__" string->string map; it starts with '{' and may be padded
//             with trailing spaces
//   the rest  the data section; offsets are relative to its first byte. The tensors must cover
//             it exactly: no gaps, no overlaps, nothing after the last tensor.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "decodelab/layers.h"
#include "decodelab/tensor.h"

namespace decodelab {

// ---------------------------------------------------------------------------------------------
// config.json

enum class ModelType : uint8_t { llama, mistral, qwen2 };

std::string_view model_type_name(ModelType t);  // "llama", "mistral", "qwen2"

// The fields of a Llama-family config.json (Llama 2/3, Mistral, Qwen2) that the decode stack
// needs. Names follow the Hugging Face keys.
struct ModelConfig {
  ModelType model_type = ModelType::llama;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // absent: num_attention_heads (no GQA)
  int64_t head_dim = 0;             // absent: hidden_size / num_attention_heads; always even
  int64_t num_hidden_layers = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<Llama3Scaling> rope_scaling;  // rope_scaling {"rope_type": "llama3", ...}
  bool tie_word_embeddings = false;  // lm_head reuses embed_tokens
  bool attention_bias = false;       // q/k/v projections have biases (always for qwen2)
  std::string torch_dtype;           // informational ("bfloat16"); "" when absent
};

// Parses and validates a config.json text; `source` names it in errors (a path, "config.json").
//  - required: model_type (llama, mistral or qwen2), hidden_size, intermediate_size,
//    num_attention_heads, num_hidden_layers, vocab_size, rms_norm_eps, max_position_embeddings;
//    optional: num_key_value_heads, head_dim, rope_theta, rope_scaling, tie_word_embeddings,
//    attention_bias, torch_dtype (or its newer name dtype), sliding_window, use_sliding_window.
//    An optional key set to null counts as absent, as in transformers.
//  - head_dim may differ from hidden_size / num_attention_heads (Mistral, Qwen allow it).
//  - rope_scaling: null, or rope_type (or the older key type) "llama3" with factor,
//    low_freq_factor, high_freq_factor and original_max_position_embeddings.
//  - A sliding window narrower than max_position_embeddings is refused (not supported); qwen2
//    ignores sliding_window unless use_sliding_window is true, as transformers does.
//  - Informational keys (architectures, bos/eos/pad_token_id, transformers_version, use_cache,
//    initializer_range, attention_dropout, ...) are ignored; some must hold the only value this
//    library implements: hidden_act "silu", pretraining_tp 1, mlp_bias false. Any other key is
//    an error naming it, so that a feature we do not implement (quantization_config, ...) is
//    never silently dropped.
ModelConfig parse_model_config(std::string_view json, std::string_view source);

// Reads `<path>/config.json` when `path` is a directory, else the file `path`.
ModelConfig load_model_config(const std::filesystem::path& path);

// A config.json for `config` that parse_model_config reads back to the same fields.
std::string to_json(const ModelConfig& config);

// ---------------------------------------------------------------------------------------------
// safetensors

// The element types of the safetensors format (its Rust Dtype, 0.6+). Only F32, F16 and BF16
// can be viewed as decodelab Tensors; the others are listed and their bytes readable.
enum class SafetensorsDType : uint8_t {
  BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
};

std::string_view safetensors_dtype_name(SafetensorsDType t);  // "F16", as in the header
int safetensors_dtype_bits(SafetensorsDType t);                // 4 for F4, 16 for F16, ...
// The decodelab dtype of F32, F16 and BF16; nullopt for the others.
std::optional<DType> safetensors_to_dtype(SafetensorsDType t);

// One tensor of a safetensors header.
struct SafetensorsEntry {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::F32;
  std::vector<int64_t> shape;  // any rank, [] for a scalar; sizes may be 0
  uint64_t begin = 0;          // byte range [begin, end) relative to the data section
  uint64_t end = 0;
};

struct SafetensorsHeader {
  uint64_t data_offset = 0;  // where the data section starts in the file: 8 + header length
  std::map<std::string, std::string> metadata;  // "__metadata__"
  std::vector<SafetensorsEntry> entries;        // sorted by name

  // The entry named `name`, or nullptr.
  const SafetensorsEntry* find(std::string_view name) const;
};

// The largest header accepted, as the safetensors reference implementation: 100 MB.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// Parses and validates the header of a whole safetensors file held in `file_bytes` (the data
// section included, since the offsets are checked against it); `source` names the file in
// errors. Checks: the length prefix fits in the file and kMaxSafetensorsHeaderBytes; the header
// is UTF-8 JSON starting with '{' with no duplicate keys; __metadata__ maps strings to strings;
// every tensor has exactly dtype (a known name), shape (non-negative integers) and data_offsets
// ([begin, end], begin <= end <= data size); the element count times the element size equals
// end - begin without overflow; the tensors cover the data section exactly, with no gap and no
// overlap. Pure: reads nothing but `file_bytes`.
SafetensorsHeader parse_safetensors_header(std::span<const uint8_t> file_bytes,
                                           std::string_view source = "safetensors");

// A safetensors file, memory-mapped read-only and validated when opened. Move-only; views and
// spans it returns live as long as it does. The mapping is read-only: writing through a Tensor
// it returns faults.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(std::string_view name) const { return header_.find(name) != nullptr; }
  // The entry of `name`; an Error naming the file and the tensor when it is absent.
  const SafetensorsEntry& info(std::string_view name) const;
  // The raw little-endian bytes of `name`, for any dtype.
  std::span<const uint8_t> bytes(std::string_view name) const;
  // A contiguous host view of `name` into the mapping. Refused with an Error: dtypes other than
  // F32, F16 and BF16, rank above 4, and data not aligned to its element size. Unaligned data is
  // refused rather than copied because every kernel loads whole elements, a silent copy would
  // double the memory of a mapped checkpoint, and the safetensors writers align it anyway (they
  // pad the header to 8 bytes and order tensors by falling element size); copy bytes() into an
  // Array to use such a tensor.
  Tensor tensor(std::string_view name) const;

 private:
  void unmap();

  std::filesystem::path path_;
  const uint8_t* map_ = nullptr;  // the whole file; null for an empty file
  size_t size_ = 0;
  SafetensorsHeader header_;
};

// A named host tensor to write.
using NamedTensor = std::pair<std::string, Tensor>;

// Writes `tensors` (contiguous, on the host, F32/F16/BF16, distinct non-empty names that are not
// "__metadata__") to `path` as a safetensors file with __metadata__ {"format": "pt"}. The header
// lists them by name; the data section orders them by falling element size, then by name, and
// the header is padded with spaces to a multiple of 8 bytes, as the safetensors writer does, so
// every tensor is aligned to its element size.
void write_safetensors(const std::filesystem::path& path, std::span<const NamedTensor> tensors);

// ---------------------------------------------------------------------------------------------
// Checkpoints

// The weights of a Hugging Face checkpoint: a directory holding model.safetensors (preferred, as
// transformers does) or model.safetensors.index.json with its shards, or one .safetensors file.
// The index ({"metadata": {...}, "weight_map": {tensor: shard file}}) is checked against the
// shards: every shard is a plain file name in the directory (no path separators, no "..") and
// exists, every tensor listed is in its shard, and every tensor of a shard is listed there
// and in no other shard.
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& path);

  std::vector<std::string> names() const;  // sorted, over all shards
  bool contains(std::string_view name) const;
  const SafetensorsEntry& info(std::string_view name) const;
  Tensor tensor(std::string_view name) const;  // as SafetensorsFile::tensor

 private:
  const SafetensorsFile& file_of(std::string_view name) const;

  std::filesystem::path path_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t, std::less<>> file_index_;  // tensor name -> files_ index
};

}  // namespace decodelab
