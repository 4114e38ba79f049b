// A paged KV cache of KIVI records (kvquant.h), the op that appends new tokens to it and fused
// decode attention over it (issue 5, item 8). KIVI: Liu et al., "KIVI: A Tuning-Free Asymmetric
// 2bit Quantization for KV Cache", arXiv:2402.02750.
//
// Which tokens are quantized is KiviCache's rule (kvquant.h), from lengths[b] = T and the codec's
// key_group G and residual R alone:
//   keys:   tokens [0, Qk) in key blocks, Qk = floor(max(T - R, 0) / G) * G;
//   values: tokens [0, Qv) in value records, Qv = max(T - R, 0);
// and the rest, keys [Qk, T) and values [Qv, T), in full precision. So an engine that appends
// token T - 1 writes it to the recent window, quantizes the value of token T - 1 - R once it
// exists, and quantizes a key block once its last token has left the last R: kivi_append_paged
// below.
//
// Layout. One page table for both pools: page p of sequence b, page_table[b, p], holds tokens
// [p * P, (p + 1) * P) with P = page_size, a multiple of G, so that a page holds whole key blocks.
//   k_pages:    u8 [num_pages, P / G, Hkv, Kb], Kb = codec->key_block_bytes() = 8 D + ceil(G D b / 8)
//   v_pages:    u8 [num_pages, P, Hkv, Vb],     Vb = codec->value_record_bytes()
//                                                  = 8 (D / value_group) + ceil(D b / 8)
//   recent_k:   f32 [B, W, Hkv, D], W = R + G: the full-precision keys, a ring over tokens
//   recent_v:   f32 [B, W, Hkv, D]:             the full-precision values, the same ring
//   page_table: i32 [B, max_pages]; lengths: i32 [B].
// The key block of tokens [jG, (j + 1) G) of sequence b, KV head h (a KiviCodec key block record:
// per-channel f32 lo and scale, then the G * D codes token-major) starts at byte
//   ((page_table[b, jG / P] * (P / G) + (jG % P) / G) * Hkv + h) * Kb
// of k_pages; the value record of token t (per-group f32 lo and scale, then the D codes) at byte
//   ((page_table[b, t / P] * P + t % P) * Hkv + h) * Vb
// of v_pages. The full-precision key of token t is the D floats at element
//   ((b * W + t % W) * Hkv + h) * D
// of recent_k (its value likewise in recent_v). A ring, so that quantizing a block moves nothing;
// W = R + G rather than the R + G - 1 full-precision keys a cache holds at most, so that the new
// token can be written before the block it completes is quantized out of the ring. The page
// table covers all T tokens, the full-precision ones too (they are quantized into their pages
// later). Slots of the pools below Qk (keys) or Qv (values) and ring slots of tokens outside
// [Qk, T) (keys) or [Qv, T) (values) are never read.
//
// f32 for the recent window: tokens come back bit-exact, as in KiviCache, and the window is a
// fixed R + G tokens per sequence (at D = 128, Hkv = 8, R = G = 32: 256 KiB of keys and as much of values per sequence and
// layer),
// while the quantized pages grow with the context. At D = 128, G = 32, value_group = 32 a 2-bit
// token costs 2048 / 32 = 64 key bytes + 64 value bytes per KV head against 512 in f16; 4-bit 96 + 96.
//
// As with PagedKV, ops never change `lengths`: kivi_append_paged writes the pools and the ring,
// and the owner of the cache advances the lengths after it. The codec is a host object; the
// tensors live in host memory for the reference and cpu backends, and in GPU memory for cuda's
// attention. The append runs on the host backends only: a GPU cache is appended to on the host
// and copied over.
#pragma once

#include "decodelab/attention.h"
#include "decodelab/kvquant.h"
#include "decodelab/router.h"
#include "decodelab/tensor.h"

namespace decodelab {

struct PagedKiviKV {
  Tensor k_pages;
  Tensor v_pages;
  Tensor recent_k;
  Tensor recent_v;
  Tensor page_table;
  Tensor lengths;
  const kvquant::KiviCodec* codec = nullptr;  // owned by the caller, alive for the call
};

// Appends S new tokens to every sequence: k_new, v_new = [B, S, Hkv, D], or [B, Hkv, D] for one
// token (S = 1), in f32, f16 or bf16. Token s of sequence b becomes token t = lengths[b] + s,
// the tokens taken in order, and each does what KiviCache::append does to the cache of T = t + 1
// tokens, in kivi_cache.h's layout:
//   1. its key and value, widened to f32 (exactly), go to ring slot t % W of recent_k, recent_v;
//   2. if T - R >= 1, the value of token t - R has left the last R: codec->encode_value of the
//      ring's copy is written to its record in v_pages (with R = 0, the new value itself);
//   3. if T - R is a positive multiple of G, the key block of tokens [T - R - G, T - R) has left
//      the last R: codec->encode_keys of the ring's G keys is written to its block in k_pages.
// So after appends of any sizes that sum to T tokens, the pools and the ring hold, for every slot
// attention reads, the bytes of a cache built at once from the same T tokens by KiviCache's rule
// (every backend writes the same bytes: they run KiviCodec's encoders). Ring slots are
// overwritten only once their token is quantized (W = R + G). Nothing else changes: not the
// lengths, not a slot attention does not read. The page table must cover lengths[b] + S tokens
// (pages are written through it as tokens are quantized into them), and lengths[b] may be 0.
void kivi_append_paged(const Tensor& k_new, const Tensor& v_new, const PagedKiviKV& cache,
                       const RunOptions& run = {});

// Decode attention of one query per sequence over the lengths[b] >= 1 tokens of the cache:
// q, out = [B, Hq, D] (f32, f16 or bf16), Hq a multiple of Hkv (query head h reads KV head
// h / (Hq / Hkv)); options.scale as in decode_attention (0 = 1/sqrt(D)); options.causal has no
// effect with one query. The result is attention over the decoded keys and values (KiviCache's
// keys() and values()), computed without decoding them: a key block's per-channel (lo, scale)
// give the score of its token t as
//   q . k~_t = sum_d q_d (lo_d + scale_d code_td) = q . lo + sum_d (q_d scale_d) code_td,
// so q is folded with the block's scales once and every token costs a dot product with its codes;
// values are accumulated from their codes and per-group (lo, scale); the recent tokens as they are.
//
// Record contents are checked where they are read: a record with a non-finite lo or a negative
// or non-finite scale (no encoder writes one, so the cache is corrupt) among those read gets an
// error naming the first in (sequence, KV head, token) order, a key block at its first token and
// before the value of that token, instead of a NaN output. The full-precision window is not
// checked, as an f16 cache is not. The reference and cpu backends check; the cuda backend does
// not (it would need a flag read back after the launch, a synchronization per call) and gives NaN
// or wrong outputs for such a cache, as turboquant_decode_attention_paged's does.
void kivi_decode_attention_paged(const Tensor& q, const PagedKiviKV& cache, const Tensor& out,
                                 const AttentionOptions& options = {}, const RunOptions& run = {});

}  // namespace decodelab
