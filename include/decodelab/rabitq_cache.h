// A paged KV cache whose keys are RaBitQ / extended RaBitQ records and whose values are TurboQuant
// (MSE) records (kvquant.h), the op that appends new tokens to it and fused decode attention over
// it (issue 5, item 8).
//
// Layout. The pages, page table and lengths of PagedTurboQuantKV (turboquant_cache.h), with
// RabitqKeys records on the key side:
//   k_pages: u8 [num_pages, page_size, Hkv, Rk], Rk = k_codec->record_bytes() = 8 + B * ceil(D / 8)
//   v_pages: u8 [num_pages, page_size, Hkv, Rv], Rv = v_codec->record_bytes() = 4 + ceil(D * bv / 8)
//   page_table: i32 [B, max_pages]; lengths: i32 [B].
// The key record of token t of sequence b, KV head h starts at byte
//   ((page_table[b, t / page_size] * page_size + t % page_size) * Hkv + h) * Rk
// of k_pages (values likewise with Rv). A key record is RabitqKeys' (kvquant.h): bytes [0, 4) the
// norm n = ||k - c|| and [4, 8) the correction <o_bar, o>, little-endian f32s, then B bit planes of
// ceil(D / 8) bytes holding the codes u_j of the grid point y_j = u_j - (2^B - 1) / 2. A value
// record is TurboQuantMse's (turboquant_cache.h). Both codecs have the queries' head_dim; the
// value codec may have a split width, as for PagedTurboQuantKV.
// At D = 128 a 1-bit key costs 24 bytes per KV head and a 4-bit one 72, against 256 in f16.
//
// As with PagedKV, ops never change `lengths`: the owner of the cache advances them after an
// append. The codecs are host objects; the tensors live on the device of the backend (host memory
// for reference and cpu, GPU memory for cuda, which uploads the codecs' rotations once and passes
// the value codebook by value: src/cuda/turboquant_tables.h).
#pragma once

#include "decodelab/attention.h"
#include "decodelab/kvquant.h"
#include "decodelab/record_cache.h"
#include "decodelab/router.h"
#include "decodelab/tensor.h"

namespace decodelab {

using PagedRabitqKV = PagedRecordKV<kvquant::RabitqKeys>;

// Appends S new tokens to every sequence: k_new, v_new = [B, S, Hkv, D], or [B, Hkv, D] for one
// token (S = 1), in f32, f16 or bf16. Token s of sequence b is encoded into the records of token
// lengths[b] + s, exactly as k_codec->encode and v_codec->encode encode the values widened to f32
// (every backend writes the same bytes). The page table must cover lengths[b] + S tokens. The cuda
// backend does not check the new tokens' values on the device: a non-finite one gives a record with
// a NaN or infinite norm (which attention turns into NaN outputs) where the host backends throw.
void rabitq_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedRabitqKV& cache,
                         const RunOptions& run = {});

// Decode attention of one query per sequence over the lengths[b] >= 1 tokens of the cache:
// q, out = [B, Hq, D] (f32, f16 or bf16), Hq a multiple of Hkv (query head h reads KV head
// h / (Hq / Hkv)); options.scale as in decode_attention (0 = 1/sqrt(D)); options.causal has no
// effect with one query.
//
// Scores are RaBitQ's estimator with the full-precision query, k_codec->estimate(q, record):
//   <q, k>^ = <q, c> + n <y, R_K q> / (||y|| <o_bar, o>),
// computed without decoding: q' = R_K q once per query head, then per token a dot product of q'
// with the record's grid point y and one factor n / (||y|| <o_bar, o>). The term <q, c> of a
// centroid c is the same for every token of a query, so the softmax does not see it and the fused
// kernels leave it out. The quantized-query popcount score (RabitqKeys::quantize_query and score)
// is not offered: it adds the query's rounding variance (kvquant.h) to a score whose dot product
// over f32 rows costs no more in this kernel than the popcounts, and it needs a rounding seed per
// call. The softmax weights p_t accumulate o' = sum_t p_t n_t s_t c_V[idx_t] in V's rotated domain
// and out = R_V^T o' is rotated back once per query head, as turboquant_decode_attention_paged.
//
// The cuda backend takes head_dim 64, 96, 128 or 256 and values of 2, 3 or 4 bits of one integer
// width (any key bits), from 4-byte aligned pools.
//
// Record contents are checked where they are read (the argument checks cannot afford a scan of the
// cache): a key record whose norm is NaN, infinite or negative, or whose correction is outside
// (0, 1], or a value record with such a norm (no encoder writes them, so the cache is corrupt),
// among the lengths[b] tokens read gets an error naming the first in (sequence, KV head, token)
// order, key before value, norm before correction, instead of a NaN output. Records past
// lengths[b] are never read. The reference and cpu backends check; the cuda backend does not (as for
// turboquant_decode_attention_paged) and gives NaN or wrong outputs for such a cache.
void rabitq_decode_attention_paged(const Tensor& q, const PagedRabitqKV& cache, const Tensor& out,
                                   const AttentionOptions& options = {}, const RunOptions& run = {});

}  // namespace decodelab
