// Product VQ with VecInfer's smoothing + Hadamard transform (arXiv:2510.06175; product_vq.h):
// k-means (monotone distortion, determinism, duplicate points), the record against a nearest-
// centroid search written here, the lookup-table score against the decoded key, quantization
// error against bounds derived below and across widths, what smoothing does on keys with outlier
// channels, the codebook file's round trip, one named error per corruption, and bad arguments.
// Fixed seeds.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <optional>
#include <limits>
#include <vector>

#include "decodelab/kvquant.h"
#include "decodelab/product_vq.h"
#include "error_of.h"
#include "verify/random.h"

#include <unistd.h>

namespace decodelab::kvquant {
namespace {

using verify::Rng;

std::vector<float> gaussian_rows(Rng& rng, int64_t n, int64_t dim, double sigma = 1.0) {
  std::vector<float> x(size_t(n * dim));
  for (float& v : x) v = float(sigma * rng.normal());
  return x;
}

// Keys with outlier channels as kv_eval.h's "keys" input has them: N(0, 1) but for `outliers`
// fixed channels (every 32nd) of standard deviation `gain`.
std::vector<float> outlier_keys(Rng& rng, int64_t n, int64_t dim, double gain) {
  std::vector<float> x = gaussian_rows(rng, n, dim);
  for (size_t i = 0; i < x.size(); ++i) {
    if ((i % size_t(dim)) % 32 == 5) x[i] = float(gain * double(x[i]));
  }
  return x;
}

double dot(std::span<const float> a, std::span<const float> b) {
  double sum = 0.0;
  for (size_t j = 0; j < a.size(); ++j) sum += double(a[j]) * double(b[j]);
  return sum;
}

// Mean over rows of ||x - x~||^2 / ||x||^2 (relative) or of ||x - x~||^2 / D (absolute).
struct Mse {
  double relative = 0.0, per_coordinate = 0.0;
};
Mse quantization_mse(const ProductVqCodebook& book, std::span<const float> x, int64_t n) {
  const size_t dim = size_t(book.config().head_dim);
  std::vector<uint8_t> record(size_t(book.record_bytes()));
  std::vector<float> decoded(dim);
  Mse mse;
  for (int64_t i = 0; i < n; ++i) {
    const std::span<const float> row = x.subspan(size_t(i) * dim, dim);
    book.encode(row, record);
    book.decode(record, decoded);
    double error2 = 0.0;
    for (size_t j = 0; j < dim; ++j) error2 += (double(row[j]) - decoded[j]) * (double(row[j]) - decoded[j]);
    mse.relative += error2 / dot(row, row) / double(n);
    mse.per_coordinate += error2 / double(dim) / double(n);
  }
  return mse;
}

ProductVqConfig small_config() {
  return {.head_dim = 32, .subspaces = 8, .bits = 4, .smoothing = true, .rotation_seed = 7, .kmeans_iterations = 10, .training_seed = 3};
}

// ---------------------------------------------------------------------------------------------
// k-means

TEST(ProductVqKmeans, DistortionNeverIncreasesAndSeedsAreDeterministic) {
  Rng rng(11);
  const int64_t n = 4000, dim = 4, k = 64;
  std::vector<double> points(size_t(n * dim));
  for (double& v : points) v = rng.normal();
  const KmeansResult a = kmeans(points, n, dim, k, 50, 5);
  ASSERT_GE(a.distortion.size(), 10u);  // converging in fewer steps would not test much
  for (size_t t = 1; t < a.distortion.size(); ++t) {
    EXPECT_LE(a.distortion[t], a.distortion[t - 1] * (1.0 + 1e-12)) << "step " << t;
  }
  // Lloyd does real work after k-means++ (on N(0, I_4) at 64 cells, by about a third).
  EXPECT_LT(a.distortion.back(), 0.8 * a.distortion.front());
  const KmeansResult again = kmeans(points, n, dim, k, 50, 5);
  EXPECT_EQ(again.centers, a.centers);
  EXPECT_EQ(again.distortion, a.distortion);
  const KmeansResult other = kmeans(points, n, dim, k, 50, 6);
  EXPECT_NE(other.centers, a.centers);
  // The final centers' distortion is the mean squared distance to the nearest of them.
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double best = std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < k; ++c) {
      double d2 = 0.0;
      for (int64_t j = 0; j < dim; ++j) d2 += std::pow(points[size_t(i * dim + j)] - a.centers[size_t(c * dim + j)], 2);
      best = std::min(best, d2);
    }
    total += best;
  }
  EXPECT_NEAR(a.distortion.back(), total / double(n), 1e-12 * total / double(n));
}

