// `decodelab kv-eval`: the codec-quality table beside the theory, and the JSON of the same records.
// The measurements are the library's (include/decodelab/kv_eval.h); this file parses and prints.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <optional>
#include <set>
#include <string>

#include "commands.h"
#include "decodelab/kv_eval.h"

namespace decodelab::cli {
namespace {

// "0.1175 [0.0625, 0.17]", "<= 1.571", or "-" where the codec has no theory.
std::string distortion_theory(const kvquant::KvEvalRecord& r) {
  std::string s = r.distortion_exact ? fmt::format("{:.4g}", *r.distortion_exact) : std::string();
  if (r.distortion_lower_bound && r.distortion_upper_bound) {
    s += fmt::format("{}[{:.4g}, {:.4g}]", s.empty() ? "" : " ", *r.distortion_lower_bound, *r.distortion_upper_bound);
  } else if (r.distortion_upper_bound) {
    s += fmt::format("{}<= {:.4g}", s.empty() ? "" : " ", *r.distortion_upper_bound);
  }
  return s.empty() ? "-" : s;
}

std::string variance_theory(const kvquant::KvEvalRecord& r) {
  if (!r.error_variance_exact) return "-";
  return fmt::format("{:.4g} <= {:.4g}", *r.error_variance_exact, *r.error_variance_bound);
}

}  // namespace

int run_kv_eval(const KvEvalCommandOptions& o) {
  kvquant::KvEvalOptions options;
  options.input = o.input;
  const bool generated = o.input == "unit" || o.input == "keys";
  options.dim = generated || o.dim_given ? o.dim : 0;
  options.count = o.count;
  options.context = o.context;
  options.seed = o.seed;
  options.codecs = o.codecs;
  options.bits = o.bits;
  if (isatty(fileno(stderr))) {
    options.progress = [](const std::string& line) { fmt::print(stderr, "\r{:100}\r{}", "", line); };
  }
  const kvquant::KvEvalResult result = kvquant::run_kv_eval(options);
  if (options.progress) fmt::print(stderr, "\r{:100}\r", "");

  fmt::print("input: {}\n", result.description);
  fmt::print("D = {}, {} keys, attention over {} tokens x {} trials, seed {}\n\n", result.dim, result.count, result.context,
             result.records.empty() ? 0 : result.records.front().attention_trials, result.seed);
  fmt::print("{:<26} {:>4} {:>9} {:>6}  {:>10} {:<27} {:>7} {:>7} {:>7} {:>11} {:>9} {:>10} {:<21} {:>9} {:>9}\n", "codec", "bits",
             "K+V B/tok", "f16/x", "distortion", "theory [bounds]", "slope", "(SE)", "theory", "mean error", "(SE)",
             "error var", "theory <= bound", "score err", "out err");
  for (const kvquant::KvEvalRecord& r : result.records) {
    fmt::print("{:<26} {:>4} {:>9} {:>6.2f}  {:>10.4g} {:<27} {:>7.4f} {:>7.4f} {:>7} {:>11.3e} {:>9.2e} {:>10.4g} {:<21} {:>9.3e} {:>9.3e}\n",
               r.codec, r.bits, fmt::format("{}+{}", r.key_bytes, r.value_bytes), double(2 * r.f16_bytes) / double(r.key_bytes + r.value_bytes),
               r.distortion, distortion_theory(r), r.slope, r.slope_standard_error,
               r.slope_theory ? fmt::format("{:.4f}", *r.slope_theory) : std::string("-"), r.mean_error, r.mean_error_standard_error,
               r.error_variance, variance_theory(r), r.score_relative_error, r.output_relative_error);
  }
  fmt::print("\n(distortion: mean ||k - k~||^2 / ||k||^2; slope: least squares of <q, k~> on <q, k>; error: <q, k~> - <q, k>;\n"
             " score / out err: relative L2 error of the logits / the attention output against exact attention in double;\n"
             " B/tok: bytes per token and KV head, key + value; f16/x: f16's {} + {} bytes over that)\n",
             result.dim * 2, result.dim * 2);
  std::set<std::string> explained;
  for (const kvquant::KvEvalRecord& r : result.records) {
    if (!explained.insert(r.codec).second) continue;
    fmt::print("{}: {}; theory: {}\n", r.codec, r.config, r.theory);
  }
  if (!o.json_path.empty()) {
    write_json("kv-eval", o.json_path, kvquant::kv_eval_json(result));
  }
  return 0;
}

}  // namespace decodelab::cli
