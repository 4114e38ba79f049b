// TurboQuant (MSE), the double-precision reference: Zandieh, Daliri, Hadian, Mirrokni,
// "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate", arXiv:2504.19874
// (2025), Algorithm 1, with the vector's norm stored beside the codes (the paper quantizes unit
// vectors and notes that the norm is kept separately). Record layout and scale modes in
// include/decodelab/kvquant.h.
#include <fmt/format.h>

#include <cmath>
#include <optional>
#include <string>

#include "core/check.h"
#include "decodelab/error.h"
#include "decodelab/kvquant.h"
#include "kvquant/record.h"

namespace decodelab::kvquant {
namespace {

using detail::kNormBytes;

const TurboQuantConfig& checked(const TurboQuantConfig& config) {
  const detail::ArgCheck check("turboquant");
  check.head_dim(config.head_dim, "config.head_dim");
  if (config.bits < 1 || config.bits > 4) check.fail("config.bits", "1, 2, 3 or 4", std::to_string(config.bits));
  // h = head_dim would be the integer width bits + 1, spelled another way: refused, so that one
  // width has one config and one record.
  if (config.high_bits_channels < 0 || config.high_bits_channels >= config.head_dim) {
    check.fail("config.high_bits_channels", fmt::format("h in [0, {}) (head_dim)", config.head_dim),
               std::to_string(config.high_bits_channels));
  }
  if (config.high_bits_channels > 0 && config.bits == 4) {
    check.fail("config.bits", "1, 2 or 3 with high_bits_channels > 0 (its channels take bits + 1 <= 4)", "4");
  }
  return config;
}

std::optional<Codebook> high_codebook_for(const TurboQuantConfig& config) {
  if (config.high_bits_channels == 0) return std::nullopt;
  return Codebook::lloyd_max(config.head_dim, config.bits + 1);
}

// Both directions take one vector of head_dim values and one record.
void check_sizes(const detail::ArgCheck& check, int64_t head_dim, size_t x_size, int64_t record_bytes,
                 size_t record_size) {
  if (int64_t(x_size) != head_dim) check.fail("x", fmt::format("{} values (head_dim)", head_dim), std::to_string(x_size));
  if (int64_t(record_size) != record_bytes) {
    check.fail("record", fmt::format("{} bytes (record_bytes())", record_bytes), fmt::format("{} bytes", record_size));
  }
}

}  // namespace

std::string_view scale_mode_name(ScaleMode mode) {
  switch (mode) {
    case ScaleMode::plain: return "plain";
    case ScaleMode::norm_corrected: return "norm_corrected";
    case ScaleMode::unbiased: return "unbiased";
  }
  return "?";
}

TurboQuantMse::TurboQuantMse(const TurboQuantConfig& config)
    : config_(checked(config)),
      rotation_(Rotation::make(config.rotation, config.head_dim, config.seed)),
      codebook_(Codebook::lloyd_max(config.head_dim, config.bits)),
      high_codebook_(high_codebook_for(config)) {}

TurboQuantMse::TurboQuantMse(const TurboQuantConfig& config, Codebook codebook)
    : config_(checked(config)),
      rotation_(Rotation::make(config.rotation, config.head_dim, config.seed)),
      codebook_(std::move(codebook)),
      high_codebook_(high_codebook_for(config)) {
  // The coordinates of a rotated unit vector have scale 1/sqrt(D) for this D: a codebook fitted
  // to another D would quantize every coordinate on the wrong scale, silently.
  if (codebook_.dim() != config.head_dim || codebook_.bits() != config.bits) {
    fail("turboquant", "codebook",
         fmt::format("a codebook for D = {}, bits = {} (the config's)", config.head_dim, config.bits),
         fmt::format("D = {}, bits = {}", codebook_.dim(), codebook_.bits()));
  }
}

int64_t TurboQuantMse::record_bytes() const {
  const int64_t h = config_.high_bits_channels;
  return kNormBytes + (h > 0 ? packed_bytes(h, config_.bits + 1) : 0) + packed_bytes(config_.head_dim - h, config_.bits);
}

void TurboQuantMse::encode(std::span<const float> x, std::span<uint8_t> record) const {
  const detail::ArgCheck check("turboquant.encode");
  const int64_t d = config_.head_dim;
  check_sizes(check, d, x.size(), record_bytes(), record.size());
  const double norm = detail::checked_norm(check, x, "x");

  std::vector<double> y(size_t(d), 0.0);  // the zero vector stays zero: its direction is moot
  if (norm > 0.0) {
    for (size_t j = 0; j < x.size(); ++j) y[j] = double(x[j]) / norm;
  }
  rotation_.apply(y, y);
  std::vector<uint8_t> indices(static_cast<size_t>(d));
  double agreement = 0.0;  // <y, y~>, for the unbiased scale
  const size_t h = size_t(config_.high_bits_channels);
  for (size_t j = 0; j < indices.size(); ++j) {
    const Codebook& book = j < h ? *high_codebook_ : codebook_;
    indices[j] = book.index_of(y[j]);
    agreement += y[j] * book.centroids()[indices[j]];
  }
  const double scale = config_.scale == ScaleMode::unbiased && norm > 0.0 ? norm / agreement : norm;
  // The unbiased scale exceeds the norm (by 1 / <y, y~>, about 1.14 at 2 bits): near FLT_MAX it
  // would not fit the record's f32.
  if (!std::isfinite(float(scale))) {
    check.fail("x", "a norm whose unbiased scale fits an f32", fmt::format("norm {} (scale {})", norm, scale));
  }

  detail::store_f32_le(record.data(), float(scale));
  const std::span<const uint8_t> all(indices);
  std::span<uint8_t> codes = record.subspan(kNormBytes);
  if (h > 0) {
    const size_t high_bytes = size_t(packed_bytes(int64_t(h), config_.bits + 1));
    pack_bits(all.first(h), config_.bits + 1, codes.first(high_bytes));
    codes = codes.subspan(high_bytes);
  }
  pack_bits(all.subspan(h), config_.bits, codes);
}

void TurboQuantMse::decode(std::span<const uint8_t> record, std::span<float> x) const {
  const detail::ArgCheck check("turboquant.decode");
  const int64_t d = config_.head_dim;
  check_sizes(check, d, x.size(), record_bytes(), record.size());
  const float norm = detail::checked_record_norm(check, record.data(), "record norm");

  std::vector<uint8_t> indices(static_cast<size_t>(d));
  const size_t h = size_t(config_.high_bits_channels);
  std::span<const uint8_t> codes = record.subspan(kNormBytes);
  if (h > 0) {
    const size_t high_bytes = size_t(packed_bytes(int64_t(h), config_.bits + 1));
    unpack_bits(codes.first(high_bytes), config_.bits + 1, std::span<uint8_t>(indices).first(h));
    codes = codes.subspan(high_bytes);
  }
  unpack_bits(codes, config_.bits, std::span<uint8_t>(indices).subspan(h));
  std::vector<double> y(static_cast<size_t>(d));
  double length2 = 0.0;
  for (size_t j = 0; j < y.size(); ++j) {
    y[j] = (j < h ? *high_codebook_ : codebook_).centroids()[indices[j]];
    length2 += y[j] * y[j];
  }
  rotation_.apply_inverse(y, y);
  // ||R^T y~|| = ||y~||, so the decoded direction's length is known before rotating back. It is
  // never zero: a codebook of 2^bits symmetric centroids has none at 0.
  const double scale = config_.scale == ScaleMode::norm_corrected ? double(norm) / std::sqrt(length2) : double(norm);
  for (size_t j = 0; j < x.size(); ++j) x[j] = float(scale * y[j]);
}

}  // namespace decodelab::kvquant
