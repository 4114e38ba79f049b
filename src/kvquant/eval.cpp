// `decodelab kv-eval`'s evaluator: the inputs, the table of codecs, the figures and the JSON. What
// is measured and the theory beside it are in include/decodelab/kv_eval.h.
//
// Every codec reduces to one question, "what do attention's dot products see?": the
// reconstruction k~ of each key and v~ of each value. For the decoding codecs that is their
// decoder's output; for QJL it is the vector whose inner products are the estimator. So the
// figures are computed once, by one piece of code, for every codec, and adding a codec is one
// class and one line of the table.
#include "decodelab/kv_eval.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>
#include <numbers>
#include <numeric>

#include "decodelab/commvq.h"
#include "decodelab/dtype.h"
#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "decodelab/layers.h"
#include "decodelab/npy.h"
#include "decodelab/product_vq.h"
#include "decodelab/router.h"
#include "kvquant/record.h"
#include "kvquant/seeded_stream.h"

namespace decodelab::kvquant {
namespace {

constexpr std::string_view kOp = "kv-eval";
// KIVI groups keys per channel over blocks of this many tokens. The key count is rounded down to
// a multiple of it, so that every codec is measured on the same keys.
constexpr int64_t kKiviKeyGroup = 32;

// ---------------------------------------------------------------------------------------------
// Inputs

struct Inputs {
  std::string description;
  int64_t dim = 0;
  int64_t count = 0;
  std::vector<float> keys, queries, values;  // count x dim each, row-major
  // The codecs that learn from data (product VQ) train on these, never on the vectors measured:
  // calibration_count x dim each, drawn like the measured ones, or a file's rows past them.
  int64_t calibration_count = 0;
  std::vector<float> calibration_keys, calibration_values;
  std::string calibration;  // where the calibration keys come from, in words
};

// Calibration vectors per input: enough for 2^8 centroids 16 times over.
constexpr int64_t kCalibrationCount = 4096;
// The fewest a file may leave past the measured rows to train on them (one per centroid).
constexpr int64_t kMinCalibrationCount = 256;

std::vector<float> gaussian(detail::SeededStream& stream, int64_t n) {
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = float(stream.normal());
  return x;
}

// Each row scaled to unit norm, the normalization in double.
void normalize_rows(std::vector<float>& x, int64_t dim) {
  for (size_t row = 0; row < x.size(); row += size_t(dim)) {
    double norm2 = 0.0;
    for (size_t j = row; j < row + size_t(dim); ++j) norm2 += double(x[j]) * double(x[j]);
    for (size_t j = row; j < row + size_t(dim); ++j) x[j] = float(double(x[j]) / std::sqrt(norm2));
  }
}

// The "keys" generator of kv_eval.h: outlier channels, then RoPE at a random position. The
// channels' gains are drawn once, so that calibration keys share the measured keys' outliers.
std::vector<double> outlier_gains(detail::SeededStream& stream, int64_t dim) {
  std::vector<double> gain(size_t(dim), 1.0);
  for (int64_t picked = 0; picked < dim / 32;) {
    const uint64_t c = stream.below(uint64_t(dim));
    if (gain[c] == 1.0) {
      gain[c] = 10.0;
      ++picked;
    }
  }
  return gain;
}

std::vector<float> synthetic_keys(detail::SeededStream& stream, const std::vector<double>& gain, int64_t count, int64_t dim) {
  const RopeParams rope{.theta = 500000.0f, .style = RopeStyle::half_split};
  const int64_t half = dim / 2;
  std::vector<float> keys(size_t(count * dim));
  std::vector<double> k(static_cast<size_t>(dim));
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c = 0; c < dim; ++c) k[size_t(c)] = gain[size_t(c)] * stream.normal();
    const double position = double(stream.below(8192));
    // Half-split RoPE: pair (i, i + D/2) turns by position * inv_frequency(i).
    for (int64_t i = 0; i < half; ++i) {
      const double angle = position * rope_inv_frequency(rope, int(dim), int(i));
      const double a = k[size_t(i)], b = k[size_t(i + half)];
      keys[size_t(t * dim + i)] = float(a * std::cos(angle) - b * std::sin(angle));
      keys[size_t(t * dim + i + half)] = float(b * std::cos(angle) + a * std::sin(angle));
    }
  }
  return keys;
}

// Rows [first, first + count) of the file, checked: the codecs refuse non-finite entries, and a
// zero row has no relative error.
std::vector<float> file_keys(const NpyMatrix& m, const std::string& path, int64_t first, int64_t count) {
  for (int64_t r = first; r < first + count; ++r) {
    double norm2 = 0.0;
    for (int64_t c = 0; c < m.cols; ++c) {
      const float v = m.values[size_t(r * m.cols + c)];
      if (!std::isfinite(v)) fail(kOp, fmt::format("--input {} row {} column {}", path, r, c), "a finite value", fmt::format("{}", v));
      norm2 += double(v) * double(v);
    }
    if (norm2 == 0.0) fail(kOp, fmt::format("--input {} row {}", path, r), "a nonzero vector", "all zeros");
  }
  return {m.values.begin() + first * m.cols, m.values.begin() + (first + count) * m.cols};
}

void check_dim(int64_t dim, std::string_view what) {
  // TurboQuant's Hadamard rotation needs a multiple of 16; KIVI's value groups then divide D.
  if (dim < 16 || dim > 256 || dim % 16 != 0) fail(kOp, what, "a multiple of 16 in [16, 256]", std::to_string(dim));
}

int64_t usable_count(int64_t count, std::string_view what) {
  const int64_t usable = count / kKiviKeyGroup * kKiviKeyGroup;
  if (usable == 0) fail(kOp, what, fmt::format("at least {} keys (one KIVI key block)", kKiviKeyGroup), std::to_string(count));
  return usable;
}

