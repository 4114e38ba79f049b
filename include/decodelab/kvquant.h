// KV-cache vector quantization, base layer, TurboQuant (MSE), QJL keys, KIVI and RaBitQ keys,
// the CPU reference in double.
//
// - Bit packing of 1-4-bit indices and of sign bits.
// - Rotations: a dense Haar-random orthogonal matrix (the reference) and a two-round randomized
//   Hadamard transform (the fast path), both from a seed.
// - The Lloyd-Max codebook for one coordinate of a uniformly random unit vector in D dimensions.
// - TurboQuant (MSE): Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector Quantization
//   with Near-optimal Distortion Rate", arXiv:2504.19874 (2025), Algorithm 1. A vector is stored
//   as its norm plus one codebook index per coordinate of its rotated direction.
// - TurboQuant (inner product): the same paper's Algorithm 2, TurboQuant (MSE) at b - 1 bits plus
//   a 1-bit QJL sketch of the residual; an option with unbiased inner products.
// - QJL keys: Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL Transform for KV Cache Quantization
//   with Zero Overhead", arXiv:2406.03482 (2024). A key is stored as its norm plus the m sign bits
//   of a seeded Gaussian sketch S k; a full-precision query q scores it with the unbiased
//   estimator sqrt(pi/2) / m * ||k|| * <S q, sign(S k)>.
// - KIVI: Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu, "KIVI: A Tuning-Free Asymmetric 2bit
//   Quantization for KV Cache", arXiv:2402.02750 (ICML 2024). Asymmetric (min, scale) integer
//   codes: keys per channel over blocks of G tokens, values per token in groups of channels, the
//   most recent R tokens in full precision.
// - RaBitQ keys: Gao, Long, "RaBitQ: Quantizing High-Dimensional Vectors with a Theoretical Error
//   Bound for Approximate Nearest Neighbor Search", arXiv:2405.12497 (SIGMOD 2024), and its
//   B-bit extension, Gao, Gou, Xu, Yang, Long, Wong, "Practical and Asymptotically Optimal
//   Quantization of High-Dimensional Vectors in Euclidean Space for Approximate Nearest Neighbor
//   Search", arXiv:2409.09913 (SIGMOD 2025). A key is stored as its norm, B bits per coordinate
//   of its rotated direction and one correction factor; a query quantized to a few bits scores it
//   by AND + popcount of bit planes, with an unbiased estimator and an explicit error bound.
//
// - PolarQuant: Han, Kacham, Karbasi, Mirrokni, Zandieh, "PolarQuant: Quantizing KV Caches with
//   Polar Transformation", arXiv:2502.02617 (2025). A vector is rotated, transformed into polar
//   coordinates level by level, and stored as its top radii plus per-level angle codebook indices.
//
// Everything here computes in double: it is the oracle that later CPU and CUDA codecs must match
// code for code.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace decodelab::kvquant {

// ---------------------------------------------------------------------------------------------
// Bit packing.
//
// Layout: a little-endian bit stream. Value j of n b-bit values occupies stream bits
// [j*b, (j+1)*b), least significant bit first, and stream bit k is bit (k % 8) of byte k / 8.
// So 2- and 4-bit values never straddle a byte, 3-bit values may (value 2 takes bits 6-7 of byte 0
// and bit 0 of byte 1). The stream is ceil(n*b / 8) bytes; the spare high bits of its last byte
// are written as zero and ignored when reading.

// Bytes that `count` values of `bits` bits (1..4) take: ceil(count * bits / 8).
int64_t packed_bytes(int64_t count, int bits);

// values[j] < 2^bits into `packed`, which must be exactly packed_bytes(values.size(), bits).
void pack_bits(std::span<const uint8_t> values, int bits, std::span<uint8_t> packed);
// The other way: `packed` must be exactly packed_bytes(values.size(), bits).
void unpack_bits(std::span<const uint8_t> packed, int bits, std::span<uint8_t> values);

// Sign bits use the 1-bit layout: bit j is 1 where x[j] < 0, so +0.0 and -0.0 both read as +1.
void pack_signs(std::span<const float> x, std::span<uint8_t> packed);
// signs[j] = +1.0f or -1.0f.
void unpack_signs(std::span<const uint8_t> packed, std::span<float> signs);

// ---------------------------------------------------------------------------------------------
// Rotations: an orthogonal D x D matrix R drawn from a seed; apply computes y = R x and
// apply_inverse x = R^T y. The seed fully defines R (the random stream is decodelab's own, not a
// standard-library distribution, so a seed means the same rotation with every standard library).

enum class RotationKind : uint8_t {
  // Haar-random: the Q of the QR decomposition of a seeded Gaussian matrix, with R's diagonal
  // positive (that choice of signs is what makes Q Haar-distributed). D*D doubles, O(D^2) per
  // vector. D in [2, 4096].
  dense,
  // Randomized Hadamard, R = B S2 P B S1: S1, S2 diagonal random signs, P a random permutation,
  // B block-diagonal with normalized Walsh-Hadamard blocks of the powers of two that sum to D
  // (96 = 64 + 32), largest first. Each factor is orthogonal, hence so is R. The permutation lets
  // the second round mix coordinates across blocks; two rounds of signs spread a spiky input,
  // which one round does not. O(D log D) per vector, D a multiple of 16 (every block >= 16).
  // Two rounds are not Haar: they put a spike's coordinates on a lattice of spacing 2/block.
  // Averaged over seeds, TurboQuant's error on e_0 at D = 128 is 1.5% (1-2 bits) to 7.6% (4 bits)
  // above its value under a Haar rotation, inside the paper's bounds
  // (KvTurboQuant.SpikyInputOverRotationSeeds); random unit vectors see no difference.
  hadamard,
};

std::string_view rotation_kind_name(RotationKind kind);  // "dense", "hadamard"

class Rotation {
 public:
  static Rotation make(RotationKind kind, int64_t dim, uint64_t seed);

