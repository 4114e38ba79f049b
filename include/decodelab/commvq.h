// CommVQ key codec, the CPU reference in double: Li, Zhang, Hassan, Chafekar, Cai, Ren, Guo,
// Karimzadeh, Reed, Wang, Gan, "CommVQ: Commutative Vector Quantization for KV Cache Compression",
// ICML 2025, arXiv:2506.18879.
//
// The idea (the paper's). Keys are stored BEFORE RoPE, as additive vector-quantization codes, and
// the codebook is built so that it commutes with RoPE: rotating a decoded key to its position is
// the same as decoding with every codeword rotated, so attention can apply RoPE in code space.
//
// RoPE as a complex product. RoPE turns each pair (a, b) of a head (decodelab's pairing,
// layers.h: half_split pairs (i, i + D/2), interleaved (2i, 2i + 1)) by angle t * w_i, w_i =
// rope_inv_frequency(rope, D, i): (a, b) -> (a c - b s, b c + a s). Read the pair as the complex
// number z = a + i b and that is z -> z e^{i t w_i}. Here every codeword stores one complex value
// per pair, that is a 2x2 block [[x, -y], [y, x]] (x + i y acting by multiplication), and such
// blocks are exactly the 2x2 matrices that commute with every rotation [[c, -s], [s, c]]. Hence
//   RoPE_t(sum_m codeword_m) = sum_m RoPE_t(codeword_m)   (pair by pair: e^{itw} sum x_m = sum e^{itw} x_m),
// and for a query q (pair j: q_j = qa + i qb, a real inner product <q_j, z> = Re(conj(q_j) z)),
//   <q, RoPE_t(k~)> = sum_j Re( e^{i t w_j} sum_m conj(q_j) x_{m, j} ).
// The products T = conj(q_j) x_{m, code, j} do not depend on the position: they are computed once
// per query (prepare_query, one complex value per pair, codebook and codeword), and a token at
// position t costs, per pair, the sum of its codes' table entries and one complex rotation by
// t w_j, without the key ever being decoded or rotated. That is where the commutation is used:
// with a general 2x2 block B, q^T R_t B would need a table per position.
//
// The codebook (additive / residual quantization, the paper's "additive quantization"). The D/2
// pairs are cut into G groups of P consecutive pairs (pair indices [g P, (g + 1) P)); each group
// has M codebooks of 2^bits codewords, each codeword P complex values. A group's key part z_g is
// stored as M codes, and decodes as the sum of the M named codewords. P = 1 quantizes each RoPE
// pair on its own; larger P quantizes several pairs as one vector. Groups follow RoPE pairs, never
// cut one: that is the constraint that makes the codebook commute with RoPE (a group that held
// only one half of a pair would not be closed under its rotation).
//
// Encoding (inferred; see the note below): greedy residual search, codebook m taking the nearest
// codeword (squared distance, ties to the lower index) to what codebooks 0..m-1 left.
// Training (train_commvq): per group, codebook 0 is k-means (product_vq.h's kmeans: Lloyd's
// algorithm, the hard-assignment EM, k-means++ seeding) on the calibration keys' group parts,
// codebook m k-means on what the first m codebooks leave of them. Each stage's distortion is at
// most the last one's (a Lloyd step ends on cluster means, and sum |r - mean|^2 <= sum |r|^2), so
// CommVqFit::distortion never increases.
//
// What was inferred, not read: the paper's full text was not reachable; its excerpts establish
// additive quantization k~ = s C (s binary codes, C in R^{Nc x d}, Nc / d bits per coordinate), a
// codebook that commutes with RoPE (C R = R C) trained by EM on calibration keys, a lightweight
// learned encoder, and values quantized by additive quantization too (no RoPE on values). The
// grouping into P pairs, the M residual codebooks of 2^bits codewords, the hard-assignment EM
// (k-means stage by stage) and the greedy residual encoder in place of the learned one are this
// implementation's choices.
//
// Per-token record (record_bytes() = ceil(G M bits / 8) bytes): the G M codes as one bit stream
// (bitstream.h: little-endian, least significant bit first), code m of group g at stream index
// g M + m, bits wide. Spare high bits of the last byte are zero and ignored. No norm, no position:
// the codewords carry the scale, and the position is the token's place in the cache.
//
// Codewords, config.codeword_count() floats: codebook m of group g, codeword c, pair p (of the
// group) at ((((g M + m) 2^bits + c) P + p) * 2 + {0: real part a, 1: imaginary part b}).
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "decodelab/layers.h"

