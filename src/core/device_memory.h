// Device memory behind Array. Implemented with the CUDA runtime when built with CUDA
// (src/cuda/device_memory.cpp), and as clear errors otherwise (src/core/no_cuda.cpp).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace decodelab::detail {

enum class CopyKind { host_to_device, device_to_host, device_to_device };

void* device_alloc(size_t bytes);
void device_free(void* ptr) noexcept;
void device_copy(void* dst, const void* src, size_t bytes, CopyKind kind);
// rows of row_bytes from src (src_pitch apart) to dst (dst_pitch apart), both on the device.
void device_copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes, size_t rows);
bool cuda_compiled();

struct GpuDescription {
  std::string name;
  int sm = 0;       // compute capability, e.g. 90
  int driver = 0;   // cudaDriverGetVersion
};
// The GPUs the CUDA runtime sees; empty without CUDA or without a GPU.
std::vector<GpuDescription> cuda_devices();

}  // namespace decodelab::detail