  RotationKind kind() const { return kind_; }
  int64_t dim() const { return dim_; }
  uint64_t seed() const { return seed_; }

  // y = R x; x and y have dim() elements and may be the same span.
  void apply(std::span<const double> x, std::span<double> y) const;
  // x = R^T y, the inverse; x and y may be the same span.
  void apply_inverse(std::span<const double> y, std::span<double> x) const;

  // The factors, read-only, for a backend that must repeat apply()'s arithmetic step for step on
  // another device (the CUDA encoder, whose codes are bit-exact with encode()). Each is empty
  // where the kind has no such factor.
  std::span<const double> matrix() const { return matrix_; }             // dense: R, row-major
  std::span<const int64_t> blocks() const { return blocks_; }            // hadamard
  std::span<const double> signs1() const { return signs1_; }             // hadamard: S1
  std::span<const double> signs2() const { return signs2_; }             // hadamard: S2
  std::span<const int64_t> permutation() const { return permutation_; }  // hadamard: P

 private:
  Rotation(RotationKind kind, int64_t dim, uint64_t seed) : kind_(kind), dim_(dim), seed_(seed) {}
  void hadamard_blocks(std::span<double> v) const;

  RotationKind kind_;
  int64_t dim_;
  uint64_t seed_;
  std::vector<double> matrix_;         // dense: R, row-major
  std::vector<int64_t> blocks_;        // hadamard: Walsh-Hadamard block sizes, largest first
  std::vector<double> signs1_;         // hadamard: S1, +1 or -1
  std::vector<double> signs2_;         // hadamard: S2
  std::vector<int64_t> permutation_;   // hadamard: (P v)[i] = v[permutation_[i]]
};

// ---------------------------------------------------------------------------------------------
// Lloyd-Max codebook for one coordinate x of a uniformly random unit vector in D dimensions,
// which has density f(x) = (1 - x^2)^((D-3)/2) / B(1/2, (D-1)/2) on [-1, 1] (the paper's Lemma 1;
// variance 1/D, close to N(0, 1/D) for large D). The 2^bits centroids minimize E[(x - c(x))^2]:
// iterated until each centroid is the mean of f over its cell and each boundary the midpoint of
// its neighbours, the integrals computed by Gauss-Legendre quadrature in x = sin(theta), where
// f dx = cos^(D-2)(theta) dtheta is smooth for every D >= 3.
//
// A codebook belongs to one D: its scale is 1/sqrt(D), and TurboQuant refuses a codebook whose D
// differs from its head_dim.
class Codebook {
 public:
  // Any D >= 3, bits 1..4.
  static Codebook lloyd_max(int64_t dim, int bits);

  int64_t dim() const { return dim_; }
  int bits() const { return bits_; }
  std::span<const double> centroids() const { return centroids_; }    // 2^bits, ascending
  std::span<const double> boundaries() const { return boundaries_; }  // 2^bits - 1 midpoints
  // E[(x - c(x))^2] under f: the expected squared error per coordinate of a unit vector.
  double distortion() const { return distortion_; }
  // Index of the nearest centroid; a value exactly on a boundary goes to the upper centroid.
  uint8_t index_of(double x) const;

 private:
  Codebook(int64_t dim, int bits) : dim_(dim), bits_(bits) {}

  int64_t dim_;
  int bits_;
  std::vector<double> centroids_;
  std::vector<double> boundaries_;
  double distortion_ = 0.0;
};

// ---------------------------------------------------------------------------------------------
// TurboQuant (MSE) for one vector x of head_dim D.
//
// Encode: n = ||x||; u = x / n (u = 0 when n = 0); y = R u; index_j = the nearest centroid of the
// codebook for this D to y_j (the coordinates of y have the density above); pack the indices.
// Decode: unpack, y~_j = centroid[index_j], u~ = R^T y~, x~ = scale * u~.
//
// Per-token record of an integer width (high_bits_channels = 0; record_bytes() =
// 4 + ceil(D * bits / 8) bytes, byte-aligned only):
//   bytes [0, 4)  the norm n as an f32, little-endian. f32 rather than f16: the norm is a small
//                 part of the record (4 of 68 bytes at D = 128, 4 bits), and f32 neither overflows
//                 on large keys nor adds error to the codes.
//   bytes [4, ..) the D indices, bit-packed as above.
// Plain and norm-corrected read and write the same record; unbiased stores its scale s (below)
// where the others store n, and decodes as plain does.
//
// Fractional widths by splitting channels (high_bits_channels = h > 0): the first h coordinates
// of y = R u take b + 1 bits with the Lloyd-Max codebook for (D, b + 1), the other D - h take b
// bits with the codebook for (D, b), so a vector costs b + h / D bits per coordinate (2.5 bits at
// D = 128 is b = 2, h = 64; 3.5 is b = 3, h = 64). Which coordinates get the wider codes does not
// matter: after a random rotation every coordinate of y has the same density (Lemma 1), so any
// fixed set of h of them gives the same expected error, D * distortion = h * distortion(b + 1) +
// (D - h) * distortion(b); the first h is the choice that keeps each part contiguous. The scale
// modes apply unchanged (<y, y~> and ||y~|| are over all D coordinates). Record
// (record_bytes() = 4 + ceil(h * (b + 1) / 8) + ceil((D - h) * b / 8) bytes):
//   bytes [0, 4)        the norm (or the unbiased scale), f32, as above.
//   then                the h high-width indices, pack_bits at b + 1 bits, ceil(h * (b + 1) / 8)
//                       bytes (index j is coordinate j);
//   then                the D - h low-width indices, pack_bits at b bits (index j is coordinate
//                       h + j), each part starting on a byte.
// With h = 0 the record is the integer-width record above, byte for byte. The paged cache ops take
// a split codec where h is a multiple of 16 (turboquant_cache.h); encode() and decode() are its
// reference.

