// Product vector quantization of KV-cache vectors with VecInfer's outlier suppression, the CPU
// reference in double: Yao, Yang, Tong, Lin, Liu, Luan, Wang, "VecInfer: Efficient LLM Inference
// with Low-Bit KV Cache via Outlier-Suppressed Vector Quantization", arXiv:2510.06175 (2025).
//
// The transform (the paper's dual transformation, section 3). Keys have a few channels far larger
// than the rest; a codebook fitted to them spends its centroids on those channels. So before
// quantizing, a key x is
//   1. smoothed: divided channel by channel by s, s_j = max_i |x_ij| over the calibration vectors
//      (the paper's lambda_j = max(|K_j|), exponent 1; a channel that is zero in every calibration
//      vector gets s_j = 1, so that the division is defined); smoothing off: s_j = 1;
//   2. rotated: y = R (x / s), R decodelab's randomized Hadamard rotation (kvquant.h: two rounds
//      of random signs, the paper's Hadamard matrix made random so that no fixed input is its
//      worst case), which spreads what is left of an outlier channel over every coordinate.
// A query q scores keys in the same domain: q' = R (s * q) (channelwise product), since
//   <q', y> = <R (s * q), R (x / s)> = <s * q, x / s> = <q, x>
// (R orthogonal, the s_j cancel): the transform changes nothing the attention computes.
//
// Product quantization (Jegou, Douze, Schmid, "Product Quantization for Nearest Neighbor Search",
// TPAMI 2011, the codebook structure VecInfer's VQ uses): y is cut into M subvectors of d = D / M
// consecutive coordinates, and subvector m is stored as the index of the nearest of the 2^bits
// centroids of codebook m (ties to the lower index). Decode: x~ = s * R^T y~, y~ the centroids.
// Scoring never decodes: for a query the M x 2^bits table T[m][c] = <q'_m, centroid_m,c> is built
// once, and the score of a record is sum_m T[m][code_m] = <q', y~> = <q, x~>.
//
// Training (train_product_vq): the calibration vectors' channel maxima give s; each of the M
// codebooks is then k-means (Lloyd's algorithm, k-means++ seeding) on that subvector of the
// transformed calibration vectors. The paper trains its codebooks offline on calibration data, as
// here; they are kept in a versioned file (below).
//
// Per-token record (record_bytes() = ceil(M * bits / 8) bytes): the M codes as one little-endian
// bit stream, code m in stream bits [m * bits, (m + 1) * bits), least significant bit first,
// stream bit k in bit k % 8 of byte k / 8: kvquant.h's pack_bits layout carried to 12 bits (for
// bits <= 4 the record is pack_bits(codes, bits) byte for byte). Spare high bits of the last byte
// are zero and ignored when reading. No norm: the centroids carry the scale.
//
// Codebook file, all integers and floats little-endian:
//   bytes [0, 8)    magic "DLPVQCB\0"
//   bytes [8, 12)   u32 format version, 1
//   bytes [12, 16)  u32 head_dim D, a multiple of 16 in [16, 4096]
//   bytes [16, 20)  u32 subspaces M, dividing D
//   bytes [20, 24)  u32 bits per code, 1..12
//   bytes [24, 28)  u32 flags: bit 0 smoothing; the other bits zero
//   bytes [28, 36)  u64 rotation seed
//   bytes [36, 40)  u32 k-means iterations the codebooks were trained with, 1..10000 (provenance)
//   bytes [40, 48)  u64 training seed (provenance)
//   bytes [48, ..)  D f32 smoothing scales s_j, finite and > 0 (all exactly 1 with smoothing off)
//   then            M * 2^bits * d f32 centroids, codebook m's centroid c at ((m * 2^bits) + c) * d
//   last 8 bytes    u64 FNV-1a (64-bit) of every byte before it
// load_product_vq and parse_product_vq refuse anything else (wrong magic, other versions, a
// truncated or overlong file, sizes that do not fit together, non-finite or non-positive values,
// a checksum that does not match) with an Error naming the field, what was expected and what the
// file holds.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>
#include <vector>

#include "decodelab/kvquant.h"