Inputs make_inputs(const KvEvalOptions& o) {
  if (o.count < 1) fail(kOp, "--count", "at least 1", std::to_string(o.count));
  detail::SeededStream stream(o.seed);
  // A stream of its own for the calibration split: the measured vectors are drawn as before it.
  detail::SeededStream calibration(o.seed ^ 0x5851f42d4c957f2dull);
  Inputs in;
  if (o.input == "unit" || o.input == "keys") {
    check_dim(o.dim, "--dim");
    in.dim = o.dim;
    in.count = usable_count(o.count, "--count");
    const int64_t n = in.count * in.dim;
    if (o.input == "unit") {
      in.description = "uniformly random unit vectors (keys and queries), N(0, I) values";
      in.keys = gaussian(stream, n);
      normalize_rows(in.keys, in.dim);
      in.queries = gaussian(stream, n);
      normalize_rows(in.queries, in.dim);
      in.calibration_keys = gaussian(calibration, kCalibrationCount * in.dim);
      normalize_rows(in.calibration_keys, in.dim);
    } else {
      in.description = fmt::format("synthetic keys: N(0, 1) with {} outlier channels x10, half-split RoPE (theta 500000) at "
                                   "positions in [0, 8192); N(0, I) queries and values", in.dim / 32);
      const std::vector<double> gains = outlier_gains(stream, in.dim);
      in.keys = synthetic_keys(stream, gains, in.count, in.dim);
      in.queries = gaussian(stream, n);
      in.calibration_keys = synthetic_keys(calibration, gains, kCalibrationCount, in.dim);
    }
    in.values = gaussian(stream, n);
    in.calibration_count = kCalibrationCount;
    in.calibration = fmt::format("{} more vectors from the same generator", kCalibrationCount);
    in.calibration_values = gaussian(calibration, kCalibrationCount * in.dim);
    return in;
  }
  const NpyMatrix m = read_npy(o.input);
  if (o.dim != 0 && o.dim != m.cols) {
    fail(kOp, "--dim", fmt::format("{} columns (the file's D), or no --dim", m.cols), std::to_string(o.dim));
  }
  check_dim(m.cols, fmt::format("--input {} columns", o.input));
  in.dim = m.cols;
  in.count = usable_count(std::min(o.count, m.rows), fmt::format("--input {} rows", o.input));
  in.description = fmt::format("{} rows of {} ({} x {}) as keys, N(0, I) queries and values", in.count, o.input, m.rows, m.cols);
  in.keys = file_keys(m, o.input, 0, in.count);
  in.queries = gaussian(stream, in.count * in.dim);
  in.values = gaussian(stream, in.count * in.dim);
  const int64_t spare = std::min(m.rows - in.count, kCalibrationCount);
  if (spare >= kMinCalibrationCount) {
    in.calibration_count = spare;
    in.calibration_keys = file_keys(m, o.input, in.count, spare);
    in.calibration = fmt::format("rows {} to {} of the file (past the measured ones)", in.count, in.count + spare - 1);
  } else {
    // Too few rows left to train on: train on the measured rows, and say so beside the figures.
    in.calibration_count = in.count;
    in.calibration_keys = in.keys;
    in.calibration = fmt::format("the measured rows themselves (in-sample, optimistic: the file has {} rows past them, "
                                 "fewer than {})", m.rows - in.count, kMinCalibrationCount);
  }
  in.calibration_values = gaussian(calibration, in.calibration_count * in.dim);
  return in;
}

// ---------------------------------------------------------------------------------------------
// The codecs

struct Theory {
  std::optional<double> distortion_exact{};
  std::optional<double> distortion_lower_bound{};
  std::optional<double> distortion_upper_bound{};
  std::optional<double> slope{};
  std::string note{};
};

struct PairVariance {
  double exact = 0.0, bound = 0.0;
};

// One codec at one width, as the evaluator sees it (the file header says why reconstructions).
class EvalCodec {
 public:
  virtual ~EvalCodec() = default;
  virtual std::string config() const = 0;
  virtual int64_t key_bytes() const = 0;    // per token and KV head
  virtual int64_t value_bytes() const = 0;
  // keys, values: n x D row-major, n a multiple of kKiviKeyGroup; out the same shape.
  virtual void reconstruct_keys(std::span<const float> keys, std::span<double> out) const = 0;
  virtual void reconstruct_values(std::span<const float> values, std::span<double> out) const = 0;
  virtual Theory theory() const = 0;
  // Codecs that learn from data fit themselves here, before any reconstruction; others ignore it.
  virtual void calibrate(const Inputs&) {}
  // The variance of one pair's estimate over the codec's randomness, where it is known.
  virtual std::optional<PairVariance> pair_variance(std::span<const float>, std::span<const float>) const {
    return std::nullopt;
  }
};

// Each row of x encoded and decoded by `codec` (any codec with config().head_dim, record_bytes(),
// encode and decode) into the same row of out.
template <typename Codec>
void round_trip(const Codec& codec, std::span<const float> x, std::span<double> out) {
  const size_t d = size_t(codec.config().head_dim);
  std::vector<uint8_t> record(size_t(codec.record_bytes()));
  std::vector<float> decoded(d);
  for (size_t row = 0; row < x.size(); row += d) {
    codec.encode(x.subspan(row, d), record);
    codec.decode(record, decoded);
    std::copy(decoded.begin(), decoded.end(), out.begin() + std::ptrdiff_t(row));
  }
}

void round_through_f16(std::span<const float> x, std::span<double> out) {
  for (size_t i = 0; i < x.size(); ++i) out[i] = f16_to_f32(f32_to_f16(x[i]));
}

