// The opt-in autotune cache: per device chip, the fastest verified backend per (op, dtype, shape
// class), written by `decodelab tune` and read by backend "auto". Like the trust store, a file
// that is corrupt or written for another chip or build is reported and ignored.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "decodelab/router.h"
#include "ops/args.h"

namespace decodelab {

struct AutotuneEntry {
  std::string op, dtype, shape_class, backend;
  double median_us = 0.0;
};

class AutotuneCache {
 public:
  explicit AutotuneCache(ChipInfo chip, std::string directory = TrustStore::default_directory());
  std::string path() const;
  bool load();  // false (and warning()) when the file is unusable
  void save() const;
  const std::string& warning() const { return warning_; }
  void put(const AutotuneEntry& entry);
  const AutotuneEntry* find(std::string_view op, std::string_view dtype, std::string_view shape_class) const;
  const std::vector<AutotuneEntry>& entries() const { return entries_; }

 private:
  ChipInfo chip_;
  std::string directory_;
  std::vector<AutotuneEntry> entries_;
  std::string warning_;
};

// The bucket of shapes an autotune choice holds for: sizes rounded up to powers of two (batch
// exactly up to 16), plus what changes the best kernel (weight format, head_dim, GQA group).
template <class Args>
std::string shape_class(const Args& args);

// The dtype that keys trust and autotune records of a call (the activations').
template <class Args>
DType args_dtype(const Args& args);

// For "auto": the autotuned backend for this call on the CPU, when the cache has one whose
// backend holds a current trust record on this chip. Loaded once per process.
std::optional<std::string> autotuned_backend(std::string_view op, DType dtype, const std::string& shape_class);

}  // namespace decodelab