enum class ScaleMode : uint8_t {
  // x~ = n * u~. E||u - u~||^2 is D * codebook.distortion(), the quantity the paper bounds; u~ is
  // shorter than u (E||u~||^2 = 1 - D * distortion), so decoded vectors are biased short.
  plain,
  // x~ = n * u~ / ||u~||: the decoded vector keeps the norm of x exactly. Its squared error
  // differs from plain's at second order. For unit vectors at D = 128 (KvTurboQuant tests) it is
  // larger at 1 and 2 bits (0.401 vs 0.361, 0.119 vs 0.116) and slightly smaller at 3 and 4
  // (0.0338 vs 0.0340, 0.00918 vs 0.00933): u lies on the sphere and u~ inside it, so plain's
  // per-coordinate centroids are not the best estimate of u given all D indices.
  norm_corrected,
  // x~ = s * u~ with s = n / <y, y~> (y~ the centroids; <y, y~> > 0 unless n = 0, as every centroid
  // has the sign of its coordinate), stored in the record in place of n. Then <x~, x> = ||x||^2
  // exactly, so for any query direction independent of x the estimate <q, x~> is unbiased:
  // E_q[<q, x~> <q, x>] / E_q[<q, x>^2] = <x~, x> / ||x||^2 = 1, where plain's ratio is
  // <u~, u> (about 1 - D * distortion, e.g. 0.88 at 2 bits). The price is a longer x~ (its squared
  // error grows). Decoders and the fused kernels treat the record as plain's: n is just s.
  unbiased,
};

std::string_view scale_mode_name(ScaleMode mode);  // "plain", "norm_corrected", "unbiased"

struct TurboQuantConfig {
  int64_t head_dim = 128;  // a multiple of 16 in [16, 256]
  int bits = 4;            // 1..4 bits per coordinate
  RotationKind rotation = RotationKind::hadamard;
  uint64_t seed = 0;       // the rotation's seed: same config, same codes
  ScaleMode scale = ScaleMode::plain;
  // h in [0, head_dim): the first h rotated coordinates take bits + 1 bits (bits <= 3 then), the
  // rest `bits`; 0 (the default) for an integer width. See the split record above.
  int64_t high_bits_channels = 0;

  // bits + high_bits_channels / head_dim: 2.5 for {128, 2, ..., high_bits_channels = 64}.
  double bits_per_coordinate() const { return double(bits) + double(high_bits_channels) / double(head_dim); }
};

class TurboQuantMse {
 public:
  // Builds the rotation and computes the codebook for (head_dim, bits), and for a split width
  // the one for (head_dim, bits + 1).
  explicit TurboQuantMse(const TurboQuantConfig& config);
  // With a codebook computed before; it must be for head_dim and bits (a split width's wider
  // codebook is computed here).
  TurboQuantMse(const TurboQuantConfig& config, Codebook codebook);

  const TurboQuantConfig& config() const { return config_; }
  // The codebook of the `bits`-bit coordinates (all of them at an integer width).
  const Codebook& codebook() const { return codebook_; }
  // A split width's codebook for the first high_bits_channels coordinates, at bits + 1; null at
  // an integer width.
  const Codebook* high_codebook() const { return high_codebook_ ? &*high_codebook_ : nullptr; }
  const Rotation& rotation() const { return rotation_; }
  int64_t record_bytes() const;

  // x (head_dim finite values) into `record` (record_bytes()).
  void encode(std::span<const float> x, std::span<uint8_t> record) const;
  // `record` (record_bytes()) into x (head_dim values).
  void decode(std::span<const uint8_t> record, std::span<float> x) const;

 private:
  TurboQuantConfig config_;
  Rotation rotation_;
  Codebook codebook_;
  std::optional<Codebook> high_codebook_;
};

// ---------------------------------------------------------------------------------------------
// QJL keys: a key k of head_dim D as the signs of m Gaussian projections, for inner products with
// full-precision queries (the attention scores q . k).
//
// The sketch S is m x D with i.i.d. N(0, 1) entries, drawn row by row (S[0][0], S[0][1], ...)
// from decodelab's seeded stream, the one behind the dense rotation: a dense rotation of the same
// D and seed orthogonalizes the same Gaussian draws that make S's first D rows, so a codec that
// needs the two independent (TurboQuant's inner-product variant) gives them different seeds.
//
// Encode: n = ||k||, s_i = sign((S k)_i) in {+1, -1}, with (S k)_i = 0 taken as +1 (pack_signs'
// convention); the key's scale is not needed to take signs, so none is stored but n.
// Score: <q, k>^ = sqrt(pi/2) / m * n * sum_i (S q)_i s_i.
//
// Why it is unbiased (the paper's Lemma on the inner-product estimator, derived here in the form
// the tests use): for one row g ~ N(0, I_D), write q = a k/n + q_perp with q_perp orthogonal to
// k; then g.q_perp is independent of g.k, so E[(g.q) sign(g.k)] = (a/n) E|g.k| = (a/n) n sqrt(2/pi)
// = sqrt(2/pi) <q, k> / n. Each term X_i = sqrt(pi/2) n (S q)_i s_i thus has mean <q, k>, and the
// estimate is the mean of m independent X_i.
// Its variance, exactly: X_i^2 = (pi/2) n^2 (S q)_i^2, so E X_i^2 = (pi/2) ||q||^2 ||k||^2 and
//   Var <q, k>^ = ((pi/2) ||q||^2 ||k||^2 - <q, k>^2) / m  <=  (pi/2) ||q||^2 ||k||^2 / m.
// The bound is reached for q orthogonal to k; for q parallel to k the variance is
// (pi/2 - 1) ||q||^2 ||k||^2 / m, a factor 1 - 2/pi = 0.363 of it. (The paper states a tail
// bound of the same order, |<q, k>^ - <q, k>| <= eps ||q|| ||k|| with high probability once m is
// of order 1/eps^2; the exact variance is what KvQjl* tests measure.)
//
// Per-token record (record_bytes() = 4 + ceil(m / 8) bytes):
//   bytes [0, 4)  the norm n as an f32, little-endian (as TurboQuant's record).
//   bytes [4, ..) the m sign bits in pack_signs' layout: bit i % 8 of byte 4 + i / 8 is 1 where
//                 (S k)_i < 0; the spare high bits of the last byte are zero.
struct QjlConfig {
  int64_t head_dim = 128;    // D in [2, 4096]
  int64_t sketch_dim = 256;  // m in [1, 16384]: the estimate's variance falls as 1/m
  uint64_t seed = 0;         // the sketch's seed: same config, same codes
};

