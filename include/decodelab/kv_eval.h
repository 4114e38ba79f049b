// `decodelab kv-eval`: the quality of each KV-cache codec of kvquant.h at each bit width, measured
// on one set of vectors and set beside the theory where there is one (issue 5, item 9).
//
// Inputs (KvEvalOptions::input):
//   "unit"    keys and queries: independent uniformly random unit vectors (normalized N(0, I)
//             draws), the setting of the TurboQuant and QJL papers' theorems.
//   "keys"    synthetic keys shaped like a Llama's: N(0, 1) in every channel but D / 32 outlier
//             channels (4 of 128, picked by the seed) of standard deviation 10, then RoPE
//             (half-split, theta 500000) at a position drawn uniformly from [0, 8192) per key.
//             Queries N(0, I): the outlier channels are the keys' (KIVI's observation), and at
//             D = 128 these queries put the attention logits' standard deviation near 2.
//   a path    the rows of a .npy file (npy.h: float32 or float16, [rows, D]) as keys, the first
//             `count` of them; queries N(0, I). Rows must be finite and nonzero.
// Values are N(0, I) for every input. All draws come from `seed`; the codecs' rotations and
// sketches from seeds derived from it, so a seed fixes every figure.
// Calibration split, for the codecs that are trained (product VQ): never the measured vectors but
// 4096 more from the same generator (a stream of its own, so the measured ones are unchanged), or
// for a file up to 4096 of its rows past the measured ones; a file with fewer than 256 rows past
// them trains on the measured rows, and the record's config says so (in-sample, optimistic).
//
// Figures, per codec and bit width (KvEvalRecord):
// - distortion: the mean over keys of ||k - k~||^2 / ||k||^2, k~ the codec's reconstruction of k.
//   For QJL, which stores no decoder, k~ is the vector whose inner products are its estimates,
//   k~ = sqrt(pi/2) / m * ||k|| * S^T sign(S k) (so <q, k~> is QjlKeys::estimate exactly).
// - inner products: over the pairs (q_i, k_i), the least-squares slope of the estimate <q, k~>
//   against <q, k> (1 for an unbiased estimator) with its standard error, the mean error and its
//   standard error, and the error's variance.
// - attention: `context` consecutive keys and values with query i form trial i (count / context
//   trials); exact attention in double over the uncompressed keys and values (logits
//   <q, k> / sqrt(D), softmax) against attention over k~ and v~. Reported as relative L2 errors
//   pooled over trials, sqrt(sum ||s~ - s||^2 / sum ||s||^2), of the logits and of the output.
// - bytes per token and KV head, of the key and of the value, against f16's 2 * D each.
// Theory, where it exists (else null, and `theory` says why):
// - TurboQuant, plain: distortion exactly D * Codebook::distortion() in expectation over a Haar
//   rotation (the shipping Hadamard rotation matches it on random inputs: kvquant.h), inside the
//   paper's bounds [4^-b, (sqrt(3) pi / 2) 4^-b] (arXiv:2504.19874, Theorems 1 and 3); slope
//   1 - D * distortion, because Lloyd-Max centroids are conditional means, so E[x~] = (1 - D *
//   distortion) x: the MSE quantizer's estimates are biased toward zero.
// - TurboQuant, norm-corrected: the same bounds; no exact value (kvquant.h: second order off plain).
// - TurboQuant, unbiased: the same bounds; slope exactly 1 by construction (<x~, x> = ||x||^2 for
//   every vector: kvquant.h); no exact distortion.
// - RaBitQ keys with B bit planes (1: RaBitQ, 2-4: extended RaBitQ), zero centroid, estimated with
//   the full-precision query: slope 1 (unbiased: kvquant.h); values in f16.
// - TurboQuant, split (turboquant.split, 2.5 and 3.5 bits: the first D / 2 rotated coordinates at
//   3 (4) bits, the rest at 2 (3), plain scale): distortion exactly the mean of the two widths'
//   (h distortion(b + 1) + (D - h) distortion(b)), slope 1 - that; lower bound 4^-bits, upper the
//   mean of the two widths' upper bounds.
// - TurboQuant, inner product (turboquant.prod, b = 2..4 bits: b - 1 MSE + 1 QJL with m = D on the
//   residual; keys only, values are TurboQuant (MSE, plain) at b bits): slope 1, distortion
//   (pi/2 - 1/D) D distortion(b - 1) in expectation over sketches (QJL's on the residual).
// - QJL with m = bits * D sign bits: slope 1, distortion (pi D / 2 - 1) / m, bound pi D / (2 m);
//   error variance exactly the mean over pairs of ((pi/2) |q|^2 |k|^2 - <q, k>^2) / m, bound
//   (pi/2) |q|^2 |k|^2 / m (kvquant.h derives both). Values are stored in f16. All of these are
//   expectations over sketches; one sketch's figures differ by a few percent (its slope by the
//   relative deviation of its mean row norm, standard deviation 1/sqrt(2 m D): 0.55% at m = D).
// - PolarQuant (b bits at level 1, ceil(b / 2) above, every level 2^L divides D, keys and values):
//   distortion exactly 2 (1 - prod_l c_l), slope prod_l c_l, c_l = E cos(psi_l - psi~_l), in
//   expectation over a Haar rotation (kvquant.h derives both).
// - KIVI (keys per channel over blocks of 32 tokens, values per token in groups of 32 channels;
//   the full-precision window is off, so the figures are the quantizer's own): no theory.
// - Product VQ (product_vq, 1 and 2 bits: 8-bit codes over D / 8 or D / 4 subspaces, k-means
//   codebooks trained on the calibration split; keys smoothed by their channel maxima and
//   Hadamard-rotated, values rotated only; arXiv:2510.06175, product_vq.h): the lower bound 4^-b
//   only (any quantizer on random unit vectors); no closed form for trained codebooks.
// - CommVQ (commvq, 1 and 2 bits: a 4b-bit code per group of 2 RoPE pairs, k-means codebooks
//   trained on the calibration split, keys and values each their own; arXiv:2506.18879,
//   commvq.h): the lower bound 4^-b only, as for product VQ.
// - f16: the baseline, keys and values rounded to f16; no theory.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace decodelab::kvquant {