// The paper's bounds on the MSE distortion of a unit vector at b bits (arXiv:2504.19874,
// Theorems 1 and 3): every quantizer is above 4^-b, TurboQuant below (sqrt(3) pi / 2) 4^-b.
double turboquant_lower_bound(double bits) { return std::pow(4.0, -bits); }
double turboquant_upper_bound(double bits) { return std::sqrt(3.0) * std::numbers::pi / 2.0 * std::pow(4.0, -bits); }

class F16Codec final : public EvalCodec {
 public:
  explicit F16Codec(int64_t dim) : dim_(dim) {}
  std::string config() const override { return "keys and values rounded to f16"; }
  int64_t key_bytes() const override { return 2 * dim_; }
  int64_t value_bytes() const override { return 2 * dim_; }
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override { round_through_f16(keys, out); }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override { round_through_f16(values, out); }
  Theory theory() const override { return {.note = "none: the baseline (f16 rounding, relative error below 2^-11 per element)"}; }

 private:
  int64_t dim_;
};

class TurboQuantCodec final : public EvalCodec {
 public:
  // Keys and values get rotations of their own seeds, as a cache would.
  // high_bits_channels > 0: a split width (kvquant.h), bits + high_bits_channels / dim.
  TurboQuantCodec(int64_t dim, int bits, uint64_t seed, ScaleMode scale, int64_t high_bits_channels = 0)
      : keys_({dim, bits, RotationKind::hadamard, seed + 1, scale, high_bits_channels}),
        values_({dim, bits, RotationKind::hadamard, seed + 2, scale, high_bits_channels}, keys_.codebook()) {}

  std::string config() const override {
    const TurboQuantConfig& c = keys_.config();
    if (c.high_bits_channels > 0) {
      return fmt::format("hadamard rotation, first {} rotated coordinates at {} bits and {} at {}, Lloyd-Max codebooks "
                         "for D = {}, f32 norm",
                         c.high_bits_channels, c.bits + 1, c.head_dim - c.high_bits_channels, c.bits, c.head_dim);
    }
    return fmt::format("hadamard rotation, Lloyd-Max codebook for D = {}, f32 norm", c.head_dim);
  }
  int64_t key_bytes() const override { return keys_.record_bytes(); }
  int64_t value_bytes() const override { return values_.record_bytes(); }
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override { round_trip(keys_, keys, out); }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override {
    round_trip(values_, values, out);
  }
  Theory theory() const override {
    const TurboQuantConfig& c = keys_.config();
    if (c.high_bits_channels > 0) {
      // Split: the mean over coordinates of the two widths' exact distortions, and of their upper
      // bounds (the paper's bound is per integer width); the lower bound 4^-b holds at any rate.
      const double high = double(c.high_bits_channels) / double(c.head_dim);
      const double exact = double(c.high_bits_channels) * keys_.high_codebook()->distortion() +
                           double(c.head_dim - c.high_bits_channels) * keys_.codebook().distortion();
      return {.distortion_exact = exact,
              .distortion_lower_bound = turboquant_lower_bound(c.bits_per_coordinate()),
              .distortion_upper_bound = high * turboquant_upper_bound(c.bits + 1) + (1.0 - high) * turboquant_upper_bound(c.bits),
              .slope = 1.0 - exact,
              .note = "exact: h x the Lloyd-Max distortion at b + 1 bits + (D - h) x that at b, slope 1 - that; bounds 4^-bits "
                      "and the mean of the two widths' (sqrt(3) pi / 2) 4^-b (arXiv:2504.19874)"};
    }
    Theory t{.distortion_lower_bound = turboquant_lower_bound(c.bits), .distortion_upper_bound = turboquant_upper_bound(c.bits)};
    if (c.scale == ScaleMode::plain) {
      const double exact = double(c.head_dim) * keys_.codebook().distortion();
      t.distortion_exact = exact;
      t.slope = 1.0 - exact;
      t.note = "exact: D x the Lloyd-Max distortion, slope 1 - that; bounds 4^-b and (sqrt(3) pi / 2) 4^-b (arXiv:2504.19874)";
    } else if (c.scale == ScaleMode::unbiased) {
      t.slope = 1.0;  // <x~, x> = ||x||^2 for every vector (kvquant.h)
      t.note = "slope exactly 1 by construction; bounds 4^-b and (sqrt(3) pi / 2) 4^-b (arXiv:2504.19874), no exact distortion";
    } else {
      t.note = "bounds 4^-b and (sqrt(3) pi / 2) 4^-b (arXiv:2504.19874); no exact value for the norm-corrected scale";
    }
    return t;
  }

 private:

  TurboQuantMse keys_;
  TurboQuantMse values_;
};

// TurboQuant (inner product) keys at b bits, with TurboQuant (MSE, plain) values at the same b:
// the variant is for scores; values are weighted sums, and the default serves them.
class TurboQuantProdCodec final : public EvalCodec {
 public:
  TurboQuantProdCodec(int64_t dim, int bits, uint64_t seed)
      : keys_({.head_dim = dim, .bits = bits, .rotation = RotationKind::hadamard, .seed = seed + 1, .sketch_seed = seed + 3}),
        values_({dim, bits, RotationKind::hadamard, seed + 2, ScaleMode::plain}) {}

