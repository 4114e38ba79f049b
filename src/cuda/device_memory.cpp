// Device memory for Array through the plain CUDA runtime; every call is checked.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include "core/device_memory.h"
#include "decodelab/error.h"

namespace decodelab::detail {
namespace {

void check(cudaError_t status, const char* what, size_t bytes) {
  if (status != cudaSuccess) {
    throw Error(fmt::format("{} of {} bytes failed: {}", what, bytes, cudaGetErrorString(status)));
  }
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

bool cuda_compiled() { return true; }

}  // namespace decodelab::detail
