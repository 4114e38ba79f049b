// RaBitQ keys (1 bit) and extended RaBitQ (2-4 bits): the record layout and its round trip, the
// rescaling search against a brute-force search of the whole grid, the popcount score against
// the float formula on the same quantized query, the estimator's unbiasedness and exact error
// law over 10^4 pairs and for fixed pairs over Haar rotations, the error bound's failure rate against its stated rate and the exact tail,
// the error falling with the bits, and errors that name the bad argument. Fixed seeds; every
// statistical tolerance is in standard errors or from the theory in kvquant.h.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>
#include <numbers>
#include <random>
#include <span>
#include <vector>

#include "decodelab/kvquant.h"
#include "error_of.h"
#include "kv_statistics.h"
#include "verify/random.h"

namespace decodelab::kvquant {
namespace {

using verify::Rng;

std::vector<float> gaussian(Rng& rng, int64_t d, double scale = 1.0) {
  std::vector<float> v(static_cast<size_t>(d));
  for (float& x : v) x = float(scale * rng.normal());
  return v;
}

float f32_at(std::span<const uint8_t> record, size_t offset) {
  uint32_t bits = 0;
  for (size_t i = 0; i < 4; ++i) bits |= uint32_t(record[offset + i]) << (8 * i);
  return std::bit_cast<float>(bits);
}

// The codes u_j of a record, read from its bit planes by the layout in kvquant.h.
std::vector<int> codes_of(std::span<const uint8_t> record, int64_t d, int bits) {
  const size_t plane_bytes = size_t((d + 7) / 8);
  std::vector<int> u(static_cast<size_t>(d), 0);
  for (int a = 0; a < bits; ++a) {
    for (size_t j = 0; j < u.size(); ++j) u[j] |= ((record[8 + size_t(a) * plane_bytes + j / 8] >> (j % 8)) & 1) << a;
  }
  return u;
}

double grid(int u, int bits) { return double(u) - 0.5 * double((1 << bits) - 1); }

// R x in double, through the codec's public rotation.
std::vector<double> rotate(const RabitqKeys& codec, std::span<const float> x) {
  std::vector<double> v(x.begin(), x.end());
  codec.rotation().apply(v, v);
  return v;
}

// <y, o'> / ||y||: the cosine between the grid point of codes u and the rotated direction.
double cosine(const std::vector<int>& u, int bits, std::span<const double> rotated) {
  double along = 0.0, length2 = 0.0, norm2 = 0.0;
  for (size_t j = 0; j < u.size(); ++j) {
    along += grid(u[j], bits) * rotated[j];
    length2 += grid(u[j], bits) * grid(u[j], bits);
    norm2 += rotated[j] * rotated[j];
  }
  return along / std::sqrt(length2 * norm2);
}

// ---------------------------------------------------------------------------------------------
// Record layout and round trip

TEST(KvRabitq, RecordLayoutAndRoundTrip) {
  // D = 20 (dense): planes of 3 bytes with 4 spare bits, so the spare-bit rule is exercised.
  Rng rng(5);
  for (int bits = 1; bits <= 4; ++bits) {
    SCOPED_TRACE(fmt::format("bits {}", bits));
    const int64_t d = 20;
    const RabitqKeys codec({d, bits, 4, RotationKind::dense, 17, {}});
    ASSERT_EQ(codec.record_bytes(), 8 + bits * 3);
    const std::vector<float> k = gaussian(rng, d, 3.0);
    std::vector<uint8_t> record(size_t(codec.record_bytes()), 0xA5);  // poisoned
    codec.encode(k, record);
    EXPECT_EQ(f32_at(record, 0), float(std::sqrt(dot(k, k))));
    std::vector<double> rotated = rotate(codec, k);
    const std::vector<int> u = codes_of(record, d, bits);
    // The correction is the cosine of the stored code; at 1 bit the code is the signs of R k.
    EXPECT_NEAR(f32_at(record, 4), cosine(u, bits, rotated), 1e-7);
    for (size_t j = 0; j < u.size(); ++j) {
      ASSERT_LT(u[j], 1 << bits);
      if (bits == 1) {
        EXPECT_EQ(u[j], rotated[j] >= 0.0 ? 1 : 0) << j;
      }
      EXPECT_EQ(grid(u[j], bits) > 0.0, rotated[j] >= 0.0) << "the code keeps the sign of coordinate " << j;
    }
    for (int a = 0; a < bits; ++a) EXPECT_EQ(record[8 + size_t(a) * 3 + 2] >> 4, 0) << "spare bits of plane " << a;
    // decode: the vector whose inner product with q is estimate(q).
    std::vector<float> x(static_cast<size_t>(d), std::numeric_limits<float>::quiet_NaN());
    codec.decode(record, x);
    for (int t = 0; t < 5; ++t) {
      const std::vector<float> q = gaussian(rng, d);
      const double e = codec.estimate(q, record);
      EXPECT_NEAR(dot(q, x), e, 1e-6 * std::sqrt(dot(q, q) * dot(x, x)));
    }
    // Spare bits are ignored when reading.
    std::vector<uint8_t> dirty = record;
    for (int a = 0; a < bits; ++a) dirty[8 + size_t(a) * 3 + 2] |= 0xF0;
    const std::vector<float> q = gaussian(rng, d);
    EXPECT_EQ(codec.estimate(q, dirty), codec.estimate(q, record));
    const RabitqQuery query = codec.quantize_query(q, 99);
    double clean = 0.0, spare = 0.0;
    codec.score(query, record, std::span<double>(&clean, 1));
    codec.score(query, dirty, std::span<double>(&spare, 1));
    EXPECT_EQ(spare, clean);
    // The key at the centroid: norm 0, correction 1, every estimate <q, c>.
    const std::vector<float> c = gaussian(rng, d);
    const RabitqKeys centred({d, bits, 4, RotationKind::dense, 17, c});
    centred.encode(c, record);
    EXPECT_EQ(f32_at(record, 0), 0.0f);
    EXPECT_EQ(f32_at(record, 4), 1.0f);
    EXPECT_EQ(centred.estimate(q, record), dot(q, c));
    centred.decode(record, x);
    EXPECT_EQ(x, c);
  }
}

TEST(KvRabitq, CentroidShiftsTheKey) {
  // k and k - c + c': a codec with centroid c on k and one with centroid c' on the shifted key
  // store the same codes and norm; the estimates differ by exactly <q, c - c'>'s share.
  Rng rng(6);
  const int64_t d = 64;
  const std::vector<float> c = gaussian(rng, d), k = gaussian(rng, d), q = gaussian(rng, d);
  std::vector<float> offset(static_cast<size_t>(d));
  for (size_t j = 0; j < offset.size(); ++j) offset[j] = float(double(k[j]) - double(c[j]));
  const RabitqKeys with_c({d, 2, 4, RotationKind::hadamard, 3, c}), plain({d, 2, 4, RotationKind::hadamard, 3, {}});
  std::vector<uint8_t> a(size_t(with_c.record_bytes())), b(a.size());
  with_c.encode(k, a);
  plain.encode(offset, b);
  EXPECT_TRUE(std::equal(a.begin() + 8, a.end(), b.begin() + 8)) << "same direction, same codes";
  EXPECT_NEAR(f32_at(a, 0), f32_at(b, 0), 1e-6 * f32_at(b, 0));
  EXPECT_NEAR(with_c.estimate(q, a), dot(q, c) + plain.estimate(q, b), 1e-5 * std::sqrt(dot(q, q) * dot(k, k)));
}

// ---------------------------------------------------------------------------------------------
// The rescaling search finds the nearest grid direction

TEST(KvRabitq, RescalingSearchFindsTheBestCodeword) {
  // At D = 4 and 6 the whole grid can be searched: 16^4 and 8^6 points. The codec's correction
  // must be the largest cosine of any of them. Rounding o' at one fixed scale (the plain
  // scalar quantizer) reaches it for only some keys, so this is where a search that stopped
  // early, or skipped steps, would show.
  Rng rng(7);
  int below_best_at_fixed_scale = 0, keys = 0;
  for (auto [d, bits] : {std::pair<int64_t, int>{4, 2}, {4, 3}, {4, 4}, {6, 2}, {6, 3}}) {
    SCOPED_TRACE(fmt::format("D {}, bits {}", d, bits));
    const RabitqKeys codec({d, bits, 4, RotationKind::dense, 11, {}});
    std::vector<uint8_t> record(size_t(codec.record_bytes()));
    const int levels = 1 << bits;
    int64_t points = 1;
    for (int64_t j = 0; j < d; ++j) points *= levels;
    for (int t = 0; t < 40; ++t, ++keys) {
      const std::vector<float> k = gaussian(rng, d);
      codec.encode(k, record);
      const std::vector<double> rotated = rotate(codec, k);
      double best = -1.0;
      std::vector<int> u(static_cast<size_t>(d));
      for (int64_t p = 0; p < points; ++p) {
        int64_t rest = p;
        for (int64_t j = 0; j < d; ++j, rest /= levels) u[size_t(j)] = int(rest % levels);
        best = std::max(best, cosine(u, bits, rotated));
      }
      EXPECT_NEAR(cosine(codes_of(record, d, bits), bits, rotated), best, 1e-12) << "key " << t;
      EXPECT_NEAR(f32_at(record, 4), best, 1e-7) << "key " << t;
      // The scalar quantizer: o' scaled so that its largest coordinate hits the outermost level.
      double largest = 0.0;
      for (double v : rotated) largest = std::max(largest, std::fabs(v));
      for (size_t j = 0; j < u.size(); ++j) {
        const double x = rotated[j] / largest * (0.5 * double(levels - 1)) + 0.5 * double(levels - 1);
        u[j] = std::clamp(int(std::lround(x)), 0, levels - 1);
      }
      below_best_at_fixed_scale += cosine(u, bits, rotated) < best - 1e-12;
    }
  }
  std::cout << fmt::format("RaBitQ rescaling search: {} of {} keys beat the fixed-scale rounding\n",
                           below_best_at_fixed_scale, keys);
  EXPECT_GT(below_best_at_fixed_scale, keys / 4) << "the grid search must be tested where it matters";
}

// ---------------------------------------------------------------------------------------------
// Popcount scoring is the float formula on the same quantized query

TEST(KvRabitq, PopcountScoreIsTheFloatFormula) {
  Rng rng(8);
  for (RotationKind kind : {RotationKind::hadamard, RotationKind::dense}) {
    const int64_t d = kind == RotationKind::hadamard ? 128 : 100;  // 100: spare bits in every plane
    for (int bits = 1; bits <= 4; ++bits) {
      for (int query_bits : {1, 4, 8}) {
        SCOPED_TRACE(fmt::format("{} D {}, bits {}, query bits {}", rotation_kind_name(kind), d, bits, query_bits));
        const std::vector<float> c = bits == 3 ? gaussian(rng, d, 0.5) : std::vector<float>{};
        const RabitqKeys codec({d, bits, query_bits, kind, uint64_t(bits), c});
        const size_t keys = 9, bytes = size_t(codec.record_bytes());
        std::vector<uint8_t> records(keys * bytes);
        for (size_t n = 0; n < keys; ++n) codec.encode(gaussian(rng, d, 2.0), std::span(records).subspan(n * bytes, bytes));
        const std::vector<float> q = gaussian(rng, d);
        const RabitqQuery query = codec.quantize_query(q, 1000 + uint64_t(bits));
        ASSERT_EQ(query.codes.size(), size_t(d));
        std::vector<double> scores(keys, std::numeric_limits<double>::quiet_NaN());
        codec.score(query, records, scores);
        const int top = (1 << query_bits) - 1;
        EXPECT_EQ(*std::min_element(query.codes.begin(), query.codes.end()), 0) << "the minimum is exactly v_l";
        EXPECT_EQ(*std::max_element(query.codes.begin(), query.codes.end()), top) << "the maximum is exactly v_r";
        for (size_t n = 0; n < keys; ++n) {
          const std::span<const uint8_t> record = std::span<const uint8_t>(records).subspan(n * bytes, bytes);
          const std::vector<int> u = codes_of(record, d, bits);
          double along = 0.0, length2 = 0.0, qbar2 = 0.0;
          for (size_t j = 0; j < u.size(); ++j) {
            const double qbar = query.lower + query.step * double(query.codes[j]);
            along += grid(u[j], bits) * qbar;
            length2 += grid(u[j], bits) * grid(u[j], bits);
            qbar2 += qbar * qbar;
          }
          const double norm = f32_at(record, 0), correction = f32_at(record, 4);
          const double want = query.centroid_dot + norm * along / (std::sqrt(length2) * correction);
          // One unit of the integer <2y, q_u> moves the score by norm * step / (||2y|| corr),
          // about 1e-3 of the scale below or more: 1e-12 of it is rounding, not a popcount slip.
          EXPECT_NEAR(scores[n], want, 1e-12 * norm * std::sqrt(qbar2) / correction + 1e-12 * std::fabs(query.centroid_dot)) << n;
        }
      }
    }
  }
}

TEST(KvRabitq, PopcountScoreIsExactOnIntegerQueries) {
  // A query with v_l = 0 and step 1: the score is n * <2y, q_u> / (||2y|| corr), the integer
  // <2y, q_u> = sum_j (2 u_j - m) q_u_j computed here coordinate by coordinate. The popcount path
  // adds 0 * T and divides in the same order, so the two agree bit for bit.
  Rng rng(9);
  for (int bits = 1; bits <= 4; ++bits) {
    const int64_t d = 96;
    const RabitqKeys codec({d, bits, 8, RotationKind::hadamard, 5, {}});
    std::vector<uint8_t> record(size_t(codec.record_bytes()));
    codec.encode(gaussian(rng, d), record);
    RabitqQuery query;
    query.lower = 0.0;
    query.step = 1.0;
    for (int64_t j = 0; j < d; ++j) query.codes.push_back(uint8_t(rng.uniform_int(0, 255)));
    const std::vector<int> u = codes_of(record, d, bits);
    const int64_t m = (1 << bits) - 1;
    int64_t s = 0, y2 = 0;
    for (size_t j = 0; j < u.size(); ++j) {
      s += (2 * u[j] - m) * int64_t(query.codes[j]);
      y2 += (2 * u[j] - m) * (2 * u[j] - m);
    }
    double score = 0.0;
    codec.score(query, record, std::span<double>(&score, 1));
    EXPECT_EQ(score, double(f32_at(record, 0)) * double(s) / (std::sqrt(double(y2)) * double(f32_at(record, 4))))
        << "bits " << bits;
  }
}

// ---------------------------------------------------------------------------------------------
// Statistics over 10^4 pairs

// The exact tail P(|z| > t) of one coordinate z of a uniform unit vector in n dimensions:
// density proportional to (1 - z^2)^((n - 3) / 2), in z = sin(theta) cos^(n-2)(theta) dtheta,
// integrated by Simpson's rule over theta in [asin t, pi/2] against [0, pi/2] (z is symmetric, so
// that ratio is the two-sided tail). Independent of the codec: the law the error must follow.
double sphere_coordinate_tail(int64_t n, double t) {
  auto integral = [&](double from) {
    const int steps = 20000;
    const double h = (std::numbers::pi / 2.0 - from) / steps;
    double sum = 0.0;
    for (int i = 0; i <= steps; ++i) {
      const double w = (i == 0 || i == steps) ? 1.0 : (i % 2 ? 4.0 : 2.0);
      sum += w * std::pow(std::cos(from + h * i), double(n - 2));
    }
    return sum * h / 3.0;
  };
  return t >= 1.0 ? 0.0 : integral(std::asin(t)) / integral(0.0);
}

// Pairs at D = 128 with the rotation that ships (hadamard), 1000 rotation seeds x 10 pairs.
// Random pair: q ~ N(0, I); k = s (rho q + sqrt(1 - rho^2) g), rho uniform in [-1, 1], s in
// [0.5, 2] (as the QJL tests), so that <q, k> spreads over about +-128 against an error of
// std about 8 at 1 bit. Orthogonal pair: k ~ N(0, I), q ~ N(0, I) made orthogonal to k, where
// ||q_perp|| = ||q|| and the bound is tight. Both laws are invariant under rotations, so a fixed
// rotation sees the same error law as a Haar-random one; errors sharing a rotation are
// uncorrelated (q -> -q flips them), and standard errors are clustered over the seeds.
struct RabitqStatistics {
  static constexpr int64_t kDim = 128;
  static constexpr int kSeeds = 1000;
  static constexpr int kPairsPerSeed = 10;
  static constexpr int kQueryBits = 4;

