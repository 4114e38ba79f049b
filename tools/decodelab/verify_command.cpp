// `decodelab verify` and `decodelab info`.
#include <fmt/format.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "decodelab/router.h"
#include "decodelab/verify.h"

namespace decodelab::cli {
namespace {

struct Row {
  int cases = 0, passed = 0;
  double worst_nmse = 0.0, threshold = 0.0;
  bool exact = false;
};

bool device_selected(const VerifyOptions& o, Device d) {
  return o.device == "all" || o.device == device_name(d);
}

}  // namespace

int run_verify(const VerifyOptions& options) {
  GridFilter filter{options.op, options.backend, true};
  std::vector<VerifyCase> grid = verification_grid(filter);
  std::erase_if(grid, [&](const VerifyCase& c) { return !device_selected(options, c.device); });
  if (grid.empty()) {
    fmt::print(stderr, "verify: no case matches op '{}', backend '{}', device '{}'\n", options.op, options.backend,
               options.device);
    return 1;
  }
  const bool have_gpu = !gpu_chips().empty();
  const bool progress = isatty(fileno(stderr)) != 0;  // a progress line only on a terminal
  std::map<std::tuple<std::string, std::string, std::string, Device>, Row> rows;
  nlohmann::json cases = nlohmann::json::array();
  int failed = 0, declined = 0;
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < grid.size(); ++i) {
    const VerifyCase& c = grid[i];
    if (progress) fmt::print(stderr, "\r[{}/{}] {} {} {}            ", i + 1, grid.size(), c.op, c.backend, c.dtype);
    if (c.device == Device::cuda && !have_gpu) continue;  // reported below, never trusted
    const CaseOutcome out = c.run(options.seed + i);
    if (out.skipped()) {
      ++declined;
      continue;
    }
    Row& row = rows[{c.op, c.backend, c.dtype, c.device}];
    ++row.cases;
    row.exact = out.exact;
    row.threshold = out.threshold;
    if (out.passed()) {
      ++row.passed;
    } else {
      ++failed;
      fmt::print(stderr, "\nFAIL {} {} {} {}: {}\n", c.op, c.backend, c.dtype, c.shape, out.summary());
    }
    row.worst_nmse = std::max(row.worst_nmse, out.exact ? double(out.mismatches) : out.nmse);
    cases.push_back({{"op", c.op}, {"backend", c.backend}, {"dtype", c.dtype}, {"shape", c.shape},
                     {"passed", out.passed()}, {"summary", out.summary()}, {"nmse", out.nmse},
                     {"threshold", out.threshold}, {"why", c.why}});
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (progress) fmt::print(stderr, "\r{:80}\r", "");

  fmt::print("{:<24} {:<12} {:<5} {:>6} {:>9} {:>11}\n", "op", "backend", "dtype", "cases", "result", "worst");
  for (const auto& [key, row] : rows) {
    const auto& [op, backend, dtype, device] = key;
    const std::string worst = row.exact ? fmt::format("{} diff", int64_t(row.worst_nmse)) : fmt::format("{:.1e}", row.worst_nmse);
    fmt::print("{:<24} {:<12} {:<5} {:>6} {:>9} {:>11}\n", op, backend, dtype, row.cases,
               row.passed == row.cases ? "pass" : fmt::format("{} FAIL", row.cases - row.passed), worst);
  }
  const int skipped_gpu = int(std::count_if(grid.begin(), grid.end(), [&](const VerifyCase& c) {
    return c.device == Device::cuda && !have_gpu;
  }));
  int ran = 0;
  for (const auto& [key, row] : rows) ran += row.cases;
  fmt::print("{} passed, {} failed", ran - failed, failed);
  if (skipped_gpu > 0) fmt::print(", {} CUDA cases not run (no GPU)", skipped_gpu);
  if (declined > 0) fmt::print(", {} cases declined by their backend (shape outside what it supports)", declined);
  fmt::print(" in {:.1f} s (seed {}, build {})\n", seconds, options.seed, build_id());

  if (!options.json_path.empty()) {
    write_json("verify", options.json_path,
               nlohmann::json{{"schema", 1}, {"build_id", build_id()}, {"seed", options.seed}, {"cases", cases}}.dump(1));
  }
  if (options.write_trust) {
    // One store per chip; a record is written only for what ran on that chip.
    std::vector<ChipInfo> chips = {cpu_chip()};
    for (const ChipInfo& gpu : gpu_chips()) chips.push_back(gpu);
    for (const ChipInfo& chip : chips) {
      TrustStore store(chip);
      if (!store.load()) fmt::print(stderr, "trust: {}\n", store.warning());
      bool any = false;
      for (const auto& [key, row] : rows) {
        const auto& [op, backend, dtype, device] = key;
        if (device != chip.device) continue;
        store.put({op, backend, dtype, row.cases, row.passed, row.worst_nmse});
        any = true;
      }
      if (any) {
        store.save();
        fmt::print("trust records: {}\n", store.path());
      }
    }
  }
  return failed == 0 ? 0 : 1;
}

int run_info() {
  fmt::print("decodelab build {}\n", build_id());
  std::vector<ChipInfo> chips = {cpu_chip()};
  for (const ChipInfo& gpu : gpu_chips()) chips.push_back(gpu);
  for (const ChipInfo& chip : chips) {
    fmt::print("{}: {} [{}]\n", device_name(chip.device), chip.name, chip.detail);
  }
  if (chips.size() == 1) fmt::print("cuda: no GPU visible\n");
  std::map<std::string, TrustStore> stores;
  for (const ChipInfo& chip : chips) {
    TrustStore store(chip);
    if (!store.load()) fmt::print("trust: {}\n", store.warning());
    fmt::print("trust store ({}): {} ({} records)\n", device_name(chip.device), store.path(), store.records().size());
    stores.emplace(std::string(device_name(chip.device)), std::move(store));
  }
  fmt::print("\n{:<24} {:<12} {:<13} {}\n", "op", "backend", "status", "trusted dtypes on this chip");
  for (const BackendInfo& b : list_backends()) {
    std::string trusted;
    const auto store = stores.find(std::string(device_name(b.device)));
    for (const char* dtype : {"f32", "f16", "bf16"}) {
      const TrustRecord* r = store == stores.end() ? nullptr : store->second.find(b.op, b.backend, dtype);
      if (r != nullptr && r->trusted()) trusted += fmt::format("{}{}", trusted.empty() ? "" : " ", dtype);
    }
    fmt::print("{:<24} {:<12} {:<13} {}\n", b.op, b.backend, status_name(b.status), trusted.empty() ? "-" : trusted);
  }
  return 0;
}

}  // namespace decodelab::cli
