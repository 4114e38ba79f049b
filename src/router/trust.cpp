// The per-chip trust store: which (op, backend, dtype) verified on this chip with this build.
#include <fmt/format.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "decodelab/error.h"
#include "decodelab/router.h"

namespace decodelab {
namespace {

constexpr int kTrustSchema = 1;

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

TrustStore::TrustStore(ChipInfo chip, std::string directory) : chip_(std::move(chip)), directory_(std::move(directory)) {}

std::string TrustStore::default_directory() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    return std::string(xdg) + "/decodelab";
  }
  const char* home = std::getenv("HOME");
  return std::string(home != nullptr ? home : ".") + "/.cache/decodelab";
}

std::string TrustStore::path() const {
  return fmt::format("{}/trust-{}-{:016x}.json", directory_, device_name(chip_.device), fnv1a(chip_.fingerprint()));
}

bool TrustStore::load() {
  records_.clear();
  warning_.clear();
  std::ifstream in(path());
  if (!in) return true;  // nothing verified yet
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    if (j.at("schema").get<int>() != kTrustSchema) {
      warning_ = fmt::format("{}: schema {} is not {}; ignored", path(), j.at("schema").dump(), kTrustSchema);
      return false;
    }
    if (j.at("chip").get<std::string>() != chip_.fingerprint()) {
      warning_ = fmt::format("{}: written for another chip ({}); ignored", path(), j.at("chip").get<std::string>());
      return false;
    }
    if (j.at("build_id").get<std::string>() != build_id()) {
      warning_ = fmt::format("{}: written by build {}, this is {}; ignored (run `decodelab verify`)", path(),
                             j.at("build_id").get<std::string>(), build_id());
      return false;
    }
    for (const auto& r : j.at("records")) {
      records_.push_back({r.at("op").get<std::string>(), r.at("backend").get<std::string>(),
                          r.at("dtype").get<std::string>(), r.at("cases").get<int>(), r.at("passed").get<int>(),
                          r.at("worst_nmse").get<double>()});
    }
  } catch (const nlohmann::json::exception& e) {
    records_.clear();
    warning_ = fmt::format("{}: corrupt trust file ({}); ignored", path(), e.what());
    return false;
  }
  return true;
}

void TrustStore::save() const {
  std::filesystem::create_directories(directory_);
  nlohmann::json records = nlohmann::json::array();
  for (const TrustRecord& r : records_) {
    records.push_back({{"op", r.op}, {"backend", r.backend}, {"dtype", r.dtype}, {"cases", r.cases},
                       {"passed", r.passed}, {"worst_nmse", r.worst_nmse}});
  }
  const nlohmann::json j = {{"schema", kTrustSchema}, {"build_id", build_id()}, {"chip", chip_.fingerprint()},
                            {"records", records}};
  // Write then rename, so that a reader never sees half a file.
  const std::string tmp = path() + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(1) << '\n';
    if (!out) throw Error(fmt::format("trust store: cannot write {}", tmp));
  }
  std::filesystem::rename(tmp, path());
}

void TrustStore::put(const TrustRecord& record) {
  for (TrustRecord& r : records_) {
    if (r.op == record.op && r.backend == record.backend && r.dtype == record.dtype) {
      r = record;
      return;
    }
  }
  records_.push_back(record);
}

const TrustRecord* TrustStore::find(std::string_view op, std::string_view backend, std::string_view dtype) const {
  for (const TrustRecord& r : records_) {
    if (r.op == op && r.backend == backend && r.dtype == dtype) return &r;
  }
  return nullptr;
}

}  // namespace decodelab