class QjlKeys {
 public:
  // Draws the sketch: m * D doubles.
  explicit QjlKeys(const QjlConfig& config);

  const QjlConfig& config() const { return config_; }
  // S, m x D, row-major.
  std::span<const double> sketch() const { return sketch_; }
  int64_t record_bytes() const;

  // k (head_dim finite values) into `record` (record_bytes()).
  void encode(std::span<const float> k, std::span<uint8_t> record) const;
  // One query against n keys: `records` holds n records back to back (n * record_bytes() bytes)
  // and scores[j] becomes the estimate of <q, k_j>, n = scores.size(). S q is computed once
  // (m * D multiply-adds); each key then costs m sign flips and adds.
  void score(std::span<const float> q, std::span<const uint8_t> records, std::span<double> scores) const;
  // One query against one key: score() with n = 1.
  double estimate(std::span<const float> q, std::span<const uint8_t> record) const;

 private:
  void score_records(std::string_view op, std::span<const float> q, std::span<const uint8_t> records,
                     std::span<double> scores) const;

  QjlConfig config_;
  std::vector<double> sketch_;
};

// ---------------------------------------------------------------------------------------------
// TurboQuant (inner product), an option, not the default: arXiv:2504.19874, Algorithm 2. b bits
// per coordinate = TurboQuant (MSE) at b - 1 bits (plain scale) + 1-bit QJL with m = D on the
// residual r = x - x~_mse, for unbiased inner products <q, x> with full-precision queries.
//
// Encode: the MSE record of x; x~_mse = its decoding (f32, as any decoder sees it); r = x - x~_mse;
// the QJL record of r (||r|| and sign(S r)), S the m x D Gaussian sketch of sketch_seed.
// Estimate: <q, x>^ = <q, x~_mse> + sqrt(pi/2) / m * ||r|| * <S q, sign(S r)>. Decode: x~ =
// x~_mse + sqrt(pi/2) / m * ||r|| * S^T sign(S r) (the paper's DeQuant_prod), whose inner product
// with any q is the estimate.
// Unbiased: given the rotation, r is fixed and QJL's estimate of <q, r> is unbiased over S
// (QjlKeys above), so E_S <q, x>^ = <q, x~_mse> + <q, r> = <q, x>, for every q and x.
// Variance over S, given the rotation (QJL's, with r for k):
//   Var <q, x>^ = ((pi/2) ||q||^2 ||r||^2 - <q, r>^2) / m  <=  (pi/2) ||q||^2 ||r||^2 / m,
// with E ||r||^2 = ||x||^2 * D * distortion(b - 1) (TurboQuant's plain distortion at b - 1 bits).
// The caveat (issue 5): for a q independent of x, the plain MSE quantizer at the same b has score
// error variance about ||q||^2 ||x||^2 distortion(b), this one about (pi/2 - 1/D) ||q||^2 ||x||^2
// distortion(b - 1): 4-6x larger at b = 2..4, D = 128 (KvTurboQuantProd.ScoreVarianceVsMse).
// Unbiased, but noisier, and attention's softmax is hurt more by the noise than by the MSE
// quantizer's shrinkage; hence an option.
//
// Per-token record (record_bytes() = 4 + ceil(D (b - 1) / 8) + 4 + ceil(D / 8) bytes; 56 at
// D = 128, b = 3, where TurboQuantMse at 3 bits takes 52):
//   bytes [0, M)        the TurboQuantMse record of x at b - 1 bits, M = its record_bytes();
//   bytes [M, M + 4)    ||r|| as an f32, little-endian;
//   bytes [M + 4, ..)   the D sign bits of S r in pack_signs' layout.
// That is the MSE record followed by the QjlKeys record of r.
struct TurboQuantProdConfig {
  int64_t head_dim = 128;  // a multiple of 16 in [16, 256]
  int bits = 3;            // b in 2..5: b - 1 bits of MSE codes, 1 of QJL signs
  RotationKind rotation = RotationKind::hadamard;
  uint64_t seed = 0;         // the rotation's seed
  // The sketch's; must differ from seed: both draw from decodelab's seeded stream, and a dense
  // rotation of the same seed orthogonalizes the very draws that make S (QjlKeys above).
  uint64_t sketch_seed = 1;
};

class TurboQuantProd {
 public:
  explicit TurboQuantProd(const TurboQuantProdConfig& config);
  // With the codebook of the MSE stage computed before: for head_dim and bits - 1.
  TurboQuantProd(const TurboQuantProdConfig& config, Codebook mse_codebook);

  const TurboQuantProdConfig& config() const { return config_; }
  const TurboQuantMse& mse() const { return mse_; }  // the b - 1-bit stage
  const QjlKeys& qjl() const { return qjl_; }        // the residual's sketch, m = D
  int64_t record_bytes() const { return mse_.record_bytes() + qjl_.record_bytes(); }

  // x (head_dim finite values) into `record` (record_bytes()).
  void encode(std::span<const float> x, std::span<uint8_t> record) const;
  // `record` into x~ = x~_mse + the residual's QJL reconstruction (head_dim values).
  void decode(std::span<const uint8_t> record, std::span<float> x) const;
  // The estimate of <q, x> for q (head_dim finite values), in double.
  double estimate(std::span<const float> q, std::span<const uint8_t> record) const;

 private:
  TurboQuantProdConfig config_;
  TurboQuantMse mse_;
  QjlKeys qjl_;
};