namespace decodelab::kvquant {

struct CommVqConfig {
  int64_t head_dim = 128;   // D, even, 2..4096
  int64_t group_pairs = 2;  // P RoPE pairs per group, dividing D / 2
  int codebooks = 1;        // M residual codebooks per group, 1..16
  int bits = 8;             // per code: 2^bits codewords per codebook, 1..12
  // The model's RoPE (theta, pairing, Llama 3 scaling); rotary_dim 0 or D (all of the head).
  RopeParams rope{};
  int kmeans_iterations = 25;  // Lloyd steps per codebook at most, 1..10000
  uint64_t training_seed = 0;  // k-means++ seeding; codebook m of group g draws from seed + g M + m

  int64_t pairs() const { return head_dim / 2; }
  int64_t groups() const { return pairs() / group_pairs; }  // G
  int64_t codewords_per_codebook() const { return int64_t{1} << bits; }
  int64_t bits_per_token() const { return groups() * codebooks * bits; }
  double bits_per_coordinate() const { return double(bits_per_token()) / double(head_dim); }
  int64_t codeword_count() const { return groups() * codebooks * codewords_per_codebook() * group_pairs * 2; }
};

// A query ready for scoring: table[(((g M + m) 2^bits + c) P + p) * 2 + {re, im}] = conj(q_j) x,
// x the pair-p value of codeword c of codebook m of group g, j = g P + p.
struct CommVqQuery {
  std::vector<double> table;
};

class CommVqCodebook {
 public:
  // From trained or stored codewords (layout above); validates the config and every value.
  CommVqCodebook(const CommVqConfig& config, std::vector<float> codewords);

  const CommVqConfig& config() const { return config_; }
  std::span<const float> codewords() const { return codewords_; }
  int64_t record_bytes() const;
  // The head coordinates of pair j (0 <= j < D/2): its real and imaginary part.
  std::pair<int64_t, int64_t> pair_coordinates(int64_t j) const;
  // RoPE's angle for pair j at `position`, as the library's rope computes it.
  double angle(int64_t j, int64_t position) const { return double(position) * inv_frequency_[size_t(j)]; }

  // A pre-RoPE key (head_dim finite values) into `record` (record_bytes()).
  void encode(std::span<const float> x, std::span<uint8_t> record) const;
  // `record` into the pre-RoPE key k~ (head_dim values).
  void decode(std::span<const uint8_t> record, std::span<float> x) const;
  // `record` decoded with every codeword turned by RoPE's angles at `position` (>= 0): by the
  // commutation above, RoPE_position(decode(record)) up to rounding to f32.
  void decode_rotated(std::span<const uint8_t> record, int64_t position, std::span<float> x) const;
  // The G M codes of a record, for tests and backends.
  std::vector<uint16_t> codes(std::span<const uint8_t> record) const;

  // q (head_dim finite values, the query after its own RoPE) into its tables.
  CommVqQuery prepare_query(std::span<const float> q) const;
  // <q, RoPE_position(decode(record))>, from the tables, in code space.
  double score(const CommVqQuery& query, int64_t position, std::span<const uint8_t> record) const;
  // One query against the keys at positions first_position, first_position + 1, ...: `records`
  // holds scores.size() records back to back.
  void score_run(const CommVqQuery& query, int64_t first_position, std::span<const uint8_t> records,
                 std::span<double> scores) const;

 private:
  CommVqConfig config_;
  std::vector<float> codewords_;
  std::vector<double> inv_frequency_;  // per pair
};

// The trained codebook and its distortion on the calibration keys: distortion[s] is the mean over
// keys of |x - (the sum of the first s codewords of every group)|^2, s = 0..M (distortion[0] =
// mean |x|^2); it never increases.
struct CommVqFit {
  CommVqCodebook codebook;
  std::vector<double> distortion;
};

// n calibration keys before RoPE (n x head_dim finite values, row-major), n >= 2^bits.
CommVqFit train_commvq(const CommVqConfig& config, std::span<const float> calibration, int64_t n);

}  // namespace decodelab::kvquant
