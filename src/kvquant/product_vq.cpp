// Product VQ with VecInfer's smoothing + Hadamard outlier suppression (arXiv:2510.06175), the
// double-precision reference: the transform, k-means training of the per-subspace codebooks,
// encode/decode, lookup-table scoring and the versioned codebook file. What each computes and the
// file layout are in include/decodelab/product_vq.h.
#include "decodelab/product_vq.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>

#include "core/check.h"
#include "decodelab/error.h"
#include "kvquant/bitstream.h"
#include "kvquant/nearest.h"
#include "kvquant/record.h"
#include "kvquant/seeded_stream.h"

namespace decodelab::kvquant {
namespace {

constexpr std::string_view kMagic{"DLPVQCB\0", 8};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = 48;
constexpr size_t kChecksumBytes = 8;
constexpr int kMaxBits = 12;
constexpr int kMaxIterations = 10000;
constexpr uint32_t kSmoothingFlag = 1;

// `prefix` is "config." for a config given in code and "" for a file's header fields, so that the
// error names what the caller wrote.
void check_config(const detail::ArgCheck& check, const ProductVqConfig& c, std::string_view prefix) {
  const auto name = [&](std::string_view field) { return fmt::format("{}{}", prefix, field); };
  if (c.head_dim < 16 || c.head_dim > 4096 || c.head_dim % 16 != 0) {
    check.fail(name("head_dim"), "a multiple of 16 in [16, 4096] (the Hadamard rotation's D)", std::to_string(c.head_dim));
  }
  if (c.subspaces < 1 || c.head_dim % c.subspaces != 0) {
    check.fail(name("subspaces"), fmt::format("a divisor of head_dim = {}", c.head_dim), std::to_string(c.subspaces));
  }
  if (c.bits < 1 || c.bits > kMaxBits) check.fail(name("bits"), fmt::format("1 to {}", kMaxBits), std::to_string(c.bits));
  if (c.kmeans_iterations < 1 || c.kmeans_iterations > kMaxIterations) {
    check.fail(name("kmeans_iterations"), fmt::format("1 to {}", kMaxIterations), std::to_string(c.kmeans_iterations));
  }
}

size_t centroid_count(const ProductVqConfig& c) { return size_t(c.head_dim) << c.bits; }  // M * 2^bits * d

void check_parts(const detail::ArgCheck& check, const ProductVqConfig& c, std::span<const float> scales,
                 std::span<const float> centroids) {
  if (int64_t(scales.size()) != c.head_dim) {
    check.fail("scales", fmt::format("{} values (head_dim)", c.head_dim), std::to_string(scales.size()));
  }
  if (centroids.size() != centroid_count(c)) {
    check.fail("centroids", fmt::format("{} values (subspaces x 2^bits x head_dim / subspaces)", centroid_count(c)),
               std::to_string(centroids.size()));
  }
  for (size_t j = 0; j < scales.size(); ++j) {
    // Smoothing off means no scaling at all; a file that says otherwise is inconsistent.
    if (!c.smoothing && scales[j] != 1.0f) check.fail(fmt::format("scales[{}]", j), "1 (smoothing off)", fmt::format("{}", scales[j]));
    if (!std::isfinite(scales[j]) || !(scales[j] > 0.0f)) {
      check.fail(fmt::format("scales[{}]", j), "a finite value > 0", fmt::format("{}", scales[j]));
    }
  }
  detail::check_finite(check, centroids, "centroids");
}

// y = R (x / s), in double.
void smooth_and_rotate(const Rotation& rotation, std::span<const float> scales, std::span<const float> x, std::span<double> y) {
  for (size_t j = 0; j < x.size(); ++j) y[j] = double(x[j]) / double(scales[j]);
  rotation.apply(y, y);
}

// k-means++: each next center is a point drawn with probability proportional to its squared
// distance to the nearest center so far.
std::vector<double> kmeans_plus_plus(std::span<const double> points, int64_t n, int64_t dim, int64_t k, detail::SeededStream& stream) {
  std::vector<double> centers(size_t(k * dim));
  std::vector<double> nearest(size_t(n), std::numeric_limits<double>::infinity());
  int64_t pick = int64_t(stream.below(uint64_t(n)));
  for (int64_t c = 0; c < k; ++c) {
    std::copy_n(points.begin() + pick * dim, dim, centers.begin() + c * dim);
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      nearest[size_t(i)] = std::min(nearest[size_t(i)], detail::squared_distance(&points[size_t(i * dim)], &centers[size_t(c * dim)], dim));
      total += nearest[size_t(i)];
    }
    if (c + 1 == k) break;
    if (total == 0.0) {
      // Every point sits on a center (fewer distinct points than k): any point will do.
      pick = int64_t(stream.below(uint64_t(n)));
      continue;
    }
    const double target = stream.uniform() * total;
    double running = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (nearest[size_t(i)] == 0.0) continue;  // never a point that already is a center
      pick = i;
      running += nearest[size_t(i)];
      if (running > target) break;
    }
  }
  return centers;
}

}  // namespace

