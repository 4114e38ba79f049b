// The kv-eval evaluator (include/decodelab/kv_eval.h): TurboQuant's measured distortion against the
// exact Lloyd-Max value and the paper's bounds, its slope against 1 - D * distortion, QJL's slope,
// mean error and variance against its theory, bytes per token by hand, the filters, determinism,
// a .npy input, and the JSON schema. Fixed seeds; tolerances from the standard errors.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numbers>
#include <stdexcept>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "decodelab/kv_eval.h"
#include "error_of.h"

namespace decodelab::kvquant {
namespace {

KvEvalOptions options_for(std::vector<std::string> codecs, int64_t count = 10000) {
  KvEvalOptions o;
  o.count = count;
  o.codecs = std::move(codecs);
  return o;
}

TEST(KvEval, TurboQuantDistortionMatchesLloydMaxOnUnitVectors) {
  // 10^4 unit vectors at D = 128 (9984, whole KIVI blocks). The per-vector squared error has a
  // relative spread of at most 0.24 (kvquant tests), so the mean's standard error is below 0.25%:
  // +-3% is 12 or more of them. Measured (seed 1): -0.14%, -0.34%, -0.32%, -0.43% at 1..4 bits.
  const KvEvalResult result = run_kv_eval(options_for({"turboquant.plain", "turboquant.norm_corrected", "turboquant.unbiased"}));
  ASSERT_EQ(result.records.size(), 12u);
  for (const KvEvalRecord& r : result.records) {
    SCOPED_TRACE(fmt::format("{} {} bits", r.codec, r.bits));
    std::cout << fmt::format("[ kv-eval  ] {} b={}: distortion {:.6f} (exact {}), slope {:.4f} +- {:.4f} (theory {})\n", r.codec, r.bits,
                             r.distortion, r.distortion_exact ? fmt::format("{:.6f}", *r.distortion_exact) : "-", r.slope,
                             r.slope_standard_error, r.slope_theory ? fmt::format("{:.4f}", *r.slope_theory) : "-");
    ASSERT_TRUE(r.distortion_lower_bound && r.distortion_upper_bound);
    EXPECT_DOUBLE_EQ(*r.distortion_lower_bound, std::pow(4.0, -r.bits));
    EXPECT_DOUBLE_EQ(*r.distortion_upper_bound, std::sqrt(3.0) * std::numbers::pi / 2.0 * std::pow(4.0, -r.bits));
    EXPECT_GT(r.distortion, *r.distortion_lower_bound);
    EXPECT_LT(r.distortion, *r.distortion_upper_bound);
    if (r.codec == "turboquant.norm_corrected") {
      EXPECT_FALSE(r.distortion_exact.has_value());
      continue;
    }
    if (r.codec == "turboquant.unbiased") {
      // Slope 1 whatever the bits, where plain's is 0.64 at 1 bit: 0.02 is 4 standard errors there.
      EXPECT_FALSE(r.distortion_exact.has_value());
      ASSERT_TRUE(r.slope_theory);
      EXPECT_DOUBLE_EQ(*r.slope_theory, 1.0);
      EXPECT_NEAR(r.slope, 1.0, 0.02);
      continue;
    }
    ASSERT_TRUE(r.distortion_exact && r.slope_theory);
    EXPECT_NEAR(r.distortion / *r.distortion_exact, 1.0, 0.03);
    // The MSE quantizer shrinks toward zero: slope 1 - D * distortion, 0.64 at 1 bit. Measured
    // within 1.5 standard errors (0.005 at 1 bit); 0.02 is 4 of them.
    EXPECT_NEAR(r.slope, *r.slope_theory, 0.02);
    EXPECT_DOUBLE_EQ(*r.slope_theory, 1.0 - *r.distortion_exact);
  }
}

TEST(KvEval, SplitWidthsAndTheInnerProductVariant) {
  // turboquant.split at 2.5 and 3.5 bits: distortion within 3% of the mean of the two widths'
  // exact values (relative SE below 0.25%), strictly between them; turboquant.prod at 2..4 bits:
  // slope 1 within 4 of its standard errors (on unit vectors <q, k> spreads only +-0.09, so the SE
  // is about 0.0075 at b = 2, and one sketch moves the slope by up to 0.55%, kv_eval.h; the +-0.02
  // test over 1000 codecs is KvTurboQuantProd.Unbiased), mean error within 3 SE of 0, and a score
  // error several times the plain MSE row's at the same bits (kvquant.h), printed.
  const KvEvalResult result = run_kv_eval(options_for({"turboquant.split", "turboquant.prod", "turboquant.plain"}));
  ASSERT_EQ(result.records.size(), 4u + 2u + 3u);
  auto plain_at = [&](double bits) -> const KvEvalRecord& {
    for (const KvEvalRecord& r : result.records) {
      if (r.codec == "turboquant.plain" && r.bits == bits) return r;
    }
    throw std::runtime_error("no plain row");
  };
  for (const KvEvalRecord& r : result.records) {
    SCOPED_TRACE(fmt::format("{} {} bits", r.codec, r.bits));
    if (r.codec == "turboquant.split") {
      const KvEvalRecord& below = plain_at(std::floor(r.bits));
      const KvEvalRecord& above = plain_at(std::ceil(r.bits));
      std::cout << fmt::format("[ kv-eval  ] {} b={}: distortion {:.6f} (exact {:.6f}), between {:.6f} and {:.6f}, {} bytes\n",
                               r.codec, r.bits, r.distortion, r.distortion_exact.value_or(0), above.distortion, below.distortion,
                               r.key_bytes);
      ASSERT_TRUE(r.distortion_exact && r.distortion_lower_bound && r.distortion_upper_bound);
      EXPECT_DOUBLE_EQ(*r.distortion_exact, 0.5 * (*below.distortion_exact + *above.distortion_exact));
      EXPECT_NEAR(r.distortion / *r.distortion_exact, 1.0, 0.03);
      EXPECT_LT(r.distortion, below.distortion);
      EXPECT_GT(r.distortion, above.distortion);
      EXPECT_GT(r.distortion, *r.distortion_lower_bound);
      EXPECT_LT(r.distortion, *r.distortion_upper_bound);
      EXPECT_EQ(r.key_bytes, 4 + int64_t(16 * r.bits));
    } else if (r.codec == "turboquant.prod") {
      const KvEvalRecord& mse = plain_at(r.bits);
      std::cout << fmt::format("[ kv-eval  ] {} b={}: slope {:.4f} +- {:.4f}, score error variance {:.3e} vs plain {:.3e} ({:.2f}x), "
                               "logit error {:.4f} vs {:.4f}, distortion {:.4f} (exact {:.4f})\n",
                               r.codec, r.bits, r.slope, r.slope_standard_error, r.error_variance, mse.error_variance,
                               r.error_variance / mse.error_variance, r.score_relative_error, mse.score_relative_error,
                               r.distortion, r.distortion_exact.value_or(0));
      EXPECT_LT(std::fabs(r.slope - 1.0), 4.0 * r.slope_standard_error);
      EXPECT_LT(std::fabs(r.mean_error), 3.0 * r.mean_error_standard_error);
      EXPECT_GT(r.error_variance, mse.error_variance);
      // In expectation over sketches; one sketch moves it a few percent, as for the qjl rows: 10%.
      ASSERT_TRUE(r.distortion_exact);
      EXPECT_NEAR(r.distortion / *r.distortion_exact, 1.0, 0.10);
      EXPECT_EQ(r.key_bytes, 8 + int64_t(16 * r.bits));  // two f32 norms, (b - 1) * 128 index bits, 128 sign bits
    }
  }
}

TEST(KvEval, QjlIsUnbiasedWithItsVariance) {
  // On unit vectors the slope's standard error is sqrt((pi/2) (D/m) / n): at n = 10^4 it is 0.0125
  // for m = D, so +-0.02 would be 1.6 standard errors. The counts below make it 0.005 at every m,
  // so +-0.02 is 4 of them. One fixed sketch also moves the slope, by the relative deviation of its
  // mean row norm from E||g|| (the estimator's sqrt(pi/2) assumes the expectation), whose
  // standard deviation is 1/sqrt(2 m D), 0.55% at m = D: seed 1's sketch (seed 2) has rows 1.15%
  // short, and its slope at m = D measures 0.983. The mean error is within 3 standard errors of 0,
  // as the issue asks.
  // The variance and distortion are exact in expectation over sketches; one sketch's figure
  // moves a few percent with the seed (measured 1.533-1.589 over seeds 1-5 for a distortion of
  // 1.563 at m = D), so they are held to 10% of the exact value: a missing sqrt(pi/2) would be 20%+.
  for (const auto& [bits, count] : {std::pair{1, 64000}, std::pair{2, 32000}, std::pair{4, 16000}}) {
    KvEvalOptions o = options_for({"qjl"}, count);
    o.bits = {double(bits)};
    const KvEvalResult result = run_kv_eval(o);
    ASSERT_EQ(result.records.size(), 1u);
    const KvEvalRecord& r = result.records[0];
    SCOPED_TRACE(fmt::format("qjl m = {} D", bits));
    std::cout << fmt::format("[ kv-eval  ] qjl m={}D n={}: slope {:.4f} +- {:.4f}, mean error {:.2e} +- {:.2e}, variance {:.5f} "
                             "(exact {:.5f}, bound {:.5f}), distortion {:.4f} (exact {:.4f})\n",
                             bits, r.vectors, r.slope, r.slope_standard_error, r.mean_error, r.mean_error_standard_error, r.error_variance,
                             r.error_variance_exact.value_or(0), r.error_variance_bound.value_or(0), r.distortion,
                             r.distortion_exact.value_or(0));
    EXPECT_LT(r.slope_standard_error, 0.0055);
    EXPECT_NEAR(r.slope, 1.0, 0.02);
    EXPECT_LT(std::fabs(r.mean_error), 3.0 * r.mean_error_standard_error);
    ASSERT_TRUE(r.error_variance_exact && r.error_variance_bound && r.distortion_exact);
    EXPECT_NEAR(r.error_variance / *r.error_variance_exact, 1.0, 0.10);
    EXPECT_LT(*r.error_variance_exact, *r.error_variance_bound);
    EXPECT_NEAR(r.distortion / *r.distortion_exact, 1.0, 0.10);
    EXPECT_DOUBLE_EQ(*r.distortion_exact, (std::numbers::pi * 128.0 / 2.0 - 1.0) / double(bits * 128));
  }
}

TEST(KvEval, PolarQuantDistortionAndSlopeMatchTheirPrediction) {
  // 10^4 unit vectors at D = 128: the distortion within 3% of 2 (1 - prod_l c_l) and the slope
  // within 3 standard errors (+ 0.2% for the Hadamard rotation) of prod_l c_l (kvquant.h).
  const KvEvalResult result = run_kv_eval(options_for({"polarquant"}));
  ASSERT_EQ(result.records.size(), 3u);
  for (const KvEvalRecord& r : result.records) {
    SCOPED_TRACE(fmt::format("{} {} bits", r.codec, r.bits));
    std::cout << fmt::format("[ kv-eval  ] polarquant b={}: distortion {:.6f} (exact {:.6f}), slope {:.4f} +- {:.4f} (theory {:.4f}), "
                             "{} bytes\n", r.bits, r.distortion, *r.distortion_exact, r.slope, r.slope_standard_error, *r.slope_theory,
                             r.key_bytes);
    ASSERT_TRUE(r.distortion_exact && r.slope_theory);
    EXPECT_NEAR(r.distortion / *r.distortion_exact, 1.0, 0.03);
    EXPECT_LT(std::fabs(r.slope - *r.slope_theory), 3.0 * r.slope_standard_error + 0.002);
  }
  EXPECT_GT(result.records[0].distortion, result.records[1].distortion);
  EXPECT_GT(result.records[1].distortion, result.records[2].distortion);
}

TEST(KvEval, BytesPerTokenByHand) {
  KvEvalOptions o = options_for({}, 1024);
  o.context = 512;
  const KvEvalResult result = run_kv_eval(o);
  ASSERT_EQ(result.records.size(), 34u);
  for (const KvEvalRecord& r : result.records) {
    SCOPED_TRACE(fmt::format("{} {} bits", r.codec, r.bits));
    EXPECT_EQ(r.f16_bytes, 256);
    EXPECT_EQ(r.vectors, 1024);
    EXPECT_EQ(r.attention_trials, 2);
    if (r.codec == "f16") {
      EXPECT_EQ(r.key_bytes, 256);
      EXPECT_EQ(r.value_bytes, 256);
      EXPECT_LT(r.distortion, 1e-7);  // f16 rounding: at most 2^-22 relative per element squared
    } else if (r.codec == "turboquant.prod") {
      EXPECT_EQ(r.key_bytes, 8 + 16 * r.bits);    // f32 norm, (b - 1)-bit indices, f32 residual norm, 128 signs
      EXPECT_EQ(r.value_bytes, 4 + 16 * r.bits);  // TurboQuant (MSE) values at b bits
    } else if (r.codec.starts_with("turboquant")) {
      EXPECT_EQ(r.key_bytes, 4 + 16 * r.bits);  // f32 norm + 128 indices of b bits (2.5: 64 of 3, 64 of 2)
      EXPECT_EQ(r.value_bytes, r.key_bytes);
    } else if (r.codec == "qjl") {
      EXPECT_EQ(r.key_bytes, 4 + 16 * r.bits);  // f32 norm + m = b * 128 sign bits
      EXPECT_EQ(r.value_bytes, 256);            // f16 values
    } else if (r.codec == "rabitq") {
      EXPECT_EQ(r.key_bytes, 8 + 16 * r.bits);  // f32 norm and correction + b bit planes of 128
      EXPECT_EQ(r.value_bytes, 256);            // f16 values
      // Unbiased (the estimator with the full-precision query): within 3 standard errors of 1.
      ASSERT_TRUE(r.slope_theory);
      EXPECT_DOUBLE_EQ(*r.slope_theory, 1.0);
      EXPECT_LE(std::fabs(r.slope - 1.0), 3.0 * r.slope_standard_error);
    } else if (r.codec == "polarquant") {
      // 1 f32 radius + 64 level-1 indices of b bits + 63 angles of ceil(b / 2) bits above, each
      // of the 6 levels above starting on a byte (32 + 16 + 8 + 4 + 2 + 1 angles).
      const int upper = (r.bits + 1) / 2;
      EXPECT_EQ(r.key_bytes, 4 + 8 * r.bits + (32 * upper + 7) / 8 + (16 * upper + 7) / 8 + upper + 1 + 1 + 1);
      EXPECT_EQ(r.value_bytes, r.key_bytes);
    } else if (r.codec == "commvq") {
      // One code of 4b bits per group of 4 coordinates (2 RoPE pairs), keys and values alike.
      EXPECT_EQ(r.key_bytes, 16 * r.bits);
      EXPECT_EQ(r.value_bytes, r.key_bytes);
      ASSERT_TRUE(r.distortion_lower_bound);
      EXPECT_GT(r.distortion, *r.distortion_lower_bound);
      EXPECT_TRUE(r.config.find("trained on 4096 more vectors from the same generator") != std::string::npos) << r.config;
    } else if (r.codec == "product_vq") {
      // One 8-bit code per subspace of 8 (1 bit) or 4 (2 bits) coordinates, keys and values alike.
      EXPECT_EQ(r.key_bytes, 16 * r.bits);
      EXPECT_EQ(r.value_bytes, r.key_bytes);
      ASSERT_TRUE(r.distortion_lower_bound);
      EXPECT_GT(r.distortion, *r.distortion_lower_bound);
      EXPECT_TRUE(r.config.find("trained on 4096 more vectors from the same generator") != std::string::npos) << r.config;
    } else {
      ASSERT_EQ(r.codec, "kivi");
      // A block of 32 keys: 128 f32 (min, scale) pairs + 32 * 128 b-bit codes; a value: 4 groups
      // of 32 channels, each an f32 (min, scale), + 128 b-bit codes.
      EXPECT_EQ(r.key_bytes, (8 * 128 + 32 * 16 * r.bits) / 32);
      EXPECT_EQ(r.value_bytes, 8 * 4 + 16 * r.bits);
      EXPECT_FALSE(r.distortion_exact || r.distortion_upper_bound || r.slope_theory || r.error_variance_exact);
      EXPECT_TRUE(r.theory.starts_with("none")) << r.theory;
    }
    // Every codec, f16 too, moves the logits and the output: a zero would mean that the
    // approximate attention read the exact keys and values.
    EXPECT_GT(r.score_relative_error, 0.0);
    EXPECT_GT(r.output_relative_error, 0.0);
  }
}

TEST(KvEval, FiltersAndRefusals) {
  KvEvalOptions o = options_for({"turboquant.plain", "kivi"}, 1024);
  o.bits = {2};
  const KvEvalResult result = run_kv_eval(o);
  ASSERT_EQ(result.records.size(), 2u);
  EXPECT_EQ(result.records[0].codec, "turboquant.plain");
  EXPECT_EQ(result.records[1].codec, "kivi");
  EXPECT_ERROR(run_kv_eval(options_for({"turbo"})),
               "kv-eval: --codec: expected one of f16, turboquant.plain, turboquant.norm_corrected, turboquant.unbiased, "
               "turboquant.split, turboquant.prod, rabitq, qjl, polarquant, kivi, product_vq, commvq or a prefix before a '.' (turboquant), got turbo");
  o.bits = {3};
  o.codecs = {"kivi"};
  EXPECT_ERROR(run_kv_eval(o), "kv-eval: --bits: expected a width of a selected codec (kivi: 2,4), got 3");
  o = options_for({"f16"}, 1000);  // 992 keys: whole blocks of 32
  EXPECT_ERROR(run_kv_eval(o), "kv-eval: --context: expected 1 to 992 tokens (the keys used), got 1024");
  o.dim = 100;
  EXPECT_ERROR(run_kv_eval(o), "kv-eval: --dim: expected a multiple of 16 in [16, 256], got 100");
  o = options_for({"f16"}, 20);
  EXPECT_ERROR(run_kv_eval(o), "kv-eval: --count: expected at least 32 keys (one KIVI key block), got 20");
  o.input = "no-such-file.npy";
  EXPECT_ERROR(run_kv_eval(o), "read_npy: no-such-file.npy: expected a readable file, got it cannot be opened");
}

TEST(KvEval, SameSeedSameFiguresOtherSeedOthers) {
  KvEvalOptions o = options_for({"turboquant.plain", "qjl"}, 1024);
  o.input = "keys";
  o.bits = {1};
  o.context = 256;
  const std::string a = kv_eval_json(run_kv_eval(o));
  EXPECT_EQ(a, kv_eval_json(run_kv_eval(o)));
  o.seed = 2;
  EXPECT_NE(a, kv_eval_json(run_kv_eval(o)));
}

// A .npy file of `rows` x 64 float32 values 1 + (i % 7) (nonzero rows), written byte by byte.
std::filesystem::path write_npy(int64_t rows) {
  const std::filesystem::path path = std::filesystem::temp_directory_path() / fmt::format("decodelab_kv_eval_{}.npy", ::getpid());
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, 64), }}", rows);
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out << "\x93NUMPY" << char(1) << char(0) << char(header.size() & 0xFF) << char(header.size() >> 8) << header;
  for (int64_t i = 0; i < rows * 64; ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(float(1 + i % 7));
    for (int b = 0; b < 4; ++b) out << char(bits >> (8 * b));
  }
  return path;
}

