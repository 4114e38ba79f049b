// Benchmarks against this machine's own limits. `decodelab bench` measures the memory bandwidth
// (and the FMA peak) in the same run, verifies every backend it is about to time, then times each
// (op, backend, dtype, shape): warm-up, many repeats, the median and spread, with inputs rotated
// through copies whose total exceeds the last-level cache.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "decodelab/tensor.h"

namespace decodelab {

struct BandwidthProbe {
  int64_t bytes = 0;          // buffer size per measurement
  int threads = 0;
  double read_gbps = 0.0;     // streaming read (a reduction), all threads
  double read_gbps_one = 0.0; // one thread
  double copy_gbps = 0.0;     // memcpy, counting read + write bytes, all threads
  double copy_gbps_one = 0.0;
  double fma_gflops = 0.0;    // f32 FMA peak, all threads, best SIMD target (CPU only)
};

// Streaming read and copy over buffers of `bytes` (default 512 MiB, far past any LLC).
BandwidthProbe measure_cpu_limits(int64_t bytes = int64_t{512} << 20);
// The probe of a device: measure_cpu_limits() on the CPU, streaming read and device-to-device copy
// over 2 GiB on the GPU.
BandwidthProbe measure_limits(Device device);

struct BenchRecord {
  std::string op, backend, dtype, shape;
  std::string shape_class;  // the autotune bucket this shape falls in
  double median_us = 0.0, p10_us = 0.0, p90_us = 0.0;
  int repeats = 0;
  int64_t bytes = 0;  // what the op must move at least
  int64_t flops = 0;
  double gbps = 0.0;
  double pct_of_read_bandwidth = 0.0;
  double gflops = 0.0;
  double pct_of_fma_peak = 0.0;
  double speedup_vs_reference = 0.0;  // 0 when the reference was not timed (too slow)
  double speedup_vs_default = 0.0;    // against the stable default backend of the op
  bool compute_bound = false;         // judged against the FMA peak rather than bandwidth
  bool in_cache = false;              // all rotated copies together fit in the LLC: not a DRAM figure
  std::string device = "cpu";
  // GPU only (0 elsewhere, or where the launches could not be captured): the median per launch of
  // a batch captured once in a CUDA graph and replayed, i.e. without the host's launch cost, and
  // its % of the read bandwidth.
  double graph_median_us = 0.0;
  double graph_pct_of_read_bandwidth = 0.0;
};

struct BenchOptions {
  Device device = Device::cpu;  // which backends run (the reference only on the CPU)
  std::string op;       // empty: all
  std::string backend;  // empty: all CPU backends; "cpu" also selects cpu.<variant>
  std::string shape;    // empty: all; else only cases whose shape contains this text
  bool quick = false;   // the smaller grid of the main job
  double min_seconds = 0.2;  // per case, after warm-up
  int min_repeats = 20;
  std::function<void(const std::string&)> progress;  // one line per case, or null
  // Tuning: time only backends holding a current trust record on this chip, never the reference.
  bool only_trusted = false;
};

struct BenchResult {
  BandwidthProbe limits;
  std::vector<BenchRecord> records;
  std::vector<std::string> refused;  // backends not timed, with the reason (failed verification)
};

// The grid on options.device: CPU backends against the CPU's limits, CUDA backends (events,
// 256 MiB of rotated inputs against the 50 MiB L2) against the GPU's.
BenchResult run_benchmarks(const BenchOptions& options);

// `decodelab tune`: times the trusted candidates of every op and shape class and writes the
// fastest to the autotune cache that backend "auto" reads. Returns the choices made.
struct TuneChoice {
  std::string op, dtype, shape_class, backend;
  double median_us = 0.0, default_us = 0.0;
};
std::vector<TuneChoice> tune_cpu(const BenchOptions& options, std::string* cache_path);

// The JSON document (schema "decodelab.bench/2") of a result, with the machine and build.
std::string bench_json(const BenchResult& result);

}  // namespace decodelab
