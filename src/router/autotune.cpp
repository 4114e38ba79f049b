#include "router/autotune.h"

#include <fmt/format.h>

#include <bit>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "decodelab/error.h"

namespace decodelab {
namespace {

constexpr int kAutotuneSchema = 1;

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

int64_t bucket(int64_t n) { return n <= 1 ? 1 : int64_t(std::bit_ceil(uint64_t(n))); }

std::string weight_class(const Weight& w) { return w.is_quantized ? quant_spec_name(w.quantized.spec) : std::string(dtype_name(w.dense.dtype)); }

// The tensor whose size and dtype stand for a call of an op without a finer class.
template <class Args>
const Tensor& primary(const Args& a) {
  if constexpr (std::is_same_v<Args, QuantizeArgs>) {
    return a.w;
  } else if constexpr (std::is_same_v<Args, MatvecArgs>) {
    return a.y;
  } else if constexpr (std::is_same_v<Args, MatvecMultiArgs>) {
    return a.y[0];
  } else if constexpr (requires { a.k_new; }) {
    return a.k_new;
  } else if constexpr (requires { a.qkv; }) {
    return a.qkv;
  } else {
    return a.out;
  }
}

// The longest sequence of a decode call (the capacity where lengths live on the GPU).
int64_t longest(const Tensor& lengths, int64_t capacity) {
  if (lengths.device != Device::cpu) return capacity;
  int64_t longest = 0;
  for (int64_t b = 0; b < lengths.numel(); ++b) longest = std::max<int64_t>(longest, lengths.ptr<const int32_t>()[b]);
  return longest;
}

}  // namespace


AutotuneCache::AutotuneCache(ChipInfo chip, std::string directory) : chip_(std::move(chip)), directory_(std::move(directory)) {}

std::string AutotuneCache::path() const {
  return fmt::format("{}/autotune-{}-{:016x}.json", directory_, device_name(chip_.device), fnv1a(chip_.fingerprint()));
}

bool AutotuneCache::load() {
  entries_.clear();
  warning_.clear();
  std::ifstream in(path());
  if (!in) return true;
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    if (j.at("schema").get<int>() != kAutotuneSchema || j.at("chip").get<std::string>() != chip_.fingerprint() ||
        j.at("build_id").get<std::string>() != build_id()) {
      warning_ = fmt::format("{}: written for another schema, chip or build; ignored (run `decodelab tune`)", path());
      return false;
    }
    for (const auto& e : j.at("entries")) {
      entries_.push_back({e.at("op").get<std::string>(), e.at("dtype").get<std::string>(),
                          e.at("shape_class").get<std::string>(), e.at("backend").get<std::string>(),
                          e.at("median_us").get<double>()});
    }
  } catch (const nlohmann::json::exception& e) {
    entries_.clear();
    warning_ = fmt::format("{}: corrupt autotune cache ({}); ignored", path(), e.what());
    return false;
  }
  return true;
}

void AutotuneCache::save() const {
  std::filesystem::create_directories(directory_);
  nlohmann::json entries = nlohmann::json::array();
  for (const AutotuneEntry& e : entries_) {
    entries.push_back({{"op", e.op}, {"dtype", e.dtype}, {"shape_class", e.shape_class}, {"backend", e.backend},
                       {"median_us", e.median_us}});
  }
  const std::string tmp = path() + ".tmp";
  {
    std::ofstream out(tmp);
    out << nlohmann::json{{"schema", kAutotuneSchema}, {"build_id", build_id()}, {"chip", chip_.fingerprint()},
                          {"entries", entries}}
               .dump(1)
        << '\n';
    if (!out) throw Error(fmt::format("autotune cache: cannot write {}", tmp));
  }
  std::filesystem::rename(tmp, path());
}

void AutotuneCache::put(const AutotuneEntry& entry) {
  for (AutotuneEntry& e : entries_) {
    if (e.op == entry.op && e.dtype == entry.dtype && e.shape_class == entry.shape_class) {
      e = entry;
      return;
    }
  }
  entries_.push_back(entry);
}

const AutotuneEntry* AutotuneCache::find(std::string_view op, std::string_view dtype, std::string_view shape_class) const {
  for (const AutotuneEntry& e : entries_) {
    if (e.op == op && e.dtype == dtype && e.shape_class == shape_class) return &e;
  }
  return nullptr;
}

template <class Args>
DType args_dtype(const Args& a) {
  return primary(a).dtype;
}

template <class Args>
std::string shape_class(const Args& a) {
  if constexpr (std::is_same_v<Args, MatvecArgs>) {
    return fmt::format("{} B={} N={} K={}", weight_class(a.w), a.x.dim(0), bucket(a.w.rows()), bucket(a.w.cols()));
  } else if constexpr (std::is_same_v<Args, MatvecMultiArgs>) {
    int64_t rows = 0;
    for (int i = 0; i < a.count; ++i) rows += a.w[size_t(i)].rows();
    return fmt::format("{} B={} N={} K={}", weight_class(a.w[0]), a.x.dim(0), bucket(rows), bucket(a.x.dim(1)));
  } else if constexpr (std::is_same_v<Args, DecodeAttentionArgs>) {
    return fmt::format("B={} Sq={} L={} G={} D={}", bucket(a.q.dim(0)), a.q.dim(1),
                       bucket(longest(a.cache.lengths, a.cache.k.dim(2))), a.q.dim(2) / a.cache.k.dim(1), a.q.dim(3));
  } else if constexpr (std::is_same_v<Args, DecodeAttentionPagedArgs>) {
    const int64_t capacity = a.cache.page_table.dim(1) * a.cache.k_pages.dim(1);
    return fmt::format("B={} Sq={} L={} G={} D={} page={}", bucket(a.q.dim(0)), a.q.dim(1),
                       bucket(longest(a.cache.lengths, capacity)), a.q.dim(2) / a.cache.k_pages.dim(2), a.q.dim(3),
                       a.cache.k_pages.dim(1));
  } else if constexpr (std::is_same_v<Args, PrefillAttentionArgs>) {
    return fmt::format("B={} Sq={} Skv={} G={} D={}", bucket(a.q.dim(0)), bucket(a.q.dim(1)), bucket(a.k.dim(1)),
                       a.q.dim(2) / a.k.dim(2), a.q.dim(3));
  } else {
    return fmt::format("elements={}", bucket(primary(a).numel()));
  }
}

#define DECODELAB_OP(ARGS)                                   \
  template std::string shape_class<ARGS>(const ARGS& args); \
  template DType args_dtype<ARGS>(const ARGS& args);
#include "router/ops.inc"
#undef DECODELAB_OP

std::optional<std::string> autotuned_backend(std::string_view op, DType dtype, const std::string& shape_class) {
  // Loaded once: the choices and the trust records they depend on.
  struct Loaded {
    AutotuneCache cache{cpu_chip()};
    TrustStore trust{cpu_chip()};
    Loaded() {
      if (!cache.load()) fmt::print(stderr, "decodelab: {}\n", cache.warning());
      if (!trust.load()) fmt::print(stderr, "decodelab: {}\n", trust.warning());
    }
  };
  static const Loaded loaded;
  const AutotuneEntry* e = loaded.cache.find(op, dtype_name(dtype), shape_class);
  if (e == nullptr) return std::nullopt;
  const TrustRecord* r = loaded.trust.find(op, e->backend, dtype_name(dtype));
  if (r == nullptr || !r->trusted()) return std::nullopt;
  return e->backend;
}

}  // namespace decodelab