namespace decodelab::kvquant {

struct ProductVqConfig {
  int64_t head_dim = 128;  // D, a multiple of 16 in [16, 4096] (the Hadamard rotation's)
  int64_t subspaces = 32;  // M, dividing D
  int bits = 8;            // per subspace code: 2^bits centroids per codebook, 1..12
  bool smoothing = true;   // divide channels by the calibration maxima before rotating
  uint64_t rotation_seed = 0;
  int kmeans_iterations = 25;  // Lloyd iterations at most (fewer once no assignment changes), 1..10000
  uint64_t training_seed = 0;  // k-means++ seeding

  int64_t subspace_dim() const { return head_dim / subspaces; }          // d
  int64_t centroids_per_codebook() const { return int64_t{1} << bits; }  // 2^bits
  double bits_per_coordinate() const { return double(bits) / double(subspace_dim()); }
};

// A query ready for score(): its lookup table, M x 2^bits inner products, row m for codebook m.
struct ProductVqQuery {
  std::vector<double> table;
};

class ProductVqCodebook {
 public:
  // From trained or stored parts: `scales` D values, `centroids` M * 2^bits * d values laid out
  // as in the file. Validates all of it, as loading a file does.
  ProductVqCodebook(const ProductVqConfig& config, std::vector<float> scales, std::vector<float> centroids);

  const ProductVqConfig& config() const { return config_; }
  const Rotation& rotation() const { return rotation_; }
  std::span<const float> scales() const { return scales_; }
  std::span<const float> centroids() const { return centroids_; }
  // Codebook m's centroid c, d values.
  std::span<const float> centroid(int64_t m, int64_t c) const;
  int64_t record_bytes() const;

  // y = R (x / s): x (D finite values) into the domain the codebooks quantize.
  void transform(std::span<const float> x, std::span<double> y) const;

  // x (head_dim finite values) into `record` (record_bytes()).
  void encode(std::span<const float> x, std::span<uint8_t> record) const;
  // `record` into x~ (head_dim values). A code can only name an existing centroid (bits wide).
  void decode(std::span<const uint8_t> record, std::span<float> x) const;
  // The M codes of a record, for tests and backends.
  std::vector<uint16_t> codes(std::span<const uint8_t> record) const;

  // q (head_dim finite values) into its lookup table: q' = R (s * q), T[m][c] = <q'_m, centroid>.
  ProductVqQuery prepare_query(std::span<const float> q) const;
  // One query against n keys: `records` holds n records back to back, scores.size() = n; score j
  // = sum_m T[m][code_m of record j] = <q, decode(record j)> up to decode's rounding to f32.
  void score(const ProductVqQuery& query, std::span<const uint8_t> records, std::span<double> scores) const;

 private:
  ProductVqConfig config_;
  Rotation rotation_;
  std::vector<float> scales_;
  std::vector<float> centroids_;
};

// k-means on n points of dimension dim (row-major doubles), k clusters (1 <= k <= n): k-means++
// seeding from `seed` (each next center drawn with probability proportional to the squared
// distance to the nearest chosen one, uniformly once every point has a center at distance 0), then
// up to `iterations` Lloyd steps, stopping early when no assignment changes. An empty cluster is
// moved onto the point farthest from its center (each such point used once), which lowers the
// distortion; so distortion[t], the mean squared distance of the points to their nearest center
// at step t (before that step's update), never increases. Deterministic for a seed.
struct KmeansResult {
  std::vector<double> centers;     // k x dim
  std::vector<double> distortion;  // one per assignment step; the last is the final centers'
};
KmeansResult kmeans(std::span<const double> points, int64_t n, int64_t dim, int64_t k, int iterations, uint64_t seed);

// Trains a codebook on n calibration vectors (n x head_dim finite values, row-major), n >= 2^bits:
// s from their channel maxima (smoothing on), then k-means per subspace on their transforms.
ProductVqCodebook train_product_vq(const ProductVqConfig& config, std::span<const float> calibration, int64_t n);

// The file above, as bytes and on disk. `source` names the bytes in errors ("keys.pvq").
std::vector<uint8_t> serialize_product_vq(const ProductVqCodebook& codebook);
ProductVqCodebook parse_product_vq(std::span<const uint8_t> bytes, std::string_view source);
void save_product_vq(const ProductVqCodebook& codebook, const std::filesystem::path& path);
ProductVqCodebook load_product_vq(const std::filesystem::path& path);

}  // namespace decodelab::kvquant