// ---------------------------------------------------------------------------------------------
// KIVI: asymmetric integer quantization, keys per channel, values per token.
//
// One group of n elements x_i at b bits: lo = min x_i, hi = max x_i, scale = (hi - lo) / (2^b - 1),
// code_i = round((x_i - lo) / scale) clamped to [0, 2^b - 1] (round half away from zero; the
// quotient is >= 0), decoded x~_i = lo + code_i * scale. So |x_i - x~_i| <= scale / 2 for every
// element (up to the f32 rounding of lo, scale and x~), and a group whose values are exactly
// lo + j * scale decodes exactly. A constant group (hi == lo) has scale 0 and every code 0: it
// decodes to lo exactly, and nothing is divided by zero. The codes are computed from the lo and
// scale as stored (f32), so the decoder sees the same numbers the encoder rounded against.
//
// Keys are grouped per channel: a block of G key vectors [G, D] has one (lo, scale) per channel d
// over its G tokens. Real keys have a few outlier channels 10-20x larger than the rest; per-token
// groups would spend their 2^b levels on the outliers' range and flatten every other channel,
// per-channel groups confine each outlier to its own range (the paper's section 3). Values have no
// such channels and are multiplied by attention weights per token, so they are grouped per token:
// each value vector [D] in D / value_group groups of value_group consecutive channels.
//
// lo and scale are f32, little-endian. f16 (the paper's choice) would halve their bytes, but its
// rounding of lo (up to |lo| * 2^-11) alone exceeds scale / 2 on any group offset far from zero
// next to its range (|lo| > 2^10 * scale), and f16 overflows past 65504: in f32 the error is the
// quantizer's.
// The price: at D = 128, G = 32, b = 2 a key block is 1024 code bytes + 1024 bytes of (lo, scale),
// where f16 would take 512.
//
// Key block record (key_block_bytes() = 8 * D + ceil(G * D * b / 8) bytes):
//   bytes [0, 4D)       lo of channel d at 4d, f32.
//   bytes [4D, 8D)      scale of channel d at 4D + 4d, f32.
//   bytes [8D, ..)      the G * D codes, token-major: the code of token t, channel d is value
//                       t * D + d of a pack_bits stream (so a token's D codes are contiguous, as
//                       in a value record).
// Value record (value_record_bytes() = 8 * (D / value_group) + ceil(D * b / 8) bytes), with
// n = D / value_group groups, group g being channels [g * value_group, (g + 1) * value_group):
//   bytes [0, 4n)       lo of group g at 4g, f32.
//   bytes [4n, 8n)      scale of group g at 4n + 4g, f32.
//   bytes [8n, ..)      the D codes, channel d as value d of a pack_bits stream.
struct KiviConfig {
  int64_t head_dim = 128;     // D in [1, 4096]
  int bits = 2;               // b in 1..4 (the paper uses 2 and 4)
  int64_t key_group = 32;     // G in [1, 4096]: tokens per key block
  int64_t value_group = 32;   // channels per value group, dividing D
  int64_t residual = 32;      // R >= 0: the most recent tokens KiviCache keeps in full precision
};

class KiviCodec {
 public:
  explicit KiviCodec(const KiviConfig& config);

  const KiviConfig& config() const { return config_; }
  int64_t key_block_bytes() const;
  int64_t value_record_bytes() const;

  // keys: G * D finite values, token-major ([G, D]), into `record` (key_block_bytes()).
  void encode_keys(std::span<const float> keys, std::span<uint8_t> record) const;
  void decode_keys(std::span<const uint8_t> record, std::span<float> keys) const;
  // v: D finite values into `record` (value_record_bytes()).
  void encode_value(std::span<const float> v, std::span<uint8_t> record) const;
  void decode_value(std::span<const uint8_t> record, std::span<float> v) const;

 private:
  KiviConfig config_;
};

// The KIVI cache of one head, the reference: plain vectors, no paging.
//
// Which tokens are quantized, after T appends (tokens 0..T-1):
//   values: token t is quantized once it leaves the window of the last R tokens, t < T - R, so
//           max(T - R, 0) values are quantized and min(T, R) are full precision;
//   keys:   quantized a whole block of G at a time, block [jG, (j+1)G) once all of it has left
//           the window, (j+1)G <= T - R, so floor(max(T - R, 0) / G) * G keys are quantized and
//           the rest, between min(T, R) and R + G - 1, are full precision.
// So the last R tokens are always full precision for both keys and values. (The paper's
// Algorithm 1 instead flushes the whole key residual once it holds R tokens, R a multiple of G,
// which leaves 0..R-1 recent keys in full precision.)
// Full-precision tokens are stored as given and come back bit-exact.
class KiviCache {
 public:
  explicit KiviCache(const KiviConfig& config);

  const KiviCodec& codec() const { return codec_; }
  // One token's key and value, head_dim finite values each.
  void append(std::span<const float> k, std::span<const float> v);

  int64_t size() const { return tokens_; }
  int64_t quantized_keys() const;
  int64_t full_precision_keys() const;
  int64_t quantized_values() const;
  int64_t full_precision_values() const;

  // Every key (value) so far in append order, [size(), D] token-major: the quantized ones
  // dequantized, then the full-precision ones as given.
  std::vector<float> keys() const;
  std::vector<float> values() const;

 private:
  KiviCodec codec_;
  int64_t tokens_ = 0;
  std::vector<uint8_t> key_blocks_;      // quantized_keys() / G key block records
  std::vector<uint8_t> value_records_;   // quantized_values() value records
  std::vector<float> recent_keys_;       // full_precision_keys() x D
  std::vector<float> recent_values_;     // full_precision_values() x D
};