struct KvEvalOptions {
  std::string input = "unit";  // "unit", "keys", or the path of a .npy file
  int64_t dim = 128;           // D of generated inputs, a multiple of 16 in [16, 256]; a file's
                               // own D is used when this is 0, and must equal it otherwise
  int64_t count = 10000;       // keys (a file's first `count` rows; all of them if it has fewer)
  int64_t context = 1024;      // tokens per attention trial, at most count
  uint64_t seed = 1;
  // Filters, empty for all: codec names (a name selects itself and the names below it:
  // "turboquant" selects turboquant.plain, .norm_corrected and .unbiased) and bit widths.
  std::vector<std::string> codecs;
  std::vector<double> bits;  // 2.5 and 3.5 select turboquant.split's widths
  std::function<void(const std::string&)> progress;  // one line per codec and width, or null
};

struct KvEvalRecord {
  std::string codec;   // "turboquant.plain", "qjl", ...
  double bits = 0;     // bits per coordinate (2.5, 3.5: turboquant.split; QJL: sketch size m / D; f16: 16)
  std::string config;  // the codec's parameters in words ("hadamard rotation", "m = 256", ...)
  int64_t vectors = 0; // keys measured (KIVI: whole blocks of 32 only)

  int64_t key_bytes = 0;    // per token and KV head
  int64_t value_bytes = 0;
  int64_t f16_bytes = 0;    // 2 * D, of a key or of a value

  double distortion = 0.0;
  std::optional<double> distortion_exact;
  std::optional<double> distortion_lower_bound;
  std::optional<double> distortion_upper_bound;

  double slope = 0.0;
  double slope_standard_error = 0.0;
  std::optional<double> slope_theory;
  double mean_error = 0.0;
  double mean_error_standard_error = 0.0;
  double error_variance = 0.0;
  std::optional<double> error_variance_exact;
  std::optional<double> error_variance_bound;

  int64_t attention_trials = 0;
  double score_relative_error = 0.0;
  double output_relative_error = 0.0;

  std::string theory;  // where the theory comes from, or why there is none
};

struct KvEvalResult {
  std::string input;        // "unit", "keys" or the file's path
  std::string description;  // the input in words
  int64_t dim = 0;
  int64_t count = 0;        // keys used
  int64_t context = 0;
  uint64_t seed = 0;
  std::vector<KvEvalRecord> records;
};

// The names of the evaluated codecs, in table order.
std::vector<std::string> kv_eval_codec_names();

// Validates the options (errors name the option: "kv-eval: --codec: expected one of ..."), draws or
// reads the inputs, then evaluates every selected codec and width.
KvEvalResult run_kv_eval(const KvEvalOptions& options);

// The result as JSON, schema "decodelab.kv-eval/1".
std::string kv_eval_json(const KvEvalResult& result);

}  // namespace decodelab::kvquant