TEST(ProductVqKmeans, FewerDistinctPointsThanClusters) {
  // 20 distinct points repeated: k-means++ runs out of points at positive distance, clusters stay
  // empty, and every point ends on a center.
  const int64_t n = 300, dim = 3, k = 32;
  std::vector<double> points(size_t(n * dim));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < dim; ++j) points[size_t(i * dim + j)] = double((i % 20) * (j + 1));
  }
  const KmeansResult r = kmeans(points, n, dim, k, 20, 1);
  EXPECT_EQ(r.distortion.back(), 0.0);
  for (double v : r.centers) EXPECT_TRUE(std::isfinite(v));
}

// ---------------------------------------------------------------------------------------------
// Records and scores

TEST(ProductVq, CodesAreTheNearestCentroidsInTheBitStream) {
  for (int bits : {3, 4, 9, 12}) {
    Rng rng(20 + uint64_t(bits));
    ProductVqConfig c = small_config();
    c.bits = bits;
    c.kmeans_iterations = 2;  // the codes must be nearest for any centroids; 4096 of them train slowly
    const int64_t n = c.centroids_per_codebook() + 100;
    const std::vector<float> train = outlier_keys(rng, n, c.head_dim, 8.0);
    const ProductVqCodebook book = train_product_vq(c, train, n);
    EXPECT_EQ(book.record_bytes(), (c.subspaces * bits + 7) / 8);
    const std::vector<float> x = outlier_keys(rng, 20, c.head_dim, 8.0);
    std::vector<uint8_t> record(size_t(book.record_bytes()));
    std::vector<double> y(size_t(c.head_dim));
    const int64_t d = c.subspace_dim();
    for (int64_t i = 0; i < 20; ++i) {
      const std::span<const float> row = std::span(x).subspan(size_t(i * c.head_dim), size_t(c.head_dim));
      book.encode(row, record);
      book.transform(row, y);
      const std::vector<uint16_t> codes = book.codes(record);
      std::vector<uint8_t> expected_stream(record.size(), 0);
      for (int64_t m = 0; m < c.subspaces; ++m) {
        int64_t best = 0;
        double best_d2 = std::numeric_limits<double>::infinity();
        for (int64_t k = 0; k < c.centroids_per_codebook(); ++k) {
          const std::span<const float> centroid = book.centroid(m, k);
          double d2 = 0.0;
          for (int64_t j = 0; j < d; ++j) d2 += std::pow(y[size_t(m * d + j)] - double(centroid[size_t(j)]), 2);
          if (d2 < best_d2) best = k, best_d2 = d2;
        }
        EXPECT_EQ(codes[size_t(m)], best) << "bits " << bits << " row " << i << " subspace " << m;
        // Stream bit m * bits + b is bit b of code m.
        for (int b = 0; b < bits; ++b) {
          const size_t bit = size_t(m * bits + b);
          if ((best >> b) & 1) expected_stream[bit / 8] = uint8_t(expected_stream[bit / 8] | (1u << (bit % 8)));
        }
      }
      EXPECT_EQ(record, expected_stream) << "bits " << bits;
      if (bits <= 4) {
        std::vector<uint8_t> values(codes.begin(), codes.end()), packed(record.size());
        pack_bits(values, bits, packed);
        EXPECT_EQ(record, packed) << "pack_bits' layout at bits " << bits;
      }
    }
  }
}