KmeansResult kmeans(std::span<const double> points, int64_t n, int64_t dim, int64_t k, int iterations, uint64_t seed) {
  const detail::ArgCheck check("kmeans");
  if (n < 1) check.fail("n", "at least 1 point", std::to_string(n));
  if (dim < 1) check.fail("dim", "at least 1", std::to_string(dim));
  if (int64_t(points.size()) != n * dim) check.fail("points", fmt::format("n x dim = {} values", n * dim), std::to_string(points.size()));
  if (k < 1 || k > n) check.fail("k", fmt::format("1 to n = {} clusters", n), std::to_string(k));
  if (iterations < 0) check.fail("iterations", "at least 0", std::to_string(iterations));

  detail::SeededStream stream(seed);
  KmeansResult result{kmeans_plus_plus(points, n, dim, k, stream), {}};
  std::vector<double>& centers = result.centers;
  std::vector<int64_t> assignment(size_t(n), -1);
  std::vector<double> error(static_cast<size_t>(n));
  std::vector<double> sums(size_t(k * dim));
  std::vector<int64_t> counts(static_cast<size_t>(k));
  for (int step = 0;; ++step) {
    bool changed = false;
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const auto [c, dist] = detail::nearest_center(&points[size_t(i * dim)], std::span<const double>(centers), k, dim);
      changed = changed || c != assignment[size_t(i)];
      assignment[size_t(i)] = c;
      error[size_t(i)] = dist;
      total += dist;
    }
    result.distortion.push_back(total / double(n));
    // Unchanged assignments give unchanged means: nothing would move again.
    if (!changed || step == iterations) break;

    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = assignment[size_t(i)];
      ++counts[size_t(c)];
      for (int64_t j = 0; j < dim; ++j) sums[size_t(c * dim + j)] += points[size_t(i * dim + j)];
    }
    for (int64_t c = 0; c < k; ++c) {
      if (counts[size_t(c)] > 0) {
        for (int64_t j = 0; j < dim; ++j) centers[size_t(c * dim + j)] = sums[size_t(c * dim + j)] / double(counts[size_t(c)]);
        continue;
      }
      // An empty cluster takes the worst-served point: that point's error drops to 0, so the
      // distortion cannot rise. Points already on a center (error 0) gain nothing and stay.
      const auto worst = std::max_element(error.begin(), error.end());
      if (*worst == 0.0) continue;
      const int64_t i = worst - error.begin();
      std::copy_n(points.begin() + i * dim, dim, centers.begin() + c * dim);
      *worst = 0.0;
    }
  }
  return result;
}

ProductVqCodebook::ProductVqCodebook(const ProductVqConfig& config, std::vector<float> scales, std::vector<float> centroids)
    : config_(config),
      rotation_([&] {
        const detail::ArgCheck check("product_vq");
        check_config(check, config, "config.");
        check_parts(check, config, scales, centroids);
        return Rotation::make(RotationKind::hadamard, config.head_dim, config.rotation_seed);
      }()),
      scales_(std::move(scales)),
      centroids_(std::move(centroids)) {}

std::span<const float> ProductVqCodebook::centroid(int64_t m, int64_t c) const {
  if (m < 0 || m >= config_.subspaces) {
    fail("product_vq.centroid", "m", fmt::format("0 to {}", config_.subspaces - 1), std::to_string(m));
  }
  if (c < 0 || c >= config_.centroids_per_codebook()) {
    fail("product_vq.centroid", "c", fmt::format("0 to {}", config_.centroids_per_codebook() - 1), std::to_string(c));
  }
  const int64_t d = config_.subspace_dim();
  return std::span<const float>(centroids_).subspan(size_t((m * config_.centroids_per_codebook() + c) * d), size_t(d));
}

int64_t ProductVqCodebook::record_bytes() const { return (config_.subspaces * config_.bits + 7) / 8; }

