// `decodelab bench`: the table a kernel engineer reads, and the JSON two commits can be compared by.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <vector>

#include "commands.h"
#include "decodelab/bench.h"
#include "decodelab/router.h"

namespace decodelab::cli {

int run_bench(const BenchCommandOptions& options) {
  BenchOptions bench;
  bench.op = options.op;
  bench.backend = options.backend;
  bench.shape = options.shape;
  bench.quick = options.quick;
  bench.device = options.device == "cuda" ? Device::cuda : Device::cpu;
  if (isatty(fileno(stderr))) {
    bench.progress = [](const std::string& line) { fmt::print(stderr, "\r{:100}\r{}", "", line); };
  }
  const BenchResult result = run_benchmarks(bench);
  if (bench.progress) fmt::print(stderr, "\r{:100}\r", "");
  const BandwidthProbe& l = result.limits;
  if (bench.device == Device::cuda) {
    const std::vector<ChipInfo> gpus = gpu_chips();
    fmt::print("machine: {}\n", gpus.empty() ? std::string("no GPU") : gpus.front().fingerprint());
    fmt::print("measured over {} MiB: read {:.0f} GB/s, device-to-device copy {:.0f} GB/s (read + write)\n\n",
               l.bytes >> 20, l.read_gbps, l.copy_gbps);
  } else {
    fmt::print("machine: {} [{}], {} threads\n", cpu_chip().name, cpu_chip().detail, l.threads);
    fmt::print("measured: read {:.1f} GB/s ({:.1f} one thread), copy {:.1f} GB/s ({:.1f} one thread), FMA {:.0f} GFLOP/s\n\n",
               l.read_gbps, l.read_gbps_one, l.copy_gbps, l.copy_gbps_one, l.fma_gflops);
  }
  const bool gpu = bench.device == Device::cuda;
  fmt::print("{:<22} {:<14} {:<5} {:<42} {:>10} {:>8} {:>8} {:>8} {:>8}{}\n", "op", "backend", "dtype", "shape", "median us",
             "GB/s", "% read", "GFLOP/s", "x ref", gpu ? "  graph us  % read" : "");
  for (const BenchRecord& r : result.records) {
    fmt::print("{:<22} {:<14} {:<5} {:<42} {:>10.1f} {:>8.1f} {:>7.1f}{} {:>8.1f} {:>8}", r.op, r.backend, r.dtype,
               r.shape, r.median_us, r.gbps, r.compute_bound ? r.pct_of_fma_peak : r.pct_of_read_bandwidth,
               r.compute_bound ? "F" : r.in_cache ? "c" : "%", r.gflops,
               r.speedup_vs_reference > 0 ? fmt::format("{:.1f}", r.speedup_vs_reference) : std::string("-"));
    if (gpu) {
      fmt::print("{}", r.graph_median_us > 0 ? fmt::format(" {:>9.1f} {:>6.1f}%", r.graph_median_us, r.graph_pct_of_read_bandwidth)
                                             : std::string("         -       -"));
    }
    fmt::print("\n");
  }
  fmt::print("(% read: of the measured streaming read; F: % of the FMA peak for compute-bound ops; c: inputs stay in\n"
             " cache across repeats, so the figure is not a DRAM one{})\n",
             gpu ? "; graph: the same launches replayed from a CUDA graph, without the host's launch cost" : "");
  for (const std::string& why : result.refused) fmt::print("not timed: {}\n", why);
  if (!options.json_path.empty()) {
    write_json("bench", options.json_path, bench_json(result));
  }
  return 0;
}

int run_tune(const BenchCommandOptions& options) {
  BenchOptions bench;
  bench.op = options.op;
  bench.backend = options.backend;
  bench.quick = options.quick;
  std::string path;
  const std::vector<TuneChoice> choices = tune_cpu(bench, &path);
  if (choices.empty()) {
    fmt::print("tune: no trusted candidate on this chip; run `decodelab verify` first\n");
    return 1;
  }
  fmt::print("{:<22} {:<5} {:<40} {:<14} {:>10} {:>12}\n", "op", "dtype", "shape class", "choice", "median us", "default us");
  for (const TuneChoice& c : choices) {
    fmt::print("{:<22} {:<5} {:<40} {:<14} {:>10.1f} {:>12}\n", c.op, c.dtype, c.shape_class, c.backend, c.median_us,
               c.default_us > 0 ? fmt::format("{:.1f}", c.default_us) : std::string("-"));
  }
  fmt::print("autotune cache: {}\n", path);
  return 0;
}

}  // namespace decodelab::cli