  std::string config() const override {
    return "hadamard rotation, b - 1-bit MSE codes + f32 norm, m = D QJL signs of the residual + f32 residual norm; values "
           "TurboQuant (MSE) at b bits";
  }
  int64_t key_bytes() const override { return keys_.record_bytes(); }
  int64_t value_bytes() const override { return values_.record_bytes(); }
  // decode() is x~_mse + the residual's QJL reconstruction: <q, x~> is the estimator.
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override { round_trip(keys_, keys, out); }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override { round_trip(values_, values, out); }
  // k~ - k = r~ - r, QJL's reconstruction error of the residual: E ||r~ - r||^2 = (pi D / 2 - 1) /
  // m ||r||^2 over the sketch (as the qjl row's), m = D, and E ||r||^2 = D distortion(b - 1).
  Theory theory() const override {
    const double d = double(keys_.config().head_dim);
    return {.distortion_exact = (std::numbers::pi / 2.0 - 1.0 / d) * d * keys_.mse().codebook().distortion(),
            .slope = 1.0,
            .note = "unbiased (arXiv:2504.19874, Algorithm 2); distortion (pi/2 - 1/D) x the b - 1-bit MSE distortion; error "
                    "variance over the sketch ((pi/2)|q|^2|r|^2 - <q,r>^2) / D, r the MSE residual (kvquant.h); several "
                    "times the MSE quantizer's at equal bits"};
  }

 private:
  TurboQuantProd keys_;
  TurboQuantMse values_;
};

class QjlCodec final : public EvalCodec {
 public:
  // `bits` sign bits per coordinate: m = bits * D.
  QjlCodec(int64_t dim, int bits, uint64_t seed) : qjl_({dim, bits * dim, seed + 1}) {}

  std::string config() const override { return "m = bits x D sign bits, f32 norm; values in f16"; }
  int64_t key_bytes() const override { return qjl_.record_bytes(); }
  int64_t value_bytes() const override { return 2 * qjl_.config().head_dim; }
  // k~ = sqrt(pi/2) / m * ||k|| * S^T s, from the record as stored (its f32 norm and sign bits),
  // so that <q, k~> is QjlKeys::estimate(q, record).
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override {
    const size_t d = size_t(qjl_.config().head_dim), m = size_t(qjl_.config().sketch_dim);
    const std::span<const double> sketch = qjl_.sketch();
    std::vector<uint8_t> record(size_t(qjl_.record_bytes()));
    std::vector<float> signs(m);
    for (size_t row = 0; row < keys.size(); row += d) {
      qjl_.encode(keys.subspan(row, d), record);
      unpack_signs(std::span<const uint8_t>(record).subspan(detail::kNormBytes), signs);
      const float norm = detail::load_f32_le(record.data());
      const std::span<double> k = out.subspan(row, d);
      std::fill(k.begin(), k.end(), 0.0);
      for (size_t i = 0; i < m; ++i) {
        for (size_t j = 0; j < d; ++j) k[j] += double(signs[i]) * sketch[i * d + j];
      }
      const double scale = std::sqrt(std::numbers::pi / 2.0) / double(m) * double(norm);
      for (double& v : k) v *= scale;
    }
  }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override { round_through_f16(values, out); }
  Theory theory() const override {
    const double d = double(qjl_.config().head_dim), m = double(qjl_.config().sketch_dim);
    return {.distortion_exact = (std::numbers::pi * d / 2.0 - 1.0) / m,
            .distortion_upper_bound = std::numbers::pi * d / (2.0 * m),
            .slope = 1.0,
            .note = "unbiased; exact variance ((pi/2)|q|^2|k|^2 - <q,k>^2) / m, bound (pi/2)|q|^2|k|^2 / m, distortion "
                    "their sum over q = e_j (arXiv:2406.03482; kvquant.h)"};
  }
  std::optional<PairVariance> pair_variance(std::span<const float> q, std::span<const float> k) const override {
    double qq = 0.0, kk = 0.0, qk = 0.0;
    for (size_t j = 0; j < q.size(); ++j) {
      qq += double(q[j]) * double(q[j]);
      kk += double(k[j]) * double(k[j]);
      qk += double(q[j]) * double(k[j]);
    }
    const double m = double(qjl_.config().sketch_dim);
    const double bound = std::numbers::pi / 2.0 * qq * kk / m;
    return PairVariance{bound - qk * qk / m, bound};
  }

 private:
  QjlKeys qjl_;
};

class KiviEvalCodec final : public EvalCodec {
 public:
  // Value groups of 32 channels, or 16 where 32 does not divide D (D is a multiple of 16).
  KiviEvalCodec(int64_t dim, int bits)
      : kivi_({.head_dim = dim, .bits = bits, .key_group = kKiviKeyGroup, .value_group = std::gcd(dim, int64_t{32}),
               .residual = 0}) {}

  std::string config() const override {
    return fmt::format("keys per channel over {} tokens, values per token in groups of {}, f32 min and scale, no f16 window",
                       kivi_.config().key_group, kivi_.config().value_group);
  }
  // A key block's bytes shared by its G tokens.
  int64_t key_bytes() const override { return kivi_.key_block_bytes() / kivi_.config().key_group; }
  int64_t value_bytes() const override { return kivi_.value_record_bytes(); }
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override {
    const size_t block = size_t(kivi_.config().key_group * kivi_.config().head_dim);
    std::vector<uint8_t> record(size_t(kivi_.key_block_bytes()));
    std::vector<float> decoded(block);
    for (size_t first = 0; first < keys.size(); first += block) {
      kivi_.encode_keys(keys.subspan(first, block), record);
      kivi_.decode_keys(record, decoded);
      std::copy(decoded.begin(), decoded.end(), out.begin() + std::ptrdiff_t(first));
    }
  }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override {
    const size_t d = size_t(kivi_.config().head_dim);
    std::vector<uint8_t> record(size_t(kivi_.value_record_bytes()));
    std::vector<float> decoded(d);
    for (size_t row = 0; row < values.size(); row += d) {
      kivi_.encode_value(values.subspan(row, d), record);
      kivi_.decode_value(record, decoded);
      std::copy(decoded.begin(), decoded.end(), out.begin() + std::ptrdiff_t(row));
    }
  }
  Theory theory() const override {
    return {.note = "none: min-max integer codes have no distortion theory (each element is within scale / 2 of its own)"};
  }

