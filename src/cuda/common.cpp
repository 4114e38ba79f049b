// Launch-error reporting and scratch memory for the CUDA kernels (plain C++: fmt does not build
// under nvcc).
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <array>
#include <cstdint>
#include <mutex>

#include "cuda/scratch.h"
#include "decodelab/error.h"

namespace decodelab::cuda {

void check_launch(cudaError_t status, const char* op) {
  if (status != cudaSuccess) throw Error(fmt::format("{}: CUDA launch failed: {}", op, cudaGetErrorString(status)));
}

namespace {

// One pool per device, created on first use and kept for the life of the process. Its release
// threshold is unlimited: freed blocks stay in the pool for the next call instead of going back to
// the driver at every synchronization (what the device's default pool does, at tens of
// microseconds per call), and the caller's own default pool is left as it was.
cudaError_t scratch_pool(cudaMemPool_t* pool) {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static std::array<cudaMemPool_t, kMaxDevices> pools{};
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (device >= kMaxDevices) return cudaErrorInvalidDevice;
  const std::lock_guard<std::mutex> lock(mutex);
  if (pools[size_t(device)] == nullptr) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t created = nullptr;
    if (const cudaError_t e = cudaMemPoolCreate(&created, &props); e != cudaSuccess) return e;
    uint64_t keep = UINT64_MAX;
    if (const cudaError_t e = cudaMemPoolSetAttribute(created, cudaMemPoolAttrReleaseThreshold, &keep); e != cudaSuccess) {
      cudaMemPoolDestroy(created);
      return e;
    }
    pools[size_t(device)] = created;
  }
  *pool = pools[size_t(device)];
  return cudaSuccess;
}

}  // namespace

cudaError_t scratch_alloc(void** ptr, size_t bytes, cudaStream_t stream) {
  cudaMemPool_t pool = nullptr;
  if (const cudaError_t e = scratch_pool(&pool); e != cudaSuccess) return e;
  return cudaMallocFromPoolAsync(ptr, bytes, pool, stream);
}

cudaError_t scratch_free(void* ptr, cudaStream_t stream) { return cudaFreeAsync(ptr, stream); }

}  // namespace decodelab::cuda
