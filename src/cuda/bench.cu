// The GPU side of `decodelab bench --device cuda`: the bandwidth probe (a streaming read, a
// reduction over a buffer far past the 50 MiB L2, and a device-to-device copy) and CUDA-event
// timing of rotated launches.
#include <algorithm>
#include <exception>
#include <vector>

#include "cuda/bench.h"
#include "cuda/common.cuh"

namespace decodelab::cuda {
namespace {

// Each thread sums 16-byte vectors grid-stride; one atomic per block keeps the result alive.
__global__ void read_kernel(const uint4* __restrict__ data, int64_t n, unsigned* sink) {
  unsigned acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(data + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  acc = __reduce_xor_sync(0xffffffffu, acc);
  if (threadIdx.x % 32 == 0 && acc == 0x12345678u) atomicAdd(sink, 1u);  // practically never taken
}

struct Events {
  cudaEvent_t start{}, stop{};
  Events() {
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  // Milliseconds of fn() on the per-thread stream.
  template <class Fn>
  float time(Fn&& fn) {
    cudaEventRecord(start, cudaStreamPerThread);
    fn();
    cudaEventRecord(stop, cudaStreamPerThread);
    cudaEventSynchronize(stop);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    return ms;
  }
};

}  // namespace

BandwidthProbe measure_limits(int64_t bytes) {
  BandwidthProbe probe;
  probe.bytes = bytes;
  void* src = nullptr;
  void* dst = nullptr;
  unsigned* sink = nullptr;
  check_launch(cudaMalloc(&src, size_t(bytes)), "bench probe");
  check_launch(cudaMalloc(&dst, size_t(bytes)), "bench probe");
  check_launch(cudaMalloc(&sink, sizeof(unsigned)), "bench probe");
  cudaMemsetAsync(src, 1, size_t(bytes), cudaStreamPerThread);
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  Events events;
  float read_ms = 1e30f, copy_ms = 1e30f;
  for (int r = 0; r < 10; ++r) {
    read_ms = std::min(read_ms, events.time([&] {
      read_kernel<<<unsigned(sms * 8), 512, 0, cudaStreamPerThread>>>(static_cast<const uint4*>(src), bytes / 16, sink);
    }));
    copy_ms = std::min(copy_ms, events.time([&] {
      cudaMemcpyAsync(dst, src, size_t(bytes), cudaMemcpyDeviceToDevice, cudaStreamPerThread);
    }));
  }
  check_launch(cudaGetLastError(), "bench probe");
  probe.read_gbps = double(bytes) / (read_ms * 1e-3) * 1e-9;
  probe.copy_gbps = 2.0 * double(bytes) / (copy_ms * 1e-3) * 1e-9;
  cudaFree(src);
  cudaFree(dst);
  cudaFree(sink);
  return probe;
}

namespace {

// Per-launch times of batches of `per_batch` launches between two events until both minimums are
// reached; the median over batches and its spread.
template <class Batch>
LaunchTiming time_batches(Batch&& batch, int per_batch, int min_repeats, double min_seconds) {
  Events events;
  std::vector<double> us;
  double total_ms = 0.0;
  while (int(us.size()) < min_repeats || total_ms < min_seconds * 1e3) {
    const float ms = events.time(batch);
    us.push_back(double(ms) * 1e3 / per_batch);
    total_ms += ms;
    if (us.size() >= 2000) break;
  }
  std::sort(us.begin(), us.end());
  auto at = [&](double q) { return us[size_t(q * double(us.size() - 1) + 0.5)]; };
  return {at(0.5), at(0.1), at(0.9), int(us.size()) * per_batch};
}

}  // namespace

LaunchTiming time_launches(const std::function<void(int)>& launch, int copies, int min_repeats, double min_seconds) {
  for (int w = 0; w < 3; ++w) launch(w % copies);
  cudaStreamSynchronize(cudaStreamPerThread);
  // Batches of launches between two events amortize the event overhead; each batch gives one
  // per-launch time, and the median over batches is reported.
  const int per_batch = 8;
  int next = 0;
  LaunchTiming t = time_batches([&] { for (int i = 0; i < per_batch; ++i) launch(next++ % copies); }, per_batch,
                                min_repeats, min_seconds);
  check_launch(cudaGetLastError(), "bench");

  // The same batch captured once in a graph (each launch with its own rotated copy) and replayed.
  // A launch that cannot be captured (it synchronizes, say) leaves graph_median_us at 0.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool captured = cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (captured) {
    try {
      for (int i = 0; i < per_batch; ++i) launch(i % copies);
    } catch (const std::exception&) {
      captured = false;
    }
    captured = cudaStreamEndCapture(cudaStreamPerThread, &graph) == cudaSuccess && captured &&
               cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  }
  if (captured) {
    cudaGraphLaunch(exec, cudaStreamPerThread);
    cudaStreamSynchronize(cudaStreamPerThread);
    t.graph_median_us = time_batches([&] { cudaGraphLaunch(exec, cudaStreamPerThread); }, per_batch, min_repeats,
                                     min_seconds).median_us;
  }
  cudaGetLastError();  // a failed capture is reported as graph_median_us = 0, not as an error
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  if (graph != nullptr) cudaGraphDestroy(graph);
  return t;
}

}  // namespace decodelab::cuda