 private:
  KiviCodec kivi_;
};

// The table: one line per codec. `bits` are the widths evaluated; make builds one width for D.
// Bits are per coordinate, fractional for the split widths.
struct CodecEntry {
  std::string_view name;
  std::vector<double> bits;
  std::unique_ptr<EvalCodec> (*make)(int64_t dim, double bits, uint64_t seed);
};

// RaBitQ keys (B bits, zero centroid) with f16 values: decode() gives the vector whose dot product
// with a query is the full-precision-query estimator, as QJL's reconstruction does.
class RabitqCodec final : public EvalCodec {
 public:
  RabitqCodec(int64_t dim, int bits, uint64_t seed) : keys_(config_for(dim, bits, seed)) {}

  std::string config() const override {
    return "hadamard rotation, B bit planes, f32 norm and correction, zero centroid; values in f16";
  }
  int64_t key_bytes() const override { return keys_.record_bytes(); }
  int64_t value_bytes() const override { return 2 * keys_.config().head_dim; }
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override { round_trip(keys_, keys, out); }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override { round_through_f16(values, out); }
  Theory theory() const override {
    return {.slope = 1.0, .note = "unbiased estimator with the full-precision query (arXiv:2405.12497, 2409.09913; kvquant.h)"};
  }

 private:
  static RabitqConfig config_for(int64_t dim, int bits, uint64_t seed) {
    RabitqConfig c;
    c.head_dim = dim, c.bits = bits, c.seed = seed + 1;
    return c;
  }
  RabitqKeys keys_;
};

// PolarQuant keys and values (each its own rotation seed): `bits` at level 1 and ceil(bits / 2)
// at every level above, 4 and 2 being the paper's widths, as many levels as 2^L divides D.
class PolarQuantCodec final : public EvalCodec {
 public:
  PolarQuantCodec(int64_t dim, int bits, uint64_t seed)
      : keys_({dim, widths(dim, bits), RotationKind::hadamard, seed + 1}),
        values_({dim, widths(dim, bits), RotationKind::hadamard, seed + 2}) {}

  std::string config() const override {
    return fmt::format("hadamard rotation, {} levels, {} bits at level 1 and {} above, {} f32 radii", keys_.levels(),
                       keys_.config().bits[0], keys_.config().bits.back(), keys_.config().head_dim >> keys_.levels());
  }
  int64_t key_bytes() const override { return keys_.record_bytes(); }
  int64_t value_bytes() const override { return values_.record_bytes(); }
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override { round_trip(keys_, keys, out); }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override { round_trip(values_, values, out); }
  Theory theory() const override {
    const double exact = keys_.expected_distortion();
    return {.distortion_exact = exact,
            .slope = 1.0 - exact / 2.0,
            .note = "exact under a Haar rotation: 2 (1 - prod_l E cos(psi_l - psi~_l)), slope prod_l E cos(psi_l - psi~_l) "
                    "(norm kept exactly; arXiv:2502.02617, kvquant.h)"};
  }

 private:
  static std::vector<int> widths(int64_t dim, int bits) {
    std::vector<int> w = polarquant_default_bits(dim);
    std::fill(w.begin(), w.end(), (bits + 1) / 2);
    w[0] = bits;
    return w;
  }

  PolarQuant keys_;
  PolarQuant values_;
};

// The codecs that train refuse a calibration split smaller than one vector per codeword.
void require_calibration(const Inputs& in, std::string_view codec, int64_t needed) {
  if (in.calibration_count < needed) {
    fail(kOp, codec, fmt::format("at least {} vectors to train its codebooks on (one per centroid)", needed),
         fmt::format("{} ({}; select other codecs with --codec)", in.calibration_count, in.calibration));
  }
}

// Product VQ (arXiv:2510.06175; product_vq.h): 8-bit codes over D / 8 subspaces (1 bit per
// coordinate) or D / 4 (2 bits), one k-means codebook per subspace trained on the calibration split.
// Keys are smoothed by their channel maxima, then rotated; values only rotated: the paper smooths
// keys, whose inverse scale the query absorbs, where a value's would have to be undone on the output.
class ProductVqEvalCodec final : public EvalCodec {
 public:
  ProductVqEvalCodec(int64_t dim, int bits, uint64_t seed)
      : config_{.head_dim = dim, .subspaces = dim * bits / 8, .bits = 8, .smoothing = true, .rotation_seed = seed + 1,
                .kmeans_iterations = 15, .training_seed = seed + 3} {}

  void calibrate(const Inputs& in) override {
    require_calibration(in, "product_vq", config_.centroids_per_codebook());
    keys_.emplace(train_product_vq(config_, in.calibration_keys, in.calibration_count));
    ProductVqConfig values = config_;
    values.smoothing = false;
    values.rotation_seed = config_.rotation_seed + 1;
    values_.emplace(train_product_vq(values, in.calibration_values, in.calibration_count));
    calibration_ = in.calibration;
  }
  std::string config() const override {
    return fmt::format("{} subspaces of {} coordinates, 8-bit codes, k-means codebooks ({} Lloyd steps at most) trained on {}; "
                       "keys smoothed by their channel maxima then hadamard-rotated, values hadamard-rotated",
                       config_.subspaces, config_.subspace_dim(), config_.kmeans_iterations, calibration_);
  }
  int64_t key_bytes() const override { return keys_->record_bytes(); }
  int64_t value_bytes() const override { return values_->record_bytes(); }
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override { round_trip(*keys_, keys, out); }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override { round_trip(*values_, values, out); }
  Theory theory() const override {
    return {.distortion_lower_bound = turboquant_lower_bound(config_.bits_per_coordinate()),
            .note = "lower bound 4^-b, below which no quantizer of b bits per coordinate goes on random unit vectors "
                    "(arXiv:2504.19874, Theorem 3); k-means codebooks have no closed-form distortion"};
  }

