// Tensor (a non-owning view) and Array (owning memory), the currency of every op.
//
// A Tensor is {data, dtype, device, rank <= 4, shape, strides in elements}. Ops take views and
// never allocate their outputs; callers own memory through Array (64-byte-aligned host memory, or
// CUDA device memory when the library is built with CUDA).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>

#include "decodelab/dtype.h"

namespace decodelab {

enum class Device : uint8_t { cpu, cuda };

std::string_view device_name(Device d);

// A CUDA stream (cudaStream_t) for CUDA backends; CPU backends ignore it. Null means the
// per-thread default stream, never the legacy default stream.
struct Stream {
  void* handle = nullptr;
};

constexpr int kMaxRank = 4;

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> strides{};  // in elements

  // A row-major view of `shape` over `data`.
  static Tensor contiguous(void* data, DType dtype, std::span<const int64_t> shape,
                           Device device = Device::cpu);
  static Tensor contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                           Device device = Device::cpu) {
    return contiguous(data, dtype, std::span<const int64_t>(shape.begin(), shape.size()), device);
  }

  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;
  int64_t dim(int i) const { return shape[size_t(i)]; }

  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }

  // "[2, 3, 4] f16" (plus " strides [..]" when not contiguous, " cuda" on the GPU).
  std::string describe() const;
};

// Owning storage for a Tensor. Move-only.
class Array {
 public:
  Array() = default;
  Array(DType dtype, std::span<const int64_t> shape, Device device = Device::cpu);
  Array(DType dtype, std::initializer_list<int64_t> shape, Device device = Device::cpu)
      : Array(dtype, std::span<const int64_t>(shape.begin(), shape.size()), device) {}
  ~Array();
  Array(Array&& other) noexcept;
  Array& operator=(Array&& other) noexcept;
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;

  const Tensor& view() const { return view_; }
  operator const Tensor&() const { return view_; }
  void* data() const { return view_.data; }
  template <typename T>
  T* ptr() const {
    return view_.ptr<T>();
  }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return view_.nbytes(); }

  // Copies to `device` (host <-> CUDA); a plain copy when the device is the same.
  Array to(Device device) const;

 private:
  void release();
  Tensor view_;
};

// Copies `src` into `dst`, which must have the same dtype and element count; either may be on
// the host or the GPU.
void copy_bytes(const Tensor& dst, const Tensor& src);
// Sets every byte of a contiguous tensor to zero, on the host or the GPU.
void zero_bytes(const Tensor& t);

}  // namespace decodelab