void ProductVqCodebook::transform(std::span<const float> x, std::span<double> y) const {
  const detail::ArgCheck check("product_vq.transform");
  if (int64_t(x.size()) != config_.head_dim) check.fail("x", fmt::format("{} values (head_dim)", config_.head_dim), std::to_string(x.size()));
  if (int64_t(y.size()) != config_.head_dim) check.fail("y", fmt::format("{} values (head_dim)", config_.head_dim), std::to_string(y.size()));
  detail::check_finite(check, x, "x");
  smooth_and_rotate(rotation_, scales_, x, y);
}

void ProductVqCodebook::encode(std::span<const float> x, std::span<uint8_t> record) const {
  const detail::ArgCheck check("product_vq.encode");
  if (int64_t(record.size()) != record_bytes()) {
    check.fail("record", fmt::format("{} bytes (record_bytes())", record_bytes()), fmt::format("{} bytes", record.size()));
  }
  std::vector<double> y(size_t(config_.head_dim));
  transform(x, y);
  const int64_t d = config_.subspace_dim(), k = config_.centroids_per_codebook();
  std::fill(record.begin(), record.end(), uint8_t{0});  // put_stream_bits ORs into the bytes
  for (int64_t m = 0; m < config_.subspaces; ++m) {
    const std::span<const float> book = std::span<const float>(centroids_).subspan(size_t(m * k * d), size_t(k * d));
    const int64_t code = detail::nearest_center(&y[size_t(m * d)], book, k, d).first;
    detail::put_stream_bits(record, size_t(m), config_.bits, unsigned(code));
  }
}

std::vector<uint16_t> ProductVqCodebook::codes(std::span<const uint8_t> record) const {
  if (int64_t(record.size()) != record_bytes()) {
    fail("product_vq.codes", "record", fmt::format("{} bytes (record_bytes())", record_bytes()), fmt::format("{} bytes", record.size()));
  }
  std::vector<uint16_t> out(size_t(config_.subspaces));
  for (size_t m = 0; m < out.size(); ++m) out[m] = uint16_t(detail::get_stream_bits(record, m, config_.bits));
  return out;
}

void ProductVqCodebook::decode(std::span<const uint8_t> record, std::span<float> x) const {
  const detail::ArgCheck check("product_vq.decode");
  if (int64_t(x.size()) != config_.head_dim) check.fail("x", fmt::format("{} values (head_dim)", config_.head_dim), std::to_string(x.size()));
  const std::vector<uint16_t> code = codes(record);
  const int64_t d = config_.subspace_dim();
  std::vector<double> y(size_t(config_.head_dim));
  for (int64_t m = 0; m < config_.subspaces; ++m) {
    const std::span<const float> c = centroid(m, code[size_t(m)]);
    std::copy(c.begin(), c.end(), y.begin() + m * d);
  }
  rotation_.apply_inverse(y, y);
  for (size_t j = 0; j < x.size(); ++j) x[j] = float(y[j] * double(scales_[j]));
}

ProductVqQuery ProductVqCodebook::prepare_query(std::span<const float> q) const {
  const detail::ArgCheck check("product_vq.prepare_query");
  if (int64_t(q.size()) != config_.head_dim) check.fail("q", fmt::format("{} values (head_dim)", config_.head_dim), std::to_string(q.size()));
  detail::check_finite(check, q, "q");
  // q' = R (s * q): the inverse of the keys' smoothing, so that <q', y> = <q, x>.
  std::vector<double> rotated(size_t(config_.head_dim));
  for (size_t j = 0; j < q.size(); ++j) rotated[j] = double(q[j]) * double(scales_[j]);
  rotation_.apply(rotated, rotated);
  const int64_t d = config_.subspace_dim(), k = config_.centroids_per_codebook();
  ProductVqQuery query{std::vector<double>(size_t(config_.subspaces * k))};
  for (int64_t m = 0; m < config_.subspaces; ++m) {
    for (int64_t c = 0; c < k; ++c) {
      const float* centroid = &centroids_[size_t((m * k + c) * d)];
      double sum = 0.0;
      for (int64_t j = 0; j < d; ++j) sum += rotated[size_t(m * d + j)] * double(centroid[j]);
      query.table[size_t(m * k + c)] = sum;
    }
  }
  return query;
}