TEST(KvEval, NpyInputTakesItsDimensionFromTheFile) {
  const std::filesystem::path path = write_npy(100);
  KvEvalOptions o = options_for({"turboquant.plain"}, 10000);
  o.input = path.string();
  o.dim = 0;
  o.bits = {4};
  o.context = 64;
  const KvEvalResult result = run_kv_eval(o);
  EXPECT_EQ(result.dim, 64);
  EXPECT_EQ(result.count, 96);  // 100 rows, whole blocks of 32
  ASSERT_EQ(result.records.size(), 1u);
  EXPECT_EQ(result.records[0].key_bytes, 4 + 32);
  o.dim = 128;
  EXPECT_ERROR(run_kv_eval(o), "kv-eval: --dim: expected 64 columns (the file's D), or no --dim, got 128");
  std::filesystem::remove(path);
}

TEST(KvEval, ProductVqTrainsOnRowsPastTheMeasuredOnes) {
  // 96 measured rows, then 300 to train on; with only 100 rows it trains in-sample and says so.
  for (const auto& [rows, calibration] : {std::pair{int64_t{396}, std::string("trained on rows 96 to 395 of the file (past the measured ones)")},
                                          std::pair{int64_t{100}, std::string("trained on the measured rows themselves (in-sample, optimistic: "
                                                                              "the file has 4 rows past them, fewer than 256)")}}) {
    const std::filesystem::path path = write_npy(rows);
    KvEvalOptions o = options_for({"product_vq"}, 96);
    o.input = path.string();
    o.dim = 0;
    o.bits = {2};
    o.context = 32;
    if (rows == 100) {
      // 96 rows are fewer than the 256 centroids a codebook needs.
      EXPECT_ERROR(run_kv_eval(o), "kv-eval: product_vq: expected at least 256 vectors to train its codebooks on (one per centroid), got 96 ("
                                   + calibration.substr(11) + "; select other codecs with --codec)");
    } else {
      const KvEvalResult result = run_kv_eval(o);
      ASSERT_EQ(result.records.size(), 1u);
      EXPECT_TRUE(result.records[0].config.find(calibration) != std::string::npos) << result.records[0].config;
      EXPECT_EQ(result.records[0].key_bytes, 16);  // 64 / 4 subspaces, a byte each
    }
    std::filesystem::remove(path);
  }
}

TEST(KvEval, JsonSchema) {
  KvEvalOptions o = options_for({"kivi"}, 256);
  o.context = 128;
  const nlohmann::json j = nlohmann::json::parse(kv_eval_json(run_kv_eval(o)));
  EXPECT_EQ(j.at("schema"), "decodelab.kv-eval/1");
  EXPECT_EQ(j.at("input").at("source"), "unit");
  EXPECT_EQ(j.at("input").at("dim"), 128);
  ASSERT_EQ(j.at("records").size(), 2u);
  const nlohmann::json& r = j.at("records")[0];
  EXPECT_EQ(r.at("codec"), "kivi");
  EXPECT_EQ(r.at("bits"), 2);
  EXPECT_TRUE(r.at("distortion").is_number());
  EXPECT_TRUE(r.at("distortion_exact").is_null());  // KIVI has no theory: null, not a made-up 0
  EXPECT_TRUE(r.at("slope").is_number());
  EXPECT_TRUE(r.at("output_relative_error").is_number());
}

}  // namespace
}  // namespace decodelab::kvquant
