// GPU measurement for the benchmark runner (src/bench/run.cpp): plain C++ declarations.
#pragma once

#include <cstdint>
#include <functional>

#include "decodelab/bench.h"

namespace decodelab::cuda {

// Streaming read (a reduction kernel) and device-to-device copy over `bytes`; fma_gflops stays 0.
BandwidthProbe measure_limits(int64_t bytes);

struct LaunchTiming {
  double median_us = 0, p10_us = 0, p90_us = 0;
  int launches = 0;
  // Median per launch when a batch of launches is captured once in a CUDA graph and replayed: the
  // GPU time without the host's launch cost. 0 when the launches could not be captured.
  double graph_median_us = 0;
};

// Times launch(copy) on the per-thread stream with CUDA events, cycling through `copies` rotated
// inputs; warm-up first, then until both minimums are reached; then the same from a CUDA graph.
LaunchTiming time_launches(const std::function<void(int)>& launch, int copies, int min_repeats, double min_seconds);

}  // namespace decodelab::cuda