  struct PerBits {
    // Random pairs: the full-precision estimate, the popcount score, and the error's exact
    // variance n^2 ||q_perp||^2 (1 - corr^2) / (corr^2 (D - 1)) given the record's correction.
    std::vector<double> estimate, score, variance, correction, bound1;
    // (score - estimate)^2 over n^2 step^2 / (4 corr^2), the bound on the query rounding's variance.
    std::vector<double> rounding_ratio;
    // Orthogonal pairs: error / (n ||q|| sqrt(1 - corr^2) / corr), which the law says is z, and
    // the bound at eps0 = 1 (the bound at any eps0 is eps0 times it; bound1 for random pairs).
    std::vector<double> orthogonal_z, orthogonal_error, orthogonal_bound1;
  };
  std::vector<double> truth;
  PerBits by_bits[5];  // index 1..4
};

const RabitqStatistics& rabitq_statistics() {
  static const RabitqStatistics stats = [] {
    RabitqStatistics s;
    const int64_t d = RabitqStatistics::kDim;
    Rng rng(2405);
    std::uniform_real_distribution<double> rho_of(-1.0, 1.0), scale_of(0.5, 2.0);
    for (int seed = 0; seed < RabitqStatistics::kSeeds; ++seed) {
      std::vector<std::vector<float>> q, k, oq, ok;
      for (int p = 0; p < RabitqStatistics::kPairsPerSeed; ++p) {
        q.push_back(gaussian(rng, d));
        const std::vector<float> g = gaussian(rng, d);
        const double rho = rho_of(rng.engine()), scale = scale_of(rng.engine());
        std::vector<float> key(static_cast<size_t>(d));
        for (size_t j = 0; j < key.size(); ++j) {
          key[j] = float(scale * (rho * double(q.back()[j]) + std::sqrt(1.0 - rho * rho) * double(g[j])));
        }
        k.push_back(key);
        s.truth.push_back(dot(q.back(), key));
        ok.push_back(gaussian(rng, d));
        std::vector<float> other = gaussian(rng, d);
        const double along = dot(other, ok.back()) / dot(ok.back(), ok.back());
        for (size_t j = 0; j < other.size(); ++j) other[j] = float(double(other[j]) - along * double(ok.back()[j]));
        oq.push_back(other);
      }
      for (int bits = 1; bits <= 4; ++bits) {
        RabitqStatistics::PerBits& out = s.by_bits[bits];
        const RabitqKeys codec({d, bits, RabitqStatistics::kQueryBits, RotationKind::hadamard, uint64_t(seed), {}});
        std::vector<uint8_t> record(size_t(codec.record_bytes()));
        for (int p = 0; p < RabitqStatistics::kPairsPerSeed; ++p) {
          codec.encode(k[size_t(p)], record);
          const double n = f32_at(record, 0), corr = f32_at(record, 4);
          out.estimate.push_back(codec.estimate(q[size_t(p)], record));
          // Rounding seeds far from the rotation seeds (kvquant.h: they must differ).
          const RabitqQuery query = codec.quantize_query(q[size_t(p)], 1u << 30 | uint64_t(seed * 16 + p));
          double score = 0.0;
          codec.score(query, record, std::span<double>(&score, 1));
          out.score.push_back(score);
          const double rounding_bound = n * n * query.step * query.step / (4.0 * corr * corr);
          out.rounding_ratio.push_back((score - out.estimate.back()) * (score - out.estimate.back()) / rounding_bound);
          const double t = dot(q[size_t(p)], k[size_t(p)]), k2 = dot(k[size_t(p)], k[size_t(p)]);
          const double qperp2 = dot(q[size_t(p)], q[size_t(p)]) - t * t / k2;
          out.variance.push_back(n * n * qperp2 * (1.0 - corr * corr) / (corr * corr * double(d - 1)));
          out.correction.push_back(corr);
          out.bound1.push_back(rabitq_error_bound(n, std::sqrt(dot(q[size_t(p)], q[size_t(p)])), corr, d, 1.0));

          codec.encode(ok[size_t(p)], record);
          const double on = f32_at(record, 0), ocorr = f32_at(record, 4);
          const double error = codec.estimate(oq[size_t(p)], record) - dot(oq[size_t(p)], ok[size_t(p)]);
          const double qn = std::sqrt(dot(oq[size_t(p)], oq[size_t(p)]));
          out.orthogonal_z.push_back(error / (on * qn * std::sqrt(1.0 - ocorr * ocorr) / ocorr));
          out.orthogonal_error.push_back(error);
          out.orthogonal_bound1.push_back(rabitq_error_bound(on, qn, ocorr, d, 1.0));
        }
      }
    }
    return s;
  }();
  return stats;
}

TEST(KvRabitq, UnbiasedAtOneBit) {
  // 10^4 random pairs, 1 bit: the regression slope of the estimate on the truth is 1 +- 0.02
  // (dropping the correction gives <o_bar, o> ~ 0.80) and the mean error is within 3 clustered
  // standard errors of 0, for the full-precision query and for the 4-bit popcount score.
  const RabitqStatistics& s = rabitq_statistics();
  const RabitqStatistics::PerBits& b = s.by_bits[1];
  ASSERT_EQ(s.truth.size(), size_t(RabitqStatistics::kSeeds * RabitqStatistics::kPairsPerSeed));
  for (const auto& [name, estimate] : {std::pair{"estimate", &b.estimate}, std::pair{"popcount score", &b.score}}) {
    const double slope = regression_slope(s.truth, *estimate);
    std::vector<double> error(s.truth.size());
    for (size_t i = 0; i < error.size(); ++i) error[i] = (*estimate)[i] - s.truth[i];
    const MeanAndError bias = clustered_mean(error, RabitqStatistics::kPairsPerSeed);
    std::cout << fmt::format("RaBitQ D=128 1 bit {} ({} pairs, {} rotations): slope {:.5f}, mean error {:+.4f} "
                             "(standard error {:.4f}, {:+.2f} SE)\n",
                             name, error.size(), RabitqStatistics::kSeeds, slope, bias.mean, bias.standard_error,
                             bias.mean / bias.standard_error);
    EXPECT_NEAR(slope, 1.0, 0.02) << name;
    EXPECT_LT(std::fabs(bias.mean), 3.0 * bias.standard_error) << name;
  }
}

TEST(KvRabitq, ErrorBoundFailsAtMostAtItsRate) {
  // The bound at eps0 on 10^4 orthogonal pairs (where it is tight, ||q_perp|| = ||q||): its
  // violations are at most the stated rate 2 exp(-eps0^2 / 2), and, sharper, match the exact
  // tail P(|z| > eps0 / sqrt(D - 1)) of the law in kvquant.h within 4 binomial standard errors,
  // at every B. A bound missing the sqrt(1 - corr^2) / corr factor (0.75 at 1 bit, 0.1 at 4)
  // or the 1 / sqrt(D - 1) moves them by many standard errors. (D for D - 1 would not show: at
  // D = 128 it moves the threshold by 0.4%.)
  const RabitqStatistics& s = rabitq_statistics();
  const int64_t d = RabitqStatistics::kDim;
  for (int bits = 1; bits <= 4; ++bits) {
    const RabitqStatistics::PerBits& b = s.by_bits[bits];
    const double n = double(b.orthogonal_error.size());
    for (double eps0 : {1.0, 1.9, 2.5, 3.0}) {
      int violations = 0;
      for (size_t i = 0; i < b.orthogonal_error.size(); ++i) {
        violations += std::fabs(b.orthogonal_error[i]) > eps0 * b.orthogonal_bound1[i];
      }
      const double rate = violations / n;
      const double stated = rabitq_bound_failure_probability(eps0);
      const double exact = sphere_coordinate_tail(d - 1, eps0 / std::sqrt(double(d - 1)));
      const double standard_error = std::sqrt(exact * (1.0 - exact) / n);
      std::cout << fmt::format("RaBitQ D=128 {} bits, eps0 {}: bound fails for {:.4f} of {} orthogonal pairs, "
                               "stated rate {:.4f}, exact {:.4f} ({:+.2f} SE)\n",
                               bits, eps0, rate, n, stated, exact, (rate - exact) / standard_error);
      EXPECT_LE(rate, stated) << "bits " << bits << ", eps0 " << eps0;
      EXPECT_LT(std::fabs(rate - exact), 4.0 * standard_error) << "bits " << bits << ", eps0 " << eps0;
    }
  }
  // On random pairs ||q_perp|| < ||q||: at the paper's eps0 = 1.9 the bound fails less often
  // than on orthogonal ones, so below the exact tail (plus 4 standard errors) and the stated rate.
  const double exact = sphere_coordinate_tail(d - 1, 1.9 / std::sqrt(double(d - 1)));
  for (int bits = 1; bits <= 4; ++bits) {
    const RabitqStatistics::PerBits& b = s.by_bits[bits];
    int violations = 0;
    for (size_t i = 0; i < s.truth.size(); ++i) violations += std::fabs(b.estimate[i] - s.truth[i]) > 1.9 * b.bound1[i];
    const double rate = violations / double(s.truth.size());
    std::cout << fmt::format("RaBitQ D=128 {} bits, eps0 1.9: bound fails for {:.4f} of {} random pairs\n", bits, rate,
                             s.truth.size());
    EXPECT_LT(rate, exact + 4.0 * std::sqrt(exact * (1.0 - exact) / double(s.truth.size()))) << bits;
  }
}

TEST(KvRabitq, ErrorFollowsItsExactLaw) {
  // The normalized error z on orthogonal pairs has variance 1 / (D - 1); on random pairs the
  // squared error over its exact variance (given each record's correction) has mean 1. Both
  // within 4 standard errors, at every B.
  const RabitqStatistics& s = rabitq_statistics();
  const int64_t d = RabitqStatistics::kDim;
  for (int bits = 1; bits <= 4; ++bits) {
    const RabitqStatistics::PerBits& b = s.by_bits[bits];
    std::vector<double> z2, ratio;
    for (double z : b.orthogonal_z) z2.push_back(z * z * double(d - 1));
    for (size_t i = 0; i < s.truth.size(); ++i) ratio.push_back((b.estimate[i] - s.truth[i]) * (b.estimate[i] - s.truth[i]) / b.variance[i]);
    const MeanAndError zm = clustered_mean(z2, RabitqStatistics::kPairsPerSeed);
    const MeanAndError rm = clustered_mean(ratio, RabitqStatistics::kPairsPerSeed);
    std::cout << fmt::format("RaBitQ D=128 {} bits: (D - 1) z^2 mean {:.4f} (SE {:.4f}); error^2 / exact variance "
                             "{:.4f} (SE {:.4f})\n",
                             bits, zm.mean, zm.standard_error, rm.mean, rm.standard_error);
    EXPECT_LT(std::fabs(zm.mean - 1.0), 4.0 * zm.standard_error) << bits;
    EXPECT_LT(std::fabs(rm.mean - 1.0), 4.0 * rm.standard_error) << bits;
  }
}

TEST(KvRabitq, ExtendedErrorShrinksWithBitsAndStaysUnbiased) {
  // B = 1..4 on the same 10^4 random pairs: each unbiased (slope 1 +- 0.02, mean error within 3
  // standard errors), for the estimate and the popcount score, and the mean squared error of the
  // estimate falls by more than half with each bit (the correction nears 1).
  const RabitqStatistics& s = rabitq_statistics();
  double previous = std::numeric_limits<double>::infinity();
  for (int bits = 1; bits <= 4; ++bits) {
    const RabitqStatistics::PerBits& b = s.by_bits[bits];
    double mse = 0.0, score_mse = 0.0, correction = 0.0;
    const double n = double(s.truth.size());
    for (size_t i = 0; i < s.truth.size(); ++i) {
      mse += (b.estimate[i] - s.truth[i]) * (b.estimate[i] - s.truth[i]) / n;
      score_mse += (b.score[i] - s.truth[i]) * (b.score[i] - s.truth[i]) / n;
      correction += b.correction[i] / n;
    }
    for (const auto& [name, estimate] : {std::pair{"estimate", &b.estimate}, std::pair{"score", &b.score}}) {
      const double slope = regression_slope(s.truth, *estimate);
      std::vector<double> error(s.truth.size());
      for (size_t i = 0; i < error.size(); ++i) error[i] = (*estimate)[i] - s.truth[i];
      const MeanAndError bias = clustered_mean(error, RabitqStatistics::kPairsPerSeed);
      std::cout << fmt::format("RaBitQ D=128 {} bits {}: slope {:.5f}, mean error {:+.4f} ({:+.2f} SE)\n", bits, name,
                               slope, bias.mean, bias.mean / bias.standard_error);
      EXPECT_NEAR(slope, 1.0, 0.02) << bits << " " << name;
      EXPECT_LT(std::fabs(bias.mean), 3.0 * bias.standard_error) << bits << " " << name;
    }
    std::cout << fmt::format("RaBitQ D=128 {} bits: mean correction {:.4f}, estimate MSE {:.4f}, 4-bit-query score "
                             "MSE {:.4f}\n",
                             bits, correction, mse, score_mse);
    EXPECT_LT(mse, 0.5 * previous) << bits;
    // The query's rounding adds variance at most n^2 step^2 / (4 corr^2) (kvquant.h); for a
    // uniform fractional part it is 2/3 of that on average (E f (1 - f) = 1/6 against 1/4).
    const MeanAndError rounding = clustered_mean(b.rounding_ratio, RabitqStatistics::kPairsPerSeed);
    std::cout << fmt::format("RaBitQ D=128 {} bits: (score - estimate)^2 / rounding bound {:.4f} (SE {:.4f})\n", bits,
                             rounding.mean, rounding.standard_error);
    EXPECT_LT(rounding.mean, 1.0) << bits;
    EXPECT_GT(rounding.mean, 0.5) << bits;
    previous = mse;
  }
}

TEST(KvRabitq, FixedPairsUnbiasedOverHaarRotations) {
  // The paper's claim as stated: one fixed pair, the expectation over the rotation. Dense
  // (Haar-random) rotations at D = 64, 1000 seeds, B = 1 and 3; per pair the mean estimate within
  // 3 standard errors of <q, k>, and the squared error over its exact variance (given each
  // record's correction) within 4 standard errors of 1. The spiky key (one coordinate 8x the
  // rest) is where a rotation that did not spread it would show. The angled pair is the
  // orthogonal one plus k / 2: the part along k is estimated exactly (q_perp alone carries
  // the error), so its error must be the orthogonal pair's, rotation by rotation.
  const int64_t d = 64;
  const int seeds = 1000;
  Rng rng(64);
  const std::vector<float> k0 = gaussian(rng, d);
  std::vector<float> orthogonal = gaussian(rng, d), angled(static_cast<size_t>(d)), spike = gaussian(rng, d, 0.3);
  const double along = dot(orthogonal, k0) / dot(k0, k0);
  for (size_t j = 0; j < orthogonal.size(); ++j) orthogonal[j] = float(double(orthogonal[j]) - along * double(k0[j]));
  for (size_t j = 0; j < angled.size(); ++j) angled[j] = float(0.5 * double(k0[j]) + double(orthogonal[j]));
  spike[0] = 8.0f;
  const std::vector<float> spike_query = gaussian(rng, d);
  const std::vector<std::vector<float>> qs{orthogonal, angled, spike_query}, ks{k0, k0, spike};
  const char* names[] = {"orthogonal", "angled", "spiky"};
  for (int bits : {1, 3}) {
    std::vector<std::vector<double>> errors(qs.size()), ratios(qs.size());
    for (int seed = 0; seed < seeds; ++seed) {
      const RabitqKeys codec({d, bits, 4, RotationKind::dense, uint64_t(seed), {}});
      std::vector<uint8_t> record(size_t(codec.record_bytes()));
      for (size_t f = 0; f < qs.size(); ++f) {
        codec.encode(ks[f], record);
        const double n = f32_at(record, 0), corr = f32_at(record, 4);
        const double t = dot(qs[f], ks[f]), qperp2 = dot(qs[f], qs[f]) - t * t / dot(ks[f], ks[f]);
        const double e = codec.estimate(qs[f], record) - t;
        errors[f].push_back(e);
        ratios[f].push_back(e * e / (n * n * qperp2 * (1.0 - corr * corr) / (corr * corr * double(d - 1))));
      }
    }
    for (int seed = 0; seed < seeds; ++seed) {
      ASSERT_NEAR(errors[1][size_t(seed)], errors[0][size_t(seed)], 1e-5 * std::sqrt(dot(angled, angled) * dot(k0, k0)))
          << "bits " << bits << ", seed " << seed;
    }
    for (size_t f : {size_t{0}, size_t{2}}) {
      const MeanAndError bias = clustered_mean(errors[f], 1), ratio = clustered_mean(ratios[f], 1);
      std::cout << fmt::format("RaBitQ D=64 {} bits, fixed {} pair over {} Haar rotations: mean error {:+.4f} "
                               "({:+.2f} SE), error^2 / exact variance {:.4f} (SE {:.4f})\n",
                               bits, names[f], seeds, bias.mean, bias.mean / bias.standard_error, ratio.mean,
                               ratio.standard_error);
      EXPECT_LT(std::fabs(bias.mean), 3.0 * bias.standard_error) << bits << " " << names[f];
      EXPECT_LT(std::fabs(ratio.mean - 1.0), 4.0 * ratio.standard_error) << bits << " " << names[f];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(KvErrors, Rabitq) {
  EXPECT_ERROR(RabitqKeys({1, 1, 4, RotationKind::dense, 0, {}}), "rabitq: config.head_dim: expected D in [2, 4096], got 1");
  EXPECT_ERROR(RabitqKeys({72, 1, 4, RotationKind::hadamard, 0, {}}),
               "rabitq: config.head_dim: expected a multiple of 16 for a hadamard rotation, got 72");
  EXPECT_ERROR(RabitqKeys({64, 5, 4, RotationKind::hadamard, 0, {}}), "rabitq: config.bits: expected 1, 2, 3 or 4, got 5");
  EXPECT_ERROR(RabitqKeys({64, 0, 4, RotationKind::hadamard, 0, {}}), "rabitq: config.bits: expected 1, 2, 3 or 4, got 0");
  EXPECT_ERROR(RabitqKeys({64, 1, 9, RotationKind::hadamard, 0, {}}), "rabitq: config.query_bits: expected Bq in 1..8, got 9");
  EXPECT_ERROR(RabitqKeys({64, 1, 4, RotationKind::hadamard, 0, std::vector<float>(63)}),
               "rabitq: config.centroid: expected empty (the zero centroid) or 64 values (head_dim), got 63 values");
  std::vector<float> bad_centroid(64, 0.0f);
  bad_centroid[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_ERROR(RabitqKeys({64, 1, 4, RotationKind::hadamard, 0, bad_centroid}),
               "rabitq: config.centroid[3]: expected a finite value, got nan");

  const RabitqKeys codec({64, 2, 4, RotationKind::hadamard, 1, {}});  // records of 8 + 2 * 8 bytes
  std::vector<float> k(64, 0.5f), short_k(63);
  std::vector<uint8_t> record(24), short_record(23), records(72);
  std::vector<double> scores(3);
  EXPECT_ERROR(codec.encode(short_k, record), "rabitq.encode: k: expected 64 values (head_dim), got 63");
  EXPECT_ERROR(codec.encode(k, short_record), "rabitq.encode: record: expected 24 bytes (record_bytes()), got 23 bytes");
  std::vector<float> huge(64, 1e38f);
  EXPECT_ERROR(codec.encode(huge, record), "rabitq.encode: k: expected a vector whose norm fits in f32, got norm 8e+38");
  EXPECT_ERROR(codec.decode(short_record, k), "rabitq.decode: record: expected 24 bytes (record_bytes()), got 23 bytes");
  EXPECT_ERROR(codec.decode(record, short_k), "rabitq.decode: x: expected 64 values (head_dim), got 63");
  EXPECT_ERROR(codec.estimate(short_k, record), "rabitq.estimate: q: expected 64 values (head_dim), got 63");
  EXPECT_ERROR(codec.estimate(k, short_record), "rabitq.estimate: record: expected 24 bytes (record_bytes()), got 23 bytes");
  EXPECT_ERROR(codec.quantize_query(short_k, 0), "rabitq.quantize_query: q: expected 64 values (head_dim), got 63");
  const RabitqQuery query = codec.quantize_query(k, 0);
  EXPECT_ERROR(codec.score(query, record, scores),
               "rabitq.score: records: expected 3 records of 24 bytes = 72 bytes (one per score), got 24 bytes");
  RabitqQuery bad_query = query;
  bad_query.codes.pop_back();
  EXPECT_ERROR(codec.score(bad_query, records, scores), "rabitq.score: query.codes: expected 64 values (head_dim), got 63");
  bad_query = query;
  bad_query.codes[7] = 16;
  EXPECT_ERROR(codec.score(bad_query, records, scores), "rabitq.score: query.codes[7]: expected a code below 2^4 (query_bits), got 16");
  // Corrupt records: an all-zero record has correction 0, which no encoder writes.
  EXPECT_ERROR(codec.score(query, records, scores), "rabitq.score: records[0] correction: expected a correction <o_bar, o> in (0, 1], got 0");
  codec.encode(k, record);
  for (size_t n = 0; n < 3; ++n) std::copy(record.begin(), record.end(), records.begin() + long(n * 24));
  records[48 + 3] = 0xC0;  // records[2]'s norm 4 = 0x40800000 with its sign bit set: -4
  EXPECT_ERROR(codec.score(query, records, scores), "rabitq.score: records[2] norm: expected a finite norm >= 0, got -4");
  const uint8_t two[4] = {0x00, 0x00, 0x00, 0x40};  // the correction 2.0f = 0x40000000
  std::copy(two, two + 4, record.begin() + 4);
  EXPECT_ERROR(codec.estimate(k, record), "rabitq.estimate: record correction: expected a correction <o_bar, o> in (0, 1], got 2");
  EXPECT_ERROR(codec.decode(record, k), "rabitq.decode: record correction: expected a correction <o_bar, o> in (0, 1], got 2");
  k[5] = std::numeric_limits<float>::infinity();
  EXPECT_ERROR(codec.encode(k, record), "rabitq.encode: k[5]: expected a finite value, got inf");
  EXPECT_ERROR(codec.estimate(k, record), "rabitq.estimate: q[5]: expected a finite value, got inf");
  EXPECT_ERROR(codec.quantize_query(k, 0), "rabitq.quantize_query: q[5]: expected a finite value, got inf");

  EXPECT_ERROR(rabitq_error_bound(1.0, 1.0, 0.0, 128, 1.9), "rabitq_error_bound: correction: expected <o_bar, o> in (0, 1], got 0");
  EXPECT_ERROR(rabitq_error_bound(1.0, 1.0, 0.8, 1, 1.9), "rabitq_error_bound: dim: expected D >= 2, got 1");
  EXPECT_ERROR(rabitq_error_bound(-1.0, 1.0, 0.8, 128, 1.9), "rabitq_error_bound: key_norm: expected a finite norm >= 0, got -1");
  EXPECT_ERROR(rabitq_error_bound(1.0, -2.0, 0.8, 128, 1.9), "rabitq_error_bound: query_norm: expected a finite norm >= 0, got -2");
  EXPECT_ERROR(rabitq_error_bound(1.0, 1.0, 0.8, 128, -1.0), "rabitq_error_bound: epsilon0: expected a finite eps0 >= 0, got -1");
  EXPECT_ERROR(rabitq_bound_failure_probability(-1.0), "rabitq_bound_failure_probability: epsilon0: expected a finite eps0 >= 0, got -1");
  // The bound's formula at one point: 2 * 3 * sqrt(1 - 0.36) / 0.6 * 2 / sqrt(16) = 4.
  EXPECT_NEAR(rabitq_error_bound(2.0, 3.0, 0.6, 17, 2.0), 4.0, 1e-15);
  EXPECT_NEAR(rabitq_bound_failure_probability(2.0), 2.0 * std::exp(-2.0), 1e-16);
  EXPECT_EQ(rabitq_bound_failure_probability(0.5), 1.0);
}

}  // namespace
}  // namespace decodelab::kvquant
