// The verification gate: every (op, backend, dtype, shape) case draws fresh seeded random inputs,
// runs the backend on NaN-poisoned outputs fenced by sentinel guards, and compares with the
// reference computed in double (f64 outputs). `decodelab verify` and the test suite run the same
// grid, so a backend that registers a kernel is verified by both without further code.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "decodelab/router.h"

namespace decodelab {

struct CaseOutcome {
  bool exact = false;      // compared bit for bit (quantization) rather than by NMSE
  double nmse = 0.0;       // sum (out - ref)^2 / sum ref^2 over every compared element
  double threshold = 0.0;  // the op's bound for this dtype
  int64_t compared = 0;    // elements compared
  int64_t mismatches = 0;  // exact cases: elements that differ from the reference
  int64_t non_finite = 0;  // NaN/Inf where the reference is finite (NaN poison left behind too)
  int64_t unwritten = 0;   // elements still holding the second run's finite poison
  int64_t stray = 0;       // elements the reference leaves alone but the backend changed
  int64_t nondeterministic = 0;  // elements that differ between two runs
  bool guards_intact = true;     // sentinels around every output untouched
  std::string error;             // an exception from the kernel or a broken case
  std::string refused;           // the kernel declined these arguments (its supports() reason)
  bool passed() const;
  bool skipped() const { return !refused.empty(); }
  std::string summary() const;   // one line: the figures and what failed
};

struct VerifyCase {
  std::string op;
  std::string backend;
  std::string dtype;
  std::string shape;
  std::string why;  // why the threshold is what it is
  Device device = Device::cpu;
  std::function<CaseOutcome(uint64_t seed)> run;
};

struct GridFilter {
  std::string op;       // empty: every op
  std::string backend;  // empty: every backend; otherwise an exact name, or "cpu"/"cuda" prefix
  bool include_experimental = true;
};

// Every case of every registered kernel that matches the filter. Cases for CUDA kernels are
// included whether or not a GPU is present; they report an error when run without one.
std::vector<VerifyCase> verification_grid(const GridFilter& filter = {});

}  // namespace decodelab
