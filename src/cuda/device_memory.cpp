// Device memory for Array through the plain CUDA runtime; every call is checked.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include "core/device_memory.h"
#include "cuda/scratch.h"
#include "decodelab/error.h"

namespace decodelab::detail {
namespace {

void check(cudaError_t status, const char* what, size_t bytes) {
  if (status != cudaSuccess) {
    throw Error(fmt::format("{} of {} bytes failed: {}", what, bytes, cudaGetErrorString(status)));
  }
}

cudaStream_t stream_or_default(void* stream) {
  return stream != nullptr ? static_cast<cudaStream_t>(stream) : cudaStreamPerThread;
}

}  // namespace

void* device_alloc(size_t bytes) {
  void* ptr = nullptr;
  check(cudaMalloc(&ptr, bytes), "cudaMalloc", bytes);
  return ptr;
}

void device_free(void* ptr) noexcept { cudaFree(ptr); }

void device_copy(void* dst, const void* src, size_t bytes, CopyKind kind) {
  const cudaMemcpyKind cuda_kind = kind == CopyKind::host_to_device   ? cudaMemcpyHostToDevice
                                   : kind == CopyKind::device_to_host ? cudaMemcpyDeviceToHost
                                                                      : cudaMemcpyDeviceToDevice;
  check(cudaMemcpy(dst, src, bytes, cuda_kind), "cudaMemcpy", bytes);
}

void device_zero(void* dst, size_t bytes) { check(cudaMemset(dst, 0, bytes), "cudaMemset", bytes); }

DeviceGraph::~DeviceGraph() {
  if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
}

namespace {

// Throws naming the call; the error is cleared first so that no later launch check reports it.
void check_graph(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();
  throw Error(fmt::format("DeviceGraph: {} failed: {}", what, cudaGetErrorString(status)));
}

}  // namespace

void DeviceGraph::capture(const std::function<void()>& record) {
  // Thread-local mode: other threads' CUDA calls are not part of this capture and may go on.
  check_graph(cudaStreamBeginCapture(cudaStreamPerThread, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  cudaGraph_t graph = nullptr;
  try {
    record();
  } catch (...) {
    cudaStreamEndCapture(cudaStreamPerThread, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // the failed capture's error; the exception says what went wrong
    throw;
  }
  check_graph(cudaStreamEndCapture(cudaStreamPerThread, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check_graph(made, "cudaGraphInstantiate");
  if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  exec_ = exec;
}

void DeviceGraph::launch() const {
  check_graph(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), cudaStreamPerThread), "cudaGraphLaunch");
}

void device_copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes, size_t rows,
                    void* stream) {
  check(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows, cudaMemcpyDeviceToDevice,
                          stream_or_default(stream)),
        "cudaMemcpy2DAsync", row_bytes * rows);
}

void* device_scratch_alloc(size_t bytes, void* stream) {
  void* ptr = nullptr;
  check(cuda::scratch_alloc(&ptr, bytes, stream_or_default(stream)), "scratch allocation", bytes);
  return ptr;
}

void device_scratch_free(void* ptr, void* stream) noexcept { cuda::scratch_free(ptr, stream_or_default(stream)); }

bool cuda_compiled() { return true; }

}  // namespace decodelab::detail