 private:

  ProductVqConfig config_;
  std::optional<ProductVqCodebook> keys_, values_;
  std::string calibration_;
};

// CommVQ (arXiv:2506.18879; commvq.h): one codebook of 2^(4b) codewords per group of 2 RoPE pairs
// (4 coordinates), b bits per coordinate, trained by k-means on the calibration split. The
// encoding does not depend on the position (RoPE is applied in code space, exactly), so the keys
// here, already rotated by the generator, are coded as they come: the figures are the codebook's
// on those vectors. Values get a codebook of their own, trained on the calibration values: the
// paper quantizes values by additive quantization too, without RoPE.
class CommVqEvalCodec final : public EvalCodec {
 public:
  CommVqEvalCodec(int64_t dim, int bits, uint64_t seed)
      : config_{.head_dim = dim, .group_pairs = 2, .codebooks = 1, .bits = 4 * bits,
                .rope = {.theta = 500000.0f, .style = RopeStyle::half_split}, .kmeans_iterations = 15, .training_seed = seed + 5} {}

  void calibrate(const Inputs& in) override {
    require_calibration(in, "commvq", config_.codewords_per_codebook());
    keys_.emplace(train_commvq(config_, in.calibration_keys, in.calibration_count).codebook);
    CommVqConfig values = config_;
    values.training_seed = config_.training_seed + 1;
    values_.emplace(train_commvq(values, in.calibration_values, in.calibration_count).codebook);
    calibration_ = in.calibration;
  }
  std::string config() const override {
    return fmt::format("{} groups of {} half-split RoPE pairs, {}-bit codes, k-means codebooks ({} Lloyd steps at most) trained on {}; "
                       "keys coded position-independently (RoPE applied in code space), values by a codebook of their own",
                       config_.groups(), config_.group_pairs, config_.bits, config_.kmeans_iterations, calibration_);
  }
  int64_t key_bytes() const override { return keys_->record_bytes(); }
  int64_t value_bytes() const override { return values_->record_bytes(); }
  void reconstruct_keys(std::span<const float> keys, std::span<double> out) const override { round_trip(*keys_, keys, out); }
  void reconstruct_values(std::span<const float> values, std::span<double> out) const override { round_trip(*values_, values, out); }
  Theory theory() const override {
    return {.distortion_lower_bound = turboquant_lower_bound(config_.bits_per_coordinate()),
            .note = "lower bound 4^-b, below which no quantizer of b bits per coordinate goes on random unit vectors "
                    "(arXiv:2504.19874, Theorem 3); k-means codebooks have no closed-form distortion"};
  }

 private:
  CommVqConfig config_;
  std::optional<CommVqCodebook> keys_, values_;
  std::string calibration_;
};

template <ScaleMode kScale>
std::unique_ptr<EvalCodec> make_turboquant(int64_t dim, double bits, uint64_t seed) {
  return std::make_unique<TurboQuantCodec>(dim, int(bits), seed, kScale);
}

// 2.5 bits: the first D / 2 rotated coordinates at 3 bits, the other D / 2 at 2 (plain scale).
std::unique_ptr<EvalCodec> make_turboquant_split(int64_t dim, double bits, uint64_t seed) {
  const int low = int(std::floor(bits));
  return std::make_unique<TurboQuantCodec>(dim, low, seed, ScaleMode::plain, std::llround((bits - low) * double(dim)));
}

const std::vector<CodecEntry>& codec_table() {
  static const std::vector<CodecEntry> table{
      {"f16", {16}, [](int64_t d, double, uint64_t) -> std::unique_ptr<EvalCodec> { return std::make_unique<F16Codec>(d); }},
      {"turboquant.plain", {1, 2, 3, 4}, make_turboquant<ScaleMode::plain>},
      {"turboquant.norm_corrected", {1, 2, 3, 4}, make_turboquant<ScaleMode::norm_corrected>},
      {"turboquant.unbiased", {1, 2, 3, 4}, make_turboquant<ScaleMode::unbiased>},
      {"turboquant.split", {2.5, 3.5}, make_turboquant_split},
      {"turboquant.prod", {2, 3, 4}, [](int64_t d, double b, uint64_t s) -> std::unique_ptr<EvalCodec> { return std::make_unique<TurboQuantProdCodec>(d, int(b), s); }},
      {"rabitq", {1, 2, 3, 4}, [](int64_t d, double b, uint64_t s) -> std::unique_ptr<EvalCodec> { return std::make_unique<RabitqCodec>(d, int(b), s); }},
      {"qjl", {1, 2, 4}, [](int64_t d, double b, uint64_t s) -> std::unique_ptr<EvalCodec> { return std::make_unique<QjlCodec>(d, int(b), s); }},
      {"polarquant", {2, 3, 4}, [](int64_t d, double b, uint64_t s) -> std::unique_ptr<EvalCodec> { return std::make_unique<PolarQuantCodec>(d, int(b), s); }},
      {"kivi", {2, 4}, [](int64_t d, double b, uint64_t) -> std::unique_ptr<EvalCodec> { return std::make_unique<KiviEvalCodec>(d, int(b)); }},
      {"product_vq", {1, 2}, [](int64_t d, double b, uint64_t s) -> std::unique_ptr<EvalCodec> { return std::make_unique<ProductVqEvalCodec>(d, int(b), s); }},
      {"commvq", {1, 2}, [](int64_t d, double b, uint64_t s) -> std::unique_ptr<EvalCodec> { return std::make_unique<CommVqEvalCodec>(d, int(b), s); }},
  };
  return table;
}