TEST(ProductVq, LookupTableScoreIsTheInnerProductWithTheDecodedKey) {
  Rng rng(31);
  const ProductVqConfig c{.head_dim = 128, .subspaces = 32, .bits = 8, .smoothing = true, .rotation_seed = 2, .kmeans_iterations = 8};
  const int64_t n = 2000, keys = 200;
  const std::vector<float> train = outlier_keys(rng, n, c.head_dim, 10.0);
  const ProductVqCodebook book = train_product_vq(c, train, n);
  // The scales differ by channel, so a query that missed the inverse smoothing would be off by far.
  EXPECT_GT(book.scales()[5], 5.0f * book.scales()[0]);
  const std::vector<float> x = outlier_keys(rng, keys, c.head_dim, 10.0);
  const size_t bytes = size_t(book.record_bytes()), dim = size_t(c.head_dim);
  std::vector<uint8_t> records(size_t(keys) * bytes);
  for (int64_t i = 0; i < keys; ++i) {
    book.encode(std::span(x).subspan(size_t(i) * dim, dim), std::span(records).subspan(size_t(i) * bytes, bytes));
  }
  std::vector<double> scores(size_t(keys), std::numeric_limits<double>::quiet_NaN());
  std::vector<float> decoded(dim);
  for (int trial = 0; trial < 5; ++trial) {
    const std::vector<float> q = gaussian_rows(rng, 1, c.head_dim);
    book.score(book.prepare_query(q), records, scores);
    for (int64_t i = 0; i < keys; ++i) {
      book.decode(std::span(records).subspan(size_t(i) * bytes, bytes), decoded);
      double exact = 0.0, magnitude = 0.0;
      for (size_t j = 0; j < dim; ++j) {
        exact += double(q[j]) * double(decoded[j]);
        magnitude += std::fabs(double(q[j]) * double(decoded[j]));
      }
      // decode rounds each coordinate to f32 (relative 2^-24); the table is exact in double.
      EXPECT_NEAR(scores[size_t(i)], exact, 2.0 * 0x1p-24 * magnitude) << "key " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Quantization error

// N(0, I_64), smoothing off, d = 4 coordinates per subspace, 1e4 training and 1e4 held-out vectors.
// Bounds per coordinate at R = bits / d bits per coordinate:
// - below: Shannon's distortion-rate function of N(0, 1), 2^-2R: no quantizer at rate R does better.
// - above: a product of per-coordinate Lloyd-Max quantizers of N(0, 1) with L_1 ... L_4 levels,
//   prod L = 2^bits, is one of the codebooks k-means searches over, with mean distortion the mean of
//   the scalar ones (1 bit 0.3634, 2 bits 0.1175: Max, "Quantizing for Minimum Distortion", 1960):
//   bits 4 -> (2,2,2,2): 0.3634; bits 6 -> (4,4,2,2): 0.2405; bits 8 -> (4,4,4,4): 0.1175.
//   k-means beats it in 4 dimensions (cells closer to spheres), by enough to cover what held-out
//   vectors lose against the training set (40 points per centroid at 8 bits).
// The Hadamard rotation does not change N(0, I).
TEST(ProductVq, GaussianErrorLiesBetweenRateDistortionAndScalarLloydMax) {
  Rng rng(41);
  const int64_t n = 10000, dim = 64;
  const std::vector<float> train = gaussian_rows(rng, n, dim), test = gaussian_rows(rng, n, dim);
  double previous = std::numeric_limits<double>::infinity();
  for (const auto& [bits, scalar_bound] : {std::pair{4, 0.3634}, std::pair{6, 0.2405}, std::pair{8, 0.1175}}) {
    const ProductVqConfig c{.head_dim = dim, .subspaces = 16, .bits = bits, .smoothing = false, .rotation_seed = 1,
                            .kmeans_iterations = 20, .training_seed = 9};
    const ProductVqCodebook book = train_product_vq(c, train, n);
    const double mse = quantization_mse(book, test, n).per_coordinate;
    const double rate = double(bits) / 4.0;
    std::cout << fmt::format("N(0, I_64), d = 4, {} bits: MSE per coordinate {:.4f} (bounds {:.4f} .. {:.4f})\n", bits, mse,
                             std::pow(2.0, -2.0 * rate), scalar_bound);
    EXPECT_GT(mse, std::pow(2.0, -2.0 * rate)) << bits << " bits";
    EXPECT_LT(mse, scalar_bound) << bits << " bits";
    EXPECT_LT(mse, 0.8 * previous) << bits << " bits: each 2 bits per subspace is half a bit per coordinate";
    previous = mse;
  }
}

// What smoothing does on keys with outlier channels (4 of 128 at 10x, as kv-eval's "keys").
// Smoothing by the calibration maxima (the paper's lambda_j = max |K_j|) flattens the per-channel
// spread the codebooks see: after it the channel maxima of the calibration keys are all 1, and
// after the rotation every coordinate has nearly the same variance. What it does not do, with one
// codebook per subspace, is lower the reconstruction error in the keys' own coordinates: the
// codebooks' error is spread evenly in the smoothed domain, and decode multiplies channel j's share
// back by s_j, so the outlier channels get s_j^2 times the error; without smoothing the per-
// subspace k-means already gives each subspace's codebook to its own spread. Measured here (the
// margin is stable across seeds): Hadamard alone about 0.08 relative MSE, smoothing + Hadamard
// about 0.14, at 8 bits per 4 coordinates. The paper's gains are on real models' keys and tasks,
// which this synthetic Gaussian does not reproduce; the option stays, measured, off the claim.
TEST(ProductVq, SmoothingFlattensOutlierChannelsButRaisesGaussianKeyError) {
  Rng rng(51);
  const int64_t n = 10000, dim = 128;
  const std::vector<float> train = outlier_keys(rng, n, dim, 10.0), test = outlier_keys(rng, n, dim, 10.0);
  ProductVqConfig c{.head_dim = dim, .subspaces = 32, .bits = 8, .smoothing = true, .rotation_seed = 4, .kmeans_iterations = 15,
                    .training_seed = 2};
  const ProductVqCodebook smoothed = train_product_vq(c, train, n);
  c.smoothing = false;
  const ProductVqCodebook rotated = train_product_vq(c, train, n);

  // The spread of per-coordinate variances in the quantized domain: largest over smallest.
  const auto variance_spread = [&](const ProductVqCodebook& book) {
    std::vector<double> y(static_cast<size_t>(dim)), variance(static_cast<size_t>(dim), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      book.transform(std::span(train).subspan(size_t(i * dim), size_t(dim)), y);
      for (int64_t j = 0; j < dim; ++j) variance[size_t(j)] += y[size_t(j)] * y[size_t(j)] / double(n);
    }
    return *std::max_element(variance.begin(), variance.end()) / *std::min_element(variance.begin(), variance.end());
  };
  const double spread_smoothed = variance_spread(smoothed), spread_rotated = variance_spread(rotated);
  const Mse mse_smoothed = quantization_mse(smoothed, test, n), mse_rotated = quantization_mse(rotated, test, n);
  std::cout << fmt::format("outlier keys, 8 bits / 4 coordinates: relative MSE smoothing + Hadamard {:.4f}, Hadamard alone {:.4f}; "
                           "variance spread {:.2f} vs {:.2f}\n",
                           mse_smoothed.relative, mse_rotated.relative, spread_smoothed, spread_rotated);
  EXPECT_LT(spread_smoothed, 1.5);
  EXPECT_GT(spread_rotated, 2.0 * spread_smoothed);
  EXPECT_GT(mse_smoothed.relative, 1.3 * mse_rotated.relative);
}

// ---------------------------------------------------------------------------------------------
// The codebook file

// FNV-1a (64-bit), written here from its definition, to seal corrupted files.
uint64_t fnv1a(const std::vector<uint8_t>& bytes, size_t count) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < count; ++i) h = (h ^ bytes[i]) * 0x100000001b3ull;
  return h;
}

void put_u32(std::vector<uint8_t>& bytes, size_t offset, uint32_t v) { std::memcpy(&bytes[offset], &v, 4); }  // little-endian host
void put_f32(std::vector<uint8_t>& bytes, size_t offset, float v) { put_u32(bytes, offset, std::bit_cast<uint32_t>(v)); }

void reseal(std::vector<uint8_t>& bytes) {
  const uint64_t h = fnv1a(bytes, bytes.size() - 8);
  std::memcpy(&bytes[bytes.size() - 8], &h, 8);
}

class ProductVqFile : public ::testing::Test {
 protected:
  void SetUp() override {
    Rng rng(61);
    const ProductVqConfig c = small_config();
    const std::vector<float> train = outlier_keys(rng, 400, c.head_dim, 6.0);
    book_.emplace(train_product_vq(c, train, 400));
    bytes_ = serialize_product_vq(*book_);
  }
  std::string parse_error(const std::vector<uint8_t>& bytes) const {
    return error_of([&] { parse_product_vq(bytes, "cb.pvq"); });
  }

  std::optional<ProductVqCodebook> book_;
  std::vector<uint8_t> bytes_;
};

TEST_F(ProductVqFile, RoundTrip) {
  // D = 32, 2^4 centroids: 48 + 4 * 32 + 4 * 32 * 16 + 8 bytes.
  ASSERT_EQ(bytes_.size(), 48u + 128u + 2048u + 8u);
  const auto path = std::filesystem::temp_directory_path() / fmt::format("decodelab_pvq_{}.pvq", ::getpid());
  save_product_vq(*book_, path);
  const ProductVqCodebook loaded = load_product_vq(path);
  std::filesystem::remove(path);
  const ProductVqConfig &a = book_->config(), &b = loaded.config();
  EXPECT_EQ(b.head_dim, a.head_dim);
  EXPECT_EQ(b.subspaces, a.subspaces);
  EXPECT_EQ(b.bits, a.bits);
  EXPECT_EQ(b.smoothing, a.smoothing);
  EXPECT_EQ(b.rotation_seed, a.rotation_seed);
  EXPECT_EQ(b.kmeans_iterations, a.kmeans_iterations);
  EXPECT_EQ(b.training_seed, a.training_seed);
  EXPECT_TRUE(std::equal(loaded.scales().begin(), loaded.scales().end(), book_->scales().begin(), book_->scales().end()));
  EXPECT_TRUE(std::equal(loaded.centroids().begin(), loaded.centroids().end(), book_->centroids().begin(), book_->centroids().end()));
  EXPECT_EQ(serialize_product_vq(loaded), bytes_);
  EXPECT_EQ(std::string(bytes_.begin(), bytes_.begin() + 8), std::string("DLPVQCB\0", 8));
  EXPECT_EQ(parse_error(bytes_), "");
}

TEST_F(ProductVqFile, EveryCorruptionNamesItsField) {
  const size_t scales_at = 48, centroids_at = 48 + 4 * 32;
  struct Case {
    const char* what;
    std::function<void(std::vector<uint8_t>&)> corrupt;
    std::string error;
  };
  const std::vector<Case> cases{
      {"magic", [](auto& b) { b[0] = 'X'; },
       "cb.pvq: magic: expected a product VQ codebook starting with \"DLPVQCB\\0\", got 2232 bytes starting 58 4c 50 56 51 43 42 00"},
      {"empty", [](auto& b) { b.clear(); }, "cb.pvq: magic: expected a product VQ codebook starting with \"DLPVQCB\\0\", got an empty file"},
      {"truncated header", [](auto& b) { b.resize(30); }, "cb.pvq: header: expected 48 bytes (truncated file), got a file of 30 bytes"},
      {"version", [](auto& b) { put_u32(b, 8, 2); }, "cb.pvq: format version: expected 1, got 2"},
      {"head_dim", [](auto& b) { put_u32(b, 12, 40); }, "cb.pvq: head_dim: expected a multiple of 16 in [16, 4096] (the Hadamard rotation's D), got 40"},
      {"subspaces", [](auto& b) { put_u32(b, 16, 5); }, "cb.pvq: subspaces: expected a divisor of head_dim = 32, got 5"},
      {"bits 0", [](auto& b) { put_u32(b, 20, 0); }, "cb.pvq: bits: expected 1 to 12, got 0"},
      {"bits huge", [](auto& b) { put_u32(b, 20, 0xffffffffu); }, "cb.pvq: bits: expected 1 to 12, got 4294967295"},
      {"flags", [](auto& b) { put_u32(b, 24, 3); }, "cb.pvq: flags: expected 0 or 1 (bit 0: smoothing), got 0x3"},
      {"iterations", [](auto& b) { put_u32(b, 36, 0); }, "cb.pvq: kmeans_iterations: expected 1 to 10000, got 0"},
      {"sizes inconsistent", [](auto& b) { put_u32(b, 20, 5); },
       "cb.pvq: size: expected 4280 bytes (48 header + 4 x 32 scales + 4 x 1024 centroids + 8 checksum, for head_dim 32 and bits 5), "
       "got 2232 bytes (truncated)"},
      {"truncated", [](auto& b) { b.erase(b.end() - 5, b.end()); },
       "cb.pvq: size: expected 2232 bytes (48 header + 4 x 32 scales + 4 x 512 centroids + 8 checksum, for head_dim 32 and bits 4), "
       "got 2227 bytes (truncated)"},
      {"trailing", [](auto& b) { b.push_back(0); },
       "cb.pvq: size: expected 2232 bytes (48 header + 4 x 32 scales + 4 x 512 centroids + 8 checksum, for head_dim 32 and bits 4), "
       "got 2233 bytes (trailing bytes)"},
      {"nan scale", [&](auto& b) { put_f32(b, scales_at + 4 * 3, std::numeric_limits<float>::quiet_NaN()); reseal(b); },
       "cb.pvq: scales[3]: expected a finite value > 0, got nan"},
      {"zero scale", [&](auto& b) { put_f32(b, scales_at, 0.0f); reseal(b); }, "cb.pvq: scales[0]: expected a finite value > 0, got 0"},
      {"smoothing off, scaled", [&](auto& b) { put_u32(b, 24, 0); put_f32(b, scales_at, 2.5f); reseal(b); },
       "cb.pvq: scales[0]: expected 1 (smoothing off), got 2.5"},
      {"inf centroid", [&](auto& b) { put_f32(b, centroids_at + 4 * 17, std::numeric_limits<float>::infinity()); reseal(b); },
       "cb.pvq: centroids[17]: expected a finite value, got inf"},
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> bytes = bytes_;
    c.corrupt(bytes);
    EXPECT_EQ(parse_error(bytes), c.error) << c.what;
  }
  // The checksum: one flipped bit of a centroid, not resealed.
  std::vector<uint8_t> flipped = bytes_;
  flipped[centroids_at + 10] ^= 0x10;
  EXPECT_EQ(parse_error(flipped), fmt::format("cb.pvq: checksum: expected FNV-1a {:#018x} of the bytes before it, got {:#018x}",
                                              fnv1a(flipped, flipped.size() - 8), fnv1a(bytes_, bytes_.size() - 8)));
  EXPECT_EQ(error_of([] { load_product_vq("/nonexistent/cb.pvq"); }),
            "load_product_vq: /nonexistent/cb.pvq: expected a readable file, got it cannot be opened");
}

// ---------------------------------------------------------------------------------------------
// Arguments

TEST(ProductVq, BadArgumentsAreNamed) {
  Rng rng(71);
  const std::vector<float> train = gaussian_rows(rng, 300, 32);
  const auto train_error = [&](ProductVqConfig c, int64_t n = 300) { return error_of([&] { train_product_vq(c, std::span(train).first(size_t(n * 32)), n); }); };
  ProductVqConfig c = small_config();
  c.head_dim = 24;
  EXPECT_EQ(train_error(c), "train_product_vq: config.head_dim: expected a multiple of 16 in [16, 4096] (the Hadamard rotation's D), got 24");
  c = small_config(), c.subspaces = 0;
  EXPECT_EQ(train_error(c), "train_product_vq: config.subspaces: expected a divisor of head_dim = 32, got 0");
  c = small_config(), c.subspaces = 3;
  EXPECT_EQ(train_error(c), "train_product_vq: config.subspaces: expected a divisor of head_dim = 32, got 3");
  c = small_config(), c.bits = 13;
  EXPECT_EQ(train_error(c), "train_product_vq: config.bits: expected 1 to 12, got 13");
  c = small_config(), c.kmeans_iterations = 0;
  EXPECT_EQ(train_error(c), "train_product_vq: config.kmeans_iterations: expected 1 to 10000, got 0");
  c = small_config(), c.bits = 9;
  EXPECT_EQ(train_error(c), "train_product_vq: n: expected at least 2^bits = 512 calibration vectors (one per centroid), got 300");
  std::vector<float> bad = train;
  bad[70] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(error_of([&] { train_product_vq(small_config(), bad, 300); }),
            "train_product_vq: calibration[70]: expected a finite value, got inf");
  EXPECT_EQ(error_of([&] { train_product_vq(small_config(), train, 299); }),
            "train_product_vq: calibration: expected n x head_dim = 9568 values, got 9600");

  const ProductVqCodebook book = train_product_vq(small_config(), train, 300);
  std::vector<uint8_t> record(size_t(book.record_bytes()));
  std::vector<float> x(32, 1.0f);
  EXPECT_EQ(error_of([&] { book.encode(std::span(x).first(31), record); }), "product_vq.transform: x: expected 32 values (head_dim), got 31");
  EXPECT_EQ(error_of([&] { book.encode(x, std::span(record).first(3)); }), "product_vq.encode: record: expected 4 bytes (record_bytes()), got 3 bytes");
  std::vector<double> scores(2);
  EXPECT_EQ(error_of([&] { book.score(book.prepare_query(x), record, scores); }),
            "product_vq.score: records: expected 2 records of 4 bytes (one per score), got 4 bytes");
  EXPECT_EQ(error_of([&] { book.centroid(8, 0); }), "product_vq.centroid: m: expected 0 to 7, got 8");
  EXPECT_EQ(error_of([&] { kmeans(std::vector<double>(6), 3, 2, 4, 5, 0); }), "kmeans: k: expected 1 to n = 3 clusters, got 4");
  EXPECT_EQ(error_of([&] { ProductVqCodebook(small_config(), std::vector<float>(31, 1.0f), std::vector<float>(512)); }),
            "product_vq: scales: expected 32 values (head_dim), got 31");
}

}  // namespace
}  // namespace decodelab::kvquant