// ---------------------------------------------------------------------------------------------
// RaBitQ keys: a key k of head_dim D as B bits per coordinate of its rotated direction plus two
// numbers, for inner products with queries. B = 1 is RaBitQ (arXiv:2405.12497); B = 2..4 is
// extended RaBitQ (arXiv:2409.09913), whose codebook at B = 1 is RaBitQ's exactly, so one codec
// serves both.
//
// Codebook. The grid of half-integer points y, y_j in {-(2^B - 1)/2, ..., -1/2, 1/2, ...,
// (2^B - 1)/2}, kept as the codes u_j = y_j + (2^B - 1)/2 in [0, 2^B); the codewords are the
// directions of these points, rotated: o_bar = R^T y / ||y||, R the seeded rotation. At B = 1 it
// is RaBitQ's randomly rotated hypercube {+-1/sqrt(D)}^D.
//
// Centroid. The paper quantizes each vector's offset from a centroid c (its IVF cluster's). KV
// keys have no clusters: the default is c = 0; RabitqConfig::centroid may set one (a head's mean
// key, from calibration), which pays when keys share a large common offset, since the error below
// scales with ||k - c||. <q, k> = <q, c> + ||k - c|| <q, o>, and <q, c> is computed exactly.
//
// Encode: n = ||k - c||, o = (k - c) / n, o' = R o; u is the grid point whose direction is
// nearest o' (largest <y, o'> / ||y||). At B = 1 that is y_j = sign(o'_j) / 2, o'_j = 0 taken
// as +. At B > 1, the paper's rescaling search: the best y is the grid rounding of t o' for some
// scale t > 0 (|y_j| = min(floor(t |o'_j|), 2^(B-1) - 1) + 1/2); as t grows, |y_j| steps up at
// t = s / |o'_j|, s = 1 .. 2^(B-1) - 1, so the D (2^(B-1) - 1) steps are taken in order of t, the
// cosine updated at each, and the best point kept. The record keeps n, u and the correction
// <o_bar, o> = <y, o'> / ||y|| in (0, 1] (about sqrt(2/pi) = 0.80 at B = 1, nearer 1 with each
// bit). A key equal to c (n = 0) has the codes of o' = 0 and correction 1; n = 0 zeroes its term.
//
// Estimator: <q, k>^ = <q, c> + n <o_bar, q> / <o_bar, o>, <o_bar, q> = <y, R q> / ||y||.
// Unbiased over the rotation, with an error of known law (the paper's Theorem 3.2 for B = 1; the
// extended paper carries it to every B). Write q = <q, o> o + q_perp. Given o' = R o the code is
// fixed, while R q_perp / ||q_perp|| is uniform on the unit sphere of the D - 1 dimensions
// orthogonal to o'; the part of y / ||y|| orthogonal to o' has length sqrt(1 - <o_bar, o>^2). So
//   <q, k>^ - <q, k> = n ||q_perp|| sqrt(1 - <o_bar, o>^2) / <o_bar, o> * z,
// z one coordinate of a uniformly random unit vector in D - 1 dimensions: mean 0, variance
// 1 / (D - 1), whatever the code. Each extra bit brings <o_bar, o> nearer 1, which shrinks the error.
// Error bound: a cap {z >= t} of that sphere has measure at most exp(-(D - 1) t^2 / 2) (Ball, "An
// Elementary Introduction to Modern Convex Geometry", Lemma 2.2), so with ||q_perp|| <= ||q||,
//   |<q, k>^ - <q, k>| <= n ||q|| sqrt(1 - <o_bar, o>^2) / <o_bar, o> * eps0 / sqrt(D - 1)
// fails with probability at most 2 exp(-eps0^2 / 2) (rabitq_error_bound() and
// rabitq_bound_failure_probability()). The paper states exp(-c0 eps0^2) for an unnamed constant
// c0 and uses eps0 = 1.9; the cap bound gives c0 = 1/2 with a factor 2. The rate is loose: z is
// nearly N(0, 1 / (D - 1)), and at D = 128, eps0 = 3 the bound fails for 0.24% of pairs with q
// orthogonal to k (the exact tail of z; 0.19-0.35% measured at B = 1..4) where 2.2% is allowed
// (KvRabitq.ErrorBoundFailsAtMostAtItsRate).
//
// Quantized query (the paper's section 3.3): q' = R q, v_l = min_j q'_j, step = (max_j q'_j -
// v_l) / (2^Bq - 1), codes q_u_j = floor((q'_j - v_l) / step + r_j), r_j uniform in [0, 1) from
// a seeded stream. Randomized rounding makes E[v_l + step q_u_j] = q'_j, so the estimate from the
// quantized query is unbiased too, at a variance larger by at most n^2 step^2 / (4 <o_bar, o>^2)
// (each coordinate's rounding error has variance <= step^2 / 4, weighted by y_j^2 / ||y||^2). The
// error bound above is for the full-precision query (estimate()). At D = 128 a 4-bit query adds
// about 6 to a mean squared error of 82 at B = 1 (|q|^2 = D, |k|^2 about 1.75 D), the paper's
// regime, but 4.3 to 1.4 at B = 4 (KvRabitq.ExtendedErrorShrinksWithBitsAndStaysUnbiased): raise
// query_bits with B, each query bit dividing the added variance by about 4.
// Score, in integers but for the last line: with m = 2^B - 1, K_a the plane of bit a of the
// key's codes and Q_b that of the query's,
//   <u, q_u> = sum_{a, b} 2^(a+b) popcount(K_a & Q_b),   sum_j u_j = sum_a 2^a popcount(K_a),
//   sum_j u_j^2 = sum_{a, a'} 2^(a+a') popcount(K_a & K_a'),
//   S = 2 <u, q_u> - m sum_j q_u_j = <2y, q_u>,   T = 2 sum_j u_j - m D = sum_j 2 y_j,
//   Y = 4 sum_j u_j^2 - 4 m sum_j u_j + m^2 D = ||2y||^2,
//   score = <q, c> + n (step S + v_l T) / (sqrt(Y) <o_bar, o>),
// which is the estimator with q' replaced by v_l + step q_u.
//
// Per-token record (record_bytes() = 8 + B * ceil(D / 8) bytes):
//   bytes [0, 4)  n = ||k - c|| as an f32, little-endian (as TurboQuant's record).
//   bytes [4, 8)  the correction <o_bar, o> as an f32.
//   bytes [8, ..) B bit planes of ceil(D / 8) bytes, plane a (from a = 0) holding bit a of every
//                 code: bit j % 8 of its byte j / 8 is bit a of u_j (pack_bits' 1-bit layout),
//                 spare high bits zero and ignored when reading. Planes, not pack_bits(u, B):
//                 the score ANDs and popcounts whole planes, 8 coordinates a byte. At B = 1 the
//                 plane's bit j is 1 where o'_j >= 0, the opposite of pack_signs' convention: it
//                 is the code u_j, not a sign.
struct RabitqConfig {
  int64_t head_dim = 128;  // D in [2, 4096], a multiple of 16 for the hadamard rotation
  int bits = 1;            // B: 1 (RaBitQ) to 4 (extended RaBitQ)
  int query_bits = 4;      // Bq in 1..8, the paper's 4 by default
  RotationKind rotation = RotationKind::hadamard;
  uint64_t seed = 0;       // the rotation's seed: same config, same codes
  std::vector<float> centroid;  // c: empty for the zero centroid, else head_dim finite values
};