// "turboquant" selects "turboquant" and "turboquant.*".
bool selects(std::string_view filter, std::string_view name) {
  return name == filter || (name.size() > filter.size() && name.starts_with(filter) && name[filter.size()] == '.');
}

bool selected(const std::vector<std::string>& filters, std::string_view name) {
  return filters.empty() || std::any_of(filters.begin(), filters.end(), [&](const std::string& f) { return selects(f, name); });
}

// ---------------------------------------------------------------------------------------------
// The figures

// In double, for the exact figures and for the estimates alike.
double dot(std::span<const float> a, std::span<const float> b) {
  double sum = 0.0;
  for (size_t j = 0; j < a.size(); ++j) sum += double(a[j]) * double(b[j]);
  return sum;
}

double dot(std::span<const float> a, std::span<const double> b) {
  double sum = 0.0;
  for (size_t j = 0; j < a.size(); ++j) sum += double(a[j]) * b[j];
  return sum;
}

// softmax(logits) . rows, in double: logits [L], rows [L, D], out [D].
void attend(std::span<const double> logits, std::span<const double> rows, std::span<double> out) {
  const double top = *std::max_element(logits.begin(), logits.end());
  double total = 0.0;
  std::fill(out.begin(), out.end(), 0.0);
  for (size_t t = 0; t < logits.size(); ++t) {
    const double p = std::exp(logits[t] - top);
    total += p;
    for (size_t j = 0; j < out.size(); ++j) out[j] += p * rows[t * out.size() + j];
  }
  for (double& v : out) v /= total;
}

KvEvalRecord evaluate(const EvalCodec& codec, const Inputs& in, int64_t context) {
  const size_t d = size_t(in.dim), n = size_t(in.count);
  std::vector<double> keys_out(n * d), values_out(n * d);
  codec.reconstruct_keys(in.keys, keys_out);
  codec.reconstruct_values(in.values, values_out);
  const std::span<const float> keys(in.keys), queries(in.queries);
  const std::span<const double> keys_hat(keys_out);

  KvEvalRecord r;
  r.config = codec.config();
  r.vectors = in.count;
  r.key_bytes = codec.key_bytes();
  r.value_bytes = codec.value_bytes();
  r.f16_bytes = 2 * in.dim;

  // Distortion, and the pairs' sums for the regression of estimate on truth.
  double distortion = 0.0, sum_t = 0.0, sum_e = 0.0, variance_exact = 0.0, variance_bound = 0.0;
  std::vector<double> truth(n), estimate(n);
  bool variance_known = false;
  for (size_t i = 0; i < n; ++i) {
    const std::span<const float> k = keys.subspan(i * d, d), q = queries.subspan(i * d, d);
    const std::span<const double> k_hat = keys_hat.subspan(i * d, d);
    double error2 = 0.0, norm2 = 0.0;
    for (size_t j = 0; j < d; ++j) {
      error2 += (double(k[j]) - k_hat[j]) * (double(k[j]) - k_hat[j]);
      norm2 += double(k[j]) * double(k[j]);
    }
    distortion += error2 / norm2;
    truth[i] = dot(q, k);
    estimate[i] = dot(q, k_hat);
    sum_t += truth[i];
    sum_e += estimate[i];
    if (const std::optional<PairVariance> v = codec.pair_variance(q, k)) {
      variance_exact += v->exact;
      variance_bound += v->bound;
      variance_known = true;
    }
  }
  const double count = double(n);
  r.distortion = distortion / count;
  const double mean_t = sum_t / count, mean_e = sum_e / count;
  double stt = 0.0, ste = 0.0, see = 0.0;
  for (size_t i = 0; i < n; ++i) {
    stt += (truth[i] - mean_t) * (truth[i] - mean_t);
    ste += (truth[i] - mean_t) * (estimate[i] - mean_e);
    see += (estimate[i] - mean_e) * (estimate[i] - mean_e);
  }
  r.slope = ste / stt;
  // Least squares: the residual variance over the spread of the truth.
  r.slope_standard_error = std::sqrt(std::max(0.0, see - r.slope * ste) / (count - 2.0) / stt);
  r.mean_error = mean_e - mean_t;
  double error_sum2 = 0.0;
  for (size_t i = 0; i < n; ++i) error_sum2 += (estimate[i] - truth[i] - r.mean_error) * (estimate[i] - truth[i] - r.mean_error);
  r.error_variance = error_sum2 / (count - 1.0);
  r.mean_error_standard_error = std::sqrt(r.error_variance / count);
  if (variance_known) {
    r.error_variance_exact = variance_exact / count;
    r.error_variance_bound = variance_bound / count;
  }

  // Attention: trial t is query t over keys and values [t * context, (t + 1) * context).
  const size_t l = size_t(context);
  const double logit_scale = 1.0 / std::sqrt(double(in.dim));
  std::vector<double> logits(l), logits_hat(l), out(d), out_hat(d);
  std::vector<double> values_exact(in.values.begin(), in.values.end());
  double score_error2 = 0.0, score_norm2 = 0.0, output_error2 = 0.0, output_norm2 = 0.0;
  r.attention_trials = in.count / context;
  for (size_t t = 0; t < size_t(r.attention_trials); ++t) {
    const std::span<const float> q = queries.subspan(t * d, d);
    const size_t first = t * l;
    for (size_t s = 0; s < l; ++s) {
      logits[s] = logit_scale * dot(q, keys.subspan((first + s) * d, d));
      logits_hat[s] = logit_scale * dot(q, keys_hat.subspan((first + s) * d, d));
      score_error2 += (logits_hat[s] - logits[s]) * (logits_hat[s] - logits[s]);
      score_norm2 += logits[s] * logits[s];
    }
    attend(logits, std::span<const double>(values_exact).subspan(first * d, l * d), out);
    attend(logits_hat, std::span<const double>(values_out).subspan(first * d, l * d), out_hat);
    for (size_t j = 0; j < d; ++j) {
      output_error2 += (out_hat[j] - out[j]) * (out_hat[j] - out[j]);
      output_norm2 += out[j] * out[j];
    }
  }
  r.score_relative_error = std::sqrt(score_error2 / score_norm2);
  r.output_relative_error = std::sqrt(output_error2 / output_norm2);

  const Theory theory = codec.theory();
  r.distortion_exact = theory.distortion_exact;
  r.distortion_lower_bound = theory.distortion_lower_bound;
  r.distortion_upper_bound = theory.distortion_upper_bound;
  r.slope_theory = theory.slope;
  r.theory = theory.note;
  return r;
}