void ProductVqCodebook::score(const ProductVqQuery& query, std::span<const uint8_t> records, std::span<double> scores) const {
  const detail::ArgCheck check("product_vq.score");
  const int64_t k = config_.centroids_per_codebook();
  if (int64_t(query.table.size()) != config_.subspaces * k) {
    check.fail("query.table", fmt::format("{} values (subspaces x 2^bits, from prepare_query)", config_.subspaces * k),
               std::to_string(query.table.size()));
  }
  const size_t bytes = size_t(record_bytes());
  if (records.size() != scores.size() * bytes) {
    check.fail("records", fmt::format("{} records of {} bytes (one per score)", scores.size(), bytes), fmt::format("{} bytes", records.size()));
  }
  for (size_t r = 0; r < scores.size(); ++r) {
    const std::span<const uint8_t> record = records.subspan(r * bytes, bytes);
    double sum = 0.0;
    for (int64_t m = 0; m < config_.subspaces; ++m) sum += query.table[size_t(m * k) + detail::get_stream_bits(record, size_t(m), config_.bits)];
    scores[r] = sum;
  }
}

ProductVqCodebook train_product_vq(const ProductVqConfig& config, std::span<const float> calibration, int64_t n) {
  const detail::ArgCheck check("train_product_vq");
  check_config(check, config, "config.");
  const int64_t dim = config.head_dim, k = config.centroids_per_codebook(), d = config.subspace_dim();
  if (n < k) check.fail("n", fmt::format("at least 2^bits = {} calibration vectors (one per centroid)", k), std::to_string(n));
  if (int64_t(calibration.size()) != n * dim) {
    check.fail("calibration", fmt::format("n x head_dim = {} values", n * dim), std::to_string(calibration.size()));
  }
  detail::check_finite(check, calibration, "calibration");

  std::vector<float> scales(size_t(dim), 1.0f);
  if (config.smoothing) {
    std::vector<float> largest(size_t(dim), 0.0f);
    for (size_t i = 0; i < calibration.size(); ++i) largest[i % size_t(dim)] = std::max(largest[i % size_t(dim)], std::fabs(calibration[i]));
    for (size_t j = 0; j < scales.size(); ++j) scales[j] = largest[j] > 0.0f ? largest[j] : 1.0f;  // an all-zero channel stays as it is
  }

  const Rotation rotation = Rotation::make(RotationKind::hadamard, dim, config.rotation_seed);
  std::vector<double> transformed(calibration.size());
  for (int64_t i = 0; i < n; ++i) {
    smooth_and_rotate(rotation, scales, calibration.subspan(size_t(i * dim), size_t(dim)),
                      std::span<double>(transformed).subspan(size_t(i * dim), size_t(dim)));
  }
  std::vector<float> centroids(centroid_count(config));
  std::vector<double> points(size_t(n * d));
  for (int64_t m = 0; m < config.subspaces; ++m) {
    for (int64_t i = 0; i < n; ++i) std::copy_n(transformed.begin() + i * dim + m * d, d, points.begin() + i * d);
    // Each codebook its own seed, so that codebooks do not share their k-means++ draws.
    const KmeansResult fit = kmeans(points, n, d, k, config.kmeans_iterations, config.training_seed + uint64_t(m));
    std::transform(fit.centers.begin(), fit.centers.end(), centroids.begin() + m * k * d, [](double v) { return float(v); });
  }
  return ProductVqCodebook(config, std::move(scales), std::move(centroids));
}

// ---------------------------------------------------------------------------------------------
// The codebook file

namespace {

uint64_t fnv1a(std::span<const uint8_t> bytes) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (uint8_t b : bytes) hash = (hash ^ b) * 0x100000001b3ull;
  return hash;
}

void put_le(std::vector<uint8_t>& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(uint8_t(value >> (8 * i)));
}

uint64_t get_le(std::span<const uint8_t> bytes, size_t offset, int count) {
  uint64_t value = 0;
  for (int i = 0; i < count; ++i) value |= uint64_t(bytes[offset + size_t(i)]) << (8 * i);
  return value;
}

std::vector<float> get_f32s(std::span<const uint8_t> bytes, size_t offset, size_t count) {
  std::vector<float> values(count);
  for (size_t i = 0; i < count; ++i) values[i] = detail::load_f32_le(&bytes[offset + 4 * i]);
  return values;
}

}  // namespace

std::vector<uint8_t> serialize_product_vq(const ProductVqCodebook& codebook) {
  const ProductVqConfig& c = codebook.config();
  std::vector<uint8_t> out(kMagic.begin(), kMagic.end());
  put_le(out, kFormatVersion, 4);
  put_le(out, uint64_t(c.head_dim), 4);
  put_le(out, uint64_t(c.subspaces), 4);
  put_le(out, uint64_t(c.bits), 4);
  put_le(out, c.smoothing ? kSmoothingFlag : 0u, 4);
  put_le(out, c.rotation_seed, 8);
  put_le(out, uint64_t(c.kmeans_iterations), 4);
  put_le(out, c.training_seed, 8);
  for (const std::span<const float> values : {codebook.scales(), codebook.centroids()}) {
    for (float v : values) put_le(out, std::bit_cast<uint32_t>(v), 4);
  }
  put_le(out, fnv1a(out), 8);
  return out;
}