// A query quantized for score(): Bq-bit codes of its rotation, the affine map back, and <q, c>.
struct RabitqQuery {
  double lower = 0.0;          // v_l
  double step = 0.0;           // 0 when every coordinate of q' is the same (then all codes 0)
  double centroid_dot = 0.0;   // <q, c>, exact
  std::vector<uint8_t> codes;  // q_u_j in [0, 2^Bq), head_dim of them
};

class RabitqKeys {
 public:
  // Builds the rotation.
  explicit RabitqKeys(const RabitqConfig& config);

  const RabitqConfig& config() const { return config_; }
  const Rotation& rotation() const { return rotation_; }
  int64_t record_bytes() const;

  // k (head_dim finite values) into `record` (record_bytes()).
  void encode(std::span<const float> k, std::span<uint8_t> record) const;
  // `record` into x~ = c + (n / <o_bar, o>) o_bar (head_dim values): the vector whose inner
  // product with any q is estimate(q, record), up to x~'s rounding to f32. Over rotations its
  // mean is k (the estimator is unbiased for every q).
  void decode(std::span<const uint8_t> record, std::span<float> x) const;
  // The estimator with the full-precision query q (head_dim finite values), in double.
  double estimate(std::span<const float> q, std::span<const uint8_t> record) const;

  // q (head_dim finite values) rotated and quantized to query_bits by randomized rounding drawn
  // from `rounding_seed`. Give it a seed other than the rotation's: both draw from decodelab's
  // seeded stream, and a rounding correlated with the rotation's signs is not the paper's.
  RabitqQuery quantize_query(std::span<const float> q, uint64_t rounding_seed) const;
  // One quantized query against n keys: `records` holds n records back to back and scores[j]
  // becomes the popcount score of record j, n = scores.size().
  void score(const RabitqQuery& query, std::span<const uint8_t> records, std::span<double> scores) const;

 private:
  RabitqConfig config_;
  Rotation rotation_;
};

// The error bound above for a key of norm n = key_norm (||k - c||, the record's) and correction
// <o_bar, o> in (0, 1], a query of norm query_norm, head_dim dim >= 2 and eps0 >= 0:
// n ||q|| sqrt(1 - correction^2) / correction * eps0 / sqrt(D - 1).
double rabitq_error_bound(double key_norm, double query_norm, double correction, int64_t dim, double epsilon0);
// The probability, at most, that the estimate of one pair misses that bound: min(1, 2 exp(-eps0^2 / 2)).
double rabitq_bound_failure_probability(double epsilon0);

// ---------------------------------------------------------------------------------------------
// PolarQuant: Han, Kacham, Karbasi, Mirrokni, Zandieh, "PolarQuant: Quantizing KV Caches with
// Polar Transformation", arXiv:2502.02617 (2025). A vector is rotated, turned into polar
// coordinates recursively, and stored as its top-level radii plus one codebook index per angle.
//
// Polar transform of y in R^D with L levels, D a multiple of 2^L (D = 2^L: one radius, the norm):
//   level 0 radii are the coordinates, r0_i = y_i;
//   level 1, i in [0, D/2): theta1_i = atan2(y_{2i+1}, y_{2i}) in [0, 2 pi), r1_i = |(y_{2i}, y_{2i+1})|;
//   level l >= 2, i in [0, D/2^l): theta_l_i = atan2(r_{l-1, 2i+1}, r_{l-1, 2i}) in [0, pi/2],
//                                 r_l_i = |(r_{l-1, 2i}, r_{l-1, 2i+1})|.
// So angle i of level l and radius r_l_i describe coordinates [i 2^l, (i+1) 2^l) of y, and the
// D / 2^L radii of level L with the D - D / 2^L angles describe y exactly. The inverse runs top
// down: r_{l-1, 2i} = r_l_i cos(theta_l_i), r_{l-1, 2i+1} = r_l_i sin(theta_l_i).
//
// Angle densities (the paper's Lemma on the polar transform of a Gaussian, derived here in the
// form the codebooks use). The angles depend only on the direction of y; after a Haar rotation
// that direction is uniform, the direction of g ~ N(0, I_D), so take y = g. Level 1: (g_{2i},
// g_{2i+1}) is rotation invariant, so theta1 is uniform on [0, 2 pi). Level l >= 2: the two
// children are the norms a, b of two independent Gaussian blocks of k = 2^(l-1) coordinates, with
// joint density proportional to a^(k-1) b^(k-1) exp(-(a^2 + b^2) / 2); in polar form a = rho cos
// psi, b = rho sin psi (Jacobian rho) this is rho^(2k-1) exp(-rho^2 / 2) cos^(k-1) psi sin^(k-1) psi,
// a product: psi is independent of rho, with density on [0, pi/2]
//   f_l(psi) = Gamma(k) / (2^(k-2) Gamma(k/2)^2) sin^(k-1)(2 psi),   k = 2^(l-1),
// symmetric about pi/4 with standard deviation about 1 / (2 sqrt(k)). Applying the same
// factorization at every node, all the angles and the top radii are mutually independent.
//
// Codebooks: per level and bit width, the Lloyd-Max quantizer of f_l (squared angle error),
// computed by the iteration of Codebook::lloyd_max with Gauss-Legendre cell integrals. Level 1's
// density is uniform, so its codebook is the uniform one: 2^b cells of width 2 pi / 2^b, each
// centroid at its cell's middle.
//
// Error, exactly, under a Haar rotation: decoding keeps each radius's length (cos^2 + sin^2 = 1),
// so with u the direction of a block and u~ its decoding, ||u - u~||^2 = 2 (1 - <u, u~>). At a
// node, <u, u~> = cos psi cos psi~ <u_a, u~_a> + sin psi sin psi~ <u_b, u~_b>, and the children's
// agreements are independent of psi with a common mean, so E<u, u~> = prod_l c_l, where
// c_l = E[cos(psi - psi~)] under f_l (PolarAngleCodebook::mean_cosine()). Hence
//   E ||x - x~||^2 / ||x||^2 = 2 (1 - prod_{l=1..L} c_l)   (PolarQuant::expected_distortion()),
// up to the f32 rounding of the radii, and for a query q independent of x, E<q, x~> <q, x> /
// E<q, x>^2 = E<x~, x> / ||x||^2 = prod_l c_l: the estimates are biased short by that factor.

