// The machine's limits, measured in the same run as the kernels they judge: streaming-read and copy
// bandwidth over buffers far past the LLC (all threads and one), and the f32 FMA peak.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/probe.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "cpu/thread_pool.h"
#include "decodelab/bench.h"
#include "decodelab/tensor.h"

HWY_BEFORE_NAMESPACE();
namespace decodelab::bench::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Sums n floats with four independent accumulators so that the loads, not the adds, bind.
float SumFloats(const float* HWY_RESTRICT p, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = int64_t(hn::Lanes(df));
  auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    a0 = hn::Add(a0, hn::LoadU(df, p + i));
    a1 = hn::Add(a1, hn::LoadU(df, p + i + N));
    a2 = hn::Add(a2, hn::LoadU(df, p + i + 2 * N));
    a3 = hn::Add(a3, hn::LoadU(df, p + i + 3 * N));
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
  for (; i < n; ++i) sum += p[i];
  return sum;
}

// f32 FLOPs done by `iterations` rounds of 8 independent FMA chains (2 FLOPs per lane each).
int64_t FmaLoop(int64_t iterations, float* sink) {
  const hn::ScalableTag<float> df;
  const auto m = hn::Set(df, 0.999999f), c = hn::Set(df, 1e-7f);
  auto v0 = hn::Set(df, 1.0f), v1 = hn::Set(df, 1.1f), v2 = hn::Set(df, 1.2f), v3 = hn::Set(df, 1.3f);
  auto v4 = hn::Set(df, 1.4f), v5 = hn::Set(df, 1.5f), v6 = hn::Set(df, 1.6f), v7 = hn::Set(df, 1.7f);
  for (int64_t i = 0; i < iterations; ++i) {
    v0 = hn::MulAdd(v0, m, c), v1 = hn::MulAdd(v1, m, c), v2 = hn::MulAdd(v2, m, c), v3 = hn::MulAdd(v3, m, c);
    v4 = hn::MulAdd(v4, m, c), v5 = hn::MulAdd(v5, m, c), v6 = hn::MulAdd(v6, m, c), v7 = hn::MulAdd(v7, m, c);
  }
  const auto sum = hn::Add(hn::Add(hn::Add(v0, v1), hn::Add(v2, v3)), hn::Add(hn::Add(v4, v5), hn::Add(v6, v7)));
  *sink += hn::GetLane(sum);
  return iterations * 8 * 2 * int64_t(hn::Lanes(df));
}

}  // namespace decodelab::bench::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace decodelab {
namespace bench {
HWY_EXPORT(SumFloats);
HWY_EXPORT(FmaLoop);
// Dispatched from inside the namespace of the exports: HWY_DYNAMIC_DISPATCH names the function
// unqualified (with one compiled target it becomes a plain call into that target's namespace).
float sum_floats(const float* p, int64_t n) { return HWY_DYNAMIC_DISPATCH(SumFloats)(p, n); }
int64_t fma_loop(int64_t iterations, float* sink) { return HWY_DYNAMIC_DISPATCH(FmaLoop)(iterations, sink); }
}  // namespace bench

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The best of `rounds` timings of fn() (the least disturbed run).
template <class Fn>
double best_seconds(int rounds, Fn&& fn) {
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const auto t = Clock::now();
    fn();
    best = std::min(best, seconds_since(t));
  }
  return best;
}

}  // namespace

BandwidthProbe measure_cpu_limits(int64_t bytes) {
  cpu::ThreadPool& pool = cpu::ThreadPool::instance();
  BandwidthProbe probe;
  probe.bytes = bytes;
  probe.threads = pool.size();
  const int64_t n = bytes / 4;
  Array src(DType::f32, {n}), dst(DType::f32, {n});
  // Touch every page first, by the threads that will read them.
  cpu::parallel_ranges(n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) src.ptr<float>()[i] = float(i & 1023);
    std::memset(dst.ptr<float>() + b, 0, size_t(e - b) * 4);
  });
  std::vector<float> sums(size_t(n / (1 << 16) + 1), 0.0f);
  const double read_all = best_seconds(5, [&] {
    cpu::parallel_ranges(n, 1 << 16, [&](int64_t b, int64_t e) {
      sums[size_t(b >> 16)] += bench::sum_floats(src.ptr<float>() + b, e - b);
    });
  });
  const int64_t n_one = std::min<int64_t>(n, int64_t{256} << 18);  // 256 MiB for one thread
  const double read_one = best_seconds(3, [&] { sums[0] += bench::sum_floats(src.ptr<float>(), n_one); });
  const double copy_all = best_seconds(5, [&] {
    cpu::parallel_ranges(n, 1 << 16, [&](int64_t b, int64_t e) {
      std::memcpy(dst.ptr<float>() + b, src.ptr<float>() + b, size_t(e - b) * 4);
    });
  });
  const double copy_one = best_seconds(3, [&] { std::memcpy(dst.ptr<float>(), src.ptr<float>(), size_t(n_one) * 4); });
  probe.read_gbps = double(bytes) / read_all * 1e-9;
  probe.read_gbps_one = double(n_one * 4) / read_one * 1e-9;
  probe.copy_gbps = 2.0 * double(bytes) / copy_all * 1e-9;
  probe.copy_gbps_one = 2.0 * double(n_one * 4) / copy_one * 1e-9;

  std::vector<float> sinks(size_t(probe.threads), 0.0f);
  std::vector<int64_t> flops(size_t(probe.threads), 0);
  const int64_t iterations = int64_t{1} << 24;
  const double fma = best_seconds(3, [&] {
    pool.parallel_for(probe.threads, [&](int64_t t) {
      flops[size_t(t)] = bench::fma_loop(iterations, &sinks[size_t(t)]);
    });
  });
  int64_t total = 0;
  for (int64_t f : flops) total += f;
  probe.fma_gflops = double(total) / fma * 1e-9;
  return probe;
}

}  // namespace decodelab
#endif  // HWY_ONCE