nlohmann::json optional_json(const std::optional<double>& v) { return v ? nlohmann::json(*v) : nlohmann::json(nullptr); }

}  // namespace

std::vector<std::string> kv_eval_codec_names() {
  std::vector<std::string> names;
  for (const CodecEntry& e : codec_table()) names.emplace_back(e.name);
  return names;
}

KvEvalResult run_kv_eval(const KvEvalOptions& o) {
  const std::vector<CodecEntry>& table = codec_table();
  for (const std::string& f : o.codecs) {
    if (std::none_of(table.begin(), table.end(), [&](const CodecEntry& e) { return selects(f, e.name); })) {
      fail(kOp, "--codec", fmt::format("one of {} or a prefix before a '.' (turboquant)", fmt::join(kv_eval_codec_names(), ", ")), f);
    }
  }
  struct Job {
    const CodecEntry* entry;
    double bits;
  };
  std::vector<Job> jobs;
  for (const CodecEntry& e : table) {
    if (!selected(o.codecs, e.name)) continue;
    for (double b : e.bits) {
      if (o.bits.empty() || std::find(o.bits.begin(), o.bits.end(), b) != o.bits.end()) jobs.push_back({&e, b});
    }
  }
  if (jobs.empty()) {
    std::vector<std::string> widths;
    for (const CodecEntry& e : table) {
      if (selected(o.codecs, e.name)) widths.push_back(fmt::format("{}: {}", e.name, fmt::join(e.bits, ",")));
    }
    fail(kOp, "--bits", fmt::format("a width of a selected codec ({})", fmt::join(widths, "; ")), fmt::format("{}", fmt::join(o.bits, ",")));
  }

  const Inputs in = make_inputs(o);
  if (o.context < 1 || o.context > in.count) {
    fail(kOp, "--context", fmt::format("1 to {} tokens (the keys used)", in.count), std::to_string(o.context));
  }
  KvEvalResult result{o.input, in.description, in.dim, in.count, o.context, o.seed, {}};
  for (const Job& job : jobs) {
    if (o.progress) o.progress(fmt::format("kv-eval: {} {} bits", job.entry->name, job.bits));
    const std::unique_ptr<EvalCodec> codec = job.entry->make(in.dim, job.bits, o.seed);
    codec->calibrate(in);
    KvEvalRecord r = evaluate(*codec, in, o.context);
    r.codec = job.entry->name;
    r.bits = job.bits;
    result.records.push_back(std::move(r));
  }
  return result;
}

std::string kv_eval_json(const KvEvalResult& result) {
  nlohmann::json records = nlohmann::json::array();
  for (const KvEvalRecord& r : result.records) {
    // Integer widths stay JSON integers; the split widths are 2.5 and 3.5.
    const nlohmann::json bits = r.bits == std::floor(r.bits) ? nlohmann::json(int64_t(r.bits)) : nlohmann::json(r.bits);
    records.push_back({{"codec", r.codec}, {"bits", bits}, {"config", r.config}, {"vectors", r.vectors},
                       {"key_bytes", r.key_bytes}, {"value_bytes", r.value_bytes}, {"f16_bytes", r.f16_bytes},
                       {"distortion", r.distortion}, {"distortion_exact", optional_json(r.distortion_exact)},
                       {"distortion_lower_bound", optional_json(r.distortion_lower_bound)},
                       {"distortion_upper_bound", optional_json(r.distortion_upper_bound)},
                       {"slope", r.slope}, {"slope_standard_error", r.slope_standard_error},
                       {"slope_theory", optional_json(r.slope_theory)}, {"mean_error", r.mean_error},
                       {"mean_error_standard_error", r.mean_error_standard_error}, {"error_variance", r.error_variance},
                       {"error_variance_exact", optional_json(r.error_variance_exact)},
                       {"error_variance_bound", optional_json(r.error_variance_bound)},
                       {"attention_trials", r.attention_trials}, {"score_relative_error", r.score_relative_error},
                       {"output_relative_error", r.output_relative_error}, {"theory", r.theory}});
  }
  return nlohmann::json{{"schema", "decodelab.kv-eval/1"},
                        {"build_id", build_id()},
                        {"input", {{"source", result.input}, {"description", result.description}, {"dim", result.dim},
                                   {"count", result.count}, {"context", result.context}, {"seed", result.seed}}},
                        {"records", records}}
      .dump(1);
}

}  // namespace decodelab::kvquant
