// Helpers shared by the ops' validation code.
#pragma once

#include <cstdint>
#include <vector>

#include "core/check.h"
#include "decodelab/attention.h"
#include "decodelab/kv_cache.h"
#include "decodelab/quant.h"
#include "decodelab/turboquant_cache.h"
#include "decodelab/tensor.h"

namespace decodelab {
struct DecodeBlockArgs;
struct DecodeLayerConfig;
struct DecodeLayerWeights;
}  // namespace decodelab

namespace decodelab::detail {

// The values of a small i32 tensor (lengths, positions, page tables) on the host, copied from
// the GPU when it lives there, so that they can be validated before any launch.
std::vector<int32_t> read_i32(const Tensor& t);

// Validates a contiguous cache against [B, Hkv, *, D] and, with check_values
// (RunOptions::check_indices), that every lengths[b] + extra fits.
void check_contiguous_kv(const ArgCheck& check, const ContiguousKV& cache, int64_t batch, int64_t hkv, int64_t d,
                         DType dtype, Device device, int64_t extra, int64_t min_length, bool check_values);

// Validates a paged cache against [*, *, Hkv, D] and, with check_values, that lengths[b] + extra
// fits its page-table row and that every page it covers is a valid page index.
void check_paged_kv(const ArgCheck& check, const PagedKV& cache, int64_t batch, int64_t hkv, int64_t d, DType dtype,
                    Device device, int64_t extra, int64_t min_length, bool check_values);

// The page-table half of check_paged_kv, for any paged pool of num_pages pages of page_size
// tokens: page_table [B, max_pages] and lengths [B], i32 on `device`; with check_values as above.
void check_page_table(const ArgCheck& check, const Tensor& page_table, const Tensor& lengths, int64_t batch,
                      int64_t num_pages, int64_t page_size, Device device, int64_t extra, int64_t min_length,
                      bool check_values);

// Validates positions: i32, one per token, on `device`, and with check_values each >= 0.
void check_positions(const ArgCheck& check, const Tensor& positions, int64_t tokens, Device device,
                     bool check_values, std::string_view tokens_of = "");

// The options with the scale resolved (0 = 1/sqrt(head_dim)) and checked finite and >= 0.
AttentionOptions resolve_attention_options(const ArgCheck& check, const AttentionOptions& options, int64_t head_dim);

// Resolves rotary_dim and checks the RoPE parameters against head_dim.
RopeParams check_rope(const ArgCheck& check, const RopeParams& params, int64_t head_dim);

// A dense or quantized weight [N, cols] on `device`, its layout checked (defined in quant.cpp).
void check_weight(const ArgCheck& check, const Weight& w, const char* name, int64_t cols, Device device);

// The decode block composed of its device's best stable kernels (decode_block_composed.cpp): the
// cpu and cuda backends' decode_block.
void composed_decode_block(const DecodeBlockArgs& a);
// decode_block_turboquant's body (model.h), the same composition over a TurboQuant cache.
void composed_decode_block_turboquant(const Tensor& x, const DecodeLayerWeights& weights, const DecodeLayerConfig& config,
                                      const PagedTurboQuantKV& cache, const Tensor& out, const RunOptions& run);

}  // namespace decodelab::detail
