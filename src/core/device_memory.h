// Device memory behind Array. Implemented with the CUDA runtime when built with CUDA
// (src/cuda/device_memory.cpp), and as clear errors otherwise (src/core/no_cuda.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

namespace decodelab::detail {

enum class CopyKind { host_to_device, device_to_host, device_to_device };

void* device_alloc(size_t bytes);
void device_free(void* ptr) noexcept;
void device_copy(void* dst, const void* src, size_t bytes, CopyKind kind);
void device_zero(void* dst, size_t bytes);
// rows of row_bytes from src (src_pitch apart) to dst (dst_pitch apart), both on the device, in
// the order of `stream` (a cudaStream_t; null: the per-thread default stream), without waiting.
void device_copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes, size_t rows,
                    void* stream);
// out[i] = in[i] + add for n int32 values in device memory, in the order of `stream`.
void device_add_i32(int32_t* out, const int32_t* in, int64_t n, int32_t add, void* stream);
// Stream-ordered scratch memory for one call (src/cuda/scratch.h): no cudaMalloc or cudaFree,
// which synchronize the device.
void* device_scratch_alloc(size_t bytes, void* stream);
void device_scratch_free(void* ptr, void* stream) noexcept;
bool cuda_compiled();

// One allocation for the intermediates of a call, handed out in 256-byte aligned pieces: scratch
// memory in stream order on the GPU, ordinary aligned memory on the host. Freed (in stream order)
// when it goes out of scope.
class ScratchBuffer {
 public:
  ScratchBuffer(bool on_device, size_t bytes, void* stream);
  ~ScratchBuffer();
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  // The next `bytes`; an Error past the size given to the constructor.
  void* take(size_t bytes);
  // Bytes that take() of these sizes uses, for the constructor.
  static size_t bytes_for(std::initializer_list<size_t> sizes);

 private:
  bool on_device_;
  void* stream_;
  char* data_ = nullptr;
  size_t size_ = 0, used_ = 0;
};

// The work that `record` puts on the per-thread default stream, captured once as a CUDA graph
// (nothing runs while it is captured) and replayed by launch() on that stream without waiting:
// one launch for a whole decode step. What it records must not synchronize or read device memory
// on the host; its pointers are fixed at capture, so inputs go where the capture found them.
class DeviceGraph {
 public:
  DeviceGraph() = default;
  ~DeviceGraph();
  DeviceGraph(const DeviceGraph&) = delete;
  DeviceGraph& operator=(const DeviceGraph&) = delete;
  void capture(const std::function<void()>& record);
  void launch() const;
  bool empty() const { return exec_ == nullptr; }

 private:
  void* exec_ = nullptr;  // cudaGraphExec_t
};

struct GpuDescription {
  std::string name;
  int sm = 0;       // compute capability, e.g. 90
  int driver = 0;   // cudaDriverGetVersion
};
// The GPUs the CUDA runtime sees; empty without CUDA or without a GPU.
std::vector<GpuDescription> cuda_devices();

}  // namespace decodelab::detail
