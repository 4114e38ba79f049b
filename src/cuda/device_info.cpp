// The GPUs the CUDA runtime sees, for chip fingerprints.
#include <cuda_runtime.h>

#include "core/device_memory.h"

namespace decodelab::detail {

std::vector<GpuDescription> cuda_devices() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for a fingerprint
    return {};
  }
  int driver = 0;
  cudaDriverGetVersion(&driver);
  std::vector<GpuDescription> gpus;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    gpus.push_back({prop.name, prop.major * 10 + prop.minor, driver});
  }
  return gpus;
}

}  // namespace decodelab::detail