// The density f_l above at angle psi (level 1: 1 / (2 pi) on [0, 2 pi]); 0 outside the range.
double polar_angle_density(int level, double angle);

class PolarAngleCodebook {
 public:
  // level 1..12 (blocks of up to 4096 coordinates), bits 1..4.
  static PolarAngleCodebook lloyd_max(int level, int bits);

  int level() const { return level_; }
  int bits() const { return bits_; }
  double lower() const;  // 0
  double upper() const;  // 2 pi at level 1, pi / 2 above
  std::span<const double> centroids() const { return centroids_; }    // 2^bits, ascending
  std::span<const double> boundaries() const { return boundaries_; }  // 2^bits - 1 midpoints
  double distortion() const { return distortion_; }      // E[(psi - c(psi))^2] under f_l
  double mean_cosine() const { return mean_cosine_; }    // c_l = E[cos(psi - c(psi))] under f_l
  // Index of the nearest centroid; a value exactly on a boundary goes to the upper centroid.
  uint8_t index_of(double angle) const;

 private:
  PolarAngleCodebook(int level, int bits) : level_(level), bits_(bits) {}

  int level_;
  int bits_;
  std::vector<double> centroids_;
  std::vector<double> boundaries_;
  double distortion_ = 0.0;
  double mean_cosine_ = 0.0;
};

// Per-token record (record_bytes() = 4 D / 2^L + sum_l ceil((D / 2^l) b_l / 8) bytes):
//   bytes [0, 4R)  the R = D / 2^L radii of level L as f32, little-endian, radius i at 4i (at
//                  D = 2^L the one radius is ||x||). f32 for TurboQuant's reasons.
//   then, for l = 1 .. L, the D / 2^l angle indices of level l at b_l bits, angle i as value i of
//                  its own pack_bits stream (each level starts on a byte).
// At D = 128 with the paper's widths (4 bits at level 1, 2 above) that is 4 + 32 + (8 + 4 + 2 +
// 1 + 1 + 1) = 53 bytes, 3.3 bits per coordinate.
struct PolarQuantConfig {
  // D in [2, 4096], a multiple of 2^L (and of 16 for the hadamard rotation). D = 96 = 3 x 32
  // takes at most L = 5 levels and stores three radii.
  int64_t head_dim = 128;
  // b_l = bits[l - 1], each 1..4; L = bits.size() in 1..12. Empty: L = the largest with 2^L
  // dividing D, 4 bits at level 1 and 2 above (the paper's widths).
  std::vector<int> bits;
  RotationKind rotation = RotationKind::hadamard;
  uint64_t seed = 0;  // the rotation's seed: same config, same codes
};

// The paper's widths for D: countr_zero(D) levels (at most 12), 4 bits at level 1, 2 above.
std::vector<int> polarquant_default_bits(int64_t head_dim);

class PolarQuant {
 public:
  // Builds the rotation and one codebook per level.
  explicit PolarQuant(const PolarQuantConfig& config);

  const PolarQuantConfig& config() const { return config_; }  // bits filled in
  int levels() const { return int(config_.bits.size()); }
  const Rotation& rotation() const { return rotation_; }
  const PolarAngleCodebook& codebook(int level) const;  // level 1..levels()
  int64_t record_bytes() const;
  // 2 (1 - prod_l c_l): E ||x - x~||^2 / ||x||^2 under a Haar rotation (derived above).
  double expected_distortion() const;

  // x (head_dim finite values) into `record` (record_bytes()).
  void encode(std::span<const float> x, std::span<uint8_t> record) const;
  // `record` (record_bytes()) into x (head_dim values).
  void decode(std::span<const uint8_t> record, std::span<float> x) const;

 private:
  PolarQuantConfig config_;
  Rotation rotation_;
  std::vector<PolarAngleCodebook> codebooks_;
};

// The polar transform without quantization, in double, for tests and backends: y (D values, D a
// multiple of 2^levels) into the D / 2^levels top radii and the angles, level 1 first (D / 2 of
// them), then level 2, ...; and back.
void polar_transform(std::span<const double> y, int levels, std::vector<double>& radii, std::vector<double>& angles);
void polar_inverse(std::span<const double> radii, std::span<const double> angles, int levels, std::span<double> y);

}  // namespace decodelab::kvquant