ProductVqCodebook parse_product_vq(std::span<const uint8_t> bytes, std::string_view source) {
  const detail::ArgCheck check(source);
  const std::string_view file(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  if (file.substr(0, kMagic.size()) != kMagic) {
    check.fail("magic", "a product VQ codebook starting with \"DLPVQCB\\0\"",
               bytes.empty() ? std::string("an empty file")
                             : fmt::format("{} bytes starting {:02x}", bytes.size(), fmt::join(bytes.first(std::min(bytes.size(), kMagic.size())), " ")));
  }
  if (bytes.size() < kHeaderBytes) {
    check.fail("header", fmt::format("{} bytes (truncated file)", kHeaderBytes), fmt::format("a file of {} bytes", bytes.size()));
  }
  const uint64_t version = get_le(bytes, 8, 4);
  if (version != kFormatVersion) check.fail("format version", std::to_string(kFormatVersion), std::to_string(version));
  // The u32 fields go through int64 first: a value above INT32_MAX is refused as itself, not as a
  // negative number.
  ProductVqConfig config;
  config.head_dim = int64_t(get_le(bytes, 12, 4));
  config.subspaces = int64_t(get_le(bytes, 16, 4));
  const int64_t bits = int64_t(get_le(bytes, 20, 4));
  const int64_t iterations = int64_t(get_le(bytes, 36, 4));
  config.bits = int(std::min<int64_t>(bits, kMaxBits + 1));
  config.kmeans_iterations = int(std::min<int64_t>(iterations, kMaxIterations + 1));
  if (bits > kMaxBits) check.fail("bits", fmt::format("1 to {}", kMaxBits), std::to_string(bits));
  if (iterations > kMaxIterations) check.fail("kmeans_iterations", fmt::format("1 to {}", kMaxIterations), std::to_string(iterations));
  check_config(check, config, "");
  const uint64_t flags = get_le(bytes, 24, 4);
  if ((flags & ~uint64_t(kSmoothingFlag)) != 0) check.fail("flags", "0 or 1 (bit 0: smoothing)", fmt::format("{:#x}", flags));
  config.smoothing = (flags & kSmoothingFlag) != 0;
  config.rotation_seed = get_le(bytes, 28, 8);
  config.training_seed = get_le(bytes, 40, 8);

  // Bounded by the checks above: D <= 4096, 2^bits <= 4096.
  const size_t scales = size_t(config.head_dim), centroids = centroid_count(config);
  const size_t want = kHeaderBytes + 4 * (scales + centroids) + kChecksumBytes;
  if (bytes.size() != want) {
    check.fail("size",
               fmt::format("{} bytes ({} header + 4 x {} scales + 4 x {} centroids + {} checksum, for head_dim {} and bits {})", want,
                           kHeaderBytes, scales, centroids, kChecksumBytes, config.head_dim, config.bits),
               fmt::format("{} bytes ({})", bytes.size(), bytes.size() < want ? "truncated" : "trailing bytes"));
  }
  const uint64_t stored = get_le(bytes, want - kChecksumBytes, 8);
  const uint64_t computed = fnv1a(bytes.first(want - kChecksumBytes));
  if (stored != computed) {
    check.fail("checksum", fmt::format("FNV-1a {:#018x} of the bytes before it", computed), fmt::format("{:#018x}", stored));
  }
  std::vector<float> scale_values = get_f32s(bytes, kHeaderBytes, scales);
  std::vector<float> centroid_values = get_f32s(bytes, kHeaderBytes + 4 * scales, centroids);
  check_parts(check, config, scale_values, centroid_values);
  return ProductVqCodebook(config, std::move(scale_values), std::move(centroid_values));
}

void save_product_vq(const ProductVqCodebook& codebook, const std::filesystem::path& path) {
  const std::vector<uint8_t> bytes = serialize_product_vq(codebook);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  out.close();
  if (!out) fail("save_product_vq", path.string(), "a writable file", "writing it failed");
}

ProductVqCodebook load_product_vq(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("load_product_vq", path.string(), "a readable file", "it cannot be opened");
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_product_vq(bytes, path.string());
}

}  // namespace decodelab::kvquant
